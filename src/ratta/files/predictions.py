"""The predictions file ``ratta adapt`` writes: ``zero_shot``, ``retrieval``, ``final``
[N, C], ``candidates`` [N, S] int64, ``relevance``, ``ot_distance`` [N, S], ``lam``,
``entropy_zero_shot``, ``entropy_retrieval`` [N], optional ``labels`` [N] int64; with
``--save-retrieved`` also ``retrieved`` [N, S, K'] int64, ``top_descriptions`` [N, K] int64
and ``top_description_scores`` [N, K]; metadata ``class_names`` and ``config`` (JSON)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ratta.errors import RattaInputError
from ratta.files.safetensors_io import expect_layout, key_layout, open_safetensors

_FLOATS = (torch.float32, torch.float64)
# key: (dtypes, named dimensions); a dimension named by several keys has one size
_LAYOUT: dict[str, tuple[tuple[torch.dtype, ...], tuple[str, ...]]] = {
    "zero_shot": (_FLOATS, ("N", "C")),
    "retrieval": (_FLOATS, ("N", "C")),
    "final": (_FLOATS, ("N", "C")),
    "candidates": ((torch.int64,), ("N", "S")),
    "relevance": (_FLOATS, ("N", "S")),
    "ot_distance": (_FLOATS, ("N", "S")),
    "lam": (_FLOATS, ("N",)),
    "entropy_zero_shot": (_FLOATS, ("N",)),
    "entropy_retrieval": (_FLOATS, ("N",)),
}
_RETRIEVED: dict[str, tuple[tuple[torch.dtype, ...], tuple[str, ...]]] = {
    "retrieved": ((torch.int64,), ("N", "S", "K_S")),
    "top_descriptions": ((torch.int64,), ("N", "K")),
    "top_description_scores": (_FLOATS, ("N", "K")),
}


# The [N, C] probabilities are read by rows, on demand (ImageNet: 200 MB each); the
# per-image diagnostics, a few values per image, are read whole.
PROBABILITIES = ("zero_shot", "retrieval", "final")
_ROWS_PER_READ = 4096


@dataclass
class Predictions:
    """A checked predictions file: its diagnostics (``tensors``: every key but the
    probabilities), class names and settings; :meth:`rows` reads probabilities."""

    path: Path
    num_images: int
    tensors: dict[str, Tensor]
    class_names: list[str]
    config: dict[str, object]

    @property
    def labels(self) -> Tensor | None:
        return self.tensors.get("labels")

    def rows(self, key: str, start: int, stop: int) -> Tensor:
        """Rows start..stop-1 of the probabilities ``key`` (:data:`PROBABILITIES`)."""
        with open_safetensors(self.path) as f:
            return f.get_slice(key)[start:stop]

    def top1(self, key: str) -> Tensor:
        """[N] the most probable class of every image under ``key``, read by blocks."""
        return torch.cat(
            [
                self.rows(key, start, start + _ROWS_PER_READ).argmax(1)
                for start in range(0, self.num_images, _ROWS_PER_READ)
            ]
        )


def load_predictions(path: str | os.PathLike[str], *, retrieved: bool = False) -> Predictions:
    """Read and check a predictions file; ``retrieved``: the keys of ``--save-retrieved``
    are required (one line saying how to get them otherwise)."""
    p = Path(path)
    with open_safetensors(p) as f:
        keys = set(f.keys())
        if retrieved and "retrieved" not in keys:
            raise RattaInputError(
                f"{p}: no key 'retrieved' (the database rows each prediction rests on); "
                "rerun ratta adapt with --save-retrieved"
            )
        layout = {**_LAYOUT, **(_RETRIEVED if retrieved else {})}
        if "labels" in keys:
            layout["labels"] = ((torch.int64,), ("N",))
        sizes: dict[str, tuple[int, str]] = {}
        for key, (dtypes, dims) in layout.items():
            shape, dtype = key_layout(f, p, key, keys)
            expect_layout(p, key, shape, dtype, len(dims), dtypes, f"[{', '.join(dims)}]")
            for name, size in zip(dims, shape, strict=True):
                known = sizes.setdefault(name, (size, key))
                if known[0] != size:
                    raise RattaInputError(
                        f"{p}: key '{key}' has {name} = {size} but '{known[1]}' has {known[0]}"
                    )
        tensors = {key: f.get_tensor(key) for key in layout if key not in PROBABILITIES}
        meta = f.metadata() or {}
    try:
        names = json.loads(meta.get("class_names", ""))
        config = json.loads(meta.get("config", "{}"))
    except json.JSONDecodeError:
        names, config = None, None
    if not isinstance(names, list) or len(names) != sizes["C"][0]:
        raise RattaInputError(
            f"{p}: metadata key 'class_names' must list the {sizes['C'][0]} class names"
        )
    if not isinstance(config, dict):
        raise RattaInputError(f"{p}: metadata key 'config' must be a JSON object")
    for key, low, high in (("candidates", -1, len(names)), ("labels", 0, len(names))):
        values = tensors.get(key, torch.zeros(0))
        if values.numel() and (int(values.min()) < low or int(values.max()) >= high):
            raise RattaInputError(f"{p}: key '{key}' has values outside [{low}, {high - 1}]")
    return Predictions(p, sizes["N"][0], tensors, [str(n) for n in names], config)
