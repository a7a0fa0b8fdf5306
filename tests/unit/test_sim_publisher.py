"""The simulator's publisher without a broker: wire conversion, the time window ingest accepts,
token-bucket arithmetic, and the publishing loop over a list sink."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from protos.fraud.v1 import transaction_pb2
from shared.cli import main as cli_main
from shared.codecs import decode_transaction
from shared.config import IngestSettings, TopicSettings
from shared.errors import ConfigError
from shared.kafka import OutputRecord
from shared.simulation import (
    CHANNEL_CARD_PRESENT,
    CHANNEL_ECOMMERCE,
    LABEL_SOURCE,
    SimTransaction,
    SimulationConfig,
    generate,
    label_for,
    read_jsonl,
)
from shared.simulation.cli import ProgressPrinter, summary
from shared.simulation.publisher import (
    AGE_HEADROOM,
    PublishStats,
    TokenBucket,
    check_publishable,
    encode_label,
    encode_transaction,
    label_to_proto,
    max_replay_days,
    publish_stream,
    replay_start,
    stream_items,
    transaction_to_proto,
)
from shared.validation import ValidationLimits, validate_transaction

NOW = datetime(2026, 3, 18, 14, 30, 15, tzinfo=UTC)  # a fixed "now": no test reads the clock
TOPICS = TopicSettings()
INGEST = IngestSettings()
LIMITS = ValidationLimits.from_settings(INGEST)


def _config(n_days: int = 4, **overrides: object) -> SimulationConfig:
    settings: dict[str, object] = {
        "seed": 3,
        "n_customers": 120,
        "n_terminals": 300,
        "n_days": n_days,
        "start": replay_start(NOW, n_days),
        "label_delay": timedelta(days=1),
    }
    settings.update(overrides)
    return SimulationConfig(**settings)  # type: ignore[arg-type]


def _tx(**overrides: object) -> SimTransaction:
    base = SimTransaction(
        transaction_id="tx-0000000042",
        account_id="acct-00007",
        card_id="card-00007",
        merchant_id="merch-00123",
        merchant_category="5411",
        terminal_id="term-00123",
        amount_minor=1234,
        currency="EUR",
        event_time=datetime(2026, 3, 10, 11, 59, 58, 250_000, tzinfo=UTC),
        country="BE",
        latitude=50.71,
        longitude=5.62,
        channel=CHANNEL_CARD_PRESENT,
        device_id="dev-00007",
        ip_address="10.0.0.7",
        is_fraud=True,
        fraud_scenario=2,
    )
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


class ListSink:
    """A RecordSink that keeps what it is sent, with the (fake) clock reading of each send."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self.records: list[OutputRecord] = []
        self.sent_at: list[float] = []
        self.flushes = 0
        self._clock = clock

    async def send(self, record: OutputRecord) -> None:
        self.records.append(record)
        if self._clock is not None:
            self.sent_at.append(self._clock())

    async def flush(self) -> None:
        self.flushes += 1

    def on(self, topic: str) -> list[OutputRecord]:
        return [r for r in self.records if r.topic == topic]


class FakeClock:
    """Advances by `step` seconds at every reading, so a loop sees time pass without waiting."""

    def __init__(self, step: float) -> None:
        self.now = 1000.0
        self.step = step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


# --- wire conversion --------------------------------------------------------------------------


def test_amount_is_money_in_minor_units() -> None:
    message = transaction_to_proto(_tx(amount_minor=1234))
    assert message.amount.units == 1234
    assert message.amount.currency == "EUR"
    assert transaction_to_proto(_tx(amount_minor=1)).amount.units == 1


def test_fields_and_event_time_carry_over() -> None:
    tx = _tx()
    message = transaction_to_proto(tx)
    assert (message.transaction_id, message.account_id, message.card_id) == (
        tx.transaction_id,
        tx.account_id,
        tx.card_id,
    )
    assert (message.merchant_id, message.merchant_category, message.terminal_id) == (
        tx.merchant_id,
        tx.merchant_category,
        tx.terminal_id,
    )
    assert (message.country, message.device_id, message.ip_address) == (
        "BE",
        "dev-00007",
        tx.ip_address,
    )
    assert message.event_time.ToDatetime(tzinfo=UTC) == tx.event_time


