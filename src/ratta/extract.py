"""The extraction stage: test images -> features file (``image``, ``views``, ``labels``).

Images are decoded and augmented by DataLoader workers (uint8 crops), encoded in batches on
the model's device, and written in chunks of ``chunk_size`` images to ``<out>.parts/`` with
atomic renames. A rerun after a crash or kill continues with the missing chunks; the final
file is assembled by streaming the chunks, so memory is bounded by the chunk size.

The chunk is also the shard of a Ray run (``backend=RayBackend(...)``): Ray workers encode
chunks with :func:`encode_chunks`, the function the local loop uses, and the driver writes
them, so the chunk files, and the features file, are the same bytes on either backend.
"""

from __future__ import annotations

import copy
import json
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ratta import __version__
from ratta.atomic import check_free_space
from ratta.backbones import Backbone, Preprocessing, embed_dim
from ratta.devices import compute_info, host_buffer, numerics, resolve_device
from ratta.distributed import ShardReport, ShardStore
from ratta.errors import RattaInputError
from ratta.files import (
    RattaInputWarning,
    SafetensorsStreamWriter,
    atomic_path,
    save_safetensors,
    write_json,
)
from ratta.guard import Read, Write, guarded, output_files
from ratta.identity import files_stamp
from ratta.progress import Progress, label, progress_bar
from ratta.provenance import stamp
from ratta.resources import available_memory, cpu_count, gib, peak_rss_mb
from ratta.views import crops, normalise, pixel_stats

if TYPE_CHECKING:
    from ratta.distributed import RayBackend

FEATURE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
_PREFETCH = 4  # DataLoader batches each decoding worker prepares ahead


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
    """Item j: the uint8 crops [1 + V, 3, S, S] of image ``items[j]``, or why it failed.

    ``items`` holds (index in the split, path, chunk) triples: the index seeds the views.
    """

    def __init__(
        self, items: Sequence[tuple[int, Any, int]], pre: Preprocessing, views: int, seed: int
    ) -> None:
        self.items = list(items)
        self.pre = pre
        self.views = views
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> dict[str, Any]:
        index, path, chunk = self.items[j]
        item = {"index": index, "chunk": chunk, "path": str(path), "pixels": None, "error": None}
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as exc:  # any decoder failure: the image is skipped and listed
            item["error"] = f"{type(exc).__name__}: {exc}"
            return item
        item["pixels"] = crops(img, self.pre, self.views, self.seed, index)
        return item


