"""Evaluation metrics on per-image probabilities."""

from __future__ import annotations

import torch
from torch import Tensor

ECE_BINS = 15


def topk_accuracy(probs: Tensor, labels: Tensor, k: int) -> float:
    """Percentage of rows whose label is among the k most probable classes."""
    k = min(k, probs.shape[1])
    hits = (probs.topk(k, dim=1).indices == labels.unsqueeze(1)).any(1)
    return 100.0 * float(hits.float().mean())


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = ECE_BINS) -> float:
    r"""ECE in percent with ``bins`` equal-width confidence bins over (0, 1].

    ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|, where the confidence of an image is its
    largest probability and bin b holds confidences in ((b-1)/bins, b/bins].
    """
    conf, pred = probs.max(1)
    correct = (pred == labels).double()
    conf = conf.double()
    index = (conf * bins).ceil().clamp(1, bins).long() - 1
    acc_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct)
    conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, conf)
    return 100.0 * float((acc_sum - conf_sum).abs().sum() / probs.shape[0])


def classification_metrics(probs: Tensor, labels: Tensor) -> dict[str, float]:
    return {
        "top1": topk_accuracy(probs, labels, 1),
        "top5": topk_accuracy(probs, labels, 5),
        "ece": expected_calibration_error(probs, labels),
    }
