"""The batched engine agrees with the literal per-image float64 reference of method.md."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import as_numpy64, stacked
from reference import reference_image

from ratta import ExactRetriever, RATTAConfig, ratta_batch
from ratta.engine import (
    description_scores,
    quantile_last,
    top_description_scores,
    top_k_stable,
)
from ratta.synthetic import SyntheticWorld, make_world


def run_engine(world: SyntheticWorld, dtype: torch.dtype, config: RATTAConfig, x=None, db=None):
    x = stacked(world) if x is None else x
    db = torch.from_numpy(world.database) if db is None else db
    t = world.text
    return ratta_batch(
        x.to(dtype),
        t.classifier.to(dtype),
        t.desc.to(dtype),
        t.desc_class,
        t.logit_scale,
        ExactRetriever(db.to(dtype)),
        config,
    )


def run_reference(world: SyntheticWorld, config: RATTAConfig, x=None, db=None) -> list[dict]:
    x = as_numpy64(stacked(world) if x is None else x)
    db = as_numpy64(world.database if db is None else db)
    t = world.text
    args = (as_numpy64(t.classifier), as_numpy64(t.desc), t.desc_class.numpy(), db, t.logit_scale)
    kw = dict(k_d=config.k_d, k_s=config.k_s, q=config.quantile, min_desc=config.min_desc)
    return [reference_image(xi, *args, **kw) for xi in x]


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_float64_engine_equals_reference(seed: int) -> None:
    world = make_world(num_classes=15, dim=48, num_views=20, num_test=80, seed=seed)
    res = run_engine(world, torch.float64, RATTAConfig())
    ref = run_reference(world, RATTAConfig())
    for i, r in enumerate(ref):
        assert [c for c in res.candidates[i].tolist() if c >= 0] == r["classes"]
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-9)
        np.testing.assert_allclose(res.retrieval[i].numpy(), r["p_ret"], atol=1e-9)
        np.testing.assert_allclose(res.zero_shot[i].numpy(), r["p0"], atol=1e-12)


@pytest.mark.parametrize("seed", [11, 12])
def test_float32_engine_agrees_with_reference(seed: int) -> None:
    world = make_world(num_classes=30, dim=64, num_views=40, num_test=150, seed=seed, shift=0.8)
    res = run_engine(world, torch.float32, RATTAConfig())
    ref = run_reference(world, RATTAConfig())
    p_ref = np.stack([r["p"] for r in ref])
    p0_ref = np.stack([r["p0"] for r in ref])
    assert (res.final.argmax(1).numpy() == p_ref.argmax(1)).mean() >= 0.99
    assert (res.zero_shot.argmax(1).numpy() == p0_ref.argmax(1)).mean() >= 0.995
    close = np.abs(res.final.double().numpy() - p_ref).max(1) < 1e-3
    assert close.mean() >= 0.99


def test_the_evidence_is_what_the_reference_uses(world: SyntheticWorld) -> None:
    """The retrieved rows of each candidate set (nearest first) and the top description
    rows are those of the reference; empty slots hold -1."""
    res = run_engine(world, torch.float64, RATTAConfig())
    assert res.retrieved.shape == (*res.candidates.shape, RATTAConfig().k_s)
    for i, r in enumerate(run_reference(world, RATTAConfig())):
        assert res.top_descriptions[i].tolist() == sorted(r["top"].tolist())
        slots = res.candidates[i] >= 0
        assert [ids.tolist() for ids in res.retrieved[i, slots]] == [
            ids.tolist() for ids in r["retrieved"]
        ]
        assert bool((res.retrieved[i, ~slots] == -1).all())
    top_scores = description_scores(stacked(world).double(), world.text.desc.double(), 0.75)
    torch.testing.assert_close(
        res.top_description_scores, top_scores.gather(1, res.top_descriptions)
    )


def test_outputs_are_distributions(world: SyntheticWorld) -> None:
    res = run_engine(world, torch.float32, RATTAConfig())
    for p in (res.zero_shot, res.retrieval, res.final):
        torch.testing.assert_close(p.sum(1), torch.ones(p.shape[0]))
        assert bool((p >= 0).all())
    valid = res.candidates >= 0
    torch.testing.assert_close(
        res.relevance.sum(1)[valid.any(1)], torch.ones(int(valid.any(1).sum()))
    )
    assert bool((res.relevance[~valid] == 0).all())
    assert bool(res.ot_distance[~valid].isnan().all())
    assert bool((res.ot_distance[valid] >= 0).all())


def test_no_class_survives_falls_back_to_zero_shot(world: SyntheticWorld) -> None:
    config = RATTAConfig(k_d=4, min_desc=5)
    res = run_engine(world, torch.float64, config)
    assert bool((res.candidates == -1).all())
    torch.testing.assert_close(res.final, res.zero_shot)
    torch.testing.assert_close(res.retrieval, res.zero_shot)
    assert bool((res.lam == 1).all())
    for i, r in enumerate(run_reference(world, config)):
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-12)


def test_one_class_survives_gets_all_relevance(world: SyntheticWorld) -> None:
    config = RATTAConfig(k_d=5, min_desc=5)
    res = run_engine(world, torch.float64, config)
    ref = run_reference(world, config)
    adapted = (res.candidates >= 0).sum(1)
    assert bool((adapted <= 1).all()) and int(adapted.sum()) > 0
    for i, r in enumerate(ref):
        if r["classes"]:
            assert res.candidates[i, 0].item() == r["classes"][0]
            assert res.retrieval[i, r["classes"][0]].item() == pytest.approx(1.0)
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-9)


def test_tied_scores_break_to_the_lower_description_index() -> None:
    world = make_world(num_classes=8, dim=32, num_views=6, num_test=40, seed=3)
    t = world.text
    # every class gets its descriptions twice: all scores tie in pairs
    t.desc = torch.cat([t.desc, t.desc])
    t.desc_class = torch.cat([t.desc_class, t.desc_class])
    res = run_engine(world, torch.float64, RATTAConfig())
    ref = run_reference(world, RATTAConfig())
    for i, r in enumerate(ref):
        assert [c for c in res.candidates[i].tolist() if c >= 0] == r["classes"]
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-9)


def test_k_s_larger_than_database_uses_every_row(world: SyntheticWorld) -> None:
    small = torch.from_numpy(world.database[:7])
    config = RATTAConfig(k_s=20)
    res = run_engine(world, torch.float64, config, db=small)
    ref = run_reference(world, config, db=small.numpy())
    for i, r in enumerate(ref):
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-9)
    assert res.retrieved.shape[2] == 7


def test_no_views_uses_the_center_crop_alone(world: SyntheticWorld) -> None:
    x = world.image.unsqueeze(1)
    res = run_engine(world, torch.float64, RATTAConfig(), x=x)
    ref = run_reference(world, RATTAConfig(), x=x)
    for i, r in enumerate(ref):
        np.testing.assert_allclose(res.final[i].numpy(), r["p"], atol=1e-9)


@pytest.mark.parametrize("n", [1, 2, 3, 11, 101])
@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.75, 0.9, 0.93, 1.0])
def test_quantile_matches_torch_quantile(n: int, q: float) -> None:
    x = torch.randn(17, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(quantile_last(x, q), torch.quantile(x, q, dim=-1))


def test_top_k_stable_prefers_lower_index_on_ties() -> None:
    scores = torch.tensor([[1.0, 3.0, 2.0, 3.0, 2.0, 2.0], [5.0, 5.0, 5.0, 5.0, 5.0, 5.0]])
    assert top_k_stable(scores, 4).tolist() == [[1, 2, 3, 4], [0, 1, 2, 3]]


def test_batches_are_independent(world: SyntheticWorld) -> None:
    whole = run_engine(world, torch.float64, RATTAConfig())
    x = stacked(world)
    part = run_engine(world, torch.float64, RATTAConfig(), x=x[17:29])
    torch.testing.assert_close(part.final, whole.final[17:29])


@pytest.mark.parametrize("seed", range(6))
def test_pruned_scoring_keeps_the_exact_top_k(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, m, d = [(1, 50, 8), (5, 300, 16), (21, 999, 32), (101, 40, 16), (3, 25, 4), (12, 200, 8)][
        seed
    ]
    x = torch.nn.functional.normalize(torch.randn(9, n, d, generator=g), dim=-1)
    desc = torch.nn.functional.normalize(torch.randn(m, d, generator=g), dim=-1)
    if seed % 2:  # duplicated rows: exact ties at the boundary
        desc = torch.cat([desc, desc[: m // 3]])
    for q in (0.5, 0.75, 0.9):
        for k in (1, 5, 20):
            full = description_scores(x, desc, q)
            pruned = top_description_scores(x, desc, q, k)
            assert torch.equal(top_k_stable(full, k), top_k_stable(pruned, k))
            kept = pruned > float("-inf")
            assert torch.equal(pruned[kept], full[kept])
