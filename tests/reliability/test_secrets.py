"""Credentials never leave the environment: a canary secret is grepped for in every output of real runs.

Two curation runs on the moto server (one published, one failing on a 403 through the fault proxy) and a
CLI call that passes a secret as a storage option; then the console output, every log line and artifact
the Prefect API holds for the runs, the runs' stored parameters, the exception texts and every byte under
the manifest root are searched for the canary values.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect.client.orchestration import get_client

from flows.curate import curate_dataset
from strata.cli import main
from strata.config import CurateOptions
from tests.conftest import encode, picture, run_artifacts, run_logs
from tests.reliability.faultproxy import FaultProxy

KEY_ID = "AKIACANARY0123456789"
SECRET = "canary-secret-7f3a9c1e5b2d4f60aa11"
TOKEN = "canary-session-token-55e1b9"
CANARIES = (KEY_ID, SECRET, TOKEN)
BUCKET = "strata-test"


def _run_outputs(flow_run_id: Any) -> list[str]:
    """Every log message and artifact of a flow run, and its stored parameters and state, as text."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
    return [
        *run_logs(flow_run_id),
        *(f"{a.key} {a.description} {a.data}" for a in run_artifacts(flow_run_id).values()),
        repr(run.parameters),
        repr(run.state),
    ]


def test_a_canary_secret_appears_in_no_output(
    s3: Any, moto_server: str, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    for item in range(6):
        s3.pipe_file(f"{BUCKET}/src/{'good' if item % 3 else 'bad_cap'}/{item}_0.png", encode(picture(item), "png"))
    s3.pipe_file(f"{BUCKET}/src/good/9_0.jpg", b"\xff\xd8\xff\xe0 truncated")
    options = CurateOptions(uniqueness=r"(\d+)_\d+\.\w+$")
    texts: list[str] = []

    published = curate_dataset(
        source=f"s3://{BUCKET}/src", dataset="d", manifest_root=f"s3://{BUCKET}/m", options=options, return_state=True
    )
    assert published.is_completed()
    texts += _run_outputs(published.state_details.flow_run_id)

    def deny_objects(method: str, path: str) -> str | None:  # listing allowed, every image read refused
        return "403" if method == "GET" and "." in path.rsplit("/", 1)[-1] else None

    with FaultProxy(moto_server, deny_objects) as proxy:
        denied = curate_dataset(
            source=f"s3://{BUCKET}/src",
            dataset="d",
            manifest_root=f"s3://{BUCKET}/other",
            options=options.model_copy(update={"storage_options": {"endpoint_url": proxy.url}}),
            return_state=True,
        )
    assert denied.is_failed()
    error = denied.result(raise_on_failure=False)
    assert "Access Denied" in str(error) and f"{BUCKET}/src/" in str(error)
    texts += [str(error), repr(error), repr(error.__cause__), *_run_outputs(denied.state_details.flow_run_id)]

    code = main(["curate", f"s3://{BUCKET}/src", "--dataset", "d", "--storage-option", f"secret={SECRET}"])
    assert code == 1
    out = capfd.readouterr()
    assert "credentials" in out.err
    texts += [out.out, out.err]

    stored = [s3.cat_file(path) for path in s3.find(f"{BUCKET}/m")]
    assert len(stored) >= 5  # manifest, rejects, validation, grid, manifest.json (and the LATEST hint)
    for canary in CANARIES:
        assert not [t for t in texts if canary in t], canary
        assert not [b for b in stored if canary.encode() in b], canary
