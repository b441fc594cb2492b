"""The manifest contract: column names, Arrow schema, storage layout and the committed-version reader.

Writers (``tasks``) and readers (``loader``) both import from here; nobody else spells a column name.

Layout of a dataset root (see DESIGN section 2)::

    <root>/<dataset>/v000001/manifest.parquet
                            /rejects.parquet
                            /assignments.parquet  <- every content ever assigned, and its purpose
                            /validation.json
                            /sample_grid.png
                            /manifest.json      <- written last, exclusive create: the commit
    <root>/<dataset>/LATEST                     <- {"version": N, "sha256": ...}, a hint
    <root>/<dataset>/_rejected/<run id>/validation.json   <- a candidate that failed validation
    <root>/<dataset>/_damaged/v000003/...       <- a damaged version a person moved aside (never read)

A committed version is checked whole before anything trusts it: ``manifest.json`` must be a commit record
of the expected schema (``loader.record``) naming its directory's version, and every file it records a
checksum of must match it, with the row count and counts it records.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loader.record import RECOVERY, nested_counts, parse_record
from strata.errors import IntegrityError, ManifestError
from strata.storage import decode_uris, open_url

SCHEMA_VERSION = 1
# How ``path`` URIs are written (``manifest.json`` records it): RFC 3986 percent-encoding of every character
# of the key but unreserved ones and "/". A record without ``path_encoding`` predates it: its paths are
# fsspec URLs as written, never percent-decoded.
PATH_ENCODING = "rfc3986"

# Manifest columns (schema version 1).
PATH = "path"
KEY = "key"
FOLDER = "folder"
CATEGORY = "category"
SIZE = "size"
ETAG = "etag"
MD5 = "md5"
MTIME = "mtime"
FORMAT = "format"
WIDTH = "width"
HEIGHT = "height"
CHANNELS = "channels"
PHASH = "phash"
DUPLICATE_GROUP = "duplicate_group"
UNIQUE_ID = "unique_id"
PURPOSE = "purpose"
FIRST_VERSION = "first_version"

# Rejects columns (besides PATH, KEY, SIZE, ETAG).
REASON = "reason"
DETAIL = "detail"

# Assignments columns (besides MD5, PURPOSE, FIRST_VERSION, KEY, CATEGORY, UNIQUE_ID, PHASH, DUPLICATE_GROUP).
LAST_VERSION = "last_version"

PURPOSES = ("train", "devel", "test")
FORMATS = ("bmp", "png", "jpeg", "gif", "tiff", "webp")
REJECT_REASONS = (
    "empty",
    "unreadable",
    "truncated",
    "unsupported_format",
    "too_large",
    "checksum_mismatch",
    "changed_during_run",
    "purpose_conflict",
)

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(FOLDER, pa.string(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(SIZE, pa.int64(), nullable=False),
        pa.field(ETAG, pa.string(), nullable=False),
        pa.field(MD5, pa.string(), nullable=False),
        pa.field(MTIME, pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field(FORMAT, pa.string(), nullable=False),
        pa.field(WIDTH, pa.int32(), nullable=False),
        pa.field(HEIGHT, pa.int32(), nullable=False),
        pa.field(CHANNELS, pa.int32(), nullable=False),
        pa.field(PHASH, pa.uint64(), nullable=False),
        pa.field(DUPLICATE_GROUP, pa.string(), nullable=True),
        pa.field(UNIQUE_ID, pa.string(), nullable=False),
        pa.field(PURPOSE, pa.string(), nullable=False),
        pa.field(FIRST_VERSION, pa.int32(), nullable=False),
    ],
    metadata={b"strata.schema_version": str(SCHEMA_VERSION).encode()},
)

REJECTS_SCHEMA = pa.schema(
    [
        pa.field(PATH, pa.string(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(SIZE, pa.int64(), nullable=False),
        pa.field(ETAG, pa.string(), nullable=False),
        pa.field(REASON, pa.string(), nullable=False),
        pa.field(DETAIL, pa.string(), nullable=False),
    ],
    metadata={b"strata.schema_version": str(SCHEMA_VERSION).encode()},
)

# Every content (md5) ever assigned a purpose, one row each, carried from version to version: content keeps
# its purpose, item and group whatever its key, and content deleted since is still known when it, a copy, a
# near copy or another photo of its item comes back. ``key`` and ``category`` are where it was last seen,
# ``last_version`` the last version whose manifest held it (this version for present content).
ASSIGNMENTS_SCHEMA = pa.schema(
    [
        pa.field(MD5, pa.string(), nullable=False),
        pa.field(PURPOSE, pa.string(), nullable=False),
        pa.field(FIRST_VERSION, pa.int32(), nullable=False),
        pa.field(LAST_VERSION, pa.int32(), nullable=False),
        pa.field(KEY, pa.string(), nullable=False),
        pa.field(CATEGORY, pa.string(), nullable=False),
        pa.field(UNIQUE_ID, pa.string(), nullable=False),
        pa.field(PHASH, pa.uint64(), nullable=False),
        pa.field(DUPLICATE_GROUP, pa.string(), nullable=True),
    ],
    metadata={b"strata.schema_version": str(SCHEMA_VERSION).encode()},
)

COLUMNS = tuple(MANIFEST_SCHEMA.names)
REJECT_COLUMNS = tuple(REJECTS_SCHEMA.names)
ASSIGNMENT_COLUMNS = tuple(ASSIGNMENTS_SCHEMA.names)

MANIFEST_FILE = "manifest.parquet"
REJECTS_FILE = "rejects.parquet"
ASSIGNMENTS_FILE = "assignments.parquet"
VALIDATION_FILE = "validation.json"
COMMIT_FILE = "manifest.json"
CLAIM_FILE = "_claim.json"
LATEST_FILE = "LATEST"
GRID_FILE = "sample_grid.png"  # a few images per category and purpose, for people
REJECTED_DIR = "_rejected"  # <dataset>/_rejected/<run id>/validation.json: candidates that failed validation
DAMAGED_DIR = "_damaged"  # <dataset>/_damaged/v000003/: damaged versions moved aside; their numbers stay used
_VERSION_DIR = re.compile(r"^v(\d{6,})$")


def version_dir(version: int) -> str:
    """The directory name of a version: ``v000001``."""
    return f"v{version:06d}"


def to_table(frame: pd.DataFrame, schema: pa.Schema = MANIFEST_SCHEMA) -> pa.Table:
    """Convert a frame holding (at least) the schema's columns into a table carrying the schema exactly."""
    missing = [name for name in schema.names if name not in frame.columns]
    if missing:
        raise ManifestError(f"cannot build a manifest table: columns {missing} are missing")
    table = pa.Table.from_pandas(frame[list(schema.names)], schema=schema, preserve_index=False)
    return table.replace_schema_metadata(schema.metadata)


