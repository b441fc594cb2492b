"""``from_manifest()``: one committed manifest version as a seeded, stratified ``tf.data`` pipeline.

The pipeline reads as its stages: resolve and verify the version (``manifest``), choose rows (``sampling``),
read and verify bytes (``source.Elements`` with ``reader.Reader``, Python threads, read-ahead; once verified,
local files are read in the graph), rebatch, then per batch and in parallel decode/crop/resize and augment
(``images.decode``, ``augment``; on a GPU when one is visible), rescale and label.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Iterator, Literal, Mapping, Sequence

import numpy as np
import pandas as pd
import tensorflow as tf
from fsspec.implementations.local import LocalFileSystem

from loader import manifest as m
from loader import sampling
from loader.augment import Augment
from loader.cache import PixelCache
from loader.formats import CACHED
from loader.images import (
    ANTIALIAS,
    IDCT,
    Antialias,
    common_size,
    decode,
    decode_pixels,
    jpeg_scales,
    read_checked,
    resize,
    shrinks,
    uniform_jpeg,
)
from loader.reader import Reader
from loader.source import Elements
from loader.stages import host_map
from strata.errors import ConfigError, ManifestError
from strata.storage import open_url

__all__ = ["from_manifest"]

COLOR_MODES = {"rgb": 3, "grayscale": 1}
RESCALES = ("0-1", "-1-1", "imagenet")
LABEL_MODES = ("int", "categorical", None)
ON_ERROR = ("raise", "skip")
_IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
_IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def from_manifest(
    uri: str,
    version: int | str = "latest",
    purpose: str | None = "train",
    batch_size: int = 32,
    image_size: tuple[int, int] | None = (224, 224),
    keep_aspect_ratio: bool = False,
    antialias: Antialias = "box",
    roi: tuple[int, int, int, int] | None = None,
    color_mode: str = "rgb",
    sample_bits: int = 16,
    rescale: str | None = None,
    label_mode: str | None = "int",
    stratify_by: Sequence[str] | None | Literal["auto"] = "auto",
    weighting: sampling.Weighting = "uniform",
    balanced: tuple[int, int] | None = None,
    shuffle: bool = True,
    repeat: bool | int = False,
    seed: int = 0,
    augment: Augment | None = None,
    cache_dir: str | os.PathLike | None = None,
    input_context: tf.distribute.InputContext | None = None,
    storage_options: Mapping[str, Any] | None = None,
    on_error: str = "raise",
) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` of ``(images, labels)`` batches from one committed, verified manifest version.

    Args:
        uri: the dataset root (``s3://bucket/manifests/vials``, a local path) or one version's directory.
        version: ``"latest"`` (highest committed version) or a version number.
        purpose: ``"train"``, ``"devel"``, ``"test"``, or None for every row.
        batch_size: images per batch; ignored with ``balanced``, whose batches hold classes x images.
        image_size: ``(height, width)`` to resize to; None keeps the stored size (all images must share it).
        keep_aspect_ratio: scale to fit inside ``image_size`` and pad with zeros (centred) instead of stretching.
        antialias: how an image that shrinks by more than 2x on a side is filtered before bilinear sampling
            (smaller shrinks are sampled as is; a JPEG decoded at a reduced DCT scale is already averaged):
            ``"box"`` (default) first averages blocks of the integer factor that keeps at least
            ``image_size`` (2x2 pixels for 640x480 -> 224x224), as the DCT scale does for a JPEG; True takes
            TensorFlow's antialiased resize (a triangle filter as wide as the shrink: the smoothest, and
            costing more than a BMP's decode); False samples bilinearly as is, like keras'
            ``image_dataset_from_directory`` (aliasing: fine detail turns into moire).
        roi: ``(y, x, h, w)`` crop in source pixels, applied before resizing.
        color_mode: ``"rgb"`` (3 channels) or ``"grayscale"`` (1): Pillow's ``convert("RGB")`` and
            ``convert("L")`` of every format and mode (docs/loader.md).
        sample_bits: how many bits of a 16-bit image's samples carry data: 16 scales 0..65535 to 0..255;
            12 scales 0..4095 (12-bit camera data stored LSB-aligned in 16-bit files; larger values clip).
            8-bit images are not affected.
        rescale: None keeps 0..255; ``"0-1"``, ``"-1-1"``, or ``"imagenet"`` (per-channel mean/std).
        label_mode: ``"int"`` (int32 ``[B]``), ``"categorical"`` (one-hot float32 ``[B, K]``), or None.
        stratify_by: manifest columns whose value combinations are the groups (strata); None: plain shuffle.
            ``"auto"`` (the default) stratifies by category for ``purpose="train"`` and reads every other
            purpose (and None) plainly: an evaluation epoch yields every sample exactly once.
        weighting: group draw weight from its size: uniform, count, sqrt, log (``ln(1+n)``),
            logx+1 (``ln(n)+1``), or a callable ``count -> weight``.
        balanced: ``(classes_per_batch, images_per_class)``: every batch holds exactly that many distinct
            groups with that many images each.
        shuffle: shuffle rows (plain) or the order in which a group's rows cycle (stratified).
        repeat: False: one epoch; True: forever; an int: that many epochs. An epoch is one pass over the
            rows (plain), as many draws as rows (stratified), or ``rows // batch`` batches (balanced).
            Iterating the dataset again continues with the next epochs, so ``model.fit`` sees new orders.
        seed: every random choice (order, draws, augmentation) derives from it.
        augment: per-sample seeded augmentation: on the first GPU when one is visible (each batch is copied
            there first), otherwise on the CPU to each image right after decoding it, in the same call; the
            same pixels either way, within float rounding.
        cache_dir: local folder for what later epochs and jobs need not redo: every image's pixels as
            decoded, cropped and resized with these settings (float32, 588 KiB at 224x224 in rgb), stored when
            first decoded, so that warm epochs neither read nor decode images, and remote images' bytes, by md5,
            so that no remote object is fetched twice (local images are read in place). The same batches, bit
            for bit, with or without it; every image's md5 is still checked on its first read in each process.
            Pixels are not cached with ``on_error="skip"``.
        input_context: ``tf.distribute.InputContext``: each input pipeline owns a disjoint share of the rows.
        storage_options: fsspec options for remote manifests and images (endpoint, credentials); without
            them the AWS environment applies.
        on_error: ``"raise"``: a missing or changed image, or one whose bytes are not its format, stops the
            pipeline with an error naming it;
            ``"skip"``: it is logged, counted in ``dataset.skipped`` and left out (balanced batches take
            another image of the same class instead).

    Returns:
        The dataset, with ``class_names`` (the label order: sorted categories of the whole version),
        ``version`` (the version number read) and ``skipped`` attributes.

    Raises:
        ConfigError: an argument is malformed; ManifestError / IntegrityError: the version is missing,
        uncommitted or tampered with.
    """
    channels = _check(locals())
    epochs = sampling.epochs(repeat)
    resolved = m.open_version(uri, version, storage_options)
    frame = m.read_table(resolved).to_pandas()
    class_names = sorted(frame[m.CATEGORY].unique().tolist())
    rows = _select(frame, purpose, resolved.uri)
    image_size = tuple(image_size) if image_size is not None else None
    shape = _output_shape(rows, image_size, roi, resolved.uri)

    if augment is not None and augment.rotate90 > 0 and shape[0] != shape[1]:
        raise ConfigError(f"Augment(rotate90=...) needs square images, but they come out {shape[1]}x{shape[0]}")
    if isinstance(stratify_by, str) and stratify_by == "auto":
        stratify_by = (m.CATEGORY,) if purpose == "train" else None
    columns = tuple(stratify_by) if stratify_by else ((m.CATEGORY,) if balanced else ())
    codes = rows.groupby(list(columns), sort=True).ngroup().to_numpy() if columns else np.zeros(len(rows), np.int64)
    probabilities = sampling.group_probabilities(np.bincount(codes), weighting) if columns else np.ones(1)
    workers, worker = (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)
    owned = sampling.shard_rows(len(rows), seed, workers, worker)

    def draws(first_epoch: int) -> Iterator[sampling.Draws]:
        if balanced:
            return sampling.balanced(owned, codes, probabilities, *balanced, seed, shuffle, first_epoch)
        if columns:
            return sampling.weighted(owned, codes, probabilities, seed, shuffle, first_epoch)
        return sampling.plain(owned, seed, shuffle, first_epoch)

    draws(0)  # fail here, not at the first batch, when the sampler cannot work (too few classes)
    if balanced:
        _warn_repeats(rows, columns, codes[owned], balanced[1])
    locations = m.object_locations(resolved, rows[m.PATH])  # fsspec URLs: fsspec does not percent-decode
    image_fs, _ = open_url(locations[0], storage_options)
    remote = not isinstance(image_fs, LocalFileSystem)
    reader = Reader(
        image_fs,
        [image_fs._strip_protocol(p) for p in locations],
        rows[m.PATH].tolist(),
        rows[m.MD5].tolist(),
        rows[m.SIZE].tolist(),
        cache_dir=cache_dir if remote else None,
        threads=16 if remote else 4,
    )
    formats, widths, heights = rows[m.FORMAT].to_numpy(), rows[m.WIDTH].to_numpy(), rows[m.HEIGHT].to_numpy()
    scales = np.where(formats == "jpeg", jpeg_scales(widths, heights, image_size, roi, keep_aspect_ratio), 0)
    scales = scales.astype(np.int32)
    uniform = uniform_jpeg(formats, scales, widths, heights, image_size, roi)
    paths = reader.local_paths if on_error == "raise" else None  # None: bytes pass through Python
    cache = None
    if cache_dir is not None and paths is not None:
        settings = dict(
            color_mode=color_mode, sample_bits=sample_bits, image_size=image_size, keep_aspect_ratio=keep_aspect_ratio,
            antialias=antialias, roi=roi, idct=IDCT,
        )  # fmt: skip
        cache = PixelCache(cache_dir, settings, rows[m.MD5].to_numpy(), (*shape, channels))
    elements = Elements(
        rows=rows,
        labels=np.searchsorted(class_names, rows[m.CATEGORY].to_numpy()).astype(np.int64),
        scales=scales,
        draws=draws,
        epochs=epochs,
        reader=reader,
        paths=paths,
        augment=augment,
        shape=shape,
        seed=seed,
        skip=on_error == "skip",
        members=[owned[codes[owned] == c] for c in range(codes.max() + 1)] if balanced else None,
        cache=cache,
    )

    gpus = tf.config.list_logical_devices("GPU") if augment is not None else []
    device = gpus[0].name if gpus and input_context is None else None
    on_cpu = augment is not None and device is None  # augment in the decoding function, one XLA call an image
    spent = {"data", "path", "size", "how", "scale", "entry", "row"} | ({"params", "noise_seed"} if on_cpu else set())

    # Images of one size are stacked as decoded and resized per batch, unless the uint8 stack would outweigh
    # the float32 batch it becomes (large images without a DCT scale): those are resized one by one, holding
    # less memory. Cached images come resized, so with a pixel cache every image is resized by itself.
    stacked = common_size(widths, heights, scales, roi) if not on_cpu and cache is None else None
    if stacked is not None and image_size is not None and stacked[0] * stacked[1] > 4 * image_size[0] * image_size[1]:
        stacked = None

    def decoded(e: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """Read and decode a batch's images one after another in one call (about a tenth less CPU per image
        than a map per image, which hands every image between tf.data's threads).

        Images that all decode to one size are stacked as decoded (uint8) and resized as a batch: one resize
        call, and a stack 40% the size of a float32 one at 320x240 -> 224x224 (4-5% more images/s on
        the benchmark's JPEGs, the same pixels). On a CPU, each image is augmented right after decoding
        instead, while its pixels are still in cache (a sixth faster than one XLA call over the whole batch,
        which reads and writes 19 MB of memory)."""
        count = tf.shape(e["label"])[0]

        def read(i: tf.Tensor) -> tf.Tensor:
            return e["data"][i] if paths is None else read_checked(e["path"][i], e["size"][i])

        def output(i: tf.Tensor) -> tf.Tensor:
            """Image i's pixels, before augmentation: decoded, or read from its pixel-cache entry (a row without
            one stores them once decoded)."""
            args = (image_size, keep_aspect_ratio, roi, uniform, sample_bits, antialias)
            decoded = lambda: decode(read(i), e["how"][i], e["scale"][i], channels, *args)  # noqa: E731
            if cache is None:
                return decoded()
            return tf.cond(
                tf.equal(e["how"][i], CACHED),
                lambda: tf.reshape(tf.io.decode_raw(read(i), tf.float32), [*shape, channels]),
                lambda: _kept(decoded(), e["entry"][i], e["row"][i], cache),
            )

        rest = {k: v for k, v in e.items() if k not in spent}
        if stacked is not None:
            raw = tf.TensorArray(tf.uint8, size=count, element_shape=[*stacked, channels])
            for i in tf.range(count):
                pixels = decode_pixels(read(i), e["how"][i], e["scale"][i], channels, roi, uniform, sample_bits)
                raw = raw.write(i, pixels)
            images = raw.stack()  # resized as uint8: the same pixels as a float32 copy gives, without the copy
            if image_size is None:
                return {"image": tf.cast(images, tf.float32), **rest}
            filtering = antialias if shrinks(stacked, image_size) else False
            return {"image": resize(images, image_size, keep_aspect_ratio, filtering), **rest}
        images = tf.TensorArray(tf.float32, size=count, element_shape=[*shape, channels])
        for i in tf.range(count):
            image = output(i)
            if on_cpu:
                image = augment.apply(image[None], e["params"][i][None], e["noise_seed"][i][None])[0]
            images = images.write(i, image)
        return {"image": images.stack(), **rest}

    size = balanced[0] * balanced[1] if balanced else batch_size
    dataset = elements.dataset()
    dataset = dataset.rebatch(size, drop_remainder=bool(balanced))
    dataset = host_map(dataset, decoded, parallel=True)
    batches = _batches(len(owned), size, epochs, bool(balanced))
    if batches is not None and (balanced or on_error == "raise"):  # skipping makes the count unknowable
        dataset = dataset.apply(tf.data.experimental.assert_cardinality(batches))  # Keras sizes epochs by it
    if device is not None:
        dataset = _augmented(dataset, augment, device)
    dataset = dataset.map(lambda e: _finish(e, rescale, label_mode, len(class_names), (*shape, channels)))
    dataset = dataset.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    # No autotuning model. Dropping an iterator joins the model's thread, which first sleeps out its current
    # optimisation period; the period doubles, up to a minute, as long as the iterator lives, and model.fit
    # drops an iterator every epoch. That stalled epochs by up to their own length (2-3 s on the bench
    # data). Without the model, AUTOTUNE stages run TensorFlow's default parallelism (one call per core,
    # at most 16) and the final prefetch tunes its own buffer: the same throughput there.
    options.autotune.enabled = False
    dataset = dataset.with_options(options)
    dataset.class_names = class_names
    dataset.version = resolved.number
    dataset.skipped = elements.skipped
    return dataset


def _kept(pixels: tf.Tensor, entry: tf.Tensor, row: tf.Tensor, cache: PixelCache) -> tf.Tensor:
    """``pixels``, once stored as the row's pixel-cache entry when ``entry`` names one (a row without)."""

    def store() -> tf.Tensor:
        return tf.numpy_function(cache.store, [entry, pixels, row], tf.int64, stateful=True)

    stored = tf.cond(tf.strings.length(entry) > 0, store, lambda: tf.constant(0, tf.int64))
    with tf.control_dependencies([stored]):
        return tf.identity(pixels)


def _warn_repeats(rows: pd.DataFrame, columns: tuple[str, ...], codes: np.ndarray, per_group: int) -> None:
    """Warn, naming them, about groups with fewer images than a balanced batch takes of each: their images
    repeat within a batch."""
    counts = np.bincount(codes, minlength=int(codes.max()) + 1 if len(codes) else 0)
    short = [g for g in range(len(counts)) if counts[g] < per_group]
    if not short:
        return
    names = rows.groupby(list(columns), sort=True).size().index
    shown = ", ".join(f"{names[g]!r} has {counts[g]}" for g in short[:5])
    warnings.warn(
        f"balanced batches take {per_group} images of each {'/'.join(columns)} but {shown}"
        f"{f' (and {len(short) - 5} more)' if len(short) > 5 else ''}: their images repeat within a batch. "
        "Lower images_per_class, or add images of those classes",
        UserWarning,
        stacklevel=3,
    )


def _batches(rows: int, size: int, epochs: int | None, balanced: bool) -> int | None:
    """How many batches a finite pipeline yields: draws run across epoch ends, only the last batch is short."""
    if epochs is None:
        return None
    if balanced:
        return max(1, rows // size) * epochs
    return -(-rows * epochs // size)


def _augmented(dataset: tf.data.Dataset, augment: Augment, device: str) -> tf.data.Dataset:
    """Augment each batch on ``device`` (a GPU), copying the batch there first; plain ops, fast there."""

    def apply(e: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        rest = {k: v for k, v in e.items() if k not in ("params", "noise_seed")}
        return {**rest, "image": augment.apply(e["image"], e["params"], e["noise_seed"], compiled=False)}

    dataset = dataset.apply(tf.data.experimental.copy_to_device(device))
    with tf.device(device):
        return dataset.map(apply)


def _finish(
    e: dict[str, tf.Tensor], rescale: str | None, label_mode: str | None, classes: int, shape: tuple[int, int, int]
) -> Any:
    """Rescale, fix the static shape, attach labels."""
    channels = shape[-1]
    images = tf.ensure_shape(e["image"], [None, *shape])
    if rescale == "0-1":
        images = images / 255.0
    elif rescale == "-1-1":
        images = images / 127.5 - 1.0
    elif rescale == "imagenet":
        mean, std = _IMAGENET_MEAN, _IMAGENET_STD
        if channels == 1:
            mean, std = mean.mean(keepdims=True), std.mean(keepdims=True)
        images = (images - mean) / std
    if label_mode is None:
        return images
    if label_mode == "categorical":
        return images, tf.one_hot(e["label"], classes, dtype=tf.float32)
    return images, tf.cast(e["label"], tf.int32)


def _check(args: Mapping[str, Any]) -> int:
    """Validate the arguments that need no manifest; return the channel count."""
    if args["purpose"] is not None and args["purpose"] not in m.PURPOSES:
        raise ConfigError(f"purpose {args['purpose']!r} is not one of {', '.join(m.PURPOSES)} or None")
    if args["color_mode"] not in COLOR_MODES:
        raise ConfigError(f"color_mode {args['color_mode']!r} is not one of {', '.join(COLOR_MODES)}")
    if args["rescale"] is not None and args["rescale"] not in RESCALES:
        raise ConfigError(f"rescale {args['rescale']!r} is not None or one of {', '.join(RESCALES)}")
    if args["label_mode"] not in LABEL_MODES:
        raise ConfigError(f"label_mode {args['label_mode']!r} is not 'int', 'categorical' or None")
    if args["on_error"] not in ON_ERROR:
        raise ConfigError(f"on_error {args['on_error']!r} is not 'raise' or 'skip'")
    if not isinstance(args["sample_bits"], int) or not 9 <= args["sample_bits"] <= 16:
        raise ConfigError(f"sample_bits must be an integer from 9 to 16 (16-bit files), got {args['sample_bits']!r}")
    if not any(args["antialias"] is v if isinstance(v, bool) else args["antialias"] == v for v in ANTIALIAS):
        raise ConfigError(
            f"antialias {args['antialias']!r} is not one of {', '.join(map(repr, ANTIALIAS))}: 'box' averages "
            "pixel blocks before shrinking, True is the full antialiased resize, False plain bilinear sampling"
        )
    if not isinstance(args["batch_size"], int) or args["batch_size"] < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {args['batch_size']!r}")
    size = args["image_size"]
    if size is not None and (len(size) != 2 or any(not isinstance(v, int) or v < 1 for v in size)):
        raise ConfigError(f"image_size must be None or (height, width) positive integers, got {size!r}")
    roi = args["roi"]
    if roi is not None and (len(roi) != 4 or any(not isinstance(v, int) for v in roi) or min(roi) < 0 or 0 in roi[2:]):
        raise ConfigError(f"roi must be (y, x, h, w) with y, x >= 0 and h, w > 0, got {roi!r}")
    balanced = args["balanced"]
    if balanced is not None and (len(balanced) != 2 or any(not isinstance(v, int) or v < 1 for v in balanced)):
        raise ConfigError(
            f"balanced must be (classes_per_batch, images_per_class), positive integers, got {balanced!r}"
        )
    if args["augment"] is not None and not isinstance(args["augment"], Augment):
        raise ConfigError(f"augment must be a loader.Augment, got {type(args['augment']).__name__}")
    stratify = args["stratify_by"]
    if isinstance(stratify, str) and stratify != "auto":
        raise ConfigError(f"stratify_by must be a sequence of columns, e.g. ({stratify!r},)")
    if stratify is not None and not isinstance(stratify, str):
        unknown = [c for c in stratify if c not in m.COLUMNS]
        if unknown:
            raise ConfigError(f"stratify_by names unknown columns {unknown}; manifest columns: {', '.join(m.COLUMNS)}")
    return COLOR_MODES[args["color_mode"]]


def _select(frame: pd.DataFrame, purpose: str | None, uri: str) -> pd.DataFrame:
    rows = frame if purpose is None else frame[frame[m.PURPOSE] == purpose]
    if rows.empty:
        counts = frame[m.PURPOSE].value_counts().to_dict()
        raise ManifestError(f"{uri} has no {purpose or ''} rows (rows per purpose: {counts or 'none'})")
    return rows.reset_index(drop=True)


def _output_shape(
    rows: pd.DataFrame, image_size: tuple[int, int] | None, roi: tuple[int, int, int, int] | None, uri: str
) -> tuple[int, int]:
    """Check the crop fits every image and sizes agree when none is given; return the (height, width) out."""
    if roi is not None:
        y, x, h, w = roi
        outside = rows[(rows[m.HEIGHT] < y + h) | (rows[m.WIDTH] < x + w)]
        if not outside.empty:
            first = outside.iloc[0]
            raise ConfigError(
                f"roi {roi} reaches outside {len(outside)} image(s) of {uri}, e.g. {first[m.KEY]} "
                f"({first[m.WIDTH]}x{first[m.HEIGHT]}); choose a crop inside every image"
            )
    if image_size is not None:
        return image_size
    if roi is not None:
        return roi[2], roi[3]
    sizes = rows.groupby([m.HEIGHT, m.WIDTH]).size()
    if len(sizes) > 1:
        raise ConfigError(
            f"image_size=None keeps stored sizes, but {uri} holds {len(sizes)} sizes "
            f"({', '.join(f'{w}x{h}' for h, w in sizes.index[:4])}...); pass image_size=(height, width)"
        )
    return int(sizes.index[0][0]), int(sizes.index[0][1])
