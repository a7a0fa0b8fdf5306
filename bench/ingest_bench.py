"""Ingest throughput against a no-op consume-produce passthrough, in the same run.

    python -m bench.ingest_bench [--count 50000] [--rounds 3] [--batch 500] [--max-seconds 120]

Both legs read the same prefilled `transactions.raw` copy (each with a fresh consumer group)
with the same client settings (`make_consumer`, `make_transactional_producer`) through the same
exactly-once loop (`run_exactly_once`: one Kafka transaction per batch):

  * passthrough: forwards every record's key and value unchanged (the Kafka floor);
  * ingest: the real `IngestService.transform` (decode, validate, one Redis round trip for dedup,
    serialize).

Throughput is records over the time from the first batch's start to the last batch's commit, so
the consumer-group join is not counted for either. Legs alternate (passthrough, ingest, ...) and
medians are reported (the ratio is the median of each round's ratio): what the ingest logic
costs on top of Kafka. This process's CPU per transaction is printed too: on a shared machine
it is steadier than wall-clock throughput.
Target: ingest >= 50% of passthrough. Everything is bounded by `--count` and `--max-seconds`;
the benchmark's topics and Redis keys are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from bench.legs import (
    LegResult,
    delete_keys,
    delete_topics,
    passthrough_transform,
    run_leg,
)
from protos.fraud.v1 import transaction_pb2
from services.ingest.dedup import Deduplicator
from services.ingest.service import IngestMetrics, IngestService
from shared.config import Settings, TopicSettings, load_settings
from shared.infra import ensure_infra
from shared.kafka import (
    ensure_topics,
    make_producer,
)
from shared.lifecycle import tune_gc_for_batches
from shared.logging import configure_logging
from shared.redis_client import make_redis
from shared.validation import ValidationLimits

__all__ = ["BenchResult", "main", "run_bench"]

ACCOUNTS = 1000


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


@dataclass(frozen=True)
class BenchResult:
    """Rounds of (passthrough, ingest), run back to back. Medians, because single rounds on a
    shared 2-core machine (the broker and Redis run on it too) swing by a third."""

    count: int
    partitions: int
    batch: int
    rounds: list[tuple[LegResult, LegResult]]

    @property
    def passthrough_rate(self) -> float:
        return _median([p.rate for p, _ in self.rounds])

    @property
    def ingest_rate(self) -> float:
        return _median([i.rate for _, i in self.rounds])

    @property
    def ratio(self) -> float:
        """Median of each round's ingest/passthrough: neighbours share the machine's mood."""
        return _median([i.rate / p.rate if p.rate else 0.0 for p, i in self.rounds])

    def report(self) -> str:
        cpu_p = _median([p.cpu_us_per_record for p, _ in self.rounds])
        cpu_i = _median([i.cpu_us_per_record for _, i in self.rounds])
        return "\n".join(
            [
                f"ingest benchmark: {self.count} transactions x {len(self.rounds)} rounds, "
                f"{self.partitions} partitions, batch {self.batch}, {os.cpu_count()} CPUs",
                f"  passthrough  {self.passthrough_rate:10.0f} tx/s   {cpu_p:6.1f} us CPU/tx",
                f"  ingest       {self.ingest_rate:10.0f} tx/s   {cpu_i:6.1f} us CPU/tx",
                f"  ratio        {self.ratio:10.2f}   (target >= 0.50: "
                f"{'met' if self.ratio >= 0.5 else 'NOT met'})",
            ]
        )


def _transaction(index: int, now: int) -> bytes:
    tx = transaction_pb2.Transaction(
        transaction_id=f"bench-{index}",
        account_id=f"acct-{index % ACCOUNTS}",
        card_id=f"card-tok-{index % ACCOUNTS}",
        merchant_id=f"m-{index % 97}",
        merchant_category="5411",
        terminal_id=f"t-{index % 211}",
        amount=transaction_pb2.Money(units=100 + index % 50_000, currency="EUR"),
        country="NL",
        latitude=52.37,
        longitude=4.89,
        channel=transaction_pb2.CHANNEL_CARD_PRESENT,
        device_id=f"dev-{index % ACCOUNTS}",
        ip_address="192.0.2.1",
    )
    tx.event_time.FromSeconds(now - 60)
    return tx.SerializeToString()


async def _prefill(settings: Settings, count: int) -> None:
    producer = make_producer(settings, client_id="bench-prefill", linger_ms=20)
    await producer.start()
    try:
        now = int(time.time())
        pending = []
        for i in range(count):
            account = f"acct-{i % ACCOUNTS}".encode()
            pending.append(
                await producer.send(settings.topics.raw, _transaction(i, now), key=account)
            )
            if len(pending) >= 5000:  # bounded memory of in-flight futures
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def run_bench(
    *, count: int = 50_000, rounds: int = 3, batch: int = 500, max_seconds: float = 120.0
) -> BenchResult:
    infra = ensure_infra()
    try:
        suffix = uuid.uuid4().hex[:8]
        base = load_settings(
            {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap,
                "REDIS_URL": infra.redis_url,
                "INGEST_DEDUP_WINDOW_S": "900",  # bench keys expire on their own, too
                "INGEST_BATCH_MAX": str(batch),
            }
        )
        settings = dataclasses.replace(
            base,
            topics=TopicSettings(*(f"bench.{name}.{suffix}" for name in TopicSettings().all())),
        )
        passthrough_topic = f"bench.passthrough.{suffix}"
        await ensure_topics(settings, [*settings.topics.all(), passthrough_topic])
        try:
            await _prefill(settings, count)
            rounds_run: list[tuple[LegResult, LegResult]] = []
            redis = make_redis(settings)
            prefixes: list[str] = []
            try:
                for round_number in range(rounds):
                    prefix = f"bench{suffix}r{round_number}"
                    prefixes.append(prefix)
                    service = IngestService(
                        topics=settings.topics,
                        limits=ValidationLimits.from_settings(settings.ingest),
                        dedup=Deduplicator(
                            redis, prefix=prefix, window_s=settings.ingest.dedup_window_s
                        ),
                        metrics=IngestMetrics(CollectorRegistry()),
                    )
                    passthrough = await run_leg(
                        settings,
                        "passthrough",
                        passthrough_transform(passthrough_topic),
                        source_topic=settings.topics.raw,
                        count=count,
                        batch=batch,
                        max_seconds=max_seconds,
                    )
                    ingest = await run_leg(
                        settings,
                        "ingest",
                        service.transform,
                        source_topic=settings.topics.raw,
                        count=count,
                        batch=batch,
                        max_seconds=max_seconds,
                    )
                    rounds_run.append((passthrough, ingest))
                    print(
                        f"  round {round_number + 1}: passthrough {passthrough.rate:8.0f} tx/s, "
                        f"ingest {ingest.rate:8.0f} tx/s, "
                        f"ratio {ingest.rate / max(passthrough.rate, 1e-9):.2f}"
                    )
            finally:
                for prefix in prefixes:
                    await delete_keys(redis, prefix)
                await redis.aclose()
        finally:
            await delete_topics(settings, [*settings.topics.all(), passthrough_topic])
        return BenchResult(
            count=count,
            partitions=settings.kafka.topic_partitions,
            batch=batch,
            rounds=rounds_run,
        )
    finally:
        infra.stop_started()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.ingest_bench",
        description="Ingest tx/s against a no-op consume-produce passthrough (same run).",
    )
    parser.add_argument("--count", type=int, default=50_000, help="transactions per leg")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the median is reported"
    )
    parser.add_argument("--batch", type=int, default=500, help="records per batch/transaction")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time bound per leg")
    args = parser.parse_args(argv)
    configure_logging("bench", "WARNING", "console")
    tune_gc_for_batches()  # as the services run (both legs alike)
    result = asyncio.run(
        run_bench(
            count=args.count, rounds=args.rounds, batch=args.batch, max_seconds=args.max_seconds
        )
    )
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
