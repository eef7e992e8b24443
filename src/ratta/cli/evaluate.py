"""``ratta eval`` and ``ratta sweep``: many cells of the pipeline, with reports
(``ratta.evaluate``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ratta.cli.options import (
    backbone_args,
    backbone_spec,
    bars,
    command,
    dataset_args,
    hyperparameter_args,
    hyperparameters,
    pipeline_args,
    pipeline_backend,
)
from ratta.errors import RattaInputError
from ratta.resources import keep_freed_memory
from ratta.summary import format_times


def register(sub: argparse._SubParsersAction) -> None:
    _add_eval(sub)
    _add_sweep(sub)


def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "eval",
        _run_eval,
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
    backbone_args(p)
    p.add_argument("--views", type=int, default=100)
    p.add_argument(
        "--descriptions",
        default="auto",
        help="'auto', or a folder holding CuPL_prompts_<dataset>.json files",
    )
    hyperparameter_args(p)
    pipeline_args(p)


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
        backbone=backbone_spec(args),
        settings=EvalSettings(
            views=args.views, descriptions=args.descriptions, **hyperparameters(args)
        ),
        cache=args.cache,
        progress=bars(args, "eval"),
        log=None if args.quiet else print,
        force=args.force,
        **pipeline_backend(args),
    )
    print(Path(args.out, "results.md").read_text())
    print(
        f"{report['cells_computed']} cells computed, {report['cells_reused']} reused, "
        f"{len(report['failures'])} failed; wrote {args.out}/results.csv, results.json, "
        "results.md, plots/"
    )
    print(format_times(report["seconds"], report["stage_seconds"]))
    return 1 if report["failures"] else 0


def _add_sweep(sub: argparse._SubParsersAction) -> None:
    p = command(
        sub,
        "sweep",
        _run_sweep,
        help="accuracy against one hyperparameter, on cached features",
        description="Adapt once per value of --param (k_d, k_s, quantile, "
        "min_desc or views), reusing one extraction.",
    )
    p.add_argument(
        "--param", required=True, choices=("k_d", "k_s", "quantile", "min_desc", "views")
    )
    p.add_argument("--values", nargs="+", type=float, required=True)
    dataset_args(p)
    backbone_args(p)
    p.add_argument("--db", required=True, help="image database: .npy or a database folder")
    p.add_argument("--views", type=int, default=100, help="views extracted (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--descriptions", default="auto")
    hyperparameter_args(p)
    pipeline_args(p)


def _run_sweep(args: argparse.Namespace) -> int:
    from ratta.evaluate import EvalSettings, sweep

    keep_freed_memory()
    fixed = hyperparameters(args)
    if fixed.get(args.param) is not None:
        raise RattaInputError(f"--{args.param.replace('_', '-')} is the swept --param")
    results = sweep(
        args.param,
        args.values,
        args.dataset,
        args.data_root,
        args.db,
        args.out,
        backbone=backbone_spec(args),
        views=args.views,
        seed=args.seed,
        descriptions=args.descriptions,
        config=EvalSettings(**fixed).config(args.dataset),
        cache=args.cache,
        progress=bars(args, "sweep"),
        force=args.force,
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
