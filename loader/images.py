"""Image bytes in, float32 pixels out: a verified, cached, parallel reader and an in-graph decoder.

Reading happens in Python threads (storage I/O and md5 release the GIL): every object's bytes are checked
against the manifest's md5, so a model never trains on an image other than the one curated; remote bytes
land in ``cache_dir`` under their md5 and are never fetched twice. Decoding happens in TensorFlow:
JPEG through ``decode_jpeg`` at a reduced DCT scale when the target is at most half the source (the main
speed lever), PNG, GIF (first frame), WebP and 24/32-bit BMP through ``decode_image``, and TIFF and
palette BMP (which TensorFlow cannot decode, or decodes wrongly) through Pillow.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import fsspec
import numpy as np
import tensorflow as tf
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from strata.errors import ImageError
from strata.storage import is_transient

log = logging.getLogger("loader")

# Decode routes, chosen per sample on the Python side.
JPEG, NATIVE, PILLOW = 0, 1, 2
RATIOS = (1, 2, 4, 8)
# How shrinks of more than 2x are filtered before bilinear sampling (see resize()).
Antialias = Literal["box"] | bool
ANTIALIAS: tuple[Antialias, ...] = ("box", True, False)
_RETRIES = (0.5, 2.0, 8.0)


def _source_sizes(
    widths: np.ndarray, heights: np.ndarray, roi: tuple[int, int, int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (height, width) that decoding resizes from: the crop's when there is one."""
    return (np.full(len(widths), roi[2]), np.full(len(widths), roi[3])) if roi else (heights, widths)


