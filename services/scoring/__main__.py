"""`python -m services.scoring`: wire settings, logging, metrics, clients and the two loops.

Behaviour lives elsewhere: `service.py` (the batch transform), `labels.py` (the labels loop),
`shared.scoring.engine` (features, rules, model, decision), `shared.scoring.velocity` and
`shared.scoring.assessments` (Redis). This module loads the rules and model (a broken file or a
model whose features do not match refuses to start, with the reason), connects with retries,
runs the exactly-once loop on transactions.valid and the labels loop side by side until
SIGTERM/SIGINT (or a test's stop condition), and closes everything in reverse.

Redis Cluster: `REDIS_CALL_MODE` is "batch" (one script call per batch, spanning hash slots:
the fast path, single Redis only); set it to "slot" to group calls by slot for Redis Cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry

from services.scoring.labels import LabelMetrics, LabelProcessor, LabelStats, run_label_loop
from services.scoring.service import (
    SERVICE_NAME,
    SERVICE_VERSION,
    BatchOutcome,
    ScoringMetrics,
    ScoringService,
)
from shared.config import Settings, load_settings
from shared.errors import ConfigError, ModelFileError, RulesFileError
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
from shared.redis_packing import OrderedConnection, use_hiredis_packing
from shared.scoring.assessments import AssessmentStore
from shared.scoring.engine import ScoringEngine
from shared.scoring.features import FEATURE_NAMES
from shared.scoring.velocity import VelocityStore, zset_encoding_advice

__all__ = ["REDIS_CALL_MODE", "ScoringRun", "build_parser", "main", "run_scoring"]

log = get_logger(__name__)

T = TypeVar("T")

# "batch": one Lua call per batch for velocity and one for assessments (single Redis); "slot":
# one call per hash slot, which Redis Cluster requires. See shared/scoring/velocity.py.
REDIS_CALL_MODE: Final = "batch"


@dataclass(frozen=True)
class ScoringRun:
    """What a run committed: the scoring loop's batches, its outcome totals, the labels."""

    batches: BatchStats
    totals: BatchOutcome
    labels: LabelStats | None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.scoring",
        description=(
            "fraudstream scoring: consume transactions.valid, update per-account velocity in "
            "Redis, score every transaction with the rules file and the model artifact, and "
            "publish ScoredTransactions (score, decision, ranked reasons) to risk.scores exactly "
            "once; keep the latest assessment per account in Redis for the query service; "
            "consume risk.labels into terminal-risk features and live precision/recall."
        ),
        epilog=(
            "Configuration comes from environment variables (SCORING_*, KAFKA_*, REDIS_URL, "
            "TOPIC_*, METRICS_PORT, ...; see the README). The rules file and model artifact "
            "are reloaded when they change; a broken file is rejected, counted and logged, "
            "and the old one stays in force. SIGTERM finishes the batch in hand, commits it "
            "and exits."
        ),
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="load the configuration, rules and model, print their versions, and exit",
    )
    add_run_options(parser)
    parser.add_argument(
        "--no-labels", action="store_true", help="do not consume risk.labels in this process"
    )
    return parser


