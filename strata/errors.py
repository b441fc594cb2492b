"""strata's own exception types: one small module, imported by every layer."""

from __future__ import annotations

__all__ = [
    "StrataError",
    "ConfigError",
    "SourceError",
    "ManifestError",
    "IntegrityError",
    "StorageError",
    "UnsafeStore",
    "CommitConflict",
    "ValidationFailed",
    "NeedsReview",
    "ImageError",
]


class StrataError(Exception):
    """Base class for every error strata raises on purpose."""


class ConfigError(StrataError, ValueError):
    """An argument or option is malformed; the message names it and the accepted form."""


class SourceError(StrataError):
    """The image source is missing, empty or unreachable."""


class ManifestError(StrataError):
    """A manifest root, dataset or version is missing or unusable."""


class IntegrityError(ManifestError):
    """A committed version does not match its recorded checksum, or is half-written."""


class StorageError(StrataError):
    """A storage request kept failing (after retries, when transient) or was refused; names stage and object."""


class UnsafeStore(StorageError):
    """The manifest store does not honour exclusive create, and no documented alternative was opted into."""


class CommitConflict(StrataError):
    """Another run committed (or is committing) the version this run planned to write."""


class ValidationFailed(StrataError):
    """The candidate manifest failed its checks; nothing was published. ``summary``: the run's, when known."""

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class NeedsReview(StrataError):
    """The run held images or links back for a person (published or not: see ``summary``)."""

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary


class ImageError(StrataError):
    """An image a manifest lists is missing, changed or unreadable when a pipeline reads it."""
