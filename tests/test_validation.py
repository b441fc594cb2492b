"""The Great Expectations suite, fed a clean manifest and one manifest broken in each way it guards against."""

from __future__ import annotations

import hashlib
from typing import Callable

import numpy as np
import pandas as pd
import pytest

from loader import manifest as m
from tasks.expectations import validate_manifest

FRACTIONS = {"train": 0.8, "devel": 0.2}


def clean() -> pd.DataFrame:
    """Two strata of 20 rows, exactly 80 % train each, every item and duplicate group in one purpose."""
    rows = []
    for category in ("good", "bad_cap"):
        for i in range(20):
            key = f"{category}/{i}_0.png"
            md5 = hashlib.md5(key.encode()).hexdigest()
            rows.append(
                {
                    m.PATH: f"file:///data/{key}",
                    m.KEY: key,
                    m.FOLDER: category,
                    m.CATEGORY: category,
                    m.SIZE: 1000 + i,
                    m.ETAG: md5,
                    m.MD5: md5,
                    m.MTIME: pd.Timestamp("2026-01-01", tz="UTC"),
                    m.FORMAT: "png",
                    m.WIDTH: 64,
                    m.HEIGHT: 48,
                    m.CHANNELS: 3,
                    m.PHASH: np.uint64(i),
                    m.DUPLICATE_GROUP: f"{category}-dup" if i in (0, 1) else None,
                    m.UNIQUE_ID: f"{category}-{i // 2}",
                    m.PURPOSE: "train" if i < 16 else "devel",
                    m.FIRST_VERSION: 1,
                }
            )
    return m.to_table(pd.DataFrame(rows)).to_pandas()


def validate(frame: pd.DataFrame, expected_rows: int | None = 40) -> dict:
    return validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], expected_rows=expected_rows)


def test_a_clean_manifest_passes() -> None:
    result = validate(clean())
    assert result["success"], result["summary"]
    assert result["statistics"]["evaluated"] >= 40 and result["summary"].startswith("all ")


def test_validation_makes_no_batch_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    """GX's batch fingerprint (a hash of the whole frame, metadata strata never reads) was half of a 1M-row
    validation; a GX version that hashes again fails here."""
    from great_expectations.execution_engine import pandas_execution_engine

    def refuse(frame: pd.DataFrame) -> str:
        raise AssertionError("GX hashed a frame")

    monkeypatch.setattr(pandas_execution_engine, "hash_pandas_dataframe", refuse)
    result = validate(clean())
    assert result["success"], result["failed"]
    broken = validate(_set("md5", 3, "not-an-md5")(clean()))  # and failures are still found
    assert not broken["success"]


def _set(column: str, row: int, value: object) -> Callable[[pd.DataFrame], pd.DataFrame]:
    def broken(frame: pd.DataFrame) -> pd.DataFrame:
        frame[column] = frame[column].astype(object)
        frame.at[row, column] = value
        return frame

    return broken


def _train_item(frame: pd.DataFrame) -> pd.DataFrame:
    """Move devel item good-8 (two rows) to train: 18 of 20 good rows train, 0.9 against a 0.8 target."""
    frame.loc[frame[m.UNIQUE_ID] == "good-8", m.PURPOSE] = "train"
    return frame


