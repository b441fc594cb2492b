"""Stage 6, validate: a Great Expectations suite (GX Core 1.x, ephemeral context) over the candidate manifest.

Three batches are validated: the manifest itself (schema, value sets, formats, row count), a *spread* table
with one row per md5 / unique_id / duplicate_group value and the number of purposes it spans, and a
*strata* table with each stratum's train fraction against its target. Checks GX has no built-in for are
custom expectations: built-in ones subclassed with a fixed column and bound, named for what they mean.
A failed suite means no publish.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import pandas as pd
import pyarrow as pa
from prefect import get_run_logger

from loader import manifest as m
from tasks.policy import stage

if TYPE_CHECKING:
    from strata.config import CurateOptions
    from tasks.diff import Parent
    from tasks.publish import Candidate

SPREAD = "purposes"  # suffix of the spread table's columns: md5_purposes, unique_id_purposes, ...
GROUP_COLUMNS = (m.MD5, m.UNIQUE_ID, m.DUPLICATE_GROUP)
DEFAULT_TOLERANCE = 0.05  # the CurateOptions defaults; validate_manifest's own for direct callers
DEFAULT_MIN_STRATUM = 20


def _gx_type(arrow_type: pa.DataType) -> str:
    """The type name GX observes for a pandas column converted from this Arrow type."""
    if pa.types.is_string(arrow_type):
        return "str"
    if pa.types.is_timestamp(arrow_type):
        return "Timestamp"
    return str(arrow_type.to_pandas_dtype().__name__)


def spread_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per md5, unique_id and duplicate_group value: how many purposes it spans.

    Columns: ``value``, ``md5_purposes``, ``unique_id_purposes``, ``duplicate_group_purposes`` (each null
    except for its own kind's rows).
    """
    parts = []
    for column in GROUP_COLUMNS:
        spread = manifest.dropna(subset=[column]).groupby(column)[m.PURPOSE].nunique()
        parts.append(pd.DataFrame({"value": spread.index.astype(str), f"{column}_{SPREAD}": spread.to_numpy()}))
    return pd.concat(parts, ignore_index=True)


def strata_table(
    manifest: pd.DataFrame, fractions: Mapping[str, float], stratify: Sequence[str], min_rows: int
) -> pd.DataFrame:
    """Per stratum: rows, train fraction, target and deviation (null for strata below ``min_rows``)."""
    keys = list(stratify) or [pd.Series("all", index=manifest.index, name="stratum")]
    grouped = manifest.groupby(keys, dropna=False)
    rows = grouped.size()
    train = grouped[m.PURPOSE].apply(lambda p: float((p == "train").mean()))
    table = pd.DataFrame(
        {
            "stratum": ["/".join(map(str, k if isinstance(k, tuple) else (k,))) for k in rows.index],
            "rows": rows.to_numpy(),
            "train_fraction": train.to_numpy(),
        }
    )
    table["target"] = float(fractions.get("train", 0.0))
    deviation = (table["train_fraction"] - table["target"]).abs()
    table["deviation"] = deviation.where(table["rows"] >= min_rows)
    return table


@functools.cache
def _custom_expectations() -> tuple[type, ...]:
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

    class ExpectStratumTrainFractionNearTarget(E.ExpectColumnValuesToBeBetween):
        """Every stratum large enough to judge is within tolerance of its train target."""

        column: str = "deviation"
        min_value: float = 0.0

    return (
        ExpectNoMd5InTwoPurposes,
        ExpectNoItemInTwoPurposes,
        ExpectNoDuplicateGroupInTwoPurposes,
        ExpectStratumTrainFractionNearTarget,
    )


def _suites(gx: Any, purposes: Sequence[str], expected_rows: int | None, tolerance: float) -> dict[str, Any]:
    """The three expectation suites, as code."""
    E = gx.expectations
    no_md5, no_item, no_group, near_target = _custom_expectations()

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
        manifest.add_expectation(E.ExpectColumnValuesToBeBetween(column=column, min_value=1))
    if expected_rows is not None:
        manifest.add_expectation(E.ExpectTableRowCountToEqual(value=expected_rows))

    spread = gx.ExpectationSuite(name="purpose-spread")
    for expectation in (no_md5, no_item, no_group):
        spread.add_expectation(expectation())

    strata = gx.ExpectationSuite(name="strata-fractions")
    strata.add_expectation(near_target(max_value=tolerance))
    return {"manifest": manifest, "spread": spread, "strata": strata}


def _examples(result: Any) -> list[Any]:
    info = result.result or {}
    examples = info.get("partial_unexpected_index_list") or info.get("partial_unexpected_list") or []
    if not examples and "observed_value" in info:
        examples = [{"observed_value": info["observed_value"]}]
    return [
        {k: (str(v) if not isinstance(v, (int, float, str, bool, type(None))) else v) for k, v in e.items()}
        if isinstance(e, dict)
        else str(e)
        for e in examples[:5]
    ]


def validate_manifest(
    manifest: pd.DataFrame,
    *,
    fractions: Mapping[str, float],
    stratify: Sequence[str],
    expected_rows: int | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    min_stratum: int = DEFAULT_MIN_STRATUM,
    purposes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the suites over a candidate manifest.

    Args:
        manifest: the candidate rows, with exactly the schema's columns and dtypes (as read from Parquet).
        fractions: the split targets; ``purpose`` must lie in their keys (or in ``purposes``).
        stratify: the stratification columns.
        expected_rows: parent rows + added - removed, or None to skip that check.
        tolerance: largest accepted |train fraction - target| of a stratum.
        min_stratum: strata with fewer rows are exempt from the fraction check.

    Returns:
        ``{"success", "failed": [{"suite", "expectation", "column", "unexpected_count", "examples"}],
        "statistics", "summary"}``; JSON-serializable.
    """
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_pandas("strata")
    allowed = list(purposes or [p for p, f in fractions.items() if f > 0])
    suites = _suites(gx, allowed, expected_rows, tolerance)
    frames = {
        "manifest": manifest,
        "spread": spread_table(manifest),
        "strata": strata_table(manifest, fractions, stratify, min_stratum),
    }
    index_columns = {"manifest": [m.KEY], "spread": ["value"], "strata": ["stratum"]}
    failed, evaluated = [], 0
    for name, frame in frames.items():
        batch = (
            source.add_dataframe_asset(name)
            .add_batch_definition_whole_dataframe("whole")
            .get_batch(batch_parameters={"dataframe": frame})
        )
        result = batch.validate(
            suites[name],
            result_format={"result_format": "SUMMARY", "unexpected_index_column_names": index_columns[name]},
        )
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
                    "examples": _examples(item),
                    "error": (item.exception_info or {}).get("exception_message"),
                }
            )
    summary = (
        f"all {evaluated} expectations met"
        if not failed
        else "failed: " + "; ".join(f"{f['expectation']}({f['column'] or ''}) e.g. {f['examples'][:2]}" for f in failed)
    )
    return {
        "success": not failed,
        "failed": failed,
        "statistics": {"evaluated": evaluated, "failed": len(failed)},
        "summary": summary,
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
    )
    logger = get_run_logger()
    (logger.info if validation["success"] else logger.error)("validate: %s", validation["summary"])
    return validation
