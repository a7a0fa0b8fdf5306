"""Decisions: thresholds, rules that force, shadow rules that never act, score floors, and
reasons ranked rules first, then the model's largest positive contributions."""

from __future__ import annotations

import math
import pickle
from dataclasses import FrozenInstanceError

import numpy as np
import pytest

from shared.errors import ConfigError
from shared.scoring.decision import (
    Assessment,
    Decision,
    Reason,
    ReasonSource,
    Thresholds,
    ThresholdsError,
    assess_batch,
    assess_columns,
    model_reason_text,
)
from shared.scoring.model import ModelArtifact, predict_proba
from shared.scoring.rules import RuleSet, parse_rules
from tests.unit.test_rules import FEATURES, batch

D = len(FEATURES)


def model(probability: float = 0.1, weights: dict[str, float] | None = None) -> ModelArtifact:
    """Mean 0, scale 1: log-odds = logit(probability) + sum(weight * value)."""
    w = np.zeros(D)
    for name, value in (weights or {}).items():
        w[FEATURES.index(name)] = value
    return ModelArtifact(
        version="model-1",
        feature_names=FEATURES,
        mean=np.zeros(D),
        scale=np.ones(D),
        weights=w,
        bias=math.log(probability / (1 - probability)),
        trained_at="2026-11-25T00:00:00+00:00",
    )


def rules(*specs: tuple[str, str, str, str]) -> RuleSet:
    """(name, expression, action, mode); action 'score_floor:0.7' carries the floor."""
    parts = ['version = "rules-1"']
    for name, expression, action, mode in specs:
        floor = ""
        if action.startswith("score_floor:"):
            action, value = action.split(":")
            floor = f"score_floor = {value}\n"
        parts.append(
            f'[[rule]]\nname = "{name}"\nexpression = "{expression}"\naction = "{action}"\n'
            f'{floor}reason_code = "{name.upper()}"\nreason_text = "{name} fired"\n'
            f'mode = "{mode}"'
        )
    return parse_rules("\n\n".join(parts), FEATURES)


def assess(
    features: np.ndarray,
    m: ModelArtifact | None = None,
    rs: RuleSet | None = None,
    thresholds: Thresholds | None = None,
    max_model_reasons: int = 3,
) -> list[Assessment]:
    return assess_batch(
        features,
        FEATURES,
        m or model(),
        rs or rules(),
        thresholds or Thresholds(),
        max_model_reasons,
    )


def codes(a: Assessment) -> list[str]:
    return [r.code for r in a.reasons]


# --- thresholds -------------------------------------------------------------------------------


def test_thresholds_default_and_validate() -> None:
    t = Thresholds()
    assert (t.review, t.decline) == (0.5, 0.85)
    assert Thresholds(0.0, 0.0).decide(0.0) is Decision.DECLINE
    for review, decline in [(0.9, 0.5), (-0.1, 0.5), (0.5, 1.1), (math.nan, 0.9)]:
        with pytest.raises(ThresholdsError, match="review") as caught:
            Thresholds(review, decline)
        assert isinstance(caught.value, ConfigError)
        assert isinstance(caught.value, ValueError)


def test_decisions_follow_thresholds_at_or_above() -> None:
    t = Thresholds(0.5, 0.85)
    assert t.decide(0.49) is Decision.APPROVE
    assert t.decide(0.5) is Decision.REVIEW
    assert t.decide(0.85) is Decision.DECLINE
    results = [assess(batch({}), model(p))[0] for p in (0.2, 0.6, 0.9)]
    assert [a.decision for a in results] == [Decision.APPROVE, Decision.REVIEW, Decision.DECLINE]
    assert [a.score for a in results] == pytest.approx([0.2, 0.6, 0.9])
    assert Decision.DECLINE.value == "DECLINE"  # adapters map to DECISION_<value>


# --- rules acting on decision and score -------------------------------------------------------


def test_active_review_and_decline_force_the_decision_but_not_the_score() -> None:
    rs = rules(
        ("burst", "count_1m >= 5", "review", "active"),
        ("huge", "amount >= 10000", "decline", "active"),
    )
    out = assess(batch({"count_1m": 6}, {"amount": 20000}, {"amount": 10}), model(0.05), rs)
    assert [a.decision for a in out] == [Decision.REVIEW, Decision.DECLINE, Decision.APPROVE]
    assert [a.score for a in out] == pytest.approx([0.05, 0.05, 0.05])  # the score stays honest
    assert codes(out[0]) == ["BURST"]
    assert codes(out[1]) == ["HUGE"]
    assert out[0].reasons[0] == Reason("BURST", "burst fired", 1.0, ReasonSource.RULE)


