"""The single-file database: a ``.npy`` [N, d] float16/float32, memory-mapped.

Database directories (shards, manifest, index) are :mod:`ratta.db`'s.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ratta.atomic import atomic_path
from ratta.errors import RattaInputError
from ratta.files.checks import NUMPY_EMBED_DTYPES, check_norms, warn_renormalised
from ratta.identity import read_npy_header


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


def load_database(
    path: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    chunk_rows: int = 1 << 16,
) -> tuple[Tensor, Tensor]:
    """Read a database into one [N, d] tensor of ``dtype``, validating it chunk by chunk.

    Returns the embeddings and their squared norms [N] (after any re-normalisation), which
    exact L2 search needs.
    """
    p = Path(path)
    arr = open_database(p)
    out = torch.empty(arr.shape, dtype=dtype, device=device)
    sq_norms = torch.empty(arr.shape[0], dtype=dtype, device=device)
    fixed = 0
    for start in range(0, arr.shape[0], chunk_rows):
        block = out[start : start + chunk_rows]
        block.copy_(readonly_tensor(arr[start : start + chunk_rows]))
        norms = torch.linalg.vector_norm(block, dim=-1)
        n = check_norms(block, norms, p, "database", start)
        if n:
            block.div_(norms.unsqueeze(1))
            norms = torch.linalg.vector_norm(block, dim=-1)
        sq_norms[start : start + chunk_rows] = norms * norms
        fixed += n
    del arr
    warn_renormalised(p, "database", fixed)
    return out, sq_norms


def readonly_tensor(arr: np.ndarray) -> Tensor:
    """A tensor over a read-only (memory-mapped) array, only ever read: no copy."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(arr))


def save_database(path: str | os.PathLike[str], embeddings: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, embeddings)
