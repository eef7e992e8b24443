"""Batched entropic optimal transport with POT's Sinkhorn-Knopp semantics."""

from __future__ import annotations

import torch
from torch import Tensor


def sinkhorn_knopp(
    a: Tensor,
    b: Tensor,
    cost: Tensor,
    reg: float,
    max_iter: int = 100,
    stop_thr: float = 1e-2,
    *,
    sync_every: int = 10,
) -> tuple[Tensor, Tensor]:
    r"""Solve P entropic OT problems at once, exactly as ``ot.sinkhorn`` does one by one.

    For each problem p with histograms a_p [n], b_p [m] and cost C_p [n, m]:

    .. math::
        K = \exp(-C / \mathrm{reg}),\quad u^0 = \mathbf{1}/n,\quad v^0 = \mathbf{1}/m,\\
        v \leftarrow b / (K^\top u),\quad u \leftarrow 1 / (\mathrm{diag}(1/a) K v),\\
        \Pi = \mathrm{diag}(u)\, K\, \mathrm{diag}(v).

    Like POT's ``sinkhorn_knopp``: at most ``max_iter`` iterations; at every iteration whose
    index is a multiple of 10 the marginal error ``||(diag(u) K diag(v))^T 1 - b||_2`` is
    computed and the problem stops once it is below ``stop_thr``; a problem whose update hits
    a zero in K^T u or a non-finite scaling keeps its previous (u, v) and stops. Every problem
    stops on its own schedule: a stopped problem's (u, v) are frozen on the device, and after
    iteration 0 and every ``sync_every`` iterations the host looks at which problems still
    run, drops the others from the working set and ends the loop when none is left (one host
    synchronisation per look, at most ``ceil(max_iter / sync_every)``).

    Args:
        a: [P, n] source histograms (positive, summing to 1).
        b: [P, m] target histograms.
        cost: [P, n, m] ground costs.
        reg: entropic regularisation.
        sync_every: iterations between the host's looks (speed only, never the result).

    Returns:
        plan [P, n, m] and the number of iterations run per problem [P] (int64).
    """
    num, n, m = cost.shape
    kernel = torch.exp(cost / -reg)
    kernel_p = kernel / a.unsqueeze(2)
    u = torch.full((num, n), 1.0 / n, dtype=cost.dtype, device=cost.device)
    v = torch.full((num, m), 1.0 / m, dtype=cost.dtype, device=cost.device)
    iters = torch.full((num,), max_iter, dtype=torch.int64, device=cost.device)

    idx = torch.arange(num, device=cost.device)
    k_w, kp_w, b_w, u_w, v_w, it_w = kernel, kernel_p, b, u.clone(), v.clone(), iters.clone()
    running = torch.ones(num, dtype=torch.bool, device=cost.device)
    for it in range(max_iter):
        ktu = torch.bmm(u_w.unsqueeze(1), k_w).squeeze(1)
        v_new = b_w / ktu
        u_new = 1.0 / torch.bmm(kp_w, v_new.unsqueeze(2)).squeeze(2)
        bad = (ktu == 0).any(1) | ~torch.isfinite(u_new).all(1) | ~torch.isfinite(v_new).all(1)
        step = (running & ~bad).unsqueeze(1)
        u_w = torch.where(step, u_new, u_w)
        v_w = torch.where(step, v_new, v_w)
        stop = bad
        if it % 10 == 0:
            marginal = v_w * torch.bmm(u_w.unsqueeze(1), k_w).squeeze(1)
            err = torch.linalg.vector_norm(marginal - b_w, dim=1)
            stop = stop | (err < stop_thr)
        it_w = torch.where(running & stop, it + 1, it_w)
        running = running & ~stop
        if it % sync_every == 0 and it < max_iter - 1:
            keep = running.nonzero().squeeze(1)
            if keep.numel() < running.numel():
                u.index_copy_(0, idx, u_w)
                v.index_copy_(0, idx, v_w)
                iters.index_copy_(0, idx, it_w)
                idx, k_w, kp_w, b_w = idx[keep], k_w[keep], kp_w[keep], b_w[keep]
                u_w, v_w, it_w, running = u_w[keep], v_w[keep], it_w[keep], running[keep]
            if idx.numel() == 0:
                break
    u.index_copy_(0, idx, u_w)
    v.index_copy_(0, idx, v_w)
    iters.index_copy_(0, idx, it_w)
    plan = u.unsqueeze(2) * kernel * v.unsqueeze(1)
    return plan, iters
