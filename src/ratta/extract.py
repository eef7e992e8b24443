"""The extraction stage: test images -> features file (``image``, ``views``, ``labels``).

Images are decoded and augmented by DataLoader workers (uint8 crops), encoded in batches on
the model's device, and written in chunks of ``chunk_size`` images to ``<out>.parts/`` with
atomic renames. A rerun after a crash or kill continues with the missing chunks; the final
file is assembled by streaming the chunks, so memory is bounded by the chunk size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ratta import __version__
from ratta.backbones import Backbone, Preprocessing
from ratta.errors import RattaInputError
from ratta.files import (
    SafetensorsStreamWriter,
    atomic_path,
    check_output_path,
    save_safetensors,
    write_json,
)
from ratta.resources import peak_rss_mb
from ratta.views import crops, normalise

FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class ExtractSettings:
    """Everything that determines the content of a features file besides the images."""

    views: int = 100
    seed: int = 0
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.views < 0:
            raise RattaInputError(f"--views must be >= 0, got {self.views}")
        if self.dtype not in FEATURE_DTYPES:
            raise RattaInputError(f"--dtype must be float16 or float32, got '{self.dtype}'")


class ImageCrops(Dataset):
    """Item i: the uint8 crops [1 + V, 3, S, S] of test image i, or the reason it failed."""

    def __init__(self, paths: Sequence[Path], pre: Preprocessing, views: int, seed: int) -> None:
        self.paths = list(paths)
        self.pre = pre
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        try:
            with Image.open(self.paths[index]) as im:
                img = im.convert("RGB")
        except Exception as exc:  # any decoder failure: the image is skipped and listed
            return {"index": index, "pixels": None, "error": f"{type(exc).__name__}: {exc}"}
        return {
            "index": index,
            "pixels": crops(img, self.pre, self.views, self.seed, index),
            "error": None,
        }


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


class _ChunkBuffer:
    """Collects encoded images of one chunk (index range) until it is complete."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = start, stop
        self.seen = 0
        self.rows: list[tuple[int, Tensor]] = []
        self.pending: list[tuple[int, Tensor]] = []
        self.failures: list[dict[str, Any]] = []

    @property
    def complete(self) -> bool:
        return self.seen == self.stop - self.start


def _chunk_path(parts: Path, k: int) -> Path:
    return parts / f"chunk-{k:06d}.safetensors"


