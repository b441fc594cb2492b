"""Stage 7, publish: write one immutable version by the commit protocol of DESIGN section 2.

1. Claim version parent+1 by exclusive create of its ``_claim.json``: only the claimant writes there.
2. Write ``manifest.parquet``, ``rejects.parquet`` and ``validation.json`` into it.
3. Check that no version above the parent was committed meanwhile, then exclusive-create ``manifest.json``:
   the commit. Until it exists, readers ignore the directory.
4. Update the ``LATEST`` hint.

A run that loses any of these races raises ``CommitConflict`` and re-plans on top of the winner. A crashed
run leaves an uncommitted directory that readers ignore and later runs step over once its claim is stale.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Mapping

import fsspec
import pandas as pd
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger

from loader import manifest as m
from strata.errors import CommitConflict
from tasks.policy import stage

STALE_AFTER_S = 6 * 3600  # an uncommitted claim older than this is a crashed run's debris


@dataclass(frozen=True)
class Store:
    """Where a dataset's versions live."""

    fs: fsspec.AbstractFileSystem
    dataset_path: str  # <manifest_root>/<dataset>, protocol stripped

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.dataset_path)

    def version_path(self, version: int) -> str:
        return f"{self.dataset_path}/{m.version_dir(version)}"


def counts_by_purpose(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per purpose and category: ``{"train": {"good": 80, ...}, ...}`` (sorted keys)."""
    table = manifest.groupby([m.PURPOSE, m.CATEGORY]).size()
    counts: dict[str, dict[str, int]] = {}
    for (purpose, category), count in sorted(table.items()):
        counts.setdefault(purpose, {})[category] = int(count)
    return counts


def commit_record(
    *,
    dataset: str,
    version: int,
    parent_version: int | None,
    source: str,
    parameters: Mapping[str, Any],
    manifest: pd.DataFrame,
    rejects: pd.DataFrame,
    diff: Mapping[str, int],
    manifest_sha256: str,
    rejects_sha256: str,
    validation: Mapping[str, Any],
    flow_run_id: str | None,
) -> dict[str, Any]:
    """The content of ``manifest.json`` (pure)."""
    return {
        "schema_version": m.SCHEMA_VERSION,
        "dataset": dataset,
        "version": version,
        "parent_version": parent_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "parameters": dict(parameters),
        "rows": int(len(manifest)),
        "counts": counts_by_purpose(manifest),
        "rejects": {str(k): int(v) for k, v in rejects[m.REASON].value_counts().sort_index().items()},
        "diff": dict(diff),
        "sha256": manifest_sha256,
        "rejects_sha256": rejects_sha256,
        "validation": dict(validation),
        "flow_run_id": flow_run_id,
    }


def _create(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Exclusive create: FileExistsError when the object exists (local, memory and S3 alike).

    On S3 one PUT is atomic. Locally the bytes go to a temporary file first and are hard-linked into place,
    so a reader never sees a half-written file and a second writer gets FileExistsError.
    """
    if isinstance(fs, LocalFileSystem):
        temporary = f"{path}.{uuid.uuid4().hex}.tmp"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        finally:
            os.unlink(temporary)
        return
    with fs.open(path, "xb") as handle:
        handle.write(data)


def _claim_age(store: Store, version: int) -> tuple[float, str]:
    """Seconds since a version directory was claimed, and by which run (infinite age when unreadable)."""
    try:
        claim = json.loads(store.fs.cat_file(f"{store.version_path(version)}/{m.CLAIM_FILE}"))
        claimed = datetime.fromisoformat(claim["claimed_at"])
        return (datetime.now(UTC) - claimed).total_seconds(), str(claim.get("run_id"))
    except (FileNotFoundError, ValueError, KeyError):
        return float("inf"), "unknown"


def claim_version(store: Store, parent_version: int | None, run_id: str, stale_after_s: float = STALE_AFTER_S) -> int:
    """Claim the version after the parent: exclusive create of its ``_claim.json``.

    An uncommitted directory in the way is stepped over only when its claim is older than
    ``stale_after_s`` (a crashed run's debris); a fresh one belongs to a run still writing.

    Raises:
        CommitConflict: a version above the parent is committed, or another run holds a fresh claim.
    """
    committed = m.latest_version(store.fs, store.dataset_path)
    if committed != parent_version:
        raise CommitConflict(
            f"{store.uri}: version {committed} was committed while this run planned on "
            + (f"version {parent_version}" if parent_version is not None else "an empty dataset")
        )
    existing = set(m.version_numbers(store.fs, store.dataset_path))
    version = (parent_version or 0) + 1
    while version in existing:
        age, owner = _claim_age(store, version)
        if age < stale_after_s:
            raise CommitConflict(
                f"{store.uri}: version {version} is being written by run {owner} "
                f"(claimed {age:.0f} s ago); re-run once it has committed"
            )
        version += 1
    claim = {
        "run_id": run_id,
        "parent_version": parent_version,
        "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    store.fs.makedirs(store.version_path(version), exist_ok=True)
    try:
        _create(store.fs, f"{store.version_path(version)}/{m.CLAIM_FILE}", json.dumps(claim).encode())
    except FileExistsError as err:
        raise CommitConflict(f"{store.uri}: version {version} was claimed by another run just now") from err
    return version


def write_version(
    store: Store,
    version: int,
    parent_version: int | None,
    manifest_parquet: bytes,
    rejects_parquet: bytes,
    validation: Mapping[str, Any],
    record: Mapping[str, Any],
    extra: Mapping[str, bytes] | None = None,
) -> str:
    """Write a claimed version's files (and ``extra`` ones, by name) and commit it. Returns the version's URI.

    Raises:
        CommitConflict: another version was committed above the parent meanwhile; this one stays uncommitted.
    """
    path = store.version_path(version)
    _create(store.fs, f"{path}/{m.MANIFEST_FILE}", manifest_parquet)
    _create(store.fs, f"{path}/{m.REJECTS_FILE}", rejects_parquet)
    _create(store.fs, f"{path}/{m.VALIDATION_FILE}", json.dumps(validation, indent=2, default=str).encode())
    for name, data in (extra or {}).items():
        _create(store.fs, f"{path}/{name}", data)
    committed = m.latest_version(store.fs, store.dataset_path)
    if committed != parent_version:
        raise CommitConflict(f"{store.uri}: version {committed} was committed while version {version} was written")
    try:
        _create(store.fs, f"{path}/{m.COMMIT_FILE}", json.dumps(record, indent=2, sort_keys=True).encode())
    except FileExistsError as err:
        raise CommitConflict(f"{store.uri}: version {version} was committed by another run") from err
    latest = json.dumps({"version": version, "sha256": record["sha256"]}).encode()
    store.fs.pipe_file(f"{store.dataset_path}/{m.LATEST_FILE}", latest)
    return store.fs.unstrip_protocol(path)


def sha256(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Candidate:
    """A planned version: its tables, serialized, and what manifest.json will say of it."""

    manifest: pd.DataFrame
    rejects: pd.DataFrame
    diff: dict[str, int]
    changes: pd.DataFrame  # per-key differences from the parent (``tasks.diff.manifest_diff``)


def serialize(candidate: Candidate, version: int) -> tuple[pd.DataFrame, bytes, bytes]:
    """Fill ``first_version`` of new rows with ``version`` and serialize both tables."""
    manifest = candidate.manifest.copy()
    manifest[m.FIRST_VERSION] = manifest[m.FIRST_VERSION].fillna(version).astype("int32")
    return (
        manifest,
        m.parquet_bytes(m.to_table(manifest)),
        m.parquet_bytes(m.to_table(candidate.rejects, m.REJECTS_SCHEMA)),
    )


@stage("publish")
def publish_task(
    store: Store,
    candidate: Candidate,
    parent_version: int | None,
    validation: Mapping[str, Any],
    record_fields: Mapping[str, Any],
    run_id: str,
    extra: Mapping[str, bytes] | None = None,
) -> tuple[int, str]:
    """Claim, write and commit a version (Prefect task). Returns (version, version URI)."""
    version = claim_version(store, parent_version, run_id)
    manifest, manifest_bytes, rejects_bytes = serialize(candidate, version)
    record = commit_record(
        version=version,
        parent_version=parent_version,
        manifest=manifest,
        rejects=candidate.rejects,
        diff=candidate.diff,
        manifest_sha256=sha256(manifest_bytes),
        rejects_sha256=sha256(rejects_bytes),
        validation=validation,
        **record_fields,
    )
    uri = write_version(store, version, parent_version, manifest_bytes, rejects_bytes, validation, record, extra)
    get_run_logger().info("publish: committed version %d at %s (%d rows)", version, uri, len(manifest))
    return version, uri


def write_rejected(store: Store, run_id: str, validation: Mapping[str, Any]) -> str:
    """Keep a failed candidate's validation result under ``_rejected/<run id>/`` (never a version directory)."""
    path = f"{store.dataset_path}/{m.REJECTED_DIR}/{run_id}/{m.VALIDATION_FILE}"
    store.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    store.fs.pipe_file(path, json.dumps(validation, indent=2, default=str).encode())
    return store.fs.unstrip_protocol(path)


@stage("publish")
def reject_task(store: Store, run_id: str, validation: Mapping[str, Any]) -> str:
    """Store a failed validation result beside the versions (Prefect task). Returns its URI."""
    uri = write_rejected(store, run_id, validation)
    get_run_logger().error("publish: nothing published; validation result kept at %s", uri)
    return uri
