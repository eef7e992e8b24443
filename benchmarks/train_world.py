"""Train the generated world's small CLIP and print how long it took (target: <= 15 min on
a 2-core CPU), the loss per epoch and the size of the weights.

    .venv/bin/python benchmarks/train_world.py            # rewrites the shipped weights
    .venv/bin/python benchmarks/train_world.py --out /tmp/w.safetensors --epochs 4

With the defaults it reproduces ``src/ratta/world/ratta-world-clip.safetensors``: the same
tensors (the metadata records this run's times and load average). Options are the fields of
``ratta.world.train.TrainSettings`` and the world's seed and corpus size.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict

from ratta.world.model import WEIGHTS
from ratta.world.train import TrainSettings, train_weights
from ratta.world.write import WorldSettings


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(WEIGHTS), help="weights file (default: the shipped one)")
    p.add_argument("--world", default=None, help="keep the generated world here (default: temp)")
    p.add_argument("--world-seed", type=int, default=WorldSettings.seed)
    p.add_argument("--corpus-size", type=int, default=WorldSettings.corpus_size)
    defaults = TrainSettings()
    for name, value in asdict(defaults).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = p.parse_args()
    settings = TrainSettings(**{name: getattr(args, name) for name in asdict(defaults)})
    world = WorldSettings(seed=args.world_seed, corpus_size=args.corpus_size)
    info = train_weights(args.out, settings, world, args.world)
    log = info["log"]
    print(
        f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB): {log['seconds']:.0f} s "
        f"training ({log['cpu_seconds']:.0f} s CPU) + {info['prepare_seconds']:.0f} s corpus, "
        f"load average {info['load_average']['start'][0]:.2f} -> "
        f"{info['load_average']['end'][0]:.2f}"
    )


if __name__ == "__main__":
    main()
