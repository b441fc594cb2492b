"""Duplicate grouping: multi-index search equals exhaustive search; exact and near groups on real images."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from loader import manifest as m
from tasks.duplicates import connected_components, find_duplicates, near_pairs
from tasks.inspect import Inspected, inspect_bytes
from tests.conftest import encode, picture


def _clustered_hashes(seed: int, clusters: int = 200) -> np.ndarray:
    rng = np.random.default_rng(seed)
    hashes = []
    for base in rng.integers(0, 2**63, size=clusters, dtype=np.uint64):
        hashes.append(base)
        for _ in range(int(rng.integers(0, 4))):
            flips = rng.choice(64, size=int(rng.integers(0, 8)), replace=False)
            value = base
            for bit in flips:
                value ^= np.uint64(1) << np.uint64(bit)
            hashes.append(value)
    return np.array(hashes, dtype=np.uint64)


@pytest.mark.parametrize("threshold", [0, 1, 4, 8])
def test_near_pairs_equal_exhaustive_search(threshold: int) -> None:
    hashes = _clustered_hashes(threshold)
    i, j = near_pairs(hashes, threshold)
    ei, ej = np.triu_indices(len(hashes), k=1)
    close = np.bitwise_count(hashes[ei] ^ hashes[ej]) <= threshold
    assert set(zip(i.tolist(), j.tolist(), strict=False)) == set(
        zip(ei[close].tolist(), ej[close].tolist(), strict=False)
    )
    assert len(i) > 0


def test_connected_components_label_by_smallest_member() -> None:
    labels = connected_components(7, np.array([6, 3, 1, 5]), np.array([5, 1, 0, 4]))
    assert labels.tolist() == [0, 0, 2, 0, 4, 4, 4]


def _row(key: str, data: bytes) -> dict:
    result = inspect_bytes(data)
    assert isinstance(result, Inspected)
    return {m.KEY: key, m.MD5: result.md5, m.PHASH: np.uint64(result.phash)}


def test_exact_and_near_duplicates_form_groups() -> None:
    original = encode(picture(7, (160, 120)), "png")
    rows = [
        _row("good/1.png", original),
        _row("good/2.png", original),  # exact copy
        _row("good/3.jpg", encode(picture(7, (160, 120)), "jpg", quality=60)),  # re-encoded: near
        _row("good/4.png", encode(picture(8, (160, 120)), "png")),  # another picture
        _row("bad/5.png", encode(picture(9, (160, 120)), "png")),
        _row("bad/6.png", encode(picture(9, (160, 120)), "png")),  # exact copy, another group
    ]
    frame = pd.DataFrame(rows)
    grouped = find_duplicates(frame, threshold=4).set_index(m.KEY)
    groups = grouped[m.DUPLICATE_GROUP]
    assert groups["good/1.png"] == groups["good/2.png"] == groups["good/3.jpg"]
    assert groups["bad/5.png"] == groups["bad/6.png"] != groups["good/1.png"]
    assert pd.isna(groups["good/4.png"])
    assert grouped["exact_duplicate"].to_dict() == {
        "good/1.png": False,
        "good/2.png": False,
        "good/3.jpg": False,
        "good/4.png": False,
        "bad/5.png": True,
        "bad/6.png": True,
    }
    exact_only = find_duplicates(frame, threshold=-1).set_index(m.KEY)[m.DUPLICATE_GROUP]
    assert exact_only["good/1.png"] == exact_only["good/2.png"] and pd.isna(exact_only["good/3.jpg"])


def test_group_ids_are_kept_across_versions() -> None:
    md5s = [hashlib.md5(str(i).encode()).hexdigest() for i in range(4)]
    frame = pd.DataFrame(
        {
            m.KEY: list("abcd"),
            m.MD5: md5s,
            m.PHASH: np.array([0, 1, 3, 0xFFFF_FFFF_0000_0000], dtype=np.uint64),
            m.DUPLICATE_GROUP: ["dup-old", None, None, None],
        }
    )
    grouped = find_duplicates(frame, threshold=4)
    assert grouped[m.DUPLICATE_GROUP].tolist()[:3] == ["dup-old"] * 3
    assert pd.isna(grouped[m.DUPLICATE_GROUP].iloc[3])
