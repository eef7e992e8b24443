"""Option groups shared by the commands, and what they turn into: backbone specs, backends.

Torch-free at import time: every heavy import waits until a command runs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from ratta.distributed import BACKENDS
from ratta.errors import RattaInputError

DECODE_WORKERS = min(4, os.cpu_count() or 1)


def command(
    sub: argparse._SubParsersAction,
    name: str,
    run: Callable[[argparse.Namespace], int],
    help: str,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``, which ``run`` runs (its exit status)."""
    p = sub.add_parser(name, help=help, description=description)
    p.set_defaults(func=run)
    return p


def command_group(
    sub: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse._SubParsersAction:
    """The subcommands of ``ratta name`` (``datasets``, ``db``); one is required."""
    p = sub.add_parser(name, help=help, description=description)
    return p.add_subparsers(dest=f"{name}_command", required=True)


def workers_arg(
    p: argparse.ArgumentParser, what: str = "image decoding/augmentation workers"
) -> None:
    """``--workers``: local decoding processes, or Ray workers with ``--backend ray``."""
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"{what} (default {DECODE_WORKERS}); with --backend ray: Ray workers, one model "
        "each (default 1)",
    )


def bars(args: argparse.Namespace, command: str) -> bool | str:
    """The ``progress`` of a command's stages: bars named after ``command`` (``db build``,
    ``run: text``), or none with ``--quiet``."""
    return False if args.quiet else command


def out_quiet_args(p: argparse.ArgumentParser, out: str, quiet: str | None = None) -> None:
    """``--out`` (required; ``out`` is its help) and ``--quiet``."""
    p.add_argument("--out", required=True, help=out)
    p.add_argument("--quiet", action="store_true", help=quiet)


def backbone_args(p: argparse.ArgumentParser) -> None:
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


def dataset_args(p: argparse.ArgumentParser) -> None:
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


def extract_args(p: argparse.ArgumentParser) -> None:
    """The views and batching of an extraction (extract, run)."""
    p.add_argument("--views", type=int, default=100, help="random views V (%(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the views (%(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="test images per batch")
    p.add_argument("--forward-batch", type=int, default=256, help="crops per model forward")
    workers_arg(p)
    p.add_argument(
        "--feature-dtype",
        default="float16",
        choices=("float16", "float32"),
        help="stored dtype of the features (%(default)s)",
    )


def compute_args(p: argparse.ArgumentParser, profile: bool = False) -> None:
    """``--tf32`` (and ``--profile`` for the commands that adapt): CUDA numerics and timing."""
    p.add_argument(
        "--tf32",
        action="store_true",
        help="on CUDA, let float32 products and convolutions round to TF32: faster, but "
        "results differ from full precision by ~1e-3 (off by default)",
    )
    if profile:
        p.add_argument(
            "--profile",
            action="store_true",
            help="on CUDA, wait for the device at every stage boundary, so that the stage "
            "times of the summary are exact (costs a synchronisation per stage)",
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


def pipeline_args(p: argparse.ArgumentParser, workers: bool = True) -> None:
    """Options of the commands that chain stages through the cache (run, eval, sweep),
    the Ray flags included; ``workers``: also add ``--workers``."""
    if workers:
        workers_arg(p)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (%(default)s)")
    compute_args(p, profile=True)
    p.add_argument(
        "--cache", default=None, help="cache folder (default: $RATTA_CACHE or ~/.cache/ratta)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="recompute cached features, text and finished cells even if their inputs match",
    )
    out_quiet_args(p, "output folder", "no progress bars")
    backend_args(p)


def hyperparameter_args(p: argparse.ArgumentParser) -> None:
    """K_D, K_S, q and min_desc for run, eval and sweep; unset ones take the paper's
    defaults, q the dataset preset's."""
    from ratta.config import RATTAConfig

    d = RATTAConfig()
    g = p.add_argument_group("RA-TTA hyperparameters")
    g.add_argument("--k-d", type=int, default=None, help=f"K_D top descriptions ({d.k_d})")
    g.add_argument("--k-s", type=int, default=None, help=f"K_S images per set ({d.k_s})")
    g.add_argument(
        "--quantile",
        type=float,
        default=None,
        help="q (default: the dataset preset's, 0.9 for the ImageNet family, else 0.75)",
    )
    g.add_argument("--min-desc", type=int, default=None, help=f"min_desc ({d.min_desc})")


def hyperparameters(args: argparse.Namespace) -> dict[str, Any]:
    """The hyperparameters set on the command line (``k_d``, ``k_s``, ``quantile``,
    ``min_desc``), each None when unset."""
    return {k: getattr(args, k) for k in ("k_d", "k_s", "quantile", "min_desc")}


def backbone_spec(args: argparse.Namespace) -> Any:
    """The ``BackboneSpec`` of the backbone flags."""
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


def model_device(args: argparse.Namespace, backend: Any) -> str:
    """Where the driver loads the model: ``--device`` locally; on Ray the CPU, since the
    workers get their copy on their own device (the driver may have no GPU)."""
    from ratta.devices import resolve_device

    if backend is None:
        return str(resolve_device(args.device))
    return "cpu"  # ray_backend checked --device against the workers


def pipeline_backend(args: argparse.Namespace) -> dict[str, Any]:
    """``backend``, ``device``, ``workers``, ``tf32`` and ``profile`` of ``run()`` for run,
    eval and sweep: locally this machine's device; on Ray the workers' (the driver needs
    none)."""
    from ratta.devices import resolve_device

    backend = ray_backend(args, local_workers=True)  # checks --device against the workers
    device = str(resolve_device(args.device)) if backend is None else args.device
    return {
        "backend": backend,
        "device": device,
        "workers": decode_workers(args, backend),
        "tf32": args.tf32,
        "profile": args.profile,
    }
