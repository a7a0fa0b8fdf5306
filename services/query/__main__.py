"""`python -m services.query`: wire settings, logging, metrics, clients and the gRPC server.

Behaviour lives elsewhere: `servicer.py` (the RiskService), `auth.py` (bearer tokens),
`health.py` (standard health driven by a Redis ping), `shared.scoring` (the scoring engine and
the velocity store, shared with the scoring service) and `shared.alert_store`. This module
builds them from the environment and runs the server until SIGTERM/SIGINT:

  start:    rules and model are loaded (a broken file stops the start, like scoring); the server
            starts even while Redis or Kafka are away: health says NOT_SERVING until Redis
            answers, checks answer by the failure policy meanwhile, and the `record` producer
            connects in the background.
  SIGTERM:  health -> NOT_SERVING (load balancers stop sending), WatchAlerts streams end, then
            `server.stop(grace)` lets calls in flight finish for up to --grace seconds; then
            the clients close in reverse order.

Three Redis clients: a small blocking pool for the unary calls (concurrent checks are batched
into one round trip, see `servicer.CheckBatcher`, so a few connections go a long way), one for
WatchAlerts, whose blocking XREADs each hold a connection for up to a second and must never
starve the checks, and one connection for the health ping, so that a busy pool never reads as
Redis being down.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client import REGISTRY, CollectorRegistry

from protos.fraud.v1 import risk_service_pb2_grpc
from services.query.auth import BearerTokenInterceptor
from services.query.health import RISK_SERVICE, RedisHealthMonitor, make_health_servicer
from services.query.servicer import (
    FailurePolicy,
    QueryLimits,
    QueryMetrics,
    RiskServicer,
    TransactionRecorder,
)
from shared.alert_store import AlertStore
from shared.config import Settings, load_settings
from shared.errors import ConfigError, FraudstreamError
from shared.kafka import make_producer
from shared.lifecycle import ServiceLifecycle
from shared.logging import configure_logging, get_logger
from shared.metrics import serve_metrics
from shared.scoring.assessments import AssessmentStore
from shared.scoring.engine import ScoringEngine
from shared.scoring.velocity import VelocityStore
from shared.validation import ValidationLimits

__all__ = [
    "QueryServer",
    "build_parser",
    "main",
    "run_query",
    "settle_gc",
    "start_query_server",
]

log = get_logger(__name__)

SERVICE_NAME = "query"
# A call holds a connection for one round trip (well under a millisecond) and concurrent checks
# share one, so a few dozen cover thousands of checks per second; past that, calls wait for a
# connection within their own budget instead of piling connections onto Redis.
REDIS_POOL_SIZE = 32
RELOAD_INTERVAL_S = 2.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.query",
        description=(
            "fraudstream query: the gRPC RiskService (CheckTransaction, GetAccountRisk, "
            "ListAlerts, WatchAlerts) over the pipeline's Redis state, with standard gRPC "
            "health and reflection. CheckTransaction scores with the scoring service's own "
            "features, rules and model, read-only; with record=true it also publishes the "
            "transaction to transactions.raw. When Redis is slow or down, checks answer within "
            "the caller's deadline by QUERY_FAILURE_POLICY, marked degraded."
        ),
        epilog=(
            "Configuration comes from environment variables (QUERY_LISTEN, "
            "QUERY_FAILURE_POLICY, QUERY_REDIS_TIMEOUT_MS, QUERY_TLS_CERT/KEY, QUERY_AUTH_TOKENS, "
            "SCORING_RULES_PATH, SCORING_MODEL_PATH, SCORING_*_THRESHOLD, REDIS_URL, KAFKA_*, "
            "METRICS_PORT; see the README). SIGTERM sets health to NOT_SERVING, ends alert "
            "streams and lets calls in flight finish for --grace seconds."
        ),
    )
    parser.add_argument(
        "--check-config",
        action="store_true",
        help="parse the configuration, load the rules and model, print a summary, and exit",
    )
    parser.add_argument(
        "--grace",
        type=float,
        default=10.0,
        metavar="S",
        help="at shutdown, let calls in flight finish for up to S seconds (default 10)",
    )
    parser.add_argument(
        "--max-seconds", type=float, metavar="S", help="stop after S seconds, as on SIGTERM"
    )
    parser.add_argument(
        "--health-interval",
        type=float,
        default=1.0,
        metavar="S",
        help="ping Redis every S seconds for the health status (default 1)",
    )
    parser.add_argument(
        "--no-record",
        action="store_true",
        help="no Kafka producer: record=true checks answer with recorded=false",
    )
    return parser


def _redis_client(
    settings: Settings, max_connections: int, *, blocking: bool = False
) -> aioredis.Redis:
    """Like `shared.redis_client.make_redis`, with a bounded pool. `blocking`: when every
    connection is busy a command waits for one (bounded by the caller's own timeout) instead of
    failing at once with "Too many connections"."""
    options: dict[str, Any] = {
        "decode_responses": False,
        "socket_connect_timeout": 5.0,
        "socket_keepalive": True,
        "health_check_interval": 30,
        "max_connections": max_connections,
    }
    if blocking:
        pool = aioredis.BlockingConnectionPool.from_url(settings.redis_url, timeout=None, **options)
        return aioredis.Redis.from_pool(pool)
    client: aioredis.Redis = aioredis.Redis.from_url(settings.redis_url, **options)
    return client


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials from QUERY_TLS_CERT / QUERY_TLS_KEY (PEM files); None when unset."""
    query = settings.query
    if not query.tls_cert:
        return None
    try:
        cert = Path(query.tls_cert).read_bytes()
        key = Path(query.tls_key).read_bytes()
    except OSError as e:
        raise ConfigError(f"QUERY_TLS_CERT/QUERY_TLS_KEY cannot be read: {e}") from e
    return grpc.ssl_server_credentials([(key, cert)])


@dataclass
class QueryServer:
    """A started query server and everything it owns; `stop` shuts it down in order."""

    server: aio.Server
    port: int
    servicer: RiskServicer
    health: HealthServicer
    monitor: RedisHealthMonitor
    engine: ScoringEngine
    recorder: TransactionRecorder | None
    redis: aioredis.Redis
    watch_redis: aioredis.Redis
    health_redis: aioredis.Redis
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace_s: float) -> None:
        # Readiness first, so load balancers stop routing here while calls drain; streams
        # next, since they never end by themselves within the grace period.
        await self.health.enter_graceful_shutdown()
        self.servicer.shutdown()
        await self.server.stop(grace_s)
        await self.servicer.close()
        for task in self.tasks:
            task.cancel()
        for task in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.monitor.stop()
        if self.recorder is not None:
            await self.recorder.stop()
        for client in (self.health_redis, self.watch_redis, self.redis):
            await client.aclose()


