"""Shared fixtures: one Prefect test harness per session, a moto S3 server over HTTP, real image bytes."""

from __future__ import annotations

import io
import os
import socket
import struct
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
VIAL = FIXTURES / "vial_0_1543413266626.bmp"
PIL_FORMATS = {
    "bmp": "BMP",
    "png": "PNG",
    "jpg": "JPEG",
    "jpeg": "JPEG",
    "gif": "GIF",
    "tif": "TIFF",
    "tiff": "TIFF",
    "webp": "WEBP",
}


@pytest.fixture(scope="session", autouse=True)
def prefect_harness() -> Iterator[None]:
    """The real Prefect engine on a temporary database, started once (about 8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def picture(seed: int, size: tuple[int, int] = (96, 80), mode: str = "RGB") -> Image.Image:
    """A smooth random picture: distinct perceptual hash per seed, stable under re-encoding."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    image = Image.fromarray(small, "RGB").resize(size, Image.Resampling.BICUBIC)
    return image.convert(mode) if mode != "RGB" else image


def encode(image: Image.Image, ext: str, **options: object) -> bytes:
    """Encode an image in the format its extension names."""
    buffer = io.BytesIO()
    fmt = PIL_FORMATS[ext.lower()]
    if fmt == "JPEG" and image.mode not in ("RGB", "L", "CMYK"):
        image = image.convert("RGB")
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A valid small PNG whose IHDR is rewritten to claim another size (a decompression bomb header)."""
    data = bytearray(encode(picture(1, (8, 8)), "png"))
    ihdr = data[12:29]
    body = ihdr[:4] + struct.pack(">II", width, height) + ihdr[12:]
    data[12:29] = body
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(body)))
    return bytes(data)


@pytest.fixture
def write_image(tmp_path: Path) -> Callable[..., Path]:
    """Write a picture under ``tmp_path/src``: ``write_image("good/1_1.png", seed=1)``."""

    def write(key: str, seed: int = 0, data: bytes | None = None, **options: object) -> Path:
        path = tmp_path / "src" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        if data is None:
            data = encode(picture(seed), path.suffix.lstrip("."), **options)
        path.write_bytes(data)
        return path

    return write


def run_artifacts(flow_run_id: Any) -> dict[str, Any]:
    """A flow run's artifacts by key, read back through the Prefect client."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in found}


def artifact(artifacts: dict[str, Any], what: str) -> Any:
    """The one artifact of a kind among a run's (keys are ``<dataset>-<root digest>-<what>``)."""
    (found,) = [a for key, a in artifacts.items() if key.rsplit("-", 1)[-1] == what or key.endswith(f"-{what}")]
    return found


def kinds(artifacts: dict[str, Any]) -> set[str]:
    """The kinds of a run's artifacts: their keys without ``<dataset>-<root digest>-``."""
    return {key.split("-", 2)[2] for key in artifacts}


