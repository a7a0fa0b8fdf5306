"""`fraudstream run` (`make run`): the whole suite on one machine, fed by the simulator.

1. local Kafka and Redis (started unless KAFKA_BOOTSTRAP_SERVERS / REDIS_URL are set),
2. the topics,
3. the four services as separate processes (`python -m services.<name>`, logs in the run
   folder),
4. the simulator publishing at `--rate` transactions per second (labels follow),
5. a live view refreshed every second from the topics themselves (end offsets, consumer-group
   lag, scored records and alerts read as a read_committed observer),
6. on Ctrl-C or after `--duration`: the simulator stops, the pipeline gets a bounded moment to
   drain, services get SIGTERM in pipeline order (each finishes its batch and commits), a
   summary is printed, and the infrastructure this command started is stopped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from protos.fraud.v1 import scoring_pb2
from shared.config import Settings, load_settings
from shared.kafka import ensure_topics, make_admin, make_consumer
from shared.live_view import AlertLine, LiveStats, render
from shared.logging import configure_logging, get_logger

__all__ = ["ServiceProcess", "register", "run_suite", "start_service", "stop_service"]

log = get_logger(__name__)

SERVICES = ("ingest", "scoring", "alerting", "query")


@dataclass
class ServiceProcess:
    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    metrics_port: int
    log_file: TextIO

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def start_service(
    name: str, env: dict[str, str], log_dir: Path, metrics_port: int, *, ready_timeout: float = 60
) -> ServiceProcess:
    """Start `python -m services.<name>` and wait until its metrics endpoint answers."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("a")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        f"services.{name}",
        env={**env, "METRICS_PORT": str(metrics_port), "LOG_FORMAT": "json"},
        stdout=log_file,
        stderr=log_file,
        # Own session: a Ctrl-C in the terminal reaches only us; we stop the services in order.
        start_new_session=True,
    )
    service = ServiceProcess(name, process, log_path, metrics_port, log_file)
    deadline = time.monotonic() + ready_timeout
    while not _port_open(metrics_port):
        if process.returncode is not None:
            raise RuntimeError(
                f"service {name} exited with {process.returncode}:\n{service.log_tail()}"
            )
        if time.monotonic() > deadline:
            await stop_service(service)
            raise RuntimeError(f"service {name} not ready in {ready_timeout:.0f} s")
        await asyncio.sleep(0.2)
    return service


async def stop_service(service: ServiceProcess, timeout: float = 30) -> int:
    """SIGTERM (finish the batch, commit, close), then SIGKILL after `timeout`."""
    if service.process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            service.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(service.process.wait(), timeout)
        except TimeoutError:
            log.warning("service_kill_after_timeout", service=service.name)
            service.process.kill()
            await service.process.wait()
    service.log_file.close()
    return service.process.returncode or 0


