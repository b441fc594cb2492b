"""fsspec helpers shared by the flow and the loader: open a URL, name an object, classify errors.

Everything here is protocol-agnostic: local paths, ``file://``, ``s3://`` and ``memory://`` behave alike.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Mapping
from urllib.parse import quote, unquote

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
from fsspec.core import url_to_fs

from strata.errors import StorageError, StrataError

__all__ = [
    "encode_keys",
    "open_url",
    "object_uri",
    "object_uris",
    "encode_uri",
    "decode_uri",
    "decode_uris",
    "uri_path",
    "is_transient",
    "naming",
    "SECRET_OPTION_KEYS",
]

# Storage options that carry credentials: never accepted as flow parameters, never logged.
SECRET_OPTION_KEYS = frozenset(
    {"key", "secret", "token", "password", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
)


def open_url(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(filesystem, path)`` for a URL or local path.

    Storage options (endpoint, region, credentials) apply to remote protocols only; local paths and
    ``memory://`` ignore them, so one option set serves a run whose source is S3 and root is local.
    Remote listings are never cached: every run must see the bucket as it is now.
    """
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    options: dict[str, Any] = {}
    if protocol not in ("file", "local", "memory"):
        # A cached listing would hide objects added since the last run in a long-lived process.
        options = {"use_listings_cache": False, **(storage_options or {})}
    fs, path = url_to_fs(url, **options)
    return fs, path.rstrip("/") if path not in ("/", "") else path


# A key keeps RFC 3986's unreserved characters and "/" (its segment separator) in a URI; every other
# character, reserved ones ("#", "?", "%", ...), spaces and non-ASCII, is percent-encoded as UTF-8, so that a
# URI parser resolves the object the key names (fsspec itself neither encodes nor decodes).
_UNSAFE = r"[^A-Za-z0-9._~/-]"


def encode_uri(uri: str) -> str:
    """Percent-encode everything after ``scheme://`` but unreserved characters and ``/``."""
    scheme, sep, rest = uri.partition("://")
    return f"{scheme}{sep}{quote(rest, safe='/')}" if sep else quote(uri, safe="/")


def decode_uri(uri: str) -> str:
    """The fsspec URL of an encoded URI (percent-escapes decoded)."""
    return unquote(uri, errors="strict") if "%" in uri else uri


def object_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full, percent-encoded URI of an object: ``s3://bucket/key``, ``file:///abs/path``, ``memory:///path``."""
    return encode_uri(fs.unstrip_protocol(path))


def _quote_some(values: pa.Array, pattern: str, convert: Any) -> pa.Array:
    """Apply ``convert`` to the values that match ``pattern`` only: most keys need no change, and finding
    the few that do in Arrow keeps a million keys out of Python."""
    hits = pc.match_substring_regex(values, pattern)
    if not pc.any(hits).as_py():
        return values
    changed = [convert(v) for v in pc.filter(values, hits).to_pylist()]
    return pc.replace_with_mask(values, hits, pa.array(changed, type=pa.string()))


def encode_keys(keys: Iterable[str]) -> pa.Array:
    """Keys percent-encoded as URI paths (everything but unreserved characters and ``/``), vectorized."""
    return _quote_some(pa.array(keys, type=pa.string()), _UNSAFE, lambda key: quote(key, safe="/"))


def object_uris(fs: fsspec.AbstractFileSystem, root: str, keys: Iterable[str]) -> pa.Array:
    """The percent-encoded URIs of ``root/key`` for many keys: equal to ``object_uri`` of each, vectorized."""
    prefix = object_uri(fs, root)
    prefix = prefix if prefix.endswith("/") else prefix + "/"
    return pc.binary_join_element_wise(prefix, encode_keys(keys), "")


def decode_uris(uris: Iterable[str]) -> list[str]:
    """The fsspec URLs of many encoded URIs (``decode_uri`` of each, vectorized)."""
    return _quote_some(pa.array(uris, type=pa.string()), "%", decode_uri).to_pylist()


def uri_path(fs: fsspec.AbstractFileSystem, uri: str) -> str:
    """The filesystem path of an encoded object URI (the inverse of ``object_uri``)."""
    return fs._strip_protocol(decode_uri(uri))


def _status_code(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    if isinstance(response, Mapping):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is not None:
            return int(status)
    return None


def is_transient(err: BaseException) -> bool:
    """Whether a storage error is worth retrying: throttling, 5xx, resets and time-outs; never 403/404.

    Walks the exception chain, since fsspec and s3fs wrap botocore errors in ``OSError``.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
            return False
        status = _status_code(current)
        if status is not None:
            return status == 429 or status >= 500
        if isinstance(current, (ConnectionError, TimeoutError)):
            return True
        if isinstance(current, OSError) and current.errno in (
            errno.EIO,
            errno.ECONNRESET,
            errno.ETIMEDOUT,
            errno.EAGAIN,
            errno.EBUSY,
        ):
            return True
        name = type(current).__name__
        if name in (
            "ClientOSError",
            "ServerDisconnectedError",
            "ServerTimeoutError",
            "EndpointConnectionError",
            "ConnectTimeoutError",
            "ReadTimeoutError",
            "ConnectionClosedError",
            "ResponseStreamingError",
        ):
            return True
        text = str(current)
        if any(
            word in text
            for word in ("SlowDown", "Throttl", "RequestTimeout", "InternalError", "ServiceUnavailable", "503", "500 ")
        ):
            return True
        current = current.__cause__ or current.__context__
    return False


@contextmanager
def naming(stage: str, uri: str | None = None) -> Iterator[None]:
    """Re-raise a storage failure as ``StorageError`` naming the stage and the object (or prefix).

    ``FileNotFoundError`` and ``FileExistsError`` pass unchanged (callers decide what they mean), as do
    strata's own errors; so do errors that are not storage errors (bugs keep their type). The cause stays
    chained, so ``is_transient`` still sees what happened and task retries still apply.
    """
    try:
        yield
    except (FileNotFoundError, FileExistsError, StrataError):
        raise
    except Exception as err:
        transient = is_transient(err)
        if not (transient or isinstance(err, OSError)):
            raise
        where = f"{stage}: {uri}" if uri else stage
        fix = (
            "the store kept failing after retries; re-run when it recovers"
            if transient
            else "check the credentials, the bucket policy and the path"
        )
        raise StorageError(f"{where}: {type(err).__name__}: {err} ({fix})") from err
