"""Stage 8, report: what the run did, as a summary for the CLI and as Prefect artifacts for the UI."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from loader import manifest as m
from tasks.diff import Parent
from tasks.listing import Listing
from tasks.policy import stage
from tasks.publish import Candidate, Store, counts_by_purpose


class CurateSummary(BaseModel):
    """What a curation run did; the CLI prints it, the artifacts show it."""

    dataset: str
    dataset_uri: str
    published: bool
    version: int | None
    version_uri: str | None
    parent_version: int | None
    message: str
    counts: dict[str, dict[str, int]]
    rejects: dict[str, int]
    diff: dict[str, int]
    validation: dict[str, Any] | None = None


def artifact_key(dataset: str, what: str) -> str:
    """A stable artifact key: lowercase letters, digits and dashes (what the Artifacts page requires)."""
    cleaned = "".join(c if c.isalnum() else "-" for c in f"{dataset}-{what}".lower())
    return "-".join(filter(None, cleaned.split("-")))


def counts_table(counts: Mapping[str, Mapping[str, int]]) -> pd.DataFrame:
    """Counts as a category x purpose table with totals."""
    table = pd.DataFrame(counts).fillna(0).astype(int)
    table = table[[p for p in m.PURPOSES if p in table.columns]].sort_index()
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "category"
    return table


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(map(str, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def summarize(
    store: Store,
    parent: Parent,
    published: tuple[int, str] | None,
    candidate: Candidate | None,
    validation: Mapping[str, Any] | None,
    no_change: bool,
) -> CurateSummary:
    """Build the run summary (pure)."""
    shown = candidate.manifest if candidate is not None and not no_change else parent.manifest
    rejects = candidate.rejects if candidate is not None and not no_change else parent.rejects
    dataset = store.dataset_path.rstrip("/").rsplit("/", 1)[-1]
    if no_change:
        message = (
            f"no change since version {parent.version}: nothing published"
            if parent.version is not None
            else "nothing to publish"
        )
    elif published is not None:
        message = f"published version {published[0]} at {published[1]}"
    else:
        message = "validation failed: nothing published"
    return CurateSummary(
        dataset=dataset,
        dataset_uri=store.uri,
        published=published is not None,
        version=published[0] if published else parent.version,
        version_uri=published[1] if published else None,
        parent_version=parent.version,
        message=message,
        counts=counts_by_purpose(shown) if len(shown) else {},
        rejects={str(k): int(v) for k, v in rejects[m.REASON].value_counts().sort_index().items()},
        diff=dict(candidate.diff) if candidate is not None and not no_change else {},
        validation=dict(validation) if validation is not None else None,
    )


def summary_markdown(summary: CurateSummary, parameters: Mapping[str, Any]) -> str:
    """The run summary as markdown for the Prefect UI."""
    lines = [f"# {summary.dataset}: {summary.message}", ""]
    if summary.version_uri:
        lines += [f"- manifest: `{summary.version_uri}/{m.MANIFEST_FILE}`"]
    lines += [f"- version: {summary.version} (parent {summary.parent_version})", f"- parameters: `{dict(parameters)}`"]
    if summary.validation is not None:
        lines += [
            f"- validation: {'passed' if summary.validation['success'] else 'FAILED'}: {summary.validation['summary']}"
        ]
    if summary.diff:
        lines += ["- diff: " + ", ".join(f"{k} {v}" for k, v in summary.diff.items())]
    if summary.rejects:
        lines += ["- rejects: " + ", ".join(f"{k} {v}" for k, v in summary.rejects.items())]
    if summary.counts:
        lines += ["", markdown_table(counts_table(summary.counts).reset_index())]
    return "\n".join(lines)


@stage("report", storage=False)
def report_task(
    store: Store,
    parent: Parent,
    published: tuple[int, str] | None,
    candidate: Candidate | None,
    listing: Listing,
    *,
    parameters: Mapping[str, Any],
    no_change: bool = False,
    validation: Mapping[str, Any] | None = None,
) -> CurateSummary:
    """Summarize the run and publish its artifacts (Prefect task)."""
    summary = summarize(store, parent, published, candidate, validation, no_change)
    dataset = summary.dataset
    if summary.counts:
        table = counts_table(summary.counts).reset_index()
        create_table_artifact(
            table=table.to_dict(orient="records"),
            key=artifact_key(dataset, "counts"),
            description=f"{dataset}: samples per category and purpose",
        )
    if candidate is not None and not no_change:
        rejects = candidate.rejects
        examples = rejects.groupby(m.REASON)[m.KEY].apply(lambda k: ", ".join(k.head(3)))
        rows = [
            {"reason": reason, "count": int(count), "examples": examples[reason]}
            for reason, count in rejects[m.REASON].value_counts().sort_index().items()
        ]
        create_table_artifact(
            table=rows or [{"reason": "none", "count": 0, "examples": ""}],
            key=artifact_key(dataset, "rejects"),
            description=f"{dataset}: rejected objects by reason",
        )
    create_markdown_artifact(
        markdown=summary_markdown(summary, parameters),
        key=artifact_key(dataset, "summary"),
        description=f"{dataset}: curation run summary",
    )
    get_run_logger().info("report: %s", summary.message)
    return summary
