r"""Pieces shared by the peers: their output, the view logits, entropy-based view selection.

Notation as in ``docs/peers.md``: a batch of B test images, each with N inputs z_0 (centre
crop) and z_1..z_{N-1} (stored views) of dimension d; a classifier W [C, d] with rows t_c;
logit scale s; l(z) = s W z; p(z) = softmax(l(z)); H(p) = -sum_c p_c log p_c in nats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor


@dataclass
class PeerOutput:
    """What a peer returns for each image.

    Attributes:
        scores: [B, C] what the method ranks classes by (top-1, top-5): final logits for MTA,
            TDA and BoostAdapter, vote mass for ZERO, p(z_0) + gamma p_mem for DMN-ZS.
        probs: [B, C] the probabilities for calibration (ECE), by the rule of each method.
    """

    scores: Tensor
    probs: Tensor


def view_logits(x: Tensor, classifier: Tensor, scale: float) -> Tensor:
    r"""l(z_i) = s W z_i for every input of every image: [B, N, C] from x [B, N, d].

    The one large product of the episodic peers and of the online peers' per-image
    preparation; compute it once and pass it as ``logits=`` to share it between peers.
    """
    return torch.matmul(x, (scale * classifier).T)


def first_logits(
    x: Tensor, classifier: Tensor, scale: float, n: int, logits: Tensor | None
) -> Tensor:
    """s x W^T of the first n inputs [B, n, C]: a slice of ``logits`` when already computed."""
    return view_logits(x[:, :n], classifier, scale) if logits is None else logits[:, :n]


def entropy(logits: Tensor) -> Tensor:
    r"""H(softmax(l)) over the last dim, in nats: -sum p log p with log p = log_softmax(l)."""
    log_p = torch.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(-1)


def confident_order(logits: Tensor) -> Tensor:
    """Inputs by increasing entropy of their prediction, [B, N] from logits [B, N, C].

    Stable: inputs of equal entropy keep their order (z_0 first).
    """
    return torch.argsort(entropy(logits), dim=1, stable=True)


def gather_inputs(x: Tensor, idx: Tensor) -> Tensor:
    """Rows ``x[b, idx[b, j]]``: [B, k, D] from x [B, N, D] and idx [B, k]."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


T = TypeVar("T")


def take(items: T, index: Tensor) -> T:
    """The same dataclass of per-image tensors with every field indexed along dim 0."""
    return dataclasses.replace(  # type: ignore[type-var]
        items, **{f.name: getattr(items, f.name)[index] for f in dataclasses.fields(items)}
    )


def run_stream(
    step: Callable[..., PeerOutput], order: Tensor, *inputs: object, block: int
) -> PeerOutput:
    """Feed per-image inputs to an online method's ``step`` in stream order, ``block`` at a time.

    ``inputs`` are dataclasses of per-image tensors in dataset order; ``order`` [n] lists
    dataset indices in stream order. The outputs come back in dataset order.
    """
    if order.numel() == 0:
        raise ValueError("a stream needs at least one image")
    scores = probs = order.new_empty(0)
    for start in range(0, order.shape[0], block):
        idx = order[start : start + block]
        out = step(*(take(items, idx) for items in inputs))
        if start == 0:
            scores = out.scores.new_empty(order.shape[0], out.scores.shape[1])
            probs = torch.empty_like(scores)
        scores[idx], probs[idx] = out.scores, out.probs
    return PeerOutput(scores=scores, probs=probs)


def fill(store: T | None, items: T, start: int, total: int) -> T:
    """Copy a batch of per-image inputs into rows start.. of a store for ``total`` images.

    The store (the same dataclass, every field [total, ...]) is allocated on the first call
    (``store`` None) and returned: preparing a dataset batch by batch costs its final size
    only, with no list of batches to concatenate.
    """
    if store is None:
        store = dataclasses.replace(  # type: ignore[type-var]
            items,
            **{
                f.name: getattr(items, f.name).new_empty(total, *getattr(items, f.name).shape[1:])
                for f in dataclasses.fields(items)  # type: ignore[arg-type]
            },
        )
    for f in dataclasses.fields(items):  # type: ignore[arg-type]
        rows = getattr(items, f.name)
        getattr(store, f.name)[start : start + rows.shape[0]] = rows
    return store
