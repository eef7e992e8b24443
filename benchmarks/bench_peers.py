"""ImageNet-scale benchmark of the five training-free peers against their GEMM floors.

Generated case: 50,000 test images, 1,000 classes, d = 512, 100 stored float16 views, written
once as a real features file (and text file) in ratta's format under bench-data/peers-N/; read
back in batches of 256 images through ``ratta.files.FeatureReader``, reopened per batch so no
more than one batch of the 5.2 GB file is ever mapped.

Figures printed:
- per method, ms per test image and its floor: the matrix products the method must do,
  timed in the same run at the same shapes (float32). Episodic methods and the per-image
  preparation of the online ones are timed on the first --subset images (their cost per
  image does not depend on the stream); the online stream steps on the whole stream, whose
  floor uses the cache sizes each image was scored against in that stream;
- end to end: one pass over the file computing the 64 view logits once for all peers,
  ZERO and MTA (episodic: the same for every stream), the per-image preparation of TDA,
  BoostAdapter and DMN-ZS, then the three online methods on --streams seeded shuffles;
  wall time and the process's peak RSS.

BoostAdapter runs with 64 inputs and delta 3 (ImageNet-A's settings: the official ImageNet
run has a single view, which would not boost), TDA with the z_0 query, DMN-ZS with 32 inputs.
Usage: python benchmarks/bench_peers.py [--images 50000] [--subset 2048] [--streams 3]
[--threads N] [--json F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ratta.files import (
    FeatureReader,
    SafetensorsStreamWriter,
    TextFeatures,
    atomic_path,
    load_text,
    save_text,
)
from ratta.metrics import topk_accuracy
from ratta.peers import (
    BoostConfig,
    BoostState,
    DMNConfig,
    DMNState,
    TDAConfig,
    TDAState,
    boost_views,
    dmn_inputs,
    fill,
    mta,
    shuffled_streams,
    tda_inputs,
    view_logits,
    zero,
)
from ratta.peers.common import run_stream
from ratta.resources import peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data"
GENERATOR_VERSION = 1  # bump when the generated geometry changes
SCALE = 100.0
BATCH = 256
INPUTS = 64  # z_0 + 63 views: ZERO, MTA, BoostAdapter
BOOST = BoostConfig(cache=TDAConfig(fifo_negative=True), delta=3)
TDA = TDAConfig()
DMN = DMNConfig()
# geometry: classes in groups of 4 similar text anchors; images around their class centre
GEOMETRY = dict(confusion=0.8, gap=1.5, shift=0.5, noise=2.0, crop=2.0, view_noise=1.5)


# --------------------------------------------------------------------------- data


def _unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def generate(folder: Path, images: int, classes: int, dim: int, views: int, seed: int) -> None:
    """Write features.safetensors and text.safetensors, streaming 500 images at a time."""
    g = torch.Generator().manual_seed(seed)
    geo = GEOMETRY
    groups = torch.randn(classes // 4 + 1, dim, generator=g)
    tau = _unit(
        geo["confusion"] * _unit(groups[torch.arange(classes) // 4])
        + (1 - geo["confusion"]) * _unit(torch.randn(classes, dim, generator=g))
    )
    mu = _unit(tau + geo["gap"] * _unit(torch.randn(classes, dim, generator=g)))
    labels = torch.randint(0, classes, (images,), generator=g)
    shift = _unit(torch.randn(dim, generator=g))
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"class {c}" for c in range(classes)]
    text = TextFeatures(tau, tau.clone(), torch.arange(classes), SCALE, names)
    save_text(folder / "text.safetensors", text, {"source": "benchmarks/bench_peers.py"})

    def chunk(start: int, stop: int, with_views: bool) -> torch.Tensor:
        cg = torch.Generator().manual_seed(seed * 1_000_003 + start)
        n = stop - start
        raw = mu[labels[start:stop]] + geo["shift"] * shift
        raw = raw + geo["noise"] * torch.randn(n, dim, generator=cg) / math.sqrt(dim)
        if not with_views:
            return _unit(raw + geo["crop"] * torch.randn(n, dim, generator=cg) / math.sqrt(dim))
        torch.randn(n, dim, generator=cg)  # the centre crop's draw
        noise = torch.randn(n, views, dim, generator=cg) / math.sqrt(dim)
        return _unit(raw.unsqueeze(1) + geo["view_noise"] * noise)

    specs = {
        "image": (torch.float16, (images, dim)),
        "views": (torch.float16, (images, views, dim)),
        "labels": (torch.int64, (images,)),
    }
    target = folder / "features.safetensors"
    with atomic_path(target) as tmp, SafetensorsStreamWriter(tmp, specs) as out:
        for key in ("image", "views"):
            for start in range(0, images, 500):
                out.write(key, chunk(start, min(images, start + 500), key == "views"))
        out.write("labels", labels)


def ensure_data(images: int) -> dict[str, Path]:
    folder = DATA / f"peers-{images}"
    stamp_file = folder / "scale.json"
    stamp = {"images": images, "classes": 1000, "dim": 512, "views": 100, "seed": 0}
    stamp |= {"generator": GENERATOR_VERSION, **GEOMETRY}
    paths = {"features": folder / "features.safetensors", "text": folder / "text.safetensors"}
    if stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        return paths
    print(f"generating {images:,} images x 101 float16 embeddings (once) ...", flush=True)
    # in a child process: this one's peak RSS is a reported figure
    subprocess.run([sys.executable, __file__, "--generate", "--images", str(images)], check=True)
    stamp_file.write_text(json.dumps(stamp))
    return paths


def batches(path: Path, stop: int, inputs: int = INPUTS):
    """Float32 inputs [b, inputs, d] of images 0..stop-1, BATCH at a time, with their labels."""
    for start in range(0, stop, BATCH):
        reader = FeatureReader(path)  # reopened per batch: the mapping never covers the file
        x = reader.batch(start, min(stop, start + BATCH), views=inputs - 1).float()
        # a copy: the labels tensor is a view of the file's mapping, which it would keep alive
        labels = reader.labels[start : start + x.shape[0]].clone()
        reader.close()
        yield x, labels


# --------------------------------------------------------------------------- timing


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def median_time(fn, repeats: int) -> float:
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def gemm_seconds(shapes: list[tuple[int, ...]], count: float, repeats: int) -> float:
    """Seconds for ``count`` times the products of ``shapes`` (random data): (m, k, n) is
    [m, k] x [k, n], (batch, m, k, n) the batched product of ``batch`` of them."""
    mats = [(torch.randn(*s[:-1]), torch.randn(*s[:-3], s[-2], s[-1])) for s in shapes]

    def run() -> None:
        for a, b in mats:
            torch.matmul(a, b)

    return median_time(run, repeats) * count


def episodic(x_sub: list[torch.Tensor], w: torch.Tensor, repeats: int) -> dict[str, dict]:
    """ms/image of ZERO, MTA and the online peers' preparation, with their floors."""
    n = sum(x.shape[0] for x in x_sub)
    c, d = w.shape

    def each(fn):
        return lambda: [fn(x) for x in x_sub]

    runs = {
        "ZERO": each(lambda x: zero(x, w, SCALE)),
        "MTA": each(lambda x: mta(x, w, SCALE)),
        "TDA": each(lambda x: tda_inputs(x, w, SCALE, TDA)),
        "BoostAdapter": each(
            lambda x: (tda_inputs(x, w, SCALE, BOOST.cache), boost_views(x, w, SCALE, BOOST))
        ),
        "DMN-ZS": each(lambda x: dmn_inputs(x, w, SCALE, DMN)),
    }
    views64 = gemm_seconds([(BATCH * INPUTS, d, c)], n / BATCH, repeats)
    floors = {
        "ZERO": views64,
        "MTA": views64  # + the inputs' Gram matrices, the affinities, the mode's logits
        + gemm_seconds(
            [(BATCH, INPUTS, d, INPUTS), (BATCH, INPUTS, c, INPUTS), (BATCH, d, c)],
            n / BATCH,
            repeats,
        ),
        "TDA": gemm_seconds([(BATCH, d, c)], n / BATCH, repeats),
        "BoostAdapter": views64,
        "DMN-ZS": gemm_seconds([(BATCH * DMN.inputs, d, c)], n / BATCH, repeats),
    }
    return {
        name: {"ms": 1e3 * median_time(fn, repeats) / n, "floor_ms": 1e3 * floors[name] / n}
        for name, fn in runs.items()
    }


