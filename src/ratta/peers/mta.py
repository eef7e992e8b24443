r"""MTA (Zanella & Ben Ayed, CVPR 2024): a robust mode of the inputs' embeddings (MeanShift).

Official code: MaxZanella/MTA @cafafdf, ``mta.py`` (``solve_mta``) and ``main.py`` (defaults).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ratta.peers.common import PeerOutput, first_logits


@dataclass(frozen=True)
class MTAConfig:
    """MTA's settings (global in the official code).

    Attributes:
        inputs: N, the centre crop plus the first N - 1 views.
        lambda_y: weight of the entropic term of the inlierness (softmax temperature).
        lambda_q: weight of the affinity (quadratic) term.
        neighbours: the bandwidth of z_i uses its floor(neighbours (N - 1)) nearest inputs.
        rounds: outer rounds; also the cap on each inner loop's iterations.
        tol: an inner loop stops once its step (L2 norm) is below this.
    """

    inputs: int = 64
    lambda_y: float = 0.2
    lambda_q: float = 4.0
    neighbours: float = 0.3
    rounds: int = 5
    tol: float = 1e-6


def mta(
    x: Tensor,
    classifier: Tensor,
    scale: float,
    config: MTAConfig = MTAConfig(),
    logits: Tensor | None = None,
) -> PeerOutput:
    r"""MTA for a batch of images (episodic: each image alone).

    Per image, with inputs z_i (i < N):
    - bandwidth h_i^2 = 1/2 mean of ||z_i - z_j||^2 over its k = floor(0.3 (N - 1)) nearest
      other inputs, at least one (the sorted distances 1..k, the smallest being z_i itself);
      kernel K_i(m) = exp(-||z_i - m||^2 / (2 h_i^2));
    - affinity A_ij = p(z_i)^T p(z_j); inlierness y = 1/N and mode m = z_0 to start;
    - ``rounds`` times: up to ``rounds`` steps y <- softmax_i((K_i(m) + lambda_q (A y)_i) /
      lambda_y) with K at the round's m, then up to ``rounds`` steps
      m <- normalise(sum_i K_i(m) y_i z_i / sum_i K_i(m) y_i); each inner loop stops
      after the step whose L2 change is below ``tol`` (per image). y carries over rounds.

    Args:
        x: [B, >= N, d] inputs, z_0 first.
        logits: s x W^T of the inputs if already computed ([B, >= N, C]).

    Returns:
        scores: logits s W m [B, C]; probs: their softmax.
    """
    n = config.inputs
    z = x[:, :n]
    logits = first_logits(x, classifier, scale, n, logits)
    bsz, n, _ = z.shape
    if n < 2:
        raise ValueError("MTA needs at least two inputs (z_0 and a view)")
    # The mode is always m = sum_i c_i z_i, so every step works on the coefficients c with the
    # Gram matrix G = Z Z^T: z_i^T m = (G c)_i and ||m||^2 = c^T G c ([N, N] work, not [N, d]).
    gram = torch.bmm(z, z.mT)
    sq = gram.diagonal(dim1=1, dim2=2)
    dist2 = (sq.unsqueeze(2) + sq.unsqueeze(1) - 2 * gram).clamp_min_(0)
    k = max(1, int(config.neighbours * (n - 1)))  # at least one neighbour when N < 5
    two_h2 = dist2.topk(k + 1, dim=2, largest=False).values[:, :, 1:].mean(-1)  # 2 h_i^2
    p = torch.softmax(logits, dim=-1)
    affinity = torch.bmm(p, p.mT)

    def quad(u: Tensor, v: Tensor) -> Tensor:  # u^T G v per image
        return (u * torch.bmm(gram, v.unsqueeze(2))[..., 0]).sum(-1)

    def kernel(c: Tensor) -> Tensor:
        zm = torch.bmm(gram, c.unsqueeze(2))[..., 0]
        d2 = sq + (c * zm).sum(-1, keepdim=True) - 2 * zm
        return torch.exp(-d2.clamp_min(0) / two_h2)

    y = torch.full((bsz, n), 1.0 / n, dtype=z.dtype, device=z.device)
    c = torch.zeros_like(y)
    c[:, 0] = 1  # m = z_0
    for _ in range(config.rounds):
        density = kernel(c)
        active = torch.ones(bsz, dtype=torch.bool, device=z.device)
        for _ in range(config.rounds):
            pull = torch.bmm(affinity, y.unsqueeze(2))[..., 0]
            new = torch.softmax((1 / config.lambda_y) * (density + config.lambda_q * pull), -1)
            moved = torch.linalg.vector_norm(y - new, dim=-1) >= config.tol
            y = torch.where(active.unsqueeze(1), new, y)
            active &= moved
            if not bool(active.any()):
                break
        active = torch.ones(bsz, dtype=torch.bool, device=z.device)
        for _ in range(config.rounds):
            weight = kernel(c) * y
            new = weight / weight.sum(-1, keepdim=True)
            new = new / quad(new, new).sqrt().unsqueeze(1)  # normalise m
            step = new - c
            moved = quad(step, step).clamp_min(0).sqrt() >= config.tol
            c = torch.where(active.unsqueeze(1), new, c)
            active &= moved
            if not bool(active.any()):
                break
    out = torch.bmm(c.unsqueeze(1), logits)[:, 0]  # s W m
    return PeerOutput(scores=out, probs=torch.softmax(out, dim=-1))
