"""Every format and mode inspection accepts, curated by the real flow and read back by the loader: the pixels
are Pillow's (``convert("RGB")``/``convert("L")``, 16-bit samples scaled to 0..255), at native size and resized;
16-bit pictures keep distinct hashes; bytes that match their md5 but do not decode name their path."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image

import loader
from flows.curate import curate_dataset
from loader import manifest as m
from tests.conftest import encode, picture
from tests.test_loader import publish

SIZE = (41, 30)  # (width, height); an odd width gives BMP rows their padding
JPEG_TOLERANCE = 1  # levels: libjpeg-turbo's accurate IDCT in TensorFlow and in Pillow


def _pic(seed: int, mode: str = "RGB") -> Image.Image:
    return picture(100 + seed, SIZE, mode)


def _alpha(seed: int) -> Image.Image:
    pixels = np.asarray(_pic(seed).convert("RGBA")).copy()
    pixels[..., 3] = np.arange(SIZE[0], dtype=np.uint8)[None, :] * 6  # a gradient: alpha must be dropped
    return Image.fromarray(pixels, "RGBA")


def _sixteen(seed: int) -> np.ndarray:
    """A smooth full-range 16-bit grey picture (0..65535), distinct per seed."""
    grey = np.asarray(_pic(seed, "L"), dtype=np.float64)
    return np.round((grey - grey.min()) / (grey.max() - grey.min()) * 65535).astype(np.uint16)


def _big_endian(seed: int) -> bytes:
    return _sixteen(seed).astype(">u2").tobytes()


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _frames(fmt: str, mode: str, **options: object) -> bytes:
    first, *rest = [_pic(seed, mode) for seed in (40, 41, 42)]
    return _save(first, fmt, save_all=True, append_images=rest, **options)


def _rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": ignored by policy, in inspection and loading alike
    return encode(_pic(12), "jpg", exif=exif.tobytes())


# id -> (file extension, bytes). Each a different picture: no two are near duplicates.
CORPUS: dict[str, tuple[str, Callable[[], bytes]]] = {
    "bmp-grey8": ("bmp", lambda: encode(_pic(0, "L"), "bmp")),
    "bmp-palette": ("bmp", lambda: encode(_pic(1, "P"), "bmp")),
    "bmp-24bit": ("bmp", lambda: encode(_pic(2), "bmp")),
    "bmp-32bit": ("bmp", lambda: encode(_pic(3, "RGBA"), "bmp")),
    "bmp-1bit": ("bmp", lambda: encode(_pic(26, "1"), "bmp")),
    "png-1bit": ("png", lambda: encode(_pic(4, "1"), "png")),
    "png-grey8": ("png", lambda: encode(_pic(5, "L"), "png")),
    "png-grey16": ("png", lambda: encode(Image.fromarray(_sixteen(6)), "png")),
    "png-grey-alpha": ("png", lambda: encode(_pic(7, "LA"), "png")),
    "png-rgb": ("png", lambda: encode(_pic(8), "png")),
    "png-rgba": ("png", lambda: encode(_alpha(9), "png")),
    "png-palette": ("png", lambda: encode(_pic(10, "P"), "png")),
    "png-palette-transparent": ("png", lambda: encode(_pic(11, "P"), "png", transparency=0)),
    "png-palette-4bit": ("png", lambda: encode(_pic(27).quantize(16), "png", bits=4)),
    "jpeg-baseline": ("jpg", lambda: encode(_pic(13), "jpg", quality=90)),
    "jpeg-progressive": ("jpg", lambda: encode(_pic(14), "jpg", progressive=True)),
    "jpeg-444": ("jpg", lambda: encode(_pic(28), "jpg", subsampling=0)),
    "jpeg-grey": ("jpg", lambda: encode(_pic(15, "L"), "jpg")),
    "jpeg-cmyk": ("jpg", lambda: encode(_pic(16, "CMYK"), "jpg")),
    "jpeg-exif-rotated": ("jpg", _rotated_jpeg),
    "gif": ("gif", lambda: encode(_pic(17, "P"), "gif")),
    "gif-animated": ("gif", lambda: _frames("GIF", "P")),
    "gif-transparent": ("gif", lambda: encode(_pic(29, "P"), "gif", transparency=0)),
    "webp-lossy": ("webp", lambda: encode(_pic(18), "webp")),
    "webp-lossless": ("webp", lambda: encode(_pic(19), "webp", lossless=True)),
    "webp-alpha": ("webp", lambda: encode(_alpha(20), "webp", lossless=True)),
    "webp-lossy-alpha": ("webp", lambda: encode(_alpha(31), "webp")),
    "webp-animated": ("webp", lambda: _frames("WEBP", "RGB")),
    "tiff-rgb": ("tif", lambda: encode(_pic(21), "tif")),
    "tiff-grey8": ("tif", lambda: encode(_pic(22, "L"), "tif")),
    "tiff-grey16": ("tif", lambda: encode(Image.fromarray(_sixteen(23)), "tif")),
    "tiff-grey16-big-endian": ("tif", lambda: encode(Image.frombytes("I;16B", SIZE, _big_endian(32)), "tif")),
    "tiff-palette": ("tif", lambda: encode(_pic(33, "P"), "tif")),
    "tiff-lzw": ("tif", lambda: encode(_pic(24), "tif", compression="tiff_lzw")),
    "tiff-cmyk": ("tif", lambda: encode(_pic(25, "CMYK"), "tif")),
    "tiff-multipage": ("tif", lambda: _frames("TIFF", "RGB")),
}
# The same 16-bit data as PNG and TIFF, and six distinct full-range 16-bit pictures.
SAME_DATA = {"png": encode(Image.fromarray(_sixteen(30)), "png"), "tif": encode(Image.fromarray(_sixteen(30)), "tif")}
DISTINCT16 = {  # 8-bit pictures scaled to 16 bits (v * 257), as 16-bit exports of them are
    f"sixteen/{seed}.png": encode(Image.fromarray(np.asarray(_pic(50 + seed, "L"), np.uint16) * 257), "png")
    for seed in range(6)
}


def key_of(case: str) -> str:
    return f"{case.split('-')[0]}/{case}.{CORPUS[case][0]}"


def reference(data: bytes, channels: int) -> np.ndarray:
    """Pillow's pixels as uint8 [H, W, C]: convert("RGB"/"L") of frame 0; 16-bit grey scaled by 255/65535."""
    with Image.open(io.BytesIO(data)) as image:
        if image.mode.startswith("I;16"):
            grey = np.floor(np.asarray(image, dtype=np.float64) * 255 / 65535 + 0.5).astype(np.uint8)[..., None]
            return grey if channels == 1 else np.repeat(grey, 3, axis=-1)
        pixels = np.asarray(image.convert("RGB" if channels == 3 else "L"))
    return pixels if channels == 3 else pixels[..., None]


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    """The corpus curated by the real flow into a local manifest root: (dataset root, bytes by key)."""
    base = tmp_path_factory.mktemp("formats")
    files = {key_of(case): build() for case, (_, build) in CORPUS.items()}
    files.update({f"same/data.{ext}": data for ext, data in SAME_DATA.items()}, **DISTINCT16)
    for key, data in files.items():
        (base / "src" / key).parent.mkdir(parents=True, exist_ok=True)
        (base / "src" / key).write_bytes(data)
    curate_dataset(source=str(base / "src"), dataset="formats", manifest_root=str(base / "manifests"))
    return str(base / "manifests" / "formats"), files


