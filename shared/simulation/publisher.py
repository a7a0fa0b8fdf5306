"""Publish a simulated workload to Kafka: transactions to `transactions.raw`, labels to
`risk.labels`, both keyed by account_id, at a target rate of transactions per second.

Time mapping (why the published event times look the way they do). Ingest rejects events older
than INGEST_MAX_AGE_S (30 days) or more than INGEST_MAX_FUTURE_SKEW_S (5 min) in the future, so
the simulator's own start date (2018, the handbook's) cannot go on the wire. By default the
simulated window is moved to the last `n_days` complete UTC days before now (`replay_start`):
event times keep exactly the spacing the generator drew, so per-account velocity (counts per
minute, hour, day; seconds since the last payment; travel speed) is as realistic as the
generator made it, and days stay aligned to UTC midnight, so the night and weekend features mean
what they say. The rate only decides how fast that history is replayed: at 500 tx/s one simulated
day of the default world (about 10,000 payments) goes out in about 20 s. Every event is in the
past and the oldest is less than `n_days + 1` days old when the run starts, so `n_days` may be at
most 28 with the default 30-day retention (`max_replay_days`: one day of headroom for the run
itself and for consumer lag). We do not squeeze simulated time onto the wall clock: compressing
weeks into minutes would turn every customer into a card tester for the velocity features, and
a genuinely live pace (the default world makes 0.1 payments per second) shows nothing in a demo.

Labels: the label of a transaction is reported `label_delay` (7 days) after its event time and
is published when the replay's simulated clock passes that moment (`interleave_labels`), so it
never arrives before a real chargeback could have. Over a 28-day window the labels of the first
21 days are published during the run (the labels topic catches up with the transactions one week
behind, as scoring's delayed terminal-risk features expect); when the stream ends, the replay has
reached the present and the labels already due by the wall clock follow; the labels of the last
7 days are not yet due and are not published (`PublishStats.labels_pending` counts them). A run
cut short (`max_transactions`, `duration_s`, a stop signal) is a prefix of the simulated timeline:
labels due after its simulated clock are not published either. Labels do not count against the
rate.

Wire format. A transaction carries exactly the `Transaction` fields: amount as `Money` in minor
units and its currency, event_time, the channel mapped to the enum, latitude/longitude only when
the payment has a location. The ground truth (`is_fraud`, `fraud_scenario`) never goes on the
transaction topic; it reaches Kafka only as a `Label`. Records carry a `content-type` header
(protobuf, or JSON for a share of transactions to exercise ingest's JSON path) and no explicit
timestamp, so the record time is the publish time, which downstream stages use to measure
end-to-end latency.

Ids: `id_prefix` (the CLI's `--run-id`) is put in front of every entity id (transaction,
account, card, terminal, merchant, device), so two runs on the same Kafka and Redis are separate
worlds: the same seed publishes the same ids, which ingest drops as producer retries within its
dedup window and which would stack on the velocity counters of the previous run. Without a
prefix a rerun is a true replay, which is what a deduplication demo wants.

`publish_stream` is the loop over any `RecordSink` (unit tests use a list); `publish_simulation`
wires it to the generator and an idempotent Kafka producer.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, Final, Protocol

from aiokafka import AIOKafkaProducer

from protos.fraud.v1 import transaction_pb2
from shared.codecs import JSON_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE, transaction_to_json
from shared.config import IngestSettings, Settings, TopicSettings
from shared.errors import ConfigError
from shared.kafka import OutputRecord, make_producer
from shared.simulation.generator import (
    CHANNEL_CARD_PRESENT,
    CHANNEL_ECOMMERCE,
    SimLabel,
    SimTransaction,
    SimulationConfig,
    generate,
    interleave_labels,
)

__all__ = [
    "AGE_HEADROOM",
    "CHANNELS",
    "CONTENT_TYPE_HEADER",
    "DEFAULT_RATE",
    "KafkaSink",
    "PublishStats",
    "RecordSink",
    "TokenBucket",
    "check_publishable",
    "encode_label",
    "encode_transaction",
    "label_to_proto",
    "max_replay_days",
    "publish_simulation",
    "publish_stream",
    "replay_start",
    "stream_items",
    "transaction_to_proto",
]

DEFAULT_RATE: Final = 500.0

CHANNELS: Final[Mapping[str, transaction_pb2.Channel]] = {
    CHANNEL_CARD_PRESENT: transaction_pb2.CHANNEL_CARD_PRESENT,
    CHANNEL_ECOMMERCE: transaction_pb2.CHANNEL_ECOMMERCE,
}

CONTENT_TYPE_HEADER: Final = "content-type"
_PROTOBUF_HEADERS: Final = [(CONTENT_TYPE_HEADER, PROTOBUF_CONTENT_TYPE.encode())]
_JSON_HEADERS: Final = [(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE.encode())]

# Headroom between the oldest replayed event and ingest's retention limit: the run itself takes
# time, and ingest may be behind (or down for a while) when the first records reach it.
AGE_HEADROOM: Final = timedelta(days=1)
# Ids are checked by ingest (at most 128 characters, no control characters); a short, plain
# prefix keeps every prefixed id well inside that.
_ID_PREFIX: Final = re.compile(r"[A-Za-z0-9_.]{1,24}")
# How many stream items are pulled from the generator per hop to its worker thread: a day of
# the default world takes ~0.1 s to generate, which must not stall the event loop.
_CHUNK: Final = 2048
# Never sleep less than this when waiting for tokens: at high rates the loop sends a few
# records per wake-up instead of waking once per record.
_MIN_SLEEP_S: Final = 0.002
# Unpaced, the loop yields to the event loop this often so signals and progress still run.
_YIELD_EVERY: Final = 512

Item = tuple[datetime, SimTransaction | SimLabel]


# --- wire conversion --------------------------------------------------------------------------


def _prefixed(prefix: str, value: str) -> str:
    return f"{prefix}-{value}" if prefix else value


def transaction_to_proto(tx: SimTransaction, id_prefix: str = "") -> transaction_pb2.Transaction:
    """The wire `Transaction` of a simulated payment, without its ground truth."""
    try:
        channel = CHANNELS[tx.channel]
    except KeyError:
        raise ValueError(f"{tx.transaction_id}: no wire channel for {tx.channel!r}") from None
    message = transaction_pb2.Transaction(
        transaction_id=_prefixed(id_prefix, tx.transaction_id),
        account_id=_prefixed(id_prefix, tx.account_id),
        card_id=_prefixed(id_prefix, tx.card_id),
        merchant_id=_prefixed(id_prefix, tx.merchant_id),
        merchant_category=tx.merchant_category,
        terminal_id=_prefixed(id_prefix, tx.terminal_id),
        amount=transaction_pb2.Money(units=tx.amount_minor, currency=tx.currency),
        country=tx.country,
        channel=channel,
        device_id=_prefixed(id_prefix, tx.device_id),
        ip_address=tx.ip_address,
    )
    message.event_time.FromDatetime(tx.event_time)
    # Optional fields: an online payment has no location, and a 0.0 would be a place in the sea.
    if tx.latitude is not None:
        message.latitude = tx.latitude
    if tx.longitude is not None:
        message.longitude = tx.longitude
    return message


def label_to_proto(label: SimLabel, id_prefix: str = "") -> transaction_pb2.Label:
    message = transaction_pb2.Label(
        transaction_id=_prefixed(id_prefix, label.transaction_id),
        account_id=_prefixed(id_prefix, label.account_id),
        terminal_id=_prefixed(id_prefix, label.terminal_id),
        is_fraud=label.is_fraud,
        source=label.source,
    )
    message.reported_at.FromDatetime(label.reported_at)
    if label.event_time is not None:
        message.event_time.FromDatetime(label.event_time)
    return message


def encode_transaction(
    tx: SimTransaction, topic: str, *, as_json: bool = False, id_prefix: str = ""
) -> OutputRecord:
    """The Kafka record of a transaction: keyed by account_id, protobuf or JSON by header."""
    message = transaction_to_proto(tx, id_prefix)
    if as_json:
        value, headers = transaction_to_json(message).encode(), _JSON_HEADERS
    else:
        value, headers = message.SerializeToString(), _PROTOBUF_HEADERS
    return OutputRecord(topic=topic, value=value, key=message.account_id.encode(), headers=headers)


def encode_label(label: SimLabel, topic: str, *, id_prefix: str = "") -> OutputRecord:
    message = label_to_proto(label, id_prefix)
    return OutputRecord(
        topic=topic,
        value=message.SerializeToString(),
        key=message.account_id.encode(),
        headers=_PROTOBUF_HEADERS,
    )


# --- time mapping -----------------------------------------------------------------------------


def replay_start(now: datetime, n_days: int) -> datetime:
    """Start of the last `n_days` complete UTC days before `now`: the window ends at today's
    midnight, so no event is in the future and days keep their calendar alignment."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight - timedelta(days=n_days)


