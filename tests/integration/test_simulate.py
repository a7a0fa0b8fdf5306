"""`publish_simulation` against the real broker: what goes out is what ingest and scoring read."""

from __future__ import annotations

import asyncio
import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from protos.fraud.v1 import transaction_pb2
from shared.codecs import decode_transaction
from shared.config import Settings
from shared.simulation import SimulationConfig
from shared.simulation.publisher import PublishStats, publish_simulation
from shared.validation import ValidationLimits, validate_transaction
from tests.kafka_helpers import consume_committed

# A small world: 300 transactions are about a day of it.
SMALL = SimulationConfig(seed=11, n_customers=200, n_terminals=400, n_days=3)


def _header(headers: Sequence[tuple[str, bytes]] | None, name: str) -> str | None:
    for key, value in headers or ():
        if key == name:
            return bytes(value).decode()
    return None


async def test_transactions_and_labels_reach_their_topics_keyed_by_account(
    settings: Settings,
) -> None:
    # No label delay: every transaction's label is due at once, so all 300 follow.
    config = dataclasses.replace(SMALL, label_delay=timedelta(0))
    stats = await publish_simulation(
        settings, config, rate=None, max_transactions=300, json_share=0.2, id_prefix="it"
    )
    assert (stats.transactions, stats.labels) == (300, 300)
    assert stats.stopped_by == "max_transactions"

    raw = await consume_committed(settings, settings.topics.raw, expected=300)
    labels = await consume_committed(settings, settings.topics.labels, expected=300)
    assert len(raw) == 300
    assert len(labels) == 300

    limits = ValidationLimits.from_settings(settings.ingest)
    now = datetime.now(UTC).timestamp()
    partitions: dict[str, set[int]] = defaultdict(set)
    ids: set[str] = set()
    json_count = 0
    for record in raw:
        content_type = _header(record.headers, "content-type")
        json_count += content_type == "application/json"
        message = decode_transaction(record.value, content_type)
        validate_transaction(message, limits, now)  # ingest would accept every one
        assert record.key == message.account_id.encode()
        assert message.transaction_id.startswith("it-tx-")
        partitions[message.account_id].add(record.partition)
        ids.add(message.transaction_id)
    assert len(ids) == 300
    assert json_count == stats.json_transactions > 0
    # Keyed by account: one account's payments stay on one partition, in order.
    assert all(len(parts) == 1 for parts in partitions.values())

    label_ids = set()
    for record in labels:
        label = transaction_pb2.Label.FromString(record.value)
        assert record.key == label.account_id.encode()
        assert label.source == "simulator"
        label_ids.add(label.transaction_id)
    assert label_ids == ids


async def test_a_stop_flushes_what_was_sent_and_reports_it(settings: Settings) -> None:
    stop = asyncio.Event()
    reports: list[PublishStats] = []

    def progress(stats: PublishStats) -> None:
        reports.append(stats)
        if stats.transactions >= 100:
            stop.set()

    stats = await asyncio.wait_for(
        publish_simulation(
            settings,
            SMALL,
            rate=2000.0,
            stop_event=stop,
            progress_callback=progress,
            progress_interval_s=0.05,
            include_labels=False,
        ),
        timeout=60,
    )
    assert stats.stopped_by == "stopped"
    assert 100 <= stats.transactions < 5000
    assert reports
    raw = await consume_committed(settings, settings.topics.raw, expected=stats.transactions)
    assert len(raw) == stats.transactions
    assert await consume_committed(settings, settings.topics.labels, expected=0, timeout_s=2) == []
