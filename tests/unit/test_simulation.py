"""The workload simulator: reproducible, ordered, and every fraud scenario does what it says."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from itertools import combinations, islice
from pathlib import Path

import numpy as np
import pytest

from shared.errors import ConfigError, InputError
from shared.simulation import (
    CHANNEL_CARD_PRESENT,
    CHANNEL_ECOMMERCE,
    LABEL_SOURCE,
    FraudScenario,
    SimDay,
    SimLabel,
    SimTransaction,
    SimulationConfig,
    days,
    generate,
    grid_country,
    grid_to_latlon,
    interleave_labels,
    label_for,
    labels,
    read_jsonl,
    simulate,
    write_jsonl,
)

SMALL = SimulationConfig(seed=7, n_customers=200, n_terminals=400, n_days=10)
FAR_COUNTRIES = {"US", "BR", "JP", "NG", "TH"}
HOME_COUNTRIES = {"BE", "NL", "DE"}


def _km(a: SimTransaction, b: SimTransaction) -> float:
    assert a.latitude is not None and a.longitude is not None
    assert b.latitude is not None and b.longitude is not None
    lat1, lat2 = math.radians(a.latitude), math.radians(b.latitude)
    dlat, dlon = lat2 - lat1, math.radians(b.longitude - a.longitude)
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def _at(latitude: float, longitude: float) -> SimTransaction:
    return SimTransaction(
        "", "", "", "", "", "", 1, "EUR", SMALL.start, "", latitude, longitude, "", "", "",
        False, 0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def small_days() -> list[SimDay]:
    return list(simulate(SMALL))


@pytest.fixture(scope="module")
def small_stream(small_days: list[SimDay]) -> list[SimTransaction]:
    return [tx for day in small_days for tx in day.transactions]


def test_same_seed_gives_the_same_stream() -> None:
    first = list(islice(generate(SMALL), 1000))
    again = list(islice(generate(SMALL), 1000))
    assert len(first) == 1000
    assert first == again


def test_another_seed_gives_another_stream() -> None:
    first = list(islice(generate(SMALL), 1000))
    other = list(islice(generate(SimulationConfig(seed=8, n_customers=200, n_terminals=400)), 1000))
    assert first != other


def test_first_days_do_not_depend_on_the_length_of_the_run() -> None:
    short = SimulationConfig(seed=7, n_customers=200, n_terminals=400, n_days=3)
    assert [tx for _, day in days(short) for tx in day] == [
        tx for _, day in islice(days(SMALL), 3) for tx in day
    ]


def test_stream_is_in_event_time_order_with_increasing_ids(small_days: list[SimDay]) -> None:
    previous: datetime | None = None
    seq = 0
    for index, day in enumerate(small_days):
        assert day.index == index
        assert day.day == (SMALL.start + timedelta(days=index)).date()
        for tx in day.transactions:
            assert tx.event_time.tzinfo is UTC
            assert tx.event_time.date() == day.day
            assert previous is None or tx.event_time >= previous
            assert tx.transaction_id == f"tx-{seq:010d}"
            previous = tx.event_time
            seq += 1
    # About 200 customers x 2 a day x 10 days, less those out of reach of any terminal.
    assert 2500 < seq < 5000


def test_days_and_generate_agree(small_stream: list[SimTransaction]) -> None:
    assert [tx for _, day in days(SMALL) for tx in day] == small_stream
    assert list(generate(SMALL)) == small_stream


def test_records_are_well_formed(small_stream: list[SimTransaction]) -> None:
    for tx in small_stream:
        assert isinstance(tx.amount_minor, int) and tx.amount_minor > 0
        assert tx.currency == "EUR"
        assert len(tx.merchant_category) == 4 and tx.merchant_category.isdigit()
        assert len(tx.country) == 2 and tx.country.isupper()
        assert tx.is_fraud == (tx.fraud_scenario != FraudScenario.GENUINE)
        assert tx.card_id == tx.account_id.replace("acct-", "card-")
        assert tx.merchant_id.removeprefix("merch-") == tx.terminal_id.removeprefix("term-")
        if tx.channel == CHANNEL_ECOMMERCE:
            assert tx.latitude is None and tx.longitude is None
        else:
            assert tx.channel == CHANNEL_CARD_PRESENT
            assert tx.latitude is not None and tx.longitude is not None
    genuine = [tx for tx in small_stream if tx.fraud_scenario <= 3]
    assert {tx.country for tx in genuine if tx.channel == CHANNEL_CARD_PRESENT} == HOME_COUNTRIES
    online = sum(tx.channel == CHANNEL_ECOMMERCE for tx in genuine) / len(genuine)
    assert 0.06 < online < 0.14  # ecommerce_share = 0.1


def test_customers_only_use_terminals_within_the_radius(
    small_stream: list[SimTransaction],
) -> None:
    # One grid unit is 1 km, so two terminals within 5 of a customer are at most 10 km apart.
    terminals: dict[str, dict[str, SimTransaction]] = defaultdict(dict)
    for tx in small_stream:
        if tx.channel == CHANNEL_CARD_PRESENT and tx.fraud_scenario <= 3:
            terminals[tx.account_id][tx.terminal_id] = tx
    assert terminals
    for used in terminals.values():
        for a, b in combinations(used.values(), 2):
            assert _km(a, b) <= 2 * SMALL.radius * 1.02


def test_every_amount_over_220_eur_is_fraud(small_stream: list[SimTransaction]) -> None:
    high = [tx for tx in small_stream if tx.amount_minor > 22_000]
    assert high
    assert all(tx.is_fraud for tx in high)
    assert any(tx.fraud_scenario == FraudScenario.HIGH_AMOUNT for tx in high)
    assert all(
        tx.amount_minor > 22_000
        for tx in small_stream
        if tx.fraud_scenario == FraudScenario.HIGH_AMOUNT
    )


def test_compromised_terminals_turn_every_payment_there_into_fraud() -> None:
    config = SimulationConfig(
        seed=3, n_customers=300, n_terminals=200, n_days=40, compromised_terminals_per_day=1
    )
    sim = list(simulate(config))
    seen_fraud = 0
    for day in sim:
        assert len(day.compromised_terminals) <= min(day.index + 1, 28)
        for tx in day.transactions:
            at_compromised = (
                tx.terminal_id in day.compromised_terminals and tx.channel == CHANNEL_CARD_PRESENT
            )
            if tx.fraud_scenario == FraudScenario.COMPROMISED_TERMINAL:
                assert at_compromised
                seen_fraud += 1
            if at_compromised:
                assert tx.fraud_scenario in (
                    FraudScenario.COMPROMISED_TERMINAL,
                    FraudScenario.COMPROMISED_CUSTOMER,
                )
    assert seen_fraud > 0
    # A terminal stays compromised for 28 days from the day it is drawn (longer only if it is
    # drawn again meanwhile), so every run of compromised days but one cut by the end is >= 28.
    runs: dict[str, list[int]] = defaultdict(list)
    for day in sim:
        for terminal in day.compromised_terminals:
            runs[terminal].append(day.index)
    for indices in runs.values():
        starts = [i for i in indices if i - 1 not in indices]
        for start in starts:
            length = next(n for n in range(len(sim) + 1) if start + n not in indices)
            assert length >= 28 or start + length == len(sim)


def test_compromised_customers_get_a_third_of_payments_inflated_fivefold() -> None:
    config = SimulationConfig(
        seed=5, n_customers=300, n_terminals=600, n_days=12, compromised_customers_per_day=10
    )
    inflated: list[int] = []
    others: list[int] = []
    for day in simulate(config):
        assert len(day.compromised_accounts) <= 10 * (day.index + 1)
        for tx in day.transactions:
            if tx.fraud_scenario == FraudScenario.COMPROMISED_CUSTOMER:
                assert tx.account_id in day.compromised_accounts
                assert tx.amount_minor % 5 == 0
                inflated.append(tx.amount_minor)
            elif tx.account_id in day.compromised_accounts and tx.fraud_scenario <= 2:
                others.append(tx.amount_minor)
    share = len(inflated) / (len(inflated) + len(others))
    assert 0.27 < share < 0.40
    ratio = float(np.mean(inflated)) / float(np.mean(others))
    assert 4.0 < ratio < 6.5


def test_card_testing_bursts_are_small_fast_and_spread_over_merchants() -> None:
    config = SimulationConfig(
        seed=11, n_customers=200, n_terminals=400, n_days=10, card_testing_bursts_per_day=2.0
    )
    bursts: dict[tuple[str, object], list[SimTransaction]] = defaultdict(list)
    for tx in generate(config):
        if tx.fraud_scenario == FraudScenario.CARD_TESTING:
            bursts[(tx.account_id, tx.event_time.date())].append(tx)
    assert len(bursts) >= 5
    for (account, _), burst in bursts.items():
        assert 8 <= len(burst) <= 20
        assert (burst[-1].event_time - burst[0].event_time).total_seconds() <= 180
        assert len({tx.merchant_id for tx in burst}) == len(burst)
        assert len({tx.device_id for tx in burst}) == 1
        for tx in burst:
            assert tx.is_fraud
            assert 50 <= tx.amount_minor <= 300
            assert tx.channel == CHANNEL_ECOMMERCE
            assert tx.device_id != account.replace("acct-", "dev-")


def test_scenarios_four_and_five_can_be_switched_off() -> None:
    config = SimulationConfig.handbook(seed=11, n_customers=200, n_terminals=400, n_days=10)
    stream = list(generate(config))
    assert {tx.fraud_scenario for tx in stream} <= {0, 1, 2, 3}
    assert {tx.channel for tx in stream} == {CHANNEL_CARD_PRESENT}


def test_impossible_travel_implies_a_speed_over_900_kmh() -> None:
    config = SimulationConfig(
        seed=13, n_customers=200, n_terminals=400, n_days=10, impossible_travel_per_day=3.0
    )
    last_located: dict[str, SimTransaction] = {}
    checked = 0
    for tx in generate(config):
        if tx.latitude is None:
            continue
        previous = last_located.get(tx.account_id)
        last_located[tx.account_id] = tx
        if tx.fraud_scenario != FraudScenario.IMPOSSIBLE_TRAVEL:
            continue
        assert tx.is_fraud and tx.country in FAR_COUNTRIES
        assert previous is not None  # anchored on a payment at home the same day
        if previous.fraud_scenario == FraudScenario.IMPOSSIBLE_TRAVEL:
            continue  # the second use in the same far city is no further travel
        hours = (tx.event_time - previous.event_time).total_seconds() / 3600
        assert 0 < hours <= 2
        assert _km(previous, tx) / hours > 900
        checked += 1
    assert checked >= 10


def test_default_world_fraud_rate_is_plausible() -> None:
    # The handbook's rate is ~0.8% over 183 days; it builds up while compromised terminals
    # accumulate (28 days), so the first 30 days sit a little lower.
    counts = np.zeros(6, dtype=np.int64)
    for tx in generate(SimulationConfig(n_days=30)):
        counts[tx.fraud_scenario] += 1
    rate = counts[1:].sum() / counts.sum()
    assert 0.004 < rate < 0.012
    assert (counts[1:] > 0).all()
    assert counts[2] > counts[1] and counts[3] > counts[1]  # as in the handbook


def test_labels_follow_their_transactions_after_the_delay(
    small_stream: list[SimTransaction],
) -> None:
    tx = small_stream[0]
    label = label_for(tx)
    assert label == SimLabel(
        transaction_id=tx.transaction_id,
        account_id=tx.account_id,
        terminal_id=tx.terminal_id,
        is_fraud=tx.is_fraud,
        source=LABEL_SOURCE,
        reported_at=tx.event_time + timedelta(days=7),
        event_time=tx.event_time,
    )
    released = list(labels(small_stream[:50], timedelta(hours=1)))
    assert [t for t, _ in released] == [
        tx.event_time + timedelta(hours=1) for tx in small_stream[:50]
    ]

    delay = timedelta(hours=6)
    merged = list(interleave_labels(small_stream, delay))
    assert len(merged) == 2 * len(small_stream)
    times = [t for t, _ in merged]
    assert times == sorted(times)
    published: set[str] = set()
    for when, item in merged:
        if isinstance(item, SimTransaction):
            assert when == item.event_time
            published.add(item.transaction_id)
        else:
            assert item.transaction_id in published
            assert item.reported_at == when
    assert published == {tx.transaction_id for tx in small_stream}


def test_jsonl_round_trip(tmp_path: Path, small_stream: list[SimTransaction]) -> None:
    path = tmp_path / "sim.jsonl"
    assert write_jsonl(small_stream, path) == len(small_stream)
    first = json.loads(path.read_text(encoding="utf-8").splitlines()[0])
    assert set(first) == set(SimTransaction.__dataclass_fields__)
    assert first["event_time"].startswith("2018-04-01T")
    assert first["event_time"].endswith("+00:00")
    assert list(read_jsonl(path)) == small_stream


def test_a_bad_jsonl_line_names_the_line_and_field(
    tmp_path: Path, small_stream: list[SimTransaction]
) -> None:
    path = tmp_path / "bad.jsonl"
    write_jsonl(small_stream[:2], path)
    lines = path.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[1])
    record["amount_minor"] = "12.50"
    path.write_text(lines[0] + "\n" + json.dumps(record) + "\n", encoding="utf-8")
    with pytest.raises(InputError) as error:
        list(read_jsonl(path))
    assert error.value.field == "amount_minor"
    assert ":2:" in error.value.message

    path.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(InputError, match=":1: not JSON"):
        list(read_jsonl(path))


@pytest.mark.parametrize(
    "overrides",
    [
        {"n_customers": 0},
        {"n_days": -1},
        {"start": datetime(2018, 4, 1)},  # naive: which midnight?
        {"radius": 0.0},
        {"ecommerce_share": 1.5},
        {"card_testing_tx_range": (20, 8)},
        {"card_testing_bursts_per_day": float("nan")},
        {"fraud_amount_threshold_minor": 0},
        {"label_delay": timedelta(seconds=-1)},
    ],
)
def test_bad_config_is_rejected(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        SimulationConfig(**overrides)  # type: ignore[arg-type]


def test_grid_maps_one_unit_to_one_km_in_the_meuse_rhine_region() -> None:
    lat, lon = grid_to_latlon(np.array([0.0, 100.0, 0.0]), np.array([0.0, 0.0, 100.0]))
    corner, east, north = (_at(la, lo) for la, lo in zip(lat.tolist(), lon.tolist(), strict=True))
    assert _km(corner, east) == pytest.approx(100.0, rel=0.02)
    assert _km(corner, north) == pytest.approx(100.0, rel=0.02)
    # Liege (BE), Maastricht (NL) and Aachen (DE) land in their own countries.
    cities = {"BE": (50.63, 5.57), "NL": (50.85, 5.69), "DE": (50.78, 6.08)}
    for country, (city_lat, city_lon) in cities.items():
        x = (city_lon - 5.29) / (lon[1] - lon[0]) * 100
        y = (city_lat - 50.30) / (lat[2] - lat[0]) * 100
        assert grid_country(np.array([x]), np.array([y]))[0] == country
