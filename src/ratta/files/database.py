"""The single-file database: a ``.npy`` [N, d] float16/float32, memory-mapped; and the one
validation pass every database (file or directory) goes through when it is loaded.

Database directories (shards, manifest, index) are :mod:`ratta.db`'s.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ratta.atomic import atomic_path
from ratta.errors import RattaInputError
from ratta.files.checks import NUMPY_EMBED_DTYPES, check_norms, warn_renormalised
from ratta.identity import read_npy_header

# Rows validated at a time when a database is loaded: 64k x 512 float32 is 128 MB.
CHECK_ROWS = 1 << 16


def open_database(path: str | os.PathLike[str], what: str = "database") -> np.ndarray:
    """Memory-map a database ``.npy`` [N, d] and check its header.

    The header is read first, so a file that is not a ``.npy`` array (empty, a pickle,
    text) is named as what it is, and nothing is ever unpickled.
    """
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"{p}: {what} file not found")
    shape, dtype, _ = read_npy_header(p)
    if len(shape) != 2:
        raise RattaInputError(f"{p}: {what} must have rank 2 [N, d], got shape {shape}")
    if dtype not in NUMPY_EMBED_DTYPES:
        raise RattaInputError(f"{p}: {what} must be float16/float32, got {dtype}")
    if shape[0] == 0:
        raise RattaInputError(f"{p}: {what} is empty (0 rows)")
    try:
        return np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RattaInputError(f"{p}: not a readable .npy array ({exc})") from None


class ArrayRows:
    """A database ``.npy`` file, read like a database directory: memory-mapped, by block
    or by row id (:class:`ratta.retrieval.RowSource`)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.array = open_database(self.path)

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    def files(self) -> Iterator[tuple[Path, int, np.ndarray]]:
        """(file, first row, memory-mapped [n, d] array): the one file."""
        yield self.path, 0, self.array

    def blocks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        for start in range(0, self.count, rows):
            yield start, self.array[start : start + rows]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        return self.array[np.asarray(ids, dtype=np.int64)]


@dataclass
class CheckedBlock:
    """Consecutive database rows, validated (see :func:`scan_rows`).

    Attributes:
        start: first row.
        stored: the rows as stored (their file's dtype), on the scan's device.
        rows: the rows in the scan's dtype, re-normalised where needed.
        sq_norms: squared norms of ``rows``.
        divisor: the norms the rows were divided by, when any row of the block was off the
            unit sphere (all rows of such a block are divided by their norm), else ``None``.
    """

    start: int
    stored: Tensor
    rows: Tensor
    sq_norms: Tensor
    divisor: Tensor | None


def scan_rows(
    source: Any,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    out: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Iterator[CheckedBlock]:
    """Every row of a database once, in blocks: copied to ``device``, widened to ``dtype``
    (into ``out``, an [N, d] tensor of ``dtype`` on ``device``, when given), validated.

    NaN/Inf and zero rows are errors naming the file and row; rows off the unit sphere are
    re-normalised (counted, and warned about once at the end). ``source`` has a ``path`` and
    ``files()``: (file, first row, memory-mapped array), as :class:`ArrayRows` and database
    directories.
    """
    fixed = 0
    chunk_rows = chunk_rows or CHECK_ROWS
    for path, first, arr in source.files():
        for s in range(0, arr.shape[0], chunk_rows):
            start = first + s
            stored = readonly_tensor(arr[s : s + chunk_rows]).to(device)
            if out is not None:
                rows = out[start : start + stored.shape[0]]
                rows.copy_(stored)
            else:
                rows = stored.to(dtype)
            norms = torch.linalg.vector_norm(rows, dim=-1)
            n = check_norms(rows, norms, path, "database", s)
            divisor = None
            if n:
                divisor = norms
                rows = rows.div_(norms.unsqueeze(1)) if out is not None else rows / norms[:, None]
                norms = torch.linalg.vector_norm(rows, dim=-1)
            fixed += n
            yield CheckedBlock(start, stored, rows, norms * norms, divisor)
    warn_renormalised(source.path, "database", fixed)


def load_rows(
    source: Any,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """A whole database as one validated [N, d] tensor of ``dtype`` and its squared norms [N]."""
    out = torch.empty((source.count, source.dim), dtype=dtype, device=device)
    sq_norms = torch.empty(source.count, dtype=dtype, device=device)
    for block in scan_rows(source, dtype, device, out, chunk_rows):
        sq_norms[block.start : block.start + block.rows.shape[0]] = block.sq_norms
    return out, sq_norms


def load_database(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk_rows: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Read a database ``.npy`` into one [N, d] tensor of ``dtype``, validating it chunk by
    chunk.

    Returns the embeddings and their squared norms [N] (after any re-normalisation), which
    exact L2 search needs.
    """
    return load_rows(ArrayRows(path), dtype, device, chunk_rows)


def torch_dtype(dtype: np.dtype) -> torch.dtype:
    """The torch dtype of a numpy dtype (float16 -> torch.float16, ...)."""
    return torch.from_numpy(np.empty(0, dtype=dtype)).dtype


def readonly_tensor(arr: np.ndarray) -> Tensor:
    """A tensor over a read-only (memory-mapped) array, only ever read: no copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr))


def save_database(path: str | os.PathLike[str], embeddings: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, embeddings)
