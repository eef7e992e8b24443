"""The training-free peers agree with literal per-image implementations of their official code."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_peers import (
    boost_stream,
    dmn_stream,
    mta_image,
    tda_stream,
    zero_image,
)

from ratta.errors import RattaInputError
from ratta.peers import (
    BoostConfig,
    BoostState,
    DMNConfig,
    DMNState,
    MTAConfig,
    TDAConfig,
    TDAState,
    ZeroConfig,
    boost,
    boost_views,
    correlated_streams,
    dmn,
    dmn_inputs,
    fill,
    mta,
    peer_defaults,
    peer_prompts,
    shuffled_streams,
    tda,
    tda_inputs,
    view_logits,
    zero,
)
from ratta.peers.common import confident_order, run_stream
from ratta.peers.prompts import paper_classifier_prompts
from ratta.presets import PRESETS
from ratta.synthetic import make_world

SCALE = 100.0


@pytest.fixture(autouse=True)
def one_thread():
    """The references run thousands of tiny per-image ops: on a shared 2-core machine a
    second intra-op thread only adds waits at every op's barrier (10-30x slower here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def case(seed: int, classes: int = 10, n: int = 120, dim: int = 32, **kw):
    """Normalised float64 inputs [n, 64, d], classifier [C, d] and labels of a generated world."""
    w = make_world(num_classes=classes, dim=dim, num_views=63, num_test=n, seed=seed, **kw)
    x = F.normalize(torch.cat([w.image.unsqueeze(1), w.views], 1).double(), dim=-1)
    return x, F.normalize(w.text.classifier.double(), dim=-1), w.labels


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.argmax(-1) == b.argmax(-1)).double().mean())


def orders(labels: torch.Tensor, seed: int, gamma: float) -> list[torch.Tensor]:
    """Two shuffled streams and a class-correlated one."""
    n = labels.shape[0]
    return [*shuffled_streams(n, 2, seed), *correlated_streams(labels, gamma, 1, seed)]


