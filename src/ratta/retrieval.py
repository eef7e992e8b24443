"""Text-to-image search over an image database: exact (BLAS) and FAISS-index retrievers.

Where the rows live is part of the retriever: one tensor (host memory on a CPU; on a GPU in
their stored dtype, float16 for the paper's databases), or left in host memory (memory-mapped
files) and streamed to the GPU block by block for an exact scan, or read by id for the
retrieved rows only (:class:`HostRows`, FAISS and index search).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from ratta.devices import host_buffer, upload
from ratta.files import readonly_tensor, torch_dtype

# Target size (elements) of one [Q, rows] distance block of the exact scan: cache-sized
# blocks keep the GEMM compute-bound (a 64 MB block was 1.5x slower than 16 MB on 2 cores).
_SCAN_BLOCK = 1 << 22
_SCAN_ROWS = (2048, 16384)
# On a GPU, distance blocks of up to 256 MB over 8k-64k rows (widened: 128 MB at d = 512).
_DEVICE_SCAN_BLOCK = 1 << 26
_DEVICE_SCAN_ROWS = (8192, 1 << 16)
# Rows per host-to-device copy when streaming (128 MB of float16 rows at d = 512).
STREAM_ROWS = 1 << 17
# The largest k (and IVF nprobe) FAISS's GPU indexes search with (GPU_MAX_SELECTION_K).
FAISS_GPU_MAX_K = 2048


def _order_by_distance(dist: Tensor, ids: Tensor) -> Tensor:
    """Sort candidates by (distance, index): nearest first, ties to the lower index."""
    by_id = ids.argsort(dim=1)
    dist, ids = dist.gather(1, by_id), ids.gather(1, by_id)
    by_dist = dist.argsort(dim=1, stable=True)
    return ids.gather(1, by_dist)


def _scan_rows(device: torch.device, queries: int) -> int:
    block, (lo, hi) = (
        (_DEVICE_SCAN_BLOCK, _DEVICE_SCAN_ROWS)
        if device.type == "cuda"
        else (_SCAN_BLOCK, _SCAN_ROWS)
    )
    return max(lo, min(hi, block // max(1, queries)))


class RowSource(Protocol):
    """Database rows in host memory: a database directory or a ``.npy`` file."""

    @property
    def count(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """(first row, [n, d] array of at most ``rows`` rows), in row order."""
        ...

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The rows of the given ids, in their order, in the stored dtype."""
        ...


class HostRows:
    """Database rows left in host memory (memory-mapped), read by id or streamed by block.

    ``divisor`` [N] (host) holds the norm by which each row was re-normalised when the
    database was checked (1 for the others), or ``None`` when no row needed it; the rows
    read are divided by it, so they equal those of a database loaded whole.
    """

    def __init__(self, source: RowSource, divisor: Tensor | None = None) -> None:
        self.source = source
        self.divisor = divisor

    @property
    def size(self) -> int:
        return self.source.count

    def take(self, ids: Tensor, like: Tensor) -> Tensor:
        """Rows [*ids.shape, d] for ``ids`` (any device), with the dtype and device of ``like``.

        Only these rows are read; they travel to the device in their stored dtype, through
        pinned memory, and are widened there.
        """
        flat = ids.cpu().reshape(-1)
        rows = upload(readonly_tensor(self.source.rows(flat.numpy())), like.device).to(like.dtype)
        if self.divisor is not None:
            rows = rows / upload(self.divisor[flat], like.device).to(like.dtype)[:, None]
        return rows.view(*ids.shape, -1)


