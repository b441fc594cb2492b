"""Stage 6, validate: a Great Expectations suite (GX Core 1.x, ephemeral context) over the candidate manifest.

Five tables are validated, each with its own suite:

* ``manifest``: the candidate itself (schema, value sets, formats, row count);
* ``spread``: one row per md5, unique_id and duplicate_group value held by more than one row (a value held
  by one row cannot span two purposes), with the number of purposes it spans;
* ``history``: one row per content an earlier version assigned, with its purpose then and now: purposes
  never move;
* ``units``: one row per split unit that joins several items (through duplicate groups), with its share of
  its stratum: look-alike photos chaining a class together hold the run for a person;
* ``strata``: each stratum's train fraction against its target.

Checks GX has no built-in for are custom expectations: built-ins subclassed with a fixed column and bound,
named for what they mean. A failed suite means no publish.
"""

from __future__ import annotations

import functools
import importlib
import os
import threading
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import get_run_logger

from loader import manifest as m
from tasks.policy import stage
from tasks.validation_tables import SPREAD, history_table, spread_table, strata_table, units_table

if TYPE_CHECKING:
    from strata.config import CurateOptions
    from tasks.diff import Parent
    from tasks.publish import Candidate

DEFAULT_TOLERANCE = 0.05  # the CurateOptions defaults; validate_manifest's own for direct callers
DEFAULT_MIN_STRATUM = 20
DEFAULT_GROUP_SHARE = 0.05
DEFAULT_GROUP_ITEMS = 10
_INDEX_COLUMNS = {
    "manifest": [m.KEY],
    "spread": ["value"],
    "history": [],  # row numbers, named by key afterwards: hashing a million keys costs GX more than the check
    "units": ["unit", "stratum"],
    "strata": ["stratum"],
}


def _gx_type(arrow_type: pa.DataType) -> str:
    """The type name GX observes for a pandas column converted from this Arrow type."""
    if pa.types.is_string(arrow_type):
        return "str"
    if pa.types.is_timestamp(arrow_type):
        return "Timestamp"
    return str(arrow_type.to_pandas_dtype().__name__)


