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

Modules, one per contract: ``features``, ``text``, ``database`` (the output is written by
:mod:`ratta.adapt` with ``save_safetensors``); ``checks``: the embedding checks they share;
``safetensors_io``: safetensors reading and (streamed) writing.
"""

from ratta.atomic import atomic_path, write_json, write_text_atomic
from ratta.files.checks import (
    EMBED_DTYPES,
    NORM_TOL,
    NUMPY_EMBED_DTYPES,
    RattaInputWarning,
    check_embeddings,
    check_norms,
    warn_renormalised,
)
from ratta.files.database import (
    ArrayRows,
    CheckedBlock,
    load_database,
    load_rows,
    open_database,
    readonly_tensor,
    save_database,
    scan_rows,
    torch_dtype,
)
from ratta.files.features import FeatureReader, save_features
from ratta.files.safetensors_io import SafetensorsStreamWriter, save_safetensors
from ratta.files.text import BASELINE_PREFIX, TextFeatures, load_text, save_text

__all__ = [
    "BASELINE_PREFIX",
    "EMBED_DTYPES",
    "NORM_TOL",
    "NUMPY_EMBED_DTYPES",
    "ArrayRows",
    "CheckedBlock",
    "FeatureReader",
    "RattaInputWarning",
    "SafetensorsStreamWriter",
    "TextFeatures",
    "atomic_path",
    "check_embeddings",
    "check_norms",
    "load_database",
    "load_rows",
    "load_text",
    "open_database",
    "readonly_tensor",
    "save_database",
    "save_features",
    "save_safetensors",
    "save_text",
    "scan_rows",
    "torch_dtype",
    "warn_renormalised",
    "write_json",
    "write_text_atomic",
]
