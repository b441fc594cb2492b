"""Image bytes by manifest row: a verified, cached, parallel reader (no TensorFlow).

Reading happens in Python threads (storage I/O and md5 release the GIL): every object's bytes are checked
against the manifest's md5, so a model never trains on an image other than the one curated; remote bytes
land in ``cache_dir`` under their md5 and are never fetched twice. ``loader.images`` decodes them.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import fsspec
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from strata.errors import ImageError
from strata.storage import is_transient

log = logging.getLogger("loader")
_RETRIES = (0.5, 2.0, 8.0)


@dataclass
class Skipped:
    """Images skipped with ``on_error="skip"``: how many, and which (path -> reason)."""

    paths: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def count(self) -> int:
        return len(self.paths)

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path not in self.paths:
                log.warning("skipping %s: %s", path, reason)
            self.paths[path] = reason


class Reader:
    """Fetch image bytes by manifest row, in parallel, verified against the manifest's md5.

    Args:
        fs: the filesystem the image paths live on.
        paths: fsspec path of every manifest row.
        uris: full URI of every row (for messages).
        md5s: expected md5 of every row; bytes are checked against it on their first read in this process,
            later reads check the size only (hashing every epoch costs a tenth of the decode).
        sizes: expected size of every row.
        cache_dir: where remote bytes are kept, by md5; None reads storage every time.
        threads: concurrent reads.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        paths: Sequence[str],
        uris: Sequence[str],
        md5s: Sequence[str],
        sizes: Sequence[int],
        cache_dir: str | os.PathLike | None = None,
        threads: int = 8,
    ) -> None:
        self._fs = fs
        self._paths = paths
        self._uris = uris
        self._md5s = md5s
        self._sizes = sizes
        self._verified: set[int] = set()  # rows whose bytes matched their md5 once in this process
        self._cache = Path(cache_dir) if cache_dir is not None else None
        self._local = isinstance(fs, LocalFileSystem)
        self._threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="strata-read")

    @property
    def local_paths(self) -> np.ndarray | None:
        """Per row, a local file holding its bytes once the row is verified (the image itself, or its cache
        entry), for TensorFlow to read in the graph; None when the bytes live only in remote storage."""
        if self._local:
            return np.asarray(self._paths, dtype=object)
        if self._cache is not None:
            return np.asarray([str(self._cache / md5[:2] / md5) for md5 in self._md5s], dtype=object)
        return None

    def verified(self, row: int) -> bool:
        """Whether the row's bytes matched its md5 once in this process (later reads check the size only)."""
        return row in self._verified

    def submit(self, rows: Sequence[int]) -> list[Future]:
        """Start reading ``rows``: one task per thread, each a contiguous slice (a future per file costs more
        than reading a local file). :meth:`results` turns the futures back into one outcome per row."""
        rows = [int(row) for row in rows]
        step = -(-len(rows) // self._threads) or 1
        return [self._pool.submit(self._read_all, rows[i : i + step]) for i in range(0, len(rows), step)]

    @staticmethod
    def results(futures: list[Future]) -> list[bytes | ImageError]:
        """Per row submitted, its bytes or the ImageError that reading it raised, in order."""
        return [outcome for future in futures for outcome in future.result()]

    def _read_all(self, rows: list[int]) -> list[bytes | ImageError]:
        return [self.read_or_error(row) for row in rows]

    def read_or_error(self, row: int) -> bytes | ImageError:
        """:meth:`read`, with the ImageError it raises returned instead."""
        try:
            return self.read(row)
        except ImageError as err:
            return err

    def read(self, row: int) -> bytes:
        """The verified bytes of one row. Raises ImageError naming the object when it is missing or changed."""
        expected = self._md5s[row]
        cached = self._cache / expected[:2] / expected if self._cache is not None else None
        if cached is not None and cached.exists():
            data = cached.read_bytes()
            if hashlib.md5(data).hexdigest() == expected:
                self._verified.add(row)
                return data
        data = self._fetch(row)
        if row in self._verified and len(data) == self._sizes[row]:
            return data
        digest = hashlib.md5(data).hexdigest()
        if digest != expected:
            raise ImageError(
                f"{self._uris[row]} changed since it was curated: md5 {digest}, manifest says {expected}. "
                "Re-curate the dataset, or pass on_error='skip' to train without it"
            )
        self._verified.add(row)
        if cached is not None:
            write_atomic(cached, data)
        return data

    def _fetch(self, row: int) -> bytes:
        attempt = 0
        while True:
            try:
                if self._local:  # a plain read: fsspec's local cat_file costs twice as much
                    with open(self._paths[row], "rb") as handle:
                        return handle.read()
                return self._fs.cat_file(self._paths[row])
            except FileNotFoundError as err:
                raise ImageError(
                    f"{self._uris[row]} is listed in the manifest but does not exist any more. Restore it, "
                    "re-curate the dataset, or pass on_error='skip' to train without it"
                ) from err
            except Exception as err:
                if attempt == len(_RETRIES) or not is_transient(err):
                    raise ImageError(f"cannot read {self._uris[row]}: {err}") from err
                log.info("retrying %s after %s (attempt %d)", self._uris[row], err, attempt + 1)
                time.sleep(_RETRIES[attempt])
                attempt += 1


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
