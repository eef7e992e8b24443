r"""ZERO (Farina et al., NeurIPS 2024): vote of the most confident inputs at zero temperature.

Official code: FarinaMatteo/zero @c609f7c, ``ttas/zero.py`` and ``utils/tools.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ratta.peers.common import PeerOutput, confident_order, first_logits, gather_inputs


@dataclass(frozen=True)
class ZeroConfig:
    """ZERO's settings (global in the official code: ``Zero.set_hyperparams``).

    Attributes:
        inputs: N, the centre crop plus the first N - 1 views.
        gamma: fraction of inputs kept: the floor(gamma N) of lowest entropy.
        temperature: the "zero" temperature on the unscaled cosines. The official code uses
            float16's machine epsilon 2^-10 (its autocast dtype), so a vote is
            softmax(cos / 2^-10), not a one-hot, summed in float32 (autocast's softmax) in
            every input dtype; 0 counts exact one-hot votes.
    """

    inputs: int = 64
    gamma: float = 0.3
    temperature: float = 2.0**-10


def zero(
    x: Tensor,
    classifier: Tensor,
    scale: float,
    config: ZeroConfig = ZeroConfig(),
    logits: Tensor | None = None,
) -> PeerOutput:
    r"""ZERO for a batch of images (episodic: each image alone).

    With k = floor(gamma N) and the inputs sorted by increasing H(p(z_i)):
    votes = sum_{i <= k} softmax(cos_i / T) where cos_i = W z_i (T = 0: one-hot argmax).
    If several classes share the largest vote mass, the discarded inputs are walked by
    increasing entropy and the first whose argmax is a tied class wins; if none is, the tied
    class with the largest logit in the first discarded input wins. The winner gets one more
    vote.

    Args:
        x: [B, >= N, d] inputs, z_0 first.
        logits: s x W^T of the inputs if already computed ([B, >= N, C]).

    Returns:
        scores: the votes [B, C]; probs: the normalised votes.
    """
    n = config.inputs
    logits = first_logits(x, classifier, scale, n, logits)
    k = int(logits.shape[1] * config.gamma)
    order = confident_order(logits)
    kept = gather_inputs(logits, order[:, :k])
    if config.temperature > 0:
        # float32 votes, as the official autocast softmax: which classes tie is decided at
        # that precision (near-1 votes that float64 tells apart are equal there)
        cos = (kept / (scale * config.temperature)).float()
        votes = torch.softmax(cos, dim=-1).sum(1).to(logits.dtype)
    else:
        votes = F.one_hot(kept.argmax(-1), logits.shape[-1]).to(logits.dtype).sum(1)
    tied = votes == votes.amax(-1, keepdim=True)
    rows = (tied.sum(-1) > 1).nonzero()[:, 0]
    if rows.numel():
        votes[rows, _break_ties(logits[rows], order[rows], k, tied[rows])] += 1
    return PeerOutput(scores=votes, probs=votes / votes.sum(-1, keepdim=True))


def _break_ties(logits: Tensor, order: Tensor, k: int, tied: Tensor) -> Tensor:
    """The winner [R] of each tied image: the first discarded input (by entropy) voting for a
    tied class, else the tied class ranked first by the first discarded input.

    The official fallback masks ``logit[~ties]`` with ``ties`` an index tensor, whose bitwise
    NOT -i-1 masks the wrong classes; here it is restricted to the tied classes, as intended
    (the most confident input ranks them when no input is discarded).
    """
    discarded = gather_inputs(logits, order[:, k:])
    ranker = gather_inputs(logits, order[:, k : k + 1] if discarded.shape[1] else order[:, :1])
    fallback = ranker[:, 0].masked_fill(~tied, float("-inf")).argmax(-1)
    if not discarded.shape[1]:
        return fallback
    preds = discarded.argmax(-1)
    hits = tied.gather(1, preds)
    greedy = preds.gather(1, hits.to(torch.int8).argmax(1, keepdim=True))[:, 0]
    return torch.where(hits.any(1), greedy, fallback)