@functools.cache
def import_in_background() -> threading.Thread:
    """Start importing Great Expectations in a thread (seconds of CPU), once a process, so that it overlaps
    waits (the CLI starts it while the API server boots, the flow before the listing); ``validate_manifest``
    imports it as usual and waits for the thread if needed."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    thread = threading.Thread(target=importlib.import_module, args=("great_expectations",), daemon=True)
    thread.start()
    return thread


def _without_fingerprints() -> None:
    """Stop GX hashing every DataFrame under 1 GB it makes a batch of: the hash (``pandas_data_fingerprint``) is
    only a marker in the batch's metadata, which strata never reads, and at a million rows it cost 2.7 s, half
    of the validation. GX reads the bound (``HASH_THRESHOLD``) at every batch; where a GX version lacks it,
    nothing changes."""
    from great_expectations.execution_engine import pandas_execution_engine as engine

    if hasattr(engine, "HASH_THRESHOLD"):
        engine.HASH_THRESHOLD = 0


@functools.cache
def _custom_expectations() -> dict[str, type]:
    """Expectations GX has no built-in for: built-ins subclassed with a fixed column and bound.

    Defined once per process (GX registers expectation classes globally by name).
    """
    import great_expectations as gx

    E = gx.expectations

    class ExpectNoMd5InTwoPurposes(E.ExpectColumnValuesToBeBetween):
        """No content (md5) appears in two purposes."""

        column: str = f"{m.MD5}_{SPREAD}"
        max_value: int = 1

    class ExpectNoItemInTwoPurposes(E.ExpectColumnValuesToBeBetween):
        """No item (unique_id) appears in two purposes."""

        column: str = f"{m.UNIQUE_ID}_{SPREAD}"
        max_value: int = 1

    class ExpectNoDuplicateGroupInTwoPurposes(E.ExpectColumnValuesToBeBetween):
        """No duplicate group appears in two purposes."""

        column: str = f"{m.DUPLICATE_GROUP}_{SPREAD}"
        max_value: int = 1

    class ExpectNoContentToChangePurpose(E.ExpectColumnPairValuesToBeEqual):
        """Content an earlier version assigned keeps its purpose, under any key."""

        column_A: str = "purpose_before"
        column_B: str = "purpose_after"

    class ExpectNoLookAlikeUnit(E.ExpectColumnValuesToBeBetween):
        """No split unit joins many distinct items into a large share of its stratum (look-alike photos
        chained by near duplicates): such a run waits for a person."""

        column: str = "items"
        condition_parser: str = "pandas"

    class ExpectStratumTrainFractionNearTarget(E.ExpectColumnValuesToBeBetween):
        """Every stratum large enough to judge is within tolerance of its train target, or of the closest the
        split could come to it without moving an earlier purpose."""

        column: str = "excess"

    return {
        "md5": ExpectNoMd5InTwoPurposes,
        "item": ExpectNoItemInTwoPurposes,
        "group": ExpectNoDuplicateGroupInTwoPurposes,
        "history": ExpectNoContentToChangePurpose,
        "look_alike": ExpectNoLookAlikeUnit,
        "near_target": ExpectStratumTrainFractionNearTarget,
    }


def _suites(
    gx: Any,
    purposes: Sequence[str],
    expected_rows: int | None,
    tolerance: float,
    group_share: float,
    group_items: int,
) -> dict[str, Any]:
    """The expectation suites, as code, by table."""
    E = gx.expectations
    custom = _custom_expectations()

    manifest = gx.ExpectationSuite(name="manifest-v1")
    manifest.add_expectation(E.ExpectTableColumnsToMatchOrderedList(column_list=list(m.COLUMNS)))
    for field in m.MANIFEST_SCHEMA:
        manifest.add_expectation(E.ExpectColumnValuesToBeOfType(column=field.name, type_=_gx_type(field.type)))
        if not field.nullable:
            manifest.add_expectation(E.ExpectColumnValuesToNotBeNull(column=field.name))
    manifest.add_expectation(E.ExpectColumnValuesToBeUnique(column=m.PATH))
    manifest.add_expectation(E.ExpectColumnValuesToBeUnique(column=m.KEY))
    manifest.add_expectation(E.ExpectColumnValuesToMatchRegex(column=m.MD5, regex=r"^[0-9a-f]{32}$"))
    manifest.add_expectation(E.ExpectColumnValuesToBeInSet(column=m.PURPOSE, value_set=list(purposes)))
    manifest.add_expectation(E.ExpectColumnValuesToBeInSet(column=m.FORMAT, value_set=list(m.FORMATS)))
    for column in (m.WIDTH, m.HEIGHT, m.SIZE, m.CHANNELS):
        # A column aggregate: GX checks int32 columns value by value in Python (only int64 and float64 are
        # vectorized), which at a million rows costs more than every other check together.
        manifest.add_expectation(E.ExpectColumnMinToBeBetween(column=column, min_value=1))
    if expected_rows is not None:
        manifest.add_expectation(E.ExpectTableRowCountToEqual(value=expected_rows))

    spread = gx.ExpectationSuite(name="purpose-spread")
    for name in ("md5", "item", "group"):
        spread.add_expectation(custom[name]())
    history = gx.ExpectationSuite(name="sticky-purposes")
    history.add_expectation(custom["history"]())
    units = gx.ExpectationSuite(name="look-alike-units")
    units.add_expectation(custom["look_alike"](max_value=group_items, row_condition=f"share > {group_share!r}"))
    strata = gx.ExpectationSuite(name="strata-fractions")
    strata.add_expectation(custom["near_target"](max_value=tolerance))
    return {"manifest": manifest, "spread": spread, "history": history, "units": units, "strata": strata}


def _examples(result: Any) -> list[Any]:
    info = result.result or {}
    examples = info.get("partial_unexpected_index_list") or info.get("partial_unexpected_list") or []
    if not examples and "observed_value" in info:
        examples = [{"observed_value": info["observed_value"]}]
    return [_plain(e) for e in examples[:5]]


def _describe(
    failure: Mapping[str, Any], frames: Mapping[str, pd.DataFrame], tolerance: float, share: float, items: int
) -> str:
    """A failed expectation in words, with the numbers that failed it, their target and tolerance."""
    name, column, count = failure["expectation"], failure["column"], failure["unexpected_count"]
    if name == "expect_stratum_train_fraction_near_target":
        strata = frames["strata"]
        off = strata[strata["excess"] > tolerance].head(3)
        named = ", ".join(
            f"{row.stratum} {row.train_fraction:.3f} ({row.rows} samples)" for row in off.itertuples(index=False)
        )
        target = float(strata["target"].iloc[0]) if len(strata) else 0.0
        return f"{name}: train fraction of stratum {named}; target {target:g} +- {tolerance:g}"
    if name == "expect_no_look_alike_unit":
        return f"{name}: {count} split unit(s) join more than {items} items and more than {share:.0%} of their stratum"
    if name == "expect_no_content_to_change_purpose":
        moved = ", ".join(f"{e[m.KEY]} {e['purpose_before']} -> {e['purpose_after']}" for e in failure["examples"][:3])
        return f"{name}: {count} content(s) would change purpose, e.g. {moved}"
    examples = failure["examples"][:2]
    where = f"({column})" if column else ""
    counted = f" {count} row(s)," if count is not None else ""
    return f"{name}{where}:{counted} e.g. {examples}"


def _moved(result: Any, history: pd.DataFrame, manifest: pd.DataFrame) -> list[dict[str, Any]]:
    """A failed purpose check's examples, by key: the content, its purpose before and the one proposed."""
    indices = (result.result or {}).get("partial_unexpected_index_list") or []
    rows = history.iloc[[int(i) for i in indices[:5]]]
    keys = manifest[m.KEY].to_numpy(object)[rows["row"].to_numpy()]
    return [
        {m.KEY: key, "purpose_before": before, "purpose_after": after}
        for key, before, after in zip(keys, rows["purpose_before"], rows["purpose_after"], strict=True)
    ]


