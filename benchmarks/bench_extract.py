"""Extraction throughput against the pure model forward of the same crops, measured in one run.

A ViT-B/16 with random weights (open_clip's architecture, saved to a local checkpoint) encodes
N generated JPEG test images (500 x 375, like typical photos) with V random views each:
- forward only: the same number of crops, already preprocessed, through the same
  ``Backbone.encode_images`` calls (same forward composition);
- extraction: ``extract_features`` end to end (decoding, views, DataLoader workers, encoding,
  chunked writing, final assembly).
Target: extraction <= 1.15x forward-only. Peak memory: the RSS of whole extraction processes
(a small model, so that memory is not the model's) for two dataset sizes at one chunk size.
Like ``ratta extract``, the runs keep freed memory for reuse (``keep_freed_memory``);
``--glibc-default`` measures glibc's default allocator policy instead.

Usage: python benchmarks/bench_extract.py [--images 6 --views 100 --device cpu --workers 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ratta.backbones import BackboneSpec, load_backbone
from ratta.extract import ExtractSettings, extract_features
from ratta.resources import keep_freed_memory


def make_images(folder: Path, count: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        base = rng.integers(0, 256, (47, 63, 3), dtype=np.uint8)  # smooth-ish photo content
        img = Image.fromarray(base).resize((500, 375), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        img.save(path, quality=90)
        paths.append(path)
    return paths


def random_checkpoint(folder: Path, model: str) -> Path:
    import open_clip

    torch.manual_seed(0)
    path = folder / f"{model}-random.pt"
    torch.save(open_clip.create_model(model).state_dict(), path)
    return path


def forward_only(backbone, crops: int, forward_batch: int, group: int, views: int) -> float:
    size = backbone.preprocessing.size
    pixels = torch.randn(group * (1 + views), 3, size, size)
    done, start = 0, time.perf_counter()
    while done < crops:
        block = pixels[: min(len(pixels), crops - done)]
        for s in range(0, len(block), forward_batch):
            backbone.encode_images(block[s : s + forward_batch])
        done += len(block)
    if backbone.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


PEAK_SCRIPT = """
import sys
from pathlib import Path
from ratta.backbones import BackboneSpec, load_backbone
from ratta.extract import ExtractSettings, extract_features
from ratta.resources import keep_freed_memory
if sys.argv[5] == "keep":
    keep_freed_memory()
paths = sorted(Path(sys.argv[1]).glob('*.jpg'))
bb = load_backbone(BackboneSpec(model=None, pretrained=sys.argv[2], model_config=sys.argv[3]))
summary = extract_features(paths, [0] * len(paths), bb, sys.argv[4], ExtractSettings(views=20),
                           chunk_size=64, workers=0)
print(summary["peak_rss_mb"])
"""


def peak_memory(tmp: Path, counts: tuple[int, int], policy: str) -> dict[int, float]:
    """Peak RSS (MB) of extraction processes with a tiny model for two dataset sizes."""
    import open_clip

    cfg = {
        "embed_dim": 64,
        "vision_cfg": {
            "image_size": 64,
            "layers": 2,
            "width": 64,
            "patch_size": 16,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": 77,
            "vocab_size": 49408,
            "width": 64,
            "heads": 2,
            "layers": 1,
        },
    }
    cfg_path = tmp / "bench-tiny.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    ckpt = random_checkpoint(tmp, "bench-tiny")
    out = {}
    for count in counts:
        folder = tmp / f"mem{count}"
        make_images(folder, count, seed=count)
        proc = subprocess.run(
            [
                sys.executable,
                "-c",
                PEAK_SCRIPT,
                str(folder),
                str(ckpt),
                str(cfg_path),
                str(tmp / f"mem{count}.safetensors"),
                policy,
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        out[count] = float(proc.stdout.strip().splitlines()[-1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--views", type=int, default=100)
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--forward-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--memory-only", action="store_true", help="only the peak-memory part")
    ap.add_argument("--glibc-default", action="store_true", help="glibc's default malloc policy")
    args = ap.parse_args()
    policy = "default" if args.glibc_default else "keep"
    if not args.glibc_default:
        keep_freed_memory()
    if args.memory_only:
        with tempfile.TemporaryDirectory() as tmp_name:
            mem = peak_memory(Path(tmp_name), (100, 400), policy)
        print(
            "peak RSS, tiny model, chunk 64, V=20: "
            + ", ".join(f"{n} images {m:.0f} MB" for n, m in mem.items())
        )
        return
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        paths = make_images(tmp / "imgs", args.images)
        ckpt = random_checkpoint(tmp, args.model)
        backbone = load_backbone(BackboneSpec(model=args.model, pretrained=str(ckpt)), args.device)
        crops = args.images * (1 + args.views)
        group = max(1, args.forward_batch // (1 + args.views))
        fwd, ext = [], []
        for r in range(args.repeats):
            fwd.append(forward_only(backbone, crops, args.forward_batch, group, args.views))
            out = tmp / f"f{r}.safetensors"
            start = time.perf_counter()
            extract_features(
                paths,
                [0] * len(paths),
                backbone,
                out,
                ExtractSettings(views=args.views, seed=r),
                forward_batch=args.forward_batch,
                workers=args.workers,
            )
            ext.append(time.perf_counter() - start)
        mem = peak_memory(tmp, (100, 400), policy)
    f, e = statistics.median(fwd), statistics.median(ext)
    result = {
        "model": args.model,
        "device": args.device,
        "images": args.images,
        "views": args.views,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "malloc": policy,
        "forward_only_s": f,
        "extraction_s": e,
        "ratio": e / f,
        "forward_views_per_s": crops / f,
        "extraction_views_per_s": crops / e,
        "peak_rss_mb_by_images": mem,
    }
    print(
        f"{args.model} random weights on {args.device}, {args.images} images x (1 + "
        f"{args.views}) crops, {args.workers} workers, {torch.get_num_threads()} threads, "
        f"malloc {policy}, median of {args.repeats}"
    )
    print(f"  forward only     {crops / f:8.1f} crops/s")
    print(f"  extraction       {crops / e:8.1f} crops/s   ratio {e / f:.3f}x (target <= 1.15x)")
    print(
        "  peak RSS, tiny model, chunk 64, V=20: "
        + ", ".join(f"{n} images {m:.0f} MB" for n, m in mem.items())
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
