"""Scoring's second loop: fraud labels from `risk.labels` -> terminal risk and live metrics.

A label (chargeback, analyst verdict, the simulator's ground truth) says whether a past
transaction was fraud. Per batch of labels:

  1. `AssessmentStore.match_labels`: look up the decision scoring gave the transaction (kept per
     transaction for twice the label delay) and record the verdict next to it, idempotently: a
     redelivered label is REPEATED and counts nothing, a flipped verdict (a chargeback
     withdrawn) is CHANGED and moves its count. The stored decision also gives the
     transaction's event time, the day its fraud is booked on for the terminal-risk features;
     `fraud.v1.Label` has no event time of its own, and without a stored decision the label's
     `reported_at` stands in (booking the fraud on the report day; see `LabelRecord`).
  2. `VelocityStore.apply_labels`: book fraud on the terminal (idempotent per transaction id);
     the delayed windows count it only once it is older than the label delay, exactly like
     `fraudstream train` replays it.
  3. Metrics: live precision and recall of past decisions (flagged = REVIEW or DECLINE).
  4. Commit the consumer's offsets (after applying: a crash before the commit redelivers the
     batch, which the idempotent steps absorb).

No output topic, so no Kafka transaction: at-least-once delivery plus idempotent Redis writes is
exactly-once in effect. Metrics are counted once per label verdict because the verdict recorded
in Redis says whether a label was seen before.

Prometheus: `..._label_verdicts_total{cell}` counts verdicts by confusion-matrix cell (tp, fp,
fn, tn) and `..._label_verdicts_withdrawn_total{cell}` the verdicts a later label replaced, so
`verdicts - withdrawn` is the matrix across instances and restarts (PromQL); the gauges
`..._live_precision` / `..._live_recall` / `..._live_confusion{cell}` are this process's view
since it started.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from google.protobuf.message import DecodeError as ProtobufDecodeError
from prometheus_client import REGISTRY, CollectorRegistry, Gauge
from prometheus_client import Counter as PromCounter
from redis import exceptions as redis_errors
from redis.exceptions import ResponseError

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.kafka import ConsumerRecord
from shared.logging import get_logger
from shared.scoring.assessments import AssessmentStore, LabelMatch, LabelStatus
from shared.scoring.features import LabelRecord
from shared.scoring.velocity import VelocityStore

__all__ = [
    "CELLS",
    "LabelBatchOutcome",
    "LabelMetrics",
    "LabelProcessor",
    "LabelStats",
    "cell_of",
    "run_label_loop",
]

log = get_logger(__name__)

CELLS = ("tp", "fp", "fn", "tn")
_FLAGGED = frozenset((scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_DECLINE))

# Failures of a dependency, not of the data: the label batch is retried from its first offset.
_RETRYABLE: tuple[type[BaseException], ...] = (
    KafkaError,
    OSError,
    TimeoutError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
)


def cell_of(decision: int, is_fraud: bool) -> str:
    """The confusion-matrix cell of a decision and its label (flagged = REVIEW or DECLINE)."""
    flagged = decision in _FLAGGED
    if flagged:
        return "tp" if is_fraud else "fp"
    return "fn" if is_fraud else "tn"


class LabelMetrics:
    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.labels = PromCounter(
            "fraudstream_scoring_labels",
            "labels consumed, by what became of them: matched (a first verdict), changed "
            "(a verdict flipped), repeated (redelivered), unknown (no decision retained), "
            "malformed, failed (a script error on it)",
            ["outcome"],
            registry=registry,
        )
        self.verdicts = PromCounter(
            "fraudstream_scoring_label_verdicts",
            "label verdicts on past decisions, by confusion-matrix cell (flagged = REVIEW or "
            "DECLINE)",
            ["cell"],
            registry=registry,
        )
        self.withdrawn = PromCounter(
            "fraudstream_scoring_label_verdicts_withdrawn",
            "verdicts replaced by a later label for the same transaction, by their old cell",
            ["cell"],
            registry=registry,
        )
        self.terminal_changes = PromCounter(
            "fraudstream_scoring_terminal_labels_applied",
            "labels that changed a terminal's fraud count (new fraud, or fraud withdrawn)",
            registry=registry,
        )
        self.confusion = Gauge(
            "fraudstream_scoring_live_confusion",
            "confusion matrix of past decisions against labels, this process since start",
            ["cell"],
            registry=registry,
        )
        self.precision = Gauge(
            "fraudstream_scoring_live_precision",
            "share of labeled flagged decisions that were fraud (NaN before any)",
            registry=registry,
        )
        self.recall = Gauge(
            "fraudstream_scoring_live_recall",
            "share of labeled fraud that was flagged (NaN before any)",
            registry=registry,
        )
        self.matrix: Counter[str] = Counter()
        for cell in CELLS:
            self.confusion.labels(cell=cell).set(0)
        self.precision.set(math.nan)
        self.recall.set(math.nan)

    def observe(self, outcome: LabelBatchOutcome) -> None:
        for name, count in outcome.outcomes.items():
            self.labels.labels(outcome=name).inc(count)
        for cell, count in outcome.verdicts.items():
            self.verdicts.labels(cell=cell).inc(count)
            self.matrix[cell] += count
        for cell, count in outcome.withdrawn.items():
            self.withdrawn.labels(cell=cell).inc(count)
            self.matrix[cell] -= count
        if outcome.terminal_changes:
            self.terminal_changes.inc(outcome.terminal_changes)
        m = self.matrix
        for cell in CELLS:
            self.confusion.labels(cell=cell).set(m[cell])
        flagged, fraud = m["tp"] + m["fp"], m["tp"] + m["fn"]
        self.precision.set(m["tp"] / flagged if flagged else math.nan)
        self.recall.set(m["tp"] / fraud if fraud else math.nan)


@dataclass
class LabelBatchOutcome:
    outcomes: Counter[str] = field(default_factory=Counter)
    verdicts: Counter[str] = field(default_factory=Counter)
    withdrawn: Counter[str] = field(default_factory=Counter)
    terminal_changes: int = 0


@dataclass
class LabelStats:
    batches: int = 0
    labels: int = 0
    retries: int = 0
    totals: LabelBatchOutcome = field(default_factory=LabelBatchOutcome)


def _decode(record: ConsumerRecord) -> transaction_pb2.Label | None:
    if not record.value:
        return None
    try:
        label = transaction_pb2.Label.FromString(record.value)
    except (ProtobufDecodeError, RuntimeError, ValueError):
        return None
    return label if label.transaction_id else None


class LabelProcessor:
    """One batch of label records -> Redis (decisions, terminal risk) -> an outcome."""

    def __init__(self, *, velocity: VelocityStore, assessments: AssessmentStore) -> None:
        self._velocity = velocity
        self._assessments = assessments

    async def process(self, records: list[ConsumerRecord]) -> LabelBatchOutcome:
        outcome = LabelBatchOutcome()
        labels: list[transaction_pb2.Label] = []
        for record in records:
            label = _decode(record)
            if label is None:
                # No DLQ for labels: the labels topic is ours (simulator, case tools); a bad
                # one is logged where it can be found and skipped.
                outcome.outcomes["malformed"] += 1
                log.error(
                    "malformed_label_skipped",
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
                continue
            labels.append(label)
        if not labels:
            return outcome
        try:
            await self._apply(labels, outcome)
        except ResponseError as e:
            # A script error is a bug of ours on some odd label, not an outage: apply the
            # labels one by one and skip (count, log) the ones it fails on, rather than stop
            # on the same batch forever. Re-applying is safe: both steps are idempotent.
            log.error("label_script_failed_isolating", error=str(e)[:300], labels=len(labels))
            for label in labels:
                try:
                    await self._apply([label], outcome)
                except ResponseError as single:
                    outcome.outcomes["failed"] += 1
                    log.error(
                        "label_skipped_script_error",
                        transaction_id=label.transaction_id[:128],
                        error=str(single)[:300],
                    )
        return outcome

    async def _apply(self, labels: list[transaction_pb2.Label], outcome: LabelBatchOutcome) -> None:
        matches = await self._assessments.match_labels(
            [(lb.account_id, lb.transaction_id, lb.is_fraud) for lb in labels]
        )
        records_for_terminals = [
            LabelRecord(
                transaction_id=lb.transaction_id,
                terminal_id=lb.terminal_id,
                is_fraud=lb.is_fraud,
                event_ms=m.event_ms,
            )
            if m.event_ms is not None
            else LabelRecord.from_proto(lb)
            for lb, m in zip(labels, matches, strict=True)
        ]
        changed = await self._velocity.apply_labels(records_for_terminals)
        # Counted only once both steps went through (a failed batch is redone label by label).
        outcome.terminal_changes += sum(changed)
        for label, match in zip(labels, matches, strict=True):
            _count(outcome, label, match)


def _count(outcome: LabelBatchOutcome, label: transaction_pb2.Label, match: LabelMatch) -> None:
    if match.status == LabelStatus.UNKNOWN or match.decision is None:
        outcome.outcomes["unknown"] += 1
        return
    if match.status == LabelStatus.REPEATED:
        outcome.outcomes["repeated"] += 1
        return
    outcome.verdicts[cell_of(match.decision, label.is_fraud)] += 1
    if match.status == LabelStatus.CHANGED and match.previous is not None:
        outcome.outcomes["changed"] += 1
        outcome.withdrawn[cell_of(match.decision, match.previous)] += 1
    else:
        outcome.outcomes["matched"] += 1


async def run_label_loop(
    *,
    consumer: AIOKafkaConsumer,
    processor: LabelProcessor,
    stop: asyncio.Event,
    metrics: LabelMetrics | None = None,
    max_records: int = 1000,
    poll_timeout_ms: int = 200,
    max_batches: int | None = None,
    retry_backoff_s: tuple[float, float] = (0.2, 10.0),
) -> LabelStats:
    """Consume labels until `stop` is set (checked between batches); commit after applying.

    A dependency failure rewinds the consumer to the batch start and retries with backoff:
    nothing is committed that was not applied."""
    stats = LabelStats()
    backoff = retry_backoff_s[0]
    while not stop.is_set() and (max_batches is None or stats.batches < max_batches):
        fetched = await consumer.getmany(timeout_ms=poll_timeout_ms, max_records=max_records)
        batch = {tp: recs for tp, recs in fetched.items() if recs}
        if not batch:
            continue
        records = [r for recs in batch.values() for r in recs]
        try:
            outcome = await processor.process(records)
            await consumer.commit({tp: recs[-1].offset + 1 for tp, recs in batch.items()})
        except _RETRYABLE as e:
            stats.retries += 1
            log.warning(
                "label_batch_failed_retrying",
                error=repr(e),
                records=len(records),
                backoff_s=round(backoff, 2),
            )
            for tp, recs in batch.items():
                # A partition revoked meanwhile is someone else's now; its records come again.
                with contextlib.suppress(Exception):
                    consumer.seek(tp, recs[0].offset)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            backoff = min(backoff * 2, retry_backoff_s[1])
            continue
        backoff = retry_backoff_s[0]
        stats.batches += 1
        stats.labels += len(records)
        totals = stats.totals
        totals.outcomes.update(outcome.outcomes)
        totals.verdicts.update(outcome.verdicts)
        totals.withdrawn.update(outcome.withdrawn)
        totals.terminal_changes += outcome.terminal_changes
        if metrics is not None:
            metrics.observe(outcome)
    return stats
