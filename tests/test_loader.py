"""loader.from_manifest on hand-built manifests (written with the schema module) and real image bytes."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import warnings
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import loader
from loader import manifest as m
from loader import source
from loader.augment import sample_keys
from loader.formats import JPEG, NATIVE
from loader.images import decode, jpeg_scales, uniform_jpeg
from loader.pipeline import _augmented
from loader.sampling import group_probabilities
from loader.stages import host_map
from strata.errors import ConfigError, IntegrityError, ManifestError
from tests.conftest import VIAL, encode, picture

REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = {"bmp": "bmp", "png": "png", "jpeg": "jpg", "gif": "gif", "tiff": "tif", "webp": "webp"}


def constant(value: int, size: tuple[int, int] = (8, 8)) -> bytes:
    """A grayscale PNG whose every pixel is ``value``: the sample's id survives decoding exactly."""
    return encode(Image.new("L", size, value), "png")


def publish(
    root: str,
    samples: list[tuple[str, bytes, str]],
    dataset: str = "d",
    version: int = 1,
    fs: fsspec.AbstractFileSystem | None = None,
) -> str:
    """Write images and commit a manifest version of them, as the curation flow would.

    Args:
        samples: (key, bytes, purpose); the category is the key's first folder.
    """
    fs = fs or fsspec.filesystem("file")
    rows = []
    for key, data, purpose in samples:
        path = f"{root}/images/{key}"
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(path, data)
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height), bands = image.format.lower(), image.size, len(image.getbands())
        rows.append(
            {
                m.PATH: fs.unstrip_protocol(path),
                m.KEY: key,
                m.FOLDER: key.rsplit("/", 1)[0],
                m.CATEGORY: key.split("/", 1)[0],
                m.SIZE: len(data),
                m.ETAG: hashlib.md5(data).hexdigest(),
                m.MD5: hashlib.md5(data).hexdigest(),
                m.MTIME: pd.Timestamp(datetime(2026, 1, 1, tzinfo=UTC)),
                m.FORMAT: fmt,
                m.WIDTH: width,
                m.HEIGHT: height,
                m.CHANNELS: bands,
                m.PHASH: np.uint64(0),
                m.DUPLICATE_GROUP: None,
                m.UNIQUE_ID: hashlib.md5(data).hexdigest(),
                m.PURPOSE: purpose,
                m.FIRST_VERSION: version,
            }
        )
    table = m.to_table(pd.DataFrame(rows))
    parquet, rejects = m.parquet_bytes(table), m.parquet_bytes(m.REJECTS_SCHEMA.empty_table())
    directory = f"{root}/{dataset}/{m.version_dir(version)}"
    fs.makedirs(directory, exist_ok=True)
    fs.pipe_file(f"{directory}/{m.MANIFEST_FILE}", parquet)
    fs.pipe_file(f"{directory}/{m.REJECTS_FILE}", rejects)
    record = {  # no path_encoding: paths are fsspec URLs as written, like a manifest from before the encoding
        "schema_version": m.SCHEMA_VERSION,
        "dataset": dataset,
        "version": version,
        "parent_version": None,
        "created_at": "2026-01-01T00:00:00+00:00",
        "source": f"{root}/images",
        "parameters": {},
        "rows": table.num_rows,
        "counts": m.counts_of(table),
        "rejects": {},
        "diff": {},
        "sha256": hashlib.sha256(parquet).hexdigest(),
        "rejects_sha256": hashlib.sha256(rejects).hexdigest(),
        "validation": {"success": True},
        "flow_run_id": None,
    }
    fs.pipe_file(f"{directory}/{m.COMMIT_FILE}", json.dumps(record).encode())
    return f"{root}/{dataset}"


def ids(batch: tf.Tensor) -> list[int]:
    """The sample ids of a batch of ``constant`` images (image_size=None, grayscale, no augmentation)."""
    return [int(v) for v in batch.numpy()[:, 0, 0, 0]]


def sized_classes(sizes: dict[str, int]) -> list[tuple[str, bytes, str]]:
    samples, value = [], 0
    for category, count in sizes.items():
        for _ in range(count):
            samples.append((f"{category}/{value}.png", constant(value), "train"))
            value += 1
    return samples


GRAY = {"image_size": None, "color_mode": "grayscale"}