def extract_features(
    paths: Sequence[Path | Any],
    labels: Sequence[int] | None,
    backbone: Backbone,
    out: str | os.PathLike[str],
    settings: ExtractSettings | None = None,
    *,
    batch_size: int = 8,
    forward_batch: int = 256,
    workers: int = 2,
    chunk_size: int = 256,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Encode every image and its views into the features file ``out`` (+ ``out.json``).

    Args:
        paths, labels: the test split in order (labels optional); a path may also be any
            object PIL opens (e.g. a tar member) whose ``str()`` names it stably.
        settings: views V, seed and stored dtype; with the backbone and the images they
            identify the output, and a resumed run must use the same.
        batch_size: test images per DataLoader batch (does not change the output).
        forward_batch: crops per model forward: whole images, at least one, are encoded
            together; part of the output's identity with ``chunk_size`` (float rounding).
        workers: DataLoader worker processes decoding and augmenting (0: in-process).
        chunk_size: images per resumable chunk.
        metadata: JSON-able description stored in the file and summary (dataset, split).

    Unreadable images are skipped and listed in the summary (``skipped``).
    """
    settings = settings or ExtractSettings()
    for name, value in (
        ("--batch-size", batch_size),
        ("--forward-batch", forward_batch),
        ("--chunk-size", chunk_size),
    ):
        if value < 1:
            raise RattaInputError(f"{name} must be >= 1, got {value}")
    if workers < 0:
        raise RattaInputError(f"--workers must be >= 0, got {workers}")
    if not paths:
        raise RattaInputError("the split has no images")
    out_path = check_output_path(out)
    n = len(paths)
    pre = backbone.preprocessing
    identity = {
        "ratta_version": __version__,
        "backbone": backbone.fingerprint,
        "views": settings.views,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "images": n,
        "chunk_size": chunk_size,
        "forward_batch": forward_batch,
        "source": metadata or {},
        "paths_labels": _digest(paths, labels),
    }
    parts = Path(f"{out_path}.parts")
    parts.mkdir(exist_ok=True)
    ident_file = parts / "settings.json"
    if ident_file.exists():
        if json.loads(ident_file.read_text()) != json.loads(json.dumps(identity)):
            raise RattaInputError(
                f"{parts}: an unfinished extraction with other settings is there; rerun with "
                "the same settings to resume it, or delete the folder"
            )
    else:
        write_json(ident_file, identity)

    # Images are encoded in fixed groups of consecutive readable images of one chunk, so
    # every forward pass sees the same inputs whatever the batch size, workers or resumes:
    # the file is bitwise reproducible.
    group = max(1, forward_batch // (1 + settings.views))
    num_chunks = (n + chunk_size - 1) // chunk_size
    todo_chunks = [k for k in range(num_chunks) if not _chunk_path(parts, k).exists()]
    todo = [i for k in todo_chunks for i in range(k * chunk_size, min(n, (k + 1) * chunk_size))]
    started = time.perf_counter()
    encode_s = 0.0
    if todo:
        dataset = ImageCrops(paths, pre, settings.views, settings.seed)
        loader = DataLoader(
            torch.utils.data.Subset(dataset, todo),
            batch_size=batch_size,
            num_workers=workers,
            collate_fn=_collate,
            pin_memory=backbone.device.type == "cuda",
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        out_dtype = FEATURE_DTYPES[settings.dtype]
        bar = tqdm(
            total=len(todo), desc="extract", unit="img", disable=not progress, dynamic_ncols=True
        )
        chunks: dict[int, _ChunkBuffer] = {}
        for batch in loader:
            for item in batch:
                k = item["index"] // chunk_size
                buf = chunks.setdefault(
                    k, _ChunkBuffer(k * chunk_size, min(n, (k + 1) * chunk_size))
                )
                buf.seen += 1
                if item["pixels"] is None:
                    buf.failures.append(
                        {
                            "index": item["index"],
                            "path": str(paths[item["index"]]),
                            "error": item["error"],
                        }
                    )
                else:
                    buf.pending.append((item["index"], item["pixels"]))
                if len(buf.pending) == group or (buf.complete and buf.pending):
                    t0 = time.perf_counter()
                    pixels = torch.cat([px for _, px in buf.pending])
                    feats = _encode(backbone, pixels, forward_batch).to(out_dtype)
                    feats = feats.view(len(buf.pending), 1 + settings.views, -1)
                    buf.rows.extend(zip([i for i, _ in buf.pending], feats, strict=True))
                    buf.pending = []
                    encode_s += time.perf_counter() - t0
                if buf.complete:
                    _write_chunk(_chunk_path(parts, k), chunks.pop(k), labels)
            bar.update(len(batch))
        bar.close()

    summary = _assemble(parts, num_chunks, out_path, settings, identity, labels is not None)
    summary["timings_s"] = {
        "total": round(time.perf_counter() - started, 3),
        "encode": round(encode_s, 3),
    }
    summary["resumed_chunks"] = num_chunks - len(todo_chunks)
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if todo:
        summary["images_per_s"] = round(len(todo) / max(1e-9, time.perf_counter() - started), 3)
    write_json(Path(f"{out_path}.json"), summary)
    shutil.rmtree(parts, ignore_errors=True)
    return summary


def _digest(paths: Sequence[Path], labels: Sequence[int] | None) -> str:
    import hashlib

    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"{p}\t{labels[i] if labels is not None else ''}\n".encode())
    return h.hexdigest()


def _encode(backbone: Backbone, pixels: Tensor, forward_batch: int) -> Tensor:
    """Normalised embeddings [n, d] (float32, CPU) of uint8 crops [n, 3, S, S]."""
    out = []
    for start in range(0, pixels.shape[0], forward_batch):
        block = pixels[start : start + forward_batch].to(backbone.device, non_blocking=True)
        out.append(backbone.encode_images(normalise(block, backbone.preprocessing)).cpu())
    return torch.cat(out)


def _write_chunk(path: Path, buf: _ChunkBuffer, labels: Sequence[int] | None) -> None:
    buf.rows.sort(key=lambda r: r[0])
    index = torch.tensor([i for i, _ in buf.rows], dtype=torch.int64)
    feats = torch.stack([f for _, f in buf.rows]) if buf.rows else torch.empty(0, 0, 0)
    tensors = {"index": index, "image": feats[:, 0], "views": feats[:, 1:]}
    if labels is not None:
        tensors["labels"] = torch.tensor([labels[i] for i in index.tolist()], dtype=torch.int64)
    save_safetensors(path, tensors, {"failures": json.dumps(buf.failures)})


def _assemble(
    parts: Path,
    num_chunks: int,
    out: Path,
    settings: ExtractSettings,
    identity: dict[str, Any],
    has_labels: bool,
) -> dict[str, Any]:
    """Stream the chunks, in order, into the final features file."""
    handles = [safe_open(str(_chunk_path(parts, k)), framework="pt") for k in range(num_chunks)]
    failures: list[dict[str, Any]] = []
    sizes, dim = [], 0
    for h in handles:
        failures.extend(json.loads((h.metadata() or {}).get("failures", "[]")))
        shape = h.get_slice("image").get_shape()
        sizes.append(shape[0])
        if shape[0]:
            dim = shape[1]
    total = sum(sizes)
    if total == 0:
        raise RattaInputError(
            f"no test image could be read ({len(failures)} failed; first: "
            f"{failures[0]['path'] if failures else '-'})"
        )
    dtype = FEATURE_DTYPES[settings.dtype]
    specs: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        "image": (dtype, (total, dim)),
        "views": (dtype, (total, settings.views, dim)),
        "index": (torch.int64, (total,)),
    }
    if has_labels:
        specs["labels"] = (torch.int64, (total,))
    meta = {"ratta_features": json.dumps(identity), "skipped": str(len(failures))}
    with atomic_path(out) as tmp, SafetensorsStreamWriter(tmp, specs, meta) as writer:
        for key in specs:
            if 0 in specs[key][1]:  # nothing to write (views [N, 0, d] when V = 0)
                continue
            for h, size in zip(handles, sizes, strict=True):
                if size:
                    writer.write(key, h.get_tensor(key))
    for h in handles:
        h.__exit__(None, None, None)
    return {
        "ratta_version": __version__,
        "output": str(out),
        "images": total,
        "skipped": len(failures),
        "skipped_images": failures,
        "views": settings.views,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "dimension": dim,
        "backbone": identity["backbone"],
        "source": identity["source"],
    }
