"""Evaluation metrics: hand-computed cases, brute-force definitions and invariances."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from shared.simulation import (
    PrecisionRecall,
    average_precision,
    card_precision_at_k,
    card_precision_at_k_per_day,
    precision_recall_at,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)

# Small integer scores make ties common, which is where rank metrics usually go wrong.
samples = st.lists(st.tuples(st.booleans(), st.integers(0, 6)), min_size=2, max_size=40)


def _split(sample: list[tuple[bool, int]]) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.float64]]:
    y = np.array([label for label, _ in sample], dtype=np.bool_)
    s = np.array([score for _, score in sample], dtype=np.float64)
    assume(y.any() and not y.all())
    return y, s


def _pairwise_auc(y: npt.NDArray[np.bool_], s: npt.NDArray[np.float64]) -> float:
    wins = 0.0
    for p in s[y]:
        for n in s[~y]:
            wins += 1.0 if p > n else 0.5 if p == n else 0.0
    return wins / float(y.sum() * (~y).sum())


def _stepwise_ap(y: npt.NDArray[np.bool_], s: npt.NDArray[np.float64]) -> float:
    total, previous_recall = 0.0, 0.0
    for threshold in sorted(set(s.tolist()), reverse=True):
        flagged = s >= threshold
        tp = (flagged & y).sum()
        recall = tp / y.sum()
        total += (recall - previous_recall) * tp / flagged.sum()
        previous_recall = recall
    return float(total)


def test_scikit_learn_documentation_example() -> None:
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert roc_auc(y, s) == pytest.approx(0.75)
    assert average_precision(y, s) == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    fpr, tpr, thresholds = roc_curve(y, s)
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    precision, recall, thresholds = precision_recall_curve(y, s)
    np.testing.assert_allclose(precision, [0.5, 2 / 3, 0.5, 1, 1])
    np.testing.assert_allclose(recall, [1, 1, 0.5, 0.5, 0])
    np.testing.assert_allclose(thresholds, [0.1, 0.35, 0.4, 0.8])


def test_ties_count_as_one_threshold() -> None:
    y = [0, 1, 0, 1, 0]
    flat = [0.3] * 5
    assert roc_auc(y, flat) == 0.5
    assert average_precision(y, flat) == pytest.approx(0.4)  # one threshold: P = 2/5, R = 1
    # A fraud tied with a genuine one above the other genuine ones: half a win each.
    assert roc_auc([1, 0, 0], [0.9, 0.9, 0.1]) == pytest.approx(0.75)
    assert average_precision([1, 0, 0], [0.9, 0.9, 0.1]) == pytest.approx(0.5)


@given(samples)
def test_auc_is_the_pairwise_probability(sample: list[tuple[bool, int]]) -> None:
    y, s = _split(sample)
    assert roc_auc(y, s) == pytest.approx(_pairwise_auc(y, s))


@given(samples)
def test_auc_is_the_area_under_the_roc_curve(sample: list[tuple[bool, int]]) -> None:
    y, s = _split(sample)
    fpr, tpr, _ = roc_curve(y, s)
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert roc_auc(y, s) == pytest.approx(area)


@given(samples)
def test_average_precision_is_the_stepwise_sum(sample: list[tuple[bool, int]]) -> None:
    y, s = _split(sample)
    assert average_precision(y, s) == pytest.approx(_stepwise_ap(y, s))
    precision, recall, _ = precision_recall_curve(y, s)
    assert average_precision(y, s) == pytest.approx(-np.sum(np.diff(recall) * precision[:-1]))


@given(samples)
def test_metrics_ignore_monotone_transforms(sample: list[tuple[bool, int]]) -> None:
    y, s = _split(sample)
    transformed = np.exp(s) * 3.0 - 7.0
    assert roc_auc(y, transformed) == pytest.approx(roc_auc(y, s))
    assert average_precision(y, transformed) == pytest.approx(average_precision(y, s))
    assert roc_auc(y, -s) == pytest.approx(1.0 - roc_auc(y, s))


@given(samples)
def test_perfect_and_reversed_rankings(sample: list[tuple[bool, int]]) -> None:
    y, _ = _split(sample)
    perfect = y.astype(np.float64) + np.linspace(0.0, 0.5, y.size)
    assert roc_auc(y, perfect) == 1.0
    assert average_precision(y, perfect) == pytest.approx(1.0)
    assert roc_auc(y, -perfect) == 0.0


@given(samples)
def test_order_of_rows_does_not_matter(sample: list[tuple[bool, int]]) -> None:
    y, s = _split(sample)
    backwards = slice(None, None, -1)
    assert roc_auc(y[backwards], s[backwards]) == pytest.approx(roc_auc(y, s))
    assert average_precision(y[backwards], s[backwards]) == pytest.approx(average_precision(y, s))


def test_undefined_inputs_raise() -> None:
    with pytest.raises(ValueError, match="both"):
        roc_auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="at least one fraud"):
        average_precision([0, 0], [0.2, 0.3])
    with pytest.raises(ValueError, match="finite"):
        roc_auc([0, 1], [0.2, float("nan")])
    with pytest.raises(ValueError, match="shape"):
        roc_auc([0, 1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="0/1"):
        roc_auc([0, 2], [0.2, 0.3])


def test_card_precision_per_day_takes_each_cards_max_score() -> None:
    # Day 1: card a (fraud on one of two payments) scores 0.9 at most, b 0.8, c 0.1 (fraud).
    # Day 2: a again, d (fraud) and e.
    days = [1, 1, 1, 1, 2, 2, 2]
    cards = ["a", "a", "b", "c", "a", "d", "e"]
    y = [0, 1, 0, 1, 1, 1, 0]
    scores = [0.9, 0.2, 0.8, 0.1, 0.99, 0.5, 0.7]
    keys, per_day = card_precision_at_k_per_day(days, cards, y, scores, k=2)
    assert keys.tolist() == [1, 2]
    # Day 1: top 2 = a (fraud), b -> 1/2. Day 2: a was caught on day 1 and is blocked, so the
    # top 2 are e and d (fraud) -> 1/2.
    np.testing.assert_allclose(per_day, [0.5, 0.5])
    assert card_precision_at_k(days, cards, y, scores, k=2) == pytest.approx(0.5)
    # Without removing detected cards, a takes day 2's first place: a, e -> 1/2 too; k=1 tells.
    _, kept = card_precision_at_k_per_day(days, cards, y, scores, k=1, remove_detected=False)
    _, removed = card_precision_at_k_per_day(days, cards, y, scores, k=1)
    np.testing.assert_allclose(kept, [1.0, 1.0])
    np.testing.assert_allclose(removed, [1.0, 0.0])


def test_card_precision_divides_by_k_and_drops_known_compromised_rows() -> None:
    days = [0, 0, 0]
    cards = [1, 2, 3]
    y = [1, 0, 1]
    scores = [0.9, 0.8, 0.7]
    assert card_precision_at_k(days, cards, y, scores, k=100) == pytest.approx(2 / 100)
    known = [True, False, False]
    assert card_precision_at_k(days, cards, y, scores, k=1, known_compromised=known) == 0.0
    assert card_precision_at_k(days, cards, y, scores, k=2, known_compromised=known) == 0.5
    with pytest.raises(ValueError, match="at least one row"):
        card_precision_at_k(days, cards, y, scores, known_compromised=[True] * 3)


def test_card_precision_breaks_ties_by_card() -> None:
    # Equal scores: cards rank by key, so "x" (genuine) beats "y" (fraud) for the single slot.
    assert card_precision_at_k([0, 0], ["y", "x"], [1, 0], [0.5, 0.5], k=1) == 0.0


def test_precision_recall_at_flags() -> None:
    flagged = [True, True, False, False, True]
    y = [1, 0, 1, 0, 1]
    assert precision_recall_at(flagged, y) == PrecisionRecall(
        true_positives=2,
        false_positives=1,
        false_negatives=1,
        true_negatives=1,
        precision=2 / 3,
        recall=2 / 3,
    )
    nothing = precision_recall_at([False, False], [1, 0])
    assert (nothing.precision, nothing.recall, nothing.false_negatives) == (0.0, 0.0, 1)