@pytest.fixture
def classes(tmp_path: Path) -> str:
    """Four classes of 40, 10, 4 and 1 constant images."""
    return publish(str(tmp_path), sized_classes({"a": 40, "b": 10, "c": 4, "d": 1}))


@pytest.mark.parametrize("weighting", ["uniform", "count", "sqrt", "log", "logx+1", "callable"])
def test_group_frequencies_follow_the_weights(classes: str, weighting: str) -> None:
    chosen = (lambda n: n**2) if weighting == "callable" else weighting
    ds = loader.from_manifest(classes, batch_size=100, weighting=chosen, repeat=True, **GRAY)
    labels = np.concatenate([y.numpy() for _, y in ds.take(20)])
    frequencies = np.bincount(labels, minlength=4) / len(labels)
    expected = group_probabilities([40, 10, 4, 1], chosen)
    assert len(labels) == 2000
    assert np.abs(frequencies - expected).max() <= 0.05, (frequencies, expected)


def test_within_a_group_samples_cycle_through_every_member(classes: str) -> None:
    ds = loader.from_manifest(classes, batch_size=100, repeat=True, **GRAY)
    drawn = Counter(v for x, y in ds.take(10) for v, label in zip(ids(x), y.numpy(), strict=True) if label == 1)
    assert sorted(drawn) == list(range(40, 50))  # class b's ten samples
    assert max(drawn.values()) - min(drawn.values()) <= 1


def test_plain_epochs_yield_every_sample_exactly_once(classes: str) -> None:
    ds = loader.from_manifest(classes, stratify_by=None, batch_size=16, **GRAY)
    one = [v for x, _ in ds for v in ids(x)]
    assert sorted(one) == list(range(55)) and int(ds.cardinality()) == 4  # Keras sizes its epochs by it
    two = [
        v for x, _ in loader.from_manifest(classes, stratify_by=None, batch_size=16, repeat=2, **GRAY) for v in ids(x)
    ]
    assert sorted(two[:55]) == sorted(two[55:]) == list(range(55)) and two[:55] != two[55:]
    ordered = [v for x, _ in loader.from_manifest(classes, stratify_by=None, shuffle=False, **GRAY) for v in ids(x)]
    assert ordered == list(range(55))


def test_evaluation_purposes_default_to_every_sample_once_and_train_to_stratified(tmp_path: Path) -> None:
    samples = sized_classes({"a": 12, "b": 3, "c": 1})
    purposes = ["devel", "train", "test", "train"]
    samples = [(key, data, purposes[i % 4]) for i, (key, data, _) in enumerate(samples)]
    dataset = publish(str(tmp_path), samples)
    for purpose in ("devel", "test"):
        expected = sorted(i for i in range(16) if purposes[i % 4] == purpose)
        seen = [v for x, _ in loader.from_manifest(dataset, purpose=purpose, batch_size=3, **GRAY) for v in ids(x)]
        assert sorted(seen) == expected, purpose  # each once, whatever the class sizes
    seen = [v for x, _ in loader.from_manifest(dataset, purpose=None, batch_size=5, **GRAY) for v in ids(x)]
    assert sorted(seen) == list(range(16))
    train = loader.from_manifest(dataset, purpose="train", batch_size=400, repeat=True, **GRAY)
    labels = next(iter(train))[1].numpy()
    assert np.abs(np.bincount(labels, minlength=3) / 400 - 1 / 3).max() < 0.08  # classes drawn alike


def test_balanced_batches_that_must_repeat_an_image_warn_naming_the_class(classes: str) -> None:
    with pytest.warns(UserWarning, match=r"4 images of each category but 'd' has 1"):
        loader.from_manifest(classes, balanced=(3, 4), **GRAY)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader.from_manifest(classes, balanced=(3, 1), **GRAY)


def test_iterating_again_continues_with_the_next_epoch(classes: str) -> None:
    ds = loader.from_manifest(classes, stratify_by=None, batch_size=64, **GRAY)
    first, second = ([v for x, _ in ds for v in ids(x)] for _ in range(2))
    assert sorted(first) == sorted(second) and first != second
    again = loader.from_manifest(classes, stratify_by=None, batch_size=64, **GRAY)
    assert [v for x, _ in again for v in ids(x)] == first


