"""Read strata manifests for training: ``from_manifest`` turns a committed version into a ``tf.data`` pipeline.

``read_manifest`` and ``class_names`` need only pandas and pyarrow. ``from_manifest`` and ``Augment`` load
TensorFlow on first use, so importing this package (as the curation tasks do) never does; neither path
imports Prefect or Great Expectations.
"""

from __future__ import annotations

from typing import Any, Mapping

from loader.manifest import CATEGORY, read_manifest

__all__ = ["from_manifest", "read_manifest", "class_names", "Augment"]

_LAZY = {"from_manifest": "loader.pipeline", "Augment": "loader.augment"}


def class_names(
    uri: str, version: int | str | None = "latest", storage_options: Mapping[str, Any] | None = None
) -> list[str]:
    """Sorted category names of a whole version (all purposes): the label order of every split."""
    frame = read_manifest(uri, version, storage_options)
    return sorted(frame[CATEGORY].unique().tolist())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ModuleNotFoundError as err:
            if err.name != "tensorflow":
                raise
            raise ImportError(
                f"loader.{name} needs TensorFlow (2.16 to 2.21), which strata never installs over a worker's "
                "own: install tensorflow (or tensorflow-cpu), or strata's tf extra (pip install -e '.[tf]')"
            ) from err
        return getattr(module, name)
    raise AttributeError(f"module 'loader' has no attribute {name!r}")
