"""Stage 1, list: every object under the source with key, size, etag and mtime.

Image extensions are matched case-insensitively; everything else is skipped and counted. A local source is
walked with ``os.scandir``, one ``stat`` per file (``tasks.walk``, which the CLI starts early); a remote one is
listed through ``fs.find``. Either way the frame is built column by column in Arrow, not row by row in Python.
"""

from __future__ import annotations

import posixpath
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Mapping

import fsspec
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.implementations.local import LocalFileSystem
from prefect import get_run_logger

from loader import manifest as m
from loader.sampling import splitmix64
from strata.errors import SourceError
from strata.storage import encode_keys, naming, object_uri
from tasks.policy import stage
from tasks.walk import walk

IMAGE_EXTENSIONS = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".jpe", ".gif", ".tif", ".tiff", ".webp"})
LISTING_COLUMNS = (m.PATH, m.KEY, m.FOLDER, m.CATEGORY, m.SIZE, m.ETAG, m.MTIME)
NO_CLASS_FOLDER = "(no class folder)"
_IMAGE_NAME = r"\.(" + "|".join(sorted(e.lstrip(".") for e in IMAGE_EXTENSIONS)) + r")$"


@dataclass(frozen=True)
class Listing:
    """The image objects under a source, and what was skipped."""

    objects: pd.DataFrame  # LISTING_COLUMNS, sorted by key
    skipped: Mapping[str, int] = field(default_factory=dict)  # extension -> count of non-image files