def test_pipeline_uses_no_generator_dataset(classes: str) -> None:
    """TensorFlow's GeneratorDataset (``from_generator``) pins glibc's mmap threshold at 128 KiB for the rest
    of the process the first time it runs: every image-sized tensor of every pipeline after it page-faults."""
    graph = tf.compat.v1.GraphDef.FromString(loader.from_manifest(classes, **GRAY)._as_serialized_graph().numpy())
    ops = {node.op for node in graph.node} | {n.op for f in graph.library.function for n in f.node_def}
    assert "PyFunc" in ops  # the graph and its functions were searched
    assert not {op for op in ops if "Generator" in op}, ops


def test_decode_stage_is_prepared_once_per_dataset(classes: str) -> None:
    """A multi-device map function is placed and optimised by grappler again at every iteration (epoch); the
    decode stage, with the augmentation program in it, is a single-device function (stages.host_map)."""
    ds = loader.from_manifest(classes, augment=loader.Augment(flip=0.5, rotate=0.5), **GRAY)
    graph = tf.compat.v1.GraphDef.FromString(ds._as_serialized_graph().numpy())
    single = {f.signature.name for f in graph.library.function if f.attr["experimental_ints_on_device"].b}
    assert any("map_decoded" in name for name in single), single
    assert next(iter(ds))[0].shape == (32, 8, 8, 1)


def test_pipeline_runs_without_the_autotuning_model(classes: str) -> None:
    """Dropping an iterator joins tf.data's autotuning thread once it has slept out its optimisation period,
    which grows to a minute: model.fit drops one every epoch, and each stalled by up to the epoch's length."""
    ds = loader.from_manifest(classes, augment=loader.Augment(flip=0.5), **GRAY)
    assert ds.options().autotune.enabled is False
    assert ds.options().deterministic is True
    assert next(iter(ds))[0].shape == (32, 8, 8, 1)


def test_host_map_matches_dataset_map_and_refuses_int32_outputs() -> None:
    ds = tf.data.Dataset.range(20).batch(3)

    def pair(x: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"text": tf.strings.as_string(x), "twice": x * 2}

    options = tf.data.Options()
    options.deterministic = True
    expected = list(ds.map(pair).as_numpy_iterator())
    for parallel in (False, True):
        got = list(host_map(ds, pair, parallel=parallel).prefetch(2).with_options(options).as_numpy_iterator())
        assert len(got) == len(expected) == 7
        for a, b in zip(got, expected, strict=True):
            assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="int32"):
        host_map(ds, tf.function(lambda x: tf.cast(x, tf.int32)))


def test_abandoned_iterations_are_dropped_and_say_so(classes: str) -> None:
    ds = loader.from_manifest(classes, batch_size=8, repeat=True, **GRAY)
    kept = iter(ds)
    first = ids(next(kept)[0])
    for _ in range(12):  # each leaves its generator unfinished; only the newest 8 keep their state
        assert ids(next(iter(ds))[0]) == first
    with pytest.raises(tf.errors.UnknownError, match="dropped"):
        for _ in range(200):  # past the batches already read ahead
            next(kept)


