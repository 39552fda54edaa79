"""Metrics that more than one audit concern reports, as pure functions of predictions and labels.

Classification: the confusion matrix and per-class precision, recall, F1 and support from it (as scikit-learn).
Calibration: per-bin statistics, expected calibration error (15 equal-width bins; Guo et al. 2017) and adaptive ECE
(equal-mass bins; Nixon et al. 2019), maximum calibration error and the multiclass Brier score.

Each is tested against a library reference (scikit-learn, torchmetrics).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """(K, K) counts, rows = true class, columns = predicted class."""
    return torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def prf(cm: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined, as sklearn)."""
    cm = cm.double()
    tp = cm.diagonal(dim1=-2, dim2=-1)
    predicted, support = cm.sum(-2), cm.sum(-1)
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), 0.0)
    recall = torch.where(support > 0, tp / support.clamp_min(1), 0.0)
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-300), 0.0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def bin_stats(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15, adaptive: bool = False) -> dict:
    """Per-bin count, mean confidence and accuracy. Equal-width bins are [b_i, b_i+1) as torchmetrics uses;
    adaptive bins hold equal numbers of samples (sorted by confidence)."""
    conf, correct = conf.double(), correct.double()
    if adaptive:
        order = conf.argsort()
        idx = torch.empty_like(order)
        idx[order] = torch.arange(len(conf)) * n_bins // len(conf)
        edges = None
    else:
        edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
        idx = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(idx, minlength=n_bins).double()
    sum_conf = torch.bincount(idx, conf, minlength=n_bins)
    sum_acc = torch.bincount(idx, correct, minlength=n_bins)
    safe = count.clamp_min(1)
    return {"count": count, "confidence": sum_conf / safe, "accuracy": sum_acc / safe, "edges": edges}


def ece(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15, adaptive: bool = False) -> float:
    """Sum over bins of |accuracy - confidence| weighted by the bin's share of samples."""
    s = bin_stats(conf, correct, n_bins, adaptive)
    return ((s["accuracy"] - s["confidence"]).abs() * s["count"] / s["count"].sum()).sum().item()


def mce(conf: torch.Tensor, correct: torch.Tensor, n_bins: int = 15) -> float:
    """The largest |accuracy - confidence| over non-empty bins."""
    s = bin_stats(conf, correct, n_bins)
    gap = (s["accuracy"] - s["confidence"]).abs()
    return gap[s["count"] > 0].max().item()


def brier(probs: torch.Tensor, y: torch.Tensor) -> float:
    """Multiclass Brier score: mean over samples of the squared distance to the one-hot label (range 0..2)."""
    onehot = F.one_hot(y, probs.shape[1]).double()
    return ((probs.double() - onehot) ** 2).sum(1).mean().item()
