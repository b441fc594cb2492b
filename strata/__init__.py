"""strata: versioned, validated training manifests from buckets of labelled images.

The curation flow lives in ``flows``, its stages in ``tasks``, the training-side reader in ``loader``.
This package holds what they share (errors, storage helpers) and the ``strata`` command line.
"""

from strata.errors import (
    CommitConflict,
    ConfigError,
    ImageError,
    IntegrityError,
    ManifestError,
    SourceError,
    StrataError,
    ValidationFailed,
)

__all__ = [
    "CommitConflict",
    "ConfigError",
    "ImageError",
    "IntegrityError",
    "ManifestError",
    "SourceError",
    "StrataError",
    "ValidationFailed",
]
