"""Feature maths and window semantics, pure: no Redis (the reference model defines the numbers the
Lua scripts must produce; tests/integration/test_velocity.py holds the scripts to it)."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protos.fraud.v1 import transaction_pb2
from shared.scoring.features import (
    APPLIED,
    DAY_MS,
    DUPLICATE,
    FEATURE_NAMES,
    HOUR_MS,
    LATE,
    MINUTE_MS,
    NO_TERMINAL,
    RAW_COLUMNS,
    LabelRecord,
    ReferenceVelocity,
    TransactionView,
    TxRecord,
    VelocityBatch,
    VelocityConfig,
    VelocityResult,
    build_feature_matrix,
    features_of,
    haversine_km,
    reference_features,
    reference_result,
)

# Wednesday 2024-05-15 12:00:00 UTC
T0 = int(datetime(2024, 5, 15, 12, tzinfo=UTC).timestamp() * 1000)
_ids = iter(range(10**9))


def tx(
    t: int,
    amount: int = 1000,
    *,
    account: str = "a",
    merchant: str = "m1",
    country: str = "FR",
    device: str = "",
    terminal: str = "",
    lat: float | None = None,
    lon: float | None = None,
    currency: str = "EUR",
    tid: str | None = None,
) -> TxRecord:
    return TxRecord(
        transaction_id=tid or f"tx{next(_ids)}",
        account_id=account,
        event_ms=t,
        amount_minor=amount,
        currency=currency,
        merchant_id=merchant,
        country=country,
        device_id=device,
        terminal_id=terminal,
        latitude=lat,
        longitude=lon,
    )


def apply_all(model: ReferenceVelocity, txs: list[TxRecord]) -> list[VelocityResult]:
    return [model.apply(x) for x in txs]


# ---- names, config, records


def test_feature_names_are_the_agreed_contract() -> None:
    assert FEATURE_NAMES == (
        "amount",
        "amount_log",
        "is_weekend",
        "is_night",
        "count_1m",
        "count_1h",
        "count_24h",
        "count_7d",
        "count_30d",
        "sum_1m",
        "sum_1h",
        "sum_24h",
        "sum_7d",
        "sum_30d",
        "avg_amount_7d",
        "avg_amount_30d",
        "amount_ratio_30d",
        "distinct_merchants_24h",
        "distinct_countries_24h",
        "distinct_devices_24h",
        "seconds_since_last",
        "travel_speed_kmh",
        "first_time_merchant",
        "terminal_count_1d",
        "terminal_count_7d",
        "terminal_count_30d",
        "terminal_risk_1d",
        "terminal_risk_7d",
        "terminal_risk_30d",
    )


def test_config_derives_retention_from_the_late_tolerance() -> None:
    config = VelocityConfig(late_tolerance_ms=2 * DAY_MS, label_delay_ms=7 * DAY_MS)
    assert config.quarter_retention == 28 + 8 + 1  # 7 d of 6 h buckets + 48 h
    assert config.day_retention == 30 + 2 + 1
    assert config.terminal_day_retention == 30 + 7 + 2 + 1
    assert config.ttl_ms > config.merchant_retention_ms + config.ttl_refresh_ms
    assert VelocityConfig.from_label_delay_s(86_400).label_delay_ms == DAY_MS


@pytest.mark.parametrize(
    "overrides",
    [
        {"late_tolerance_ms": HOUR_MS},  # the exact 24 h window needs 24 h of ids
        {"account_id_cap": 0},
        {"label_delay_ms": -1},
        {"prune_every_ms": 1000},
        {"late_scan": 0},
    ],
)
def test_config_rejects_values_that_break_the_semantics(overrides: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        VelocityConfig(**overrides)


@pytest.mark.parametrize(
    ("units", "currency", "major", "scaled"),
    [(1234, "EUR", 12.34, 123_400), (500, "JPY", 500.0, 5_000_000), (1234, "BHD", 1.234, 12_340)],
)
def test_amounts_become_major_units_and_exact_scaled_integers(
    units: int, currency: str, major: float, scaled: int
) -> None:
    record = tx(T0, units, currency=currency)
    assert record.amount == pytest.approx(major)
    assert record.amount_scaled == scaled


def test_an_unknown_currency_falls_back_to_two_decimals() -> None:
    assert tx(T0, 1234, currency="XXQ").amount == pytest.approx(12.34)


@pytest.mark.parametrize(
    ("lat", "lon"), [(None, 2.0), (48.0, None), (math.nan, 2.0), (48.0, math.inf)]
)
def test_a_partial_or_non_finite_location_is_no_location(
    lat: float | None, lon: float | None
) -> None:
    record = tx(T0, lat=lat, lon=lon)
    assert record.latitude is None and record.longitude is None and not record.located


def test_event_times_outside_the_supported_range_are_refused() -> None:
    with pytest.raises(ValueError):
        tx(-1)
    with pytest.raises(ValueError):
        tx(10**13)


def test_records_from_the_protobuf_messages() -> None:
    message = transaction_pb2.Transaction(
        transaction_id="t1",
        account_id="a1",
        merchant_id="m1",
        terminal_id="T1",
        country="FR",
        device_id="d1",
        amount=transaction_pb2.Money(units=1234, currency="EUR"),
        latitude=48.5,
        longitude=2.25,
    )
    message.event_time.FromMilliseconds(T0 + 7)
    record = TxRecord.from_proto(message)
    assert (record.transaction_id, record.account_id, record.event_ms) == ("t1", "a1", T0 + 7)
    assert (record.amount, record.amount_scaled) == (12.34, 123_400)
    assert (record.latitude, record.longitude) == (48.5, 2.25)
    assert (record.merchant_id, record.terminal_id, record.device_id) == ("m1", "T1", "d1")
    message.ClearField("longitude")  # half a location is no location
    assert TxRecord.from_proto(message).latitude is None

    label = transaction_pb2.Label(transaction_id="t1", terminal_id="T1", is_fraud=True)
    label.reported_at.FromMilliseconds(T0 + 7 * DAY_MS)
    # Label carries no event time (yet): the report time stands in
    assert LabelRecord.from_proto(label) == LabelRecord("t1", "T1", True, T0 + 7 * DAY_MS)


# ---- scalar maths


def test_haversine_known_distances() -> None:
    paris, london = (48.8566, 2.3522), (51.5074, -0.1278)
    assert haversine_km(*paris, *london) == pytest.approx(343.5, abs=1.0)
    assert haversine_km(*paris, *paris) == 0.0
    assert haversine_km(0.0, 0.0, 0.0, 180.0) == pytest.approx(math.pi * 6371.0088, rel=1e-9)


def test_no_history_defaults() -> None:
    record = tx(T0, 5000, lat=48.0, lon=2.0)
    f = reference_features([], record)
    assert f["count_1m"] == f["count_30d"] == 1.0
    assert f["sum_30d"] == f["avg_amount_30d"] == f["amount"] == 50.0
    assert f["amount_ratio_30d"] == 1.0
    assert f["seconds_since_last"] == 30 * 86_400.0
    assert f["travel_speed_kmh"] == 0.0
    assert f["first_time_merchant"] == 1.0
    assert f["distinct_merchants_24h"] == f["distinct_countries_24h"] == 1.0
    assert f["distinct_devices_24h"] == 0.0  # no device id: not a member
    assert f["terminal_count_30d"] == f["terminal_risk_30d"] == 0.0


def test_weekend_and_night_are_utc() -> None:
    saturday_0630 = int(datetime(2024, 5, 18, 6, 30, tzinfo=UTC).timestamp() * 1000)
    friday_0700 = int(datetime(2024, 5, 17, 7, 0, tzinfo=UTC).timestamp() * 1000)
    sunday_2359 = int(datetime(2024, 5, 19, 23, 59, tzinfo=UTC).timestamp() * 1000)
    monday_0000 = int(datetime(2024, 5, 20, 0, 0, tzinfo=UTC).timestamp() * 1000)
    cases = [(saturday_0630, 1, 1), (friday_0700, 0, 0), (sunday_2359, 1, 0), (monday_0000, 0, 1)]
    for t, weekend, night in cases:
        f = reference_features([], tx(t))
        assert (f["is_weekend"], f["is_night"]) == (weekend, night), datetime.fromtimestamp(t / 1e3)


def test_amount_ratio_compares_with_the_previous_average() -> None:
    history = [tx(T0 - 3 * HOUR_MS, 1000), tx(T0 - 2 * HOUR_MS, 3000)]
    f = reference_features(history, tx(T0, 10_000))
    assert f["amount_ratio_30d"] == pytest.approx(100.0 / 20.0)
    # a zero previous average is floored at 0.01 rather than dividing by zero
    f = reference_features([tx(T0 - HOUR_MS, 0)], tx(T0, 100))
    assert f["amount_ratio_30d"] == pytest.approx(1.0 / 0.01)


def test_travel_speed_from_the_previous_located_transaction() -> None:
    paris = tx(T0 - HOUR_MS, lat=48.8566, lon=2.3522)
    unlocated = tx(T0 - 30 * MINUTE_MS)
    london = tx(T0, lat=51.5074, lon=-0.1278)
    f = reference_features([paris, unlocated], london)
    assert f["travel_speed_kmh"] == pytest.approx(343.5, abs=1.0)  # 343.5 km in one hour
    assert f["seconds_since_last"] == 1800.0  # the previous one, located or not


def test_travel_speed_guards_tiny_elapsed_times() -> None:
    paris = tx(T0, lat=48.8566, lon=2.3522)
    london = tx(T0 + 10, lat=51.5074, lon=-0.1278)  # 10 ms later counts as 1 s
    f = reference_features([paris], london)
    assert f["travel_speed_kmh"] == pytest.approx(343.5 * 3600, rel=0.01)
    assert f["seconds_since_last"] == pytest.approx(0.01)


def test_first_time_merchant_looks_back_30_days() -> None:
    seen = tx(T0 - 29 * DAY_MS, merchant="shop")
    assert reference_features([seen], tx(T0, merchant="shop"))["first_time_merchant"] == 0.0
    old = tx(T0 - 31 * DAY_MS, merchant="shop")
    assert reference_features([old], tx(T0, merchant="shop"))["first_time_merchant"] == 1.0
    assert reference_features([], tx(T0, merchant=""))["first_time_merchant"] == 0.0


# ---- windows


def test_exact_windows_end_at_the_transaction_and_exclude_their_start() -> None:
    history = [
        tx(T0 - MINUTE_MS, 1),  # exactly 1 min before: out of the 1 min window
        tx(T0 - MINUTE_MS + 1, 10),
        tx(T0 - HOUR_MS, 100),
        tx(T0 - HOUR_MS + 1, 1000),
        tx(T0 - DAY_MS, 10_000),
        tx(T0 - DAY_MS + 1, 100_000),
    ]
    r = reference_result(history, tx(T0, 1_000_000))
    assert (r.count_1m, r.sum_1m_scaled) == (2, (10 + 1_000_000) * 100)
    assert (r.count_1h, r.sum_1h_scaled) == (4, (1 + 10 + 1000 + 1_000_000) * 100)
    assert r.count_24h == 6


def test_seven_and_thirty_days_are_bucketed() -> None:
    # 7 d = the last 28 six-hour buckets; 30 d = the last 30 UTC days (including today)
    start_of_day = T0 - T0 % DAY_MS
    history = [
        tx(start_of_day - 29 * DAY_MS),  # first day of the 30 d window
        tx(start_of_day - 29 * DAY_MS - 1),  # the day before: out
        tx(T0 - T0 % (6 * HOUR_MS) - 27 * 6 * HOUR_MS),  # first 6 h bucket of 7 d
        tx(T0 - T0 % (6 * HOUR_MS) - 27 * 6 * HOUR_MS - 1),  # out of 7 d
    ]
    r = reference_result(history, tx(T0))
    assert r.count_7d == 2
    assert r.count_30d == 4


def test_an_out_of_order_transaction_lands_in_its_own_windows() -> None:
    model = ReferenceVelocity()
    apply_all(model, [tx(T0 - 2 * HOUR_MS, 100), tx(T0, 200)])
    late = model.apply(tx(T0 - 2 * HOUR_MS + 30_000, 400))  # 30 s after the first
    assert late.status == APPLIED
    assert (late.count_1m, late.sum_1m_scaled) == (2, 50_000)  # itself and the first one
    assert late.count_24h == 2  # a window ending at its time does not see the later one...
    assert late.prev_event_ms == T0 - 2 * HOUR_MS  # ...and its previous is by event time
    nxt = model.apply(tx(T0 + 1000, 800))
    assert nxt.count_24h == 4 and nxt.sum_24h_scaled == 150_000  # ...but later ones count it
    assert nxt.prev_event_ms == T0


def test_a_late_transaction_sees_distinct_members_seen_after_it() -> None:
    model = ReferenceVelocity()
    apply_all(model, [tx(T0 - HOUR_MS, merchant="m1"), tx(T0, merchant="m2")])
    late = model.apply(tx(T0 - 2 * HOUR_MS, merchant="m3"))
    assert late.distinct_merchants_24h == 3
    assert late.merchant_last_ms is None  # m3 never seen before


def test_duplicates_return_the_first_result_and_count_nothing() -> None:
    model = ReferenceVelocity()
    first = tx(T0, 1000)
    r1 = model.apply(first)
    model.apply(tx(T0 + 1000, 2000))
    r2 = model.apply(first)
    assert r2.status == DUPLICATE
    assert r2.account_values() == r1.account_values()
    assert model.apply(tx(T0 + 2000, 1)).count_1m == 3  # not 4


def test_beyond_the_horizon_is_late_scored_not_counted_and_stable() -> None:
    config = VelocityConfig(late_tolerance_ms=DAY_MS)
    model = ReferenceVelocity(config)
    model.apply(tx(T0, 1000))
    too_late = tx(T0 - DAY_MS, 5000)  # at the horizon: t <= wm - late
    r1 = model.apply(too_late)
    assert r1.status == LATE and r1.count_30d == 1  # scored as if added (the other is later)...
    assert model.apply(tx(T0 + 1, 1)).count_30d == 2  # ...never counted
    assert model.apply(too_late).account_values() == r1.account_values()  # replay: same


def test_the_id_cap_raises_the_horizon_so_evicted_ids_are_never_recounted() -> None:
    config = VelocityConfig(account_id_cap=3)
    model = ReferenceVelocity(config)
    txs = [tx(T0 + i * 1000, 100) for i in range(5)]
    apply_all(model, txs)
    assert model.apply(txs[0]).status == LATE  # evicted: its time is at/before the floor
    assert model.apply(txs[4]).status == DUPLICATE
    r = model.apply(tx(T0 + 10_000, 100))
    assert r.count_1m == 4  # the exact windows count the retained ids (cap 3) plus itself
    assert r.count_30d == 6  # buckets are not capped


def test_the_merchant_cap_evicts_the_least_recently_seen() -> None:
    model = ReferenceVelocity(VelocityConfig(merchant_cap=2))
    apply_all(model, [tx(T0, merchant="a"), tx(T0 + 1, merchant="b"), tx(T0 + 2, merchant="a")])
    model.apply(tx(T0 + 3, merchant="c"))  # evicts b, seen least recently
    assert model.apply(tx(T0 + 4, merchant="a")).merchant_last_ms == T0 + 2
    assert model.apply(tx(T0 + 5, merchant="b")).merchant_last_ms is None  # evicts c
    assert model.apply(tx(T0 + 6, merchant="c")).merchant_last_ms is None


def test_previous_of_an_out_of_order_transaction_is_the_newest_before_it() -> None:
    model = ReferenceVelocity()
    apply_all(
        model,
        [tx(T0, lat=10.0, lon=10.0), tx(T0 + HOUR_MS), tx(T0 + 3 * HOUR_MS, lat=20.0, lon=20.0)],
    )
    late = model.apply(tx(T0 + 2 * HOUR_MS, lat=11.0, lon=10.0))
    assert late.prev_event_ms == T0 + HOUR_MS
    assert late.prev_located_ms == T0 and late.prev_latitude == 10.0


# ---- terminals and labels


def test_terminal_risk_uses_the_delayed_windows() -> None:
    config = VelocityConfig(label_delay_ms=7 * DAY_MS)
    model = ReferenceVelocity(config)
    day = T0 - T0 % DAY_MS
    olds = [tx(day - 10 * DAY_MS + i * HOUR_MS, account=f"c{i}", terminal="T") for i in range(4)]
    apply_all(model, olds)
    recent = tx(day - 2 * DAY_MS, account="x", terminal="T")  # inside the delay: not counted
    model.apply(recent)
    assert model.apply_label(LabelRecord(olds[0].transaction_id, "T", True, olds[0].event_ms))
    assert model.apply_label(LabelRecord(recent.transaction_id, "T", True, recent.event_ms))
    r = model.apply(tx(T0, account="y", terminal="T"))
    assert (r.terminal_count_1d, r.terminal_count_7d, r.terminal_count_30d) == (0, 4, 4)
    assert (r.terminal_fraud_7d, r.terminal_fraud_30d) == (1, 1)
    f = features_of(tx(T0, terminal="T"), r)
    assert f["terminal_risk_7d"] == 0.25 and f["terminal_risk_1d"] == 0.0


def test_labels_are_idempotent_and_can_be_withdrawn() -> None:
    model = ReferenceVelocity()
    old = tx(T0 - 10 * DAY_MS, terminal="T")
    model.apply(old)
    label = LabelRecord(old.transaction_id, "T", True, old.event_ms)
    assert model.apply_label(label) is True
    assert model.apply_label(label) is False  # replay: nothing changes
    r1 = model.peek(tx(T0, terminal="T"))
    assert r1.terminal_fraud_30d == 1
    withdrawn = LabelRecord(old.transaction_id, "T", False, old.event_ms)
    assert model.apply_label(withdrawn) is True
    assert model.peek(tx(T0, terminal="T")).terminal_fraud_30d == 0
    assert model.apply_label(LabelRecord("never", "", True, T0)) is False  # no terminal


def test_a_transaction_without_terminal_has_no_terminal_numbers() -> None:
    r = ReferenceVelocity().apply(tx(T0))
    assert r.terminal_status == NO_TERMINAL and r.terminal_values() == (0.0,) * 6


# ---- the vectorized matrix against the scalar maths


def _random_result(draw: st.DrawFn, record: TxRecord) -> VelocityResult:
    counts = sorted(draw(st.integers(1, 50)) for _ in range(5))
    sums = [draw(st.integers(0, 10**9)) for _ in range(5)]
    sums[4] = max(sums[4], record.amount_scaled)  # 30 d includes the transaction itself
    optional_ms = st.none() | st.integers(record.event_ms - 40 * DAY_MS, record.event_ms)
    has_prev_loc = draw(st.booleans())
    tcounts = [draw(st.integers(0, 20)) for _ in range(3)]
    return VelocityResult(
        status=draw(st.sampled_from([APPLIED, DUPLICATE, LATE])),
        count_1m=counts[0],
        sum_1m_scaled=sums[0],
        count_1h=counts[1],
        sum_1h_scaled=sums[1],
        count_24h=counts[2],
        sum_24h_scaled=sums[2],
        count_7d=counts[3],
        sum_7d_scaled=sums[3],
        count_30d=counts[4],
        sum_30d_scaled=sums[4],
        distinct_merchants_24h=draw(st.integers(0, 9)),
        distinct_countries_24h=draw(st.integers(0, 9)),
        distinct_devices_24h=draw(st.integers(0, 9)),
        prev_event_ms=draw(optional_ms),
        prev_located_ms=draw(optional_ms) if has_prev_loc else None,
        prev_latitude=draw(st.floats(-90, 90)) if has_prev_loc else None,
        prev_longitude=draw(st.floats(-180, 180)) if has_prev_loc else None,
        merchant_last_ms=draw(optional_ms),
        terminal_status=draw(st.sampled_from([NO_TERMINAL, APPLIED])),
        terminal_count_1d=tcounts[0],
        terminal_count_7d=tcounts[1],
        terminal_count_30d=tcounts[2],
        terminal_fraud_1d=draw(st.integers(0, 25)),
        terminal_fraud_7d=draw(st.integers(0, 25)),
        terminal_fraud_30d=draw(st.integers(0, 25)),
    )


@st.composite
def batches(draw: st.DrawFn) -> tuple[list[TxRecord], list[VelocityResult]]:
    n = draw(st.integers(1, 12))
    records, results = [], []
    for _ in range(n):
        located = draw(st.booleans())
        record = tx(
            draw(st.integers(0, 4 * 10**12)),
            draw(st.integers(0, 10**8)),
            merchant=draw(st.sampled_from(["", "m"])),
            currency=draw(st.sampled_from(["EUR", "JPY", "KWD"])),
            lat=draw(st.floats(-90, 90)) if located else None,
            lon=draw(st.floats(-180, 180)) if located else None,
        )
        records.append(record)
        results.append(_random_result(draw, record))
    return records, results


@settings(max_examples=200, deadline=None)
@given(batches())
def test_the_vectorized_matrix_equals_the_scalar_maths(
    batch: tuple[list[TxRecord], list[VelocityResult]],
) -> None:
    records, results = batch
    matrix = build_feature_matrix(
        TransactionView.from_records(records), VelocityBatch.from_results(results)
    )
    assert matrix.shape == (len(records), len(FEATURE_NAMES)) and matrix.dtype == np.float64
    for i, (record, result) in enumerate(zip(records, results, strict=True)):
        expected = features_of(record, result)
        for j, name in enumerate(FEATURE_NAMES):
            assert matrix[i, j] == pytest.approx(expected[name], rel=1e-9, abs=1e-9), name


def test_the_matrix_accepts_results_as_objects_a_batch_or_a_raw_array() -> None:
    records = [tx(T0, 100), tx(T0 + 1, 200, lat=1.0, lon=1.0)]
    model = ReferenceVelocity()
    results = apply_all(model, records)
    view = TransactionView.from_records(records)
    batch = VelocityBatch.from_results(results)
    a = build_feature_matrix(view, results)
    assert np.array_equal(a, build_feature_matrix(view, batch))
    assert np.array_equal(a, build_feature_matrix(view, batch.raw))
    with pytest.raises(ValueError):
        build_feature_matrix(view, batch[:1])


def test_velocity_batch_is_a_sequence_of_results() -> None:
    results = apply_all(ReferenceVelocity(), [tx(T0), tx(T0 + 5)])
    batch = VelocityBatch.from_results(results)
    assert len(batch) == 2 and list(batch) == results and batch[1] == results[1]
    assert batch.raw.shape == (2, len(RAW_COLUMNS))
    assert batch.statuses.tolist() == [APPLIED, APPLIED]
    assert len(VelocityBatch.from_results([])) == 0
    assert VelocityResult.from_row(results[0].to_row()) == results[0]
