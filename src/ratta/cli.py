"""Command line: a thin layer over the Python API (``ratta.adapt``, ``ratta.demo``)."""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ratta import __version__
from ratta.atomic import write_text_atomic
from ratta.config import RATTAConfig
from ratta.datasets.cli import add_parser as _add_datasets
from ratta.db.cli import add_parser as _add_db
from ratta.describe import add_parser as _add_describe
from ratta.distributed import BACKENDS
from ratta.errors import RattaInputError
from ratta.resources import keep_freed_memory

EXIT_USAGE = 2
DECODE_WORKERS = min(4, os.cpu_count() or 1)


def _add_adapt(sub: argparse._SubParsersAction) -> None:
    d = RATTAConfig()
    p = sub.add_parser(
        "adapt",
        help="run RA-TTA on precomputed embeddings",
        description="Adapt the predictions of a features file with RA-TTA (method.md steps 1-9).",
    )
    p.add_argument("--features", required=True, help="features .safetensors (image, views, labels)")
    p.add_argument("--text", required=True, help="text .safetensors (classifier, desc, ...)")
    p.add_argument("--db", required=True, help="image database: .npy [N, d] or a database folder")
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
        choices=("exact", "faiss", "index"),
        help="exact: BLAS scan (default); faiss: IndexFlatL2; index: the database "
        "directory's approximate index",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    backend_args(p, workers=True)
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


def _backbone_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (open_clip)")
    g.add_argument("--model", default="ViT-B-16", help="open_clip architecture (%(default)s)")
    g.add_argument(
        "--pretrained",
        default="openai",
        help="open_clip weight tag, or a local checkpoint file (%(default)s)",
    )
    g.add_argument(
        "--model-config",
        default=None,
        help="JSON architecture config (open_clip format) for a custom model",
    )
    g.add_argument(
        "--precision",
        default="fp32",
        choices=("fp32", "fp16", "bf16"),
        help="fp16/bf16: autocast on CUDA",
    )


def _dataset_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dataset",
        required=True,
        help="one of the 17 datasets, 'folder' (root/<class>/*) or 'csv'",
    )
    p.add_argument(
        "--data-root",
        required=True,
        help="data root (CoOp layout); the folder or the CSV file for folder/csv",
    )
    p.add_argument(
        "--class-names",
        default=None,
        help="csv datasets: file with one class name per line, in label order",
    )


def _extract_args(p: argparse.ArgumentParser, ray: bool = False) -> None:
    p.add_argument("--views", type=int, default=100, help="random views V (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="test images per batch")
    p.add_argument("--forward-batch", type=int, default=256, help="crops per model forward")
    if ray:
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help=f"image decoding/augmentation workers (default {DECODE_WORKERS}); with "
            "--backend ray: Ray workers, one model each (default 1)",
        )
    else:
        p.add_argument(
            "--workers",
            type=int,
            default=DECODE_WORKERS,
            help="image decoding/augmentation workers (%(default)s)",
        )
    p.add_argument(
        "--feature-dtype",
        default="float16",
        choices=("float16", "float32"),
        help="stored dtype of the features (%(default)s)",
    )


def backend_args(p: argparse.ArgumentParser, workers: bool = False) -> None:
    """``--backend`` and the Ray flags; ``workers``: also add ``--workers`` (Ray workers)."""
    g = p.add_argument_group("scale-out on Ray (docs/ray.md)")
    g.add_argument(
        "--backend",
        default="local",
        choices=BACKENDS,
        help="local: this process (default); ray: shards of the work on Ray workers",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="auto (this machine's cluster), HOST:PORT of a head node or ray://HOST:PORT; "
        "default: $RAY_ADDRESS, else a Ray instance started on this machine",
    )
    g.add_argument(
        "--num-gpus-per-worker",
        type=float,
        default=0.0,
        help="GPUs reserved per Ray worker; > 0 runs the workers on CUDA (%(default)s)",
    )
    g.add_argument(
        "--num-cpus-per-worker",
        type=float,
        default=1.0,
        help="CPUs reserved per Ray worker: its torch threads; a GPU worker decodes "
        "images in all but one of them (%(default)s)",
    )
    g.add_argument(
        "--max-retries",
        type=int,
        default=3,
        help="retries of a shard whose Ray worker died or failed (%(default)s)",
    )
    if workers:
        g.add_argument(
            "--workers", type=int, default=None, help="Ray workers with --backend ray (default 1)"
        )


