"""Logits -> label and probabilities (classification) or the score (regression), as the
`postprocess_<task>` Triton model runs it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from serving.errors import InputError


@dataclass(frozen=True)
class Prediction:
    """One example's answer: the arg-max label and every label's probability; or, for a regression
    task, the score (label is then the score as text, probabilities empty)."""

    label: str
    probabilities: dict[str, float]
    score: float | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row max for stability. (B, C) -> (B, C)"""
    z = logits.astype(np.float32) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class LabelDecoder:
    """Map (B, C) logits to (B, 1) UTF-8 label bytes and (B, C) float32 probabilities."""

    def __init__(self, labels: tuple[str, ...] | list[str]):
        if len(labels) < 1:
            raise ValueError("a classification task needs at least one label")
        self.labels = tuple(labels)
        self._encoded = np.array([lab.encode("utf-8") for lab in self.labels], dtype=np.object_)

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if logits.ndim != 2 or logits.shape[1] != len(self.labels):
            raise InputError(f"logits must have shape (batch, {len(self.labels)}), got {tuple(logits.shape)}")
        if not np.isfinite(logits).all():
            raise InputError("logits contain NaN or infinity")
        probs = softmax(logits)  # (B, C)
        labels = self._encoded[probs.argmax(axis=-1)].reshape(-1, 1)  # (B, 1)
        return labels, probs

    def predictions(self, logits: np.ndarray) -> list[Prediction]:
        """The same decision as Python objects (in-process reference and tests)."""
        _, probs = self(logits)
        return [Prediction(self.labels[int(p.argmax())], dict(zip(self.labels, map(float, p)))) for p in probs]


class ScoreDecoder:
    """Regression: (B, 1) logits are the scores; checked, passed on as float32."""

    def __call__(self, logits: np.ndarray) -> tuple[np.ndarray]:
        if logits.ndim != 2 or logits.shape[1] != 1:
            raise InputError(f"logits must have shape (batch, 1), got {tuple(logits.shape)}")
        if not np.isfinite(logits).all():
            raise InputError("logits contain NaN or infinity")
        return (logits.astype(np.float32),)

    def predictions(self, logits: np.ndarray) -> list[Prediction]:
        (scores,) = self(logits)
        return [Prediction(f"{float(s[0]):.4g}", {}, float(s[0])) for s in scores]


def decoder(labels, task_type: str = "classification"):
    """The decoder of a task type."""
    return ScoreDecoder() if task_type == "regression" else LabelDecoder(labels)