def test_a_review_rule_never_lowers_a_decline_earned_by_the_score() -> None:
    rs = rules(("burst", "count_1m >= 5", "review", "active"))
    (a,) = assess(batch({"count_1m": 6}), model(0.95), rs)
    assert a.decision is Decision.DECLINE


def test_score_floor_raises_the_score_and_thus_the_decision() -> None:
    rs = rules(
        ("spike", "amount_ratio_30d > 10", "score_floor:0.7", "active"),
        ("terminal", "terminal_risk_7d > 0.5", "score_floor:0.9", "active"),
    )
    out = assess(
        batch(
            {"amount_ratio_30d": 12},
            {"amount_ratio_30d": 12, "terminal_risk_7d": 0.6},
            {"amount_ratio_30d": 1},
        ),
        model(0.1),
        rs,
    )
    assert [a.score for a in out] == pytest.approx([0.7, 0.9, 0.1])
    assert [a.decision for a in out] == [Decision.REVIEW, Decision.DECLINE, Decision.APPROVE]
    assert codes(out[1]) == ["SPIKE", "TERMINAL"]
    # A floor below the model probability leaves the probability.
    (high,) = assess(batch({"amount_ratio_30d": 12}), model(0.8), rs)
    assert high.score == pytest.approx(0.8)


def test_shadow_rules_are_reported_but_never_act() -> None:
    active_only = rules()
    with_shadow = rules(
        ("s_decline", "amount > 0", "decline", "shadow"),
        ("s_review", "amount > 0", "review", "shadow"),
        ("s_floor", "amount > 0", "score_floor:1.0", "shadow"),
    )
    features = batch({"amount": 5}, {"amount": 0})
    plain = assess(features, model(0.1), active_only)
    shadowed = assess(features, model(0.1), with_shadow)
    assert [a.score for a in shadowed] == [a.score for a in plain]
    assert [a.decision for a in shadowed] == [Decision.APPROVE, Decision.APPROVE]
    assert [(r.code, r.source) for r in shadowed[0].reasons] == [
        ("S_DECLINE", ReasonSource.SHADOW_RULE),
        ("S_REVIEW", ReasonSource.SHADOW_RULE),
        ("S_FLOOR", ReasonSource.SHADOW_RULE),
    ]
    assert shadowed[1].reasons == ()


# --- reasons ----------------------------------------------------------------------------------


def test_reasons_rank_active_rules_then_shadow_then_model_contributions() -> None:
    rs = rules(
        ("shadow_first_in_file", "amount > 0", "review", "shadow"),
        ("second", "amount > 0", "review", "active"),
        ("third", "amount > 0", "score_floor:0.2", "active"),
    )
    m = model(
        0.1,
        {"amount": 0.01, "count_1m": 0.5, "travel_speed_kmh": 0.002, "terminal_risk_7d": 3.0},
    )
    features = batch(
        {"amount": 100, "count_1m": 2, "travel_speed_kmh": 100, "terminal_risk_7d": 0.1}
    )
    (a,) = assess(features, m, rs, max_model_reasons=3)
    # Contributions: amount 1.0, count_1m 1.0, travel 0.2, terminal_risk 0.3 -> top 3 by size,
    # ties (amount, count_1m) in feature order.
    assert codes(a) == [
        "SECOND",
        "THIRD",
        "SHADOW_FIRST_IN_FILE",
        "MODEL_AMOUNT",
        "MODEL_COUNT_1M",
        "MODEL_TERMINAL_RISK_7D",
    ]
    model_reasons = a.reasons[3:]
    assert all(r.source is ReasonSource.MODEL for r in model_reasons)
    assert [r.contribution for r in model_reasons] == pytest.approx([1.0, 1.0, 0.3])
    assert model_reasons[2].text == "terminal_risk_7d = 0.1 raised the risk"
    assert [r.source for r in a.reasons[:3]] == [
        ReasonSource.RULE,
        ReasonSource.RULE,
        ReasonSource.SHADOW_RULE,
    ]


def test_only_positive_contributions_become_reasons_and_the_count_is_capped() -> None:
    m = model(0.1, {"amount": 0.01, "count_1m": -1.0, "is_night": 2.0})
    features = batch({"amount": 50, "count_1m": 3, "is_night": 1}, {"count_1m": 3})
    first, second = assess(features, m)
    assert codes(first) == ["MODEL_IS_NIGHT", "MODEL_AMOUNT"]  # count_1m pulled the risk down
    assert codes(second) == []
    (one,) = assess(features[:1], m, max_model_reasons=1)
    assert codes(one) == ["MODEL_IS_NIGHT"]
    (none,) = assess(features[:1], m, max_model_reasons=0)
    assert codes(none) == []
    (all_of_them,) = assess(features[:1], m, max_model_reasons=100)
    assert codes(all_of_them) == ["MODEL_IS_NIGHT", "MODEL_AMOUNT"]


