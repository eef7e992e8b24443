"""Batched Sinkhorn-Knopp reproduces POT's ot.sinkhorn problem by problem."""

from __future__ import annotations

import warnings

import numpy as np
import ot
import pytest
import torch

from ratta.sinkhorn import sinkhorn_knopp


def random_problems(num: int, n: int, m: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.softmax(scale * torch.randn(num, n, generator=g, dtype=torch.float64), 1)
    b = torch.softmax(scale * torch.randn(num, m, generator=g, dtype=torch.float64), 1)
    cost = torch.rand(num, n, m, generator=g, dtype=torch.float64) * 0.5
    return a, b, cost


def pot_plans(a, b, cost, reg, max_iter, stop_thr):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return np.stack(
            [
                ot.sinkhorn(
                    a[i].numpy(),
                    b[i].numpy(),
                    cost[i].numpy(),
                    reg,
                    numItermax=max_iter,
                    stopThr=stop_thr,
                )
                for i in range(a.shape[0])
            ]
        )


@pytest.mark.parametrize(
    ("reg", "max_iter", "stop_thr"),
    [
        (0.1, 100, 1e-2),
        (0.05, 100, 1e-3),
        (0.02, 37, 1e-6),
        (0.1, 5, 0.0),
        (1.0, 100, 1e-9),
    ],
)
def test_matches_pot(reg: float, max_iter: int, stop_thr: float) -> None:
    a, b, cost = random_problems(40, 21, 9, seed=int(reg * 1000) + max_iter, scale=3.0)
    plan, iters = sinkhorn_knopp(a, b, cost, reg, max_iter, stop_thr)
    np.testing.assert_allclose(
        plan.numpy(), pot_plans(a, b, cost, reg, max_iter, stop_thr), rtol=1e-10, atol=1e-14
    )
    assert bool((iters <= max_iter).all()) and bool((iters >= 1).all())


def test_problems_stop_on_their_own_schedule() -> None:
    a, b, cost = random_problems(30, 15, 6, seed=1, scale=4.0)
    _, iters = sinkhorn_knopp(a, b, cost, 0.03, 100, 1e-4)
    assert len(set(iters.tolist())) > 1


def test_numerical_breakdown_keeps_previous_scaling_like_pot() -> None:
    a, b, cost = random_problems(6, 8, 5, seed=2)
    cost[:3] *= 400.0  # exp(-C/reg) underflows to 0 for these problems
    plan, _ = sinkhorn_knopp(a, b, cost, 0.01, 100, 1e-2)
    np.testing.assert_allclose(
        plan.numpy(), pot_plans(a, b, cost, 0.01, 100, 1e-2), rtol=1e-10, atol=1e-300
    )


def test_float32_plan_is_close_to_float64() -> None:
    a, b, cost = random_problems(50, 101, 20, seed=3, scale=2.0)
    p64, _ = sinkhorn_knopp(a, b, cost, 0.1)
    p32, _ = sinkhorn_knopp(a.float(), b.float(), cost.float(), 0.1)
    np.testing.assert_allclose(p32.double().numpy(), p64.numpy(), atol=1e-6)