def stream_floor(state: object, n: int, c: int, d: int, repeats: int) -> float:
    """Seconds of the products an online method does per stream: every image's query against
    every cache entry it is scored against (mean sizes of this stream), in blocks of BATCH."""
    blocks = n / BATCH
    if isinstance(state, DMNState):
        keys = max(1, round(state.scored / state.images))
        return gemm_seconds([(BATCH, d, c), (BATCH, d, keys)], blocks, repeats)
    assert isinstance(state, TDAState)
    pos = max(1, round(state.scored["positive"] / state.images))
    neg = max(1, round(state.scored["negative"] / state.images))
    shapes = [(BATCH, d, c), (BATCH, d, pos), (BATCH, d, neg), (BATCH, neg, c)]
    return gemm_seconds(shapes, blocks, repeats)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--subset", type=int, default=2048)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        generate(DATA / f"peers-{args.images}", args.images, 1000, 512, 100, seed=0)
        return
    torch.set_num_threads(args.threads)
    paths = ensure_data(args.images)
    text = load_text(paths["text"])
    w = text.classifier.float()
    c, d = w.shape
    load = os.getloadavg()
    print(f"torch {torch.__version__}, {args.threads} threads, load average {load[0]:.2f}")

    x_sub = [x for x, _ in batches(paths["features"], args.subset)]
    per_method = episodic(x_sub, w, args.repeats)
    del x_sub

    # end to end: one pass over the file, then the online methods on every stream
    start, cpu_start = time.perf_counter(), time.process_time()
    n = args.images
    top1: dict[str, list[float]] = {"ZERO": [], "MTA": []}
    hits = {"ZERO": 0.0, "MTA": 0.0}
    inputs: dict[str, object] = dict.fromkeys(("tda", "views", "dmn"))
    y = torch.empty(n, dtype=torch.int64)
    for i, (x, labels) in enumerate(batches(paths["features"], n)):
        at = i * BATCH
        y[at : at + len(labels)] = labels
        logits = view_logits(x, w, SCALE)
        for name, fn in (("ZERO", zero), ("MTA", mta)):
            hits[name] += topk_accuracy(fn(x, w, SCALE, logits=logits).scores, labels, 1) * len(x)
        # TDA's inputs serve BoostAdapter too: same query, negative mask and entropy
        prep = {
            "tda": tda_inputs(x, w, SCALE, TDA, logits=logits),
            "views": boost_views(x, w, SCALE, BOOST, logits=logits),
            "dmn": dmn_inputs(x, w, SCALE, DMN, logits=logits),
        }
        for key, items in prep.items():
            inputs[key] = fill(inputs[key], items, at, n)
    del x, logits, prep
    pass_seconds = time.perf_counter() - start
    for name in hits:
        top1[name].append(hits[name] / n)
    online = {"TDA": [], "BoostAdapter": [], "DMN-ZS": []}
    floors = {name: [] for name in online}
    for name in online:
        top1[name] = []
    for order in shuffled_streams(n, args.streams, seed=0):
        states = {
            "TDA": (TDAState(w, SCALE, TDA), (inputs["tda"],)),
            "BoostAdapter": (BoostState(w, SCALE, BOOST), (inputs["tda"], inputs["views"])),
            "DMN-ZS": (DMNState(w, SCALE, DMN), (inputs["dmn"],)),
        }
        for name, (state, items) in states.items():
            block = 128 if name == "DMN-ZS" else 256
            t0 = time.perf_counter()
            out = run_stream(state.step, order, *items, block=block)
            online[name].append(time.perf_counter() - t0)
            top1[name].append(topk_accuracy(out.scores, y, 1))
            del out
            floors[name].append(stream_floor(state, n, c, d, args.repeats))
    total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rss = peak_rss_mb() / 1024

    print(f"\n{n:,} images, {c} classes, d = {d}; {args.streams} streams")
    print(
        f"{'method':<14}{'ms/image':>10}{'floor':>8}{'ratio':>8}{'top-1 %':>9}"
        "   (online: preparation + stream steps, floor)"
    )
    rows = {}
    for name, row in per_method.items():
        ms, floor, detail = row["ms"], row["floor_ms"], ""
        if name in online:  # preparation + the stream steps (mean over streams)
            step = 1e3 * statistics.mean(online[name]) / n
            step_floor = 1e3 * statistics.mean(floors[name]) / n
            detail = f"   {ms:.3f} + {step:.3f}, {floor:.3f} + {step_floor:.3f}"
            ms, floor = ms + step, floor + step_floor
        rows[name] = {"ms": ms, "floor_ms": floor, "ratio": ms / floor, "top1": top1[name]}
        print(
            f"{name:<14}{ms:>10.3f}{floor:>8.3f}{ms / floor:>7.2f}x"
            f"{statistics.mean(top1[name]):>9.2f}{detail}"
        )
    print(
        f"end to end (pass over the file {pass_seconds:.1f} s, then {args.streams} streams x 3"
        f" online methods): {total:.1f} s ({cpu:.1f} s of CPU); peak RSS {rss:.2f} GB;"
        f" load average now {os.getloadavg()[0]:.2f}"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "rows": rows,
                    "pass_s": pass_seconds,
                    "total_s": total,
                    "total_cpu_s": cpu,
                    "stream_s": online,
                    "peak_rss_gb": rss,
                    "threads": args.threads,
                    "load_before": load,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