@pytest.mark.parametrize(
    ("channel", "expected"),
    [
        (CHANNEL_CARD_PRESENT, transaction_pb2.CHANNEL_CARD_PRESENT),
        (CHANNEL_ECOMMERCE, transaction_pb2.CHANNEL_ECOMMERCE),
    ],
)
def test_channel_mapping(channel: str, expected: int) -> None:
    assert transaction_to_proto(_tx(channel=channel)).channel == expected


def test_unknown_channel_is_an_error_not_unspecified() -> None:
    with pytest.raises(ValueError, match="teleport"):
        transaction_to_proto(_tx(channel="teleport"))


def test_location_only_when_present() -> None:
    present = transaction_to_proto(_tx())
    assert present.HasField("latitude") and present.HasField("longitude")
    assert (present.latitude, present.longitude) == (50.71, 5.62)
    online = transaction_to_proto(_tx(channel=CHANNEL_ECOMMERCE, latitude=None, longitude=None))
    assert not online.HasField("latitude") and not online.HasField("longitude")


def test_no_ground_truth_on_the_wire() -> None:
    fraud = encode_transaction(_tx(is_fraud=True, fraud_scenario=2), TOPICS.raw)
    genuine = encode_transaction(_tx(is_fraud=False, fraud_scenario=0), TOPICS.raw)
    # The bytes do not depend on the truth at all, and nothing rides in free attributes.
    assert fraud.value == genuine.value
    message = transaction_pb2.Transaction.FromString(fraud.value)
    assert not message.attributes
    as_json = encode_transaction(_tx(is_fraud=True), TOPICS.raw, as_json=True).value.decode()
    assert "fraud" not in as_json.lower()
    assert "scenario" not in as_json.lower()


def test_records_are_keyed_by_account_with_a_content_type() -> None:
    record = encode_transaction(_tx(), "raw-topic")
    assert record.topic == "raw-topic"
    assert record.key == b"acct-00007"
    assert record.headers == [("content-type", b"application/x-protobuf")]
    assert record.timestamp_ms is None  # the publish time: downstream latency is measured from it
    decoded = decode_transaction(record.value, "application/x-protobuf")
    assert decoded == transaction_to_proto(_tx())


def test_json_records_decode_to_the_same_transaction() -> None:
    record = encode_transaction(_tx(), TOPICS.raw, as_json=True)
    assert record.headers == [("content-type", b"application/json")]
    assert json.loads(record.value)["accountId"] == "acct-00007"
    assert decode_transaction(record.value, "application/json") == transaction_to_proto(_tx())


def test_id_prefix_applies_to_every_entity_id() -> None:
    message = transaction_to_proto(_tx(), id_prefix="r1a2b3")
    for name in ("transaction_id", "account_id", "card_id", "merchant_id", "terminal_id"):
        assert getattr(message, name).startswith("r1a2b3-"), name
    assert message.device_id == "r1a2b3-dev-00007"
    assert message.merchant_category == "5411"  # a code, not an id
    assert encode_transaction(_tx(), TOPICS.raw, id_prefix="r1").key == b"r1-acct-00007"


def test_label_conversion() -> None:
    tx = _tx()
    label = label_for(tx, timedelta(days=7))
    message = label_to_proto(label)
    assert (message.transaction_id, message.account_id, message.terminal_id) == (
        tx.transaction_id,
        tx.account_id,
        tx.terminal_id,
    )
    assert message.is_fraud is True
    assert message.source == LABEL_SOURCE
    assert message.reported_at.ToDatetime(tzinfo=UTC) == tx.event_time + timedelta(days=7)
    # The transaction's own day, so terminal risk books the fraud where it happened.
    assert message.event_time.ToDatetime(tzinfo=UTC) == tx.event_time
    record = encode_label(label, TOPICS.labels, id_prefix="r9")
    assert record.topic == TOPICS.labels
    assert record.key == b"r9-acct-00007"
    assert transaction_pb2.Label.FromString(record.value).transaction_id == "r9-tx-0000000042"


# --- the time window --------------------------------------------------------------------------


def test_replay_window_is_the_last_complete_days_before_now() -> None:
    start = replay_start(NOW, 4)
    assert start == datetime(2026, 3, 14, tzinfo=UTC)
    config = _config(4)
    times = [tx.event_time for tx in generate(config)]
    assert times and min(times) >= start
    assert max(times) < datetime(2026, 3, 18, tzinfo=UTC) <= NOW


