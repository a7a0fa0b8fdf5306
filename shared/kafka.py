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
instance fences its predecessor. On a rebalance, the revoke callback waits for the batches in
hand to finish their transactions before the partitions move (`BatchGate`), and records of
partitions revoked while a batch was being fetched are dropped (the new owner reads them
again). See
aio-libs/aiokafka#1098 and #920 for why offsets go only through the producer, once per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced
from aiokafka.helpers import create_ssl_context
from aiokafka.partitioner import murmur2
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.structs import ConsumerRecord
from redis import exceptions as redis_errors

from shared.config import KafkaSettings, Settings
from shared.logging import get_logger

__all__ = [
    "BatchGate",
    "BatchStats",
    "ConsumerRecord",
    "OutputRecord",
    "StagedTransform",
    "ensure_topics",
    "make_admin",
    "make_consumer",
    "make_producer",
    "make_transactional_producer",
    "produce_batched",
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
Prepared = TypeVar("Prepared")


@dataclass(frozen=True)
class StagedTransform(Generic[Prepared]):
    """A transform in two stages, so that with a `pipeline_depth` the loop can run `prepare` of
    the next batches while `finish` of earlier ones runs (each stage in batch order).

    `prepare` holds the work that must see the previous batch's effects (the scoring service's
    velocity counters in Redis); `finish` the work that may run after later batches' `prepare`
    (scoring, encoding): with Redis on one core and this process on the other, the two overlap.
    """

    prepare: Callable[[list[ConsumerRecord]], Awaitable[Prepared]]
    finish: Callable[[Prepared], Awaitable[list[OutputRecord]]]


async def _as_is(outputs: list[OutputRecord]) -> list[OutputRecord]:
    return outputs


class BatchGate:
    """Between the batch loop and the rebalance listener: a revoke waits until no batch is in
    flight (being transformed, finished or committed), and no batch starts while one waits.

    Not a lock held by the loop: with a `pipeline_depth` the loop calls `getmany` while batches
    are in flight, and aiokafka's `getmany` blocks while a reassignment is in progress, so a
    loop holding a lock there would deadlock with the listener. Batches in flight end by
    themselves (their commits are tasks), and the gate opens when the last one does.
    """

    def __init__(self) -> None:
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.revoking = False

    def enter(self) -> bool:
        """Count a batch in, unless a revoke is waiting (False: leave the records alone)."""
        if self.revoking:
            return False
        self._in_flight += 1
        self._idle.clear()
        return True

    def leave(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def wait_idle(self) -> None:
        await self._idle.wait()


class _WaitForBatchOnRevoke(ConsumerRebalanceListener):  # type: ignore[misc]
    """Holds a rebalance until the batches in hand have committed or aborted their
    transactions."""

    def __init__(self, gate: BatchGate) -> None:
        self._gate = gate

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self._gate.revoking = True
        try:
            await self._gate.wait_idle()
        finally:
            self._gate.revoking = False
        log.info("partitions_revoked", partitions=[f"{p.topic}:{p.partition}" for p in revoked])

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions_assigned", partitions=[f"{p.topic}:{p.partition}" for p in assigned])


def subscribe_exactly_once(consumer: AIOKafkaConsumer, topics: Sequence[str]) -> BatchGate:
    """Subscribe with the revoke-waits-for-batches listener; pass the gate to
    run_exactly_once."""
    gate = BatchGate()
    consumer.subscribe(list(topics), listener=_WaitForBatchOnRevoke(gate))
    return gate


@functools.lru_cache(maxsize=1 << 16)
def _key_hash(key: bytes) -> int:
    """The default partitioner's hash of a key (Kafka's murmur2, positive). aiokafka computes
    it in pure Python, ~3.5 us a key; the same accounts come back batch after batch."""
    return int(murmur2(key)) & 0x7FFFFFFF


async def produce_batched(
    producer: AIOKafkaProducer, outputs: Sequence[OutputRecord]
) -> list[asyncio.Future[Any]]:
    """Queue `outputs` as one record batch per partition; return the delivery futures.

    `producer.send` costs about 10 us per record in aiokafka (a coroutine, a future, metadata
    checks and the partitioner, each time); appending to a `BatchBuilder` costs about 1 us.
    Partitions are chosen as `send` would (the default murmur2 partitioner over all of the
    topic's partitions; a record without a key goes to a random one), so keyed records land
    where any Kafka client would put them. In a
    transactional producer, `send_batch` adds each partition to the transaction.
    """
    partitions_of: dict[str, list[int]] = {}
    builders: dict[tuple[str, int], BatchBuilder] = {}
    futures: list[asyncio.Future[Any]] = []
    for o in outputs:
        partitions = partitions_of.get(o.topic)
        if partitions is None:
            partitions = sorted(await producer.partitions_for(o.topic))
            partitions_of[o.topic] = partitions
        partition = (
            random.choice(partitions)
            if o.key is None
            else partitions[_key_hash(o.key) % len(partitions)]
        )
        where = (o.topic, partition)
        builder = builders.get(where)
        if builder is None:
            builder = builders[where] = producer.create_batch()
        headers = o.headers or []
        if builder.append(key=o.key, value=o.value, timestamp=o.timestamp_ms, headers=headers):
            continue
        # The batch is full: send it and start the next one. A record too large for an empty
        # batch goes through `send`, which raises the broker's size error for it.
        futures.append(await producer.send_batch(builder, o.topic, partition=partition))
        builder = builders[where] = producer.create_batch()
        if not builder.append(key=o.key, value=o.value, timestamp=o.timestamp_ms, headers=headers):
            del builders[where]
            futures.append(
                await producer.send(
                    o.topic,
                    o.value,
                    key=o.key,
                    partition=partition,
                    headers=headers or None,
                    timestamp_ms=o.timestamp_ms,
                )
            )
    for (topic, partition), builder in builders.items():
        futures.append(await producer.send_batch(builder, topic, partition=partition))
    return futures


@dataclass
class _Batch:
    """One consumed batch: where to rewind to if it is discarded, what to commit if not."""

    records: list[ConsumerRecord]
    first: dict[TopicPartition, int]
    next: dict[TopicPartition, int]
    started: float
    prepared: Any = None
    outputs: list[OutputRecord] = field(default_factory=list)


class _RetryBatch(Exception):
    """The batches in hand are discarded and read again after a backoff."""

    def __init__(self, cause: BaseException, discarded: list[_Batch]) -> None:
        super().__init__(repr(cause))
        self.cause = cause
        self.discarded = discarded


class _EarlierBatchFailed(Exception):
    """A batch's commit never started: the batch before it failed (it is discarded too)."""


# A batch in flight that failed on one of these is read again, with every batch behind it.
_DISCARDED: tuple[type[BaseException], ...] = (_EarlierBatchFailed, *_RETRYABLE)


async def run_exactly_once(
    *,
    consumer: AIOKafkaConsumer,
    producer: AIOKafkaProducer,
    group_id: str,
    transform: Transform | StagedTransform[Any],
    stop: asyncio.Event,
    batch_gate: BatchGate | None = None,
    max_records: int = 500,
    poll_timeout_ms: int = 200,
    max_batches: int | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    on_discard: Callable[[], None] | None = None,
    pipeline_depth: int = 0,
    retry_backoff_s: tuple[float, float] = (0.2, 10.0),
) -> BatchStats:
    """Consume, transform and produce in Kafka transactions until `stop` is set.

    `stop` is checked between batches, so SIGTERM finishes the batches in hand. A failure while
    transforming or producing (Redis or Kafka down) aborts the transaction, rewinds the consumer
    to the start of every batch not committed, and retries with exponential backoff: nothing is
    committed that was not finished. `ProducerFenced` (a newer instance took over our
    transactional id) is raised. `on_batch(records_in, records_out, seconds)` is called after
    each committed batch, in order.

    `pipeline_depth`: how many batches may be finishing and committing (one transaction after
    the other, in order) while the loop fetches and prepares the next one; 0 runs each batch to
    its commit before fetching the next. Finishes run one at a time in batch order, each as soon
    as the one before it finished (overlapping that batch's commit). With a depth, a transform
    runs before the batches ahead of it are known to be committed, so whatever it stages for
    `on_batch` must be kept per batch (a queue, not one slot), and `on_discard()` tells it that
    every batch transformed but not yet committed was dropped and will be read again.
    """
    staged = (
        transform if isinstance(transform, StagedTransform) else StagedTransform(transform, _as_is)
    )
    loop = _ExactlyOnceLoop(
        consumer=consumer,
        producer=producer,
        group_id=group_id,
        transform=staged,
        gate=batch_gate or BatchGate(),
        on_batch=on_batch,
        on_discard=on_discard,
    )
    stats = loop.stats
    backoff = retry_backoff_s[0]
    try:
        while not stop.is_set() and (
            max_batches is None or stats.batches + loop.in_flight < max_batches
        ):
            # With batches in flight this wait overlaps them (aiokafka fetches ahead meanwhile).
            fetched = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
            try:
                batch = loop.take(fetched)
                if batch is None:  # nothing of ours, or a revoke waits: finish what is in hand
                    await loop.settle_all()
                    continue
                await loop.prepare_and_commit(batch, depth=pipeline_depth)
                backoff = retry_backoff_s[0]
            except _RetryBatch as retry:
                loop.discard(retry, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=backoff)
                backoff = min(backoff * 2, retry_backoff_s[1])
        try:
            await loop.settle_all()
        except _RetryBatch as retry:  # stopping: the uncommitted batches are read again at start
            loop.discard(retry, backoff)
    finally:
        await loop.settle_all_quietly()  # an error escapes: no commit task is left behind
    return stats


class _ExactlyOnceLoop:
    """The state of `run_exactly_once`: the batches finishing and committing (a chain of tasks,
    each starting when the one before it committed), the stats."""

    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        group_id: str,
        transform: StagedTransform[Any],
        gate: BatchGate,
        on_batch: Callable[[int, int, float], None] | None,
        on_discard: Callable[[], None] | None,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._group_id = group_id
        self._transform = transform
        self._gate = gate
        self._on_batch = on_batch
        self._on_discard = on_discard
        self._in_flight: deque[tuple[_Batch, asyncio.Task[None]]] = deque()
        # set when the newest batch in flight has finished (its transform's second stage);
        # only waited on while that batch is in flight
        self._last_finished: asyncio.Future[None] | None = None
        self.stats = BatchStats()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def take(self, fetched: dict[TopicPartition, list[ConsumerRecord]]) -> _Batch | None:
        """The fetched records this instance still owns, as a batch counted in at the gate;
        None when there are none, or when a revoke waits (the records are put back)."""
        assignment = self._consumer.assignment()
        # Partitions revoked since the fetch belong to someone else now.
        owned = {tp: recs for tp, recs in fetched.items() if tp in assignment and recs}
        if not owned:
            return None
        if not self._gate.enter():
            for tp, recs in owned.items():  # not processed: read again by their next owner
                self._consumer.seek(tp, recs[0].offset)
            return None
        return _Batch(
            records=[r for recs in owned.values() for r in recs],
            first={tp: recs[0].offset for tp, recs in owned.items()},
            next={tp: recs[-1].offset + 1 for tp, recs in owned.items()},
            started=time.perf_counter(),
        )

    async def prepare_and_commit(self, batch: _Batch, *, depth: int) -> None:
        """Prepare `batch` (overlapping the batches in flight), queue its finish and commit
        behind theirs, then wait until at most `depth` batches are in flight."""
        try:
            batch.prepared = await self._transform.prepare(batch.records)
        except _RETRYABLE as e:
            self._gate.leave()
            earlier = await self.settle_all_quietly()
            raise _RetryBatch(e, [*earlier, batch]) from e
        except BaseException:
            self._gate.leave()
            await self.settle_all_quietly()  # a bug: what was finished before it still commits
            raise
        before = self._in_flight[-1][1] if self._in_flight else None
        finished_before = self._last_finished if self._in_flight else None
        self._last_finished = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            self._commit(batch, before, finished_before, self._last_finished)
        )
        # The gate opens when the commit ends, even while this loop waits in `getmany`.
        task.add_done_callback(lambda _: self._gate.leave())
        self._in_flight.append((batch, task))
        while len(self._in_flight) > depth:
            await self._settle_oldest()

    async def _commit(
        self,
        batch: _Batch,
        before: asyncio.Task[None] | None,
        finished_before: asyncio.Future[None] | None,
        finished: asyncio.Future[None],
    ) -> None:
        """Finish the batch once the one before it finished (finishes run in batch order), then
        produce and commit once the one before it committed (transactions run in order). The
        finish overlaps the previous batch's commit: its Redis writes are idempotent and made
        before its own commit, as always; if the previous commit fails, this batch is
        discarded with it."""
        try:
            if finished_before is not None:
                await asyncio.wait([finished_before])
                if finished_before.cancelled() or finished_before.exception() is not None:
                    raise _EarlierBatchFailed()
            batch.outputs = await self._transform.finish(batch.prepared)
            batch.prepared = None
        except BaseException:
            finished.set_exception(_EarlierBatchFailed())
            finished.exception()  # retrieved: the next batch reads it through asyncio.wait
            raise
        finished.set_result(None)
        if before is not None:
            await asyncio.wait([before])
            if before.cancelled() or before.exception() is not None:
                raise _EarlierBatchFailed()
        producer = self._producer
        async with producer.transaction():
            futures = await produce_batched(producer, batch.outputs)
            await producer.send_offsets_to_transaction(batch.next, self._group_id)
            if futures:
                await asyncio.gather(*futures)

    async def _settle_oldest(self) -> None:
        """Wait for the oldest batch in flight to commit, and count it. If it failed, so do the
        ones behind it (they never start): _RetryBatch with them all."""
        batch, task = self._in_flight.popleft()
        try:
            await task
        except _DISCARDED as e:
            behind = await self.settle_all_quietly()
            raise _RetryBatch(e, [batch, *behind]) from e
        except BaseException as e:
            if isinstance(e, ProducerFenced):
                log.error("producer_fenced", group_id=self._group_id)
            await self.settle_all_quietly()  # the ones behind it never start
            raise
        self.stats.batches += 1
        self.stats.records_in += len(batch.records)
        self.stats.records_out += len(batch.outputs)
        if self._on_batch is not None:
            self._on_batch(
                len(batch.records), len(batch.outputs), time.perf_counter() - batch.started
            )

    async def settle_all_quietly(self) -> list[_Batch]:
        """Wait for every batch in flight; return those that did not commit instead of raising
        (a failure is being handled already)."""
        failed: list[_Batch] = []
        while self._in_flight:
            try:
                await self._settle_oldest()
            except _RetryBatch as retry:
                failed += retry.discarded
            except Exception as e:  # the failure in hand is the one raised; this is logged
                log.error("batch_in_flight_failed", error=repr(e))
        return failed

    async def settle_all(self) -> None:
        while self._in_flight:
            await self._settle_oldest()

    def discard(self, retry: _RetryBatch, backoff: float) -> None:
        """Rewind to the start of every discarded batch: they are read and done again."""
        self.stats.retries += 1
        log.warning(
            "batch_failed_retrying",
            error=repr(retry.cause),
            records=sum(len(b.records) for b in retry.discarded),
            backoff_s=round(backoff, 2),
        )
        rewind: dict[TopicPartition, int] = {}
        for batch in retry.discarded:
            for tp, offset in batch.first.items():
                rewind[tp] = min(offset, rewind.get(tp, offset))
        # A partition revoked meanwhile (the revoke waited for these batches to end) is read
        # again by its new owner from the committed offset, which is where this would seek.
        assignment = self._consumer.assignment()
        for tp, offset in rewind.items():
            if tp in assignment:
                self._consumer.seek(tp, offset)
        if self._on_discard is not None:
            self._on_discard()
