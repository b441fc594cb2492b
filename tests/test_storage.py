"""The storage contract on two S3 implementations, moto and s3rver (which ignores ``If-None-Match: *``), and
on local and memory stores: the exclusive-create probe, the refusal to publish where it fails (nothing is
overwritten), the opt-in that the dataset's Prefect concurrency limit must back, and listing, reading and the
loader's cache on both servers, over keys that need percent-encoding."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

from flows.curate import curate_dataset
from loader import manifest as m
from strata.cli import main
from strata.config import CONCURRENCY_LIMIT, EXCLUSIVE_CREATE, CurateOptions
from strata.deployments import limit_name
from strata.errors import CommitConflict, UnsafeStore
from strata.storage import decode_uri, decode_uris, object_uri, object_uris, uri_path
from tasks.commit_guard import PROBE_PREFIX, honours_exclusive_create
from tasks.grid import UI_BUDGET
from tasks.publish import Store, claim_version, write_version
from tests.conftest import artifact, encode, picture, run_artifacts

BUCKET = "strata-test"
# Keys a standard URI parser misreads unless they are percent-encoded (issue 25: 6 of 40 rows resolved
# another file), and some that need nothing.
ODD_KEYS = [
    "good/1_100.png",
    "good/with space 2_200.png",
    "good/a%2Fb 3_300.png",
    "good/hash#4_400.png",
    "good/query?x=1&y=2 5_500.png",
    "good/plus+percent%20 6_600.png",
    "good/ünïcødé 7_700.png",
    "bad_cap/semi;colon@at 8_800.png",
    "bad_cap/paren(9)!$' 9_900.png",
    "bad_cap/tilde~dash-dot.10_1000.png",
]


def snapshot(fs: fsspec.AbstractFileSystem, path: str) -> dict[str, bytes]:
    """Every object under ``path`` and its bytes."""
    return {name: fs.cat_file(name) for name in fs.find(path)}


def test_uris_are_percent_encoded_vectorized_and_round_trip_through_pyarrow(tmp_path: Path) -> None:
    rng = random.Random(0)
    alphabet = "aZ09-._~ !\"#$%&'()*+,:;<=>?@[\\]^`{|}äø€😀"

    def segment() -> str:
        return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))).strip(".") or "x"

    keys = ["/".join(segment() for _ in range(rng.randint(1, 3))) for _ in range(2000)] + ODD_KEYS
    fs = fsspec.filesystem("file")
    root = str(tmp_path / "root dir#1")
    uris = object_uris(fs, root, keys).to_pylist()
    assert uris == [object_uri(fs, f"{root}/{key}") for key in keys]  # the vectorized form is the scalar one
    assert decode_uris(uris) == [fs.unstrip_protocol(f"{root}/{key}") for key in keys]
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~/%")
    assert all(set(uri.partition("://")[2]) <= allowed for uri in uris)  # only unreserved characters remain
    for key, uri in zip(keys, uris, strict=True):
        parsed, path = pafs.FileSystem.from_uri(uri)
        assert isinstance(parsed, pafs.LocalFileSystem) and path == f"{root}/{key}", (key, uri)
        assert uri_path(fs, uri) == f"{root}/{key}"
    # Written unencoded, a standard parser resolves another object: the bug this encoding removes.
    plain = str(tmp_path / "plain")
    for key, misread in (("good/a%2Fb.png", "good/a/b.png"), ("good/hash#4.png", "good/hash")):
        assert pafs.FileSystem.from_uri(fs.unstrip_protocol(f"{plain}/{key}"))[1] == f"{plain}/{misread}"
        assert pafs.FileSystem.from_uri(object_uri(fs, f"{plain}/{key}"))[1] == f"{plain}/{key}"
    assert decode_uri("s3://b/plain/key.png") == "s3://b/plain/key.png"


@pytest.mark.parametrize("kind", ["local", "memory", "moto", "s3rver"])
def test_the_probe_tells_stores_that_honour_exclusive_create_and_leaves_nothing(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if kind == "local":
        fs, path = fsspec.filesystem("file"), str(tmp_path / "m" / "d")
    elif kind == "memory":
        fs, path = fsspec.filesystem("memory"), f"/probe-{tmp_path.name}/d"
    else:
        fs, path = request.getfixturevalue("s3" if kind == "moto" else "s3rver"), f"{BUCKET}/m/d"
    assert honours_exclusive_create(Store(fs, path), "run-1") is (kind != "s3rver")
    assert not [p for p in (fs.find(path) if fs.exists(path) else []) if PROBE_PREFIX in p]


def _upload_images(fs: Any, prefix: str, keys: list[str]) -> dict[str, bytes]:
    images = {key: encode(picture(seed), "png") for seed, key in enumerate(keys)}
    for key, data in images.items():
        fs.makedirs(f"{prefix}/{key}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{prefix}/{key}", data)
    return images


def test_publishing_where_exclusive_create_is_ignored_is_refused_and_overwrites_nothing(
    s3rver: Any, tmp_path: Path, write_image: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    for item in range(8):
        write_image(f"{'good' if item % 3 else 'bad_cap'}/{item}_0.png", seed=item)
    local = tmp_path / "local"
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(local))
    s3rver.put(str(local / "d"), f"{BUCKET}/m/d", recursive=True)  # a committed version already on the store
    before = snapshot(s3rver, f"{BUCKET}/m")
    assert m.read_manifest(f"s3://{BUCKET}/m/d").shape[0] == 8  # reading works on s3rver

    for item in range(8, 12):
        write_image(f"good/{item}_0.png", seed=item)
    with pytest.raises(UnsafeStore) as refused:
        curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=f"s3://{BUCKET}/m")
    message = str(refused.value)
    assert f"s3://{BUCKET}/m/d does not honour exclusive create" in message
    assert "Nothing was published" in message and "--commit-guard concurrency-limit" in message
    assert limit_name("d") in message and "docs/storage.md" in message
    assert snapshot(s3rver, f"{BUCKET}/m") == before  # no byte changed, no v000002, no probe left behind

    args = ["curate", str(tmp_path / "src"), "--dataset", "d", "--manifests", f"s3://{BUCKET}/m", "--quiet"]
    assert main(args) == 1
    assert "does not honour exclusive create" in capsys.readouterr().err
    assert snapshot(s3rver, f"{BUCKET}/m") == before


def test_without_conditional_writes_the_concurrency_limit_guard_still_refuses_a_second_writer(s3rver: Any) -> None:
    store = Store(s3rver, f"{BUCKET}/m/d", guard=CONCURRENCY_LIMIT)
    assert claim_version(store, None, "run-a") == 1
    with pytest.raises(CommitConflict, match="version 1 is being written by run run-a"):
        claim_version(store, None, "run-b", wait_s=0)
    record = {"sha256": "0" * 64, "schema_version": m.SCHEMA_VERSION}
    write_version(store, 1, None, b"parquet-a", b"rejects-a", {"success": True}, record)
    committed = snapshot(s3rver, f"{BUCKET}/m/d/v000001")
    with pytest.raises(FileExistsError):
        write_version(store, 1, None, b"parquet-b", b"rejects-b", {"success": True}, record)
    assert snapshot(s3rver, f"{BUCKET}/m/d/v000001") == committed


@pytest.fixture
def dataset_limit() -> Iterator[Any]:
    """Create (and afterwards delete) one-slot concurrency limits by dataset name on the test API."""
    created: list[str] = []

    def create(dataset: str, slots: int = 1) -> None:
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=limit_name(dataset), limit=slots))
        created.append(limit_name(dataset))

    yield create
    with get_client(sync_client=True) as client:
        for name in created:
            client.delete_global_concurrency_limit_by_name(name)


def test_the_opt_in_needs_a_one_slot_limit_and_is_recorded(
    s3rver: Any, tmp_path: Path, write_image: Any, dataset_limit: Any
) -> None:
    for item in range(6):
        write_image(f"{'good' if item % 3 else 'bad_cap'}/{item}_0.png", seed=item)
    source, root = str(tmp_path / "src"), f"s3://{BUCKET}/m"
    opt_in = CurateOptions(commit_guard=CONCURRENCY_LIMIT)
    with pytest.raises(UnsafeStore, match=r"needs that limit, but the global concurrency limit 'strata-dataset-o1' "):
        curate_dataset(source=source, dataset="o1", manifest_root=root, options=opt_in)
    dataset_limit("o2", slots=2)
    with pytest.raises(UnsafeStore, match=r"'strata-dataset-o2' has 2 slots"):
        curate_dataset(source=source, dataset="o2", manifest_root=root, options=opt_in)
    assert not s3rver.exists(f"{BUCKET}/m/o1/v000001") and not s3rver.exists(f"{BUCKET}/m/o2/v000001")

    dataset_limit("o3")
    first = curate_dataset(source=source, dataset="o3", manifest_root=root, options=opt_in)
    assert first.published and first.version == 1
    v1 = snapshot(s3rver, f"{BUCKET}/m/o3/v000001")
    write_image("good/6_0.png", seed=6)
    second = curate_dataset(source=source, dataset="o3", manifest_root=root, options=opt_in)
    assert (second.version, second.parent_version) == (2, 1)
    assert snapshot(s3rver, f"{BUCKET}/m/o3/v000001") == v1
    for number in (1, 2):
        assert m.open_version(f"{root}/o3", number).info["commit_guard"] == CONCURRENCY_LIMIT
    assert len(m.read_manifest(f"{root}/o3")) == 7


def test_on_a_store_that_honours_exclusive_create_the_opt_in_changes_nothing(
    s3: Any, tmp_path: Path, write_image: Any
) -> None:
    for item in range(4):
        write_image(f"good/{item}_0.png", seed=item)
    summary = curate_dataset(
        source=str(tmp_path / "src"),
        dataset="d",
        manifest_root=f"s3://{BUCKET}/m",
        options=CurateOptions(commit_guard=CONCURRENCY_LIMIT),  # no limit exists: not needed here
    )
    assert summary.published
    assert m.open_version(f"s3://{BUCKET}/m/d").info["commit_guard"] == EXCLUSIVE_CREATE


def test_the_summary_embeds_the_sample_grid_for_an_s3_root(s3: Any, tmp_path: Path, write_image: Any) -> None:
    """A browser cannot open a private bucket's URL: the grid travels inside the summary artifact."""
    for item in range(8):
        write_image(f"{'good' if item % 2 else 'bad_cap'}/{item}_0.png", seed=item)
    state = curate_dataset(
        source=str(tmp_path / "src"), dataset="d", manifest_root=f"s3://{BUCKET}/m", return_state=True
    )
    assert state.name == "Published"
    summary = artifact(run_artifacts(state.state_details.flow_run_id), "summary").data
    inline = summary.split("](data:image/jpeg;base64,", 1)[1].split(")", 1)[0]
    assert len(inline) <= UI_BUDGET and "s3://" not in summary.split("## Sample grid", 1)[1]
    with Image.open(io.BytesIO(base64.b64decode(inline))) as image:
        assert image.format == "JPEG" and image.height >= 2 * 96  # a row per category and purpose
    assert s3.cat_file(f"{BUCKET}/m/d/v000001/{m.GRID_FILE}").startswith(b"\x89PNG")


