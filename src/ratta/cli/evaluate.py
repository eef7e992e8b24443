"""``ratta eval`` and ``ratta sweep``: many cells of the pipeline, with reports
(``ratta.evaluate``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

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

# ratta.evaluate.ALL_METHODS, written out: building the parser must not import torch
METHODS = (
    "clip",
    "ensemble",
    "cupl",
    "retrieval",
    "ratta",
    "zero",
    "mta",
    "tda",
    "boostadapter",
    "dmn_zs",
)


def register(sub: argparse._SubParsersAction) -> None:
    _add_eval(sub)
    _add_sweep(sub)


def peer_args(p: argparse.ArgumentParser) -> None:
    """The online peers' streams and DMN-ZS's oracle (eval, sweep)."""
    g = p.add_argument_group("training-free peers (docs/peers.md)")
    g.add_argument(
        "--streams",
        type=int,
        default=3,
        help="seeded orders of the test set each online peer (TDA, BoostAdapter, DMN-ZS) "
        "runs over; reports give mean ± std (%(default)s)",
    )
    g.add_argument(
        "--stream-correlation",
        type=float,
        default=None,
        metavar="GAMMA",
        help="class-correlated streams (StatA's Dirichlet sampler, e.g. 0.1, 0.01, 0.001) "
        "instead of uniform shuffles",
    )
    g.add_argument(
        "--dmn-oracle",
        action="store_true",
        help="also report DMN-ZS with gamma searched on the test labels, as its paper did "
        "(marked as an oracle)",
    )


def _peer_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "streams": args.streams,
        "stream_correlation": args.stream_correlation,
        "dmn_oracle": args.dmn_oracle,
    }


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
        default=None,
        help="folder of databases: <dataset>.npy or <dataset>/ (ImageNet, -V2 and "
        "-Sketch share imagenet's); needed for retrieval and ratta",
    )
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to compute and report, among {', '.join(METHODS)} (default: all)",
    )
    backbone_args(p)
    p.add_argument("--views", type=int, default=100)
    p.add_argument(
        "--descriptions",
        default="auto",
        help="'auto', or a folder holding CuPL_prompts_<dataset>.json files",
    )
    hyperparameter_args(p)
    peer_args(p)
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
            views=args.views,
            descriptions=args.descriptions,
            **hyperparameters(args),
            methods=tuple(args.methods),
            **_peer_settings(args),
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
        "min_desc or views), or run a peer once per value of one of its hyperparameters "
        "(tda.alpha_pos, ...), reusing one extraction.",
    )
    p.add_argument(
        "--param",
        required=True,
        help="RA-TTA's k_d, k_s, quantile, min_desc or views, or a peer's: "
        "<method>.<name> such as zero.gamma, mta.lambda_y, tda.alpha_pos, "
        "boostadapter.delta, dmn_zs.beta (all of them: docs/peers.md)",
    )
    p.add_argument("--values", nargs="+", type=float, required=True)
    dataset_args(p)
    backbone_args(p)
    p.add_argument(
        "--db",
        default=None,
        help="image database: .npy or a database folder (RA-TTA's parameters)",
    )
    p.add_argument("--views", type=int, default=100, help="views extracted (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--descriptions", default="auto")
    hyperparameter_args(p)
    peer_args(p)
    pipeline_args(p)


def _run_sweep(args: argparse.Namespace) -> int:
    from ratta.evaluate import EvalSettings, sweep
    from ratta.peer_stage import PEER_PARAMS, PeerSettings

    keep_freed_memory()
    fixed = hyperparameters(args)
    if fixed.get(args.param) is not None:
        raise RattaInputError(f"--{args.param.replace('_', '-')} is the swept --param")
    peer = args.param in PEER_PARAMS
    settings = EvalSettings(**fixed, **_peer_settings(args))
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
        config=settings.config(args.dataset),
        peers=PeerSettings(
            methods=(PEER_PARAMS[args.param].method,) if peer else (),
            streams=args.streams,
            correlation=args.stream_correlation,
            dmn_oracle=args.dmn_oracle,
        ),
        cache=args.cache,
        progress=bars(args, "sweep"),
        force=args.force,
        **pipeline_backend(args),
    )
    if peer:
        print(f"{'value':>10}  {'classifier':<10}{'top-1':>8}{'± std':>8}  method")
        for r in results:
            print(
                f"{r['value']:>10g}  {r['classifier']:<10}{r['top1']:>8.2f}"
                f"{r['top1_std']:>8.2f}  {r['label']}"
            )
        print(f"wrote {args.out}/sweep_{args.param}.csv, .json and .png")
        return 0
    print(f"{'value':>10}{'CuPL':>9}{'retrieval':>11}{'RA-TTA':>9}")
    for r in results:
        print(
            f"{r['value']:>10g}{r['cupl_top1']:>9.2f}{r['retrieval_top1']:>11.2f}"
            f"{r['ratta_top1']:>9.2f}"
        )
    print(f"wrote {args.out}/sweep_{args.param}.csv, .json and .png")
    return 0