def parquet_bytes(table: pa.Table) -> bytes:
    """Serialize a table to Parquet bytes (zstd), deterministic for equal tables."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_statistics=True)
    return sink.getvalue()


def empty_frame(schema: pa.Schema = MANIFEST_SCHEMA) -> pd.DataFrame:
    """An empty frame with the schema's columns and dtypes."""
    return schema.empty_table().to_pandas()


@dataclass(frozen=True)
class Version:
    """One committed version of a dataset."""

    fs: fsspec.AbstractFileSystem
    dataset_path: str
    number: int
    info: Mapping[str, Any]

    @property
    def path(self) -> str:
        return f"{self.dataset_path}/{version_dir(self.number)}"

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.path)

    def file(self, name: str) -> str:
        return f"{self.path}/{name}"


def version_numbers(fs: fsspec.AbstractFileSystem, dataset_path: str) -> list[int]:
    """Every version directory number under a dataset, committed or not, ascending."""
    try:
        entries = fs.ls(dataset_path, detail=False)
    except FileNotFoundError:
        return []
    numbers = []
    for entry in entries:
        match = _VERSION_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if match:
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def damaged_versions(fs: fsspec.AbstractFileSystem, dataset_path: str) -> list[int]:
    """Version numbers a person moved aside under ``_damaged/``: never read, and never given to a new version."""
    return version_numbers(fs, f"{dataset_path}/{DAMAGED_DIR}")


def committed_versions(fs: fsspec.AbstractFileSystem, dataset_path: str) -> list[int]:
    """Version numbers whose ``manifest.json`` exists (the commit), ascending."""
    return [n for n in version_numbers(fs, dataset_path) if fs.exists(f"{dataset_path}/{version_dir(n)}/{COMMIT_FILE}")]