class ExactRetriever:
    r"""Exact L2 search by one scan of the database per call, as a BLAS product plus top-k.

    ||r - t||^2 = ||r||^2 - 2 <r, t> + ||t||^2; the last term does not change the ranking, so
    each block of rows costs one GEMM (``addmm``) and a partial selection. The results equal
    FAISS ``IndexFlatL2`` up to floating-point ties, at several times its speed on CPU.

    The rows may be narrower than the queries (float16 on a GPU): each block is widened to
    the wider of the two dtypes just before its product, so products and distances are in
    float32 (float64) and no wide copy of the whole database is ever made. ``divisor`` [N]
    re-normalises rows on the fly (see :class:`HostRows`).
    """

    def __init__(
        self, embeddings: Tensor, sq_norms: Tensor | None = None, *, divisor: Tensor | None = None
    ) -> None:
        if embeddings.ndim != 2 or embeddings.shape[0] == 0:
            raise ValueError("ExactRetriever needs a non-empty [N, d] tensor")
        self.embeddings = embeddings
        wide = torch.promote_types(embeddings.dtype, torch.float32)
        if sq_norms is None:  # block by block: no widened copy of the whole database
            sq_norms = torch.cat([(b.to(wide) ** 2).sum(1) for b in embeddings.split(1 << 16)])
        self.sq_norms = sq_norms.to(wide)
        self.divisor = divisor

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    @property
    def device(self) -> torch.device:
        return self.sq_norms.device

    def _blocks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, rows on the device) covering the database in order."""
        yield 0, self.embeddings

    def _widen(self, rows: Tensor, first: int, dtype: torch.dtype) -> Tensor:
        rows = rows.to(dtype)
        if self.divisor is not None:
            rows = rows / self.divisor[first : first + rows.shape[0], None].to(dtype)
        return rows

    def search(self, queries: Tensor, k: int) -> Tensor:
        n = self.size
        k = min(k, n)
        work = torch.promote_types(queries.dtype, self.sq_norms.dtype)
        queries = queries.to(work)
        rows = _scan_rows(self.device, queries.shape[0])
        best_d: Tensor | None = None
        best_i: Tensor | None = None
        for first, block in self._blocks():
            for s in range(0, block.shape[0], rows):
                start = first + s
                piece = self._widen(block[s : s + rows], start, work)
                norms = self.sq_norms[start : start + piece.shape[0]].to(work)
                dist = torch.addmm(norms.unsqueeze(0), queries, piece.T, alpha=-2.0)
                d, i = dist.topk(min(k, piece.shape[0]), dim=1, largest=False)
                i = i + start
                if best_d is None or best_i is None:
                    best_d, best_i = d, i
                else:
                    cat_d, cat_i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
                    d, pos = cat_d.topk(k, dim=1, largest=False)
                    best_d, best_i = d, cat_i.gather(1, pos)
        assert best_d is not None and best_i is not None
        return _order_by_distance(best_d, best_i)

    def gather(self, ids: Tensor, like: Tensor) -> Tensor:
        ids = ids.to(self.embeddings.device)
        rows = self.embeddings[ids].to(like.dtype)
        if self.divisor is not None:
            rows = rows / self.divisor[ids].to(like.dtype).unsqueeze(-1)
        return rows.to(like.device)


class StreamedRetriever(ExactRetriever):
    """:class:`ExactRetriever` over rows left in host memory: every search streams them to
    the device in blocks of ``STREAM_ROWS`` through two pinned staging buffers, the copy of
    one block overlapping the scan of the previous one; only the squared norms (and the
    divisors) stay on the device. For databases larger than the device's free memory; on a
    CPU, it scans the memory map itself (no copy of the database in memory).
    """

    def __init__(self, rows: HostRows, sq_norms: Tensor, *, divisor: Tensor | None = None) -> None:
        self.rows = rows
        self.sq_norms = sq_norms
        self.divisor = divisor

    @property
    def size(self) -> int:
        return self.rows.size

    def _blocks(self) -> Iterator[tuple[int, Tensor]]:
        source, device = self.rows.source, self.device
        if device.type != "cuda":  # the memory map is already host memory
            for first, block in source.blocks(STREAM_ROWS):
                yield first, readonly_tensor(block)
            return
        staging: list[Tensor] = []
        copied: list[Any] = [None, None]  # the copy out of each staging buffer, in flight
        for i, (first, block) in enumerate(source.blocks(STREAM_ROWS)):
            slot = i % 2
            if len(staging) <= slot:
                dtype = torch_dtype(block.dtype)
                staging.append(host_buffer((STREAM_ROWS, source.dim), dtype, device))
            if copied[slot] is not None:
                copied[slot].synchronize()  # the buffer is free once its last copy is done
            buf = staging[slot][: block.shape[0]]
            buf.copy_(readonly_tensor(block))
            rows = buf.to(device, non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record()
            yield first, rows

    def gather(self, ids: Tensor, like: Tensor) -> Tensor:
        return self.rows.take(ids, like)


class FaissRetriever:
    """Search through any FAISS index over the same rows (``IndexFlatL2`` reproduces the paper).

    The retrieved vectors are read back from ``embeddings`` (the database itself: a tensor,
    or :class:`HostRows` left in host memory, of which only the retrieved rows are read),
    so approximate indexes still feed the exact stored embeddings to optimal transport.
    The index may live on a GPU (:func:`faiss_to_device`); queries and neighbour ids pass
    through host memory either way.
    """

    def __init__(self, index: Any, embeddings: Tensor | HostRows) -> None:
        rows = embeddings.size if isinstance(embeddings, HostRows) else embeddings.shape[0]
        if index.ntotal != rows:
            raise ValueError(f"FAISS index holds {index.ntotal} rows but the database has {rows}")
        self.index = index
        self.embeddings = embeddings

    @classmethod
    def flat(cls, embeddings: Tensor) -> FaissRetriever:
        """An exact ``IndexFlatL2`` over ``embeddings`` (float32 copy)."""
        import faiss

        index = faiss.IndexFlatL2(embeddings.shape[1])
        index.add(np.ascontiguousarray(embeddings.detach().cpu().numpy(), dtype=np.float32))
        return cls(index, embeddings)

    @property
    def size(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Neighbour ids [Q, k] in host memory (what the index returns)."""
        k = min(k, self.size)
        q = np.ascontiguousarray(queries.detach().cpu().numpy(), dtype=np.float32)
        dist, ids = self.index.search(q, k)
        if (ids < 0).any():
            raise RuntimeError("FAISS returned fewer neighbours than requested")
        return _order_by_distance(torch.from_numpy(dist), torch.from_numpy(ids))

    def gather(self, ids: Tensor, like: Tensor) -> Tensor:
        if isinstance(self.embeddings, HostRows):
            return self.embeddings.take(ids, like)
        return self.embeddings[ids.to(self.embeddings.device)].to(
            device=like.device, dtype=like.dtype
        )


