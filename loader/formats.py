"""Which decoder an image takes, from its header bytes alone: the loader's decode routes. Needs only numpy, so
inspection checks that every image it accepts has a route (``route`` raises for bytes that are not the format
they claim); the loader picks the route of each image when its bytes are first read and verified.
"""

from __future__ import annotations

import numpy as np

__all__ = ["JPEG", "NATIVE", "PILLOW", "GREY", "GREY_JPEG", "PNG16", "ALPHA", "CACHED", "route"]

# Decode routes (loader.images.decode_pixels): TensorFlow's JPEG decoder for colour (YCbCr, CMYK) and for grey
# JPEGs, its generic decoder for colour and for grey images and for WebPs with alpha (which it decodes only
# with their alpha), its PNG decoder at 16 bits, or Pillow.
JPEG, NATIVE, PILLOW, GREY, GREY_JPEG, PNG16, ALPHA = 0, 1, 2, 3, 4, 5, 6
# Not a format: the row's bytes are its entry in the pixel cache (loader.cache), pixels as stored_pixels made them.
CACHED = 7


def route(fmt: str, data: bytes) -> int:
    """How to decode one image, from its header: one of the routes above.

    Raises:
        ValueError: the bytes are not a ``fmt`` image (what is wrong, for the caller to name the image).
    """
    if fmt == "jpeg":
        return GREY_JPEG if _jpeg_components(data) == 1 else JPEG
    if fmt == "png":
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR" or len(data) < 33:
            raise ValueError("no PNG signature and header")
        if data[24] == 16:
            return PNG16
        return GREY if data[25] in (0, 4) else NATIVE  # grey, grey + alpha
    if fmt == "bmp":
        return _bmp_route(data)
    if fmt == "webp":
        if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
            raise ValueError("no RIFF/WEBP header")
        if len(data) < 25:
            raise ValueError("a WebP header cut short")
        if data[12:16] == b"VP8X":  # extended: flags say animation (Pillow: TensorFlow has no frame 0) and alpha
            return PILLOW if data[20] & 0x02 else ALPHA if data[20] & 0x10 else NATIVE
        return ALPHA if data[12:16] == b"VP8L" and data[24] & 0x10 else NATIVE  # lossless: alpha_is_used
    signatures = {"gif": (b"GIF87a", b"GIF89a"), "tiff": (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")}  # TIFF, BigTIFF
    if fmt not in signatures:
        raise ValueError(f"format {fmt!r} is not one the loader decodes")
    if not data.startswith(signatures[fmt]):
        raise ValueError(f"no {fmt.upper()} signature")
    return PILLOW  # TIFF: no TensorFlow decoder. GIF: TensorFlow's first frame can differ from Pillow's


def _jpeg_components(data: bytes) -> int:
    """The component count of a JPEG's frame header (1 grey, 3 YCbCr, 4 CMYK), walking its marker segments."""
    if data[:2] != b"\xff\xd8":
        raise ValueError("no JPEG start-of-image marker")
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:  # stray bytes before a marker: libjpeg warns and skips them, so does this
            i = data.find(b"\xff", i)
            if i < 0:
                break
            continue
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start-of-frame
            if i + 9 >= len(data):
                break
            return data[i + 9]
        if marker in (0xDA, 0xD9):
            raise ValueError("no JPEG frame header before the scan")
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    raise ValueError("no JPEG frame header")


def _bmp_route(data: bytes) -> int:
    """24/32-bit uncompressed BMPs and 8-bit ones with a full grey-ramp palette decode in TensorFlow (which
    ignores palettes); the rest (other palettes, bitfields, RLE, 1/4/16-bit, OS/2 headers) through Pillow."""
    if data[:2] != b"BM" or len(data) < 26:
        raise ValueError("no BMP header")
    offset, header = int.from_bytes(data[10:14], "little"), int.from_bytes(data[14:18], "little")
    if header < 40:
        return PILLOW
    if len(data) < 54:
        raise ValueError(f"a {header}-byte BMP header in {len(data)} bytes")
    width = int.from_bytes(data[18:22], "little", signed=True)
    height = int.from_bytes(data[22:26], "little", signed=True)
    bits, compression = int.from_bytes(data[28:30], "little"), int.from_bytes(data[30:34], "little")
    if compression != 0:
        return PILLOW
    if offset + (width * bits + 31) // 32 * 4 * abs(height) > len(data):
        raise ValueError(f"truncated: {width}x{abs(height)} at {bits} bits needs more than its {len(data)} bytes")
    if bits in (24, 32):
        return NATIVE
    if bits == 8 and int.from_bytes(data[46:50], "little") in (0, 256) and offset >= 14 + header + 1024:
        palette = np.frombuffer(data, np.uint8, 1024, 14 + header).reshape(256, 4)[:, :3]
        if (palette == np.arange(256, dtype=np.uint8)[:, None]).all():
            return GREY
    return PILLOW
