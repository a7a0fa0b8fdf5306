"""The scoring engine without a network: protobuf -> records, one evaluation per batch, the
hot-path encoder byte-compatible with the protobuf API, reloads that keep the old version.

The velocity numbers come from `ReferenceVelocity` (the store's semantics in plain Python), so
these tests need no Redis; tests/integration/test_scoring.py runs the same code against it."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.errors import ModelFileError
from shared.scoring.decision import Decision, ReasonSource, Thresholds, assess_batch
from shared.scoring.engine import (
    DECISION_TO_PROTO,
    SOURCE_TO_PROTO,
    ScoringEngine,
    compute_features,
    event_ms_of,
    transaction_records,
)
from shared.scoring.features import (
    FEATURE_NAMES,
    ReferenceVelocity,
    TransactionView,
    TxRecord,
    VelocityBatch,
    build_feature_matrix,
    features_of,
)
from shared.scoring.model import ModelArtifact, ModelError, save_model
from shared.scoring.reloading import ReloadStatus
from shared.scoring.rules import RuleMode

T0 = 1_700_000_000_000  # 2023-11-14 22:13:20 UTC
D = len(FEATURE_NAMES)

RULES = """
version = "rules-test-1"

[[rule]]
name = "big"
expression = "amount >= 1000"
action = "decline"
reason_code = "BIG"
reason_text = "amount of 1000 or more"
mode = "active"

[[rule]]
name = "burst"
expression = "count_1h >= 3"
action = "review"
reason_code = "BURST"
reason_text = "three or more within an hour"
mode = "active"

