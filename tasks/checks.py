"""Stage 0, check: what a run can know is wrong before it lists or reads anything, it says first.

Options are checked where they enter (``strata.config``); here the places: the dataset name, the source
(exists, is a folder), the manifest root (not a file, and, through the commit guard's probe, writable and
honouring exclusive create). After the diff, a ``--uniqueness`` pattern that matches none of some new keys
stops the run before inspect reads them, unless ``allow_unmatched`` says those keys are their own items.
"""

from __future__ import annotations

from dataclasses import dataclass

import fsspec
import pandas as pd
from prefect import get_run_logger

from loader import manifest as m
from strata.config import CurateOptions, check_dataset_name
from strata.errors import ConfigError, SourceError
from strata.storage import naming, open_url
from tasks.policy import stage
from tasks.publish import Store
from tasks.split import unique_ids


@dataclass(frozen=True)
class Places:
    """Where a run reads and writes."""

    dataset: str
    source_fs: fsspec.AbstractFileSystem
    source_root: str
    source_uri: str
    store: Store


def places(source: str, dataset: str, manifest_root: str, options: CurateOptions) -> Places:
    """Open the source and the dataset's folder under the manifest root, and check what can be checked
    without writing: the name, that the source is a folder, that the root is not a file.

    Raises:
        ConfigError: the dataset name or the manifest root is unusable; SourceError: the source is missing.
    """
    check_dataset_name(dataset)
    source_fs, source_root = open_url(source, options.storage_options)
    store_fs, root_path = open_url(manifest_root, options.storage_options)
    source_uri = source_fs.unstrip_protocol(source_root)
    root_uri = store_fs.unstrip_protocol(root_path)
    with naming("check", source_uri):
        if not source_fs.isdir(source_root):
            exists = source_fs.exists(source_root)
            raise SourceError(
                f"source {source_uri} {'is a file, not a folder' if exists else 'does not exist'}: give the folder "
                "or bucket prefix that holds one sub-folder per class, and check the path, bucket and credentials"
            )
    with naming("check", root_uri):
        if store_fs.isfile(root_path):
            raise ConfigError(f"manifest root {root_uri} is a file: give a folder or bucket prefix for the manifests")
    return Places(dataset, source_fs, source_root, source_uri, Store(store_fs, f"{root_path.rstrip('/')}/{dataset}"))


@stage("check")
def check_task(source: str, dataset: str, manifest_root: str, options: CurateOptions) -> Places:
    """Check the run's places before any work (Prefect task: retries transient storage errors)."""
    found = places(source, dataset, manifest_root, options)
    get_run_logger().info("check: source %s, dataset %s", found.source_uri, found.store.uri)
    return found


def unmatched_keys(keys: pd.DataFrame, uniqueness: str | None) -> pd.Series:
    """The keys a ``--uniqueness`` regular expression finds no item id in (none for md5 or column names)."""
    if not uniqueness or uniqueness == m.MD5 or all(p.strip() in m.COLUMNS for p in uniqueness.split(",")):
        return keys[m.KEY].iloc[0:0]
    ids, _ = unique_ids(keys.assign(**{m.MD5: ""}), uniqueness)
    return keys[m.KEY][(ids == "").to_numpy()]


@stage("check", storage=False)
def uniqueness_task(to_inspect: pd.DataFrame, options: CurateOptions) -> None:
    """Stop before inspect when the uniqueness pattern finds no item id in new keys (unless allowed)."""
    missing = unmatched_keys(to_inspect, options.uniqueness)
    if missing.empty:
        return
    shown = ", ".join(missing.head(3))
    if options.allow_unmatched:
        get_run_logger().warning(
            "uniqueness: %d new keys do not match %r and count as their own item (md5), e.g. %s",
            len(missing),
            options.uniqueness,
            shown,
        )
        return
    raise ConfigError(
        f"--uniqueness {options.uniqueness!r} finds no item id in {len(missing)} of {len(to_inspect)} new keys, "
        f"e.g. {shown}. Fix the pattern (its first group is the item id; re.search over the key), or pass "
        "--allow-unmatched to count those keys as their own items"
    )