def faiss_to_device(index: Any, device: torch.device) -> tuple[Any, str | None]:
    """``index`` moved to the GPU ``device`` (that one only), or kept on the host with the
    reason why it cannot search there: (index, None) or (host index, reason).

    A GPU index returns at most ``FAISS_GPU_MAX_K`` neighbours: callers refuse larger k up
    front when :func:`faiss_gpu_count` says the index may go to a GPU.
    """
    import faiss

    if device.type != "cuda":
        return index, None
    if faiss_gpu_count() == 0:
        if not hasattr(faiss, "StandardGpuResources"):
            return index, "this FAISS has no GPU support (faiss-cpu is installed)"
        return index, "FAISS sees no GPU"
    gpu = torch.cuda.current_device() if device.index is None else device.index
    if gpu >= faiss_gpu_count():
        return index, f"FAISS sees {faiss_gpu_count()} GPUs, not cuda:{gpu}"
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None and ivf.nprobe > FAISS_GPU_MAX_K:
        return index, f"nprobe={ivf.nprobe} is above FAISS's GPU limit of {FAISS_GPU_MAX_K}"
    resources = faiss.StandardGpuResources()
    try:
        moved = faiss.index_cpu_to_gpu(resources, gpu, index)
    except RuntimeError as exc:  # no GPU implementation of this index type (e.g. HNSW)
        reason = " ".join(str(exc).split()).rsplit(":", 1)[-1].strip()
        return index, f"FAISS cannot move {type(index).__name__} to the GPU ({reason})"
    moved.referenced_objects = [resources]  # FAISS's idiom: the pool lives with the index
    return moved, None


def faiss_gpu_count() -> int:
    """GPUs FAISS can use: 0 with faiss-cpu."""
    import faiss

    return int(faiss.get_num_gpus()) if hasattr(faiss, "StandardGpuResources") else 0