[[rule]]
name = "watch_burst"
expression = "count_1h >= 2"
action = "review"
reason_code = "WATCH"
reason_text = "shadow: two or more within an hour"
mode = "shadow"
"""


def make_model(version: str = "model-test-1", bias: float = -4.0) -> ModelArtifact:
    weights = np.zeros(D)
    weights[FEATURE_NAMES.index("amount_log")] = 1.5
    weights[FEATURE_NAMES.index("count_1h")] = 0.8
    weights[FEATURE_NAMES.index("travel_speed_kmh")] = 0.01
    mean = np.zeros(D)
    mean[FEATURE_NAMES.index("amount_log")] = 3.0
    return ModelArtifact(
        version=version,
        feature_names=FEATURE_NAMES,
        mean=mean,
        scale=np.ones(D),
        weights=weights,
        bias=bias,
        trained_at="2026-11-25T00:00:00+00:00",
    )


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    rules = tmp_path / "rules.toml"
    rules.write_text(RULES)
    model = tmp_path / "model.json"
    save_model(make_model(), model)
    return rules, model


@pytest.fixture
def engine(files: tuple[Path, Path]) -> ScoringEngine:
    return ScoringEngine.from_paths(*files, Thresholds(review=0.5, decline=0.85))


def tx(
    index: int,
    *,
    account: str = "acct-1",
    units: int = 1234,
    currency: str = "EUR",
    at_ms: int | None = None,
    location: tuple[float, float] | None = (50.85, 4.35),
    terminal: str = "term-1",
) -> transaction_pb2.Transaction:
    message = transaction_pb2.Transaction(
        transaction_id=f"tx-{index}",
        account_id=account,
        card_id="card-tok-1",
        merchant_id=f"m-{index % 3}",
        merchant_category="5411",
        terminal_id=terminal,
        amount=transaction_pb2.Money(units=units, currency=currency),
        country="BE",
        device_id="dev-1",
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
    )
    message.event_time.FromMilliseconds(T0 + index * 60_000 if at_ms is None else at_ms)
    if location is not None:
        message.latitude, message.longitude = location
    return message


def velocity_of(
    records: Sequence[TxRecord], reference: ReferenceVelocity | None = None
) -> VelocityBatch:
    model = reference or ReferenceVelocity()
    return VelocityBatch.from_results([model.apply(r) for r in records])


# --- protobuf -> records ----------------------------------------------------------------------


def test_records_convert_minor_units_with_the_currency_exponent() -> None:
    eur, jpy, bhd = transaction_records(
        [tx(1, units=1234), tx(2, units=500, currency="JPY"), tx(3, units=1234, currency="BHD")]
    )
    assert (eur.amount, jpy.amount, bhd.amount) == (12.34, 500.0, 1.234)
    # Sums in Redis are exact integers in 1e-4 major units.
    assert (eur.amount_scaled, jpy.amount_scaled, bhd.amount_scaled) == (123400, 5_000_000, 12340)


def test_records_carry_ids_time_and_an_optional_location() -> None:
    message = tx(7, at_ms=T0 + 1234, location=None)
    (record,) = transaction_records([message])
    assert record.event_ms == event_ms_of(message) == T0 + 1234
    assert (record.transaction_id, record.account_id, record.terminal_id) == (
        "tx-7",
        "acct-1",
        "term-1",
    )
    assert record.latitude is None and record.longitude is None
    (located,) = transaction_records([tx(8)])
    assert (located.latitude, located.longitude) == (50.85, 4.35)


def test_a_zero_location_is_a_place_not_a_missing_one() -> None:
    (record,) = transaction_records([tx(1, location=(0.0, 0.0))])
    assert (record.latitude, record.longitude) == (0.0, 0.0)


# --- evaluation -------------------------------------------------------------------------------


def test_evaluate_is_build_feature_matrix_plus_assess_batch(engine: ScoringEngine) -> None:
    messages = [tx(i, units=1000 + 50_000 * (i == 3)) for i in range(5)]
    records = transaction_records(messages)
    velocity = velocity_of(records)
    result = engine.evaluate(records, velocity)
    expected = build_feature_matrix(TransactionView.from_records(records), velocity)
    np.testing.assert_array_equal(result.features, expected)
    np.testing.assert_array_equal(compute_features(records, velocity), expected)
    reference = assess_batch(expected, FEATURE_NAMES, engine.model, engine.rules, engine.thresholds)
    assert result.assessments == reference
    # The scalar reference of the features agrees too (two implementations, one meaning).
    for record, row, res in zip(records, result.features, velocity, strict=True):
        scalar = features_of(record, res)
        assert [scalar[n] for n in FEATURE_NAMES] == pytest.approx(row.tolist(), rel=1e-12)


def test_rules_and_model_act_and_are_reported(engine: ScoringEngine) -> None:
    # A minute apart: WATCH (shadow) fires from the second, BURST (active review) from the
    # third; the fourth, 1,500 EUR, is declined by BIG (>= 1000 major units).
    messages = [tx(0), tx(1), tx(2), tx(3, units=150_000)]
    records = transaction_records(messages)
    result = engine.evaluate(records, velocity_of(records))
    decisions = [a.decision for a in result.assessments]
    assert decisions[0] is Decision.APPROVE
    assert decisions[2] is Decision.REVIEW
    assert decisions[3] is Decision.DECLINE
    third = result.assessments[2]
    sources = [(r.code, r.source) for r in third.reasons]
    assert sources[:2] == [("BURST", ReasonSource.RULE), ("WATCH", ReasonSource.SHADOW_RULE)]
    assert any(r.source is ReasonSource.MODEL for r in third.reasons)
    hits = result.rule_hit_counts()
    assert hits[("big", RuleMode.ACTIVE)] == 1
    assert hits[("burst", RuleMode.ACTIVE)] == 2  # the third and the fourth
    assert hits[("watch_burst", RuleMode.SHADOW)] == 3
    assert result.versions.rules == "rules-test-1"
    assert result.versions.model == "model-test-1"


def test_empty_batch(engine: ScoringEngine) -> None:
    result = engine.evaluate([], VelocityBatch(np.empty((0, 26))))
    assert len(result) == 0
    assert result.rule_hit_counts() == {}
    assert engine.encode([], result, ingested_at_ms=[], scored_at_ms=T0) == []


def test_velocity_rows_must_match_the_records(engine: ScoringEngine) -> None:
    records = transaction_records([tx(1), tx(2)])
    with pytest.raises(ValueError, match="1 velocity rows for 2"):
        engine.evaluate(records, velocity_of(records[:1]))


# --- protobuf out: the API path and the hot-path encoder agree ---------------------------------


def test_to_proto_fills_every_field(engine: ScoringEngine) -> None:
    messages = [tx(0), tx(1), tx(2)]
    records = transaction_records(messages)
    result = engine.evaluate(records, velocity_of(records))
    scored = engine.to_proto(
        messages[2], result.assessments[2], ingested_at_ms=T0 + 5, scored_at_ms=T0 + 99
    )
    assert scored.transaction == messages[2]
    assert scored.score == result.assessments[2].score
    assert scored.decision == scoring_pb2.DECISION_REVIEW
    assert dict(scored.features) == result.assessments[2].features
    assert list(scored.features) != [] and set(scored.features) == set(FEATURE_NAMES)
    assert [r.code for r in scored.reasons][:2] == ["BURST", "WATCH"]
    assert scored.reasons[1].source == scoring_pb2.Reason.SOURCE_SHADOW_RULE
    assert (scored.model_version, scored.rules_version) == ("model-test-1", "rules-test-1")
    assert scored.ingested_at.ToMilliseconds() == T0 + 5
    assert scored.scored_at.ToMilliseconds() == T0 + 99
    assert not scored.degraded


def test_every_enum_has_a_protobuf_value() -> None:
    assert {scoring_pb2.Decision.Name(v) for v in DECISION_TO_PROTO.values()} == {
        f"DECISION_{d.value}" for d in Decision
    }
    assert {scoring_pb2.Reason.Source.Name(v) for v in SOURCE_TO_PROTO.values()} == {
        f"SOURCE_{s.value.upper()}" for s in ReasonSource
    }


def test_encoder_bytes_parse_to_the_api_message(engine: ScoringEngine) -> None:
    messages = [tx(i, units=700 + 40_000 * (i % 4 == 3)) for i in range(12)]
    raw = [m.SerializeToString(deterministic=True) for m in messages]
    records = transaction_records(messages)
    result = engine.evaluate(records, velocity_of(records))
    entered: list[int | None] = [T0 + i for i in range(12)]
    entered[5] = None  # a record without a timestamp: no ingested_at
    encoded = engine.encode(raw, result, ingested_at_ms=entered, scored_at_ms=T0 + 10_123)
    expected = engine.to_protos(messages, result, ingested_at_ms=entered, scored_at_ms=T0 + 10_123)
    for enc, message in zip(encoded, expected, strict=True):
        assert scoring_pb2.ScoredTransaction.FromString(enc.full) == message
        slim = scoring_pb2.ScoredTransaction.FromString(enc.core)
        assert len(slim.features) == 0
        message.ClearField("features")
        assert slim == message
    assert not scoring_pb2.ScoredTransaction.FromString(encoded[5].full).HasField("ingested_at")


def test_encoder_marks_degraded_answers(engine: ScoringEngine) -> None:
    records = transaction_records([tx(1)])
    result = engine.evaluate(records, velocity_of(records))
    (enc,) = engine.encode(
        [tx(1).SerializeToString()], result, ingested_at_ms=[T0], scored_at_ms=T0, degraded=True
    )
    assert scoring_pb2.ScoredTransaction.FromString(enc.full).degraded


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(1, 10**9),  # minor units
            st.sampled_from(["EUR", "JPY", "BHD", "USD"]),
            st.integers(0, 10 * 86_400_000),  # offset of the event time
            st.one_of(st.none(), st.tuples(st.floats(-89, 89), st.floats(-179, 179))),
            st.one_of(st.none(), st.integers(0, 2**41)),  # ingested_at ms
            st.sampled_from(["acct-a", "acct-b", "acct-ü"]),
        ),
        min_size=1,
        max_size=25,
    ),
    st.integers(0, 2**41),
)
def test_encoder_matches_the_api_on_any_batch(
    rows: list[tuple[int, str, int, tuple[float, float] | None, int | None, str]],
    scored_at: int,
) -> None:
    directory = Path(os.environ.get("TMPDIR", "/tmp"))
    engine = _shared_engine(directory)
    ordered = sorted(rows, key=lambda r: r[2])
    messages = [
        tx(i, units=u, currency=c, at_ms=T0 + off, location=loc, account=acct)
        for i, (u, c, off, loc, _, acct) in enumerate(ordered)
    ]
    records = transaction_records(messages)
    result = engine.evaluate(records, velocity_of(records))
    entered = [r[4] for r in ordered]
    raw = [m.SerializeToString(deterministic=True) for m in messages]
    encoded = engine.encode(raw, result, ingested_at_ms=entered, scored_at_ms=scored_at)
    expected = engine.to_protos(messages, result, ingested_at_ms=entered, scored_at_ms=scored_at)
    for enc, message in zip(encoded, expected, strict=True):
        parsed = scoring_pb2.ScoredTransaction.FromString(enc.full)
        if all(math.isfinite(v) for v in message.features.values()):
            assert parsed == message
        else:  # NaN != NaN: compare the bytes of the re-serialized messages instead
            assert parsed.SerializeToString(deterministic=True) == message.SerializeToString(
                deterministic=True
            )


_ENGINES: dict[str, ScoringEngine] = {}


def _shared_engine(directory: Path) -> ScoringEngine:
    # Hypothesis runs the test body many times; the files are written once per session.
    key = str(directory)
    if key not in _ENGINES:
        rules = directory / f"fraudstream-test-engine-{os.getpid()}.toml"
        model = directory / f"fraudstream-test-engine-{os.getpid()}.json"
        rules.write_text(RULES)
        save_model(make_model(), model)
        _ENGINES[key] = ScoringEngine.from_paths(rules, model)
        rules.unlink()
        model.unlink()
    return _ENGINES[key]


# --- loading and hot reload -------------------------------------------------------------------


def test_a_model_with_other_features_is_refused_at_start(files: tuple[Path, Path]) -> None:
    rules, model = files
    wrong = make_model()
    names = list(FEATURE_NAMES)
    names[0], names[1] = names[1], names[0]
    save_model(
        ModelArtifact(
            version="reordered",
            feature_names=tuple(names),
            mean=wrong.mean,
            scale=wrong.scale,
            weights=wrong.weights,
            bias=wrong.bias,
            trained_at=wrong.trained_at,
        ),
        model,
    )
    with pytest.raises(ModelError, match="reordered: position 0 is 'amount_log'") as caught:
        ScoringEngine.from_paths(rules, model)
    assert isinstance(caught.value, ModelFileError)
    assert str(model) in str(caught.value)


def test_reload_swaps_versions_between_batches_and_keeps_old_on_broken_files(
    engine: ScoringEngine, files: tuple[Path, Path]
) -> None:
    rules, model = files
    records = transaction_records([tx(1)])
    velocity = velocity_of(records)
    assert engine.maybe_reload().reloaded == []

    rules.write_text(RULES.replace("rules-test-1", "rules-test-2"))
    save_model(make_model("model-test-2", bias=-1.0), model)
    outcome = engine.maybe_reload()
    assert [name for name, _ in outcome.reloaded] == ["rules", "model"]
    assert engine.versions.rules == "rules-test-2"
    assert engine.evaluate(records, velocity).versions.model == "model-test-2"

    rules.write_text(RULES.replace("count_1h >= 3", "__import__('os').system('true')"))
    model.write_text("{ not json")
    outcome = engine.maybe_reload()
    assert outcome.rules.status is ReloadStatus.FAILED
    assert outcome.model.status is ReloadStatus.FAILED
    assert [name for name, _ in outcome.failed] == ["rules", "model"]
    assert engine.versions.rules == "rules-test-2"  # the old ones stay in force
    assert engine.versions.model == "model-test-2"
    assert engine.evaluate(records, velocity).assessments[0].model_version == "model-test-2"
    # The same broken files are reported once, not on every batch.
    assert engine.maybe_reload().failed == []


# --- hot-path shortcuts hold to the plain code ------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(
    st.integers(-(2**40), 2**40),
    st.sampled_from(["EUR", "JPY", "BHD", "CLF", " eur", "XXQ", ""]),
    st.integers(-(2**35), 2**35),
    st.integers(0, 999_999_999),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True)),
)
def test_from_proto_builds_what_the_constructor_builds(
    units: int, currency: str, seconds: int, nanos: int, lat: float | None, lon: float | None
) -> None:
    message = tx(1, units=units, currency=currency, location=None)
    message.event_time.seconds, message.event_time.nanos = seconds, nanos
    if lat is not None:
        message.latitude = lat
    if lon is not None:
        message.longitude = lon
    event_ms = seconds * 1000 + nanos // 1_000_000
    try:
        expected = TxRecord(
            transaction_id=message.transaction_id,
            account_id=message.account_id,
            event_ms=event_ms,
            amount_minor=units,
            currency=currency,
            merchant_id=message.merchant_id,
            country=message.country,
            device_id=message.device_id,
            terminal_id=message.terminal_id,
            latitude=lat if lat is not None and lon is not None else None,
            longitude=lon if lat is not None and lon is not None else None,
        )
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e))):
            TxRecord.from_proto(message)
        return
    record = TxRecord.from_proto(message)
    assert record == expected
    assert (record.amount, record.amount_scaled) == (expected.amount, expected.amount_scaled)
    assert (record.latitude, record.longitude) == (expected.latitude, expected.longitude)


def test_encoder_writes_system_reasons_like_the_api(engine: ScoringEngine) -> None:
    messages = [tx(i, units=700 + 40_000 * (i % 2)) for i in range(4)]
    records = transaction_records(messages)
    velocity = velocity_of(records)
    velocity.raw[1, 1] = np.inf  # count_1m: a non-finite feature, a SYSTEM reason
    velocity.raw[2, 1] = np.nan
    result = engine.evaluate(records, velocity)
    assert result.assessments[1].reasons[1].source is ReasonSource.SYSTEM  # after BIG
    assert result.decisions == [a.decision for a in result.assessments]
    raw = [m.SerializeToString(deterministic=True) for m in messages]
    encoded = engine.encode(raw, result, ingested_at_ms=[0, 1, 999, None], scored_at_ms=T0)
    expected = engine.to_protos(messages, result, ingested_at_ms=[0, 1, 999, None], scored_at_ms=T0)
    for enc, message in zip(encoded, expected, strict=True):
        parsed = scoring_pb2.ScoredTransaction.FromString(enc.full)
        assert parsed.SerializeToString(deterministic=True) == message.SerializeToString(
            deterministic=True
        )
