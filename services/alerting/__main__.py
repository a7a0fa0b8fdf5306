"""`python -m services.alerting`: wire settings, logging, metrics, clients and the batch loop.

Behaviour lives elsewhere: `policy.py` (which scores alert, at what severity), `service.py` (the
batch transform), `webhook.py` (the optional HTTP sink) and `shared.alert_store` (Redis). This
module builds them from the environment, starts them in order, runs the exactly-once loop until
SIGTERM/SIGINT (or a test's stop condition), drains the webhook for a bounded time, and closes
the clients in reverse.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from typing import TypeVar

from services.alerting.policy import parse_policy
from services.alerting.service import AlertingStats, AlertTransform
from services.alerting.webhook import WebhookSink, WebhookTarget
from shared.alert_store import AlertStore
from shared.config import Settings, load_settings
from shared.errors import ConfigError
from shared.kafka import (
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

__all__ = ["BATCH_MAX", "build_parser", "main", "run_alerting"]

log = get_logger(__name__)

SERVICE_NAME = "alerting"
BATCH_MAX = 500  # score records per batch: one Redis round trip pair, one Kafka transaction

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.alerting",
        description=(
            "fraudstream alerting: consume risk.scores, raise alerts by the ALERT_POLICY "
            "(decisions and score bands -> severity), suppress repeats per (account, reason) "
            "within ALERT_SUPPRESSION_WINDOW_S, publish Alerts to risk.alerts exactly once, keep "
            "recent alerts and the alert stream in Redis for the query service, and POST each "
            "alert to ALERT_WEBHOOK_URL when set."
        ),
        epilog=(
            "Configuration comes from environment variables (ALERT_*, ALERTING_GROUP_ID, "
            "KAFKA_*, REDIS_URL, TOPIC_*, METRICS_PORT; see the README). SIGTERM finishes the "
            "batch in hand, commits it, drains the webhook queue for --drain-timeout seconds "
            "and exits."
        ),
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="parse the configuration and the alert policy, print the policy, and exit",
    )
    add_run_options(parser)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="at shutdown, wait at most S seconds for queued webhook deliveries (default 5)",
    )
    return parser


async def run_alerting(
    settings: Settings,
    *,
    max_batches: int | None = None,
    max_records: int | None = None,
    max_seconds: float | None = None,
    drain_timeout_s: float = 5.0,
    startup_timeout_s: float = 300.0,
    create_topics: bool = True,
    handle_signals: bool = True,
    stop: asyncio.Event | None = None,
) -> AlertingStats:
    """Run alerting until a signal, `stop`, or a stop condition; return the committed totals."""
    # Configuration errors surface before anything connects.
    policy = parse_policy(settings.alerting.policy)
    alerting = settings.alerting
    webhook = (
        WebhookSink(
            alerting.webhook_url,
            timeout_s=alerting.webhook_timeout_s,
            queue_max=alerting.webhook_queue_max,
        )
        if alerting.webhook_url
        else None
    )
    deadline = time.monotonic() + startup_timeout_s
    async with ServiceLifecycle(SERVICE_NAME, handle_signals=handle_signals) as life:
        own_stop = life.stop_event
        if stop is not None:
            relay = asyncio.create_task(_relay(stop, own_stop))
            life.on_close("stop-relay", lambda: _cancel_task(relay))
        if max_seconds is not None:
            timer = asyncio.get_running_loop().call_later(max_seconds, own_stop.set)
            life.on_close("timer", lambda: _cancel_timer(timer))

        redis = make_redis(settings)
        life.on_close("redis", redis.aclose)
        store = AlertStore.from_settings(redis, settings)
        await retry_until_ready("redis", store.load_scripts, own_stop, deadline)

        topics = settings.topics
        if create_topics:
            await retry_until_ready(
                "kafka",
                lambda: ensure_topics(settings, [topics.scores, topics.alerts]),
                own_stop,
                deadline,
            )
        group_id = alerting.group_id
        tx_id = transactional_id(group_id, settings.instance_id)
        # The producer first: starting it fences a predecessor with our transactional id and
        # aborts its open transaction before we read anything.
        producer = make_transactional_producer(settings, tx_id)
        await retry_until_ready("kafka", producer.start, own_stop, deadline)
        life.on_close("producer", producer.stop)
        consumer = make_consumer(
            settings,
            group_id=group_id,
            client_id=f"{SERVICE_NAME}-{settings.instance_id}",
            max_poll_records=BATCH_MAX,
        )
        await retry_until_ready("kafka", consumer.start, own_stop, deadline)
        life.on_close("consumer", consumer.stop)
        batch_gate = subscribe_exactly_once(consumer, [topics.scores])

        transform = AlertTransform(
            policy=policy, store=store, alerts_topic=topics.alerts, webhook=webhook
        )
        committed = 0

        def on_batch(records_in: int, records_out: int, seconds: float) -> None:
            nonlocal committed
            transform.on_batch(records_in, records_out, seconds)
            committed += records_in
            if max_records is not None and committed >= max_records:
                own_stop.set()

        if webhook is not None:
            webhook.start()
        log.info(
            "alerting_started",
            source=topics.scores,
            alerts=topics.alerts,
            group_id=group_id,
            transactional_id=tx_id,
            policy=policy.describe(),
            suppression_window_s=alerting.suppression_window_s,
            webhook=bool(webhook),
        )
        try:
            batches = await run_exactly_once(
                consumer=consumer,
                producer=producer,
                group_id=group_id,
                transform=transform,
                stop=own_stop,
                batch_gate=batch_gate,
                max_records=BATCH_MAX,
                max_batches=max_batches,
                on_batch=on_batch,
            )
        finally:
            # Committed alerts still queued for the webhook get a bounded chance to go out;
            # close() logs and counts what is left (those alerts are safe on risk.alerts).
            if webhook is not None:
                await webhook.close(drain_timeout_s)
        stats = transform.stats
        log.info(
            "alerting_finished",
            batches=batches.batches,
            scores=stats.scores,
            alerts=stats.alerts,
            suppressed=stats.suppressed,
            malformed=stats.malformed,
            duplicates=stats.duplicates,
            retries=batches.retries,
        )
        return stats


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _cancel_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _cancel_timer(timer: asyncio.TimerHandle) -> None:
    timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        policy = parse_policy(settings.alerting.policy)
        if settings.alerting.webhook_url:
            WebhookTarget.parse(settings.alerting.webhook_url)
    except ConfigError as e:
        print(f"alerting: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        print(f"ALERT_POLICY: {policy.describe()}")
        print(f"suppression window: {settings.alerting.suppression_window_s} s")
        print(f"webhook: {settings.alerting.webhook_url or 'off'}")
        return 0
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    tune_gc_for_batches()
    serve_metrics(SERVICE_NAME, settings.metrics_port)
    return run_batch_service(
        SERVICE_NAME,
        run_alerting(
            settings,
            max_batches=args.max_batches,
            max_records=args.max_records,
            max_seconds=args.max_seconds,
            drain_timeout_s=args.drain_timeout,
            startup_timeout_s=args.startup_timeout,
            create_topics=not args.no_create_topics,
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
