"""Scoring throughput against a no-op consume-produce passthrough, in the same run.

    python -m bench.scoring_bench [--count 50000] [--rounds 3] [--batch 1000]
                                  [--accounts 5000] [--max-seconds 120] [--memory-sample 500]
                                  [--warmup 10000]

Both legs read the same prefilled `transactions.valid` copy (each with a fresh consumer group)
with the same client settings (`make_consumer`, `make_transactional_producer`) through the same
exactly-once loop (`run_exactly_once`: one Kafka transaction per batch, SCORING_PIPELINE_DEPTH
batches in flight, the garbage collector tuned as the services tune it):

  * passthrough: forwards every record's key and value unchanged (the Kafka floor);
  * scoring: the real `ScoringService.stages` with the shipped rules and model
    (SCORING_RULES_PATH / SCORING_MODEL_PATH): decode, one velocity Lua call for the accounts
    and one for the terminals, one numpy evaluation, the ScoredTransactions, the assessment
    writes, on one ordered Redis connection as the service wires it, in a fresh Redis namespace
    per round (so every round applies, none replays).

Throughput is records over the time from the first batch's start to the last batch's commit (the
consumer-group join is not counted for either). A first round of `--warmup` transactions per leg
is run and not counted: on a freshly started broker the first transactions are several times
slower (measured: the first round's passthrough at half its later rate, which made that round's
ratio look better than it was). Legs alternate and medians are reported, with
this process's CPU per transaction and Redis's main-thread CPU per transaction (steadier than
wall clock on a shared machine: Kafka and Redis run on the same 2 cores). Targets: scoring
>= 10,000 tx/s and >= 25% of passthrough.

Memory: after the last scoring round, `MEMORY USAGE` (SAMPLES 0) of every key of a sample of
accounts (velocity: vc, vz, vt, vr; assessments: latest, dec) and terminals, averaged. The
history here is short (count / accounts transactions per account); bench/velocity_bench.py
measures a realistic 30-day history for the velocity keys.

Bounded by `--count` and `--max-seconds` per leg; the benchmark's topics and keys are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import random
import statistics
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import redis.asyncio as aioredis
from prometheus_client import CollectorRegistry

from bench.legs import (
    LegResult,
    delete_keys,
    delete_topics,
    passthrough_transform,
    run_leg,
)
from protos.fraud.v1 import transaction_pb2
from services.scoring.service import ScoringMetrics, ScoringService
from shared.config import Settings, TopicSettings, load_settings
from shared.infra import ensure_infra
from shared.kafka import (
    ensure_topics,
    make_producer,
)
from shared.lifecycle import tune_gc_for_batches
from shared.logging import configure_logging
from shared.redis_client import make_redis
from shared.redis_packing import OrderedConnection, use_hiredis_packing
from shared.scoring.assessments import AssessmentStore
from shared.scoring.engine import ScoringEngine
from shared.scoring.velocity import VelocityStore
from shared.simulation.generator import SimulationConfig, generate
from shared.simulation.publisher import transaction_to_proto

__all__ = ["BenchResult", "main", "run_bench"]

START_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
TARGET_RATE = 10_000.0
TARGET_RATIO = 0.25


@dataclass(frozen=True)
class MemoryResult:
    accounts: int
    velocity_per_account: float
    assessments_per_account: float
    terminals: int
    per_terminal: float

    @property
    def per_account(self) -> float:
        return self.velocity_per_account + self.assessments_per_account


@dataclass(frozen=True)
class BenchResult:
    count: int
    batch: int
    accounts: int
    rounds: list[tuple[LegResult, LegResult]]
    memory: MemoryResult | None

    @property
    def passthrough_rate(self) -> float:
        return statistics.median(p.rate for p, _ in self.rounds)

    @property
    def scoring_rate(self) -> float:
        return statistics.median(s.rate for _, s in self.rounds)

    @property
    def ratio(self) -> float:
        return statistics.median(s.rate / p.rate if p.rate else 0.0 for p, s in self.rounds)

    def report(self) -> str:
        cpu_p = statistics.median(p.cpu_us_per_record for p, _ in self.rounds)
        cpu_s = statistics.median(s.cpu_us_per_record for _, s in self.rounds)
        redis_s = statistics.median(s.redis_cpu_us_per_record for _, s in self.rounds)
        rate_ok = "met" if self.scoring_rate >= TARGET_RATE else "NOT met"
        ratio_ok = "met" if self.ratio >= TARGET_RATIO else "NOT met"
        lines = [
            f"scoring benchmark: {self.count} transactions x {len(self.rounds)} rounds, "
            f"{self.accounts} accounts, batch {self.batch}, {os.cpu_count()} CPUs",
            f"  passthrough  {self.passthrough_rate:10.0f} tx/s   {cpu_p:6.1f} us CPU/tx",
            f"  scoring      {self.scoring_rate:10.0f} tx/s   {cpu_s:6.1f} us CPU/tx   "
            f"(target >= {TARGET_RATE:.0f}: {rate_ok})",
            f"               {'':10}        {redis_s:6.1f} us Redis CPU/tx (main thread)",
            f"  ratio        {self.ratio:10.2f}   (target >= {TARGET_RATIO:.2f}: {ratio_ok})",
        ]
        if self.memory is not None:
            m = self.memory
            lines.append(
                f"  Redis memory per account: {m.per_account:,.0f} B "
                f"(velocity {m.velocity_per_account:,.0f} B + latest assessment and decisions "
                f"{m.assessments_per_account:,.0f} B; {m.accounts} accounts sampled, "
                f"{self.count // self.accounts} tx each); per terminal {m.per_terminal:,.0f} B"
            )
        return "\n".join(lines)


def _transactions(count: int, accounts: int, seed: int) -> list[bytes]:
    """`count` simulated payments (the handbook's customers and terminals, with fraud), in
    event-time order, serialized as ingest writes them to transactions.valid."""
    config = SimulationConfig(
        seed=seed,
        n_customers=accounts,
        n_terminals=2 * accounts,
        # ~2 payments per customer and day: enough days for `count`, with a margin
        n_days=max(1, count // max(accounts, 1) + 2),
    )
    out: list[bytes] = []
    for sim in generate(config):
        if len(out) >= count:
            break
        out.append(transaction_to_proto(sim).SerializeToString(deterministic=True))
    return out


async def _prefill(settings: Settings, payloads: Sequence[bytes]) -> None:
    producer = make_producer(settings, client_id="bench-prefill", linger_ms=20)
    await producer.start()
    try:
        pending = []
        for payload in payloads:
            key = transaction_pb2.Transaction.FromString(payload).account_id.encode()
            pending.append(await producer.send(settings.topics.valid, payload, key=key))
            if len(pending) >= 5000:  # bounded memory of in-flight futures
                await asyncio.gather(*pending)
                pending.clear()
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def _memory_usage(redis: aioredis.Redis, keys: Sequence[str]) -> int:
    pipe = redis.pipeline(transaction=False)
    for key in keys:
        pipe.execute_command("MEMORY", "USAGE", key, "SAMPLES", "0")
    return sum(int(v or 0) for v in await pipe.execute())


async def _measure_memory(
    redis: aioredis.Redis,
    velocity: VelocityStore,
    assessments: AssessmentStore,
    account_ids: set[str],
    terminal_ids: set[str],
    sample: int,
) -> MemoryResult:
    rng = random.Random(11)
    ids = rng.sample(sorted(account_ids), min(sample, len(account_ids)))
    v_total = a_total = t_total = 0
    for account in ids:
        v_total += await _memory_usage(redis, velocity.account_keys(account))
        a_total += await _memory_usage(
            redis, [assessments.latest_key(account), assessments.decisions_key(account)]
        )
    terminals = rng.sample(sorted(terminal_ids), min(sample, len(terminal_ids)))
    for terminal in terminals:
        t_total += await _memory_usage(redis, velocity.terminal_keys(terminal))
    n = len(ids) or 1
    return MemoryResult(
        len(ids), v_total / n, a_total / n, len(terminals), t_total / max(1, len(terminals))
    )


async def run_bench(
    *,
    count: int = 50_000,
    rounds: int = 3,
    batch: int = 1000,
    accounts: int = 5000,
    max_seconds: float = 120.0,
    memory_sample: int = 500,
    warmup: int = 10_000,
) -> BenchResult:
    infra = ensure_infra()
    try:
        suffix = uuid.uuid4().hex[:8]
        base = load_settings(
            {
                **os.environ,
                "KAFKA_BOOTSTRAP_SERVERS": infra.kafka_bootstrap,
                "REDIS_URL": infra.redis_url,
                "SCORING_BATCH_MAX": str(batch),
            }
        )
        settings = dataclasses.replace(
            base,
            topics=TopicSettings(*(f"bench.{name}.{suffix}" for name in TopicSettings().all())),
        )
        engine = ScoringEngine.from_settings(settings.scoring)
        passthrough_topic = f"bench.passthrough.{suffix}"
        await ensure_topics(settings, [*settings.topics.all(), passthrough_topic])
        # The service's client: commands packed by hiredis (see shared/redis_packing.py).
        redis = use_hiredis_packing(make_redis(settings))
        prefixes: list[str] = []
        memory: MemoryResult | None = None
        rounds_run: list[tuple[LegResult, LegResult]] = []
        try:
            payloads = _transactions(count, accounts, seed=7)
            count = len(payloads)
            await _prefill(settings, payloads)

            async def run_round(prefix: str, legs_count: int) -> _Round:
                """One passthrough leg, then one scoring leg, over `legs_count` transactions."""
                prefixes.append(prefix)
                isolated = dataclasses.replace(settings, redis_key_prefix=prefix)
                ordered = OrderedConnection(redis)  # as the service wires it
                velocity = VelocityStore.from_settings(redis, isolated, ordered=ordered)
                assessments = AssessmentStore.from_settings(redis, isolated, ordered=ordered)
                await velocity.load_scripts()
                await assessments.load_scripts()
                service = ScoringService(
                    topics=settings.topics,
                    engine=engine,
                    velocity=velocity,
                    assessments=assessments,
                    metrics=ScoringMetrics(CollectorRegistry()),
                )
                passthrough = await run_leg(
                    settings,
                    "passthrough",
                    passthrough_transform(passthrough_topic),
                    source_topic=settings.topics.valid,
                    count=legs_count,
                    pipeline_depth=settings.scoring.pipeline_depth,  # as the service runs
                    batch=batch,
                    max_seconds=max_seconds,
                )
                scoring = await run_leg(
                    settings,
                    "scoring",
                    service.stages,
                    source_topic=settings.topics.valid,
                    count=legs_count,
                    pipeline_depth=settings.scoring.pipeline_depth,  # as the service runs
                    batch=batch,
                    max_seconds=max_seconds,
                    on_commit=service.on_batch_committed,
                    on_discard=service.on_batches_discarded,
                    redis=redis,
                )
                await ordered.aclose()  # its pool connection back for the next round
                return _Round(passthrough, scoring, velocity, assessments)

            if warmup > 0:
                # A fresh broker and Redis are slow for the first transactions and batches (JIT,
                # page cache, the first transaction's coordinator): not counted.
                first = await run_round(f"bench{suffix}w", min(warmup, count))
                print(
                    f"  warm-up (not counted): passthrough {first.passthrough.rate:8.0f} tx/s, "
                    f"scoring {first.scoring.rate:8.0f} tx/s",
                    flush=True,
                )
            for round_number in range(rounds):
                measured = await run_round(f"bench{suffix}r{round_number}", count)
                passthrough, scoring = measured.passthrough, measured.scoring
                velocity, assessments = measured.velocity, measured.assessments
                rounds_run.append((passthrough, scoring))
                print(
                    f"  round {round_number + 1}: passthrough {passthrough.rate:8.0f} tx/s, "
                    f"scoring {scoring.rate:8.0f} tx/s, "
                    f"ratio {scoring.rate / max(passthrough.rate, 1e-9):.2f} "
                    f"(scoring CPU/tx: {scoring.cpu_us_per_record:.1f} us here, "
                    f"{scoring.redis_cpu_us_per_record:.1f} us Redis, its main thread "
                    f"{scoring.redis_cpu_us_per_record * scoring.rate / 1e4:.0f}% busy; "
                    f"{scoring.records / max(scoring.batches, 1):.0f} per batch)",
                    flush=True,
                )
                if round_number == rounds - 1 and memory_sample > 0:
                    seen = [transaction_pb2.Transaction.FromString(p) for p in payloads]
                    memory = await _measure_memory(
                        redis,
                        velocity,
                        assessments,
                        {t.account_id for t in seen},
                        {t.terminal_id for t in seen if t.terminal_id},
                        memory_sample,
                    )
        finally:
            for prefix in prefixes:
                await delete_keys(redis, prefix)
            await redis.aclose()
            await delete_topics(settings, [*settings.topics.all(), passthrough_topic])
        return BenchResult(count, batch, accounts, rounds_run, memory)
    finally:
        infra.stop_started()


class _Round(NamedTuple):
    passthrough: LegResult
    scoring: LegResult
    velocity: VelocityStore
    assessments: AssessmentStore


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scoring_bench",
        description="Scoring tx/s against a no-op consume-produce passthrough (same run).",
    )
    parser.add_argument("--count", type=int, default=50_000, help="transactions per leg")
    parser.add_argument(
        "--rounds", type=int, default=3, help="alternating rounds; the median is reported"
    )
    parser.add_argument("--batch", type=int, default=1000, help="records per batch/transaction")
    parser.add_argument("--accounts", type=int, default=5000, help="distinct accounts")
    parser.add_argument("--max-seconds", type=float, default=120.0, help="time bound per leg")
    parser.add_argument(
        "--memory-sample", type=int, default=500, help="accounts sampled for MEMORY USAGE"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=10_000,
        help="transactions per leg of a first round that is not counted (0: none)",
    )
    args = parser.parse_args(argv)
    configure_logging("bench", "WARNING", "console")
    tune_gc_for_batches()  # as the services run (both legs alike)
    result = asyncio.run(
        run_bench(
            count=args.count,
            rounds=args.rounds,
            batch=args.batch,
            accounts=args.accounts,
            max_seconds=args.max_seconds,
            memory_sample=args.memory_sample,
            warmup=args.warmup,
        )
    )
    print(result.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
