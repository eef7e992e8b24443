"""The ``ratta`` command: a thin layer over the Python API, one module per command group.

- ``adapt``: ``ratta adapt``; ``pipeline``: ``extract``, ``text``, ``run``; ``evaluate``:
  ``eval``, ``sweep``; ``explain``, ``demo``, ``describe``, ``datasets``, ``db``: their
  commands;
- ``options``: the option groups the commands share and what they turn into;
- ``report``: the summaries the commands print.

Each group's ``register(subparsers)`` adds its parsers and sets ``func`` on each. Start-up
imports no torch: the runners import the stages when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any

from ratta.cli import adapt, datasets, db, demo, describe, evaluate, explain, pipeline
from ratta.errors import RattaInputError

EXIT_USAGE = 2

# The command groups, in the order ``ratta --help`` lists their commands.
COMMAND_GROUPS = (adapt, explain, pipeline, evaluate, demo, describe, datasets, db)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ratta", description="RA-TTA: retrieval-augmented test-time adaptation for CLIP."
    )
    parser.add_argument(
        "--version", action=_Version, nargs=0, help="print the version (and git commit) and exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.register(sub)
    return parser


class _Version(argparse.Action):
    """``--version``: the commit is read only when asked (``ratta.provenance``)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from ratta.provenance import version_line

        print(version_line())
        parser.exit()


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
        print(
            "ratta: interrupted; no partial output files were left "
            "(extract and describe resume from their saved progress)",
            file=sys.stderr,
        )
        return 130
    except OSError as exc:  # the disk filled up, a folder vanished or turned read-only
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"ratta: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if os.environ.get("RATTA_TRACEBACK"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(
            f"ratta: error: unexpected {type(exc).__name__}: {first} (a bug in ratta; "
            "RATTA_TRACEBACK=1 shows where it happened)",
            file=sys.stderr,
        )
        return 1
