"""`python -m services.ingest`: wire settings, logging, metrics, clients and the batch loop.

Everything with behaviour lives in `service.py` (the transform) and `dedup.py` (Redis); this
module only builds the pieces from the environment, starts them in order, runs the exactly-once
loop until SIGTERM/SIGINT (or a test's stop condition), and closes them in reverse.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from typing import TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

from services.ingest.dedup import Deduplicator
from services.ingest.service import SERVICE_NAME, SERVICE_VERSION, IngestMetrics, IngestService
from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.kafka import (
    BatchStats,
    ensure_topics,
    make_consumer,
    make_transactional_producer,
    run_exactly_once,
    subscribe_exactly_once,
    transactional_id,
)
from shared.lifecycle import (
    ServiceLifecycle,
    add_run_options,
    retry_until_ready,
    run_batch_service,
    tune_gc_for_batches,
)
from shared.logging import configure_logging, get_logger
from shared.metrics import serve_metrics
from shared.redis_client import make_redis
from shared.validation import ValidationLimits

__all__ = ["build_parser", "main", "run_ingest"]

log = get_logger(__name__)

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.ingest",
        description=(
            "fraudstream ingest: consume transactions.raw (protobuf, or JSON), validate and "
            "normalize, drop producer retries, forward valid transactions as protobuf to "
            "transactions.valid and reject the rest to transactions.dlq, exactly once."
        ),
        epilog=(
            "Configuration comes from environment variables (KAFKA_*, REDIS_URL, TOPIC_*, "
            "INGEST_*, METRICS_PORT, ...; see the README). SIGTERM finishes the batch in hand, "
            "commits it and exits."
        ),
    )
    add_run_options(parser)
    return parser


async def run_ingest(
    settings: Settings,
    *,
    max_batches: int | None = None,
    max_records: int | None = None,
    max_seconds: float | None = None,
    startup_timeout_s: float = 300.0,
    create_topics: bool = True,
    handle_signals: bool = True,
    registry: CollectorRegistry = REGISTRY,
) -> BatchStats:
    """Run ingest until a signal (or a stop condition); return what was committed."""
    deadline = time.monotonic() + startup_timeout_s
    async with ServiceLifecycle(SERVICE_NAME, handle_signals=handle_signals) as life:
        stop = life.stop_event
        if max_seconds is not None:
            timer = asyncio.get_running_loop().call_later(max_seconds, stop.set)
            life.on_close("timer", lambda: _cancel(timer))

        redis = make_redis(settings)
        life.on_close("redis", redis.aclose)
        dedup = Deduplicator(
            redis, prefix=settings.redis_key_prefix, window_s=settings.ingest.dedup_window_s
        )
        await retry_until_ready("redis", dedup.check_server, stop, deadline)

        topics = settings.topics
        if create_topics:
            await retry_until_ready(
                "kafka",
                lambda: ensure_topics(settings, [topics.raw, topics.valid, topics.dlq]),
                stop,
                deadline,
            )

        group_id = settings.ingest.group_id
        tx_id = transactional_id(group_id, settings.instance_id)
        # The producer first: starting it fences a predecessor with our transactional id and
        # aborts its open transaction before we read anything.
        producer = make_transactional_producer(settings, tx_id)
        await retry_until_ready("kafka", producer.start, stop, deadline)
        life.on_close("producer", producer.stop)
        consumer = make_consumer(
            settings,
            group_id=group_id,
            client_id=f"{SERVICE_NAME}-{settings.instance_id}",
            max_poll_records=settings.ingest.batch_max,
        )
        await retry_until_ready("kafka", consumer.start, stop, deadline)
        life.on_close("consumer", consumer.stop)
        batch_gate = subscribe_exactly_once(consumer, [topics.raw])

        service = IngestService(
            topics=topics,
            limits=ValidationLimits.from_settings(settings.ingest),
            dedup=dedup,
            metrics=IngestMetrics(registry),
        )
        committed = 0

        def on_batch(records_in: int, records_out: int, seconds: float) -> None:
            nonlocal committed
            service.on_batch_committed(records_in, records_out, seconds)
            committed += records_in
            if max_records is not None and committed >= max_records:
                stop.set()

        log.info(
            "ingest_started",
            version=SERVICE_VERSION,
            source=topics.raw,
            valid=topics.valid,
            dlq=topics.dlq,
            group_id=group_id,
            transactional_id=tx_id,
        )
        stats = await run_exactly_once(
            consumer=consumer,
            producer=producer,
            group_id=group_id,
            transform=service.transform,
            stop=stop,
            batch_gate=batch_gate,
            max_records=settings.ingest.batch_max,
            max_batches=max_batches,
            on_batch=on_batch,
        )
        log.info(
            "ingest_finished",
            batches=stats.batches,
            records=stats.records_in,
            accepted=service.totals.accepted,
            duplicates=service.totals.duplicates,
            rejected=sum(service.totals.rejected.values()),
            retries=stats.retries,
        )
        return stats


async def _cancel(timer: asyncio.TimerHandle) -> None:
    timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as e:
        print(f"ingest: configuration error: {e}", file=sys.stderr)
        return 2
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    tune_gc_for_batches()
    serve_metrics(SERVICE_NAME, settings.metrics_port)
    return run_batch_service(
        SERVICE_NAME,
        run_ingest(
            settings,
            max_batches=args.max_batches,
            max_records=args.max_records,
            max_seconds=args.max_seconds,
            startup_timeout_s=args.startup_timeout,
            create_topics=not args.no_create_topics,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
