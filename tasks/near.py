"""Near-duplicate search: the pairs of 64-bit perceptual hashes within a Hamming distance, without comparing
all pairs (pure numpy).

The hash is split into ``b`` bands with ``2b > threshold``: two hashes within the threshold differ in at
most one bit of some band (pigeonhole), so it is enough to look, per band, in the bucket of a hash's own
band value and of the values one bit away from it.

* Cold (:func:`near_links` without ``new``): identical hashes are joined before any pair is formed; then
  each band of the distinct values is counting-sorted and every value probes its buckets, in band order (so
  table reads are nearly sequential) and in chunks whose candidate pairs are capped: memory stays bounded
  whatever the size or the clustering of the hashes.
* Incremental (``new``): only the new hashes probe; each band marks their probe values in a bit table and
  reads every hash's band value against it once, so a few thousand new hashes cost a few passes over the
  dataset and no sort of it. Links among old hashes come from the groups recorded for them.
"""

from __future__ import annotations

import numpy as np

_PAIR_BUDGET = 1 << 22  # candidate pairs expanded at once: bounds the search's memory (~100 MB)
_QUERY_CHUNK = 1 << 18


def bands(threshold: int) -> list[tuple[int, int]]:
    """The 64 bits as ``(shift, width)`` bands, as few as let a radius-1 probe find every pair (``2b > t``),
    and at least three, so that a band's counting-sort table stays small (at most 2**22 entries)."""
    count = max(3, threshold // 2 + 1)
    widths = [64 // count + (1 if i < 64 % count else 0) for i in range(count)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int).tolist()
    return list(zip(shifts, widths, strict=True))


def _band(hashes: np.ndarray, shift: int, width: int) -> np.ndarray:
    return ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)


def _expand(
    left: np.ndarray, first: np.ndarray, count: np.ndarray, sorted_hashes: np.ndarray, threshold: int
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs ``(left[i], first[i] + k)`` for ``k < count[i]`` whose hashes are within ``threshold``, in
    slices of at most ``_PAIR_BUDGET`` candidates. Positions index ``sorted_hashes``."""
    found_left, found_right = [], []
    ends = np.cumsum(count)
    start = 0
    while start < len(count):
        stop = max(start + 1, int(np.searchsorted(ends, (ends[start - 1] if start else 0) + _PAIR_BUDGET, "right")))
        c = count[start:stop]
        lefts = np.repeat(left[start:stop], c)
        offsets = np.arange(len(lefts), dtype=np.int64) - np.repeat(np.cumsum(c) - c, c)
        rights = np.repeat(first[start:stop], c) + offsets
        close = np.flatnonzero(np.bitwise_count(sorted_hashes[lefts] ^ sorted_hashes[rights]) <= threshold)
        found_left.append(lefts[close])
        found_right.append(rights[close])
        start = stop
    return np.concatenate(found_left), np.concatenate(found_right)


def _distinct_pairs(values: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` of distinct ``values`` within ``threshold`` bits, each once (the cold search)."""
    n = len(values)
    found_left, found_right = [], []
    for shift, width in bands(threshold):
        band = _band(values, shift, width)
        order = np.argsort(band, kind="stable")
        sorted_band, sorted_values = band[order], values[order]
        counts = np.bincount(sorted_band, minlength=1 << width)
        starts = np.cumsum(counts) - counts
        for begin in range(0, n, _QUERY_CHUNK):
            where = np.arange(begin, min(n, begin + _QUERY_CHUNK), dtype=np.int64)
            own = sorted_band[where]
            for bit in [None, *range(width)]:
                if bit is None:  # the own bucket: each position pairs with the later ones
                    first = where + 1
                    count = starts[own] + counts[own] - first
                else:  # a pair one bit apart is found once, from the side whose bit is 0
                    probe = own ^ (1 << bit)
                    first, count = starts[probe], np.where(own & (1 << bit), 0, counts[probe])
                hit = np.flatnonzero(count)
                if len(hit):
                    left, right = _expand(where[hit], first[hit], count[hit], sorted_values, threshold)
                    found_left.append(order[left])
                    found_right.append(order[right])
    return _unique_pairs(found_left, found_right, n)


def _query_pairs(hashes: np.ndarray, queries: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``i < j`` within ``threshold`` bits that hold at least one of ``queries`` (an incremental
    search: no table of the whole dataset is sorted, each band only marks the queries' probe values)."""
    n = len(hashes)
    found_left, found_right = [], []
    for shift, width in bands(threshold):
        band = _band(hashes, shift, width)
        own = band[queries]
        probes = np.concatenate([own, *(own ^ (1 << bit) for bit in range(width))])
        asking = np.tile(queries, width + 1)
        order = np.argsort(probes, kind="stable")
        probes, asking = probes[order], asking[order]
        marked = np.zeros(1 << width, dtype=bool)
        marked[probes] = True
        hits = np.flatnonzero(marked[band])
        first = np.searchsorted(probes, band[hits], "left")
        count = np.searchsorted(probes, band[hits], "right") - first
        rows = np.repeat(hits, count)
        offsets = np.arange(len(rows), dtype=np.int64) - np.repeat(np.cumsum(count) - count, count)
        asked = asking[np.repeat(first, count) + offsets]
        close = np.bitwise_count(hashes[rows] ^ hashes[asked]) <= threshold
        found_left.append(rows[close])
        found_right.append(asked[close])
    return _unique_pairs(found_left, found_right, n)


def _unique_pairs(lefts: list[np.ndarray], rights: list[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """The pairs as ``i < j``, each once (a pair close in several bands is found in each)."""
    if not lefts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    distinct = left != right
    lo, hi = np.minimum(left, right)[distinct], np.maximum(left, right)[distinct]
    keys = np.unique(lo * n + hi)
    return keys // n, keys % n


def near_links(hashes: np.ndarray, threshold: int, new: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Edges whose connected components are those of the near-duplicate graph (distance <= threshold).

    Cold (``new`` None): rows with identical hashes are joined to the first of them, and distinct hash
    values are paired by the banded search. With ``new`` (a boolean mask), only links that reach a new row
    are returned, each new row probing the whole dataset: the caller supplies the old rows' links (their
    recorded groups).
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if threshold < 0 or len(hashes) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    if new is not None and np.count_nonzero(new) <= len(hashes) // 8:
        return _query_pairs(hashes, np.flatnonzero(new), threshold)
    values, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    rows = np.arange(len(hashes))
    same = first[inverse] != rows
    i, j = _distinct_pairs(values, threshold) if threshold > 0 else (np.empty(0, np.int64),) * 2
    return np.concatenate([rows[same], first[i]]), np.concatenate([first[inverse[same]], first[j]])


def near_pairs(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    """Every index pair ``i < j`` whose 64-bit hashes differ in at most ``threshold`` bits (each once).

    The complete list, for checks against an exhaustive search: rows sharing a hash value give all their
    pairs. The flow uses :func:`near_links`, which joins identical hashes without forming their pairs.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    if threshold < 0 or len(hashes) < 2:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    values, inverse = np.unique(hashes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    starts = np.searchsorted(inverse[order], np.arange(len(values)))
    sizes = np.diff(np.r_[starts, len(hashes)])
    members = np.split(order, starts[1:])
    i, j = _distinct_pairs(values, threshold) if threshold > 0 else (np.empty(0, np.int64),) * 2
    lefts, rights = [], []
    for a, b in zip(i.tolist(), j.tolist(), strict=True):
        lefts.append(np.repeat(members[a], sizes[b]))
        rights.append(np.tile(members[b], sizes[a]))
    for value in np.flatnonzero(sizes > 1).tolist():
        x, y = np.triu_indices(sizes[value], k=1)
        lefts.append(members[value][x])
        rights.append(members[value][y])
    if not lefts:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    left, right = np.concatenate(lefts), np.concatenate(rights)
    lo, hi = np.minimum(left, right), np.maximum(left, right)
    keys = np.unique(lo * len(hashes) + hi)
    return keys // len(hashes), keys % len(hashes)
