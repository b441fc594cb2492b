"""Resizing in the loader: the box prefilter for large shrinks, and what each ``antialias`` setting yields.

Every expectation is on the batch ``from_manifest`` returns for Pillow-written images; the references are
computed here in float64 numpy (block means, then bilinear interpolation with half-pixel centres, as
TensorFlow samples), not with the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import loader
from strata.errors import ConfigError
from tests.conftest import VIAL, encode
from tests.test_loader import publish

TOLERANCE = 2e-3  # float32 rounding of values up to 255 over a few sums; any filtering error is far larger


def box_mean(image: np.ndarray, factor_h: int, factor_w: int) -> np.ndarray:
    """Mean of each ``factor_h x factor_w`` block of ``[H, W, C]`` pixels (the factors divide the size)."""
    height, width, channels = image.shape
    blocks = image.reshape(height // factor_h, factor_h, width // factor_w, factor_w, channels)
    return blocks.mean(axis=(1, 3))


def bilinear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of ``[H, W, C]`` to ``size`` with half-pixel centres, edges clamped."""

    def weights(n_in: int, n_out: int) -> np.ndarray:
        x = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
        low = np.floor(x)
        matrix = np.zeros((n_out, n_in))
        rows = np.arange(n_out)
        np.add.at(matrix, (rows, np.clip(low, 0, n_in - 1).astype(int)), 1 - (x - low))
        np.add.at(matrix, (rows, np.clip(np.ceil(x), 0, n_in - 1).astype(int)), x - low)
        return matrix

    rows = np.tensordot(weights(image.shape[0], size[0]), image, axes=(1, 0))  # [size[0], W, C]
    return np.einsum("yhc,xh->yxc", rows, weights(image.shape[1], size[1]), optimize=True)


def vial(width: int, height: int) -> Image.Image:
    return Image.open(VIAL).convert("RGB").resize((width, height))


def batch(tmp_path: Path, shots: list[Image.Image], fmt: str = "bmp", **kwargs: object) -> np.ndarray:
    """The first batch of a manifest of ``shots`` (in order), as the loader yields it."""
    samples = [(f"a/{i}.{fmt}", encode(shot, fmt), "train") for i, shot in enumerate(shots)]
    root = publish(str(tmp_path), samples)
    dataset = loader.from_manifest(root, batch_size=len(shots), stratify_by=None, shuffle=False, **kwargs)
    return next(iter(dataset))[0].numpy()


@pytest.mark.parametrize(
    ("source", "size", "factors"),
    [
        ((480, 640), (224, 224), (2, 2)),  # the benchmark's shrink: 2x2 blocks, one image at a time
        ((300, 330), (100, 110), (3, 3)),  # factors above 2 take the area resize
        ((96, 500), (40, 100), (2, 5)),  # a factor per side
        ((60, 200), (60, 80), (1, 2)),  # small enough to be stacked and resized per batch
    ],
    ids=["2x2", "3x3", "2x5", "stacked-1x2"],
)
def test_large_shrinks_average_blocks_then_sample_bilinearly(tmp_path: Path, source, size, factors) -> None:
    """Default antialias="box": each pixel is the bilinear sample of the block means, within float rounding."""
    shots = [vial(source[1], source[0]), vial(source[1], source[0]).transpose(Image.Transpose.ROTATE_180)]
    pixels = batch(tmp_path, shots, image_size=size)
    for shot, got in zip(shots, pixels, strict=True):
        expected = bilinear(box_mean(np.asarray(shot, dtype=np.float64), *factors), size)
        assert np.abs(got - expected).max() <= TOLERANCE


def test_box_factor_keeps_the_aspect_ratio_with_padding(tmp_path: Path) -> None:
    """With keep_aspect_ratio the larger factor (here 640 / 120 -> 5) applies to both sides before the fit."""
    shot = vial(640, 480)
    pixels = batch(tmp_path, [shot], image_size=(100, 120), keep_aspect_ratio=True)[0]
    reduced = box_mean(np.asarray(shot, dtype=np.float64), 5, 5).astype(np.float32)
    expected = tf.image.resize_with_pad(reduced, 100, 120).numpy()
    assert np.abs(pixels - expected).max() <= TOLERANCE


def test_antialias_true_and_false_are_tensorflows_resizes(tmp_path: Path) -> None:
    """True: TensorFlow's antialiased resize; False: plain bilinear sampling (keras'); both exactly."""
    shot = vial(640, 480)
    decoded = np.asarray(shot, dtype=np.float32)
    smooth = batch(tmp_path / "true", [shot], fmt="png", antialias=True)[0]
    np.testing.assert_array_equal(smooth, tf.image.resize(decoded, (224, 224), antialias=True).numpy())
    plain = batch(tmp_path / "false", [shot], fmt="png", antialias=False)[0]
    np.testing.assert_array_equal(plain, tf.image.resize(decoded, (224, 224)).numpy())
    box = batch(tmp_path / "box", [shot], fmt="png")[0]
    # The box lands near the full antialiased resize; plain sampling, which skips pixels, lands further off.
    assert np.abs(box - smooth).mean() < 0.5 * np.abs(plain - smooth).mean()


def test_small_shrinks_are_sampled_whatever_the_setting(tmp_path: Path) -> None:
    """Up to 2x, bilinear sampling already averages neighbours: every setting gives the same pixels."""
    shot = vial(400, 300)
    outputs = [batch(tmp_path / str(v), [shot], image_size=(200, 240), antialias=v)[0] for v in ("box", True, False)]
    np.testing.assert_array_equal(outputs[0], outputs[1])
    np.testing.assert_array_equal(outputs[0], outputs[2])


@pytest.mark.parametrize("value", ["lanczos", 1, None, "Box"])
def test_antialias_must_be_box_true_or_false(tmp_path: Path, value: object) -> None:
    root = publish(str(tmp_path), [("a/0.png", encode(vial(8, 8), "png"), "train")])
    with pytest.raises(ConfigError, match=rf"antialias {value!r} is not one of 'box', True, False"):
        loader.from_manifest(root, antialias=value)
