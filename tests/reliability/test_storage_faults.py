"""Storage faults between strata and S3, injected by an HTTP proxy in front of the moto server.

A share of failing requests (500, 503 SlowDown, dropped connections, bodies cut short, slow responses)
gives the same manifest bytes as a fault-free run; an endpoint that keeps failing fails the run naming
the stage and the object, with nothing published; 403 and 404 are answered once, never retried.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

import flows.curate
from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions
from tasks.inspect import inspect_task
from tasks.publish import publish_task
from tests.conftest import encode, picture
from tests.reliability.faultproxy import FaultProxy, random_faults

UNIQUENESS = r"(\d+)_\d+\.\w+$"
BUCKET = "strata-test"


@pytest.fixture
def source(s3: Any) -> str:
    """18 objects (two photos per item, PNG and JPEG) and one truncated JPEG on the moto server."""
    for item in range(9):
        category = "good" if item % 3 else "bad_cap"
        for photo, ext in enumerate(("png", "jpg")):
            s3.pipe_file(f"{BUCKET}/src/{category}/{item}_{photo}.{ext}", encode(picture(item * 7 + photo), ext))
    s3.pipe_file(f"{BUCKET}/src/good/99_0.jpg", encode(picture(99), "jpg")[:700])
    return f"s3://{BUCKET}/src"


@pytest.fixture
def proxy(moto_server: str) -> Iterator[FaultProxy]:
    with FaultProxy(moto_server) as running:
        yield running


@pytest.fixture
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep the task-level retries (the same count) but without the 1/4/16 s pauses."""
    monkeypatch.setattr(flows.curate, "inspect_task", inspect_task.with_options(retry_delay_seconds=0))
    monkeypatch.setattr(flows.curate, "publish_task", publish_task.with_options(retry_delay_seconds=0))


def _options(endpoint: str | None = None, **storage: Any) -> CurateOptions:
    if endpoint:
        storage["endpoint_url"] = endpoint
    return CurateOptions(uniqueness=UNIQUENESS, chunk_size=4, storage_options=storage)


# botocore retries cut down (s3fs 5 x botocore 5 attempts with backoff take ~40 s per read), so that a
# test of "keeps failing" waits seconds; the task-level retries stay, without their pauses (fast_retries).
FEW_RETRIES = {"config_kwargs": {"retries": {"max_attempts": 2, "mode": "standard"}}}


def _failed_run(source: str, root: str, proxy: FaultProxy) -> str:
    """Curate through the proxy with few client retries; the run must fail: its error message."""
    state = curate_dataset(
        source=source, dataset="d", manifest_root=root, options=_options(proxy.url, **FEW_RETRIES), return_state=True
    )
    assert state.is_failed()
    return str(state.result(raise_on_failure=False))


def _digests(s3: Any, root: str) -> dict[str, str]:
    version = f"{BUCKET}/{root}/d/{m.version_dir(1)}"
    return {f: hashlib.sha256(s3.cat_file(f"{version}/{f}")).hexdigest() for f in (m.MANIFEST_FILE, m.REJECTS_FILE)}


def test_a_share_of_failing_requests_gives_the_same_manifest(s3: Any, source: str, proxy: FaultProxy) -> None:
    clean = curate_dataset(source=source, dataset="d", manifest_root=f"s3://{BUCKET}/clean", options=_options())
    proxy.decide = random_faults(0.25, seed=7)
    faulty = curate_dataset(
        source=source, dataset="d", manifest_root=f"s3://{BUCKET}/faulty", options=_options(proxy.url)
    )
    assert (clean.version, faulty.version) == (1, 1)
    assert _digests(s3, "faulty") == _digests(s3, "clean")
    faults = Counter(outcome for _, _, outcome in proxy.requests)
    assert all(faults[kind] > 0 for kind in ("500", "503", "drop", "cut", "slow")), faults
    assert {"GET", "PUT"} <= {method for method, _, outcome in proxy.requests if outcome != "ok"}


def test_an_object_that_keeps_failing_fails_the_run_naming_stage_and_object(
    s3: Any, source: str, proxy: FaultProxy, fast_retries: None
) -> None:
    proxy.decide = lambda method, path: "503" if method == "GET" and path.endswith("good/4_0.png") else None
    message = _failed_run(source, f"s3://{BUCKET}/faulty", proxy)
    assert "inspect" in message and f"{BUCKET}/src/good/4_0.png" in message, message
    assert proxy.count("GET", "good/4_0.png") > 4  # retried, by the client and by the task
    assert not s3.exists(f"{BUCKET}/faulty")  # nothing published, nothing half-written


def test_a_store_that_refuses_writes_fails_the_run_before_any_work_with_nothing_written(
    s3: Any, source: str, proxy: FaultProxy, fast_retries: None
) -> None:
    proxy.decide = lambda method, path: "500" if method == "PUT" and path.startswith(f"/{BUCKET}/faulty/") else None
    message = _failed_run(source, f"s3://{BUCKET}/faulty", proxy)
    # The exclusive-create probe is the writability check: it fails first, naming its object.
    assert message.startswith("probe: ") and f"{BUCKET}/faulty/d/_probe." in message, message
    assert not [path for method, path, _ in proxy.requests if method == "GET" and "/src/" in path]  # no work done
    assert s3.find(f"{BUCKET}/faulty") == []
    assert m.latest_version(s3, f"{BUCKET}/faulty/d") is None


def test_403_and_404_are_not_retried(s3: Any, source: str, proxy: FaultProxy, fast_retries: None) -> None:
    def decide(method: str, path: str) -> str | None:
        if method == "GET" and path.endswith("good/1_0.png"):
            return "404"  # listed, then gone: rejected as changed during the run
        if gate and method == "GET" and path.endswith("good/2_1.jpg"):
            return "403"
        return None

    gate = False
    proxy.decide = decide
    summary = curate_dataset(source=source, dataset="d", manifest_root=f"s3://{BUCKET}/m", options=_options(proxy.url))
    assert summary.rejects.get("changed_during_run") == 1
    assert proxy.count("GET", "good/1_0.png") == 1

    gate = True
    s3.pipe_file(f"{BUCKET}/src/good/2_1.jpg", encode(picture(1234), "jpg"))  # changed: read again
    message = _failed_run(source, f"s3://{BUCKET}/m", proxy)
    assert "inspect" in message and "good/2_1.jpg" in message and "denied" in message.lower(), message
    assert proxy.count("GET", "good/2_1.jpg") == 2  # once in the first run, once (no retry) in the second
    assert m.latest_version(s3, f"{BUCKET}/m/d") == 1
