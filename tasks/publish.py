"""Stage 7, publish: write one immutable version by the commit protocol of DESIGN section 2.

1. Claim version parent+1 by exclusive create of its ``_claim.json``: only the claimant writes there.
2. Write ``manifest.parquet``, ``rejects.parquet`` and ``validation.json`` into it.
3. Check that no version above the parent was committed meanwhile, then exclusive-create ``manifest.json``:
   the commit. Until it exists, readers ignore the directory.
4. Update the ``LATEST`` hint.

A run that loses any of these races raises ``CommitConflict`` and re-plans on top of the winner. A run
killed before its commit leaves an uncommitted directory that readers ignore; the next run takes it over
once its claimant is gone (``claim_gone``) and writes the version there.

Every exclusive create relies on the store refusing a second create of one object; ``tasks.commit_guard``
proves that before a run does any work. On a store that does not (``Store.guard`` is
``concurrency-limit``, an explicit opt-in), runs of the dataset hold Prefect's one-slot concurrency limit,
and a create checks that the object is absent first.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Mapping

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger
from prefect.exceptions import MissingContextError

from loader import manifest as m
from strata.config import CONCURRENCY_LIMIT, EXCLUSIVE_CREATE
from strata.errors import CommitConflict
from strata.storage import naming
from tasks import assignments
from tasks.policy import stage

CLAIM_WAIT_S = 120.0  # how long a live claimant gets to commit before this run gives up on the version
CLAIM_POLL_S = 0.5
STALE_AFTER_S = 6 * 3600  # a claim this old is debris even when nothing else says its run is gone


@dataclass(frozen=True)
class Store:
    """Where a dataset's versions live."""

    fs: fsspec.AbstractFileSystem
    dataset_path: str  # <manifest_root>/<dataset>, protocol stripped
    guard: str = EXCLUSIVE_CREATE  # what makes a create exclusive: the store, or the held concurrency limit

    @property
    def uri(self) -> str:
        return self.fs.unstrip_protocol(self.dataset_path)

    def version_path(self, version: int) -> str:
        return f"{self.dataset_path}/{m.version_dir(version)}"


def counts_by_purpose(manifest: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows per purpose and category: ``{"train": {"good": 80, ...}, ...}`` (sorted keys), counted as the
    readers count them to check a version (``manifest.counts_of``)."""
    return m.counts_of(pa.Table.from_pandas(manifest[[m.PURPOSE, m.CATEGORY]], preserve_index=False))


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
    assignments_sha256: str | None = None,
    assignments_rows: int | None = None,
    review: Mapping[str, int] | None = None,
    commit_guard: str = EXCLUSIVE_CREATE,
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
        "assignments_sha256": assignments_sha256,
        "assignments_rows": assignments_rows,
        "phash_exact": True,
        "review": dict(review or {}),
        "validation": dict(validation),
        "flow_run_id": flow_run_id,
        "path_encoding": m.PATH_ENCODING,
        "commit_guard": commit_guard,
    }


def _create(store: Store, path: str, data: bytes, stage: str = "publish") -> None:
    """Exclusive create: FileExistsError when the object exists (local, memory and S3 alike).

    On S3 one conditional PUT (``If-None-Match: *``) is atomic. Locally the bytes go to a temporary file
    first and are hard-linked into place, so a reader never sees a half-written file and a second writer
    gets FileExistsError. Under the concurrency-limit guard the store ignores the condition, and the check
    that the object is absent comes first (no other run writes meanwhile: they wait for the limit).
    """
    fs = store.fs
    with naming(stage, fs.unstrip_protocol(path)):
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
        if store.guard == CONCURRENCY_LIMIT and fs.exists(path):
            raise FileExistsError(f"{fs.unstrip_protocol(path)} exists")
        with fs.open(path, "xb") as handle:
            handle.write(data)


def _read_claim(store: Store, version: int) -> tuple[dict[str, Any], bytes]:
    """A version's claim and its raw bytes (empty when missing or unreadable: a crash before it was written)."""
    try:
        raw = store.fs.cat_file(f"{store.version_path(version)}/{m.CLAIM_FILE}")
        return json.loads(raw), raw
    except (FileNotFoundError, ValueError):
        return {}, b""


def _logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        return get_run_logger()
    except MissingContextError:  # called outside a flow (tests, benchmarks)
        return logging.getLogger(__name__)


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError, OverflowError):
        return True
    return True


def _flow_run_final(run_id: str) -> str | None:
    """The name of the flow run's final state (Crashed, Failed, ...), or None if running or unknown here."""
    from prefect import get_client

    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(uuid.UUID(run_id)).state
    except Exception:  # no API, another server's run, not a UUID: fall back to the claim's age
        return None
    return state.name if state is not None and state.is_final() else None


