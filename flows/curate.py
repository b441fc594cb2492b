"""The curation flow: list -> diff -> inspect -> duplicates -> split -> validate -> publish -> report."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pandas as pd
from prefect import flow, get_client, get_run_logger
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.futures import as_completed
from prefect.runtime import flow_run

from flows.runners import chunk_size, task_runner
from loader import manifest as m
from strata.config import DEFAULT_MANIFEST_ROOT, CurateOptions
from strata.deployments import limit_name
from strata.errors import CommitConflict, ValidationFailed
from strata.storage import open_url
from tasks.commit_guard import guard_task
from tasks.diff import Parent, diff_task, isin, load_parent_task, manifest_diff, purpose_moved
from tasks.duplicates import duplicates_task
from tasks.expectations import validate_task
from tasks.inspect import inspect_task
from tasks.listing import list_task
from tasks.publish import Candidate, Store, publish_task, reject_task
from tasks.report import CurateSummary, grid_task, report_task
from tasks.split import split_task, unique_ids

COMMIT_ATTEMPTS = 3


def _inspect(fs: Any, objects: pd.DataFrame, options: CurateOptions) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspect objects in parallel chunks (threads, or Dask with ``options.dask``), logging progress."""
    logger = get_run_logger()
    if objects.empty:
        return objects.iloc[0:0], m.empty_frame(m.REJECTS_SCHEMA)
    size = chunk_size(len(objects), options.chunk_size)
    chunks = [objects.iloc[i : i + size] for i in range(0, len(objects), size)]
    accepted, rejects, done = [], [], 0
    step = max(1, len(chunks) // 10)
    with task_runner(options.dask) as submit:
        if options.dask:
            logger.info("inspect: %d tasks on Dask (%s)", len(chunks), options.dask)
        futures = [submit(inspect_task, fs=fs, objects=chunk, max_pixels=options.max_pixels) for chunk in chunks]
        for finished, future in enumerate(as_completed(futures), start=1):
            good, bad = future.result()
            accepted.append(good)
            rejects.append(bad)
            done += len(good) + len(bad)
            if finished % step == 0 or finished == len(futures):
                logger.info("inspect: %d/%d objects read", done, len(objects))
    return pd.concat(accepted, ignore_index=True), pd.concat(rejects, ignore_index=True)


def _plan_candidate(
    parent: Parent, plan: Any, inspected: pd.DataFrame, inspect_rejects: pd.DataFrame, options: CurateOptions
) -> Candidate:
    """Join carried and new rows, group duplicates and split them into the candidate version."""
    new = inspected.merge(plan.to_inspect[[m.KEY, m.SIZE, m.ETAG]], on=[m.KEY, m.SIZE, m.ETAG])
    new = new.assign(**{m.DUPLICATE_GROUP: None, m.PURPOSE: None, m.FIRST_VERSION: pd.NA})
    samples = pd.concat([plan.carried, new], ignore_index=True).sort_values(m.KEY, ignore_index=True)
    samples[m.UNIQUE_ID], fallback = unique_ids(samples, options.uniqueness)
    if fallback and options.uniqueness:
        get_run_logger().warning(
            "uniqueness: %d keys do not match %r and count as their own item (md5)", fallback, options.uniqueness
        )
    rejects = pd.concat([plan.carried_rejects, inspect_rejects.merge(plan.to_inspect[[m.KEY, m.SIZE, m.ETAG]])])
    held_out = []
    for _ in range(3):  # rows that would join two purposes are held out, then the groups are recomputed
        grouped = duplicates_task(samples, options.near_duplicates)
        result = split_task(grouped, options.split, options.seed, options.stratify)
        if result.held_out.empty:
            break
        held_out.append(result.held_out)
        samples = samples[~isin(samples[m.KEY], result.held_out[m.KEY])].reset_index(drop=True)
    if held_out:
        conflicts = pd.concat(held_out, ignore_index=True)
        rejects = pd.concat(
            [
                rejects,
                conflicts.assign(
                    **{
                        m.REASON: "purpose_conflict",
                        m.DETAIL: "joins items or duplicates already in different purposes; review and remove one",
                    }
                )[list(m.REJECT_COLUMNS)],
            ]
        )
    manifest = result.samples
    changes = manifest_diff(parent.manifest, manifest)
    diff = {name: int((changes["change"] == name).sum()) for name in ("added", "removed", "changed")}
    diff["purpose_changed"] = int(purpose_moved(changes).sum())
    return Candidate(
        manifest=manifest.sort_values(m.KEY, ignore_index=True),
        rejects=rejects.sort_values(m.KEY, ignore_index=True)[list(m.REJECT_COLUMNS)],
        diff=diff,
        changes=changes,
    )


@flow(name="curate-dataset", log_prints=True)
def curate_dataset(
    source: str,
    dataset: str,
    manifest_root: str = DEFAULT_MANIFEST_ROOT,
    options: CurateOptions = CurateOptions(),
) -> CurateSummary:
    """Curate the images under ``source`` into a new version of ``dataset`` under ``manifest_root``.

    Runs of one dataset take turns on the global concurrency limit ``strata-dataset-<dataset>`` when it
    exists (deploying or serving creates it); without it the commit protocol still keeps the store whole.

    Args:
        source: a folder or bucket prefix (any fsspec URL or local path) with one sub-folder per class.
        dataset: the dataset name; versions go to ``<manifest_root>/<dataset>/v000001``, ...
        manifest_root: where manifests live (fsspec URL or local path).
        options: split, seed, stratification, uniqueness and duplicate settings.
    """
    with _dataset_turn(dataset) as held_limit:
        return _curate(source, dataset, manifest_root, options, held_limit)


@contextmanager
def _dataset_turn(dataset: str) -> Iterator[str | None]:
    """Hold the dataset's concurrency slot for the whole run (waiting for a running one), if the limit exists."""
    logger = get_run_logger()
    name = limit_name(dataset)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            name = None
    if name is None:
        logger.info("no concurrency limit for %r: runs are not serialized (deploying or serving creates it)", dataset)
        yield None
        return
    started = time.monotonic()
    logger.info("waiting for concurrency limit %r (one run of %r at a time)", name, dataset)
    with concurrency(name, occupy=1, strict=True):
        logger.info("concurrency limit %r acquired after %.1f s", name, time.monotonic() - started)
        yield name


def _curate(
    source: str, dataset: str, manifest_root: str, options: CurateOptions, held_limit: str | None
) -> CurateSummary:
    logger = get_run_logger()
    source_fs, source_root = open_url(source, options.storage_options)
    store_fs, root_path = open_url(manifest_root, options.storage_options)
    store = Store(store_fs, f"{root_path.rstrip('/')}/{dataset}")
    store = guard_task(store, dataset, options.commit_guard, held_limit, str(flow_run.id))
    source_uri = source_fs.unstrip_protocol(source_root)
    listing = list_task(source_fs, source_root, source_uri)
    recorded = options.recorded()

    inspected = listing.objects.iloc[0:0]
    inspect_rejects = m.empty_frame(m.REJECTS_SCHEMA)
    attempt = 0
    while True:
        attempt += 1
        parent = load_parent_task(store_fs, store.dataset_path)
        plan = diff_task(listing.objects, parent)
        if plan.unchanged and parent.info.get("parameters") == recorded:
            return report_task(store, parent, None, None, listing, parameters=recorded, no_change=True)
        # Inspect only what no earlier attempt of this run has read.
        seen = inspected[[m.KEY, m.SIZE, m.ETAG]].merge(plan.to_inspect, on=[m.KEY, m.SIZE, m.ETAG])
        fresh = plan.to_inspect[~isin(plan.to_inspect[m.KEY], seen[m.KEY])]
        good, bad = _inspect(source_fs, fresh, options)
        inspected = pd.concat([inspected, good], ignore_index=True)
        inspect_rejects = pd.concat([inspect_rejects, bad], ignore_index=True)

        candidate = _plan_candidate(parent, plan, inspected, inspect_rejects, options)
        if parent.version is not None and _same_content(candidate, parent):
            return report_task(store, parent, None, candidate, listing, parameters=recorded, no_change=True)
        validation = validate_task(candidate, parent, options)
        if not validation["success"]:
            kept = reject_task(store, str(flow_run.id), validation)
            report_task(store, parent, None, candidate, listing, parameters=recorded, validation=validation)
            raise ValidationFailed(
                f"{store.uri}: the candidate manifest failed validation; nothing was published "
                f"(result kept at {kept}). {validation['summary']}"
            )
        grid = {m.GRID_FILE: grid_task(source_fs, candidate.manifest)}
        fields = {"dataset": dataset, "source": source_uri, "parameters": recorded, "flow_run_id": flow_run.id}
        try:
            version, uri = publish_task(store, candidate, parent.version, validation, fields, str(flow_run.id), grid)
        except CommitConflict as err:
            if attempt == COMMIT_ATTEMPTS:
                raise CommitConflict(f"{err}; gave up after {attempt} attempts: re-run the flow") from err
            logger.warning("publish: %s; re-planning on the new version (attempt %d)", err, attempt + 1)
            continue
        return report_task(
            store, parent, (version, uri), candidate, listing, parameters=recorded, validation=validation
        )


def _same_content(candidate: Candidate, parent: Parent) -> bool:
    """Whether the candidate describes exactly the parent's rows and rejects."""
    if candidate.manifest[m.FIRST_VERSION].isna().any():
        return False
    cols = list(m.COLUMNS)
    same_rows = (
        candidate.manifest[cols]
        .reset_index(drop=True)
        .equals(
            parent.manifest[cols]
            .sort_values(m.KEY, ignore_index=True)
            .astype(candidate.manifest[cols].dtypes.to_dict())
        )
    )
    rejects = list(m.REJECT_COLUMNS)
    same_rejects = (
        candidate.rejects[rejects]
        .reset_index(drop=True)
        .astype(str)
        .equals(parent.rejects[rejects].sort_values(m.KEY, ignore_index=True).astype(str))
    )
    return bool(same_rows and same_rejects)
