"""Objects added, deleted and overwritten (same size and other size) on the moto server between the listing
and the inspect stage: no crash, the changed ones are rejected as changed_during_run, and the next run
picks each up as it now is."""

from __future__ import annotations

from typing import Any

import pytest

import flows.curate
from flows.curate import curate_dataset
from loader import manifest as m
from strata.config import CurateOptions
from tests.conftest import encode, picture

BUCKET = "strata-test"
OPTIONS = CurateOptions(uniqueness=r"(\d+)_\d+\.\w+$")


def test_objects_changing_between_list_and_inspect(s3: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    src = f"{BUCKET}/src"
    for item in range(8):
        s3.pipe_file(f"{src}/{'good' if item % 3 else 'bad_cap'}/{item}_0.bmp", encode(picture(item), "bmp"))
    same_size = encode(picture(100), "bmp")  # a BMP of the same geometry has the same size
    assert len(same_size) == s3.size(f"{src}/good/1_0.bmp")

    listed = flows.curate.list_task

    def list_then_change(*args: Any, **kwargs: Any) -> Any:
        listing = listed(*args, **kwargs)
        s3.rm(f"{src}/good/2_0.bmp")  # deleted
        s3.pipe_file(f"{src}/good/1_0.bmp", same_size)  # overwritten, same size
        s3.pipe_file(f"{src}/good/4_0.bmp", encode(picture(101, (64, 64)), "bmp"))  # overwritten, other size
        s3.pipe_file(f"{src}/good/50_0.bmp", encode(picture(102), "bmp"))  # added
        return listing

    monkeypatch.setattr(flows.curate, "list_task", list_then_change)
    first = curate_dataset(source=f"s3://{src}", dataset="d", manifest_root=f"s3://{BUCKET}/m", options=OPTIONS)
    monkeypatch.undo()
    assert first.rejects == {"changed_during_run": 3}
    v1 = m.read_manifest(f"s3://{BUCKET}/m/d", 1)
    rejects = m.read_rejects(m.open_version(f"s3://{BUCKET}/m/d", 1)).to_pandas().set_index(m.KEY)
    assert set(rejects.index) == {"good/1_0.bmp", "good/2_0.bmp", "good/4_0.bmp"}
    assert "overwritten after it was listed" in rejects.loc["good/1_0.bmp", m.DETAIL]
    assert "deleted" in rejects.loc["good/2_0.bmp", m.DETAIL]
    assert set(v1[m.KEY]) == {f"{'good' if i % 3 else 'bad_cap'}/{i}_0.bmp" for i in (0, 3, 5, 6, 7)}
    for row in v1.itertuples():  # every accepted row describes the bytes now in the bucket
        assert row.md5 == s3.info(row.path.removeprefix("s3://"))["ETag"].strip('"')

    second = curate_dataset(source=f"s3://{src}", dataset="d", manifest_root=f"s3://{BUCKET}/m", options=OPTIONS)
    assert second.version == 2 and not second.rejects
    v2 = m.read_manifest(f"s3://{BUCKET}/m/d", 2).set_index(m.KEY)
    assert {"good/1_0.bmp", "good/4_0.bmp", "good/50_0.bmp"} <= set(v2.index) and "good/2_0.bmp" not in v2.index
    assert (v2.loc["good/4_0.bmp", m.WIDTH], v2.loc["good/4_0.bmp", m.HEIGHT]) == (64, 64)
