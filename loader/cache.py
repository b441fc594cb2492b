"""The pixel cache: every image's pixels as ``loader.images.decode`` yields them (decoded, cropped, filtered and
resized: what augmentation and rescaling start from), kept by md5 in ``cache_dir``, so that warm epochs neither
read nor decode images (no TensorFlow here).

An entry is one image's float32 samples, row-major, in native byte order: 602,112 bytes at 224x224 in rgb
(a 640x480 BMP is 921,654), read with one copy. Every entry has the pipeline's output shape; a file of
another size (cut short, or foreign) counts as no entry and is written again. The output itself is stored,
not smaller uint8 pixels to resize, so that a cached batch is bit for bit the batch decoding gives: uint8
would have to round the box filter's means, and rounding costs a quarter of a BMP's decode on every
uncached image.

Entries live under a folder named by a digest of everything that decides those pixels: the pipeline's
decode settings, this module's ``LAYOUT``, and the TensorFlow and Pillow versions (their decoders); other
settings or versions never read them. The graph writes an entry after decoding a row that has none
(:meth:`PixelCache.store`, atomically). A row whose entry exists reads it instead of its image once the
image's md5 was checked in this process, so an entry always holds the curated image's pixels.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from loader.reader import write_atomic

__all__ = ["PixelCache"]

# Bump when decode yields other pixels for the same bytes and settings: older entries are then unused.
LAYOUT = 1


class PixelCache:
    """Entries of one pipeline's decode settings, by md5, under ``folder/pixels/<digest of the settings>``.

    Args:
        folder: the pipeline's ``cache_dir``.
        settings: everything besides the bytes that decides the pixels (JSON-serialisable).
        md5s: the md5 of every manifest row.
        shape: the pipeline's output ``(height, width, channels)``.
    """

    def __init__(
        self, folder: str | os.PathLike, settings: dict[str, Any], md5s: np.ndarray, shape: tuple[int, int, int]
    ) -> None:
        import PIL
        import tensorflow as tf

        described = json.dumps(
            {"layout": LAYOUT, "tensorflow": tf.__version__, "pillow": PIL.__version__, **settings}, sort_keys=True
        )
        self.root = Path(folder) / "pixels" / hashlib.sha256(described.encode()).hexdigest()[:16]
        self.root.mkdir(parents=True, exist_ok=True)
        about = self.root / "settings.json"  # what the folder holds, for a person clearing caches
        if not about.exists():
            write_atomic(about, described.encode())
        self._md5s = md5s
        self.bytes = int(np.prod(shape)) * 4
        # Per distinct md5 (rows of one content share an entry): whether its entry exists (1) or not (0), -1
        # before the first look.
        self._contents, distinct = pd.factorize(md5s)  # by hash: a quarter of np.unique's sort at 1M rows
        self._present = np.full(len(distinct), -1, dtype=np.int8)

    def path(self, row: int) -> str:
        md5 = self._md5s[row]
        return str(self.root / md5[:2] / md5)

    def paths(self, rows: np.ndarray) -> np.ndarray:
        return np.asarray([self.path(row) for row in rows.tolist()], dtype=object)

    def sizes(self, rows: np.ndarray) -> np.ndarray:
        """Per row, the size in bytes of its entry, or 0 while it has none: looked up once a
        content, then tracked."""
        contents = self._contents[rows]
        for row in rows[self._present[contents] < 0].tolist():
            try:
                found = os.stat(self.path(row)).st_size == self.bytes
            except FileNotFoundError:
                found = False
            self._present[self._contents[row]] = found
        return np.where(self._present[contents] > 0, self.bytes, 0)

    def store(self, path: bytes, pixels: np.ndarray, row: np.int64) -> np.int64:
        """Keep one row's pixels as its entry at ``path``; called from the graph. Returns its size."""
        data = np.ascontiguousarray(pixels, dtype=np.float32).tobytes()
        write_atomic(Path(os.fsdecode(path)), data)
        self._present[self._contents[int(row)]] = 1
        return np.int64(len(data))