def _collate(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return items


@dataclass(frozen=True)
class Chunk:
    """A shard of an extraction: chunk ``k``, the images ``start .. start + len(paths) - 1``."""

    k: int
    start: int
    paths: Sequence[Any]


@dataclass
class EncodedChunk:
    """The encoded readable images of a chunk, in split order, and the unreadable ones.

    ``features`` is [n, 1 + V, d] in the stored dtype (center crop first).
    """

    index: Tensor
    features: Tensor
    failures: list[dict[str, Any]]
    encode_s: float


class _ChunkBuffer:
    """Collects the encoded images of one chunk until all of its images have been seen."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen = 0
        self.rows: list[tuple[int, Tensor]] = []
        self.pending: list[tuple[int, Tensor]] = []
        self.failures: list[dict[str, Any]] = []
        self.encode_s = 0.0

    @property
    def complete(self) -> bool:
        return self.seen == self.size

    def result(self) -> EncodedChunk:
        index = torch.tensor([i for i, _ in self.rows], dtype=torch.int64)
        feats = torch.stack([f for _, f in self.rows]) if self.rows else torch.empty(0, 0, 0)
        return EncodedChunk(index, feats, self.failures, self.encode_s)


def encode_chunks(
    chunks: Sequence[Chunk],
    backbone: Backbone,
    settings: ExtractSettings,
    *,
    batch_size: int,
    forward_batch: int,
    workers: int,
    progress: Progress = False,
    context: Any = None,
) -> Iterator[tuple[int, EncodedChunk]]:
    """Encode the images of ``chunks`` through one DataLoader; yield each chunk when complete.

    Images are encoded in fixed groups of consecutive readable images of one chunk, so
    every forward pass sees the same inputs whatever the batch size, the workers, the
    chunks encoded together (one, as on a Ray worker, or all, as locally) or resumes: the
    chunk, and so the file, is bitwise reproducible.

    For a GPU, a group's crops are gathered into pinned memory (the copy to the device is
    asynchronous) and its features come back in one copy, in the stored dtype.
    """
    group = max(1, forward_batch // (1 + settings.views))
    items = [(c.start + j, p, c.k) for c in chunks for j, p in enumerate(c.paths)]
    sizes = {c.k: len(c.paths) for c in chunks}
    loader = DataLoader(
        ImageCrops(items, backbone.preprocessing, settings.views, settings.seed),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        persistent_workers=False,
        prefetch_factor=_PREFETCH if workers else None,
        multiprocessing_context=context if workers else None,
    )
    out_dtype = FEATURE_DTYPES[settings.dtype]
    stats = pixel_stats(backbone.preprocessing, backbone.device)
    buffers: dict[int, _ChunkBuffer] = {}
    with progress_bar(progress, "extract", total=len(items), unit="img") as bar:
        for batch in loader:
            for item in batch:
                k = item["chunk"]
                buf = buffers.setdefault(k, _ChunkBuffer(sizes[k]))
                buf.seen += 1
                if item["pixels"] is None:
                    buf.failures.append(
                        {"index": item["index"], "path": item["path"], "error": item["error"]}
                    )
                else:
                    buf.pending.append((item["index"], item["pixels"]))
                if len(buf.pending) == group or (buf.complete and buf.pending):
                    t0 = time.perf_counter()
                    group_crops = [px for _, px in buf.pending]
                    shape = (sum(c.shape[0] for c in group_crops), *group_crops[0].shape[1:])
                    pixels = host_buffer(shape, torch.uint8, backbone.device)
                    torch.cat(group_crops, out=pixels)
                    feats = _encode(backbone, pixels, forward_batch, stats, out_dtype)
                    feats = feats.view(len(buf.pending), 1 + settings.views, -1)
                    buf.rows.extend(zip([i for i, _ in buf.pending], feats, strict=True))
                    buf.pending = []
                    buf.encode_s += time.perf_counter() - t0
                if buf.complete:
                    yield k, buffers.pop(k).result()
            bar.update(len(batch))


class ChunkEncoder:
    """The extraction job of a Ray worker: one model, loaded once, encodes a chunk per call.

    The model travels with the job (on CPU, without its tokenizer), so workers need neither
    the checkpoint file nor network access to the weights; the images must be readable at
    the same paths on every node. A worker's DataLoader lives for one chunk, so it loads
    one image per batch: encoding starts as soon as the first image is decoded.
    """

    def __init__(
        self,
        backbone: Backbone,
        settings: ExtractSettings,
        *,
        forward_batch: int,
        workers: int,
        tf32: bool = False,
    ) -> None:
        model = backbone.model
        if backbone.device.type != "cpu":
            model = copy.deepcopy(model).cpu()
        self.backbone = replace(backbone, model=model, tokenizer=None, device=torch.device("cpu"))
        self.settings = settings
        self.forward_batch, self.workers, self.tf32 = forward_batch, workers, tf32
        self.imports = (type(model).__module__,)

    def setup(self, device: str) -> None:
        dev = resolve_device(device)
        self.backbone.model.to(dev)
        self.backbone = replace(self.backbone, device=dev)
        self.context = _decoder_context() if self.workers else None

    def __call__(self, chunk: Chunk) -> EncodedChunk:
        with numerics(self.tf32):
            ((_, encoded),) = encode_chunks(
                [chunk],
                self.backbone,
                self.settings,
                batch_size=1,
                forward_batch=self.forward_batch,
                workers=self.workers,
                context=self.context,
            )
        return encoded


def _decoder_context() -> Any:
    """Start method of a Ray worker's decoding processes: a fork server that has imported
    this module, started (and waited for) once per worker.

    Forking the worker itself for every chunk would share its memory copy-on-write with
    each chunk's decoders, and page-fault a copy of every page the encoding writes.
    """
    import multiprocessing

    multiprocessing.set_forkserver_preload([__name__])
    context = multiprocessing.get_context("forkserver")
    warm = context.Process(target=int)
    warm.start()
    warm.join()
    return context


def _plan(
    paths: Sequence[Path | Any],
    backbone: Backbone,
    out: str | os.PathLike[str],
    reads: Sequence[Read],
    **_: Any,
) -> tuple[list[Write], list[Read]]:
    images = [Read(Path(p), "image") for p in paths if isinstance(p, str | os.PathLike)]
    return output_files(out), [*images, *backbone.spec.reads(), *reads]


@guarded(_plan)
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
    progress: Progress = False,
    backend: RayBackend | None = None,
    reads: Sequence[Read] = (),
    tf32: bool = False,
) -> dict[str, Any]:
    """Encode every image and its views into the features file ``out`` (+ ``out.json``).

    Args:
        paths, labels: the test split in order (labels optional); a path may also be any
            object PIL opens (e.g. a tar member) whose ``str()`` names it stably.
        settings: views V, seed and stored dtype; with the backbone and the images they
            identify the output, and a resumed run must use the same.
        batch_size: test images per DataLoader batch (does not change the output; Ray
            workers load one image per batch).
        forward_batch: crops per model forward: whole images, at least one, are encoded
            together; part of the output's identity with ``chunk_size`` (float rounding).
        workers: DataLoader worker processes decoding and augmenting (0: in-process); on
            Ray, per Ray worker.
        chunk_size: images per resumable chunk (the shard of a Ray run).
        metadata: JSON-able description stored in the file and summary (dataset, split).
        backend: ``None`` to encode here, or a :class:`RayBackend`: chunks are encoded by
            Ray workers (each with its own copy of ``backbone``, on ``backend.device``) and
            written here, byte for byte as a local run writes them.
        reads: further inputs that no output may replace (the split file, the data root);
            the images and the backbone's files are always protected.
        tf32: on CUDA, let float32 products and convolutions round to TF32 (faster, ~1e-3
            off); off by default (:func:`ratta.devices.numerics`).

    Unreadable images are skipped and listed in the summary (``skipped``). The summary's
    ``shards`` says how many chunks were encoded, skipped (finished earlier), retried;
    ``compute`` the device and the precision actually used.
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
    if backend is None:
        workers = cap_workers(workers)
        check_memory(settings, backbone, batch_size, forward_batch, workers, chunk_size)
    out_path = Path(out)
    n = len(paths)
    if dim := embed_dim(backbone.spec):  # the chunks and the assembled file, side by side
        row = (1 + settings.views) * dim * FEATURE_DTYPES[settings.dtype].itemsize + 16
        check_free_space(out_path, 2 * n * row)
    where = backbone.device if backend is None else torch.device(backend.device)
    compute = compute_info(where, backbone.precision, tf32)
    identity = {
        "ratta_version": __version__,
        "backbone": backbone.identity(tf32),
        "views": settings.views,
        "seed": settings.seed,
        "dtype": settings.dtype,
        "images": n,
        "chunk_size": chunk_size,
        "forward_batch": forward_batch,
        "source": metadata or {},
        "paths_labels": _digest(paths, labels),
    }
    # chunks are resumed only over the same image files: a repaired image re-encodes
    stamps = files_stamp(p for p in paths if isinstance(p, str | os.PathLike))
    store = ShardStore(Path(f"{out_path}.parts"), {**identity, "files": stamps}, "extraction")
    num_chunks = (n + chunk_size - 1) // chunk_size
    todo = [
        Chunk(k, k * chunk_size, paths[k * chunk_size : (k + 1) * chunk_size])
        for k in store.todo(num_chunks)
    ]
    started = time.perf_counter()
    encode_s = 0.0

    def write(k: int, encoded: EncodedChunk) -> None:
        nonlocal encode_s
        _write_chunk(store.path(k), encoded, labels)
        encode_s += encoded.encode_s

    if backend is None:
        report = ShardReport("local", num_chunks, skipped=num_chunks - len(todo), unit="image")
        with numerics(tf32):
            for k, encoded in encode_chunks(
                todo,
                backbone,
                settings,
                batch_size=batch_size,
                forward_batch=forward_batch,
                workers=workers,
                progress=progress,
            ):
                write(k, encoded)
                report.done.append(k)
        report.items = sum(len(c.paths) for c in todo)
        report.seconds = time.perf_counter() - started
    elif todo:
        from ratta.distributed import run_shards

        job = ChunkEncoder(
            backbone, settings, forward_batch=forward_batch, workers=workers, tf32=tf32
        )
        report = run_shards(
            job,
            [(c.k, c) for c in todo],
            write,
            backend,
            total=num_chunks,
            sizes=[len(c.paths) for c in todo],
            progress=progress,
            desc=label(progress, "extract"),
            unit="image",
        )
        report.raise_if_failed(store.folder)
    else:
        report = ShardReport("ray", num_chunks, skipped=num_chunks, workers=0)

    summary = _assemble(store, num_chunks, out_path, settings, identity, labels is not None)
    summary["timings_s"] = {
        "total": round(time.perf_counter() - started, 3),
        "encode": round(encode_s, 3),
    }
    summary["compute"] = compute
    summary["resumed_chunks"] = num_chunks - len(todo)
    summary["shards"] = report.to_dict()
    summary["peak_rss_mb"] = round(peak_rss_mb(), 1)
    if todo:
        images = sum(len(c.paths) for c in todo)
        summary["images_per_s"] = round(images / max(1e-9, time.perf_counter() - started), 3)
    write_json(Path(f"{out_path}.json"), summary)
    store.remove()
    return summary


