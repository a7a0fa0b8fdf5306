"""Alerting against the real broker and Redis: policy, suppression, crash redelivery, the store.

Every test has its own topics, consumer group and Redis prefix. Suppression windows run on the
transactions' event times, so the window boundary is crossed by the events' timestamps, never by
sleeping; loops are bounded by count and by a deadline, and nothing asserts a duration.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import REGISTRY

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from services.alerting.__main__ import run_alerting
from services.alerting.policy import alert_id_for, parse_policy
from services.alerting.service import AlertTransform
from shared.alert_store import (
    AlertStore,
    InvalidPageToken,
    UnknownAlertId,
)
from shared.alerts_tail import tail
from shared.config import Settings
from shared.errors import InputError
from shared.kafka import (
    ensure_topics,
    make_consumer,
    make_transactional_producer,
    transactional_id,
)
from shared.redis_client import make_redis
from tests.conftest import Infra, make_test_settings
from tests.kafka_helpers import consume_committed, produce

REPO = Path(__file__).resolve().parents[2]
T0 = 1_700_000_000_000  # event time (ms) of the first score; windows are measured from here

APPROVE, REVIEW, DECLINE = (
    scoring_pb2.DECISION_APPROVE,
    scoring_pb2.DECISION_REVIEW,
    scoring_pb2.DECISION_DECLINE,
)
LOW, MEDIUM, HIGH = scoring_pb2.SEVERITY_LOW, scoring_pb2.SEVERITY_MEDIUM, scoring_pb2.SEVERITY_HIGH


def scored(
    tx_id: str,
    account: str,
    *,
    decision: int = DECLINE,
    score: float = 0.9,
    reasons: Sequence[str] = ("VELOCITY_1M",),
    at_ms: int = T0,
) -> bytes:
    tx = transaction_pb2.Transaction(transaction_id=tx_id, account_id=account)
    tx.event_time.FromMilliseconds(at_ms)
    message = scoring_pb2.ScoredTransaction(
        transaction=tx,
        score=score,
        decision=decision,  # type: ignore[arg-type]
        reasons=[
            scoring_pb2.Reason(code=code, text=code.lower(), contribution=1.0) for code in reasons
        ],
        model_version="m1",
        rules_version="r1",
    )
    message.scored_at.FromMilliseconds(at_ms + 5)
    return message.SerializeToString()


def keyed(value: bytes, account: str) -> tuple[bytes, bytes, None]:
    return account.encode(), value, None


async def alerting_settings(infra: Infra, **environ: str) -> Settings:
    settings = make_test_settings(infra, **environ)
    await ensure_topics(settings)
    return settings


async def run(settings: Settings, records: int, **kwargs: Any) -> Any:
    """Run the real service in-process until `records` score records are committed."""
    stats = await run_alerting(
        settings, max_records=records, max_seconds=90, handle_signals=False, **kwargs
    )
    assert stats.scores >= records, f"alerting committed {stats.scores} of {records} records"
    return stats


async def read_alerts(
    settings: Settings, expected: int, *, settle_s: float = 1.0
) -> list[scoring_pb2.Alert]:
    records = await consume_committed(
        settings, settings.topics.alerts, expected=expected, settle_s=settle_s
    )
    alerts = [scoring_pb2.Alert.FromString(r.value) for r in records]
    for record, alert in zip(records, alerts, strict=True):
        assert record.key == alert.account_id.encode()
        # The store appends suppressed_count in Lua; the result must be canonical protobuf.
        assert alert.SerializeToString(deterministic=True) == record.value
    return alerts


def by_tx(alerts: Sequence[scoring_pb2.Alert]) -> dict[str, scoring_pb2.Alert]:
    index = {a.transaction_id: a for a in alerts}
    assert len(index) == len(alerts), "an alert was published twice"
    return index


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@contextlib.asynccontextmanager
async def webhook_receiver(hang: bool = False) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A loopback HTTP server collecting POST bodies (or hanging on every request)."""
    bodies: list[bytes] = []
    release = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            if hang:
                await release.wait()
            else:
                bodies.append(body)
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/alerts", bodies
    finally:
        release.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # released handlers close their sockets


