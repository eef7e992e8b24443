"""Search indexes of a database: exact (the paper's) or approximate FAISS, chosen by a string.

``exact`` (the default) stores no index: ``ratta adapt`` scans every row, which reproduces
the paper. Any other spec is a FAISS factory string (``IVF4096,Flat``, ``IVF4096,SQ8``,
``HNSW32``, ``IVF4096,PQ64``, ...) over L2 distance. The index is trained on a random
sample of rows, filled block by block, and measured against exact search on a sample of
queries: recall@20 (the share of the true 20 nearest rows found, K_S = 20 in the paper) and
top-1 agreement. Without explicit ``search_params`` the first search parameter of the
index (IVF ``nprobe``, HNSW ``efSearch``) is tuned to the smallest value that reaches
``target_recall``. FAISS's GPU build is used for training and adding, on one GPU (``device``,
by default the first), when it is installed and sees one.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ratta.atomic import publish
from ratta.backbones import sha256_file
from ratta.db.store import (
    BLOCK_ROWS,
    EXACT,
    MANIFEST,
    Database,
    check_search_params,
)
from ratta.devices import DeviceFallbackWarning, resolve_device
from ratta.errors import RattaInputError
from ratta.files import RattaInputWarning, write_json
from ratta.guard import Read, Write, guarded
from ratta.progress import Progress, progress_bar
from ratta.retrieval import faiss_gpu_count, faiss_to_device

RECALL_K = 20


@dataclass(frozen=True)
class IndexSettings:
    """An index: FAISS factory ``spec`` (or ``exact``) and how to tune and measure it.

    Attributes:
        spec: ``exact`` or a FAISS factory string (L2 metric).
        search_params: FAISS ``ParameterSpace`` string (``nprobe=32``); ``None`` tunes it.
        target_recall: recall@20 the tuning aims for.
        eval_queries: queries of the recall measurement.
        train_rows: rows sampled to train the index (at most the database).
        seed: seed of the training sample and of generated queries.
    """

    spec: str = EXACT
    search_params: str | None = None
    target_recall: float = 0.95
    eval_queries: int = 1000
    train_rows: int = 1 << 18
    seed: int = 0

    def __post_init__(self) -> None:
        if self.search_params is not None:
            check_search_params(self.search_params)
        if not 0 < self.target_recall <= 1:
            raise RattaInputError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if self.eval_queries < 1:
            raise RattaInputError(f"--eval-queries must be >= 1, got {self.eval_queries}")
        if self.train_rows < 1:
            raise RattaInputError(f"--train-rows must be >= 1, got {self.train_rows}")


def exact_search(
    blocks: Iterable[tuple[int, np.ndarray]], count: int, queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 top-k [Q, k] (squared distances, row ids) over (first row, rows) blocks.

    One GEMM per cache-sized piece with a running top-k: memory is bounded by a block and
    the queries, whatever the number of rows (``count``). Nearest first, ties to the
    lower row id.
    """
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = min(k, count)
    best_d = torch.full((q.shape[0], 0), float("inf"))
    best_i = torch.zeros((q.shape[0], 0), dtype=torch.int64)
    # cache-sized [Q, rows] distance blocks, as in ratta.retrieval.ExactRetriever
    step = max(2048, min(16384, (1 << 22) // max(1, q.shape[0])))
    for start, block in blocks:
        rows = torch.from_numpy(np.asarray(block, dtype=np.float32))
        for s in range(0, rows.shape[0], step):
            r = rows[s : s + step]
            dist = torch.addmm((r * r).sum(1).unsqueeze(0), q, r.T, alpha=-2.0)
            d, i = dist.topk(min(k, r.shape[0]), dim=1, largest=False)
            cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i + start + s], 1)
            best_d, pos = cat_d.topk(min(k, cat_d.shape[1]), dim=1, largest=False)
            best_i = cat_i.gather(1, pos)
    by_id = best_i.argsort(dim=1)
    best_d, best_i = best_d.gather(1, by_id), best_i.gather(1, by_id)
    by_dist = best_d.argsort(dim=1, stable=True)
    dist = best_d.gather(1, by_dist) + (q * q).sum(1, keepdim=True)
    return dist.numpy(), best_i.gather(1, by_dist).numpy()