async def _reload_loop(engine: ScoringEngine, interval_s: float) -> None:
    """Pick up changed rules and model files, as the scoring service does."""
    while True:
        await asyncio.sleep(interval_s)
        outcome = engine.maybe_reload()
        for kind, result in outcome.reloaded:
            log.info("reloaded", kind=kind, version=result.version)
        for kind, result in outcome.failed:
            log.error("reload_failed", kind=kind, version=result.version, error=str(result.error))


async def start_query_server(
    settings: Settings,
    *,
    listen: str | None = None,
    registry: CollectorRegistry = REGISTRY,
    engine: ScoringEngine | None = None,
    record: bool = True,
    health_interval_s: float = 1.0,
    reload_interval_s: float = RELOAD_INTERVAL_S,
) -> QueryServer:
    """Build and start the server inside the running loop; `listen` overrides QUERY_LISTEN
    (tests pass "127.0.0.1:0" and read `port`). Raises RulesError/ModelError/ConfigError."""
    query = settings.query
    # Everything that can fail on configuration alone, before any client exists.
    engine = engine or ScoringEngine.from_settings(settings.scoring)
    credentials = server_credentials(settings)
    policy = FailurePolicy(query.failure_policy)
    redis = _redis_client(settings, REDIS_POOL_SIZE, blocking=True)
    watch_redis = _redis_client(settings, QueryLimits().max_watchers + 8)
    # Its own connection: a busy pool (checks waiting for connections) is not Redis being down.
    health_redis = _redis_client(settings, 2)
    clients = (redis, watch_redis, health_redis)
    try:
        return await _start(
            settings, engine, credentials, policy, clients, listen, registry, record,
            health_interval_s, reload_interval_s,
        )  # fmt: skip
    except BaseException:
        for client in clients:
            await client.aclose()
        raise


