"""Read strata manifests for training.

``read_manifest`` and ``class_names`` need only pandas and pyarrow; importing this package loads neither
TensorFlow nor Prefect nor Great Expectations.
"""

from __future__ import annotations

from loader.manifest import read_manifest

__all__ = ["read_manifest", "class_names"]


def class_names(uri: str, version: int | str | None = "latest", storage_options: dict | None = None) -> list[str]:
    """Sorted category names of a whole version (all purposes): the label order of every split."""
    from loader.manifest import CATEGORY

    frame = read_manifest(uri, version, storage_options)
    return sorted(frame[CATEGORY].unique().tolist())
