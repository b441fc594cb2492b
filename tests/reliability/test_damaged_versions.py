"""Hand-damaged versions: every reader (the manifest reader, the loader, ``strata show``, curation) refuses a
version whose manifest.json is not a valid commit record, names another version, or disagrees with the
files it records, naming the file; a damaged latest version stops curation (never a silent build on an
older one) until a person restores it or moves it aside, after which its number is never reused. Versions
written before the path encoding are read as they were written."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pytest

import loader
from flows.curate import curate_dataset
from loader import manifest as m
from strata.cli import main
from strata.config import CurateOptions
from strata.errors import IntegrityError, ManifestError
from tests.conftest import encode, picture

UNIQUENESS = r"(\d+)_\d+\.\w+$"
OPTIONS = CurateOptions(uniqueness=UNIQUENESS)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A source and a curated version 1 (with a reject), copied by each test."""
    base = tmp_path_factory.mktemp("template")
    for item in range(10):
        path = base / "src" / ("good" if item % 3 else "bad_cap") / f"{item}_0.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode(picture(item), "png"))
    (base / "src" / "good" / "99_0.png").write_bytes(encode(picture(99), "png")[:60])  # truncated: a reject
    curate_dataset(source=str(base / "src"), dataset="d", manifest_root=str(base / "m"), options=OPTIONS)
    return base


@pytest.fixture
def place(template: Path, tmp_path: Path) -> Path:
    shutil.copytree(template, tmp_path / "t")
    return tmp_path / "t"


def _record(version: Path) -> dict[str, Any]:
    return json.loads((version / m.COMMIT_FILE).read_text())


def _write_record(version: Path, record: Any) -> None:
    (version / m.COMMIT_FILE).write_text(json.dumps(record))


