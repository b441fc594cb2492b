"""Typed, checked configuration of a curation run (Prefect validates it as a flow parameter)."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from strata.errors import ConfigError
from strata.storage import SECRET_OPTION_KEYS

DEFAULT_MANIFEST_ROOT = "manifests"
STRATIFY_COLUMNS = ("category", "folder", "format", "channels")
# A dataset name is a folder under the manifest root and part of Prefect artifact keys (lowercase letters,
# digits, dashes): one spelling that is valid as both.
DATASET_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62}[a-z0-9])?$")


def check_dataset_name(name: str) -> str:
    """Raise ConfigError unless ``name`` is 1-64 lowercase letters, digits and dashes, not at either end."""
    if not isinstance(name, str) or not DATASET_NAME.match(name):
        raise ConfigError(
            f"dataset name {name!r}: use 1-64 lowercase letters, digits and dashes (not first or last), "
            "e.g. 'vials' or 'caps-line-2'"
        )
    return name


# What makes a commit exclusive (docs/storage.md): the store's conditional writes (proved by a probe every
# run), or, for a store without them and only by explicit opt-in, the dataset's Prefect concurrency limit.
EXCLUSIVE_CREATE = "exclusive-create"
CONCURRENCY_LIMIT = "concurrency-limit"


class CurateOptions(BaseModel):
    """Options of ``curate_dataset``; the fields that decide content are recorded in ``manifest.json``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    split: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "devel": 0.2},
        description="target fraction per purpose (train, devel, test), summing to 1",
    )
    seed: int = Field(0, description="seed of the split: same inputs and seed give the same manifest")
    stratify: list[str] = Field(
        default_factory=lambda: ["category"],
        description=f"columns whose combinations are the strata: {', '.join(STRATIFY_COLUMNS)}",
    )
    uniqueness: str | None = Field(None, description="item id: regex on the key (first group), column names, or md5")
    allow_unmatched: bool = Field(
        False, description="new keys the uniqueness regex finds no item id in count as their own item (md5)"
    )
    near_duplicates: int = Field(4, ge=-1, le=32, description="phash Hamming threshold; -1 turns near duplicates off")
    fraction_tolerance: float = Field(
        0.05, ge=0, le=1, description="largest accepted |train fraction - target| of a stratum (validation)"
    )
    min_stratum: int = Field(20, ge=1, description="strata with fewer samples are exempt from the fraction check")
    max_group_share: float = Field(
        0.05,
        ge=0,
        le=1,
        description="a split unit joining more than max_group_items items by near duplicates holds the run for "
        "review when it holds more than this share of its stratum (look-alike photos chaining together)",
    )
    max_group_items: int = Field(10, ge=1, description="see max_group_share")
    max_pixels: int = Field(100_000_000, gt=0, description="larger images are rejected as too_large")
    chunk_size: int = Field(
        256,
        gt=0,
        le=100_000,
        description="objects per inspect task at most (fewer in small runs, more past 1,000 tasks)",
    )
    dask: str | None = Field(
        None,
        description="Dask scheduler address (tcp://host:8786) for the inspect stage, or 'local' for a LocalCluster",
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options without credentials (endpoint_url, region)"
    )
    commit_guard: Literal["exclusive-create", "concurrency-limit"] = Field(
        EXCLUSIVE_CREATE,
        description="concurrency-limit: publish to a store without conditional writes, serialized by the "
        "dataset's Prefect global concurrency limit (which must exist); recorded in manifest.json",
    )

    @field_validator("split")
    @classmethod
    def _fractions(cls, value: dict[str, float]) -> dict[str, float]:
        from tasks.split import check_fractions

        check_fractions(value)
        return value

    @field_validator("uniqueness")
    @classmethod
    def _uniqueness(cls, value: str | None) -> str | None:
        from loader.manifest import COLUMNS, MD5

        if not value or value == MD5 or all(part.strip() in COLUMNS for part in value.split(",")):
            return value
        try:
            pattern = re.compile(value)
        except re.error as err:
            raise ConfigError(
                f"--uniqueness {value!r} is neither manifest column names nor a valid regular expression: {err}"
            ) from err
        if pattern.groups < 1:
            raise ConfigError(f"--uniqueness regex {value!r} needs a capture group for the item id, e.g. '(\\d+)_'")
        return value

    @field_validator("stratify")
    @classmethod
    def _stratify(cls, value: list[str]) -> list[str]:
        unknown = [c for c in value if c not in STRATIFY_COLUMNS]
        if unknown:
            raise ConfigError(f"cannot stratify by {unknown}: choose from {', '.join(STRATIFY_COLUMNS)}")
        return value

    @field_validator("storage_options")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        secret = sorted(k for k in value if k.lower() in SECRET_OPTION_KEYS)
        if secret:
            raise ConfigError(
                f"storage options {secret} carry credentials and would be stored with the run; set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or a profile) in the environment instead"
            )
        return value

    def recorded(self) -> dict[str, Any]:
        """The parameters written into ``manifest.json`` (what decides the content)."""
        return self.model_dump(exclude={"chunk_size", "dask", "storage_options", "allow_unmatched", "commit_guard"})
