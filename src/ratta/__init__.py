"""ratta: Retrieval-Augmented Test-Time Adaptation (RA-TTA, ICLR 2025) for CLIP-like models."""

from ratta.config import RATTAConfig
from ratta.engine import BatchResult, ratta_batch
from ratta.errors import RattaInputError
from ratta.retrieval import ExactRetriever, FaissRetriever

__version__ = "0.1.0"

__all__ = [
    "BatchResult",
    "ExactRetriever",
    "FaissRetriever",
    "RATTAConfig",
    "RattaInputError",
    "__version__",
    "ratta_batch",
]
