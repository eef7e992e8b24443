"""ratta: Retrieval-Augmented Test-Time Adaptation (RA-TTA, ICLR 2025) for CLIP-like models."""

import os as _os

# MKL's strict conditional numerical reproducibility: CPU matrix products give the same bits
# for any number of threads (without it, 1- and 2-thread encodings of a small model differ
# by ~1e-7), so outputs do not depend on the thread count or the Ray worker layout; measured
# at no cost here. MKL reads it at its first call: set before any matrix product, may be
# overridden by the user's own MKL_CBWR.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ratta.config import RATTAConfig
    from ratta.engine import BatchResult, ratta_batch
    from ratta.errors import RattaInputError
    from ratta.retrieval import ExactRetriever, FaissRetriever

__version__ = "0.1.0"

__all__ = [
    "AdaptInputs",
    "BatchResult",
    "ExactRetriever",
    "FaissRetriever",
    "RATTAConfig",
    "RattaInputError",
    "__version__",
    "load_inputs",
    "ratta_batch",
]

# The exports load on first use (PEP 562): `ratta --help` and `ratta --version` start
# without importing torch.
_EXPORTS = {
    "AdaptInputs": "ratta.adapt",
    "BatchResult": "ratta.engine",
    "ExactRetriever": "ratta.retrieval",
    "FaissRetriever": "ratta.retrieval",
    "RATTAConfig": "ratta.config",
    "RattaInputError": "ratta.errors",
    "load_inputs": "ratta.adapt",
    "ratta_batch": "ratta.engine",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'ratta' has no attribute {name!r}")
