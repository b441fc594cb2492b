"""Scheduled deployments of the curation flow, read from ``deployments/prefect.yaml``.

The same file serves ``prefect deploy --all --prefect-file deployments/prefect.yaml`` (runs on a
``process`` work pool's worker) and ``strata serve`` (runs in-process with ``flow.serve``). Both create the
global concurrency limit ``strata-dataset-<name>`` per dataset, which the flow holds for a whole run so that
runs of one dataset take turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from strata.errors import ConfigError

DEFAULT_PREFECT_FILE = "deployments/prefect.yaml"
FLOW_ENTRYPOINT = "flows/curate.py:curate_dataset"


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


def serve(prefect_file: str = DEFAULT_PREFECT_FILE, names: list[str] | None = None) -> None:
    """Run the file's deployments (or those named) in this process until interrupted."""
    from prefect import serve as prefect_serve
    from prefect.client.schemas.schedules import construct_schedule

    from flows.curate import curate_dataset

    specs = load_deployments(prefect_file)
    if names:
        unknown = sorted(set(names) - {s["name"] for s in specs})
        if unknown:
            raise ConfigError(f"{prefect_file}: no deployments named {unknown}; it has {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] in names]
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
    prefect_serve(*deployments)
