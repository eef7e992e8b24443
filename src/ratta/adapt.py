"""The adaptation stage: (features, text, database) files -> predictions file + JSON summary.

Test images are adapted in batches of ``batch_size``; on Ray (``backend=RayBackend(...)``)
the same batches are the shards, adapted by workers that each load the text and the
database once, and concatenated in order on the driver.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ratta import __version__
from ratta.config import RATTAConfig
from ratta.db import inspect_database
from ratta.db.search import DatabaseCache, SearchDatabase, check_search, open_search
from ratta.devices import (
    StageTimer,
    compute_info,
    numerics,
    read_ahead,
    resolve_device,
    upload,
)
from ratta.distributed import ShardStore, file_stamp
from ratta.engine import BatchResult, ratta_batch
from ratta.errors import RattaInputError
from ratta.files import (
    FeatureReader,
    TextFeatures,
    load_text,
    save_safetensors,
    write_json,
)
from ratta.guard import Read, Write, guarded, output_files
from ratta.metrics import topk_accuracy
from ratta.progress import Progress, label, progress_bar
from ratta.provenance import stamp
from ratta.resources import available_memory, gib, peak_rss_mb
from ratta.retrieval import ExactRetriever

if TYPE_CHECKING:
    from ratta.distributed import RayBackend

DTYPES = {"float32": torch.float32, "float64": torch.float64}
OUTPUT_KEYS = (
    "zero_shot",
    "retrieval",
    "final",
    "candidates",
    "relevance",
    "ot_distance",
    "lam",
    "entropy_zero_shot",
    "entropy_retrieval",
)
# What the predictions rest on, kept with ``save_retrieved`` (the evidence ``ratta explain``
# shows): the retrieved database rows and the top description rows with their scores.
RETRIEVED_KEYS = ("retrieved", "top_descriptions", "top_description_scores")


def output_keys(save_retrieved: bool) -> tuple[str, ...]:
    """The keys of the predictions file."""
    return OUTPUT_KEYS + RETRIEVED_KEYS if save_retrieved else OUTPUT_KEYS


@dataclass
class _Inputs:
    """The validated, opened inputs: text features and the features reader."""

    features: str | os.PathLike[str]
    text: str | os.PathLike[str]
    db: str | os.PathLike[str]
    txt: TextFeatures
    reader: FeatureReader
    views: int | None


@dataclass
class _Search:
    """What the engine needs on the device, in the working dtype."""

    database: SearchDatabase
    classifier: Tensor
    desc: Tensor
    desc_class: Tensor
    logit_scale: float


def _open_inputs(
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    search: str,
    views: int | None,
) -> _Inputs:
    """Every check that needs no database rows: files, keys, shapes, labels, dimensions."""
    txt = load_text(text)
    reader = FeatureReader(features)
    reader.check_labels(txt.num_classes)
    if views is not None and not 0 <= views <= reader.num_views:
        raise RattaInputError(
            f"--views {views}: {features} holds {reader.num_views} views per image"
        )
    header = inspect_database(db)
    if search == "index" and not header.has_index:
        raise RattaInputError(
            f"{db}: --search index needs a database directory with an approximate index "
            "(add one with 'ratta db index --db DIR --index SPEC')"
        )
    for name, dim in (("features", reader.dim), ("database", header.dim)):
        if dim != txt.dim:
            path = features if name == "features" else db
            raise RattaInputError(
                f"{path}: {name} embeddings have dimension {dim} but the text file "
                f"{text} has {txt.dim}"
            )
    return _Inputs(features, text, db, txt, reader, views)


def _load_search(
    inp: _Inputs,
    dev: torch.device,
    work: torch.dtype,
    search: str,
    placement: str = "auto",
    databases: DatabaseCache | None = None,
) -> _Search:
    """The database (validated, placed for ``search``) and the text tensors, on ``dev``."""
    if databases is not None:
        database = databases.open(inp.db, search, dev, work, placement)
    else:
        database = open_search(inp.db, search, dev, work, placement)
    return _Search(
        database,
        inp.txt.classifier.to(device=dev, dtype=work),
        inp.txt.desc.to(device=dev, dtype=work),
        inp.txt.desc_class.to(dev),
        inp.txt.logit_scale,
    )


@dataclass
class AdaptInputs:
    """The engine's inputs read from the three documented files: the fields are
    :func:`ratta.engine.ratta_batch`'s arguments, in its order."""

    x: Tensor
    """[N, V+1, d] test embeddings, the center crop first."""
    classifier: Tensor
    """[C, d] the zero-shot (CuPL) classifier W."""
    desc: Tensor
    """[M, d] the description embeddings T."""
    desc_class: Tensor
    """[M] int64, the class owning each description row."""
    scale: float
    """The logit scale s."""
    retriever: ExactRetriever
    """Exact L2 search over the database rows (``retriever.embeddings`` [N_db, d]; on a GPU
    in their stored dtype, widened block by block as they are scanned)."""
    labels: Tensor | None
    """[N] int64 test labels, if the features file has them."""
    class_names: list[str]


