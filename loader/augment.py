"""Seeded, batched augmentation: every random choice from (seed, sample md5, epoch), applied on any device.

The random part runs in numpy beside the sampler (:meth:`Augment.draw`): for each sample it derives a 64-bit
key from ``(seed, md5, epoch)`` with splitmix64 and turns it into that sample's parameters, a row of
``PARAMS`` floats plus a noise seed. The tensor part (:meth:`Augment.apply`) is deterministic TensorFlow on
a whole batch: one affine warp for flips, quarter turns, rotation, scale, shear and translation (composed
into one matrix, so a sample is resampled at most once, and flips and turns alone are exact), then
saturation, hue, brightness and contrast (one affine colour map per sample; contrast scales about the
sample's mean before the warp), both compiled by XLA into one program on a CPU, and gaussian noise on the
samples it hit. A sample's pixels therefore depend on its key only, never on its batch
position or the parallelism (and on the device only within float rounding); samples a transform does not
hit keep their exact pixels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, fields

import numpy as np
import tensorflow as tf

from loader.sampling import GOLDEN, splitmix64
from loader.warp import patch_warp, warp
from strata.errors import ConfigError

__all__ = ["Augment", "sample_keys", "PARAMS"]

# Layout of a sample's parameter row. Values are neutral (0, or the identity) where a transform missed.
_WARP = slice(0, 8)  # affine row (a, b, c, d, e, f, 0, 0) of every geometric step: output pixel -> input pixel
_COLOUR = slice(8, 17)  # 3x3 matrix on RGB: saturation and hue (a rotation about the grey axis, in YIQ)
_BRIGHTNESS, _CONTRAST, _NOISE = 17, 18, 19  # added value, contrast factor - 1, noise on (1) or off (0)
_KIND = 20  # the warp: 0 identity, 1 pixel-exact (flips, quarter turns), 2 bilinear (rotate, scale, shear, shift)
IDENTITY, EXACT, BILINEAR = 0, 1, 2
PARAMS = 21

_LUMA = np.array([0.299, 0.587, 0.114])
_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_MASK = (1 << 64) - 1


def sample_keys(seed: int, md5s: np.ndarray, epochs: np.ndarray) -> np.ndarray:
    """A 64-bit key per sample from (seed, md5 hex, epoch): the only input of its augmentation."""
    halves = np.array([[int(h[:16], 16), int(h[16:32], 16)] for h in md5s], dtype=np.uint64).reshape(-1, 2)
    key = splitmix64(np.full(len(md5s), np.uint64(seed & _MASK)))
    key = splitmix64(key ^ halves[:, 0])
    key = splitmix64(key ^ halves[:, 1])
    return splitmix64(key ^ np.asarray(epochs, dtype=np.uint64))


class _Uniforms:
    """Independent uniform [0, 1) streams per sample, numbered: ``u(j)`` is stream j for every key."""

    def __init__(self, keys: np.ndarray) -> None:
        self._keys = keys

    def __call__(self, stream: int) -> np.ndarray:
        with np.errstate(over="ignore"):
            bits = splitmix64(self._keys + np.uint64(stream) * GOLDEN)
        return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class Augment:
    """Per-sample seeded augmentation. Each transform has the probability that a sample gets it, and a range.

    All geometric steps are one bilinear warp per sample hit, filling uncovered pixels by reflection; flips
    and ``rotate90`` (a random number of quarter turns; square images only) alone come out pixel-exact.
    Each step touches only the samples it hit.
    ``hue`` and ``saturation`` are ignored for grayscale images. ``noise_stddev`` and ``max_brightness`` are
    fractions of the 0..255 value range; augmentation runs before ``rescale``.
    """

    flip: float = 0.0
    flip_vertical: float = 0.0
    rotate90: float = 0.0
    rotate: float = 0.0
    max_angle: float = 15.0
    scale: float = 0.0
    max_scale: float = 0.1
    shear: float = 0.0
    max_shear: float = 0.05
    translate: float = 0.0
    max_translate: float = 0.1
    brightness: float = 0.0
    max_brightness: float = 0.2
    contrast: float = 0.0
    contrast_range: tuple[float, float] = (0.8, 1.25)
    hue: float = 0.0
    max_hue: float = 0.05
    saturation: float = 0.0
    saturation_range: tuple[float, float] = (0.5, 1.5)
    noise: float = 0.0
    noise_stddev: float = 0.02

    _PROBABILITIES = (
        "flip",
        "flip_vertical",
        "rotate90",
        "rotate",
        "scale",
        "shear",
        "translate",
        "brightness",
        "contrast",
        "hue",
        "saturation",
        "noise",
    )

    def __post_init__(self) -> None:
        for name in self._PROBABILITIES:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"Augment({name}={value!r}): a probability must lie between 0 and 1")
        for name in ("max_angle", "max_scale", "max_shear", "max_translate", "max_brightness", "max_hue"):
            if getattr(self, name) < 0:
                raise ConfigError(f"Augment({name}={getattr(self, name)!r}) must be >= 0")
        if not 0 <= self.max_scale < 1:
            raise ConfigError(f"Augment(max_scale={self.max_scale!r}) must lie in [0, 1)")
        if self.noise_stddev < 0:
            raise ConfigError(f"Augment(noise_stddev={self.noise_stddev!r}) must be >= 0")
        for name in ("contrast_range", "saturation_range"):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ConfigError(f"Augment({name}={(low, high)!r}) must be (low, high) with 0 <= low <= high")

    def __repr__(self) -> str:
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if getattr(self, f.name) != f.default]
        return f"Augment({', '.join(changed)})"

    def draw(self, keys: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Each sample's parameters: a float32 ``[n, PARAMS]`` array and an int64 ``[n, 2]`` noise seed."""
        u = _Uniforms(keys)
        n = len(keys)

        def hit(stream: int, probability: float) -> np.ndarray:
            return u(stream) < probability if probability > 0 else np.zeros(n, dtype=bool)

        def symmetric(stream: int, bound: float) -> np.ndarray:
            return (2.0 * u(stream) - 1.0) * bound

        # Inverse of the forward map  Rotation . Shear . Scale . Flips . Quarter turns  (output -> input pixel),
        # one warp for all of them. Flips and quarter turns alone map pixel centres onto pixel centres, so the
        # bilinear warp reproduces them exactly.
        flipped, flipped_vertical = hit(0, self.flip), hit(1, self.flip_vertical)
        turned = hit(2, self.rotate90)
        turns = np.where(turned, np.floor(u(3) * 4).astype(np.int64) % 4, 0)
        cos90, sin90 = np.array([1, 0, -1, 0])[turns], np.array([0, 1, 0, -1])[turns]
        inverse = _mat(cos90, sin90, -sin90, cos90)  # rotation by -turns * 90
        inverse = inverse @ _mat(np.where(flipped, -1.0, 1.0), 0, 0, np.where(flipped_vertical, -1.0, 1.0))
        zoomed, sheared, rotated, moved = (
            hit(s, p) for s, p in ((6, self.scale), (8, self.shear), (4, self.rotate), (11, self.translate))
        )
        zoom = np.where(zoomed, 1.0 + symmetric(7, self.max_scale), 1.0)
        inverse = inverse @ _mat(1.0 / zoom, 0, 0, 1.0 / zoom)
        shear_x = np.where(sheared, symmetric(9, self.max_shear), 0.0)
        shear_y = np.where(sheared, symmetric(10, self.max_shear), 0.0)
        det = 1.0 - shear_x * shear_y
        inverse = inverse @ _mat(1.0 / det, -shear_x / det, -shear_y / det, 1.0 / det)
        angle = np.where(rotated, np.deg2rad(symmetric(5, self.max_angle)), 0.0)
        inverse = inverse @ _mat(np.cos(angle), np.sin(angle), -np.sin(angle), np.cos(angle))
        shift = np.stack(
            [
                np.where(moved, symmetric(12, self.max_translate) * width, 0.0),
                np.where(moved, symmetric(13, self.max_translate) * height, 0.0),
            ],
            axis=1,
        )
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
        offset = centre - np.einsum("nij,nj->ni", inverse, centre + shift)

        params = np.zeros((n, PARAMS), dtype=np.float64)
        zeros = np.zeros(n)
        params[:, _WARP] = np.stack(
            [
                inverse[:, 0, 0],
                inverse[:, 0, 1],
                offset[:, 0],
                inverse[:, 1, 0],
                inverse[:, 1, 1],
                offset[:, 1],
                zeros,
                zeros,
            ],
            axis=1,
        )
        params[:, _COLOUR] = self._colour(u, hit).reshape(n, 9)
        params[:, _BRIGHTNESS] = np.where(hit(14, self.brightness), symmetric(15, self.max_brightness) * 255.0, 0.0)
        low, high = self.contrast_range
        params[:, _CONTRAST] = np.where(hit(16, self.contrast), low + u(17) * (high - low) - 1.0, 0.0)
        params[:, _NOISE] = hit(22, self.noise)
        exact = flipped | flipped_vertical | (turns > 0)
        params[:, _KIND] = np.where(zoomed | sheared | rotated | moved, BILINEAR, np.where(exact, EXACT, IDENTITY))
        with np.errstate(over="ignore"):
            seeds = splitmix64(keys + np.uint64(23) * GOLDEN)
        noise_seeds = np.stack([seeds >> np.uint64(32), seeds & np.uint64(0xFFFFFFFF)], axis=1).astype(np.int64)
        return params.astype(np.float32), noise_seeds

    def _colour(self, u: _Uniforms, hit: object) -> np.ndarray:
        """Per-sample 3x3 matrices ``M`` (pixels as rows: ``rgb @ M``): hue rotation, then saturation."""
        angle = np.where(hit(18, self.hue), (2.0 * u(19) - 1.0) * self.max_hue * 2.0 * np.pi, 0.0)
        cos, sin = np.cos(angle), np.sin(angle)
        rotation = np.zeros((len(angle), 3, 3))
        rotation[:, 0, 0] = 1.0
        rotation[:, 1, 1], rotation[:, 1, 2], rotation[:, 2, 1], rotation[:, 2, 2] = cos, -sin, sin, cos
        hue = np.linalg.inv(_TO_YIQ) @ rotation @ _TO_YIQ  # acts on column vectors
        low, high = self.saturation_range
        factor = np.where(hit(20, self.saturation), low + u(21) * (high - low), 1.0)[:, None, None]
        saturation = factor * np.eye(3) + (1.0 - factor) * _LUMA[None, :]  # grey + factor * (rgb - grey)
        matrices = np.swapaxes(saturation @ hue, 1, 2)
        untouched = (angle == 0.0) & (factor[:, 0, 0] == 1.0)
        matrices[untouched] = np.eye(3)  # exactly the identity, so untouched pixels stay bit-exact
        return matrices

    def apply(self, images: tf.Tensor, params: tf.Tensor, noise_seeds: tf.Tensor, compiled: bool = True) -> tf.Tensor:
        """Augment a float32 batch ``[B, H, W, C]`` in 0..255 with its drawn parameters; returns 0..255.

        ``compiled`` runs one XLA program that goes sample by sample, doing only what each sample's kind needs
        (nothing, a reversal or transpose for flips and quarter turns, or a bilinear warp), with the colour
        map fused into the loop that writes the sample: the pipeline's choice on a CPU. On a GPU it augments
        whole batches with plain ops (``compiled=False``). Both give the same pixels within float
        rounding. Neutral parameters leave a sample's pixels bit-exact: the colour map of an untouched sample
        is ``x @ I + 0``, and noise touches only its hits.
        """
        geometric = any(
            getattr(self, n) > 0 for n in ("flip", "flip_vertical", "rotate90", "rotate", "scale", "shear", "translate")
        )
        colour = (self.hue > 0 or self.saturation > 0) and images.shape[-1] == 3
        photometric = colour or self.brightness > 0 or self.contrast > 0
        if geometric or photometric:  # a warp of pixels in 0..255 stays there: only colour and noise need a clip
            # Contrast scales about the sample's mean before the warp (the same mean for flips and turns), so
            # the colour map can run in the warp's loop.
            means = _channel_means(images) if self.contrast > 0 else tf.zeros_like(images[:, 0, 0])
            steps = _compiled if compiled else _steps
            images = steps(
                images,
                params,
                means,
                geometric=geometric,
                photometric=photometric,
                colour=colour,
                turns=self.rotate90 > 0,
                clip=photometric and self.noise == 0,
            )
        if self.noise > 0:
            chosen = tf.where(params[:, _NOISE] > 0.5)[:, 0]

            def noisy() -> tf.Tensor:
                noise = tf.map_fn(
                    lambda seed: tf.random.stateless_normal(tf.shape(images)[1:], seed=seed, alg="philox"),
                    tf.gather(noise_seeds, chosen),
                    fn_output_signature=tf.float32,
                )
                changed = tf.gather(images, chosen) + noise * (self.noise_stddev * 255.0)
                return tf.tensor_scatter_nd_update(images, chosen[:, None], changed)

            # map_fn cannot stack zero images of a shape only known at run time: skip when none was hit
            images = tf.clip_by_value(tf.cond(tf.size(chosen) > 0, noisy, lambda: images), 0.0, 255.0)
        return images


