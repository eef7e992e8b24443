"""The world demo (``ratta demo``) timed and its figures recorded: the real pipeline from
pixels to top-1 on the generated image world, with the shipped small CLIP.

Runs ``ratta demo --dir OUT/demo`` twice as separate processes, into a fresh folder: the
first run generates the world and runs every command, the second finds every step cached.
Prints both wall times (interpreter start included), top-1 of CLIP with one template, CuPL,
retrieval only and RA-TTA, overall and per kind of shift (from the demo's ``results.json``,
itself computed from the per-image files), and what bounds RA-TTA here: how often the true
class survives among the candidates, how many candidates, fallbacks, lambda. Also the
weights' size and the training run recorded in their metadata.

    .venv/bin/python benchmarks/bench_world.py [--out bench-data/world --views 32 --seed 0]

Figures of 2026-11-30 (seeds 0-3) and what they say: docs/world.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file

from ratta.world.demo import METHOD_NAMES, METHODS
from ratta.world.model import WEIGHTS


def timed_demo(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ratta.cli", "demo", *argv], check=True)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench-data/world")
    p.add_argument("--weights", default=str(WEIGHTS))
    p.add_argument("--views", type=int, default=32)
    p.add_argument("--seed", type=int, default=0, help="the world's seed")
    args = p.parse_args()
    demo = Path(args.out) / "demo"
    shutil.rmtree(demo, ignore_errors=True)  # this script's own previous run: a cold start
    demo.parent.mkdir(parents=True, exist_ok=True)
    argv = ["--dir", str(demo), "--views", str(args.views), "--seed", str(args.seed)]
    argv += ["--weights", args.weights]
    first = timed_demo(argv)
    later = timed_demo(argv)

    results = json.loads((demo / "results.json").read_text())
    top1 = results["top1"]
    pred = load_file(str(demo / "run" / "predictions.safetensors"))
    labels, cand = pred["labels"], pred["candidates"]
    recall = 100 * float((cand == labels[:, None]).any(1).float().mean())
    n_cand = float((cand >= 0).sum(1).float().mean())
    fallback = int(((cand >= 0).sum(1) == 0).sum())
    with safe_open(args.weights, framework="pt") as f:
        training = json.loads(f.metadata()["ratta_world_training"])
    kinds = list(top1["shifts"])
    print(f"\n== world demo: {top1['images']} shifted test pictures x {args.views} views")
    print(f"{'top-1 %':<22}{'all':>8}" + "".join(f"{k:>10}" for k in kinds))
    for method in METHODS:
        cells = "".join(f"{top1[method][k]:10.2f}" for k in kinds)
        print(f"{METHOD_NAMES[method]:<22}{top1[method]['all']:8.2f}{cells}")
    print(
        f"RA-TTA - CuPL: {top1['ratta']['all'] - top1['cupl']['all']:+.2f} points; changed "
        f"{top1['changed']} predictions ({top1['changed_to_right']} to right, "
        f"{top1['changed_to_wrong']} to wrong)"
    )
    print(
        f"true class among the candidates {recall:.1f} %, mean candidates {n_cand:.2f}, "
        f"no candidate (fallback to zero-shot) {fallback}, mean lambda "
        f"{float(pred['lam'].mean()):.3f}"
    )
    print(f"demo wall time: first run {first:.1f} s, later run {later:.1f} s")
    log = training["log"]
    print(
        f"weights {os.path.getsize(args.weights) / 1e6:.2f} MB; trained {log['steps']} steps "
        f"({training['train']['epochs']} epochs) in {log['seconds']:.0f} s "
        f"({log['cpu_seconds']:.0f} s CPU), load average {training['load_average']['start'][0]}"
    )


if __name__ == "__main__":
    main()