def test_replayed_transactions_pass_ingest_validation_for_the_whole_run() -> None:
    # The longest window the default retention allows, valid at the start of the run and still
    # valid (thanks to the headroom) when the run or ingest is most of a day late.
    config = _config(max_replay_days(NOW, INGEST), n_customers=60, n_terminals=200)
    first_seen = NOW.timestamp()
    late = (NOW + AGE_HEADROOM - timedelta(minutes=1)).timestamp()
    count = 0
    for tx in generate(config):
        message = transaction_to_proto(tx, id_prefix="r0")
        validate_transaction(message, LIMITS, first_seen)
        validate_transaction(message, LIMITS, late)
        count += 1
    assert count > 1000


@pytest.mark.parametrize("clock_time", ["00:00:01", "12:00:00", "23:59:59"])
def test_default_retention_allows_28_days_at_any_time_of_day(clock_time: str) -> None:
    now = datetime.fromisoformat(f"2026-03-18T{clock_time}+00:00")
    assert max_replay_days(now, INGEST) == 28
    check_publishable(replay_start(now, 28), 28, now, INGEST)
    with pytest.raises(ConfigError, match="INGEST_MAX_AGE_S"):
        check_publishable(replay_start(now, 29), 29, now, INGEST)


def test_a_shorter_retention_shortens_the_window() -> None:
    ingest = dataclasses.replace(INGEST, max_age_s=7 * 86400)
    assert max_replay_days(NOW, ingest) == 5
    assert max_replay_days(NOW, dataclasses.replace(INGEST, max_age_s=3600)) == 0


def test_windows_reaching_into_the_future_are_refused() -> None:
    today = datetime(2026, 3, 18, tzinfo=UTC)
    with pytest.raises(ConfigError, match="INGEST_MAX_FUTURE_SKEW_S"):
        check_publishable(today, 1, NOW, INGEST)
    check_publishable(today - timedelta(days=1), 1, NOW, INGEST)


# --- pacing arithmetic ------------------------------------------------------------------------


def test_bucket_starts_empty_and_fills_at_the_rate() -> None:
    bucket = TokenBucket.starting_at(100.0, now=10.0)
    assert bucket.capacity == 10.0  # a tenth of a second of catch-up
    assert bucket.available(10.0) == 0
    assert bucket.available(10.05) == 5
    assert bucket.wait_s(1, 10.05) == 0.0


def test_bucket_caps_the_catch_up_after_a_stall() -> None:
    bucket = TokenBucket.starting_at(100.0, now=0.0)
    assert bucket.available(60.0) == 10
    bucket.take(10, 60.0)
    assert bucket.available(60.0) == 0
    assert bucket.wait_s(1, 60.0) == pytest.approx(0.01)
    assert bucket.wait_s(3, 60.0) == pytest.approx(0.03)
    assert bucket.available(60.025) == 2


def test_bucket_at_low_rates_still_holds_one_token() -> None:
    bucket = TokenBucket.starting_at(2.0, now=0.0)
    assert bucket.capacity == 1.0
    assert bucket.available(0.4) == 0
    assert bucket.wait_s(1, 0.4) == pytest.approx(0.1)
    assert bucket.available(100.0) == 1


def test_bucket_ignores_a_clock_reading_from_the_past() -> None:
    bucket = TokenBucket.starting_at(100.0, now=5.0)
    assert bucket.available(5.05) == 5
    assert bucket.available(5.0) == 5


