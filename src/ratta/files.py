"""File formats between stages (a public contract, documented in the README).

- features (safetensors): ``image`` [N, d], ``views`` [N, V, d] (float16/float32), optional
  ``labels`` [N] int64.
- text (safetensors): ``classifier`` [C, d], ``desc`` [M, d], ``desc_class`` [M] int64,
  ``logit_scale`` 0-d float (the multiplier s); metadata ``class_names`` (JSON list).
- database: ``.npy`` [N, d] float16/float32, memory-mapped.
- output (safetensors): ``zero_shot``, ``retrieval``, ``final`` [N, C] probabilities and the
  per-image diagnostics; a JSON summary at ``<out>.json``.

Inputs are validated once, here; every problem is one ``RattaInputError`` line naming the
file and key. Outputs are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ratta.atomic import atomic_path as atomic_path
from ratta.atomic import check_output_path as check_output_path
from ratta.atomic import write_json as write_json
from ratta.atomic import write_text_atomic as write_text_atomic
from ratta.errors import RattaInputError

EMBED_DTYPES = (torch.float16, torch.float32)
BASELINE_PREFIX = "baseline_"
NUMPY_EMBED_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
# Accepted deviation of an embedding's L2 norm from 1 (float16 storage rounds at ~5e-4).
NORM_TOL = 1e-2


class RattaInputWarning(UserWarning):
    """Input was usable after a fix (e.g. vectors re-normalised)."""


def save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write contiguous CPU tensors to a safetensors file."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(ready, str(tmp), metadata=metadata)


def _open(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"{p}: file not found")
    try:
        return safe_open(str(p), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise RattaInputError(f"{p}: not a readable safetensors file ({exc})") from None


def _shape(handle: Any, path: Path, key: str, keys: set[str]) -> tuple[list[int], torch.dtype]:
    if key not in keys:
        raise RattaInputError(f"{path}: missing key '{key}' (found: {', '.join(sorted(keys))})")
    sl = handle.get_slice(key)
    dtype = {
        "F16": torch.float16,
        "F32": torch.float32,
        "F64": torch.float64,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
    }.get(sl.get_dtype())
    if dtype is None:
        raise RattaInputError(f"{path}: key '{key}' has unsupported dtype {sl.get_dtype()}")
    return list(sl.get_shape()), dtype


def _expect(
    path: Path,
    key: str,
    shape: list[int],
    dtype: torch.dtype,
    rank: int,
    dtypes: tuple[torch.dtype, ...],
    layout: str,
) -> None:
    if len(shape) != rank:
        raise RattaInputError(
            f"{path}: key '{key}' must have rank {rank} {layout}, got shape {tuple(shape)}"
        )
    if dtype not in dtypes:
        names = "/".join(str(t).removeprefix("torch.") for t in dtypes)
        raise RattaInputError(
            f"{path}: key '{key}' must be {names}, got {str(dtype).removeprefix('torch.')}"
        )


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


# --------------------------------------------------------------------------- text


@dataclass
class TextFeatures:
    """Zero-shot classifier W [C, d], descriptions T [M, d] with owners [M], scale s, names.

    ``baselines`` holds optional extra zero-shot classifiers [C, d] for evaluation (stored as
    ``baseline_<name>``): ``single_template`` ('a photo of a {}.') and ``template_ensemble``
    (the dataset's hand templates only).
    """

    classifier: Tensor
    desc: Tensor
    desc_class: Tensor
    logit_scale: float
    class_names: list[str]
    baselines: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return self.classifier.shape[0]

    @property
    def dim(self) -> int:
        return self.classifier.shape[1]


def save_text(
    path: str | os.PathLike[str],
    text: TextFeatures,
    metadata: dict[str, str] | None = None,
) -> None:
    meta = dict(metadata or {})
    meta["class_names"] = json.dumps(text.class_names)
    save_safetensors(
        path,
        {
            "classifier": text.classifier,
            "desc": text.desc,
            "desc_class": text.desc_class.to(torch.int64),
            "logit_scale": torch.tensor(float(text.logit_scale), dtype=torch.float32),
            **{f"{BASELINE_PREFIX}{k}": v for k, v in text.baselines.items()},
        },
        meta,
    )


def load_text(path: str | os.PathLike[str]) -> TextFeatures:
    """Load and validate a text-features file."""
    p = Path(path)
    with _open(p) as f:
        keys = set(f.keys())
        spec = {
            "classifier": (2, EMBED_DTYPES, "[C, d]"),
            "desc": (2, EMBED_DTYPES, "[M, d]"),
            "desc_class": (1, (torch.int64,), "[M]"),
            "logit_scale": (0, (torch.float16, torch.float32, torch.float64), "(a scalar)"),
        }
        for key, (rank, dtypes, layout) in spec.items():
            shape, dtype = _shape(f, p, key, keys)
            _expect(p, key, shape, dtype, rank, dtypes, layout)
        tensors = {key: f.get_tensor(key) for key in spec}
        baselines = {}
        for key in sorted(k for k in keys if k.startswith(BASELINE_PREFIX)):
            shape, dtype = _shape(f, p, key, keys)
            _expect(p, key, shape, dtype, 2, EMBED_DTYPES, "[C, d]")
            baselines[key.removeprefix(BASELINE_PREFIX)] = f.get_tensor(key)
        meta = f.metadata() or {}
    classifier, desc, desc_class = tensors["classifier"], tensors["desc"], tensors["desc_class"]
    c, d = classifier.shape
    if c == 0:
        raise RattaInputError(f"{p}: key 'classifier' has no classes")
    if desc.shape[1] != d:
        raise RattaInputError(
            f"{p}: key 'desc' has dimension {desc.shape[1]} but 'classifier' has {d}"
        )
    if desc_class.shape[0] != desc.shape[0]:
        raise RattaInputError(
            f"{p}: key 'desc_class' has {desc_class.shape[0]} entries "
            f"for {desc.shape[0]} 'desc' rows"
        )
    if desc_class.numel() and (int(desc_class.min()) < 0 or int(desc_class.max()) >= c):
        raise RattaInputError(
            f"{p}: key 'desc_class' has class ids outside [0, {c - 1}] "
            f"(min {int(desc_class.min())}, max {int(desc_class.max())})"
        )
    scale = float(tensors["logit_scale"])
    if not np.isfinite(scale) or scale <= 0:
        raise RattaInputError(
            f"{p}: key 'logit_scale' must be a positive multiplier s (e.g. 100), got {scale}"
        )
    if "class_names" not in meta:
        raise RattaInputError(f"{p}: missing metadata key 'class_names' (a JSON list of names)")
    try:
        names = json.loads(meta["class_names"])
    except json.JSONDecodeError:
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise RattaInputError(f"{p}: metadata key 'class_names' must be a JSON list of strings")
    if len(names) != c:
        raise RattaInputError(
            f"{p}: metadata key 'class_names' lists {len(names)} names for {c} classes"
        )
    owned = torch.bincount(desc_class, minlength=c)
    if bool((owned == 0).any()):
        missing = int((owned == 0).nonzero()[0])
        raise RattaInputError(
            f"{p}: key 'desc_class': class {missing} ('{names[missing]}') has no description rows"
            f" ({int((owned == 0).sum())} classes without descriptions)"
        )
    classifier, fixed = check_embeddings(classifier, p, "classifier")
    warn_renormalised(p, "classifier", fixed)
    desc, fixed = check_embeddings(desc, p, "desc")
    warn_renormalised(p, "desc", fixed)
    for name, weights in baselines.items():
        if tuple(weights.shape) != (c, d):
            raise RattaInputError(
                f"{p}: key '{BASELINE_PREFIX}{name}' has shape {tuple(weights.shape)}, "
                f"expected [{c}, {d}] like 'classifier'"
            )
        baselines[name], fixed = check_embeddings(weights, p, f"{BASELINE_PREFIX}{name}")
        warn_renormalised(p, f"{BASELINE_PREFIX}{name}", fixed)
    return TextFeatures(
        baselines=baselines,
        classifier=classifier,
        desc=desc,
        desc_class=desc_class,
        logit_scale=scale,
        class_names=names,
    )


# --------------------------------------------------------------------------- features


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
        self._file = _open(self.path)
        keys = set(self._file.keys())
        img_shape, img_dtype = _shape(self._file, self.path, "image", keys)
        _expect(self.path, "image", img_shape, img_dtype, 2, EMBED_DTYPES, "[N, d]")
        view_shape, view_dtype = _shape(self._file, self.path, "views", keys)
        _expect(self.path, "views", view_shape, view_dtype, 3, EMBED_DTYPES, "[N, V, d]")
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
        self.labels: Tensor | None = None
        if "labels" in keys:
            shape, dtype = _shape(self._file, self.path, "labels", keys)
            _expect(self.path, "labels", shape, dtype, 1, (torch.int64,), "[N]")
            if shape[0] != self.num_images:
                raise RattaInputError(
                    f"{self.path}: key 'labels' has {shape[0]} entries for {self.num_images} images"
                )
            self.labels = self._file.get_tensor("labels")

    def check_labels(self, num_classes: int) -> None:
        if self.labels is not None and self.labels.numel():
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= num_classes:
                raise RattaInputError(
                    f"{self.path}: key 'labels' has values outside [0, {num_classes - 1}] "
                    f"(min {lo}, max {hi})"
                )

    def batch(self, start: int, stop: int, views: int | None = None) -> Tensor:
        """Validated test embeddings [b, 1 + V', d] of images start..stop-1 (x_0 first).

        ``views`` keeps only the first V' stored views (all by default): the views are i.i.d.,
        so their prefix is a smaller sample of the same kind.
        """
        image = self._file.get_slice("image")[start:stop]
        keep = self.num_views if views is None else views
        views = self._file.get_slice("views")[start:stop, :keep]
        image, fixed_image = check_embeddings(image, self.path, "image", start)
        views, fixed_views = check_embeddings(views, self.path, "views", start)
        self.renormalised["image"] += fixed_image
        self.renormalised["views"] += fixed_views
        return torch.cat([image.unsqueeze(1), views.to(image.dtype)], dim=1)

    def warn_renormalised(self) -> None:
        """Report (once) how many vectors the batches read so far had to re-normalise."""
        for key, count in self.renormalised.items():
            warn_renormalised(self.path, key, count)

    def close(self) -> None:
        self._file.__exit__(None, None, None)


# --------------------------------------------------------------------------- database


def open_database(path: str | os.PathLike[str]) -> np.ndarray:
    """Memory-map a database ``.npy`` [N, d] and check its header."""
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"{p}: database file not found")
    try:
        arr = np.load(p, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise RattaInputError(f"{p}: not a readable .npy array ({exc})") from None
    if arr.ndim != 2:
        raise RattaInputError(f"{p}: database must have rank 2 [N, d], got shape {arr.shape}")
    if arr.dtype not in NUMPY_EMBED_DTYPES:
        raise RattaInputError(f"{p}: database must be float16/float32, got {arr.dtype}")
    if arr.shape[0] == 0:
        raise RattaInputError(f"{p}: database is empty (0 rows)")
    return arr


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


_ST_DTYPES = {
    torch.float16: "F16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class SafetensorsStreamWriter:
    """Write a safetensors file piece by piece (memory bounded by one piece).

    The header is computed from the declared shapes up front; tensors are then appended in
    declaration order, each as consecutive pieces along its first dimension. Use inside
    :func:`atomic_path` so a file is only visible once complete.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        specs: dict[str, tuple[torch.dtype, tuple[int, ...]]],
        metadata: dict[str, str] | None = None,
    ) -> None:
        header: dict[str, Any] = {}
        offset = 0
        self._sizes: dict[str, int] = {}
        for name, (dtype, shape) in specs.items():
            nbytes = (
                int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
            )
            header[name] = {
                "dtype": _ST_DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            self._sizes[name] = nbytes
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._specs = specs
        self._order = list(specs)
        self._written = dict.fromkeys(specs, 0)
        self._fh = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(len(raw).to_bytes(8, "little") + raw)

    def write(self, name: str, piece: Tensor) -> None:
        pending = [n for n in self._order if self._written[n] < self._sizes[n]]
        if not pending or pending[0] != name:
            raise RuntimeError(f"tensor '{name}' written out of order")
        dtype = self._specs[name][0]
        data = piece.detach().to("cpu", dtype).contiguous().view(torch.uint8).numpy()
        self._fh.write(data.tobytes())
        self._written[name] += data.nbytes
        if self._written[name] > self._sizes[name]:
            raise RuntimeError(f"tensor '{name}' got more data than its declared shape")

    def close(self) -> None:
        incomplete = [n for n in self._order if self._written[n] != self._sizes[n]]
        self._fh.close()
        if incomplete:
            raise RuntimeError(f"tensors {incomplete} are incomplete")

    def __enter__(self) -> SafetensorsStreamWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller's atomic_path discards the file; only release the handle
            self._fh.close()