# --- policy and severity, end to end through the real service ------------------------------


async def test_policy_and_severity_end_to_end(infra: Infra) -> None:
    async with webhook_receiver() as (url, bodies):
        settings = await alerting_settings(
            infra,
            ALERT_POLICY="DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW,score>=0.99=CRITICAL",
            ALERT_WEBHOOK_URL=url,
        )
        scores = [
            ("tx-decline", "acct-1", DECLINE, 0.91),
            ("tx-review", "acct-2", REVIEW, 0.6),
            ("tx-band", "acct-3", APPROVE, 0.3),
            ("tx-quiet", "acct-4", APPROVE, 0.29),
            ("tx-critical", "acct-5", DECLINE, 0.995),  # the most severe match wins
            ("tx-review-band", "acct-6", REVIEW, 0.35),  # REVIEW beats the LOW band
        ]
        await produce(
            settings,
            settings.topics.scores,
            [keyed(scored(t, a, decision=d, score=s), a) for t, a, d, s in scores],
        )
        stats = await run(settings, len(scores), drain_timeout_s=10)

    alerts = by_tx(await read_alerts(settings, expected=5))
    assert {tx: a.severity for tx, a in alerts.items()} == {
        "tx-decline": HIGH,
        "tx-review": MEDIUM,
        "tx-band": LOW,
        "tx-critical": scoring_pb2.SEVERITY_CRITICAL,
        "tx-review-band": MEDIUM,
    }
    decline = alerts["tx-decline"]
    assert decline.alert_id == alert_id_for("tx-decline")
    assert (decline.account_id, decline.decision, decline.suppressed_count) == (
        "acct-1",
        DECLINE,
        0,
    )
    assert decline.score == pytest.approx(0.91)
    assert [r.code for r in decline.reasons] == ["VELOCITY_1M"]
    assert decline.created_at.seconds > 0
    assert (stats.alerts, stats.no_alert, stats.malformed) == (5, 1, 0)
    # The webhook got every committed alert as protobuf JSON (sent after the commit).
    posted = {json.loads(b)["alertId"]: json.loads(b) for b in bodies}
    assert set(posted) == {a.alert_id for a in alerts.values()}
    assert posted[decline.alert_id]["severity"] == "SEVERITY_HIGH"


# --- suppression -----------------------------------------------------------------------------


