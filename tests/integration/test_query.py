"""The query service against a real gRPC server (port 0), real Redis and the real broker.

Every test starts its own `grpc.aio` server inside the session loop with its own Redis key
prefix (and topics where it records), and talks to it through a real channel. Redis failures
are real too: a throwaway `redis-server` on a free port is stopped, restarted, or paused with
CLIENT PAUSE. Nothing asserts a duration: deadline tests check the status and the `degraded`
flag; every wait is a loop bounded by count and by a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis.asyncio as aioredis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from protos.fraud.v1 import risk_service_pb2, risk_service_pb2_grpc, scoring_pb2, transaction_pb2
from services.query.__main__ import QueryServer, start_query_server
from services.query.health import LIVENESS_SERVICE, RISK_SERVICE
from services.query.servicer import ERROR_CODE_KEY, ERROR_FIELD_KEY, WATCH_STARTED_KEY
from shared.alert_store import AlertCandidate, AlertStore
from shared.config import Settings
from shared.infra import LocalRedis
from shared.scoring.assessments import AssessmentStore
from shared.scoring.engine import ScoringEngine
from shared.scoring.features import FEATURE_NAMES, TxRecord
from shared.scoring.model import ModelArtifact, save_model
from shared.scoring.velocity import VelocityStore
from shared.validation import ValidationLimits, validate_transaction
from tests.conftest import Infra, make_test_settings
from tests.kafka_helpers import consume_committed

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "rules" / "default.toml"
RULES_VERSION = tomllib.loads(RULES.read_text())["version"]
Code = grpc.StatusCode
APPROVE, REVIEW, DECLINE = (
    scoring_pb2.DECISION_APPROVE,
    scoring_pb2.DECISION_REVIEW,
    scoring_pb2.DECISION_DECLINE,
)
SYSTEM = scoring_pb2.Reason.SOURCE_SYSTEM


# ---- fixtures and helpers ---------------------------------------------------------------------


def write_model(path: Path) -> Path:
    """A small hand-made logistic model: amount, velocity and novelty raise the risk."""
    weights = dict.fromkeys(FEATURE_NAMES, 0.0)
    weights.update(
        amount_log=1.2,
        count_1h=0.6,
        distinct_countries_24h=0.8,
        first_time_merchant=0.4,
        travel_speed_kmh=0.5,
        terminal_risk_7d=0.7,
    )
    d = len(FEATURE_NAMES)
    mean = np.zeros(d)
    mean[FEATURE_NAMES.index("amount_log")] = 3.0
    scale = np.ones(d)
    scale[FEATURE_NAMES.index("travel_speed_kmh")] = 300.0
    save_model(
        ModelArtifact(
            version="query-test-model-1",
            feature_names=FEATURE_NAMES,
            mean=mean,
            scale=scale,
            weights=np.array([weights[n] for n in FEATURE_NAMES]),
            bias=-3.0,
            trained_at="2026-11-25T00:00:00+00:00",
        ),
        path,
    )
    return path


def with_query(settings: Settings, model: Path, **query: Any) -> Settings:
    return dataclasses.replace(
        settings,
        scoring=dataclasses.replace(settings.scoring, rules_path=str(RULES), model_path=str(model)),
        query=dataclasses.replace(settings.query, **query),
    )


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return write_model(tmp_path / "model.json")


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, *, record: bool = False, grace_s: float = 0.0
) -> AsyncIterator[QueryServer]:
    """A real query server on a free port of 127.0.0.1, stopped at the end."""
    query = await start_query_server(
        settings,
        listen="127.0.0.1:0",
        registry=CollectorRegistry(),
        record=record,
        health_interval_s=0.1,
    )
    try:
        yield query
    finally:
        await query.stop(grace_s)


@contextlib.asynccontextmanager
async def channel_to(
    query: QueryServer, credentials: grpc.ChannelCredentials | None = None
) -> AsyncIterator[aio.Channel]:
    target = f"127.0.0.1:{query.port}"
    if credentials is None:
        channel = aio.insecure_channel(target)
    else:
        # The self-signed certificate names "localhost"; we connect by address.
        channel = aio.secure_channel(
            target, credentials, options=[("grpc.ssl_target_name_override", "localhost")]
        )
    try:
        yield channel
    finally:
        await channel.close()


@contextlib.asynccontextmanager
async def risk_client(settings: Settings, **kwargs: Any) -> AsyncIterator[tuple[QueryServer, Any]]:
    """(query server, RiskService stub) for one test."""
    async with serving(settings, **kwargs) as query, channel_to(query) as channel:
        yield query, risk_stub(channel)


def risk_stub(channel: aio.Channel) -> Any:
    """The generated stub (the generated module is not type-checked)."""
    return risk_service_pb2_grpc.RiskServiceStub(channel)


def make_tx(
    tx_id: str = "tx-1",
    account: str = "acct-1",
    *,
    units: int = 2500,
    at_ms: int | None = None,
    country: str = "NL",
    merchant: str = "m-1",
    terminal: str = "t-1",
    lat: float | None = 52.37,
    lon: float | None = 4.89,
) -> transaction_pb2.Transaction:
    tx = transaction_pb2.Transaction(
        transaction_id=tx_id,
        account_id=account,
        card_id=f"card-tok-{account}",
        merchant_id=merchant,
        merchant_category="5411",
        terminal_id=terminal,
        amount=transaction_pb2.Money(units=units, currency="EUR"),
        country=country,
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
        device_id="dev-1",
        ip_address="192.0.2.10",
    )
    if lat is not None and lon is not None:
        tx.latitude, tx.longitude = lat, lon
    tx.event_time.FromMilliseconds(at_ms if at_ms is not None else now_ms() - 60_000)
    return tx


def now_ms() -> int:
    return int(time.time() * 1000)


def check(tx: transaction_pb2.Transaction | None, record: bool = False) -> Any:
    request = risk_service_pb2.CheckTransactionRequest(record=record)
    if tx is not None:
        request.transaction.CopyFrom(tx)
    return request


async def rpc_error(call: Awaitable[Any]) -> aio.AioRpcError:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    return caught.value


def trailing(error: aio.AioRpcError) -> dict[str, str]:
    return {k: str(v) for k, v in (error.trailing_metadata() or ())}


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float = 20.0, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout_s
    for _ in range(10_000):
        if await condition():
            return
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or condition}")


async def health_status(channel: aio.Channel, service: str = "") -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


def sample(query: QueryServer, name: str, **labels: str) -> float:
    registry = query.servicer.metrics.registry
    value = registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


def alert_of(alert_id: str, account: str, tx_id: str, created_ms: int) -> AlertCandidate:
    alert = scoring_pb2.Alert(
        alert_id=alert_id,
        account_id=account,
        transaction_id=tx_id,
        severity=scoring_pb2.SEVERITY_HIGH,
        score=0.9,
        decision=DECLINE,
        reasons=[scoring_pb2.Reason(code="AMOUNT_SPIKE", text="spike", contribution=1.0)],
    )
    alert.created_at.FromMilliseconds(created_ms)
    # One reason code per alert id, so suppression (per account and code) never holds one back.
    return AlertCandidate(alert, f"CODE_{alert_id.upper()}", created_ms, f"test:0:{alert_id}")


async def raise_alerts(
    store: AlertStore, account: str, ids: list[str], created_ms: int | None = None
) -> None:
    at = created_ms if created_ms is not None else now_ms()
    results = await store.record(
        [alert_of(a, account, f"tx-{a}", at + i) for i, a in enumerate(ids)]
    )
    assert all(r.outcome.emits for r in results)


# ---- CheckTransaction ---------------------------------------------------------------------


async def test_check_scores_a_transaction_with_every_field(
    settings: Settings, model_path: Path
) -> None:
    settings = with_query(settings, model_path)
    async with risk_client(settings) as (query, stub):
        reply = await stub.CheckTransaction(check(make_tx()), timeout=5)
    assert reply.transaction_id == "tx-1"
    assert 0.0 <= reply.score <= 1.0
    assert reply.decision in (APPROVE, REVIEW, DECLINE)
    assert set(reply.features) == set(FEATURE_NAMES)
    assert reply.features["amount"] == 25.0
    assert reply.features["count_1h"] == 1.0  # the transaction itself, "as if added"
    assert reply.model_version == "query-test-model-1"
    assert reply.rules_version == RULES_VERSION
    assert not reply.degraded and not reply.recorded
    assert all(r.source != SYSTEM for r in reply.reasons)
    assert sample(query, "fraudstream_query_rpcs_total", method="CheckTransaction", code="OK") == 1
    assert sample(query, "fraudstream_query_rpc_seconds_count", method="CheckTransaction") == 1


async def test_check_is_read_only(
    settings: Settings, model_path: Path, redis: aioredis.Redis
) -> None:
    settings = with_query(settings, model_path)
    async with risk_client(settings) as (_, stub):
        first = await stub.CheckTransaction(check(make_tx("tx-a")), timeout=5)
        second = await stub.CheckTransaction(check(make_tx("tx-b")), timeout=5)
    # Nothing was counted: the second check does not see the first.
    assert first.features["count_1h"] == second.features["count_1h"] == 1.0
    keys = [k async for k in redis.scan_iter(match=f"{settings.redis_key_prefix}:*")]
    assert keys == []


async def test_check_equals_what_scoring_produces_for_the_same_state(
    settings: Settings, model_path: Path, redis: aioredis.Redis
) -> None:
    """Parity: the check's score, decision, reasons and features are exactly what the scoring
    path (apply_batch + the engine) yields when that transaction is applied to the same state."""
    settings = with_query(settings, model_path)
    store = VelocityStore.from_settings(redis, settings)
    t0 = now_ms() - 30 * 60_000
    # History: a burst on one account, across countries, with fraud-free terminal history.
    history = [
        make_tx(f"h-{i}", units=1500 + 100 * i, at_ms=t0 + i * 60_000, country=c, lat=la, lon=lo)
        for i, (c, la, lo) in enumerate(
            [("NL", 52.37, 4.89), ("NL", 52.37, 4.89), ("BE", 50.85, 4.35), ("FR", 48.85, 2.35)]
        )
    ]
    await store.apply_batch([TxRecord.from_proto(tx) for tx in history])
    # The candidate: large, in a third country, far away a few minutes later, new merchant.
    candidate = make_tx(
        "cand-1", units=98_000, at_ms=t0 + 10 * 60_000, country="US", merchant="m-new",
        lat=40.71, lon=-74.0,
    )  # fmt: skip
    async with risk_client(settings) as (query, stub):
        reply = await stub.CheckTransaction(check(candidate), timeout=5)
        again = await stub.CheckTransaction(check(candidate), timeout=5)

        # The scoring path: ingest's normalization, then apply and the same engine.
        valid = validate_transaction(candidate, ValidationLimits(), time.time())
        record = TxRecord.from_proto(valid)
        applied = await store.apply_batch([record])
        fresh_engine = ScoringEngine.from_settings(settings.scoring)
        for engine in (query.engine, fresh_engine):
            expected = engine.evaluate([record], applied).assessments[0]
            assert reply.score == expected.score
            assert reply.decision == int(_decision_pb(expected.decision.value))
            assert dict(reply.features) == expected.features
            assert [(r.code, r.contribution) for r in reply.reasons] == [
                (r.code, r.contribution) for r in expected.reasons
            ]
            assert reply.model_version == expected.model_version
            assert reply.rules_version == expected.rules_version
        assert again == reply  # read-only: checking twice changes nothing

        # Once applied, a check of the same transaction gets its stored result: the same.
        replayed = await stub.CheckTransaction(check(candidate), timeout=5)
    assert replayed.score == reply.score and dict(replayed.features) == dict(reply.features)
    assert reply.features["count_1h"] == len(history) + 1
    assert reply.features["distinct_countries_24h"] == 4
    assert reply.features["travel_speed_kmh"] > 900
    codes = [r.code for r in reply.reasons]
    assert "IMPOSSIBLE_TRAVEL" in codes and "MANY_COUNTRIES" in codes
    assert reply.decision in (REVIEW, DECLINE)


def _decision_pb(name: str) -> int:
    return int(scoring_pb2.Decision.Value(f"DECISION_{name}"))


def _invalid_cases() -> list[tuple[str, transaction_pb2.Transaction | None, str]]:
    """(case, transaction, field the status must name)."""
    now = now_ms()
    cases: list[tuple[str, transaction_pb2.Transaction | None, str]] = [
        ("no transaction", None, "transaction")
    ]

    def case(name: str, field: str, change: Callable[[transaction_pb2.Transaction], Any]) -> None:
        tx = make_tx()
        change(tx)
        cases.append((name, tx, field))

    case(
        "empty transaction_id",
        "transaction.transaction_id",
        lambda t: t.ClearField("transaction_id"),
    )
    case("blank account_id", "transaction.account_id", lambda t: setattr(t, "account_id", "  "))
    case("empty card_id", "transaction.card_id", lambda t: t.ClearField("card_id"))
    case(
        "PAN as card_id", "transaction.card_id", lambda t: setattr(t, "card_id", "4111111111111111")
    )
    case(
        "long merchant_id",
        "transaction.merchant_id",
        lambda t: setattr(t, "merchant_id", "m" * 200),
    )
    case("control chars", "transaction.terminal_id", lambda t: setattr(t, "terminal_id", "t\x00"))
    case("no amount", "transaction.amount", lambda t: t.ClearField("amount"))
    case("negative amount", "transaction.amount.units", lambda t: setattr(t.amount, "units", -5))
    case("zero amount", "transaction.amount.units", lambda t: setattr(t.amount, "units", 0))
    case("absurd amount", "transaction.amount.units", lambda t: setattr(t.amount, "units", 10**13))
    case("no currency", "transaction.amount.currency", lambda t: setattr(t.amount, "currency", ""))
    case(
        "unknown currency",
        "transaction.amount.currency",
        lambda t: setattr(t.amount, "currency", "XYZ"),
    )
    case("no event_time", "transaction.event_time", lambda t: t.ClearField("event_time"))
    case(
        "future",
        "transaction.event_time",
        lambda t: t.event_time.FromMilliseconds(now + 86_400_000),
    )
    case(
        "too old",
        "transaction.event_time",
        lambda t: t.event_time.FromMilliseconds(now - 40 * 86_400_000),
    )
    case("bad timestamp", "transaction.event_time", lambda t: setattr(t.event_time, "nanos", -1))
    case("no country", "transaction.country", lambda t: t.ClearField("country"))
    case("unknown country", "transaction.country", lambda t: setattr(t, "country", "ZZ"))
    case(
        "bad mcc",
        "transaction.merchant_category",
        lambda t: setattr(t, "merchant_category", "54x1"),
    )
    case("latitude alone", "transaction.longitude", lambda t: t.ClearField("longitude"))
    case("latitude range", "transaction.latitude", lambda t: setattr(t, "latitude", 95.0))
    case("longitude nan", "transaction.longitude", lambda t: setattr(t, "longitude", math.nan))
    case("bad ip", "transaction.ip_address", lambda t: setattr(t, "ip_address", "300.1.1.1"))
    case("unknown channel", "transaction.channel", lambda t: setattr(t, "channel", 99))
    case(
        "many attributes",
        "transaction.attributes",
        lambda t: t.attributes.update({str(i): "v" for i in range(100)}),
    )
    case(
        "long attribute",
        "transaction.attributes.k",
        lambda t: t.attributes.update({"k": "v" * 2000}),
    )
    return cases  # fmt: skip


async def test_every_invalid_check_is_invalid_argument_naming_the_field(
    infra: Infra, model_path: Path
) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    cases = _invalid_cases()
    async with risk_client(settings) as (query, stub):
        for name, tx, field in cases:
            error = await rpc_error(stub.CheckTransaction(check(tx), timeout=5))
            assert error.code() == Code.INVALID_ARGUMENT, name
            assert (error.details() or "").startswith(f"{field}: "), (name, error.details())
            meta = trailing(error)
            assert meta[ERROR_FIELD_KEY] == field, name
            assert meta[ERROR_CODE_KEY], name
        # Still serving after every rejection.
        assert not (await stub.CheckTransaction(check(make_tx()), timeout=5)).degraded
    invalid = sample(
        query, "fraudstream_query_rpcs_total", method="CheckTransaction", code="INVALID_ARGUMENT"
    )
    assert invalid == len(cases)


async def test_record_publishes_to_transactions_raw_keyed_by_account(
    settings: Settings, model_path: Path
) -> None:
    settings = with_query(settings, model_path)
    async with risk_client(settings, record=True) as (query, stub):
        recorder = query.recorder
        assert recorder is not None

        async def ready() -> bool:
            return recorder.ready

        await wait_until(ready, what="the record producer")
        tx = make_tx("rec-1", "acct-rec", merchant="  m-9  ")  # normalized before publishing
        reply = await stub.CheckTransaction(check(tx, record=True), timeout=10)
        plain = await stub.CheckTransaction(check(make_tx("rec-2", "acct-rec")), timeout=10)
    assert reply.recorded and not reply.degraded
    assert not plain.recorded
    assert all(r.code != "RECORD_NOT_CONFIRMED" for r in reply.reasons)
    records = await consume_committed(settings, settings.topics.raw, expected=1)
    assert len(records) == 1
    assert records[0].key == b"acct-rec"
    published = transaction_pb2.Transaction.FromString(records[0].value)
    assert published.transaction_id == "rec-1" and published.merchant_id == "m-9"


async def test_record_without_kafka_still_answers_and_says_not_recorded(
    infra: Infra, model_path: Path
) -> None:
    # Kafka unreachable: the server starts anyway, its producer retrying in the background.
    nowhere = dataclasses.replace(
        make_test_settings(infra).kafka, bootstrap_servers=f"127.0.0.1:{free_port()}"
    )
    settings = dataclasses.replace(with_query(make_test_settings(infra), model_path), kafka=nowhere)
    async with risk_client(settings, record=True) as (query, stub):
        reply = await stub.CheckTransaction(check(make_tx(), record=True), timeout=5)
        assert query.recorder is not None and not query.recorder.ready
    assert not reply.recorded and not reply.degraded and reply.features
    assert [r.code for r in reply.reasons if r.source == SYSTEM] == ["RECORD_NOT_CONFIRMED"]
    off = with_query(make_test_settings(infra), model_path)
    async with risk_client(off, record=False) as (_, stub):  # --no-record
        reply = await stub.CheckTransaction(check(make_tx(), record=True), timeout=5)
    assert not reply.recorded
    assert [r.text for r in reply.reasons if r.source == SYSTEM] == [
        "recording is off on this server"
    ]


async def test_changed_rules_are_picked_up_without_a_restart(
    infra: Infra, model_path: Path, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.toml"
    original = RULES.read_text()
    rules.write_text(original)
    settings = with_query(make_test_settings(infra), model_path)
    settings = dataclasses.replace(
        settings, scoring=dataclasses.replace(settings.scoring, rules_path=str(rules))
    )
    query = await start_query_server(
        settings,
        listen="127.0.0.1:0",
        registry=CollectorRegistry(),
        record=False,
        reload_interval_s=0.1,
    )
    try:
        async with channel_to(query) as channel:
            stub = risk_stub(channel)
            assert (await stub.CheckTransaction(check(make_tx()))).rules_version == RULES_VERSION
            # An atomic replace, as the rules' writers are told to do.
            staged = tmp_path / "rules.toml.new"
            staged.write_text(
                original.replace(f'version = "{RULES_VERSION}"', 'version = "query-2"', 1)
            )
            staged.replace(rules)

            async def reloaded() -> bool:
                reply = await stub.CheckTransaction(check(make_tx()), timeout=5)
                return bool(reply.rules_version == "query-2")

            await wait_until(reloaded, what="the new rules version")
    finally:
        await query.stop(0)


# ---- GetAccountRisk ---------------------------------------------------------------------------


async def test_get_account_risk_reports_velocity_latest_and_open_alerts(
    settings: Settings, model_path: Path, redis: aioredis.Redis
) -> None:
    settings = with_query(settings, model_path)
    t0 = now_ms() - 10 * 60_000
    history = [make_tx(f"g-{i}", "acct-g", units=1000 * (i + 1), at_ms=t0 + i) for i in range(3)]
    records = [TxRecord.from_proto(tx) for tx in history]
    applied = await VelocityStore.from_settings(redis, settings).apply_batch(records)
    engine = ScoringEngine.from_settings(settings.scoring)
    result = engine.evaluate(records, applied)
    scored = engine.to_protos(history, result, scored_at_ms=now_ms())
    await AssessmentStore(redis, settings.redis_key_prefix).write_batch(scored)
    await raise_alerts(AlertStore.from_settings(redis, settings), "acct-g", ["ga-1", "ga-2"])

    async with risk_client(settings) as (_, stub):
        risk = await stub.GetAccountRisk(
            risk_service_pb2.GetAccountRiskRequest(account_id="acct-g"), timeout=5
        )
    assert risk.account_id == "acct-g"
    assert risk.velocity["count_1h"] == 3 and risk.velocity["sum_1h"] == 60.0
    assert risk.velocity["count_30d"] == 3 and risk.velocity["avg_amount_30d"] == 20.0
    assert risk.velocity["count_1m"] == 0  # windows end now; the last one was minutes ago
    assert 500 <= risk.velocity["seconds_since_last"] <= 3600
    assert risk.latest.transaction_id == "g-2"  # the newest by event time
    assert risk.latest.score == scored[2].score
    assert risk.latest.decision == scored[2].decision
    assert list(risk.latest.reasons) == list(scored[2].reasons)
    assert risk.latest.model_version == "query-test-model-1"
    assert risk.latest.HasField("scored_at")
    assert risk.open_alert_count == 2


async def test_get_account_risk_not_found_and_invalid(infra: Infra, model_path: Path) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    async with risk_client(settings) as (_, stub):
        unknown = await rpc_error(
            stub.GetAccountRisk(risk_service_pb2.GetAccountRiskRequest(account_id="nobody"))
        )
        assert unknown.code() == Code.NOT_FOUND
        for bad in ("", "   ", "a" * 500):
            error = await rpc_error(
                stub.GetAccountRisk(risk_service_pb2.GetAccountRiskRequest(account_id=bad))
            )
            assert error.code() == Code.INVALID_ARGUMENT
            assert (error.details() or "").startswith("account_id")
            assert trailing(error)[ERROR_FIELD_KEY] == "account_id"


# ---- ListAlerts -------------------------------------------------------------------------------


async def test_list_alerts_by_account_and_all_newest_first_paged(
    infra: Infra, model_path: Path, redis: aioredis.Redis
) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    store = AlertStore.from_settings(redis, settings)
    await raise_alerts(store, "acct-a", [f"a{i}" for i in range(5)])
    await raise_alerts(store, "acct-b", ["b0", "b1"])

    async def pages(stub: Any, account: str, size: int) -> list[list[str]]:
        out: list[list[str]] = []
        token = ""
        for _ in range(20):  # bounded: far more pages than there are alerts
            reply = await stub.ListAlerts(
                risk_service_pb2.ListAlertsRequest(
                    account_id=account, page_size=size, page_token=token
                ),
                timeout=5,
            )
            out.append([a.alert_id for a in reply.alerts])
            token = reply.next_page_token
            if not token:
                return out
        raise AssertionError("paging did not end")

    async with risk_client(settings) as (_, stub):
        assert await pages(stub, "acct-a", 2) == [["a4", "a3"], ["a2", "a1"], ["a0"]]
        assert await pages(stub, "", 3) == [["b1", "b0", "a4"], ["a3", "a2", "a1"], ["a0"]]
        assert await pages(stub, "acct-b", 0) == [["b1", "b0"]]  # 0: the server default
        assert await pages(stub, "nobody", 0) == [[]]

        first = await stub.ListAlerts(
            risk_service_pb2.ListAlertsRequest(account_id="acct-a", page_size=1)
        )
        bad_requests = {
            "garbage token": risk_service_pb2.ListAlertsRequest(page_token="!!not a token!!"),
            "other listing's token": risk_service_pb2.ListAlertsRequest(
                account_id="acct-b", page_token=first.next_page_token
            ),
        }
        for name, request in bad_requests.items():
            error = await rpc_error(stub.ListAlerts(request))
            assert error.code() == Code.INVALID_ARGUMENT, name
            assert (error.details() or "").startswith("page_token: "), name
            assert trailing(error)[ERROR_FIELD_KEY] == "page_token", name
        negative = await rpc_error(
            stub.ListAlerts(risk_service_pb2.ListAlertsRequest(page_size=-1))
        )
        assert negative.code() == Code.INVALID_ARGUMENT
        assert trailing(negative)[ERROR_FIELD_KEY] == "page_size"
        too_long = await rpc_error(
            stub.ListAlerts(risk_service_pb2.ListAlertsRequest(account_id="x" * 300))
        )
        assert too_long.code() == Code.INVALID_ARGUMENT


# ---- WatchAlerts ------------------------------------------------------------------------------


async def read_alert(call: Any, timeout_s: float = 10.0) -> scoring_pb2.Alert:
    message = await asyncio.wait_for(call.read(), timeout_s)
    assert message is not aio.EOF, "the stream ended"
    assert isinstance(message, scoring_pb2.Alert)
    return message


async def watch_started(call: Any) -> None:
    metadata = await asyncio.wait_for(call.initial_metadata(), 10)
    assert dict(metadata).get(WATCH_STARTED_KEY) == "1"


async def test_watch_streams_new_alerts_and_resumes_after_an_id(
    infra: Infra, model_path: Path, redis: aioredis.Redis
) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    store = AlertStore.from_settings(redis, settings)
    await raise_alerts(store, "acct-w", ["w0", "w1", "w2"])
    async with risk_client(settings) as (query, stub):
        # Only new alerts, one account: the earlier ones and other accounts' are not sent.
        live = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest(account_id="acct-w"))
        await watch_started(live)
        await raise_alerts(store, "acct-other", ["o0"])
        await raise_alerts(store, "acct-w", ["w3"])
        assert (await read_alert(live)).alert_id == "w3"

        # Resumed after w0: everything since, in order, across accounts, then new ones.
        resumed = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest(after_alert_id="w0"))
        await watch_started(resumed)
        seen = [(await read_alert(resumed)).alert_id for _ in range(4)]
        assert seen == ["w1", "w2", "o0", "w3"]
        await raise_alerts(store, "acct-w", ["w4"])
        assert (await read_alert(resumed)).alert_id == "w4"
        assert (await read_alert(live)).alert_id == "w4"

        # The client cancels: the server's stream ends at once and is counted.
        live.cancel()
        resumed.cancel()

        async def no_watchers() -> bool:
            return query.servicer.watchers == 0

        await wait_until(no_watchers, what="the cancelled streams to end")
        unknown = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest(after_alert_id="nope"))
        error = await rpc_error(unknown.read())
        assert error.code() == Code.NOT_FOUND
        assert trailing(error)[ERROR_FIELD_KEY] == "after_alert_id"
        assert trailing(error)[ERROR_CODE_KEY] == "UNKNOWN_ALERT_ID"
        too_long = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest(account_id="x" * 300))
        assert (await rpc_error(too_long.read())).code() == Code.INVALID_ARGUMENT
    watch = {"method": "WatchAlerts"}
    assert sample(query, "fraudstream_query_rpcs_total", **watch, code="CANCELLED") == 2
    assert sample(query, "fraudstream_query_rpcs_total", **watch, code="NOT_FOUND") == 1


async def test_graceful_stop_ends_watch_streams_and_turns_health_not_serving(
    infra: Infra, model_path: Path
) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    query = await start_query_server(
        settings, listen="127.0.0.1:0", registry=CollectorRegistry(), record=False
    )
    stopping: asyncio.Task[None] | None = None
    try:
        async with channel_to(query) as channel:
            stub = risk_stub(channel)
            stream = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest())
            await watch_started(stream)
            health = health_pb2_grpc.HealthStub(channel).Watch(
                health_pb2.HealthCheckRequest(service="")
            )
            first = await asyncio.wait_for(health.read(), 10)
            assert first.status == health_pb2.HealthCheckResponse.SERVING

            stopping = asyncio.create_task(query.stop(10.0))
            changed = await asyncio.wait_for(health.read(), 10)
            assert changed.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # The alert stream ends cleanly (OK), within the grace period.
            assert await asyncio.wait_for(stream.read(), 10) is aio.EOF
            assert await stream.code() == Code.OK
            await asyncio.wait_for(stopping, 15)
    finally:
        if stopping is None:
            await query.stop(0)


# ---- health, reflection -----------------------------------------------------------------------


async def test_health_and_reflection_are_served(infra: Infra, model_path: Path) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    async with serving(settings) as query, channel_to(query) as channel:
        for service in ("", RISK_SERVICE, LIVENESS_SERVICE):
            assert await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="fraud.v1.RiskService"),
        ]
        replies = [r async for r in reflection.ServerReflectionInfo(iter(requests), timeout=5)]
    services = {s.name for s in replies[0].list_services_response.service}
    assert {"fraud.v1.RiskService", "grpc.health.v1.Health"} <= services
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files, "reflection returned no descriptor for fraud.v1.RiskService"


# ---- Redis slow or down: the failure policy, deadlines, health --------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def throwaway_redis(tmp_path: Path) -> Iterator[LocalRedis]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is needed for the Redis failure tests")
    server = LocalRedis(free_port(), cache_root=tmp_path, progress=lambda _: None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def degraded_codes(reply: Any) -> list[str]:
    return [r.code for r in reply.reasons if r.source == SYSTEM]


async def test_redis_down_degrades_by_policy_and_health_follows_redis(
    infra: Infra, model_path: Path, throwaway_redis: LocalRedis
) -> None:
    settings = dataclasses.replace(make_test_settings(infra), redis_url=throwaway_redis.url)
    settings = with_query(settings, model_path, failure_policy="fail_closed_review")
    serving_status = health_pb2.HealthCheckResponse.SERVING
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    async with serving(settings) as query, channel_to(query) as channel:
        stub = risk_stub(channel)

        async def status_is(expected: int) -> bool:
            return await health_status(channel) == expected

        assert await status_is(serving_status)
        assert not (await stub.CheckTransaction(check(make_tx()), timeout=5)).degraded

        await asyncio.to_thread(throwaway_redis.stop)  # blocking: keep the server's loop free
        await wait_until(lambda: status_is(not_serving), what="health NOT_SERVING")
        assert await health_status(channel, RISK_SERVICE) == not_serving
        assert await health_status(channel, LIVENESS_SERVICE) == serving_status
        for timeout in (5.0, None):  # with the caller's deadline, and with the default budget
            reply = await stub.CheckTransaction(check(make_tx()), timeout=timeout)
            assert reply.degraded
            assert reply.decision == REVIEW
            assert reply.score == settings.scoring.review_threshold
            assert degraded_codes(reply) == [
                "DEGRADED_REDIS_UNAVAILABLE",
                "DEGRADED_FAIL_CLOSED_REVIEW",
            ]
            assert not reply.features
            assert reply.model_version == "query-test-model-1"
        lookup = await rpc_error(
            stub.GetAccountRisk(risk_service_pb2.GetAccountRiskRequest(account_id="a"), timeout=5)
        )
        assert lookup.code() == Code.UNAVAILABLE
        listing = await rpc_error(stub.ListAlerts(risk_service_pb2.ListAlertsRequest(), timeout=5))
        assert listing.code() == Code.UNAVAILABLE

        again = LocalRedis(throwaway_redis.port, throwaway_redis.data_dir, progress=lambda _: None)
        await asyncio.to_thread(again.start)
        await wait_until(lambda: status_is(serving_status), what="health SERVING again")
        recovered = await stub.CheckTransaction(check(make_tx()), timeout=5)
        assert not recovered.degraded and recovered.features
    assert (
        sample(query, "fraudstream_query_degraded_total", cause="DEGRADED_REDIS_UNAVAILABLE") == 2
    )


@pytest.mark.parametrize(
    ("policy", "decision", "code"),
    [
        ("fail_open", APPROVE, "DEGRADED_FAIL_OPEN"),
        ("fail_closed_review", REVIEW, "DEGRADED_FAIL_CLOSED_REVIEW"),
        ("fail_closed_decline", DECLINE, "DEGRADED_FAIL_CLOSED_DECLINE"),
    ],
)
async def test_every_failure_policy_with_redis_unreachable(
    infra: Infra, model_path: Path, policy: str, decision: int, code: str
) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = dataclasses.replace(make_test_settings(infra), redis_url=closed)
    settings = with_query(settings, model_path, failure_policy=policy)
    async with serving(settings) as query, channel_to(query) as channel:
        stub = risk_stub(channel)
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        reply = await stub.CheckTransaction(check(make_tx("p-1")), timeout=5)
    assert reply.degraded and reply.decision == decision and reply.transaction_id == "p-1"
    assert degraded_codes(reply) == ["DEGRADED_REDIS_UNAVAILABLE", code]
    # The lowest score that earns the decision, so a caller thresholding the score agrees.
    scores: dict[int, float] = {
        int(APPROVE): 0.0,
        int(REVIEW): settings.scoring.review_threshold,
        int(DECLINE): settings.scoring.decline_threshold,
    }
    expected_score = scores[int(decision)]
    assert reply.score == expected_score


async def test_slow_redis_answers_within_the_deadline_degraded(
    infra: Infra, model_path: Path, throwaway_redis: LocalRedis
) -> None:
    settings = dataclasses.replace(make_test_settings(infra), redis_url=throwaway_redis.url)
    settings = with_query(settings, model_path, failure_policy="fail_open", redis_timeout_ms=50)
    admin = aioredis.Redis.from_url(throwaway_redis.url)
    try:
        async with risk_client(settings) as (_, stub):
            assert not (await stub.CheckTransaction(check(make_tx()), timeout=5)).degraded
            # Redis holds every client's commands for a while: slow, not down.
            await admin.execute_command("CLIENT", "PAUSE", "3000", "ALL")
            with_deadline = await stub.CheckTransaction(check(make_tx()), timeout=0.3)
            assert with_deadline.degraded and with_deadline.decision == APPROVE
            assert degraded_codes(with_deadline) == ["DEGRADED_REDIS_TIMEOUT", "DEGRADED_FAIL_OPEN"]
            no_deadline = await stub.CheckTransaction(check(make_tx()))  # QUERY_REDIS_TIMEOUT_MS
            assert degraded_codes(no_deadline) == ["DEGRADED_REDIS_TIMEOUT", "DEGRADED_FAIL_OPEN"]
            lookup = await rpc_error(
                stub.GetAccountRisk(
                    risk_service_pb2.GetAccountRiskRequest(account_id="a"), timeout=0.3
                )
            )
            assert lookup.code() == Code.DEADLINE_EXCEEDED
            await admin.execute_command("CLIENT", "UNPAUSE")

            async def recovered() -> bool:
                reply = await stub.CheckTransaction(check(make_tx()), timeout=5)
                return not reply.degraded

            await wait_until(recovered, what="non-degraded checks after CLIENT UNPAUSE")
    finally:
        with contextlib.suppress(Exception):
            await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


# ---- security: bearer tokens and TLS ----------------------------------------------------------


async def test_bearer_tokens_guard_the_risk_service_but_not_health(
    infra: Infra, model_path: Path
) -> None:
    settings = with_query(
        make_test_settings(infra), model_path, auth_tokens=("s3cret-one", "s3cret-two")
    )
    request = risk_service_pb2.GetAccountRiskRequest(account_id="nobody")
    async with serving(settings) as query, channel_to(query) as channel:
        stub = risk_stub(channel)
        for metadata in (
            None,
            (("authorization", "Bearer wrong"),),
            (("authorization", "Basic s3cret-one"),),
            (("authorization", "s3cret-one"),),
        ):
            error = await rpc_error(stub.GetAccountRisk(request, metadata=metadata, timeout=5))
            assert error.code() == Code.UNAUTHENTICATED, metadata
            stream = stub.WatchAlerts(risk_service_pb2.WatchAlertsRequest(), metadata=metadata)
            assert (await rpc_error(stream.read())).code() == Code.UNAUTHENTICATED
        for token in ("s3cret-one", "s3cret-two"):
            ok = await stub.CheckTransaction(
                check(make_tx()), metadata=(("authorization", f"bearer {token}"),), timeout=5
            )
            assert not ok.degraded
        # Health needs no token: probes and load balancers carry none.
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING


async def test_auth_is_off_by_default(infra: Infra, model_path: Path) -> None:
    settings = with_query(make_test_settings(infra), model_path)
    assert settings.query.auth_tokens == ()
    async with risk_client(settings) as (_, stub):
        reply = await stub.CheckTransaction(
            check(make_tx()), metadata=(("authorization", "Bearer anything"),), timeout=5
        )
    assert not reply.degraded


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


async def test_tls_with_a_self_signed_certificate(
    infra: Infra, model_path: Path, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    settings = with_query(
        make_test_settings(infra), model_path, tls_cert=str(cert), tls_key=str(key)
    )
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
    async with serving(settings) as query:
        async with channel_to(query, credentials) as channel:
            stub = risk_stub(channel)
            assert not (await stub.CheckTransaction(check(make_tx()), timeout=10)).degraded
            assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        async with channel_to(query) as plaintext:
            error = await rpc_error(
                risk_stub(plaintext).CheckTransaction(check(make_tx()), timeout=5)
            )
            assert error.code() == Code.UNAVAILABLE


# ---- the process: python -m services.query ----------------------------------------------------


async def test_the_service_process_serves_and_stops_on_sigterm(
    infra: Infra, model_path: Path, tmp_path: Path
) -> None:
    settings = make_test_settings(infra)
    port = free_port()
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "TOPIC_TRANSACTIONS_RAW": settings.topics.raw,
        "SCORING_RULES_PATH": str(RULES),
        "SCORING_MODEL_PATH": str(model_path),
        "QUERY_LISTEN": f"127.0.0.1:{port}",
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
    }
    log_path = tmp_path / "query.log"
    with log_path.open("w") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.query", "--grace", "5", "--no-record",
            cwd=REPO, env=env, stdout=log, stderr=log,
        )  # fmt: skip
    try:
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        try:

            async def up() -> bool:
                if process.returncode is not None:
                    raise AssertionError(f"query exited early:\n{log_path.read_text()}")
                try:
                    status = await health_status(channel)
                    return bool(status == health_pb2.HealthCheckResponse.SERVING)
                except aio.AioRpcError:
                    return False

            await wait_until(up, timeout_s=60, what="the query process to serve")
            stub = risk_stub(channel)
            assert not (await stub.CheckTransaction(check(make_tx()), timeout=5)).degraded
        finally:
            await channel.close()
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
        assert code == 0, log_path.read_text()
        assert "query_finished" in log_path.read_text()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
