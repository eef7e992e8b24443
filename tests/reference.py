"""A plain per-image float64 RA-TTA, written from method.md line by line, for the tests.

Deliberately independent of ``ratta.engine``: numpy loops, ``torch.quantile`` for step 2,
brute-force L2 search and POT's ``ot.sinkhorn`` for step 6.
"""

from __future__ import annotations

import numpy as np
import ot
import torch


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    e = np.exp(z)
    return e / e.sum()


def normalise(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def reference_image(
    x: np.ndarray,
    classifier: np.ndarray,
    desc: np.ndarray,
    desc_class: np.ndarray,
    database: np.ndarray,
    s: float,
    k_d: int = 20,
    k_s: int = 20,
    q: float = 0.75,
    min_desc: int = 5,
) -> dict:
    """RA-TTA for one test image; x is [V+1, d] with x[0] the center crop."""
    num_classes = classifier.shape[0]
    # 1. zero-shot
    p0 = softmax(s * classifier @ x[0])
    h0 = -np.sum(p0 * np.log(p0))
    # 2. description scores: q-quantile over the V+1 embeddings
    sims = torch.from_numpy(x @ desc.T)  # [V+1, M]
    scores = torch.quantile(sims, q, dim=0, interpolation="linear").numpy()
    # 3. top descriptions, grouped by owner class, classes with < min_desc dropped
    order = np.argsort(-scores, kind="stable")[: min(k_d, len(scores))]
    owned: dict[int, list[int]] = {}
    for m in order:
        owned.setdefault(int(desc_class[m]), []).append(int(m))
    survivors = {c: rows for c, rows in owned.items() if len(rows) >= min_desc}
    if not survivors:
        return {
            "p0": p0,
            "p_ret": p0,
            "p": p0,
            "classes": [],
            "rel": np.array([]),
            "top": order,
            "retrieved": [],
        }
    # 4. prototypes
    protos = {c: normalise(desc[rows].mean(0)) for c, rows in survivors.items()}
    all_rows = [m for rows in survivors.values() for m in rows]
    t_star = normalise(desc[all_rows].mean(0))
    # 5-6. retrieval and OT distance per set
    a = softmax(s * x @ t_star)
    dists, retrieved = [], []
    classes = sorted(survivors)
    for c in classes:
        t_c = protos[c]
        l2 = np.sum((database - t_c) ** 2, axis=1)
        nearest = np.argsort(l2, kind="stable")[: min(k_s, len(database))]
        retrieved.append(nearest)
        r = database[nearest]
        cost = np.abs((x @ t_c)[:, None] - (r @ t_c)[None, :])
        b = softmax(s * r @ t_c)
        plan = ot.sinkhorn(a, b, cost, reg=0.1, numItermax=100, stopThr=1e-2, warn=False)
        dists.append(float(np.sum(plan * cost)))
    # 7-9. relevance, retrieval prediction, ensemble
    rel = softmax(s / (1.0 + np.array(dists)))
    p_ret = np.zeros(num_classes)
    for c, r_c in zip(classes, rel, strict=True):
        p_ret[c] += r_c
    h_ret = -np.sum(p_ret * np.log(p_ret + 1e-7))
    w0, wr = np.exp(1 / (1 + h0)), np.exp(1 / (1 + h_ret))
    lam = w0 / (w0 + wr)
    return {
        "p0": p0,
        "p_ret": p_ret,
        "p": lam * p0 + (1 - lam) * p_ret,
        "classes": classes,
        "rel": rel,
        "dists": np.array(dists),
        "top": order,
        "retrieved": retrieved,
    }