def max_replay_days(now: datetime, ingest: IngestSettings) -> int:
    """The longest window `replay_start` can place before `now` that ingest still accepts, with
    `AGE_HEADROOM` to spare (28 days with the default 30-day retention)."""
    midnight = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    budget = timedelta(seconds=ingest.max_age_s) - AGE_HEADROOM - (now - midnight)
    return max(0, math.floor(budget / timedelta(days=1)))


def check_publishable(start: datetime, n_days: int, now: datetime, ingest: IngestSettings) -> None:
    """Raise ConfigError unless every event of the window [start, start + n_days) would pass
    ingest's event-time checks at `now` (with `AGE_HEADROOM` on the age side)."""
    oldest_allowed = now - timedelta(seconds=ingest.max_age_s) + AGE_HEADROOM
    if start < oldest_allowed:
        raise ConfigError(
            f"the simulated window starts {start.isoformat()}, but ingest rejects events older "
            f"than INGEST_MAX_AGE_S={ingest.max_age_s} s (with {AGE_HEADROOM.days} day of "
            f"headroom, nothing before {oldest_allowed.isoformat(timespec='seconds')}); "
            f"use at most {max_replay_days(now, ingest)} days without --start, or --output"
        )
    end = start + timedelta(days=n_days)
    newest_allowed = now + timedelta(seconds=ingest.max_future_skew_s)
    if end > newest_allowed:
        raise ConfigError(
            f"the simulated window ends {end.isoformat()}, in the future: ingest rejects events "
            f"more than INGEST_MAX_FUTURE_SKEW_S={ingest.max_future_skew_s} s ahead of now; "
            "leave out --start to replay the days before today"
        )


