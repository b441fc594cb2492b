"""Which rows a pipeline yields, in which order: pure numpy, seeded, no TensorFlow.

Three samplers, each an iterator of :class:`Draws` (one per epoch):

* **plain**: every row exactly once per epoch, in a seeded permutation that changes with the epoch;
* **weighted**: groups (strata) drawn with probability proportional to ``weighting(count)``; within a group,
  rows cycle through a seeded shuffled order, reshuffled at every cycle. An epoch is as many draws as rows;
* **balanced**: every batch holds ``classes_per_batch`` distinct groups (drawn without replacement, with the
  same weights) and ``images_per_class`` rows of each. An epoch is ``rows // batch`` batches (at least one).

Every random choice derives from ``(seed, purpose tag, epoch or group, cycle)`` through numpy's
``SeedSequence``, so the same arguments give the same draws in every process on every platform.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from strata.errors import ConfigError

Weighting = str | Callable[[int], float]

WEIGHTINGS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "uniform": np.ones_like,
    "count": lambda counts: counts,
    "sqrt": np.sqrt,
    "log": np.log1p,  # log(1 + n): never zero, so single-sample groups are still drawn
    "logx+1": lambda counts: np.log(counts) + 1.0,
}

GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer on uint64 arrays: a platform-independent hash behind every seeded key."""
    with np.errstate(over="ignore"):
        z = x + GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


# Stream tags keep the random streams of different choices apart.
_SHARD, _EPOCH, _GROUPS, _CYCLE = 1, 2, 3, 4


def _rng(seed: int, *words: int) -> np.random.Generator:
    return np.random.default_rng([seed, *words])


@dataclass(frozen=True)
class Draws:
    """One epoch's draws: manifest row numbers, and the group each row was drawn for (-1: plain)."""

    rows: np.ndarray
    groups: np.ndarray
    epoch: int


def group_probabilities(counts: Sequence[int], weighting: Weighting) -> np.ndarray:
    """Draw probabilities of groups with these sizes under a weighting preset or callable."""
    sizes = np.asarray(counts, dtype=np.float64)
    if callable(weighting):
        weights = np.array([float(weighting(int(n))) for n in sizes])
    elif weighting in WEIGHTINGS:
        weights = WEIGHTINGS[weighting](sizes).astype(np.float64)
    else:
        raise ConfigError(
            f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)} or a callable count -> weight"
        )
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise ConfigError(
            f"weighting {weighting!r} gave weights {weights.tolist()}; they must be finite, >= 0, not all 0"
        )
    return weights / weights.sum()


def shard_rows(count: int, seed: int, num_shards: int = 1, shard: int = 0) -> np.ndarray:
    """The rows one of ``num_shards`` workers owns: a fixed seeded partition, disjoint across workers."""
    if num_shards < 1 or not 0 <= shard < num_shards:
        raise ConfigError(f"shard {shard} of {num_shards} does not exist")
    if num_shards == 1:
        return np.arange(count, dtype=np.int64)
    mine = _rng(seed, _SHARD).permutation(count)[shard::num_shards]
    if mine.size == 0:
        raise ConfigError(f"worker {shard} of {num_shards} gets no samples: only {count} rows to share")
    return np.sort(mine).astype(np.int64)


def plain(rows: np.ndarray, seed: int, shuffle: bool = True, first_epoch: int = 0) -> Iterator[Draws]:
    """Every row exactly once per epoch; a seeded permutation per epoch when ``shuffle``. Lazy."""
    for epoch in _count(first_epoch):
        order = _rng(seed, _EPOCH, epoch).permutation(rows) if shuffle else rows
        yield Draws(order, np.full(order.shape, -1, dtype=np.int64), epoch)


