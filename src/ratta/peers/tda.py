r"""TDA (Karmanov et al., CVPR 2024) and BoostAdapter (Zhang et al., NeurIPS 2024): key-value
caches of past test images, online along a stream.

Official code: kdiAAA/TDA @e697fb0 (``tda_runner.py``, ``utils.py``, ``configs/*.yaml``) and
taolinzhang/BoostAdapter @9983e1a (``runner.py``, ``utils.py``, ``configs/*.yaml``).

Per image, in stream order (the caches are written BEFORE the image is scored, so it sees its
own key): a query q with logits l = s W q, pseudo-label y = argmax l, probabilities pi and
entropy H (nats). The positive cache keeps per class the ``capacity`` entries (q, H) of lowest
H; the negative cache, written only when 0.2 < H / log2(C) < 0.5 (nats over log2, as the
official code), keeps (q, H, 1[0.03 < pi < 1]). With phi_j = exp(-beta (1 - q^T k_j)):

    logits = l + alpha+ sum_pos phi_j onehot(y_j) - alpha- sum_neg phi_j mask_j.

BoostAdapter adds, for each image, its floor(0.1 N) lowest-entropy inputs to a throw-away copy
of the positive cache (under their own argmax, capacity + delta) used for the positive term;
its negative cache keeps the most recent entries per class (FIFO).

Engine: the Python bookkeeping of a block of stream images decides every write (cheap
scalars); one GEMM per cache and block then scores the block against every entry alive at
some point of it, masked by each entry's lifetime, which keeps the per-image semantics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from ratta.peers.common import (
    PeerOutput,
    confident_order,
    entropy,
    first_logits,
    gather_inputs,
    run_stream,
)


@dataclass(frozen=True)
class TDAConfig:
    """TDA's settings; defaults are ImageNet's ``configs/imagenet.yaml``.

    Attributes:
        alpha, beta: alpha+ and beta+ of the positive cache.
        capacity: entries per class of the positive cache.
        negative: use the negative cache.
        alpha_neg, beta_neg, capacity_neg: the negative cache's.
        entropy_bounds: an image enters the negative cache when lo < H / log2(C) < hi.
        mask_bounds: negative values 1[lo < pi_c < hi].
        fifo_negative: the negative cache keeps the most recent entries (BoostAdapter), not
            the lowest-entropy ones.
        query: "z0" (the centre crop) or "views": the mean of the floor(select N) inputs of
            lowest entropy, not renormalised (the official code on ImageNet-A/V2/R/Sketch).
        inputs: N for the "views" query and for BoostAdapter's boosting.
        select: the fraction of the N inputs selected.
    """

    alpha: float = 2.0
    beta: float = 5.0
    capacity: int = 3
    negative: bool = True
    alpha_neg: float = 0.117
    beta_neg: float = 1.0
    capacity_neg: int = 2
    entropy_bounds: tuple[float, float] = (0.2, 0.5)
    mask_bounds: tuple[float, float] = (0.03, 1.0)
    fifo_negative: bool = False
    query: Literal["z0", "views"] = "z0"
    inputs: int = 64
    select: float = 0.1


@dataclass(frozen=True)
class BoostConfig:
    """BoostAdapter's settings: TDA's caches (FIFO negative cache) plus delta.

    Attributes:
        cache: the caches; ``cache.inputs`` is N, the inputs the boosted views come from
            (1 on ImageNet in the official code: no boosting).
        delta: extra capacity per class of the boosted copy of the positive cache.
    """

    cache: TDAConfig = TDAConfig(fifo_negative=True)
    delta: int = 0


@dataclass
class TDAInputs:
    """Per-image, stream-independent inputs of TDA and BoostAdapter (dataset order).

    Attributes:
        query: [n, d] q, the cache key and the query.
        entropy: [n] H of the prediction, in nats (the cache ranking).
        label: [n] pseudo-label y.
        neg_mask: [n, C] the negative value 1[lo < pi_c < hi].
    """

    query: Tensor
    entropy: Tensor
    label: Tensor
    neg_mask: Tensor


@dataclass
class BoostViews:
    """Per-image boosted inputs of BoostAdapter, by increasing entropy (dataset order).

    Attributes:
        views: [n, k, d] the k = floor(0.1 N) lowest-entropy inputs.
        label: [n, k] their argmax; entropy: [n, k] their entropy (nats).
    """

    views: Tensor
    label: Tensor
    entropy: Tensor


def tda_inputs(
    x: Tensor,
    classifier: Tensor,
    scale: float,
    config: TDAConfig = TDAConfig(),
    logits: Tensor | None = None,
) -> TDAInputs:
    r"""The query, pseudo-label, entropy and negative mask of a batch of images.

    "z0": q = z_0, pi = p(z_0), H = H(pi), y = argmax l(z_0). "views": with S the
    floor(select N) inputs (at least one) of lowest entropy, q = mean_S z_i,
    pi = mean_S p(z_i), H = H(pi), y = argmax mean_S l(z_i).

    Args:
        x: [B, N', d] inputs, z_0 first (N' >= N for "views", >= 1 for "z0").
        logits: s x W^T of the inputs if already computed.
    """
    lo, hi = config.mask_bounds
    if config.query == "z0":
        logit = scale * (x[:, 0] @ classifier.T) if logits is None else logits[:, 0]
        log_p = torch.log_softmax(logit, dim=-1)
        prob = log_p.exp()
        return TDAInputs(
            query=x[:, 0].clone(),  # not a view: it would keep the whole batch alive
            entropy=-(prob * log_p).sum(-1),
            label=logit.argmax(-1),
            neg_mask=(prob > lo) & (prob < hi),
        )
    n = config.inputs
    logit = first_logits(x, classifier, scale, n, logits)
    k = max(1, int(logit.shape[1] * config.select))  # at least one input when N < 10
    idx = confident_order(logit)[:, :k]
    chosen = gather_inputs(logit, idx)
    log_p = torch.log_softmax(chosen, dim=-1)
    log_mean = log_p.logsumexp(dim=1) - math.log(k)
    log_mean = log_mean.clamp_min(torch.finfo(log_mean.dtype).min)
    prob = log_p.exp().mean(1)
    return TDAInputs(
        query=gather_inputs(x[:, :n], idx).mean(1),
        entropy=-(log_mean * log_mean.exp()).sum(-1),
        label=chosen.mean(1).argmax(-1),
        neg_mask=(prob > lo) & (prob < hi),
    )


def boost_views(
    x: Tensor,
    classifier: Tensor,
    scale: float,
    config: BoostConfig = BoostConfig(),
    logits: Tensor | None = None,
) -> BoostViews:
    """BoostAdapter's boosted inputs of a batch: the floor(0.1 N) of lowest entropy."""
    n = config.cache.inputs
    logit = first_logits(x, classifier, scale, n, logits)
    k = int(logit.shape[1] * config.cache.select)
    idx = confident_order(logit)[:, :k]
    chosen = gather_inputs(logit, idx)
    return BoostViews(
        views=gather_inputs(x[:, :n], idx), label=chosen.argmax(-1), entropy=entropy(chosen)
    )


