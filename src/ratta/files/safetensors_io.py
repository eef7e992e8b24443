"""Safetensors files: atomic and streamed writing, opening and checking a key's layout."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ratta.atomic import atomic_path, check_free_space
from ratta.errors import RattaInputError


def save_safetensors(
    path: str | os.PathLike[str], tensors: dict[str, Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Atomically write contiguous CPU tensors to a safetensors file."""
    ready = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(ready, str(tmp), metadata=metadata)


def open_safetensors(path: str | os.PathLike[str]) -> Any:
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"{p}: file not found")
    try:
        return safe_open(str(p), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise RattaInputError(f"{p}: not a readable safetensors file ({exc})") from None


def key_layout(handle: Any, path: Path, key: str, keys: set[str]) -> tuple[list[int], torch.dtype]:
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


def expect_layout(
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
    :func:`atomic_path` so a file is only visible once complete. A file larger than the free
    space of its filesystem is refused before anything is written.
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
        check_free_space(path, 8 + len(raw) + offset)
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
