"""Command line: a thin layer over the Python API (``ratta.adapt``, ``ratta.demo``)."""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ratta import __version__
from ratta.config import RATTAConfig
from ratta.errors import RattaInputError

EXIT_USAGE = 2


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    d = RATTAConfig()
    p = sub.add_parser(
        "adapt",
        help="run RA-TTA on precomputed embeddings",
        description="Adapt the predictions of a features file with RA-TTA (method.md steps 1-9).",
    )
    p.add_argument("--features", required=True, help="features .safetensors (image, views, labels)")
    p.add_argument("--text", required=True, help="text .safetensors (classifier, desc, ...)")
    p.add_argument("--db", required=True, help="image database .npy [N, d]")
    p.add_argument("--out", required=True, help="output .safetensors (summary at OUT.json)")
    p.add_argument("--k-d", type=int, default=d.k_d, help="K_D top descriptions (%(default)s)")
    p.add_argument("--k-s", type=int, default=d.k_s, help="K_S images per set (%(default)s)")
    p.add_argument("--quantile", type=float, default=d.quantile, help="q (%(default)s)")
    p.add_argument("--min-desc", type=int, default=d.min_desc, help="min_desc (%(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="test images per batch")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (%(default)s)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument(
        "--search",
        default="exact",
        choices=("exact", "faiss"),
        help="exact: BLAS scan (default); faiss: IndexFlatL2",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_adapt)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="offline end-to-end run on a generated (synthetic) world",
        description="Generate a synthetic embedding world, write its files and run `adapt` on it.",
    )
    p.add_argument("--dir", default=None, help="keep the generated files here (default: temp)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_run_demo)


# Each stage registers its subcommand: add_parser(subparsers) sets ``func`` on its parser.
SUBCOMMANDS = [_add_adapt, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratta", description="RA-TTA: retrieval-augmented test-time adaptation for CLIP."
    )
    parser.add_argument("--version", action="version", version=f"ratta {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def format_results(summary: dict[str, Any]) -> str:
    """A short results table for stdout."""
    c = summary["counts"]
    lines = [
        f"images {c['images']}  classes {c['classes']}  views {c['views']}  "
        f"database {c['database']}  adapted {c['adapted']}  fallback {c['fallback']}  "
        f"mean candidates {c['mean_candidates']:.2f}",
    ]
    metrics = summary.get("metrics")
    if metrics:
        lines.append(f"{'method':<12}{'top-1':>8}{'top-5':>8}")
        for name, label in (
            ("zero_shot", "zero-shot"),
            ("retrieval", "retrieval"),
            ("ratta", "RA-TTA"),
        ):
            m = metrics[name]
            lines.append(f"{label:<12}{m['top1']:>8.2f}{m['top5']:>8.2f}")
    else:
        lines.append("no labels in the features file: accuracy not computed")
    lines.append(
        f"time {summary['timings_s']['total']:.2f} s ({summary['ms_per_image']:.2f} ms/image)"
    )
    return "\n".join(lines)


def _run_adapt(args: argparse.Namespace) -> int:
    from ratta.adapt import adapt

    config = RATTAConfig(k_d=args.k_d, k_s=args.k_s, quantile=args.quantile, min_desc=args.min_desc)
    summary = adapt(
        args.features,
        args.text,
        args.db,
        args.out,
        config,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        search=args.search,
        progress=not args.quiet,
    )
    print(format_results(summary))
    print(f"wrote {args.out} and {args.out}.json")
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    from ratta.demo import run_demo

    run_demo(args.dir, seed=args.seed)
    return 0


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
    return f"ratta: warning: {message}\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _warning_line  # type: ignore[assignment]
    try:
        return int(args.func(args))
    except RattaInputError as exc:
        print(f"ratta: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("ratta: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
