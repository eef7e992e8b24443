"""``ratta demo``: a synthetic, offline end-to-end run of the adaptation stage."""

from __future__ import annotations

import tempfile
from pathlib import Path

from ratta.adapt import adapt
from ratta.guard import Write, claim
from ratta.synthetic import make_world

FILES = ("features.safetensors", "text.safetensors", "db.npy")


def run_demo(folder: str | Path | None = None, seed: int = 0) -> dict:
    """Generate a world with a distribution shift, write its files, adapt, print accuracies."""
    with tempfile.TemporaryDirectory(prefix="ratta-demo-") as tmp:
        root = Path(folder) if folder else Path(tmp)
        writes = [Write(root, "--dir", "folder"), *(Write(root / n, "--dir") for n in FILES)]
        with claim(writes):
            world = make_world(seed=seed)
            paths = world.write(root)
            out = root / "predictions.safetensors"
            print(
                f"SYNTHETIC DATA: {world.text.num_classes} classes, {len(world.labels)} test "
                f"images x {world.views.shape[1]} views, database of "
                f"{world.database.shape[0]} generated embeddings "
                f"({f'files in {root}' if folder else 'temporary files'})"
            )
            summary = adapt(paths["features"], paths["text"], paths["db"], out)
        m = summary["metrics"]
        print(
            f"zero-shot (CuPL) top-1 {m['zero_shot']['top1']:6.2f}%   "
            f"RA-TTA top-1 {m['ratta']['top1']:6.2f}%   "
            f"({summary['ms_per_image']:.2f} ms/image, synthetic)"
        )
        return summary