# --- pacing -----------------------------------------------------------------------------------


@dataclass
class TokenBucket:
    """A token bucket on the caller's clock (seconds from any origin), so it is pure arithmetic:
    tokens accrue at `rate` per second up to `capacity`, and each transaction takes one. The
    capacity bounds the catch-up burst after a stall (a slow broker, a day being generated)."""

    rate: float
    capacity: float
    tokens: float
    stamp: float

    @classmethod
    def starting_at(cls, rate: float, now: float, burst_s: float = 0.1) -> TokenBucket:
        """An empty bucket: the first transaction goes after 1/rate s, and the achieved rate
        never overshoots the target, not even at the start. Room for `burst_s` of catch-up."""
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number, got {rate}")
        return cls(rate=rate, capacity=max(1.0, rate * burst_s), tokens=0.0, stamp=now)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def available(self, now: float) -> int:
        """Whole transactions that may go out at `now`."""
        self._refill(now)
        # Forgive float error: 0.05 s at 100/s must be 5 tokens, not 4.999999999999982.
        return math.floor(self.tokens + 1e-9)

    def take(self, n: int, now: float) -> None:
        self._refill(now)
        self.tokens -= n

    def wait_s(self, n: int, now: float) -> float:
        """Seconds from `now` until `n` tokens are there (0 when they already are)."""
        self._refill(now)
        return max(0.0, (min(n, self.capacity) - self.tokens) / self.rate)


# --- the publishing loop ----------------------------------------------------------------------


@dataclass(frozen=True)
class PublishStats:
    """What a run has published so far (progress) or in all (the result)."""

    transactions: int = 0
    labels: int = 0
    json_transactions: int = 0
    elapsed_s: float = 0.0
    # Event time of the last transaction published: how far the replay has come.
    simulated_time: datetime | None = None
    include_labels: bool = True
    # Why the run ended: "end" (the simulation is over), "max_transactions", "duration",
    # "stopped" (the stop event: a signal); empty while running.
    stopped_by: str = ""

    @property
    def rate(self) -> float:
        """Transactions per second achieved over the whole run."""
        return self.transactions / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def labels_pending(self) -> int:
        """Published transactions whose label was not published: not yet due."""
        return self.transactions - self.labels if self.include_labels else 0


class RecordSink(Protocol):
    """Where `publish_stream` sends records. `send` may return before delivery; `flush` waits
    for every record sent and raises if any could not be delivered."""

    async def send(self, record: OutputRecord) -> None: ...

    async def flush(self) -> None: ...


