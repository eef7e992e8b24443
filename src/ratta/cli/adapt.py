"""``ratta adapt``: RA-TTA on precomputed embeddings (``ratta.adapt.adapt``)."""

from __future__ import annotations

import argparse

from ratta.cli.options import backend_args, bars, command, compute_args, ray_backend
from ratta.cli.report import format_results, print_shards
from ratta.config import RATTAConfig


def register(sub: argparse._SubParsersAction) -> None:
    d = RATTAConfig()
    p = command(
        sub,
        "adapt",
        _run_adapt,
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
    p.add_argument(
        "--db-placement",
        default="auto",
        choices=("auto", "device", "streamed"),
        help="exact search: the rows on the device as stored, or streamed from host memory "
        "at every search; auto streams on a GPU without room for them (%(default)s)",
    )
    p.add_argument(
        "--save-retrieved",
        action="store_true",
        help="also keep what each prediction rests on: the retrieved database rows of each "
        "candidate set and the top description rows (for ratta explain)",
    )
    compute_args(p, profile=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    backend_args(p, workers=True)


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
        progress=bars(args, "adapt"),
        backend=ray_backend(args),
        tf32=args.tf32,
        profile=args.profile,
        db_placement=args.db_placement,
        save_retrieved=args.save_retrieved,
    )
    print(format_results(summary))
    print_shards(summary)
    print(f"wrote {args.out} and {args.out}.json")
    return 0