@pytest.fixture(scope="module")
def batches(curated: tuple[str, dict[str, bytes]]) -> Callable[..., dict[str, np.ndarray]]:
    """The loader's pixels by key, for one (color_mode, image_size, sample_bits); each pipeline built once."""
    root, _ = curated
    keys = loader.read_manifest(root)[m.KEY].tolist()
    made: dict[tuple, dict[str, np.ndarray]] = {}

    def get(color_mode: str, image_size: tuple[int, int] | None = None, sample_bits: int = 16) -> dict[str, np.ndarray]:
        if (color_mode, image_size, sample_bits) not in made:
            ds = loader.from_manifest(
                root, purpose=None, stratify_by=None, shuffle=False, batch_size=len(keys), label_mode=None,
                image_size=image_size, color_mode=color_mode, sample_bits=sample_bits,
            )  # fmt: skip
            (images,) = list(ds)
            made[color_mode, image_size, sample_bits] = dict(zip(keys, images.numpy(), strict=True))
        return made[color_mode, image_size, sample_bits]

    return get


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
@pytest.mark.parametrize("case", list(CORPUS))
def test_pixels_equal_pillows_at_native_size(case: str, color_mode: str, curated, batches) -> None:
    _, files = curated
    key = key_of(case)
    expected = reference(files[key], 3 if color_mode == "rgb" else 1).astype(np.float32)
    pixels = batches(color_mode)[key]
    assert pixels.shape == expected.shape == (SIZE[1], SIZE[0], expected.shape[-1])
    difference = np.abs(pixels - expected)
    if case.startswith("jpeg"):
        assert difference.max() <= JPEG_TOLERANCE and difference.mean() <= 0.05, difference.max()
    else:
        assert difference.max() == 0, f"{int((difference > 0).sum())} values differ, by up to {difference.max()}"


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
@pytest.mark.parametrize("case", list(CORPUS))
def test_pixels_resized_to_64_equal_pillows_resized(case: str, color_mode: str, curated, batches) -> None:
    """At 64x64 (an enlargement: bilinear, no antialiasing) the loader's pixels are Pillow's resized alike."""
    _, files = curated
    key = key_of(case)
    expected = tf.image.resize(reference(files[key], 3 if color_mode == "rgb" else 1).astype(np.float32), (64, 64))
    difference = np.abs(batches(color_mode, (64, 64))[key] - expected.numpy())
    assert difference.max() <= (JPEG_TOLERANCE if case.startswith("jpeg") else 1e-3), difference.max()