def local_etags(sizes: np.ndarray, mtimes: np.ndarray, inodes: np.ndarray) -> np.ndarray:
    """Stand-in etags of local files (``local-`` and 16 hex digits) from size, mtime (float seconds, as
    ``os.stat`` gives it) and inode: a file rewritten or touched gets another. Never a plain MD5."""
    micros = np.round(np.asarray(mtimes, dtype=np.float64) * 1e6).astype(np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        mixed = splitmix64(np.asarray(sizes, dtype=np.uint64))
        mixed = splitmix64(mixed ^ micros)
        mixed = splitmix64(mixed ^ np.asarray(inodes, dtype=np.uint64))
    nibbles = np.empty((len(mixed), 16), dtype=np.uint8)
    octets = mixed.astype(">u8").view(np.uint8).reshape(-1, 8)
    nibbles[:, 0::2], nibbles[:, 1::2] = octets >> 4, octets & 15
    text = np.empty((len(mixed), 22), dtype=np.uint8)
    text[:, :6] = np.frombuffer(b"local-", np.uint8)
    text[:, 6:] = np.frombuffer(b"0123456789abcdef", np.uint8)[nibbles]
    return text.view("S22").ravel()


def etag_of(info: Mapping[str, Any]) -> str:
    """The storage etag as listed; local files get :func:`local_etags`' stand-in."""
    for name in ("ETag", "etag", "e_tag"):
        value = info.get(name)
        if value:
            return str(value).strip('"')
    stamp = info.get("mtime") or info.get("created") or 0
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    etag = local_etags(np.array([info.get("size") or 0]), np.array([float(stamp)]), np.array([info.get("ino") or 0]))
    return etag[0].decode()


def _mtime(info: Mapping[str, Any]) -> datetime:
    stamp = info.get("LastModified") or info.get("last_modified") or info.get("mtime") or info.get("created")
    if isinstance(stamp, datetime):
        return stamp if stamp.tzinfo else stamp.replace(tzinfo=UTC)
    if isinstance(stamp, str):
        return pd.Timestamp(stamp).tz_convert("UTC").to_pydatetime()
    return datetime.fromtimestamp(float(stamp or 0), tz=UTC)


def category_of(key: str) -> str:
    """The class label of a key: its first path component (``good`` for ``good/2023-01/x.bmp``)."""
    head, sep, _ = key.partition("/")
    return head if sep else ""


def listing_table(
    uri_prefix: str, keys: pa.Array, sizes: np.ndarray, etags: pa.Array, mtimes: pa.Array
) -> tuple[pd.DataFrame, dict[str, int]]:
    """Build the listing frame from its columns (pure): keep image objects in class folders, count the rest.

    Args:
        uri_prefix: the source root's (percent-encoded) URI with a trailing ``/``; an object's URI is it
            followed by its key, percent-encoded (RFC 3986).
        keys, sizes, etags, mtimes: one entry per object (mtimes as ``timestamp[us, UTC]``).
    """
    image = pc.match_substring_regex(keys, _IMAGE_NAME, ignore_case=True)
    foldered = pc.match_substring(keys, "/")
    others = [
        posixpath.splitext(key)[1].lower() or "(no extension)" for key in pc.filter(keys, pc.invert(image)).to_pylist()
    ]
    skipped = dict(Counter(others))
    if outside := int(pc.sum(pc.and_(image, pc.invert(foldered))).as_py() or 0):
        skipped[NO_CLASS_FOLDER] = outside
    keep = pc.and_(image, foldered)
    columns = {m.KEY: keys, m.SIZE: pa.array(sizes, pa.int64()), m.ETAG: etags, m.MTIME: mtimes}
    columns = {name: pc.filter(column, keep) for name, column in columns.items()}
    keys = columns[m.KEY]
    if len(keys) > 1 and not pc.all(pc.less(keys[:-1], keys[1:])).as_py():
        order = pc.sort_indices(keys)
        columns = {name: pc.take(column, order) for name, column in columns.items()}
        keys = columns[m.KEY]
    table = pa.table(
        {
            m.PATH: pc.binary_join_element_wise(uri_prefix, encode_keys(keys), ""),
            m.KEY: keys,
            m.FOLDER: pc.list_element(pc.split_pattern(keys, "/", max_splits=1, reverse=True), 0),
            m.CATEGORY: pc.list_element(pc.split_pattern(keys, "/", max_splits=1), 0),
            m.SIZE: columns[m.SIZE],
            m.ETAG: columns[m.ETAG],
            m.MTIME: columns[m.MTIME],
        }
    )
    return table.to_pandas(), skipped


def list_source(fs: fsspec.AbstractFileSystem, root: str, source_uri: str) -> Listing:
    """List every image object under ``root``.

    Raises:
        SourceError: the source does not exist, or holds no image in a class folder.
    """
    prefix = source_uri.rstrip("/") + "/"
    with naming("list", source_uri):
        if not fs.exists(root):
            raise SourceError(f"source {source_uri} does not exist: check the path, bucket and credentials")
        if isinstance(fs, LocalFileSystem):
            keys, sizes, stamps, inodes = walk(root)
            etags = pa.array(local_etags(np.array(sizes), np.array(stamps), np.array(inodes))).cast(pa.string())
            micros = np.round(np.array(stamps, dtype=np.float64) * 1e6).astype(np.int64)
            mtimes = pa.array(micros, pa.timestamp("us", tz="UTC"))
        else:
            entries = fs.find(root, detail=True, withdirs=False)
            start = root.rstrip("/") + "/"
            infos = [(name, info) for name, info in entries.items() if info.get("type", "file") == "file"]
            infos = [(name[len(start) :], info) for name, info in infos if name.startswith(start)]
            keys = [name for name, _ in infos]
            sizes = [int(info.get("size") or 0) for _, info in infos]
            etags = pa.array([etag_of(info) for _, info in infos], pa.string())
            mtimes = pa.array([_mtime(info) for _, info in infos], pa.timestamp("us", tz="UTC"))
    encoded = object_uri(fs, root).rstrip("/") + "/"
    objects, skipped = listing_table(encoded, pa.array(keys, pa.string()), np.array(sizes, np.int64), etags, mtimes)
    if objects.empty:
        shown = ", ".join(f"{n} {ext}" for ext, n in sorted(skipped.items())) or "nothing"
        raise SourceError(
            f"no images found under {source_uri} (skipped: {shown}). strata expects one folder per class, "
            f"e.g. {prefix}good/12_1543412160501.bmp, with extensions {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return Listing(objects=objects, skipped=skipped)


@stage("list")
def list_task(fs: fsspec.AbstractFileSystem, root: str, source_uri: str) -> Listing:
    """List the source (Prefect task: retries transient storage errors)."""
    listing = list_source(fs, root, source_uri)
    skipped = sum(listing.skipped.values())
    get_run_logger().info(
        "list: %d image objects under %s (%d other files skipped)", len(listing.objects), source_uri, skipped
    )
    return listing
