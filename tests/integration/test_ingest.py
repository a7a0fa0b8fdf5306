"""Ingest against the real broker and Redis: rejections, dedup, crash redelivery, JSON, shutdown.

Every test has its own topics, consumer group and Redis prefix (the `settings` fixture, or
`make_test_settings` for the module-wide rejection run), so tests on the shared broker never see
each other. Nothing waits on wall-clock assertions: loops are bounded by count and by a deadline,
and a deadline running out fails the test with what was seen.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry

from protos.fraud.v1 import transaction_pb2
from services.ingest.__main__ import run_ingest
from services.ingest.dedup import Claim, Deduplicator
from services.ingest.service import (
    DLQ_HEADER_CODE,
    DLQ_HEADER_FIELD,
    DLQ_HEADER_MESSAGE,
    DLQ_HEADER_REDACTED,
    DLQ_HEADER_SERVICE,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_VERSION,
    SERVICE_VERSION,
    IngestService,
)
from shared.config import Settings, load_settings
from shared.kafka import ensure_topics, make_admin, make_consumer, make_transactional_producer
from shared.kafka import transactional_id as make_transactional_id
from shared.redis_client import make_redis
from shared.validation import ValidationLimits
from tests.conftest import Infra, make_test_settings
from tests.kafka_helpers import consume_committed, produce

REPO = Path(__file__).resolve().parents[2]
JSON_HEADERS = [("content-type", b"application/json")]


def make_tx(index: int = 0, **overrides: Any) -> transaction_pb2.Transaction:
    """A valid transaction happening a minute ago; keyword overrides replace fields."""
    tx = transaction_pb2.Transaction(
        transaction_id=f"tx-{index}",
        account_id=f"acct-{index % 7}",
        card_id=f"card-tok-{index % 7}",
        merchant_id="m-1",
        merchant_category="5411",
        terminal_id="t-1",
        amount=transaction_pb2.Money(units=1234 + index, currency="EUR"),
        country="NL",
        latitude=52.37,
        longitude=4.89,
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
    )
    tx.event_time.FromSeconds(int(time.time()) - 60)
    for name, value in overrides.items():
        if name == "amount":
            tx.amount.CopyFrom(value)
        elif name == "event_time_s":
            tx.event_time.FromSeconds(value)
        else:
            setattr(tx, name, value)
    return tx


def raw_record(tx: transaction_pb2.Transaction) -> tuple[bytes, bytes, None]:
    return tx.account_id.encode(), tx.SerializeToString(), None


async def ingest(settings: Settings, records: int, *, timeout_s: float = 60.0) -> CollectorRegistry:
    """Run the real service loop in-process until `records` raw records are committed."""
    registry = CollectorRegistry()
    stats = await run_ingest(
        settings,
        max_records=records,
        max_seconds=timeout_s,
        handle_signals=False,
        registry=registry,
    )
    assert stats.records_in >= records, f"ingest committed {stats.records_in} of {records}"
    return registry


def header(record: ConsumerRecord, name: str) -> bytes:
    values = [value for key, value in record.headers if key == name]
    assert len(values) == 1, f"header {name!r} appears {len(values)} times: {record.headers}"
    return bytes(values[0])


def parse(record: ConsumerRecord) -> transaction_pb2.Transaction:
    return transaction_pb2.Transaction.FromString(record.value)


# --- one test per rejection class, from one module-wide ingest run ----------------------------


@dataclass(frozen=True)
class Case:
    value: bytes | None
    code: str
    field: str
    headers: list[tuple[str, bytes]] | None = None


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document).encode()


def _tx_bytes(**overrides: Any) -> bytes:
    return make_tx(**overrides).SerializeToString()


def _with_wire(tx_bytes: bytes, extra: bytes) -> bytes:
    return tx_bytes + extra


def _invalid_time() -> bytes:
    tx = make_tx()
    tx.event_time.nanos = -1
    return tx.SerializeToString()


def _many_attributes() -> bytes:
    tx = make_tx()
    tx.attributes.update({f"k{i}": "v" for i in range(65)})
    return tx.SerializeToString()


def build_cases() -> dict[str, Case]:
    now = int(time.time())
    money = transaction_pb2.Money
    return {
        "undecodable": Case(b"\xff\xff\xff\xff", "UNDECODABLE", ""),
        "invalid_json": Case(b"{not json", "INVALID_JSON", "", JSON_HEADERS),
        "unknown_field": Case(_json({"ammount": {"units": 1}}), "UNKNOWN_FIELD", "ammount"),
        "invalid_field": Case(
            _json({"amount": {"units": "abc"}}), "INVALID_FIELD", "amount.units", JSON_HEADERS
        ),
        "empty_payload": Case(None, "EMPTY_PAYLOAD", ""),
        "missing_field": Case(_tx_bytes(account_id=""), "MISSING_FIELD", "account_id"),
        "field_too_long": Case(_tx_bytes(merchant_id="m" * 129), "FIELD_TOO_LONG", "merchant_id"),
        "invalid_characters": Case(
            _tx_bytes(transaction_id="tx\x00"), "INVALID_CHARACTERS", "transaction_id"
        ),
        "invalid_amount": Case(
            _tx_bytes(amount=money(units=-5, currency="EUR")), "INVALID_AMOUNT", "amount.units"
        ),
        "amount_too_large": Case(
            _tx_bytes(amount=money(units=10**12, currency="EUR")),
            "AMOUNT_TOO_LARGE",
            "amount.units",
        ),
        "unknown_currency": Case(
            _tx_bytes(amount=money(units=5, currency="ABC")), "UNKNOWN_CURRENCY", "amount.currency"
        ),
        "unknown_country": Case(_tx_bytes(country="QQ"), "UNKNOWN_COUNTRY", "country"),
        "invalid_coordinates": Case(_tx_bytes(latitude=123.0), "INVALID_COORDINATES", "latitude"),
        "invalid_event_time": Case(_invalid_time(), "INVALID_EVENT_TIME", "event_time"),
        "event_time_in_future": Case(
            _tx_bytes(event_time_s=now + 86_400), "EVENT_TIME_IN_FUTURE", "event_time"
        ),
        "event_time_too_old": Case(
            _tx_bytes(event_time_s=now - 40 * 86_400), "EVENT_TIME_TOO_OLD", "event_time"
        ),
        "invalid_merchant_category": Case(
            _tx_bytes(merchant_category="54A1"), "INVALID_MERCHANT_CATEGORY", "merchant_category"
        ),
        "invalid_ip_address": Case(
            _tx_bytes(ip_address="300.1.1.1"), "INVALID_IP_ADDRESS", "ip_address"
        ),
        # Field 12 (channel) = 99: proto3 enums are open on the wire.
        "invalid_channel": Case(_with_wire(_tx_bytes(), b"\x60\x63"), "INVALID_CHANNEL", "channel"),
        "too_many_attributes": Case(_many_attributes(), "TOO_MANY_ATTRIBUTES", "attributes"),
    }


CASE_NAMES = list(build_cases())


@dataclass(frozen=True)
class RejectionRun:
    settings: Settings
    cases: dict[str, Case]
    raw: dict[bytes, ConsumerRecord]  # by key
    dlq: dict[bytes, ConsumerRecord]
    valid: list[ConsumerRecord]
    registry: CollectorRegistry


@pytest.fixture(scope="module")
async def rejection_run(infra: Infra) -> AsyncIterator[RejectionRun]:
    """All rejection classes plus one valid record, through one ingest run."""
    settings = make_test_settings(infra)
    await ensure_topics(settings)
    cases = build_cases()
    records: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]] = [
        (f"case-{name}".encode(), case.value, case.headers) for name, case in cases.items()
    ]
    records.append(raw_record(make_tx(1)))
    await produce(settings, settings.topics.raw, records)
    registry = await ingest(settings, len(records))
    raw = await consume_committed(settings, settings.topics.raw, expected=len(records))
    dlq = await consume_committed(settings, settings.topics.dlq, expected=len(cases))
    valid = await consume_committed(settings, settings.topics.valid, expected=1)
    yield RejectionRun(
        settings=settings,
        cases=cases,
        raw={r.key: r for r in raw},
        dlq={r.key: r for r in dlq},
        valid=valid,
        registry=registry,
    )


@pytest.mark.parametrize("name", CASE_NAMES)
async def test_rejection_goes_to_dlq_with_headers_and_untouched_payload(
    rejection_run: RejectionRun, name: str
) -> None:
    case = rejection_run.cases[name]
    key = f"case-{name}".encode()
    source = rejection_run.raw[key]
    dead = rejection_run.dlq.get(key)
    assert dead is not None, f"no DLQ record for {name}"
    assert dead.key == key
    assert dead.value == (case.value if case.value is not None else b"")
    assert header(dead, DLQ_HEADER_CODE) == case.code.encode()
    assert header(dead, DLQ_HEADER_FIELD) == case.field.encode()
    message = header(dead, DLQ_HEADER_MESSAGE).decode()
    assert message
    assert case.field.split(".")[0] in message
    assert header(dead, DLQ_HEADER_SOURCE_TOPIC) == rejection_run.settings.topics.raw.encode()
    assert header(dead, DLQ_HEADER_SOURCE_PARTITION) == str(source.partition).encode()
    assert header(dead, DLQ_HEADER_SOURCE_OFFSET) == str(source.offset).encode()
    assert header(dead, DLQ_HEADER_SERVICE) == b"ingest"
    assert header(dead, DLQ_HEADER_VERSION) == SERVICE_VERSION.encode()
    for original in case.headers or []:
        assert original in dead.headers, "the producer's own headers are carried along"
    assert rejection_run.registry.get_sample_value(
        "fraudstream_ingest_rejected_total", {"code": case.code}
    ) == sum(1 for c in rejection_run.cases.values() if c.code == case.code)


async def test_rejections_do_not_stop_the_valid_record(rejection_run: RejectionRun) -> None:
    assert len(rejection_run.dlq) == len(rejection_run.cases)
    assert [parse(r).transaction_id for r in rejection_run.valid] == ["tx-1"]
    assert rejection_run.registry.get_sample_value("fraudstream_ingest_accepted_total") == 1


# --- the card-number exception to "value untouched" ------------------------------------------


async def test_raw_card_number_is_masked_in_the_dlq(settings: Settings) -> None:
    pan = "4111111111111111"
    protobuf = make_tx(card_id=pan).SerializeToString()
    as_json = _json({"transactionId": "tx-j", "accountId": "a", "cardId": pan})
    escaped = b'{"transactionId": "tx-e", "cardId": "411111\\u0031111111111"}'
    undecodable = b'{"cardId": "4111111111111111", "ammount": 1, "note": "12345678901234"}'
    await produce(
        settings,
        settings.topics.raw,
        [
            (b"pb", protobuf, None),
            (b"json", as_json, None),
            (b"escaped", escaped, None),
            (b"undecodable", undecodable, None),
        ],
    )
    await ingest(settings, 4)
    dlq = {r.key: r for r in await consume_committed(settings, settings.topics.dlq, expected=4)}
    for key in (b"pb", b"json", b"escaped", b"undecodable"):
        assert pan.encode() not in dlq[key].value
    assert header(dlq[b"pb"], DLQ_HEADER_CODE) == b"PAN_IN_CARD_ID"
    # Rejected for another reason first (no merchant_id): the number is masked all the same.
    assert header(dlq[b"json"], DLQ_HEADER_CODE) == b"MISSING_FIELD"
    masked = protobuf.replace(pan.encode(), b"411111******1111")
    assert dlq[b"pb"].value == masked
    assert transaction_pb2.Transaction.FromString(masked).card_id == "411111******1111"
    assert json.loads(dlq[b"json"].value)["cardId"] == "411111******1111"
    assert header(dlq[b"pb"], DLQ_HEADER_REDACTED) == b"card_id"
    # Not findable byte for byte (a JSON escape): the value is dropped rather than leaked.
    assert dlq[b"escaped"].value == b""
    assert header(dlq[b"escaped"], DLQ_HEADER_REDACTED) == b"value"
    # Not decodable: Luhn-valid digit runs are masked, other numbers left alone.
    assert dlq[b"undecodable"].value == undecodable.replace(pan.encode(), b"411111******1111")
    assert header(dlq[b"undecodable"], DLQ_HEADER_REDACTED) == b"digits"


# --- forwarding ---------------------------------------------------------------------------------


async def test_json_input_is_forwarded_as_normalized_protobuf(settings: Settings) -> None:
    event_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
    document = {
        "transactionId": " tx-json ",
        "accountId": "acct-json",
        "cardId": "card-tok",
        "merchantId": "m-9",
        "merchantCategory": "5999",
        "amount": {"units": "500", "currency": "jpy"},
        "eventTime": event_time,
        "country": "jp",
        "channel": "CHANNEL_ECOMMERCE",
        "ipAddress": "2001:DB8::0:1",
        "attributes": {"wallet": "apple"},
    }
    snake = {
        "transaction_id": "tx-snake",
        **{k: v for k, v in document.items() if k != "transactionId"},
    }
    await produce(
        settings,
        settings.topics.raw,
        [
            (b"acct-json", _json(document), JSON_HEADERS),
            (b"acct-json", _json(snake), None),  # no header: a JSON object is recognized
        ],
    )
    await ingest(settings, 2)
    valid = await consume_committed(settings, settings.topics.valid, expected=2)
    assert len(valid) == 2
    first, second = (parse(r) for r in sorted(valid, key=lambda r: r.offset))
    assert all(r.key == b"acct-json" for r in valid)
    assert first.transaction_id == "tx-json"
    assert (first.amount.units, first.amount.currency, first.country) == (500, "JPY", "JP")
    assert first.channel == transaction_pb2.CHANNEL_ECOMMERCE
    assert first.ip_address == "2001:db8::1"
    assert dict(first.attributes) == {"wallet": "apple"}
    assert second.transaction_id == "tx-snake"
    assert await consume_committed(settings, settings.topics.dlq, expected=0) == []


async def test_output_is_keyed_by_account_whatever_the_input_key(settings: Settings) -> None:
    tx = make_tx(3)
    await produce(
        settings, settings.topics.raw, [(b"some-other-key", tx.SerializeToString(), None)]
    )
    await ingest(settings, 1)
    [record] = await consume_committed(settings, settings.topics.valid, expected=1)
    assert record.key == tx.account_id.encode()
    assert parse(record) == tx


# --- deduplication ------------------------------------------------------------------------------


async def test_producer_retry_is_dropped_within_and_across_batches(settings: Settings) -> None:
    first, second = make_tx(10), make_tx(11)
    await produce(settings, settings.topics.raw, [raw_record(first), raw_record(first)])
    registry = await ingest(settings, 2)
    assert registry.get_sample_value("fraudstream_ingest_duplicates_total") == 1
    # The retry arrives again later, in another batch and another run.
    await produce(settings, settings.topics.raw, [raw_record(first), raw_record(second)])
    registry = await ingest(settings, 2)
    assert registry.get_sample_value("fraudstream_ingest_duplicates_total") == 1
    valid = await consume_committed(settings, settings.topics.valid, expected=2)
    assert sorted(parse(r).transaction_id for r in valid) == ["tx-10", "tx-11"]


async def test_same_transaction_id_under_another_account_is_not_a_duplicate(
    settings: Settings,
) -> None:
    a = make_tx(20, account_id="acct-a")
    b = make_tx(20, account_id="acct-b")
    await produce(settings, settings.topics.raw, [raw_record(a), raw_record(b)])
    await ingest(settings, 2)
    valid = await consume_committed(settings, settings.topics.valid, expected=2)
    assert sorted(r.key for r in valid) == [b"acct-a", b"acct-b"]


@pytest.mark.parametrize("use_script", [True, False], ids=["lua", "pipeline"])
async def test_dedup_verdicts_are_the_same_with_lua_and_pipeline(
    settings: Settings, use_script: bool
) -> None:
    redis = make_redis(settings)
    try:
        dedup = Deduplicator(
            redis, prefix=settings.redis_key_prefix, window_s=60, use_script=use_script
        )
        await dedup.check_server()
        batch = [
            Claim("a", "t1", "0:1"),
            Claim("a", "t1", "0:2"),  # a producer retry inside the batch
            Claim("b", "t1", "1:1"),  # same id, another account: another transaction
        ]
        assert await dedup.claim(batch) == [True, False, True]
        # The same batch again (a crash before the commit): the same verdicts.
        assert await dedup.claim(batch) == [True, False, True]
        assert await dedup.claim([Claim("a", "t1", "2:9")]) == [False]
        assert await dedup.claimant("a", "t1") == "0:1"
        ttl = await redis.ttl(dedup.key("a", "t1"))
        assert 0 < ttl <= 60
        assert await dedup.claim([]) == []
    finally:
        await redis.aclose()


# --- a crash between the Redis claims and the Kafka commit -----------------------------------


async def crash_mid_transaction(expected: int) -> None:
    """Run in a child process: do everything a batch does, then die before the commit.

    Consume the batch, let the transform record its dedup claims in Redis, open the Kafka
    transaction, write every output record to the log, and then exit like a SIGKILL would:
    no commit, no abort, no goodbye to the broker or Redis.
    """
    settings = load_settings()
    group = settings.ingest.group_id
    producer = make_transactional_producer(
        settings, make_transactional_id(group, settings.instance_id)
    )
    await producer.start()
    # Assigned, not subscribed: the offsets are the group's, but the dead process leaves no
    # group member behind whose session the restarted service would have to wait out.
    consumer = make_consumer(settings, group_id=group)
    await consumer.start()
    # The test created the topic with the configured partition count.
    partitions = range(settings.kafka.topic_partitions)
    consumer.assign([TopicPartition(settings.topics.raw, p) for p in partitions])
    service = IngestService(
        topics=settings.topics,
        limits=ValidationLimits.from_settings(settings.ingest),
        dedup=Deduplicator(
            make_redis(settings),
            prefix=settings.redis_key_prefix,
            window_s=settings.ingest.dedup_window_s,
        ),
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


def tail(path: Path) -> str:
    """The end of a child's log, for a failure message."""
    return path.read_text()[-3000:]