def test_balanced_batches_hold_exactly_the_asked_classes(classes: str) -> None:
    with pytest.warns(UserWarning, match="'d' has 1"):  # class d's one image repeats within its batches
        ds = loader.from_manifest(classes, balanced=(3, 4), repeat=3, **GRAY)
    batches = list(ds)
    assert len(batches) == 3 * (55 // 12)
    for images, labels in batches:
        assert images.shape == (12, 8, 8, 1)
        counts = np.bincount(labels.numpy(), minlength=4)
        assert sorted(counts[counts > 0]) == [4, 4, 4] and (counts > 0).sum() == 3
    with pytest.raises(ConfigError, match="4 class"):
        loader.from_manifest(classes, balanced=(5, 2), **GRAY)


def test_another_seed_gives_another_order(classes: str) -> None:
    def order(seed: int) -> list[int]:
        return [v for x, _ in loader.from_manifest(classes, batch_size=55, seed=seed, **GRAY) for v in ids(x)]

    assert order(1) == order(1) != order(2)


DETERMINISM_SCRIPT = """
import hashlib, sys
import loader
ds = loader.from_manifest(sys.argv[1], batch_size=7, image_size=(48, 40), repeat=2, seed=5,
                          augment=loader.Augment(flip=0.5, rotate=0.5, scale=0.5, brightness=0.5, hue=0.5, noise=0.5))
digest = hashlib.sha256()
for images, labels in ds:
    digest.update(images.numpy().tobytes()); digest.update(labels.numpy().tobytes())
print(digest.hexdigest())
"""


def test_same_arguments_give_bit_identical_batches_in_another_process(tmp_path: Path) -> None:
    samples = [
        (f"{c}/{i}.{ext}", encode(picture(i + 10 * k), ext), "train")
        for k, c in enumerate("ab")
        for i, ext in enumerate(["png", "jpg", "bmp", "webp", "png"])
    ]
    root = publish(str(tmp_path), samples)
    script = tmp_path / "digest.py"
    script.write_text(DETERMINISM_SCRIPT)
    digests = {
        subprocess.run(
            [sys.executable, str(script), root], capture_output=True, text=True, check=True, cwd=REPO
        ).stdout.strip()
        for _ in range(2)
    }
    here = subprocess.run(
        [sys.executable, "-c", DETERMINISM_SCRIPT, root], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout.strip()
    assert len(digests) == 1 and here in digests and len(here) == 64


def test_augmentation_depends_only_on_seed_sample_and_epoch(tmp_path: Path) -> None:
    samples = [("one/0.png", encode(picture(1), "png"), "train")] + [
        (f"many/{i}.png", encode(picture(i + 2), "png"), "train") for i in range(9)
    ]
    root = publish(str(tmp_path), samples)
    augment = loader.Augment(flip=0.5, rotate=1.0, brightness=1.0, noise=1.0, contrast=0.5)

    def single(seed: int) -> list[np.ndarray]:
        """The lone sample of class 'one', every time epoch 0 drew it (10 draws per epoch)."""
        ds = loader.from_manifest(root, batch_size=10, image_size=(32, 32), augment=augment, seed=seed, repeat=2)
        return [[x for x, y in zip(images.numpy(), labels.numpy(), strict=True) if y == 1] for images, labels in ds]

    epoch0, epoch1 = single(3)
    assert len(epoch0) >= 2 and len(epoch1) >= 1
    assert all(np.array_equal(x, epoch0[0]) for x in epoch0)  # same sample, same epoch: same pixels
    assert not np.array_equal(epoch1[0], epoch0[0])  # next epoch: new augmentation
    assert not np.array_equal(single(4)[0][0], epoch0[0])  # other seed: other pixels
    original = next(iter(loader.from_manifest(root, batch_size=10, image_size=(32, 32), seed=3)))[0].numpy()
    assert not np.array_equal(epoch0[0], original[0])


def test_augmentation_ignores_batch_position_and_device() -> None:
    augment = loader.Augment(
        flip=0.5, rotate90=0.5, rotate=0.5, shear=0.5, translate=0.5, saturation=0.5, hue=0.5, noise=0.5
    )
    image = np.asarray(Image.open(VIAL).convert("RGB").resize((32, 32)), dtype=np.float32)
    images = np.stack([image, image[::-1], image[:, ::-1], image * 0.5])
    keys = sample_keys(7, np.array([f"{i:032x}" for i in range(4)]), np.zeros(4, dtype=np.int64))
    params, seeds = augment.draw(keys, 32, 32)
    forward = augment.apply(tf.constant(images), tf.constant(params), tf.constant(seeds)).numpy()
    backward = augment.apply(tf.constant(images[::-1]), tf.constant(params[::-1]), tf.constant(seeds[::-1])).numpy()
    np.testing.assert_array_equal(forward, backward[::-1])
    batch = tf.data.Dataset.from_tensors({"image": images, "params": params, "noise_seed": seeds})
    copied = next(iter(_augmented(batch, augment, "/cpu:0")))["image"].numpy()  # the GPU path, on the CPU
    np.testing.assert_allclose(copied, forward, atol=1e-3)  # plain ops instead of XLA: float rounding only


@pytest.mark.parametrize("shape", [(24, 24, 3), (17, 23, 3), (1, 9, 3), (9, 1, 1)])
def test_per_sample_program_matches_batched_ops(shape: tuple[int, int, int]) -> None:
    """The XLA program (flips and turns as reversals and transposes, bilinear as 2x2 patch gathers, colour
    fused in) against the batched plain ops, on odd shapes and images one pixel wide."""
    h, w, c = shape
    images = tf.constant(np.random.default_rng(0).uniform(0, 255, (64, *shape)).astype(np.float32))
    keys = sample_keys(1, np.array([f"{i:032x}" for i in range(64)]), np.zeros(64, dtype=np.int64))
    turns = 0.5 if h == w else 0.0
    exact = loader.Augment(flip=0.5, flip_vertical=0.5, rotate90=turns)
    params = exact.draw(keys, h, w)
    np.testing.assert_array_equal(exact.apply(images, *params), exact.apply(images, *params, compiled=False))
    every = loader.Augment(
        flip=0.5, flip_vertical=0.5, rotate90=turns, rotate=0.5, scale=0.3, shear=0.3, translate=0.3,
        brightness=0.5, contrast=0.5, hue=0.5, saturation=0.5,
    )  # fmt: skip
    params = every.draw(keys, h, w)
    np.testing.assert_allclose(every.apply(images, *params), every.apply(images, *params, compiled=False), atol=1e-3)


def test_identity_draws_keep_exact_pixels_and_flips_are_exact() -> None:
    image = np.asarray(Image.open(VIAL).convert("RGB").resize((24, 24)), dtype=np.float32)[None]
    keys = sample_keys(0, np.array(["0" * 32]), np.zeros(1, dtype=np.int64))
    untouched = loader.Augment(rotate=0.0, brightness=0.0)
    np.testing.assert_array_equal(
        untouched.apply(tf.constant(image), *map(tf.constant, untouched.draw(keys, 24, 24))).numpy(), image
    )
    flip = loader.Augment(flip=1.0)
    np.testing.assert_array_equal(
        flip.apply(tf.constant(image), *map(tf.constant, flip.draw(keys, 24, 24))).numpy(), image[:, :, ::-1]
    )


def test_workers_see_disjoint_shares_that_cover_an_epoch(classes: str) -> None:
    seen = []
    for worker in range(3):
        context = tf.distribute.InputContext(num_input_pipelines=3, input_pipeline_id=worker)
        seen.append(
            [
                v
                for x, _ in loader.from_manifest(classes, stratify_by=None, input_context=context, **GRAY)
                for v in ids(x)
            ]
        )
    assert sum(len(s) for s in seen) == 55 and sorted(sum(seen, [])) == list(range(55))
    stratified = []
    for worker in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=worker)
        stratified.append({v for x, _ in loader.from_manifest(classes, input_context=context, **GRAY) for v in ids(x)})
    assert not stratified[0] & stratified[1]


def test_decodes_every_format_like_pillow(tmp_path: Path) -> None:
    image = picture(3, size=(40, 30))
    samples = [(f"{fmt}/x.{ext}", encode(image, ext), "train") for fmt, ext in EXTENSIONS.items()]
    samples.append(("bmp_palette/x.bmp", encode(image.convert("P"), "bmp"), "train"))
    samples.append(("gray/x.png", encode(image.convert("L"), "png"), "train"))
    root = publish(str(tmp_path), samples)
    ds = loader.from_manifest(
        root, purpose=None, stratify_by=None, shuffle=False, batch_size=len(samples), image_size=None
    )
    images, labels = next(iter(ds))
    for (key, data, _), pixels in zip(samples, images.numpy(), strict=True):
        reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float32)
        tolerance = 8 if key.startswith("jpeg") else 0
        assert np.abs(pixels - reference).max() <= tolerance, key


