"""What the CLI prints: Prefect's console during a run, the outcome and counts after it, one line for an error."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def print_counts(counts: dict[str, dict[str, int]]) -> None:
    from tasks.report import counts_table

    if not counts:
        print("  (no samples)")
        return
    for line in counts_table(counts).to_string().splitlines():
        print("  " + line)


@contextmanager
def console(quiet: bool, verbose: bool, restore: bool = True) -> Iterator[None]:
    """What Prefect prints to the console during a run: everything (``verbose``), its log lines without
    tracebacks (the default: an error is said once, on strata's own line), or nothing (``quiet``). Only the
    console changes: the flow run's logs in the Prefect API keep every line and traceback."""
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    handlers = {
        handler
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
        for handler in getattr(logger, "handlers", [])
        if isinstance(handler, PrefectConsoleHandler)
    }
    saved = {handler: (handler.level, handler.formatter) for handler in handlers}
    for handler in handlers:
        if quiet:
            handler.setLevel(logging.CRITICAL + 1)
        elif not verbose:
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))
    try:
        yield
    finally:
        for handler, (level, formatter) in saved.items() if restore else ():
            handler.setLevel(level)
            handler.setFormatter(formatter)


class _WithoutTraceback:
    """A log formatter that leaves out a record's traceback and stack (for the console only)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def format(self, record: Any) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def print_summary(summary: Any, quiet: bool) -> None:
    from strata import outcome as outcomes

    outcome = outcomes.of(summary.outcome)
    print(f"\n{summary.dataset}: {summary.outcome}: {summary.message}")
    if summary.version_uri:
        print(f"manifest: {summary.version_uri}/manifest.parquet")
    if outcome is not outcomes.PUBLISHED and outcome is not outcomes.UNCHANGED:
        print(f"next: {outcome.next_step}")
    if not quiet:
        if summary.diff:
            print("diff vs parent: " + ", ".join(f"{k} {v}" for k, v in summary.diff.items()))
        if summary.rejects:
            print("rejects: " + ", ".join(f"{k} {v}" for k, v in summary.rejects.items()))
    print("counts (category x purpose):")
    print_counts(summary.counts)


def describe(err: Exception) -> str:
    """One line for an error strata did not raise itself: what, where, and what to do."""
    import httpx

    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    from strata.servers import is_temporary

    url = os.environ.get("PREFECT_API_URL")
    where = f"the Prefect API at {url}" if url and not is_temporary(url) else "the temporary Prefect API"
    if isinstance(err, httpx.HTTPStatusError) and err.response.status_code in (401, 403):
        return (
            f"{where} refused the request ({err.response.status_code} {err.response.reason_phrase}): it needs "
            "basic auth. Set PREFECT_API_AUTH_STRING to the server's PREFECT_SERVER_API_AUTH_STRING (user:password)"
        )
    if isinstance(err, (httpx.HTTPError, ConnectionError)) or "Failed to reach API" in text:
        return (
            f"cannot reach {where} ({type(err).__name__}: {text}). Start the server (prefect server start), "
            "correct PREFECT_API_URL, or unset it to run on a temporary local API"
        )
    return f"{type(err).__name__}: {text} (run again with --verbose for the traceback)"