def load_inputs(
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    views: int | None = None,
) -> AdaptInputs:
    """Read a features file, a text file and a database (``.npy`` or folder) for the engine.

    Validated as ``adapt`` validates them (one-line errors naming the file and key); the
    tensors are in ``dtype`` on ``device``. ``views`` keeps the first V' views. Every test
    image is loaded at once (N x (V+1) x d values): for large splits, :func:`adapt`
    streams them in batches.
    """
    if dtype not in DTYPES:
        raise RattaInputError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    dev = resolve_device(device)
    inp = _open_inputs(features, text, db, "exact", views)
    loaded = _load_search(inp, dev, DTYPES[dtype], "exact", placement="device")
    x = inp.reader.batch(0, inp.reader.num_images, views).to(device=dev, dtype=DTYPES[dtype])
    inp.reader.warn_renormalised()
    labels = inp.reader.labels
    inp.reader.close()
    return AdaptInputs(
        x,
        loaded.classifier,
        loaded.desc,
        loaded.desc_class,
        loaded.logit_scale,
        loaded.database.retriever,
        labels,
        inp.txt.class_names,
    )


def check_batch_memory(
    reader: FeatureReader, views: int | None, batch_size: int, work: torch.dtype
) -> None:
    """Refuse a batch whose test embeddings cannot fit in the available memory.

    A batch holds its [b, V+1, d] embeddings as read (up to float32; with the batches read
    ahead, three of them) and in the working dtype; the engine's own blocks are bounded
    separately.
    """
    available = available_memory()
    b = min(batch_size, reader.num_images)
    crops = 1 + (reader.num_views if views is None else views)
    need = b * crops * reader.dim * (3 * 4 + torch.empty(0, dtype=work).element_size())
    if available is not None and need > available:
        raise RattaInputError(
            f"--batch-size {batch_size}: {b} test images x {crops} embeddings x {reader.dim} "
            f"need about {gib(need)} of memory, but {gib(available)} is available; "
            "lower --batch-size"
        )


def _read(inp: _Inputs, span: tuple[int, int], dev: torch.device) -> Tensor:
    """Test embeddings of ``span`` in host memory (pinned when bound for a GPU)."""
    return inp.reader.batch(*span, inp.views, pin_memory=dev.type == "cuda")


