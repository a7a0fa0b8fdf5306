"""Evaluation metrics for fraud scores, in plain numpy (no scikit-learn dependency).

Definitions follow scikit-learn's, so numbers compare with published ones:

- `roc_auc`: the probability that a random fraud scores above a random genuine transaction,
  ties counting one half (the Mann-Whitney statistic from average ranks).
- `average_precision`: sum over distinct score thresholds, highest first, of
  (R_n - R_{n-1}) * P_n. Transactions with equal scores enter together, as one threshold.
- `card_precision_at_k`: the handbook's card precision@k. Per day, each card gets the maximum
  score of its transactions and is a fraud if any of them is; the k cards with the highest score
  are what analysts could check that day, and the precision is the share of frauds among them,
  divided by k even when fewer cards exist. Cards found compromised on an earlier day are dropped
  from later days (they are blocked), and rows the caller marks as already known compromised
  (from training data or labels that arrived before the test day) are dropped up front. The
  result is the mean over days.

`y_true` is anything that reads as 0/1 or booleans; scores must be finite. A metric that is
undefined for the input (AUC with a single class, AP without frauds) raises ValueError instead of
returning a number that would look like a result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "PrecisionRecall",
    "average_precision",
    "card_precision_at_k",
    "card_precision_at_k_per_day",
    "precision_recall_at",
    "precision_recall_curve",
    "roc_auc",
    "roc_curve",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


def _labels(y_true: npt.ArrayLike, name: str = "y_true") -> BoolArray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {y.shape}")
    if y.dtype != np.bool_:
        if y.size and not np.isin(y, (0, 1)).all():
            raise ValueError(f"{name} must hold only 0/1 or booleans")
        y = y.astype(np.bool_)
    return y


def _inputs(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[BoolArray, FloatArray]:
    y = _labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != y.shape:
        raise ValueError(f"scores has shape {s.shape} but y_true has {y.shape}")
    if not np.isfinite(s).all():
        raise ValueError("scores must be finite (no NaN or infinity)")
    return y, s


def _counts_by_threshold(y: BoolArray, s: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """False and true positives when flagging score >= t, for each distinct t, highest first."""
    order = np.argsort(-s, kind="stable")
    ordered = s[order]
    # The last position of each run of equal scores: ties are flagged together or not at all.
    ends = np.r_[np.flatnonzero(np.diff(ordered)), ordered.size - 1]
    tps = np.cumsum(y[order], dtype=np.float64)[ends]
    fps = (ends + 1) - tps
    return fps, tps, ordered[ends]


def _both_classes(y: BoolArray, metric: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        raise ValueError(f"{metric} needs both frauds and genuine transactions in y_true")


def roc_auc(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve, from average ranks (exact with ties)."""
    y, s = _inputs(y_true, scores)
    _both_classes(y, "roc_auc")
    order = np.argsort(s, kind="stable")
    ordered = s[order]
    new_run = np.r_[True, ordered[1:] != ordered[:-1]]
    run_start = np.flatnonzero(new_run)
    run_end = np.r_[run_start[1:], ordered.size] - 1
    mean_rank = (run_start + run_end) / 2.0 + 1.0
    ranks = np.empty(s.size, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(new_run) - 1]
    n_pos = float(y.sum())
    n_neg = float(y.size) - n_pos
    return float((ranks[y].sum() - n_pos * (n_pos + 1.0) / 2.0) / (n_pos * n_neg))


