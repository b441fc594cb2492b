"""The pixel cache (``from_manifest(cache_dir=...)``): batches bit for bit those decoding gives, warm epochs that
read no image, every image still checked against its md5 once a process, entries by content and settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import loader
from tests.conftest import VIAL, encode
from tests.test_loader import publish


def shots() -> list[tuple[str, bytes, str]]:
    """320x240 photos as cameras write them, in two classes: 24-bit and grey BMP, RGB and 16-bit PNG, JPEG, TIFF
    (decoded by Pillow), and an exact copy in the other class (one content, two rows)."""
    vial = Image.open(VIAL).convert("RGB").resize((320, 240))
    sixteen = Image.fromarray((np.asarray(vial.convert("L"), dtype=np.uint16) * 257).astype(np.uint16))
    images = [
        ("good/0.bmp", encode(vial, "bmp")),
        ("good/1.bmp", encode(vial.rotate(90).convert("L"), "bmp")),
        ("good/2.png", encode(vial.rotate(180), "png")),
        ("good/3.png", encode(sixteen, "png")),
        ("bad/4.jpg", encode(vial.rotate(30), "jpg", quality=90)),
        ("bad/5.tif", encode(vial.rotate(60), "tif")),
        ("bad/6.bmp", encode(vial.transpose(Image.Transpose.FLIP_LEFT_RIGHT), "bmp")),
        ("bad/copy-of-0.bmp", encode(vial, "bmp")),
    ]
    return [(key, data, "train") for key, data in images]


def iterations(dataset: tf.data.Dataset, count: int = 2) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The batches of ``count`` iterations of the dataset (each continues with the next epoch)."""
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(count)]


def same(got: list, expected: list) -> bool:
    return len(got) == len(expected) and all(
        np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(got, expected, strict=True)
    )


SETTINGS = {
    "defaults": {},
    "grey, padded, small": {"color_mode": "grayscale", "image_size": (40, 64), "keep_aspect_ratio": True},
    "augmented on the CPU": {"augment": loader.Augment(flip=0.5, rotate=0.5, brightness=0.5, hue=0.3)},
    "antialiased crop": {"antialias": True, "roi": (16, 32, 200, 240), "image_size": (48, 48)},
    "balanced, unresized": {"balanced": (2, 3), "image_size": None, "color_mode": "grayscale", "roi": (0, 0, 64, 96)},
}


@pytest.mark.parametrize("settings", list(SETTINGS.values()), ids=list(SETTINGS))
def test_cached_batches_are_decoded_ones_and_warm_epochs_read_no_image(tmp_path: Path, settings: dict) -> None:
    root = publish(str(tmp_path / "data"), shots())
    options = {"batch_size": 3, "seed": 11, "repeat": 2, "purpose": None, **settings}
    expected = iterations(loader.from_manifest(root, **options))
    cache = tmp_path / "cache"
    dataset = loader.from_manifest(root, cache_dir=cache, **options)
    first = iterations(dataset, 1)[0]
    assert len(list(cache.glob("pixels/*/??/*"))) == 7  # one entry per content: the copy shares its original's
    shutil.rmtree(tmp_path / "data" / "images")
    second = iterations(dataset, 1)[0]  # its images are gone: a warm epoch reads only their pixels
    assert same(first, expected[0]) and same(second, expected[1])
    # A new pipeline checks every image against its md5 on its first read, cached pixels or not.
    with pytest.raises(tf.errors.OpError, match="images/.* does not exist any more"):
        list(loader.from_manifest(root, cache_dir=cache, **options))


def test_entries_are_kept_by_content_and_settings_and_damaged_ones_written_again(tmp_path: Path) -> None:
    root = publish(str(tmp_path / "data"), shots())
    cache = tmp_path / "cache"
    options = {"batch_size": 4, "seed": 3, "purpose": None, "stratify_by": None}
    expected = iterations(loader.from_manifest(root, **options), 1)[0]
    assert same(iterations(loader.from_manifest(root, cache_dir=cache, **options), 1)[0], expected)
    small = iterations(loader.from_manifest(root, cache_dir=cache, image_size=(32, 32), **options), 1)[0]
    folders = {tuple(json.loads((f / "settings.json").read_text())["image_size"]): f for f in cache.glob("pixels/*")}
    assert sorted(folders) == [(32, 32), (224, 224)]  # other settings: other entries, never mixed
    for (height, width), folder in folders.items():  # one entry per content, the pipeline's float32 output
        assert [entry.stat().st_size for entry in folder.glob("??/*")] == [height * width * 3 * 4] * 7

    entries = sorted(folders[224, 224].glob("??/*"))
    entries[0].write_bytes(entries[0].read_bytes()[:1000])  # cut short, as a full disk would leave it
    entries[1].write_bytes(b"\0" * 10)
    again = iterations(loader.from_manifest(root, cache_dir=cache, **options), 1)[0]
    assert same(again, expected)
    assert {entry.stat().st_size for entry in entries} == {224 * 224 * 3 * 4}  # decoded and written again
    assert small[0][0].shape == (4, 32, 32, 3)


def test_skipping_pipelines_cache_no_pixels(tmp_path: Path) -> None:
    root = publish(str(tmp_path / "data"), shots())
    cache = tmp_path / "cache"
    options = {"batch_size": 4, "seed": 3, "purpose": None, "stratify_by": None}
    skipping = iterations(loader.from_manifest(root, cache_dir=cache, on_error="skip", **options), 1)[0]
    assert same(skipping, iterations(loader.from_manifest(root, **options), 1)[0])
    assert not (cache / "pixels").exists()
