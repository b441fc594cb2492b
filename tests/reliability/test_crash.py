"""A curation run killed (SIGKILL) at every stage, including between the Parquet files and the commit:
readers keep seeing the previous version, and the next run takes over the debris and publishes normally."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import fsspec
import pytest
from prefect import get_client

from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions

UNIQUENESS = r"(\d+)_\d+\.\w+$"

# Runs the flow in a fresh process that kills itself at one point; the stage functions are replaced by
# name in the flow module, the writes inside publish by wrapping its exclusive create.
KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import flows.curate as flow
    import tasks.publish as publish
    from loader import manifest as m
    from strata.config import CurateOptions

    point, source, root, uniqueness = sys.argv[1:5]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    stages = {"list": "list_task", "diff": "diff_task", "inspect": "_inspect", "plan": "_plan_candidate",
              "validate": "validate_task", "grid": "grid_task"}
    if point in stages:
        setattr(flow, stages[point], die)
    create = publish._create
    before = {"claim": m.CLAIM_FILE, "commit": m.COMMIT_FILE}
    after = {"parquet": m.MANIFEST_FILE, "files": m.VALIDATION_FILE, "latest": m.COMMIT_FILE}

    def create_then_maybe_die(fs, path, data):
        if point in before and path.endswith("/" + before[point]):
            die()
        create(fs, path, data)
        if point in after and path.endswith("/" + after[point]):
            die()

    publish._create = create_then_maybe_die
    flow.curate_dataset(source=source, dataset="d", manifest_root=root,
                        options=CurateOptions(uniqueness=uniqueness))
    """
)

# "latest" dies after the commit, before the LATEST hint: the version is published, the hint is stale.
POINTS = ["list", "diff", "inspect", "plan", "validate", "grid", "claim", "parquet", "files", "commit"]


@pytest.fixture(scope="module")
def api_url() -> str:
    """The session harness's API, so the killed processes need not start their own (8 s each)."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


def _kill_at(point: str, source: Path, root: Path, api_url: str) -> None:
    env = {**os.environ, "PREFECT_API_URL": api_url, "PREFECT_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(source), str(root), UNIQUENESS],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == -signal.SIGKILL, f"{point}: expected SIGKILL, got {done.returncode}\n{done.stderr}"


def test_killed_runs_leave_the_store_valid_and_the_next_run_completes(
    tmp_path: Path, write_image: Callable[..., Path], api_url: str
) -> None:
    for item in range(10):
        write_image(f"{'good' if item % 3 else 'bad_cap'}/{item}_0.png", seed=item)
    source, root = tmp_path / "src", tmp_path / "manifests"
    options = CurateOptions(uniqueness=UNIQUENESS)
    curate_dataset(source=str(source), dataset="d", manifest_root=str(root), options=options)
    v1 = m.read_manifest(str(root / "d"), "latest")
    for item in range(10, 16):
        write_image(f"good/{item}_0.png", seed=item)

    debris_seen = set()
    for point in POINTS:
        _kill_at(point, source, root, api_url)
        version = m.open_version(str(root / "d"), "latest")
        assert version.number == 1, point  # readers see the previous version, whole
        assert m.read_manifest(str(root / "d"), "latest").equals(v1), point
        v2 = root / "d" / m.version_dir(2)
        if v2.exists():
            debris_seen |= {p.name for p in v2.iterdir()}
            assert not (v2 / m.COMMIT_FILE).exists(), point
    assert {m.CLAIM_FILE, m.MANIFEST_FILE, m.VALIDATION_FILE} <= debris_seen  # killed mid-publish, really

    summary = curate_dataset(source=str(source), dataset="d", manifest_root=str(root), options=options)
    assert (summary.version, summary.parent_version) == (2, 1)  # contiguous: the debris was taken over
    latest = m.read_manifest(str(root / "d"), "latest")
    assert len(latest) == 16 and set(latest[m.KEY]) >= set(v1[m.KEY])
    assert m.version_numbers(fsspec.filesystem("file"), str(root / "d")) == [1, 2]

    # Killed after the commit, before the LATEST hint: the version stands, the next run sees no change.
    for item in range(16, 19):
        write_image(f"good/{item}_0.png", seed=item)
    _kill_at("latest", source, root, api_url)
    assert m.open_version(str(root / "d"), "latest").number == 3
    summary = curate_dataset(source=str(source), dataset="d", manifest_root=str(root), options=options)
    assert not summary.published and "no change since version 3" in summary.message