def roc_curve(
    y_true: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(fpr, tpr, thresholds) for flagging score >= threshold, thresholds decreasing, starting
    from (0, 0) at threshold +inf; every distinct score is a point (nothing dropped)."""
    y, s = _inputs(y_true, scores)
    _both_classes(y, "roc_curve")
    fps, tps, thresholds = _counts_by_threshold(y, s)
    fpr = np.r_[0.0, fps / fps[-1]]
    tpr = np.r_[0.0, tps / tps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(
    y_true: npt.ArrayLike, scores: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """(precision, recall, thresholds) as scikit-learn (1.3 and later) gives them: one point per
    distinct score with thresholds increasing, so the first point is (class balance, recall 1),
    then a last point (precision 1, recall 0) with no threshold."""
    y, s = _inputs(y_true, scores)
    if not y.any():
        raise ValueError("precision_recall_curve needs at least one fraud in y_true")
    fps, tps, thresholds = _counts_by_threshold(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(y_true: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds, highest first."""
    y, s = _inputs(y_true, scores)
    if not y.any():
        raise ValueError("average_precision needs at least one fraud in y_true")
    fps, tps, _ = _counts_by_threshold(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def card_precision_at_k_per_day(
    days: npt.ArrayLike,
    cards: npt.ArrayLike,
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    k: int = 100,
    known_compromised: npt.ArrayLike | None = None,
    remove_detected: bool = True,
) -> tuple[npt.NDArray[Any], FloatArray]:
    """(days, card precision@k of each day), days ascending; see the module docstring.

    `days` and `cards` are keys of any sortable dtype (dates, ints, strings), one per row.
    `known_compromised` is a boolean mask of rows to drop before anything else. Cards tied on
    their maximum score are ranked by card key, so the result is deterministic; it is only
    meaningful when scores rarely tie."""
    y, s = _inputs(y_true, scores)
    day_keys = np.asarray(days)
    card_keys = np.asarray(cards)
    if day_keys.shape != y.shape or card_keys.shape != y.shape:
        raise ValueError("days, cards, y_true and scores must have the same length")
    if k < 1:
        raise ValueError(f"k={k} must be at least 1")
    if known_compromised is not None:
        drop = _labels(known_compromised, "known_compromised")
        if drop.shape != y.shape:
            raise ValueError("known_compromised must have one entry per row")
        keep = ~drop
        y, s, day_keys, card_keys = y[keep], s[keep], day_keys[keep], card_keys[keep]

    unique_days, day_index = np.unique(day_keys, return_inverse=True)
    _, card_index = np.unique(card_keys, return_inverse=True)
    detected = np.zeros(int(card_index.max(initial=-1)) + 1, dtype=np.bool_)
    by_day = np.argsort(day_index, kind="stable")
    bounds = np.searchsorted(day_index[by_day], np.arange(unique_days.size + 1))
    precisions = np.zeros(unique_days.size, dtype=np.float64)
    for i in range(unique_days.size):
        rows = by_day[bounds[i] : bounds[i + 1]]
        rows = rows[~detected[card_index[rows]]]
        if rows.size == 0:
            continue
        day_cards, inverse = np.unique(card_index[rows], return_inverse=True)
        max_score = np.full(day_cards.size, -np.inf)
        np.maximum.at(max_score, inverse, s[rows])
        any_fraud = np.zeros(day_cards.size, dtype=np.bool_)
        np.logical_or.at(any_fraud, inverse, y[rows])
        # lexsort's last key is primary: highest score first, then card key ascending.
        top = np.lexsort((day_cards, -max_score))[:k]
        hits = day_cards[top][any_fraud[top]]
        precisions[i] = hits.size / k
        if remove_detected:
            detected[hits] = True
    return unique_days, precisions


def card_precision_at_k(
    days: npt.ArrayLike,
    cards: npt.ArrayLike,
    y_true: npt.ArrayLike,
    scores: npt.ArrayLike,
    k: int = 100,
    known_compromised: npt.ArrayLike | None = None,
    remove_detected: bool = True,
) -> float:
    """The handbook's card precision@k, averaged over the days present after dropping
    `known_compromised` rows."""
    _, per_day = card_precision_at_k_per_day(
        days, cards, y_true, scores, k, known_compromised, remove_detected
    )
    if per_day.size == 0:
        raise ValueError("card_precision_at_k needs at least one row")
    return float(per_day.mean())


@dataclass(frozen=True)
class PrecisionRecall:
    """Counts and rates of a set of flags (for example decisions != APPROVE) against labels.
    Precision with nothing flagged and recall with no frauds are 0.0, the counts tell why."""

    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    precision: float
    recall: float


def precision_recall_at(decisions_flagged: npt.ArrayLike, y_true: npt.ArrayLike) -> PrecisionRecall:
    """Precision and recall of boolean flags (one per transaction) against the labels."""
    flagged = _labels(decisions_flagged, "decisions_flagged")
    y = _labels(y_true)
    if flagged.shape != y.shape:
        raise ValueError("decisions_flagged and y_true must have the same length")
    tp = int((flagged & y).sum())
    fp = int((flagged & ~y).sum())
    fn = int((~flagged & y).sum())
    tn = int(y.size) - tp - fp - fn
    return PrecisionRecall(
        true_positives=tp,
        false_positives=fp,
        false_negatives=fn,
        true_negatives=tn,
        precision=tp / (tp + fp) if tp + fp else 0.0,
        recall=tp / (tp + fn) if tp + fn else 0.0,
    )
