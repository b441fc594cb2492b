"""A ``strata curate`` run killed hard leaves its temporary Prefect API server running; the next run stops it,
by the process id and start time it recorded, and never signals a process whose id was reused."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Callable

import pytest

from strata.servers import reap, start_time

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="process records need /proc (Linux)")

# The CLI with the flow replaced by a hard kill of its own process, once the run has started its server.
KILLED_RUN = textwrap.dedent(
    """
    import os, signal, sys
    import flows.curate
    from strata.cli import main

    def killed(**kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    flows.curate.curate_dataset = killed
    main(sys.argv[1:])
    """
)


def _alive(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


def test_the_next_run_stops_the_server_a_killed_run_left(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    write_image("good/1_0.png", seed=1)
    write_image("good/2_0.png", seed=2)
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LOGGING_LEVEL": "WARNING"}
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"  # a fresh database migrates first
    env.pop("PREFECT_API_URL", None)  # Prefect's temporary API server, as on a fresh machine
    args = ["curate", str(tmp_path / "src"), "--dataset", "d", "--manifests", str(tmp_path / "m"), "--quiet"]
    # Output to a file, not a pipe: the orphaned server keeps the killed run's pipes open.
    with (tmp_path / "killed.log").open("w") as log:
        killed = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, *args], env=env, cwd=REPO, stdout=log, stderr=log, timeout=300
        )
    output = (tmp_path / "killed.log").read_text()
    assert killed.returncode == -signal.SIGKILL, output
    records = list((tmp_path / "prefect" / "strata" / "servers").glob("*.json"))
    assert len(records) == 1, output
    servers = json.loads(records[0].read_text())["servers"]
    assert servers and all("prefect.server.api.server:create_app" in s["command"] for s in servers)
    assert all(_alive(s["pid"], s["start"]) for s in servers)  # the killed run's server outlived it

    try:
        done = subprocess.run(
            [sys.executable, "-m", "strata.cli", *args[:-1]],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0 and "published version 1" in done.stdout, done.stderr
        assert not any(_alive(s["pid"], s["start"]) for s in servers)
        assert "stopped Prefect API server" in done.stderr  # a warning: shown without --quiet
        assert not list((tmp_path / "prefect" / "strata" / "servers").glob("*.json"))  # its own record is gone too
    finally:
        for server in servers:  # never leave one behind, even when the test fails
            if _alive(server["pid"], server["start"]):
                os.kill(server["pid"], signal.SIGKILL)


def test_only_recorded_processes_of_gone_runs_are_stopped(tmp_path: Path) -> None:
    directory = tmp_path / "servers"
    directory.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # an owner that has exited
    orphan, reused, owned = (subprocess.Popen(["sleep", "60"]) for _ in range(3))
    try:
        me = {"pid": os.getpid(), "start": start_time(os.getpid())}
        records = {
            "orphan": ({"pid": gone.pid, "start": 1}, orphan, start_time(orphan.pid)),
            "reused": ({"pid": gone.pid, "start": 1}, reused, (start_time(reused.pid) or 0) - 1),  # id reused since
            "owned": (me, owned, start_time(owned.pid)),  # its run is still going
        }
        for name, (owner, process, started) in records.items():
            record = {"owner": owner, "servers": [{"pid": process.pid, "start": started, "command": "x"}]}
            (directory / f"{name}.json").write_text(json.dumps(record))
        (directory / "broken.json").write_text("{")

        assert reap(directory) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGTERM
        assert reused.poll() is None and owned.poll() is None
        assert sorted(p.name for p in directory.iterdir()) == ["broken.json", "owned.json"]
    finally:
        for process in (orphan, reused, owned):
            process.kill()
            process.wait()
