"""Stage 2, diff: compare the listing with the parent version so only new and changed objects are read.

An object is unchanged when its key, size and etag equal the parent's; its manifest row (or its reject)
is carried over without reading it again. That is only a speed-up: purposes are matched by content (md5)
in the duplicates and split stages, never by key. Rejects whose cause may have passed
(``changed_during_run``, ``purpose_conflict``) are retried. A parent whose phashes are not exact (written
before they were) has every object read again once, to re-hash it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger

from loader import manifest as m
from tasks import assignments
from tasks.policy import stage

# Rejects whose cause may pass: read again by the next run. A held-back image is judged again every run, so
# it is published as soon as a person resolves what it conflicts with.
RETRY_REASONS = frozenset({"changed_during_run", "purpose_conflict"})
CHANGE_COLUMNS = (m.KEY, m.CATEGORY, "change", "purpose_before", "purpose_after", "from_key")
LISTED = "_listed"  # a planned row's position in the listing (key order), so joined rows sort by integers


@dataclass(frozen=True)
class Parent:
    """The parent version a run builds on (all empty for a first run)."""

    version: int | None
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    info: dict
    assignments: pd.DataFrame = field(default_factory=assignments.empty)
    exact: bool = True  # its phashes are exact (versions before that stored them through float64)
    moved: pd.DataFrame = field(default_factory=pd.DataFrame)  # content whose purpose moved between old versions

    @property
    def threshold(self) -> int | None:
        """The near-duplicate threshold the parent was grouped with."""
        return (self.info.get("parameters") or {}).get("near_duplicates")


@dataclass(frozen=True)
class Plan:
    """What a run must do, given the listing and the parent version."""

    carried: pd.DataFrame  # parent manifest rows of unchanged objects (path refreshed from the listing; LISTED)
    carried_rejects: pd.DataFrame  # parent rejects of unchanged objects
    to_inspect: pd.DataFrame  # listing rows of new and changed objects (LISTED)
    removed: int  # parent manifest rows whose key is gone from the source
    removed_rejects: int  # parent rejects whose key is gone from the source

    @property
    def unchanged(self) -> bool:
        """True when the source holds exactly what the parent version describes."""
        return self.to_inspect.empty and self.removed == 0 and self.removed_rejects == 0


def index_of(values: pd.Series, among: pd.Series) -> np.ndarray:
    """Per value, its position in ``among`` (unique values), or -1."""
    return assignments.index_of(values, among)


def isin(values: pd.Series, among: Iterable[str]) -> np.ndarray:
    """``values.isin(among)`` for string columns through Arrow's hash lookup (pandas 3 converts Arrow
    strings to Python objects first, many times slower)."""
    among = among if isinstance(among, pd.Series) else list(among)
    found = pc.is_in(pa.array(values, type=pa.string()), value_set=pa.array(among, type=pa.string()))
    return found.to_numpy(zero_copy_only=False)


def _same_object(listing: pd.DataFrame, parent: pd.DataFrame) -> tuple[np.ndarray, int]:
    """Per listing row, the parent row with the same key, size and etag, or -1; and how many parent keys are
    gone from the listing (keys are unique on both sides)."""
    at = index_of(listing[m.KEY], parent[m.KEY])
    found = np.flatnonzero(at >= 0)
    same = (listing[m.SIZE].to_numpy()[found] == parent[m.SIZE].to_numpy()[at[found]]) & (
        listing[m.ETAG].to_numpy(object)[found] == parent[m.ETAG].to_numpy(object)[at[found]]
    )
    at[found[~same]] = -1
    return at, len(parent) - len(found)


def plan_changes(
    listing: pd.DataFrame, parent: pd.DataFrame | None, parent_rejects: pd.DataFrame | None, reread: bool = False
) -> Plan:
    """Split the listing into carried-over rows and rows to inspect.

    Args:
        listing: path, key, folder, category, size, etag, mtime of every image object now.
        parent: the parent version's manifest rows (None for a first run).
        parent_rejects: the parent version's rejects rows (None for a first run).
        reread: carry no manifest row over (every object is read and hashed again).
    """
    parent = parent if parent is not None else m.empty_frame()
    parent_rejects = parent_rejects if parent_rejects is not None else m.empty_frame(m.REJECTS_SCHEMA)
    rows, removed = _same_object(listing, parent)
    if reread:
        rows[:] = -1
    kept = np.flatnonzero(rows >= 0)
    carried = parent.iloc[rows[kept]].assign(**{m.PATH: listing[m.PATH].to_numpy(object)[kept], LISTED: kept})
    reject_rows, removed_rejects = _same_object(listing, parent_rejects)
    retried = np.append(isin(parent_rejects[m.REASON], RETRY_REASONS), False)  # [-1] reads the False
    reject_rows[(rows >= 0) | retried[reject_rows]] = -1
    kept_rejects = np.flatnonzero(reject_rows >= 0)
    carried_rejects = parent_rejects.iloc[reject_rows[kept_rejects]].assign(
        **{m.PATH: listing[m.PATH].to_numpy(object)[kept_rejects]}
    )
    inspect = np.flatnonzero((rows < 0) & (reject_rows < 0))
    return Plan(
        carried=carried.reset_index(drop=True),
        carried_rejects=carried_rejects[list(m.REJECT_COLUMNS)].reset_index(drop=True),
        to_inspect=listing.iloc[inspect].assign(**{LISTED: inspect}).reset_index(drop=True),
        removed=removed,
        removed_rejects=removed_rejects,
    )


def purpose_moved(changes: pd.DataFrame) -> pd.Series:
    """Which rows of a ``manifest_diff`` are keys kept in both versions whose purpose changed."""
    kept = changes["purpose_before"].notna() & changes["purpose_after"].notna()
    return kept & (changes["purpose_before"] != changes["purpose_after"])


def manifest_diff(parent: pd.DataFrame | None, current: pd.DataFrame) -> pd.DataFrame:
    """Per-key differences between two manifests.

    Returns:
        Rows with key, category, change, purpose_before, purpose_after and from_key; unchanged keys are left
        out. ``changed``: the same key holds other content (md5) or another purpose; ``moved``: content
        under a key that is gone now sits under a new key (``from_key``), in any folder; ``added`` and
        ``removed`` the rest.
    """
    parent = parent if parent is not None else m.empty_frame()
    at = index_of(current[m.KEY], parent[m.KEY])
    both = np.flatnonzero(at >= 0)
    gone_rows = np.ones(len(parent), dtype=bool)
    gone_rows[at[both]] = False
    differs = (current[m.MD5].to_numpy(object)[both] != parent[m.MD5].to_numpy(object)[at[both]]) | (
        current[m.PURPOSE].to_numpy(object)[both] != parent[m.PURPOSE].to_numpy(object)[at[both]]
    )
    changed = current.iloc[both[differs]]
    added = current.iloc[np.flatnonzero(at < 0)]
    removed = parent.iloc[np.flatnonzero(gone_rows)]
    # Moves: a removed key's content under an added key, paired one to one in key order.
    pairs = (
        added[[m.KEY, m.MD5]]
        .assign(_n=added.groupby(m.MD5).cumcount())
        .merge(removed[[m.KEY, m.MD5]].assign(_n=removed.groupby(m.MD5).cumcount()), on=[m.MD5, "_n"])
    )
    moved_from = pd.Series(pairs[m.KEY + "_y"].to_numpy(object), index=pairs[m.KEY + "_x"].to_numpy(object))
    removed_purpose = pd.Series(removed[m.PURPOSE].to_numpy(object), index=removed[m.KEY].to_numpy(object))
    from_key = added[m.KEY].map(moved_from).to_numpy(object)
    is_move = pd.notna(from_key)
    gone = removed[~removed[m.KEY].isin(moved_from)]

    def part(frame: pd.DataFrame, change: object, before: object, after: object, source: object) -> pd.DataFrame:
        columns = [frame[m.KEY].to_numpy(object), frame[m.CATEGORY].to_numpy(object), change, before, after, source]
        return pd.DataFrame(dict(zip(CHANGE_COLUMNS, columns, strict=True)), index=range(len(frame)))

    parts = [
        part(
            added,
            np.where(is_move, "moved", "added"),
            np.where(is_move, pd.Series(from_key).map(removed_purpose).to_numpy(object), None),
            added[m.PURPOSE].to_numpy(object),
            np.where(is_move, from_key, None),
        ),
        part(gone, "removed", gone[m.PURPOSE].to_numpy(object), None, None),
        part(
            changed,
            "changed",
            parent[m.PURPOSE].to_numpy(object)[at[both[differs]]],
            changed[m.PURPOSE].to_numpy(object),
            None,
        ),
    ]
    return pd.concat(parts, ignore_index=True).sort_values(m.KEY, ignore_index=True)


def summarize_changes(changes: pd.DataFrame, purpose_changed: int) -> dict[str, int]:
    """The diff manifest.json records: counts per change, and content whose purpose moved (counted per md5)."""
    counts = {name: int((changes["change"] == name).sum()) for name in ("added", "removed", "changed", "moved")}
    return {**counts, "purpose_changed": purpose_changed}


def purpose_changes(candidate: pd.DataFrame, known: pd.DataFrame, at: np.ndarray | None = None) -> pd.DataFrame:
    """Content the parent's assignments know whose purpose the candidate changes: one row per candidate row,
    with its key, md5, ``purpose_before`` and ``purpose_after``. It must stay empty.

    Args:
        at: per candidate row, its content's row in ``known`` or -1 (looked up when not given).
    """
    at = index_of(candidate[m.MD5], known[m.MD5]) if at is None else at
    found = np.flatnonzero(at >= 0)
    before = known[m.PURPOSE].to_numpy(object)[at[found]]
    after = candidate[m.PURPOSE].to_numpy(object)[found]
    moved = found[before != after]
    return pd.DataFrame(
        {
            m.KEY: candidate[m.KEY].to_numpy(object)[moved],
            m.MD5: candidate[m.MD5].to_numpy(object)[moved],
            "purpose_before": before[before != after],
            "purpose_after": after[before != after],
        }
    )


@stage("load-parent")
def load_parent_task(fs: fsspec.AbstractFileSystem, dataset_path: str) -> Parent:
    """Read the latest committed version and its assignments, checksum-verified (Prefect task: retries
    transient errors). A parent written before assignments were recorded has them rebuilt from every
    committed version, once."""
    number = m.latest_version(fs, dataset_path)
    if number is None:
        return Parent(None, m.empty_frame(), m.empty_frame(m.REJECTS_SCHEMA), {})
    uri = fs.unstrip_protocol(dataset_path)
    version = m.open_version(uri, number)
    manifest = m.read_table(version).to_pandas()
    recorded = m.read_assignments(version, verify=False)  # read_table checked the version whole
    info = dict(version.info)
    if recorded is not None:
        return Parent(
            number, manifest, m.read_rejects(version).to_pandas(), info, recorded.to_pandas(), bool(info["phash_exact"])
        )
    logger = get_run_logger()
    older = [(n, m.read_table(m.open_version(uri, n)).to_pandas()) for n in m.committed_versions(fs, dataset_path)]
    rebuilt, moved = assignments.rebuild(older)
    logger.warning(
        "load-parent: version %d predates recorded assignments and exact phashes: rebuilt the assignments of "
        "%d contents from %d versions (%d moved purpose between them); every object is read again once",
        number,
        len(rebuilt),
        len(older),
        len(moved),
    )
    return Parent(number, manifest, m.read_rejects(version).to_pandas(), info, rebuilt, exact=False, moved=moved)


@stage("diff", storage=False)
def diff_task(listing: pd.DataFrame, parent: Parent) -> Plan:
    """Plan what to inspect (Prefect task)."""
    plan = plan_changes(listing, parent.manifest, parent.rejects, reread=not parent.exact)
    get_run_logger().info(
        "diff: %d unchanged carried over, %d rejects carried over, %d to inspect, %d removed (parent version %s)",
        len(plan.carried),
        len(plan.carried_rejects),
        len(plan.to_inspect),
        plan.removed,
        parent.version,
    )
    return plan