BROKEN = {
    "missing column": (lambda f: f.drop(columns=[m.PHASH]), "expect_table_columns_to_match_ordered_list", None),
    "extra column": (lambda f: f.assign(note="x"), "expect_table_columns_to_match_ordered_list", None),
    "wrong type": (lambda f: f.astype({m.SIZE: "float64"}), "expect_column_values_to_be_of_type", m.SIZE),
    "duplicate path": (_set(m.PATH, 3, "file:///data/good/0_0.png"), "expect_column_values_to_be_unique", m.PATH),
    "malformed md5": (_set(m.MD5, 5, "D41D8CD98F00B204E9800998ECF8427E"), "expect_column_values_to_match_regex", m.MD5),
    "unknown purpose": (_set(m.PURPOSE, 2, "holdout"), "expect_column_values_to_be_in_set", m.PURPOSE),
    "zero width": (_set(m.WIDTH, 4, 0), "expect_column_min_to_be_between", m.WIDTH),
    "zero height": (_set(m.HEIGHT, 4, 0), "expect_column_min_to_be_between", m.HEIGHT),
    "zero size": (_set(m.SIZE, 4, 0), "expect_column_min_to_be_between", m.SIZE),
    "md5 in two purposes": (
        _set(m.MD5, 17, hashlib.md5(b"good/0_0.png").hexdigest()),
        "expect_no_md5_in_two_purposes",
        None,
    ),
    "item in two purposes": (_set(m.UNIQUE_ID, 16, "good-0"), "expect_no_item_in_two_purposes", None),
    "duplicate group in two purposes": (
        _set(m.DUPLICATE_GROUP, 18, "good-dup"),
        "expect_no_duplicate_group_in_two_purposes",
        None,
    ),
    "stratum off target": (lambda f: _train_item(f), "expect_stratum_train_fraction_near_target", None),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_each_broken_manifest_fails_the_expectation_that_guards_it(case: str) -> None:
    breakage, expectation, column = BROKEN[case]
    frame = breakage(clean())
    result = validate(frame)
    assert not result["success"]
    failed = {(f["expectation"], f["column"]) for f in result["failed"]}
    assert any(e == expectation and (column is None or c == column) for e, c in failed), failed
    assert expectation in result["summary"]


def test_row_count_must_follow_the_diff() -> None:
    result = validate(clean(), expected_rows=41)
    assert [f["expectation"] for f in result["failed"]] == ["expect_table_row_count_to_equal"]


def test_small_strata_are_exempt_from_the_fraction_check() -> None:
    frame = _train_item(clean())
    exempt = validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], min_stratum=21)
    assert exempt["success"], exempt["summary"]
    assert not validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], min_stratum=20)["success"]


def _known(frame: pd.DataFrame) -> pd.DataFrame:
    """Assignments as the parent version recorded them for these rows."""
    known = frame[[m.MD5, m.PURPOSE, m.KEY, m.CATEGORY, m.UNIQUE_ID, m.PHASH, m.DUPLICATE_GROUP]]
    return m.to_table(known.assign(**{m.FIRST_VERSION: 1, m.LAST_VERSION: 1}), m.ASSIGNMENTS_SCHEMA).to_pandas()


def test_content_that_changes_purpose_fails_naming_its_key() -> None:
    frame = clean()
    known = _known(frame)
    assert validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], known=known)["success"]
    moved = frame.copy()
    moved.loc[0, m.KEY] = "good/renamed.png"  # under another key: identity is the content
    moved.loc[0, m.PURPOSE] = "devel"
    result = validate_manifest(moved, fractions=FRACTIONS, stratify=["category"], known=known)
    failed = {f["expectation"]: f for f in result["failed"]}
    assert "expect_no_content_to_change_purpose" in failed
    example = failed["expect_no_content_to_change_purpose"]["examples"][0]
    assert example == {m.KEY: "good/renamed.png", "purpose_before": "train", "purpose_after": "devel"}


def test_a_unit_of_many_look_alike_items_holds_the_run() -> None:
    frame = clean()
    chained = frame[m.CATEGORY] == "good"
    frame.loc[chained & (frame.index < 16), m.DUPLICATE_GROUP] = "dup-chain"  # 8 items joined by near copies
    result = validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], group_items=7)
    assert "expect_no_look_alike_unit" in {f["expectation"] for f in result["failed"]}
    (unit,) = result["look_alike"]
    assert unit["unit"] == "dup-chain" and unit["items"] == 8 and unit["stratum"] == "good"
    assert unit["share"] == 0.8 and "good-0" in unit["items_shown"]
    assert validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], group_items=8)["success"]
    assert validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], group_items=7, group_share=0.8)[
        "success"
    ]


def test_a_stratum_off_target_passes_when_sticky_purposes_leave_the_split_no_better_choice() -> None:
    frame = _train_item(clean())  # good: 18 of 20 train, 0.9 against 0.8
    placed = np.zeros(len(frame), dtype=bool)  # nothing was the split's choice: earlier purposes, kept
    assert validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], placed=placed)["success"]
    placed[frame.index[(frame[m.CATEGORY] == "good") & (frame[m.PURPOSE] == "train")][:4]] = True
    result = validate_manifest(frame, fractions=FRACTIONS, stratify=["category"], placed=placed)
    assert [f["expectation"] for f in result["failed"]] == ["expect_stratum_train_fraction_near_target"]
