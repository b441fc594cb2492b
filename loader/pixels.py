"""What an image's pixels are, in 0..255, for curation and loading alike: Pillow's conversions and one 16-bit
mapping. Needs only Pillow and numpy (the curation tasks import it without TensorFlow).

- 8-bit images are what Pillow's ``convert("RGB")`` / ``convert("L")`` give, with
  ``L = (R * 19595 + G * 38470 + B * 7471 + 0x8000) >> 16``; alpha is dropped, not composited.
- 16-bit samples are scaled, not clipped or shifted: ``v -> round(v * 255 / (2**bits - 1))`` with
  ``bits = 16`` by default, so 0 -> 0, 65535 -> 255, and a PNG and a TIFF of the same data give the same
  pixels. ``bits = 12`` reads 12-bit data stored LSB-aligned in 16-bit files (values 0..4095, as many
  machine-vision cameras write them); larger values clip to 255.
- EXIF orientation is ignored, as TensorFlow's decoders and the cameras' BMP/PNG files do.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["SIXTEEN_BIT_MODES", "to_8bit", "sixteen_bit", "pillow_pixels"]

# Pillow's modes of 16-bit grey samples ("I" is how Pillow before 11 opens a 16-bit grey PNG).
SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def sixteen_bit(image: Image.Image) -> bool:
    """Whether Pillow hands this image's samples over as 16-bit grey values."""
    return image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG")


def to_8bit(values: np.ndarray, bits: int = 16) -> np.ndarray:
    """16-bit samples to uint8: ``round(v * 255 / (2**bits - 1))`` (halves up), clipped to 255."""
    top = (1 << bits) - 1
    scaled = (values.astype(np.int64) * 510 + top) // (2 * top)
    return np.minimum(scaled, 255).astype(np.uint8)


def pillow_pixels(image: Image.Image, channels: int, bits: int = 16) -> np.ndarray:
    """The first frame or page of an opened image as uint8 ``[H, W, channels]`` (3: rgb, 1: grayscale)."""
    image.seek(0)
    if sixteen_bit(image):
        grey = to_8bit(np.asarray(image), bits)[..., None]
        return grey if channels == 1 else np.repeat(grey, 3, axis=-1)
    pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    return pixels if channels == 3 else pixels[..., None]
