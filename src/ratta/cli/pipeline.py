"""``ratta extract``, ``ratta text`` and ``ratta run``: the stages of one dataset, alone or
chained through the cache (``ratta.extract``, ``ratta.text``, ``ratta.run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ratta.cli.options import (
    backbone_args,
    backbone_spec,
    backend_args,
    bars,
    command,
    compute_args,
    dataset_args,
    decode_workers,
    extract_args,
    hyperparameter_args,
    hyperparameters,
    model_device,
    out_quiet_args,
    pipeline_args,
    pipeline_backend,
    ray_backend,
)
from ratta.cli.report import format_results, print_encoding_report, print_shards
from ratta.resources import keep_freed_memory


def register(sub: argparse._SubParsersAction) -> None:
    _add_extract(sub)
    _add_text(sub)
    _add_run(sub)


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "extract",
        _run_extract,
        help="encode test images and their random views",
        description="Write the features file (image, views, labels) of a "
        "dataset's test split; resumable.",
    )
    dataset_args(p)
    backbone_args(p)
    extract_args(p)
    p.add_argument(
        "--chunk-size", type=int, default=256, help="images per resumable chunk (a Ray shard)"
    )
    p.add_argument("--device", default="cpu")
    compute_args(p)
    out_quiet_args(p, "features .safetensors (summary at OUT.json)")
    backend_args(p)


def _run_extract(args: argparse.Namespace) -> int:
    from ratta.backbones import load_backbone
    from ratta.datasets import load_split
    from ratta.extract import ExtractSettings, extract_features

    settings = ExtractSettings(views=args.views, seed=args.seed, dtype=args.feature_dtype)
    backend = ray_backend(args, local_workers=True)
    keep_freed_memory()
    split = load_split(args.dataset, args.data_root, csv_classes=args.class_names)
    backbone = load_backbone(backbone_spec(args), model_device(args, backend), runs_on=args.device)
    summary = extract_features(
        [p for p, _ in split.items],
        [y for _, y in split.items],
        backbone,
        args.out,
        settings,
        batch_size=args.batch_size,
        forward_batch=args.forward_batch,
        workers=decode_workers(args, backend),
        chunk_size=args.chunk_size,
        metadata={"dataset": args.dataset, "split": split.fingerprint()},
        progress=bars(args, "extract"),
        backend=backend,
        reads=split.reads(),
        tf32=args.tf32,
    )
    print(
        f"{summary['images']} images x (1 + {summary['views']}) crops, "
        f"{summary['skipped']} skipped, {summary['timings_s']['total']:.1f} s; wrote {args.out}"
    )
    print_encoding_report(summary, f"all listed in {args.out}.json")
    return 0


def _add_text(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "text",
        _run_text,
        help="encode the CuPL classifier and description rows",
        description="Write the text features file of a dataset.",
    )
    dataset_args(p)
    backbone_args(p)
    p.add_argument(
        "--descriptions",
        default="auto",
        help="CuPL JSON file, or 'auto' for the published file (%(default)s)",
    )
    p.add_argument(
        "--preset",
        default=None,
        help="take templates and prefix from this dataset's preset (custom data)",
    )
    p.add_argument(
        "--allow-missing",
        action="store_true",
        help="classes without descriptions use the hand templates",
    )
    p.add_argument("--device", default="cpu")
    compute_args(p)
    out_quiet_args(p, "text .safetensors (summary at OUT.json)", "no progress bar")


def _run_text(args: argparse.Namespace) -> int:
    from ratta.backbones import load_backbone
    from ratta.datasets import load_split
    from ratta.devices import resolve_device
    from ratta.run import dataset_preset, resolve_descriptions
    from ratta.text import build_text_features

    preset = dataset_preset(args.dataset, args.preset)
    split = load_split(args.dataset, args.data_root, csv_classes=args.class_names)
    desc = resolve_descriptions(args.descriptions, preset)
    backbone = load_backbone(backbone_spec(args), resolve_device(args.device))
    summary = build_text_features(
        split.class_names,
        desc,
        preset.templates,
        preset.pre,
        backbone,
        args.out,
        allow_missing=args.allow_missing,
        metadata={"dataset": args.dataset},
        reads=split.reads(),
        progress=bars(args, "text"),
        tf32=args.tf32,
        peers=preset.name,
    )
    print(
        f"{summary['classes']} classes, {summary['description_rows']} description rows, "
        f"logit scale {summary['logit_scale']:.2f}; wrote {args.out}"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "run",
        _run_run,
        help="extract -> text -> adapt for one dataset, cached",
        description="Run the whole pipeline on a dataset; expensive features are "
        "cached by content and reused.",
    )
    dataset_args(p)
    backbone_args(p)
    extract_args(p)
    p.add_argument("--db", required=True, help="image database: .npy or a database folder")
    p.add_argument("--descriptions", default="auto", help="CuPL JSON file or 'auto'")
    p.add_argument("--preset", default=None, help="text preset for custom datasets")
    p.add_argument("--allow-missing", action="store_true")
    hyperparameter_args(p)
    p.add_argument("--adapt-batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    pipeline_args(p, workers=False)


def _run_run(args: argparse.Namespace) -> int:
    from ratta.evaluate import EvalSettings
    from ratta.extract import ExtractSettings
    from ratta.run import dataset_preset, run

    keep_freed_memory()
    preset = dataset_preset(args.dataset, args.preset)
    config = EvalSettings(**hyperparameters(args)).config(preset.name)
    summary = run(
        args.dataset,
        args.data_root,
        args.db,
        args.out,
        backbone=backbone_spec(args),
        settings=ExtractSettings(views=args.views, seed=args.seed, dtype=args.feature_dtype),
        descriptions=args.descriptions,
        preset=args.preset,
        class_names_file=args.class_names,
        allow_missing=args.allow_missing,
        config=config,
        cache=args.cache,
        batch_size=args.batch_size,
        forward_batch=args.forward_batch,
        adapt_batch_size=args.adapt_batch_size,
        dtype=args.dtype,
        progress=bars(args, "run"),
        force=args.force,
        **pipeline_backend(args),
    )
    c = summary["cache"]
    print(format_results(summary))
    print(f"features {c['features_reason']}: {c['features']}")
    print(f"text {c['text_reason']}: {c['text']}")
    print_shards(summary)
    print(f"wrote {Path(args.out) / 'predictions.safetensors'}, results.json and results.md")
    return 0