def _plain(value: Any) -> Any:
    """JSON- and reader-friendly: numpy scalars as Python numbers (rounded floats), dicts and lists inside."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, (float, np.floating)):
        return round(float(value), 4)
    return value if isinstance(value, (int, str, bool, type(None))) else str(value)


def validate_manifest(
    manifest: pd.DataFrame,
    *,
    fractions: Mapping[str, float],
    stratify: Sequence[str],
    expected_rows: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_stratum: int = DEFAULT_MIN_STRATUM,
    purposes: Sequence[str] | None = None,
    known: pd.DataFrame | None = None,
    group_share: float = DEFAULT_GROUP_SHARE,
    group_items: int = DEFAULT_GROUP_ITEMS,
    placed: np.ndarray | None = None,
    known_rows: np.ndarray | None = None,
) -> dict[str, Any]:
    """Run the suites over a candidate manifest.

    Args:
        manifest: the candidate rows, with exactly the schema's columns and dtypes (as read from Parquet).
        fractions: the split targets; ``purpose`` must lie in their keys (or in ``purposes``).
        stratify: the stratification columns.
        expected_rows: parent rows + added - removed, or None to skip that check.
        tolerance: largest accepted |train fraction - target| of a stratum.
        min_stratum: strata with fewer rows are exempt from the fraction check.
        known: the parent's assignments (md5, purpose): content that must keep its purpose.
        group_share, group_items: a unit of more than ``group_items`` items and more than ``group_share``
            of its stratum fails the look-alike check.
        placed: per row, whether the split placed it in this run (None: every row); the fraction check
            allows for what sticky purposes fix.
        known_rows: per row, its content's row in ``known`` or -1 (looked up when not given).

    Returns:
        ``{"success", "failed": [{"suite", "expectation", "column", "unexpected_count", "examples"}],
        "statistics", "summary", "look_alike": [units over the bound]}``; JSON-serializable.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    _without_fingerprints()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("strata")
    allowed = list(purposes or [p for p, f in fractions.items() if f > 0])
    suites = _suites(gx, allowed, expected_rows, tolerance, group_share, group_items)
    units = units_table(manifest, stratify)
    frames = {
        "manifest": manifest,
        "spread": spread_table(manifest),
        "history": history_table(
            manifest, known if known is not None else m.empty_frame(m.ASSIGNMENTS_SCHEMA), known_rows
        ),
        "units": units,
        "strata": strata_table(manifest, fractions, stratify, min_stratum, placed),
    }
    failed, evaluated = [], 0
    for name, frame in frames.items():
        # One batch fetch per table: GX fingerprints (hashes) a DataFrame each time it makes a batch of it,
        # and Batch.validate would make a second one.
        definition = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe("whole")
        check = gx.ValidationDefinition(name=name, data=definition, suite=context.suites.add(suites[name]))
        run = context.validation_definitions.add(check)
        result_format: dict[str, Any] = {"result_format": "SUMMARY"}
        if _INDEX_COLUMNS[name]:
            result_format["unexpected_index_column_names"] = _INDEX_COLUMNS[name]
        result = run.run(batch_parameters={"dataframe": frame}, result_format=result_format)
        for item in result.results:
            evaluated += 1
            if item.success:
                continue
            config = item.expectation_config
            failed.append(
                {
                    "suite": suites[name].name,
                    "expectation": config.type,
                    "column": config.kwargs.get("column"),
                    "unexpected_count": (item.result or {}).get("unexpected_count"),
                    "examples": _examples(item) if name != "history" else _moved(item, frame, manifest),
                    "error": (item.exception_info or {}).get("exception_message"),
                }
            )
    for failure in failed:
        failure["description"] = _describe(failure, frames, tolerance, group_share, group_items)
    summary = (
        f"all {evaluated} expectations met"
        if not failed
        else f"{len(failed)} of {evaluated} expectations failed: " + "; ".join(f["description"] for f in failed)
    )
    look_alike = []
    for row in units[(units["share"] > group_share) & (units["items"] > group_items)].head(20).to_dict("records"):
        members = manifest[manifest[m.DUPLICATE_GROUP] == row["unit"]]
        shown = sorted(members[m.UNIQUE_ID].unique())
        row["items_shown"] = ", ".join(shown[:10]) + (f" (+{len(shown) - 10} more)" if len(shown) > 10 else "")
        row["examples"] = ", ".join(members[m.KEY].head(3))
        look_alike.append(_plain(row))
    return {
        "success": not failed,
        "failed": failed,
        "statistics": {"evaluated": evaluated, "failed": len(failed)},
        "summary": summary,
        "look_alike": look_alike,
    }


@stage("validate", storage=False)
def validate_task(candidate: Candidate, parent: Parent, options: CurateOptions) -> dict[str, Any]:
    """Validate the candidate as it will be written (Prefect task)."""
    frame = m.to_table(
        candidate.manifest.assign(
            **{m.FIRST_VERSION: candidate.manifest[m.FIRST_VERSION].fillna((parent.version or 0) + 1)}
        )
    ).to_pandas()
    expected = len(parent.manifest) + candidate.diff["added"] - candidate.diff["removed"]
    carried = set(parent.manifest[m.PURPOSE].unique()) if len(parent.manifest) else set()
    purposes = sorted({p for p, f in options.split.items() if f > 0} | carried)
    validation = validate_manifest(
        frame,
        fractions=options.split,
        stratify=options.stratify,
        expected_rows=expected,
        tolerance=options.fraction_tolerance,
        min_stratum=options.min_stratum,
        purposes=purposes,
        known=parent.assignments,
        group_share=options.max_group_share,
        group_items=options.max_group_items,
        placed=candidate.placed,
        known_rows=candidate.known_rows,
    )
    logger = get_run_logger()
    (logger.info if validation["success"] else logger.error)("validate: %s", validation["summary"])
    return validation