def test_large_jpegs_decode_at_reduced_scale_without_losing_quality(tmp_path: Path) -> None:
    data = encode(Image.open(VIAL).convert("RGB").resize((640, 480)), "jpg", quality=90)
    root = publish(str(tmp_path), [("a/big.jpg", data, "train")])
    fast = next(iter(loader.from_manifest(root, batch_size=1)))[0].numpy()[0]
    full = tf.image.resize(tf.io.decode_jpeg(data, channels=3), (224, 224), antialias=True).numpy()
    assert fast.shape == (224, 224, 3)
    assert np.abs(fast - full).mean() < 3.0


@pytest.mark.parametrize(
    ("size", "roi", "pad"),
    [
        ((224, 224), None, False),
        ((100, 120), (48, 64, 320, 400), True),
        ((40, 40), None, False),
        ((40, 40), (1, 0, 400, 400), False),
    ],
)
def test_uniform_jpegs_decode_like_the_general_graph(size, roi, pad) -> None:
    """A manifest of same-size JPEGs gets a graph without branches; its pixels equal the general graph's."""
    data = encode(Image.open(VIAL).convert("RGB").resize((640, 480)), "jpg", quality=90)
    widths, heights, formats = np.array([640, 640]), np.array([480, 480]), np.array(["jpeg", "jpeg"])
    scales = jpeg_scales(widths, heights, size, roi, pad)
    uniform = uniform_jpeg(formats, scales, widths, heights, size, roi)
    assert uniform is not None and uniform[1] == (roi is not None and roi[0] == 1)  # shrinks > 2x only there
    general = decode(tf.constant(data), tf.constant(JPEG), tf.constant(scales[0]), 3, size, pad, roi)
    fast = decode(tf.constant(data), tf.constant(JPEG), tf.constant(scales[0]), 3, size, pad, roi, uniform)
    np.testing.assert_array_equal(fast.numpy(), general.numpy())
    assert uniform_jpeg(np.array(["jpeg", "png"]), scales, widths, heights, size, roi) is None
    assert uniform_jpeg(formats, np.array([1, 2]), widths, heights, size, roi) is None


