"""Verified image bytes in, float32 pixels out: the in-graph decoder (``loader.reader`` reads the bytes).

Decoding happens in TensorFlow, on the
route ``loader.formats.route`` picks from each image's header: JPEG through ``decode_jpeg`` (accurate IDCT)
at a reduced DCT scale when the target is at most half the source (the main speed lever), colour PNG, WebP
and 24/32-bit BMP through ``decode_image``, grey PNG and grey-palette BMP as grey, 16-bit PNG as 16-bit
samples scaled to 0..255, and what TensorFlow cannot decode or decodes unlike Pillow (TIFF, GIF, other BMPs,
animated WebP) through Pillow. Every route yields Pillow's pixels (``loader.pixels``): a colour image's
grayscale is Pillow's ``L`` of its RGB, computed here exactly as Pillow does.
"""

from __future__ import annotations

import io
from typing import Any, Literal

import numpy as np
import tensorflow as tf
from PIL import Image

from loader.formats import GREY_JPEG
from loader.pixels import pillow_pixels

# libjpeg's accurate integer IDCT, as Pillow decodes: the same pixels. The fast one (TensorFlow's default) is
# about a level darker on average; the accurate one costs a few percent at full scale, almost nothing at the
# reduced scales most pipelines decode at (benchmarks/NOTES.md).
IDCT = "INTEGER_ACCURATE"
RATIOS = (1, 2, 4, 8)
# How shrinks of more than 2x are filtered before bilinear sampling (see resize()).
Antialias = Literal["box"] | bool
ANTIALIAS: tuple[Antialias, ...] = ("box", True, False)


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


def read_checked(path: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """Read a verified image's file in the graph, failing with its path when its size changed since."""
    data = tf.io.read_file(path)
    same = tf.debugging.Assert(
        tf.equal(tf.strings.length(data), size),
        ["image changed since this process verified its md5; re-curate the dataset:", path],
    )
    with tf.control_dependencies([same]):
        return tf.identity(data)


def _pil_decode(data: bytes, channels: int, sample_bits: int) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return pillow_pixels(image, channels, sample_bits)


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
    sample_bits: int = 16,
) -> tf.Tensor:
    """Decode and crop one image in the graph: uint8 ``[H, W, C]``, a JPEG at its reduced DCT scale.

    ``uniform`` (the JPEG scale index and whether resizing shrinks more than 2x, when every image is a JPEG
    decoding at one scale) builds a graph without branches (in rgb; grayscale keeps one, grey JPEG or not):
    cheaper per image, and quicker to start an epoch. ``sample_bits``: the range of 16-bit images' samples
    (``loader.pixels.to_8bit``).
    """
    if uniform is not None:
        ratio = uniform[0]
        if channels == 3:  # a grey JPEG decodes to RGB as Pillow converts it: its value thrice
            image = _jpeg(data, RATIOS[ratio], 3, colour=False)
        else:
            image = tf.cond(
                tf.equal(how, GREY_JPEG),
                lambda: _jpeg(data, RATIOS[ratio], 1, colour=False),
                lambda: _jpeg(data, RATIOS[ratio], 1, colour=True),
            )
        scale = tf.constant(ratio, tf.int32)
    else:
        image = tf.switch_case(
            how,
            [  # in the order of loader.formats' route numbers
                lambda: _scaled_jpeg(data, scale, channels, colour=True),
                lambda: _native(data, channels),
                lambda: _pillow(data, channels, sample_bits),
                lambda: _grey(data, channels),
                lambda: _scaled_jpeg(data, scale, channels, colour=False),
                lambda: _png16(data, channels, sample_bits),
                lambda: _native(data, channels, alpha=True),
            ],
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
    sample_bits: int = 16,
    antialias: Antialias = "box",
) -> tf.Tensor:
    """Decode, crop and resize one image in the graph (:func:`decode_pixels`, :func:`resize`); float32
    ``[H, W, C]`` in 0..255."""
    pixels = decode_pixels(data, how, scale, channels, roi, uniform, sample_bits)
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


def _jpeg(data: tf.Tensor, ratio: int, channels: int, colour: bool) -> tf.Tensor:
    """A JPEG at ``1/ratio`` scale; a colour one's grayscale is Pillow's ``L`` of its RGB (libjpeg's own grey
    is the Y channel, which differs where colours clip)."""
    if colour and channels == 1:
        return _luma(tf.io.decode_jpeg(data, channels=3, ratio=ratio, dct_method=IDCT))
    return tf.io.decode_jpeg(data, channels=channels, ratio=ratio, dct_method=IDCT)


def _scaled_jpeg(data: tf.Tensor, scale: tf.Tensor, channels: int, colour: bool) -> tf.Tensor:
    return tf.switch_case(scale, [lambda r=r: _jpeg(data, r, channels, colour) for r in RATIOS])


def _luma(rgb: tf.Tensor) -> tf.Tensor:
    """Pillow's ``L`` of uint8 ``[H, W, 3]`` pixels, exactly (``loader.pixels``: its integer formula).

    In float32, a third of the CPU of int32 ops here: every product, sum and the division by 2**16 are exact,
    as each value is an integer below 2**24 (at most 255 * 65536 + 0x8000).
    """
    x = tf.cast(rgb, tf.float32)
    weighted = x[..., 0:1] * 19595.0 + x[..., 1:2] * 38470.0 + x[..., 2:3] * 7471.0 + 32768.0
    return tf.cast(tf.floor(weighted * (1.0 / 65536.0)), tf.uint8)


def _native(data: tf.Tensor, channels: int, alpha: bool = False) -> tf.Tensor:
    """A colour image TensorFlow decodes like Pillow (24/32-bit BMP, colour PNG, WebP): alpha dropped.

    ``alpha``: a WebP with alpha, which TensorFlow decodes only to 4 channels (others drop alpha themselves).
    """
    if alpha:
        rgb = tf.io.decode_image(data, channels=4, expand_animations=False)[..., :3]
    else:
        rgb = tf.io.decode_image(data, channels=3, expand_animations=False)
    return rgb if channels == 3 else _luma(rgb)


def _grey(data: tf.Tensor, channels: int) -> tf.Tensor:
    """A grey image (PNG, grey-palette BMP): its value, alpha dropped; thrice for rgb."""
    grey = tf.io.decode_image(data, channels=0, expand_animations=False)[..., :1]
    return grey if channels == 1 else tf.tile(grey, [1, 1, 3])


def _png16(data: tf.Tensor, channels: int, sample_bits: int) -> tf.Tensor:
    """A 16-bit PNG: every sample scaled to 0..255 as ``loader.pixels.to_8bit`` does, then as an 8-bit one."""
    values = tf.cast(tf.io.decode_png(data, channels=3, dtype=tf.uint16), tf.int32)
    top = (1 << sample_bits) - 1
    rgb = tf.cast(tf.minimum((values * 510 + top) // (2 * top), 255), tf.uint8)
    return rgb if channels == 3 else _luma(rgb)


def _pillow(data: tf.Tensor, channels: int, sample_bits: int) -> tf.Tensor:
    pixels = tf.numpy_function(lambda b: _pil_decode(b, channels, sample_bits), [data], tf.uint8, stateful=False)
    return tf.ensure_shape(pixels, [None, None, channels])
