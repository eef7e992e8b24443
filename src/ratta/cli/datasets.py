"""``ratta datasets check``: which of the 17 test splits are under the data root, and complete."""

from __future__ import annotations

import argparse

from ratta.cli.options import command, command_group
from ratta.datasets.check import CheckResult, check
from ratta.datasets.registry import DATASETS


def format_result(r: CheckResult) -> str:
    """One line per dataset: missing (first missing path), invalid (why), or the counts."""
    head = f"{r.name:<22}"
    if not r.found:
        return f"{head}missing     {r.missing_path} ({r.info.source})"
    if r.error is not None:
        return f"{head}invalid     {r.error}"
    known = r.info.test_count
    counts = f"{r.count:,} test images" + (
        f" of {known:,}" if known is not None else " (published count unknown)"
    )
    if r.classes != r.info.num_classes:
        counts += f", {r.classes:,} of {r.info.num_classes:,} classes"
    if r.missing_files:
        counts += f", {r.missing_files:,} image files missing (first: {r.first_missing_file})"
    return f"{head}{'complete' if r.complete else 'incomplete':<12}{counts}"


def _run_check(args: argparse.Namespace) -> int:
    results = check(args.data_root, args.datasets)
    for r in results:
        print(format_result(r))
    done = sum(r.complete for r in results)
    print(f"{done} of {len(results)} datasets complete")
    return 0 if done == len(results) else 1


def register(sub: argparse._SubParsersAction) -> None:
    commands = command_group(
        sub,
        "datasets",
        help="check the test splits under a data root",
        description="The 17 test splits (layout: docs/datasets.md).",
    )
    c = command(
        commands,
        "check",
        _run_check,
        help="report found/missing datasets and test-image counts",
        description=(
            "For each dataset: found or missing (first missing path), the test images listed "
            "against the published count, and how many listed image files do not exist. "
            "Exit 0 when every requested dataset is complete, 1 otherwise."
        ),
    )
    c.add_argument("--data-root", required=True, help="folder holding the dataset folders")
    c.add_argument(
        "--datasets",
        nargs="+",
        choices=list(DATASETS),
        metavar="NAME",
        help=f"datasets to check (default: all): {', '.join(DATASETS)}",
    )
