"""The adaptation stage: (features, text, database) files -> predictions file + JSON summary."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ratta import __version__
from ratta.config import RATTAConfig
from ratta.db import inspect_database, load_for_search
from ratta.engine import BatchResult, ratta_batch
from ratta.errors import RattaInputError
from ratta.files import (
    FeatureReader,
    check_output_path,
    load_text,
    save_safetensors,
    write_json,
)
from ratta.metrics import topk_accuracy
from ratta.resources import peak_rss_mb
from ratta.retrieval import ExactRetriever, FaissRetriever

DTYPES = {"float32": torch.float32, "float64": torch.float64}
SEARCHES = ("exact", "faiss", "index")
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


class StageTimer:
    """Accumulates wall time per stage; synchronises CUDA so GPU work is attributed right."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.seconds[stage] += time.perf_counter() - start

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise RattaInputError(
            f"--device: unknown device '{name}' (use cpu, cuda or cuda:N)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RattaInputError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise RattaInputError(f"--device {name}: only cpu and cuda are supported")
    return device


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
    progress: bool = False,
) -> dict[str, Any]:
    """Run RA-TTA over a features file and write ``out`` (safetensors) and ``out.json``.

    Every input is validated before work starts (values of the features file batch by batch);
    on any error nothing is written. ``views`` uses only the first V' stored views (for
    sweeps over V). Returns the JSON summary.
    """
    config = config or RATTAConfig()
    if batch_size < 1:
        raise RattaInputError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in DTYPES:
        raise RattaInputError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    if search not in SEARCHES:
        raise RattaInputError(f"--search must be one of {', '.join(SEARCHES)}, got '{search}'")
    dev = resolve_device(device)
    work = DTYPES[dtype]
    out_path = check_output_path(out)
    timer = StageTimer(dev)
    t_start = time.perf_counter()

    with timer("load"):
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
        database, sq_norms, index = load_for_search(
            db, dtype=work, device=dev, with_index=search == "index"
        )
        if search == "exact":
            retriever: ExactRetriever | FaissRetriever = ExactRetriever(database, sq_norms)
        elif search == "faiss":
            retriever = FaissRetriever.flat(database)
        else:
            retriever = FaissRetriever(index, database)
        classifier = txt.classifier.to(device=dev, dtype=work)
        desc = txt.desc.to(device=dev, dtype=work)
        desc_class = txt.desc_class.to(dev)

    parts: dict[str, list[Tensor]] = defaultdict(list)
    n = reader.num_images
    starts = range(0, n, batch_size)
    bar = tqdm(starts, desc="adapt", unit="batch", disable=not progress, leave=False)
    with torch.inference_mode():
        for start in bar:
            with timer("read"):
                x = reader.batch(start, min(n, start + batch_size), views)
                x = x.to(device=dev, dtype=work)
            result: BatchResult = ratta_batch(
                x, classifier, desc, desc_class, txt.logit_scale, retriever, config, timer
            )
            for key in OUTPUT_KEYS:
                parts[key].append(getattr(result, key).cpu())
    bar.close()
    reader.warn_renormalised()
    outputs = {key: torch.cat(parts[key]) for key in OUTPUT_KEYS}
    for key in OUTPUT_KEYS:
        if outputs[key].is_floating_point():
            outputs[key] = outputs[key].float()

    n_cand = (outputs["candidates"] >= 0).sum(1)
    summary: dict[str, Any] = {
        "ratta_version": __version__,
        "inputs": {"features": str(features), "text": str(text), "db": str(db)},
        "counts": {
            "images": n,
            "views": reader.num_views if views is None else views,
            "classes": txt.num_classes,
            "descriptions": int(desc.shape[0]),
            "database": retriever.size,
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
        },
    }
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
    return summary
