"""The features file: ``image`` [N, d], ``views`` [N, V, d] (float16/float32), optional
``labels`` [N] int64 and ``index`` [N] int64 (position in the split), metadata
``ratta_features`` (JSON: what produced it, ``source`` naming the dataset); read lazily,
batch by batch."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ratta.errors import RattaInputError
from ratta.files.checks import EMBED_DTYPES, check_embeddings, warn_renormalised
from ratta.files.safetensors_io import expect_layout, key_layout, open_safetensors, save_safetensors


def save_features(
    path: str | os.PathLike[str],
    image: Tensor,
    views: Tensor,
    labels: Tensor | None = None,
    metadata: dict[str, str] | None = None,
) -> None:
    tensors = {"image": image, "views": views}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64)
    save_safetensors(path, tensors, metadata)


class FeatureReader:
    """Lazy reader of a features file: shapes are checked on open, values per batch."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._file = open_safetensors(self.path)
        keys = set(self._file.keys())
        img_shape, img_dtype = key_layout(self._file, self.path, "image", keys)
        expect_layout(self.path, "image", img_shape, img_dtype, 2, EMBED_DTYPES, "[N, d]")
        view_shape, view_dtype = key_layout(self._file, self.path, "views", keys)
        expect_layout(self.path, "views", view_shape, view_dtype, 3, EMBED_DTYPES, "[N, V, d]")
        self.num_images, self.dim = img_shape
        if view_shape[0] != self.num_images or view_shape[2] != self.dim:
            raise RattaInputError(
                f"{self.path}: key 'views' has shape {tuple(view_shape)}, "
                f"expected [{self.num_images}, V, {self.dim}] to match 'image'"
            )
        if self.num_images == 0:
            raise RattaInputError(f"{self.path}: key 'image' holds no test images")
        self.num_views = view_shape[1]
        self.renormalised = {"image": 0, "views": 0}
        self.labels = self._per_image("labels", keys)
        self.index = self._per_image("index", keys)

    def _per_image(self, key: str, keys: set[str]) -> Tensor | None:
        """The optional [N] int64 key (``labels``, ``index``), checked."""
        if key not in keys:
            return None
        shape, dtype = key_layout(self._file, self.path, key, keys)
        expect_layout(self.path, key, shape, dtype, 1, (torch.int64,), "[N]")
        if shape[0] != self.num_images:
            raise RattaInputError(
                f"{self.path}: key '{key}' has {shape[0]} entries for {self.num_images} images"
            )
        return self._file.get_tensor(key)

    @property
    def source(self) -> dict[str, Any]:
        """What the images came from (``ratta extract``: ``dataset``, ``split`` fingerprint);
        empty for files written otherwise."""
        try:
            info = json.loads((self._file.metadata() or {}).get("ratta_features", "{}"))
        except json.JSONDecodeError:
            info = None
        if not isinstance(info, dict) or not isinstance(info.get("source", {}), dict):
            raise RattaInputError(f"{self.path}: metadata key 'ratta_features' is not valid JSON")
        return info.get("source", {})

    def check_labels(self, num_classes: int) -> None:
        if self.labels is not None and self.labels.numel():
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= num_classes:
                raise RattaInputError(
                    f"{self.path}: key 'labels' has values outside [0, {num_classes - 1}] "
                    f"(min {lo}, max {hi})"
                )

    def batch(
        self, start: int, stop: int, views: int | None = None, *, pin_memory: bool = False
    ) -> Tensor:
        """Validated test embeddings [b, 1 + V', d] of images start..stop-1 (x_0 first).

        ``views`` keeps only the first V' stored views (all by default): the views are i.i.d.,
        so their prefix is a smaller sample of the same kind. ``pin_memory``: in page-locked
        memory, ready for an asynchronous copy to a GPU.
        """
        image = self._file.get_slice("image")[start:stop]
        keep = self.num_views if views is None else views
        views = self._file.get_slice("views")[start:stop, :keep]
        image, fixed_image = check_embeddings(image, self.path, "image", start)
        views, fixed_views = check_embeddings(views, self.path, "views", start)
        self.renormalised["image"] += fixed_image
        self.renormalised["views"] += fixed_views
        out = torch.empty(
            (image.shape[0], 1 + views.shape[1], self.dim), dtype=image.dtype, pin_memory=pin_memory
        )
        return torch.cat([image.unsqueeze(1), views.to(image.dtype)], dim=1, out=out)

    def warn_renormalised(self) -> None:
        """Report (once) how many vectors the batches read so far had to re-normalise."""
        for key, count in self.renormalised.items():
            warn_renormalised(self.path, key, count)

    def close(self) -> None:
        self._file.__exit__(None, None, None)
