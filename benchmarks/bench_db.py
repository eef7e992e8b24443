"""Database benchmark: build time, retrieval time and top-1 agreement of approximate indexes.

Two synthetic clustered databases of 512-d float16 rows:

- 336k: the paper-scale case of ``bench_adapt.py`` (47 classes x 7,000 web images around
  their image centres plus 7,551 uniform distractors: FGVC Aircraft's 336,551 rows);
- 3M: the same 336,551 rows plus 2,663,449 rows of 953 more classes drawn with the same
  geometry (``ratta.synthetic``: text anchors in confusable groups, image centres across a
  modality gap, web images around them), an ImageNet-like 1,000-class database.

Queries are text-like, as RA-TTA's: normalised means of 5-10 description rows of one class
(a set prototype t_c), 2,000 for the measurements and 1,000 others for tuning; at 3M, half
of them from the 953 extra classes. For each scale the database is imported from ``.npy``
shards (timed), the exact search of the 2,000 queries is timed (``ExactRetriever``, the
BLAS scan ``ratta adapt`` uses by default), then each index is built with ``ratta db
index``'s code (nprobe/efSearch tuned on the tuning queries to recall@20 >= 0.99) and its
search of the same 2,000 queries is timed and compared with exact search: top-1 agreement
(same nearest row) and recall@20. Finally whole ``ratta adapt`` processes (1,000 test
images x 101 embeddings of the paper-scale case) run with ``--search exact`` and
``--search index`` on the best index, and their predictions are compared.

Data are generated once into bench-data/db/ (about 3.5 GB; the 3M import adds 3 GB while
it runs). Usage: python benchmarks/bench_db.py [--scales 336k 3m] [--json F]
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_adapt import ensure_data

from ratta.db import Database, load_for_search
from ratta.db.importers import import_database
from ratta.db.index import IndexSettings, recall, reindex
from ratta.files import load_text
from ratta.retrieval import ExactRetriever

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "bench-data" / "db"
DIM = 512
EXTRA = dict(classes=953, rows=3_000_000 - 336_551, shard_rows=300_000, seed=1, version=1)
SPECS = {
    "336k": ["IVF1024,Flat", "IVF1024,SQfp16", "IVF1024,PQ64", "HNSW32"],
    "3m": ["IVF4096,SQfp16", "IVF2048,SQfp16"],
}
K = 20


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def extra_classes(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Text anchors tau and image centres mu of n classes, as ``ratta.synthetic.make_world``."""
    groups = rng.standard_normal(((n + 3) // 4, DIM))
    tau = unit(0.8 * unit(groups[np.arange(n) // 4]) + 0.2 * unit(rng.standard_normal((n, DIM))))
    gaps = 1 + 0.3 * (2 * rng.random((n, 1)) - 1)
    mu = unit(tau + gaps * unit(rng.standard_normal((n, DIM))) / np.sqrt(2))
    return tau, mu


def ensure_3m(paper_db: Path) -> Path:
    """A clip-retrieval-style folder: img_emb_0 = the paper rows, then the extra classes."""
    folder = DATA / "src3m"
    stamp = folder / "stamp.json"
    if stamp.exists() and json.loads(stamp.read_text()) == EXTRA:
        return folder
    print("generating the 3M-row source (once, ~2 min) ...", flush=True)
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "img_emb").mkdir(parents=True)
    os.link(paper_db, folder / "img_emb" / "img_emb_0.npy")
    rng = np.random.default_rng(EXTRA["seed"])
    tau, mu = extra_classes(rng, EXTRA["classes"])
    np.savez(folder / "classes.npz", tau=tau, mu=mu)
    owner = np.repeat(np.arange(EXTRA["classes"]), -(-EXTRA["rows"] // EXTRA["classes"]))
    owner = owner[: EXTRA["rows"]]
    for i, s in enumerate(range(0, EXTRA["rows"], EXTRA["shard_rows"])):
        own = owner[s : s + EXTRA["shard_rows"]]
        noise = rng.standard_normal((own.size, DIM), dtype=np.float32) * (0.4 * 4 / np.sqrt(DIM))
        rows = unit(mu[own].astype(np.float32) + noise).astype(np.float16)
        np.save(folder / "img_emb" / f"img_emb_{i + 1}.npy", rows[rng.permutation(own.size)])
    stamp.write_text(json.dumps(EXTRA))
    return folder


def queries(scale: str, count: int, seed: int) -> np.ndarray:
    """Set prototypes: normalised means of 5-10 description rows of one class each."""
    rng = np.random.default_rng(seed)
    text = load_text(ROOT / "bench-data" / "paper" / "text.safetensors")
    desc, owner = text.desc.numpy(), text.desc_class.numpy()
    out = []
    extra = None
    if scale == "3m":
        extra = np.load(DATA / "src3m" / "classes.npz")
    for q in range(count):
        m = int(rng.integers(5, 11))
        if extra is None or q % 2 == 0:
            c = int(rng.integers(0, text.num_classes))
            rows = desc[rng.choice(np.flatnonzero(owner == c), m, replace=False)]
        else:
            c = int(rng.integers(0, extra["tau"].shape[0]))
            tau, mu = extra["tau"][c], extra["mu"][c]
            lean = 0.7 * rng.random((m, 1))
            rows = unit(tau + lean * (mu - tau) + 0.08 * rng.standard_normal((m, DIM)))
        out.append(unit(rows.mean(0)))
    return np.stack(out).astype(np.float32)


def linked_copy(src: Path, dst: Path) -> Path:
    """A database directory sharing src's shards (hard links), to hold another index."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst, copy_function=os.link)
    for f in dst.glob("index-*.faiss"):
        f.unlink()
    return dst


def run_adapt(db: Path, out: Path, search: str) -> tuple[float, dict]:
    paper = ROOT / "bench-data" / "paper"
    cmd = [
        str(Path(sys.executable).with_name("ratta")),
        "adapt",
        "--features",
        str(paper / "features.safetensors"),
        "--text",
        str(paper / "text.safetensors"),
        "--db",
        str(db),
        "--out",
        str(out),
        "--search",
        search,
        "--quiet",
    ]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start, json.loads(Path(f"{out}.json").read_text())


def bench_scale(scale: str, source: Path, specs: list[str], num_queries: int) -> dict:
    work = DATA / f"db-{scale}"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    manifest = import_database([source], work)
    import_s = time.perf_counter() - t0
    print(f"[{scale}] imported {manifest.count:,} rows in {import_s:.1f} s", flush=True)

    tune_q = queries(scale, 1000, seed=10)
    eval_q = queries(scale, num_queries, seed=20)
    emb, sq, _ = load_for_search(work)
    exact = ExactRetriever(emb, sq)
    exact.search(torch.from_numpy(eval_q[:50]), K)  # warm-up
    t0 = time.perf_counter()
    truth = exact.search(torch.from_numpy(eval_q), K).numpy()
    exact_s = time.perf_counter() - t0
    del exact, emb, sq
    print(f"[{scale}] exact search of {num_queries} queries: {exact_s:.2f} s", flush=True)

    rows = []
    for spec in specs:
        folder = linked_copy(work, DATA / f"db-{scale}-{spec.replace(',', '_')}")
        settings = IndexSettings(spec=spec, target_recall=0.99, eval_queries=1000)
        t0 = time.perf_counter()
        section = reindex(folder, settings, queries=tune_q)
        build_s = time.perf_counter() - t0
        index = Database(folder).read_index()
        index.search(eval_q[:50], K)  # warm-up
        t0 = time.perf_counter()
        _, ids = index.search(eval_q, K)
        search_s = time.perf_counter() - t0
        r, top1 = recall(ids, truth)
        row = {
            "spec": spec,
            "search_params": section["search_params"],
            "index_build_s": build_s,
            "train_add_s": section["build_s"],
            "search_s": search_s,
            "speedup": exact_s / search_s,
            "top1_agreement": top1,
            "recall_at_20": r,
            "index_mb": (folder / section["file"]).stat().st_size / 2**20,
            "dir": str(folder),
        }
        rows.append(row)
        del index
        print(
            f"[{scale}] {spec} {row['search_params']}: build {build_s:.1f} s, search "
            f"{search_s:.2f} s ({row['speedup']:.1f}x), top-1 {top1:.4f}, recall@20 {r:.4f}",
            flush=True,
        )
    ok = [r for r in rows if r["top1_agreement"] >= 0.99]
    best = max(ok, key=lambda r: r["speedup"]) if ok else None

    adapt_rows = {}
    if best is not None:
        out = DATA / f"pred-{scale}"
        out.mkdir(exist_ok=True)
        t_exact, s_exact = run_adapt(work, out / "exact.safetensors", "exact")
        t_index, s_index = run_adapt(Path(best["dir"]), out / "index.safetensors", "index")
        from safetensors.torch import load_file

        a = load_file(str(out / "exact.safetensors"))["final"].argmax(1)
        b = load_file(str(out / "index.safetensors"))["final"].argmax(1)
        adapt_rows = {
            "exact_s": t_exact,
            "index_s": t_index,
            "exact_search_stage_s": s_exact["timings_s"].get("search"),
            "index_search_stage_s": s_index["timings_s"].get("search"),
            "exact_timings_s": s_exact["timings_s"],
            "index_timings_s": s_index["timings_s"],
            "prediction_agreement": float((a == b).float().mean()),
            "top1_exact": s_exact["metrics"]["ratta"]["top1"],
            "top1_index": s_index["metrics"]["ratta"]["top1"],
        }
        print(f"[{scale}] ratta adapt: {adapt_rows}", flush=True)
    for r in rows:
        shutil.rmtree(r.pop("dir"), ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    return {
        "rows": manifest.count,
        "import_s": import_s,
        "exact_search_s": exact_s,
        "queries": num_queries,
        "indexes": rows,
        "best": best["spec"] if best else None,
        "adapt": adapt_rows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scales", nargs="+", default=["336k", "3m"], choices=["336k", "3m"])
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    paper = ensure_data()
    DATA.mkdir(parents=True, exist_ok=True)
    sources = {"336k": paper["db"]}
    if "3m" in args.scales:
        sources["3m"] = ensure_3m(paper["db"])
    started = time.perf_counter()
    results = {s: bench_scale(s, sources[s], SPECS[s], args.queries) for s in args.scales}
    print(
        f"\n{torch.get_num_threads()} threads; {args.queries} text-like queries, k = {K}; "
        f"total {time.perf_counter() - started:.0f} s"
    )
    head = (
        f"{'rows':>9}  {'index':<16}{'params':<14}{'build s':>8}{'tune s':>8}{'search s':>9}"
        f"{'speedup':>8}{'top-1':>8}{'R@20':>8}{'MB':>6}"
    )
    print(head)
    for res in results.values():
        print(
            f"{res['rows']:>9,}  {'exact':<16}{'(import)':<14}{res['import_s']:>8.1f}{'':>8}"
            f"{res['exact_search_s']:>9.2f}{1:>8.1f}{1:>8.4f}{1:>8.4f}{'':>6}"
        )
        for r in res["indexes"]:
            print(
                f"{'':>9}  {r['spec']:<16}{r['search_params'] or '':<14}{r['train_add_s']:>8.1f}"
                f"{r['index_build_s'] - r['train_add_s']:>8.1f}{r['search_s']:>9.2f}"
                f"{r['speedup']:>8.1f}{r['top1_agreement']:>8.4f}{r['recall_at_20']:>8.4f}"
                f"{r['index_mb']:>6.0f}"
            )
        a = res["adapt"]
        if a:
            print(
                f"{'':>9}  ratta adapt, 1,000 images x 101 embeddings: exact {a['exact_s']:.1f} s "
                f"(search stage {a['exact_search_stage_s']:.1f} s), --search index "
                f"({res['best']}) {a['index_s']:.1f} s (search stage "
                f"{a['index_search_stage_s']:.1f} s); same RA-TTA prediction "
                f"{100 * a['prediction_agreement']:.1f}%, top-1 {a['top1_exact']:.2f} vs "
                f"{a['top1_index']:.2f}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
