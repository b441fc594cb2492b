"""The strata command line: --help, the demo end to end in a fresh process, curate and show against S3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from strata.cli import main
from tests.conftest import encode, picture

STRATA = [sys.executable, "-m", "strata.cli"]


@pytest.mark.parametrize("command", [[], ["curate"], ["show"], ["demo"], ["diff"], ["serve"]])
def test_help_answers(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: strata" in out
    if command == ["curate"]:
        for option in (
            "--split",
            "--seed",
            "--stratify",
            "--uniqueness",
            "--near-duplicates",
            "--storage-option",
            "--dask",
        ):
            assert option in out


def test_demo_end_to_end_in_a_fresh_process(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("PREFECT_API_URL", None)
    first = subprocess.run(
        [*STRATA, "demo", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert first.returncode == 0, first.stderr
    assert "published version 1" in first.stdout
    assert "manifest: file://" in first.stdout and "rejects" not in first.stdout  # --quiet: outcome and counts
    assert "bad_cap" in first.stdout and "missing_cap" in first.stdout
    show = subprocess.run(
        [*STRATA, "show", "manifests/vials"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert show.returncode == 0, show.stderr
    assert "vials version 1" in show.stdout and "validation: passed" in show.stdout and "truncated" in show.stdout
    second = subprocess.run(
        [*STRATA, "demo", "--quiet"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert second.returncode == 0 and "no change since version 1" in second.stdout


def test_curate_and_show_on_s3(s3: object, capsys: pytest.CaptureFixture[str]) -> None:
    for i in range(8):
        s3.pipe_file(f"strata-test/images/{['good', 'bad'][i % 2]}/{i}_0.png", encode(picture(i), "png"))
    code = main(
        [
            "curate",
            "s3://strata-test/images",
            "--dataset",
            "caps",
            "--manifests",
            "s3://strata-test/m",
            "--split",
            "train=0.5,devel=0.5",
            "--seed",
            "3",
            "--uniqueness",
            r"(\d+)_",
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "published version 1 at s3://strata-test/m/caps/v000001" in out
    assert main(["show", "s3://strata-test/m/caps"]) == 0
    out = capsys.readouterr().out
    assert '"seed": 3' in out and "train" in out


def test_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["curate", str(tmp_path / "missing"), "--dataset", "d", "--manifests", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["show", str(tmp_path / "nothing")]) == 1
    assert "no committed manifest version" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--dataset", "d", "--split", "train=0.9"]) == 1
    assert "sum to 1" in capsys.readouterr().err
    assert main(["curate", str(tmp_path), "--dataset", "d", "--storage-option", "secret=abc"]) == 1
    assert "credentials" in capsys.readouterr().err