@pytest.mark.parametrize(
    ("fmt", "size", "roi", "pad"),
    [
        ("jpg", (224, 224), None, False),
        ("jpg", (100, 120), (48, 64, 320, 400), True),
        ("jpg", (190, 220), (1, 0, 400, 400), False),  # off the DCT grid: full scale, antialiased
        ("png", (200, 400), None, False),  # antialiased: 480 rows to 200
        ("bmp", (140, 220), (8, 16, 300, 400), True),
        ("png", (40, 40), None, False),  # the stack would outweigh the batch: resized one by one
    ],
)
def test_same_size_images_resized_as_a_batch_equal_each_resized_alone(tmp_path: Path, fmt, size, roi, pad) -> None:
    """Images of one size are stacked and resized per batch; the pixels equal the per-image graph's."""
    vial = Image.open(VIAL).convert("RGB").resize((640, 480))
    shots = [vial, vial.transpose(Image.Transpose.FLIP_LEFT_RIGHT), vial.rotate(180)]
    blobs = [encode(shot, fmt, **({"quality": 90} if fmt == "jpg" else {})) for shot in shots]
    root = publish(str(tmp_path), [(f"a/{i}.{fmt}", blob, "train") for i, blob in enumerate(blobs)])
    dataset = loader.from_manifest(
        root, batch_size=3, image_size=size, roi=roi, keep_aspect_ratio=pad, stratify_by=None, shuffle=False
    )
    batch = next(iter(dataset))[0].numpy()  # in key order
    widths, heights = np.array([640]), np.array([480])
    formats = np.array(["jpeg" if fmt == "jpg" else fmt])
    scales = np.where(formats == "jpeg", jpeg_scales(widths, heights, size, roi, pad), 0).astype(np.int32)
    how = JPEG if fmt == "jpg" else NATIVE
    alone = [decode(tf.constant(b), tf.constant(how), tf.constant(scales[0]), 3, size, pad, roi).numpy() for b in blobs]
    assert batch.shape == (3, *size, 3)
    np.testing.assert_array_equal(batch, np.stack(alone))