def claim_gone(claim: Mapping[str, Any], run_id: str, stale_after_s: float = STALE_AFTER_S) -> str | None:
    """Why the claimant of an uncommitted version can no longer commit it, or None while it may.

    Gone: this run's own earlier attempt (a retried publish), a process on this host that has exited, a
    flow run in a final state (a worker marks a killed run Crashed), or a claim older than ``stale_after_s``.
    """
    if not claim:
        return "no readable claim (a run stopped while claiming)"
    owner = str(claim.get("run_id"))
    if owner == run_id:
        return "an earlier attempt of this run"
    if claim.get("host") == socket.gethostname() and not _pid_alive(claim.get("pid")):
        return f"its process {claim.get('pid')} on this host has exited"
    final = _flow_run_final(owner)
    if final:
        return f"its flow run {owner} is {final}"
    try:
        age = (datetime.now(UTC) - datetime.fromisoformat(claim["claimed_at"])).total_seconds()
    except (KeyError, TypeError, ValueError):
        return "its claim has no readable time"
    return f"it was claimed {age:.0f} s ago" if age >= stale_after_s else None


def _wait_for_claimant(
    store: Store, version: int, run_id: str, stale_after_s: float, wait_s: float
) -> tuple[dict[str, Any], bytes, str | None]:
    """Poll a live claimant for up to ``wait_s``: it commits (CommitConflict: re-plan on its version) or is gone.

    Returns the claim, its bytes, and why its claimant is gone (None if it still lives after ``wait_s``).
    """
    deadline = time.monotonic() + wait_s
    while True:
        existing, raw = _read_claim(store, version)
        reason = claim_gone(existing, run_id, stale_after_s)
        if reason is not None or time.monotonic() >= deadline:
            return existing, raw, reason
        time.sleep(CLAIM_POLL_S)
        if store.fs.exists(f"{store.version_path(version)}/{m.COMMIT_FILE}"):
            raise CommitConflict(f"{store.uri}: version {version} was committed by run {existing.get('run_id')}")


