"""Stage 2, diff: compare the listing with the parent version so only new and changed objects are read.

An object is unchanged when its key, size and etag equal the parent's; its manifest row (or its reject)
is carried over without reading it again. Rejects whose cause may have passed (``changed_during_run``)
are retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from prefect import get_run_logger

from loader import manifest as m
from tasks.policy import stage

RETRY_REASONS = frozenset({"changed_during_run"})
_IDENTITY = [m.KEY, m.SIZE, m.ETAG]


@dataclass(frozen=True)
class Plan:
    """What a run must do, given the listing and the parent version."""

    carried: pd.DataFrame  # parent manifest rows of unchanged objects (path refreshed from the listing)
    carried_rejects: pd.DataFrame  # parent rejects of unchanged objects
    to_inspect: pd.DataFrame  # listing rows of new and changed objects
    removed: int  # parent manifest rows whose key is gone from the source
    removed_rejects: int  # parent rejects whose key is gone from the source

    @property
    def unchanged(self) -> bool:
        """True when the source holds exactly what the parent version describes."""
        return self.to_inspect.empty and self.removed == 0 and self.removed_rejects == 0


def plan_changes(listing: pd.DataFrame, parent: pd.DataFrame | None, parent_rejects: pd.DataFrame | None) -> Plan:
    """Split the listing into carried-over rows and rows to inspect.

    Args:
        listing: path, key, folder, category, size, etag, mtime of every image object now.
        parent: the parent version's manifest rows (None for a first run).
        parent_rejects: the parent version's rejects rows (None for a first run).
    """
    parent = parent if parent is not None else m.empty_frame()
    parent_rejects = parent_rejects if parent_rejects is not None else m.empty_frame(m.REJECTS_SCHEMA)
    now = listing[[m.KEY, m.SIZE, m.ETAG, m.PATH]].rename(columns={m.PATH: "_listed_path"})

    carried = parent.merge(now, on=_IDENTITY, how="inner", validate="one_to_one")
    carried[m.PATH] = carried.pop("_listed_path")
    settled = parent_rejects[~isin(parent_rejects[m.REASON], RETRY_REASONS)]
    carried_rejects = settled.merge(now, on=_IDENTITY, how="inner", validate="one_to_one")
    carried_rejects[m.PATH] = carried_rejects.pop("_listed_path")

    known = pd.concat([carried[m.KEY], carried_rejects[m.KEY]])
    to_inspect = listing[~isin(listing[m.KEY], known)].reset_index(drop=True)
    return Plan(
        carried=carried.sort_values(m.KEY, ignore_index=True),
        carried_rejects=carried_rejects[list(m.REJECT_COLUMNS)].sort_values(m.KEY, ignore_index=True),
        to_inspect=to_inspect,
        removed=int((~isin(parent[m.KEY], listing[m.KEY])).sum()),
        removed_rejects=int((~isin(parent_rejects[m.KEY], listing[m.KEY])).sum()),
    )


def isin(values: pd.Series, among: Iterable[str]) -> np.ndarray:
    """``values.isin(among)`` for string columns through Arrow's hash lookup: pandas 3 converts Arrow
    strings to Python objects first, 25x slower (1.06 s vs 0.04 s for 100,000 keys)."""
    among = among if isinstance(among, pd.Series) else list(among)
    found = pc.is_in(pa.array(values, type=pa.string()), value_set=pa.array(among, type=pa.string()))
    return found.to_numpy(zero_copy_only=False)


def purpose_moved(changes: pd.DataFrame) -> pd.Series:
    """Which rows of a ``manifest_diff`` are keys kept in both versions whose purpose changed."""
    kept = changes["purpose_before"].notna() & changes["purpose_after"].notna()
    return kept & (changes["purpose_before"] != changes["purpose_after"])


def manifest_diff(parent: pd.DataFrame | None, current: pd.DataFrame) -> pd.DataFrame:
    """Per-key differences between two manifests.

    Returns:
        Rows with key, category, change (``added``, ``removed``, ``changed``), purpose_before and
        purpose_after; unchanged keys are left out. ``changed`` means the content (md5) differs, or the
        purpose does.
    """
    parent = parent if parent is not None else m.empty_frame()
    cols = [m.KEY, m.CATEGORY, m.MD5, m.PURPOSE]
    both = parent[cols].merge(current[cols], on=m.KEY, how="outer", suffixes=("_before", "_after"), indicator=True)
    change = pd.Series("changed", index=both.index, dtype=object)
    change[both["_merge"] == "left_only"] = "removed"
    change[both["_merge"] == "right_only"] = "added"
    same = (
        (both["_merge"] == "both")
        & (both[m.MD5 + "_before"] == both[m.MD5 + "_after"])
        & (both[m.PURPOSE + "_before"] == both[m.PURPOSE + "_after"])
    )
    out = pd.DataFrame(
        {
            m.KEY: both[m.KEY],
            m.CATEGORY: both[m.CATEGORY + "_after"].fillna(both[m.CATEGORY + "_before"]),
            "change": change,
            "purpose_before": both[m.PURPOSE + "_before"],
            "purpose_after": both[m.PURPOSE + "_after"],
        }
    )
    return out[~same].sort_values(m.KEY, ignore_index=True)


@dataclass(frozen=True)
class Parent:
    """The parent version a run builds on (all empty for a first run)."""

    version: int | None
    manifest: pd.DataFrame
    rejects: pd.DataFrame
    info: dict


@stage("load-parent")
def load_parent_task(fs: fsspec.AbstractFileSystem, dataset_path: str) -> Parent:
    """Read the latest committed version, checksum-verified (Prefect task: retries transient errors)."""
    number = m.latest_version(fs, dataset_path)
    if number is None:
        return Parent(None, m.empty_frame(), m.empty_frame(m.REJECTS_SCHEMA), {})
    version = m.open_version(fs.unstrip_protocol(dataset_path), number)
    return Parent(number, m.read_table(version).to_pandas(), m.read_rejects(version).to_pandas(), dict(version.info))


@stage("diff", storage=False)
def diff_task(listing: pd.DataFrame, parent: Parent) -> Plan:
    """Plan what to inspect (Prefect task)."""
    plan = plan_changes(listing, parent.manifest, parent.rejects)
    get_run_logger().info(
        "diff: %d unchanged carried over, %d rejects carried over, %d to inspect, %d removed (parent version %s)",
        len(plan.carried),
        len(plan.carried_rejects),
        len(plan.to_inspect),
        plan.removed,
        parent.version,
    )
    return plan