def test_roi_resize_pad_rescale_and_labels(tmp_path: Path) -> None:
    pixels = np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) % 251
    data = encode(Image.fromarray(pixels.astype(np.uint8), "L"), "png")
    root = publish(str(tmp_path), [("b/x.png", data, "devel"), ("a/y.png", data, "train"), ("c/z.png", data, "train")])
    assert loader.class_names(root) == ["a", "b", "c"]
    crop = next(
        iter(loader.from_manifest(root, purpose="devel", image_size=None, roi=(5, 10, 20, 30), color_mode="grayscale"))
    )
    np.testing.assert_array_equal(crop[0].numpy()[0, ..., 0], pixels[5:25, 10:40])
    padded, onehot = next(
        iter(
            loader.from_manifest(
                root,
                purpose="devel",
                image_size=(30, 30),
                keep_aspect_ratio=True,
                label_mode="categorical",
                rescale="0-1",
            )
        )
    )
    assert padded.shape == (1, 30, 30, 3) and onehot.numpy().tolist() == [[0.0, 1.0, 0.0]]
    assert padded.numpy()[0, :5].max() == 0.0 and padded.numpy()[0, 10].max() > 0.0 and padded.numpy().max() <= 1.0
    only_images = next(iter(loader.from_manifest(root, purpose="devel", label_mode=None, rescale="-1-1")))
    assert only_images.shape == (1, 224, 224, 3) and only_images.numpy().min() >= -1.0
    with pytest.raises(ConfigError, match="roi .* reaches outside 1 image"):
        loader.from_manifest(root, purpose="devel", roi=(30, 0, 20, 20))


def test_tampered_uncommitted_and_other_schema_versions_are_refused(tmp_path: Path) -> None:
    root = publish(str(tmp_path), sized_classes({"a": 3}))
    commit = Path(root) / "v000001" / m.COMMIT_FILE
    original = commit.read_bytes()
    commit.write_text(json.dumps({**json.loads(original), "schema_version": 2}))
    with pytest.raises(ManifestError, match=r"v000001/manifest.json has schema_version 2; this strata reads version 1"):
        loader.from_manifest(root, **GRAY)
    commit.write_bytes(original)
    parquet = Path(root) / "v000001" / m.MANIFEST_FILE
    frame = pd.read_parquet(parquet)
    frame.loc[0, m.PURPOSE] = "devel"
    parquet.write_bytes(m.parquet_bytes(m.to_table(frame)))
    with pytest.raises(IntegrityError, match="v000001/manifest.parquet does not match its manifest.json"):
        loader.from_manifest(root, **GRAY)
    (Path(root) / "v000002").mkdir()
    (Path(root) / "v000002" / m.MANIFEST_FILE).write_bytes(b"half written")
    with pytest.raises(ManifestError, match="version 2 of .* exists but is not committed"):
        loader.from_manifest(root, version=2, **GRAY)


def test_missing_or_changed_images_raise_naming_the_path_or_are_skipped(tmp_path: Path) -> None:
    root = publish(str(tmp_path), sized_classes({"a": 6, "b": 6}))
    missing, changed = tmp_path / "images" / "a" / "2.png", tmp_path / "images" / "b" / "8.png"
    changed.write_bytes(constant(99))
    with pytest.raises(tf.errors.OpError, match="b/8.png changed since it was curated"):
        list(loader.from_manifest(root, stratify_by=None, **GRAY))
    missing.unlink()
    with pytest.raises(tf.errors.OpError, match="a/2.png is listed in the manifest but does not exist"):
        list(loader.from_manifest(root, stratify_by=None, shuffle=False, **GRAY))
    ds = loader.from_manifest(root, stratify_by=None, on_error="skip", **GRAY)
    assert sorted(v for x, _ in ds for v in ids(x)) == [0, 1, 3, 4, 5, 6, 7, 9, 10, 11]
    warm = loader.from_manifest(publish(str(tmp_path / "warm"), sized_classes({"a": 3})), **GRAY)
    list(warm)  # every image verified by md5; later epochs read the files in the graph, checking their size
    (tmp_path / "warm" / "images" / "a" / "0.png").write_bytes(constant(0) + b"appended")
    with pytest.raises(tf.errors.OpError, match="image changed since this process verified its md5.*a/0.png"):
        list(warm)
    assert ds.skipped.count == 2 and any(p.endswith("a/2.png") for p in ds.skipped.paths)
    balanced = loader.from_manifest(root, balanced=(2, 3), on_error="skip", repeat=2, **GRAY)
    assert all(x.shape[0] == 6 and 2 not in ids(x) and 8 not in ids(x) for x, _ in balanced)


