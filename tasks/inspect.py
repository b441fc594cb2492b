"""Stage 3, inspect: checksum, full decode, geometry and perceptual hash of each new or changed object.

``inspect_bytes`` is pure (bytes in, a result or a reject out). ``inspect_objects`` reads each object once
and applies it; the flow runs it over chunks in parallel.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import fsspec
import numpy as np
import pandas as pd
import pyspng
from PIL import Image, UnidentifiedImageError

from loader import manifest as m
from loader.formats import route
from loader.pixels import pillow_pixels, sixteen_bit
from strata.storage import naming, uri_path
from tasks.listing import etag_of
from tasks.policy import stage

# Pillow format name -> manifest format.
_FORMATS = {
    "BMP": "bmp",
    "DIB": "bmp",
    "PNG": "png",
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "GIF": "gif",
    "TIFF": "tiff",
    "WEBP": "webp",
}
_CHANNELS = {
    "1": 1,
    "L": 1,
    "I": 1,
    "F": 1,
    "I;16": 1,
    "I;16B": 1,
    "I;16L": 1,
    "I;16N": 1,
    "LA": 2,
    "La": 2,
    "RGB": 3,
    "YCbCr": 3,
    "LAB": 3,
    "HSV": 3,
    "CMYK": 3,
    "RGBA": 4,
    "RGBa": 4,
    "PA": 4,
}
_PLAIN_MD5 = re.compile(r"^[0-9a-f]{32}$")
DEFAULT_MAX_PIXELS = 100_000_000
INSPECT_COLUMNS = (m.MD5, m.FORMAT, m.WIDTH, m.HEIGHT, m.CHANNELS, m.PHASH)


@dataclass(frozen=True)
class Inspected:
    """What inspection learned about one accepted object."""

    md5: str
    format: str
    width: int
    height: int
    channels: int
    phash: int


@dataclass(frozen=True)
class Rejected:
    """Why one object was not accepted: a reason code from ``manifest.REJECT_REASONS`` and a detail."""

    reason: str
    detail: str


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    return np.cos(np.pi * k * (2 * x + 1) / (2 * n))


_DCT32 = _dct_matrix(32)


def _grey(image: Image.Image) -> Image.Image:
    """The image as the hash sees it: Pillow's ``L``; a 16-bit one's samples scaled as the loader scales them
    (``loader.pixels.to_8bit``) but not rounded (mode F), so that 12-bit data keeps its detail."""
    if image.mode == "F":
        return image
    if sixteen_bit(image):
        return Image.fromarray(np.asarray(image, dtype=np.float32) * np.float32(255 / 65535), "F")
    return image.convert("L")


def phash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash, bit-compatible with ``imagehash.phash`` (hash_size 8, highfreq 4) on 8-bit
    images.

    The image is reduced to 32x32 grey (Lanczos), transformed with a 2-D DCT-II, and the 8x8 lowest
    frequencies are compared with their median; bit 63 is the top-left coefficient. 16-bit images are hashed
    on their samples scaled to 0..255 (imagehash would clip them to 255: one hash for most such pictures).
    """
    grey = np.asarray(_grey(image).resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8]
    bits = (low > np.median(low)).reshape(-1)
    return int(np.packbits(bits).view(">u8")[0])


_HASH_SOURCE = 64  # images are brought down to about this side before the 32x32 Lanczos of the hash


def _shrunk(image: Image.Image) -> Image.Image:
    """A grey copy box-reduced to about ``_HASH_SOURCE`` px: Lanczos over a full photo costs more than its decode.

    The hash of the reduced image differs from ``imagehash.phash`` of the full one by a few bits at most.
    """
    factor = min(image.size) // _HASH_SOURCE
    return _grey(image).reduce(factor) if factor >= 2 else image


# 8-bit grey, RGB and RGBA PNGs (IHDR colour types 0, 2, 6): libspng decodes them to exactly Pillow's pixels
# with SIMD unfiltering, in about half Pillow's time (the Paeth filter dominates PNG decoding).
_SPNG_COLOUR_TYPES = {0: "L", 2: "RGB", 6: "RGBA"}


def _png_pixels(data: bytes, image: Image.Image) -> Image.Image:
    """The decoded PNG: through libspng for plain 8-bit images, else (or when it fails) through Pillow.

    Any libspng failure falls back to Pillow, so truncated or corrupt files get Pillow's diagnosis.
    """
    if len(data) > 28 and data[24] == 8 and _SPNG_COLOUR_TYPES.get(data[25]) == image.mode:
        try:
            return Image.fromarray(pyspng.load(data), image.mode)
        except (RuntimeError, ValueError):
            pass
    image.load()
    return image