def test_manifest_geometry_is_what_the_loader_yields_exif_ignored(curated) -> None:
    """Inspection's width, height and channels are the decoded first frame's, EXIF orientation ignored."""
    root, _ = curated
    frame = loader.read_manifest(root).set_index(m.KEY)
    assert set(key_of(case) for case in CORPUS) <= set(frame.index)  # every one accepted, none rejected
    assert (frame[m.WIDTH] == SIZE[0]).all() and (frame[m.HEIGHT] == SIZE[1]).all()
    rotated = frame.loc[key_of("jpeg-exif-rotated")]
    assert (rotated[m.WIDTH], rotated[m.HEIGHT]) == SIZE
    assert frame.loc[key_of("png-grey16"), m.CHANNELS] == 1


def test_16bit_png_and_tiff_of_the_same_data_give_the_same_pixels(curated, batches) -> None:
    root, _ = curated
    for color_mode in ("rgb", "grayscale"):
        pixels = batches(color_mode)
        np.testing.assert_array_equal(pixels["same/data.png"], pixels["same/data.tif"])
        scaled = np.floor(_sixteen(30).astype(np.float64) * 255 / 65535 + 0.5)
        np.testing.assert_array_equal(pixels["same/data.png"][..., 0], scaled)
    frame = loader.read_manifest(root).set_index(m.KEY)
    assert frame.loc["same/data.png", m.PHASH] == frame.loc["same/data.tif", m.PHASH]


def test_distinct_16bit_pictures_get_distinct_hashes_and_no_duplicate_group(curated) -> None:
    """Hashed on the scaled samples, not on Pillow's L (which clips them to 255): the published Parquet."""
    root, _ = curated
    frame = loader.read_manifest(root).set_index(m.KEY).loc[list(DISTINCT16)]
    hashes = frame[m.PHASH].tolist()
    assert len(set(hashes)) == 6
    assert min(bin(a ^ b).count("1") for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > 4
    assert frame[m.DUPLICATE_GROUP].isna().all()


def test_12bit_samples_in_16bit_files_scale_by_sample_bits(tmp_path: Path) -> None:
    values = (np.arange(SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0]) * 4).clip(0, 4095).astype(np.uint16)
    samples = [(f"a/{i}.{ext}", encode(Image.fromarray(values), ext), "train") for i, ext in enumerate(("png", "tif"))]
    root = publish(str(tmp_path), samples)
    for bits, top in ((16, 65535), (12, 4095)):
        ds = loader.from_manifest(root, stratify_by=None, shuffle=False, image_size=None, sample_bits=bits)
        images = next(iter(ds))[0].numpy()
        expected = np.floor(values.astype(np.float64) * 255 / top + 0.5)
        for image in images:
            np.testing.assert_array_equal(image[..., 1], expected)
    assert images.max() == 255


def _swap_bytes(root: str, key: str, data: bytes) -> str:
    """Replace one image of a published version by ``data``, its md5 and size recorded as if curated so."""
    version = Path(root) / "v000001"
    frame = pd.read_parquet(version / m.MANIFEST_FILE)
    row = frame.index[frame[m.KEY] == key][0]
    Path(frame.loc[row, m.PATH].removeprefix("file://")).write_bytes(data)  # publish() writes plain file URLs
    frame.loc[row, [m.MD5, m.ETAG, m.SIZE]] = [hashlib.md5(data).hexdigest(), hashlib.md5(data).hexdigest(), len(data)]
    parquet = m.parquet_bytes(m.to_table(frame))
    (version / m.MANIFEST_FILE).write_bytes(parquet)
    record = json.loads((version / m.COMMIT_FILE).read_text())
    (version / m.COMMIT_FILE).write_text(json.dumps({**record, "sha256": hashlib.sha256(parquet).hexdigest()}))
    return frame.loc[row, m.PATH]


