"""Task metrics by task type, as GLUE reports them, and the loss each task type trains with.

- classification: accuracy and macro F1; binary classification also Matthews correlation (MCC);
- regression: Pearson and Spearman correlation (STS-B), and the mean squared error.
The primary metric (accuracy, Pearson) chooses the best epoch and is the one the export gate and
`make regress` hold; the others are reported beside it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

PRIMARY = {"classification": "accuracy", "regression": "pearson"}


def task_loss(logits: torch.Tensor, labels: torch.Tensor, task_type: str, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy on class logits (B, C), or the squared error of the one score (B, 1)."""
    if task_type == "regression":
        return F.mse_loss(logits.float()[:, 0], labels.float(), reduction=reduction)
    return F.cross_entropy(logits.float(), labels, reduction=reduction)


def predictions(logits: torch.Tensor, task_type: str) -> list:
    """Class indices, or scores."""
    return logits.float()[:, 0].tolist() if task_type == "regression" else logits.argmax(-1).tolist()


def _macro_f1(pred: np.ndarray, gold: np.ndarray, num_classes: int) -> float:
    scores = []
    for c in range(num_classes):
        tp = float(((pred == c) & (gold == c)).sum())
        fp, fn = float(((pred == c) & (gold != c)).sum()), float(((pred != c) & (gold == c)).sum())
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    tp, tn = float(((pred == 1) & (gold == 1)).sum()), float(((pred == 0) & (gold == 0)).sum())
    fp, fn = float(((pred == 1) & (gold == 0)).sum()), float(((pred == 0) & (gold == 1)).sum())
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / den if den else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    values, inverse = np.unique(x, return_inverse=True)
    sums = np.bincount(inverse, weights=ranks)
    return (sums / np.bincount(inverse))[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den else 0.0


def task_metrics(pred: list, gold: list, task_type: str, num_classes: int) -> dict[str, float]:
    """The metrics of `task_type` for predictions against gold labels (empty -> zeros)."""
    p, g = np.asarray(pred, dtype=float), np.asarray(gold, dtype=float)
    if task_type == "regression":
        if len(p) < 2:
            return {"pearson": 0.0, "spearman": 0.0, "mse": 0.0}
        return {
            "pearson": _pearson(p, g),
            "spearman": _pearson(_ranks(p), _ranks(g)),
            "mse": float(((p - g) ** 2).mean()),
        }
    p, g = p.astype(int), g.astype(int)
    out = {"accuracy": float((p == g).mean()) if len(p) else 0.0, "macro_f1": _macro_f1(p, g, num_classes)}
    if num_classes == 2:
        out["mcc"] = _mcc(p, g)
    return out
