"""Scheduled deployments of the curation flow, read from ``deployments/prefect.yaml``.

The same file serves ``prefect deploy --all --prefect-file deployments/prefect.yaml`` (runs on a
``process`` work pool's worker) and ``strata serve`` (runs in-process with ``flow.serve``). Both create the
global concurrency limit ``strata-dataset-<name>`` per dataset, which the flow holds for a whole run so that
runs of one dataset take turns.

A deployment is the worker's or serve's, never both: ``flow.serve`` would update a worker deployment of the
same name in place (dropping its pull steps, so the worker's next run crashes) and pause it on Ctrl-C. So
``strata serve`` refuses a name that is deployed on a work pool, and on stop pauses only deployments that
are still served (no work pool): a ``prefect deploy`` made while it ran keeps its schedule.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from strata.errors import ConfigError

DEFAULT_PREFECT_FILE = "deployments/prefect.yaml"
FLOW_ENTRYPOINT = "flows/curate.py:curate_dataset"
FLOW_NAME = "curate-dataset"  # the flow's name on the server (flows/curate.py)


def limit_name(dataset: str) -> str:
    """The global concurrency limit that serializes runs of ``dataset``."""
    return f"strata-dataset-{dataset}"


def load_deployments(prefect_file: str | Path = DEFAULT_PREFECT_FILE) -> list[dict[str, Any]]:
    """The curation deployments of a ``prefect.yaml``, checked for what ``strata`` needs of each."""
    import yaml

    path = Path(prefect_file)
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; run from the repository root or pass --prefect-file") from None
    deployments = [d for d in config.get("deployments") or [] if d.get("entrypoint") == FLOW_ENTRYPOINT]
    if not deployments:
        raise ConfigError(f"{path}: no deployment with entrypoint {FLOW_ENTRYPOINT!r}")
    for spec in deployments:
        parameters = spec.get("parameters") or {}
        missing = [p for p in ("source", "dataset") if not parameters.get(p)]
        if missing or not spec.get("name"):
            raise ConfigError(f"{path}: deployment {spec.get('name')!r} needs a name and parameters {missing}")
    return deployments


def create_concurrency_limits(prefect_file: str = DEFAULT_PREFECT_FILE) -> dict[str, list[str]]:
    """Create (or reset to 1 slot) the concurrency limit of every dataset deployed from ``prefect_file``.

    A ``prefect deploy`` build step and part of ``strata serve``; safe to run again.
    """
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
    from prefect.exceptions import ObjectNotFound

    names = sorted({limit_name(d["parameters"]["dataset"]) for d in load_deployments(prefect_file)})
    with get_client(sync_client=True) as client:
        for name in names:
            try:
                existing = client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
                continue
            if existing.limit != 1 or not existing.active:
                client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=1, active=True))
    return {"concurrency_limits": names}


def deployment_name(name: str) -> str:
    """``<flow name>/<deployment name>``, as the server and ``prefect deployment run`` know it."""
    return f"{FLOW_NAME}/{name}"


def _deployed(specs: list[dict[str, Any]]) -> Iterator[tuple[Any, Any]]:
    """``(client, deployment)`` for each of ``specs`` that exists on the server."""
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for spec in specs:
            try:
                yield client, client.read_deployment_by_name(deployment_name(spec["name"]))
            except ObjectNotFound:
                continue


def refuse_worker_deployments(specs: list[dict[str, Any]], prefect_file: str) -> None:
    """Raise ConfigError if one of ``specs`` is deployed on a work pool: serving it would take it from its worker."""
    taken = [
        f"{deployment_name(deployment.name)} (work pool {deployment.work_pool_name!r})"
        for _, deployment in _deployed(specs)
        if deployment.work_pool_name is not None
    ]
    if taken:
        raise ConfigError(
            f"{prefect_file}: {', '.join(taken)} already deployed for a worker (prefect deploy); serving it would "
            "take it from its worker. Let the worker run it, serve other deployments (--name, or a --prefect-file "
            "of deployments the worker does not have), or first delete it: prefect deployment delete NAME"
        )


def pause_served(specs: list[dict[str, Any]]) -> list[str]:
    """Pause the schedules of ``specs`` that are still served (no work pool); returns those paused.

    What ``flow.serve`` does on shutdown, except that a deployment a ``prefect deploy`` took over meanwhile
    keeps its schedule: its worker runs it now.
    """
    paused = []
    for client, deployment in _deployed(specs):
        if deployment.work_pool_name is None:
            client.pause_deployment(deployment.id)
            paused.append(deployment_name(deployment.name))
    return paused


def serve(prefect_file: str = DEFAULT_PREFECT_FILE, names: list[str] | None = None) -> None:
    """Run the file's deployments (or those named) in this process until interrupted (SIGINT or SIGTERM)."""
    from prefect import serve as prefect_serve
    from prefect.client.schemas.schedules import construct_schedule

    from flows.curate import curate_dataset

    specs = load_deployments(prefect_file)
    if names:
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise ConfigError(f"{prefect_file}: no deployments named {unknown}; it has {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in names]
    refuse_worker_deployments(specs, prefect_file)
    create_concurrency_limits(prefect_file)
    deployments = []
    for spec in specs:
        schedules = [
            construct_schedule(**{k: v for k, v in s.items() if k in ("cron", "interval", "rrule", "timezone")})
            for s in spec.get("schedules") or []
            if s.get("active", True)
        ]
        deployments.append(
            curate_dataset.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                tags=spec.get("tags"),
                parameters=spec["parameters"],
                schedules=schedules,
            )
        )
    try:
        prefect_serve(*deployments, pause_on_shutdown=False)  # it would pause by id, whoever owns it by then
    finally:
        pause_served(specs)