def test_a_chunk_whose_every_image_is_skipped_does_not_end_the_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(source, "_CHUNK", 4)  # the source hands rows on in chunks of 4
    root = publish(str(tmp_path), sized_classes({"a": 12}))
    for value in range(4):  # the whole first chunk
        (tmp_path / "images" / "a" / f"{value}.png").unlink()
    ds = loader.from_manifest(root, stratify_by=None, shuffle=False, on_error="skip", batch_size=3, **GRAY)
    assert [v for x, _ in ds for v in ids(x)] == list(range(4, 12))
    assert ds.skipped.count == 4


def test_arguments_are_checked_with_clear_messages(classes: str) -> None:
    for kwargs, message in [
        ({"purpose": "validation"}, "purpose 'validation' is not one of"),
        ({"weighting": "cubic"}, "weighting 'cubic' is not one of"),
        ({"balanced": (2,)}, "balanced must be"),
        ({"stratify_by": "category"}, r"stratify_by must be a sequence of columns, e.g. \('category',\)"),
        ({"stratify_by": ("colour",)}, "unknown columns"),
        ({"repeat": 0}, "repeat must be"),
        ({"rescale": "0-255"}, "rescale '0-255'"),
    ]:
        with pytest.raises(ConfigError, match=message):
            loader.from_manifest(classes, **{**GRAY, **kwargs})
    with pytest.raises(ManifestError, match="has no test rows"):
        loader.from_manifest(classes, purpose="test", **GRAY)
    with pytest.raises(ConfigError, match="a probability must lie between 0 and 1"):
        loader.Augment(flip=2)


def test_reads_s3_manifests_and_caches_image_bytes(s3: fsspec.AbstractFileSystem, tmp_path: Path) -> None:
    root = publish("s3://strata-test/data", sized_classes({"a": 5, "b": 4}), fs=s3)
    cache = tmp_path / "cache"
    first = [v for x, _ in loader.from_manifest(root, stratify_by=None, cache_dir=cache, **GRAY) for v in ids(x)]
    assert sorted(first) == list(range(9)) and len(list(cache.glob("??/*"))) == 9  # bytes by md5
    assert len(list(cache.glob("pixels/*/??/*"))) == 9  # and decoded pixels
    s3.rm("strata-test/data/images", recursive=True)  # a second job reads no remote object again
    again = loader.from_manifest(root, stratify_by=None, cache_dir=cache, **GRAY)
    assert [v for x, _ in again for v in ids(x)] == first
    with pytest.raises(tf.errors.OpError, match="s3://strata-test/data/images/.* does not exist"):
        list(loader.from_manifest(root, stratify_by=None, **GRAY))


EXIT_SCRIPT = """
import faulthandler, sys
faulthandler.dump_traceback_later(60, exit=True)  # a hang fails the run instead of stalling the suite
import loader, loader.source
loader.source._CHUNK = 1  # a step per element: the pipeline is calling Python whenever the process exits
dataset = loader.from_manifest(sys.argv[1], batch_size=4, repeat=True, augment=loader.Augment(rotate=1.0))
iterator = iter(dataset)
next(iterator)
print("done", flush=True)
"""


def test_a_process_exits_while_its_pipeline_is_still_reading(tmp_path: Path) -> None:
    # A step that waits for the GIL once the interpreter is finalizing never returns, and destroying the
    # iterator waits for it: without ending the sources first, most of these runs hung at exit.
    samples = [(f"{c}/{i}.jpg", encode(picture(i, (640, 480)), "jpg"), "train") for c in "ab" for i in range(12)]
    root = publish(str(tmp_path), samples)
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", EXIT_SCRIPT, root], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO
        )
        for _ in range(3)
    ]
    for run in runs:
        out, err = run.communicate(timeout=120)
        assert (run.returncode, out.strip()) == (0, b"done"), err.decode()[-3000:]


def test_example_curates_the_demo_and_trains_one_epoch(tmp_path: Path) -> None:
    import importlib.util

    from strata.cli import main

    spec = importlib.util.spec_from_file_location("train_vials", REPO / "examples" / "train_vials.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    level = os.environ.get("PREFECT_LOGGING_LEVEL")
    assert main(["demo", "--manifests", str(tmp_path), "--quiet"]) == 0
    assert os.environ.get("PREFECT_LOGGING_LEVEL") == level  # --quiet does not outlive its run
    metrics = example.train(str(tmp_path), epochs=1)
    assert set(metrics) >= {"loss", "accuracy"} and np.isfinite(metrics["loss"])
