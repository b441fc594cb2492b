"""The curation flow on the real Prefect engine, against local folders and a moto S3 server over HTTP."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import fsspec
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions
from strata.errors import CommitConflict, ManifestError, SourceError
from strata.storage import open_url
from tasks.publish import Store, claim_version, write_version
from tests.conftest import encode, picture

UNIQUENESS = r"(\d+)_\d+\.\w+$"


@dataclass
class Place:
    """A source folder and a manifest root on one storage backend."""

    source: str
    root: str
    fs: fsspec.AbstractFileSystem
    source_path: str

    def put(self, key: str, data: bytes) -> None:
        path = f"{self.source_path}/{key}"
        self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(path, data)

    def delete(self, key: str) -> None:
        self.fs.rm_file(f"{self.source_path}/{key}")


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    if request.param == "s3":
        fs = request.getfixturevalue("s3")
        return Place("s3://strata-test/src", "s3://strata-test/manifests", fs, "strata-test/src")
    fs = fsspec.filesystem("file")
    (tmp_path / "src").mkdir()
    return Place(str(tmp_path / "src"), str(tmp_path / "manifests"), fs, str(tmp_path / "src"))


def seed_source(place: Place) -> None:
    """Three imbalanced classes, several photos per item, an exact and a near duplicate, broken files."""
    seed = 0
    for category, items in {"good": 10, "bad_cap": 5, "missing_cap": 3}.items():
        for _ in range(items):
            for photo in range(2):
                place.put(f"{category}/{seed}_{photo}.png", encode(picture(1000 + seed * 7 + photo), "png"))
            seed += 1
    place.put("good/900_0.png", encode(picture(1000), "png"))  # exact duplicate of good/0_0.png
    place.put("bad_cap/901_0.jpg", encode(picture(1000 + 12 * 7), "jpg", quality=50))  # near dup of bad_cap/12_0
    place.put("good/902_0.jpg", encode(picture(5), "jpg")[:300])  # truncated
    place.put("good/903_0.png", b"")  # empty
    place.put("good/README.txt", b"not an image")


def run(place: Place, **options: object) -> object:
    opts = CurateOptions(uniqueness=UNIQUENESS, **options)  # type: ignore[arg-type]
    return curate_dataset(source=place.source, dataset="vials", manifest_root=place.root, options=opts)


def committed(place: Place, version: int | str = "latest") -> tuple[m.Version, pd.DataFrame, pd.DataFrame]:
    v = m.open_version(f"{place.root}/vials", version)
    return v, m.read_table(v).to_pandas(), m.read_rejects(v).to_pandas()


def test_first_run_publishes_a_valid_version(place: Place) -> None:
    seed_source(place)
    summary = run(place)
    assert summary.published and summary.version == 1
    version, manifest, rejects = committed(place)

    # Schema carried exactly, checksum recorded, counts consistent.
    raw = version.fs.cat_file(version.file(m.MANIFEST_FILE))
    assert pq.read_schema(io.BytesIO(raw)).equals(m.MANIFEST_SCHEMA, check_metadata=True)
    assert hashlib.sha256(raw).hexdigest() == version.info["sha256"]
    assert version.info["rows"] == len(manifest) == 38
    assert version.info["validation"]["success"] is True
    assert version.info["parameters"]["uniqueness"] == UNIQUENESS
    assert set(rejects[m.REASON]) == {"truncated", "empty"}
    assert manifest[m.PATH].str.startswith("s3://" if place.root.startswith("s3") else "file:///").all()
    assert (manifest[m.FIRST_VERSION] == 1).all()

    # Duplicates: exact and near pairs grouped; no group, item or content in two purposes.
    by_key = manifest.set_index(m.KEY)
    assert by_key.at["good/900_0.png", m.DUPLICATE_GROUP] == by_key.at["good/0_0.png", m.DUPLICATE_GROUP]
    assert by_key.at["bad_cap/901_0.jpg", m.DUPLICATE_GROUP] == by_key.at["bad_cap/12_0.png", m.DUPLICATE_GROUP]
    for column in (m.MD5, m.UNIQUE_ID, m.DUPLICATE_GROUP):
        assert manifest.dropna(subset=[column]).groupby(column)[m.PURPOSE].nunique().max() == 1
    assert set(manifest[m.PURPOSE]) == {"train", "devel"}

    # LATEST hint, and a re-run on an unchanged source publishes nothing.
    latest = json.loads(version.fs.cat_file(f"{version.dataset_path}/{m.LATEST_FILE}"))
    assert latest == {"version": 1, "sha256": version.info["sha256"]}
    again = run(place)
    assert not again.published and "no change" in again.message
    assert m.committed_versions(version.fs, version.dataset_path) == [1]


def test_same_inputs_same_manifest_other_seed_other_split(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    for i in range(40):
        write_image(f"{['good', 'bad'][i % 2]}/{i}_0.png", seed=i)
    source = str(tmp_path / "src")
    digests, splits = [], []
    for root, seed in (("a", 0), ("b", 0), ("c", 1)):
        curate_dataset(source=source, dataset="d", manifest_root=str(tmp_path / root), options=CurateOptions(seed=seed))
        version = m.open_version(str(tmp_path / root / "d"))
        digests.append(version.info["sha256"])
        splits.append(m.read_table(version).to_pandas().set_index(m.KEY)[m.PURPOSE])
    assert digests[0] == digests[1]
    assert not splits[0].equals(splits[2])


def test_incremental_runs_keep_purposes(place: Place) -> None:
    seed_source(place)
    run(place)
    _, v1, _ = committed(place, 1)

    # Run 2: add a new item and a new photo of an existing item.
    place.put("good/50_0.png", encode(picture(5000), "png"))
    devel_item = v1[(v1[m.PURPOSE] == "devel")].iloc[0]
    item = devel_item[m.UNIQUE_ID]
    place.put(f"{devel_item[m.CATEGORY]}/{item}_9.png", encode(picture(6000), "png"))
    s2 = run(place)
    assert s2.version == 2 and s2.diff["added"] == 2 and s2.diff["removed"] == 0
    v, v2, _ = committed(place, 2)
    assert v.info["parent_version"] == 1
    assert v2.set_index(m.KEY).at[f"{devel_item[m.CATEGORY]}/{item}_9.png", m.PURPOSE] == "devel"
    assert v2.set_index(m.KEY).at["good/50_0.png", m.FIRST_VERSION] == 2

    # Run 3: remove a file.
    place.delete("missing_cap/17_1.png")
    s3_ = run(place)
    assert s3_.version == 3 and s3_.diff["removed"] == 1 and s3_.diff["added"] == 0

    # Run 4: change a file's content under the same key.
    place.put("good/3_1.png", encode(picture(7000), "png"))
    s4 = run(place)
    assert s4.version == 4 and s4.diff["changed"] >= 1
    _, v4, _ = committed(place, 4)

    # Every key present in v1 and v4 with the same content kept its purpose; nothing moved.
    both = v1.merge(v4, on=[m.KEY, m.MD5], suffixes=("_1", "_4"))
    assert len(both) == len(v1) - 2
    assert (both[m.PURPOSE + "_1"] == both[m.PURPOSE + "_4"]).all()
    assert (both[m.FIRST_VERSION + "_4"] == 1).all()
    for column in (m.MD5, m.UNIQUE_ID, m.DUPLICATE_GROUP):
        assert v4.dropna(subset=[column]).groupby(column)[m.PURPOSE].nunique().max() == 1


def test_unchanged_objects_are_not_read_again(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    for i in range(6):
        write_image(f"good/{i}_0.png", seed=i)
    source, root = str(tmp_path / "src"), str(tmp_path / "manifests")
    curate_dataset(source=source, dataset="d", manifest_root=root)
    # Corrupt a file's bytes without changing its listing (same size, mtime restored): it must be carried over.
    path = tmp_path / "src" / "good" / "0_0.png"
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)
    import os

    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    write_image("good/9_0.png", seed=99)
    summary = curate_dataset(source=source, dataset="d", manifest_root=root)
    assert summary.version == 2 and summary.rejects == {}


def test_commit_protocol_one_writer_wins_nothing_overwritten(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    for i in range(4):
        write_image(f"good/{i}_0.png", seed=i)
    root = str(tmp_path / "manifests")
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=root)
    fs, path = open_url(root)
    store = Store(fs, f"{path}/d")
    before = fs.cat_file(f"{path}/d/v000001/manifest.parquet")

    assert claim_version(store, 1, "run-a") == 2
    with pytest.raises(CommitConflict, match="version 2 is being written by run run-a"):
        claim_version(store, 1, "run-b", wait_s=0)
    # Readers ignore the claimed, uncommitted directory.
    assert m.latest_version(fs, store.dataset_path) == 1
    with pytest.raises(ManifestError, match="not committed"):
        m.open_version(f"{root}/d", 2)

    # A run meeting a live claim waits for its commit, then re-plans on it (rather than failing at once).
    record = {"sha256": "x", "schema_version": m.SCHEMA_VERSION}
    commit = threading.Timer(1.0, write_version, (store, 2, 1, b"parquet-a", b"rejects-a", {"success": True}, record))
    commit.start()
    with pytest.raises(CommitConflict, match="version 2 was committed by run run-a"):
        claim_version(store, 1, "run-b", wait_s=60)
    commit.join()
    with pytest.raises(CommitConflict, match="version 2 was committed while this run planned on version 1"):
        claim_version(store, 1, "run-b")
    with pytest.raises(FileExistsError):  # a second writer of a committed version cannot touch its files
        write_version(store, 2, 1, b"parquet-b", b"rejects-b", {"success": True}, record)
    with pytest.raises(FileExistsError):
        write_version(store, 1, None, b"parquet-b", b"rejects-b", {"success": True}, record)
    assert fs.cat_file(f"{path}/d/v000002/manifest.parquet") == b"parquet-a"
    assert fs.cat_file(f"{path}/d/v000001/manifest.parquet") == before

    # A gone claimant's uncommitted version is taken over (debris deleted), a live one's is not.
    assert claim_version(store, 2, "run-c") == 3
    fs.pipe_file(f"{path}/d/v000003/manifest.parquet", b"half-written")
    with pytest.raises(CommitConflict, match="being written by run run-c"):
        claim_version(store, 2, "run-d", wait_s=0)
    assert claim_version(store, 2, "run-d", stale_after_s=0) == 3
    assert not fs.exists(f"{path}/d/v000003/manifest.parquet")
    assert json.loads(fs.cat_file(f"{path}/d/v000003/_claim.json"))["run_id"] == "run-d"
    assert claim_version(store, 2, "run-d") == 3  # a retried publish of the same run takes its own claim back


def test_tampered_version_is_refused(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    for i in range(3):
        write_image(f"good/{i}_0.png", seed=i)
    root = tmp_path / "manifests"
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root))
    parquet = root / "d" / "v000001" / "manifest.parquet"
    table = pq.read_table(parquet).to_pandas()
    table.loc[0, m.PURPOSE] = "train" if table.loc[0, m.PURPOSE] == "devel" else "devel"
    parquet.write_bytes(m.parquet_bytes(m.to_table(table)))
    from strata.errors import IntegrityError

    with pytest.raises(IntegrityError, match="v000001/manifest.parquet does not match its manifest.json"):
        m.read_manifest(str(root / "d"))


def test_missing_and_empty_sources_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="does not exist"):
        curate_dataset(source=str(tmp_path / "nowhere"), dataset="d", manifest_root=str(tmp_path / "m"))
    (tmp_path / "empty" / "good").mkdir(parents=True)
    (tmp_path / "empty" / "good" / "notes.txt").write_text("x")
    with pytest.raises(SourceError, match="no images found"):
        curate_dataset(source=str(tmp_path / "empty"), dataset="d", manifest_root=str(tmp_path / "m"))
