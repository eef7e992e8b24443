"""Extraction on the Ray backend: overhead over the local backend, throughput with 1 and 2 workers.

A ViT-B/32 with random weights (open_clip's architecture, saved to a local checkpoint) encodes
generated 500 x 375 JPEG images with V random views each (``extract_features`` end to end:
decoding, views, encoding, chunked writes, final assembly) against a Ray instance started once
(its start-up is timed apart: on a cluster it is already running). Two comparisons:

- overhead, ``--images`` images: local (this process, torch threads = cores, decoding
  in-process) against one Ray worker holding every core (the same threads, decoding
  in-process, as ``--backend ray`` does on CPU workers): the same resources and the same
  work, so the difference is the Ray backend's cost (target <= 10 %);
- scaling, ``--scaling-images`` images: one Ray worker of one core against two of one core
  each: the throughput a second worker adds.

Local runs use the allocator policy of ``ratta extract`` and of Ray workers
(``ratta.resources.keep_freed_memory``), so local and Ray runs differ by the backend alone;
``--glibc-default`` leaves this process at glibc's default policy instead (the local backend
as a library user gets it). ``--scaling-images 0`` skips the scaling runs.

Each Ray run pays a fixed start-up (a worker process importing torch and receiving the
model), reported as ``first_worker_ready_s``; figures are given end to end and without it.
Configurations run interleaved, ``--repeats`` rounds, medians reported. Outputs of runs with
the same torch threads are compared byte for byte.

Usage: python benchmarks/bench_ray.py [--images 64 --scaling-images 16 --views 15 --repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_extract import make_images, random_checkpoint

from ratta.backbones import BackboneSpec, load_backbone
from ratta.distributed import RayBackend
from ratta.extract import ExtractSettings, extract_features
from ratta.resources import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--scaling-images", type=int, default=16)
    ap.add_argument("--views", type=int, default=15)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--forward-batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument(
        "--glibc-default", action="store_true", help="local: glibc's default malloc policy"
    )
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not args.glibc_default:
        keep_freed_memory()

    import ray

    cores = os.cpu_count() or 1
    full = f"ray 1 x {cores}"
    # name: (images, backend, decoding processes)
    configs: dict[str, tuple[int, RayBackend | None, int]] = {
        "local": (args.images, None, 0),
        full: (args.images, RayBackend(workers=1, num_cpus_per_worker=cores), 0),
    }
    if args.scaling_images:
        one, two = RayBackend(workers=1), RayBackend(workers=2)
        configs["ray 1 x 1"] = (args.scaling_images, one, 0)
        configs["ray 2 x 1"] = (args.scaling_images, two, 0)
    wall: dict[str, list[float]] = {name: [] for name in configs}
    start_up: dict[str, list[float]] = {name: [] for name in configs}
    files: dict[str, bytes] = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_images(tmp / "imgs", max(args.images, args.scaling_images))
        ckpt = random_checkpoint(tmp, args.model)
        backbone = load_backbone(BackboneSpec(model=args.model, pretrained=str(ckpt)))
        started = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, logging_level="ERROR")
        ray_start = time.perf_counter() - started
        for r in range(args.repeats):
            for name, (images, backend, decoders) in configs.items():
                out = tmp / f"{name.replace(' ', '')}-{r}.safetensors"
                started = time.perf_counter()
                summary = extract_features(
                    paths[:images],
                    [0] * images,
                    backbone,
                    out,
                    ExtractSettings(views=args.views, seed=0),
                    forward_batch=args.forward_batch,
                    chunk_size=args.chunk_size,
                    workers=decoders,
                    backend=backend,
                )
                wall[name].append(time.perf_counter() - started)
                start_up[name].append(summary["shards"].get("first_worker_ready_s") or 0.0)
                files[name] = out.read_bytes()
                print(
                    f"  round {r + 1}: {name:<10} {wall[name][-1]:7.2f} s "
                    f"(first worker ready after {start_up[name][-1]:.2f} s)",
                    flush=True,
                )
        ray.shutdown()

    med = {name: statistics.median(t) for name, t in wall.items()}
    ready = {name: statistics.median(t) for name, t in start_up.items()}
    steady = {name: med[name] - ready[name] for name in configs}
    crops = {name: images * (1 + args.views) for name, (images, _, _) in configs.items()}
    result = {
        "model": args.model,
        "views": args.views,
        "chunk_size": args.chunk_size,
        "images": {name: images for name, (images, _, _) in configs.items()},
        "cores": cores,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "ray_instance_start_s": ray_start,
        "seconds": med,
        "first_worker_ready_s": ready,
        "crops_per_s": {name: crops[name] / t for name, t in med.items()},
        "glibc_default_local": args.glibc_default,
        "overhead_1_worker": med[full] / med["local"] - 1,
        "overhead_1_worker_after_start_up": steady[full] / steady["local"] - 1,
        "same_bytes": {f"local == {full}": files["local"] == files[full]},
    }
    if args.scaling_images:
        result["speedup_2_vs_1_worker"] = med["ray 1 x 1"] / med["ray 2 x 1"]
        result["speedup_2_vs_1_worker_after_start_up"] = steady["ray 1 x 1"] / steady["ray 2 x 1"]
        result["same_bytes"]["ray 1 x 1 == ray 2 x 1"] = files["ray 1 x 1"] == files["ray 2 x 1"]
    print(
        f"\n{args.model} random weights, CPU, (1 + {args.views}) crops per image, chunks of "
        f"{args.chunk_size} images, {cores} cores, median of {args.repeats}"
        + (", local at glibc's default malloc policy" if args.glibc_default else "")
    )
    print(f"{'configuration':<14}{'images':>7}{'seconds':>9}{'crops/s':>9}{'worker ready':>14}")
    for name, t in med.items():
        images = configs[name][0]
        ready_s = f"{ready[name]:.2f} s" if configs[name][1] else "-"
        print(f"{name:<14}{images:>7}{t:>9.2f}{crops[name] / t:>9.2f}{ready_s:>14}")
    print(
        f"Ray overhead at 1 worker, equal resources: {100 * result['overhead_1_worker']:+.1f} % "
        f"end to end, {100 * result['overhead_1_worker_after_start_up']:+.1f} % after the "
        f"worker's start-up (target <= 10 %)"
    )
    if args.scaling_images:
        print(
            f"2 workers vs 1 (1 core each): {result['speedup_2_vs_1_worker']:.2f}x end to end, "
            f"{result['speedup_2_vs_1_worker_after_start_up']:.2f}x after start-up"
        )
    print(f"starting a local Ray instance: {ray_start:.1f} s (once per process)")
    print("same bytes: " + ", ".join(f"{k}: {v}" for k, v in result["same_bytes"].items()))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