def _adapt_batch(
    host_x: Tensor,
    s: _Search,
    config: RATTAConfig,
    work: torch.dtype,
    timer: StageTimer,
    keys: tuple[str, ...] = OUTPUT_KEYS,
) -> dict[str, Tensor]:
    """RA-TTA outputs ``keys`` of one batch of test embeddings, in host memory: either
    backend.

    The embeddings go to the device in their stored dtype (float16: half the bytes) and
    are widened there; the outputs come back in one device-to-host copy.
    """
    dev = s.classifier.device
    with timer("read"):
        x = upload(host_x, dev).to(work)
    result: BatchResult = ratta_batch(
        x, s.classifier, s.desc, s.desc_class, s.logit_scale, s.database.retriever, config, timer
    )
    tensors = {key: getattr(result, key) for key in keys}
    if dev.type != "cuda":
        return tensors
    # one buffer, one copy: class ids (< 2^24) are exact in the working float dtype, and
    # database row ids (< 2^53) in float64
    pack = torch.float64 if "retrieved" in keys else work
    flat = torch.cat([t.reshape(-1).to(pack) for t in tensors.values()]).cpu()
    out = {}
    for (key, t), part in zip(
        tensors.items(), flat.split([t.numel() for t in tensors.values()]), strict=True
    ):
        out[key] = part.view(t.shape).to(t.dtype)
    return out


class RangeAdapter:
    """The adaptation job of a Ray worker: loads text and database once, adapts a range of
    test images per call. Inputs are read from their paths, which every node must see."""

    def __init__(
        self,
        features: str | os.PathLike[str],
        text: str | os.PathLike[str],
        db: str | os.PathLike[str],
        config: RATTAConfig,
        *,
        dtype: str,
        search: str,
        views: int | None,
        tf32: bool = False,
        profile: bool = False,
        db_placement: str = "auto",
        save_retrieved: bool = False,
    ) -> None:
        self.paths = (str(features), str(text), str(db))
        self.config, self.dtype, self.search, self.views = config, dtype, search, views
        self.tf32, self.profile, self.placement = tf32, profile, db_placement
        self.keys = output_keys(save_retrieved)

    def setup(self, device: str) -> None:
        self.dev = resolve_device(device)
        self.timer = StageTimer(self.dev, self.profile)
        with self.timer("load"):
            self.inputs = _open_inputs(*self.paths, self.search, self.views)
            self.loaded = _load_search(
                self.inputs, self.dev, DTYPES[self.dtype], self.search, self.placement
            )

    def __call__(self, span: tuple[int, int]) -> dict[str, Any]:
        before = dict(self.inputs.reader.renormalised)
        with numerics(self.tf32), torch.inference_mode():
            host_x = _read(self.inputs, span, self.dev)
            outputs = _adapt_batch(
                host_x, self.loaded, self.config, DTYPES[self.dtype], self.timer, self.keys
            )
        renormalised = {k: v - before[k] for k, v in self.inputs.reader.renormalised.items()}
        timings = dict(self.timer.seconds)
        self.timer.seconds.clear()
        return {"outputs": outputs, "renormalised": renormalised, "timings": timings}