class TopicWatcher:
    """Reads the pipeline's state from Kafka for the live view, as a read-only observer."""

    def __init__(self, settings: Settings, stats: LiveStats) -> None:
        self.settings = settings
        self.stats = stats
        topics = settings.topics
        self.stage_topics = {
            "raw": topics.raw,
            "valid": topics.valid,
            "dlq": topics.dlq,
            "scores": topics.scores,
            "alerts": topics.alerts,
            "labels": topics.labels,
        }
        self.groups = {
            "ingest": settings.ingest.group_id,
            "scoring": settings.scoring.group_id,
            "alerting": settings.alerting.group_id,
        }
        self._consumer: AIOKafkaConsumer | None = None
        # One admin client for the whole run: the view asks for group offsets every second.
        self._admin: AIOKafkaAdminClient | None = None
        self._partitions: dict[str, list[TopicPartition]] = {}

    async def start(self) -> None:
        # Partition ids from the admin API: a fresh consumer's metadata may not know new topics.
        admin = make_admin(self.settings, client_id="fraudstream-live-view-admin")
        await admin.start()
        self._admin = admin
        descriptions = await admin.describe_topics(list(self.stage_topics.values()))
        partitions_of = {
            d["topic"]: sorted(p["partition"] for p in d.get("partitions", []))
            for d in descriptions
        }
        for stage, topic in self.stage_topics.items():
            self._partitions[stage] = [
                TopicPartition(topic, p) for p in partitions_of.get(topic, [])
            ]
        consumer = make_consumer(self.settings, group_id=None, client_id="fraudstream-live-view")
        await consumer.start()
        self._consumer = consumer
        watched = self._partitions["scores"] + self._partitions["alerts"]
        consumer.assign(watched)
        if watched:
            await consumer.seek_to_end(*watched)

    def partition_count(self) -> int:
        return max((len(parts) for parts in self._partitions.values()), default=0)

    async def stop(self) -> None:
        if self._admin is not None:
            await self._admin.close()
        if self._consumer is not None:
            await self._consumer.stop()

    async def poll_records(self, timeout_ms: int = 200) -> None:
        assert self._consumer is not None
        batches = await self._consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        now_ms = time.time() * 1000
        for tp, records in batches.items():
            for record in records:
                if tp.topic == self.settings.topics.scores:
                    self._on_score(record.value, record.timestamp, now_ms)
                else:
                    self._on_alert(record.value)

    def _on_score(self, value: bytes | None, entered_ms: int, now_ms: float) -> None:
        scored = scoring_pb2.ScoredTransaction()
        try:
            scored.ParseFromString(value or b"")
        except Exception:
            return
        decision = scoring_pb2.Decision.Name(scored.decision).removeprefix("DECISION_")
        # The record timestamp is the raw record's publish time, carried through every stage.
        scored_ms = scored.scored_at.ToMilliseconds() if scored.HasField("scored_at") else now_ms
        self.stats.record_score(decision, scored_ms - entered_ms)

    def _on_alert(self, value: bytes | None) -> None:
        alert = scoring_pb2.Alert()
        try:
            alert.ParseFromString(value or b"")
        except Exception:
            return
        self.stats.record_alert(
            AlertLine(
                created_at=alert.created_at.ToMilliseconds() / 1000 or time.time(),
                severity=scoring_pb2.Severity.Name(alert.severity).removeprefix("SEVERITY_"),
                account_id=alert.account_id,
                score=alert.score,
                decision=scoring_pb2.Decision.Name(alert.decision).removeprefix("DECISION_"),
                reasons=", ".join(r.code for r in alert.reasons[:3]),
            )
        )

    async def refresh_offsets(self) -> None:
        assert self._consumer is not None
        every = [tp for parts in self._partitions.values() for tp in parts]
        ends = await self._consumer.end_offsets(every)
        offsets = {
            stage: sum(ends.get(tp, 0) for tp in parts) for stage, parts in self._partitions.items()
        }
        self.stats.update_offsets(offsets, time.monotonic())
        assert self._admin is not None
        for name, group in self.groups.items():
            committed = await self._admin.list_consumer_group_offsets(group)
            source = {"ingest": "raw", "scoring": "valid", "alerting": "scores"}[name]
            lag = 0
            for tp in self._partitions[source]:
                meta = committed.get(tp)
                lag += ends.get(tp, 0) - (meta.offset if meta and meta.offset >= 0 else 0)
            self.stats.lags[name] = max(lag, 0)


def _summary(stats: LiveStats, elapsed: float) -> str:
    percentiles = stats.latency_percentiles()
    latency = f"p50 {percentiles[0]:.0f} ms, p99 {percentiles[1]:.0f} ms" if percentiles else "-"
    decisions = ", ".join(f"{k} {v:,}" for k, v in sorted(stats.decisions.items())) or "-"
    return (
        f"\nfraudstream run summary ({elapsed:.0f} s)\n"
        f"  published {stats.published:,} transactions; scored {stats.scored:,}; "
        f"alerts {stats.alerts:,}\n"
        f"  decisions: {decisions}\n"
        f"  latency raw -> scored: {latency}\n"
        f"  dead-lettered: {stats.end_offsets.get('dlq', 0):,}\n"
    )