class KafkaSink:
    """A `RecordSink` over a started producer. Deliveries are tracked with callbacks instead of
    awaiting each one, so the hot path never waits for a broker round trip; the producer's own
    buffer limit is the backpressure. A failed delivery (after the producer's retries) fails the
    next `send` or `flush`."""

    def __init__(self, producer: AIOKafkaProducer) -> None:
        self._producer = producer
        self._in_flight: set[asyncio.Future[Any]] = set()
        self._failure: BaseException | None = None

    def _done(self, future: asyncio.Future[Any]) -> None:
        self._in_flight.discard(future)
        if not future.cancelled() and future.exception() is not None and self._failure is None:
            self._failure = future.exception()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    async def send(self, record: OutputRecord) -> None:
        self._raise_failure()
        future: asyncio.Future[Any] = await self._producer.send(
            record.topic, record.value, key=record.key, headers=record.headers or None
        )
        self._in_flight.add(future)
        future.add_done_callback(self._done)

    async def flush(self) -> None:
        if self._in_flight:
            await asyncio.wait(set(self._in_flight))
        self._raise_failure()


def stream_items(config: SimulationConfig, *, include_labels: bool = True) -> Iterator[Item]:
    """The simulation as (simulated time, transaction or label), in simulated-time order."""
    if include_labels:
        return interleave_labels(generate(config), config.label_delay)
    return ((tx.event_time, tx) for tx in generate(config))


def _next_chunk(items: Iterator[Item]) -> list[Item]:
    return list(islice(items, _CHUNK))


def _fetch(items: Iterator[Item]) -> asyncio.Task[list[Item]]:
    return asyncio.ensure_future(asyncio.to_thread(_next_chunk, items))


@dataclass
class _Run:
    """Mutable counters of one run; `snapshot` freezes them for callers."""

    started: float
    include_labels: bool
    transactions: int = 0
    labels: int = 0
    json_transactions: int = 0
    simulated_time: datetime | None = None
    stopped_by: str = ""
    progress_at: float = 0.0

    def snapshot(self, now: float) -> PublishStats:
        return PublishStats(
            transactions=self.transactions,
            labels=self.labels,
            json_transactions=self.json_transactions,
            elapsed_s=now - self.started,
            simulated_time=self.simulated_time,
            include_labels=self.include_labels,
            stopped_by=self.stopped_by,
        )


def _check_options(
    rate: float | None,
    max_transactions: int | None,
    duration_s: float | None,
    json_share: float,
    id_prefix: str,
) -> None:
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"rate={rate} must be a positive number of transactions per second")
    if max_transactions is not None and max_transactions < 0:
        raise ConfigError(f"max_transactions={max_transactions} must not be negative")
    if duration_s is not None and not (math.isfinite(duration_s) and duration_s > 0):
        raise ConfigError(f"duration_s={duration_s} must be a positive number of seconds")
    if not 0.0 <= json_share <= 1.0:
        raise ConfigError(f"json_share={json_share} must be within [0, 1]")
    if id_prefix and not _ID_PREFIX.fullmatch(id_prefix):
        raise ConfigError(f"id prefix {id_prefix!r} must be 1-24 letters, digits, '_' or '.'")


