r"""The RA-TTA method as pure batched tensor functions (no I/O, no global state).

Symbols follow ``docs``/method.md: a batch of B test images, each with V+1 embeddings
x_0 (center crop) and x_1..x_V (random views) of dimension d; a zero-shot classifier
W [C, d]; M description embeddings T [M, d] owned by classes k(m); logit scale s.
All inputs are expected L2-normalised (the file layer checks this).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from ratta.config import RATTAConfig
from ratta.sinkhorn import sinkhorn_knopp

# Size (elements) of the [b, V+1, M] similarity block scored at once on a CPU: small enough
# to stay in cache between the GEMM and the reductions (measured fastest at ~8 MB on 2 cores).
_SCORE_BLOCK = 1 << 21
# On a GPU, blocks of 128 MB (float32): several images per block even for ImageNet-sized
# description sets (M = 50k at V = 100: 6 images, a [606, d] x [d, 50k] product), and a
# working set of ~0.4 GB with the quantiles' selections.
_DEVICE_SCORE_BLOCK = 1 << 25


@dataclass(frozen=True)
class Blocking:
    """How the engine cuts a batch's work on a kind of device; it never changes a result.

    Attributes:
        score_elements: size of a [b, V+1, M] similarity block of the description scoring.
        prune: compute description quantiles only where they can reach the top K_D (exact,
            see :func:`top_description_scores`), at the price of a host synchronisation per
            block to gather them: right for CPUs. Without, every quantile is computed and
            scoring never waits for the device: right for GPUs.
        ot_sync_every: Sinkhorn iterations between the host's looks at convergence.
    """

    score_elements: int = _SCORE_BLOCK
    prune: bool = True
    ot_sync_every: int = 10

    @classmethod
    def for_device(cls, device: torch.device) -> Blocking:
        if device.type == "cuda":
            return cls(score_elements=_DEVICE_SCORE_BLOCK, prune=False, ot_sync_every=20)
        return cls()


class Retriever(Protocol):
    """Nearest-neighbour search over an image database in L2 distance."""

    @property
    def size(self) -> int: ...

    def search(self, queries: Tensor, k: int) -> Tensor:
        """Indices [Q, min(k, size)] of the nearest rows, nearest first."""
        ...

    def gather(self, ids: Tensor, like: Tensor) -> Tensor:
        """Rows [Q, k, d] for ``ids``, with the dtype and device of ``like``."""
        ...


Timer = Callable[[str], ContextManager[object]]


def _no_timer(_: str) -> ContextManager[object]:
    return contextlib.nullcontext()


@dataclass
class Candidates:
    """Surviving classes of each image (at most S = K_D // min_desc), in ascending class order.

    Attributes:
        classes: [B, S] class ids, -1 where the slot is empty.
        valid: [B, S] bool, slot holds a surviving class.
        top_ids: [B, K] indices of the K_D top-scoring description rows.
        top_slot: [B, K] slot of each top description's class, -1 if its class did not survive.
    """

    classes: Tensor
    valid: Tensor
    top_ids: Tensor
    top_slot: Tensor


@dataclass
class BatchResult:
    """Per-image outputs of RA-TTA for one batch.

    ``retrieval`` equals ``zero_shot`` for an image where no class survives (the reference
    code's fallback); ``lam`` is then 1. Candidate slots are padded with class -1,
    relevance 0 and distance NaN.

    What the predictions rest on: ``retrieved`` [B, S, K'] the database rows of each
    candidate set, nearest first (K' = min(K_S, database rows); -1 in empty slots);
    ``top_descriptions`` [B, K] the K = min(K_D, M) top-scoring description rows in
    ascending row order, ``top_description_scores`` [B, K] their scores.
    """

    zero_shot: Tensor
    retrieval: Tensor
    final: Tensor
    candidates: Tensor
    relevance: Tensor
    ot_distance: Tensor
    lam: Tensor
    entropy_zero_shot: Tensor
    entropy_retrieval: Tensor
    retrieved: Tensor
    top_descriptions: Tensor
    top_description_scores: Tensor


def zero_shot(x0: Tensor, classifier: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    r"""CuPL zero-shot prediction p0 = softmax(s x_0 W^T) [B, C] and its entropy H0 [B]."""
    logits = scale * (x0 @ classifier.T)
    log_p = torch.log_softmax(logits, dim=-1)
    p0 = log_p.exp()
    return p0, -(p0 * log_p).sum(-1)


def quantile_last(x: Tensor, q: float) -> Tensor:
    r"""q-quantile over the last dim with linear interpolation (``torch.quantile`` semantics).

    With the sorted values s_0 <= ... <= s_{n-1} and h = q (n - 1), the result is
    s_{\lfloor h \rfloor} + (h - \lfloor h \rfloor)(s_{\lceil h \rceil} - s_{\lfloor h \rfloor}).
    Computed with a partial selection (top-k) instead of a full sort.
    """
    n = x.shape[-1]
    h = q * (n - 1)
    lo = min(int(h), n - 1)
    frac = h - lo
    if lo >= n // 2:  # select the n - lo largest; their minimum is s_lo
        top = x.topk(n - lo, dim=-1, sorted=False).values
        if frac == 0.0 or n - lo < 2:
            return top.amin(-1)
        two = top.topk(2, dim=-1, largest=False).values
    else:  # select the lo + 2 smallest; the largest two are s_lo, s_lo+1
        if frac == 0.0:
            return x.topk(lo + 1, dim=-1, largest=False, sorted=False).values.amax(-1)
        two = x.topk(lo + 2, dim=-1, largest=False, sorted=True).values[..., -2:]
    return torch.lerp(two[..., 0], two[..., 1], frac)


def _similarities(x: Tensor, desc: Tensor) -> Tensor:
    """<x_i, T_m> as [b, V+1, M], one flat GEMM over all embeddings of the chunk."""
    b, n, d = x.shape
    return (x.reshape(b * n, d) @ desc.T).view(b, n, desc.shape[0])


def _chunks(x: Tensor, m: int, elements: int = _SCORE_BLOCK) -> range:
    return range(0, x.shape[0], max(1, elements // max(1, m * x.shape[1])))


def description_scores(x: Tensor, desc: Tensor, q: float, block: int = _SCORE_BLOCK) -> Tensor:
    r"""score_m = quantile_q({<x_i, T_m> : i = 0..V}) for every image and description [B, M].

    Args:
        x: [B, V+1, d] test embeddings (x_0 first).
        desc: [M, d] description embeddings T.
        block: elements of a [b, V+1, M] similarity block (speed only).
    """
    m = desc.shape[0]
    out = torch.empty(x.shape[0], m, dtype=x.dtype, device=x.device)
    chunks = _chunks(x, m, block)
    for start in chunks:
        sims = _similarities(x[start : start + chunks.step], desc)
        out[start : start + chunks.step] = quantile_last(sims.transpose(1, 2), q)
    return out


def top_description_scores(
    x: Tensor, desc: Tensor, q: float, k: int, blocking: Blocking | None = None
) -> Tensor:
    r"""The scores of :func:`description_scores` wherever they can reach the top k, else -inf.

    Exact pruning: the q-quantile of a description is at most its maximum over the V+1
    embeddings, ub_m = max_i <x_i, T_m>. Exact quantiles of the 2k descriptions with the
    largest ub_m give tau, a lower bound of the true k-th largest score; a description with
    ub_m < tau scores strictly below every top-k score, so only descriptions with
    ub_m >= tau need their quantile. The top k (ties included) are those of the full scores.
    With ``blocking.prune`` off, every score is computed (:func:`description_scores`).
    """
    blocking = blocking or Blocking.for_device(x.device)
    if not blocking.prune:
        return description_scores(x, desc, q, blocking.score_elements)
    bsz = x.shape[0]
    m = desc.shape[0]
    out = torch.full((bsz, m), float("-inf"), dtype=x.dtype, device=x.device)
    chunks = _chunks(x, m, blocking.score_elements)
    step = chunks.step
    probe = min(m, 2 * k)
    for start in chunks:
        sims = _similarities(x[start : start + step], desc)  # [b, V+1, M]
        b, n, _ = sims.shape
        upper = sims.amax(1)
        idx = upper.topk(probe, dim=1).indices
        probed = quantile_last(sims.gather(2, idx.unsqueeze(1).expand(b, n, probe)).mT, q)
        tau = probed.topk(min(k, probe), dim=1).values[:, -1:]
        rows, cols = (upper >= tau).nonzero(as_tuple=True)
        out[start + rows, cols] = quantile_last(sims[rows, :, cols], q)
    return out


def top_k_stable(scores: Tensor, k: int) -> Tensor:
    """Indices [B, k] of the k largest scores per row, ties broken by the lower index.

    The result is in ascending index order (only set membership matters downstream).
    Exactly k entries of each row are taken, so their positions are scattered into place
    without asking the device how many there are.
    """
    kth = scores.topk(k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    room = k - above.sum(1, keepdim=True)
    take = above | (tied & (tied.cumsum(1) <= room))
    return _compact(take, k)


def _compact(mask: Tensor, width: int) -> Tensor:
    """Column ids of the True entries of each row of ``mask`` [B, n], in ascending order, in
    a [B, width] tensor padded with -1 (every row holds at most ``width`` True entries).

    A scatter to precomputed positions: no host synchronisation, unlike ``nonzero``; the
    False entries all land in one extra column, which is dropped.
    """
    bsz, n = mask.shape
    pos = torch.where(mask, mask.cumsum(1) - 1, width)
    cols = torch.arange(n, device=mask.device).expand(bsz, n)
    out = torch.full((bsz, width + 1), -1, dtype=torch.int64, device=mask.device)
    return out.scatter_(1, pos, cols)[:, :width]


def select_candidates(
    scores: Tensor, desc_class: Tensor, num_classes: int, k_d: int, min_desc: int
) -> Candidates:
    """Keep the K_D best descriptions; a class survives if it owns >= min_desc of them."""
    bsz, m = scores.shape
    k = min(k_d, m)
    top_ids = top_k_stable(scores, k)
    top_cls = desc_class[top_ids]
    counts = torch.zeros(bsz, num_classes, dtype=torch.int64, device=scores.device)
    counts.scatter_add_(1, top_cls, torch.ones_like(top_cls))
    survive = counts >= min_desc
    # at most floor(K / min_desc) classes can own min_desc of the K top rows, and at most C
    # exist: a huge K_D must not allocate slots no class can fill
    slots = max(1, min(k // min_desc, num_classes))
    slot_of = survive.cumsum(1) - 1  # position of each surviving class within its row
    classes = _compact(survive, slots)
    top_slot = torch.where(survive.gather(1, top_cls), slot_of.gather(1, top_cls), -1)
    return Candidates(classes=classes, valid=classes >= 0, top_ids=top_ids, top_slot=top_slot)


def prototypes(desc: Tensor, cand: Candidates) -> tuple[Tensor, Tensor]:
    r"""Set prototypes t_c [B, S, d] and global prototype t* [B, d].

    t_c is the normalised mean of the selected rows of class c; t* of all surviving selected
    rows. Empty slots (and images without survivors) hold zero vectors.

    The rows are added in top-description order, one step per description: the same sums,
    bit for bit, on every run and device kind, where an ``index_add_`` would add them in
    the order of a GPU's atomics.
    """
    bsz, slots = cand.classes.shape
    rows = desc[cand.top_ids]  # [B, K, d]
    slot_ids = torch.arange(slots, device=desc.device)
    sums = torch.zeros(bsz, slots, desc.shape[1], dtype=desc.dtype, device=desc.device)
    for j in range(rows.shape[1]):
        hit = (cand.top_slot[:, j, None] == slot_ids).unsqueeze(2)  # [B, S, 1]
        sums += torch.where(hit, rows[:, j, None], 0.0)
    return F.normalize(sums, dim=-1), F.normalize(sums.sum(1), dim=-1)


def set_distances(
    x: Tensor,
    global_proto: Tensor,
    set_protos: Tensor,
    valid: Tensor,
    retrieved: Tensor,
    scale: float,
    config: RATTAConfig,
    *,
    sets: Tensor | None = None,
    sync_every: int = 10,
) -> Tensor:
    r"""OT distance d_c between the test embeddings and each retrieved set [Q].

    For set c of image b, with x_i (i = 0..V) and retrieved r_j (j = 1..K_S):
    C_ij = |<x_i, t_c> - <r_j, t_c>|, a = softmax_i(s <x_i, t*>), b = softmax_j(s <r_j, t_c>),
    d_c = sum_ij P_ij C_ij with P = sinkhorn(a, b, C, reg).

    Args:
        x: [B, V+1, d]; global_proto: [B, d]; set_protos: [B, S, d]; valid: [B, S];
        retrieved: [Q, K, d] for the Q valid slots in row-major (image, slot) order.
        sets: the flat (image * S + slot) indices of the valid slots, if already known.
        sync_every: Sinkhorn iterations between the host's looks at convergence.
    """
    if sets is None:
        sets = valid.flatten().nonzero().squeeze(1)
    owner = sets // valid.shape[1]
    x_t = torch.bmm(x, set_protos.transpose(1, 2)).transpose(1, 2).flatten(0, 1)[sets]  # [Q, V+1]
    src = torch.softmax(scale * torch.bmm(x, global_proto.unsqueeze(2)).squeeze(2), dim=1)
    r_t = torch.bmm(retrieved, set_protos.flatten(0, 1)[sets].unsqueeze(2)).squeeze(2)  # [Q, K]
    tgt = torch.softmax(scale * r_t, dim=1)
    cost = (x_t.unsqueeze(2) - r_t.unsqueeze(1)).abs()
    plan, _ = sinkhorn_knopp(
        src[owner],
        tgt,
        cost,
        config.ot_reg,
        config.ot_max_iter,
        config.ot_stop_thr,
        sync_every=sync_every,
    )
    return (plan * cost).sum((1, 2))


def ensemble(
    p0: Tensor,
    h0: Tensor,
    cand: Candidates,
    distances: Tensor,
    scale: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    r"""Relevance, retrieval prediction and the entropy-weighted ensemble.

    rel = softmax_c(s / (1 + d_c)); p_ret = sum_c rel_c onehot(c);
    H_ret = -sum p_ret log(p_ret + eps); lam = e^{1/(1+H0)} / (e^{1/(1+H0)} + e^{1/(1+H_ret)});
    p = lam p0 + (1 - lam) p_ret. Images without survivors get p_ret = p0 and lam = 1.

    Args:
        distances: [B, S] d_c of each slot, NaN where the slot is empty.

    Returns: relevance [B, S], p_ret [B, C], H_ret [B], lam [B], p [B, C].
    """
    bsz, num_classes = p0.shape
    logits = torch.where(cand.valid, scale / (1.0 + distances), float("-inf"))
    adapted = cand.valid.any(1)
    rel = torch.softmax(logits, dim=1).nan_to_num(0.0)
    # the classes of a row are distinct: a plain scatter (no atomic sums); empty slots,
    # with relevance 0, all go to an extra column that is dropped
    cols = torch.where(cand.valid, cand.classes, num_classes)
    p_ret = p0.new_zeros(bsz, num_classes + 1).scatter_(1, cols, rel)[:, :num_classes]
    h_ret = -(p_ret * torch.log(p_ret + eps)).sum(1)
    w0 = torch.exp(1.0 / (1.0 + h0))
    wr = torch.exp(1.0 / (1.0 + h_ret))
    lam = torch.where(adapted, w0 / (w0 + wr), torch.ones_like(w0))
    p_ret = torch.where(adapted.unsqueeze(1), p_ret, p0)
    final = lam.unsqueeze(1) * p0 + (1.0 - lam.unsqueeze(1)) * p_ret
    h_ret = torch.where(adapted, h_ret, h0)
    return rel, p_ret, h_ret, lam, final


def ratta_batch(
    x: Tensor,
    classifier: Tensor,
    desc: Tensor,
    desc_class: Tensor,
    scale: float,
    retriever: Retriever,
    config: RATTAConfig,
    timer: Timer = _no_timer,
    blocking: Blocking | None = None,
) -> BatchResult:
    """RA-TTA for a batch of test images (method.md steps 1-9).

    Args:
        x: [B, V+1, d] test embeddings, x[:, 0] the center crop, x[:, 1:] the views.
        classifier: [C, d] zero-shot classifier W.
        desc: [M, d] description embeddings T; desc_class: [M] owner class (int64).
        scale: logit scale s (e.g. 100).
        retriever: L2 nearest-neighbour search over the database; all set prototypes of
            the batch go to it in one ``search`` call.
        timer: optional ``timer(stage)`` context manager to measure the stages.
        blocking: how to cut the work (default: :meth:`Blocking.for_device` of ``x``).

    On a GPU the host waits for the device once to learn the number Q of candidate sets
    (the size of the search), and a few times in optimal transport (``ot_sync_every``).
    """
    blocking = blocking or Blocking.for_device(x.device)
    num_classes = classifier.shape[0]
    with timer("zero_shot"):
        p0, h0 = zero_shot(x[:, 0], classifier, scale)
    with timer("scoring"):
        k = min(config.k_d, desc.shape[0])
        scores = top_description_scores(x, desc, config.quantile, k, blocking)
    with timer("candidates"):
        cand = select_candidates(scores, desc_class, num_classes, config.k_d, config.min_desc)
        set_protos, global_proto = prototypes(desc, cand)
        sets = cand.valid.flatten().nonzero().squeeze(1)
    distances = torch.full((cand.valid.numel(),), float("nan"), dtype=x.dtype, device=x.device)
    found_ids = torch.full(
        (cand.valid.numel(), min(config.k_s, retriever.size)),
        -1,
        dtype=torch.int64,
        device=x.device,
    )
    if sets.numel():
        with timer("search"):
            ids = retriever.search(set_protos.flatten(0, 1)[sets], config.k_s)
            retrieved = retriever.gather(ids, like=x)
            found_ids.index_copy_(0, sets, ids.to(x.device))
        with timer("ot"):
            found = set_distances(
                x,
                global_proto,
                set_protos,
                cand.valid,
                retrieved,
                scale,
                config,
                sets=sets,
                sync_every=blocking.ot_sync_every,
            )
            distances.index_copy_(0, sets, found)
    distances = distances.view(cand.valid.shape)
    with timer("ensemble"):
        rel, p_ret, h_ret, lam, final = ensemble(p0, h0, cand, distances, scale, config.entropy_eps)
    return BatchResult(
        zero_shot=p0,
        retrieval=p_ret,
        final=final,
        candidates=cand.classes,
        relevance=rel,
        ot_distance=distances,
        lam=lam,
        entropy_zero_shot=h0,
        entropy_retrieval=h_ret,
        retrieved=found_ids.view(*cand.valid.shape, -1),
        top_descriptions=cand.top_ids,
        top_description_scores=scores.gather(1, cand.top_ids),
    )