def ray_backend(args: argparse.Namespace, local_workers: bool = False) -> Any:
    """The ``RayBackend`` of the flags, or None for ``--backend local``.

    ``local_workers``: ``--workers`` also means something locally (decoding processes).
    """
    from ratta.distributed import RayBackend, connect

    if args.backend == "ray":
        backend = RayBackend(
            address=args.ray_address,
            workers=1 if args.workers is None else args.workers,
            num_cpus_per_worker=args.num_cpus_per_worker,
            num_gpus_per_worker=args.num_gpus_per_worker,
            max_retries=args.max_retries,
        )
        if getattr(args, "device", None) is not None:  # db select has no --device
            backend.check_device(args.device)  # before the seconds of starting Ray
        connect(backend)  # a missing Ray or a wrong address fails before any work
        return backend
    defaults = RayBackend()
    for flag, value, default in (
        ("--ray-address", args.ray_address, None),
        ("--num-gpus-per-worker", args.num_gpus_per_worker, defaults.num_gpus_per_worker),
        ("--num-cpus-per-worker", args.num_cpus_per_worker, defaults.num_cpus_per_worker),
        ("--max-retries", args.max_retries, defaults.max_retries),
        ("--workers", None if local_workers else args.workers, None),
    ):
        if value != default:
            raise RattaInputError(f"{flag} applies to --backend ray (add --backend ray)")
    return None


def decode_workers(args: argparse.Namespace, backend: Any) -> int:
    """Image decoding processes: ``--workers`` locally; per Ray worker, all its CPUs but one
    on a GPU worker (decoding feeds the GPU) and none on a CPU worker (encoding a crop on
    the CPU costs ~50x decoding it: its CPUs are better spent as torch threads)."""
    if backend is not None:
        return max(0, int(backend.num_cpus_per_worker) - 1) if backend.device == "cuda" else 0
    return DECODE_WORKERS if args.workers is None else int(args.workers)


def print_shards(summary: dict[str, Any]) -> None:
    if "shards" in summary:
        print(f"shards: {summary['shards']['summary']}")


def print_encoding_report(summary: dict[str, Any], kept_in: str, listed: int = 10) -> None:
    """The images an encoding run skipped (the first ``listed``), then its shard line."""
    skipped = summary["skipped_images"]
    for item in skipped[:listed]:
        print(f"  skipped {item['path']}: {item['error']}")
    if len(skipped) > listed:
        print(f"  ... and {len(skipped) - listed:,} more ({kept_in})")
    print_shards(summary)


def _pipeline_args(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """Options of the commands that chain stages through the cache (run, eval, sweep),
    the Ray flags included; ``workers``: also add ``--workers``."""
    if workers:
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help=f"image decoding/augmentation workers (default {DECODE_WORKERS}); with "
            "--backend ray: Ray workers, one model each (default 1)",
        )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (%(default)s)")
    p.add_argument(
        "--cache", default=None, help="cache folder (default: $RATTA_CACHE or ~/.cache/ratta)"
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    backend_args(p)


def pipeline_backend(args: argparse.Namespace) -> dict[str, Any]:
    """``backend``, ``device`` and ``workers`` of ``run()`` for run, eval and sweep: locally
    this machine's device; on Ray the workers' (the driver needs none)."""
    from ratta.adapt import resolve_device

    backend = ray_backend(args, local_workers=True)  # checks --device against the workers
    device = str(resolve_device(args.device)) if backend is None else args.device
    return {"backend": backend, "device": device, "workers": decode_workers(args, backend)}


def _spec(args: argparse.Namespace) -> Any:
    from ratta.backbones import BackboneSpec

    model = args.model
    if args.model_config and model == "ViT-B-16":  # the default does not apply to a config
        model = None
    return BackboneSpec(
        model=model,
        pretrained=args.pretrained,
        model_config=args.model_config,
        precision=args.precision,
    )


def _add_extract(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "extract",
        help="encode test images and their random views",
        description="Write the features file (image, views, labels) of a "
        "dataset's test split; resumable.",
    )
    _dataset_args(p)
    _backbone_args(p)
    _extract_args(p, ray=True)
    p.add_argument(
        "--chunk-size", type=int, default=256, help="images per resumable chunk (a Ray shard)"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, help="features .safetensors (summary at OUT.json)")
    p.add_argument("--quiet", action="store_true")
    backend_args(p)
    p.set_defaults(func=_run_extract)


def model_device(args: argparse.Namespace, backend: Any) -> str:
    """Where the driver loads the model: ``--device`` locally; on Ray the CPU, since the
    workers get their copy on their own device (the driver may have no GPU)."""
    from ratta.adapt import resolve_device

    if backend is None:
        return str(resolve_device(args.device))
    return "cpu"  # ray_backend checked --device against the workers


def _run_extract(args: argparse.Namespace) -> int:
    from ratta.backbones import load_backbone
    from ratta.datasets import load_split
    from ratta.extract import ExtractSettings, extract_features

    settings = ExtractSettings(views=args.views, seed=args.seed, dtype=args.feature_dtype)
    backend = ray_backend(args, local_workers=True)
    keep_freed_memory()
    split = load_split(args.dataset, args.data_root, csv_classes=args.class_names)
    backbone = load_backbone(_spec(args), model_device(args, backend))
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
        progress=not args.quiet,
        backend=backend,
    )
    print(
        f"{summary['images']} images x (1 + {summary['views']}) crops, "
        f"{summary['skipped']} skipped, {summary['timings_s']['total']:.1f} s; wrote {args.out}"
    )
    print_encoding_report(summary, f"all listed in {args.out}.json")
    return 0