async def run_suite(args: argparse.Namespace) -> int:
    from shared.infra import ensure_infra
    from shared.simulation.generator import SimulationConfig
    from shared.simulation.publisher import PublishStats, publish_simulation

    infra = ensure_infra(
        kafka_bootstrap=os.environ.get("KAFKA_BOOTSTRAP_SERVERS"),
        redis_url=os.environ.get("REDIS_URL"),
        progress=lambda message: print(message, file=sys.stderr),
    )
    env = {
        **os.environ,
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap,
        "REDIS_URL": infra.redis_url,
    }
    settings = load_settings(env)
    configure_logging("run", settings.log_level, "console")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    services: list[ServiceProcess] = []
    stats = LiveStats()
    watcher = TopicWatcher(settings, stats)
    started = time.monotonic()
    interactive = sys.stdout.isatty() and not args.no_view
    try:
        await ensure_topics(settings)
        log_dir = Path(args.log_dir)
        for index, name in enumerate(SERVICES):
            print(f"starting {name} ...", file=sys.stderr)
            services.append(await start_service(name, env, log_dir, args.metrics_port_base + index))
        await watcher.start()
        config = SimulationConfig(
            seed=args.seed, n_customers=args.customers, n_terminals=args.terminals, n_days=args.days
        )

        def on_progress(progress: PublishStats) -> None:
            stats.published = progress.transactions
            if progress.simulated_time is not None:
                stats.simulated_time = progress.simulated_time.strftime("%Y-%m-%d %H:%M")

        simulator = asyncio.create_task(
            publish_simulation(
                settings,
                config,
                rate=args.rate,
                max_transactions=args.max_transactions,
                stop_event=stop,
                progress_callback=on_progress,
                progress_interval_s=0.5,
                # A fresh id space per run: a rerun on a running Redis must not be dropped as
                # producer retries, nor pile onto the previous run's velocity counters.
                id_prefix=args.run_id if args.run_id is not None else f"r{uuid.uuid4().hex[:6]}",
            )
        )
        exit_code = 0
        deadline = started + args.duration if args.duration else None
        next_refresh = 0.0
        while not stop.is_set():
            if deadline is not None and time.monotonic() >= deadline:
                break
            if simulator.done():  # the simulated history is all published: drain and stop
                break
            for service in services:
                if service.process.returncode is not None:
                    raise RuntimeError(
                        f"service {service.name} exited with {service.process.returncode}:\n"
                        f"{service.log_tail()}"
                    )
            await watcher.poll_records()
            if time.monotonic() >= next_refresh:
                await watcher.refresh_offsets()
                screen = render(stats)
                if interactive:
                    sys.stdout.write("\x1b[H\x1b[2J" + screen + "\n")
                else:
                    print(screen.splitlines()[0], flush=True)
                sys.stdout.flush()
                next_refresh = time.monotonic() + (1.0 if interactive else 5.0)
        stop.set()
        try:
            published = await asyncio.wait_for(simulator, 30)
            stats.published = published.transactions
        except Exception as e:  # the simulator failed: say so, still stop everything cleanly
            print(f"simulator failed: {e!r}", file=sys.stderr)
            exit_code = 1
        # Let what was published flow through before stopping the services (bounded).
        drain_deadline = time.monotonic() + args.drain_seconds
        while time.monotonic() < drain_deadline:
            await watcher.poll_records()
            await watcher.refresh_offsets()
            # A committed transaction leaves one control marker after its records, so a fully
            # drained partition can still show an end offset one past the committed offset.
            if all(lag <= watcher.partition_count() for lag in stats.lags.values()):
                break
        print(render(stats))
        return exit_code
    finally:
        for service in services:  # pipeline order: upstream stops first
            code = await stop_service(service)
            print(f"stopped {service.name} (exit {code}); log: {service.log_path}", file=sys.stderr)
        await watcher.stop()
        print(_summary(stats, time.monotonic() - started))
        if not args.keep_infra:
            infra.stop_started()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "run",
        help="the whole suite locally: Kafka, Redis, four services, simulator, live view",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rate", type=float, default=300.0, help="transactions per second")
    parser.add_argument("--duration", type=float, default=0.0, help="stop after S seconds")
    parser.add_argument(
        "--max-transactions", type=int, default=None, help="stop publishing after N"
    )
    parser.add_argument("--customers", type=int, default=2000, help="simulated customers")
    parser.add_argument("--terminals", type=int, default=4000, help="simulated terminals")
    parser.add_argument("--days", type=int, default=28, help="simulated days (at most 28)")
    parser.add_argument("--run-id", default=None, help="id prefix (default: random per run)")
    parser.add_argument("--seed", type=int, default=7, help="simulator seed (reproducible runs)")
    parser.add_argument("--no-view", action="store_true", help="log lines instead of the view")
    parser.add_argument("--keep-infra", action="store_true", help="leave Kafka and Redis running")
    parser.add_argument(
        "--drain-seconds", type=float, default=20.0, help="at the end, wait for lag to reach zero"
    )
    parser.add_argument("--metrics-port-base", type=int, default=9101, help="ports base..base+3")
    parser.add_argument("--log-dir", default=".cache/run/logs", help="service logs go here")
    parser.set_defaults(handler=run_suite)
