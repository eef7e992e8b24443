"""``ratta demo``: the real pipeline on the generated image world (``ratta.world.demo``), or,
with ``--embeddings``, the synthetic-embedding run of the adaptation stage
(``ratta.demo.run_demo``)."""

from __future__ import annotations

import argparse

from ratta.cli.options import command


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "demo",
        _run_demo,
        help="offline end-to-end run on the generated image world (or generated embeddings)",
        description="Generate the image world and run db build, extract, text, db select, "
        "adapt and explain on it with the shipped small CLIP; print top-1 of CLIP, CuPL, "
        "retrieval only and RA-TTA (docs/world.md). Every step is cached by content.",
    )
    p.add_argument(
        "--embeddings",
        action="store_true",
        help="the synthetic run instead: generated embeddings, adapt only",
    )
    p.add_argument(
        "--dir",
        default=None,
        help="keep the files here (default: <ratta cache>/world-demo; with --embeddings: temp)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of the generated world or embeddings (0)"
    )
    p.add_argument(
        "--weights",
        default=None,
        help="the world CLIP's weights (default: the shipped ones; not with --embeddings)",
    )
    p.add_argument(
        "--views",
        type=int,
        default=32,
        help="random views per test picture (32; not with --embeddings)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=2,
        help="generation and decoding workers (2; not with --embeddings)",
    )
    p.add_argument(
        "--explain",
        type=int,
        default=6,
        help="changed pictures to explain (6; not with --embeddings)",
    )
    # the demo runs ratta's own commands: their parsers, filled as the groups register
    p.set_defaults(commands=sub.choices)


def _run_demo(args: argparse.Namespace) -> int:
    if args.embeddings:
        from ratta.demo import run_demo

        run_demo(args.dir, seed=args.seed)
        return 0
    from ratta.world.demo import run_world_demo
    from ratta.world.model import WEIGHTS
    from ratta.world.write import WorldSettings

    def command(argv: list[str]) -> int:
        parsed = args.commands[argv[0]].parse_args(argv[1:])
        return int(parsed.func(parsed))

    run_world_demo(
        args.dir,
        command=command,
        settings=WorldSettings(seed=args.seed),
        weights=args.weights or WEIGHTS,
        views=args.views,
        workers=args.workers,
        explain=args.explain,
    )
    return 0
