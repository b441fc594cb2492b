"""Two curation processes and several readers on one dataset at once: both runs publish (one after the
other, by the commit protocol alone: the test API has no concurrency limit) and every read, by the manifest
reader and by `loader.from_manifest`, sees one complete committed version, never going backwards."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import fsspec
from prefect import get_client

from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions

UNIQUENESS = r"(\d+)_\d+\.\w+$"
REPO = Path(__file__).resolve().parents[2]


def _items(write: Callable[..., Path], folder: str, items: range) -> None:
    for item in items:
        for photo in range(2):
            write(f"{folder}/{'good' if item % 3 else 'bad_cap'}/{item}_{photo}.png", seed=item * 10 + photo)


def test_two_flows_and_readers_at_once(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    _items(write_image, "base", range(6))
    for folder, extra in (("a", range(10, 12)), ("b", range(20, 24))):
        _items(write_image, folder, range(6))
        _items(write_image, folder, extra)
    src, root = tmp_path / "src", tmp_path / "manifests"
    dataset = str(root / "d")
    curate_dataset(
        source=str(src / "base"), dataset="d", manifest_root=str(root), options=CurateOptions(uniqueness=UNIQUENESS)
    )

    stop = threading.Event()
    problems: list[str] = []
    seen: dict[str, list[int]] = {}

    def read_manifests(name: str) -> None:
        while not stop.is_set():
            try:
                version = m.open_version(dataset, "latest")
                rows = m.read_manifest(dataset, version.number)
                if len(rows) != version.info["rows"]:
                    problems.append(
                        f"{name}: v{version.number} has {len(rows)} rows, manifest.json says {version.info['rows']}"
                    )
                seen.setdefault(name, []).append(version.number)
            except Exception as err:  # any failure to read a committed version is the bug this test looks for
                problems.append(f"{name}: {type(err).__name__}: {err}")
            time.sleep(0.02)

    def load_batches() -> None:
        from loader import from_manifest

        while not stop.is_set():
            try:
                data = from_manifest(dataset, purpose=None, batch_size=4, image_size=(32, 32), shuffle=False)
                images, labels = next(iter(data))
                if images.shape[1:] != (32, 32, 3):
                    problems.append(f"loader: batch of shape {images.shape}")
                seen.setdefault("loader", []).append(int(data.version))
            except Exception as err:
                problems.append(f"loader: {type(err).__name__}: {err}")

    readers = [threading.Thread(target=read_manifests, args=(f"reader-{i}",)) for i in range(3)]
    readers.append(threading.Thread(target=load_batches))
    for reader in readers:
        reader.start()
    with get_client(sync_client=True) as client:
        env = {**os.environ, "PREFECT_API_URL": str(client.api_url), "PREFECT_LOGGING_LEVEL": "WARNING"}
    flows = [
        subprocess.Popen(
            [sys.executable, "-m", "strata.cli", "curate", str(src / folder), "--dataset", "d"]
            + ["--manifests", str(root), "--uniqueness", UNIQUENESS, "--quiet"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for folder in ("a", "b")
    ]
    outputs = [flow.communicate(timeout=600)[0] for flow in flows]
    time.sleep(1)  # a last read of the final version by every reader
    stop.set()
    for reader in readers:
        reader.join(timeout=120)

    assert [flow.returncode for flow in flows] == [0, 0], outputs
    assert not problems, problems[:5]
    committed = [m.open_version(dataset, n).info for n in (1, 2, 3)]
    assert [(c["version"], c["parent_version"]) for c in committed] == [(1, None), (2, 1), (3, 2)]
    assert sorted(c["rows"] for c in committed[1:]) == [16, 20]  # each run's own version, nothing lost
    assert m.committed_versions(fsspec.filesystem("file"), str(root / "d")) == [1, 2, 3]
    for name, versions in seen.items():
        assert versions and versions == sorted(versions), name  # never an older version after a newer one
        assert versions[-1] == 3, name
