"""The world's small CLIP as shipped: its open_clip config, vocabulary and weights."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

from ratta.backbones import BackboneSpec

PACKAGE = Path(__file__).parent
MODEL_CONFIG = PACKAGE / "ratta-world-clip.json"
WEIGHTS = PACKAGE / "ratta-world-clip.safetensors"
VOCABULARY = PACKAGE / "ratta-world-bpe.txt.gz"
# BPE merges kept from open_clip's vocabulary: 512 byte tokens + MERGES + 2 specials make the
# config's vocab_size (4610), a tenth of CLIP's, enough for the world's captions
MERGES = 4096


def backbone_spec(weights: str | os.PathLike[str] | None = WEIGHTS) -> BackboneSpec:
    """The world's CLIP for :func:`ratta.backbones.load_backbone` (``None``: random weights).

    On the command line: ``--model-config MODEL_CONFIG --pretrained WEIGHTS``.
    """
    return BackboneSpec(
        model=None,
        pretrained=str(weights) if weights is not None else None,
        model_config=str(MODEL_CONFIG),
    )


def vocabulary_bytes() -> bytes:
    """The shipped vocabulary, rebuilt: open_clip's BPE file cut after its first
    :data:`MERGES` merges (its header line kept), gzipped without a timestamp."""
    import open_clip

    source = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.decompress(source.read_bytes()).split(b"\n")
    return gzip.compress(b"\n".join(lines[: 1 + MERGES]), compresslevel=9, mtime=0)