def _plan(
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    reads = Read.of(features, "--features") + Read.of(text, "--text") + Read.of(db, "--db")
    return output_files(out), reads


@guarded(_plan)
def adapt(
    features: str | os.PathLike[str],
    text: str | os.PathLike[str],
    db: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: RATTAConfig | None = None,
    *,
    batch_size: int = 256,
    device: str = "cpu",
    dtype: str = "float32",
    search: str = "exact",
    views: int | None = None,
    progress: Progress = False,
    backend: RayBackend | None = None,
    tf32: bool = False,
    profile: bool = False,
    db_placement: str = "auto",
    databases: DatabaseCache | None = None,
    save_retrieved: bool = False,
) -> dict[str, Any]:
    """Run RA-TTA over a features file and write ``out`` (safetensors) and ``out.json``.

    Every input is validated before work starts (values of the features file batch by batch);
    on any error nothing is written. ``views`` uses only the first V' stored views (for
    sweeps over V). ``save_retrieved`` also keeps what each prediction rests on
    (:data:`RETRIEVED_KEYS`: the retrieved database rows, the top description rows and
    their scores), which ``ratta explain`` shows. Returns the JSON summary.

    On CUDA: float32 products in full precision unless ``tf32``
    (:func:`ratta.devices.numerics`); ``profile`` makes stage times exact by waiting for the
    device at every stage boundary; ``db_placement`` (``auto``, ``device``, ``streamed``)
    says where the rows of an exact search live (:mod:`ratta.db.search`); ``databases``
    keeps the last opened database for the next call (``ratta eval``, ``ratta sweep``).
    The next batch of test embeddings is read while the current one is adapted.

    With ``backend=RayBackend(...)`` the batches (ranges of ``batch_size`` test images, the
    local batches) are adapted by Ray workers, each loading the text and the database once
    from their paths; finished batches are kept in ``out.parts/`` (a rerun skips them) and
    the outputs are concatenated in order, as locally.
    """
    config = config or RATTAConfig()
    if batch_size < 1:
        raise RattaInputError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise RattaInputError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if backend is not None:
        device = backend.check_device(device)
        dev = torch.device(device)
    else:
        dev = resolve_device(device)
    check_search(search, db_placement, dev, config.k_s)
    work = DTYPES[dtype]
    keys = output_keys(save_retrieved)
    out_path = Path(out)
    timer = StageTimer(dev if backend is None else torch.device("cpu"), profile)
    t_start = time.perf_counter()

    with timer("load"):
        inp = _open_inputs(features, text, db, search, views)
    txt, reader = inp.txt, inp.reader
    n = reader.num_images
    if backend is None:
        check_batch_memory(reader, inp.views, batch_size, work)
    spans = [(start, min(n, start + batch_size)) for start in range(0, n, batch_size)]
    shards: dict[str, Any] | None = None
    placed: dict[str, Any] = {}
    if backend is not None:
        job = RangeAdapter(
            features,
            text,
            db,
            config,
            dtype=dtype,
            search=search,
            views=views,
            tf32=tf32,
            profile=profile,
            db_placement=db_placement,
            save_retrieved=save_retrieved,
        )
        outputs, shards = _adapt_on_ray(
            inp, job, spans, out_path, batch_size, backend, timer, progress
        )
        database_rows, desc_rows = inspect_database(db).count, int(txt.desc.shape[0])
    else:
        with numerics(tf32), torch.inference_mode():
            with timer("load"):
                loaded = _load_search(inp, dev, work, search, db_placement, databases)
            outputs = _adapt_local(inp, loaded, spans, config, work, timer, progress, keys)
        database_rows, desc_rows = loaded.database.retriever.size, int(loaded.desc.shape[0])
        placed = loaded.database.to_dict()
    for key in keys:
        if outputs[key].is_floating_point():
            outputs[key] = outputs[key].float()

    n_cand = (outputs["candidates"] >= 0).sum(1)
    summary: dict[str, Any] = {
        **stamp(),
        "inputs": {"features": str(features), "text": str(text), "db": str(db)},
        "counts": {
            "images": n,
            "views": reader.num_views if views is None else views,
            "classes": txt.num_classes,
            "descriptions": desc_rows,
            "database": database_rows,
            "adapted": int((n_cand > 0).sum()),
            "fallback": int((n_cand == 0).sum()),
            "mean_candidates": float(n_cand.float().mean()),
        },
        "config": config.to_dict(),
        "logit_scale": txt.logit_scale,
        "runtime": {
            "device": str(dev),
            "dtype": dtype,
            "batch_size": batch_size,
            "search": search,
            "threads": torch.get_num_threads(),
            "backend": backend.to_dict() if backend is not None else {"name": "local"},
            "compute": compute_info(dev, dtype, tf32),
            "profile": profile,
            **placed,
        },
    }
    if shards is not None:
        summary["shards"] = shards
    tensors = dict(outputs)
    if reader.labels is not None:
        labels = reader.labels
        tensors["labels"] = labels
        summary["metrics"] = {
            name: {
                "top1": topk_accuracy(outputs[key], labels, 1),
                "top5": topk_accuracy(outputs[key], labels, 5),
            }
            for name, key in (
                ("zero_shot", "zero_shot"),
                ("retrieval", "retrieval"),
                ("ratta", "final"),
            )
        }
    reader.close()
    with timer("write"):
        meta = {
            "class_names": json.dumps(txt.class_names),
            "config": json.dumps(config.to_dict()),
            "ratta_version": __version__,
        }
        save_safetensors(out_path, tensors, meta)
    total = time.perf_counter() - t_start
    summary["timings_s"] = {k: round(v, 4) for k, v in timer.seconds.items()}
    summary["timings_s"]["total"] = round(total, 4)
    summary["ms_per_image"] = round(1000.0 * total / n, 3)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    write_json(Path(f"{out_path}.json"), summary)
    if backend is not None:
        shutil.rmtree(Path(f"{out_path}.parts"), ignore_errors=True)
    return summary


def _adapt_local(
    inp: _Inputs,
    loaded: _Search,
    spans: list[tuple[int, int]],
    config: RATTAConfig,
    work: torch.dtype,
    timer: StageTimer,
    progress: Progress,
    keys: tuple[str, ...],
) -> dict[str, Tensor]:
    """Adapt ``spans`` here, reading each next batch while the current one is adapted."""
    dev = loaded.classifier.device
    parts: dict[str, list[Tensor]] = defaultdict(list)
    bar = progress_bar(progress, "adapt", total=len(spans), unit="batch", leave=False)
    with contextlib.closing(read_ahead(spans, lambda span: _read(inp, span, dev))) as batches:
        while True:
            with timer("read"):
                host_x = next(batches, None)
            if host_x is None:
                break
            for key, value in _adapt_batch(host_x, loaded, config, work, timer, keys).items():
                parts[key].append(value)
            bar.update()
    bar.close()
    inp.reader.warn_renormalised()
    return {key: torch.cat(parts[key]) for key in keys}


def _adapt_on_ray(
    inp: _Inputs,
    job: RangeAdapter,
    spans: list[tuple[int, int]],
    out_path: Path,
    batch_size: int,
    backend: RayBackend,
    timer: StageTimer,
    progress: Progress,
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Adapt ``spans`` on Ray workers; outputs concatenated in order, and the shard report.

    Workers' stage times are added to ``timer`` (so they sum over workers).
    """
    from ratta.distributed import run_shards

    identity = {
        "ratta_version": __version__,
        "inputs": [file_stamp(p) for p in (inp.features, inp.text, inp.db)],
        "config": job.config.to_dict(),
        "dtype": job.dtype,
        "search": job.search,
        "views": inp.views,
        "batch_size": batch_size,
        # GPU and CPU kernels, TF32 or not, round differently: no mixed resumes
        "device": backend.device,
        "tf32": job.tf32 and backend.device == "cuda",
        "keys": list(job.keys),
    }
    store = ShardStore(Path(f"{out_path}.parts"), identity, "adaptation", prefix="batch")
    todo = store.todo(len(spans))

    def save(i: int, result: dict[str, Any]) -> None:
        store.save(i, result["outputs"], {"renormalised": result["renormalised"]})
        for stage, seconds in result["timings"].items():
            timer.seconds[stage] += seconds

    report = run_shards(
        job,
        [(i, spans[i]) for i in todo],
        save,
        backend,
        total=len(spans),
        sizes=[spans[i][1] - spans[i][0] for i in todo],
        progress=progress,
        desc=label(progress, "adapt"),
        unit="image",
    )
    report.raise_if_failed(store.folder)
    parts: dict[str, list[Tensor]] = defaultdict(list)
    with timer("read"):
        for i in range(len(spans)):
            tensors, meta = store.load(i)
            for key in job.keys:
                parts[key].append(tensors[key])
            for key, count in meta["renormalised"].items():
                inp.reader.renormalised[key] += count
    inp.reader.warn_renormalised()
    return {key: torch.cat(parts[key]) for key in job.keys}, report.to_dict()
