"""Host synchronisations and bytes moved per image of `ratta adapt` on a GPU, at paper scale.

No GPU needed: the adaptation runs with ``device="cuda"`` on the simulated device of
tests/simcuda.py (every tensor stays on the CPU, the simulation counts what a GPU run would
do), on the paper-scale synthetic case of bench_adapt.py: 1,000 test images x 101
embeddings, 5,684 description rows, a 336,551 x 512 float16 database, batches of 256.

Printed per test image: host synchronisations (the host waiting for the device: values read
into Python, data-sized outputs such as ``nonzero``, blocking copies, explicit
synchronisations), host-to-device and device-to-host copies and their bytes, loading included
(the database's copy to the device is most of the bytes); then the same per batch, loading
excluded, and the sites that synchronise most. Runs the code it is imported with, so the
figures of an older version come from running this file against that version's sources.

Usage: python benchmarks/bench_syncs.py [--images 1000] [--batch-size 256] [--search exact]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_adapt import ensure_data  # noqa: E402
from simcuda import SimulatedCuda  # noqa: E402

import ratta.adapt  # noqa: E402


def run(paths: dict[str, Path], images: int, batch_size: int, search: str) -> dict:
    """Counts of one simulated adaptation, split into loading and the batches."""
    from safetensors import safe_open

    from ratta.files import save_safetensors

    with tempfile.TemporaryDirectory() as tmp:
        features = Path(tmp) / "features.safetensors"
        with safe_open(str(paths["features"]), framework="pt") as f:
            save_safetensors(
                features, {k: f.get_slice(k)[:images] for k in ("image", "views", "labels")}
            )
        gpu = SimulatedCuda()
        marks: list[tuple[int, int, int, int, int]] = []
        batch = getattr(ratta.adapt, "_adapt_batch", None) or ratta.adapt._adapt_range

        def counted(*args, **kwargs):
            c = gpu.counts
            marks.append((len(c.syncs), len(c.h2d), c.h2d_bytes, len(c.d2h), c.d2h_bytes))
            return batch(*args, **kwargs)

        name = "_adapt_batch" if hasattr(ratta.adapt, "_adapt_batch") else "_adapt_range"
        setattr(ratta.adapt, name, counted)
        try:
            with gpu:
                summary = ratta.adapt.adapt(
                    features,
                    paths["text"],
                    paths["db"],
                    Path(tmp) / "pred.safetensors",
                    batch_size=batch_size,
                    device="cuda",
                    search=search,
                )
        finally:
            setattr(ratta.adapt, name, batch)
    c = gpu.counts
    total = (len(c.syncs), len(c.h2d), c.h2d_bytes, len(c.d2h), c.d2h_bytes)
    batches = len(marks)
    per_batch = [(total[i] - marks[0][i]) / batches for i in range(5)]
    sites = Counter(f"{e.site} {e.what}" for e in c.syncs[marks[0][0] :]).most_common()
    return {
        "images": images,
        "batches": batches,
        "database_rows": summary["counts"]["database"],
        "per_image": {
            "syncs": total[0] / images,
            "h2d_copies": total[1] / images,
            "h2d_bytes": total[2] / images,
            "d2h_copies": total[3] / images,
            "d2h_bytes": total[4] / images,
        },
        "per_batch_after_loading": dict(
            zip(
                ("syncs", "h2d_copies", "h2d_bytes", "d2h_copies", "d2h_bytes"),
                per_batch,
                strict=True,
            )
        ),
        "loading": {"syncs": marks[0][0], "h2d_bytes": marks[0][2]},
        "sync_sites_per_batch": {site: n / batches for site, n in sites},
        "peak_device_mb": gpu.peak / 2**20,
        "float_atomics": len(c.atomics),
        "tf32_products": len(c.tf32),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--search", default="exact")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    r = run(ensure_data(), args.images, args.batch_size, args.search)
    pi, pb = r["per_image"], r["per_batch_after_loading"]
    print(
        f"simulated GPU, {r['images']} images in {r['batches']} batches of {args.batch_size}, "
        f"{r['database_rows']:,} x 512 float16 database, --search {args.search}"
    )
    print(
        f"  per image (loading included): {pi['syncs']:.3f} syncs, "
        f"{pi['h2d_copies']:.3f} H2D copies {pi['h2d_bytes'] / 1024:.1f} KiB, "
        f"{pi['d2h_copies']:.3f} D2H copies {pi['d2h_bytes'] / 1024:.2f} KiB"
    )
    print(
        f"  per batch (after loading):    {pb['syncs']:.1f} syncs, "
        f"{pb['h2d_copies']:.1f} H2D copies {pb['h2d_bytes'] / 2**20:.2f} MiB, "
        f"{pb['d2h_copies']:.1f} D2H copies {pb['d2h_bytes'] / 2**20:.2f} MiB"
    )
    print(
        f"  loading: {r['loading']['syncs']} syncs, {r['loading']['h2d_bytes'] / 2**20:.0f} MiB "
        f"to the device; peak device memory {r['peak_device_mb']:.0f} MiB; "
        f"float atomics {r['float_atomics']}, TF32 products {r['tf32_products']}"
    )
    print("  most frequent waits per batch:")
    for site, n in list(r["sync_sites_per_batch"].items())[:8]:
        print(f"    {n:7.1f}  {site}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))


if __name__ == "__main__":
    main()