def in_dataset_order(out: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Per-image outputs listed in stream order, put back in dataset order."""
    full = torch.empty_like(out)
    full[order] = out
    return full


# --------------------------------------------------------------------------- ZERO


@pytest.mark.parametrize(("seed", "temperature"), [(1, 2.0**-10), (2, 2.0**-10), (3, 0.0)])
def test_zero_float64_equals_reference(seed: int, temperature: float) -> None:
    x, w, _ = case(seed)
    out = zero(x, w, SCALE, ZeroConfig(temperature=temperature))
    ref = torch.stack([zero_image(xi, w, SCALE, zero_temp=temperature) for xi in x])
    torch.testing.assert_close(out.scores, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.probs, ref / ref.sum(-1, keepdim=True), atol=1e-9, rtol=0)


def test_zero_hard_votes_break_ties_like_the_reference() -> None:
    x, w, _ = case(4, classes=6, shift=0.9)
    out = zero(x, w, SCALE, ZeroConfig(temperature=0.0))
    ref = torch.stack([zero_image(xi, w, SCALE, zero_temp=0.0) for xi in x])
    broken = (ref.sum(-1) == 20).sum()  # a tie-break adds one vote to the 19
    assert broken > 0
    torch.testing.assert_close(out.scores, ref, atol=0, rtol=0)


def test_zero_tie_fallback_takes_the_tied_class_of_the_first_discarded_input() -> None:
    # 10 inputs keep 3: three confident one-class inputs tie 1-1-1; every discarded input
    # votes for class 3, so the fallback ranks the tied classes by the first discarded one.
    eye = torch.eye(4, dtype=torch.float64)
    kept = eye[:3]
    discarded = F.normalize(torch.tensor([[0.1, 0.3, 0.5, 0.7]], dtype=torch.float64), dim=-1)
    x = torch.cat([kept, discarded.expand(7, -1)]).unsqueeze(0)
    out = zero(x, eye, 10.0, ZeroConfig(inputs=10, temperature=0.0))
    assert out.scores[0].tolist() == [1.0, 1.0, 2.0, 0.0]  # class 2, not the official's 0
    assert out.scores[0].tolist() == zero_image(x[0], eye, 10.0, zero_temp=0.0).tolist()


def test_zero_with_identical_views_is_zero_shot() -> None:
    x, w, _ = case(5)
    same = x[:, :1].expand(-1, 64, -1)
    out = zero(same, w, SCALE)
    assert torch.equal(out.scores.argmax(-1), (x[:, 0] @ w.T).argmax(-1))


# --------------------------------------------------------------------------- MTA


@pytest.mark.parametrize(
    ("seed", "config"),
    [(1, MTAConfig()), (2, MTAConfig()), (3, MTAConfig(lambda_y=0.5, lambda_q=1.0))],
)
def test_mta_float64_equals_reference(seed: int, config: MTAConfig) -> None:
    x, w, _ = case(seed, n=60)
    out = mta(x, w, SCALE, config)
    ref = torch.stack([mta_image(xi, w, SCALE, config.lambda_y, config.lambda_q) for xi in x])
    torch.testing.assert_close(out.scores, ref, atol=1e-9, rtol=0)
    torch.testing.assert_close(out.probs, ref.softmax(-1), atol=1e-9, rtol=0)


@pytest.mark.parametrize("method", [zero, mta])
def test_episodic_peers_do_not_depend_on_order_or_batching(method) -> None:
    x, w, _ = case(6, n=50)
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))
    whole = method(x, w, SCALE)
    shuffled = method(x[perm], w, SCALE)
    halves = torch.cat([method(x[:17], w, SCALE).scores, method(x[17:], w, SCALE).scores])
    torch.testing.assert_close(shuffled.scores, whole.scores[perm], atol=1e-12, rtol=0)
    torch.testing.assert_close(halves, whole.scores, atol=1e-12, rtol=0)


def test_shared_view_logits_give_the_same_outputs() -> None:
    x, w, _ = case(7, n=30)
    logits = view_logits(x, w, SCALE)
    for method in (zero, mta):
        torch.testing.assert_close(
            method(x, w, SCALE, logits=logits).scores, method(x, w, SCALE).scores
        )


# --------------------------------------------------------------------------- TDA


def tda_reference(x, w, order, config: TDAConfig) -> torch.Tensor:
    n = config.inputs if config.query == "views" else 1
    stream = [x[i, :n] for i in order.tolist()]
    logits = tda_stream(stream, w.T, SCALE, config.alpha, config.beta, neg_enabled=config.negative)
    return in_dataset_order(logits, order)


@pytest.mark.parametrize(
    ("seed", "config", "block"),
    [
        (1, TDAConfig(), 256),
        (2, TDAConfig(alpha=5.0, beta=3.0), 16),
        (3, TDAConfig(query="views", alpha=1.0, beta=8.0), 7),
        (4, TDAConfig(negative=False), 1),
    ],
)
def test_tda_float64_equals_reference(seed: int, config: TDAConfig, block: int) -> None:
    x, w, labels = case(seed)
    inputs = tda_inputs(x, w, SCALE, config)
    for order in orders(labels, seed, 0.1):
        out = tda(inputs, order, w, SCALE, config, block=block)
        ref = tda_reference(x, w, order, config)
        torch.testing.assert_close(out.scores, ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(out.probs, ref.softmax(-1), atol=1e-9, rtol=0)


def test_tda_cases_fill_and_rank_both_caches() -> None:
    x, w, _ = case(1)
    inputs = tda_inputs(x, w, SCALE)
    state = TDAState(w, SCALE, TDAConfig())
    run_stream(state.step, shuffled_streams(len(x), 1)[0], inputs, block=32)
    assert state.pos.size == 30 and state.neg is not None and state.neg.size >= 10
    # classes offered more images than their slots: the caches had to rank and replace
    band = (inputs.entropy / torch.log2(torch.tensor(10.0))).clamp(0.2, 0.5)
    offered_neg = inputs.label[(band > 0.2) & (band < 0.5)].bincount(minlength=10)
    assert inputs.label.bincount().max() > 3 and offered_neg.max() > 2


def test_prepared_inputs_fill_a_store_batch_by_batch() -> None:
    x, w, _ = case(13, n=40)
    parts = [tda_inputs(x[start : start + 16], w, SCALE) for start in range(0, 40, 16)]
    store = None
    for start, items in zip(range(0, 40, 16), parts, strict=True):
        store = fill(store, items, start, 40)
    assert store is not None
    for name, field in store.__dict__.items():
        assert field.shape[0] == 40
        assert torch.equal(field, torch.cat([getattr(p, name) for p in parts]))


def test_tda_without_positive_weight_or_negative_cache_is_zero_shot() -> None:
    x, w, _ = case(8)
    config = TDAConfig(alpha=0.0, negative=False)
    out = tda(tda_inputs(x, w, SCALE, config), shuffled_streams(len(x), 1)[0], w, SCALE, config)
    torch.testing.assert_close(out.scores, SCALE * x[:, 0] @ w.T, atol=1e-12, rtol=0)


# --------------------------------------------------------------------------- BoostAdapter


def boost_reference(x, w, order, config: BoostConfig) -> torch.Tensor:
    cache = config.cache
    stream = [x[i] for i in order.tolist()]
    out = boost_stream(
        stream, w.T, SCALE, cache.alpha, cache.beta, config.delta, cache.query == "z0"
    )
    return in_dataset_order(out, order)


@pytest.mark.parametrize(
    ("seed", "config", "block"),
    [
        (1, BoostConfig(delta=0), 256),
        (2, BoostConfig(delta=3), 9),
        (3, BoostConfig(cache=TDAConfig(fifo_negative=True, query="views"), delta=1), 32),
    ],
)
def test_boost_float64_equals_reference(seed: int, config: BoostConfig, block: int) -> None:
    x, w, labels = case(seed)
    inputs = tda_inputs(x, w, SCALE, config.cache)
    views = boost_views(x, w, SCALE, config)
    for order in orders(labels, seed, 0.1):
        out = boost(inputs, views, order, w, SCALE, config, block=block)
        torch.testing.assert_close(
            out.scores, boost_reference(x, w, order, config), atol=1e-9, rtol=0
        )


def test_boost_without_views_is_tda_with_a_fifo_negative_cache() -> None:
    x, w, _ = case(9)
    cache = TDAConfig(fifo_negative=True, inputs=1)
    order = shuffled_streams(len(x), 1)[0]
    inputs = tda_inputs(x, w, SCALE, cache)
    views = boost_views(x, w, SCALE, BoostConfig(cache=cache))
    assert views.views.shape[1] == 0
    out = boost(inputs, views, order, w, SCALE, BoostConfig(cache=cache, delta=2))
    torch.testing.assert_close(out.scores, tda(inputs, order, w, SCALE, cache).scores)


def test_boost_fifo_negative_cache_differs_from_tda_rule() -> None:
    x, w, _ = case(1)
    order = shuffled_streams(len(x), 1)[0]
    inputs = tda_inputs(x, w, SCALE)
    fifo = tda(inputs, order, w, SCALE, TDAConfig(fifo_negative=True)).scores
    lowest = tda(inputs, order, w, SCALE, TDAConfig()).scores
    assert not torch.allclose(fifo, lowest)


def test_boost_state_counts_the_boosted_entries() -> None:
    x, w, _ = case(2)
    config = BoostConfig(delta=2)
    state = BoostState(w, SCALE, config)
    run_stream(
        state.step,
        shuffled_streams(len(x), 1)[0],
        tda_inputs(x, w, SCALE, config.cache),
        boost_views(x, w, SCALE, config),
        block=64,
    )
    plain = TDAState(w, SCALE, config.cache)
    run_stream(plain.step, shuffled_streams(len(x), 1)[0], tda_inputs(x, w, SCALE), block=64)
    assert state.scored["positive"] > plain.scored["positive"]
    assert state.scored["negative"] > 0


# --------------------------------------------------------------------------- DMN-ZS


def dmn_reference(x, w, order, config: DMNConfig) -> torch.Tensor:
    stream = [x[i, : config.inputs] for i in order.tolist()]
    return in_dataset_order(dmn_stream(stream, w, SCALE, config.gamma, config.memory), order)


@pytest.mark.parametrize(
    ("seed", "config", "block"),
    [
        (1, DMNConfig(), 128),
        (2, DMNConfig(memory=4), 16),
        (3, DMNConfig(memory=2, gamma=0.3), 5),
    ],
)
def test_dmn_float64_equals_reference(seed: int, config: DMNConfig, block: int) -> None:
    x, w, labels = case(seed)
    inputs = dmn_inputs(x, w, SCALE, config)
    for order in orders(labels, seed, 0.01):
        out = dmn(inputs, order, w, SCALE, config, block=block)
        ref = dmn_reference(x, w, order, config)
        torch.testing.assert_close(out.scores, ref, atol=1e-9, rtol=0)
        torch.testing.assert_close(out.probs, ref / (1 + config.gamma), atol=1e-9, rtol=0)


def test_dmn_cases_fill_and_rewrite_a_small_memory() -> None:
    x, w, _ = case(2)
    inputs = dmn_inputs(x, w, SCALE)
    state = DMNState(w, SCALE, DMNConfig(memory=4))
    run_stream(state.step, shuffled_streams(len(x), 1)[0], inputs, block=16)
    assert state.rows - 10 >= 36 and state.images == len(x)  # 10 text keys
    assert (inputs.label.bincount() > 4).sum() >= 5  # classes offered more than their slots


def test_dmn_without_memory_weight_is_zero_shot() -> None:
    x, w, _ = case(3)
    config = DMNConfig(gamma=0.0)
    out = dmn(dmn_inputs(x, w, SCALE, config), shuffled_streams(len(x), 1)[0], w, SCALE, config)
    torch.testing.assert_close(out.scores, torch.softmax(SCALE * x[:, 0] @ w.T, -1))


# --------------------------------------------------------------------------- float32


def test_float32_engines_agree_with_float64_references() -> None:
    x, w, _ = case(10, classes=20, n=200, dim=48)
    x32, w32 = x.float(), w.float()
    order = shuffled_streams(len(x), 1, seed=3)[0]
    agreements = {
        "zero": top1_agreement(
            zero(x32, w32, SCALE).scores,
            torch.stack([zero_image(xi, w, SCALE) for xi in x]),
        ),
        "mta": top1_agreement(
            mta(x32, w32, SCALE).scores, torch.stack([mta_image(xi, w, SCALE) for xi in x])
        ),
        "tda": top1_agreement(
            tda(tda_inputs(x32, w32, SCALE), order, w32, SCALE).scores,
            tda_reference(x, w, order, TDAConfig()),
        ),
        "dmn": top1_agreement(
            dmn(dmn_inputs(x32, w32, SCALE), order, w32, SCALE).scores,
            dmn_reference(x, w, order, DMNConfig()),
        ),
    }
    config = BoostConfig(delta=1)
    agreements["boost"] = top1_agreement(
        boost(
            tda_inputs(x32, w32, SCALE, config.cache),
            boost_views(x32, w32, SCALE, config),
            order,
            w32,
            SCALE,
            config,
        ).scores,
        boost_reference(x, w, order, config),
    )
    assert min(agreements.values()) >= 0.995, agreements


# --------------------------------------------------------------------------- streams


def test_online_peers_are_deterministic_given_the_seed() -> None:
    x, w, labels = case(11)
    inputs = tda_inputs(x, w, SCALE)
    for streams in (
        lambda seed: shuffled_streams(len(x), 2, seed),
        lambda seed: correlated_streams(labels, 0.01, 2, seed),
    ):
        first, again, other = streams(0), streams(0), streams(1)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
        assert not torch.equal(first[0], other[0]) and not torch.equal(first[0], first[1])
        runs = [tda(inputs, o, w, SCALE).scores for o in (first[0], again[0])]
        assert torch.equal(runs[0], runs[1])


def test_streams_are_permutations_and_correlation_groups_classes() -> None:
    labels = torch.arange(20).repeat_interleave(30)
    changes = {}
    for name, order in (
        ("shuffled", shuffled_streams(600, 1)[0]),
        ("0.001", correlated_streams(labels, 0.001, 1, slots=200)[0]),
        ("100", correlated_streams(labels, 100.0, 1, slots=200)[0]),
        ("default slots", correlated_streams(labels, 0.001, 1)[0]),
    ):
        assert torch.equal(order.sort().values, torch.arange(600))
        changes[name] = int((labels[order][1:] != labels[order][:-1]).sum())
    assert changes["0.001"] < changes["shuffled"] / 5
    assert changes["100"] > changes["shuffled"] / 2


def test_correlated_streams_reject_a_nonpositive_concentration() -> None:
    with pytest.raises(ValueError, match="concentration"):
        correlated_streams(torch.zeros(5, dtype=torch.int64), 0.0)


# --------------------------------------------------------------------------- defaults, prompts


def test_defaults_follow_the_official_configs_and_flag_unpublished_datasets() -> None:
    sketch = peer_defaults("imagenet_sketch")
    assert (sketch.tda.alpha, sketch.tda.beta, sketch.tda.query) == (2.363, 7.45, "views")
    assert sketch.boost.delta == 1 and sketch.boost.cache.fifo_negative
    assert str(sketch.sources["tda"][0]) == "kdiAAA/TDA@e697fb0:configs/imagenet_s.yaml"
    imagenet = peer_defaults("imagenet")
    assert imagenet.boost.cache.inputs == 1 and imagenet.published
    for name in PRESETS:
        d = peer_defaults(name)
        assert d.published == (name not in ("caltech256", "cub200", "resisc45"))
        if not d.published:
            assert (d.tda, d.boost) == (imagenet.tda, imagenet.boost)
    assert peer_defaults("dtd").dmn.gamma == 1.0
    with pytest.raises(RattaInputError, match="unknown dataset 'mnist'"):
        peer_defaults("mnist")


def test_prompts_per_method_and_dataset() -> None:
    assert peer_prompts("tda", "dtd", ["banded"]) == [["banded texture."]]
    assert peer_prompts("zero", "dtd", ["banded"]) == [["a photo of a banded."]]
    assert peer_prompts("boost", "food101", ["apple_pie"]) == [
        ["a photo of apple pie, a type of food."]
    ]
    assert len(peer_prompts("tda", "imagenet_sketch", ["goldfish"])[0]) == 80
    assert peer_prompts("tda", "cub200", ["wren"]) == peer_prompts("tda", "imagenet", ["wren"])
    sentences = [["Stripes of colour.", "Bands."], None]
    dmn_rows = peer_prompts("dmn", "dtd", ["banded", "dotted"], sentences)
    assert dmn_rows == [
        ["banded texture.", "Stripes of colour.", "Bands."],
        ["dotted texture."],  # a class without sentences (--allow-missing): its templates
    ]
    with pytest.raises(RattaInputError, match="needs CuPL"):
        peer_prompts("dmn", "dtd", ["banded"])
    with pytest.raises(RattaInputError, match="for 2 classes, expected 1"):
        peer_prompts("dmn", "dtd", ["banded"], sentences)
    by_key = paper_classifier_prompts("dtd", ["banded", "dotted"], sentences)
    assert by_key == {
        "peer_dmn": dmn_rows,
        "peer_single": peer_prompts("zero", "dtd", ["banded", "dotted"]),
        "peer_tda": peer_prompts("tda", "dtd", ["banded", "dotted"]),
    }
    with pytest.raises(RattaInputError, match="unknown peer"):
        peer_prompts("tent", "dtd", ["banded"])


def test_zero_keeping_every_input_breaks_ties_by_the_most_confident() -> None:
    eye = torch.eye(3, dtype=torch.float64)
    x = torch.stack([eye[0], F.normalize(eye[1] + 0.2 * eye[2], dim=0)]).unsqueeze(0)
    out = zero(x, eye, 10.0, ZeroConfig(inputs=2, gamma=1.0, temperature=0.0))
    assert out.scores[0].tolist() == [2.0, 1.0, 0.0]


def test_prepared_inputs_own_their_memory_not_the_batch() -> None:
    x, w, _ = case(12, n=20)
    prepared = [
        tda_inputs(x, w, SCALE),
        tda_inputs(x, w, SCALE, TDAConfig(query="views")),
        boost_views(x, w, SCALE),
        dmn_inputs(x, w, SCALE),
    ]
    for items in prepared:
        for field in items.__dict__.values():
            assert field.untyped_storage().nbytes() == field.numel() * field.element_size()


def test_fewer_inputs_than_official_select_at_least_one() -> None:
    """With few stored views every count the official N keeps positive stays >= 1: MTA's
    neighbours, TDA's views query and DMN-ZS's pseudo-label are defined (the eval's
    "N of M inputs" variants); MTA needs a view."""
    x, w, _ = case(7)
    x = x[:, :3]  # z_0 and 2 views
    out = mta(x, w, SCALE, MTAConfig(inputs=3))
    assert bool(torch.isfinite(out.probs).all())
    prep = tda_inputs(x, w, SCALE, TDAConfig(query="views", inputs=3))
    best = confident_order(view_logits(x, w, SCALE))[:, 0]
    assert torch.equal(prep.query, x[torch.arange(len(x)), best])  # the most confident input
    dmn_prep = dmn_inputs(x, w, SCALE, DMNConfig(inputs=3))
    assert bool(torch.isfinite(dmn_prep.entropy).all())
    with pytest.raises(ValueError, match="at least two inputs"):
        mta(x[:, :1], w, SCALE, MTAConfig(inputs=1))
