"""Metrics of fraud scores against labels for training (evaluation, not Prometheus: see
shared.metrics).

AUC ROC and average precision are the evaluation's own (`shared.simulation.metrics`: pure numpy,
ties as scikit-learn handles them), so training and `fraudstream evaluate` report the same
numbers; log loss is training's alone.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from shared.simulation.metrics import average_precision, roc_auc

__all__ = ["average_precision", "log_loss", "roc_auc"]


FloatArray = NDArray[np.float64]


def _inputs(y_true: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"y_true has {y.size} values but scores has {s.size}")
    if not np.all((y == 0) | (y == 1)):
        raise ValueError("y_true must contain only 0 and 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores must be finite")
    return y, s


def log_loss(y_true: ArrayLike, probabilities: ArrayLike, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood; probabilities are clipped to [eps, 1 - eps]."""
    y, p = _inputs(y_true, probabilities)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