def _edit(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def damage(version: Path) -> None:
        record = _record(version)
        change(record)
        _write_record(version, record)

    return damage


def _move_count(record: dict[str, Any]) -> None:
    counts = record["counts"]
    train, devel = counts["train"], counts.setdefault("devel", {})
    category = next(iter(train))
    train[category] -= 1
    devel[category] = devel.get(category, 0) + 1


def _assignments(version: Path, extra_rows: int, tamper: bool) -> None:
    """Record an assignments file (as versions from issue 23 on do), then damage it or its row count."""
    table = m.to_table(pd.read_parquet(version / m.MANIFEST_FILE))
    data = m.parquet_bytes(table)
    record = _record(version)
    record.update(assignments_sha256=hashlib.sha256(data).hexdigest(), assignments_rows=table.num_rows + extra_rows)
    _write_record(version, record)
    (version / m.ASSIGNMENTS_FILE).write_bytes(data + b"x" if tamper else data)


# damage: (how, what the error says). Each leaves manifest.json where readers find it.
DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "json array": (lambda v: _write_record(v, [1, 2, 3]), r"manifest.json holds an array, not the object"),
    "json null": (lambda v: _write_record(v, None), r"manifest.json holds null, not the object"),
    "json string": (lambda v: _write_record(v, "v1"), r"manifest.json holds a string, not the object"),
    "not json": (lambda v: (v / m.COMMIT_FILE).write_text("{"), r"manifest.json is not valid JSON"),
    "field missing": (_edit(lambda r: r.pop("counts")), r"manifest.json is not a valid commit record \('counts' is"),
    "field of a wrong type": (
        _edit(lambda r: r.update(rows="10")),
        r"""manifest.json is not a valid commit record \('rows' is "10", not a non-negative integer\)""",
    ),
    "sha256 not hex": (_edit(lambda r: r.update(sha256="abc")), r"'sha256' is \"abc\", not 64 lowercase hex"),
    "another version": (_edit(lambda r: r.update(version=2)), r"records version 2, but its directory is version 1"),
    "rows": (
        _edit(lambda r: r.update(rows=r["rows"] + 1)),
        r"manifest.parquet holds rows: 10, its manifest.json records 11",
    ),
    "counts": (_edit(_move_count), r"manifest.parquet holds counts \{.*\}, its manifest.json records"),
    "manifest.parquet missing": (lambda v: (v / m.MANIFEST_FILE).unlink(), r"but manifest.parquet is missing"),
    "rejects.parquet changed": (
        lambda v: (v / m.REJECTS_FILE).write_bytes((v / m.REJECTS_FILE).read_bytes() + b"\0"),
        r"rejects.parquet does not match its manifest.json: sha256",
    ),
    "rejects.parquet missing": (lambda v: (v / m.REJECTS_FILE).unlink(), r"but rejects.parquet is missing"),
    "rejects counts": (
        _edit(lambda r: r.update(rejects={"truncated": 3})),
        r"rejects.parquet holds rejects \{'truncated': 1\}, its manifest.json records \{'truncated': 3\}",
    ),
    "assignments changed": (
        lambda v: _assignments(v, 0, tamper=True),
        r"assignments.parquet does not match its manifest.json: sha256",
    ),
    "assignments rows": (lambda v: _assignments(v, 1, tamper=False), r"assignments.parquet holds rows: 10, its"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_every_reader_refuses_a_damaged_version_naming_the_file(
    case: str, place: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    damage, expected = DAMAGE[case]
    dataset, version = place / "m" / "d", place / "m" / "d" / "v000001"
    damage(version)
    with pytest.raises(IntegrityError, match=expected) as raised:
        m.read_manifest(str(dataset))
    assert str(version) in str(raised.value) and "_damaged" in str(raised.value)  # names it, says how to recover
    assert main(["show", str(dataset)]) == 1
    assert "v000001" in capsys.readouterr().err
    with pytest.raises(IntegrityError, match=expected):  # curation stops: it never builds on anything older
        curate_dataset(source=str(place / "src"), dataset="d", manifest_root=str(place / "m"), options=OPTIONS)
    assert sorted(p.name for p in dataset.iterdir() if p.name.startswith("v")) == ["v000001"]


def test_the_loader_applies_the_same_checks(place: Path) -> None:
    dataset, version = place / "m" / "d", place / "m" / "d" / "v000001"
    options = dict(purpose=None, image_size=(16, 16), stratify_by=None)
    assert len(list(loader.from_manifest(str(dataset), **options))) > 0
    for case in ("json null", "another version", "counts", "rejects.parquet changed"):
        intact = {p.name: p.read_bytes() for p in version.iterdir()}
        damage, expected = DAMAGE[case]
        damage(version)
        with pytest.raises(IntegrityError, match=expected):
            loader.from_manifest(str(dataset), **options)
        for name, data in intact.items():
            (version / name).write_bytes(data)


def test_a_version_directory_holding_another_versions_record_is_refused(place: Path) -> None:
    dataset = place / "m" / "d"
    shutil.copytree(dataset / "v000001", dataset / "v000003")  # v000003/manifest.json says version 1
    with pytest.raises(IntegrityError, match=r"v000003/manifest.json records version 1, but its directory is version"):
        m.read_manifest(str(dataset))
    assert m.read_manifest(str(dataset), 1).shape[0] == 10  # the intact version stays readable when pinned


def test_a_damaged_latest_version_moved_aside_keeps_its_number(place: Path) -> None:
    dataset = place / "m" / "d"
    (place / "src" / "good" / "20_0.png").write_bytes(encode(picture(20), "png"))
    second = curate_dataset(source=str(place / "src"), dataset="d", manifest_root=str(place / "m"), options=OPTIONS)
    assert second.version == 2
    DAMAGE["counts"][0](dataset / "v000002")
    with pytest.raises(IntegrityError, match="v000002/manifest.parquet holds counts"):
        curate_dataset(source=str(place / "src"), dataset="d", manifest_root=str(place / "m"), options=OPTIONS)

    (dataset / m.DAMAGED_DIR).mkdir()
    (dataset / "v000002").rename(dataset / m.DAMAGED_DIR / "v000002")  # the documented recovery
    third = curate_dataset(source=str(place / "src"), dataset="d", manifest_root=str(place / "m"), options=OPTIONS)
    assert (third.version, third.parent_version) == (3, 1)  # number 2 names the damaged content only
    assert len(m.read_manifest(str(dataset))) == 11
    with pytest.raises(ManifestError, match="version 2 of .* does not exist; committed versions: \\[1, 3\\]"):
        m.open_version(str(dataset), 2)


def test_a_version_written_before_the_path_encoding_is_read_as_written(place: Path) -> None:
    """Its paths are fsspec URLs: a key holding a literal ``%20`` is not percent-decoded (that would name
    another file, here one that also exists, with other bytes)."""
    dataset, version = place / "m" / "d", place / "m" / "d" / "v000001"
    literal, decoded = place / "src" / "good" / "x%201_0.png", place / "src" / "good" / "x 1_0.png"
    literal.write_bytes(encode(picture(41), "png"))
    decoded.write_bytes(encode(picture(42), "png"))
    frame = pd.read_parquet(version / m.MANIFEST_FILE)
    row = frame.iloc[0].copy()
    data = literal.read_bytes()
    row[m.PATH], row[m.KEY], row[m.SIZE] = f"file://{literal}", "good/x%201_0.png", len(data)
    row[m.MD5] = row[m.ETAG] = row[m.UNIQUE_ID] = hashlib.md5(data).hexdigest()
    frame = pd.concat([frame, row.to_frame().T.astype(frame.dtypes.to_dict())], ignore_index=True)
    frame[m.PATH] = [uri.replace("%20", " ") if "x%201" not in uri else uri for uri in frame[m.PATH]]
    parquet = m.parquet_bytes(m.to_table(frame))
    (version / m.MANIFEST_FILE).write_bytes(parquet)
    record = _record(version)
    for name in ("path_encoding", "commit_guard"):
        record.pop(name)
    record.update(sha256=hashlib.sha256(parquet).hexdigest(), rows=len(frame), counts=m.counts_of(m.to_table(frame)))
    _write_record(version, record)

    batches = loader.from_manifest(str(dataset), purpose=None, image_size=None, stratify_by=None, shuffle=False)
    assert sum(len(x) for x, _ in batches) == len(frame)  # every md5 checked: the literal file was read
    summary = curate_dataset(source=str(place / "src"), dataset="d", manifest_root=str(place / "m"), options=OPTIONS)
    assert summary.version == 2 and m.open_version(str(dataset), 2).info["path_encoding"] == m.PATH_ENCODING
    paths = m.read_manifest(str(dataset)).set_index(m.KEY)[m.PATH]
    assert paths["good/x%201_0.png"].endswith("/good/x%25201_0.png")
    assert paths["good/x 1_0.png"].endswith("/good/x%201_0.png")