def cap_workers(workers: int) -> int:
    """Decoding processes beyond the CPUs only compete with the encoder: cap them, with a
    warning saying so."""
    cpus = cpu_count()
    if workers > cpus:
        warnings.warn(
            f"--workers {workers} is more than the {cpus} CPUs; using {cpus}",
            RattaInputWarning,
            stacklevel=3,
        )
        return cpus
    return workers


def check_memory(
    settings: ExtractSettings,
    backbone: Backbone,
    batch_size: int,
    forward_batch: int,
    workers: int,
    chunk_size: int,
) -> None:
    """Refuse, before any work, settings whose buffers cannot fit in the available memory.

    Estimate: decoded uint8 crops of the images in flight (DataLoader batches prefetched by
    every worker, and the batch being encoded), a forward batch of float32 pixels, and one
    chunk of features as float32 before storage. The model's own activations come on top.
    """
    available = available_memory()
    if available is None:
        return
    crops = 1 + settings.views
    pixels = 3 * backbone.preprocessing.size**2
    in_flight = batch_size * (max(1, workers) * _PREFETCH + 1) + max(1, forward_batch // crops)
    dim = embed_dim(backbone.spec) or 1024
    need = (
        in_flight * crops * pixels
        + max(forward_batch, crops) * pixels * 4
        + chunk_size * crops * dim * 4
    )
    if need > available:
        raise RattaInputError(
            f"--views {settings.views} with --batch-size {batch_size}, --workers {workers}, "
            f"--forward-batch {forward_batch} and --chunk-size {chunk_size} needs about "
            f"{gib(need)} of memory for its buffers, but {gib(available)} is available; "
            "lower --views, --batch-size, --workers or --chunk-size"
        )


def _digest(paths: Sequence[Path], labels: Sequence[int] | None) -> str:
    import hashlib

    h = hashlib.sha256()
    for i, p in enumerate(paths):
        h.update(f"{p}\t{labels[i] if labels is not None else ''}\n".encode())
    return h.hexdigest()


def _encode(
    backbone: Backbone,
    pixels: Tensor,
    forward_batch: int,
    stats: tuple[Tensor, Tensor],
    dtype: torch.dtype,
) -> Tensor:
    """Normalised embeddings [n, d] (``dtype``, host memory) of uint8 crops [n, 3, S, S]
    (pinned for a GPU): one forward per ``forward_batch`` crops, one copy back."""
    out = []
    for start in range(0, pixels.shape[0], forward_batch):
        block = pixels[start : start + forward_batch].to(backbone.device, non_blocking=True)
        out.append(backbone.encode_images(normalise(block, backbone.preprocessing, stats)))
    return torch.cat(out).to(dtype).cpu()


def _write_chunk(path: Path, chunk: EncodedChunk, labels: Sequence[int] | None) -> None:
    tensors = {"index": chunk.index, "image": chunk.features[:, 0], "views": chunk.features[:, 1:]}
    if labels is not None:
        tensors["labels"] = torch.tensor(
            [labels[i] for i in chunk.index.tolist()], dtype=torch.int64
        )
    save_safetensors(path, tensors, {"failures": json.dumps(chunk.failures)})


def _assemble(
    store: ShardStore,
    num_chunks: int,
    out: Path,
    settings: ExtractSettings,
    identity: dict[str, Any],
    has_labels: bool,
) -> dict[str, Any]:
    """Stream the chunks, in order, into the final features file."""
    handles = [safe_open(str(store.path(k)), framework="pt") for k in range(num_chunks)]
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
        **stamp(),
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
