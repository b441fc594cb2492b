"""How stage tasks run under Prefect: retries for transient storage errors, no input hashing."""

from __future__ import annotations

import functools
from typing import Any, Callable, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from strata.storage import is_transient, naming

F = TypeVar("F", bound=Callable[..., Any])

RETRY_DELAYS_SECONDS = [1, 4, 16]


def _retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only throttling, 5xx, resets and time-outs; never 403/404 or bad content."""
    error = state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_transient(error)


def stage(name: str, *, storage: bool = True) -> Callable[[F], F]:
    """Wrap a stage function as a Prefect task; storage stages retry transient errors with backoff.

    Inputs are DataFrames and filesystems, so Prefect's input-hashing cache is off (NO_CACHE). Storage
    failures of a storage stage surface as ``StorageError`` naming the stage (and, where the stage knows
    it, the object).
    """
    options: dict[str, Any] = {"name": name, "cache_policy": NO_CACHE}
    if not storage:
        return task(**options)
    options.update(
        retries=len(RETRY_DELAYS_SECONDS),
        retry_delay_seconds=RETRY_DELAYS_SECONDS,
        retry_jitter_factor=0.2,
        retry_condition_fn=_retry_if_transient,
    )

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def named(*args: Any, **kwargs: Any) -> Any:
            with naming(name):
                return fn(*args, **kwargs)

        return task(**options)(named)

    return decorate
