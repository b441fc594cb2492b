"""Assignments: every content (md5) a dataset ever held, with the purpose, item and group it was given.

Purposes belong to content, not to keys: each version carries ``assignments.parquet`` (schema in
``loader.manifest``), one row per md5 any version held, including content deleted since. A run looks every
sample up by md5: known content keeps its purpose, item id, first version and duplicate group under any key;
content no longer present stays as a *ghost*, so that when it, a copy, a near copy or another photo of its
item comes back months later, it is still known.

Versions written before assignments were recorded are read once into assignments by :func:`rebuild`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from loader import manifest as m


def empty() -> pd.DataFrame:
    """Assignments of a dataset that has none yet."""
    return m.empty_frame(m.ASSIGNMENTS_SCHEMA)


def index_of(md5s: pd.Series, among: pd.Series) -> np.ndarray:
    """Per value of ``md5s``, its row in ``among`` (unique md5s), or -1: an Arrow hash lookup."""
    found = pc.index_in(pa.array(md5s, pa.string()), value_set=pa.array(among, pa.string()))
    return found.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


def rebuild(versions: Sequence[tuple[int, pd.DataFrame]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Assignments from the manifests of every committed version, for a dataset whose versions predate them.

    Args:
        versions: (version number, manifest rows) for every committed version, in any order.

    Returns:
        ``(assignments, moved)``. Each md5 takes the purpose, item, group and smallest key of the last version
        that held it, ``first_version`` the first. Those versions carried purposes by key, so some content may
        have changed purpose between them, and an item may have ended up in two purposes: the last purpose
        stands, each part of such an item becomes an item of its own (``<id>@<purpose>``), and ``moved`` lists
        both for a person (columns kind ``content`` or ``item``, value, purposes, versions).
    """
    columns = [m.MD5, m.PURPOSE, m.KEY, m.CATEGORY, m.UNIQUE_ID, m.PHASH, m.DUPLICATE_GROUP]
    moved_columns = ["kind", "value", "purposes", "versions"]
    frames = [frame[columns].assign(_version=number) for number, frame in versions if len(frame)]
    if not frames:
        return empty(), pd.DataFrame(columns=moved_columns)
    rows = pd.concat(frames, ignore_index=True).astype({m.PHASH: "uint64"}).sort_values(["_version", m.KEY])
    span = rows.groupby(m.MD5)["_version"].agg(["min", "max"])
    latest = rows.sort_values(["_version", m.KEY], ascending=[True, False]).drop_duplicates(m.MD5, keep="last")
    assigned = (
        latest.set_index(m.MD5).assign(**{m.FIRST_VERSION: span["min"], m.LAST_VERSION: span["max"]}).reset_index()
    )
    changed = rows.drop_duplicates([m.MD5, m.PURPOSE]).groupby(m.MD5).size()[lambda c: c > 1].index
    content = (
        rows[rows[m.MD5].isin(changed)]
        .groupby(m.MD5)
        .agg(purposes=(m.PURPOSE, lambda p: " -> ".join(dict.fromkeys(p))), versions=("_version", _versions))
    )
    split = assigned.groupby(m.UNIQUE_ID)[m.PURPOSE].nunique()[lambda c: c > 1].index
    items = (
        assigned[assigned[m.UNIQUE_ID].isin(split)]
        .groupby(m.UNIQUE_ID)
        .agg(purposes=(m.PURPOSE, lambda p: ", ".join(sorted(set(p)))), versions=(m.PURPOSE, "size"))
    )
    items["versions"] = items["versions"].map(lambda n: f"{n} contents")
    in_split = assigned[m.UNIQUE_ID].isin(split)
    assigned.loc[in_split, m.UNIQUE_ID] = assigned.loc[in_split, m.UNIQUE_ID] + "@" + assigned.loc[in_split, m.PURPOSE]
    moved = pd.concat(
        [
            content.reset_index(names="value").assign(kind="content"),
            items.reset_index(names="value").assign(kind="item"),
        ],
        ignore_index=True,
    )
    return _conform(assigned), moved.reindex(columns=moved_columns)


def _versions(numbers: pd.Series) -> str:
    return ", ".join(str(n) for n in sorted(set(numbers)))


def carry(
    parent: pd.DataFrame,
    manifest: pd.DataFrame,
    version: int,
    ghost_groups: pd.Series | None = None,
    known_rows: np.ndarray | None = None,
) -> pd.DataFrame:
    """The assignments a new version records: its manifest's contents, and every other content the parent
    knew (with its duplicate group as regrouped this run, ``ghost_groups``, indexed by md5).

    Args:
        parent: the parent version's assignments.
        manifest: the new version's rows in key order (purpose, first_version, unique_id, duplicate_group set).
        known_rows: per manifest row, its content's row in ``parent`` or -1 (looked up when not given).
    """
    present = manifest.drop_duplicates(m.MD5, keep="first")  # the smallest key holding the content
    present = present.assign(**{m.LAST_VERSION: version, m.FIRST_VERSION: present[m.FIRST_VERSION].fillna(version)})
    held = np.zeros(len(parent), dtype=bool)
    at = index_of(manifest[m.MD5], parent[m.MD5]) if known_rows is None else np.asarray(known_rows)
    held[at[at >= 0]] = True
    ghosts = parent[~held]
    if ghost_groups is not None and len(ghosts):
        ghosts = ghosts.assign(**{m.DUPLICATE_GROUP: ghost_groups.reindex(ghosts[m.MD5]).to_numpy()})
    columns = list(m.ASSIGNMENT_COLUMNS)
    return _conform(pd.concat([present[columns], ghosts[columns]], ignore_index=True))


def _conform(frame: pd.DataFrame) -> pd.DataFrame:
    """The schema's columns and dtypes (first/last version int32, phash uint64, no float in between)."""
    types = {m.FIRST_VERSION: "int32", m.LAST_VERSION: "int32", m.PHASH: "uint64"}
    return frame[list(m.ASSIGNMENT_COLUMNS)].astype(types).reset_index(drop=True)
