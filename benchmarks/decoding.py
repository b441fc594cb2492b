"""Decoder choices, measured side by side: JPEG's accurate IDCT against TensorFlow's default fast one, and a
colour JPEG's grayscale as Pillow computes it (RGB, then L) against libjpeg's Y channel.

``python -m benchmarks.decoding``: CPU time per image over 640x480 JPEGs (the vial photo, rotated), paired
rounds in one process, median ratio. Results go to benchmarks/NOTES.md, not to results.json: these choose
defaults, they are not targets.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Callable

import numpy as np
import tensorflow as tf
from PIL import Image

from loader.images import _luma

VIAL = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "vial_0_1543413266626.bmp"
ROUNDS, IMAGES = 9, 64


def _jpegs() -> tf.Tensor:
    vial = Image.open(VIAL).convert("RGB").resize((640, 480))
    blobs = []
    for angle in range(IMAGES):
        buffer = io.BytesIO()
        vial.rotate(angle * 5).save(buffer, "JPEG", quality=90)
        blobs.append(buffer.getvalue())
    return tf.constant(blobs)


def _batched(decode: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor], tf.Tensor]:
    return tf.function(lambda x: tf.map_fn(decode, x, fn_output_signature=tf.uint8))


def _paired(x: tf.Tensor, ours: Callable, baseline: Callable) -> tuple[float, float, float]:
    """(ours ms/image, baseline ms/image, median ratio ours/baseline) over paired rounds of CPU time."""
    ours(x), baseline(x)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for _ in range(ROUNDS):
        for name, f in (("ours", ours), ("baseline", baseline)):
            start = time.process_time()
            f(x)
            times[name].append((time.process_time() - start) / IMAGES * 1000)
    ratios = np.array(times["ours"]) / np.array(times["baseline"])
    return float(np.median(times["ours"])), float(np.median(times["baseline"])), float(np.median(ratios))


def main() -> None:
    x = _jpegs()
    for ratio in (1, 2):
        accurate = _batched(lambda d, r=ratio: tf.io.decode_jpeg(d, channels=3, ratio=r, dct_method="INTEGER_ACCURATE"))
        fast = _batched(lambda d, r=ratio: tf.io.decode_jpeg(d, channels=3, ratio=r))
        ours, base, cost = _paired(x, accurate, fast)
        print(f"accurate IDCT, 1/{ratio} scale: {ours:.3f} ms vs fast {base:.3f} ms: {cost:.3f}x the CPU")
    luma = _batched(lambda d: _luma(tf.io.decode_jpeg(d, channels=3, ratio=2, dct_method="INTEGER_ACCURATE")))
    y = _batched(lambda d: tf.io.decode_jpeg(d, channels=1, ratio=2, dct_method="INTEGER_ACCURATE"))
    ours, base, cost = _paired(x, luma, y)
    print(f"grayscale as Pillow's L of RGB, 1/2 scale: {ours:.3f} ms vs Y channel {base:.3f} ms: {cost:.3f}x")


if __name__ == "__main__":
    main()
