"""Benchmark data, generated at run time from real photographs: nothing is downloaded.

Sources are scikit-image's bundled sample photos and the vial photo in ``../shared/fixtures``; each image is
a random crop of one, scaled, flipped and toned, so files differ in content and in perceptual hash.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance

SIZE = (640, 480)
CLASSES = {"good": 0.6, "bad_cap": 0.3, "missing_cap": 0.1}  # imbalanced, like an inspection line
VIAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vial_0_1543413266626.bmp"
FORMATS = {"jpg": "JPEG", "png": "PNG", "bmp": "BMP"}


def photographs() -> list[Image.Image]:
    """The real photographs the data is cut from, as RGB."""
    import skimage

    folder = Path(skimage.__file__).parent / "data"
    names = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png", "camera.png"]
    photos = [Image.open(folder / name).convert("RGB") for name in names if (folder / name).exists()]
    if VIAL.exists():
        photos.append(Image.open(VIAL).convert("RGB"))
    return photos


def variant(photo: Image.Image, rng: np.random.Generator, size: tuple[int, int] = SIZE) -> Image.Image:
    """A random crop of a photo, resized to ``size``, maybe flipped, with random contrast and brightness."""
    width, height = photo.size
    side = rng.uniform(0.5, 1.0)
    w, h = int(width * side), int(height * side)
    x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    image = photo.crop((x, y, x + w, y + h)).resize(size, Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(0.7, 1.3)))
    return ImageEnhance.Brightness(image).enhance(float(rng.uniform(0.8, 1.2)))


def make_images(folder: Path, count: int, formats: tuple[str, ...] = ("jpg",), seed: int = 0, first: int = 0) -> Path:
    """Write ``count`` images into imbalanced class folders under ``folder``; returns ``folder``.

    Files are numbered from ``first``: calls with distinct seeds and disjoint numbers can fill one folder in
    parallel.
    """
    rng = np.random.default_rng(seed)
    photos = photographs()
    names = list(CLASSES)
    labels = rng.choice(len(names), size=count, p=list(CLASSES.values()))
    for i, label in enumerate(labels, start=first):
        ext = formats[i % len(formats)]
        path = folder / names[label] / f"{i}_{1543412160000 + i}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        variant(photos[i % len(photos)], rng).save(buffer, FORMATS[ext], **({"quality": 90} if ext == "jpg" else {}))
        path.write_bytes(buffer.getvalue())
    return folder
