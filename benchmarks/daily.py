"""Rows at production size: the near-duplicate search on realistic and on a million hashes, and the daily run
on a committed 1,000,000-row parent.

The daily run's source is a real folder tree of a million small files (their content is their key, so their
md5 is real) in class and day folders, written once and kept under ``benchmarks/data/daily`` between runs;
its parent version is committed through the flow's own publish functions, with random phashes and about 1%
planted near copies (real datasets hold many distinct scenes; clustered look-alikes are the
``near_duplicates`` row's). The run adds 1,000 real photographs and times the whole ``strata curate``
process, imports and Prefect's API start included.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from benchmarks.data import CLASSES, make_images, photographs
from loader import manifest as m

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / "data"
DAYS = 30
REGEX = r"(\d+)_\d+\.\w+$"
THRESHOLD = 4


# --- hashes ----------------------------------------------------------------------------------------------


def random_hashes(count: int, seed: int = 0, planted: float = 0.01) -> np.ndarray:
    """Uniform 64-bit hashes with a share of planted near copies (1-4 bits flipped)."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**64, size=count, dtype=np.uint64)
    copies = rng.choice(count, size=int(count * planted) * 2, replace=False)
    originals, targets = np.split(copies, 2)
    flips = np.zeros(len(targets), dtype=np.uint64)
    for bits in range(4):
        hit = rng.random(len(targets)) < (1.0 if bits == 0 else 0.6)
        flips |= np.where(hit, np.uint64(1) << rng.integers(0, 64, size=len(targets)).astype(np.uint64), np.uint64(0))
    hashes[targets] = hashes[originals] ^ flips
    return hashes