def _steps(
    images: tf.Tensor,
    params: tf.Tensor,
    means: tf.Tensor,
    geometric: bool,
    photometric: bool,
    colour: bool,
    turns: bool,
    clip: bool,
    per_sample: bool = False,
) -> tf.Tensor:
    """The warp, the affine colour map and the clip to 0..255 of every sample.

    ``per_sample`` (under XLA on a CPU) goes sample by sample through :func:`_one`; otherwise plain ops warp
    the whole batch, which is cheaper on a GPU. Both give the same pixels within float rounding.
    """
    matrices, offsets = _colour_maps(params, means, colour)
    if per_sample:
        kinds = tf.cast(params[:, _KIND], tf.int32)
        if images.shape[0] == 1:  # the loader augments image by image: no loop around the one sample
            one = (images[0], params[0, _WARP], kinds[0], matrices[0], offsets[0])
            return _one(*one, geometric=geometric, photometric=photometric, turns=turns, clip=clip)[None]
        return tf.map_fn(
            lambda s: _one(*s, geometric=geometric, photometric=photometric, turns=turns, clip=clip),
            (images, params[:, _WARP], kinds, matrices, offsets),
            fn_output_signature=tf.float32,
        )
    if geometric:
        images = warp(images, params[:, _WARP])
    if photometric:
        images = _mapped(images, matrices[:, None, None], offsets[:, None, None])
    return tf.clip_by_value(images, 0.0, 255.0) if clip else images


