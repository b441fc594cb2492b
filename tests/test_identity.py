"""Identity is content: purposes follow md5s through deletes, re-adds, moves, renames, touches and copies.

A six-run history on a local folder and on the moto S3 server; after every run the published version is
checked against everything every earlier version said.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import fsspec
import imagehash
import numpy as np
import pandas as pd
import pytest
from fsspec.implementations.local import LocalFileSystem
from PIL import Image

from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions
from tests.conftest import encode, picture
from tests.test_flow import Place

UNIQUENESS = r"(\d+)_\d+\.\w+$"


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "s3":
        fs = request.getfixturevalue("s3")
        return Place("s3://strata-test/src", "s3://strata-test/manifests", fs, "strata-test/src")
    fs = fsspec.filesystem("file")
    (tmp_path / "src").mkdir()
    return Place(str(tmp_path / "src"), str(tmp_path / "manifests"), fs, str(tmp_path / "src"))


class History:
    """Everything the published versions said, and the invariants every new version must keep."""

    def __init__(self, place: Place) -> None:
        self.place = place
        self.purpose: dict[str, str] = {}  # md5 -> purpose, from every version
        self.first: dict[str, int] = {}  # md5 -> the version it first appeared in
        self.devel_hashes: list[int] = []

    def run(self, source: str | None = None, review: bool | None = False) -> pd.DataFrame:
        """Curate, and check the version published; ``review``: the run must ask for a review too (None: it
        may)."""
        options = CurateOptions(uniqueness=UNIQUENESS)
        state = curate_dataset(
            source=source or self.place.source,
            dataset="vials",
            manifest_root=self.place.root,
            options=options,
            return_state=True,
        )
        result = state.result(raise_on_failure=False)
        summary = getattr(result, "summary", result)
        allowed = {"Needs review", "Published"} if review is None else {"Needs review" if review else "Published"}
        assert state.name in allowed, summary.message
        assert summary.published, summary.message
        version = m.open_version(f"{self.place.root}/vials")
        manifest = m.read_table(version).to_pandas()
        self.check(version, manifest)
        return manifest

    def check(self, version: m.Version, manifest: pd.DataFrame) -> None:
        assert version.info["diff"]["purpose_changed"] == 0
        for column in (m.MD5, m.UNIQUE_ID, m.DUPLICATE_GROUP):
            spread = manifest.dropna(subset=[column]).groupby(column)[m.PURPOSE].nunique()
            assert (spread <= 1).all(), f"{column} in two purposes: {spread[spread > 1].index.tolist()}"
        for md5, purpose, first in zip(manifest[m.MD5], manifest[m.PURPOSE], manifest[m.FIRST_VERSION], strict=True):
            assert self.purpose.setdefault(md5, purpose) == purpose, f"content {md5} changed purpose"
            assert self.first.setdefault(md5, int(first)) == int(first), f"content {md5} changed first_version"
        devel = manifest[manifest[m.PURPOSE] == "devel"]
        self.devel_hashes += [int(h) for h in devel[m.PHASH]]
        devel_md5 = {md5 for md5, purpose in self.purpose.items() if purpose == "devel"}
        train = manifest[manifest[m.PURPOSE] == "train"]
        assert not set(train[m.MD5]) & devel_md5, "a devel md5 in train"
        hashes = train[m.PHASH].to_numpy(np.uint64)
        for devel_hash in set(self.devel_hashes):
            close = np.bitwise_count(hashes ^ np.uint64(devel_hash)) <= 4
            assert not close.any(), f"near copy of devel content in train: {train[close][m.KEY].tolist()}"
        # Every assignment is carried: the assignments file knows every md5 any version held.
        known = m.read_assignments(version).to_pandas()
        assert set(self.purpose) <= set(known[m.MD5])
        assert dict(zip(known[m.MD5], known[m.PURPOSE], strict=True)).items() >= self.purpose.items()

    def purpose_of(self, manifest: pd.DataFrame, key: str) -> str:
        return manifest.set_index(m.KEY).at[key, m.PURPOSE]


def _seed(place: Place) -> None:
    seed = 0
    for category, items in {"good": 12, "bad_cap": 6, "missing_cap": 4}.items():
        for _ in range(items):
            for photo in range(2):
                place.put(f"{category}/{seed}_{photo}.png", encode(picture(1000 + seed * 7 + photo), "png"))
            seed += 1


def _touch(place: Place) -> None:
    """New modification times and (locally) new etags; the bytes stay."""
    for path in place.fs.find(place.source_path):
        if isinstance(place.fs, LocalFileSystem):
            os.utime(path, (time.time() + 100, time.time() + 100))
        else:
            place.fs.pipe_file(path, place.fs.cat_file(path))


def test_purposes_follow_content_through_six_runs(place: Place) -> None:
    history = History(place)
    _seed(place)
    v1 = history.run()
    devel = v1[v1[m.PURPOSE] == "devel"].reset_index(drop=True)
    train = v1[v1[m.PURPOSE] == "train"].reset_index(drop=True)
    assert len(devel) >= 6
    data = {key: place.fs.cat_file(f"{place.source_path}/{key}") for key in v1[m.KEY]}

    # Run 2: deletes of devel and train images, and a devel image moved to another class folder.
    gone = [devel.at[0, m.KEY], devel.at[1, m.KEY], train.at[0, m.KEY]]
    for key in gone:
        place.delete(key)
    moved_from = devel.at[2, m.KEY]
    moved_to = "missing_cap/" + moved_from.split("/", 1)[1]
    place.put(moved_to, data[moved_from])
    place.delete(moved_from)
    v2 = history.run()
    assert history.purpose_of(v2, moved_to) == "devel"
    info = m.open_version(f"{place.root}/vials").info
    assert info["diff"]["moved"] == 1 and info["diff"]["removed"] == len(gone)

    # Run 3: the deleted images come back (one under a new name), a devel image is renamed into a train
    # item's id, and every file is touched.
    place.put(gone[0], data[gone[0]])
    place.put("good/700_0.png", data[gone[1]])
    place.put(gone[2], data[gone[2]])
    renamed_from = devel.at[3, m.KEY]
    train_item = train.at[5, m.UNIQUE_ID]
    renamed_to = f"{renamed_from.split('/')[0]}/{train_item}_9.png"
    place.put(renamed_to, data[renamed_from])
    place.delete(renamed_from)
    _touch(place)
    v3 = history.run(review=True)  # the renamed file's link to the train item is reported, not merged
    for key in (gone[0], "good/700_0.png", renamed_to):
        assert history.purpose_of(v3, key) == "devel", key
    assert history.purpose_of(v3, gone[2]) == "train"
    by_key = v3.set_index(m.KEY)
    assert by_key.at["good/700_0.png", m.FIRST_VERSION] == 1
    assert by_key.at[renamed_to, m.UNIQUE_ID] != train_item  # the content keeps its item
    assert (by_key[m.FIRST_VERSION] == 1).all()  # every content of v3 came in v1; the touch reset nothing

    # Run 4: the whole source copied to a new place and curated from there.
    copy = place.source_path + "-copy"
    place.fs.copy(place.source_path, copy, recursive=True)
    copy_source = place.source + "-copy"
    # A local copy gives every file a new etag, so every key is read again and the renamed file's link to the
    # train item is found (and reported) again; a bucket copy keeps etags and carries every row.
    v4 = history.run(copy_source, review=None)
    assert len(v4) == len(v3)

    # Run 5: exact copies of devel images into another class folder, under other item ids.
    copy_place = Place(copy_source, place.root, place.fs, copy)
    copied = {}
    for index in (4, 5):
        key = devel.at[index, m.KEY]
        target = f"{'good' if not key.startswith('good') else 'bad_cap'}/{800 + index}_0.png"
        copy_place.put(target, data[key])
        copied[target] = key
    v5 = history.run(copy_source)
    for target in copied:
        assert history.purpose_of(v5, target) == "devel"

    # Run 6: a JPEG re-encode (quality 70) of a devel image under a new item id.
    original = devel.at[0, m.KEY]
    with Image.open(io.BytesIO(data[original])) as image:
        copy_place.put("good/900_0.jpg", encode(image.convert("RGB"), "jpg", quality=70))
    v6 = history.run(copy_source)
    assert history.purpose_of(v6, "good/900_0.jpg") == "devel"
    assert v6.set_index(m.KEY).at["good/900_0.jpg", m.FIRST_VERSION] == 6


def test_stored_phash_is_imagehash_for_every_row(tmp_path: Path) -> None:
    """What the flow writes, read back from the published Parquet: all 64 bits, never through float."""
    source = tmp_path / "src"
    for i in range(24):
        ext = ("png", "bmp", "jpg", "gif", "webp", "tif")[i % 6]
        path = source / ("good" if i % 2 else "bad") / f"{i}_0.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(picture(i, (96 + i, 80)), ext))
    curate_dataset(source=str(source), dataset="d", manifest_root=str(tmp_path / "m"))
    manifest = m.read_manifest(str(tmp_path / "m" / "d"))
    assert manifest[m.PHASH].dtype == np.uint64
    for path, stored in zip(manifest[m.PATH], manifest[m.PHASH], strict=True):
        with Image.open(path.removeprefix("file://")) as image:
            expected = int(str(imagehash.phash(image)), 16)
        assert int(stored) == expected, path
    assert (manifest[m.PHASH].to_numpy() & np.uint64(0x7FF)).any()  # the low bits are really there


def _make_legacy(version_dir: Path, flip: str | None = None) -> None:
    """Turn a committed version into one written before assignments: phashes through float64 (their low bits
    lost), no assignments file, manifest.json without the fields; ``flip`` moves that key's purpose (what the
    key-based carry-over of those versions did to touched files)."""
    import hashlib
    import json

    manifest = m.read_table(m.open_version(str(version_dir))).to_pandas()
    manifest[m.PHASH] = manifest[m.PHASH].astype("float64").astype("uint64")
    if flip is not None:
        row = manifest.index[manifest[m.KEY] == flip][0]
        manifest.loc[row, m.PURPOSE] = "devel" if manifest.loc[row, m.PURPOSE] == "train" else "train"
    table = m.to_table(manifest)
    data = m.parquet_bytes(table)
    (version_dir / m.MANIFEST_FILE).write_bytes(data)
    (version_dir / m.ASSIGNMENTS_FILE).unlink()
    info = json.loads((version_dir / m.COMMIT_FILE).read_text())
    for name in ("assignments_sha256", "assignments_rows", "phash_exact", "review"):
        info.pop(name)
    info.update(sha256=hashlib.sha256(data).hexdigest(), counts=m.counts_of(table))
    (version_dir / m.COMMIT_FILE).write_text(json.dumps(info))


def test_versions_from_before_assignments_are_rehashed_once_and_their_history_rebuilt(tmp_path: Path) -> None:
    place = Place(str(tmp_path / "src"), str(tmp_path / "m"), fsspec.filesystem("file"), str(tmp_path / "src"))
    (tmp_path / "src").mkdir()
    _seed(place)
    options = CurateOptions(uniqueness=UNIQUENESS)
    curate_dataset(source=place.source, dataset="vials", manifest_root=place.root, options=options)
    v1 = m.read_manifest(f"{place.root}/vials", 1)
    devel = v1[v1[m.PURPOSE] == "devel"].reset_index(drop=True)
    gone_key, gone_md5 = devel.at[0, m.KEY], devel.at[0, m.MD5]
    gone_bytes = Path(place.source_path, gone_key).read_bytes()
    place.delete(gone_key)
    curate_dataset(source=place.source, dataset="vials", manifest_root=place.root, options=options)
    flipped = v1[v1[m.PURPOSE] == "train"][m.KEY].iloc[0]
    _make_legacy(tmp_path / "m" / "vials" / "v000001")
    _make_legacy(tmp_path / "m" / "vials" / "v000002", flip=flipped)
    v2 = m.read_manifest(f"{place.root}/vials", 2)
    assert (v2[m.PHASH].to_numpy() & np.uint64(0x7FF) == 0).all()  # what float64 did to them

    place.put("good/777_0.png", gone_bytes)  # deleted content back under another name
    state = curate_dataset(
        source=place.source, dataset="vials", manifest_root=place.root, options=options, return_state=True
    )
    assert state.name == "Needs review"  # what the old versions let move is listed for a person
    summary = state.result(raise_on_failure=False).summary
    assert summary.published and summary.version == 3 and "purpose moves in versions before" in summary.message
    version = m.open_version(f"{place.root}/vials")
    v3 = m.read_table(version).to_pandas()
    assert version.info["phash_exact"] is True and version.info["diff"]["purpose_changed"] == 0
    by_key = v3.set_index(m.KEY)
    assert by_key.at["good/777_0.png", m.PURPOSE] == "devel"  # known from version 1, deleted in version 2
    assert by_key.at["good/777_0.png", m.FIRST_VERSION] == 1
    assert by_key.at[flipped, m.PURPOSE] == v2.set_index(m.KEY).at[flipped, m.PURPOSE]  # the parent's stands
    for path, stored in zip(v3[m.PATH], v3[m.PHASH], strict=True):  # re-read and re-hashed, every object
        with Image.open(path.removeprefix("file://")) as image:
            assert int(stored) == int(str(imagehash.phash(image)), 16), path
    known = m.read_assignments(version).to_pandas().set_index(m.MD5)
    assert known.at[gone_md5, m.PURPOSE] == "devel" and len(known) == v1[m.MD5].nunique()
    # Once migrated, the next run carries every row again.
    again = curate_dataset(source=place.source, dataset="vials", manifest_root=place.root, options=options)
    assert not again.published
