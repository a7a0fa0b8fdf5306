"""Small real-Kafka helpers for tests: publish records, read back what was committed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from aiokafka.structs import ConsumerRecord

from shared.config import Settings
from shared.kafka import make_consumer, make_producer

__all__ = ["consume_committed", "produce"]


async def produce(
    settings: Settings,
    topic: str,
    records: Sequence[tuple[bytes | None, bytes | None, list[tuple[str, bytes]] | None]],
) -> None:
    """Publish (key, value, headers) records and wait until every one is acknowledged."""
    producer = make_producer(settings, client_id="test-producer")
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value, key=key, headers=headers)
            for key, value, headers in records
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def consume_committed(
    settings: Settings,
    topic: str,
    *,
    expected: int,
    timeout_s: float = 30.0,
    settle_s: float = 1.0,
) -> list[ConsumerRecord]:
    """Read a topic from the start as a read_committed consumer without a group.

    Returns once `expected` records arrived and no more came for `settle_s` (so a test that
    expects N sees an N+1-th duplicate), or when `timeout_s` runs out (bounded, never hangs).
    """
    consumer = make_consumer(settings, group_id=None, client_id="test-reader")
    await consumer.start()
    try:
        partitions = await _partitions(consumer, topic)
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        last_arrival = time.monotonic()
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            for recs in batch.values():
                records.extend(recs)
                last_arrival = time.monotonic()
            if len(records) >= expected and time.monotonic() - last_arrival >= settle_s:
                break
        return records
    finally:
        await consumer.stop()


async def _partitions(consumer, topic: str):
    from aiokafka import TopicPartition

    for _ in range(50):
        parts = consumer.partitions_for_topic(topic)
        if parts:
            return [TopicPartition(topic, p) for p in sorted(parts)]
        # A fresh consumer may not know a just-created topic yet: refresh its metadata.
        await consumer._client.force_metadata_update()
        await asyncio.sleep(0.1)
    raise AssertionError(f"topic {topic} has no partitions")
