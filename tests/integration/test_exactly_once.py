"""`run_exactly_once` against a real broker: pipelined batches, failures while batches are in
flight, and a rebalance in the middle of a pipelined run. Each test reads the output topic back
as a read_committed consumer and checks that every input came out exactly once."""

from __future__ import annotations

import asyncio
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from aiokafka.partitioner import DefaultPartitioner
from redis import exceptions as redis_errors

from shared.config import Settings
from shared.kafka import (
    BatchStats,
    ConsumerRecord,
    OutputRecord,
    StagedTransform,
    make_consumer,
    make_transactional_producer,
    run_exactly_once,
    subscribe_exactly_once,
    transactional_id,
)
from tests.conftest import TEST_PARTITIONS
from tests.kafka_helpers import consume_committed, produce

pytestmark = pytest.mark.integration

RUN_BOUND_S = 60.0  # every loop here stops by then, whatever happens


@dataclass
class StagedCopy:
    """A two-stage copy of the input with what a service does around it: what `finish` stages
    is queued per batch, applied by `on_batch` and dropped by `on_discard`."""

    out_topic: str
    fail_prepare_on: set[int] = field(default_factory=set)  # 1-based call numbers
    fail_finish_on: set[int] = field(default_factory=set)
    prepare_delay_s: float = 0.0
    prepares: int = 0
    finishes: int = 0
    discards: int = 0
    staged: deque[int] = field(default_factory=deque)
    committed: int = 0
    finishing: bool = False
    after_commit: Callable[[], None] = lambda: None

    async def prepare(self, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        self.prepares += 1
        if self.prepares in self.fail_prepare_on:
            raise redis_errors.ConnectionError("injected: Redis went away in prepare")
        if self.prepare_delay_s:
            await asyncio.sleep(self.prepare_delay_s)
        return records

    async def finish(self, records: list[ConsumerRecord]) -> list[OutputRecord]:
        # Finishes run one at a time, in batch order (a batch's may overlap the commit of the
        # one before it): what they stage is a queue.
        assert not self.finishing, "two finishes ran at once"
        self.finishing = True
        self.finishes += 1
        try:
            await asyncio.sleep(0)  # a real finish awaits Redis: let the loop interleave
            if self.finishes in self.fail_finish_on:
                raise redis_errors.ConnectionError("injected: Redis went away in finish")
        finally:
            self.finishing = False
        self.staged.append(len(records))
        return [
            OutputRecord(self.out_topic, r.value or b"", key=r.key, timestamp_ms=r.timestamp)
            for r in records
        ]

    def on_batch(self, records_in: int, records_out: int, seconds: float) -> None:
        assert self.staged, "a batch committed that no finish staged"
        staged = self.staged.popleft()
        assert staged == records_in == records_out
        self.committed += staged
        self.after_commit()

    def on_discard(self) -> None:
        self.discards += 1
        self.staged.clear()

    @property
    def stages(self) -> StagedTransform[list[ConsumerRecord]]:
        return StagedTransform(self.prepare, self.finish)


def inputs(count: int, accounts: int = 37) -> list[tuple[bytes, bytes, None]]:
    # value "<account>/<sequence within the account>": per-key order is checkable on output
    seq: Counter[int] = Counter()
    out = []
    for i in range(count):
        account = i % accounts
        out.append((f"acct-{account}".encode(), f"{account}/{seq[account]}".encode(), None))
        seq[account] += 1
    return out


async def run_loop(
    settings: Settings,
    copy: StagedCopy,
    *,
    group: str,
    instance: str,
    stop: asyncio.Event,
    depth: int,
    max_records: int,
) -> BatchStats:
    consumer = make_consumer(
        settings,
        group_id=group,
        client_id=f"{group}-{instance}",
        max_poll_records=max_records,
        heartbeat_interval_ms=300,  # a member learns of a rebalance within 0.3 s, not 3 s
    )
    producer = make_transactional_producer(settings, transactional_id(group, instance))
    await consumer.start()
    await producer.start()
    try:
        gate = subscribe_exactly_once(consumer, [settings.topics.raw])
        return await run_exactly_once(
            consumer=consumer,
            producer=producer,
            group_id=group,
            transform=copy.stages,
            stop=stop,
            batch_gate=gate,
            max_records=max_records,
            poll_timeout_ms=100,
            on_batch=copy.on_batch,
            on_discard=copy.on_discard,
            pipeline_depth=depth,
            retry_backoff_s=(0.05, 0.2),
        )
    finally:
        await consumer.stop()
        await producer.stop()


async def run_until(
    settings: Settings, copies: list[StagedCopy], count: int, **kwargs: object
) -> list[BatchStats]:
    """Run one loop per copy (one group) until `count` records committed in all, or the bound."""
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(RUN_BOUND_S, stop.set)

    def stop_when_done() -> None:
        if sum(c.committed for c in copies) >= count:
            stop.set()

    for copy in copies:
        copy.after_commit = stop_when_done
    try:
        stats = await asyncio.gather(
            *(
                run_loop(settings, c, instance=f"i{n}", stop=stop, **kwargs)  # type: ignore[arg-type]
                for n, c in enumerate(copies)
            )
        )
        return list(stats)
    finally:
        timer.cancel()


async def read_output(settings: Settings, count: int) -> list[tuple[bytes, bytes]]:
    records = await consume_committed(settings, settings.topics.valid, expected=count)
    return [(r.key or b"", r.value or b"") for r in records]


def assert_exactly_once_in_order(
    output: list[tuple[bytes, bytes]], sent: list[tuple[bytes, bytes, None]]
) -> None:
    assert Counter(v for _, v in output) == Counter(v for _, v, _ in sent)  # no loss, no dupes
    last: dict[bytes, int] = {}
    for key, value in output:  # one key lives on one partition: its records stay in order
        seq = int(value.split(b"/")[1])
        assert seq == last.get(key, -1) + 1, (key, value)
        last[key] = seq


@pytest.mark.parametrize("depth", [0, 2])
async def test_every_record_comes_out_once_in_order(settings: Settings, depth: int) -> None:
    sent = inputs(900)
    await produce(settings, settings.topics.raw, sent)
    copy = StagedCopy(settings.topics.valid)
    [stats] = await run_until(
        settings, [copy], len(sent), group=f"eo-{time.time_ns()}", depth=depth, max_records=40
    )
    assert stats.records_in == stats.records_out == copy.committed == len(sent)
    assert stats.retries == 0 and copy.discards == 0
    assert_exactly_once_in_order(await read_output(settings, len(sent)), sent)


async def test_outputs_land_on_the_partition_any_kafka_client_would_pick(
    settings: Settings,
) -> None:
    # produce_batched picks partitions itself (record batches, not `send`): the same murmur2
    # choice as the default partitioner, so consumers keyed by account see one partition each.
    sent = inputs(300, accounts=101)
    await produce(settings, settings.topics.raw, sent)
    copy = StagedCopy(settings.topics.valid)
    await run_until(
        settings, [copy], len(sent), group=f"eo-{time.time_ns()}", depth=2, max_records=50
    )
    records = await consume_committed(settings, settings.topics.valid, expected=len(sent))
    partitions = list(range(TEST_PARTITIONS))
    expected = {r.key: DefaultPartitioner()(r.key, partitions, partitions) for r in records}
    assert len(records) == len(sent)
    assert len(set(expected.values())) == TEST_PARTITIONS  # the keys do spread
    assert all(r.partition == expected[r.key] for r in records)


async def test_a_failed_prepare_discards_it_while_earlier_batches_commit(
    settings: Settings,
) -> None:
    sent = inputs(600)
    await produce(settings, settings.topics.raw, sent)
    copy = StagedCopy(settings.topics.valid, fail_prepare_on={4})
    [stats] = await run_until(
        settings, [copy], len(sent), group=f"eo-{time.time_ns()}", depth=2, max_records=40
    )
    assert stats.retries == 1 and copy.discards == 1
    assert copy.committed == stats.records_in == len(sent)
    assert_exactly_once_in_order(await read_output(settings, len(sent)), sent)


async def test_a_failed_finish_discards_it_and_every_batch_behind_it(settings: Settings) -> None:
    sent = inputs(600)
    await produce(settings, settings.topics.raw, sent)
    copy = StagedCopy(settings.topics.valid, fail_finish_on={3})
    [stats] = await run_until(
        settings, [copy], len(sent), group=f"eo-{time.time_ns()}", depth=2, max_records=40
    )
    assert stats.retries == 1 and copy.discards == 1
    # The batches prepared behind the failed one were prepared again: more prepares than
    # committed batches, and every record still committed exactly once.
    assert copy.prepares > stats.batches
    assert copy.committed == stats.records_in == len(sent)
    assert_exactly_once_in_order(await read_output(settings, len(sent)), sent)


async def test_a_rebalance_in_a_pipelined_run_loses_and_duplicates_nothing(
    settings: Settings,
) -> None:
    # Slow batches, so that the second instance joins while the first has batches in flight.
    sent = inputs(1500)
    await produce(settings, settings.topics.raw, sent)
    group = f"eo-{time.time_ns()}"
    first = StagedCopy(settings.topics.valid, prepare_delay_s=0.06)
    second = StagedCopy(settings.topics.valid, prepare_delay_s=0.06)
    stop = asyncio.Event()
    timer = asyncio.get_running_loop().call_later(RUN_BOUND_S, stop.set)
    first_is_busy = asyncio.Event()

    def progress() -> None:
        if first.committed >= 150:
            first_is_busy.set()
        if first.committed + second.committed >= len(sent):
            stop.set()

    first.after_commit = second.after_commit = progress

    async def second_joins_later() -> BatchStats:
        await first_is_busy.wait()
        return await run_loop(
            settings, second, group=group, instance="b", stop=stop, depth=2, max_records=15
        )

    try:
        stats_first, stats_second = await asyncio.wait_for(
            asyncio.gather(
                run_loop(
                    settings, first, group=group, instance="a", stop=stop, depth=2, max_records=15
                ),
                second_joins_later(),
            ),
            timeout=2 * RUN_BOUND_S,
        )
    finally:
        timer.cancel()
    assert first.committed + second.committed == len(sent)
    assert second.committed > 0, "the second instance never got partitions: no rebalance ran"
    assert stats_first.records_in == first.committed
    assert stats_second.records_in == second.committed
    assert_exactly_once_in_order(await read_output(settings, len(sent)), sent)
