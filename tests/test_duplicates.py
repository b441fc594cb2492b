"""Duplicates: the banded near-pair search equals exhaustive search; groups keep purposes sticky."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from loader import manifest as m
from tasks import assignments
from tasks.duplicates import connected_components, group, sticky_components
from tasks.inspect import Inspected, inspect_bytes
from tasks.near import near_links, near_pairs
from tests.conftest import encode, picture


def exhaustive(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Every pair within the threshold, by comparing each hash with every later one (in blocks)."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(hashes), 512):
        block = hashes[start : start + 512]
        left, right = np.nonzero(np.bitwise_count(block[:, None] ^ hashes[None, :]) <= threshold)
        left += start
        keep = left < right
        pairs.update(zip(left[keep].tolist(), right[keep].tolist(), strict=True))
    return pairs


def random_hashes(count: int, seed: int) -> np.ndarray:
    """Uniform 64-bit hashes with about 1% planted near copies (0-4 bits flipped: some identical)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    copies = rng.choice(count, size=count // 50, replace=False)
    originals, targets = copies[: len(copies) // 2], copies[len(copies) // 2 :]
    flips = np.zeros(len(targets), dtype=np.uint64)
    for _ in range(4):
        hit = rng.random(len(targets)) < 0.8
        flips |= np.where(hit, np.uint64(1) << rng.integers(0, 64, size=len(targets)).astype(np.uint64), np.uint64(0))
    flips[: len(flips) // 5] = 0  # exact copies
    hashes[targets] = hashes[originals] ^ flips
    return hashes


def clustered_hashes(count: int, seed: int) -> np.ndarray:
    """Look-alike hashes: clusters of variants 0-8 bits from their scene's hash, identical ones among them."""
    rng = np.random.default_rng(seed)
    scenes = rng.integers(0, 2**64, size=max(1, count // 20), dtype=np.uint64)
    base = scenes[rng.integers(0, len(scenes), size=count)]
    flips = np.zeros(count, dtype=np.uint64)
    for _ in range(8):
        hit = rng.random(count) < 0.35
        flips |= np.where(hit, np.uint64(1) << rng.integers(0, 64, size=count).astype(np.uint64), np.uint64(0))
    return base ^ flips


@pytest.mark.parametrize("threshold", [0, 1, 2, 4, 5, 8])
@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_near_pairs_equal_exhaustive_search(kind: str, threshold: int) -> None:
    hashes = (random_hashes if kind == "random" else clustered_hashes)(3000, threshold)
    i, j = near_pairs(hashes, threshold)
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    assert len(found) == len(i)  # each pair once
    assert found == exhaustive(hashes, threshold)
    assert found


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_near_pairs_equal_exhaustive_search_on_20000_rows(kind: str) -> None:
    hashes = (random_hashes if kind == "random" else clustered_hashes)(20_000, 7)
    i, j = near_pairs(hashes, 4)
    assert set(zip(i.tolist(), j.tolist(), strict=True)) == exhaustive(hashes, 4)


@pytest.mark.parametrize("kind", ["random", "clustered"])
def test_links_give_the_components_of_all_pairs_cold_and_incremental(kind: str) -> None:
    hashes = (random_hashes if kind == "random" else clustered_hashes)(6000, 3)
    n = len(hashes)
    pairs = exhaustive(hashes, 4)
    a, b = (np.array(side, dtype=np.int64) for side in zip(*pairs, strict=True))
    expected = connected_components(n, a, b)
    assert (connected_components(n, *near_links(hashes, 4)) == expected).all()
    # A daily run: the old rows' links come from their groups, the new rows probe everything.
    new = np.zeros(n, dtype=bool)
    new[np.random.default_rng(0).choice(n, size=300, replace=False)] = True
    old = np.flatnonzero(~new)
    old_left, old_right = near_pairs(hashes[old], 4)
    left, right = near_links(hashes, 4, new)
    assert new[left].any() or new[right].any()
    assert (new[left] | new[right]).all()  # only links that reach a new row
    labels = connected_components(n, np.r_[old[old_left], left], np.r_[old[old_right], right])
    assert (labels == expected).all()


def test_connected_components_label_by_smallest_member() -> None:
    labels = connected_components(7, np.array([6, 3, 1, 5]), np.array([5, 1, 0, 4]))
    assert labels.tolist() == [0, 0, 2, 0, 4, 4, 4]


def test_sticky_components_cut_cross_purpose_links_hold_bridges_and_inherit() -> None:
    train, devel, free = 0, 1, -1
    locks = np.array([train, devel, free, free, train, free, devel, free])
    # 0-1: two purposes linked directly (cut). 2 bridges 4 (train) and 6 (devel) through 3: 2 and 3 held.
    # 5 joins 4 only: inherits train. 7 stands alone.
    left = np.array([0, 2, 3, 3, 5])
    right = np.array([1, 3, 4, 6, 4])
    result = sticky_components(8, left, right, locks)
    assert list(zip(*result.cut, strict=True)) == [(0, 1)]
    assert result.held.tolist() == [False, False, True, True, False, False, False, False]
    assert result.labels[5] == result.labels[4] != result.labels[6]
    assert result.labels[0] != result.labels[1]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _samples(rows: list[tuple[str, bytes]]) -> pd.DataFrame:
    frame = []
    for key, data in rows:
        result = inspect_bytes(data)
        assert isinstance(result, Inspected)
        frame.append({m.KEY: key, m.CATEGORY: key.split("/")[0], m.MD5: result.md5, m.PHASH: np.uint64(result.phash)})
    frame = pd.DataFrame(frame).astype({m.PHASH: "uint64"})
    return frame.assign(**{m.UNIQUE_ID: frame[m.MD5]})


def test_exact_and_near_duplicates_form_groups_on_real_images() -> None:
    original = encode(picture(7, (160, 120)), "png")
    frame = _samples(
        [
            ("good/1.png", original),
            ("good/2.png", original),  # exact copy
            ("good/3.jpg", encode(picture(7, (160, 120)), "jpg", quality=60)),  # re-encoded: near
            ("good/4.png", encode(picture(8, (160, 120)), "png")),  # another picture
            ("bad/5.png", encode(picture(9, (160, 120)), "png")),
            ("bad/6.png", encode(picture(9, (160, 120)), "png")),  # exact copy, another group
        ]
    )
    groups = group(frame, assignments.empty(), 4, incremental=False).samples.set_index(m.KEY)[m.DUPLICATE_GROUP]
    assert groups["good/1.png"] == groups["good/2.png"] == groups["good/3.jpg"]
    assert groups["bad/5.png"] == groups["bad/6.png"] != groups["good/1.png"]
    assert pd.isna(groups["good/4.png"])
    exact_only = group(frame, assignments.empty(), -1, incremental=False).samples.set_index(m.KEY)
    exact_only = exact_only[m.DUPLICATE_GROUP]
    assert exact_only["good/1.png"] == exact_only["good/2.png"] and pd.isna(exact_only["good/3.jpg"])


def _known(rows: list[dict]) -> pd.DataFrame:
    """Assignments as a parent version would carry them."""
    defaults = {m.FIRST_VERSION: 1, m.LAST_VERSION: 1, m.CATEGORY: "good", m.DUPLICATE_GROUP: None}
    frame = pd.DataFrame([{**defaults, **row} for row in rows])
    return m.to_table(frame, m.ASSIGNMENTS_SCHEMA).to_pandas()


FAR = [0xAAAA_0000_FFFF_0000, 0x5555_FFFF_0000_0000, 0x0000_0000_AAAA_5555, 0xF0F0_AAAA_0F0F_5555]  # far apart


def test_deleted_devel_content_stays_devel_for_copies_near_copies_and_its_item() -> None:
    """Content gone from the source (a ghost) still decides the purpose of what comes back."""
    devel_hash = 0x0F0F_F0F0_1234_5678
    known = _known(
        [
            {m.MD5: _md5("gone"), m.PURPOSE: "devel", m.KEY: "good/5_0.png", m.UNIQUE_ID: "5", m.PHASH: devel_hash},
            {m.MD5: _md5("back"), m.PURPOSE: "devel", m.KEY: "good/8_0.png", m.UNIQUE_ID: "8", m.PHASH: FAR[0]},
            {m.MD5: _md5("kept"), m.PURPOSE: "train", m.KEY: "good/6_0.png", m.UNIQUE_ID: "6", m.PHASH: FAR[1]},
        ]
    )
    samples = pd.DataFrame(
        {
            m.KEY: ["good/6_0.png", "other/77_0.png", "good/90_0.png", "good/5_3.png", "good/91_0.png"],
            m.CATEGORY: ["good", "other", "good", "good", "good"],
            m.MD5: [_md5("kept"), _md5("back"), _md5("near"), _md5("item"), _md5("new")],
            m.PHASH: np.array([FAR[1], FAR[0], devel_hash ^ 0b1011, FAR[2], FAR[3]], dtype=np.uint64),
            m.UNIQUE_ID: ["6", "77", "90", "5", "91"],
        }
    )
    result = group(samples, known, 4, incremental=True)
    out = result.samples.set_index(m.KEY)
    assert out.at["good/6_0.png", m.PURPOSE] == "train"
    assert out.at["other/77_0.png", m.PURPOSE] == "devel"  # the same bytes re-added under another key
    assert out.at["other/77_0.png", m.UNIQUE_ID] == "8"  # content keeps the item it was assigned under
    assert out.at["good/90_0.png", m.PURPOSE] == "devel"  # a near copy of deleted devel content
    assert out.at["good/5_3.png", m.PURPOSE] == "devel"  # a new photo of a deleted devel item
    assert pd.isna(out.at["good/91_0.png", m.PURPOSE])  # unrelated: free for the split
    assert out.at["other/77_0.png", m.FIRST_VERSION] == 1 and pd.isna(out.at["good/91_0.png", m.FIRST_VERSION])
    assert out.at["good/90_0.png", m.DUPLICATE_GROUP] == result.ghost_groups[_md5("gone")]  # grouped with a ghost
    assert result.held.empty and result.cross.empty


def test_a_link_between_two_purposes_is_cut_and_reported_and_a_bridge_is_held() -> None:
    known = _known(
        [
            {m.MD5: _md5("a"), m.PURPOSE: "train", m.KEY: "good/1_0.png", m.UNIQUE_ID: "1", m.PHASH: 0},
            {m.MD5: _md5("b"), m.PURPOSE: "devel", m.KEY: "good/2_0.png", m.UNIQUE_ID: "2", m.PHASH: 2**40 - 1},
        ]
    )
    samples = pd.DataFrame(
        {
            # good/1_0 renamed into item 2 (devel): the link is cut and reported, nothing moves.
            m.KEY: ["good/2_9.png", "good/2_0.png", "good/3_0.png"],
            m.CATEGORY: ["good"] * 3,
            m.MD5: [_md5("a"), _md5("b"), _md5("bridge")],
            # the bridge is a near copy of the train content and shares... item 2 (devel): held back.
            m.PHASH: np.array([0, 2**40 - 1, 0b11], dtype=np.uint64),
            m.UNIQUE_ID: ["2", "2", "2"],
        }
    )
    result = group(samples, known, 4, incremental=True, new_keys=np.array([True, False, True]))
    out = result.samples.set_index(m.KEY)
    assert out.at["good/2_9.png", m.PURPOSE] == "train" and out.at["good/2_9.png", m.UNIQUE_ID] == "1"
    assert out.at["good/2_0.png", m.PURPOSE] == "devel"
    assert result.held[m.KEY].tolist() == ["good/3_0.png"]
    assert (
        "train: good/2_9.png" in result.held["detail"].iloc[0]
        and "devel: good/2_0.png" in result.held["detail"].iloc[0]
    )
    cross = result.cross
    assert len(cross) == 1 and cross.iloc[0]["link"] == "item"
    assert {cross.iloc[0]["purpose"], cross.iloc[0]["other_purpose"]} == {"train", "devel"}


def test_group_ids_are_kept_across_versions() -> None:
    known = _known(
        [
            {
                m.MD5: _md5("0"),
                m.PURPOSE: "train",
                m.KEY: "a",
                m.UNIQUE_ID: "a",
                m.PHASH: 0,
                m.DUPLICATE_GROUP: "dup-old",
            },
            {
                m.MD5: _md5("1"),
                m.PURPOSE: "train",
                m.KEY: "b",
                m.UNIQUE_ID: "b",
                m.PHASH: 1,
                m.DUPLICATE_GROUP: "dup-old",
            },
        ]
    )
    samples = pd.DataFrame(
        {
            m.KEY: list("abcd"),
            m.CATEGORY: ["good"] * 4,
            m.MD5: [_md5(str(i)) for i in range(4)],
            m.PHASH: np.array([0, 1, 3, 0xFFFF_FFFF_0000_0000], dtype=np.uint64),
            m.UNIQUE_ID: list("abcd"),
        }
    )
    grouped = group(samples, known, 4, incremental=True).samples
    assert grouped[m.DUPLICATE_GROUP].tolist()[:3] == ["dup-old"] * 3
    assert pd.isna(grouped[m.DUPLICATE_GROUP].iloc[3])
    assert grouped[m.PURPOSE].tolist()[:3] == ["train"] * 3
