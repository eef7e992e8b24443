"""The text-features file: ``classifier`` [C, d], ``desc`` [M, d], ``desc_class`` [M] int64,
``logit_scale`` (the multiplier s), metadata ``class_names``; optional ``baseline_<name>``
and metadata ``desc_texts`` (the M description rows' texts)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ratta.errors import RattaInputError
from ratta.files.checks import EMBED_DTYPES, check_embeddings, warn_renormalised
from ratta.files.safetensors_io import expect_layout, key_layout, open_safetensors, save_safetensors

BASELINE_PREFIX = "baseline_"


@dataclass
class TextFeatures:
    """Zero-shot classifier W [C, d], descriptions T [M, d] with owners [M], scale s, names.

    ``baselines`` holds optional extra zero-shot classifiers [C, d] for evaluation (stored as
    ``baseline_<name>``): ``single_template`` ('a photo of a {}.'), ``template_ensemble``
    (the dataset's hand templates only) and the peers' paper classifiers ``peer_single``
    (ZERO, MTA), ``peer_tda`` (TDA, BoostAdapter) and ``peer_dmn`` (DMN-ZS). ``desc_texts``:
    the text each row of ``desc`` encodes, if known (files written before it was stored,
    generated worlds: ``None``).
    """

    classifier: Tensor
    desc: Tensor
    desc_class: Tensor
    logit_scale: float
    class_names: list[str]
    baselines: dict[str, Tensor] = field(default_factory=dict)
    desc_texts: list[str] | None = None

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
    if text.desc_texts is not None:
        meta["desc_texts"] = json.dumps(text.desc_texts)
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
    with open_safetensors(p) as f:
        keys = set(f.keys())
        spec = {
            "classifier": (2, EMBED_DTYPES, "[C, d]"),
            "desc": (2, EMBED_DTYPES, "[M, d]"),
            "desc_class": (1, (torch.int64,), "[M]"),
            "logit_scale": (0, (torch.float16, torch.float32, torch.float64), "(a scalar)"),
        }
        for key, (rank, dtypes, layout) in spec.items():
            shape, dtype = key_layout(f, p, key, keys)
            expect_layout(p, key, shape, dtype, rank, dtypes, layout)
        tensors = {key: f.get_tensor(key) for key in spec}
        baselines = {}
        for key in sorted(k for k in keys if k.startswith(BASELINE_PREFIX)):
            shape, dtype = key_layout(f, p, key, keys)
            expect_layout(p, key, shape, dtype, 2, EMBED_DTYPES, "[C, d]")
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
    if not _strings(names):
        raise RattaInputError(f"{p}: metadata key 'class_names' must be a JSON list of strings")
    desc_texts = _desc_texts(p, meta, desc.shape[0])
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
        desc_texts=desc_texts,
    )


def _strings(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _desc_texts(path: Path, meta: dict[str, str], rows: int) -> list[str] | None:
    """The optional metadata ``desc_texts``: one string per ``desc`` row."""
    if "desc_texts" not in meta:
        return None
    try:
        texts = json.loads(meta["desc_texts"])
    except json.JSONDecodeError:
        texts = None
    if not _strings(texts) or len(texts) != rows:
        raise RattaInputError(
            f"{path}: metadata key 'desc_texts' must be a JSON list of {rows} strings, "
            "one per 'desc' row"
        )
    return texts
