"""``ratta describe``: class descriptions with an LLM or hand templates (``ratta.describe``)."""

from __future__ import annotations

import argparse

from ratta.cli.options import command
from ratta.describe.prompts import DEFAULT_LLM_URL, GENERIC_TEMPLATES, KEY_ENV, KINDS
from ratta.errors import RattaInputError
from ratta.guard import Read


def register(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "describe",
        _run,
        help="write class descriptions (CuPL JSON) with an LLM or hand templates",
        description="Ask an OpenAI-compatible chat endpoint to describe each class (CuPL "
        f"style). The API key is read from {' or '.join(KEY_ENV)}.",
    )
    p.add_argument("--classes", metavar="FILE", help="text file with one class name per line")
    p.add_argument("--dataset", metavar="NAME", help="dataset preset: its kind and hand templates")
    p.add_argument(
        "--data-root", metavar="DIR", help="root of the datasets (for --dataset class names)"
    )
    p.add_argument("--out", required=True, help="output CuPL JSON (manifest at OUT.manifest.json)")
    p.add_argument("--llm-url", default=DEFAULT_LLM_URL, help="API base URL (%(default)s)")
    p.add_argument("--llm-model", help="model name; required unless --templates-only")
    p.add_argument("--per-prompt", type=int, default=20, help="answers per prompt (%(default)s)")
    p.add_argument("--temperature", type=float, default=0.99, help="sampling (%(default)s)")
    p.add_argument("--max-tokens", type=int, default=55, help="tokens per answer (%(default)s)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed sent to the server")
    p.add_argument(
        "--kind", choices=KINDS, help="which question prompts (default: the preset's, or objects)"
    )
    p.add_argument(
        "--concurrency",
        "--workers",
        type=int,
        default=8,
        help="requests in flight (%(default)s); --workers is the older name",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds for one whole request, sending to the reply's last byte (%(default)s)",
    )
    p.add_argument(
        "--max-retries",
        type=int,
        default=8,
        help="times a failed request (HTTP 408/429/5xx, timeout, lost connection, reply "
        "without text) is sent again (%(default)s)",
    )
    p.add_argument(
        "--templates-only",
        action="store_true",
        help="no LLM: fill the dataset's (or generic) hand templates with the class names",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _run(args: argparse.Namespace) -> int:
    from ratta.describe import describe, read_class_names
    from ratta.presets import get_preset

    preset = get_preset(args.dataset) if args.dataset else None
    if args.classes:
        names = read_class_names(args.classes)
        reads = Read.of(args.classes, "--classes")
    elif preset is not None:
        names, reads = _dataset_classes(args.dataset, args.data_root)
    else:
        raise RattaInputError("describe needs the class names: give --classes FILE")
    kind = args.kind or (preset.kind if preset else "objects")
    templates = None
    if args.templates_only:
        templates = preset.templates if preset else GENERIC_TEMPLATES[kind]
    run = describe(
        names,
        args.out,
        kind=kind,
        llm_url=args.llm_url,
        llm_model=args.llm_model,
        per_prompt=args.per_prompt,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
        seed=args.seed,
        concurrency=args.concurrency,
        templates=templates,
        timeout=args.timeout,
        max_retries=args.max_retries,
        progress=not args.quiet,
        reads=reads,
    )
    manifest = run.manifest
    took = ""
    if manifest["mode"] == "llm":
        took = f"; {run.requests} requests, {run.retries} retries"
        if run.resumed_classes:
            took += f", {run.resumed_classes} classes resumed"
    print(
        f"wrote {args.out} ({manifest['classes']} classes, {manifest['descriptions']} "
        f"descriptions, {manifest['mode']}{took}) and {args.out}.manifest.json"
    )
    return 0


def _dataset_classes(dataset: str, data_root: str | None) -> tuple[list[str], list[Read]]:
    """Class names of ``dataset`` in label order, read from its files under ``data_root``,
    and what was read for them (the data root and the split files: no output may land there)."""
    if not data_root:
        raise RattaInputError(
            f"--dataset {dataset}: give --data-root DIR to read its class names, "
            "or --classes FILE (one name per line)"
        )
    from ratta.datasets import load_split

    split = load_split(dataset, data_root)
    return split.class_names, split.reads()