def latest_version(fs: fsspec.AbstractFileSystem, dataset_path: str) -> int | None:
    """The highest committed version, or None. ``LATEST`` is only a hint: the listing decides."""
    for number in reversed(version_numbers(fs, dataset_path)):
        if fs.exists(f"{dataset_path}/{version_dir(number)}/{COMMIT_FILE}"):
            return number
    return None


def split_version_uri(uri: str) -> tuple[str, int | None]:
    """Split ``.../dataset/v000003`` into (dataset URI, 3); other URIs come back with None."""
    stripped = uri.rstrip("/")
    head, _, tail = stripped.rpartition("/")
    match = _VERSION_DIR.match(tail)
    if match and head:
        return head, int(match.group(1))
    return stripped, None


def open_version(
    uri: str,
    version: int | str | None = "latest",
    storage_options: Mapping[str, Any] | None = None,
) -> Version:
    """Resolve a committed version of a dataset.

    Args:
        uri: the dataset root (``s3://bucket/manifests/vials``, a local path) or one version's directory.
        version: ``"latest"`` (or None) for the highest committed version, or a version number.
        storage_options: fsspec options for remote roots (endpoint, credentials).

    Raises:
        ManifestError: no committed version exists, or the requested one is missing or uncommitted.
    """
    dataset_uri, pinned = split_version_uri(uri)
    fs, dataset_path = open_url(dataset_uri, storage_options)
    if pinned is not None:
        if version not in (None, "latest", pinned):
            raise ManifestError(f"{uri} names version {pinned}, but version={version!r} was asked for")
        version = pinned
    if version in (None, "latest"):
        number = latest_version(fs, dataset_path)
        if number is None:
            raise ManifestError(
                f"no committed manifest version under {dataset_uri}: run `strata curate` first, "
                "or check the dataset name and the storage options"
            )
    else:
        try:
            number = int(version)
        except (TypeError, ValueError) as err:
            raise ManifestError(f"version must be 'latest' or an integer, got {version!r}") from err
        if not fs.exists(f"{dataset_path}/{version_dir(number)}/{COMMIT_FILE}"):
            known = committed_versions(fs, dataset_path)
            state = (
                "exists but is not committed (no manifest.json)"
                if number in version_numbers(fs, dataset_path)
                else "does not exist"
            )
            raise ManifestError(f"version {number} of {dataset_uri} {state}; committed versions: {known or 'none'}")
    path = f"{dataset_path}/{version_dir(number)}/{COMMIT_FILE}"
    info = parse_record(fs.cat_file(path), fs.unstrip_protocol(path), number, SCHEMA_VERSION)
    encoding = info.get("path_encoding")
    if encoding not in (None, PATH_ENCODING):
        raise ManifestError(
            f"{fs.unstrip_protocol(path)} records path_encoding {encoding!r}; this strata reads "
            f"{PATH_ENCODING!r}: upgrade strata"
        )
    return Version(fs=fs, dataset_path=dataset_path, number=number, info=info)


def _read(version: Version, name: str) -> bytes:
    try:
        return version.fs.cat_file(version.file(name))
    except FileNotFoundError as err:
        raise IntegrityError(f"{version.uri} is committed but {name} is missing: {RECOVERY}") from err