def test_listing_reading_and_the_loader_cache_on_both_servers(
    s3_server: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import loader

    name, fs = s3_server
    images = _upload_images(fs, f"{BUCKET}/src", ODD_KEYS)
    root = tmp_path / "manifests"
    summary = curate_dataset(source=f"s3://{BUCKET}/src", dataset="d", manifest_root=str(root))
    assert summary.published, name
    version = m.open_version(str(root / "d"))
    assert version.info["path_encoding"] == m.PATH_ENCODING
    frame = m.read_table(version).to_pandas().set_index(m.KEY)
    assert sorted(frame.index) == sorted(ODD_KEYS) and m.read_rejects(version).num_rows == 0
    for key, row in frame.iterrows():
        assert fs.cat_file(uri_path(fs, row[m.PATH])) == images[key], (name, key)  # the URI names its object

    # The version on the server itself: read back there, whole.
    fs.put(str(root / "d"), f"{BUCKET}/m/d", recursive=True)
    assert m.read_manifest(f"s3://{BUCKET}/m/d").set_index(m.KEY).sort_index().equals(frame.sort_index())

    cache = tmp_path / "cache"
    options = dict(purpose=None, image_size=None, stratify_by=None, shuffle=False, batch_size=len(ODD_KEYS))
    first = np.concatenate([x.numpy() for x, _ in loader.from_manifest(str(root / "d"), cache_dir=cache, **options)])
    assert first.shape == (len(ODD_KEYS), 80, 96, 3)
    assert len(list(cache.glob("??/*"))) == len(ODD_KEYS)  # the bytes, by md5
    assert len(list(cache.glob("pixels/*/??/*"))) == len(ODD_KEYS)  # and the pixels
    fs.rm(f"{BUCKET}/src", recursive=True)  # a later job reads the cache, not the server
    again = np.concatenate([x.numpy() for x, _ in loader.from_manifest(str(root / "d"), cache_dir=cache, **options)])
    assert np.array_equal(first, again), name
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # and without the server at all
    third = loader.from_manifest(f"{root}/d", cache_dir=cache, **options)
    assert np.array_equal(first, np.concatenate([x.numpy() for x, _ in third]))


def test_manifest_json_records_the_encoding_and_the_guard(tmp_path: Path, write_image: Any) -> None:
    write_image("good/1 #1.png", seed=1)
    curate_dataset(source=str(tmp_path / "src"), dataset="d", manifest_root=str(tmp_path / "m"))
    record = json.loads((tmp_path / "m" / "d" / "v000001" / m.COMMIT_FILE).read_text())
    assert (record["path_encoding"], record["commit_guard"]) == (m.PATH_ENCODING, EXCLUSIVE_CREATE)
    assert m.read_manifest(str(tmp_path / "m" / "d"))[m.PATH].tolist() == [
        (tmp_path / "src" / "good").as_uri() + "/1%20%231.png"
    ]


@pytest.mark.parametrize("kind", ["local", "moto"])
def test_the_manifests_own_uris_read_back_by_pyarrow_and_duckdb(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import duckdb

    if kind == "moto":
        fs, source = request.getfixturevalue("s3"), f"s3://{BUCKET}/src"
        images = _upload_images(fs, f"{BUCKET}/src", ODD_KEYS)
    else:
        fs, source = fsspec.filesystem("file"), str(tmp_path / "src dir#1")
        images = _upload_images(fs, source, ODD_KEYS)
    curate_dataset(source=source, dataset="d", manifest_root=str(tmp_path / "m"))
    parquet = str(tmp_path / "m" / "d" / "v000001" / m.MANIFEST_FILE)
    frame = m.read_manifest(str(tmp_path / "m" / "d")).set_index(m.KEY)
    assert sorted(frame.index) == sorted(ODD_KEYS)

    # pyarrow's URI parser resolves each URI to its object (s3: endpoint options as URI query parameters).
    query = ""
    if kind == "moto":
        endpoint = fs.client_kwargs.get("endpoint_url") or request.getfixturevalue("moto_server")
        query = f"?endpoint_override={endpoint.removeprefix('http://')}&scheme=http&region=us-east-1"
    for key, uri in frame[m.PATH].items():
        parsed, path = pafs.FileSystem.from_uri(uri + query)
        with parsed.open_input_stream(path) as stream:
            assert stream.read() == images[key], (kind, key, uri)

    # DuckDB reads the manifest, decodes its URIs with its own url_decode and reads the objects they name.
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    if kind == "moto":
        con.register_filesystem(fs)  # DuckDB's S3 support is an extension it would download
    rows = con.execute("SELECT key, md5, url_decode(path) FROM read_parquet(?)", [parquet]).fetchall()
    locations = {location: (key, md5) for key, md5, location in rows}
    blobs = con.execute("SELECT filename, md5(content) FROM read_blob(?)", [sorted(locations)]).fetchall()
    named = {location.removeprefix("file://"): sample for location, sample in locations.items()}
    read = {named[filename.removeprefix("file://")]: digest for filename, digest in blobs}  # DuckDB drops file://
    assert sorted(read) == sorted((k, md5) for k, md5, _ in rows)
    assert all(md5 == digest for (_, md5), digest in read.items())
