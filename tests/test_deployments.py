"""Deployments on a real Prefect server: `prefect deploy` + a process worker, `strata serve`, and Dask.

One `prefect server start` (temporary PREFECT_HOME, loopback port, basic auth and the UI on, as
deployments/README.md sets one up) serves the module; the scheduler service is off so that the hourly demo
schedule cannot fire into the checkout during the test.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import yaml
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.deployments import run_deployment
from prefect.events.worker import EventsWorker
from prefect.exceptions import ObjectNotFound
from prefect.logging.handlers import APILogWorker
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from flows.curate import curate_dataset
from flows.runners import chunk_size
from loader import manifest as m
from strata.config import CurateOptions
from strata.deployments import limit_name
from tests.browser import Browser, chromium
from tests.conftest import _free_port, artifact, encode, kinds, log_records, picture, run_artifacts, run_logs

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DEPLOYMENT = "curate-dataset/vials-demo"
AUTH = "strata:" + secrets.token_hex(8)  # PREFECT_SERVER_API_AUTH_STRING of the module's server


def _wait_until(check: Callable[[], bool], what: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start(command: list[Any], env: dict[str, str], log: Any = subprocess.DEVNULL) -> subprocess.Popen:
    """Start a long-running command in its own process group (servers and workers fork children)."""
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _stop(process: subprocess.Popen) -> None:
    """Interrupt the process group like Ctrl-C would, then kill what is left after 10 s."""
    for sig, wait in ((signal.SIGINT, 10), (signal.SIGKILL, 30)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real `prefect server start` on SQLite, on another port than 4200 and with basic auth; yields the
    environment that points processes at it (with its auth string)."""
    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{_free_port()}/api"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),  # `strata` and workers' flow runs import this checkout, not the venv's install
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_UI_API_URL": url,  # where the browser calls the API (the UI's default is port 4200)
        "PREFECT_SERVER_API_AUTH_STRING": AUTH,
        "PREFECT_API_AUTH_STRING": AUTH,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "true",
        "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PREFECT_RUNNER_POLL_FREQUENCY": "1",
    }
    log = (home / "server.log").open("w")
    port = url.split(":")[-1].split("/")[0]
    process = _start([BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", port], env, log)

    def healthy() -> bool:
        assert process.poll() is None, (home / "server.log").read_text()
        try:
            return requests.get(f"{url}/health", timeout=2).ok
        except requests.ConnectionError:
            return False

    try:
        _wait_until(healthy, "prefect server start")
        with temporary_settings({PREFECT_API_URL: url, PREFECT_API_AUTH_STRING: AUTH}):
            yield env
            # Flows run in this process (the UI and Dask tests) leave log and event workers bound to this
            # server: flush them while it is up, or the session's teardown waits on them for ever.
            APILogWorker.drain_all(timeout=60, at_exit=False)
            EventsWorker.drain_all(timeout=60, at_exit=False)
    finally:
        _stop(process)
        log.close()


def _run(env: dict[str, str], *command: str | Path) -> str:
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _source(tmp_path: Path, name: str, items: range) -> Path:
    """Two classes, two photos per item; the file names hold the item (the demo's uniqueness regex)."""
    source = tmp_path / name
    for item in items:
        for photo in range(2):
            _picture(source / ("good" if item % 3 else "bad_cap") / f"{item}_{photo}.jpg", 100 + item * 5 + photo)
    return source


def _picture(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode(picture(seed), "jpg"))


def _trigger(source: Path, root: Path, timeout: float = 300) -> Any:
    run = run_deployment(
        DEPLOYMENT, parameters={"source": str(source), "manifest_root": str(root)}, timeout=timeout, poll_interval=1
    )
    return run


def _committed(root: Path) -> list[dict[str, Any]]:
    dataset = root / "vials"
    return [json.loads(p.read_text()) for p in sorted(dataset.glob(f"v*/{m.COMMIT_FILE}"))]


@pytest.fixture(scope="module")
def worker(server: dict[str, str]) -> Iterator[None]:
    """`prefect deploy --all` (deployments/prefect.yaml) onto a process pool, and a worker for it."""
    _run(server, BIN / "prefect", "work-pool", "create", "strata", "--type", "process")
    out = _run(server, BIN / "prefect", "--no-prompt", "deploy", "--all")  # ./prefect.yaml links to deployments/
    assert "vials-demo" in out
    process = _start([BIN / "prefect", "worker", "start", "--pool", "strata", "--type", "process"], server)
    try:
        yield
    finally:
        _stop(process)


def test_deployed_runs_publish_new_data_and_skip_unchanged(worker: None, tmp_path: Path) -> None:
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(DEPLOYMENT)
        limit = client.read_global_concurrency_limit_by_name(limit_name("vials"))
    assert deployment.work_pool_name == "strata"
    assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
    assert deployment.parameters["options"]["uniqueness"] == r"(\d+)_\d+\.\w+$"
    assert (limit.limit, limit.active) == (1, True)

    source, root = _source(tmp_path, "src", range(6)), tmp_path / "manifests"
    first = _trigger(source, root)
    assert first.state.is_completed(), first.state
    artifacts = run_artifacts(first.id)
    assert {"summary", "counts", "diff", "inspect"} <= kinds(artifacts)
    assert "published version 1" in artifact(artifacts, "summary").data
    assert [c["version"] for c in _committed(root)] == [1]

    shutil.copyfile(source / "good" / "1_0.jpg", source / "good" / "100_0.jpg")  # an exact duplicate
    _picture(source / "bad_cap" / "101_0.jpg", 7)  # a new item
    second = _trigger(source, root)
    assert second.state.is_completed(), second.state
    assert "published version 2" in artifact(run_artifacts(second.id), "summary").data
    versions = _committed(root)
    assert [(c["version"], c["parent_version"]) for c in versions] == [(1, None), (2, 1)]
    assert versions[1]["diff"]["added"] == 2 and versions[1]["diff"]["purpose_changed"] == 0

    third = _trigger(source, root)
    assert third.state.is_completed(), third.state
    assert "no change since version 2" in artifact(run_artifacts(third.id), "summary").data
    assert len(_committed(root)) == 2
    assert any("acquired" in line for line in run_logs(third.id)), run_logs(third.id)


def test_two_runs_of_one_dataset_take_turns(worker: None, tmp_path: Path) -> None:
    """Two runs of one dataset, both queued on its concurrency slot: the second takes the slot only after
    the first has committed, and plans on top of that commit."""
    small, large = _source(tmp_path, "small", range(6)), _source(tmp_path, "large", range(9))
    root = tmp_path / "manifests"

    def queued(run_id: Any) -> bool:
        return any("waiting for concurrency limit" in message for _, message in log_records(run_id))

    # The test holds the slot until both runs wait for it: whether the worker starts them together or one
    # after the other, they overlap, and the limit alone decides who goes first.
    with concurrency(limit_name("vials"), occupy=1, strict=True):
        ids = [
            run_deployment(DEPLOYMENT, parameters={"source": str(s), "manifest_root": str(root)}, timeout=0).id
            for s in (small, large)
        ]
        _wait_until(lambda: all(queued(i) for i in ids), "both flow runs to queue for the dataset's slot", 300)
    with get_client(sync_client=True) as client:

        def finished() -> bool:
            return all(client.read_flow_run(i).state.is_final() for i in ids)

        _wait_until(finished, "both flow runs", timeout=300)
        runs = [client.read_flow_run(i) for i in ids]
    assert all(r.state.is_completed() for r in runs), [r.state for r in runs]
    versions = _committed(root)
    assert [(c["version"], c["parent_version"]) for c in versions] == [(1, None), (2, 1)]
    assert {str(c["flow_run_id"]) for c in versions} == {str(i) for i in ids}  # one version each
    by_run = {str(c["flow_run_id"]): c for c in versions}
    assert {by_run[str(ids[0])]["rows"], by_run[str(ids[1])]["rows"]} == {12, 18}
    for run_id in ids:
        run_logs(run_id)  # wait until every log line has arrived
    logs = {run_id: log_records(run_id) for run_id in ids}
    assert not any("re-planning" in message for lines in logs.values() for _, message in lines)  # no commit race
    acquired = sorted((at, run_id) for run_id, lines in logs.items() for at, message in lines if "acquired" in message)
    assert len(acquired) == 2, logs
    (_, first), (second_acquired, _) = acquired
    committed = [at for at, message in logs[first] if "publish: committed version" in message]
    assert committed and committed[0] < second_acquired, logs  # the second waited for the first's commit


def _deployment(name: str = DEPLOYMENT) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def test_serve_leaves_a_worker_deployment_to_its_worker(worker: None, server: dict[str, str], tmp_path: Path) -> None:
    """`strata serve` beside `prefect deploy`: it refuses the worker's deployment, serves its own beside it,
    and on stop pauses only its own; a name `prefect deploy` takes over while serve runs keeps its schedule."""
    before = _deployment()
    serve = [BIN / "strata", "serve"]
    refused = subprocess.run(serve, env=server, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and refused.stdout == "", refused
    assert refused.stderr.startswith(
        f"strata: error: deployments/prefect.yaml: {DEPLOYMENT} (work pool 'strata') already deployed for a worker"
    ), refused.stderr
    assert len(refused.stderr.splitlines()) == 1

    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    (spec,) = config["deployments"]
    served = {**{k: v for k, v in spec.items() if k != "work_pool"}, "name": "vials-served"}
    taken = {**spec, "name": "vials-taken"}  # served first, then deployed for the worker while serve runs
    serve_file, deploy_file = tmp_path / "serve.yaml", tmp_path / "deploy.yaml"
    serve_file.write_text(yaml.safe_dump({**config, "deployments": [served, {**taken, "work_pool": None}]}))
    deploy_file.write_text(yaml.safe_dump({**config, "build": None, "deployments": [taken]}))
    process = _start([BIN / "strata", "serve", "--prefect-file", serve_file], server)
    try:

        def serving() -> bool:
            try:
                return all(_deployment(f"curate-dataset/{n}").paused is False for n in ("vials-served", "vials-taken"))
            except ObjectNotFound:
                return False

        _wait_until(serving, "strata serve to register its deployments")
        _run(server, BIN / "prefect", "--no-prompt", "deploy", "--prefect-file", deploy_file, "--all")
        assert _deployment("curate-dataset/vials-taken").work_pool_name == "strata"
    finally:
        _stop(process)
    assert process.returncode == 0

    after = _deployment()
    assert (after.paused, after.work_pool_name, after.pull_steps) == (False, "strata", before.pull_steps)
    assert [(s.schedule.cron, s.active) for s in after.schedules] == [("0 * * * *", True)]
    assert _deployment("curate-dataset/vials-served").paused is True  # serve's own: no runner, no ticks
    taken_now = _deployment("curate-dataset/vials-taken")
    assert (taken_now.paused, taken_now.work_pool_name) == (False, "strata")


def test_an_unauthenticated_client_is_refused(worker: None, server: dict[str, str], tmp_path: Path) -> None:
    """The server's basic auth: a client without PREFECT_API_AUTH_STRING gets 401 (the CLI says so in one
    line), while the worker, which has it, runs the deployment."""
    url = server["PREFECT_API_URL"]
    assert requests.get(f"{url}/deployments/name/{DEPLOYMENT}", timeout=10).status_code == 401
    assert requests.get(f"{url}/deployments/name/{DEPLOYMENT}", auth=tuple(AUTH.split(":", 1)), timeout=10).ok
    anonymous = {k: v for k, v in server.items() if k != "PREFECT_API_AUTH_STRING"}
    source, root = _source(tmp_path, "src", range(6)), tmp_path / "manifests"
    curate = [BIN / "strata", "curate", source, "--dataset", "vials", "--manifests", root]
    refused = subprocess.run(curate, env=anonymous, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith(f"strata: error: the Prefect API at {url} refused"), refused.stderr
    assert "PREFECT_API_AUTH_STRING" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not root.exists()

    run = _trigger(source, root)
    assert run.state.is_completed(), run.state
    assert [c["version"] for c in _committed(root)] == [1]


def test_strata_serve_runs_the_same_deployments(server: dict[str, str], tmp_path: Path) -> None:
    with get_client(sync_client=True) as client:
        try:  # the worker-run deployment of the tests above: serve must register its own
            client.delete_deployment(client.read_deployment_by_name(DEPLOYMENT).id)
        except ObjectNotFound:
            pass
    process = _start([BIN / "strata", "serve", "--name", "vials-demo"], server)
    try:
        with get_client(sync_client=True) as client:

            def served() -> bool:
                try:
                    return client.read_deployment_by_name(DEPLOYMENT).work_pool_name is None
                except ObjectNotFound:
                    return False

            _wait_until(served, "strata serve to register its deployment")
        source, root = _source(tmp_path, "src", range(6)), tmp_path / "manifests"
        run = _trigger(source, root)
        assert run.state.is_completed(), run.state
        assert [c["version"] for c in _committed(root)] == [1]
    finally:
        _stop(process)


def _curate(source: Path, root: Path, dataset: str) -> Any:
    """A curation run in this process, on the module's server."""
    options = CurateOptions(uniqueness=r"(\d+)_\d+\.\w+$")
    return curate_dataset(
        source=str(source), dataset=dataset, manifest_root=str(root), options=options, return_state=True
    )


BADGE = """(name => {
    let row = [...document.querySelectorAll('a')].find(a => a.textContent.trim() === name);
    while (row && !row.querySelector('.state-badge')) row = row.parentElement;
    const badge = row && row.querySelector('.state-badge');
    return badge && [badge.textContent.trim(), badge.className, getComputedStyle(badge).backgroundColor];
})"""
GRID = """(() => {
    const image = [...document.images].find(i => i.src.startsWith('data:image/jpeg'));
    return image && image.complete && image.naturalWidth > 0 && [image.naturalWidth, image.naturalHeight, image.alt];
})()"""


def test_the_ui_shows_outcomes_artifacts_and_the_sample_grid(server: dict[str, str], tmp_path: Path) -> None:
    """The Prefect UI in headless Chromium, logged in with the server's auth string: the run list shows a
    Published and a Needs review run by name, Needs review in the failed style; a run's artifacts; the sample
    grid loaded from the summary. Screenshots go to $STRATA_SCREENSHOTS (default ./screenshots-out)."""
    chromium()  # skipped without it (failed in CI) before any run
    screenshots = Path(os.environ.get("STRATA_SCREENSHOTS") or REPO / "screenshots-out")
    source, root = _source(tmp_path, "src", range(12)), tmp_path / "manifests"
    assert _curate(source, root, "vials-ui").name == "Published"
    v1 = m.read_manifest(str(root / "vials-ui"))
    devel, train = (v1[v1[m.PURPOSE] == p].iloc[0] for p in ("devel", "train"))
    # A new photo of a devel item that is a copy of a train image: held back, the run needs review.
    shutil.copyfile(source / train[m.KEY], source / devel[m.CATEGORY] / f"{devel[m.UNIQUE_ID]}_7.jpg")
    _picture(source / "good" / "50_0.jpg", 5000)
    held = _curate(source, root, "vials-ui")
    held_id = held.state_details.flow_run_id
    assert (held.type.value, held.name) == ("FAILED", "Needs review"), held
    summary = artifact(run_artifacts(held_id), "summary")

    ui = server["PREFECT_API_URL"].removesuffix("/api")
    browser = Browser(tmp_path / "chromium", height=1300)
    try:
        browser.goto(f"{ui}/")
        browser.wait_for("document.readyState === 'complete'", "the UI to load")
        browser.evaluate(f"localStorage.setItem('prefect-password', btoa({json.dumps(AUTH)}))")  # its login form

        browser.goto(f"{ui}/runs")
        browser.wait_for("document.body.innerText.includes('vials-ui v2')", "the run list")
        needs_review = browser.wait_for(f"{BADGE}('vials-ui v2')", "the state of vials-ui v2")
        done = browser.wait_for(f"{BADGE}('vials-ui v1')", "the state of vials-ui v1")
        assert needs_review[0] == "Needs review" and "state--failed" in needs_review[1], needs_review
        assert done[0] == "Published" and "state--completed" in done[1], done
        assert needs_review[2] != done[2]  # red, not the green of a routine success
        browser.evaluate("document.querySelector('.state-badge').scrollIntoView({block: 'center'})")
        browser.screenshot(screenshots / "runs.png")

        browser.goto(f"{ui}/runs/flow-run/{held_id}?tab=Artifacts")
        tab = "[...document.querySelectorAll('*')].filter(e => e.textContent.trim() === 'Artifacts').pop()"
        browser.wait_for(f"!!{tab}", "the run's Artifacts tab")
        browser.evaluate(f"{tab}.click()")
        for kind in ("summary", "review", "diff", "counts", "rejects", "inspect"):
            browser.wait_for(f"document.body.innerText.includes({json.dumps(summary.key.replace('summary', kind))})",
                             f"the {kind} artifact")
        browser.evaluate(f"{tab}.scrollIntoView({{block: 'start'}})")
        browser.screenshot(screenshots / "artifacts.png")

        browser.goto(f"{ui}/artifacts/artifact/{summary.id}")
        width, height, alt = browser.wait_for(GRID, "the sample grid to load")
        assert (width > 300, height >= 4 * 96, alt) == (True, True, "vials-ui v2")
        assert "vials-ui: Needs review" in browser.evaluate("document.body.innerText")
        browser.evaluate("[...document.images].find(i => i.src.startsWith('data:')).scrollIntoView({block: 'center'})")
        browser.screenshot(screenshots / "grid.png")
    finally:
        browser.close()


def test_dask_runner_gives_the_same_manifest_bytes(tmp_path: Path) -> None:
    source = _source(tmp_path, "src", range(9))
    (source / "good" / "99_0.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    digests = []
    for name, dask in (("threads", None), ("dask", "local")):
        options = CurateOptions(uniqueness=r"(\d+)_\d+\.\w+$", chunk_size=4, dask=dask)
        summary = curate_dataset(
            source=str(source), dataset="vials", manifest_root=str(tmp_path / name), options=options
        )
        assert summary.version == 1
        version = tmp_path / name / "vials" / "v000001"
        digests.append(
            {f: hashlib.sha256((version / f).read_bytes()).hexdigest() for f in (m.MANIFEST_FILE, m.REJECTS_FILE)}
        )
    assert digests[0] == digests[1]


def test_chunks_stay_few_at_scale() -> None:
    assert chunk_size(10, 256) == 1 and chunk_size(3000, 256) == 256  # ten tasks at least: progress by tenths
    assert chunk_size(1_000_000, 256) == 1000  # 1,000 tasks, not 3,907 (or one per object)