@pytest.mark.parametrize("rate", [0.0, -1.0, float("nan"), float("inf")])
def test_bucket_rejects_nonsense_rates(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        TokenBucket.starting_at(rate, now=0.0)


# --- the publishing loop ----------------------------------------------------------------------


async def test_publishes_every_transaction_and_the_labels_due_by_now() -> None:
    config = _config(4)
    transactions = list(generate(config))
    sink = ListSink()
    stats = await publish_stream(
        sink, stream_items(config), TOPICS, rate=None, wall_clock=lambda: NOW
    )
    raw, labels = sink.on(TOPICS.raw), sink.on(TOPICS.labels)
    assert len(raw) == len(transactions) == stats.transactions
    assert [transaction_pb2.Transaction.FromString(r.value).transaction_id for r in raw] == [
        tx.transaction_id for tx in transactions
    ]
    assert all(r.key == tx.account_id.encode() for r, tx in zip(raw, transactions, strict=True))
    # Exactly the labels whose report time (event time + 1 day) has passed by NOW.
    due = [tx for tx in transactions if tx.event_time + config.label_delay <= NOW]
    assert 0 < len(due) < len(transactions)
    decoded = [transaction_pb2.Label.FromString(r.value) for r in labels]
    assert [label.transaction_id for label in decoded] == [tx.transaction_id for tx in due]
    assert [label.is_fraud for label in decoded] == [tx.is_fraud for tx in due]
    assert stats.labels == len(due)
    assert stats.labels_pending == len(transactions) - len(due)
    assert stats.stopped_by == "end"
    assert stats.simulated_time == transactions[-1].event_time
    assert sink.flushes == 1


async def test_a_label_never_precedes_its_report_time_on_the_replay_clock() -> None:
    config = _config(4)
    sink = ListSink()
    await publish_stream(sink, stream_items(config), TOPICS, rate=None, wall_clock=lambda: NOW)
    clock: datetime | None = None  # event time of the latest transaction sent
    for record in sink.records:
        if record.topic == TOPICS.raw:
            message = transaction_pb2.Transaction.FromString(record.value)
            clock = message.event_time.ToDatetime(tzinfo=UTC)
        else:
            reported = transaction_pb2.Label.FromString(record.value).reported_at
            assert clock is not None
            assert reported.ToDatetime(tzinfo=UTC) <= max(clock, NOW)


async def test_max_transactions_stops_before_the_next_transaction() -> None:
    # With no delay each label is due at once and goes right after its transaction.
    config = _config(2, label_delay=timedelta(0))
    sink = ListSink()
    stats = await publish_stream(
        sink, stream_items(config), TOPICS, rate=None, max_transactions=25, wall_clock=lambda: NOW
    )
    assert stats.transactions == 25 and stats.labels == 25 and stats.labels_pending == 0
    assert stats.stopped_by == "max_transactions"
    assert [r.topic for r in sink.records[:4]] == [TOPICS.raw, TOPICS.labels] * 2


async def test_without_labels_only_transactions_go() -> None:
    config = _config(1)
    sink = ListSink()
    stats = await publish_stream(
        sink,
        stream_items(config, include_labels=False),
        TOPICS,
        rate=None,
        include_labels=False,
        wall_clock=lambda: NOW,
    )
    assert stats.labels == 0 and stats.labels_pending == 0
    assert {r.topic for r in sink.records} == {TOPICS.raw}


async def test_a_set_stop_event_publishes_nothing_and_still_flushes() -> None:
    stop = asyncio.Event()
    stop.set()
    sink = ListSink()
    stats = await publish_stream(sink, stream_items(_config(1)), TOPICS, stop_event=stop)
    assert stats.transactions == 0 and stats.stopped_by == "stopped"
    assert sink.records == [] and sink.flushes == 1


async def test_json_share_is_reproducible() -> None:
    config = _config(1)

    async def json_ids(seed: int) -> list[bytes | None]:
        sink = ListSink()
        stats = await publish_stream(
            sink,
            stream_items(config, include_labels=False),
            TOPICS,
            rate=None,
            json_share=0.3,
            json_seed=seed,
        )
        chosen = [r.key for r in sink.records if r.headers[0][1] == b"application/json"]
        assert stats.json_transactions == len(chosen)
        assert 0.2 * stats.transactions < len(chosen) < 0.4 * stats.transactions
        for record in sink.records:
            content_type = record.headers[0][1].decode()
            decode_transaction(record.value, content_type)
        return chosen

    assert await json_ids(1) == await json_ids(1)


async def test_pacing_never_runs_ahead_of_the_bucket() -> None:
    clock = FakeClock(step=0.001)
    sink = ListSink(clock)
    rate = 200.0
    stats = await publish_stream(
        sink,
        stream_items(_config(1), include_labels=False),
        TOPICS,
        rate=rate,
        max_transactions=60,
        clock=clock,
    )
    assert stats.transactions == 60
    start = sink.sent_at[0] - 1.0 / rate  # not earlier than one token after the start
    capacity = max(1.0, rate * 0.1)
    for sent, at in enumerate(sink.sent_at, 1):
        assert sent <= rate * (at - start) + capacity


async def test_duration_bounds_the_run() -> None:
    clock = FakeClock(step=0.01)
    sink = ListSink()
    stats = await publish_stream(
        sink,
        stream_items(_config(2), include_labels=False),
        TOPICS,
        rate=None,
        duration_s=1.0,
        clock=clock,
    )
    assert stats.stopped_by == "duration"
    assert 0 < stats.transactions < 200


async def test_progress_is_reported_on_the_interval() -> None:
    clock = FakeClock(step=0.01)
    reports: list[PublishStats] = []
    await publish_stream(
        ListSink(),
        stream_items(_config(1), include_labels=False),
        TOPICS,
        rate=None,
        max_transactions=300,
        progress_callback=reports.append,
        progress_interval_s=0.5,
        clock=clock,
    )
    assert len(reports) >= 3
    counts = [r.transactions for r in reports]
    assert counts == sorted(counts) and counts[-1] <= 300
    assert all(r.simulated_time is not None for r in reports[1:])


@pytest.mark.parametrize(
    "options",
    [
        {"rate": 0.0},
        {"rate": -5.0},
        {"max_transactions": -1},
        {"duration_s": 0.0},
        {"json_share": 1.5},
        {"id_prefix": "has space"},
        {"id_prefix": "x" * 25},
    ],
)
async def test_bad_options_are_refused_before_anything_is_sent(options: dict[str, object]) -> None:
    sink = ListSink()
    with pytest.raises(ConfigError):
        await publish_stream(sink, stream_items(_config(1)), TOPICS, **options)  # type: ignore[arg-type]
    assert sink.records == []


# --- the command ------------------------------------------------------------------------------


def test_output_writes_a_retimed_file_with_ground_truth(tmp_path: Path) -> None:
    path = tmp_path / "sim.jsonl"
    code = cli_main(
        [
            "simulate",
            "--output",
            str(path),
            "--days",
            "3",
            "--customers",
            "80",
            "--terminals",
            "200",
            "--max-transactions",
            "150",
        ]
    )
    assert code == 0
    written = list(read_jsonl(path))
    assert len(written) == 150
    assert all(isinstance(tx.is_fraud, bool) for tx in written)
    # The last three complete days before now: nothing in the future, nothing too old for ingest.
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    assert all(today - timedelta(days=3) <= tx.event_time < today for tx in written)


def test_output_with_an_explicit_start_and_the_handbook_world(tmp_path: Path) -> None:
    path = tmp_path / "handbook.jsonl"
    args = ["simulate", "--output", str(path), "--start", "2018-04-01", "--days", "2"]
    assert cli_main([*args, "--handbook", "--customers", "50", "--terminals", "100"]) == 0
    written = list(read_jsonl(path))
    assert written and all(tx.channel == CHANNEL_CARD_PRESENT for tx in written)
    assert written[0].event_time.date().isoformat() == "2018-04-01"


def test_run_id_does_not_apply_to_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli_main(["simulate", "--output", str(tmp_path / "x.jsonl"), "--run-id", "r1"])
    assert code == 2
    assert "--run-id" in capsys.readouterr().err


def test_a_window_ingest_would_reject_is_refused_with_a_clear_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Refused before connecting to Kafka: no broker is needed for this test.
    code = cli_main(["simulate", "--days", "40", "--customers", "10", "--terminals", "20"])
    assert code == 2
    assert "INGEST_MAX_AGE_S" in capsys.readouterr().err


def test_progress_lines_and_summary() -> None:
    out = io.StringIO()
    printer = ProgressPrinter(out)
    moment = datetime(2026, 3, 1, 12, 5, tzinfo=UTC)
    printer(PublishStats(transactions=1000, labels=10, elapsed_s=2.0, simulated_time=moment))
    printer(PublishStats(transactions=1900, labels=30, elapsed_s=4.0, simulated_time=moment))
    lines = out.getvalue().splitlines()
    assert lines[0] == (
        "simulate: 1,000 transactions (500/s), 10 labels, simulated time 2026-03-01 12:05 UTC"
    )
    assert "(450/s)" in lines[1]
    final = PublishStats(
        transactions=5000, labels=1000, elapsed_s=10.0, simulated_time=moment, stopped_by="end"
    )
    text = summary(final)
    assert "end of the simulation" in text and "500 tx/s" in text
    assert "4,000 labels not yet due" in text