class _Cache:
    """A cache of at most ``capacity`` entries per class: Python lists decide, tensors store.

    ``lists[c]`` holds (H, row) in the official list order: ascending H (stable sort) or, for
    a FIFO cache, arrival order. A class's entry gets the next free row when its class has
    room and keeps it when replaced, so rows 0..size-1 are exactly the entries: ``keys``
    [C * capacity, d], ``classes`` and, for a negative cache, ``values`` [C * capacity, C].
    """

    def __init__(
        self, num_classes: int, capacity: int, like: Tensor, fifo: bool, values: bool
    ) -> None:
        self.capacity = capacity
        self.fifo = fifo
        self.lists: list[list[tuple[float, int]]] = [[] for _ in range(num_classes)]
        rows = num_classes * capacity
        self.keys = like.new_zeros(rows, like.shape[1])
        self.classes = torch.zeros(rows, dtype=torch.int64, device=like.device)
        self.values = like.new_zeros(rows, num_classes) if values else None
        self.size = 0

    def insert(self, c: int, h: float) -> tuple[int, bool] | None:
        """Offer an entry of class c and entropy h: (row written, an entry was evicted)."""
        entries = self.lists[c]
        if len(entries) < self.capacity:
            row = self.size
            self.size += 1
            entries.append((h, row))
            if not self.fifo:
                entries.sort(key=_first)
            return row, False
        if self.fifo:
            row = entries.pop(0)[1]
            entries.append((h, row))
            return row, True
        if h < entries[-1][0]:
            row = entries[-1][1]
            entries[-1] = (h, row)
            entries.sort(key=_first)
            return row, True
        return None


def _first(item: tuple[float, object]) -> float:
    return item[0]


