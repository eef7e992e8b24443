"""The world's small CLIP as shipped: its open_clip config, vocabulary and weights."""

from __future__ import annotations

import os
from pathlib import Path

from ratta.backbones import BackboneSpec

PACKAGE = Path(__file__).parent
MODEL_CONFIG = PACKAGE / "ratta-world-clip.json"
WEIGHTS = PACKAGE / "ratta-world-clip.safetensors"


def backbone_spec(weights: str | os.PathLike[str] | None = WEIGHTS) -> BackboneSpec:
    """The world's CLIP for :func:`ratta.backbones.load_backbone` (``None``: random weights).

    On the command line: ``--model-config MODEL_CONFIG --pretrained WEIGHTS``.
    """
    return BackboneSpec(
        model=None,
        pretrained=str(weights) if weights is not None else None,
        model_config=str(MODEL_CONFIG),
    )
