"""Stage 4, duplicates: link exact and near duplicates and photos of one item, and group them under sticky
purposes.

Nodes are the samples present now and the *ghosts* (content an earlier version held that is gone). Links:

* exact: samples with the same md5;
* near: phash within the threshold (:mod:`tasks.near`). A daily run searches only new content against all
  (``incremental``) and joins old content through the groups recorded for it; a changed threshold, or a
  parent whose hashes are not exact, regroups everything;
* items: the same item id, either the one content keeps from its first assignment or the one the current
  ``--uniqueness`` gives its key now (a renamed, moved or copied file brings both).

**Sticky purposes** (:func:`sticky_components`): content that holds a purpose keeps it. A link between two
contents that hold different purposes is never merged: it is *cut* and reported as a cross-purpose pair
for a person. New content whose links reach two purposes is *held* back. Every other component holds at most
one purpose, which its new members inherit; duplicate groups and split units are such components.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from prefect import get_run_logger

from loader import manifest as m
from tasks.assignments import index_of
from tasks.near import near_links
from tasks.policy import stage

PURPOSE_CODES = {purpose: code for code, purpose in enumerate(m.PURPOSES)}
CROSS_COLUMNS = (
    "link",
    "key",
    "purpose",
    "item",
    "present",
    "other_key",
    "other_purpose",
    "other_item",
    "other_present",
)


def connected_components(n: int, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Label the connected components of an undirected graph on ``n`` nodes given as edge arrays.

    Returns, for each node, the smallest node index in its component. Vectorized union-find: hook the
    larger root under the smaller for every edge, compress paths, repeat until every edge is inside one
    component. Parents always point to smaller indices, so no cycle can form.
    """
    labels = np.arange(n, dtype=np.int64)
    left = np.asarray(left, dtype=np.int64)
    right = np.asarray(right, dtype=np.int64)
    while len(left):
        a, b = labels[left], labels[right]
        differ = a != b
        if not differ.any():
            break
        left, right, a, b = left[differ], right[differ], a[differ], b[differ]  # settled edges stay settled
        np.minimum.at(labels, np.maximum(a, b), np.minimum(a, b))
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return labels


