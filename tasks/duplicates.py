"""Stage 4, duplicates: join exact (same md5) and near (phash Hamming distance <= threshold) duplicates.

Near pairs are found by multi-index hashing: split the 64-bit hash into ``threshold + 1`` bands; two hashes
within the threshold agree exactly on at least one band (pigeonhole), so only rows sharing a band value are
compared. Groups are the connected components of all pairs (union-find, vectorized).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from prefect import get_run_logger

from loader import manifest as m
from tasks.policy import stage


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
        if np.array_equal(a, b):
            break
        np.minimum.at(labels, np.maximum(a, b), np.minimum(a, b))
        while True:
            jumped = labels[labels]
            if np.array_equal(jumped, labels):
                break
            labels = jumped
    return labels


def _bands(threshold: int) -> list[tuple[int, int]]:
    """Split 64 bits into threshold + 1 contiguous bands as (shift, width)."""
    count = threshold + 1
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return list(zip(shifts, widths, strict=False))


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """All index pairs ``i < j`` whose 64-bit hashes differ in at most ``threshold`` bits.

    Exact equality (distance 0) is included. Each pair appears once.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    n = len(hashes)
    if n < 2 or threshold < 0:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if threshold >= 32:  # bands too narrow to prune: compare everything
        i, j = np.triu_indices(n, k=1)
        keep = np.bitwise_count(hashes[i] ^ hashes[j]) <= threshold
        return i[keep].astype(np.int64), j[keep].astype(np.int64)
    found_i, found_j = [], []
    for shift, width in _bands(threshold):
        band = (hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)
        order = np.argsort(band, kind="stable")
        sorted_band = band[order]
        starts = np.flatnonzero(np.r_[True, sorted_band[1:] != sorted_band[:-1]])
        sizes = np.diff(np.r_[starts, n])
        multi = sizes > 1
        starts, sizes = starts[multi], sizes[multi]
        if len(starts) == 0:
            continue
        # Every pair within each run of equal band values: one triu pattern per distinct run size.
        lefts, rights = [], []
        for size in np.unique(sizes):
            a, b = np.triu_indices(size, k=1)
            run_starts = starts[sizes == size][:, None]
            lefts.append(order[(run_starts + a).ravel()])
            rights.append(order[(run_starts + b).ravel()])
        left, right = np.concatenate(lefts), np.concatenate(rights)
        close = np.bitwise_count(hashes[left] ^ hashes[right]) <= threshold
        lo = np.minimum(left[close], right[close])
        hi = np.maximum(left[close], right[close])
        found_i.append(lo)
        found_j.append(hi)
    if not found_i:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    pairs = np.unique(np.stack([np.concatenate(found_i), np.concatenate(found_j)], axis=1), axis=0)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def find_duplicates(samples: pd.DataFrame, threshold: int = 4) -> pd.DataFrame:
    """Assign ``duplicate_group`` to every member of an exact or near duplicate group.

    Args:
        samples: accepted rows with md5, phash and, for carried-over rows, their old duplicate_group.
        threshold: largest phash Hamming distance that counts as a near duplicate; negative disables
            near-duplicate search (exact duplicates are still grouped).

    Returns:
        The rows with ``duplicate_group`` set (null for rows without a duplicate) and a boolean column
        ``exact_duplicate`` (the group holds at least two rows with equal md5 and nothing else).
        A group keeps the smallest old id among its members, so ids stay put across versions; a new
        group is named ``dup-`` + the first 16 hex digits of its smallest md5.
    """
    frame = samples.reset_index(drop=True)
    n = len(frame)
    md5_codes, _ = pd.factorize(frame[m.MD5])
    first = pd.Series(np.arange(n)).groupby(md5_codes).transform("min").to_numpy()
    exact_left = np.flatnonzero(first != np.arange(n))
    left = [exact_left]
    right = [first[exact_left]]
    if threshold >= 0 and n > 1:
        # Search near pairs once per distinct content, then map back to every row.
        representatives = np.flatnonzero(first == np.arange(n))
        i, j = near_pairs(frame[m.PHASH].to_numpy(np.uint64)[representatives], threshold)
        left.append(representatives[i])
        right.append(representatives[j])
    labels = connected_components(n, np.concatenate(left), np.concatenate(right))
    sizes = np.bincount(labels, minlength=n)[labels]
    grouped = sizes > 1

    old = frame[m.DUPLICATE_GROUP] if m.DUPLICATE_GROUP in frame else pd.Series([None] * n, dtype=object)
    keys = pd.DataFrame({"label": labels, "old": old.astype(object), "md5": frame[m.MD5]})
    keys = keys[grouped]
    old_id = keys.dropna(subset=["old"]).groupby("label")["old"].min()
    new_id = "dup-" + keys.groupby("label")["md5"].min().str[:16]
    group_id = new_id.copy()
    group_id.loc[old_id.index] = old_id
    result = frame.copy()
    ids = pd.Series(labels).map(group_id)
    result[m.DUPLICATE_GROUP] = ids.where(grouped, None).astype(object)
    distinct_md5 = pd.Series(md5_codes).groupby(labels).transform("nunique").to_numpy()
    result["exact_duplicate"] = grouped & (distinct_md5 == 1)
    return result


@stage("duplicates", storage=False)
def duplicates_task(samples: pd.DataFrame, threshold: int) -> pd.DataFrame:
    """Group duplicates across the whole dataset (Prefect task)."""
    grouped = find_duplicates(samples, threshold)
    groups = grouped[m.DUPLICATE_GROUP].nunique()
    get_run_logger().info("duplicates: %d groups over %d rows", groups, grouped[m.DUPLICATE_GROUP].notna().sum())
    return grouped
