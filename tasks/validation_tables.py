"""The tables validation checks besides the manifest itself, built from the candidate (pure pandas).

Each is small where the manifest is large: only values held by several rows, only content seen before, only
units that join several items, one row per stratum. ``tasks/expectations.py`` runs a GX suite over each.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from loader import manifest as m

SPREAD = "purposes"  # suffix of the spread table's columns: md5_purposes, unique_id_purposes, ...
GROUP_COLUMNS = (m.MD5, m.UNIQUE_ID, m.DUPLICATE_GROUP)


def spread_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per md5, unique_id and duplicate_group value held by two rows or more: how many purposes it
    spans.

    Columns: ``value``, ``md5_purposes``, ``unique_id_purposes``, ``duplicate_group_purposes`` (each null
    except for its own kind's rows).
    """
    purpose = pd.factorize(manifest[m.PURPOSE])[0]
    parts = []
    for column in GROUP_COLUMNS:
        codes, values = pd.factorize(manifest[column])  # -1 where null
        shared = np.bincount(codes[codes >= 0], minlength=len(values)) > 1
        rows = (codes >= 0) & np.append(shared, False)[codes]  # codes -1 read the appended False
        pairs = np.unique(codes[rows].astype(np.int64) * 8 + purpose[rows])  # (value, purpose) pairs
        spans = np.bincount(pairs // 8, minlength=len(values))
        held = np.flatnonzero(shared)
        parts.append(pd.DataFrame({"value": np.asarray(values)[held].astype(str), f"{column}_{SPREAD}": spans[held]}))
    return pd.concat(parts, ignore_index=True)


def history_table(manifest: pd.DataFrame, known: pd.DataFrame, at: np.ndarray | None = None) -> pd.DataFrame:
    """Per candidate row whose content an earlier version assigned: its row number, purpose then and now.

    Args:
        at: per candidate row, its content's row in ``known`` or -1 (looked up when not given).
    """
    from tasks.assignments import index_of

    at = index_of(manifest[m.MD5], known[m.MD5]) if at is None else at
    found = np.flatnonzero(at >= 0)
    return pd.DataFrame(
        {
            "row": found,  # the candidate row, which names the key in a failure
            "purpose_before": known[m.PURPOSE].to_numpy(object)[at[found]],
            "purpose_after": manifest[m.PURPOSE].to_numpy(object)[found],
        }
    )


def units_table(manifest: pd.DataFrame, stratify: Sequence[str]) -> pd.DataFrame:
    """Split units (rows joined by unique_id and duplicate_group) that hold more than one item.

    Columns: unit (named by its first duplicate group in key order), stratum (the one holding most of the
    unit's rows), rows, items, share (the unit's rows in that stratum over the stratum's rows).
    """
    from tasks.duplicates import connected_components, same_value_links

    n = len(manifest)
    columns = ["unit", "stratum", "rows", "items", "share"]
    group_codes, group_names = pd.factorize(manifest[m.DUPLICATE_GROUP])
    if not len(group_names):
        return pd.DataFrame(columns=columns)
    item_codes = pd.factorize(manifest[m.UNIQUE_ID])[0]
    item_left, item_right = same_value_links(item_codes)
    group_left, group_right = same_value_links(group_codes)
    unit = connected_components(n, np.r_[item_left, group_left], np.r_[item_right, group_right])
    stratum_codes, strata = pd.factorize(_strata(manifest, stratify))
    # Units holding a duplicate group are the only ones that can join several items.
    grouped = np.zeros(n, dtype=bool)
    grouped[unit[group_codes >= 0]] = True
    rows = np.flatnonzero(grouped[unit])
    units, inverse = np.unique(unit[rows], return_inverse=True)
    width = int(item_codes.max()) + 1
    items = np.bincount(np.unique(inverse * width + item_codes[rows]) // width, minlength=len(units))
    cells = inverse * len(strata) + stratum_codes[rows]
    cell, count = np.unique(cells, return_counts=True)
    main = np.lexsort((-count, cell // len(strata)))  # per unit, its fullest stratum first
    first = np.r_[True, np.diff(cell[main] // len(strata)) != 0]
    main_stratum, in_main = cell[main][first] % len(strata), count[main][first]
    named = np.where(group_codes[rows] >= 0, group_codes[rows], len(group_names))
    smallest = np.full(len(units), len(group_names))
    np.minimum.at(smallest, inverse, named)
    table = pd.DataFrame(
        {
            "unit": np.asarray(group_names, dtype=object)[smallest],
            "stratum": np.asarray(strata, dtype=object)[main_stratum],
            "rows": np.bincount(inverse),
            "items": items,
            "share": in_main / np.bincount(stratum_codes)[main_stratum],
        }
    )
    table = table[table["items"] > 1]
    return table.sort_values(["rows", "unit"], ascending=[False, True], ignore_index=True)[columns]


def _strata(manifest: pd.DataFrame, stratify: Sequence[str]) -> pd.Series:
    """Each row's stratum as text (``good``, ``good/png``), "all" without stratification."""
    if not stratify:
        return pd.Series("all", index=manifest.index)
    text = manifest[stratify[0]].astype(str)
    for column in stratify[1:]:
        text = text + "/" + manifest[column].astype(str)
    return text


def strata_table(
    manifest: pd.DataFrame,
    fractions: Mapping[str, float],
    stratify: Sequence[str],
    min_rows: int,
    placed: np.ndarray | None = None,
) -> pd.DataFrame:
    """Per stratum: rows, train fraction, target, deviation, and how far the split stayed from the best it
    could do (``excess``; null for strata below ``min_rows``).

    Purposes are sticky, so a stratum whose earlier assignments were thinned out by deletions can be off
    target whatever the split does: ``floor`` is the least deviation reachable by placing only the rows the
    split placed in this run (``placed``; None: every row) and ``excess`` the deviation beyond it.
    """
    stratum = _strata(manifest, stratify)
    train = (manifest[m.PURPOSE] == "train").to_numpy()
    placed = np.ones(len(manifest), dtype=bool) if placed is None else np.asarray(placed, dtype=bool)
    frame = pd.DataFrame(
        {"stratum": stratum.to_numpy(), "train": train, "fixed_train": train & ~placed, "free": placed}
    )
    table = frame.groupby("stratum", sort=True).agg(
        rows=("train", "size"), trains=("train", "sum"), fixed_train=("fixed_train", "sum"), free=("free", "sum")
    )
    target = float(fractions.get("train", 0.0))
    lowest, highest = table["fixed_train"] / table["rows"], (table["fixed_train"] + table["free"]) / table["rows"]
    table = table.assign(
        train_fraction=table["trains"] / table["rows"],
        target=target,
        floor=np.maximum(0.0, np.maximum(lowest - target, target - highest)),
    )
    table["deviation"] = (table["train_fraction"] - target).abs()
    table["excess"] = (table["deviation"] - table["floor"]).where(table["rows"] >= min_rows)
    return table.reset_index()[["stratum", "rows", "train_fraction", "target", "floor", "deviation", "excess"]]