def _add_text(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "text",
        help="encode the CuPL classifier and description rows",
        description="Write the text features file of a dataset.",
    )
    _dataset_args(p)
    _backbone_args(p)
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
    p.add_argument("--out", required=True, help="text .safetensors (summary at OUT.json)")
    p.set_defaults(func=_run_text)


def _run_text(args: argparse.Namespace) -> int:
    from ratta.adapt import resolve_device
    from ratta.backbones import load_backbone
    from ratta.datasets import load_split
    from ratta.run import dataset_preset, resolve_descriptions
    from ratta.text import build_text_features

    preset = dataset_preset(args.dataset, args.preset)
    names = load_split(args.dataset, args.data_root, csv_classes=args.class_names).class_names
    desc = resolve_descriptions(args.descriptions, preset)
    backbone = load_backbone(_spec(args), resolve_device(args.device))
    summary = build_text_features(
        names,
        desc,
        preset.templates,
        preset.pre,
        backbone,
        args.out,
        allow_missing=args.allow_missing,
        metadata={"dataset": args.dataset},
    )
    print(
        f"{summary['classes']} classes, {summary['description_rows']} description rows, "
        f"logit scale {summary['logit_scale']:.2f}; wrote {args.out}"
    )
    return 0


def _add_run(sub: argparse._SubParsersAction) -> None:
    d = RATTAConfig()
    p = sub.add_parser(
        "run",
        help="extract -> text -> adapt for one dataset, cached",
        description="Run the whole pipeline on a dataset; expensive features are "
        "cached by content and reused.",
    )
    _dataset_args(p)
    _backbone_args(p)
    _extract_args(p, ray=True)
    p.add_argument("--db", required=True, help="image database: .npy or a database folder")
    p.add_argument("--descriptions", default="auto", help="CuPL JSON file or 'auto'")
    p.add_argument("--preset", default=None, help="text preset for custom datasets")
    p.add_argument("--allow-missing", action="store_true")
    p.add_argument("--k-d", type=int, default=d.k_d)
    p.add_argument("--k-s", type=int, default=d.k_s)
    p.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="q (default: the dataset preset's, 0.9 for the ImageNet family)",
    )
    p.add_argument("--min-desc", type=int, default=d.min_desc)
    p.add_argument("--adapt-batch-size", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    _pipeline_args(p, workers=False)
    p.set_defaults(func=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from ratta.extract import ExtractSettings
    from ratta.run import dataset_preset, run

    keep_freed_memory()
    quantile = args.quantile
    if quantile is None:
        quantile = dataset_preset(args.dataset, args.preset).quantile
    config = RATTAConfig(k_d=args.k_d, k_s=args.k_s, quantile=quantile, min_desc=args.min_desc)
    summary = run(
        args.dataset,
        args.data_root,
        args.db,
        args.out,
        backbone=_spec(args),
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
        progress=not args.quiet,
        **pipeline_backend(args),
    )
    table = format_results(summary)
    write_text_atomic(Path(args.out) / "results.md", f"# {args.dataset}\n\n```\n{table}\n```\n")
    c = summary["cache"]
    print(table)
    print(f"features {'reused' if c['features_reused'] else 'computed'}: {c['features']}")
    print(f"text {'reused' if c['text_reused'] else 'computed'}: {c['text']}")
    print_shards(summary)
    print(f"wrote {Path(args.out) / 'predictions.safetensors'}, results.json and results.md")
    return 0


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="RA-TTA and baselines over datasets and seeds, with reports",
        description="Run every (dataset, seed) cell (cached, resumable) and write "
        "results.csv/json/md and plots.",
    )
    p.add_argument("--datasets", nargs="+", required=True, help="dataset names, or 'all'")
    p.add_argument("--data-root", required=True)
    p.add_argument(
        "--db-root",
        required=True,
        help="folder of databases: <dataset>.npy or <dataset>/ (ImageNet, -V2 and "
        "-Sketch share imagenet's)",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    _backbone_args(p)
    p.add_argument("--views", type=int, default=100)
    p.add_argument(
        "--descriptions",
        default="auto",
        help="'auto', or a folder holding CuPL_prompts_<dataset>.json files",
    )
    p.add_argument("--k-d", type=int, default=None)
    p.add_argument("--k-s", type=int, default=None)
    p.add_argument("--quantile", type=float, default=None, help="default: the dataset's")
    p.add_argument("--min-desc", type=int, default=None)
    _pipeline_args(p)
    p.set_defaults(func=_run_eval)


def _run_eval(args: argparse.Namespace) -> int:
    from ratta.evaluate import ALL_DATASETS, EvalSettings, evaluate

    keep_freed_memory()
    datasets = list(ALL_DATASETS) if args.datasets == ["all"] else args.datasets
    report = evaluate(
        datasets,
        args.data_root,
        args.db_root,
        args.seeds,
        args.out,
        backbone=_spec(args),
        settings=EvalSettings(
            views=args.views,
            descriptions=args.descriptions,
            k_d=args.k_d,
            k_s=args.k_s,
            quantile=args.quantile,
            min_desc=args.min_desc,
        ),
        cache=args.cache,
        progress=not args.quiet,
        log=None if args.quiet else print,
        **pipeline_backend(args),
    )
    print(Path(args.out, "results.md").read_text())
    print(
        f"{report['cells_computed']} cells computed, {report['cells_reused']} reused, "
        f"{len(report['failures'])} failed; wrote {args.out}/results.csv, results.json, "
        "results.md, plots/"
    )
    return 1 if report["failures"] else 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep",
        help="accuracy against one hyperparameter, on cached features",
        description="Adapt once per value of --param (k_d, k_s, quantile, "
        "min_desc or views), reusing one extraction.",
    )
    p.add_argument(
        "--param", required=True, choices=("k_d", "k_s", "quantile", "min_desc", "views")
    )
    p.add_argument("--values", nargs="+", type=float, required=True)
    _dataset_args(p)
    _backbone_args(p)
    p.add_argument("--db", required=True, help="image database: .npy or a database folder")
    p.add_argument("--views", type=int, default=100, help="views extracted (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--descriptions", default="auto")
    _pipeline_args(p)
    p.set_defaults(func=_run_sweep)


def _run_sweep(args: argparse.Namespace) -> int:
    from ratta.evaluate import sweep

    keep_freed_memory()
    results = sweep(
        args.param,
        args.values,
        args.dataset,
        args.data_root,
        args.db,
        args.out,
        backbone=_spec(args),
        views=args.views,
        seed=args.seed,
        descriptions=args.descriptions,
        cache=args.cache,
        **pipeline_backend(args),
    )
    print(f"{'value':>10}{'CuPL':>9}{'retrieval':>11}{'RA-TTA':>9}")
    for r in results:
        print(
            f"{r['value']:>10g}{r['cupl_top1']:>9.2f}{r['retrieval_top1']:>11.2f}"
            f"{r['ratta_top1']:>9.2f}"
        )
    print(f"wrote {args.out}/sweep_{args.param}.csv, .json and .png")
    return 0


# Each stage registers its subcommand: add_parser(subparsers) sets ``func`` on its parser.
SUBCOMMANDS = [
    _add_adapt,
    _add_extract,
    _add_text,
    _add_run,
    _add_eval,
    _add_sweep,
    _add_demo,
    _add_describe,
    _add_datasets,
    _add_db,
]


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
        backend=ray_backend(args),
    )
    print(format_results(summary))
    print_shards(summary)
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
        print(
            "ratta: interrupted; no partial output files were left "
            "(extract and describe resume from their saved progress)",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    sys.exit(main())
