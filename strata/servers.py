"""Temporary Prefect API servers of ``strata`` runs, and reaping those that a killed run left behind.

Without ``PREFECT_API_URL``, a run starts a temporary API server (a child process, as Prefect's own
ephemeral one) and stops it when the process exits normally. A run killed hard (SIGKILL, the OOM killer)
cannot, and its server lives on. So every ``strata curate`` / ``strata demo`` run records the server
processes it started (process id and start time) under ``$PREFECT_HOME/strata/servers/``, and the next run
stops the recorded servers of runs that are gone. A process is only signalled when its id *and* its start
time match the record, so an id that the system has since given to another process is left alone; nothing
is ever looked up by name.

Process ids and start times come from ``/proc`` (Linux); elsewhere nothing is recorded or reaped.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["temporary_servers", "is_temporary", "record_servers", "reap", "start_time"]

logger = logging.getLogger(__name__)
STOP_WAIT_S = 5.0


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot, ``/proc/<pid>/stat`` field 22), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name, in parentheses, may hold spaces
    return int(fields[19]) if fields[0] != "Z" else None  # a zombie has exited already


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except (FileNotFoundError, ProcessLookupError, PermissionError):
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def record_servers(directory: Path) -> Path | None:
    """Record this process and its child processes (the API server it just started), or None on no ``/proc``."""
    me = os.getpid()
    started = start_time(me)
    if started is None:
        return None
    servers = [{"pid": pid, "start": start_time(pid), "command": _command(pid)[:300]} for pid in _children(me)]
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{me}-{started}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"owner": {"pid": me, "start": started}, "servers": servers}))
    temporary.replace(path)
    return path


def _stop(pid: int, started: int) -> bool:
    """Stop the recorded process: SIGTERM, then SIGKILL if it is still there after ``STOP_WAIT_S``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + STOP_WAIT_S
        while time.monotonic() < deadline:
            if start_time(pid) != started:
                return True
            time.sleep(0.05)
    return False


def reap(directory: Path) -> list[int]:
    """Stop the recorded servers of runs that are gone; returns the process ids stopped."""
    stopped: list[int] = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            record = json.loads(path.read_text())
            owner = record["owner"]
            servers = [(int(s["pid"]), s["start"]) for s in record["servers"]]
        except (OSError, ValueError, KeyError, TypeError):
            logger.warning("servers: ignoring unreadable record %s", path)
            continue
        if start_time(int(owner["pid"])) == owner["start"]:
            continue  # its run is still going
        for pid, started in servers:
            if started is not None and start_time(pid) == started and _stop(pid, started):
                logger.warning("servers: stopped Prefect API server %d left behind by killed run %s", pid, owner["pid"])
                stopped.append(pid)
        path.unlink(missing_ok=True)
    return stopped


class _Server:
    """This process's temporary Prefect API server: started as Prefect starts its own (``uvicorn`` over
    ``prefect.server``'s app factory, UI off, the process's settings in its environment) but without importing
    the server's stack here first, which took 1.8 s of the interpreter before the server process could even
    start; stopped at exit, after Prefect's workers have sent their last logs and events."""

    def __init__(self, settings: Any, timeout: float) -> None:
        self._env = {
            **os.environ,
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
            **settings.to_environment_variables(exclude_unset=True),
        }
        self._timeout = timeout
        self._launch()
        self.record: Path | None = None
        atexit.register(self.stop)

    def _launch(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        app_dir = str(Path(importlib.util.find_spec("prefect").origin).parents[1])
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory"]
        command += ["prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen([*command, "--log-level", "error", "--lifespan", "on"], env=self._env)

    def wait(self) -> None:
        """Until the server answers its health check; relaunched on another port if its own was taken."""
        # Said here, not at the launch: Prefect's log handlers exist once the flow's modules are imported.
        logging.getLogger("prefect").info("Temporary API server on http://127.0.0.1:%d, stopped at exit", self.port)
        deadline = time.monotonic() + self._timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == 3:  # uvicorn could not bind: another process took the port meanwhile
                self._launch()
            elif code is not None:
                raise RuntimeError(f"the temporary Prefect API server exited with code {code} while starting")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=1) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(
            f"the temporary Prefect API server did not answer within {self._timeout:.0f} s "
            "(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            logging.getLogger("prefect").info("Stopping temporary server on http://127.0.0.1:%d", self.port)
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.record is not None:
            self.record.unlink(missing_ok=True)


_SERVER: _Server | None = None


def is_temporary(api_url: str | None) -> bool:
    """Whether ``api_url`` is this process's temporary API server."""
    return _SERVER is not None and api_url == _SERVER.api_url


@contextmanager
def temporary_servers() -> Iterator[Callable[[], None]]:
    """Around a run: reap servers of killed runs, and without a ``PREFECT_API_URL`` start (once a process) and
    record a temporary API server, which stops at exit, its record with it.

    The server starts at once and boots in its own process while the caller goes on (importing the flow and
    its stack takes about as long); it yields ``ready``, which waits for the server and must be called before
    the run begins. Its URL becomes the process's ``PREFECT_API_URL``, so every thread and child process of the
    run talks to it (and ``PREFECT_UI_URL`` is empty: it serves no UI to link to).
    """
    global _SERVER
    from prefect.context import refresh_global_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    directory = Path(settings.home) / "strata" / "servers"
    reap(directory)
    if settings.api.url is None:
        timeout = settings.server.ephemeral.startup_timeout_seconds
        _SERVER = _Server(settings, timeout)
        os.environ["PREFECT_API_URL"], os.environ["PREFECT_UI_URL"] = _SERVER.api_url, ""
        refresh_global_settings_context()
    server = _SERVER if is_temporary(get_current_settings().api.url) else None

    def ready() -> None:
        if server is not None and server.record is None:
            server.wait()
            server.record = record_servers(directory)

    if server is None:
        yield ready
        return
    # Heartbeats let a long-lived server mark runs whose process died as crashed; this server dies with the
    # run, so nothing reads them, and the engine's join of the heartbeat thread (which sleeps in whole
    # seconds) would hold every run up to a second.
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        yield ready
