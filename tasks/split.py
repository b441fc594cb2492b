"""Stage 5, split: assign ``purpose`` per stratum, keeping items and duplicates whole and earlier choices fixed.

Units of assignment are the connected components of uniqueness groups (rows with equal ``unique_id``) and
duplicate groups. A unit that already holds assigned rows is *locked*: its new rows inherit that purpose.
Free units are ordered by a seeded hash of their content and poured into each stratum's remaining need,
purpose by purpose; a unit goes where its midpoint falls, so every stratum lands within one unit of its
target. The few units that span strata are placed first, one by one, where they help their strata most.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from prefect import get_run_logger

from loader import manifest as m
from loader.sampling import splitmix64
from strata.errors import ConfigError
from tasks.duplicates import connected_components
from tasks.policy import stage

DEFAULT_FRACTIONS = {"train": 0.8, "devel": 0.2}


def parse_fractions(text: str) -> dict[str, float]:
    """Parse ``train=0.8,devel=0.2[,test=0.1]`` into fractions that sum to 1."""
    fractions: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        try:
            fractions[name] = float(value)
        except ValueError:
            sep = ""
        if not sep or name not in m.PURPOSES:
            raise ConfigError(f"--split part {part!r} is not PURPOSE=FRACTION with PURPOSE in {', '.join(m.PURPOSES)}")
    check_fractions(fractions)
    return fractions


def check_fractions(fractions: Mapping[str, float]) -> None:
    """Raise ConfigError unless the fractions name known purposes, lie in [0, 1] and sum to 1."""
    unknown = set(fractions) - set(m.PURPOSES)
    if unknown:
        raise ConfigError(f"unknown purposes {sorted(unknown)} in split fractions; use {', '.join(m.PURPOSES)}")
    if any(not 0.0 <= f <= 1.0 for f in fractions.values()):
        raise ConfigError(f"split fractions must lie between 0 and 1, got {dict(fractions)}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ConfigError(f"split fractions must sum to 1, got {dict(fractions)} (sum {sum(fractions.values()):g})")


def unique_ids(samples: pd.DataFrame, uniqueness: str | None) -> tuple[pd.Series, int]:
    """The uniqueness key of every row, and how many rows fell back to their md5.

    Args:
        samples: rows with key, md5 and any column the uniqueness spec names.
        uniqueness: None or ``md5`` (each distinct content is its own item); comma-separated column names
            (``folder,category``: values joined with ``/``); or a regular expression searched in the key
            whose first capture group is the item id (``(\\d+)_\\d+\\.bmp$``). Keys it does not match fall
            back to their md5.
    """
    if not uniqueness or uniqueness == m.MD5:
        return samples[m.MD5].astype(object), 0
    names = [p.strip() for p in uniqueness.split(",")]
    if all(name in samples.columns for name in names):
        joined = samples[names[0]].astype(str)
        for name in names[1:]:
            joined = joined + "/" + samples[name].astype(str)
        return joined.astype(object), 0
    try:
        pattern = re.compile(uniqueness)
    except re.error as err:
        raise ConfigError(
            f"--uniqueness {uniqueness!r} is neither column names ({', '.join(samples.columns)}) "
            f"nor a valid regular expression: {err}"
        ) from err
    if pattern.groups < 1:
        raise ConfigError(f"--uniqueness regex {uniqueness!r} needs a capture group for the item id, e.g. '(\\d+)_'")
    found = _first_group(samples[m.KEY], pattern)
    missing = found.isna().to_numpy()
    return found.where(~missing, samples[m.MD5]), int(missing.sum())


def _named_groups(pattern: str) -> str:
    """The pattern with every capturing group named ``g1``, ``g2``, ... (what Arrow's RE2 extract needs)."""
    out, index, escaped, in_class, group = [], 0, False, False, 0
    while index < len(pattern):
        char = pattern[index]
        out.append(char)
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "[" and not in_class:
            in_class = True
        elif char == "]" and in_class:
            in_class = False
        elif char == "(" and not in_class and not pattern.startswith("?", index + 1):
            group += 1
            out.append(f"?P<g{group}>")
        index += 1
    return "".join(out)


def _first_group(keys: pd.Series, pattern: re.Pattern[str]) -> pd.Series:
    """The first capture group of a regex search in every key (null where it does not match or is empty).

    Arrow's RE2 runs ~10x faster than ``re``; patterns RE2 does not speak (look-arounds, back-references)
    fall back to pandas, with the same result.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        matched = pc.extract_regex(pa.array(keys, pa.string()), _named_groups(pattern.pattern))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        found = keys.astype("str").str.extract(pattern, expand=True)[0]
        return found.where(found != "")  # an empty id would make one giant item of unrelated keys
    first = matched.flatten()[0]  # flatten() keeps the struct's nulls (no match); field() would not
    first = pc.if_else(pc.equal(first, ""), None, first)  # RE2 gives "" where the group took no part
    return pd.Series(first.to_pandas(), index=keys.index)


@dataclass(frozen=True)
class SplitResult:
    """The assigned rows, and rows held out because they would join two purposes."""

    samples: pd.DataFrame  # input rows (less held_out) with purpose set
    held_out: pd.DataFrame  # new rows whose unit already holds two purposes
    units: int  # number of units of assignment


def _mix(values: np.ndarray, seed: int) -> np.ndarray:
    """splitmix64 of ``values ^ seed``: a seeded, platform-independent order key."""
    return splitmix64(values.astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))


_HEX = np.zeros(256, dtype=np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def _hex_prefix(hexes: pd.Series) -> np.ndarray:
    """The first 16 hex digits of each (lowercase, 32-digit) md5 string as uint64, vectorized.

    Reads the Arrow string buffer in place when every value has 32 characters (the manifest's md5 column).
    """
    import pyarrow as pa

    array = pa.array(hexes, pa.string())
    if isinstance(array, pa.ChunkedArray):  # what a column read from Parquet holds
        array = array.combine_chunks()
    if (
        array.null_count == 0
        and len(array)
        and pa.compute.all(pa.compute.equal(pa.compute.utf8_length(array), 32)).as_py()
    ):
        offsets, data = array.buffers()[1:3]
        first = np.frombuffer(offsets, dtype=np.int32, count=1, offset=array.offset * 4)[0]
        raw = np.frombuffer(data, dtype=np.uint8, count=32 * len(array), offset=first).reshape(-1, 32)[:, :16]
    else:
        raw = np.frombuffer(hexes.to_numpy(dtype="S16").tobytes(), dtype=np.uint8).reshape(-1, 16)
    nibbles = _HEX[raw]  # uint8: a 1M-row uint64 temporary would cost more in page faults than the work
    packed = (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]
    return np.ascontiguousarray(packed).view(">u8").ravel().astype(np.uint64)


def _group_edges(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining each row to the first row with the same code (codes < 0 are ungrouped).

    ``codes`` must number groups in order of first appearance, as ``pd.factorize`` does: then a group's first
    row is where the running maximum of the codes rises, and no scatter (``np.minimum.at``) is needed.
    """
    n = len(codes)
    valid = codes >= 0
    if not valid.any():
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    running = np.maximum.accumulate(codes)
    rises = np.empty(n, dtype=bool)
    rises[0] = True
    np.greater(running[1:], running[:-1], out=rises[1:])
    first = np.flatnonzero(rises & valid)
    left = np.flatnonzero(valid)
    right = first[codes[left]]
    keep = left != right
    return left[keep], right[keep]


def _pour(size: np.ndarray, stratum: np.ndarray, order_key: np.ndarray, share: np.ndarray, n_strata: int) -> np.ndarray:
    """Purpose index per unit: each stratum's units, in key order, fill consecutive purpose intervals.

    ``share[s, p]`` is the fraction of stratum s's poured rows that purpose p should get. A unit goes to the
    interval holding its midpoint, so each purpose lands within half a unit of its share at either end.
    """
    order = np.lexsort((order_key, stratum))
    size_sorted, stratum_sorted = size[order], stratum[order]
    total = np.bincount(stratum_sorted, weights=size_sorted, minlength=n_strata)
    bounds = np.cumsum(share * total[:, None], axis=1)[:, :-1]
    start = np.cumsum(total) - total
    midpoint = np.cumsum(size_sorted) - size_sorted / 2 - start[stratum_sorted]
    result = np.empty(len(size), dtype=np.int64)
    result[order] = (midpoint[:, None] >= bounds[stratum_sorted]).sum(axis=1)
    return result


def assign_purposes(
    samples: pd.DataFrame,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    stratify: Sequence[str] = (m.CATEGORY,),
    units: np.ndarray | None = None,
) -> SplitResult:
    """Assign a purpose to every row without one.

    Args:
        samples: rows with md5, unique_id, duplicate_group, the stratify columns, and purpose (set for rows
            whose content already holds one, or inherits it; null for new ones).
        fractions: target fraction per purpose, summing to 1.
        seed: decides the order in which free units are placed.
        stratify: columns whose value combinations are the strata; empty for one global stratum.
        units: the unit of every row, as the duplicates stage grouped them (deleted content included);
            None: the components of equal unique_id and duplicate_group.

    Returns:
        A SplitResult; rows keep their input order.
    """
    check_fractions(fractions)
    purposes = [p for p in m.PURPOSES if fractions.get(p, 0.0) > 0] or ["train"]
    frame = samples.reset_index(drop=True)
    n = len(frame)
    if n == 0:
        out = frame.copy()
        out[m.PURPOSE] = pd.Series([], dtype=object)
        return SplitResult(out, frame.iloc[0:0], 0)

    if units is None:  # connected components of uniqueness groups and duplicate groups
        l1, r1 = _group_edges(pd.factorize(frame[m.UNIQUE_ID])[0])
        l2, r2 = _group_edges(pd.factorize(frame[m.DUPLICATE_GROUP])[0])
        unit = connected_components(n, np.concatenate([l1, l2]), np.concatenate([r1, r2]))
    else:
        unit = pd.factorize(np.asarray(units))[0].astype(np.int64)  # labels in [0, n), as _compact needs

    # Locked units: the purposes their carried-over rows already hold.
    old = frame[m.PURPOSE].astype(object) if m.PURPOSE in frame else pd.Series([None] * n, dtype=object)
    locked_rows = old.notna().to_numpy()
    locked = pd.DataFrame({"unit": unit[locked_rows], "purpose": old[locked_rows].to_numpy()})
    per_unit = locked.drop_duplicates().groupby("unit")["purpose"]
    counts = per_unit.size()
    conflict_units = counts.index[counts.to_numpy() > 1]
    held = np.isin(unit, conflict_units) & ~locked_rows
    inherited = per_unit.first()
    purpose = old.copy()
    if len(inherited):
        purpose[~locked_rows] = pd.Series(unit[~locked_rows], index=purpose.index[~locked_rows]).map(inherited)

    # Strata and need.
    if stratify:
        stratum = frame.groupby(list(stratify), sort=True, dropna=False).ngroup().to_numpy()
    else:
        stratum = np.zeros(n, dtype=np.int64)
    n_strata = int(stratum.max()) + 1
    p_index = {p: i for i, p in enumerate(purposes)}
    target_frac = np.array([fractions.get(p, 0.0) for p in purposes])
    active = ~held
    totals = np.bincount(stratum[active], minlength=n_strata).astype(np.float64)
    target = totals[:, None] * target_frac[None, :]
    current = np.zeros((n_strata, len(purposes)))
    placed = purpose.notna().to_numpy() & active
    placed_codes = purpose[placed].map(p_index)
    if placed_codes.isna().any():
        # A carried-over purpose no longer in the fractions (e.g. test dropped): it stays, but is not a target.
        placed = placed & purpose.map(p_index).notna().to_numpy()
        placed_codes = purpose[placed].map(p_index)
    np.add.at(current, (stratum[placed], placed_codes.to_numpy(np.int64)), 1)

    # Free units, in seeded order of their smallest md5; each poured in its main stratum (most rows).
    free_idx = np.flatnonzero(active & purpose.isna().to_numpy())
    free_units, free_inverse = _compact(unit[free_idx], n)
    unit_key = np.full(len(free_units), np.iinfo(np.uint64).max, dtype=np.uint64)
    md5 = frame[m.MD5] if len(free_idx) == n else frame[m.MD5].iloc[free_idx]  # a first split: every row
    np.minimum.at(unit_key, free_inverse, _hex_prefix(md5))
    order_key = _mix(unit_key, seed)
    # (unit, stratum) cells with their row counts; a unit's main stratum holds most of its rows (lowest on ties).
    cell_keys, cell_counts = np.unique(free_inverse.astype(np.int64) * n_strata + stratum[free_idx], return_counts=True)
    cell_unit, cell_stratum = np.divmod(cell_keys, n_strata)
    main = np.lexsort((cell_stratum, -cell_counts, cell_unit))
    first_of_unit = np.ones(len(main), dtype=bool)
    first_of_unit[1:] = cell_unit[main][1:] != cell_unit[main][:-1]
    unit_stratum = cell_stratum[main][first_of_unit]
    unit_size = np.bincount(free_inverse, minlength=len(free_units)).astype(np.float64)
    spanning = np.bincount(cell_unit, minlength=len(free_units)) > 1
    unit_purpose = np.full(len(free_units), -1, dtype=np.int64)

    # Units spanning strata first, at the target fractions; then their rows count in every stratum they touch.
    if spanning.any():
        chosen = np.flatnonzero(spanning)
        share = np.broadcast_to(target_frac, target.shape)
        unit_purpose[chosen] = _pour(unit_size[chosen], unit_stratum[chosen], order_key[chosen], share, n_strata)
        rows = np.isin(free_inverse, chosen)
        np.add.at(current, (stratum[free_idx][rows], unit_purpose[free_inverse[rows]]), 1)
    # Single-stratum units into what each stratum still needs.
    if (~spanning).any():
        chosen = np.flatnonzero(~spanning)
        need = np.clip(target - current, 0, None)
        need_sum = need.sum(axis=1, keepdims=True)
        share = np.where(need_sum > 0, need / np.where(need_sum > 0, need_sum, 1), target_frac[None, :])
        unit_purpose[chosen] = _pour(unit_size[chosen], unit_stratum[chosen], order_key[chosen], share, n_strata)

    out = frame.assign(**{m.PURPOSE: _purpose_column(purpose, free_idx, unit_purpose[free_inverse], purposes)})
    return SplitResult(  # assign is copy-on-write: no copy of the other columns
        samples=out[~held].reset_index(drop=True) if held.any() else out,
        held_out=frame[held].reset_index(drop=True) if held.any() else frame.iloc[0:0],
        units=int(np.count_nonzero(np.bincount(unit))),
    )


def _compact(labels: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(labels, return_inverse=True)`` for labels in ``[0, n)``, by counting instead of sorting."""
    present = np.bincount(labels, minlength=n) > 0
    return np.flatnonzero(present), (np.cumsum(present) - 1)[labels]


def _purpose_column(carried: pd.Series, rows: np.ndarray, chosen: np.ndarray, purposes: list[str]) -> pd.Series:
    """The purpose column: ``carried`` (null where none) with ``rows`` set to ``purposes[chosen]``.

    Built as Arrow codes into a few strings: a million Python strings would cost four times as long.
    """
    import pyarrow as pa

    codes, labels = pd.factorize(carried)  # -1 where null
    dictionary = [*labels, *(p for p in purposes if p not in set(labels))]
    codes[rows] = np.array([dictionary.index(p) for p in purposes])[chosen]
    column = pa.array(dictionary, pa.string()).take(pa.array(codes, mask=codes < 0))
    return column.to_pandas().set_axis(carried.index)


@stage("split", storage=False)
def split_task(
    samples: pd.DataFrame, fractions: Mapping[str, float], seed: int, stratify: Sequence[str], units: np.ndarray
) -> SplitResult:
    """Assign purposes (Prefect task)."""
    result = assign_purposes(samples, fractions, seed, stratify, units)
    get_run_logger().info(
        "split: %d rows in %d units; %d held out for joining two purposes",
        len(result.samples),
        result.units,
        len(result.held_out),
    )
    return result
