r"""DMN-ZS (Zhang et al., CVPR 2024): the training-free dynamic memory of past test images.

Official code: YBZh/DMN @c6c218c, ``dmn_main.py`` (``DualMem.update_memory_bank``,
``get_image_pred``, ``direct_inference``), ``clip/fix_clip.py``, ``scripts/run.sh``.

Per image, in stream order, with the N = 32 inputs z_i:
- pseudo-label: the 3 = floor(0.1 N) inputs (at least one) of lowest entropy
  -sum p log(p + 1e-6) give the mean probability pbar; y = argmax pbar,
  H = -sum pbar log(pbar + 1e-8);
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

from ratta.peers.common import PeerOutput, first_logits, gather_inputs, run_stream


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
    logit = first_logits(x, classifier, scale, n, logits)
    p = torch.softmax(logit, dim=-1)
    h = -p.add(1e-6).log_().mul_(p).sum(-1)  # -sum p log(p + 1e-6)
    k = max(1, int(p.shape[1] * config.select))  # at least one input when N < 10
    idx = torch.argsort(h, dim=1, stable=True)[:, :k]
    mean = gather_inputs(p, idx).mean(1)
    return DMNInputs(
        query=x[:, 0].clone(),  # not a view: it would keep the whole batch alive
        label=mean.argmax(-1),
        entropy=-(mean * torch.log(mean + 1e-8)).sum(-1),
    )


class DMNState:
    """DMN-ZS's memory along one stream; ``step`` takes the next images in stream order.

    Keys live in rows: 0..C-1 the text features t_c, then each memory slot's row from its
    first write on (kept when it is rewritten), so rows 0..rows-1 are exactly the keys;
    the last row stays zero. Per class, slot 0 is t_c and slots 1..memory the written
    features: ``slot_row`` [C, memory + 1] maps slots to rows (empty slots to the zero row)
    and ``gram`` [C, memory + 1, memory + 1] holds the inner products of a class's slots.
    """

    def __init__(self, classifier: Tensor, scale: float, config: DMNConfig = DMNConfig()):
        self.classifier = classifier
        self.scale = scale
        self.config = config
        c, d = classifier.shape
        slots = config.memory + 1
        self.zero_row = c * slots
        self.keys = classifier.new_zeros(self.zero_row + 1, d)
        self.keys[:c] = F.normalize(classifier, dim=-1)
        self.row_class = torch.arange(self.zero_row + 1, device=classifier.device) % c
        self.slot_row = torch.full((c, slots), self.zero_row, device=classifier.device)
        self.slot_row[:, 0] = torch.arange(c, device=classifier.device)
        self.gram = classifier.new_zeros(c, slots, slots)
        self.gram[:, 0, 0] = (self.keys[:c] ** 2).sum(-1)
        self.ents: list[list[float]] = [[] for _ in range(c)]
        self.rows_of: list[list[int]] = [[] for _ in range(c)]
        self.rows = c
        self.images = 0
        self.scored = 0  # keys each image was scored against, summed over images (GEMM sizes)

    def _write(self, c: int, h: float) -> tuple[int, int] | None:
        """The (slot, row) z_0 of class c and entropy h goes to, or None."""
        ents = self.ents[c]
        if len(ents) < self.config.memory:
            ents.append(h)
            self.rows_of[c].append(self.rows)
            self.rows += 1
            return len(ents), self.rows - 1
        worst = max(ents)
        if h < worst:
            i = len(ents) - 1 - ents[::-1].index(worst)  # the last slot of the largest entropy
            ents[i] = h
            return i + 1, self.rows_of[c][i]
        return None

    def step(self, chunk: DMNInputs) -> PeerOutput:
        """Adapt to and score the next images of the stream, in order ([b] of each field)."""
        cfg = self.config
        b = chunk.label.shape[0]
        dev = chunk.query.device
        norm = torch.linalg.vector_norm(chunk.query, dim=-1)
        q = chunk.query / norm.unsqueeze(1)
        p0 = torch.softmax(self.scale * (chunk.query @ self.classifier.T), dim=-1)
        rows = self.rows
        counts = [len(e) for e in self.ents]
        writes: list[tuple[int, int, int, int]] = []  # (step, class, slot, row)
        for t, (c, h) in enumerate(zip(chunk.label.tolist(), chunk.entropy.tolist(), strict=True)):
            written = self._write(c, h)
            if written is not None:
                writes.append((t, c, *written))
            self.scored += self.rows
        self.images += b

        # the keys present at the block start (rows < rows), dead from their first overwrite
        a = q.new_empty(rows + 1, b)  # q^T k for every key k present, then w q^T k
        torch.mm(self.keys[:rows], q.T, out=a[:rows])
        a[rows] = 0
        w = _weight(a, cfg.beta)
        w[rows] = 0  # the padding row of empty and new slots
        first: dict[int, int] = {}
        for t, _, _, row in writes:
            if row < rows:
                first.setdefault(row, t)
        if first:
            dying = torch.tensor(list(first), device=dev)
            death = torch.tensor(list(first.values()), device=dev)
            w[dying] *= torch.arange(b, device=dev) < death.unsqueeze(1)
        num = torch.zeros_like(p0.T).index_add_(0, self.row_class[: rows + 1], a.mul_(w))
        quad = self._quad(w, counts, rows)
        if writes:
            self._add_new(writes, q, w, counts, rows, num, quad)
        score = num / quad.sqrt() * norm  # the official scores the un-renormalised z_0
        p_mem = torch.softmax(self.scale * score.T, dim=-1)
        self._commit(writes, q)
        out = p0 + cfg.gamma * p_mem
        return PeerOutput(scores=out, probs=out / (1 + cfg.gamma))

    def _slots(self, classes: Tensor | list[int], m: int, rows: int) -> Tensor:
        """Rows [n, m] of the first m slots of ``classes``; slots without a key at the block
        start (empty, or first written in it) point to row ``rows``, whose weight is 0."""
        return self.slot_row[classes, :m].clamp(max=rows)

    def _quad(self, w: Tensor, counts: list[int], rows: int) -> Tensor:
        """w_c^T G_c w_c [C, b] over the keys present at the block start.

        Classes go by decreasing memory size in chunks of 64, each padded to its largest
        class only, so the work follows the sum of the squared sizes.
        """
        quad = w.new_empty(len(counts), w.shape[1])
        by_size = sorted(range(len(counts)), key=counts.__getitem__, reverse=True)
        for start in range(0, len(by_size), 64):
            classes = by_size[start : start + 64]
            m = 1 + counts[classes[0]]
            w_slots = w[self._slots(classes, m, rows).flatten()].view(len(classes), m, -1)
            gram = self.gram[classes, :m, :m]
            quad[classes] = (torch.bmm(gram, w_slots) * w_slots).sum(1)
        return quad

    def _add_new(
        self,
        writes: list[tuple[int, int, int, int]],
        q: Tensor,
        w_old: Tensor,
        counts: list[int],
        rows: int,
        num: Tensor,
        quad: Tensor,
    ) -> None:
        """Add the entries written inside the block (alive from their step to their overwrite)."""
        b = q.shape[0]
        dev = q.device
        t_w, c_w, _, _ = torch.tensor(writes, device=dev).unbind(1)
        death = [b] * len(writes)
        last: dict[int, int] = {}
        for j, (t, _, _, row) in enumerate(writes):
            if row in last:
                death[last[row]] = t
            last[row] = j
        steps = torch.arange(b, device=dev)
        alive = (t_w.unsqueeze(1) <= steps) & (steps < torch.tensor(death, device=dev).unsqueeze(1))
        k_new = q[t_w]  # [n, d]
        a = k_new @ q.T  # [n, b]
        w = _weight(a, self.config.beta).mul_(alive)
        num.index_add_(0, c_w, w * a)
        written = [c for _, c, _, _ in writes]
        slots = self._slots(written, 1 + max(counts[c] for c in written), rows)  # [n, m]
        g_cross = torch.bmm(self.keys[slots], k_new.unsqueeze(2))  # [n, m, 1]
        cross = (g_cross * w_old[slots]).sum(1)  # [n, b]
        same = c_w.unsqueeze(1) == c_w.unsqueeze(0)
        g_new = (k_new @ k_new.T) * same
        quad.index_add_(0, c_w, w * (2 * cross + g_new @ w))

    def _commit(self, writes: list[tuple[int, int, int, int]], q: Tensor) -> None:
        """Store the final occupant of every written row and refresh its Gram row/column."""
        if not writes:
            return
        final = {row: (t, c, slot) for t, c, slot, row in writes}
        row_, t_, c_, s_ = torch.tensor(
            [(row, *tcs) for row, tcs in final.items()], device=q.device
        ).unbind(1)
        self.keys[row_] = q[t_]
        self.row_class[row_] = c_
        self.slot_row[c_, s_] = row_
        slot_keys = self.keys[self.slot_row[c_]]  # [n, slots, d]
        inner = torch.bmm(slot_keys, self.keys[row_].unsqueeze(2))[..., 0]  # [n, slots]
        self.gram[c_, s_] = inner
        self.gram[c_, :, s_] = inner


def _weight(a: Tensor, beta: float) -> Tensor:
    """w = exp(-beta (1 - a))."""
    return (a - 1).mul_(beta).exp_()


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
