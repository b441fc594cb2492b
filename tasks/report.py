"""Stage 8, report: what the run did, as a summary for the CLI and as Prefect artifacts for the UI.

Every run hands one :class:`Result` here (its outcome from ``strata.outcome``, and what it planned); the
summary and the artifacts are built from it, whatever the outcome. Artifact keys are
``<dataset>-<root digest>-<what>``: one dataset name under two manifest roots keeps two histories.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import pandas as pd
from prefect import get_client, get_run_logger
from prefect.artifacts import Artifact, MarkdownArtifact, TableArtifact
from prefect.client.schemas.actions import ArtifactCreate
from prefect.utilities.context import get_task_and_flow_run_ids
from pydantic import BaseModel

from loader import manifest as m
from strata import outcome as outcomes
from tasks.diff import Parent
from tasks.grid import markdown as grid_markdown
from tasks.listing import Listing
from tasks.policy import stage
from tasks.publish import Candidate, Store, counts_by_purpose

SHOWN = 20  # files an artifact lists per kind of change, before "and N more"


@dataclass(frozen=True)
class Result:
    """How a run ended, and what it planned on the way (the report's one input)."""

    outcome: outcomes.Outcome
    parent: Parent
    candidate: Candidate | None = None
    validation: Mapping[str, Any] | None = None
    published: tuple[int, str, bytes] | None = None  # version, its URI, the sample grid PNG
    rejected_at: str | None = None  # where a failed validation's result was kept
    advice: str = ""  # what to do, when validation held the run


class CurateSummary(BaseModel):
    """What a curation run did; the CLI prints it, the artifacts show it."""

    dataset: str
    dataset_uri: str
    outcome: str  # a strata.outcome name: Published, Unchanged, Needs review, Failed validation
    published: bool
    version: int | None  # the version published, or the latest one
    version_uri: str | None
    parent_version: int | None
    message: str
    counts: dict[str, dict[str, int]]
    rejects: dict[str, int]
    new_rejects: dict[str, int]
    diff: dict[str, int]
    review: dict[str, int]
    validation: dict[str, Any] | None = None


def artifact_key(dataset_uri: str, dataset: str, what: str) -> str:
    """``<dataset>-<8 hex digits of the dataset's URI>-<what>``: lowercase letters, digits and dashes."""
    digest = hashlib.sha256(dataset_uri.encode()).hexdigest()[:8]
    return f"{dataset}-{digest}-{what}"


def counts_table(counts: Mapping[str, Mapping[str, int]]) -> pd.DataFrame:
    """Counts as a category x purpose table with totals."""
    table = pd.DataFrame(counts).fillna(0).astype(int)
    table = table[[p for p in m.PURPOSES if p in table.columns]].sort_index()
    table["total"] = table.sum(axis=1)
    table.loc["total"] = table.sum(axis=0)
    table.index.name = "category"
    return table


def markdown_table(frame: pd.DataFrame) -> str:
    """A DataFrame as a GitHub markdown table (cells with ``|`` escaped)."""

    def cell(value: object) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(map(cell, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(map(cell, row)) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def diff_table(changes: pd.DataFrame) -> pd.DataFrame:
    """Added, removed, changed and moved samples per category.

    Args:
        changes: a ``manifest_diff`` against the parent.

    Returns:
        Columns: category, added, removed, changed, moved (no row when nothing changed).
    """
    kinds = ["added", "removed", "changed", "moved"]
    table = pd.crosstab(changes[m.CATEGORY], changes["change"]).reindex(columns=kinds, fill_value=0)
    return table.rename_axis(m.CATEGORY).reset_index().astype({c: int for c in kinds})


def diff_markdown(changes: pd.DataFrame, parent_version: int | None, shown: int = SHOWN) -> str:
    """The diff by category, and the files of each kind of change (the first ``shown``, then a count)."""
    if changes.empty:
        return f"No sample added, removed, changed or moved since version {parent_version}."
    lines = [markdown_table(diff_table(changes)), ""]
    for kind in ("added", "removed", "changed", "moved"):
        rows = changes[changes["change"] == kind]
        if rows.empty:
            continue
        lines += [f"**{kind}** ({len(rows)})", ""]
        for row in rows.head(shown).itertuples(index=False):
            purpose = row.purpose_after if kind != "removed" else row.purpose_before
            source = f" (from `{row.from_key}`)" if kind == "moved" else ""
            lines.append(f"- `{row.key}`{source}: {row.category}, {purpose}")
        if len(rows) > shown:
            lines.append(f"- ... and {len(rows) - shown} more")
        lines.append("")
    return "\n".join(lines)


def rejects_table(rejects: pd.DataFrame) -> pd.DataFrame:
    """Rejects by reason, new in this run apart from those carried over (columns: reason, new, carried,
    examples)."""
    new = rejects["new"] if "new" in rejects else pd.Series(False, index=rejects.index)
    table = pd.DataFrame(
        {
            "new": rejects[new.to_numpy()].groupby(m.REASON).size(),
            "carried": rejects[~new.to_numpy()].groupby(m.REASON).size(),
        }
    )
    table = table.fillna(0).astype(int)
    shown = rejects.groupby(m.REASON)[m.KEY].agg(lambda k: ", ".join(k.head(3)))
    return table.assign(examples=shown).rename_axis(m.REASON).reset_index()


def duplicates_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Duplicate groups by kind: ``exact`` (holding byte-identical copies) and ``near`` (holding different
    contents with close phashes). A group holding both counts in both rows.

    Columns: kind, groups, samples (the rows that are exact copies, or all rows of near groups), kept_whole
    (groups spanning several items, assigned to one purpose as a unit), examples (the first three groups).
    """
    grouped = manifest.dropna(subset=[m.DUPLICATE_GROUP])
    copies = grouped[grouped.duplicated(m.MD5, keep=False)]
    by_group = grouped.groupby(m.DUPLICATE_GROUP)
    spans_items = by_group[m.UNIQUE_ID].nunique() > 1
    near = by_group[m.MD5].nunique() > 1
    rows = []
    for kind, groups, samples in (
        ("exact", pd.Index(copies[m.DUPLICATE_GROUP].unique()), len(copies)),
        ("near", near[near].index, int(by_group.size()[near].sum())),
    ):
        first = grouped[grouped[m.DUPLICATE_GROUP].isin(groups[:3])].groupby(m.DUPLICATE_GROUP)[m.KEY]
        rows.append(
            {
                "kind": kind,
                "groups": len(groups),
                "samples": int(samples),
                "kept_whole": int(spans_items.reindex(groups).sum()),
                "examples": "; ".join(first.agg(lambda keys: " = ".join(sorted(keys)[:3]))),
            }
        )
    return pd.DataFrame(rows)


def largest_groups(manifest: pd.DataFrame, count: int = 10) -> pd.DataFrame:
    """The largest duplicate groups: look-alike photos chaining together show here first.

    Columns: duplicate_group, rows, items (distinct unique_ids), categories, purpose, examples (three keys).
    """
    grouped = manifest.dropna(subset=[m.DUPLICATE_GROUP])
    sizes = grouped.groupby(m.DUPLICATE_GROUP).size().sort_values(ascending=False, kind="stable")
    top = grouped[grouped[m.DUPLICATE_GROUP].isin(sizes.index[:count])].groupby(m.DUPLICATE_GROUP)
    table = pd.DataFrame(
        {
            "rows": top.size(),
            "items": top[m.UNIQUE_ID].nunique(),
            "categories": top[m.CATEGORY].agg(lambda c: ", ".join(sorted(c.unique()))),
            "purpose": top[m.PURPOSE].first(),
            "examples": top[m.KEY].agg(lambda k: ", ".join(sorted(k)[:3])),
        }
    )
    table = table.sort_values(["rows", "items"], ascending=False, kind="stable").rename_axis(m.DUPLICATE_GROUP)
    return table.reset_index()


def review_markdown(
    held: pd.DataFrame,
    cross: pd.DataFrame,
    look_alike: Sequence[Mapping[str, Any]],
    legacy: pd.DataFrame | None = None,
    shown: int = 50,
) -> str:
    """What a person should look at, and how to resolve it: images held back, cross-purpose links, look-alike
    units, and what versions from before recorded assignments let move (empty when there is nothing)."""
    lines: list[str] = []
    if legacy is not None and len(legacy):
        lines += [
            f"## {len(legacy)} purpose move(s) in versions written before assignments were recorded",
            "",
            "Those versions carried purposes by key: this content changed purpose between them, or this item "
            "ended up in two purposes. The parent version's purposes stand from now on (a split item's parts "
            "became items `<id>@<purpose>`); check whether a model evaluated on those versions saw its own "
            "training data.",
            "",
            markdown_table(legacy.head(shown)),
            "",
        ]
    if len(held):
        lines += [
            f"## {len(held)} new image(s) held back (reason purpose_conflict)",
            "",
            "Each links (same item id, exact or near copy) to content already in two purposes, so it can go to "
            "neither. Remove it from the source, or remove what it links to; the next run judges it again.",
            "",
            markdown_table(held[[m.KEY, "detail"]].head(shown)),
        ]
        if len(held) > shown:
            lines.append(f"... and {len(held) - shown} more")
    if len(cross):
        lines += [
            "",
            f"## {len(cross)} cross-purpose link(s) among content already assigned",
            "",
            "Neither side moves and they are not merged (purposes are sticky); both stay published. If they show "
            "the same physical item or scene, remove one side from the source.",
            "",
            markdown_table(cross.head(shown)),
        ]
        if len(cross) > shown:
            lines.append(f"... and {len(cross) - shown} more")
    if look_alike:
        lines += [
            "",
            f"## {len(look_alike)} look-alike unit(s): near duplicates join many items into one split unit",
            "",
            "Nothing was published. Lower `--near-duplicates` (a changed threshold regroups the whole dataset; "
            "purposes still never move), or raise `--max-group-share` / `--max-group-items` if the items really "
            "are copies of each other.",
            "",
            markdown_table(pd.DataFrame(list(look_alike))),
        ]
    return "\n".join(lines).strip()


def summarize(store: Store, result: Result) -> CurateSummary:
    """Build the run summary (pure)."""
    parent, candidate = result.parent, result.candidate
    dataset = store.dataset_path.rstrip("/").rsplit("/", 1)[-1]
    changed = candidate is not None and result.outcome is not outcomes.UNCHANGED
    shown = candidate.manifest if changed else parent.manifest
    rejects = candidate.rejects if changed else parent.rejects
    new = rejects[rejects["new"]] if "new" in rejects else rejects.iloc[0:0]
    published = result.published
    if published is not None:
        message = f"published version {published[0]} at {published[1]}"
    elif result.outcome is outcomes.UNCHANGED:
        message = (
            f"no change since version {parent.version}: nothing published"
            if parent.version is not None
            else "nothing to publish"
        )
    else:
        reason = result.advice or (result.validation or {}).get("summary", "")
        message = "nothing published" + (f"; {reason}" if reason else "")
    review = candidate.review if changed else {}
    if result.outcome is outcomes.NEEDS_REVIEW and published is not None:
        parts = [f"{v} {k.replace('_', ' ')}" for k, v in review.items() if v]
        if len(parent.moved):
            parts.append(f"{len(parent.moved)} purpose moves in versions before assignments")
        message += "; needs review: " + ", ".join(parts)
    if result.rejected_at:
        message += f" (validation result kept at {result.rejected_at})"
    return CurateSummary(
        dataset=dataset,
        dataset_uri=store.uri,
        outcome=result.outcome.name,
        published=published is not None,
        version=published[0] if published else parent.version,
        version_uri=published[1] if published else None,
        parent_version=parent.version,
        message=message,
        counts=counts_by_purpose(shown) if len(shown) else {},
        rejects={str(k): int(v) for k, v in rejects[m.REASON].value_counts().sort_index().items()},
        new_rejects={str(k): int(v) for k, v in new[m.REASON].value_counts().sort_index().items()},
        diff=dict(candidate.diff) if changed else {},
        review=review,
        validation=dict(result.validation) if result.validation is not None else None,
    )


def summary_markdown(summary: CurateSummary, result: Result, parameters: Mapping[str, Any]) -> str:
    """The run summary as markdown for the Prefect UI: outcome and what to do, then the details."""
    outcome = outcomes.of(summary.outcome)
    lines = [f"# {summary.dataset}: {summary.outcome}", "", summary.message, ""]
    if outcome is not outcomes.PUBLISHED and outcome is not outcomes.UNCHANGED:
        lines += [f"**Next:** {outcome.next_step}", ""]
    if summary.version_uri:
        lines += [f"- manifest: `{summary.version_uri}/{m.MANIFEST_FILE}`"]
    lines += [f"- version: {summary.version} (parent {summary.parent_version})"]
    if summary.validation is not None:
        verdict = "passed" if summary.validation["success"] else "FAILED"
        lines += [f"- validation: {verdict}: {summary.validation['summary']}"]
    if summary.diff:
        lines += ["- diff: " + ", ".join(f"{k} {v}" for k, v in summary.diff.items())]
    if summary.rejects:
        carried = {k: v - summary.new_rejects.get(k, 0) for k, v in summary.rejects.items()}
        lines += [
            "- rejects, new in this run: " + (", ".join(f"{k} {v}" for k, v in summary.new_rejects.items()) or "none"),
            "- rejects carried over: " + (", ".join(f"{k} {v}" for k, v in carried.items() if v) or "none"),
        ]
    if summary.counts:
        lines += ["", markdown_table(counts_table(summary.counts).reset_index())]
    lines += ["", "## Parameters", "", markdown_table(_parameters_table(parameters))]
    if result.published is not None:
        lines += ["", "## Sample grid", "", grid_markdown(result.published[2], f"{summary.dataset} v{summary.version}")]
    return "\n".join(lines)


def _parameters_table(parameters: Mapping[str, Any]) -> pd.DataFrame:
    """Values as code spans: markdown would eat the backslashes of a regex."""
    values = ["`" + str(v).replace("`", "'") + "`" for v in parameters.values()]
    return pd.DataFrame({"parameter": list(parameters), "value": values})


def _on_flow_run(artifact: Artifact) -> None:
    """Create ``artifact`` on the flow run alone: the UI shows a task run's artifacts apart, under the task,
    and a person looks for how a run ended on the run."""
    _, flow_run_id = get_task_and_flow_run_ids()
    data = artifact.format(_sync=True)  # type: ignore[call-arg]  # async_dispatch's sync path, as Prefect calls it
    request = ArtifactCreate(
        type=artifact.type, key=artifact.key, description=artifact.description, flow_run_id=flow_run_id, data=data
    )
    with get_client(sync_client=True) as client:
        client.create_artifact(artifact=request)


def create_markdown_artifact(markdown: str, key: str, description: str) -> None:
    _on_flow_run(MarkdownArtifact(markdown=markdown, key=key, description=description))


def create_table_artifact(table: list[dict[str, Any]], key: str, description: str) -> None:
    _on_flow_run(TableArtifact(table=table, key=key, description=description))


@stage("report", storage=False)
def report_task(store: Store, result: Result, listing: Listing, *, parameters: Mapping[str, Any]) -> CurateSummary:
    """Summarize the run and publish its artifacts on the flow run (Prefect task)."""
    summary = summarize(store, result)
    dataset, candidate = summary.dataset, result.candidate

    def key(what: str) -> str:
        return artifact_key(store.uri, dataset, what)

    if summary.counts:
        create_table_artifact(
            table=counts_table(summary.counts).reset_index().to_dict(orient="records"),
            key=key("counts"),
            description=f"{dataset}: samples per category and purpose",
        )
    if candidate is not None and result.outcome is not outcomes.UNCHANGED:
        create_markdown_artifact(
            markdown=f"# {dataset}: changes since version {result.parent.version}\n\n"
            + diff_markdown(candidate.changes, result.parent.version),
            key=key("diff"),
            description=f"{dataset}: samples added, removed, changed and moved since version {result.parent.version}",
        )
        create_table_artifact(
            table=duplicates_table(candidate.manifest).to_dict(orient="records"),
            key=key("duplicates"),
            description=f"{dataset}: duplicate groups (exact = same bytes, near = similar phash); kept_whole = "
            "groups spanning several items, assigned to one purpose as a unit",
        )
        create_table_artifact(
            table=largest_groups(candidate.manifest).to_dict(orient="records")
            or [{m.DUPLICATE_GROUP: "none", "rows": 0}],
            key=key("largest-groups"),
            description=f"{dataset}: the largest duplicate groups (look-alike photos chaining together show first)",
        )
        create_table_artifact(
            table=rejects_table(candidate.rejects).to_dict(orient="records")
            or [{"reason": "none", "new": 0, "carried": 0}],
            key=key("rejects"),
            description=f"{dataset}: rejected objects by reason, new in this run and carried over",
        )
        review = review_markdown(
            candidate.held, candidate.cross, (result.validation or {}).get("look_alike") or [], result.parent.moved
        )
        if review:
            create_markdown_artifact(
                markdown=f"# {dataset}: to review\n\n{review}",
                key=key("review"),
                description=f"{dataset}: images held back, cross-purpose links and look-alike units",
            )
    create_markdown_artifact(
        markdown=summary_markdown(summary, result, parameters),
        key=key("summary"),
        description=f"{dataset}: {summary.outcome}: {summary.message}",
    )
    get_run_logger().info("report: %s: %s", summary.outcome, summary.message)
    return summary