class _Block:
    """The writes into one cache during a block of b stream images, and their lifetimes.

    The entries present at the block's start ("old": rows 0..rows-1) die at their first
    overwrite; each image t of the block can be a "new" entry, alive from t until its row
    is written again.
    """

    def __init__(self, cache: _Cache, b: int) -> None:
        self.cache = cache
        self.b = b
        self.rows = cache.size
        self.old_death: dict[int, int] = {}
        self.occupant: dict[int, int] = {}  # row -> column of its new entry
        self.new: list[int] = []  # block position of each new entry (its column)
        self.death: list[int] = []

    def insert(self, t: int, c: int, h: float) -> None:
        written = self.cache.insert(c, h)
        if written is None:
            return
        row, evicted = written
        before = self.occupant.get(row)
        if before is not None:
            self.death[before] = t
        elif evicted:
            self.old_death[row] = t
        self.occupant[row] = len(self.new)
        self.new.append(t)
        self.death.append(self.b)

    def column(self, row: int) -> tuple[bool, int]:
        """Where the entry now in ``row`` is scored: (new?, its column among new or old)."""
        col = self.occupant.get(row)
        return (True, col) if col is not None else (False, row)

    def alive(self, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Masks [b, rows] of old and [b, n] of new entries alive at each step; the block
        positions [n] of the new entries."""
        dev = like.device
        steps = torch.arange(self.b, device=dev).unsqueeze(1)
        death = torch.full((self.rows,), self.b, device=dev)
        if self.old_death:
            rows = torch.tensor(list(self.old_death), device=dev)
            death[rows] = torch.tensor(list(self.old_death.values()), device=dev)
        src = torch.tensor(self.new, dtype=torch.int64, device=dev)
        new = (src <= steps) & (steps < torch.tensor(self.death, dtype=torch.int64, device=dev))
        return steps < death, new, src

    def commit(self, chunk: TDAInputs) -> None:
        """Store the final occupant of every row written in the block."""
        if not self.occupant:
            return
        dev = chunk.query.device
        rows = torch.tensor(list(self.occupant), device=dev)
        src = torch.tensor([self.new[col] for col in self.occupant.values()], device=dev)
        self.cache.keys[rows] = chunk.query[src]
        self.cache.classes[rows] = chunk.label[src]
        if self.cache.values is not None:
            self.cache.values[rows] = chunk.neg_mask[src].to(self.cache.values.dtype)


def _affinity(query: Tensor, keys: Tensor, beta: float, alive: Tensor) -> Tensor:
    """phi = exp(-beta (1 - q^T k)) for every (query, key), zero where the key is not alive."""
    a = query @ keys.T
    return a.sub_(1).mul_(beta).exp_().mul_(alive)


class TDAState:
    """TDA's caches along one stream; ``step`` takes the next images in stream order."""

    def __init__(self, classifier: Tensor, scale: float, config: TDAConfig = TDAConfig()) -> None:
        self.classifier = classifier
        self.scale = scale
        self.config = config
        c = classifier.shape[0]
        self.num_classes = c
        self.pos = _Cache(c, config.capacity, classifier, fifo=False, values=False)
        self.neg = (
            _Cache(c, config.capacity_neg, classifier, fifo=config.fifo_negative, values=True)
            if config.negative
            else None
        )
        self.images = 0
        # cache entries each image was scored against, summed over images (GEMM sizes)
        self.scored = {"positive": 0, "negative": 0}

    def step(self, chunk: TDAInputs) -> PeerOutput:
        """Adapt to and score the next images of the stream, in order ([b] of each field)."""
        logits = self._step(chunk, None)
        return PeerOutput(scores=logits, probs=torch.softmax(logits, dim=-1))

    def _step(self, chunk: TDAInputs, boosted: _Boost | None) -> Tensor:
        cfg = self.config
        b = chunk.label.shape[0]
        labels = chunk.label.tolist()
        ents = chunk.entropy.tolist()
        norm = math.log2(self.num_classes)
        lo, hi = cfg.entropy_bounds
        pos = _Block(self.pos, b)
        neg = _Block(self.neg, b) if self.neg is not None else None
        for t in range(b):
            c, h = labels[t], ents[t]
            pos.insert(t, c, h)
            if neg is not None and lo < h / norm < hi:
                neg.insert(t, c, h)
            if boosted is not None:
                boosted.boost(t, pos)
            self.scored["positive"] += self.pos.size
            self.scored["negative"] += self.neg.size if self.neg is not None else 0
        self.images += b

        q = chunk.query
        logits = self.scale * (q @ self.classifier.T)
        old, new, src = pos.alive(q)
        if boosted is not None:
            boosted.drop(old, new)
        keys = self.pos.keys[: pos.rows]
        positive = torch.zeros_like(logits)
        positive.index_add_(1, self.pos.classes[: pos.rows], _affinity(q, keys, cfg.beta, old))
        positive.index_add_(1, chunk.label[src], _affinity(q, q[src], cfg.beta, new))
        if boosted is not None:
            boosted.add(positive, q, cfg.beta)
        logits.add_(positive, alpha=cfg.alpha)
        if neg is not None and self.neg is not None and self.neg.values is not None:
            old, new, src = neg.alive(q)
            phi = _affinity(q, self.neg.keys[: neg.rows], cfg.beta_neg, old)
            negative = phi @ self.neg.values[: neg.rows]
            phi = _affinity(q, q[src], cfg.beta_neg, new)
            negative.addmm_(phi, chunk.neg_mask[src].to(q.dtype))
            logits.sub_(negative, alpha=cfg.alpha_neg)
            neg.commit(chunk)
        pos.commit(chunk)
        return logits


class _Boost:
    """The boosted copies of the positive cache for one block (BoostAdapter)."""

    def __init__(self, views: BoostViews, capacity: int) -> None:
        self.views = views
        self.capacity = capacity
        self.labels = views.label.tolist()
        self.ents = views.entropy.tolist()
        self.dropped_old: list[tuple[int, int]] = []
        self.dropped_new: list[tuple[int, int]] = []
        b, k = views.label.shape
        self.kept = [[False] * k for _ in range(b)]
        self.count = 0

    def boost(self, t: int, pos: _Block) -> None:
        """Insert image t's views into a copy of the positive cache (sort, keep the lowest)."""
        copies: dict[int, list[tuple[float, tuple[bool, int] | int]]] = {}
        for i, (c, h) in enumerate(zip(self.labels[t], self.ents[t], strict=True)):
            entries = copies.get(c)
            if entries is None:
                entries = copies[c] = [(e, pos.column(row)) for e, row in pos.cache.lists[c]]
            entries.append((h, i))
            entries.sort(key=_first)
            del entries[self.capacity :]
        for c, entries in copies.items():
            kept = {ref for _, ref in entries}
            for _, row in pos.cache.lists[c]:
                new, col = pos.column(row)
                if (new, col) not in kept:
                    (self.dropped_new if new else self.dropped_old).append((t, col))
            for ref in kept:
                if isinstance(ref, int):
                    self.kept[t][ref] = True
            self.count += len(entries) - len(pos.cache.lists[c])

    def drop(self, old: Tensor, new: Tensor) -> None:
        """Mask the cache entries the boosted views pushed out of each image's copy."""
        for mask, dropped in ((old, self.dropped_old), (new, self.dropped_new)):
            if dropped:
                t, col = torch.tensor(dropped, device=mask.device).unbind(1)
                mask[t, col] = False

    def add(self, positive: Tensor, q: Tensor, beta: float) -> None:
        """Add the kept views' phi to the positive term [b, C]."""
        kept = torch.tensor(self.kept, dtype=torch.bool, device=q.device)
        a = torch.bmm(self.views.views, q.unsqueeze(2))[..., 0]
        positive.scatter_add_(1, self.views.label, a.sub_(1).mul_(beta).exp_().mul_(kept))


class BoostState(TDAState):
    """BoostAdapter's caches along one stream; ``step`` takes the next images in stream order."""

    def __init__(self, classifier: Tensor, scale: float, config: BoostConfig = BoostConfig()):
        super().__init__(classifier, scale, config.cache)
        self.delta = config.delta

    def step(self, chunk: TDAInputs, views: BoostViews) -> PeerOutput:  # type: ignore[override]
        """Adapt to and score the next images of the stream, in order."""
        boosted = _Boost(views, self.config.capacity + self.delta)
        logits = self._step(chunk, boosted)
        self.scored["positive"] += boosted.count
        return PeerOutput(scores=logits, probs=torch.softmax(logits, dim=-1))


def tda(
    inputs: TDAInputs,
    order: Tensor,
    classifier: Tensor,
    scale: float,
    config: TDAConfig = TDAConfig(),
    block: int = 256,
) -> PeerOutput:
    """TDA over one stream: ``order`` [n] lists dataset indices in stream order.

    Returns the final logits and their softmax, [n, C] in dataset order.
    """
    state = TDAState(classifier, scale, config)
    return run_stream(state.step, order, inputs, block=block)


def boost(
    inputs: TDAInputs,
    views: BoostViews,
    order: Tensor,
    classifier: Tensor,
    scale: float,
    config: BoostConfig = BoostConfig(),
    block: int = 256,
) -> PeerOutput:
    """BoostAdapter over one stream; outputs [n, C] in dataset order (logits, softmax)."""
    state = BoostState(classifier, scale, config)
    return run_stream(state.step, order, inputs, views, block=block)