class _Cycler:
    """Rows of each group in a seeded shuffled order, reshuffled every time a group's rows run out."""

    def __init__(self, members: list[np.ndarray], seed: int, shuffle: bool) -> None:
        self._members = members
        self._seed = seed
        self._shuffle = shuffle
        self._taken = np.zeros(len(members), dtype=np.int64)

    def _cycle(self, group: int, cycle: int) -> np.ndarray:
        rows = self._members[group]
        return _rng(self._seed, _CYCLE, group, cycle).permutation(rows) if self._shuffle else rows

    def take(self, groups: np.ndarray) -> np.ndarray:
        """The next row of each drawn group, in draw order."""
        rows = np.empty(groups.shape, dtype=np.int64)
        order = np.argsort(groups, kind="stable")
        present, starts, counts = np.unique(groups[order], return_index=True, return_counts=True)
        for group, start, count in zip(present.tolist(), starts.tolist(), counts.tolist(), strict=False):
            size = len(self._members[group])
            first = int(self._taken[group])
            positions = np.arange(first, first + count)
            taken = np.empty(count, dtype=np.int64)
            for cycle in range(first // size, (first + count - 1) // size + 1):
                inside = positions // size == cycle
                taken[inside] = self._cycle(group, cycle)[positions[inside] % size]
            rows[order[start : start + count]] = taken
            self._taken[group] += count
        return rows


def _groups(codes: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The groups present among ``rows`` (their codes, ascending) and each group's rows."""
    present = np.unique(codes[rows])
    return present, [rows[codes[rows] == code] for code in present]


def weighted(
    rows: np.ndarray,
    codes: np.ndarray,
    probabilities: np.ndarray,
    seed: int,
    shuffle: bool = True,
    first_epoch: int = 0,
) -> Iterator[Draws]:
    """Groups drawn with the given probabilities (indexed by group code), rows cycling within a group.

    Args:
        rows: the manifest rows this worker owns.
        codes: the group code of every manifest row.
        probabilities: the draw probability of every group code (over the whole manifest).
    """
    present, members = _groups(codes, rows)
    p = probabilities[present]
    if p.sum() <= 0:
        raise ConfigError("every group this worker holds has weight 0; nothing can be drawn")
    p = p / p.sum()
    cycler = _Cycler(members, seed, shuffle)

    def epochs() -> Iterator[Draws]:
        for epoch in _count(first_epoch):
            drawn = _rng(seed, _GROUPS, epoch).choice(len(present), size=len(rows), p=p)
            yield Draws(cycler.take(drawn), present[drawn], epoch)

    return epochs()


def balanced(
    rows: np.ndarray,
    codes: np.ndarray,
    probabilities: np.ndarray,
    classes_per_batch: int,
    images_per_class: int,
    seed: int,
    shuffle: bool = True,
    first_epoch: int = 0,
) -> Iterator[Draws]:
    """Batches of exactly ``classes_per_batch`` distinct groups with ``images_per_class`` rows each.

    Groups are drawn without replacement within a batch, each with its weight (Gumbel top-k); an epoch is
    ``len(rows) // batch`` batches, at least one.
    """
    present, members = _groups(codes, rows)
    logits = np.log(probabilities[present], where=probabilities[present] > 0, out=np.full(len(present), -np.inf))
    drawable = int(np.isfinite(logits).sum())
    if drawable < classes_per_batch:
        raise ConfigError(
            f"balanced batches need {classes_per_batch} classes per batch, but this worker holds only "
            f"{drawable} class(es) with a positive weight; lower classes_per_batch"
        )
    batch = classes_per_batch * images_per_class
    batches = max(1, len(rows) // batch)
    cycler = _Cycler(members, seed, shuffle)

    def epochs() -> Iterator[Draws]:
        for epoch in _count(first_epoch):
            keys = logits + _rng(seed, _GROUPS, epoch).gumbel(size=(batches, len(present)))
            chosen = np.argsort(-keys, axis=1, kind="stable")[:, :classes_per_batch]
            drawn = np.repeat(chosen.reshape(-1), images_per_class)
            yield Draws(cycler.take(drawn), present[drawn], epoch)

    return epochs()


def epochs(repeat: bool | int) -> int | None:
    """How many epochs ``repeat`` asks for: False -> 1, True -> None (forever), an int -> that many."""
    if isinstance(repeat, bool):
        return None if repeat else 1
    if isinstance(repeat, int) and repeat >= 1:
        return repeat
    raise ConfigError(f"repeat must be True, False or a positive number of epochs, got {repeat!r}")


def _count(start: int) -> Iterator[int]:
    epoch = start
    while True:
        yield epoch
        epoch += 1