def child_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that makes a child process load exactly these test settings."""
    topics = settings.topics
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
        "INGEST_GROUP_ID": settings.ingest.group_id,
        "METRICS_PORT": "0",
        "LOG_FORMAT": "json",
        **extra,
    }


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


async def test_redelivery_after_a_crash_yields_exactly_one_output(
    settings: Settings, tmp_path: Path
) -> None:
    transactions = [make_tx(i) for i in range(5)]
    # A producer retry too: it must stay a duplicate across the crash, the original not.
    await produce(
        settings,
        settings.topics.raw,
        [raw_record(t) for t in transactions] + [raw_record(transactions[0])],
    )
    log_path = tmp_path / "crash.log"
    child = await run_child(
        settings,
        [
            "-c",
            "import asyncio; from tests.integration.test_ingest import crash_mid_transaction; "
            "asyncio.run(crash_mid_transaction(6))",
        ],
        log_path,
    )
    assert await wait_exit(child, log_path, 90) == 137, tail(log_path)
    assert "crashing with 5 uncommitted outputs" in log_path.read_text()

    # The claims survived the crash, each naming the record that made it.
    redis = make_redis(settings)
    try:
        dedup = Deduplicator(redis, prefix=settings.redis_key_prefix, window_s=60)
        for tx in transactions:
            assert await dedup.claimant(tx.account_id, tx.transaction_id) is not None
    finally:
        await redis.aclose()
    # The outputs are in the log but not committed.
    uncommitted = await consume_uncommitted(settings, settings.topics.valid, expected=5)
    assert len(uncommitted) == 5
    assert await consume_committed(settings, settings.topics.valid, expected=0) == []

    # Restart with the same instance id: it fences the dead transaction and redoes the batch.
    registry = await ingest(settings, 6)
    valid = await consume_committed(settings, settings.topics.valid, expected=5)
    assert sorted(parse(r).transaction_id for r in valid) == sorted(
        t.transaction_id for t in transactions
    )
    assert registry.get_sample_value("fraudstream_ingest_duplicates_total") == 1
    assert len(await consume_uncommitted(settings, settings.topics.valid, expected=10)) == 10


async def _at_end(consumer: Any, end: dict[TopicPartition, int]) -> bool:
    for tp, offset in end.items():
        if await consumer.position(tp) < offset:
            return False
    return True


async def consume_uncommitted(settings: Settings, topic: str, *, expected: int) -> list[Any]:
    """What a read_uncommitted reader sees: aborted transactions' records too."""
    consumer = make_consumer(settings, group_id=None, isolation_level="read_uncommitted")
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(settings.kafka.topic_partitions)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        end = await consumer.end_offsets(partitions)
        records: list[Any] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not await _at_end(consumer, end):
            batch = await consumer.getmany(timeout_ms=200)
            records += [r for recs in batch.values() for r in recs]
        assert len(records) >= expected, f"{len(records)} records, expected at least {expected}"
        return records
    finally:
        await consumer.stop()


