"""The curation flow: check -> list -> diff -> inspect -> duplicates -> split -> validate -> publish -> report."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from prefect import flow, get_client, get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectNotFound
from prefect.runtime import flow_run
from prefect.states import Completed, Failed, State

from flows.runners import chunk_size, in_flight, task_runner
from loader import manifest as m
from strata import outcome as outcomes
from strata.config import DEFAULT_MANIFEST_ROOT, CurateOptions
from strata.deployments import limit_name
from strata.errors import CommitConflict, NeedsReview, ValidationFailed
from tasks.checks import Places, check_task, uniqueness_task
from tasks.commit_guard import guard_task
from tasks.diff import (
    LISTED,
    Parent,
    Plan,
    diff_task,
    isin,
    load_parent_task,
    manifest_diff,
    purpose_changes,
    summarize_changes,
)
from tasks.duplicates import duplicates_task
from tasks.expectations import import_in_background, validate_task
from tasks.grid import grid_task
from tasks.inspect import INSPECT_COLUMNS, inspect_objects, inspect_task
from tasks.listing import LISTING_COLUMNS, Listing, list_task
from tasks.publish import Candidate, publish_task, reject_task
from tasks.report import CurateSummary, Result, artifact_key, report_task
from tasks.split import split_task, unique_ids

COMMIT_ATTEMPTS = 3
PROGRESS_EVERY_S = 10.0  # inspect logs progress at least this often, and at every tenth of the objects


@flow(name="curate-dataset", flow_run_name="{dataset}", log_prints=True)
def curate_dataset(
    source: str,
    dataset: str,
    manifest_root: str = DEFAULT_MANIFEST_ROOT,
    options: CurateOptions = CurateOptions(),
) -> State:
    """Curate the images under ``source`` into a new version of ``dataset`` under ``manifest_root``.

    The run ends in one of the outcomes of ``strata.outcome``: ``Published`` and ``Unchanged`` complete;
    ``Needs review`` and ``Failed validation`` fail (their data: :class:`~strata.errors.NeedsReview` or
    :class:`~strata.errors.ValidationFailed`, each carrying the run's summary), so that they stand out in the
    run list. Runs of one dataset take turns on the global concurrency limit ``strata-dataset-<dataset>`` when
    it exists (deploying or serving creates it); without it the commit protocol still keeps the store whole.

    Args:
        source: a folder or bucket prefix (any fsspec URL or local path) with one sub-folder per class.
        dataset: the dataset name (lowercase letters, digits and dashes); versions go to
            ``<manifest_root>/<dataset>/v000001``, ...
        manifest_root: where manifests live (fsspec URL or local path).
        options: split, seed, stratification, uniqueness and duplicate settings.
    """
    places = check_task(source, dataset, manifest_root, options)
    _tag_run(dataset)
    with _dataset_turn(dataset) as held_limit:
        store = guard_task(places.store, dataset, options.commit_guard, held_limit, str(flow_run.id))
        places = replace(places, store=store)
        import_in_background()
        listing = list_task(places.source_fs, places.source_root, places.source_uri)
        result = _with_replan(lambda inspector: _attempt(places, listing, options, inspector))
    summary = report_task(places.store, result, listing, parameters=options.recorded())
    _name_run(summary)
    return _final_state(summary)


@dataclass(frozen=True)
class _Inspector:
    """Inspects objects, remembering what it read, so that a re-plan reads only what is new to this run."""

    fs: fsspec.AbstractFileSystem
    options: CurateOptions
    dataset: str
    dataset_uri: str
    read: list[pd.DataFrame] = field(default_factory=list)
    rejected: list[pd.DataFrame] = field(default_factory=list)

    def __call__(self, plan: Plan) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Accepted rows and rejects for every object the plan inspects (read now, or by an earlier attempt)."""
        identity = [m.KEY, m.SIZE, m.ETAG]
        seen = pd.concat([f[identity] for f in self.read + self.rejected], ignore_index=True) if self.read else None
        fresh = (
            plan.to_inspect if seen is None else plan.to_inspect.merge(seen, on=identity, how="left", indicator=True)
        )
        if seen is not None:
            fresh = fresh[fresh["_merge"] == "left_only"].drop(columns="_merge")
        good, bad = _inspect(self.fs, fresh.reset_index(drop=True), self.options, self.dataset, self.dataset_uri)
        self.read.append(good)
        self.rejected.append(bad)
        # Frames are joined only with frames that hold every column: concatenating with one that lacks the
        # uint64 phash would turn it into float64 and drop its low bits.
        accepted = pd.concat(self.read, ignore_index=True).merge(plan.to_inspect[identity], on=identity)
        rejects = pd.concat(self.rejected, ignore_index=True).merge(plan.to_inspect[identity], on=identity)
        return accepted, rejects


def _with_replan(attempt: Callable[[_Inspector], Result]) -> Result:
    """Run ``attempt`` until it is not beaten to its commit: a run that loses the race re-plans on the winner's
    version (reading only what is new), up to ``COMMIT_ATTEMPTS`` times."""
    inspector: _Inspector | None = None
    for number in range(1, COMMIT_ATTEMPTS + 1):
        try:
            return attempt(inspector)
        except _Replan as replan:
            inspector = replan.inspector
            if number == COMMIT_ATTEMPTS:
                raise CommitConflict(f"{replan.conflict}; gave up after {number} attempts: re-run the flow") from None
            get_run_logger().warning(
                "publish: %s; re-planning on the new version (attempt %d)", replan.conflict, number + 1
            )
    raise AssertionError("unreachable")


class _Replan(Exception):
    def __init__(self, conflict: CommitConflict, inspector: _Inspector) -> None:
        self.conflict, self.inspector = conflict, inspector


def _attempt(places: Places, listing: Listing, options: CurateOptions, inspector: _Inspector | None) -> Result:
    """One pass from the parent version to a published version or another outcome, as its stages read."""
    inspector = inspector or _Inspector(places.source_fs, options, places.dataset, places.store.uri)
    recorded = options.recorded()
    parent = load_parent_task(places.store.fs, places.store.dataset_path)
    plan = diff_task(listing.objects, parent)
    same_place = parent.info.get("source") == places.source_uri and parent.info.get("parameters") == recorded
    if plan.unchanged and parent.exact and same_place:
        return Result(outcomes.UNCHANGED, parent)
    uniqueness_task(plan.to_inspect, options)
    inspected, inspect_rejects = inspector(plan)
    candidate = _plan_candidate(parent, plan, inspected, inspect_rejects, options)
    if parent.version is not None and parent.exact and _same_content(candidate, parent):
        return Result(outcomes.UNCHANGED, parent, candidate)
    validation = validate_task(candidate, parent, options)
    if not validation["success"]:
        kept = reject_task(places.store, str(flow_run.id), validation)
        held = outcomes.NEEDS_REVIEW if validation.get("look_alike") else outcomes.FAILED_VALIDATION
        return Result(
            held, parent, candidate, validation, rejected_at=kept, advice=_look_alike_advice(validation, options)
        )
    grid = grid_task(places.source_fs, candidate.manifest)
    fields = {
        "dataset": places.dataset,
        "source": places.source_uri,
        "parameters": recorded,
        "flow_run_id": flow_run.id,
    }
    try:
        version, uri = publish_task(
            places.store, candidate, parent.version, validation, fields, str(flow_run.id), {m.GRID_FILE: grid}
        )
    except CommitConflict as conflict:
        raise _Replan(conflict, inspector) from None
    review = candidate.needs_review or len(parent.moved) > 0
    outcome = outcomes.NEEDS_REVIEW if review else outcomes.PUBLISHED
    return Result(outcome, parent, candidate, validation, (version, uri, grid))


def _inspect(
    fs: Any, objects: pd.DataFrame, options: CurateOptions, dataset: str, dataset_uri: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Inspect objects in parallel chunks (threads, or Dask with ``options.dask``), a bounded number in flight
    and collected in order, reporting progress in the log and as a Prefect progress artifact."""
    logger = get_run_logger()
    if objects.empty:  # still the inspect columns and their dtypes: a frame that lacks them turns phash to float
        return inspect_objects(objects, read=bytes)
    size = chunk_size(len(objects), options.chunk_size)
    chunks = [objects.iloc[i : i + size] for i in range(0, len(objects), size)]
    limit = in_flight(options.dask)
    accepted, rejects, done, total = [], [], 0, len(objects)
    progress = create_progress_artifact(
        0.0, key=artifact_key(dataset_uri, dataset, "inspect"), description=f"{dataset}: objects inspected, percent"
    )
    reported, last = 0.0, time.monotonic()

    def report(waiting: bool = False) -> None:
        nonlocal reported, last
        logger.info("inspect: %d/%d objects read%s", done, total, " (reading ...)" if waiting else "")
        update_progress_artifact(progress, 100.0 * done / total)
        reported, last = done / total, time.monotonic()

    with task_runner(options.dask) as submit:
        if options.dask:
            logger.info("inspect: %d tasks on Dask (%s)", len(chunks), options.dask)
        pending: deque = deque()
        upcoming = iter(chunks)
        for chunk in upcoming:
            pending.append(submit(inspect_task, fs=fs, objects=chunk, max_pixels=options.max_pixels))
            while pending and (len(pending) >= limit or chunk is chunks[-1]):
                oldest = pending[0]
                while not _wait(oldest, PROGRESS_EVERY_S - (time.monotonic() - last)):
                    report(waiting=True)
                good, bad = pending.popleft().result()
                accepted.append(good)
                rejects.append(bad)
                done += len(good) + len(bad)
                if done == total or done / total - reported >= 0.1 or time.monotonic() - last >= PROGRESS_EVERY_S:
                    report()
    return pd.concat(accepted, ignore_index=True), pd.concat(rejects, ignore_index=True)


def _wait(future: Any, seconds: float) -> bool:
    """Whether the future finished within ``seconds`` (at least a tenth of a second)."""
    future.wait(timeout=max(0.1, seconds))
    return future.state.is_final()


def _plan_candidate(
    parent: Parent, plan: Plan, inspected: pd.DataFrame, inspect_rejects: pd.DataFrame, options: CurateOptions
) -> Candidate:
    """Join carried and new rows, group them with every content ever assigned, and split what is new."""
    # What the listing and inspect know of a sample; its item, group, purpose and first version come from
    # the assignments (by content), whatever the carried row said.
    columns = [*LISTING_COLUMNS, *INSPECT_COLUMNS, LISTED]
    samples = pd.concat(
        [plan.carried[columns].assign(_new=False), inspected[columns].assign(_new=True)], ignore_index=True
    )
    samples = samples.iloc[np.argsort(samples[LISTED].to_numpy(), kind="stable")].reset_index(drop=True)  # key order
    samples[m.UNIQUE_ID], fallback = unique_ids(samples, options.uniqueness)
    if fallback and options.uniqueness:
        get_run_logger().warning(
            "uniqueness: %d keys do not match %r and count as their own item (md5)", fallback, options.uniqueness
        )
    incremental = parent.version is not None and parent.exact and parent.threshold == options.near_duplicates
    grouping = duplicates_task(
        samples.drop(columns=["_new", LISTED]),
        parent.assignments,
        options.near_duplicates,
        incremental,
        samples["_new"].to_numpy() if incremental else None,
    )
    split = split_task(
        grouping.samples, options.split, options.seed, options.stratify, grouping.samples["unit"].to_numpy()
    )
    facts = {Candidate.PLACED: grouping.samples[m.PURPOSE].isna().to_numpy(), Candidate.KNOWN: grouping.known}
    kept = slice(None) if split.held_out.empty else ~isin(grouping.samples[m.KEY], split.held_out[m.KEY])
    # In key order: every stage keeps the order it was given.
    manifest = split.samples.drop(columns="unit").assign(**{k: v[kept] for k, v in facts.items()})
    held = pd.concat([grouping.held, split.held_out.assign(detail=HELD_DETAIL)], ignore_index=True)
    rejects = pd.concat(
        [
            plan.carried_rejects.assign(new=False),
            inspect_rejects.assign(new=True),
            held.assign(**{m.REASON: "purpose_conflict", m.DETAIL: held["detail"]}).assign(new=True),
        ],
        ignore_index=True,
    )
    changes = manifest_diff(parent.manifest, manifest)
    moved = purpose_changes(manifest, parent.assignments, manifest[Candidate.KNOWN].to_numpy())
    return Candidate(
        manifest=manifest,
        rejects=rejects.sort_values(m.KEY, ignore_index=True)[[*m.REJECT_COLUMNS, "new"]],
        diff=summarize_changes(changes, moved[m.MD5].nunique()),
        changes=changes,
        known=parent.assignments,
        ghost_groups=grouping.ghost_groups,
        cross=grouping.cross,
        held=held,
    )


HELD_DETAIL = "joins items or duplicates already in different purposes; review and remove one"


def _look_alike_advice(validation: dict, options: CurateOptions) -> str:
    """What to do about look-alike units, naming the first ones; empty when there are none."""
    units = validation.get("look_alike") or []
    if not units:
        return ""
    named = "; ".join(
        f"duplicate group {u['unit']} joins {u['items']} items ({u['items_shown']}), {u['share']:.0%} of "
        f"stratum {u['stratum']}"
        for u in units[:3]
    )
    return (
        f"look-alike photos: {named}. Near duplicates chain distinct items together: lower --near-duplicates "
        f"(now {options.near_duplicates}; a changed threshold regroups the whole dataset, purposes never move), or "
        f"raise --max-group-share ({options.max_group_share}) / --max-group-items ({options.max_group_items})"
    )


def _same_content(candidate: Candidate, parent: Parent) -> bool:
    """Whether the candidate describes exactly the parent's rows and rejects."""
    if candidate.manifest[m.FIRST_VERSION].isna().any() or len(candidate.manifest) != len(parent.manifest):
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


@contextmanager
def _dataset_turn(dataset: str) -> Iterator[str | None]:
    """Hold the dataset's concurrency slot for the whole run (waiting for a running one), if the limit exists;
    yields the limit's name, or None."""
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


def _tag_run(dataset: str) -> None:
    """Tag the flow run with its dataset, however it was started (CLI, deployment, serve)."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run.id)
        client.update_flow_run(flow_run.id, tags=sorted({*run.tags, "strata", f"dataset:{dataset}"}))


def _name_run(summary: CurateSummary) -> None:
    """Name the flow run for what it did: ``vials v3`` (the version it published or found unchanged)."""
    name = f"{summary.dataset} v{summary.version}" if summary.version is not None else summary.dataset
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run.id, name=name)


def _final_state(summary: CurateSummary) -> State:
    """The flow run's final state: its outcome's type and name, the summary as its result (or inside the error
    a failed outcome carries)."""
    outcome = outcomes.of(summary.outcome)
    if outcome.state_type == "COMPLETED":
        return Completed(name=outcome.name, message=summary.message, data=summary)
    error = (NeedsReview if outcome is outcomes.NEEDS_REVIEW else ValidationFailed)(summary.message, summary)
    return Failed(name=outcome.name, message=summary.message, data=error)