def test_the_score_is_the_model_probability_over_the_batch() -> None:
    m = model(0.2, {"amount": 0.01, "terminal_risk_7d": 2.0})
    rng = np.random.default_rng(0)
    features = rng.uniform(0, 100, size=(50, D))
    out = assess(features, m)
    assert [a.score for a in out] == pytest.approx(predict_proba(m, features).tolist())
    assert all(a.model_version == "model-1" and a.rules_version == "rules-1" for a in out)
    assert out[7].features == dict(zip(FEATURES, features[7].tolist(), strict=True))


def test_non_finite_features_are_flagged_and_ignored_by_the_model() -> None:
    m = model(0.1, {"amount": 0.01, "count_1m": 1.0})
    rs = rules(("big", "amount > 10", "review", "active"))
    features = batch({"amount": 100, "count_1m": 1}, {"amount": 100, "count_1m": 1})
    features[1, FEATURES.index("amount")] = np.nan
    clean, broken = assess(features, m, rs)
    assert codes(clean) == ["BIG", "MODEL_AMOUNT", "MODEL_COUNT_1M"]
    assert codes(broken) == ["FEATURES_NOT_FINITE", "MODEL_COUNT_1M"]
    assert broken.reasons[0].source is ReasonSource.SYSTEM
    assert "amount" in broken.reasons[0].text
    assert 0.0 <= broken.score <= 1.0
    assert broken.score == pytest.approx(1 / (1 + math.exp(-(math.log(1 / 9) + 1.0))))
    assert broken.decision is Decision.APPROVE  # the review rule cannot fire on nan


def test_empty_batch_and_wiring_errors() -> None:
    assert assess(np.zeros((0, D))) == []
    with pytest.raises(ValueError, match="shape"):
        assess(np.zeros((2, D - 1)))
    other = ModelArtifact("x", ("a",), np.zeros(1), np.ones(1), np.zeros(1), 0.0, "2026-01-01")
    with pytest.raises(ValueError, match="different feature names"):
        assess(batch({}), m=other)
    other_rules = parse_rules('version = "r"\n', ("a",))
    with pytest.raises(ValueError, match="different feature names"):
        assess(batch({}), rs=other_rules)


# --- row views and columns ---------------------------------------------------------------------


def test_row_views_equal_assessments_built_from_their_values() -> None:
    rs = rules(
        ("big", "amount > 60", "review", "active"),
        ("watch", "amount > 10", "review", "shadow"),
    )
    m = model(0.1, {"amount": 0.01, "count_1m": 0.5, "is_night": 2.0})
    features = batch(
        {"amount": 100, "count_1m": 2, "is_night": 1}, {"amount": 20}, {"amount": 5}, {}
    )
    features[3, FEATURES.index("count_1m")] = np.inf
    views = assess(features, m, rs)
    plain = [
        Assessment(a.score, a.decision, tuple(a.reasons), dict(a.features), "model-1", "rules-1")
        for a in views
    ]
    assert views == plain
    assert [repr(a) for a in views] == [repr(a) for a in plain]
    assert codes(views[3])[0] == "FEATURES_NOT_FINITE"
    assert views[0].reasons is views[0].reasons  # built once
    views[0].features["amount"] = -1.0  # a copy: the assessment does not change
    assert views[0].features["amount"] == 100
    restored = pickle.loads(pickle.dumps(views))
    assert restored == plain
    with pytest.raises(FrozenInstanceError):
        views[0].score = 1.0


def test_columns_hold_what_the_assessments_say() -> None:
    m = model(0.1, {"amount": 0.01, "count_1m": -1.0, "is_night": 2.0})
    rs = rules(("big", "amount > 60", "decline", "active"))
    features = batch({"amount": 100, "count_1m": 3, "is_night": 1}, {"count_1m": 3})
    columns = assess_columns(features, FEATURES, m, rs, Thresholds())
    views = columns.assessments()
    assert columns.decisions == [a.decision for a in views] == [Decision.DECLINE, Decision.APPROVE]
    assert columns.scores == [a.score for a in views]
    assert columns.model_start == [0, 2, 2]
    assert [FEATURES[j] for j in columns.model_feature] == ["is_night", "amount"]
    assert columns.model_value == [1.0, 100.0]
    assert columns.rule_hits == {0: [0]}
    assert views[0].reasons[1].text == model_reason_text("is_night", 1.0)
    assert model_reason_text("amount", 1234567.0) == "amount = 1.23457e+06 raised the risk"
