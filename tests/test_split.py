"""Split: per-stratum targets, whole items and duplicate groups, determinism, stickiness, conflicts."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from loader import manifest as m
from strata.errors import ConfigError
from tasks.split import assign_purposes, parse_fractions, unique_ids


def _frame(n: int = 3000, seed: int = 0, items: int | None = None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    category = rng.choice(["good", "bad_cap", "missing_cap"], size=n, p=[0.7, 0.22, 0.08])
    item = rng.integers(0, items or n, size=n)
    keys = [f"{c}/{i}_{k}.bmp" for k, (c, i) in enumerate(zip(category, item, strict=False))]
    frame = pd.DataFrame(
        {
            m.KEY: keys,
            m.CATEGORY: category,
            m.MD5: [hashlib.md5(k.encode()).hexdigest() for k in keys],
            m.DUPLICATE_GROUP: None,
            m.PURPOSE: None,
        }
    )
    frame[m.UNIQUE_ID], _ = unique_ids(frame, r"/(\d+)_\d+\.bmp$")
    return frame


def _units_of(frame: pd.DataFrame) -> pd.Series:
    return frame.groupby(m.UNIQUE_ID)[m.PURPOSE].nunique()


def test_each_stratum_within_one_unit_of_target() -> None:
    frame = _frame()
    frame[m.UNIQUE_ID] = frame[m.MD5]  # single-row units, single-stratum
    out = assign_purposes(frame, {"train": 0.8, "devel": 0.2}, seed=1).samples
    for category, rows in out.groupby(m.CATEGORY):
        train = (rows[m.PURPOSE] == "train").sum()
        assert abs(train - 0.8 * len(rows)) <= 1, category


def test_items_and_duplicates_stay_whole_and_spanning_items_balance() -> None:
    frame = _frame(items=900)
    frame.loc[::50, m.DUPLICATE_GROUP] = "dup-a"  # one duplicate group across many items and classes
    out = assign_purposes(frame, {"train": 0.7, "devel": 0.2, "test": 0.1}, seed=3).samples
    assert _units_of(out).max() == 1
    assert out.loc[out[m.DUPLICATE_GROUP] == "dup-a", m.PURPOSE].nunique() == 1
    fractions = pd.crosstab(out[m.CATEGORY], out[m.PURPOSE], normalize="index")
    assert ((fractions - pd.Series({"train": 0.7, "devel": 0.2, "test": 0.1})).abs() < 0.06).all().all()


def test_same_seed_same_split_other_seed_other_split_row_order_irrelevant() -> None:
    frame = _frame()
    first = assign_purposes(frame, seed=5).samples.set_index(m.KEY)[m.PURPOSE]
    again = assign_purposes(frame.sample(frac=1, random_state=1), seed=5).samples.set_index(m.KEY)[m.PURPOSE]
    other = assign_purposes(frame, seed=6).samples.set_index(m.KEY)[m.PURPOSE]
    assert first.sort_index().equals(again.sort_index())
    assert (first.sort_index() != other.sort_index()).sum() > 100


def test_sticky_purposes_inheritance_and_moving_toward_target() -> None:
    frame = _frame(n=2000, items=800)
    first = assign_purposes(frame, seed=0).samples
    # Everything carried over keeps its purpose, even under another seed and other fractions.
    again = assign_purposes(first, {"train": 0.5, "devel": 0.5}, seed=9).samples
    assert again[m.PURPOSE].tolist() == first[m.PURPOSE].tolist()
    # New photos of known items inherit; new items fill the targets.
    known = first.iloc[:50]
    new_photos = known.assign(**{m.KEY: known[m.KEY] + ".new", m.MD5: known[m.MD5].str[::-1], m.PURPOSE: None})
    fresh = _frame(n=500, seed=4, items=400)
    fresh[m.UNIQUE_ID] = "new-" + fresh[m.UNIQUE_ID]
    fresh[m.KEY] = fresh[m.KEY] + ".fresh"
    grown = assign_purposes(pd.concat([first, new_photos, fresh], ignore_index=True), seed=0).samples
    by_key = grown.set_index(m.KEY)[m.PURPOSE]
    assert (by_key[new_photos[m.KEY]].to_numpy() == known[m.PURPOSE].to_numpy()).all()
    assert (by_key[first[m.KEY]].to_numpy() == first[m.PURPOSE].to_numpy()).all()
    assert _units_of(grown).max() == 1


def test_a_new_row_bridging_two_purposes_is_held_out() -> None:
    frame = _frame(n=10)
    frame[m.UNIQUE_ID] = frame[m.MD5]
    frame[m.PURPOSE] = ["train"] * 5 + ["devel"] * 5
    bridge = frame.iloc[[0]].assign(
        **{
            m.KEY: "good/bridge.bmp",
            m.MD5: "f" * 32,
            m.PURPOSE: None,
            m.DUPLICATE_GROUP: "dup-x",
            m.UNIQUE_ID: "bridge",
        }
    )
    frame.loc[[0, 9], m.DUPLICATE_GROUP] = "dup-x"  # a train and a devel row, now joined by the bridge
    result = assign_purposes(pd.concat([frame, bridge], ignore_index=True))
    assert result.held_out[m.KEY].tolist() == ["good/bridge.bmp"]
    assert result.samples[m.PURPOSE].tolist() == frame[m.PURPOSE].tolist()


def test_uniqueness_by_columns_regex_and_fallback() -> None:
    frame = pd.DataFrame(
        {
            m.KEY: ["good/1_5.bmp", "bad/1_6.bmp", "good/notes.bmp"],
            m.FOLDER: ["good", "bad", "good"],
            m.MD5: ["a" * 32, "b" * 32, "c" * 32],
        }
    )
    ids, fallback = unique_ids(frame, r"(\d+)_\d+\.bmp$")
    assert ids.tolist() == ["1", "1", "c" * 32] and fallback == 1
    ids, _ = unique_ids(frame, "folder")
    assert ids.tolist() == ["good", "bad", "good"]
    with pytest.raises(ConfigError, match="capture group"):
        unique_ids(frame, r"\d+_")
    with pytest.raises(ConfigError, match="regular expression"):
        unique_ids(frame, "([")


@pytest.mark.parametrize("text", ["train=0.8,devel=0.3", "train=0.8,eval=0.2", "train", "train=x"])
def test_bad_split_fractions_are_refused(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_fractions(text)


def test_split_fractions_parse() -> None:
    assert parse_fractions("train=0.7, devel=0.2,test=0.1") == {"train": 0.7, "devel": 0.2, "test": 0.1}


@pytest.mark.parametrize(
    "pattern",
    [r"(\d+)_\d+\.\w+$", r"/(\d+)_", r"^(?:good|bad)/(\w+?)_", r"[(](\d)", r"(?<=/)(\d+)_", r"(x)?(\d+)\.png"],
)
def test_fast_regex_path_matches_python_re(pattern: str) -> None:
    """Arrow's RE2 (with groups renamed) gives what pandas' re gives, and patterns RE2 lacks fall back."""
    import re

    from tasks.split import _first_group

    keys = pd.Series(["good/12_1543.bmp", "bad/7_1.png", "x/(3).png", "nomatch", "good/a_b_c.png", "good/x5.png"])
    expected = keys.str.extract(re.compile(pattern), expand=True)[0].replace("", None)
    assert _first_group(keys, re.compile(pattern)).fillna("<na>").tolist() == expected.fillna("<na>").tolist()


def test_md5_prefixes_from_parquet_backed_columns() -> None:
    """Columns read from Parquet are chunked Arrow strings; slices keep an offset into the buffer."""
    import pyarrow as pa

    from tasks.split import _hex_prefix

    values = [hashlib.md5(str(i).encode()).hexdigest() for i in range(1000)]
    column = pa.table({"md5": pa.chunked_array([values[:400], values[400:]])}).to_pandas()["md5"]
    expected = np.array([int(v[:16], 16) for v in values], dtype=np.uint64)
    assert (_hex_prefix(column) == expected).all()
    assert (_hex_prefix(column.iloc[7:]) == expected[7:]).all()
    assert (_hex_prefix(pd.Series(values, dtype=object)) == expected).all()
