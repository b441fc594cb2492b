"""How runs end, as a person sees them: the flow run's state, name and tags per outcome, the review artifact,
the CLI's output and exit code, and mistakes found before anything is read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
from PIL import Image, ImageEnhance
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterFlowRunId

from flows.curate import curate_dataset
from loader import manifest as m
from strata.cli import main
from strata.config import CurateOptions
from strata.errors import ConfigError, NeedsReview, SourceError, ValidationFailed
from tests.conftest import encode, picture, run_artifacts

UNIQUENESS = r"(\d+)_\d+\.\w+$"
OPTIONS = CurateOptions(uniqueness=UNIQUENESS)


def _seed(write_image: Callable[..., Path], items: int = 12) -> None:
    for item in range(items):
        for photo in range(2):
            write_image(f"{'good' if item % 3 else 'bad_cap'}/{item}_{photo}.png", seed=100 + item * 5 + photo)


def _run(tmp_path: Path, options: CurateOptions = OPTIONS) -> Any:
    return curate_dataset(
        source=str(tmp_path / "src"), dataset="d", manifest_root=str(tmp_path / "m"), options=options, return_state=True
    )


def _flow_run(state: Any) -> Any:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id)


def _task_names(state: Any) -> list[str]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=[state.state_details.flow_run_id]))
        )
    return sorted(run.name for run in runs)


def test_each_outcome_ends_in_its_state_with_a_name_and_tags(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    _seed(write_image)
    published = _run(tmp_path)
    run = _flow_run(published)
    assert (run.state.type.value, run.state.name, run.name) == ("COMPLETED", "Published", "d v1")
    assert "dataset:d" in run.tags and published.result().outcome == "Published"

    unchanged = _run(tmp_path)
    run = _flow_run(unchanged)
    assert (run.state.type.value, run.state.name, run.name) == ("COMPLETED", "Unchanged", "d v1")

    # A new photo of a devel item that is also a near copy (re-encoded) of a train image: it can go to neither.
    v1 = m.read_manifest(str(tmp_path / "m" / "d"))
    devel_item = v1[v1[m.PURPOSE] == "devel"].iloc[0]
    train_key = v1[v1[m.PURPOSE] == "train"].iloc[0][m.KEY]
    bridge = f"{devel_item[m.CATEGORY]}/{devel_item[m.UNIQUE_ID]}_7.jpg"
    with Image.open(tmp_path / "src" / train_key) as image:
        write_image(bridge, data=encode(image.convert("RGB"), "jpg", quality=90))
    write_image("good/50_0.png", seed=5000)
    held = _run(tmp_path)
    run = _flow_run(held)
    assert (run.state.type.value, run.state.name, run.name) == ("FAILED", "Needs review", "d v2")
    with pytest.raises(NeedsReview) as raised:
        held.result()
    summary = raised.value.summary
    assert summary.published and summary.version == 2 and summary.review["held_back"] == 1
    review = next(a for key, a in run_artifacts(run.id).items() if key.endswith("-review")).data
    assert bridge in review and "train: " + train_key in review and "devel: " in review
    assert bridge not in set(m.read_manifest(str(tmp_path / "m" / "d"))[m.KEY])

    (tmp_path / "src" / bridge).unlink()  # resolved: the next run publishes again
    write_image("good/51_0.png", seed=5001)
    assert _run(tmp_path).result().version == 3


def test_a_candidate_that_fails_validation_ends_failed_validation(
    tmp_path: Path, write_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.curate

    _seed(write_image, items=6)
    plan = flows.curate._plan_candidate

    def duplicate_path(*args: Any, **kwargs: Any) -> Any:
        candidate = plan(*args, **kwargs)
        candidate.manifest.loc[1, m.PATH] = candidate.manifest.loc[0, m.PATH]
        return candidate

    monkeypatch.setattr(flows.curate, "_plan_candidate", duplicate_path)
    failed = _run(tmp_path)
    run = _flow_run(failed)
    assert (run.state.type.value, run.state.name, run.name) == ("FAILED", "Failed validation", "d")
    with pytest.raises(ValidationFailed, match="expect_column_values_to_be_unique") as raised:
        failed.result()
    assert raised.value.summary.outcome == "Failed validation" and not raised.value.summary.published
    assert m.latest_version(*_store(tmp_path)) is None


def _store(tmp_path: Path) -> tuple[Any, str]:
    import fsspec

    return fsspec.filesystem("file"), str(tmp_path / "m" / "d")


def test_look_alike_units_hold_the_run_naming_the_group(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    """Twelve distinct items whose photos are near copies of each other (one scene under slowly changing
    light, as on a production line): one unit, all of its stratum."""
    base = picture(7, (96, 80))
    for item in range(12):
        write_image(f"good/{item}_0.png", data=encode(ImageEnhance.Brightness(base).enhance(1 + item * 0.01), "png"))
    for item in range(12, 32):
        write_image(f"bad_cap/{item}_0.png", seed=item)
    state = _run(tmp_path, CurateOptions(uniqueness=UNIQUENESS, max_group_share=0.05, max_group_items=10))
    run = _flow_run(state)
    assert (run.state.type.value, run.state.name) == ("FAILED", "Needs review")
    with pytest.raises(NeedsReview) as raised:
        state.result()
    message = str(raised.value)
    assert "nothing published" in message and "lower --near-duplicates" in message and "joins 12 items" in message
    assert m.latest_version(*_store(tmp_path)) is None


def test_mistakes_are_found_before_anything_is_read(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    _seed(write_image, items=3)
    with pytest.raises(ValueError, match="capture group"):  # pydantic reports the ConfigError
        CurateOptions(uniqueness=r"\d+_")
    with pytest.raises(ValueError, match="valid regular expression"):
        CurateOptions(uniqueness="([")
    (tmp_path / "root-file").write_text("not a folder")
    state = curate_dataset(
        source=str(tmp_path / "src"), dataset="d", manifest_root=str(tmp_path / "root-file"), return_state=True
    )
    with pytest.raises(ConfigError, match="is a file"):
        state.result()
    assert not [name for name in _task_names(state) if name.startswith(("list", "inspect"))]
    state = _run(tmp_path, CurateOptions(uniqueness=r"^item-(\d+)"))
    with pytest.raises(ConfigError, match="finds no item id in 6 of 6 new keys"):
        state.result()
    assert not [name for name in _task_names(state) if name.startswith("inspect")]
    allowed = _run(tmp_path, CurateOptions(uniqueness=r"^item-(\d+)", allow_unmatched=True))
    assert allowed.result().published
    with pytest.raises(SourceError, match="does not exist"):
        curate_dataset(source=str(tmp_path / "nowhere"), dataset="d", manifest_root=str(tmp_path / "m"))
    with pytest.raises(ConfigError, match="dataset name"):
        curate_dataset(source=str(tmp_path / "src"), dataset="a/b c", manifest_root=str(tmp_path / "m"))


def test_cli_quiet_prints_the_outcome_and_counts_and_errors_in_one_line(
    tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(write_image, items=6)
    args = ["curate", str(tmp_path / "src"), "--dataset", "d", "--manifests", str(tmp_path / "m"), "--quiet"]
    assert main([*args, "--uniqueness", UNIQUENESS]) == 0
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert lines[0].startswith("d: Published: published version 1") and len(lines) <= 10, out
    assert err.strip() == "", err
    fresh = ["curate", str(tmp_path / "src"), "--dataset", "d", "--manifests", str(tmp_path / "other"), "--quiet"]
    assert main([*fresh, "--uniqueness", r"^x(\d+)"]) == 1  # every key is new under this root
    out, err = capsys.readouterr()
    assert out.strip() == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("strata: error: --uniqueness '^x(\\\\d+)' finds no item id")
    loud = fresh[:-1]
    assert main([*loud, "--uniqueness", r"^x(\d+)"]) == 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and err.strip().splitlines()[-1].startswith("strata: error: --uniqueness")


def test_an_unreachable_api_is_one_line(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    _seed(write_image, items=2)
    env = {**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api", "PREFECT_HOME": str(tmp_path / "home")}
    run = subprocess.run(
        [sys.executable, "-m", "strata.cli", "curate", str(tmp_path / "src"), "--dataset", "d", "--quiet"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "strata: error: cannot reach the Prefect API at http://127.0.0.1:9/api"
    ), run.stderr
    assert run.stdout.strip() == ""


def test_the_readme_gives_the_outcome_model_the_code_uses() -> None:
    from strata.outcome import markdown_table

    repo = Path(__file__).resolve().parents[1]
    for readme in ("README.md", "deployments/README.md"):
        assert markdown_table() in (repo / readme).read_text(), f"{readme}: update its table to markdown_table()"
