"""Validation gating the publish, the run's Prefect artifacts read back through the client, and `strata diff`."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Callable

import fsspec
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from flows.curate import curate_dataset
from loader import manifest as m
from strata.cli import main
from strata.config import CurateOptions
from strata.errors import ValidationFailed
from tasks.grid import UI_BUDGET, draw
from tasks.grid import markdown as grid_markdown
from tests.conftest import artifact, encode, kinds, picture, png_claiming, run_artifacts

UNIQUENESS = r"(\d+)_\d+\.\w+$"


def seed(write_image: Callable[..., Path], first: int = 0, items: int = 12) -> None:
    """Two classes, two photos per item, one exact duplicate across items and one near duplicate."""
    for item in range(first, first + items):
        category = "good" if item % 3 else "bad_cap"
        for photo in range(2):
            write_image(f"{category}/{item}_{photo}.png", seed=100 + item * 5 + photo)
    if first == 0:
        write_image("good/900_0.png", seed=100 + 1 * 5)  # exact duplicate of good/1_0.png, another item
        write_image("good/901_0.jpg", data=encode(picture(100 + 2 * 5), "jpg", quality=60))  # near dup of good/2_0


def test_failed_validation_publishes_nothing_and_keeps_the_result(
    tmp_path: Path, write_image: Callable[..., Path]
) -> None:
    seed(write_image)
    root = tmp_path / "manifests"
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root))
    seed(write_image, first=12, items=3)
    strict = CurateOptions(fraction_tolerance=0.0, min_stratum=1)  # no stratum hits 0.8 exactly
    with pytest.raises(ValidationFailed, match="expect_stratum_train_fraction_near_target") as failure:
        curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root), options=strict)
    assert "nothing published" in str(failure.value) and "_rejected" in str(failure.value)
    assert "target 0.8 +- 0" in str(failure.value)  # the numbers that failed, with target and tolerance
    assert m.committed_versions(fsspec.filesystem("file"), str(root / "d")) == [1]
    assert not (root / "d" / "v000002").exists()
    assert json.loads((root / "d" / m.LATEST_FILE).read_text())["version"] == 1
    (kept,) = (root / "d" / m.REJECTED_DIR).glob(f"*/{m.VALIDATION_FILE}")
    result = json.loads(kept.read_text())
    assert result["success"] is False
    assert [f["expectation"] for f in result["failed"]] == ["expect_stratum_train_fraction_near_target"]
    assert result["failed"][0]["examples"]  # the strata that missed, by name
    assert m.read_manifest(str(root / "d")).shape[0] == 26  # readers still get version 1


def _first(frame: pd.DataFrame, purpose: str) -> int:
    return int(frame.index[frame[m.PURPOSE] == purpose][0])


def _copy_across(column: str) -> Callable[[pd.DataFrame], None]:
    """Give a devel row the value of a train row: one md5 / item / group in two purposes."""

    def breakage(frame: pd.DataFrame) -> None:
        frame[column] = frame[column].astype(object)
        value = frame.loc[_first(frame, "train"), column]
        frame.loc[[_first(frame, "train"), _first(frame, "devel")], column] = "group-x" if pd.isna(value) else value

    return breakage


FLOW_BREAKAGES: dict[str, tuple[Callable[[pd.DataFrame], object], str]] = {
    "duplicate path": (lambda f: f.__setitem__(m.PATH, [f[m.PATH][0], *f[m.PATH][:-1]]), "to_be_unique"),
    "malformed md5": (lambda f: f.loc.__setitem__((0, m.MD5), f.loc[0, m.MD5].upper()), "to_match_regex"),
    "unknown purpose": (lambda f: f.loc.__setitem__((0, m.PURPOSE), "holdout"), "to_be_in_set"),
    "zero width": (lambda f: f.loc.__setitem__((0, m.WIDTH), 0), "to_be_between"),
    "zero height": (lambda f: f.loc.__setitem__((0, m.HEIGHT), 0), "to_be_between"),
    "zero size": (lambda f: f.loc.__setitem__((0, m.SIZE), 0), "to_be_between"),
    "md5 in two purposes": (_copy_across(m.MD5), "expect_no_md5_in_two_purposes"),
    "item in two purposes": (_copy_across(m.UNIQUE_ID), "expect_no_item_in_two_purposes"),
    "group in two purposes": (_copy_across(m.DUPLICATE_GROUP), "expect_no_duplicate_group_in_two_purposes"),
    "stratum off target": (lambda f: f.__setitem__(m.PURPOSE, "train"), "expect_stratum_train_fraction_near_target"),
    "row count off the diff": (lambda f: f.drop(index=f.index[-1], inplace=True), "expect_table_row_count_to_equal"),
}


@pytest.mark.parametrize("case", FLOW_BREAKAGES, ids=list(FLOW_BREAKAGES))
def test_flow_fails_without_publishing_on_each_broken_candidate(
    case: str, tmp_path: Path, write_image: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real flow and suite, with the split's output broken the way one expectation guards against."""
    import flows.curate

    breakage, expectation = FLOW_BREAKAGES[case]
    plan = flows.curate._plan_candidate

    def broken_plan(*args: object, **kwargs: object) -> object:
        candidate = plan(*args, **kwargs)
        breakage(candidate.manifest)
        return candidate

    monkeypatch.setattr(flows.curate, "_plan_candidate", broken_plan)
    seed(write_image, items=6)
    root = tmp_path / "manifests"
    options = CurateOptions(min_stratum=1, fraction_tolerance=0.15)  # 6 items land within 0.1 of target
    with pytest.raises(ValidationFailed, match=expectation):
        curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root), options=options)
    assert m.version_numbers(fsspec.filesystem("file"), str(root / "d")) == []
    assert len(list((root / "d" / m.REJECTED_DIR).glob(f"*/{m.VALIDATION_FILE}"))) == 1


