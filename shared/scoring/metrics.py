"""Ranking metrics of fraud scores against labels (evaluation, not Prometheus: see shared.metrics).

Pure numpy, no scikit-learn. Ties are handled the way scikit-learn does: tied scores get their
average rank in the AUC, and a tied group of scores enters the precision-recall curve as one
threshold.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

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


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve: the probability that a random positive outscores a random
    negative, ties counting one half (Mann-Whitney U over average ranks)."""
    y, s = _inputs(y_true, scores)
    n_pos = float(y.sum())
    n_neg = float(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        raise ValueError("roc_auc needs both positive and negative labels")
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    # Average 1-based rank of each group of tied scores.
    starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    ends = np.r_[starts[1:], s.size]  # exclusive
    group_rank = (starts + 1 + ends) / 2.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    u = float(ranks[y == 1].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def average_precision(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Sum over thresholds of (recall step) x precision, thresholds at each distinct score
    from the highest down (scikit-learn's definition, no interpolation)."""
    y, s = _inputs(y_true, scores)
    n_pos = float(y.sum())
    if n_pos == 0:
        raise ValueError("average_precision needs at least one positive label")
    order = np.argsort(-s, kind="mergesort")
    sorted_scores = s[order]
    sorted_y = y[order]
    # The last index of each group of tied scores: one threshold per distinct score.
    last = np.flatnonzero(np.r_[sorted_scores[1:] != sorted_scores[:-1], True])
    tp = np.cumsum(sorted_y)[last]
    predicted = last + 1.0
    precision = tp / predicted
    recall = tp / n_pos
    recall_step = np.diff(np.r_[0.0, recall])
    return float(np.sum(recall_step * precision))


def log_loss(y_true: ArrayLike, probabilities: ArrayLike, eps: float = 1e-15) -> float:
    """Mean negative log-likelihood; probabilities are clipped to [eps, 1 - eps]."""
    y, p = _inputs(y_true, probabilities)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))
