"""``ratta demo``: the offline end-to-end run on a generated world (``ratta.demo.run_demo``)."""

from __future__ import annotations

import argparse

from ratta.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "demo",
        _run_demo,
        help="offline end-to-end run on a generated (synthetic) world",
        description="Generate a synthetic embedding world, write its files and run `adapt` on it.",
    )
    p.add_argument("--dir", default=None, help="keep the generated files here (default: temp)")
    p.add_argument("--seed", type=int, default=0)


def _run_demo(args: argparse.Namespace) -> int:
    from ratta.demo import run_demo

    run_demo(args.dir, seed=args.seed)
    return 0