# Modes whose conversions to the loader's pixels (loader.pixels.pillow_pixels, rgb and grayscale) are known to
# work; others are tried at inspection, so that a mode the loader cannot convert (LAB) is a reject, not a
# training failure.
_CONVERTS = frozenset({"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})


def _unmapped(image: Image.Image) -> str | None:
    """Why the loader could not turn this image's samples into 0..255 pixels, from its header; None if it can."""
    if image.mode[0] in "IF" and not sixteen_bit(image):
        kind = "floating-point" if image.mode[0] == "F" else "32-bit or signed integer"
        return f"{kind} samples (Pillow mode {image.mode}) have no defined 0..255 mapping; store 8 or 16 bits"
    return None


def _channels(image: Image.Image) -> int:
    if image.mode == "P":
        return 4 if "transparency" in image.info else 3
    return _CHANNELS.get(image.mode, len(image.getbands()))


def inspect_bytes(data: bytes, etag: str = "", max_pixels: int = DEFAULT_MAX_PIXELS) -> Inspected | Rejected:
    """Checksum and fully decode one object's bytes.

    Args:
        data: the object's content.
        etag: the etag as listed; when it is a plain MD5 it must match the content.
        max_pixels: images with more pixels are rejected as ``too_large`` before they are decoded.
    """
    if not data:
        return Rejected("empty", "zero bytes")
    md5 = hashlib.md5(data).hexdigest()
    if _PLAIN_MD5.match(etag) and etag != md5:
        return Rejected("checksum_mismatch", f"etag {etag} but content md5 {md5}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            fmt = _FORMATS.get(image.format or "")
            if fmt is None:
                return Rejected("unsupported_format", f"{image.format} is not one of {', '.join(m.FORMATS)}")
            width, height = image.size
            if width * height > max_pixels:
                return Rejected("too_large", f"{width}x{height} = {width * height:,} pixels > limit {max_pixels:,}")
            if width <= 0 or height <= 0:
                return Rejected("unreadable", f"header claims {width}x{height} pixels")
            channels = _channels(image)  # from the header: a draft decode changes the mode
            unmapped = _unmapped(image)
            if unmapped is not None:
                return Rejected("unsupported_format", unmapped)
            route(fmt, data)  # the loader's choice of decoder: raises ValueError where its header checks fail
            if fmt == "jpeg" and min(width, height) >= 2 * _HASH_SOURCE:
                # DCT-scaled grey: still reads and checks every byte. Smaller JPEGs decode in full, as
                # imagehash decodes them, so their hash is bit-identical to imagehash's.
                image.draft("L", (_HASH_SOURCE, _HASH_SOURCE))
            if fmt == "png":
                image = _png_pixels(data, image)
            else:
                image.load()
            if image.mode not in _CONVERTS and not sixteen_bit(image):
                try:
                    pillow_pixels(image, 3)
                    pillow_pixels(image, 1)
                except ValueError as err:
                    return Rejected("unsupported_format", f"Pillow cannot convert mode {image.mode}: {err}")
            hashed = phash(_shrunk(image))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return Rejected("too_large", str(err))
    except UnidentifiedImageError:
        return Rejected("unreadable", "not an image Pillow recognises")
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as err:
        text = str(err) or type(err).__name__
        reason = (
            "truncated"
            if "truncat" in text.lower() or isinstance(err, EOFError) or "broken data stream" in text.lower()
            else "unreadable"
        )
        return Rejected(reason, text[:200])
    return Inspected(md5=md5, format=fmt, width=width, height=height, channels=channels, phash=hashed)


def inspect_objects(
    objects: pd.DataFrame,
    read: Callable[[str], bytes],
    max_pixels: int = DEFAULT_MAX_PIXELS,
    etag_now: Callable[[str], str | None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspect listed objects, reading each once through ``read(path)``.

    Args:
        objects: listing rows (path, key, folder, category, size, etag, mtime).
        read: returns an object's bytes; raises FileNotFoundError when it vanished. Other errors propagate
            (the task retries transient ones).
        etag_now: the object's current etag; asked only when the bytes contradict the listed etag, to tell
            an object overwritten since the listing (``changed_during_run``) from corrupt bytes.

    Returns:
        ``(accepted, rejects)``: the listing rows extended with md5, format, width, height, channels,
        phash; and the rejects rows (path, key, size, etag, reason, detail).
    """
    accepted: list[tuple] = []
    accepted_index: list[int] = []
    rejects: list[tuple] = []
    for index, path, key, size, etag in zip(
        objects.index, objects[m.PATH], objects[m.KEY], objects[m.SIZE], objects[m.ETAG], strict=False
    ):
        try:
            data = read(path)
        except FileNotFoundError:
            rejects.append((path, key, size, etag, "changed_during_run", "deleted after it was listed"))
            continue
        if len(data) != size:
            rejects.append((path, key, size, etag, "changed_during_run", f"listed with {size} bytes, read {len(data)}"))
            continue
        result = inspect_bytes(data, etag, max_pixels)
        if isinstance(result, Rejected) and result.reason == "checksum_mismatch" and etag_now is not None:
            now = etag_now(path)
            if now != etag:
                result = Rejected("changed_during_run", f"overwritten after it was listed (etag {etag} -> {now})")
        if isinstance(result, Rejected):
            rejects.append((path, key, size, etag, result.reason, result.detail))
        else:
            accepted_index.append(index)
            accepted.append((result.md5, result.format, result.width, result.height, result.channels, result.phash))
    found = pd.DataFrame(accepted, columns=list(INSPECT_COLUMNS), index=accepted_index)
    found = found.astype({m.WIDTH: "int32", m.HEIGHT: "int32", m.CHANNELS: "int32", m.PHASH: "uint64"})
    accepted_frame = objects.loc[accepted_index].join(found)
    rejects_frame = pd.DataFrame(rejects, columns=list(m.REJECT_COLUMNS))
    rejects_frame[m.SIZE] = rejects_frame[m.SIZE].astype("int64")
    return accepted_frame.reset_index(drop=True), rejects_frame


@stage("inspect")
def inspect_task(
    fs: fsspec.AbstractFileSystem, objects: pd.DataFrame, max_pixels: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspect one chunk of objects (Prefect task: retries transient storage errors)."""

    def read(uri: str) -> bytes:
        with naming("inspect", uri):
            return fs.cat_file(uri_path(fs, uri))

    def etag_now(uri: str) -> str | None:
        try:
            with naming("inspect", uri):
                return etag_of(fs.info(uri_path(fs, uri), refresh=True))
        except FileNotFoundError:
            return None

    return inspect_objects(objects, read, max_pixels, etag_now)
