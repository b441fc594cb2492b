"""The bad-input corpus through the real flow, on a local folder and on the moto S3 server: every object
ends up accepted with the right geometry or rejected with the right reason, and the flow never crashes on
content. Clear errors for a source with no images and a missing source."""

from __future__ import annotations

import io
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image

from flows.curate import curate_dataset
from loader import manifest as m
from strata.errors import SourceError
from strata.storage import uri_path
from tests.conftest import encode, picture, png_claiming


def _animated_gif() -> bytes:
    frames = [picture(seed, (40, 30)).convert("P") for seed in (3, 4, 5)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    buffer = io.BytesIO()
    picture(6, (64, 48)).save(buffer, "JPEG", exif=exif)
    return buffer.getvalue()


def _png16() -> bytes:
    pixels = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")  # uint16 -> mode I;16
    return buffer.getvalue()


GOOD = picture(7, (50, 40))
# key: (bytes, expected reason or (width, height, channels) when accepted)
CORPUS: dict[str, tuple[bytes, str | tuple[int, int, int]]] = {
    "good/zero.png": (b"", "empty"),
    "good/truncated.jpg": (encode(picture(8, (200, 160)), "jpg")[:900], "truncated"),
    "good/truncated.png": (encode(picture(9, (200, 160)), "png")[:700], "truncated"),
    "good/notes.png": (b"this is a text file, not a PNG\n", "unreadable"),
    "good/bomb.png": (png_claiming(100_000, 100_000), "too_large"),
    "good/animated.gif": (_animated_gif(), (40, 30, 3)),
    "good/deep16.png": (_png16(), (40, 30, 1)),
    "good/cmyk.jpg": (encode(GOOD.convert("CMYK"), "jpg"), (50, 40, 3)),  # decoded as RGB
    "good/exif-rotated.jpg": (_exif_rotated_jpeg(), (64, 48, 3)),  # geometry as stored, like every decoder
    "good/with space 1.png": (encode(picture(10), "png"), (96, 80, 3)),
    "good/ünïcødé_2.png": (encode(picture(11), "png"), (96, 80, 3)),
    "good/odd#?%&+=_3.png": (encode(picture(12), "png"), (96, 80, 3)),
    "good/UPPER.PNG": (encode(picture(13), "png"), (96, 80, 3)),
    "good/Mixed.JpEg": (encode(picture(14), "jpg"), (96, 80, 3)),
    "bad_cap/2023/01/nested.bmp": (encode(picture(15), "bmp"), (96, 80, 3)),
}


def _place(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[fsspec.AbstractFileSystem, str, str]:
    if kind == "s3":
        fs = request.getfixturevalue("s3")
        return fs, "strata-test/corpus", "s3://strata-test/corpus"
    fs = fsspec.filesystem("file")
    return fs, str(tmp_path / "corpus"), str(tmp_path / "corpus")


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_every_object_is_accepted_correctly_or_rejected_with_its_reason(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    fs, path, source = _place(kind, tmp_path, request)
    for key, (data, _) in CORPUS.items():
        fs.makedirs(f"{path}/{key}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{path}/{key}", data)
    fs.pipe_file(f"{path}/good/README.txt", b"not an image, skipped and counted")
    if kind == "local":
        (tmp_path / "corpus" / "missing_cap").mkdir()  # an empty class folder
    summary = curate_dataset(source=source, dataset="corpus", manifest_root=str(tmp_path / "manifests"))
    assert summary.published
    version = m.open_version(str(tmp_path / "manifests" / "corpus"))
    accepted = m.read_table(version).to_pandas().set_index(m.KEY)
    rejects = m.read_rejects(version).to_pandas().set_index(m.KEY)
    assert len(accepted) + len(rejects) == len(CORPUS)
    for key, (_, expected) in CORPUS.items():
        if isinstance(expected, str):
            assert rejects.loc[key, m.REASON] == expected, (key, rejects.loc[key].to_dict())
        else:
            row = accepted.loc[key]
            assert (row[m.WIDTH], row[m.HEIGHT], row[m.CHANNELS]) == expected, key
            assert fs.cat_file(uri_path(fs, row[m.PATH])) == CORPUS[key][0]  # the (encoded) URI leads to the bytes
    assert accepted.loc["bad_cap/2023/01/nested.bmp", m.CATEGORY] == "bad_cap"
    assert accepted.loc["bad_cap/2023/01/nested.bmp", m.FOLDER] == "bad_cap/2023/01"
    assert set(accepted[m.FORMAT]) <= set(m.FORMATS)


def test_sources_without_images_or_missing_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "texts" / "good").mkdir(parents=True)
    (tmp_path / "texts" / "good" / "notes.txt").write_text("no images here")
    with pytest.raises(SourceError, match=r"no images found under .*texts \(skipped: 1 "):
        curate_dataset(source=str(tmp_path / "texts"), dataset="d", manifest_root=str(tmp_path / "m"))
    with pytest.raises(SourceError, match=r"does not exist"):
        curate_dataset(source=str(tmp_path / "nowhere"), dataset="d", manifest_root=str(tmp_path / "m"))
    assert (
        not (tmp_path / "m" / "d").exists()
        or m.version_numbers(fsspec.filesystem("file"), str(tmp_path / "m" / "d")) == []
    )
