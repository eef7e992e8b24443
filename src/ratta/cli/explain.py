"""``ratta explain``: pictures of why RA-TTA changed predictions (``ratta.explain.explain``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ratta.cli.options import bars, command, out_quiet_args


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "explain",
        _run_explain,
        help="show why RA-TTA changed predictions: one PNG per test image and a page",
        description="Draw, for chosen test images, the test image, zero-shot's top-5, the "
        "surviving candidates with their best descriptions and retrieved database images, OT "
        "distances, relevances, lambda and the decision (docs/explain.md).",
    )
    p.add_argument(
        "--predictions", required=True, help="predictions of ratta adapt --save-retrieved"
    )
    p.add_argument("--features", required=True, help="the features file adapt read")
    p.add_argument("--text", required=True, help="the text file adapt read")
    p.add_argument("--db", required=True, help="the database adapt read (.npy or a folder)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--images",
        type=int,
        nargs="+",
        metavar="I",
        help="rows of the predictions (= of the features file) to explain",
    )
    which.add_argument(
        "--changed",
        action="store_true",
        help="the test images where RA-TTA and zero-shot disagree",
    )
    p.add_argument("--limit", type=int, default=None, help="explain at most the first N")
    p.add_argument(
        "--data-root",
        default=None,
        help="data root of the test images (without: pictures without the test image)",
    )
    p.add_argument(
        "--dataset",
        default=None,
        help="the dataset of the test split (default: the one the features file names)",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="csv datasets: file with one class name per line, in label order",
    )
    out_quiet_args(p, "folder for image-<row>.png, index.html and explain.json", "no progress bar")


def _run_explain(args: argparse.Namespace) -> int:
    from ratta.explain import explain

    summary = explain(
        args.predictions,
        args.features,
        args.text,
        args.db,
        args.out,
        images=args.images,
        changed=args.changed,
        limit=args.limit,
        data_root=args.data_root,
        dataset=args.dataset,
        class_names=args.class_names,
        progress=bars(args, "explain"),
    )
    shown = summary["images"]
    changed = sum(e["changed"] for e in shown)
    print(f"{len(shown)} test images explained ({changed} changed by RA-TTA)")
    if summary["no_thumbnails"]:
        print(f"no thumbnails: {summary['no_thumbnails']}")
    for note in summary["notes"]:
        print(f"ratta: warning: {note}", file=sys.stderr)
    print(f"wrote {Path(args.out) / 'index.html'}")
    return 0