def sample_queries(db: Database, count: int, seed: int) -> np.ndarray:
    """Unit vectors near random rows: each row plus isotropic noise of the same norm.

    With normalised rows this puts a query at cosine ~0.7 from its row, between the
    near-duplicate case and the text-to-image gap of CLIP, so the measured recall is
    neither trivially perfect nor dominated by unrelated directions.
    """
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(db.count, size=min(count, db.count), replace=False))
    rows = db.rows(ids).astype(np.float32)
    noise = rng.standard_normal(rows.shape).astype(np.float32) / np.sqrt(db.dim)
    q = rows + noise
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _train_sample(db: Database, rows: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(db.count, size=min(rows, db.count), replace=False))
    return np.ascontiguousarray(db.rows(ids), dtype=np.float32)


def recall(found: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """(recall@k, top-1 agreement) of ``found`` [Q, k] against ``truth`` [Q, k]."""
    k = truth.shape[1]
    hits = sum(
        len(set(f[:k].tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True)
    )
    return hits / truth.size, float((found[:, 0] == truth[:, 0]).mean())


def _tunable(index: Any) -> tuple[str, list[int]] | None:
    """The first search parameter of the index and the values tried, small to large."""
    import faiss

    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        values = [1 << i for i in range(20) if (1 << i) < ivf.nlist] + [ivf.nlist]
        return "nprobe", values
    if isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        return "efSearch", [16, 32, 64, 128, 256, 512, 1024, 2048]
    return None


def _faiss_reason(exc: Exception) -> str:
    """FAISS messages start with the C++ signature and source line; keep the reason."""
    text = " ".join(str(exc).split())
    return text.rsplit(":", 1)[-1].strip() or "invalid"


def _plateau(tried: list[dict[str, Any]], gain: float = 1e-3) -> bool:
    """Recall stopped improving (quantisation, not the search, limits it): tuning is over."""
    r = [t["recall_at_20"] for t in tried[-3:]]
    return len(r) == 3 and r[2] - r[1] < gain and r[1] - r[0] < gain


def _search(index: Any, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    return ids, time.perf_counter() - start


def build_index(
    db: Database,
    settings: IndexSettings,
    *,
    queries: np.ndarray | None = None,
    progress: Progress = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Build, tune and measure ``settings.spec`` over ``db``; write it into the directory.

    ``queries`` [Q, d] are the recall measurement's queries (e.g. the description rows of
    a text file); by default :func:`sample_queries`. ``device``: the GPU that trains and
    fills the index (``cuda:N``; ``cpu`` for none); by default the first GPU FAISS sees.
    Returns the manifest's ``index`` section; the caller writes the manifest.
    """
    import faiss

    started = time.perf_counter()
    try:
        cpu_index = faiss.index_factory(db.dim, settings.spec, faiss.METRIC_L2)
    except RuntimeError as exc:
        raise RattaInputError(
            f"--index {settings.spec}: not a FAISS factory string ({_faiss_reason(exc)})"
        ) from None
    if settings.search_params:
        try:  # fail before the (long) build, not after
            faiss.ParameterSpace().set_index_parameters(cpu_index, settings.search_params)
        except RuntimeError as exc:
            raise RattaInputError(
                f"--search-params {settings.search_params}: not valid for {settings.spec} "
                f"({_faiss_reason(exc)})"
            ) from None
    if device is not None:
        where = resolve_device(device)
    else:
        where = torch.device("cuda", 0) if faiss_gpu_count() else torch.device("cpu")
    index, reason = faiss_to_device(cpu_index, where)
    if reason is not None and device is not None:
        warnings.warn(
            f"--device {device}: FAISS builds the index on the CPU: {reason}",
            DeviceFallbackWarning,
            stacklevel=2,
        )
    on_gpu = index is not cpu_index
    train_rows = 0
    # one bar over the rows added; its note says which step runs (training and the recall
    # searches are single FAISS calls)
    bar = progress_bar(progress, "index", total=db.count, unit="row")
    if not index.is_trained:
        sample = _train_sample(db, settings.train_rows, settings.seed)
        train_rows = sample.shape[0]
        bar.set_postfix_str(f"training {settings.spec} on {train_rows:,} rows")
        try:
            index.train(sample)
        except RuntimeError as exc:  # e.g. fewer training rows than IVF lists
            bar.close()
            raise RattaInputError(
                f"--index {settings.spec}: training on {train_rows} rows failed "
                f"({_faiss_reason(exc)})"
            ) from None
        del sample
    t_train = time.perf_counter() - started
    bar.set_postfix_str("adding rows")
    for _, block in db.blocks(BLOCK_ROWS):
        index.add(np.ascontiguousarray(block, dtype=np.float32))
        bar.update(block.shape[0])
    if on_gpu:
        index = faiss.index_gpu_to_cpu(index)
    t_build = time.perf_counter() - started

    if queries is None:
        queries = sample_queries(db, settings.eval_queries, settings.seed + 1)
        query_source = "sampled near database rows"
    else:
        query_source = "given"
        rng = np.random.default_rng(settings.seed + 1)
        if queries.shape[0] > settings.eval_queries:
            queries = queries[np.sort(rng.choice(queries.shape[0], settings.eval_queries, False))]
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(RECALL_K, db.count)
    bar.set_postfix_str(f"exact search of {queries.shape[0]:,} recall queries")
    t0 = time.perf_counter()
    _, truth = exact_search(db.blocks(), db.count, queries, k)
    exact_s = time.perf_counter() - t0

    params = faiss.ParameterSpace()
    tried: list[dict[str, Any]] = []
    chosen = settings.search_params
    tunable = _tunable(index)
    if chosen is None and tunable is not None:
        name, values = tunable
        for value in values:
            candidate = f"{name}={value}"
            bar.set_postfix_str(f"tuning {candidate}")
            params.set_index_parameters(index, candidate)
            ids, secs = _search(index, queries, k)
            r, top1 = recall(ids, truth)
            tried.append(_row(candidate, r, top1, secs, queries.shape[0]))
            chosen = candidate
            if r >= settings.target_recall or _plateau(tried):
                break
        if tried[-1]["recall_at_20"] < settings.target_recall:
            best = max(t["recall_at_20"] for t in tried)
            chosen = next(t for t in tried if t["recall_at_20"] >= best - 1e-3)["search_params"]
            warnings.warn(
                f"--index {settings.spec}: recall@{k} reaches only {best:.3f}, below "
                f"--target-recall {settings.target_recall}; using {chosen}",
                RattaInputWarning,
                stacklevel=2,
            )
    if chosen:
        params.set_index_parameters(index, chosen)
    ids, secs = _search(index, queries, k)
    r, top1 = recall(ids, truth)
    final = _row(chosen or "", r, top1, secs, queries.shape[0])
    bar.close()

    # content-addressed name: a new index never overwrites the file the manifest names
    tmp = db.path / f".index-{os.getpid()}.tmp"
    try:
        faiss.write_index(index, str(tmp))
        digest = sha256_file(tmp)
        name = f"index-{digest[:16]}.faiss"
        publish(tmp)
        os.replace(tmp, db.path / name)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "spec": settings.spec,
        "file": name,
        "sha256": digest,
        "search_params": chosen,
        "recall_at_20": final["recall_at_20"],
        "top1_agreement": final["top1_agreement"],
        "ms_per_query": final["ms_per_query"],
        "exact_ms_per_query": round(1000 * exact_s / queries.shape[0], 4),
        "eval_queries": int(queries.shape[0]),
        "query_source": query_source,
        "target_recall": settings.target_recall,
        "tuning": tried,
        "train_rows": train_rows,
        "gpu": on_gpu,
        "train_s": round(t_train, 3),
        "build_s": round(t_build, 3),
        "settings": asdict(settings),
    }


def _row(params: str, r: float, top1: float, secs: float, n: int) -> dict[str, Any]:
    return {
        "search_params": params,
        "recall_at_20": round(r, 5),
        "top1_agreement": round(top1, 5),
        "ms_per_query": round(1000 * secs / n, 4),
    }


def _reindex_plan(path: str | os.PathLike[str], **_: Any) -> tuple[list[Write], list[Read]]:
    return [Write.of(Path(path) / MANIFEST, "--db manifest")], []


@guarded(_reindex_plan)
def reindex(
    path: str | os.PathLike[str],
    settings: IndexSettings,
    *,
    queries: np.ndarray | None = None,
    progress: Progress = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Replace the index of an existing database directory (``exact`` removes it).

    The new index file is written first, then the manifest, then the old file is removed,
    so the directory is consistent at every moment.
    """
    db = Database(path)
    old = db.manifest.index.get("file")
    if settings.spec == EXACT:
        section: dict[str, Any] = {"spec": EXACT}
    else:
        section = build_index(db, settings, queries=queries, progress=progress, device=device)
    db.manifest.index = section
    write_json(db.path / MANIFEST, db.manifest.to_dict())
    publish(db.path / MANIFEST)
    if old and old != section.get("file"):
        (db.path / old).unlink(missing_ok=True)
    return section