async def _start(
    settings: Settings,
    engine: ScoringEngine,
    credentials: grpc.ServerCredentials | None,
    policy: FailurePolicy,
    clients: tuple[aioredis.Redis, aioredis.Redis, aioredis.Redis],
    listen: str | None,
    registry: CollectorRegistry,
    record: bool,
    health_interval_s: float,
    reload_interval_s: float,
) -> QueryServer:
    query = settings.query
    redis, watch_redis, health_redis = clients
    health = await make_health_servicer()
    monitor = RedisHealthMonitor(health_redis, health, interval_s=health_interval_s)
    recorder = (
        TransactionRecorder(
            # linger 0: a recorded check waits for the acknowledgement; no batching delay
            lambda: make_producer(settings, client_id=f"query-{settings.instance_id}", linger_ms=0),
            settings.topics.raw,
        )
        if record
        else None
    )
    servicer = RiskServicer(
        engine=engine,
        velocity=VelocityStore.from_settings(redis, settings),
        alerts=AlertStore.from_settings(redis, settings),
        watch_alerts=AlertStore.from_settings(watch_redis, settings),
        latest_assessment=AssessmentStore(redis, settings.redis_key_prefix).latest,
        validation=ValidationLimits.from_settings(settings.ingest),
        policy=policy,
        limits=QueryLimits(redis_timeout_s=query.redis_timeout_ms / 1000),
        recorder=recorder,
        metrics=QueryMetrics(registry),
        on_redis_failure=monitor.report_failure,
    )

    interceptors = [BearerTokenInterceptor(query.auth_tokens)] if query.auth_tokens else []
    # so_reuseport off: a second server on a busy port must fail, not share it silently.
    server = aio.server(interceptors=interceptors, options=[("grpc.so_reuseport", 0)])
    risk_service_pb2_grpc.add_RiskServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        (
            RISK_SERVICE,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = listen or query.listen
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as e:
        await server.stop(None)  # never started; releases the C-core server now, not in __del__
        raise ConfigError(f"cannot listen on {address}: {e}") from e
    # One ping before serving, so a healthy start reports SERVING from the first probe.
    await monitor.check_once()
    await server.start()
    monitor.start()
    if recorder is not None:
        recorder.start()
    tasks = [asyncio.create_task(_reload_loop(engine, reload_interval_s), name="reload")]
    versions = engine.versions
    log.info(
        "query_started",
        listen=address,
        port=port,
        tls=credentials is not None,
        auth=bool(query.auth_tokens),
        failure_policy=policy.value,
        redis_timeout_ms=query.redis_timeout_ms,
        redis_up=monitor.serving,
        model_version=versions.model,
        rules_version=versions.rules,
    )
    return QueryServer(server, port, servicer, health, monitor, engine, recorder, *clients, tasks)


def settle_gc() -> None:
    """Collect once, then freeze what start-up allocated (modules, descriptors, rules, model).

    Later full collections then scan only what requests allocate. Without it a generation-2
    pass walks every start-up object: about 30 ms measured here, a stall for every call in
    flight and the whole p99 budget of a check."""
    gc.collect()
    gc.freeze()


async def run_query(
    settings: Settings,
    *,
    grace_s: float = 10.0,
    max_seconds: float | None = None,
    health_interval_s: float = 1.0,
    record: bool = True,
    handle_signals: bool = True,
    registry: CollectorRegistry = REGISTRY,
) -> None:
    """Serve until SIGTERM/SIGINT (or `max_seconds`), then shut down gracefully."""
    async with ServiceLifecycle(SERVICE_NAME, handle_signals=handle_signals) as life:
        stop = life.stop_event
        if max_seconds is not None:
            timer = asyncio.get_running_loop().call_later(max_seconds, stop.set)
            life.on_close("timer", lambda: _cancel(timer))
        query = await start_query_server(
            settings, registry=registry, record=record, health_interval_s=health_interval_s
        )
        settle_gc()
        try:
            await stop.wait()
        finally:
            log.info("query_stopping", grace_s=grace_s)
            await query.stop(grace_s)
        log.info("query_finished")


async def _cancel(timer: asyncio.TimerHandle) -> None:
    timer.cancel()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
        if args.check_config:
            engine = ScoringEngine.from_settings(settings.scoring)
            server_credentials(settings)
    except (ConfigError, FraudstreamError) as e:
        print(f"query: configuration error: {e}", file=sys.stderr)
        return 2
    if args.check_config:
        query = settings.query
        print(f"listen: {query.listen} ({'TLS' if query.tls_cert else 'plaintext'})")
        print(f"auth: {'bearer tokens' if query.auth_tokens else 'off'}")
        print(f"failure policy: {query.failure_policy}")
        print(f"redis budget without deadline: {query.redis_timeout_ms} ms")
        print(f"model: {engine.versions.model}, rules: {engine.versions.rules}")
        return 0
    configure_logging(SERVICE_NAME, settings.log_level, settings.log_format)
    serve_metrics(SERVICE_NAME, settings.metrics_port)
    try:
        asyncio.run(
            run_query(
                settings,
                grace_s=args.grace,
                max_seconds=args.max_seconds,
                health_interval_s=args.health_interval,
                record=not args.no_record,
            )
        )
    except FraudstreamError as e:  # rules, model, TLS files, listen address
        log.error("query_config_error", error=str(e))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
