"""CPU per transaction of the scoring core alone: decode, evaluate, encode (no Kafka, no Redis).

    python -m bench.engine_bench [--count 8000] [--batch 1000] [--rounds 7] [--max-seconds 60]
                                 [--accounts 300] [--profile evaluate|encode|decode]

What the scoring service does per batch, minus the network (see `ScoringService.transform`):

  * decode:   `Transaction.FromString` + `TxRecord.from_proto` of every record (`decode_valid`);
  * evaluate: `ScoringEngine.evaluate(records, velocity)` (features, rules, model, decision),
              and the decision of every assessment (as the service reads them);
  * encode:   `ScoringEngine.encode(raw, result, ingested_at_ms=..., scored_at_ms=...)`.

Inputs are realistic: simulated payments (the handbook's world, with fraud) serialized as ingest
writes them, their labels interleaved, and velocity rows from `ReferenceVelocity` (the store's
semantics in plain Python) computed once up front, with the shipped rules and model
(`rules/default.toml`, `models/default.json`, the default thresholds).

Reported: this process's CPU time (`time.process_time`) per transaction for each stage, the
median over rounds (each round runs every batch once); CPU time rather than wall clock because
the machine is shared. The `digest` line is a SHA-256 of every encoded ScoredTransaction of one
round (fixed scored_at): an optimisation of the encoder must leave it unchanged.

Bounded by `--count` transactions and `--max-seconds` of measuring (the set-up, a brute-force
reference over the history, takes a few seconds more).
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import pstats
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from protos.fraud.v1 import transaction_pb2
from shared.scoring.engine import EngineResult, ScoringEngine
from shared.scoring.features import LabelRecord, ReferenceVelocity, TxRecord, VelocityBatch
from shared.simulation.generator import SimLabel, SimulationConfig, generate, interleave_labels
from shared.simulation.publisher import transaction_to_proto

__all__ = ["Batch", "main", "make_batches"]

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "rules" / "default.toml"
MODEL = ROOT / "models" / "default.json"
SCORED_AT_MS = 1_767_225_600_000
STAGES = ("decode", "evaluate", "encode")


@dataclass(frozen=True)
class Batch:
    raw: list[bytes]  # Transaction bytes as on transactions.valid
    records: list[TxRecord]
    velocity: VelocityBatch
    ingested_at_ms: list[int | None]


def make_batches(count: int, batch: int, accounts: int, seed: int = 7) -> list[Batch]:
    """`count` simulated transactions in batches, with their velocity rows (labels 7 days late
    applied in between, so the terminal risk features are not all zero)."""
    config = SimulationConfig(
        seed=seed,
        n_customers=accounts,
        n_terminals=2 * accounts,
        n_days=max(2, count // max(accounts, 1) + 9),
    )
    reference = ReferenceVelocity()
    raw: list[bytes] = []
    records: list[TxRecord] = []
    rows: list[np.ndarray] = []
    for _, item in interleave_labels(generate(config), delay=timedelta(days=7)):
        if isinstance(item, SimLabel):
            reference.apply_label(LabelRecord.from_proto(_label_proto(item)))
            continue
        data = transaction_to_proto(item).SerializeToString(deterministic=True)
        record = TxRecord.from_proto(transaction_pb2.Transaction.FromString(data))
        raw.append(data)
        records.append(record)
        rows.append(reference.apply(record).to_row())
        if len(raw) >= count:
            break
    out: list[Batch] = []
    for start in range(0, len(raw), batch):
        part = slice(start, start + batch)
        # Kafka timestamps (CreateTime, ms) as at 10,000 tx/s: ten records share one; a few
        # records have none.
        entered: list[int | None] = [
            None if i % 997 == 0 else SCORED_AT_MS - 60_000 + i // 10
            for i in range(start, start + len(records[part]))
        ]
        out.append(Batch(raw[part], records[part], VelocityBatch(np.vstack(rows[part])), entered))
    return out


def _label_proto(label: SimLabel) -> transaction_pb2.Label:
    message = transaction_pb2.Label(
        transaction_id=label.transaction_id,
        terminal_id=label.terminal_id,
        is_fraud=label.is_fraud,
    )
    message.reported_at.FromDatetime(label.reported_at)
    if label.event_time is not None:
        message.event_time.FromDatetime(label.event_time)
    return message


def _decode(batch: Batch) -> object:
    parse = transaction_pb2.Transaction.FromString
    return [TxRecord.from_proto(parse(data)) for data in batch.raw]


def _evaluate(engine: ScoringEngine, batch: Batch) -> EngineResult:
    result = engine.evaluate(batch.records, batch.velocity)
    # What ScoringService.transform reads of every assessment (it is counted with evaluate:
    # the assessments may defer work to their first use).
    [a.decision for a in result.assessments]
    return result


def run_round(engine: ScoringEngine, batches: Sequence[Batch]) -> tuple[dict[str, float], str]:
    """CPU seconds per stage over every batch, and the digest of the encoded bytes."""
    spent = dict.fromkeys(STAGES, 0.0)
    digest = hashlib.sha256()
    clock = time.process_time
    for batch in batches:
        t0 = clock()
        _decode(batch)
        t1 = clock()
        result = _evaluate(engine, batch)
        t2 = clock()
        encoded = engine.encode(
            batch.raw, result, ingested_at_ms=batch.ingested_at_ms, scored_at_ms=SCORED_AT_MS
        )
        t3 = clock()
        spent["decode"] += t1 - t0
        spent["evaluate"] += t2 - t1
        spent["encode"] += t3 - t2
        for enc in encoded:
            digest.update(enc.full)
    return spent, digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=8000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--accounts", type=int, default=300)
    parser.add_argument("--profile", choices=STAGES, help="cProfile one stage instead")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    batches = make_batches(args.count, args.batch, args.accounts)
    n = sum(len(b.raw) for b in batches)
    engine = ScoringEngine.from_paths(RULES, MODEL)
    print(f"set-up: {n} transactions in {len(batches)} batches, {time.perf_counter() - t0:.1f} s")

    if args.profile:
        results = [engine.evaluate(b.records, b.velocity) for b in batches]
        stage: Callable[[], object] = {
            "decode": lambda: [_decode(b) for b in batches],
            "evaluate": lambda: [_evaluate(engine, b) for b in batches],
            "encode": lambda: [
                engine.encode(b.raw, r, ingested_at_ms=b.ingested_at_ms, scored_at_ms=SCORED_AT_MS)
                for b, r in zip(batches, results, strict=True)
            ],
        }[args.profile]
        profiler = cProfile.Profile()
        profiler.runcall(lambda: [stage() for _ in range(max(1, args.rounds))])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
        return 0

    run_round(engine, batches)  # warm-up: caches, allocator
    samples: dict[str, list[float]] = {s: [] for s in STAGES}
    digests: set[str] = set()
    deadline = time.monotonic() + args.max_seconds
    for _ in range(args.rounds):
        spent, digest = run_round(engine, batches)
        digests.add(digest)
        for s in STAGES:
            samples[s].append(spent[s] / n * 1e6)
        if time.monotonic() > deadline:
            break
    rounds = len(samples["decode"])
    print(f"CPU us/tx, median (min..max) of {rounds} rounds, batches of {args.batch}:")
    for s in STAGES:
        xs = samples[s]
        print(f"  {s:<9} {statistics.median(xs):7.2f}  ({min(xs):.2f}..{max(xs):.2f})")
    total = sum(statistics.median(samples[s]) for s in STAGES)
    print(f"  {'total':<9} {total:7.2f}")
    print(f"digest {' '.join(sorted(digests))}")
    return 0 if len(digests) == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