def same_value_links(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each position to the first position with the same code (codes < 0 are ungrouped)."""
    codes = np.asarray(codes, dtype=np.int64)
    valid = np.flatnonzero(codes >= 0)
    if not len(valid):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    first = np.full(int(codes.max()) + 1, len(codes), dtype=np.int64)
    np.minimum.at(first, codes[valid], valid)
    right = first[codes[valid]]
    keep = valid != right
    return valid[keep], right[keep]


@dataclass(frozen=True)
class Components:
    """Connected components under sticky purposes."""

    labels: np.ndarray  # per node: the smallest node of its component (held nodes stand alone)
    held: np.ndarray  # per node: free, and its links reach two purposes
    cut: tuple[np.ndarray, np.ndarray]  # links between nodes that hold different purposes: not merged
    reach: tuple[np.ndarray, np.ndarray]  # (held node, locked node it links to through free nodes)


def sticky_components(n: int, left: np.ndarray, right: np.ndarray, locks: np.ndarray) -> Components:
    """Connected components in which no two purposes ever meet.

    Args:
        n: number of nodes.
        left, right: links between nodes.
        locks: per node, the purpose code it already holds, or -1 (free).

    A link between two locked nodes of different purposes is cut. A free node whose free neighbourhood
    (the component of free nodes around it) links to locked nodes of two purposes is held, with that whole
    neighbourhood. Once those are removed, every component holds at most one purpose: locked nodes of
    different purposes are joined only through free nodes, and those that join them are held.
    """
    left, right = np.asarray(left, dtype=np.int64), np.asarray(right, dtype=np.int64)
    locks = np.asarray(locks, dtype=np.int64)
    locked = locks >= 0
    cross = locked[left] & locked[right] & (locks[left] != locks[right])
    cut = (left[cross], right[cross])
    left, right = left[~cross], right[~cross]
    labels = connected_components(n, left, right)
    held = np.zeros(n, dtype=bool)
    reach = (np.empty(0, np.int64), np.empty(0, np.int64))
    low, high = _purpose_range(labels, locks)
    if (low < high).any():
        free = ~locked
        inner = free[left] & free[right]
        neighbourhood = connected_components(n, left[inner], right[inner])
        border = free[left] != free[right]
        side = np.where(free[left[border]], left[border], right[border])
        other = np.where(free[left[border]], right[border], left[border])
        low = np.full(n, np.iinfo(np.int64).max)
        high = np.full(n, -1)
        np.minimum.at(low, neighbourhood[side], locks[other])
        np.maximum.at(high, neighbourhood[side], locks[other])
        held = free & (low[neighbourhood] < high[neighbourhood])
        keep = ~held[left] & ~held[right]
        labels = connected_components(n, left[keep], right[keep])
        touching = held[side]
        reach = (side[touching], other[touching])
    return Components(labels=labels, held=held, cut=cut, reach=reach)


def _purpose_range(labels: np.ndarray, locks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per component label: the lowest and highest purpose code among its locked nodes (max int, -1: none)."""
    locked = locks >= 0
    low = np.full(len(labels), np.iinfo(np.int64).max)
    high = np.full(len(labels), -1)
    np.minimum.at(low, labels[locked], locks[locked])
    np.maximum.at(high, labels[locked], locks[locked])
    return low, high


@dataclass(frozen=True)
class Grouping:
    """The samples grouped under sticky purposes, and what a person should look at."""

    samples: pd.DataFrame  # present rows less ``held``: unique_id (kept by known content), duplicate_group,
    #                        purpose (known or inherited; null for free units), first_version, unit
    known: np.ndarray  # per row of ``samples``, its content's row in the assignments (-1: new content)
    held: pd.DataFrame  # new rows whose links reach two purposes, with a ``detail`` naming them
    cross: pd.DataFrame  # CROSS_COLUMNS: links cut between contents of different purposes
    ghost_groups: pd.Series  # duplicate_group of each ghost, indexed by md5


def group(
    samples: pd.DataFrame,
    assignments: pd.DataFrame,
    threshold: int,
    incremental: bool,
    new_keys: np.ndarray | None = None,
) -> Grouping:
    """Group present samples and ghosts by exact, near and item links under sticky purposes.

    Args:
        samples: present rows with key, category, md5, phash and ``unique_id`` as the current uniqueness
            spec gives it.
        assignments: the parent's assignments (every content ever assigned).
        threshold: phash distance of a near duplicate; negative: exact duplicates only.
        incremental: search near pairs only from new content, joining old content through its recorded
            groups (valid when the parent's hashes are exact and its threshold is this one).
        new_keys: per sample, whether its key is new or changed in this run; cross-purpose pairs are
            reported only where one side is (a cold regroup, ``None``, reports them all).
    """
    samples = samples.reset_index(drop=True)
    n = len(samples)
    known = index_of(samples[m.MD5], assignments[m.MD5])
    present = np.zeros(len(assignments), dtype=bool)
    present[known[known >= 0]] = True
    ghost = np.flatnonzero(~present)
    nodes = n + len(ghost)
    source = np.concatenate([np.where(known >= 0, known, -1), ghost])  # each node's assignment row, or -1
    assigned = source >= 0

    def from_assignments(column: str, fill: object) -> np.ndarray:
        values = assignments[column].to_numpy()[np.where(assigned, source, 0)] if len(assignments) else None
        out = np.full(nodes, fill, dtype=object if values is None or values.dtype == object else values.dtype)
        if values is not None:
            out[assigned] = values[assigned]
        return out

    codes, purposes_seen = pd.factorize(from_assignments(m.PURPOSE, None)[assigned])
    locks = np.full(nodes, -1, dtype=np.int64)
    locks[assigned] = np.array([PURPOSE_CODES[p] for p in purposes_seen], dtype=np.int64)[codes]
    md5 = np.concatenate([samples[m.MD5].to_numpy(object), assignments[m.MD5].to_numpy(object)[ghost]])
    hashes = np.concatenate([samples[m.PHASH].to_numpy(np.uint64), assignments[m.PHASH].to_numpy(np.uint64)[ghost]])
    computed = samples[m.UNIQUE_ID].to_numpy(object)
    kept = from_assignments(m.UNIQUE_ID, None)
    item = np.where(assigned, kept, np.concatenate([computed, np.full(len(ghost), None, object)]))
    old_group = from_assignments(m.DUPLICATE_GROUP, None)
    keys = np.concatenate([samples[m.KEY].to_numpy(object), assignments[m.KEY].to_numpy(object)[ghost]])

    exact = same_value_links(pd.factorize(samples[m.MD5])[0])
    if incremental:
        near = near_links(hashes, threshold, new=~assigned)
        recorded = same_value_links(pd.factorize(pd.Series(old_group, dtype=object))[0])
    else:
        near, recorded = near_links(hashes, threshold), (np.empty(0, np.int64),) * 2
    duplicate_edges = [np.concatenate(e) for e in zip(exact, near, recorded, strict=True)]
    # Item links: the id each node keeps, and for known samples whose key gives another id now (renamed,
    # moved, copied, or a changed --uniqueness), that one too, in one code space.
    renamed = np.flatnonzero(assigned[:n] & (computed != item[:n]))
    ids = pd.factorize(pd.Series(np.concatenate([item, computed[renamed]]), dtype=object))[0]
    entry_node = np.concatenate([np.arange(nodes), renamed])
    a, b = same_value_links(ids)
    item_edges = [entry_node[a], entry_node[b]]

    units = sticky_components(
        nodes,
        np.concatenate([duplicate_edges[0], item_edges[0]]),
        np.concatenate([duplicate_edges[1], item_edges[1]]),
        locks,
    )
    held = units.held
    left, right = duplicate_edges
    keep = ~held[left] & ~held[right] & ~((locks[left] >= 0) & (locks[right] >= 0) & (locks[left] != locks[right]))
    duplicate_labels = connected_components(nodes, left[keep], right[keep])
    group_ids = _group_ids(duplicate_labels, old_group, md5)

    inherited = _purpose_range(units.labels, locks)[1][units.labels]  # components hold one purpose at most
    purposes = np.array([*m.PURPOSES, None], dtype=object)[np.where(inherited >= 0, inherited, len(m.PURPOSES))]
    first_version = pd.Series(from_assignments(m.FIRST_VERSION, -1)[:n], dtype="Int32")
    out = samples.assign(
        **{
            m.UNIQUE_ID: item[:n],
            m.DUPLICATE_GROUP: group_ids[:n],
            m.PURPOSE: purposes[:n],
            m.FIRST_VERSION: first_version.where(first_version >= 0).to_numpy(),  # pd.NA: new content
            "unit": units.labels[:n],
        }
    )
    kept_rows = ~held[:n]
    return Grouping(
        samples=out[kept_rows].reset_index(drop=True) if not kept_rows.all() else out,
        known=known[kept_rows],
        held=_held(samples, units, keys, locks),
        cross=_cross(units.cut, hashes, threshold, item, locks, keys, n, new_keys),
        ghost_groups=pd.Series(group_ids[n:], index=md5[n:], dtype=object),
    )


def _group_ids(labels: np.ndarray, old: np.ndarray, md5: np.ndarray) -> np.ndarray:
    """A duplicate group id per node (None when alone). A group keeps the smallest recorded id among its
    members that no other group kept; a new group is ``dup-`` and the first 16 hex digits of its smallest md5."""
    sizes = np.bincount(labels, minlength=len(labels))[labels]
    grouped = sizes > 1
    frame = pd.DataFrame({"label": labels[grouped], "old": old[grouped], "md5": md5[grouped]})
    claims = frame.dropna(subset=["old"]).drop_duplicates(["old", "label"])
    kept = claims.sort_values(["old", "label"]).drop_duplicates("old")  # a split group: one part keeps the id
    kept = kept.sort_values(["label", "old"]).drop_duplicates("label").set_index("label")["old"]
    ids = "dup-" + frame.groupby("label")["md5"].min().str[:16]
    clash = ids.isin(set(kept))
    ids[clash] = ids[clash] + "-" + ids.index[clash].astype(str)
    ids.loc[kept.index] = kept
    out = np.full(len(labels), None, dtype=object)
    out[grouped] = ids.reindex(labels[grouped]).to_numpy()
    return out


def _held(samples: pd.DataFrame, units: Components, keys: np.ndarray, locks: np.ndarray) -> pd.DataFrame:
    """The held rows, each with a detail naming content of each purpose its links reach (two keys each)."""
    held = np.flatnonzero(units.held[: len(samples)])
    side, other = units.reach
    reached = pd.DataFrame(
        {"held": side, "purpose": np.array(m.PURPOSES, dtype=object)[locks[other]], "key": keys[other]}
    )
    named: dict[int, list[str]] = {}
    for (node, purpose), rows in (
        reached.drop_duplicates().sort_values(["held", "purpose", "key"]).groupby(["held", "purpose"], sort=True)
    ):
        named.setdefault(int(node), []).append(f"{purpose}: {', '.join(rows['key'].head(2))}")
    detail = [
        "linked (same item, exact or near copy) to content in two purposes "
        f"({'; '.join(named.get(int(node), [])) or 'through other new images'}); review, and remove one side"
        for node in held
    ]
    return samples.iloc[held].reset_index(drop=True).assign(detail=detail)


def _cross(
    cut: tuple[np.ndarray, np.ndarray],
    hashes: np.ndarray,
    threshold: int,
    item: np.ndarray,
    locks: np.ndarray,
    keys: np.ndarray,
    n: int,
    new_keys: np.ndarray | None,
) -> pd.DataFrame:
    """The cut links, one row each, naming both sides (a ghost by the key it was last seen under)."""
    left, right = np.minimum(*cut), np.maximum(*cut)  # a present sample first, where there is one
    if new_keys is not None:
        fresh = np.zeros(len(keys), dtype=bool)
        fresh[:n] = new_keys
        left, right = left[fresh[left] | fresh[right]], right[fresh[left] | fresh[right]]
    purposes = np.array(m.PURPOSES, dtype=object)
    near = (threshold >= 0) & (np.bitwise_count(hashes[left] ^ hashes[right]) <= threshold)
    link = np.where(item[left] == item[right], "item", np.where(near, "near", "item"))
    frame = pd.DataFrame(
        {
            "link": link,
            "key": keys[left],
            "purpose": purposes[locks[left]],
            "item": item[left],
            "other_key": keys[right],
            "other_purpose": purposes[locks[right]],
            "present": left < n,
            "other_item": item[right],
            "other_present": right < n,
        },
        columns=list(CROSS_COLUMNS),
    )
    return frame.sort_values(["key", "other_key"], ignore_index=True)


@stage("duplicates", storage=False)
def duplicates_task(
    samples: pd.DataFrame,
    assignments: pd.DataFrame,
    threshold: int,
    incremental: bool,
    new_keys: np.ndarray | None = None,
) -> Grouping:
    """Group duplicates and items across the whole dataset, deleted content included (Prefect task)."""
    grouped = group(samples, assignments, threshold, incremental, new_keys)
    groups = grouped.samples[m.DUPLICATE_GROUP]
    get_run_logger().info(
        "duplicates: %d groups over %d rows (%s); %d held back, %d cross-purpose links",
        groups.nunique(),
        groups.notna().sum(),
        "new content searched against all" if incremental else "whole dataset searched",
        len(grouped.held),
        len(grouped.cross),
    )
    return grouped
