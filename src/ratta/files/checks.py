"""Embedding checks shared by every file contract: finite, non-zero, on the unit sphere."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ratta.errors import RattaInputError

EMBED_DTYPES = (torch.float16, torch.float32)
NUMPY_EMBED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
# Accepted deviation of an embedding's L2 norm from 1 (float16 storage rounds at ~5e-4).
NORM_TOL = 1e-2


class RattaInputWarning(UserWarning):
    """Input was usable after a fix (e.g. vectors re-normalised)."""


def check_embeddings(
    x: Tensor, path: Path | str, key: str, row_offset: int = 0
) -> tuple[Tensor, int]:
    """Reject NaN/Inf and zero vectors; re-normalise vectors off the unit sphere.

    ``x`` is [..., d]. Returns the (possibly re-normalised) tensor, same dtype, and how many
    vectors were re-normalised, for the caller to report once.
    """
    if x.numel() == 0:
        return x, 0
    norms = torch.linalg.vector_norm(x.float(), dim=-1)
    fixed = check_norms(x, norms, path, key, row_offset)
    if fixed:
        x = (x.float() / norms.unsqueeze(-1)).to(x.dtype)
    return x, fixed


def check_norms(x: Tensor, norms: Tensor, path: Path | str, key: str, row_offset: int) -> int:
    """One pass over the norms finds every bad vector; returns how many are off the sphere."""
    per_item = _rows_per_item(x)
    if not bool(torch.isfinite(norms).all()):
        finite = torch.isfinite(x).all(-1)
        if bool(finite.all()):
            bad = int((~torch.isfinite(norms)).flatten().nonzero()[0]) // per_item
            raise RattaInputError(
                f"{path}: key '{key}' has a vector too large to normalise (row {bad + row_offset})"
            )
        bad = int((~finite).flatten().nonzero()[0]) // per_item
        raise RattaInputError(
            f"{path}: key '{key}' contains NaN or Inf (first at row {bad + row_offset})"
        )
    if bool((norms == 0).any()):
        bad = int((norms == 0).flatten().nonzero()[0]) // per_item
        raise RattaInputError(f"{path}: key '{key}' has a zero vector (row {bad + row_offset})")
    return int(((norms - 1).abs() > NORM_TOL).sum())


def warn_renormalised(path: Path | str, key: str, count: int) -> None:
    if count:
        warnings.warn(
            f"{path}: key '{key}': {count} vectors were not L2-normalised; normalised them",
            RattaInputWarning,
            stacklevel=2,
        )


def _rows_per_item(x: Tensor) -> int:
    return max(1, int(np.prod(x.shape[1:-1]))) if x.ndim > 2 else 1