_compiled = tf.function(functools.partial(_steps, per_sample=True), jit_compile=True)


def _one(
    image: tf.Tensor,
    transform: tf.Tensor,
    kind: tf.Tensor,
    matrix: tf.Tensor,
    offset: tf.Tensor,
    geometric: bool,
    photometric: bool,
    turns: bool,
    clip: bool,
) -> tf.Tensor:
    """One sample under XLA: its warp by kind, the colour map and the clip fused into the loop that writes it."""

    def finish(pixels: tf.Tensor) -> tf.Tensor:
        pixels = _mapped(pixels, matrix, offset) if photometric else pixels
        return tf.clip_by_value(pixels, 0.0, 255.0) if clip else pixels

    if not geometric:
        return finish(image)

    def exact() -> tf.Tensor:
        # Output (x, y) samples input (a x + b y + c, d x + e y + f) with integer entries. A quarter turn has
        # a = e = 0, a transpose; a negative entry in a column reverses that output axis.
        t = tf.cast(tf.round(transform), tf.int32)
        case = tf.where(t[0] + t[3] < 0, 1, 0) + tf.where(t[1] + t[4] < 0, 2, 0) + tf.where(t[0] == 0, 4, 0)

        def dihedral(case: int) -> tf.Tensor:
            pixels = tf.transpose(image, [1, 0, 2]) if case & 4 else image
            axes = [axis for axis, bit in ((1, 1), (0, 2)) if case & bit]
            return finish(tf.reverse(pixels, axes) if axes else pixels)

        # transposed cases only with quarter turns (square images): a transpose changes a non-square shape
        return tf.switch_case(case, [functools.partial(dihedral, c) for c in range(8 if turns else 4)])

    return tf.switch_case(kind, [lambda: finish(image), exact, lambda: finish(patch_warp(image, transform))])


