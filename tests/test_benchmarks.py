"""The benchmark harness runs end to end on small inputs (speed is judged by the full run, not here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = {
    "loader",
    "loader_augmented",
    "loader_bmp",
    "loader_png",
    "inspect",
    "split",
    "incremental",
    "near_duplicates",
    "near_duplicates_1m",
    "daily_run_1m",
    "memory",
}


def test_quick_benchmarks_measure_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == ROWS
    for name, row in results.items():
        assert row["ours"] > 0 and isinstance(row["met"], bool) and row["target"], name
    assert results["near_duplicates"]["baseline"] > 0 and "identical pairs" in results["near_duplicates"]["note"]
    assert "row" in run.stdout and "target" in run.stdout  # the printed table
