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
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from strata.errors import IntegrityError, ManifestError
from strata.storage import open_url

SCHEMA_VERSION = 1

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
    try:
        info = json.loads(fs.cat_file(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{fs.unstrip_protocol(path)} is not valid JSON; the version is damaged") from err
    schema_version = info.get("schema_version")
    if schema_version != SCHEMA_VERSION:
        raise ManifestError(
            f"{fs.unstrip_protocol(path)} has schema_version {schema_version!r}; this strata reads "
            f"version {SCHEMA_VERSION}: upgrade strata or re-curate the dataset"
        )
    return Version(fs=fs, dataset_path=dataset_path, number=number, info=info)


def read_table(version: Version, verify: bool = True) -> pa.Table:
    """Read a version's manifest table, checking its sha256 against ``manifest.json``.

    Raises:
        IntegrityError: the Parquet bytes do not match the recorded checksum or schema.
    """
    path = version.file(MANIFEST_FILE)
    try:
        data = version.fs.cat_file(path)
    except FileNotFoundError as err:
        raise IntegrityError(f"{version.uri} is committed but {MANIFEST_FILE} is missing") from err
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != version.info.get("sha256"):
            raise IntegrityError(
                f"{version.fs.unstrip_protocol(path)} does not match its manifest.json: sha256 {digest}, "
                f"recorded {version.info.get('sha256')}. The version was modified after its commit; "
                "do not train on it, and restore it from a backup or re-curate"
            )
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(MANIFEST_SCHEMA, check_metadata=False):
        raise IntegrityError(f"{version.fs.unstrip_protocol(path)} does not carry manifest schema v{SCHEMA_VERSION}")
    return table


def read_assignments(version: Version) -> pa.Table | None:
    """Read a version's assignments, checking them against ``manifest.json``; None for a version written
    before assignments were recorded (its history has to be rebuilt from every committed version).

    Raises:
        IntegrityError: the file is missing, or does not match its recorded checksum, row count or schema.
    """
    recorded = version.info.get("assignments_sha256")
    if recorded is None:
        return None
    path = version.file(ASSIGNMENTS_FILE)
    try:
        data = version.fs.cat_file(path)
    except FileNotFoundError as err:
        raise IntegrityError(f"{version.uri} is committed but {ASSIGNMENTS_FILE} is missing") from err
    digest = hashlib.sha256(data).hexdigest()
    if digest != recorded:
        raise IntegrityError(
            f"{version.fs.unstrip_protocol(path)} does not match its manifest.json: sha256 {digest}, recorded "
            f"{recorded}. The version was modified after its commit: restore it from a backup"
        )
    table = pq.read_table(io.BytesIO(data))
    if not table.schema.equals(ASSIGNMENTS_SCHEMA, check_metadata=False):
        raise IntegrityError(f"{version.fs.unstrip_protocol(path)} does not carry the assignments schema")
    if table.num_rows != version.info.get("assignments_rows"):
        raise IntegrityError(
            f"{version.fs.unstrip_protocol(path)} holds {table.num_rows} rows, manifest.json records "
            f"{version.info.get('assignments_rows')}: restore the version from a backup"
        )
    return table


def read_rejects(version: Version) -> pa.Table:
    """Read a version's rejects table (empty when the file is absent)."""
    path = version.file(REJECTS_FILE)
    if not version.fs.exists(path):
        return REJECTS_SCHEMA.empty_table()
    return pq.read_table(io.BytesIO(version.fs.cat_file(path)))


def read_manifest(
    uri: str,
    version: int | str | None = "latest",
    storage_options: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """Read one committed, checksum-verified version of a manifest into a DataFrame.

    Columns are those of ``MANIFEST_SCHEMA``; ``phash`` is uint64 and ``mtime`` UTC.
    """
    return read_table(open_version(uri, version, storage_options)).to_pandas()