def _channel_means(images: tf.Tensor) -> tf.Tensor:
    """Each sample's channel means ``[B, C]``, summing whole rows first: a third of what ``reduce_mean`` over
    height and width costs on a CPU."""
    shape, channels = tf.shape(images), images.shape[-1]
    rows = tf.reduce_sum(tf.reshape(images, [shape[0], shape[1], -1]), axis=1)  # [B, W * C]
    sums = tf.reduce_sum(tf.reshape(rows, [shape[0], shape[2], channels]), axis=1)
    return sums / tf.cast(shape[1] * shape[2], tf.float32)


def _colour_maps(params: tf.Tensor, means: tf.Tensor, colour: bool) -> tuple[tf.Tensor, tf.Tensor]:
    """Colour matrix, brightness and contrast of each sample folded into one affine map ``x @ A + b``:
    ``A`` is ``[B, C, C]``, ``b`` is ``[B, C]``.

    With ``y = x @ M + beta`` and contrast ``c`` about y's mean ``m``: ``y + c (y - m) = x @ M (1 + c) +
    beta (1 + c) - c m``, where ``m = mean(x) @ M + beta`` needs only the channel means of ``x``. Neutral
    parameters give ``A = I`` and ``b = 0`` exactly.
    """
    brightness, contrast = params[:, _BRIGHTNESS], params[:, _CONTRAST]
    channels = means.shape[-1]
    if colour:
        matrices = tf.reshape(params[:, _COLOUR], [-1, 3, 3])
    else:
        matrices = tf.broadcast_to(tf.eye(channels), [tf.shape(params)[0], channels, channels])
    mean = tf.reduce_mean(tf.einsum("bc,bcd->bd", means, matrices), axis=1) + brightness
    offset = brightness * (1.0 + contrast) - contrast * mean
    return matrices * (1.0 + contrast)[:, None, None], offset[:, None] * tf.ones([channels])


def _mapped(pixels: tf.Tensor, matrix: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """``pixels @ matrix + offset`` per pixel (``[..., C]``, ``[..., C, C]``, ``[..., C]``), as broadcast
    products: XLA fuses them into the loop that produces the pixels, an einsum it would not."""
    mapped = offset + pixels[..., 0:1] * matrix[..., 0, :]
    for channel in range(1, matrix.shape[-1]):
        mapped += pixels[..., channel : channel + 1] * matrix[..., channel, :]
    return mapped


def _mat(a: object, b: object, c: object, d: object) -> np.ndarray:
    """Stack per-sample 2x2 matrices [[a, b], [c, d]] from scalars or arrays."""
    a, b, c, d = np.broadcast_arrays(*(np.asarray(x, dtype=np.float64) for x in (a, b, c, d)))
    return np.stack([np.stack([a, b], -1), np.stack([c, d], -1)], -2)
