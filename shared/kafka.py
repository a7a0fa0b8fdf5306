"""Kafka adapters: client factories, the topic bootstrap, and the exactly-once batch loop.

Exactly once, the way every fraudstream stage does it (consume-transform-produce):
  1. `getmany` a batch from a read_committed consumer that never commits by itself;
  2. transform it (the stage's own function; its Redis writes must be idempotent per record,
     because a batch can be processed again after a crash or an aborted transaction);
  3. in ONE Kafka transaction: produce every output record and `send_offsets_to_transaction`
     the batch's next offsets, then commit.
A crash anywhere before the commit aborts the transaction (or the broker times it out): the
outputs vanish for read_committed readers and the input is consumed again from the last
committed offset.

aiokafka predates KIP-447, so fencing a stale ("zombie") instance rests on the transactional
id alone. Each instance uses `<group>-<instance_id>` (stable across restarts), so a restarted
instance fences its predecessor. On a rebalance, the revoke callback waits for the batch in
hand to finish its transaction before the partitions move, and records of partitions revoked
while a batch was being fetched are dropped (the new owner reads them again). See
aio-libs/aiokafka#1098 and #920 for why offsets go only through the producer, once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced
from aiokafka.helpers import create_ssl_context
from aiokafka.structs import ConsumerRecord
from redis import exceptions as redis_errors

from shared.config import KafkaSettings, Settings
from shared.logging import get_logger

__all__ = [
    "BatchStats",
    "ConsumerRecord",
    "OutputRecord",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "make_transactional_producer",
    "run_exactly_once",
    "subscribe_exactly_once",
    "transactional_id",
]

log = get_logger(__name__)

Headers = list[tuple[str, bytes]]

_TOPIC_ALREADY_EXISTS = 36

# Failures of a dependency, not of the data: the batch is retried from its first offset.
_RETRYABLE: tuple[type[BaseException], ...] = (
    KafkaError,
    KafkaConnectionError,
    OSError,
    TimeoutError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
)


def _security_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """SASL/TLS settings passed through to every aiokafka client."""
    kwargs: dict[str, Any] = {"security_protocol": kafka.security_protocol}
    if kafka.security_protocol in ("SSL", "SASL_SSL"):
        context: ssl.SSLContext = create_ssl_context(
            cafile=kafka.ssl_cafile or None,
            certfile=kafka.ssl_certfile or None,
            keyfile=kafka.ssl_keyfile or None,
        )
        kwargs["ssl_context"] = context
    if kafka.security_protocol.startswith("SASL"):
        kwargs["sasl_mechanism"] = kafka.sasl_mechanism
        kwargs["sasl_plain_username"] = kafka.sasl_username
        kwargs["sasl_plain_password"] = kafka.sasl_password
    return kwargs


def make_admin(settings: Settings, client_id: str = "fraudstream-admin") -> AIOKafkaAdminClient:
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.kafka.bootstrap_servers,
        client_id=client_id,
        **_security_kwargs(settings.kafka),
    )


def make_consumer(
    settings: Settings,
    *topics: str,
    group_id: str | None,
    client_id: str = "fraudstream",
    **overrides: Any,
) -> AIOKafkaConsumer:
    """A read_committed consumer that never commits by itself: offsets travel in transactions."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "group_id": group_id,
        "client_id": client_id,
        "isolation_level": "read_committed",
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_poll_records": 1000,
        "fetch_max_wait_ms": 100,
        **_security_kwargs(settings.kafka),
    }
    kwargs.update(overrides)
    return AIOKafkaConsumer(*topics, **kwargs)


