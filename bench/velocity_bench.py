"""Velocity store throughput (three ways of calling the scripts) and Redis bytes per account.

    python -m bench.velocity_bench [--count 50000] [--accounts 5000] [--batch 500]
                                   [--rounds 3] [--max-seconds 120] [--memory-accounts 2000]

Throughput: `apply_batch` over `--count` transactions of `--accounts` accounts (each with a
terminal: two scripts per batch), in batches of `--batch`, for each call mode of
`VelocityStore`:

  * per_tx: a pipeline of one EVALSHA per transaction and one per terminal (2 commands per tx);
  * slot:   a pipeline of one EVALSHA per hash slot (Redis Cluster compatible; with random
            accounts nearly one call per account, so close to per_tx);
  * batch:  one EVALSHA for all accounts and one for all terminals of the batch (the default on
            a single Redis).

Each mode starts from an empty namespace and applies the same transactions; the modes alternate
for `--rounds` rounds and the median is reported, with the client's CPU per transaction
(process time) and Redis's main-thread CPU per transaction (INFO cpu). A second
`batch` run over the same transactions measures replays (every transaction a DUPLICATE).

Memory: `--memory-accounts` accounts with a realistic 30-day history (the handbook's customer
model: 0-4 payments a day, amounts around a personal mean, a dozen nearby terminals, one device,
one country, located payments), then `MEMORY USAGE` of the three keys of a sample of accounts and
terminals, averaged; and one heavy account (20,000 payments over 60 days) to show the bound.

Redis: REDIS_URL when set, else the project's local redis-server (`shared.infra.LocalRedis`,
started here and stopped after when it was not running). Every key is removed at the end.
Bounded by `--count`, `--rounds` and `--max-seconds` (checked between batches).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from bench.legs import redis_cpu_s
from shared.infra import LocalRedis
from shared.scoring.features import (
    DAY_MS,
    DUPLICATE,
    TxRecord,
    VelocityConfig,
)
from shared.scoring.velocity import CallMode, VelocityStore

__all__ = ["ModeResult", "main", "run_bench"]

START_MS = 1_700_000_000_000
MODES: tuple[CallMode, ...] = ("per_tx", "slot", "batch")


@dataclass(frozen=True)
class ModeResult:
    mode: str
    tx_per_s: float
    client_cpu_us_per_tx: float
    redis_cpu_us_per_tx: float
    transactions: int


def make_workload(count: int, accounts: int, seed: int = 7) -> list[TxRecord]:
    """`count` transactions of `accounts` accounts in event-time order, 1 to 3 per second."""
    rnd = random.Random(seed)
    out: list[TxRecord] = []
    t = START_MS
    for i in range(count):
        t += rnd.randint(300, 1000)
        account = rnd.randrange(accounts)
        out.append(
            TxRecord(
                transaction_id=f"b{i}",
                account_id=f"acct{account}",
                event_ms=t,
                amount_minor=rnd.randint(100, 20_000),
                currency="EUR",
                merchant_id=f"m{rnd.randrange(2000)}",
                country=rnd.choice(("FR", "FR", "FR", "DE", "ES")),
                device_id=f"dev{account}",
                terminal_id=f"term{rnd.randrange(10_000)}",
                latitude=48.0 + rnd.random(),
                longitude=2.0 + rnd.random(),
            )
        )
    return out


def batches(txs: Sequence[TxRecord], size: int) -> list[Sequence[TxRecord]]:
    return [txs[i : i + size] for i in range(0, len(txs), size)]


@dataclass(frozen=True)
class _Run:
    transactions: int
    wall_s: float
    client_cpu_s: float
    redis_cpu_s: float
    duplicates: int


async def _timed_apply(
    redis: aioredis.Redis, store: VelocityStore, parts: list[Sequence[TxRecord]], deadline: float
) -> _Run:
    done = duplicates = 0
    server0 = await redis_cpu_s(redis)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for part in parts:
        result = await store.apply_batch(part)
        done += len(part)
        duplicates += int((result.statuses == DUPLICATE).sum())
        if time.monotonic() > deadline:
            break
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return _Run(done, wall, cpu, await redis_cpu_s(redis) - server0, duplicates)


async def throughput(
    redis: aioredis.Redis,
    txs: list[TxRecord],
    batch: int,
    rounds: int,
    deadline: float,
) -> list[ModeResult]:
    parts = batches(txs, batch)
    samples: dict[str, list[_Run]] = {m: [] for m in (*MODES, "replay")}
    for round_no in range(rounds):
        for mode in MODES:
            if time.monotonic() > deadline:
                break
            store = VelocityStore(redis, f"vbench-{uuid.uuid4().hex[:8]}", call_mode=mode)
            await store.load_scripts()
            try:
                samples[mode].append(await _timed_apply(redis, store, parts, deadline))
                if mode == "batch" and round_no == 0:
                    replay = await _timed_apply(redis, store, parts, deadline)
                    if replay.duplicates != replay.transactions:
                        raise AssertionError(f"replay: {replay.duplicates} duplicates")
                    samples["replay"].append(replay)
            finally:
                await store.clear()
    results = []
    for name, runs in samples.items():
        if not runs:
            continue
        results.append(
            ModeResult(
                mode="batch (replay)" if name == "replay" else name,
                tx_per_s=statistics.median(r.transactions / r.wall_s for r in runs),
                client_cpu_us_per_tx=statistics.median(
                    r.client_cpu_s / r.transactions * 1e6 for r in runs
                ),
                redis_cpu_us_per_tx=statistics.median(
                    r.redis_cpu_s / r.transactions * 1e6 for r in runs
                ),
                transactions=runs[0].transactions,
            )
        )
    return results


def realistic_history(accounts: int, days: int, seed: int = 11) -> list[TxRecord]:
    """The handbook's customers: 0-4 payments a day (Poisson), amounts normal around a personal
    mean, time of day around noon, terminals among a dozen nearby ones."""
    rnd = random.Random(seed)
    txs: list[TxRecord] = []
    for a in range(accounts):
        rate = rnd.uniform(0, 4)
        mean = rnd.uniform(5, 100)
        x, y = rnd.uniform(0, 100), rnd.uniform(0, 100)
        terminals = [f"t{a % 997}-{k}" for k in range(12)]
        for day in range(days):
            n = _poisson(rnd, rate)
            for _ in range(n):
                second = int(min(max(rnd.gauss(43_200, 20_000), 0), 86_399))
                amount = rnd.gauss(mean, mean / 2)
                if amount < 0:
                    amount = rnd.uniform(0, 2 * mean)
                terminal = rnd.choice(terminals)
                txs.append(
                    TxRecord(
                        transaction_id=f"h{len(txs)}",
                        account_id=f"cust{a}",
                        event_ms=START_MS + day * DAY_MS + second * 1000,
                        amount_minor=round(amount * 100),
                        currency="EUR",
                        merchant_id=terminal,
                        country="FR",
                        device_id=f"dev{a}",
                        terminal_id=terminal,
                        latitude=40.0 + y / 100,
                        longitude=2.0 + x / 100,
                    )
                )
    txs.sort(key=lambda tx: tx.event_ms)
    return txs


def _poisson(rnd: random.Random, lam: float) -> int:
    # Knuth's method; lam <= 4 here, so at most a few dozen draws
    limit, k, p = pow(2.718281828459045, -lam), 0, 1.0
    for _ in range(100):
        p *= rnd.random()
        if p <= limit:
            return k
        k += 1
    return k


async def memory_usage(redis: aioredis.Redis, keys: Sequence[str]) -> int:
    total = 0
    for key in keys:
        used = await redis.memory_usage(key, samples=0)
        total += int(used or 0)
    return total


async def memory(
    redis: aioredis.Redis, accounts: int, batch: int, deadline: float
) -> dict[str, float]:
    store = VelocityStore(redis, f"vbench-mem-{uuid.uuid4().hex[:8]}")
    out: dict[str, float] = {}
    try:
        history = realistic_history(accounts, days=30)
        for part in batches(history, batch):
            await store.apply_batch(part)
            if time.monotonic() > deadline:
                break
        sample = random.Random(3).sample(range(accounts), min(200, accounts))
        sizes = [
            await memory_usage(redis, store.account_keys(f"cust{a}"))
            for a in sample
            if await redis.exists(store.account_keys(f"cust{a}")[0])
        ]
        out["accounts"] = accounts
        out["transactions_30d"] = len(history)
        out["bytes_per_account_mean"] = statistics.mean(sizes) if sizes else 0.0
        out["bytes_per_account_p95"] = (
            statistics.quantiles(sizes, n=20)[-1] if len(sizes) >= 20 else max(sizes, default=0)
        )
        terminal_ids = sorted({tx.terminal_id for tx in history})[:200]
        t_sizes = [await memory_usage(redis, store.terminal_keys(t)) for t in terminal_ids]
        out["bytes_per_terminal_mean"] = statistics.mean(t_sizes) if t_sizes else 0.0

        heavy = [
            TxRecord(
                transaction_id=f"heavy{i}",
                account_id="heavy",
                event_ms=START_MS + i * (60 * DAY_MS // 20_000),
                amount_minor=1000 + i % 500,
                merchant_id=f"hm{i % 3000}",
                country=("FR", "DE", "US", "GB")[i % 4],
                device_id=f"hd{i % 700}",
                terminal_id=f"ht{i % 50}",
                latitude=45.0,
                longitude=5.0,
            )
            for i in range(20_000)
        ]
        for part in batches(heavy, batch):
            await store.apply_batch(part)
            if time.monotonic() > deadline:
                break
        out["bytes_heavy_account"] = await memory_usage(redis, store.account_keys("heavy"))
    finally:
        await store.clear()
    return out


async def run_bench(
    redis_url: str,
    *,
    count: int,
    accounts: int,
    batch: int,
    rounds: int,
    max_seconds: float,
    memory_accounts: int,
) -> tuple[list[ModeResult], dict[str, float]]:
    deadline = time.monotonic() + max_seconds
    redis = aioredis.Redis.from_url(redis_url, decode_responses=False)
    try:
        txs = make_workload(count, accounts)
        modes = await throughput(redis, txs, batch, rounds, deadline)
        mem = await memory(redis, memory_accounts, batch, deadline + 60)
    finally:
        await redis.aclose()
    return modes, mem


def _print(modes: list[ModeResult], mem: dict[str, float], config: VelocityConfig) -> None:
    print("velocity store: apply_batch throughput (median of rounds)")
    print(f"  {'mode':<16}{'tx/s':>10}{'client CPU us/tx':>20}{'Redis CPU us/tx':>18}")
    for r in modes:
        print(
            f"  {r.mode:<16}{r.tx_per_s:>10,.0f}{r.client_cpu_us_per_tx:>20.1f}"
            f"{r.redis_cpu_us_per_tx:>18.1f}"
        )
    print(
        "  (wall-clock tx/s depend on what else runs on the machine; CPU per transaction much "
        "less: Redis CPU includes other clients of the same server)"
    )
    print("velocity store: Redis memory (MEMORY USAGE of the 3 keys, SAMPLES 0)")
    print(
        f"  realistic 30 d history, {int(mem.get('accounts', 0)):,} accounts, "
        f"{int(mem.get('transactions_30d', 0)):,} tx: "
        f"{mem.get('bytes_per_account_mean', 0):,.0f} B/account mean, "
        f"{mem.get('bytes_per_account_p95', 0):,.0f} B p95; "
        f"{mem.get('bytes_per_terminal_mean', 0):,.0f} B/terminal"
    )
    print(
        f"  heavy account (20,000 tx over 60 d): {mem.get('bytes_heavy_account', 0):,.0f} B "
        f"(bounded: caps {config.account_id_cap} ids, {config.merchant_cap} merchants, "
        f"{config.quarter_retention} six-hour and {config.day_retention} day buckets)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=5_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--memory-accounts", type=int, default=2_000)
    args = parser.parse_args(argv)

    url = os.environ.get("REDIS_URL", "").strip()
    started: LocalRedis | None = None
    if not url:
        local = LocalRedis()
        if not local.is_running():
            local.start()
            started = local
        url = local.url
    try:
        modes, mem = asyncio.run(
            run_bench(
                url,
                count=args.count,
                accounts=args.accounts,
                batch=args.batch,
                rounds=args.rounds,
                max_seconds=args.max_seconds,
                memory_accounts=args.memory_accounts,
            )
        )
    finally:
        if started is not None:
            started.stop()
    _print(modes, mem, VelocityConfig())
    return 0


if __name__ == "__main__":
    sys.exit(main())