async def run_scoring(
    settings: Settings,
    *,
    max_batches: int | None = None,
    max_records: int | None = None,
    max_seconds: float | None = None,
    startup_timeout_s: float = 300.0,
    create_topics: bool = True,
    labels: bool = True,
    handle_signals: bool = True,
    registry: CollectorRegistry = REGISTRY,
    stop: asyncio.Event | None = None,
) -> ScoringRun:
    """Run scoring until a signal, `stop`, or a stop condition; return what was committed.

    Raises `RulesError` / `ModelError` before connecting anything when the rules or the model
    cannot be used (including a model trained on other features)."""
    engine = ScoringEngine.from_settings(settings.scoring)
    deadline = time.monotonic() + startup_timeout_s
    async with ServiceLifecycle(SERVICE_NAME, handle_signals=handle_signals) as life:
        own_stop = life.stop_event
        if stop is not None:
            relay = asyncio.create_task(_relay(stop, own_stop))
            life.on_close("stop-relay", lambda: _cancel_task(relay))
        if max_seconds is not None:
            timer = asyncio.get_running_loop().call_later(max_seconds, own_stop.set)
            life.on_close("timer", lambda: _cancel_timer(timer))

        # Scoring's Lua calls carry thousands of arguments per batch: pack them with hiredis.
        redis = use_hiredis_packing(make_redis(settings))
        life.on_close("redis", redis.aclose)
        # One ordered connection for a batch's velocity call and its assessment write: the
        # next batch's call queues behind this one's, and the writes run between them.
        ordered = OrderedConnection(redis)
        life.on_close("redis-ordered", ordered.aclose)
        velocity = VelocityStore.from_settings(
            redis, settings, call_mode=REDIS_CALL_MODE, ordered=ordered
        )
        assessments = AssessmentStore.from_settings(
            redis, settings, call_mode=REDIS_CALL_MODE, ordered=ordered
        )
        await retry_until_ready("redis", velocity.load_scripts, own_stop, deadline)
        await retry_until_ready("redis", assessments.load_scripts, own_stop, deadline)
        advice = await zset_encoding_advice(redis)
        if advice is not None:
            log.warning("redis_config_advice", advice=advice)

        topics = settings.topics
        if create_topics:
            await retry_until_ready(
                "kafka",
                lambda: ensure_topics(
                    settings, [topics.valid, topics.dlq, topics.scores, topics.labels]
                ),
                own_stop,
                deadline,
            )
        scoring = settings.scoring
        group_id = scoring.group_id
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
            max_poll_records=scoring.batch_max,
        )
        await retry_until_ready("kafka", consumer.start, own_stop, deadline)
        life.on_close("consumer", consumer.stop)
        batch_gate = subscribe_exactly_once(consumer, [topics.valid])

        label_task: asyncio.Task[LabelStats] | None = None
        if labels:
            # Its own group: labels are consumed at least once and committed after applying.
            label_consumer = make_consumer(
                settings,
                topics.labels,
                group_id=f"{group_id}-labels",
                client_id=f"{SERVICE_NAME}-labels-{settings.instance_id}",
            )
            await retry_until_ready("kafka", label_consumer.start, own_stop, deadline)
            life.on_close("label-consumer", label_consumer.stop)
            label_task = asyncio.create_task(
                run_label_loop(
                    consumer=label_consumer,
                    processor=LabelProcessor(velocity=velocity, assessments=assessments),
                    stop=own_stop,
                    metrics=LabelMetrics(registry),
                )
            )
            # A labels loop that dies (a bug, not a dependency outage: those are retried)
            # stops the service rather than leaving terminal risk silently frozen.
            label_task.add_done_callback(lambda _: own_stop.set())
            life.on_close("labels-loop", lambda: _cancel_task(label_task))

        service = ScoringService(
            topics=topics,
            engine=engine,
            velocity=velocity,
            assessments=assessments,
            metrics=ScoringMetrics(registry),
        )
        committed = 0

        def on_batch(records_in: int, records_out: int, seconds: float) -> None:
            nonlocal committed
            service.on_batch_committed(records_in, records_out, seconds)
            committed += records_in
            if max_records is not None and committed >= max_records:
                own_stop.set()

        versions = engine.versions
        log.info(
            "scoring_started",
            version=SERVICE_VERSION,
            source=topics.valid,
            scores=topics.scores,
            labels=topics.labels if labels else None,
            group_id=group_id,
            transactional_id=tx_id,
            rules_version=versions.rules,
            model_version=versions.model,
            redis_call_mode=REDIS_CALL_MODE,
        )
        stats = await run_exactly_once(
            consumer=consumer,
            producer=producer,
            group_id=group_id,
            transform=service.stages,
            stop=own_stop,
            batch_gate=batch_gate,
            max_records=scoring.batch_max,
            max_batches=max_batches,
            on_batch=on_batch,
            on_discard=service.on_batches_discarded,
            # The next batch's velocity call runs in Redis while this process scores, encodes
            # and commits the previous ones: a serial loop leaves each side idle in turn.
            pipeline_depth=scoring.pipeline_depth,
        )
        own_stop.set()
        label_stats: LabelStats | None = None
        if label_task is not None:
            # The loop checks `stop` between batches; a failure of it is re-raised here.
            label_stats = await label_task
        totals = service.totals
        log.info(
            "scoring_finished",
            batches=stats.batches,
            records=stats.records_in,
            scored=dict(totals.scored),
            rejected=sum(totals.rejected.values()),
            retries=stats.retries,
            labels=label_stats.labels if label_stats else 0,
        )
        return ScoringRun(batches=stats, totals=totals, labels=label_stats)


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _cancel_task(task: asyncio.Task[T]) -> None:
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _cancel_timer(timer: asyncio.TimerHandle) -> None:
    timer.cancel()


def _check_config(settings: Settings) -> int:
    engine = ScoringEngine.from_settings(settings.scoring)
    model = engine.model
    print(f"rules: {settings.scoring.rules_path} version {engine.rules.version}")
    for rule in engine.rules.rules:
        print(f"  {rule.mode.value:6} {rule.action.value:11} {rule.name}: {rule.expression}")
    print(f"model: {settings.scoring.model_path} version {model.version}")
    print(f"  trained_at {model.trained_at}, {len(FEATURE_NAMES)} features")
    for name, value in sorted(model.training_metrics.items()):
        print(f"  {name} = {value:.6g}")
    print(
        f"thresholds: review >= {engine.thresholds.review}, decline >= {engine.thresholds.decline}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.check_config:
            return _check_config(settings)
    except (ConfigError, RulesFileError, ModelFileError) as e:
        print(f"scoring: cannot start: {e}", file=sys.stderr)
        return 2
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    tune_gc_for_batches()
    serve_metrics(SERVICE_NAME, settings.metrics_port)
    return run_batch_service(
        SERVICE_NAME,
        run_scoring(
            settings,
            max_batches=args.max_batches,
            max_records=args.max_records,
            max_seconds=args.max_seconds,
            startup_timeout_s=args.startup_timeout,
            create_topics=not args.no_create_topics,
            labels=not args.no_labels,
        ),
        cannot_start=(ConfigError, RulesFileError, ModelFileError),
    )


if __name__ == "__main__":
    sys.exit(main())
