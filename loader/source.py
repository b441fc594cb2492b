"""The source of a loader pipeline: which rows each step yields, their bytes read and verified ahead.

:class:`Elements` turns the sampler's draws into chunks of elements (paths or bytes, decode routes, labels,
augmentation parameters) and exposes them as a ``tf.data.Dataset`` driven through ``numpy_function``, one
generator per iteration of the dataset. At interpreter exit every source ends first (:func:`_end_all`), so
that no tf.data thread calls Python while the interpreter finalizes: such a call never returns.
"""

from __future__ import annotations

import atexit
import itertools
import threading
import time
import weakref
from collections import deque
from typing import Any, Iterator

import numpy as np
import pandas as pd
import tensorflow as tf

from loader import manifest as m
from loader.augment import PARAMS, Augment, sample_keys
from loader.cache import PixelCache
from loader.formats import CACHED, route
from loader.reader import Reader, Skipped
from loader.stages import host_map
from strata.errors import ImageError

__all__ = ["Elements"]

_CHUNK = 256  # draws per generator step: amortises Python overhead; reads run two chunks ahead
_AHEAD = 2
_LIVE = 8  # iterations of one dataset whose state is kept; the oldest is dropped beyond that
_OPEN: weakref.WeakSet = weakref.WeakSet()  # every source of this process, ended at its exit (_end_all)


