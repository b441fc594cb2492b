"""How a curation run ends: one outcome model for the flow (its final Prefect state), the CLI (its exit code)
and the documentation (:func:`markdown_table`)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Outcome", "PUBLISHED", "UNCHANGED", "NEEDS_REVIEW", "FAILED_VALIDATION", "FAILED", "OUTCOMES", "of"]


@dataclass(frozen=True)
class Outcome:
    """One way a run can end."""

    name: str  # also the name of the flow run's final state
    state_type: str  # Prefect's state type: COMPLETED or FAILED
    exit_code: int  # of `strata curate` / `strata demo`
    published: str  # what the run published
    next_step: str  # what a person does next


PUBLISHED = Outcome("Published", "COMPLETED", 0, "a new version", "nothing")
UNCHANGED = Outcome("Unchanged", "COMPLETED", 0, "nothing: the source holds what the latest version says", "nothing")
NEEDS_REVIEW = Outcome(
    "Needs review",
    "FAILED",
    3,
    "a new version without the images held back, or nothing when look-alike units hold the run",
    "read the run's review artifact and resolve what it names (remove or rename images, or lower "
    "--near-duplicates); the next run picks it up",
)
FAILED_VALIDATION = Outcome(
    "Failed validation",
    "FAILED",
    2,
    "nothing",
    "read the failed expectations (the run's summary, and <root>/<dataset>/_rejected/<run id>/validation.json)",
)
FAILED = Outcome("Failed", "FAILED", 1, "nothing", "read the one-line error, fix what it names, run again")
OUTCOMES = (PUBLISHED, UNCHANGED, NEEDS_REVIEW, FAILED_VALIDATION, FAILED)


def of(name: str) -> Outcome:
    """The outcome called ``name``."""
    for outcome in OUTCOMES:
        if outcome.name == name:
            return outcome
    raise KeyError(f"no outcome {name!r}; outcomes: {', '.join(o.name for o in OUTCOMES)}")


def markdown_table() -> str:
    """The outcome model as the README and deployments/README.md give it."""
    lines = [
        "| outcome | what was published | Prefect state (type / name) | exit code | what a person does next |",
        "|---|---|---|---|---|",
    ]
    for o in OUTCOMES:
        lines.append(f"| {o.name} | {o.published} | {o.state_type} / `{o.name}` | {o.exit_code} | {o.next_step} |")
    return "\n".join(lines)
