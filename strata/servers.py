"""Temporary Prefect API servers of ``strata`` runs, and reaping those that a killed run left behind.

Without ``PREFECT_API_URL``, Prefect starts a temporary API server for the run (a child process) and stops
it when the process exits normally. A run killed hard (SIGKILL, the OOM killer) cannot, and its server
lives on. So every ``strata curate`` / ``strata demo`` run records the server processes it started (process
id and start time) under ``$PREFECT_HOME/strata/servers/``, and the next run stops the recorded servers of
runs that are gone. A process is only signalled when its id *and* its start time match the record, so an id
that the system has since given to another process is left alone; nothing is ever looked up by name.

Process ids and start times come from ``/proc`` (Linux); elsewhere nothing is recorded or reaped.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["temporary_servers", "record_servers", "reap", "start_time"]

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


@contextmanager
def temporary_servers() -> Iterator[Callable[[], None]]:
    """Around a run: reap servers of killed runs, start and record this run's temporary API server (when no
    ``PREFECT_API_URL`` is set), and forget the record once the run ends normally.

    The server boots in a thread while the caller goes on (importing the flow and its stack takes about as
    long as the server's start); it yields ``ready``, which waits for the server and must be called before
    the run begins.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    directory = Path(settings.home) / "strata" / "servers"
    reap(directory)
    records: list[Path | None] = []
    failures: list[BaseException] = []

    def start() -> None:
        from prefect import get_client

        try:
            with get_client(sync_client=True) as client:  # starts Prefect's temporary server now, not mid-run
                client.api_healthcheck()
            records.append(record_servers(directory))
        except BaseException as err:  # handed to the caller by ready()
            failures.append(err)

    starter = threading.Thread(target=start, name="strata-api-server", daemon=True)
    if settings.api.url is None:
        starter.start()

    def ready() -> None:
        if starter.ident is not None:
            starter.join()
        if failures:
            raise failures[0]

    try:
        if settings.api.url is None:
            # Heartbeats let a long-lived server mark runs whose process died as crashed; this server dies
            # with the run, so nothing reads them, and the engine's join of the heartbeat thread (which sleeps
            # in whole seconds) would hold every run up to a second.
            from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

            with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
                yield ready
        else:
            yield ready
    finally:
        if starter.ident is not None:
            starter.join()
        for record in records:
            if record is not None:
                record.unlink(missing_ok=True)
