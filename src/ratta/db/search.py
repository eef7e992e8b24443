"""A database opened for search on a device: where its rows live, and the retriever over them.

Placements (``runtime.db_placement`` of the adaptation summary):

- ``device``: one tensor on the search device. On a CPU the rows widened to the working dtype
  (the fastest BLAS scan); on a GPU the rows in their stored dtype (2 bytes per value for
  the paper's float16 databases), widened block by block during each scan, never whole;
- ``streamed``: the rows stay in host memory (memory-mapped) and every search streams them to
  the device; only their squared norms live there. Chosen on a GPU when the stored rows do
  not fit in its free memory next to ``DEVICE_WORKSPACE``;
- ``host``: FAISS and index search: the rows stay in host memory and only the retrieved ones
  are read; the FAISS index itself goes to the requested GPU when FAISS can put it there, or
  stays on the host with the reason recorded (``faiss_fallback``).

Every row is validated once on opening, as :func:`ratta.files.scan_rows` does.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ratta.db.store import Database, open_rows
from ratta.devices import DeviceFallbackWarning
from ratta.errors import RattaInputError
from ratta.files import ArrayRows, CheckedBlock, load_rows, scan_rows, torch_dtype
from ratta.retrieval import (
    FAISS_GPU_MAX_K,
    ExactRetriever,
    FaissRetriever,
    HostRows,
    StreamedRetriever,
    faiss_gpu_count,
    faiss_to_device,
)

SEARCHES = ("exact", "faiss", "index")
PLACEMENTS = ("auto", "device", "streamed")
# Device memory left free for the engine's blocks: scoring (128 MB of similarities and
# their selections, ~0.4 GB at paper scale), the scan's widened rows and distances
# (128 + 256 MB at most), a batch of embeddings.
DEVICE_WORKSPACE = 1 << 30


@dataclass
class SearchDatabase:
    """A retriever over a database, and where things live (for the run summary)."""

    retriever: ExactRetriever | FaissRetriever
    placement: str
    device_bytes: int
    faiss_device: str | None = None
    faiss_fallback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"db_placement": self.placement, "db_device_bytes": self.device_bytes}
        if self.faiss_device is not None:
            out["faiss_device"] = self.faiss_device
            out["faiss_fallback"] = self.faiss_fallback
        return out


class DatabaseCache:
    """The last database opened for search, kept for the next adaptation over the same one
    (``ratta eval`` and ``ratta sweep``: loaded once per run, not once per cell).

    Keyed by the file's (or directory manifest's) path, size and modification time, the
    search, device, working dtype and placement; a new key releases the old database first.
    """

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.database: SearchDatabase | None = None

    def open(
        self,
        path: str | os.PathLike[str],
        search: str,
        device: torch.device,
        dtype: torch.dtype,
        placement: str = "auto",
    ) -> SearchDatabase:
        from ratta.distributed import file_stamp

        key = (json.dumps(file_stamp(path)), search, str(device), dtype, placement)
        if key != self.key or self.database is None:
            self.key, self.database = None, None
            self.database = open_search(path, search, device, dtype, placement)
            self.key = key
        return self.database


def check_search(search: str, placement: str, device: torch.device, k_s: int) -> None:
    """Refuse, before any row is read, what the search cannot do (one line each)."""
    if search not in SEARCHES:
        raise RattaInputError(f"--search must be one of {', '.join(SEARCHES)}, got '{search}'")
    if placement not in PLACEMENTS:
        raise RattaInputError(
            f"--db-placement must be one of {', '.join(PLACEMENTS)}, got '{placement}'"
        )
    if placement != "auto" and search != "exact":
        raise RattaInputError(
            f"--db-placement {placement}: only --search exact places rows; FAISS and index "
            "search keep them in host memory"
        )
    gpu_faiss = search != "exact" and device.type == "cuda" and faiss_gpu_count() > 0
    if gpu_faiss and k_s > FAISS_GPU_MAX_K:
        raise RattaInputError(
            f"--k-s {k_s}: FAISS on the GPU returns at most {FAISS_GPU_MAX_K} neighbours; "
            "use a smaller K_S, --search exact, or --device cpu"
        )


def open_search(
    path: str | os.PathLike[str],
    search: str,
    device: torch.device,
    dtype: torch.dtype,
    placement: str = "auto",
) -> SearchDatabase:
    """Open the database at ``path`` for ``search`` on ``device`` with working dtype ``dtype``.

    A FAISS index that cannot go to the GPU is reported with one warning line
    (:class:`ratta.devices.DeviceFallbackWarning`) and in ``faiss_fallback``.
    """
    source = open_rows(path)
    if search != "exact":
        return _faiss(source, search, device, dtype)
    if _placement(source, device, dtype, placement) == "streamed":
        return _streamed(source, device, dtype)
    if device.type != "cuda":
        rows, sq_norms = load_rows(source, dtype, device)
        return SearchDatabase(ExactRetriever(rows, sq_norms), "device", _nbytes(rows, sq_norms))
    rows = torch.empty((source.count, source.dim), dtype=torch_dtype(source.dtype), device=device)
    sq_norms = torch.empty(source.count, dtype=dtype, device=device)
    divisor: Tensor | None = None
    for block in scan_rows(source, dtype, device):
        rows[block.start : block.start + block.rows.shape[0]] = block.stored
        sq_norms[block.start : block.start + block.rows.shape[0]] = block.sq_norms
        divisor = _collect(divisor, block, source.count)
    retriever = ExactRetriever(rows, sq_norms, divisor=divisor)
    return SearchDatabase(retriever, "device", _nbytes(rows, sq_norms, divisor))


def _nbytes(*tensors: Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _collect(divisor: Tensor | None, block: CheckedBlock, count: int) -> Tensor | None:
    """The divisors [N] of the rows so far: ``None`` until a block is re-normalised, then 1
    for the rows of every block that was not."""
    if block.divisor is None:
        return divisor
    if divisor is None:
        divisor = torch.ones(count, dtype=block.divisor.dtype, device=block.divisor.device)
    divisor[block.start : block.start + block.divisor.shape[0]] = block.divisor
    return divisor


def _placement(
    source: Database | ArrayRows, device: torch.device, dtype: torch.dtype, placement: str
) -> str:
    """``device`` or ``streamed``: ``auto`` streams on a GPU whose free memory cannot hold
    the stored rows and their norms next to ``DEVICE_WORKSPACE`` (always ``device`` on a
    CPU); ``device`` on a GPU without room for them is refused."""
    if device.type != "cuda":
        return "device" if placement == "auto" else placement
    need = source.count * (source.dim * torch_dtype(source.dtype).itemsize + dtype.itemsize)
    free, _ = torch.cuda.mem_get_info(device)
    if placement == "device" and need > free:
        raise RattaInputError(
            f"--db-placement device: the database needs {need / 2**30:.2f} GiB on {device}, "
            f"which has {free / 2**30:.2f} GiB free (use auto or streamed)"
        )
    if placement == "auto":
        return "device" if need + DEVICE_WORKSPACE <= free else "streamed"
    return placement


def _streamed(
    source: Database | ArrayRows, device: torch.device, dtype: torch.dtype
) -> SearchDatabase:
    """Rows in host memory; their squared norms (and divisors) on ``device``."""
    sq_norms = torch.empty(source.count, dtype=dtype, device=device)
    divisor: Tensor | None = None
    for block in scan_rows(source, dtype, device):
        sq_norms[block.start : block.start + block.rows.shape[0]] = block.sq_norms
        divisor = _collect(divisor, block, source.count)
    host = HostRows(source, None if divisor is None else divisor.cpu())
    retriever = StreamedRetriever(host, sq_norms, divisor=divisor)
    return SearchDatabase(retriever, "streamed", _nbytes(sq_norms, divisor))


def _faiss(
    source: Database | ArrayRows, search: str, device: torch.device, dtype: torch.dtype
) -> SearchDatabase:
    """A FAISS index (exact ``IndexFlatL2``, or the directory's own) on ``device`` if FAISS
    can put it there; the rows stay in host memory, validated on the way."""
    import faiss

    if search == "faiss":
        index = faiss.IndexFlatL2(source.dim)
    else:
        assert isinstance(source, Database)
        index = source.read_index()
    index, reason = faiss_to_device(index, device)  # an empty flat index is filled there
    divisor: Tensor | None = None
    for block in scan_rows(source, dtype):
        if search == "faiss":
            index.add(np.ascontiguousarray(block.rows.numpy(), dtype=np.float32))
        divisor = _collect(divisor, block, source.count)
    if reason is not None:
        warnings.warn(
            f"--search {search}: FAISS searches on the CPU, not {device}: {reason}",
            DeviceFallbackWarning,
            stacklevel=3,
        )
    where = "cpu" if device.type != "cuda" or reason is not None else str(device)
    return SearchDatabase(
        FaissRetriever(index, HostRows(source, divisor)),
        "host",
        0,
        faiss_device=where,
        faiss_fallback=reason,
    )
