"""What the consume-transform-produce benchmarks share: one timed leg through the exactly-once
loop, the no-op passthrough it is compared with, Redis's CPU clock, and the clean-up.

A leg has its own consumer group and transactional id, reads `source_topic` from the start and
stops once `count` records have committed (or after `max_seconds`). Its throughput is records
over the time from the first batch's start to the last batch's commit, so the consumer-group
join is not counted.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import redis.asyncio as aioredis

from shared.config import Settings
from shared.kafka import (
    ConsumerRecord,
    OutputRecord,
    StagedTransform,
    Transform,
    make_admin,
    make_consumer,
    make_transactional_producer,
    run_exactly_once,
    subscribe_exactly_once,
)

__all__ = [
    "LegResult",
    "delete_keys",
    "delete_topics",
    "passthrough_transform",
    "redis_cpu_s",
    "run_leg",
]


@dataclass(frozen=True)
class LegResult:
    name: str
    records: int
    seconds: float  # first batch's start to last batch's commit
    cpu_seconds: float  # this process's CPU over the whole leg (the broker's is not counted)
    batches: int
    redis_cpu_seconds: float = 0.0  # Redis's main thread over the leg, when it was asked for

    @property
    def rate(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_record(self) -> float:
        return 1e6 * self.cpu_seconds / self.records if self.records else 0.0

    @property
    def redis_cpu_us_per_record(self) -> float:
        return 1e6 * self.redis_cpu_seconds / self.records if self.records else 0.0


async def redis_cpu_s(redis: aioredis.Redis) -> float:
    """CPU seconds of Redis's main thread (where scripts run) since it started."""
    info = await redis.info("cpu")
    return float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])


def passthrough_transform(out_topic: str) -> Transform:
    """The Kafka floor: every record's key, value and timestamp forwarded unchanged."""

    async def transform(records: list[ConsumerRecord]) -> list[OutputRecord]:
        return [
            OutputRecord(topic=out_topic, value=r.value, key=r.key, timestamp_ms=r.timestamp)
            for r in records
        ]

    return transform


async def run_leg(
    settings: Settings,
    name: str,
    transform: Transform | StagedTransform[Any],
    *,
    source_topic: str,
    count: int,
    batch: int,
    max_seconds: float,
    pipeline_depth: int = 0,
    on_commit: Callable[[int, int, float], None] | None = None,
    on_discard: Callable[[], None] | None = None,
    redis: aioredis.Redis | None = None,
) -> LegResult:
    """Run `transform` over `count` records of `source_topic` as the services run it; with
    `redis`, also measure Redis's main-thread CPU over the leg."""
    group = f"bench-{name}-{uuid.uuid4().hex[:8]}"
    producer = make_transactional_producer(settings, group)
    consumer = make_consumer(settings, group_id=group, client_id=group, max_poll_records=batch)
    await producer.start()
    await consumer.start()
    redis_start = await redis_cpu_s(redis) if redis is not None else 0.0
    cpu_start = time.process_time()
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(max_seconds, stop.set)
    first_start: float | None = None
    last_end = 0.0
    records = 0
    batches = 0

    def on_batch(records_in: int, records_out: int, seconds: float) -> None:
        nonlocal first_start, last_end, records, batches
        now = time.perf_counter()
        if first_start is None:
            first_start = now - seconds
        last_end = now
        records += records_in
        batches += 1
        if on_commit is not None:
            on_commit(records_in, records_out, seconds)
        if records >= count:
            stop.set()

    try:
        gate = subscribe_exactly_once(consumer, [source_topic])
        await run_exactly_once(
            consumer=consumer,
            producer=producer,
            group_id=group,
            transform=transform,
            stop=stop,
            batch_gate=gate,
            max_records=batch,
            on_batch=on_batch,
            on_discard=on_discard,
            pipeline_depth=pipeline_depth,
        )
    finally:
        cpu_seconds = time.process_time() - cpu_start
        timer.cancel()
        await consumer.stop()
        await producer.stop()
    redis_seconds = await redis_cpu_s(redis) - redis_start if redis is not None else 0.0
    if records < count:
        print(f"  warning: {name} committed {records} of {count} within {max_seconds} s")
    return LegResult(
        name, records, last_end - (first_start or last_end), cpu_seconds, batches, redis_seconds
    )


async def delete_keys(redis: aioredis.Redis, prefix: str) -> None:
    batch: list[bytes] = []
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        batch.append(key)
        if len(batch) >= 1000:
            await cast(Any, redis).unlink(*batch)
            batch.clear()
    if batch:
        await cast(Any, redis).unlink(*batch)


async def delete_topics(settings: Settings, topics: Sequence[str]) -> None:
    admin = make_admin(settings, client_id="bench-cleanup")
    await admin.start()
    try:
        await admin.delete_topics(list(topics))
    except Exception as e:  # cleanup is best effort: the figures are already measured
        print(f"  note: could not delete the benchmark topics: {e!r}")
    finally:
        await admin.close()