def _decoded_sizes(
    widths: np.ndarray, heights: np.ndarray, scales: np.ndarray, roi: tuple[int, int, int, int] | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the (height, width) it decodes and crops to: a JPEG's at its DCT scale (libjpeg rounds scaled
    sizes up; a crop's corners are on the scaled grid)."""
    h, w = _source_sizes(widths, heights, roi)
    ratios = np.asarray(RATIOS)[scales]
    return -(-h // ratios), -(-w // ratios)


def jpeg_scales(
    widths: np.ndarray,
    heights: np.ndarray,
    target: tuple[int, int] | None,
    roi: tuple[int, int, int, int] | None,
    keep_aspect_ratio: bool,
) -> np.ndarray:
    """Per JPEG, the index into RATIOS of the largest DCT downscale that keeps at least the target resolution.

    With a ``roi`` the crop decides, and its corners must fall on the scaled pixel grid.
    """
    scales = np.zeros(len(widths), dtype=np.int32)
    if target is None:
        return scales
    h, w = _source_sizes(widths, heights, roi)
    if keep_aspect_ratio:  # the image is scaled to fit, so only the binding side must keep its resolution
        scale = np.minimum(target[0] / h, target[1] / w)
        need_h, need_w = np.ceil(h * scale), np.ceil(w * scale)
    else:
        need_h, need_w = np.full(len(h), target[0]), np.full(len(w), target[1])
    for index, ratio in enumerate(RATIOS[1:], start=1):
        fits = (h // ratio >= need_h) & (w // ratio >= need_w)
        if roi:
            fits &= all(v % ratio == 0 for v in roi)
        scales = np.where(fits, index, scales)
    return scales.astype(np.int32)


def uniform_jpeg(
    formats: np.ndarray,
    scales: np.ndarray,
    widths: np.ndarray,
    heights: np.ndarray,
    target: tuple[int, int] | None,
    roi: tuple[int, int, int, int] | None,
) -> tuple[int, bool] | None:
    """``(scale index, shrinks more than 2x)`` shared by every row when all are JPEGs decoding alike, else None."""
    if len(formats) == 0 or not (formats == "jpeg").all() or (scales != scales[0]).any():
        return None
    h, w = _decoded_sizes(widths, heights, scales, roi)
    shrinking = np.zeros(len(h), dtype=bool) if target is None else shrinks((h, w), target)
    if (shrinking != shrinking[0]).any():
        return None
    return int(scales[0]), bool(shrinking[0])


def route(fmt: str, data: bytes) -> int:
    """How to decode one image: TensorFlow's JPEG path, its generic decoder, or Pillow."""
    if fmt == "jpeg":
        return JPEG
    if fmt == "tiff" or (fmt == "bmp" and int.from_bytes(data[28:30], "little") <= 8):
        return PILLOW  # TensorFlow has no TIFF decoder and ignores BMP palettes
    return NATIVE


def read_checked(path: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Read a verified image's file in the graph, failing with its path when its size changed since."""
    data = tf.io.read_file(path)
    same = tf.debugging.Assert(
        tf.equal(tf.strings.length(data), size),
        ["image changed since this process verified its md5; re-curate the dataset:", path],
    )
    with tf.control_dependencies([same]):
        return tf.identity(data)


def _pil_decode(data: bytes, channels: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        image.seek(0)
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    return pixels if channels == 3 else pixels[..., None]


def common_size(
    widths: np.ndarray, heights: np.ndarray, scales: np.ndarray, roi: tuple[int, int, int, int] | None
) -> tuple[int, int] | None:
    """The ``(height, width)`` every row decodes and crops to (JPEGs at their DCT scale), when all agree.

    Images of one size can be stacked as decoded and resized as a batch: one resize call instead of one an
    image, and a uint8 stack instead of a float32 one.
    """
    if len(widths) == 0:
        return None
    h, w = _decoded_sizes(widths, heights, scales, roi)
    if (h != h[0]).any() or (w != w[0]).any():
        return None
    return int(h[0]), int(w[0])


def decode_pixels(
    data: tf.Tensor,
    how: tf.Tensor,
    scale: tf.Tensor,
    channels: int,
    roi: tuple[int, int, int, int] | None,
    uniform: tuple[int, bool] | None = None,
) -> tf.Tensor:
    """Decode and crop one image in the graph: uint8 ``[H, W, C]``, a JPEG at its reduced DCT scale.

    ``uniform`` (the JPEG scale index and whether resizing shrinks more than 2x, when every image is a JPEG
    decoding at one scale) builds a graph without branches: cheaper per image, and quicker to start an epoch.
    """
    if uniform is not None:
        ratio = uniform[0]
        image = tf.io.decode_jpeg(data, channels=channels, ratio=RATIOS[ratio])
        scale = tf.constant(ratio, tf.int32)
    else:
        image = tf.switch_case(
            how,
            [lambda: _jpeg(data, scale, channels), lambda: _native(data, channels), lambda: _pillow(data, channels)],
        )
    image.set_shape([None, None, channels])
    if roi is not None:
        y, x, h, w = (tf.bitwise.right_shift(tf.constant(v, tf.int32), scale) for v in roi)
        image = image[y : y + h, x : x + w]
    return image


def resize(
    images: tf.Tensor, image_size: tuple[int, int], keep_aspect_ratio: bool, antialias: Antialias
) -> tf.Tensor:
    """Resize ``[H, W, C]`` or ``[B, H, W, C]`` pixels (uint8 or float32) bilinearly to ``image_size``: float32.

    ``keep_aspect_ratio`` scales to fit and pads with zeros (centred), so no pixel of the object is cut away.
    ``antialias`` filters before sampling (callers pass False when the image shrinks by 2x or less, where
    bilinear sampling already averages neighbours): ``"box"`` averages blocks of the integer factor first
    (:func:`box_reduce`), True takes TensorFlow's antialiased resize (a triangle filter as wide as the
    shrink: the smoothest and by far the costliest), False samples as is.
    """
    if antialias == "box":
        images = box_reduce(images, image_size, keep_aspect_ratio)
    if keep_aspect_ratio:
        return tf.image.resize_with_pad(images, image_size[0], image_size[1], antialias=antialias is True)
    return tf.image.resize(images, image_size, antialias=antialias is True)


def box_reduce(images: tf.Tensor, image_size: tuple[int, int], keep_aspect_ratio: bool) -> tf.Tensor:
    """Shrink ``[H, W, C]`` or ``[B, H, W, C]`` pixels (uint8 or float32) by the integer factors that keep at
    least ``image_size`` (``floor(H / height)`` and ``floor(W / width)``, at least 1; with
    ``keep_aspect_ratio`` the larger of the two on both sides), averaging the pixels each output pixel
    covers: float32 ``[H // kh, W // kw, C]``.

    Where the factors divide the size, every output pixel is the mean of its kh x kw block, the box filter a
    JPEG's DCT scale applies; otherwise the blocks span the whole image, slightly more than k pixels each.
    Factors up to 2 take TensorFlow's bilinear resize (sampling at the centre of each 2x2 block averages it
    exactly, and costs less than the area resize), larger ones its area resize.
    """
    static = images.shape[-3:-1]
    if static.is_fully_defined():
        height, width, maximum = int(static[0]), int(static[1]), max
    else:
        shape = tf.shape(images)
        height, width, maximum = shape[-3], shape[-2], tf.maximum
    factor_h, factor_w = maximum(height // image_size[0], 1), maximum(width // image_size[1], 1)
    if keep_aspect_ratio:
        factor_h = factor_w = maximum(factor_h, factor_w)
    size = (height // factor_h, width // factor_w)
    pairs = maximum(factor_h, factor_w) <= 2
    if isinstance(pairs, bool):
        return tf.image.resize(images, size, method="bilinear" if pairs else "area")
    size = tf.stack(size)
    return tf.cond(pairs, lambda: tf.image.resize(images, size), lambda: tf.image.resize(images, size, method="area"))


def shrinks(size: tuple[Any, Any], image_size: tuple[int, int]) -> Any:
    """Whether resizing ``size`` (heights, widths: ints or arrays) to ``image_size`` shrinks either side by more
    than 2x, and so filters before sampling."""
    return (size[0] > 2 * image_size[0]) | (size[1] > 2 * image_size[1])


def decode(
    data: tf.Tensor,
    how: tf.Tensor,
    scale: tf.Tensor,
    channels: int,
    image_size: tuple[int, int] | None,
    keep_aspect_ratio: bool,
    roi: tuple[int, int, int, int] | None,
    uniform: tuple[int, bool] | None = None,
    antialias: Antialias = "box",
) -> tf.Tensor:
    """Decode, crop and resize one image in the graph (:func:`decode_pixels`, :func:`resize`); float32
    ``[H, W, C]`` in 0..255."""
    pixels = decode_pixels(data, how, scale, channels, roi, uniform)
    if image_size is None:
        return tf.cast(pixels, tf.float32)
    # Sampling: TensorFlow's bilinear resize runs faster on float32 than on uint8 for the small images a JPEG's
    # DCT scale yields, with the same results (for a full-size BMP or PNG the cast costs more than it saves:
    # benchmarks/NOTES.md). Filtering: the box reads the uint8 pixels, sparing a float32 copy of the image.

    def sampled() -> tf.Tensor:
        return resize(tf.cast(pixels, tf.float32), image_size, keep_aspect_ratio, False)

    def filtered() -> tf.Tensor:
        return resize(pixels, image_size, keep_aspect_ratio, antialias)

    if uniform is not None:
        return filtered() if uniform[1] and antialias is not False else sampled()
    if antialias is False:
        return sampled()
    height, width = tf.unstack(tf.shape(pixels)[:2])
    return tf.cond(shrinks((height, width), image_size), filtered, sampled)


def _jpeg(data: tf.Tensor, scale: tf.Tensor, channels: int) -> tf.Tensor:
    return tf.switch_case(scale, [lambda r=r: tf.io.decode_jpeg(data, channels=channels, ratio=r) for r in RATIOS])


def _native(data: tf.Tensor, channels: int) -> tf.Tensor:
    return tf.io.decode_image(data, channels=channels, expand_animations=False)


def _pillow(data: tf.Tensor, channels: int) -> tf.Tensor:
    pixels = tf.numpy_function(lambda b: _pil_decode(b, channels), [data], tf.uint8, stateful=False)
    return tf.ensure_shape(pixels, [None, None, channels])


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
        outcomes: list[bytes | ImageError] = []
        for row in rows:
            try:
                outcomes.append(self.read(row))
            except ImageError as err:
                outcomes.append(err)
        return outcomes

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
            _write_atomic(cached, data)
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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