# --- the real process: SIGKILL at an arbitrary moment, SIGTERM finishing the batch ------------


async def committed_offsets(settings: Settings) -> int:
    admin = make_admin(settings)
    await admin.start()
    try:
        offsets = await admin.list_consumer_group_offsets(settings.ingest.group_id)
        return sum(meta.offset for meta in offsets.values() if meta.offset >= 0)
    finally:
        await admin.close()


async def wait_until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, poll_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return
        await asyncio.sleep(poll_s)
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")


async def test_kill_9_mid_stream_loses_nothing_and_duplicates_nothing(
    settings: Settings, tmp_path: Path
) -> None:
    total = 500
    await produce(settings, settings.topics.raw, [raw_record(make_tx(i)) for i in range(total)])
    log_path = tmp_path / "ingest.log"
    args = ["-m", "services.ingest", "--max-seconds", "120"]
    # Small batches: many transactions, so the kill lands between two of them.
    first = await run_child(settings, args, log_path, INGEST_BATCH_MAX="5")

    async def some_committed() -> bool:
        return await committed_offsets(settings) > 0

    await wait_until(some_committed, timeout_s=60, what="a first committed batch")
    first.send_signal(signal.SIGKILL)
    await wait_exit(first, log_path, 30)
    assert await committed_offsets(settings) < total, "killed too late to test anything"

    second = await run_child(settings, args, log_path, INGEST_BATCH_MAX="50")

    async def all_committed() -> bool:
        return await committed_offsets(settings) >= total

    await wait_until(all_committed, timeout_s=90, what="every record committed after restart")
    second.send_signal(signal.SIGTERM)
    assert await wait_exit(second, log_path, 60) == 0
    valid = await consume_committed(settings, settings.topics.valid, expected=total)
    ids = [parse(r).transaction_id for r in valid]
    assert len(ids) == total, f"{len(ids)} outputs for {total} inputs"
    assert len(set(ids)) == total


async def test_sigterm_finishes_and_commits_the_batch_in_hand(
    settings: Settings, tmp_path: Path
) -> None:
    total = 300
    await produce(settings, settings.topics.raw, [raw_record(make_tx(i)) for i in range(total)])
    log_path = tmp_path / "ingest.log"
    child = await run_child(
        settings, ["-m", "services.ingest", "--max-seconds", "120"], log_path, INGEST_BATCH_MAX="5"
    )

    async def some_committed() -> bool:
        return await committed_offsets(settings) > 0

    await wait_until(some_committed, timeout_s=60, what="a first committed batch")
    child.send_signal(signal.SIGTERM)
    assert await wait_exit(child, log_path, 60) == 0, tail(log_path)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    events = [line.get("event") for line in lines]
    assert "stop_requested" in events
    finished = next(line for line in lines if line.get("event") == "ingest_finished")
    # Every record consumed was committed with its output: nothing was left half done.
    committed = await committed_offsets(settings)
    assert finished["records"] == committed
    valid = await consume_committed(settings, settings.topics.valid, expected=committed)
    assert len(valid) == committed
    assert len({parse(r).transaction_id for r in valid}) == committed
