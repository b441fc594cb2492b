"""The ``strata`` command line: curate a source into a manifest version, show versions, run the demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from importlib import resources
from typing import Any, Sequence

from strata.config import DEFAULT_MANIFEST_ROOT, STRATIFY_COLUMNS
from strata.console import console, describe, print_counts, print_summary
from strata.deployments import DEFAULT_PREFECT_FILE
from strata.errors import ConfigError, StrataError

DEMO_UNIQUENESS = r"(\d+)_\d+\.\w+$"


def _key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _add_storage_option(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument(
        "--storage-option", action="append", type=_key_value, default=[], metavar="KEY=VALUE", help=help
    )


def _add_curate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--split",
        default="train=0.8,devel=0.2",
        help="target fraction per purpose, summing to 1 (default: %(default)s; test is optional)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (default: %(default)s)")
    parser.add_argument(
        "--stratify",
        default="category",
        help=f"comma-separated columns whose combinations are the strata, from "
        f"{', '.join(STRATIFY_COLUMNS)}; 'none' for one stratum (default: %(default)s)",
    )
    parser.add_argument(
        "--uniqueness",
        default=None,
        help="what makes an item: a regex on the key whose first group is the item id "
        r"(e.g. '(\d+)_\d+\.bmp$'), comma-separated column names, or md5 (default: md5)",
    )
    parser.add_argument(
        "--near-duplicates",
        type=int,
        default=4,
        metavar="BITS",
        help="phash Hamming distance that counts as a near duplicate; -1 turns it off (default: %(default)s)",
    )
    parser.add_argument(
        "--fraction-tolerance",
        type=float,
        default=0.05,
        metavar="F",
        help="validation: largest accepted |train fraction - target| per stratum (default: %(default)s)",
    )
    parser.add_argument(
        "--min-stratum",
        type=int,
        default=20,
        metavar="N",
        help="validation: strata with fewer samples are exempt from the fraction check (default: %(default)s)",
    )
    parser.add_argument(
        "--max-group-share",
        type=float,
        default=0.05,
        metavar="F",
        help="validation: a split unit that near duplicates join out of more than --max-group-items items, "
        "holding more than this share of its stratum, holds the run for review (default: %(default)s)",
    )
    parser.add_argument(
        "--max-group-items",
        type=int,
        default=10,
        metavar="N",
        help="see --max-group-share (default: %(default)s)",
    )
    parser.add_argument(
        "--max-pixels",
        type=int,
        default=100_000_000,
        help="images with more pixels are rejected as too_large (default: %(default)s)",
    )
    _add_storage_option(
        parser,
        "fsspec option for S3 and other remote URLs, e.g. endpoint_url=http://host:9000 "
        "(repeatable). Credentials come from the AWS environment, never from here",
    )
    parser.add_argument(
        "--dask",
        metavar="ADDRESS",
        default=None,
        help="inspect on Dask: a scheduler address (tcp://host:8786; its workers need strata installed and "
        "PREFECT_API_URL set) or 'local' for a cluster of one process per core (default: threads in this process)",
    )
    parser.add_argument(
        "--commit-guard",
        choices=("exclusive-create", "concurrency-limit"),
        default="exclusive-create",
        help="what keeps two runs from writing one version: the store's conditional writes (default; every run "
        "first proves the store honours them), or concurrency-limit, for a store without them: runs of the "
        "dataset are serialized by its Prefect global concurrency limit, which must exist (see docs/storage.md)",
    )
    parser.add_argument(
        "--allow-unmatched",
        action="store_true",
        help="new keys the --uniqueness regex finds no item id in count as their own item (default: such keys "
        "stop the run before anything is read)",
    )
    parser.add_argument("--quiet", action="store_true", help="print only the outcome and the counts, or the error")
    parser.add_argument("--verbose", action="store_true", help="also print tracebacks of errors")


def _options(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from strata.config import CurateOptions
    from tasks.split import parse_fractions

    stratify = (
        [] if args.stratify.strip().lower() == "none" else [c.strip() for c in args.stratify.split(",") if c.strip()]
    )
    try:
        return CurateOptions(
            split=parse_fractions(args.split),
            seed=args.seed,
            stratify=stratify,
            uniqueness=args.uniqueness,
            near_duplicates=args.near_duplicates,
            max_pixels=args.max_pixels,
            fraction_tolerance=args.fraction_tolerance,
            min_stratum=args.min_stratum,
            max_group_share=args.max_group_share,
            max_group_items=args.max_group_items,
            allow_unmatched=args.allow_unmatched,
            storage_options=dict(args.storage_option),
            dask=args.dask,
            commit_guard=args.commit_guard,
        )
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}" for e in err.errors()
        )
        raise ConfigError(f"invalid options: {problems}") from err


def _curate(source: str, dataset: str, manifests: str, args: argparse.Namespace) -> int:
    from strata import outcome as outcomes
    from strata.servers import temporary_servers

    if os.path.isdir(source):  # walk a local source while the imports run and the API server boots
        from tasks.walk import prefetch

        prefetch(source)
    with console(args.quiet, args.verbose, getattr(args, "restore_console", True)), temporary_servers() as ready:
        # temporary_servers: a killed run's temporary API server is stopped by the next run; it boots while
        # the options are checked and the flow's stack imports
        options = _options(args)
        from flows.curate import curate_dataset
        from tasks.expectations import import_in_background

        import_in_background()  # while the server boots, not while the listing needs the interpreter
        ready()
        state = curate_dataset(
            source=source, dataset=dataset, manifest_root=manifests, options=options, return_state=True
        )
    result = state.result(raise_on_failure=False)
    summary = getattr(result, "summary", None) if isinstance(result, BaseException) else result
    if summary is None:  # the run failed with an error: say it once, on strata's line
        raise (
            result if isinstance(result, BaseException) else StrataError(f"the run ended {state.name}: {state.message}")
        )
    print_summary(summary, args.quiet)
    return outcomes.of(summary.outcome).exit_code


def cmd_curate(args: argparse.Namespace) -> int:
    return _curate(args.source, args.dataset, args.manifests, args)


def cmd_demo(args: argparse.Namespace) -> int:
    source = str(resources.files("strata") / "demo_data" / "vials")
    print(f"curating the bundled demo data {source} into {os.path.abspath(args.manifests)}/vials")
    if args.uniqueness is None:
        args.uniqueness = DEMO_UNIQUENESS
    return _curate(source, "vials", args.manifests, args)


def cmd_show(args: argparse.Namespace) -> int:
    from loader.manifest import open_version, read_table

    version = open_version(
        args.dataset, args.version if args.version is not None else "latest", dict(args.storage_option)
    )
    read_table(version)  # the version checked whole, as the loader and curation check it, before showing it
    info = version.info
    print(f"{info['dataset']} version {info['version']} (parent {info['parent_version']}), {info['created_at']}")
    print(f"  uri:        {version.uri}")
    print(f"  source:     {info['source']}")
    print(f"  rows:       {info['rows']}; rejects: {info.get('rejects') or 'none'}")
    print(f"  diff:       {info.get('diff')}")
    validation = info.get("validation") or {}
    print(f"  validation: {'passed' if validation.get('success') else 'FAILED'}: {validation.get('summary', '')}")
    print(f"  parameters: {json.dumps(info['parameters'], sort_keys=True)}")
    print(f"  flow run:   {info.get('flow_run_id')}")
    print(f"  commit:     {info.get('commit_guard') or 'not recorded (written before strata recorded it)'}")
    print("counts (category x purpose):")
    print_counts(info["counts"])
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from loader import manifest as m
    from tasks.diff import manifest_diff, purpose_moved

    options = dict(args.storage_option)
    before, after = (m.read_manifest(args.dataset, v, options) for v in (args.a, args.b))
    changes = manifest_diff(before, after)
    moved = purpose_moved(changes)
    print(f"{args.dataset}: version {args.a} ({len(before)} samples) -> version {args.b} ({len(after)} samples)")
    for change, mark in (("added", "+"), ("removed", "-"), ("changed", "~")):
        rows = changes[changes["change"] == change]
        print(f"{change}: {len(rows)}")
        for row in rows.itertuples(index=False):
            purpose = row.purpose_after if change != "removed" else row.purpose_before
            print(f"  {mark} {row.key}  ({row.category}, {purpose})")
    print(f"purpose changes: {int(moved.sum())}" + ("" if moved.any() else " (purposes are sticky)"))
    for row in changes[moved].itertuples(index=False):
        print(f"  ! {row.key}: {row.purpose_before} -> {row.purpose_after}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from strata.deployments import serve

    serve(args.prefect_file, args.name or None)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Turn class-foldered images into versioned, validated training manifests.",
        epilog="Runs use Prefect's ephemeral API unless PREFECT_API_URL points at a server. "
        "S3 credentials and endpoint come from the AWS environment (AWS_ENDPOINT_URL, ...).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    curate = commands.add_parser(
        "curate",
        help="curate a folder or bucket into a new manifest version",
        description="List SOURCE (one folder per class), inspect new and changed images, "
        "group duplicates, split train/devel keeping earlier assignments, "
        "validate, and publish ROOT/NAME/vNNNNNN.",
    )
    curate.add_argument(
        "source", metavar="SOURCE", help="folder or URL with one sub-folder per class (s3://bucket/prefix)"
    )
    curate.add_argument("--dataset", required=True, metavar="NAME", help="dataset name under the manifest root")
    curate.add_argument(
        "--manifests",
        default=DEFAULT_MANIFEST_ROOT,
        metavar="ROOT",
        help="manifest root, a folder or URL (default: ./%(default)s)",
    )
    _add_curate_options(curate)
    curate.set_defaults(handler=cmd_curate)

    demo = commands.add_parser(
        "demo",
        help="curate the bundled demo vial images into ./manifests/vials",
        description="Curate the bundled demo dataset (three imbalanced classes, repeated "
        "photos per item, duplicates, a corrupt file) with item ids from the "
        "file names.",
    )
    demo.add_argument(
        "--manifests", default=DEFAULT_MANIFEST_ROOT, metavar="ROOT", help="manifest root (default: ./%(default)s)"
    )
    _add_curate_options(demo)
    demo.set_defaults(handler=cmd_demo)

    show = commands.add_parser(
        "show",
        help="print a version's counts, parameters and validation outcome",
        description="Print one committed version of a dataset (the latest by default).",
    )
    show.add_argument(
        "dataset", metavar="ROOT/NAME", help="dataset URI, e.g. manifests/vials or s3://bucket/manifests/vials"
    )
    show.add_argument("--version", type=int, default=None, help="version number (default: latest committed)")
    _add_storage_option(show, "fsspec option for remote URLs (repeatable)")
    show.set_defaults(handler=cmd_show)

    diff = commands.add_parser(
        "diff",
        help="list samples added, removed and changed between two versions, and any purpose changes",
        description="Compare two committed versions of a dataset sample by sample. Purposes are sticky: "
        "a key kept in both versions never changes purpose, so any listed purpose change needs a look.",
    )
    diff.add_argument("dataset", metavar="ROOT/NAME", help="dataset URI, e.g. manifests/vials")
    diff.add_argument("a", type=int, metavar="A", help="the older version")
    diff.add_argument("b", type=int, metavar="B", help="the newer version")
    _add_storage_option(diff, "fsspec option for remote URLs (repeatable)")
    diff.set_defaults(handler=cmd_diff)

    serve = commands.add_parser(
        "serve",
        help="run the scheduled deployments of deployments/prefect.yaml in this process (no worker needed)",
        description="Serve the curation deployments of a prefect.yaml with flow.serve: schedules fire and "
        "runs triggered from the UI or API execute here until Ctrl-C. Creates each dataset's concurrency "
        "limit. Needs a Prefect server (PREFECT_API_URL); run from the repository root, where the file's "
        "relative paths point. Refuses deployments a worker has (made by prefect deploy); on stop, pauses only "
        "the deployments it serves.",
    )
    serve.add_argument(
        "--prefect-file",
        default=DEFAULT_PREFECT_FILE,
        metavar="FILE",
        help="deployment definitions (default: %(default)s)",
    )
    serve.add_argument(
        "--name", action="append", default=[], metavar="DEPLOYMENT", help="serve only this deployment (repeatable)"
    )
    serve.set_defaults(handler=cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``strata`` console script.

    Exit codes: the run's outcome (``strata.outcome``: 0 published or unchanged, 2 failed validation, 3 needs
    review), 1 for an error, said in one ``strata: error:`` line (its traceback with ``--verbose``).
    """
    args = build_parser().parse_args(argv)
    # Called as the console script, the console stays as the run set it up to the process's end (the temporary
    # API server says it stops at exit); called in-process (tests, notebooks), it is put back after the run.
    args.restore_console = argv is not None
    # The ephemeral API server would otherwise try to phone home, which fails noisily offline.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # A first run on a fresh machine migrates the ephemeral API's database; 20 s is too tight on 2 cores.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    verbose = getattr(args, "verbose", False)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("strata: interrupted", file=sys.stderr)
        return 130
    except StrataError as err:
        if verbose:
            raise
        print(f"strata: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:
        if verbose:
            raise
        print(f"strata: error: {describe(err)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
