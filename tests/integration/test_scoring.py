"""Scoring against the real broker and Redis: end to end, exactly once across crashes and
kill -9, hot reload (broken files included), refusal of a mismatched model, labels moving
terminal risk, and the assessment store the query service reads.

Every test has its own topics, consumer groups and Redis prefix (the `settings` fixture). Loops
are bounded by count and deadline; nothing asserts on wall-clock durations.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import sys
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis import exceptions as redis_errors

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from services.scoring.__main__ import ScoringRun, run_scoring
from services.scoring.service import (
    ScoringService,
)
from shared.config import Settings, load_settings
from shared.dlq import DLQ_HEADER_CODE, DLQ_HEADER_SOURCE_OFFSET, DLQ_HEADER_SOURCE_PARTITION
from shared.kafka import make_admin, make_consumer, make_transactional_producer
from shared.kafka import transactional_id as make_transactional_id
from shared.redis_client import make_redis
from shared.redis_packing import OrderedConnection
from shared.scoring.assessments import (
    AssessmentEntry,
    AssessmentStore,
    FirstApplication,
    LabelStatus,
    entry_of,
)
from shared.scoring.engine import ScoringEngine
from shared.scoring.features import DAY_MS, FEATURE_NAMES
from shared.scoring.model import ModelArtifact, ModelError, save_model
from shared.scoring.velocity import VelocityStore
from tests.kafka_helpers import consume_committed, produce

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RULES = REPO / "rules" / "default.toml"
DEFAULT_RULES_VERSION = tomllib.loads(DEFAULT_RULES.read_text())["version"]
BASE_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: event times are data here, not "now"
D = len(FEATURE_NAMES)


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def _clean_redis(settings: Settings) -> AsyncIterator[None]:
    """Remove this test's Redis keys afterwards (they would expire, but only in weeks)."""
    yield
    client = make_redis(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis_key_prefix}*")]
        for start in range(0, len(keys), 500):
            await client.unlink(*keys[start : start + 500])
    finally:
        await client.aclose()


def make_model(version: str = "test-model-1", bias: float = -5.0) -> ModelArtifact:
    """A readable model: risk grows with the amount and with the hour's count."""
    weights = np.zeros(D)
    weights[FEATURE_NAMES.index("amount_log")] = 1.0
    weights[FEATURE_NAMES.index("count_1h")] = 0.5
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


def with_files(settings: Settings, tmp_path: Path) -> Settings:
    """These settings with a private copy of the default rules and a test model."""
    rules = tmp_path / "rules.toml"
    rules.write_text(DEFAULT_RULES.read_text())
    model = tmp_path / "model.json"
    save_model(make_model(), model)
    return dataclasses.replace(
        settings,
        scoring=dataclasses.replace(
            settings.scoring, rules_path=str(rules), model_path=str(model), batch_max=200
        ),
    )


def make_tx(
    index: int,
    *,
    account: str | None = None,
    at_ms: int | None = None,
    units: int = 2500,
    terminal: str = "term-1",
) -> transaction_pb2.Transaction:
    tx = transaction_pb2.Transaction(
        transaction_id=f"tx-{index}",
        account_id=account or f"acct-{index % 4}",
        card_id="card-tok",
        merchant_id=f"m-{index % 5}",
        merchant_category="5411",
        terminal_id=terminal,
        amount=transaction_pb2.Money(units=units, currency="EUR"),
        country="NL",
        latitude=52.37,
        longitude=4.89,
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
        device_id="dev-1",
    )
    tx.event_time.FromMilliseconds(BASE_MS + index * 30_000 if at_ms is None else at_ms)
    return tx


def valid_record(tx: transaction_pb2.Transaction) -> tuple[bytes, bytes, None]:
    return tx.account_id.encode(), tx.SerializeToString(deterministic=True), None


def label_record(
    tx: transaction_pb2.Transaction, is_fraud: bool = True
) -> tuple[bytes, bytes, None]:
    label = transaction_pb2.Label(
        transaction_id=tx.transaction_id,
        account_id=tx.account_id,
        terminal_id=tx.terminal_id,
        is_fraud=is_fraud,
        source="test",
    )
    label.reported_at.FromMilliseconds(tx.event_time.ToMilliseconds() + 7 * DAY_MS)
    return tx.account_id.encode(), label.SerializeToString(), None


def parse(record: ConsumerRecord) -> scoring_pb2.ScoredTransaction:
    return scoring_pb2.ScoredTransaction.FromString(record.value)


async def hlen(redis: aioredis.Redis, key: str) -> int:
    # redis-py types commands as `Awaitable[T] | T` (its sync and async clients share them).
    return int(await cast(Awaitable[Any], redis.hlen(key)))


def metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def score(
    settings: Settings, records: int, *, labels: bool = False, timeout_s: float = 90.0
) -> tuple[ScoringRun, CollectorRegistry]:
    """Run the service in-process until `records` inputs are committed (bounded by time)."""
    registry = CollectorRegistry()
    run = await asyncio.wait_for(
        run_scoring(
            settings,
            max_records=records,
            max_seconds=timeout_s,
            handle_signals=False,
            labels=labels,
            registry=registry,
        ),
        timeout=timeout_s + 30,
    )
    assert run.batches.records_in >= records, f"committed {run.batches.records_in} of {records}"
    return run, registry


class Background:
    """The service running as a task until `stop()`; for tests that feed it step by step."""

    def __init__(self, settings: Settings, *, labels: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(
            run_scoring(
                settings,
                max_seconds=240,
                handle_signals=False,
                labels=labels,
                registry=self.registry,
                stop=self.stop_event,
            )
        )

    async def stop(self) -> ScoringRun:
        self.stop_event.set()
        return await asyncio.wait_for(self.task, timeout=60)


async def scores_of(settings: Settings, expected: int) -> list[scoring_pb2.ScoredTransaction]:
    records = await consume_committed(settings, settings.topics.scores, expected=expected)
    return [parse(r) for r in records]


# --- end to end -------------------------------------------------------------------------------


async def test_end_to_end_scores_each_transaction_once_and_writes_latest(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    txs = [make_tx(i) for i in range(24)]
    garbage = (b"acct-x", b"\xff\xff\xff not a transaction", [("trace", b"abc")])
    await produce(
        settings,
        settings.topics.valid,
        [valid_record(t) for t in txs[:10]] + [garbage] + [valid_record(t) for t in txs[10:]],
    )
    run, registry = await score(settings, 25)

    records = await consume_committed(settings, settings.topics.scores, expected=24)
    assert len(records) == 24
    by_id = {parse(r).transaction.transaction_id: (r, parse(r)) for r in records}
    assert sorted(by_id) == sorted(t.transaction_id for t in txs)
    inputs = await consume_committed(settings, settings.topics.valid, expected=25)
    entered = {r.value: r.timestamp for r in inputs}
    for tx in txs:
        record, scored = by_id[tx.transaction_id]
        assert record.key == tx.account_id.encode()
        assert scored.transaction == tx
        assert scored.model_version == "test-model-1"
        assert scored.rules_version == DEFAULT_RULES_VERSION
        assert set(scored.features) == set(FEATURE_NAMES)
        assert 0.0 <= scored.score <= 1.0
        assert scored.decision != scoring_pb2.DECISION_UNSPECIFIED
        # The input record's timestamp travels on, and is the pipeline entry time.
        assert record.timestamp == scored.ingested_at.ToMilliseconds()
        assert record.timestamp == entered[tx.SerializeToString(deterministic=True)]
    # Velocity: each account's k-th transaction (30 s apart, 4 accounts) sees k in its hour.
    for tx in txs:
        k = txs.index(tx) // 4 + 1
        assert by_id[tx.transaction_id][1].features["count_1h"] == k
        assert by_id[tx.transaction_id][1].features["count_30d"] == k

    # The malformed record went to the DLQ, untouched, with headers naming the error.
    (dead,) = await consume_committed(settings, settings.topics.dlq, expected=1)
    (source,) = [r for r in inputs if r.value == garbage[1]]
    headers = dict(dead.headers)
    assert dead.value == garbage[1] and dead.key == garbage[0]
    assert headers[DLQ_HEADER_CODE] == b"UNDECODABLE"
    assert headers["trace"] == b"abc"
    assert headers[DLQ_HEADER_SOURCE_OFFSET] == str(source.offset).encode()
    assert headers[DLQ_HEADER_SOURCE_PARTITION] == str(source.partition).encode()

    # Metrics counted once per committed transaction.
    scored_total = sum(
        metric(registry, "fraudstream_scoring_scored_total", decision=d)
        for d in ("APPROVE", "REVIEW", "DECLINE")
    )
    assert scored_total == 24
    assert metric(registry, "fraudstream_scoring_rejected_total", code="UNDECODABLE") == 1
    assert metric(registry, "fraudstream_scoring_velocity_results_total", status="applied") == 24
    assert sum(run.totals.scored.values()) == 24

    # The latest assessment of each account is its newest transaction, without the features.
    store = AssessmentStore(redis, settings.redis_key_prefix)
    for account in {t.account_id for t in txs}:
        newest = [t for t in txs if t.account_id == account][-1]
        latest = await store.latest(account)
        assert latest is not None
        assert latest.transaction == newest
        expected = by_id[newest.transaction_id][1]
        expected.ClearField("features")
        assert latest == expected
    assert await store.latest("acct-never-seen") is None


async def test_rules_fire_and_shadow_rules_are_reported_not_acted_on(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    # 6 small payments a second apart (card testing burst: active review), then one of 20,000
    # (extreme amount: active decline).
    txs = [make_tx(i, account="acct-burst", at_ms=BASE_MS + i * 1000, units=200) for i in range(6)]
    txs.append(make_tx(99, account="acct-big", units=2_000_000))
    await produce(settings, settings.topics.valid, [valid_record(t) for t in txs])
    _, registry = await score(settings, len(txs))
    scores = {s.transaction.transaction_id: s for s in await scores_of(settings, len(txs))}
    burst = scores["tx-5"]
    assert burst.decision == scoring_pb2.DECISION_REVIEW
    assert burst.reasons[0].code == "CARD_TESTING"
    assert burst.reasons[0].source == scoring_pb2.Reason.SOURCE_RULE
    big = scores["tx-99"]
    assert big.decision == scoring_pb2.DECISION_DECLINE
    assert [r.code for r in big.reasons if r.source == scoring_pb2.Reason.SOURCE_RULE] == [
        "EXTREME_AMOUNT"
    ]
    assert metric(
        registry, "fraudstream_scoring_rule_hits_total", rule="card_testing_burst", mode="active"
    ) == sum(1 for s in scores.values() if s.reasons and s.reasons[0].code == "CARD_TESTING")
    assert metric(registry, "fraudstream_scoring_scored_total", decision="DECLINE") >= 1


# --- exactly once -----------------------------------------------------------------------------


async def crash_mid_transaction(expected: int) -> None:
    """Run in a child process: a whole batch up to the produce, then die before the commit.

    Velocity counters and latest assessments are written to Redis, the outputs are in the
    Kafka log inside an open transaction; then the process exits like a SIGKILL would."""
    settings = load_settings()
    group = settings.scoring.group_id
    producer = make_transactional_producer(
        settings, make_transactional_id(group, settings.instance_id)
    )
    await producer.start()
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    partitions = range(settings.kafka.topic_partitions)
    consumer.assign([TopicPartition(settings.topics.valid, p) for p in partitions])
    redis = make_redis(settings)
    service = ScoringService(
        topics=settings.topics,
        engine=ScoringEngine.from_settings(settings.scoring),
        velocity=VelocityStore.from_settings(redis, settings),
        assessments=AssessmentStore.from_settings(redis, settings),
    )
    records: list[ConsumerRecord] = []
    deadline = time.monotonic() + 30
    while len(records) < expected and time.monotonic() < deadline:
        batch = await consumer.getmany(timeout_ms=200)
        records += [r for recs in batch.values() for r in recs]
    outputs = await service.transform(records)
    await producer.begin_transaction()
    for output in outputs:
        await producer.send(output.topic, output.value, key=output.key)
    await producer.flush()
    print(f"crashing with {len(outputs)} uncommitted outputs", flush=True)
    os._exit(137)


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process load exactly these test settings."""
    topics = settings.topics
    scoring = settings.scoring
    return {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "REDIS_URL": settings.redis_url,
        "REDIS_KEY_PREFIX": settings.redis_key_prefix,
        "FRAUDSTREAM_INSTANCE_ID": settings.instance_id,
        "KAFKA_TOPIC_PARTITIONS": str(settings.kafka.topic_partitions),
        "TOPIC_TRANSACTIONS_RAW": topics.raw,
        "TOPIC_TRANSACTIONS_VALID": topics.valid,
        "TOPIC_TRANSACTIONS_DLQ": topics.dlq,
        "TOPIC_RISK_SCORES": topics.scores,
        "TOPIC_RISK_ALERTS": topics.alerts,
        "TOPIC_RISK_LABELS": topics.labels,
        "SCORING_GROUP_ID": scoring.group_id,
        "SCORING_RULES_PATH": scoring.rules_path,
        "SCORING_MODEL_PATH": scoring.model_path,
        "SCORING_BATCH_MAX": str(scoring.batch_max),
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
        **extra,
    }


def tail(path: Path) -> str:
    return path.read_text()[-3000:] if path.exists() else ""


async def run_child(
    settings: Settings, args: list[str], log_path: Path, **env: str
) -> asyncio.subprocess.Process:
    with log_path.open("ab") as log_file:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            cwd=REPO,
            env=child_env(settings, **env),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
        )


async def wait_exit(process: asyncio.subprocess.Process, log_path: Path, timeout_s: float) -> int:
    try:
        return await asyncio.wait_for(process.wait(), timeout=timeout_s)
    except TimeoutError:
        process.kill()
        await process.wait()
        pytest.fail(f"child did not exit in {timeout_s} s:\n{tail(log_path)}")


async def committed_offsets(settings: Settings, group: str) -> int:
    admin = make_admin(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(group)
        return sum(meta.offset for meta in offsets.values() if meta.offset >= 0)
    finally:
        await admin.close()


def assert_counted_once(
    scores: list[scoring_pb2.ScoredTransaction], txs: list[transaction_pb2.Transaction]
) -> None:
    """Each transaction scored once, and each account's k-th transaction saw exactly k in its
    30-day window: no counter moved twice, none was lost."""
    ids = [s.transaction.transaction_id for s in scores]
    assert len(ids) == len(txs), f"{len(ids)} scores for {len(txs)} transactions"
    assert sorted(ids) == sorted(t.transaction_id for t in txs)
    position: dict[str, int] = {}
    rank: dict[str, int] = {}
    for tx in txs:  # produced in event-time order per account
        position[tx.account_id] = position.get(tx.account_id, 0) + 1
        rank[tx.transaction_id] = position[tx.account_id]
    for s in scores:
        assert s.features["count_30d"] == rank[s.transaction.transaction_id], s.transaction


async def test_crash_before_commit_then_restart_scores_each_transaction_once(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    txs = [make_tx(i) for i in range(8)]
    await produce(settings, settings.topics.valid, [valid_record(t) for t in txs])
    log_path = tmp_path / "crash.log"
    child = await run_child(
        settings,
        [
            "-c",
            "import asyncio; from tests.integration.test_scoring import crash_mid_transaction; "
            "asyncio.run(crash_mid_transaction(8))",
        ],
        log_path,
    )
    assert await wait_exit(child, log_path, 90) == 137, tail(log_path)
    assert "crashing with 8 uncommitted outputs" in log_path.read_text()
    # The dead batch moved the counters and wrote latest assessments, but published nothing.
    assert await AssessmentStore(redis, settings.redis_key_prefix).latest("acct-0") is not None
    assert await consume_committed(settings, settings.topics.scores, expected=0) == []

    # Restart with the same instance id: it fences the dead transaction and redoes the batch;
    # the velocity store returns the stored results, so nothing is counted twice.
    run, registry = await score(settings, 8)
    assert_counted_once(await scores_of(settings, 8), txs)
    assert metric(registry, "fraudstream_scoring_velocity_results_total", status="duplicate") == 8
    assert sum(run.totals.scored.values()) == 8


async def test_kill_9_mid_stream_loses_nothing_and_counts_nothing_twice(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    total = 400
    txs = [make_tx(i, account=f"acct-{i % 23}") for i in range(total)]
    await produce(settings, settings.topics.valid, [valid_record(t) for t in txs])
    log_path = tmp_path / "scoring.log"
    args = ["-m", "services.scoring", "--max-seconds", "150", "--no-labels"]
    group = settings.scoring.group_id
    # Small batches: many transactions, so the kill lands between two of them.
    first = await run_child(settings, args, log_path, SCORING_BATCH_MAX="5")

    async def some_committed() -> bool:
        return await committed_offsets(settings, group) > 0

    await wait_until(some_committed, timeout_s=90, what="a first committed batch")
    first.send_signal(signal.SIGKILL)
    await wait_exit(first, log_path, 30)
    assert await committed_offsets(settings, group) < total, "killed too late to test anything"

    second = await run_child(settings, args, log_path, SCORING_BATCH_MAX="50")

    async def all_committed() -> bool:
        return await committed_offsets(settings, group) >= total

    await wait_until(all_committed, timeout_s=120, what="every record committed after restart")
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, log_path, 60) == 0, tail(log_path)
    assert_counted_once(await scores_of(settings, total), txs)
    lines = [json.loads(x) for x in log_path.read_text().splitlines() if x.startswith("{")]
    assert "scoring_finished" in [line.get("event") for line in lines]


# --- hot reload -------------------------------------------------------------------------------


def replace_text(path: Path, text: str) -> None:
    """Write atomically (temp file + rename), as operators are told to."""
    temp = path.with_suffix(".tmp")
    temp.write_text(text)
    os.replace(temp, path)


async def test_hot_reload_of_rules_and_model_and_broken_files_keep_the_old(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    rules_path, model_path = Path(settings.scoring.rules_path), Path(settings.scoring.model_path)
    service = Background(settings, labels=False)
    seen: list[scoring_pb2.ScoredTransaction] = []

    async def feed(start: int, count: int) -> list[scoring_pb2.ScoredTransaction]:
        txs = [make_tx(i) for i in range(start, start + count)]
        await produce(settings, settings.topics.valid, [valid_record(t) for t in txs])
        total = len(seen) + count

        async def arrived() -> bool:
            records = await consume_committed(
                settings, settings.topics.scores, expected=total, timeout_s=2, settle_s=0.2
            )
            seen[:] = [parse(r) for r in records]
            return len(seen) >= total

        await wait_until(arrived, timeout_s=90, what=f"{total} scores")
        ids = {t.transaction_id for t in txs}
        return [s for s in seen if s.transaction.transaction_id in ids]

    try:
        first = await feed(0, 3)
        assert {(s.rules_version, s.model_version) for s in first} == {
            (DEFAULT_RULES_VERSION, "test-model-1")
        }

        replace_text(
            rules_path, DEFAULT_RULES.read_text().replace(DEFAULT_RULES_VERSION, "reloaded-2")
        )
        save_model(make_model("test-model-2", bias=-2.0), model_path)
        second = await feed(3, 3)
        assert {(s.rules_version, s.model_version) for s in second} == {
            ("reloaded-2", "test-model-2")
        }

        # Broken files: a rule calling a function, a model that is not JSON. Both rejected and
        # counted; the service goes on with the versions in force.
        replace_text(
            rules_path,
            DEFAULT_RULES.read_text()
            .replace(DEFAULT_RULES_VERSION, "broken-3")
            .replace("travel_speed_kmh > 900", "__import__('os').system('true')"),
        )
        replace_text(model_path, '{"format": "fraudstream.logreg.v1", "truncated')
        third = await feed(6, 3)
        assert {(s.rules_version, s.model_version) for s in third} == {
            ("reloaded-2", "test-model-2")
        }
        registry = service.registry
        for artifact in ("rules", "model"):
            assert (
                metric(
                    registry,
                    "fraudstream_scoring_reloads_total",
                    artifact=artifact,
                    outcome="failed",
                )
                == 1
            )
            assert (
                metric(
                    registry,
                    "fraudstream_scoring_reloads_total",
                    artifact=artifact,
                    outcome="reloaded",
                )
                == 1
            )
        assert (
            metric(
                registry,
                "fraudstream_scoring_version_info",
                artifact="model",
                version="test-model-2",
            )
            == 1
        )
    finally:
        run = await service.stop()
    assert sum(run.totals.scored.values()) == 9


# --- refusing a model that does not match ------------------------------------------------------


async def test_a_model_with_other_features_is_refused_at_start(
    settings: Settings, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    good = make_model()
    save_model(
        ModelArtifact(
            version="old-features",
            feature_names=(*FEATURE_NAMES[:-1], "terminal_risk_90d"),
            mean=good.mean,
            scale=good.scale,
            weights=good.weights,
            bias=good.bias,
            trained_at=good.trained_at,
        ),
        settings.scoring.model_path,
    )
    with pytest.raises(ModelError, match=r"missing \['terminal_risk_30d'\]"):
        await run_scoring(settings, handle_signals=False, registry=CollectorRegistry())

    log_path = tmp_path / "refused.log"
    child = await run_child(settings, ["-m", "services.scoring"], log_path)
    assert await wait_exit(child, log_path, 60) == 2
    output = log_path.read_text()
    assert "model features do not match the scoring features" in output
    assert "extra ['terminal_risk_90d']" in output
    assert settings.scoring.model_path in output


# --- labels -----------------------------------------------------------------------------------


async def test_labels_move_terminal_risk_and_live_precision_recall(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    settings = with_files(settings, tmp_path)
    service = Background(settings, labels=True)
    store = AssessmentStore(redis, settings.redis_key_prefix)
    try:
        fraud = make_tx(1, account="acct-victim", terminal="term-x", at_ms=BASE_MS)
        genuine = make_tx(2, account="acct-other", terminal="term-x", at_ms=BASE_MS + 60_000)
        await produce(settings, settings.topics.valid, [valid_record(fraud), valid_record(genuine)])

        async def decided() -> bool:
            first = await store.decision_of("acct-victim", "tx-1")
            return first is not None and await store.decision_of("acct-other", "tx-2") is not None

        await wait_until(decided, timeout_s=90, what="the first decisions")
        # A label for each, the fraud one twice (a redelivery must count once).
        await produce(
            settings,
            settings.topics.labels,
            [label_record(fraud), label_record(genuine, is_fraud=False), label_record(fraud)],
        )

        async def labeled() -> bool:
            record = await store.decision_of("acct-victim", "tx-1")
            other = await store.decision_of("acct-other", "tx-2")
            return bool(record and record.label is True and other and other.label is False)

        await wait_until(labeled, timeout_s=90, what="the labels matched with the decisions")

        async def all_labels() -> bool:
            return (
                metric(service.registry, "fraudstream_scoring_labels_total", outcome="repeated")
                == 1
            )

        await wait_until(all_labels, timeout_s=60, what="the repeated label counted")
        # Eight days later at the same terminal: the fraud (booked on its own day, known for
        # 7 days) is in the 7-day delayed window; the label delay keeps it out of day 1.
        later = make_tx(3, account="acct-new", terminal="term-x", at_ms=BASE_MS + 8 * DAY_MS)
        await produce(settings, settings.topics.valid, [valid_record(later)])

        async def later_scored() -> bool:
            return await store.latest("acct-new") is not None

        await wait_until(later_scored, timeout_s=90, what="the later transaction scored")
    finally:
        run = await service.stop()

    scores = {s.transaction.transaction_id: s for s in await scores_of(settings, 3)}
    features = scores["tx-3"].features
    assert features["terminal_count_7d"] == 2
    assert features["terminal_risk_7d"] == 0.5
    assert features["terminal_count_1d"] == 0 and features["terminal_risk_1d"] == 0
    assert scores["tx-1"].features["terminal_risk_30d"] == 0  # nothing known back then

    registry = service.registry
    assert metric(registry, "fraudstream_scoring_labels_total", outcome="matched") == 2
    assert metric(registry, "fraudstream_scoring_labels_total", outcome="repeated") == 1
    assert metric(registry, "fraudstream_scoring_terminal_labels_applied_total") == 1
    # The test model approves both small payments: the fraud is a false negative, the genuine
    # one a true negative; nothing was flagged, so precision is undefined and recall is 0.
    assert scores["tx-1"].decision == scoring_pb2.DECISION_APPROVE
    assert metric(registry, "fraudstream_scoring_label_verdicts_total", cell="fn") == 1
    assert metric(registry, "fraudstream_scoring_label_verdicts_total", cell="tn") == 1
    assert metric(registry, "fraudstream_scoring_live_recall") == 0.0
    assert run.labels is not None and run.labels.totals.outcomes["matched"] == 2


def consumer_records(txs: list[transaction_pb2.Transaction], start: int) -> list[ConsumerRecord]:
    out = []
    for offset, tx in enumerate(txs, start):
        key, value, _ = valid_record(tx)
        out.append(ConsumerRecord("valid", 0, offset, 0, 0, key, value, None, 0, 0, ()))
    return out


async def test_a_broken_ordered_connection_fails_the_batches_in_hand_and_they_score_again(
    settings: Settings, redis: aioredis.Redis, tmp_path: Path
) -> None:
    """Two batches have their velocity calls queued on the ordered connection when it breaks:
    both fail with ConnectionError (the loop then discards them), and scored again they come
    out as if the first attempt never happened: each transaction counted once."""
    settings = with_files(settings, tmp_path)
    ordered = OrderedConnection(redis)
    service = ScoringService(
        topics=settings.topics,
        engine=ScoringEngine.from_settings(settings.scoring),
        velocity=VelocityStore.from_settings(redis, settings, ordered=ordered),
        assessments=AssessmentStore.from_settings(redis, settings, ordered=ordered),
    )
    first = consumer_records([make_tx(i, account="a") for i in range(3)], 0)
    second = consumer_records([make_tx(i, account="a") for i in range(3, 6)], 3)
    try:
        in_hand = [await service.prepare(first), await service.prepare(second)]
        await ordered.aclose()  # as when Redis drops the connection
        for prepared in in_hand:
            with pytest.raises(redis_errors.ConnectionError):
                await service.finish(prepared)
        service.on_batches_discarded()
        outputs = await service.finish(await service.prepare(first))
        outputs += await service.finish(await service.prepare(second))
    finally:
        await ordered.aclose()
    scores = [scoring_pb2.ScoredTransaction.FromString(o.value) for o in outputs]
    # whether or not the first attempt's calls ran, the sixth payment is the account's sixth
    assert [s.features["count_1h"] for s in scores] == [1, 2, 3, 4, 5, 6]
    latest = await AssessmentStore.from_settings(redis, settings).latest("a")
    assert latest is not None and latest.transaction.transaction_id == "tx-5"


# --- the assessment store against real Redis --------------------------------------------------


def scored(tx: transaction_pb2.Transaction, decision: Any) -> scoring_pb2.ScoredTransaction:
    message = scoring_pb2.ScoredTransaction(transaction=tx, score=0.5, decision=decision)
    message.features["amount"] = 1.0
    return message


async def test_assessment_store_keeps_the_newest_and_is_idempotent(
    settings: Settings, redis: aioredis.Redis
) -> None:
    store = AssessmentStore(redis, settings.redis_key_prefix)
    t1 = make_tx(1, account="a", at_ms=BASE_MS + 1000)
    t2 = make_tx(2, account="a", at_ms=BASE_MS + 3000)
    t0 = make_tx(0, account="a", at_ms=BASE_MS)
    await store.write_batch([scored(t1, 1), scored(t2, 2), scored(t0, 1)])
    latest = await store.latest("a")
    assert latest is not None and latest.transaction == t2 and len(latest.features) == 0
    # An out-of-order older transaction later, and a replay of the whole batch: no change.
    await store.write_batch([scored(make_tx(5, account="a", at_ms=BASE_MS + 2000), 3)])
    await store.write_batch([scored(t1, 1), scored(t2, 2), scored(t0, 1)])
    latest = await store.latest("a")
    assert latest is not None and latest.transaction.transaction_id == "tx-2"
    assert latest.decision == scoring_pb2.DECISION_REVIEW

    matches = await store.match_labels(
        [("a", "tx-2", True), ("a", "tx-2", True), ("a", "no", True)]
    )
    assert [m.status for m in matches] == [
        LabelStatus.FIRST,
        LabelStatus.REPEATED,
        LabelStatus.UNKNOWN,
    ]
    assert matches[0].event_ms == BASE_MS + 3000 and matches[0].decision == 2
    # Rescoring the transaction (a redelivery) keeps its label.
    await store.write_batch([scored(t2, 2)])
    record = await store.decision_of("a", "tx-2")
    assert record is not None and record.label is True
    (changed,) = await store.match_labels([("a", "tx-2", False)])
    assert changed.status == LabelStatus.CHANGED and changed.previous is True
    ttl = await redis.pttl(store.latest_key("a"))
    assert 0 < ttl <= store.ttl_ms


async def test_assessment_store_prunes_decisions_to_the_cap(
    settings: Settings, redis: aioredis.Redis
) -> None:
    store = AssessmentStore(redis, settings.redis_key_prefix, decision_cap=64)
    for start in range(0, 400, 50):
        await store.write_batch(
            [
                scored(make_tx(i, account="busy", at_ms=BASE_MS + i * 1000), 1)
                for i in range(start, start + 50)
            ]
        )
    fields = await hlen(redis, store.decisions_key("busy"))
    # The cap and its slack, plus the four bookkeeping fields (latest pointer, prune and
    # expiry marks, count).
    assert fields <= 64 + 3 + 4
    assert await store.decision_of("busy", "tx-399") is not None
    assert await store.decision_of("busy", "tx-0") is None
    # Old decisions leave by event time too.
    await store.write_batch([scored(make_tx(1000, account="busy", at_ms=BASE_MS + 40 * DAY_MS), 1)])
    assert await hlen(redis, store.decisions_key("busy")) == 1 + 4


def applied(
    tx: transaction_pb2.Transaction,
    decision: int,
    *,
    in_order: bool = True,
    previous_ms: int | None = None,
    count_30d: int = 1,
) -> AssessmentEntry:
    """The entry the scoring service writes for a transaction the velocity store applied for
    the first time: the fast path."""
    return entry_of(scored(tx, decision))._replace(
        first=FirstApplication(in_order=in_order, previous_ms=previous_ms, count_30d=count_30d),
    )


async def test_fast_path_writes_decisions_latest_and_expiry_without_reading(
    settings: Settings, redis: aioredis.Redis
) -> None:
    store = AssessmentStore(redis, settings.redis_key_prefix)
    t0 = make_tx(0, account="f", at_ms=BASE_MS)
    t1 = make_tx(1, account="f", at_ms=BASE_MS + 1000)
    replaced = await store.write_encoded(
        [applied(t0, 1), applied(t1, 2, previous_ms=BASE_MS, count_30d=2)]
    )
    assert replaced == 1
    latest = await store.latest("f")
    assert latest is not None and latest.transaction == t1 and len(latest.features) == 0
    assert 0 < await redis.pttl(store.decisions_key("f")) <= store.ttl_ms  # a new account
    assert 0 < await redis.pttl(store.latest_key("f")) <= store.ttl_ms
    # An out-of-order transaction (a later one was applied before it) is recorded but does not
    # become the latest; the careful path (a replay of t1) keeps it too.
    late = make_tx(2, account="f", at_ms=BASE_MS + 500)
    assert await store.write_encoded([applied(late, 3, in_order=False, previous_ms=BASE_MS)]) == 0
    await store.write_batch([scored(t1, 2)])
    latest = await store.latest("f")
    assert latest is not None and latest.transaction.transaction_id == "tx-1"
    record = await store.decision_of("f", "tx-2")
    assert record is not None and record.decision == 3 and record.label is None
    # Labels find fast-path decisions, and a later careful rewrite keeps the label.
    (first,) = await store.match_labels([("f", "tx-1", True)])
    assert first.status == LabelStatus.FIRST and first.event_ms == BASE_MS + 1000
    await store.write_batch([scored(t1, 2)])
    (again,) = await store.match_labels([("f", "tx-1", True)])
    assert again.status == LabelStatus.REPEATED
    # The careful path compares with the pointer the fast path left: an older replay does not
    # hide the newest.
    await store.write_batch([scored(t0, 1)])
    latest = await store.latest("f")
    assert latest is not None and latest.transaction.transaction_id == "tx-1"


async def test_fast_path_and_careful_path_share_one_round_trip(
    settings: Settings, redis: aioredis.Redis
) -> None:
    store = AssessmentStore(redis, settings.redis_key_prefix)
    fast = [applied(make_tx(i, account=f"fast-{i}"), 1) for i in range(3)]
    careful = [entry_of(scored(make_tx(10 + i, account=f"careful-{i}"), 2)) for i in range(2)]
    assert await store.write_encoded([*fast, *careful]) == 5
    for entry in [*fast, *careful]:
        latest = await store.latest(entry.account_id)
        assert latest is not None and latest.transaction.transaction_id == entry.transaction_id


async def test_fast_path_prunes_to_the_cap_and_by_event_time(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """A burst: the account's 30-day count passes the cap, and the decisions are pruned every
    quarter of the cap; then a day later, the decisions past the retention go."""
    store = AssessmentStore(redis, settings.redis_key_prefix, decision_cap=64)
    previous = None
    for start in range(0, 400, 50):
        batch = []
        for i in range(start, start + 50):
            at = BASE_MS + i * 1000
            batch.append(
                applied(
                    make_tx(i, account="burst", at_ms=at), 1, previous_ms=previous, count_30d=i + 1
                )
            )
            previous = at
        await store.write_encoded(batch)
    fields = await hlen(redis, store.decisions_key("burst"))
    # 64 + what a quarter of the cap and one batch can add, plus the pointer and the two
    # marks the pruning leaves
    assert fields <= 64 + 16 + 50 + 3
    assert await store.decision_of("burst", "tx-399") is not None
    assert await store.decision_of("burst", "tx-0") is None
    far = BASE_MS + 40 * DAY_MS
    await store.write_encoded(
        [applied(make_tx(1000, account="burst", at_ms=far), 1, previous_ms=previous, count_30d=1)]
    )
    # only the new decision and the bookkeeping fields are left
    assert await hlen(redis, store.decisions_key("burst")) == 1 + 3


async def test_slot_mode_writes_the_same_as_batch_mode(
    settings: Settings, redis: aioredis.Redis
) -> None:
    batch = AssessmentStore(redis, settings.redis_key_prefix + "b")
    slot = AssessmentStore(redis, settings.redis_key_prefix + "s", call_mode="slot")
    txs = [make_tx(i, account=f"acct-{i % 9}") for i in range(40)]
    for store in (batch, slot):
        await store.write_batch([scored(t, 1 + i % 3) for i, t in enumerate(txs)])
    for account in {t.account_id for t in txs}:
        assert await batch.latest(account) == await slot.latest(account)
    labels = [(t.account_id, t.transaction_id, i % 2 == 0) for i, t in enumerate(txs)]
    assert await batch.match_labels(labels) == await slot.match_labels(labels)


async def test_assessment_ids_with_any_character_are_written_and_matched(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Each field is a script argument of its own: an id holding the unit separator or starting
    with \\x01 (never let through by ingest) is still stored under its digest, the latest is
    the newest by event time, and labels find every decision."""
    store = AssessmentStore(redis, settings.redis_key_prefix)
    odd = [make_tx(i, account="odd", at_ms=BASE_MS + i * 1000) for i in range(4)]
    odd[1].transaction_id = "with\x1fseparator"
    odd[2].transaction_id = "\x01meta"
    odd[3].transaction_id = "plain \x01 inside"
    await store.write_batch([scored(t, 1 + i % 3) for i, t in enumerate(odd)])
    latest = await store.latest("odd")
    assert latest is not None and latest.transaction.transaction_id == "plain \x01 inside"
    matches = await store.match_labels([("odd", t.transaction_id, True) for t in odd])
    assert [m.status for m in matches] == [LabelStatus.FIRST] * 4
    assert [m.decision for m in matches] == [1, 2, 3, 1]
    # a rewrite of the same batch keeps the labels and the latest
    await store.write_batch([scored(t, 1 + i % 3) for i, t in enumerate(odd)])
    again = await store.match_labels([("odd", t.transaction_id, True) for t in odd])
    assert [m.status for m in again] == [LabelStatus.REPEATED] * 4
