"""Where the inspect stage's tasks run: the flow's own thread pool, or a Dask cluster."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from prefect import get_client
from prefect.futures import PrefectFuture

Submit = Callable[..., PrefectFuture]

# Enough tasks to spread over a cluster, few enough that per-task bookkeeping stays small at 1M objects.
MAX_TASKS = 1000


def chunk_size(objects: int, largest: int) -> int:
    """Objects per task: ``largest``, or fewer so that a run makes at least ten (progress comes a tenth at a
    time), or more so that it makes no more than ``MAX_TASKS``."""
    return max(1, min(largest, -(-objects // 10)), -(-objects // MAX_TASKS))


def in_flight(dask: str | None) -> int:
    """How many inspect tasks a run keeps submitted at once: enough to keep every worker busy."""
    cores = os.cpu_count() or 1
    return 2 * cores if dask in (None, "", "local") else 64


@contextmanager
def task_runner(dask: str | None) -> Iterator[Submit]:
    """Yield ``submit(task, **parameters)`` running on the current flow's runner, or on Dask.

    Args:
        dask: None for the flow's runner; ``"local"`` for a ``LocalCluster`` with one single-threaded
            worker process per core; otherwise the address of a running Dask scheduler, whose workers
            need strata installed and ``PREFECT_API_URL`` pointing at the same Prefect server.
    """
    if not dask:
        yield lambda task, **parameters: task.submit(**parameters)
        return
    from prefect_dask import DaskTaskRunner

    if dask == "local":
        logging.getLogger("distributed").setLevel(logging.WARNING)
        with get_client(sync_client=True) as client:
            api_url = str(client.api_url)  # the ephemeral server's URL too, so workers do not start their own
        runner = DaskTaskRunner(
            cluster_kwargs={
                "n_workers": os.cpu_count() or 1,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": None,
                "env": {"PREFECT_API_URL": api_url, "DASK_LOGGING__DISTRIBUTED": "warning"},
            }
        )
    else:
        runner = DaskTaskRunner(address=dask)
    with runner:
        yield lambda task, **parameters: runner.submit(task, parameters=parameters)