def make_producer(
    settings: Settings, client_id: str = "fraudstream", **overrides: Any
) -> AIOKafkaProducer:
    """An idempotent (not transactional) producer: simulators, the gRPC `record` path."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.kafka.bootstrap_servers,
        "client_id": client_id,
        "enable_idempotence": True,
        "acks": "all",
        "linger_ms": 5,
        "max_batch_size": 256 * 1024,
        **_security_kwargs(settings.kafka),
    }
    kwargs.update(overrides)
    return AIOKafkaProducer(**kwargs)


def transactional_id(group_id: str, instance_id: str) -> str:
    return f"{group_id}-{instance_id}"


def make_transactional_producer(
    settings: Settings, transactional_id: str, **overrides: Any
) -> AIOKafkaProducer:
    kwargs: dict[str, Any] = {
        "client_id": transactional_id,
        "transactional_id": transactional_id,
        "transaction_timeout_ms": 60_000,
        # Kafka 3.6+ verifies that a partition joined the transaction (KIP-890). While the
        # previous transaction's markers are still being written, the broker answers clients as
        # old as aiokafka with the retriable NOT_ENOUGH_REPLICAS; the default 100 ms backoff
        # then stalls every batch that starts right after a commit. Retry soon instead.
        "retry_backoff_ms": 10,
    }
    kwargs.update(overrides)
    return make_producer(settings, **kwargs)


async def ensure_topics(settings: Settings, topics: Sequence[str] | None = None) -> list[str]:
    """Create the missing topics with the configured partitions; return the names created.

    Idempotent: existing topics are left alone (a partition-count mismatch is logged, never
    altered: changing partitions moves keys between partitions and breaks per-account order).
    """
    wanted = list(topics) if topics is not None else list(settings.topics.all())
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [t for t in wanted if t not in existing]
        if missing:
            response = await admin.create_topics(
                [
                    NewTopic(
                        name=t,
                        num_partitions=settings.kafka.topic_partitions,
                        replication_factor=settings.kafka.topic_replication,
                    )
                    for t in missing
                ]
            )
            for name, code, *rest in response.topic_errors:
                if code not in (0, _TOPIC_ALREADY_EXISTS):
                    message = rest[0] if rest else ""
                    raise KafkaError(f"creating topic {name!r} failed: error {code} {message}")
        descriptions = await admin.describe_topics(wanted)
        # A new topic's partitions get their leaders a moment after creation; producing before
        # that only earns NotLeaderForPartition retries, so wait (bounded) until all have one.
        deadline = time.monotonic() + 15
        while missing and time.monotonic() < deadline and not _all_led(descriptions):
            await asyncio.sleep(0.05)
            descriptions = await admin.describe_topics(wanted)
        for description in descriptions:
            partitions = len(description.get("partitions", []))
            if partitions and partitions != settings.kafka.topic_partitions:
                log.warning(
                    "topic_partition_mismatch",
                    topic=description.get("topic"),
                    partitions=partitions,
                    configured=settings.kafka.topic_partitions,
                )
        if missing:
            log.info("topics_created", topics=missing)
        return missing
    finally:
        await admin.close()


def _all_led(descriptions: list[dict[str, Any]]) -> bool:
    return all(
        description.get("error_code", 0) == 0
        and description.get("partitions")
        and all(p.get("leader", -1) >= 0 for p in description["partitions"])
        for description in descriptions
    )


@dataclass(frozen=True)
class OutputRecord:
    topic: str
    value: bytes
    key: bytes | None = None
    headers: Headers = field(default_factory=list)
    # Carry the raw record's timestamp through every stage, so that a reader of any topic knows
    # when the transaction entered the pipeline (end-to-end latency without extra fields).
    timestamp_ms: int | None = None


@dataclass
class BatchStats:
    batches: int = 0
    records_in: int = 0
    records_out: int = 0
    retries: int = 0


Transform = Callable[[list[ConsumerRecord]], Awaitable[list[OutputRecord]]]


class _WaitForBatchOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Holds a rebalance until the batch in hand has committed or aborted its transaction."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self._lock = lock

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        async with self._lock:
            log.info("partitions_revoked", partitions=[f"{p.topic}:{p.partition}" for p in revoked])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[f"{p.topic}:{p.partition}" for p in assigned])


def subscribe_exactly_once(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> asyncio.Lock:
    """Subscribe with the revoke-waits-for-batch listener; pass the lock to run_exactly_once."""
    lock = asyncio.Lock()
    consumer.subscribe(list(topics), listener=_WaitForBatchOnRevoke(lock))
    return lock


async def run_exactly_once(
    *,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    group_id: str,
    transform: Transform,
    stop: asyncio.Event,
    batch_lock: asyncio.Lock | None = None,
    max_records: int = 500,
    poll_timeout_ms: int = 200,
    max_batches: int | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    retry_backoff_s: tuple[float, float] = (0.2, 10.0),
) -> BatchStats:
    """Consume, transform and produce in Kafka transactions until `stop` is set.

    `stop` is checked between batches, so SIGTERM finishes the batch in hand. A failure while
    transforming or producing (Redis or Kafka down) aborts the transaction, rewinds the consumer
    to the batch start, and retries with exponential backoff: nothing is committed that was not
    finished. `ProducerFenced` (a newer instance took over our transactional id) is raised.
    `on_batch(records_in, records_out, seconds)` is called after each committed batch.
    """
    lock = batch_lock or asyncio.Lock()
    stats = BatchStats()
    backoff = retry_backoff_s[0]
    while not stop.is_set() and (max_batches is None or stats.batches < max_batches):
        fetched = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
        if not fetched:
            continue
        async with lock:
            assignment = consumer.assignment()
            # Partitions revoked between the fetch and the lock belong to someone else now.
            batch = {tp: recs for tp, recs in fetched.items() if tp in assignment and recs}
            if not batch:
                continue
            records = [r for recs in batch.values() for r in recs]
            started = time.perf_counter()
            try:
                outputs = await transform(records)
                async with producer.transaction():
                    futures = [
                        await producer.send(
                            o.topic,
                            o.value,
                            key=o.key,
                            headers=o.headers or None,
                            timestamp_ms=o.timestamp_ms,
                        )
                        for o in outputs
                    ]
                    await producer.send_offsets_to_transaction(
                        {tp: recs[-1].offset + 1 for tp, recs in batch.items()}, group_id
                    )
                    if futures:
                        await asyncio.gather(*futures)
            except ProducerFenced:
                log.error("producer_fenced", group_id=group_id)
                raise
            except _RETRYABLE as e:
                stats.retries += 1
                log.warning(
                    "batch_failed_retrying",
                    error=repr(e),
                    records=len(records),
                    backoff_s=round(backoff, 2),
                )
                for tp, recs in batch.items():
                    consumer.seek(tp, recs[0].offset)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, retry_backoff_s[1])
                continue
            backoff = retry_backoff_s[0]
            stats.batches += 1
            stats.records_in += len(records)
            stats.records_out += len(outputs)
            if on_batch is not None:
                on_batch(len(records), len(outputs), time.perf_counter() - started)
    return stats