class Elements:
    """The source of the dataset: draws rows, reads their bytes ahead, yields chunks of elements.

    With ``paths`` (local files, or a local cache of remote ones) it yields paths: it reads and verifies only
    rows this process has not verified yet, and the graph reads the files itself, so a warm epoch runs no
    Python per image. Without (remote bytes not cached, or ``on_error="skip"``, which must catch every read)
    it yields the bytes. With a pixel ``cache`` (paths only), a row whose entry exists yields the entry's path
    and the route CACHED; one without yields where the graph stores its entry (``entry``, ``row``). Each
    iteration of the dataset calls it anew and continues with the next epochs, so
    repeated iteration (``model.fit(epochs=...)``) sees fresh orders while every process sees the same
    sequence.

    It is not ``tf.data.Dataset.from_generator``: the first use of that op in a process pins glibc's mmap
    threshold at 128 KiB for good (TensorFlow's ``ApplyPython311MemoryPatch``), after which every image-sized
    tensor of every pipeline and model in the process is a fresh ``mmap``, hundreds of page faults an image:
    it halved the throughput of this pipeline and of keras' beside it. The same generator is driven
    through ``numpy_function`` instead, one state per iteration (:meth:`dataset`).
    """

    def __init__(
        self,
        rows: pd.DataFrame,
        labels: np.ndarray,
        scales: np.ndarray,
        draws: Any,
        epochs: int | None,
        reader: Reader,
        paths: np.ndarray | None,
        augment: Augment | None,
        shape: tuple[int, int],
        seed: int,
        skip: bool,
        members: list[np.ndarray] | None,
        cache: PixelCache | None = None,
    ) -> None:
        self._uris = rows[m.PATH].to_numpy()
        self._formats = rows[m.FORMAT].to_numpy()
        self._md5s = rows[m.MD5].to_numpy()
        self._sizes = rows[m.SIZE].to_numpy().astype(np.int32)
        # How to decode each row: chosen from its header once its bytes were read (and verified).
        self._routes = np.full(len(self._formats), -1, dtype=np.int32)
        self._labels = labels
        self._scales = scales
        self._draws = draws
        self._epochs = epochs
        self._reader = reader
        self._paths = paths
        self._augment = augment
        self._shape = shape
        self._seed = seed
        self._skip = skip
        self._members = members
        self._cache = cache
        self.skipped = Skipped()
        self._iterations = 0
        self._live: dict[int, Iterator[dict[str, np.ndarray]] | None] = {}  # None: finished
        self._lock = threading.Lock()
        self._ended = False  # set at exit: every step says there is no more
        self.stepping = 0  # steps under way
        _OPEN.add(self)

    def dataset(self) -> tf.data.Dataset:
        """The chunks as a dataset: each iteration starts its own generator, which a sequential map steps
        through until a step says there is no more."""
        spec = self.signature()

        def step(iteration: tf.Tensor) -> tuple[tf.Tensor, dict[str, tf.Tensor]]:
            dtypes = [tf.bool, *(s.dtype for s in spec.values())]
            more, *values = tf.numpy_function(lambda i: self._next(i, spec), [iteration], dtypes)
            for value, s in zip(values, spec.values(), strict=True):
                value.set_shape(s.shape)
            return more, dict(zip(spec, values, strict=True))

        def chunks(iteration: tf.Tensor) -> tf.data.Dataset:
            steps = tf.data.Dataset.from_tensors(iteration).repeat().map(step)
            return steps.take_while(lambda more, _: more).map(lambda _, element: element)

        start = host_map(tf.data.Dataset.from_tensors(0), lambda _: tf.numpy_function(self._start, [], tf.int64))
        return start.flat_map(chunks)

    def end(self) -> None:
        """End every iteration: its next step says there is no more (a step under way finishes first), and
        new ones start empty."""
        self._ended = True

    def running(self) -> bool:
        """Whether an iteration has not said that there is no more."""
        return any(chunks is not None for chunks in list(self._live.values()))

    def _start(self) -> np.int64:
        with self._lock:
            iteration, self._iterations = self._iterations, self._iterations + 1
            self._live[iteration] = None if self._ended else self._generate(iteration)
            for old in [i for i in self._live if i <= iteration - _LIVE]:
                # Abandoned (or very slow): freeing its generator closes it and releases its read-ahead. Closing
                # it here would raise instead if another thread is in a step of it.
                del self._live[old]
        return np.int64(iteration)

    def _next(self, iteration: np.int64, spec: dict[str, tf.TensorSpec]) -> list[np.ndarray]:
        """``[more, *element]`` in ``spec``'s order: the iteration's next chunk, or ``more`` False and an empty
        chunk at its end."""
        if int(iteration) not in self._live:
            raise RuntimeError(
                f"iteration {iteration} of this dataset was dropped: at most {_LIVE} iterations keep their "
                "state at once; iterate it fewer times side by side"
            )
        with self._lock:
            self.stepping += 1
        try:
            return self._step(int(iteration), spec)
        finally:
            with self._lock:
                self.stepping -= 1

    def _step(self, iteration: int, spec: dict[str, tf.TensorSpec]) -> list[np.ndarray]:
        # None: ended at exit, finished, or dropped since _next looked. Letting the generator go below closes it.
        chunks = None if self._ended else self._live.get(iteration)
        element = next(chunks, None) if chunks is not None else None
        if element is None:
            self._live[iteration] = None
            return [np.False_, *(np.zeros([0, *s.shape[1:]], s.dtype.as_numpy_dtype) for s in spec.values())]
        return [np.True_, *(element[name] for name in spec)]

    def signature(self) -> dict[str, tf.TensorSpec]:
        spec = {
            "how": tf.TensorSpec([None], tf.int32),
            "scale": tf.TensorSpec([None], tf.int32),
            "label": tf.TensorSpec([None], tf.int64),  # int32 only after the host stages (stages.py)
        }
        if self._paths is not None:
            spec["path"], spec["size"] = tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int32)
            if self._cache is not None:
                spec["entry"], spec["row"] = tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.int64)
        else:
            spec["data"] = tf.TensorSpec([None], tf.string)
        if self._augment is not None:
            spec["params"] = tf.TensorSpec([None, PARAMS], tf.float32)
            spec["noise_seed"] = tf.TensorSpec([None, 2], tf.int64)
        return spec

    def _generate(self, iteration: int) -> Iterator[dict[str, np.ndarray]]:
        first = iteration * self._epochs if self._epochs else 0
        pending: deque = deque()
        for rows, groups, epoch in self._chunks(first):
            reads = rows.tolist()
            if self._paths is not None:
                reads = [row for row in reads if not self._reader.verified(row) or self._routes[row] < 0]
            pending.append((rows, groups, epoch, reads, self._reader.submit(reads)))
            if len(pending) > _AHEAD:
                yield self._element(*pending.popleft())
        while pending:
            yield self._element(*pending.popleft())

    def _chunks(self, first_epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
        for draws in itertools.islice(self._draws(first_epoch), self._epochs):
            for start in range(0, len(draws.rows), _CHUNK):
                yield draws.rows[start : start + _CHUNK], draws.groups[start : start + _CHUNK], draws.epoch

    def _element(
        self, rows: np.ndarray, groups: np.ndarray, epoch: int, reads: list[int], futures: list
    ) -> dict[str, np.ndarray]:
        if self._paths is not None:
            for row, read in zip(reads, Reader.results(futures), strict=True):
                read = self._routed(row, read)
                if isinstance(read, ImageError):
                    raise read
            element = {"path": self._paths[rows], "size": self._sizes[rows], "how": self._routes[rows]}
            if self._cache is not None:
                element.update(self._cached(rows, element))
        else:
            kept, data = [], []
            for row, group, read in zip(rows.tolist(), groups.tolist(), Reader.results(futures), strict=True):
                read = self._routed(row, read)
                if not isinstance(read, ImageError):
                    kept.append(row)
                    data.append(read)
                    continue
                if not self._skip:
                    raise read
                self.skipped.add(self._uris[row], str(read))
                if self._members is not None:  # balanced: keep the batch whole with another image of the class
                    row, read = self._substitute(row, group)
                    kept.append(row)
                    data.append(read)
            rows = np.asarray(kept, dtype=np.int64)
            element = {"data": np.asarray(data, dtype=object).reshape(-1), "how": self._routes[rows]}
        element.update(scale=self._scales[rows], label=self._labels[rows])
        if self._augment is not None:
            keys = sample_keys(self._seed, self._md5s[rows], np.full(len(rows), epoch))
            element["params"], element["noise_seed"] = self._augment.draw(keys, *self._shape)
        return element

    def _cached(self, rows: np.ndarray, element: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Where the rows' pixels come from with the pixel cache: their entry where it exists (these rows' images
        were all verified in this process), else their image, with the entry to store after decoding."""
        sizes = self._cache.sizes(rows)
        hit = sizes > 0
        entries = self._cache.paths(rows)
        return {
            "path": np.where(hit, entries, element["path"]),
            "size": np.where(hit, sizes, element["size"]).astype(np.int32),
            "how": np.where(hit, CACHED, element["how"]).astype(np.int32),
            "entry": np.where(hit, "", entries).astype(object),
            "row": rows.astype(np.int64),
        }

    def _routed(self, row: int, read: bytes | ImageError) -> bytes | ImageError:
        """``read``, once the row's decode route is known from its header; an ImageError naming the image when
        the bytes (which matched the manifest's md5) are not the image the manifest says."""
        if isinstance(read, ImageError):
            return read
        try:
            self._routes[row] = route(self._formats[row], read)
        except (ValueError, IndexError) as err:
            return ImageError(
                f"{self._uris[row]} matches its md5 but does not decode as {self._formats[row]}: {err}. Re-curate "
                "the dataset (inspection rejects such files), or pass on_error='skip' to train without it"
            )
        return read

    def _substitute(self, row: int, group: int) -> tuple[int, bytes]:
        """The next readable image of the same group after ``row``, in manifest order."""
        members = self._members[group]
        start = int(np.searchsorted(members, row))
        for other in np.roll(members, -start - 1).tolist():
            if self._uris[other] in self.skipped.paths:
                continue
            read = self._routed(other, self._reader.read_or_error(other))
            if not isinstance(read, ImageError):
                return other, read
            self.skipped.add(self._uris[other], str(read))
        raise ImageError(f"every image of class group {group} is unreadable; see the warnings above")


def _end_all(idle: float = 0.1, limit: float = 10.0) -> None:
    """End every source before the interpreter shuts down, and wait until no pipeline will call it again.

    A pipeline still iterating at exit calls its step in a tf.data thread; if that call waits for the GIL once
    the interpreter is finalizing, the thread never returns, and destroying the iterator waits for it for
    ever: the process hangs at exit. Ended sources answer their next step with "no more" at once, and their
    pipelines stop. A pipeline still decoding its chunk steps again when the chunk is used up, so this waits
    until every iteration has ended, or the process spent almost no CPU for ``idle`` seconds: whatever still
    runs has full buffers and calls nothing until it is destroyed, which cancels it first.
    """
    sources = list(_OPEN)
    for source in sources:
        source.end()
    deadline, cpu = time.monotonic() + limit, time.process_time()
    while time.monotonic() < deadline and any(s.stepping or s.running() for s in sources):
        time.sleep(idle)  # also lets a step that waits for the GIL take it, and see the end
        used, cpu = time.process_time() - cpu, time.process_time()
        if used < idle / 20 and not any(s.stepping for s in sources):
            return


# Before concurrent.futures joins the readers' threads (it registers there too, and the last registered runs
# first), so a step in flight does not meet a shut-down executor; plain atexit on interpreters without it.
getattr(threading, "_register_atexit", atexit.register)(_end_all)
