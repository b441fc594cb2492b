"""Stage 8, report: what the run did, as a summary for the CLI and as Prefect artifacts for the UI."""

from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import fsspec
import pandas as pd
from PIL import Image, ImageDraw, ImageFont
from prefect import get_run_logger
from prefect.artifacts import create_image_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel

from loader import manifest as m
from strata.storage import naming, uri_path
from tasks.diff import Parent, purpose_moved
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


def diff_table(changes: pd.DataFrame) -> pd.DataFrame:
    """Added, removed and changed samples per category, and how many kept keys changed purpose.

    Args:
        changes: a ``manifest_diff`` against the parent.

    Returns:
        Columns: category, added, removed, changed, purpose_changed.
    """
    table = pd.crosstab(changes[m.CATEGORY], changes["change"]).reindex(
        columns=["added", "removed", "changed"], fill_value=0
    )
    moved = changes[purpose_moved(changes)]
    table["purpose_changed"] = moved.groupby(m.CATEGORY).size().reindex(table.index, fill_value=0)
    return table.rename_axis(m.CATEGORY).reset_index().astype({c: int for c in table.columns})


def duplicates_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """Duplicate groups by kind: ``exact`` (holding byte-identical copies) and ``near`` (holding different
    contents with close phashes). A group holding both counts in both rows.

    Columns: kind, groups, samples (the rows that are exact copies, or all rows of near groups), kept_whole
    (groups spanning several items, which an item-wise split could have cut across purposes and which were
    assigned as one unit), examples.
    """
    grouped = manifest.dropna(subset=[m.DUPLICATE_GROUP])
    copies = grouped[grouped.duplicated(m.MD5, keep=False)]
    by_group = grouped.groupby(m.DUPLICATE_GROUP)
    spans_items = by_group[m.UNIQUE_ID].nunique() > 1
    near = by_group[m.MD5].nunique() > 1
    examples = by_group[m.KEY].apply(lambda keys: " = ".join(sorted(keys)[:3]))
    rows = []
    for kind, groups, samples in (
        ("exact", pd.Index(copies[m.DUPLICATE_GROUP].unique()), len(copies)),
        ("near", near[near].index, int(by_group.size()[near].sum())),
    ):
        rows.append(
            {
                "kind": kind,
                "groups": len(groups),
                "samples": int(samples),
                "kept_whole": int(spans_items.reindex(groups).sum()),
                "examples": "; ".join(examples.reindex(groups).head(3)),
            }
        )
    return pd.DataFrame(rows)


def grid_samples(manifest: pd.DataFrame, per_cell: int = 4) -> pd.DataFrame:
    """Up to ``per_cell`` rows per (category, purpose), spread evenly over the keys: the sample grid's cells."""
    picks = []
    for _, cell in manifest.sort_values(m.KEY).groupby([m.CATEGORY, m.PURPOSE], sort=True):
        step = max(1, len(cell) // per_cell)
        picks.append(cell.iloc[::step].head(per_cell))
    return pd.concat(picks, ignore_index=True) if picks else manifest.iloc[0:0]


def sample_grid(cells: Sequence[tuple[str, Sequence[bytes | None]]], thumb: int = 96) -> bytes:
    """A PNG: one row per labelled cell, its images as thumbnails (a grey square where bytes are missing)."""
    columns = max((len(images) for _, images in cells), default=1)
    label_width = 160
    canvas = Image.new("RGB", (label_width + columns * (thumb + 4), max(1, len(cells)) * (thumb + 4)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for row, (label, images) in enumerate(cells):
        top = row * (thumb + 4)
        draw.text((4, top + thumb // 2 - 6), label, fill="black", font=font)
        for column, data in enumerate(images):
            tile = Image.new("RGB", (thumb, thumb), (200, 200, 200))
            if data is not None:
                try:
                    with Image.open(io.BytesIO(data)) as image:
                        image.seek(0)
                        image.draft("RGB", (thumb, thumb))
                        tile = image.convert("RGB")
                        tile.thumbnail((thumb, thumb))
                except OSError:
                    pass  # a file that cannot be shown stays a grey square; the grid is for people
            canvas.paste(tile, (label_width + column * (thumb + 4), top))
    buffer = io.BytesIO()
    canvas.save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


@stage("report")
def grid_task(fs: fsspec.AbstractFileSystem, manifest: pd.DataFrame, per_cell: int = 4) -> bytes:
    """Read a few images per category and purpose and draw the sample grid (Prefect task)."""
    picks = grid_samples(manifest, per_cell)
    cells: list[tuple[str, list[bytes | None]]] = []
    for (category, purpose), cell in picks.groupby([m.CATEGORY, m.PURPOSE], sort=True):
        images: list[bytes | None] = []
        for path in cell[m.PATH]:
            try:
                with naming("report", path):
                    images.append(fs.cat_file(uri_path(fs, path)))
            except FileNotFoundError:
                images.append(None)
        cells.append((f"{category} / {purpose}", images))
    return sample_grid(cells)


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
        lines += [
            f"- manifest: `{summary.version_uri}/{m.MANIFEST_FILE}`",
            f"- sample grid: `{summary.version_uri}/{m.GRID_FILE}`",
        ]
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
        changes = diff_table(candidate.changes)
        create_table_artifact(
            table=changes.to_dict(orient="records") or [{"category": "none", "added": 0}],
            key=artifact_key(dataset, "diff"),
            description=f"{dataset}: samples added, removed and changed since version {parent.version}, by category",
        )
        create_table_artifact(
            table=duplicates_table(candidate.manifest).to_dict(orient="records"),
            key=artifact_key(dataset, "duplicates"),
            description=f"{dataset}: duplicate groups (exact = same bytes, near = similar phash); kept_whole = "
            "groups spanning several items, assigned to one purpose as a unit",
        )
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
    if published is not None:
        create_image_artifact(
            image_url=f"{published[1]}/{m.GRID_FILE}",
            key=artifact_key(dataset, "sample-grid"),
            description=f"{dataset} version {published[0]}: a few images per category and purpose",
        )
    create_markdown_artifact(
        markdown=summary_markdown(summary, parameters),
        key=artifact_key(dataset, "summary"),
        description=f"{dataset}: curation run summary",
    )
    get_run_logger().info("report: %s", summary.message)
    return summary
