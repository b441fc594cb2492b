"""The schema of ``manifest.json``, a version's commit record, and the check every reader applies to it.

A committed version is only as trustworthy as its record: the loader, curation and ``strata show`` all
parse it here, so a record that is not an object, lacks a field, holds a field of the wrong type, or names
another version than its directory's is refused with the same error, naming the file.
"""

from __future__ import annotations

import json
import re
from typing import Any, Callable, Mapping

from strata.errors import IntegrityError, ManifestError

# How a person gets a damaged version out of the way; docs/storage.md says it step by step.
RECOVERY = (
    "restore the version's files from a backup (or the bucket's object versions); if they cannot be restored, "
    "move the version's directory under the dataset's _damaged/ folder, and the next run publishes a new "
    "version on the last intact one (docs/storage.md, 'A damaged version')"
)

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: value is None or check(value)


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(_int(n) and n >= 0 for n in value.values())


def _sha256(value: Any) -> bool:
    return isinstance(value, str) and bool(_HEX64.match(value))


# Field -> (check, what it must be). Every version since the first carries these.
REQUIRED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "schema_version": (_int, "an integer"),
    "dataset": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "version": (lambda v: _int(v) and v >= 1, "a positive integer"),
    "parent_version": (_optional(lambda v: _int(v) and v >= 1), "null or a positive integer"),
    "created_at": (lambda v: isinstance(v, str), "an ISO timestamp string"),
    "source": (lambda v: isinstance(v, str), "a string"),
    "parameters": (lambda v: isinstance(v, dict), "an object"),
    "rows": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "counts": (
        lambda v: isinstance(v, dict) and all(isinstance(c, dict) and _counts(c) for c in v.values()),
        "an object of purpose -> {category: count}",
    ),
    "rejects": (_counts, "an object of reason -> count"),
    "diff": (_counts, "an object of change -> count"),
    "sha256": (_sha256, "64 lowercase hex digits"),
    "rejects_sha256": (_sha256, "64 lowercase hex digits"),
    "validation": (lambda v: isinstance(v, dict), "an object"),
    "flow_run_id": (_optional(lambda v: isinstance(v, str)), "null or a string"),
}
# Fields later versions added; a record without them was written before they existed.
OPTIONAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "assignments_sha256": (_sha256, "64 lowercase hex digits"),
    "assignments_rows": (lambda v: _int(v) and v >= 0, "a non-negative integer"),
    "path_encoding": (lambda v: isinstance(v, str), "a string"),
    "commit_guard": (lambda v: isinstance(v, str), "a string"),
}


def parse_record(data: bytes, where: str, number: int, schema_version: int) -> dict[str, Any]:
    """Parse and check the ``manifest.json`` of version ``number``.

    Args:
        data: the file's bytes.
        where: the file's URI, for errors.
        number: the version its directory names.
        schema_version: the manifest schema version this strata reads.

    Raises:
        IntegrityError: not JSON, not an object, a field missing or of the wrong type, or another version.
        ManifestError: a schema version this strata does not read.
    """
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{where} is not valid JSON; the version is damaged: {RECOVERY}") from err
    if not isinstance(record, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(record), "a number")
        raise IntegrityError(
            f"{where} holds {kind}, not the object a commit record is; the version is damaged: {RECOVERY}"
        )
    found = record.get("schema_version")
    if found != schema_version:
        raise ManifestError(
            f"{where} has schema_version {found!r}; this strata reads version {schema_version}: "
            "upgrade strata or re-curate the dataset"
        )
    problems = [f"'{name}' is missing" for name in REQUIRED if name not in record]
    for name, (check, expected) in {**REQUIRED, **OPTIONAL}.items():
        if name in record and not check(record[name]):
            problems.append(f"'{name}' is {json.dumps(record[name])[:60]}, not {expected}")
    if problems:
        raise IntegrityError(f"{where} is not a valid commit record ({'; '.join(problems)}): {RECOVERY}")
    if record["version"] != number:
        raise IntegrityError(
            f"{where} records version {record['version']}, but its directory is version {number}: the file was "
            f"copied or moved from another version; {RECOVERY}"
        )
    return record


def nested_counts(pairs: Mapping[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    """``{(purpose, category): n}`` as the record writes it: ``{purpose: {category: n}}``, keys sorted."""
    counts: dict[str, dict[str, int]] = {}
    for (purpose, category), count in sorted(pairs.items()):
        counts.setdefault(purpose, {})[category] = int(count)
    return counts