async def test_suppression_across_the_window_boundary(infra: Infra) -> None:
    settings = await alerting_settings(infra, ALERT_SUPPRESSION_WINDOW_S="2")
    s = 1000  # ms
    scores = [
        # tx, account, reasons, event time: window [T0, T0 + 2 s) for (acct-a, VELOCITY_1M)
        ("a1", "acct-a", ("VELOCITY_1M", "MODEL_AMOUNT"), T0),  # alert
        ("a2", "acct-a", ("VELOCITY_1M",), T0 + s // 2),  # suppressed
        ("a3", "acct-a", ("MODEL_AMOUNT", "VELOCITY_1M"), T0 + s // 2),  # other top reason: alert
        ("a4", "acct-a", ("VELOCITY_1M", "GEO"), T0 + 3 * s // 2),  # suppressed
        ("a5", "acct-a", ("VELOCITY_1M",), T0 + 2 * s),  # the window ended: alert, carries 2
        ("a6", "acct-a", ("VELOCITY_1M",), T0 + 3 * s),  # inside the new window: suppressed
        ("b1", "acct-b", ("VELOCITY_1M",), T0 + s // 2),  # another account: alert
    ]
    await produce(
        settings,
        settings.topics.scores,
        [keyed(scored(t, a, reasons=r, at_ms=at), a) for t, a, r, at in scores],
    )
    stats = await run(settings, len(scores))
    alerts = by_tx(await read_alerts(settings, expected=4))
    assert sorted(alerts) == ["a1", "a3", "a5", "b1"]
    assert {tx: a.suppressed_count for tx, a in alerts.items()} == {
        "a1": 0,
        "a3": 0,
        "a5": 2,
        "b1": 0,
    }
    assert (stats.alerts, stats.suppressed) == (4, 3)
    # a6 is held in Redis for the next alert of (acct-a, VELOCITY_1M).
    client = make_redis(settings)
    try:
        key = f"{settings.redis_key_prefix}:{{acct:acct-a}}:alerts:sup:VELOCITY_1M"
        assert await cast(Awaitable[bytes], client.hget(key, "pending")) == b"1"
        assert await client.pttl(key) > 0
    finally:
        await client.aclose()


async def test_a_more_severe_alert_is_not_suppressed_by_a_milder_one(infra: Infra) -> None:
    settings = await alerting_settings(infra, ALERT_SUPPRESSION_WINDOW_S="60")
    scores = [
        ("e1", APPROVE, 0.4, T0),  # LOW: alert, opens a LOW window
        ("e2", APPROVE, 0.5, T0 + 100),  # LOW: suppressed
        ("e3", REVIEW, 0.6, T0 + 200),  # MEDIUM: escalates, carries 1, opens a MEDIUM window
        ("e4", APPROVE, 0.4, T0 + 300),  # LOW under a MEDIUM window: suppressed
        ("e5", REVIEW, 0.7, T0 + 400),  # MEDIUM: suppressed
        ("e6", DECLINE, 0.95, T0 + 500),  # HIGH: escalates, carries 2
    ]
    await produce(
        settings,
        settings.topics.scores,
        [
            keyed(scored(t, "acct-e", decision=d, score=sc, at_ms=at), "acct-e")
            for t, d, sc, at in scores
        ],
    )
    await run(settings, len(scores))
    alerts = by_tx(await read_alerts(settings, expected=3))
    assert {tx: (a.severity, a.suppressed_count) for tx, a in alerts.items()} == {
        "e1": (LOW, 0),
        "e3": (MEDIUM, 1),
        "e6": (HIGH, 2),
    }


# --- exactly once across a crash -------------------------------------------------------------


async def _fetch_all(settings: Settings, expected: int) -> list[ConsumerRecord]:
    """The score records as the service would fetch them (no group, nothing committed)."""
    consumer = make_consumer(settings, group_id=None, client_id="test-crash")
    await consumer.start()
    try:
        partitions = [
            TopicPartition(settings.topics.scores, p)
            for p in range(settings.kafka.topic_partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + 30
        while len(records) < expected and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            records.extend(r for recs in batch.values() for r in recs)
        assert len(records) == expected
        return records
    finally:
        await consumer.stop()


async def test_crash_before_the_commit_yields_exactly_one_alert(infra: Infra) -> None:
    settings = await alerting_settings(infra, ALERT_SUPPRESSION_WINDOW_S="2")
    first = [
        ("c1", "acct-c", T0),  # alert
        ("c2", "acct-c", T0 + 500),  # suppressed (pending 1)
        ("d1", "acct-d", T0),  # alert
    ]
    await produce(
        settings,
        settings.topics.scores,
        [keyed(scored(t, a, at_ms=at), a) for t, a, at in first],
    )

    # The crash: the batch ran through Redis and its alerts went into a Kafka transaction with the
    # service's own transactional id, which then never committed (the process "died").
    redis = make_redis(settings)
    try:
        transform = AlertTransform(
            policy=parse_policy(settings.alerting.policy),
            store=AlertStore.from_settings(redis, settings),
            alerts_topic=settings.topics.alerts,
        )
        outputs = await transform(await _fetch_all(settings, len(first)))
    finally:
        await redis.aclose()
    assert len(outputs) == 2
    tx_id = transactional_id(settings.alerting.group_id, settings.instance_id)
    producer = make_transactional_producer(settings, tx_id)
    await producer.start()
    try:
        await producer.begin_transaction()
        futures = [await producer.send(o.topic, o.value, key=o.key) for o in outputs]
        await asyncio.gather(*futures)  # in the log, but uncommitted
    finally:
        await producer.stop()

    # The restart: the same records again, from the last committed offset (none).
    await run(settings, len(first))
    # Then a later alert of (acct-c, VELOCITY_1M): c2 must have been counted once, not twice.
    await produce(
        settings, settings.topics.scores, [keyed(scored("c3", "acct-c", at_ms=T0 + 2500), "acct-c")]
    )
    await run(settings, 1)

    alerts = by_tx(await read_alerts(settings, expected=3))
    assert sorted(alerts) == ["c1", "c3", "d1"]
    replayed = {scoring_pb2.Alert.FromString(o.value).transaction_id: o.value for o in outputs}
    for tx, value in replayed.items():  # the same alert, byte for byte (same id, same created_at)
        assert alerts[tx].SerializeToString() == value
    assert alerts["c3"].suppressed_count == 1

    client = make_redis(settings)
    store = AlertStore.from_settings(client, settings)
    try:
        listed, _ = await store.list_alerts(None, 10)
        assert sorted(a.transaction_id for a in listed) == ["c1", "c3", "d1"]
        recent, _ = await store.list_alerts("acct-c", 10)
        assert [a.transaction_id for a in recent] == ["c3", "c1"]
        assert await store.open_alert_count("acct-c") == 2
    finally:
        await client.aclose()


async def test_a_duplicate_score_raises_no_second_alert(infra: Infra) -> None:
    settings = await alerting_settings(infra)
    value = scored("dup-1", "acct-dup", reasons=("AMOUNT_HIGH",))
    await produce(settings, settings.topics.scores, [keyed(value, "acct-dup")] * 2)
    stats = await run(settings, 2)
    alerts = await read_alerts(settings, expected=1)
    assert [a.transaction_id for a in alerts] == ["dup-1"]
    assert (stats.alerts, stats.duplicates) == (1, 1)


# --- bad input -------------------------------------------------------------------------------


async def test_malformed_scores_are_skipped_and_the_service_goes_on(infra: Infra) -> None:
    settings = await alerting_settings(infra)
    no_account = scoring_pb2.ScoredTransaction(
        transaction=transaction_pb2.Transaction(transaction_id="tx-no-account"),
        decision=DECLINE,
        score=0.9,
    ).SerializeToString()
    before = metric("fraudstream_alerting_malformed_scores_total")
    records: list[tuple[bytes | None, bytes | None, None]] = [
        (b"acct-m", b"\xff\xfe not protobuf", None),
        (b"acct-m", None, None),
        (b"acct-m", no_account, None),
        keyed(scored("tx-good", "acct-m"), "acct-m"),  # same partition, after the bad ones
    ]
    await produce(settings, settings.topics.scores, records)
    stats = await run(settings, len(records))
    alerts = await read_alerts(settings, expected=1)
    assert [a.transaction_id for a in alerts] == ["tx-good"]
    assert stats.malformed == 3
    assert metric("fraudstream_alerting_malformed_scores_total") - before == 3


# --- the webhook never holds the Kafka output back --------------------------------------------


async def test_a_hanging_webhook_does_not_hold_back_kafka_output(infra: Infra) -> None:
    async with webhook_receiver(hang=True) as (url, _):
        settings = await alerting_settings(
            infra,
            ALERT_WEBHOOK_URL=url,
            ALERT_WEBHOOK_TIMEOUT_S="30",
            ALERT_WEBHOOK_QUEUE_MAX="2",
        )
        accounts = [f"acct-w{i}" for i in range(12)]
        await produce(
            settings,
            settings.topics.scores,
            [keyed(scored(f"w{i}", a), a) for i, a in enumerate(accounts)],
        )
        dropped = metric("fraudstream_alerting_webhook_dropped_total", reason="queue_full")
        left = metric("fraudstream_alerting_webhook_dropped_total", reason="shutdown")
        await run(settings, len(accounts), drain_timeout_s=0.2)
        alerts = await read_alerts(settings, expected=len(accounts))
    assert len(by_tx(alerts)) == len(accounts)
    # 4 workers hold 4 alerts at the hanging server, 2 wait in the queue, the rest is dropped;
    # how many each batch boundary lets through varies, but nothing is lost silently.
    now_dropped = metric("fraudstream_alerting_webhook_dropped_total", reason="queue_full")
    now_left = metric("fraudstream_alerting_webhook_dropped_total", reason="shutdown")
    assert (now_dropped - dropped) + (now_left - left) == len(accounts)
    assert now_dropped - dropped > 0


# --- the store: recent alerts, the stream, pages, open counts, watch -------------------------


def _alert(n: int, account: str) -> scoring_pb2.Alert:
    alert = scoring_pb2.Alert(
        alert_id=alert_id_for(f"s{n}"),
        account_id=account,
        transaction_id=f"s{n}",
        severity=HIGH,
        score=0.9,
        decision=DECLINE,
        reasons=[scoring_pb2.Reason(code=f"R{n}")],
    )
    alert.created_at.FromMilliseconds(int(time.time() * 1000))
    return alert


async def _record(store: AlertStore, alerts: Sequence[scoring_pb2.Alert]) -> None:
    from shared.alert_store import AlertCandidate

    results = await store.record(
        [
            AlertCandidate(a, reason_code=a.reasons[0].code, event_time_ms=T0, origin=f"t:0:{i}")
            for i, a in enumerate(alerts)
        ]
    )
    assert all(r.outcome.emits for r in results)


@pytest.fixture
def store(settings: Settings, redis: aioredis.Redis) -> Iterator[AlertStore]:
    narrow = dataclasses.replace(
        settings, alerting=dataclasses.replace(settings.alerting, recent_per_account=3)
    )
    yield AlertStore.from_settings(redis, narrow)


async def test_recent_alerts_are_capped_newest_first_and_paged(store: AlertStore) -> None:
    await _record(store, [_alert(n, "acct-r") for n in range(5)])
    await _record(store, [_alert(n, "acct-other") for n in range(5, 7)])

    page, token = await store.list_alerts("acct-r", page_size=2)
    assert [a.transaction_id for a in page] == ["s4", "s3"]  # newest first
    page2, token2 = await store.list_alerts("acct-r", page_size=2, page_token=token)
    assert ([a.transaction_id for a in page2], token2) == (["s2"], "")  # the cap (3) kept 3

    # A new alert between pages does not shift the next page: tokens hold a position.
    page, token = await store.list_alerts("acct-r", page_size=1)
    assert [a.transaction_id for a in page] == ["s4"]
    await _record(store, [_alert(9, "acct-r")])
    page2, _ = await store.list_alerts("acct-r", page_size=1, page_token=token)
    assert [a.transaction_id for a in page2] == ["s3"]
    first, _ = await store.list_alerts("acct-r", page_size=0)
    assert [a.transaction_id for a in first] == ["s9", "s4", "s3"]
    assert await store.list_alerts("acct-none", page_size=5) == ([], "")
    assert await store.open_alert_count("acct-r") == 6
    assert await store.open_alert_count("acct-none") == 0


async def test_the_stream_lists_every_account_newest_first(store: AlertStore) -> None:
    alerts = [_alert(n, f"acct-{n % 2}") for n in range(5)]
    await _record(store, alerts)
    seen: list[str] = []
    token = ""
    for _ in range(10):  # bounded: 5 alerts in pages of 2
        page, token = await store.list_alerts(None, page_size=2, page_token=token)
        seen += [a.transaction_id for a in page]
        if not token:
            break
    assert seen == ["s4", "s3", "s2", "s1", "s0"]
    assert await store.alert_exists(alerts[0].alert_id)
    assert not await store.alert_exists("no-such-alert")
    got = await store.get_alert(alerts[2].alert_id)
    assert got is not None
    assert got.SerializeToString() == alerts[2].SerializeToString()


async def test_bad_page_tokens_and_sizes_are_clear_errors(store: AlertStore) -> None:
    await _record(store, [_alert(n, "acct-t") for n in range(3)])
    _, account_token = await store.list_alerts("acct-t", page_size=1)
    _, all_token = await store.list_alerts(None, page_size=1)
    assert account_token and all_token
    for bad in ("not a token", "!!!", "MXxhOmFjY3QtdHw", account_token + "x"):
        with pytest.raises(InvalidPageToken) as info:
            await store.list_alerts("acct-t", page_size=1, page_token=bad)
        assert info.value.field == "page_token"
    with pytest.raises(InvalidPageToken, match="another account_id"):
        await store.list_alerts("acct-u", page_size=1, page_token=account_token)
    with pytest.raises(InvalidPageToken):
        await store.list_alerts("acct-t", page_size=1, page_token=all_token)
    with pytest.raises(InputError) as size_error:
        await store.list_alerts(None, page_size=-1)
    assert size_error.value.field == "page_size"


async def test_watch_streams_new_alerts_and_resumes_after_an_id(store: AlertStore) -> None:
    before = [_alert(n, "acct-x") for n in range(2)]
    await _record(store, before)
    stop = asyncio.Event()

    live = await store.watch(None, None, stop, block_ms=200)  # from now on: not s0, s1
    mine = await store.watch("acct-y", None, stop, block_ms=200)
    resumed = await store.watch(None, before[0].alert_id, stop, block_ms=200)
    after = [_alert(2, "acct-x"), _alert(3, "acct-y")]
    await _record(store, after)

    async def take(alerts: AsyncIterator[scoring_pb2.Alert], n: int) -> list[str]:
        got: list[str] = []
        async for alert in alerts:
            got.append(alert.transaction_id)
            if len(got) == n:
                break
        return got

    assert await asyncio.wait_for(take(live, 2), 10) == ["s2", "s3"]
    assert await asyncio.wait_for(take(mine, 1), 10) == ["s3"]
    assert await asyncio.wait_for(take(resumed, 3), 10) == ["s1", "s2", "s3"]

    # `stop` ends a watch that is waiting for alerts, within one block time.
    idle = await store.watch(None, None, stop, block_ms=100)
    waiter = asyncio.create_task(take(idle, 1))
    stop.set()
    assert await asyncio.wait_for(waiter, 10) == []

    with pytest.raises(UnknownAlertId) as info:
        await store.watch(None, "no-such-alert", stop)
    assert (info.value.code, info.value.field) == ("UNKNOWN_ALERT_ID", "after_alert_id")


async def test_watch_refuses_to_resume_after_a_trimmed_alert(
    settings: Settings, redis: aioredis.Redis
) -> None:
    tiny = dataclasses.replace(
        settings, alerting=dataclasses.replace(settings.alerting, stream_maxlen=1)
    )
    store = AlertStore.from_settings(redis, tiny)
    alerts = [_alert(n, "acct-z") for n in range(300)]
    for n in range(0, 300, 50):  # MAXLEN ~ trims whole nodes (100 entries): write plenty
        await _record(store, alerts[n : n + 50])
    with pytest.raises(UnknownAlertId) as info:
        await store.watch(None, alerts[0].alert_id, asyncio.Event())
    assert info.value.code == "ALERT_ID_EXPIRED"


# --- the service as a process: SIGKILL mid-stream, restart, SIGTERM --------------------------


def _service_env(settings: Settings) -> dict[str, str]:
    topics = settings.topics
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "KAFKA_TOPIC_PARTITIONS": str(settings.kafka.topic_partitions),
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "FRAUDSTREAM_INSTANCE_ID": settings.instance_id,
        "ALERTING_GROUP_ID": settings.alerting.group_id,
        "ALERT_SUPPRESSION_WINDOW_S": str(settings.alerting.suppression_window_s),
        "TOPIC_TRANSACTIONS_RAW": topics.raw,
        "TOPIC_TRANSACTIONS_VALID": topics.valid,
        "TOPIC_TRANSACTIONS_DLQ": topics.dlq,
        "TOPIC_RISK_SCORES": topics.scores,
        "TOPIC_RISK_ALERTS": topics.alerts,
        "TOPIC_RISK_LABELS": topics.labels,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
    }


def _start(settings: Settings, log_path: Path) -> subprocess.Popen[bytes]:
    with log_path.open("ab") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "services.alerting", "--max-seconds", "240"],
            cwd=REPO,
            env=_service_env(settings),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )


async def _stream_length(settings: Settings, at_least: int, timeout_s: float = 60) -> int:
    client = make_redis(settings)
    try:
        deadline = time.monotonic() + timeout_s
        length = 0
        while time.monotonic() < deadline:
            length = await client.xlen(f"{settings.redis_key_prefix}:{{alerts}}:stream")
            if length >= at_least:
                break
            await asyncio.sleep(0.05)
        return int(length)
    finally:
        await client.aclose()


async def test_sigkill_and_restart_publish_each_alert_once(infra: Infra, tmp_path: Path) -> None:
    settings = await alerting_settings(infra, ALERT_SUPPRESSION_WINDOW_S="2")
    accounts = [f"acct-k{i}" for i in range(8)]

    def wave(step: int) -> list[tuple[bytes, bytes, None]]:
        # Per account, scores 500 ms apart: step 0 alerts, 1-3 are suppressed, 4 alerts with 3.
        return [keyed(scored(f"{a}-{step}", a, at_ms=T0 + 500 * step), a) for a in accounts]

    await produce(settings, settings.topics.scores, [r for step in (0, 1, 2) for r in wave(step)])
    log_path = tmp_path / "alerting.log"
    first = _start(settings, log_path)
    try:
        # Kill -9 as soon as the first alerts are in Redis: before or after its Kafka commit.
        assert await _stream_length(settings, at_least=1) >= 1
    finally:
        first.kill()
        first.wait(timeout=30)
    await produce(settings, settings.topics.scores, [r for step in (3, 4) for r in wave(step)])

    second = _start(settings, log_path)
    try:
        alerts = by_tx(await read_alerts(settings, expected=2 * len(accounts), settle_s=2.0))
        second.send_signal(signal.SIGTERM)
        assert second.wait(timeout=60) == 0
    finally:
        if second.poll() is None:
            second.kill()
            second.wait(timeout=30)

    assert sorted(alerts) == sorted(f"{a}-{step}" for a in accounts for step in (0, 4))
    for a in accounts:
        assert alerts[f"{a}-0"].suppressed_count == 0
        assert alerts[f"{a}-4"].suppressed_count == 3
    assert await _stream_length(settings, at_least=2 * len(accounts)) == 2 * len(accounts)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert any(line.get("event") == "alerting_finished" for line in lines)


# --- fraudstream alerts tail ----------------------------------------------------------------


async def test_alerts_tail_prints_one_line_per_alert(infra: Infra) -> None:
    settings = await alerting_settings(infra)
    scores = [
        keyed(scored("tl-1", "acct-t1", reasons=("VELOCITY_1M", "MODEL_AMOUNT")), "acct-t1"),
        keyed(scored("tl-2", "acct-t2", decision=REVIEW, score=0.6, reasons=("GEO",)), "acct-t2"),
        keyed(scored("tl-3", "acct-t3", decision=APPROVE, score=0.4, reasons=()), "acct-t3"),
    ]
    await produce(settings, settings.topics.scores, scores)
    await run(settings, len(scores))
    await read_alerts(settings, expected=3)

    out, err = io.StringIO(), io.StringIO()
    assert await tail(settings, from_beginning=True, max_alerts=3, duration_s=30, out=out) == 0
    lines = {line.split()[-1]: line for line in out.getvalue().splitlines()}
    assert sorted(lines) == ["tl-1", "tl-2", "tl-3"]
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ  HIGH +acct-t1 +0\.900  DECLINE  VELOCITY_1M, "
        r"MODEL_AMOUNT  tl-1$",
        lines["tl-1"],
    ), lines["tl-1"]
    assert " MEDIUM " in lines["tl-2"] and " REVIEW " in lines["tl-2"]
    assert "(no reasons)" in lines["tl-3"]

    high = io.StringIO()
    await tail(settings, from_beginning=True, min_severity=HIGH, duration_s=3, out=high, err=err)
    assert [line.split()[-1] for line in high.getvalue().splitlines()] == ["tl-1"]
    assert err.getvalue() == ""

    # The real command line, as an operator runs it.
    command = ["alerts", "tail", "--from-beginning", "--max", "2", "--severity", "medium"]
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "shared.cli", *command, "--duration", "60"],
        cwd=REPO,
        env=_service_env(settings),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode == 0, stderr
    printed = sorted(line.split()[-1] for line in stdout.decode().splitlines())
    assert printed == ["tl-1", "tl-2"]
