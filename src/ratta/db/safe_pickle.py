"""Read the reference code's database pickles without executing pickle code.

A pickle can call any importable function while it loads (``os.system`` included), so the
released ``LAION2B_<dataset>_aux_<backbone>`` files are read with an unpickler whose
``find_class`` admits only what rebuilding numpy arrays needs. Plain containers and scalars
(dict, list, tuple, str, bytes, int, float, bool, None) need no globals and load as usual;
any other global is refused with one line naming the file and the global, before it is
called.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ratta.errors import RattaInputError


def _numpy_internals() -> tuple[Any, Any]:
    try:  # numpy >= 2
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    return multiarray, numeric


def _latin1(text: str, encoding: str = "utf-8") -> bytes:
    """Protocol 0-2 pickles store bytes as ``_codecs.encode(str, 'latin1')``; nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_internals()
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1,
    }
    # pickles written by numpy 1.x name numpy.core, by numpy 2.x numpy._core
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle asked for a global outside the numpy allow-list."""

    def __init__(self, module: str, name: str) -> None:
        super().__init__(f"{module}.{name}")
        self.qualified = f"{module}.{name}"


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays and plain containers, nothing else."""

    _ALLOWED = _allowed()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(module, name) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def safe_load(path: str | os.PathLike[str]) -> Any:
    """Unpickle ``path`` admitting only numpy arrays and plain containers.

    Raises :class:`RattaInputError` naming the file and the refused global for anything
    else, and for files that are not pickles.
    """
    p = Path(path)
    if not p.is_file():
        raise RattaInputError(f"{p}: file not found")
    try:
        with open(p, "rb") as fh:
            return NumpyOnlyUnpickler(fh).load()
    except RefusedGlobal as exc:
        raise RattaInputError(
            f"{p}: refused to unpickle global '{exc.qualified}' (only numpy arrays, dicts, "
            "lists, strings and numbers are read from pickles; this file may run code)"
        ) from None
    except Exception as exc:  # any malformed pickle: truncated, wrong opcodes, bad args
        raise RattaInputError(
            f"{p}: not a readable pickle of numpy arrays ({type(exc).__name__}: {exc})"
        ) from None
