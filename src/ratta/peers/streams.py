r"""Orders in which online peers see the test set: seeded shuffles and class-correlated streams.

Each function returns dataset indices in stream order (int64 tensors), a pure function of its
arguments: the same seed gives the same streams on every machine (numpy's PCG64 generator).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

# StatA's online streams are cut in batches of 128 images; its slot count is
# min(#batches, #classes) (MaxZanella/StatA @eea8637, main.py).
STATA_BATCH = 128


def shuffled_streams(n: int, streams: int = 3, seed: int = 0) -> list[Tensor]:
    """``streams`` uniformly random permutations of n images; stream k uses seed (seed, k)."""
    return [
        torch.from_numpy(np.random.default_rng((seed, k)).permutation(n)) for k in range(streams)
    ]


def correlated_streams(
    labels: Tensor, gamma: float, streams: int = 3, seed: int = 0, slots: int | None = None
) -> list[Tensor]:
    r"""Class-correlated streams of StatA's online sampler (``sampler.py``, ``OnlineSampler``).

    Per class c, a share pi_c ~ Dirichlet(gamma 1_S) over S slots; the images of c, in dataset
    order, are cut into consecutive runs of sizes floor(cumsum(pi_c) n_c) and run s goes to
    slot s; each slot is shuffled and the slots are concatenated. Small gamma puts each class
    in few slots: long runs of one class (StatA uses gamma in {0.1, 0.01, 0.001}).

    Args:
        labels: [n] class of each test image.
        gamma: the Dirichlet concentration (> 0).
        slots: S; default min(n // 128, #classes present), at least 1, as StatA.
    """
    if gamma <= 0:
        raise ValueError(f"the Dirichlet concentration must be > 0, got {gamma}")
    lab = labels.cpu().numpy()
    classes = np.unique(lab)
    if slots is None:
        slots = max(1, min(lab.shape[0] // STATA_BATCH, classes.shape[0]))
    members = [np.flatnonzero(lab == c) for c in classes]
    out = []
    for k in range(streams):
        rng = np.random.default_rng((seed, k))
        shares = rng.dirichlet([gamma] * slots, classes.shape[0])
        bins: list[list[np.ndarray]] = [[] for _ in range(slots)]
        for share, idx in zip(shares, members, strict=True):
            cuts = (np.cumsum(share)[:-1] * idx.shape[0]).astype(int)
            for s, run in enumerate(np.split(idx, cuts)):
                bins[s].append(run)
        order = [rng.permutation(np.concatenate(b)) for b in bins]
        out.append(torch.from_numpy(np.concatenate(order)).to(torch.int64))
    return out
