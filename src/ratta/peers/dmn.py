r"""DMN-ZS (Zhang et al., CVPR 2024): the training-free dynamic memory of past test images.

Official code: YBZh/DMN @c6c218c, ``dmn_main.py`` (``DualMem.update_memory_bank``,
``get_image_pred``, ``direct_inference``), ``clip/fix_clip.py``, ``scripts/run.sh``.

Per image, in stream order, with the N = 32 inputs z_i:
- pseudo-label: the 3 = floor(0.1 N) inputs of lowest entropy -sum p log(p + 1e-6) give the
  mean probability pbar; y = argmax pbar, H = -sum pbar log(pbar + 1e-8);
- write (before the read): z_0 goes to class y's memory of ``memory`` slots: appended if
  there is room, else it replaces the highest-entropy slot if H is lower;
- read: for every class c, the keys k are its stored features and its text feature t_c
  (all L2-normalised), w_k = exp(-beta (1 - q^T k)) with q = normalise(z_0),
  m_c = normalise(sum_k w_k k), p_mem = softmax(s [m_c^T z_0]_c);
- output p(z_0) + gamma p_mem (probabilities for ECE: that sum / (1 + gamma)).

Engine: m_c^T q = (sum_k w_k k^T q) / sqrt(w^T G_c w) with G_c the Gram matrix of class c's
keys, kept up to date as slots are written; so a block of stream images costs one GEMM of
its queries against the memory (plus the entries written inside the block) and small
per-class quadratic forms, with every entry masked by its lifetime.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ratta.peers.common import PeerOutput, gather_inputs, run_stream, view_logits


@dataclass(frozen=True)
class DMNConfig:
    """DMN-ZS's settings (``scripts/run.sh``, ``dmn_main.py``).

    Attributes:
        inputs: N, the centre crop plus the first N - 1 views (the official batch size 32).
        select: fraction of the N inputs averaged into the pseudo-label (``selection_p``).
        memory: slots per class.
        beta: sharpness of the memory read.
        gamma: weight of the memory prediction. The paper searches it on the test labels;
            1.0 is TTA-VLM's fixed choice.
    """

    inputs: int = 32
    select: float = 0.1
    memory: int = 50
    beta: float = 5.5
    gamma: float = 1.0


@dataclass
class DMNInputs:
    """Per-image, stream-independent inputs of DMN-ZS (dataset order).

    Attributes:
        query: [n, d] z_0 as given; label: [n] pseudo-label y; entropy: [n] H of pbar.
    """

    query: Tensor
    label: Tensor
    entropy: Tensor


def dmn_inputs(
    x: Tensor,
    classifier: Tensor,
    scale: float,
    config: DMNConfig = DMNConfig(),
    logits: Tensor | None = None,
) -> DMNInputs:
    """Pseudo-label and its entropy of a batch of images, from their first N inputs."""
    n = config.inputs
    logit = view_logits(x[:, :n], classifier, scale) if logits is None else logits[:, :n]
    p = torch.softmax(logit, dim=-1)
    h = -(p * torch.log(p + 1e-6)).sum(-1)
    k = int(p.shape[1] * config.select)
    idx = torch.argsort(h, dim=1, stable=True)[:, :k]
    mean = gather_inputs(p, idx).mean(1)
    return DMNInputs(
        query=x[:, 0],
        label=mean.argmax(-1),
        entropy=-(mean * torch.log(mean + 1e-8)).sum(-1),
    )


class DMNState:
    """DMN-ZS's memory along one stream; ``step`` takes the next images in stream order.

    Slot 0 of class c holds its text feature t_c, slots 1..memory the written features;
    ``gram`` [C, memory + 1, memory + 1] holds the keys' inner products per class.
    """

    def __init__(self, classifier: Tensor, scale: float, config: DMNConfig = DMNConfig()):
        self.classifier = classifier
        self.scale = scale
        self.config = config
        c, d = classifier.shape
        self.keys = classifier.new_zeros(c, config.memory + 1, d)
        self.keys[:, 0] = F.normalize(classifier, dim=-1)
        self.gram = classifier.new_zeros(c, config.memory + 1, config.memory + 1)
        self.gram[:, 0, 0] = (self.keys[:, 0] ** 2).sum(-1)
        self.ents: list[list[float]] = [[] for _ in range(c)]
        self.images = 0
        self.entries = 0  # keys scored, summed over images (the floor's GEMM sizes)
        self.stored = 0

    def _write(self, c: int, h: float) -> int | None:
        """The slot z_0 of class c and entropy h goes to, or None."""
        ents = self.ents[c]
        if len(ents) < self.config.memory:
            ents.append(h)
            self.stored += 1
            return len(ents)
        worst = max(ents)
        if h < worst:
            i = len(ents) - 1 - ents[::-1].index(worst)  # the last slot of the largest entropy
            ents[i] = h
            return i + 1
        return None

    def step(self, chunk: DMNInputs) -> PeerOutput:
        """Adapt to and score the next images of the stream, in order ([b] of each field)."""
        cfg = self.config
        b = chunk.label.shape[0]
        dev = chunk.query.device
        norm = torch.linalg.vector_norm(chunk.query, dim=-1)
        q = chunk.query / norm.unsqueeze(1)
        p0 = torch.softmax(self.scale * (chunk.query @ self.classifier.T), dim=-1)
        counts = [len(e) for e in self.ents]
        m = 1 + max(counts)
        writes: list[tuple[int, int, int]] = []  # (step, class, slot)
        for t, (c, h) in enumerate(zip(chunk.label.tolist(), chunk.entropy.tolist(), strict=True)):
            slot = self._write(c, h)
            if slot is not None:
                writes.append((t, c, slot))
            self.entries += self.stored + len(self.ents)
        self.images += b

        # entries present at the block start: slots < m, dead from their first overwrite
        death = torch.full((len(counts), m), b, device=dev)
        filled = torch.arange(m, device=dev) <= torch.tensor(counts, device=dev).unsqueeze(1)
        first: dict[tuple[int, int], int] = {}
        for t, c, slot in writes:
            first.setdefault((c, slot), t)
        old = [(c, s, t) for (c, s), t in first.items() if s < m and filled[c, s]]
        if old:
            c_, s_, t_ = torch.tensor(old, device=dev).unbind(1)
            death[c_, s_] = t_
        keys, gram = self.keys[:, :m], self.gram[:, :m, :m]
        a = torch.bmm(keys, q.T.unsqueeze(0).expand(keys.shape[0], -1, -1))  # [C, m, b]
        steps = torch.arange(b, device=dev)
        w = _weight(a, cfg.beta, filled.unsqueeze(2) & (steps < death.unsqueeze(2)))
        num = (w * a).sum(1)  # [C, b]
        quad = (torch.bmm(gram, w) * w).sum(1)
        if writes:
            self._add_new(writes, q, w, num, quad)
        score = num / quad.sqrt() * norm  # the official scores the un-renormalised z_0
        p_mem = torch.softmax(self.scale * score.T, dim=-1)
        self._commit(writes, q)
        out = p0 + cfg.gamma * p_mem
        return PeerOutput(scores=out, probs=out / (1 + cfg.gamma))

    def _add_new(
        self, writes: list[tuple[int, int, int]], q: Tensor, w_old: Tensor, num: Tensor,
        quad: Tensor,
    ) -> None:
        """Add the entries written inside the block (alive from their step to their overwrite)."""
        b = q.shape[0]
        dev = q.device
        t_w, c_w, _ = torch.tensor(writes, device=dev).unbind(1)
        death = [b] * len(writes)
        last: dict[tuple[int, int], int] = {}
        for j, (t, c, slot) in enumerate(writes):
            if (c, slot) in last:
                death[last[(c, slot)]] = t
            last[(c, slot)] = j
        steps = torch.arange(b, device=dev)
        alive = (t_w.unsqueeze(1) <= steps) & (steps < torch.tensor(death, device=dev).unsqueeze(1))
        k_new = q[t_w]  # [n_w, d]
        a = k_new @ q.T  # [n_w, b]
        w = _weight(a, self.config.beta, alive)
        num.index_add_(0, c_w, w * a)
        m = w_old.shape[1]
        g_cross = torch.bmm(self.keys[c_w, :m], k_new.unsqueeze(2))  # [n_w, m, 1]
        cross = (g_cross * w_old[c_w]).sum(1)  # [n_w, b]
        same = c_w.unsqueeze(1) == c_w.unsqueeze(0)
        g_new = (k_new @ k_new.T) * same
        quad.index_add_(0, c_w, w * (2 * cross + g_new @ w))

    def _commit(self, writes: list[tuple[int, int, int]], q: Tensor) -> None:
        """Store the final occupant of every written slot and refresh its Gram row/column."""
        if not writes:
            return
        final = {(c, slot): t for t, c, slot in writes}
        rows_ = [(c, s, t) for (c, s), t in final.items()]
        c_, s_, t_ = torch.tensor(rows_, device=q.device).unbind(1)
        self.keys[c_, s_] = q[t_]
        rows = torch.bmm(self.keys[c_], self.keys[c_, s_].unsqueeze(2))[..., 0]  # [n, slots]
        self.gram[c_, s_] = rows
        self.gram[c_, :, s_] = rows


def _weight(a: Tensor, beta: float, alive: Tensor) -> Tensor:
    """w = exp(-beta (1 - a)) where the key is alive, else 0."""
    return (a - 1).mul_(beta).exp_().mul_(alive)


def dmn(
    inputs: DMNInputs,
    order: Tensor,
    classifier: Tensor,
    scale: float,
    config: DMNConfig = DMNConfig(),
    block: int = 128,
) -> PeerOutput:
    """DMN-ZS over one stream: ``order`` [n] lists dataset indices in stream order.

    Returns p(z_0) + gamma p_mem and its normalisation, [n, C] in dataset order.
    """
    state = DMNState(classifier, scale, config)
    return run_stream(state.step, order, inputs, block=block)