def test_report_artifacts_can_be_read_back_through_the_client(tmp_path: Path, write_image: Callable[..., Path]) -> None:
    seed(write_image)
    write_image("good/950_0.jpg", data=b"\xff\xd8\xff\xe0 truncated")
    root = tmp_path / "manifests"
    state = curate_dataset(
        source=str(tmp_path / "src"),
        dataset="vials",
        manifest_root=str(root),
        options=CurateOptions(uniqueness=UNIQUENESS),
        return_state=True,
    )
    summary = state.result()
    artifacts = run_artifacts(state.state_details.flow_run_id)
    assert {a.task_run_id for a in artifacts.values()} == {None}  # the run's, not the report task's
    assert kinds(artifacts) == {"counts", "diff", "duplicates", "largest-groups", "rejects", "summary", "inspect"}
    assert len({key.rsplit("-", 1)[0] for key in artifacts if not key.endswith("largest-groups")}) == 1
    counts = {row["category"]: row for row in json.loads(artifact(artifacts, "counts").data)}
    assert counts["total"]["total"] == 26 and counts["good"]["total"] == 18
    diff = artifact(artifacts, "diff").data
    assert "| good | 18 | 0 | 0 | 0 |" in diff and "| bad_cap | 8 | 0 | 0 | 0 |" in diff
    assert "**added** (26)" in diff and "- `bad_cap/0_0.png`: bad_cap, " in diff and "... and 6 more" in diff
    largest = json.loads(artifact(artifacts, "largest-groups").data)
    assert {row["rows"] for row in largest} == {2} and {row["items"] for row in largest} == {2}
    duplicates = {row["kind"]: row for row in json.loads(artifact(artifacts, "duplicates").data)}
    assert duplicates["exact"]["groups"] == 1 and duplicates["exact"]["kept_whole"] == 1
    assert duplicates["near"]["groups"] == 1 and duplicates["near"]["samples"] == 2
    rejects = json.loads(artifact(artifacts, "rejects").data)
    assert rejects[0]["reason"] in ("truncated", "unreadable") and "good/950_0.jpg" in rejects[0]["examples"]
    assert (rejects[0]["new"], rejects[0]["carried"]) == (1, 0)
    markdown = artifact(artifacts, "summary").data
    assert markdown.startswith("# vials: Published") and "| uniqueness |" in markdown  # parameters, a table
    assert f"{summary.version_uri}/{m.MANIFEST_FILE}" in markdown and "validation: passed" in markdown
    assert "rejects, new in this run: truncated 1" in markdown or "rejects, new in this run: unreadable 1" in markdown
    # The grid is in the summary itself (a browser cannot open file:// or private bucket URLs) and in the version.
    inline = markdown.split("(data:image/jpeg;base64,", 1)[1].split(")", 1)[0]
    assert len(inline) <= UI_BUDGET
    with Image.open(io.BytesIO(base64.b64decode(inline))) as image:
        assert image.format == "JPEG" and image.width > 300 and image.height >= 4 * 96  # small enough as it is
    with fsspec.open(f"{summary.version_uri}/{m.GRID_FILE}", "rb") as handle:
        grid = handle.read()
    assert grid.startswith(b"\x89PNG")
    with Image.open(io.BytesIO(grid)) as image:
        assert image.width > 300 and image.height >= 4 * 96  # 2 categories x 2 purposes


def test_a_grid_of_photos_is_embedded_within_the_budget() -> None:
    """Noise is the worst case for a compressor: twenty rows of it are a PNG ten times the budget; the UI
    gets a smaller JPEG, and a grid of thousands of rows is named rather than shown."""
    rng = np.random.default_rng(0)

    def photo() -> bytes:
        return encode(Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)), "jpg")

    png = draw([(f"c{row} / train", [photo() for _ in range(4)]) for row in range(20)])
    assert len(png) > 10 * UI_BUDGET
    inline = grid_markdown(png, "vials v1").split("(data:image/jpeg;base64,", 1)[1].rstrip(")")
    assert len(inline) <= UI_BUDGET
    with Image.open(io.BytesIO(base64.b64decode(inline))) as image, Image.open(io.BytesIO(png)) as full:
        assert image.format == "JPEG" and full.width // 3 < image.width < full.width
        assert abs(image.width / image.height - full.width / full.height) < 0.05
    assert grid_markdown(png_claiming(560, 200_000), "vials v1") == (  # 2,000 rows: never decoded
        f"vials v1: the sample grid is too large to show here; it is `{m.GRID_FILE}` in the version."
    )


def test_strata_diff_lists_changes_and_no_purpose_moves(
    tmp_path: Path, write_image: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    seed(write_image)
    root = tmp_path / "manifests"
    options = CurateOptions(uniqueness=UNIQUENESS)
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root), options=options)
    write_image("good/20_0.png", seed=777)
    (tmp_path / "src" / "bad_cap" / "3_1.png").unlink()
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(root), options=options)
    capsys.readouterr()
    assert main(["diff", str(root / "d"), "1", "2"]) == 0
    out = capsys.readouterr().out
    assert "added: 1\n  + good/20_0.png  (good, " in out
    assert "removed: 1\n  - bad_cap/3_1.png" in out
    assert "changed: 0" in out and "purpose changes: 0 (purposes are sticky)" in out
    assert main(["diff", str(root / "d"), "1", "7"]) == 1
    assert "version 7 of" in capsys.readouterr().err