async def publish_stream(
    sink: RecordSink,
    items: Iterable[Item],
    topics: TopicSettings,
    *,
    rate: float | None = DEFAULT_RATE,
    max_transactions: int | None = None,
    duration_s: float | None = None,
    stop_event: asyncio.Event | None = None,
    progress_callback: Callable[[PublishStats], None] | None = None,
    progress_interval_s: float = 2.0,
    include_labels: bool = True,
    json_share: float = 0.0,
    json_seed: int = 0,
    id_prefix: str = "",
    clock: Callable[[], float] = time.monotonic,
    wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> PublishStats:
    """Send an interleaved stream (see `stream_items`) to `sink`, paced at `rate` transactions
    per second (None: as fast as the sink takes them), until the stream ends, `max_transactions`
    went out, `duration_s` passed, or `stop_event` is set; then flush and return the totals.

    A label is sent when the stream reaches it (its simulated time has passed) unless its
    `reported_at` is still ahead of `wall_clock()`: such labels only come in the stream's final
    flush, and sending them would report fraud before anyone could know. After the
    `max_transactions`-th transaction, the labels that fall before the next transaction still go.
    Which transactions go as JSON is drawn from `json_seed`, so a run is reproducible.
    """
    _check_options(rate, max_transactions, duration_s, json_share, id_prefix)
    started = clock()
    run = _Run(started=started, include_labels=include_labels, progress_at=started)
    bucket = TokenBucket.starting_at(rate, started) if rate is not None else None
    choose_json = random.Random(json_seed)
    stop = stop_event or asyncio.Event()
    iterator = iter(items)
    buffer: deque[Item] = deque()
    prefetch: asyncio.Task[list[Item]] | None = None
    since_yield = 0

    try:
        while True:
            now = clock()
            if stop.is_set():
                run.stopped_by = "stopped"
                break
            if duration_s is not None and now - started >= duration_s:
                run.stopped_by = "duration"
                break
            if progress_callback is not None and now - run.progress_at >= progress_interval_s:
                run.progress_at = now
                progress_callback(run.snapshot(now))
            if not buffer:
                # The generator runs in a worker thread, a chunk ahead of the publishing: generating
                # a day then neither stalls signals, progress or (in `fraudstream run`) the live
                # view, nor leaves a gap in the pace.
                prefetch = prefetch or _fetch(iterator)
                chunk = await prefetch
                prefetch = None
                if not chunk:
                    run.stopped_by = "end"
                    break
                buffer.extend(chunk)
                prefetch = _fetch(iterator)
                continue

            _, item = buffer[0]
            if isinstance(item, SimLabel):
                buffer.popleft()
                # A label not yet due by the wall clock (only in the stream's final flush) stays
                # unpublished: no chargeback arrives before it is reported. `labels_pending`.
                if not include_labels or item.reported_at > wall_clock():
                    continue
                await sink.send(encode_label(item, topics.labels, id_prefix=id_prefix))
                run.labels += 1
            else:
                if max_transactions is not None and run.transactions >= max_transactions:
                    run.stopped_by = "max_transactions"
                    break
                if bucket is not None:
                    if bucket.available(now) < 1:
                        await asyncio.sleep(max(bucket.wait_s(1, now), _MIN_SLEEP_S))
                        continue
                    bucket.take(1, now)
                as_json = json_share > 0 and choose_json.random() < json_share
                await sink.send(
                    encode_transaction(item, topics.raw, as_json=as_json, id_prefix=id_prefix)
                )
                buffer.popleft()
                run.transactions += 1
                run.json_transactions += as_json
                run.simulated_time = item.event_time

            since_yield += 1
            if since_yield >= _YIELD_EVERY:
                since_yield = 0
                await asyncio.sleep(0)
    finally:
        if prefetch is not None:
            # Let the worker finish its chunk: the generator must not be left running in a
            # thread, nor its task pending. Its result (or error) no longer matters.
            await asyncio.gather(prefetch, return_exceptions=True)
    await sink.flush()
    return run.snapshot(clock())


async def publish_simulation(
    settings: Settings,
    config: SimulationConfig,
    *,
    rate: float | None = DEFAULT_RATE,
    max_transactions: int | None = None,
    duration_s: float | None = None,
    stop_event: asyncio.Event | None = None,
    progress_callback: Callable[[PublishStats], None] | None = None,
    progress_interval_s: float = 2.0,
    retime: bool = True,
    include_labels: bool = True,
    json_share: float = 0.0,
    id_prefix: str = "",
    now: datetime | None = None,
) -> PublishStats:
    """Generate `config`'s simulation and publish it to `settings.topics.raw` / `.labels` with
    an idempotent producer; see the module docstring for the time mapping and label timing.

    `retime=True` (the default) replaces `config.start` with `replay_start(now, n_days)`;
    `retime=False` publishes `config.start` as given. Either way the window is checked against
    ingest's event-time limits first, and ConfigError names the problem (nothing is sent).
    `rate=None` publishes as fast as the broker acknowledges. Kafka errors propagate (the
    producer retries transient ones itself); whatever was sent before a stop is flushed.
    """
    _check_options(rate, max_transactions, duration_s, json_share, id_prefix)
    current = now or datetime.now(UTC)
    if retime:
        config = replace(config, start=replay_start(current, config.n_days))
    check_publishable(config.start, config.n_days, current, settings.ingest)

    producer = make_producer(settings, client_id="fraudstream-simulator")
    await producer.start()
    try:
        return await publish_stream(
            KafkaSink(producer),
            stream_items(config, include_labels=include_labels),
            settings.topics,
            rate=rate,
            max_transactions=max_transactions,
            duration_s=duration_s,
            stop_event=stop_event,
            progress_callback=progress_callback,
            progress_interval_s=progress_interval_s,
            include_labels=include_labels,
            json_share=json_share,
            json_seed=config.seed,
            id_prefix=id_prefix,
        )
    finally:
        await producer.stop()