def log_records(flow_run_id: Any) -> list[tuple[Any, str]]:
    """A flow run's log records that have reached the API so far, as (timestamp, message), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return sorted((log.timestamp, log.message) for log in logs)


def run_logs(flow_run_id: Any, timeout: float = 60) -> list[str]:
    """A flow run's log messages, once its last one ("Finished in state ...") has reached the API."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        messages = [message for _, message in log_records(flow_run_id)]
        if any(line.startswith("Finished in state") for line in messages):
            return messages
        assert time.monotonic() < deadline, f"the logs of flow run {flow_run_id} did not arrive in {timeout:.0f} s"
        time.sleep(0.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """A moto S3 server on loopback, spoken to over HTTP (no in-process patching)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An s3fs filesystem on a fresh moto state with bucket ``strata-test``, via the AWS environment."""
    import requests
    import s3fs

    requests.post(f"{moto_server}/moto-api/reset", timeout=10)
    for name, value in {
        "AWS_ENDPOINT_URL": moto_server,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir("strata-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


S3RVER_VERSION = "3.7.1"
S3RVER_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "S3RVER", "AWS_SECRET_ACCESS_KEY": "S3RVER"}  # its built-in account


def _unavailable(reason: str) -> None:
    """Skip locally, fail in CI (``.ci/run`` installs s3rver first, so CI must never skip these tests)."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the tests against s3rver: see .ci/run)")
    pytest.skip(reason)


def s3rver_script() -> Path:
    """s3rver's entry script, installed with npm into a cache folder on first use.

    The folder is ``$STRATA_S3RVER_DIR`` or ``~/.cache/strata/s3rver-<version>``; npm installs into a
    temporary folder beside it that is renamed into place, so concurrent test runs never see half an install.
    """
    import shutil
    import subprocess
    import tempfile

    folder = Path(os.environ.get("STRATA_S3RVER_DIR") or Path.home() / ".cache" / "strata" / f"s3rver-{S3RVER_VERSION}")
    script = folder / "node_modules" / "s3rver" / "bin" / "s3rver.js"
    if script.exists():
        return script
    npm = shutil.which("npm")
    if shutil.which("node") is None or npm is None:
        _unavailable(f"s3rver {S3RVER_VERSION} is not installed in {folder}, and Node.js/npm are not on PATH for it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    command = [npm, "install", "--no-audit", "--no-fund", "--prefix", str(staging), f"s3rver@{S3RVER_VERSION}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        _unavailable(f"`{' '.join(command)}` failed: {done.stderr.strip()[-500:]}")
    try:
        staging.rename(folder)
    except OSError:  # another test run installed it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    return script


@pytest.fixture(scope="session")
def s3rver_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An s3rver (npm) on loopback: a real S3-compatible server that is not moto and, like many such stores,
    ignores ``If-None-Match: *`` (a second conditional PUT overwrites)."""
    import shutil
    import subprocess
    import time

    script = s3rver_script()
    port = _free_port()
    log = tmp_path_factory.mktemp("s3rver") / "s3rver.log"
    command = [shutil.which("node") or "node", str(script), "-d", str(tmp_path_factory.mktemp("s3rver-data"))]
    command += ["-a", "127.0.0.1", "-p", str(port), "--no-vhost-buckets"]
    with log.open("wb") as output:
        server = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                pytest.fail(f"s3rver did not start on 127.0.0.1:{port}: {log.read_text()[-2000:]}")
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    try:
        server.wait(timeout=10)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


@pytest.fixture
def s3rver(s3rver_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """An s3fs filesystem on s3rver with an empty bucket ``strata-test``, via the AWS environment."""
    import s3fs

    environment = {**S3RVER_CREDENTIALS, "AWS_ENDPOINT_URL": s3rver_server, "AWS_DEFAULT_REGION": "us-east-1"}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    if fs.exists("strata-test"):
        fs.rm("strata-test", recursive=True)
    if not fs.exists("strata-test"):
        fs.mkdir("strata-test")
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(params=["moto", "s3rver"])
def s3_server(request: pytest.FixtureRequest) -> tuple[str, object]:
    """Each S3 implementation in turn: (name, an s3fs filesystem on it with an empty bucket ``strata-test``)."""
    return request.param, request.getfixturevalue("s3" if request.param == "moto" else "s3rver")


@pytest.fixture(autouse=True)
def prefect_console_follows_capture() -> Iterator[None]:
    """Point Prefect's console log handlers at this test's stderr.

    They bind the stream they first see; once a capsys test closes it, later flow logs would fail.
    """
    import logging
    import sys

    from prefect.logging.handlers import PrefectConsoleHandler

    def rebind(stream: object) -> None:
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if isinstance(handler, PrefectConsoleHandler):
                    handler.stream = stream  # not setStream: it flushes the old, maybe closed, stream
                    handler.console.file = stream  # the rich console it prints through

    rebind(sys.stderr)
    yield
    rebind(sys.__stderr__)