@pytest.mark.parametrize("fmt", ["png", "jpeg", "bmp", "tiff"])
def test_bytes_that_match_their_md5_but_do_not_decode_name_their_path(tmp_path: Path, fmt: str) -> None:
    ext = {"jpeg": "jpg", "tiff": "tif"}.get(fmt, fmt)
    samples = [(f"a/{i}.{ext}", encode(_pic(i), ext), "train") for i in range(4)]
    root = publish(str(tmp_path), samples)
    uri = _swap_bytes(root, f"a/2.{ext}", b"this is not an image, whatever its name says" * 4)
    with pytest.raises(tf.errors.OpError, match=rf"a/2\.{ext} matches its md5 but does not decode as {fmt}"):
        list(loader.from_manifest(root, stratify_by=None, image_size=None))
    ds = loader.from_manifest(root, stratify_by=None, shuffle=False, image_size=None, on_error="skip")
    assert sum(len(x) for x, _ in ds) == 3
    assert ds.skipped.count == 1 and uri in ds.skipped.paths


def test_inspection_rejects_samples_without_a_mapping() -> None:
    """32-bit integer and float TIFFs have no defined 0..255 mapping, and Pillow cannot convert CIELab to L:
    rejected at curation, not failing at training."""
    from tasks.inspect import Rejected, inspect_bytes

    images = [
        Image.fromarray((np.arange(1200, dtype=np.int32) * 100_000).reshape(30, 40)),
        Image.fromarray(np.linspace(0, 1, 1200, dtype=np.float32).reshape(30, 40)),
        Image.new("LAB", (40, 30), (50, 10, 20)),
    ]
    for image in images:
        result = inspect_bytes(encode(image, "tif"))
        assert isinstance(result, Rejected) and result.reason == "unsupported_format", (image.mode, result)


def test_grayscale_of_every_colour_is_pillows() -> None:
    """The in-graph L (float32 arithmetic) equals Pillow's integer L for all 2**24 colours."""
    from loader.images import _luma

    every = np.stack(np.meshgrid(*[np.arange(256, dtype=np.uint8)] * 3, indexing="ij"), -1).reshape(4096, 4096, 3)
    expected = np.asarray(Image.fromarray(every, "RGB").convert("L"))
    np.testing.assert_array_equal(_luma(tf.constant(every)).numpy()[..., 0], expected)


@pytest.mark.parametrize("color_mode", ["rgb", "grayscale"])
def test_a_manifest_of_jpegs_only_decodes_like_pillow_on_the_branchless_graph(tmp_path: Path, color_mode: str) -> None:
    """All JPEGs of one size take the graph without routes (decode_pixels' ``uniform``): grey and CMYK too."""
    from loader.images import jpeg_scales, uniform_jpeg

    cases = ["jpeg-baseline", "jpeg-progressive", "jpeg-grey", "jpeg-cmyk"]
    samples = [(key_of(case), CORPUS[case][1](), "train") for case in cases]
    root = publish(str(tmp_path), samples)
    frame = loader.read_manifest(root)
    widths, heights = frame[m.WIDTH].to_numpy(), frame[m.HEIGHT].to_numpy()
    scales = jpeg_scales(widths, heights, None, None, False)
    assert uniform_jpeg(frame[m.FORMAT].to_numpy(), scales, widths, heights, None, None) is not None
    ds = loader.from_manifest(root, stratify_by=None, shuffle=False, image_size=None, color_mode=color_mode)
    images = next(iter(ds))[0].numpy()
    for (key, data, _), pixels in zip(samples, images, strict=True):
        expected = reference(data, 3 if color_mode == "rgb" else 1)
        assert np.abs(pixels - expected).max() <= JPEG_TOLERANCE, key


def test_sample_bits_is_checked(tmp_path: Path) -> None:
    from strata.errors import ConfigError

    root = publish(str(tmp_path), [("a/0.png", encode(_pic(0), "png"), "train")])
    for wrong in (8, 17, "12"):
        with pytest.raises(ConfigError, match="sample_bits must be an integer from 9 to 16"):
            loader.from_manifest(root, sample_bits=wrong)
