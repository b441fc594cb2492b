"""Stage 1, list: every object under the source with key, size, etag and mtime.

Image extensions are matched case-insensitively; everything else is skipped and counted.
"""

from __future__ import annotations

import hashlib
import posixpath
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Mapping

import fsspec
import pandas as pd
from prefect import get_run_logger

from loader import manifest as m
from strata.errors import SourceError
from strata.storage import naming, object_uris
from tasks.policy import stage

IMAGE_EXTENSIONS = frozenset({".bmp", ".png", ".jpg", ".jpeg", ".jpe", ".gif", ".tif", ".tiff", ".webp"})
LISTING_COLUMNS = (m.PATH, m.KEY, m.FOLDER, m.CATEGORY, m.SIZE, m.ETAG, m.MTIME)


@dataclass(frozen=True)
class Listing:
    """The image objects under a source, and what was skipped."""

    objects: pd.DataFrame  # LISTING_COLUMNS, sorted by key
    skipped: Mapping[str, int] = field(default_factory=dict)  # extension -> count of non-image files


def etag_of(info: Mapping[str, Any]) -> str:
    """The storage etag as listed; local files get a stand-in from size and mtime (never a plain MD5)."""
    for name in ("ETag", "etag", "e_tag"):
        value = info.get(name)
        if value:
            return str(value).strip('"')
    stamp = info.get("mtime") or info.get("created") or 0
    if isinstance(stamp, datetime):
        stamp = stamp.timestamp()
    token = f"{info.get('size', 0)}:{float(stamp):.6f}:{info.get('ino', '')}"
    return "local-" + hashlib.blake2b(token.encode(), digest_size=8).hexdigest()


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


def listing_frame(fs: fsspec.AbstractFileSystem, root: str, entries: Mapping[str, Mapping[str, Any]]) -> Listing:
    """Turn ``fs.find(root, detail=True)`` output into the listing frame (pure: no I/O).

    Columns: path, key, folder, category, size, etag, mtime. Objects at the top level of the source (no
    class folder) are skipped and counted as ``(no class folder)``.
    """
    prefix = root.rstrip("/") + "/"
    rows = []
    skipped: Counter[str] = Counter()
    for name, info in entries.items():
        if info.get("type", "file") != "file" or not name.startswith(prefix):
            continue
        key = name[len(prefix) :]
        ext = posixpath.splitext(key)[1].lower()
        if ext not in IMAGE_EXTENSIONS:
            skipped[ext or "(no extension)"] += 1
            continue
        category = category_of(key)
        if not category:
            skipped["(no class folder)"] += 1
            continue
        rows.append(
            (
                key,
                posixpath.dirname(key),
                category,
                int(info.get("size") or 0),
                etag_of(info),
                _mtime(info),
            )
        )
    frame = pd.DataFrame(rows, columns=list(LISTING_COLUMNS[1:]))
    frame.insert(0, m.PATH, pd.Series(object_uris(fs, root, frame[m.KEY]), dtype=frame[m.KEY].dtype))
    frame[m.SIZE] = frame[m.SIZE].astype("int64")
    frame[m.MTIME] = pd.to_datetime(frame[m.MTIME], utc=True).astype("datetime64[us, UTC]")
    frame = frame.sort_values(m.KEY, kind="stable", ignore_index=True)
    return Listing(objects=frame, skipped=dict(skipped))


def list_source(fs: fsspec.AbstractFileSystem, root: str, source_uri: str) -> Listing:
    """List every image object under ``root``.

    Raises:
        SourceError: the source does not exist, or holds no image in a class folder.
    """
    with naming("list", source_uri):
        if not fs.exists(root):
            raise SourceError(f"source {source_uri} does not exist: check the path, bucket and credentials")
        entries = fs.find(root, detail=True, withdirs=False)
    listing = listing_frame(fs, root, entries)
    if listing.objects.empty:
        skipped = ", ".join(f"{n} {ext}" for ext, n in sorted(listing.skipped.items())) or "nothing"
        raise SourceError(
            f"no images found under {source_uri} (skipped: {skipped}). strata expects one folder per class, "
            f"e.g. {source_uri.rstrip('/')}/good/12_1543412160501.bmp, with extensions "
            f"{', '.join(sorted(IMAGE_EXTENSIONS))}"
        )
    return listing


@stage("list")
def list_task(fs: fsspec.AbstractFileSystem, root: str, source_uri: str) -> Listing:
    """List the source (Prefect task: retries transient storage errors)."""
    listing = list_source(fs, root, source_uri)
    skipped = sum(listing.skipped.values())
    get_run_logger().info(
        "list: %d image objects under %s (%d other files skipped)", len(listing.objects), source_uri, skipped
    )
    return listing
