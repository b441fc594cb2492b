"""Before any work: prove that the manifest store honours exclusive create, which the commit protocol
(``tasks.publish``) rests on, or refuse to publish there.

The probe creates one small object exclusively, twice, under the dataset's folder: the first create must
succeed (the store is writable) and the second must fail. Many S3-compatible stores (older MinIO and Ceph
releases, NAS gateways, test servers) accept ``If-None-Match: *`` and overwrite anyway; on those two runs
could both "commit" one version, the later overwriting the earlier's files. Such a store is refused, unless
the run opted in to the documented alternative: the dataset's one-slot Prefect global concurrency limit,
which the flow holds for the whole run, serializes every run of the dataset instead (docs/storage.md).
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import replace
from datetime import UTC, datetime

from prefect import get_client, get_run_logger
from prefect.exceptions import ObjectNotFound

from strata.config import CONCURRENCY_LIMIT, EXCLUSIVE_CREATE
from strata.deployments import limit_name
from strata.errors import UnsafeStore
from strata.storage import naming
from tasks.policy import stage
from tasks.publish import Store, _create, _logger

PROBE_PREFIX = "_probe."  # <dataset>/_probe.<random>.json: deleted after the probe; readers ignore it


def honours_exclusive_create(store: Store, run_id: str) -> bool:
    """Whether a second exclusive create of one object fails, as the commit protocol needs.

    Creates ``<dataset>/_probe.<random>.json`` (a few hundred bytes naming this run), then tries again, then
    deletes it. Needs the right to create (and, to leave nothing behind, to delete) objects there.

    Raises:
        StorageError: the first create failed: the store is not writable with these credentials.
    """
    path = f"{store.dataset_path}/{PROBE_PREFIX}{uuid.uuid4().hex}.json"
    body = json.dumps(
        {
            "what": "strata's exclusive-create probe; safe to delete",
            "run_id": run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    ).encode()
    probe = replace(store, guard=EXCLUSIVE_CREATE)  # the store's own conditional create, whatever the run chose
    with naming("probe", store.fs.unstrip_protocol(path)):
        store.fs.makedirs(store.dataset_path, exist_ok=True)
    try:
        _create(probe, path, body, stage="probe")
    except FileExistsError:
        pass  # the name is random: only a retry of this very request (its reply lost) can have created it
    try:
        _create(probe, path, body, stage="probe")
        honoured = False
    except FileExistsError:
        honoured = True
    try:
        store.fs.rm_file(path)
    except OSError as err:  # no delete permission: the probe stays, harmless; say where
        _logger().warning("probe: could not delete %s (%s); it is safe to delete", store.fs.unstrip_protocol(path), err)
    return honoured


def _limit_problem(name: str | None, dataset: str) -> str | None:
    """Why the dataset's concurrency limit cannot serialize its runs, or None when the flow holds it."""
    wanted = limit_name(dataset)
    if name is None:
        return f"the global concurrency limit {wanted!r} does not exist on this run's Prefect API"
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return f"the global concurrency limit {name!r} was deleted during the run"
    if limit.limit != 1 or not limit.active:
        return f"the global concurrency limit {name!r} has {limit.limit} slots (active: {limit.active}), not 1 active"
    return None


def choose_guard(store: Store, dataset: str, requested: str, held_limit: str | None, run_id: str) -> Store:
    """The store with the guard its commits will use: exclusive create where the probe shows the store
    honours it, the held concurrency limit where it does not and the run opted in.

    Args:
        store: the dataset's store.
        dataset: the dataset name (its limit is ``strata-dataset-<dataset>``).
        requested: ``exclusive-create`` (the default) or ``concurrency-limit`` (the opt-in).
        held_limit: the concurrency limit the flow holds for this whole run, or None.
        run_id: names this run in the probe object.

    Raises:
        UnsafeStore: the store ignores exclusive create and the run did not opt in, or the opt-in's
            concurrency limit does not serialize the dataset's runs.
    """
    logger = _logger()
    if honours_exclusive_create(store, run_id):
        if requested == CONCURRENCY_LIMIT:
            logger.info("probe: %s honours exclusive create; commits use it, not the concurrency limit", store.uri)
        return replace(store, guard=EXCLUSIVE_CREATE)
    refusal = (
        f"{store.uri} does not honour exclusive create: a second conditional create (If-None-Match: *) of one "
        "probe object succeeded instead of failing, so two runs could overwrite each other's versions. "
    )
    if requested != CONCURRENCY_LIMIT:
        raise UnsafeStore(
            refusal + "Nothing was published. Use a store with conditional writes (AWS S3, or an S3-compatible "
            "server that implements If-None-Match on PUT), or opt in to serializing runs by Prefect instead: "
            f"`--commit-guard {CONCURRENCY_LIMIT}` (CurateOptions(commit_guard={CONCURRENCY_LIMIT!r})), which "
            f"requires the one-slot global concurrency limit {limit_name(dataset)!r} on the Prefect API every run "
            "of the dataset uses (docs/storage.md, 'Stores without conditional writes')"
        )
    problem = _limit_problem(held_limit, dataset)
    if problem:
        raise UnsafeStore(
            refusal + f"The opt-in --commit-guard {CONCURRENCY_LIMIT} needs that limit, but {problem}. Nothing was "
            f"published. Create it (`prefect global-concurrency-limit create {limit_name(dataset)} --limit 1`, "
            "or deploy / `strata serve`, which create it) and run against that Prefect server"
        )
    logger.warning(
        "probe: %s ignores exclusive create; commits are serialized by the concurrency limit %r (opted in), "
        "and manifest.json records it",
        store.uri,
        held_limit,
    )
    return replace(store, guard=CONCURRENCY_LIMIT)


@stage("probe")
def guard_task(store: Store, dataset: str, requested: str, held_limit: str | None, run_id: str) -> Store:
    """Probe the manifest store before any work and choose the commit guard (Prefect task)."""
    guarded = choose_guard(store, dataset, requested, held_limit, run_id)
    get_run_logger().info("probe: %s is writable; commits use %s", store.uri, guarded.guard)
    return guarded
