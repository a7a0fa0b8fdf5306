"""The alert policy: parsing ALERT_POLICY, severity mapping, suppression code, alert ids."""

from __future__ import annotations

import math

import pytest

from protos.fraud.v1 import scoring_pb2
from services.alerting.policy import (
    NO_REASON_CODE,
    DecisionTerm,
    ScoreTerm,
    alert_id_for,
    parse_policy,
    severity_name,
    suppression_code,
)
from shared.config import ENV_VARS
from shared.errors import ConfigError

APPROVE, REVIEW, DECLINE = (
    scoring_pb2.DECISION_APPROVE,
    scoring_pb2.DECISION_REVIEW,
    scoring_pb2.DECISION_DECLINE,
)
LOW, MEDIUM, HIGH, CRITICAL = (
    scoring_pb2.SEVERITY_LOW,
    scoring_pb2.SEVERITY_MEDIUM,
    scoring_pb2.SEVERITY_HIGH,
    scoring_pb2.SEVERITY_CRITICAL,
)


def test_default_policy_parses() -> None:
    policy = parse_policy(ENV_VARS["ALERT_POLICY"][0])
    assert policy.terms == (
        DecisionTerm(DECLINE, HIGH),
        DecisionTerm(REVIEW, MEDIUM),
        ScoreTerm(0.3, True, LOW),
    )
    assert policy.describe() == "DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW"


@pytest.mark.parametrize(
    ("decision", "score", "expected"),
    [
        (DECLINE, 0.95, HIGH),
        (DECLINE, 0.0, HIGH),  # a decision term needs no score
        (REVIEW, 0.6, MEDIUM),
        (APPROVE, 0.3, LOW),  # the band is inclusive
        (APPROVE, 0.2999, None),
        (APPROVE, 0.0, None),
        (scoring_pb2.DECISION_UNSPECIFIED, 0.5, LOW),
        (APPROVE, math.nan, None),  # NaN lands in no band
    ],
)
def test_default_policy_severity(decision: int, score: float, expected: int | None) -> None:
    policy = parse_policy("DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW")
    assert policy.severity_for(decision, score) == expected


def test_most_severe_match_wins_whatever_the_order() -> None:
    policy = parse_policy("score>0.9=CRITICAL, review=medium, score>=0.5=HIGH")
    assert policy.severity_for(REVIEW, 0.4) == MEDIUM
    assert policy.severity_for(REVIEW, 0.5) == HIGH
    assert policy.severity_for(REVIEW, 0.9) == HIGH  # `>` is exclusive
    assert policy.severity_for(APPROVE, 0.95) == CRITICAL
    assert policy.describe() == "score>0.9=CRITICAL,REVIEW=MEDIUM,score>=0.5=HIGH"


@pytest.mark.parametrize(
    ("text", "culprit"),
    [
        ("DECLINE=HIGH,REVEIW=MEDIUM", "REVEIW=MEDIUM"),
        ("DECLINE=SEVERE", "DECLINE=SEVERE"),
        ("DECLINE", "DECLINE"),
        ("=HIGH", "=HIGH"),
        ("DECLINE=", "DECLINE="),
        ("score>=abc=LOW", "score>=abc=LOW"),
        ("score>=1.5=LOW", "score>=1.5=LOW"),
        ("score>=-0.1=LOW", "score>=-0.1=LOW"),
        ("score>=nan=LOW", "score>=nan=LOW"),
        ("score<0.3=LOW", "score<0.3=LOW"),
        ("score>=0.3", "score>=0.3"),
        ("score=LOW", "score=LOW"),
        ("DECLINE=HIGH,decline=LOW", "decline=LOW"),
        ("score>=0.3=LOW,score>=0.30=HIGH", "score>=0.30=HIGH"),
    ],
)
def test_malformed_policy_names_variable_and_term(text: str, culprit: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_policy(text)
    assert "ALERT_POLICY" in str(info.value)
    assert repr(culprit) in str(info.value)


@pytest.mark.parametrize("text", ["", "   ", "DECLINE=HIGH,,REVIEW=LOW", "DECLINE=HIGH,"])
def test_empty_policy_or_term_is_an_error(text: str) -> None:
    with pytest.raises(ConfigError, match="ALERT_POLICY"):
        parse_policy(text)


def test_band_and_decision_of_same_severity_coexist() -> None:
    policy = parse_policy("score>=0.3=LOW,score>0.3=MEDIUM,APPROVE=LOW")
    assert policy.severity_for(APPROVE, 0.3) == LOW
    assert policy.severity_for(APPROVE, 0.31) == MEDIUM


def _reason(
    code: str, source: scoring_pb2.Reason.Source = scoring_pb2.Reason.SOURCE_RULE
) -> scoring_pb2.Reason:
    return scoring_pb2.Reason(code=code, text=code.lower(), contribution=1.0, source=source)


def test_suppression_code_is_the_top_acted_on_reason() -> None:
    shadow = scoring_pb2.Reason.SOURCE_SHADOW_RULE
    assert suppression_code([_reason("VELOCITY_1M"), _reason("MODEL_AMOUNT")]) == "VELOCITY_1M"
    assert suppression_code([_reason("NEW_RULE", shadow), _reason("MODEL_AMOUNT")]) == (
        "MODEL_AMOUNT"
    )
    assert suppression_code([_reason("NEW_RULE", shadow)]) == NO_REASON_CODE
    assert suppression_code([_reason("")]) == NO_REASON_CODE
    assert suppression_code([]) == NO_REASON_CODE


def test_alert_id_is_deterministic_per_transaction() -> None:
    assert alert_id_for("tx-1") == alert_id_for("tx-1")
    assert alert_id_for("tx-1") != alert_id_for("tx-2")
    # Pinned: alert ids must never change between releases (receivers dedupe by them).
    assert alert_id_for("tx-1") == "5476880f-cc6e-5488-aae3-a0229dbc7fea"


def test_severity_names() -> None:
    assert [severity_name(s) for s in (LOW, MEDIUM, HIGH, CRITICAL, 0)] == [
        "LOW",
        "MEDIUM",
        "HIGH",
        "CRITICAL",
        "UNSPECIFIED",
    ]