def _check_sha256(version: Version, name: str, data: bytes, field: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != version.info[field]:
        raise IntegrityError(
            f"{version.fs.unstrip_protocol(version.file(name))} does not match its manifest.json: sha256 {digest}, "
            f"recorded {version.info[field]}. The version was modified after its commit; do not train on it: "
            + RECOVERY
        )


def _mismatch(version: Version, name: str, what: str, found: Any, recorded: Any) -> IntegrityError:
    return IntegrityError(
        f"{version.fs.unstrip_protocol(version.file(name))} holds {what} {found}, its manifest.json records "
        f"{recorded}: {RECOVERY}"
    )


def counts_of(table: pa.Table) -> dict[str, dict[str, int]]:
    """Rows per purpose and category of a manifest table, as ``manifest.json`` records them."""
    grouped = table.group_by([PURPOSE, CATEGORY]).aggregate([([], "count_all")]).to_pydict()
    keys = zip(grouped[PURPOSE], grouped[CATEGORY], strict=True)
    return nested_counts(dict(zip(keys, grouped["count_all"], strict=True)))


def read_table(version: Version, verify: bool = True) -> pa.Table:
    """Read a version's manifest table, checking the version whole.

    With ``verify`` (the default): the Parquet bytes match the recorded sha256, and their row count and
    counts (purpose x category) the recorded ones; the rejects file (and the assignments file, when the
    record names one) match theirs too (``check_files``).

    Raises:
        IntegrityError: a file is missing, or does not match the record's checksum, schema, rows or counts.
    """
    path = version.file(MANIFEST_FILE)
    data = _read(version, MANIFEST_FILE)
    if verify:
        _check_sha256(version, MANIFEST_FILE, data, "sha256")
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        raise IntegrityError(f"{version.fs.unstrip_protocol(path)} does not carry manifest schema v{SCHEMA_VERSION}")
    if verify:
        if table.num_rows != version.info["rows"]:
            raise _mismatch(version, MANIFEST_FILE, "rows:", table.num_rows, version.info["rows"])
        counts = counts_of(table)
        if counts != version.info["counts"]:
            raise _mismatch(version, MANIFEST_FILE, "counts", counts, version.info["counts"])
        check_files(version)
    return table


def read_rejects(version: Version) -> pa.Table:
    """Read a version's rejects table, checked against its sha256 and the counts per reason it records."""
    data = _read(version, REJECTS_FILE)
    _check_sha256(version, REJECTS_FILE, data, "rejects_sha256")
    table = pq.read_table(io.BytesIO(data))
    reasons = pc.value_counts(table[REASON]).to_pylist() if table.num_rows else []
    found = {str(r["values"]): int(r["counts"]) for r in reasons}
    if found != version.info["rejects"]:
        raise _mismatch(version, REJECTS_FILE, "rejects", found, version.info["rejects"])
    return table


def check_files(version: Version) -> None:
    """Check a version's other recorded files: the rejects file, and the assignments file where the record
    names one (versions written before assignments were recorded have none).

    Raises:
        IntegrityError: a file is missing or does not match its recorded checksum or row count.
    """
    read_rejects(version)
    if version.info.get("assignments_sha256"):
        data = _read(version, ASSIGNMENTS_FILE)
        _check_sha256(version, ASSIGNMENTS_FILE, data, "assignments_sha256")
        rows = pq.ParquetFile(io.BytesIO(data)).metadata.num_rows
        if rows != version.info.get("assignments_rows"):
            raise _mismatch(version, ASSIGNMENTS_FILE, "rows:", rows, version.info.get("assignments_rows"))


def read_assignments(version: Version, verify: bool = True) -> pa.Table | None:
    """Read a version's assignments (``ASSIGNMENTS_SCHEMA``); None for a version written before they were
    recorded, whose history has to be rebuilt from every committed version.

    Args:
        verify: check the bytes against the recorded sha256 and rows (``read_table`` has done so already
            when it checked the version whole).

    Raises:
        IntegrityError: the file is missing, or does not match its record or the schema.
    """
    if not version.info.get("assignments_sha256"):
        return None
    data = _read(version, ASSIGNMENTS_FILE)
    if verify:
        _check_sha256(version, ASSIGNMENTS_FILE, data, "assignments_sha256")
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(ASSIGNMENTS_SCHEMA, check_metadata=False):
        raise IntegrityError(
            f"{version.fs.unstrip_protocol(version.file(ASSIGNMENTS_FILE))} does not carry the assignments schema"
        )
    if table.num_rows != version.info.get("assignments_rows"):
        raise _mismatch(version, ASSIGNMENTS_FILE, "rows:", table.num_rows, version.info.get("assignments_rows"))
    return table


def object_locations(version: Version, uris: Any) -> list[str]:
    """The fsspec URLs of a version's ``path`` URIs: percent-decoded where its record says they are encoded
    (fsspec does not decode), as written where the version predates the encoding."""
    return decode_uris(uris) if version.info.get("path_encoding") == PATH_ENCODING else list(uris)


def read_manifest(
    uri: str,
    version: int | str | None = "latest",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Read one committed, checksum-verified version of a manifest into a DataFrame.

    Columns are those of ``MANIFEST_SCHEMA``; ``phash`` is uint64 and ``mtime`` UTC.
    """
    return read_table(open_version(uri, version, storage_options)).to_pandas()