def _scene_hashes(args: tuple[int, int, int]) -> np.ndarray:
    """phashes of ``variants`` re-encoded, cropped and shifted copies of each of ``scenes`` scenes."""
    from PIL import Image

    from tasks.inspect import inspect_bytes

    scenes, variants, seed = args
    rng = np.random.default_rng(seed)
    photos = photographs()
    out = []
    for _ in range(scenes):
        photo = photos[int(rng.integers(len(photos)))]
        width, height = photo.size
        side = rng.uniform(0.15, 0.6)
        w, h = int(width * side), int(height * side * 0.75)
        x, y = int(rng.integers(0, width - w)), int(rng.integers(0, height - h))
        for _ in range(variants):
            dx, dy = (int(v) for v in rng.integers(-w // 40 - 1, w // 40 + 2, size=2))
            trim = int(rng.integers(0, w // 30 + 1))
            box = (max(0, x + dx + trim), max(0, y + dy + trim), min(width, x + dx + w - trim), min(height, y + dy + h))
            variant = photo.crop(box).resize((160, 120), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            variant.save(buffer, "JPEG", quality=int(rng.integers(60, 95)))
            out.append(inspect_bytes(buffer.getvalue()).phash)
    return np.array(out, dtype=np.uint64)


def realistic_hashes(count: int, variants: int = 5) -> np.ndarray:
    """phashes of look-alike photographs: ``count // variants`` scenes cut from the benchmark photos, each
    re-encoded, cropped and shifted ``variants`` times (cached under ``benchmarks/data``)."""
    cache = CACHE / f"phashes-{count}-{variants}.npy"
    if cache.exists():
        return np.load(cache)
    scenes = count // variants
    parts = [(scenes // 8 + (1 if i < scenes % 8 else 0), variants, i) for i in range(8)]
    with ProcessPoolExecutor(2) as pool:
        hashes = np.concatenate(list(pool.map(_scene_hashes, parts)))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, hashes)
    return hashes


def exhaustive_pairs(hashes: np.ndarray, threshold: int) -> set[tuple[int, int]]:
    """Every pair within the threshold by comparing each hash with every later one (numpy, in blocks)."""
    pairs: set[tuple[int, int]] = set()
    for start in range(0, len(hashes), 1000):
        block = hashes[start : start + 1000]
        left, right = np.nonzero(np.bitwise_count(block[:, None] ^ hashes[None, :]) <= threshold)
        left += start
        keep = left < right
        pairs.update(zip(left[keep].tolist(), right[keep].tolist(), strict=True))
    return pairs


def near_duplicates_row(count: int, subset: int) -> dict:
    """Our cold search over ``count`` realistic phashes against the exhaustive search, timed on ``subset`` and
    scaled by the square of the size; the two must find identical pairs on the subset."""
    from tasks.near import near_links, near_pairs

    hashes = realistic_hashes(count)
    start = time.perf_counter()
    near_links(hashes, THRESHOLD)
    ours = time.perf_counter() - start
    sub = hashes[:subset]
    start = time.perf_counter()
    expected = exhaustive_pairs(sub, THRESHOLD)
    exhaustive = time.perf_counter() - start
    left, right = near_pairs(sub, THRESHOLD)
    found = set(zip(left.tolist(), right.tolist(), strict=True))
    assert found == expected, f"near_pairs differs from the exhaustive search: {len(found)} vs {len(expected)} pairs"
    distinct = len(np.unique(hashes))
    return {
        "ours": ours,
        "baseline": exhaustive * (count / subset) ** 2,
        "unit": "s",
        "note": f"{count:,} phashes of look-alike photographs ({count // 5:,} scenes x 5 re-encoded, cropped, shifted "
        f"variants; {distinct:,} distinct); exhaustive over {subset:,} ({exhaustive:.2f} s) scaled by "
        f"({count:,}/{subset:,})^2; identical pairs on the subset ({len(expected):,})",
    }


NEAR_1M = """
import sys, time
from benchmarks.daily import peak_rss, random_hashes
from tasks.near import near_links
hashes = random_hashes(int(sys.argv[1]))
base = peak_rss()
start = time.perf_counter()
left, right = near_links(hashes, int(sys.argv[2]))
seconds = time.perf_counter() - start
print(seconds, peak_rss(), base, len(left))
"""


def peak_rss() -> int:
    """This process's peak resident set size in bytes (``VmHWM``: unlike ``ru_maxrss`` it does not count
    what the parent held when it forked this process)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def near_duplicates_1m_row(count: int) -> dict:
    """A cold search of ``count`` random hashes with planted near copies, in a fresh process: time and peak RSS."""
    run = subprocess.run(
        [sys.executable, "-c", NEAR_1M, str(count), str(THRESHOLD)], capture_output=True, text=True, cwd=REPO
    )
    if run.returncode != 0:
        raise RuntimeError(f"near_duplicates_1m failed: {run.stderr[-2000:]}")
    seconds, peak, base, links = run.stdout.split()
    return {
        "ours": float(seconds),
        "baseline": None,
        "unit": "s",
        "peak_gib": int(peak) / 2**30,
        "note": f"{count:,} random phashes, 1% planted near copies, threshold {THRESHOLD}: {int(links):,} links; "
        f"peak RSS {int(peak) / 2**30:.2f} GiB (the process before the search: {int(base) / 2**30:.2f} GiB)",
    }


# --- the daily run -----------------------------------------------------------------------------------------


def _write_files(args: tuple[str, list[str]]) -> int:
    root, keys = args
    made = set()
    for key in keys:
        folder = key.rsplit("/", 1)[0]
        if folder not in made:
            os.makedirs(os.path.join(root, folder), exist_ok=True)
            made.add(folder)
        with open(os.path.join(root, key), "wb") as handle:
            handle.write(key.encode())
    return len(keys)


def parent_keys(rows: int, seed: int = 0) -> list[str]:
    """Keys of the parent's objects: imbalanced classes, day folders, several photos per item."""
    rng = np.random.default_rng(seed)
    names = list(CLASSES)
    category = rng.choice(len(names), size=rows, p=list(CLASSES.values()))
    item = np.sort(rng.integers(0, rows // 2, size=rows))
    day = rng.integers(1, DAYS + 1, size=rows)
    return [
        f"{names[c]}/2026-11-{d:02d}/{i}_{1543412160000 + n}.bmp"
        for n, (c, d, i) in enumerate(zip(category.tolist(), day.tolist(), item.tolist(), strict=True))
    ]


def source_tree(rows: int) -> Path:
    """The parent's source folder (written once, with two processes, then kept)."""
    folder = CACHE / f"daily-{rows}" / "src"
    marker = folder.parent / "complete"
    if marker.exists():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    keys = parent_keys(rows)
    parts = [(str(folder), keys[i::8]) for i in range(8)]
    with ProcessPoolExecutor(2) as pool:
        assert sum(pool.map(_write_files, parts)) == rows
    marker.write_text(str(rows))
    return folder


def commit_parent(source: Path, root: Path, rows: int) -> None:
    """Commit version 1 of dataset ``daily`` for the tree: listed as the flow lists it, grouped and split by the
    flow's own stages (cold), published by the commit protocol, assignments included."""
    import fsspec

    from tasks import assignments
    from tasks.diff import manifest_diff, summarize_changes
    from tasks.duplicates import group
    from tasks.listing import list_source
    from tasks.publish import Candidate, Store, claim_version, commit_record, serialize, sha256, write_version
    from tasks.split import assign_purposes, unique_ids

    cached = source.parent / "v000001"
    if not cached.exists():
        fs = fsspec.filesystem("file")
        objects = list_source(fs, str(source), fs.unstrip_protocol(str(source))).objects
        assert len(objects) == rows
        objects[m.MD5] = [hashlib.md5(k.encode()).hexdigest() for k in objects[m.KEY]]
        objects = objects.assign(
            **{
                m.FORMAT: "bmp",
                m.WIDTH: np.int32(640),
                m.HEIGHT: np.int32(480),
                m.CHANNELS: np.int32(3),
                m.PHASH: random_hashes(rows, seed=1),
            }
        )
        objects[m.UNIQUE_ID], _ = unique_ids(objects, REGEX)
        grouped = group(objects, assignments.empty(), THRESHOLD, incremental=False).samples
        split = assign_purposes(grouped, {"train": 0.8, "devel": 0.2}, 0, [m.CATEGORY], grouped["unit"].to_numpy())
        manifest = split.samples.drop(columns="unit")
        changes = manifest_diff(None, manifest)
        candidate = Candidate(
            manifest=manifest,
            rejects=m.empty_frame(m.REJECTS_SCHEMA),
            diff=summarize_changes(changes, 0),
            changes=changes,
        )
        files = serialize(candidate, 1)
        parameters = {
            "split": {"train": 0.8, "devel": 0.2},
            "seed": 0,
            "stratify": [m.CATEGORY],
            "uniqueness": REGEX,
            "near_duplicates": THRESHOLD,
            "fraction_tolerance": 0.05,
            "min_stratum": 20,
            "max_group_share": 0.05,
            "max_group_items": 10,
            "max_pixels": 100_000_000,
        }
        staging = cached.parent / "staging"
        shutil.rmtree(staging, ignore_errors=True)
        store = Store(fs, str(staging / "daily"))
        claim_version(store, None, "benchmark")
        validation = {"success": True, "failed": [], "summary": "committed by the benchmark"}
        record = commit_record(
            dataset="daily",
            version=1,
            parent_version=None,
            source=fs.unstrip_protocol(str(source)),
            parameters=parameters,
            manifest=files.manifest,
            rejects=candidate.rejects,
            diff=candidate.diff,
            manifest_sha256=sha256(files.manifest_bytes),
            rejects_sha256=sha256(files.rejects_bytes),
            assignments_sha256=sha256(files.assignments_bytes),
            assignments_rows=files.assignments_rows,
            validation=validation,
            flow_run_id=None,
        )
        extra = {m.ASSIGNMENTS_FILE: files.assignments_bytes}
        write_version(store, 1, None, files.manifest_bytes, files.rejects_bytes, validation, record, extra)
        os.replace(staging / "daily" / "v000001", cached)
        shutil.rmtree(staging)
    target = root / "daily"
    target.mkdir(parents=True)
    shutil.copytree(cached, target / "v000001")


STAGES = "list|diff|inspect|duplicates|split|validate|publish|report"
_STAGE_LINE = re.compile(rf"^(\d\d):(\d\d):(\d\d)\.(\d+) \| \w+\s+\| .*? - ({STAGES}): ")


def _stages(log: str, started: float) -> dict[str, float]:
    """Seconds from the process start to each stage's last log line, then per stage (from the one before)."""
    ends: dict[str, float] = {}
    day = None
    for line in log.splitlines():
        match = _STAGE_LINE.match(line)
        if match:
            h, mi, s, frac, stage = match.groups()
            stamp = int(h) * 3600 + int(mi) * 60 + int(s) + float(f"0.{frac}")
            day = day if day is not None else started - started % 86400
            ends[stage] = day + stamp
    out, previous = {}, started
    for stage, end in sorted(ends.items(), key=lambda kv: kv[1]):
        out[stage] = round(end - previous, 2)
        previous = end
    return out


DAILY = """
import resource, subprocess, sys, time
start = time.time()
run = subprocess.run(sys.argv[2:], capture_output=True, text=True)
wall = time.time() - start
print(run.returncode, wall, start, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
sys.stderr.write(run.stdout + run.stderr)
"""


def daily_run_row(work: Path, rows: int, new: int = 1000) -> dict:
    # The peak RSS is the curate process's, read by a small wrapper process: ru_maxrss of a process counts what
    # its parent held when it forked it, and this benchmark process is large.
    """``strata curate`` of the parent's source with ``new`` real photographs added, in a fresh process."""
    source = source_tree(rows)
    root = work / "daily-manifests"
    commit_parent(source, root, rows)
    added = make_images(work / "daily-new", new, formats=("jpg", "png", "bmp"), seed=3, first=rows * 10)
    moved = []
    for path in sorted(added.rglob("*.*")):
        target = source / path.relative_to(added)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(path, target)
        moved.append(target)
    command = [
        sys.executable,
        "-m",
        "strata.cli",
        "curate",
        str(source),
        "--dataset",
        "daily",
        "--manifests",
        str(root),
        "--uniqueness",
        REGEX,
    ]
    env = {**os.environ, "PREFECT_LOGGING_LEVEL": "INFO", "PREFECT_HOME": str(work / "daily-prefect")}
    # A daily run finds the Prefect home of yesterday's: migrate its database first with a run of two images.
    warm = make_images(work / "daily-warm", 2, formats=("png",), seed=4)
    warm_run = [*command[:4], str(warm), "--dataset", "warm", "--manifests", str(work / "daily-warm-m")]
    subprocess.run(warm_run, capture_output=True, cwd=REPO, env=env, check=True)
    try:
        run = subprocess.run(
            [sys.executable, "-c", DAILY, "--", *command], capture_output=True, text=True, cwd=REPO, env=env
        )
    finally:
        for path in moved:
            path.unlink()
    code, wall, started, peak = run.stdout.split()
    if int(code) != 0:
        raise RuntimeError(f"the daily run failed: {run.stderr[-3000:]}")
    info = json.loads((root / "daily" / "v000002" / m.COMMIT_FILE).read_text())
    stages = _stages(run.stderr, float(started))
    return {
        "ours": float(wall),
        "baseline": None,
        "unit": "s",
        "peak_gib": int(peak) / 2**30,
        "note": f"{rows:,}-row parent + {new:,} new photographs (JPEG/PNG/BMP 640x480), near duplicates on: "
        f"version 2 with {info['rows']:,} rows, diff {info['diff']}; peak RSS {int(peak) / 2**30:.2f} GiB; "
        f"seconds per stage (from the stage before; the first includes imports and the API start): {stages}",
        "stages": stages,
    }


def listing_ratio(rows: int) -> dict:
    """Our listing of the parent's tree against ``os.walk`` + ``stat`` of it, best of 3 each, interleaved."""
    import fsspec

    from tasks.listing import list_source

    source = source_tree(rows)
    fs = fsspec.filesystem("file")

    def walk() -> int:
        count = 0
        for folder, _, files in os.walk(source):
            for name in files:
                os.stat(os.path.join(folder, name))
                count += 1
        return count

    ours, baseline = [], []
    for _ in range(3):
        start = time.perf_counter()
        walk()
        baseline.append(time.perf_counter() - start)
        start = time.perf_counter()
        list_source(fs, str(source), fs.unstrip_protocol(str(source)))
        ours.append(time.perf_counter() - start)
    return {"ours": min(ours), "walk_stat": min(baseline), "speed": min(baseline) / min(ours)}