def claim_version(
    store: Store,
    parent_version: int | None,
    run_id: str,
    stale_after_s: float = STALE_AFTER_S,
    wait_s: float = CLAIM_WAIT_S,
) -> int:
    """Claim version parent+1: exclusive create of its ``_claim.json``, or take over a dead run's claim.

    A live claimant is given ``wait_s`` to commit (its run is usually writing for seconds): then this run
    re-plans on that version instead of burning its attempts on conflicts. An uncommitted directory whose
    claimant is gone (``claim_gone``) is taken over: exactly one run wins
    the exclusive create of ``_takeover.<claim digest>.json``, deletes the debris and claims it afresh, so
    version numbers stay contiguous after a crash.

    Raises:
        CommitConflict: a version above the parent is committed, or a live run holds the claim.
    """
    committed = m.latest_version(store.fs, store.dataset_path)
    if committed != parent_version:
        raise CommitConflict(
            f"{store.uri}: version {committed} was committed while this run planned on "
            + (f"version {parent_version}" if parent_version is not None else "an empty dataset")
        )
    # Numbers of versions a person moved aside as damaged stay used: a number always names one content.
    version = max([parent_version or 0, *m.damaged_versions(store.fs, store.dataset_path)]) + 1
    path = store.version_path(version)
    claim = json.dumps(
        {
            "run_id": run_id,
            "parent_version": parent_version,
            "claimed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }
    ).encode()
    store.fs.makedirs(path, exist_ok=True)
    try:
        _create(store, f"{path}/{m.CLAIM_FILE}", claim)
        return version
    except FileExistsError:
        pass
    existing, raw, reason = _wait_for_claimant(store, version, run_id, stale_after_s, wait_s)
    if reason is None:
        raise CommitConflict(
            f"{store.uri}: version {version} is being written by run {existing.get('run_id')} "
            f"(claimed at {existing.get('claimed_at')}); re-run once it has committed"
        )
    try:
        _create(store, f"{path}/_takeover.{sha256(raw)[:16]}.json", claim)
    except FileExistsError as err:
        raise CommitConflict(f"{store.uri}: another run took over uncommitted version {version} just now") from err
    debris = [p for p in store.fs.ls(path, detail=False) if "/_takeover." not in p]
    if any(p.endswith("/" + m.COMMIT_FILE) for p in debris):
        raise CommitConflict(f"{store.uri}: version {version} was committed just now")
    store.fs.rm(debris)
    _create(store, f"{path}/{m.CLAIM_FILE}", claim)
    _logger().warning("publish: took over uncommitted version %d: %s", version, reason)
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
    """Write a claimed version's files (and ``extra`` ones, by name, such as ``assignments.parquet``) and
    commit it. Returns the version's URI.

    Raises:
        CommitConflict: another version was committed above the parent meanwhile; this one stays uncommitted.
    """
    path = store.version_path(version)
    _create(store, f"{path}/{m.MANIFEST_FILE}", manifest_parquet)
    _create(store, f"{path}/{m.REJECTS_FILE}", rejects_parquet)
    _create(store, f"{path}/{m.VALIDATION_FILE}", json.dumps(validation, indent=2, default=str).encode())
    for name, data in (extra or {}).items():
        _create(store, f"{path}/{name}", data)
    committed = m.latest_version(store.fs, store.dataset_path)
    if committed != parent_version:
        raise CommitConflict(f"{store.uri}: version {committed} was committed while version {version} was written")
    try:
        _create(store, f"{path}/{m.COMMIT_FILE}", json.dumps(record, indent=2, sort_keys=True).encode())
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
    """A planned version: its tables, what manifest.json will say of it, and what a person should review."""

    manifest: pd.DataFrame
    rejects: pd.DataFrame
    diff: dict[str, int]
    changes: pd.DataFrame  # per-key differences from the parent (``tasks.diff.manifest_diff``)
    known: pd.DataFrame = field(default_factory=assignments.empty)  # the parent's assignments
    ghost_groups: pd.Series | None = None  # duplicate group of each content gone from the source, by md5
    cross: pd.DataFrame = field(default_factory=pd.DataFrame)  # cross-purpose links found (tasks.duplicates)
    held: pd.DataFrame = field(default_factory=pd.DataFrame)  # new rows held back: they would join two purposes

    # Per-row facts the stages after the split use, kept as manifest columns (left out of the written file) so
    # that they stay aligned with the rows whatever is done to them.
    PLACED = "_placed"  # the split placed the row in this run (not a sticky purpose)
    KNOWN = "_known"  # the row's content's row in ``known`` (-1: new content)

    @property
    def placed(self) -> np.ndarray | None:
        return self.manifest[self.PLACED].to_numpy() if self.PLACED in self.manifest else None

    @property
    def known_rows(self) -> np.ndarray | None:
        return self.manifest[self.KNOWN].to_numpy() if self.KNOWN in self.manifest else None

    @property
    def review(self) -> dict[str, int]:
        """What a person should look at: rows held back, and cross-purpose links found in this run."""
        return {"held_back": len(self.held), "cross_purpose_links": len(self.cross)}

    @property
    def needs_review(self) -> bool:
        return any(self.review.values())


@dataclass(frozen=True)
class Serialized:
    """A candidate as the files of one version."""

    manifest: pd.DataFrame  # first_version filled
    manifest_bytes: bytes
    rejects_bytes: bytes
    assignments_bytes: bytes
    assignments_rows: int


def serialize(candidate: Candidate, version: int) -> Serialized:
    """Fill ``first_version`` of new content with ``version``, carry the assignments, serialize the tables."""
    manifest = candidate.manifest.assign(
        **{m.FIRST_VERSION: candidate.manifest[m.FIRST_VERSION].fillna(version).astype("int32")}
    )
    carried = assignments.carry(candidate.known, manifest, version, candidate.ghost_groups, candidate.known_rows)
    return Serialized(
        manifest=manifest,
        manifest_bytes=m.parquet_bytes(m.to_table(manifest)),
        rejects_bytes=m.parquet_bytes(m.to_table(candidate.rejects, m.REJECTS_SCHEMA)),
        assignments_bytes=m.parquet_bytes(m.to_table(carried, m.ASSIGNMENTS_SCHEMA)),
        assignments_rows=len(carried),
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
    with naming("publish", store.uri):
        version = claim_version(store, parent_version, run_id)
        files = serialize(candidate, version)
        record = commit_record(
            version=version,
            parent_version=parent_version,
            manifest=files.manifest,
            rejects=candidate.rejects,
            diff=candidate.diff,
            manifest_sha256=sha256(files.manifest_bytes),
            rejects_sha256=sha256(files.rejects_bytes),
            assignments_sha256=sha256(files.assignments_bytes),
            assignments_rows=files.assignments_rows,
            review=candidate.review,
            validation=validation,
            commit_guard=store.guard,
            **record_fields,
        )
        extra = {m.ASSIGNMENTS_FILE: files.assignments_bytes, **(extra or {})}
        uri = write_version(
            store, version, parent_version, files.manifest_bytes, files.rejects_bytes, validation, record, extra
        )
        get_run_logger().info("publish: committed version %d at %s (%d rows)", version, uri, len(files.manifest))
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
    with naming("publish", f"{store.uri}/{m.REJECTED_DIR}/{run_id}"):
        uri = write_rejected(store, run_id, validation)
    get_run_logger().error("publish: nothing published; validation result kept at %s", uri)
    return uri
