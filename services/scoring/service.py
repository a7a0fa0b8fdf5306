"""The scoring batch transform: transactions.valid -> velocity -> engine -> risk.scores.

`ScoringService.stages` is the transform of `shared.kafka.run_exactly_once`, in two stages:
`prepare` (steps 1-3) and `finish` (steps 4-6). Per batch:

  1. `engine.maybe_reload()` (rules and model files: one stat each when unchanged);
  2. decode every record (protobuf `Transaction`); a record that does not decode or cannot be
     scored (no ids, an event time outside the store's range) goes to `transactions.dlq` with
     the original key, value and headers plus `fraudstream.*` headers naming the error, like
     ingest does. Ingest validated everything on this topic, so this is a bug or a foreign
     producer, never a reason to stop the partition;
  3. ONE velocity call (`VelocityStore.apply_batch`: one round trip, idempotent per
     transaction, so a batch processed again after a crash moves no counter twice);
  4. ONE engine evaluation (features, rules, model, decisions for the whole batch);
  5. the outputs: one serialized ScoredTransaction per transaction to `risk.scores`, keyed by
     account_id, carrying the input record's timestamp (when the transaction entered the
     pipeline) so that every stage can measure end-to-end latency;
  6. ONE assessment-store call: each account's latest assessment (for the query service) and
     every transaction's decision (for the live precision/recall when its label comes).

Redis writes happen before the Kafka transaction commits; they are idempotent, so a retried
batch writes the same values and publishes the same scores (velocity returns the stored results
of transactions it has already applied). The service runs with a `pipeline_depth` (the next
batch's velocity call runs in Redis while this process scores and commits the ones before it),
so the metrics of each batch are queued and applied in `on_batch_committed`, after its commit,
and `on_batches_discarded` drops them when the loop discards the batches in hand: a retried
batch is not counted twice. Rule and model reloads are counted when they happen: they
are not part of any batch's outcome.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import DecodeError as ProtobufDecodeError
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram
from prometheus_client import Counter as PromCounter
from redis.exceptions import ResponseError

from protos.fraud.v1 import transaction_pb2
from shared.config import TopicSettings
from shared.dlq import (
    DLQ_HEADER_CODE,
    DLQ_HEADER_FIELD,
    DLQ_HEADER_MESSAGE,
    DLQ_HEADER_PREFIX,
    DLQ_HEADER_SERVICE,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_VERSION,
    SERVICE_VERSION,
)
from shared.kafka import ConsumerRecord, OutputRecord, StagedTransform
from shared.logging import get_logger
from shared.scoring.assessments import AssessmentEntry, AssessmentStore, FirstApplication
from shared.scoring.decision import BatchAssessment, Decision
from shared.scoring.engine import DECISION_TO_PROTO, ReloadOutcome, ScoringEngine
from shared.scoring.features import APPLIED, DUPLICATE, LATE, RAW_COLUMNS, TxRecord, VelocityBatch
from shared.scoring.reloading import ReloadStatus
from shared.scoring.rules import RuleMode
from shared.scoring.velocity import PendingVelocity, VelocityStore

__all__ = [
    "DLQ_HEADER_CODE",
    "DLQ_HEADER_MESSAGE",
    "SERVICE_NAME",
    "SERVICE_VERSION",
    "BatchOutcome",
    "PreparedBatch",
    "ScoringMetrics",
    "ScoringService",
    "UnscorableRecord",
]

log = get_logger(__name__)

SERVICE_NAME = "scoring"


_STATUS_NAMES = {APPLIED: "applied", DUPLICATE: "duplicate", LATE: "late"}
# Code of a record we failed on through a bug of ours rather than a fault of the producer.
INTERNAL_ERROR = "INTERNAL_ERROR"
_MAX_LOGGED_ID = 128


class UnscorableRecord(Exception):
    """A transactions.valid record that cannot be scored; `code` and `field` name why."""

    def __init__(self, code: str, message: str, field: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field


def decode_valid(record: ConsumerRecord) -> tuple[transaction_pb2.Transaction, TxRecord]:
    """The Transaction of a transactions.valid record and its velocity record, or
    UnscorableRecord."""
    if record.value is None:
        raise UnscorableRecord("EMPTY_PAYLOAD", "record has no value")
    try:
        tx = transaction_pb2.Transaction.FromString(record.value)
    except (ProtobufDecodeError, RuntimeError, ValueError) as e:
        raise UnscorableRecord("UNDECODABLE", f"not a protobuf Transaction: {e}") from None
    if not tx.transaction_id:
        raise UnscorableRecord("MISSING_FIELD", "transaction_id is empty", "transaction_id")
    if not tx.account_id:
        raise UnscorableRecord("MISSING_FIELD", "account_id is empty", "account_id")
    try:
        return tx, TxRecord.from_proto(tx)
    except ValueError as e:  # an event time outside [0, 2**44) ms
        raise UnscorableRecord("INVALID_FIELD", str(e), "event_time") from None


# Batches whose velocity call may be sent before the assessment write of the oldest of them:
# two keep one call queued in Redis behind the one it runs (measured: Redis 96-100% busy).
_VELOCITY_AHEAD = 2
_PREV_MS = RAW_COLUMNS.index("prev_event_ms")
_COUNT_30D = RAW_COLUMNS.index("count_30d")


def first_applications(velocity: VelocityBatch) -> list[FirstApplication | None]:
    """Per transaction, the facts the assessment store's fast path needs when the velocity store
    applied it for the first time in this batch (status APPLIED); None otherwise (a replay: the
    store then reads before it writes) and when the store did not report `newest`."""
    n = len(velocity)
    if velocity.newest is None:
        return [None] * n
    raw = velocity.raw
    applied = (raw[:, 0] == APPLIED).tolist()
    newest = velocity.newest.tolist()
    previous = raw[:, _PREV_MS].tolist()
    count_30d = raw[:, _COUNT_30D].tolist()
    return [
        FirstApplication(
            in_order=newest[i],
            previous_ms=None if math.isnan(previous[i]) else int(previous[i]),
            count_30d=int(count_30d[i]),
        )
        if applied[i]
        else None
        for i in range(n)
    ]


def _printable(value: str) -> str:
    cut = value[:_MAX_LOGGED_ID]
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")


def dead_letter(record: ConsumerRecord, error: UnscorableRecord, dlq_topic: str) -> OutputRecord:
    """The original key, value and headers (our old error headers dropped), plus ours."""
    headers: list[tuple[str, bytes]] = [
        (name, bytes(v) if v is not None else b"")
        for name, v in (record.headers or ())
        if not name.startswith(DLQ_HEADER_PREFIX)
    ]
    headers += [
        (DLQ_HEADER_CODE, error.code.encode()),
        (DLQ_HEADER_MESSAGE, error.message[:1000].encode()),
        (DLQ_HEADER_FIELD, error.field.encode()),
        (DLQ_HEADER_SOURCE_TOPIC, record.topic.encode()),
        (DLQ_HEADER_SOURCE_PARTITION, str(record.partition).encode()),
        (DLQ_HEADER_SOURCE_OFFSET, str(record.offset).encode()),
        (DLQ_HEADER_SERVICE, SERVICE_NAME.encode()),
        (DLQ_HEADER_VERSION, SERVICE_VERSION.encode()),
    ]
    return OutputRecord(
        topic=dlq_topic,
        value=record.value if record.value is not None else b"",
        key=record.key,
        headers=headers,
        timestamp_ms=record.timestamp,
    )


@dataclass
class BatchOutcome:
    """What one transform decided, applied to the metrics once its transaction commits."""

    scored: Counter[str] = field(default_factory=Counter)  # by decision
    rejected: Counter[str] = field(default_factory=Counter)  # by error code
    velocity: Counter[str] = field(default_factory=Counter)  # applied / duplicate / late
    rule_hits: dict[tuple[str, RuleMode], int] = field(default_factory=dict)
    input_age_s: float | None = None  # now - the oldest input record's timestamp

    def add(self, other: BatchOutcome) -> None:
        self.scored.update(other.scored)
        self.rejected.update(other.rejected)
        self.velocity.update(other.velocity)
        for key, count in other.rule_hits.items():
            self.rule_hits[key] = self.rule_hits.get(key, 0) + count


@dataclass
class PreparedBatch:
    """A batch between `prepare` and `finish`: decoded, its velocity call sent (queued in
    Redis behind the previous batch's), nothing scored."""

    outcome: BatchOutcome
    slots: list[OutputRecord | int]  # source order: a dead letter, or an index into `good`
    good: list[ConsumerRecord]
    txs: list[transaction_pb2.Transaction]
    tx_records: list[TxRecord]
    velocity: PendingVelocity | None  # None: nothing to apply (and no turn taken)


class ScoringMetrics:
    """The scoring service's Prometheus metrics, in a registry of the caller's choice (tests
    use their own, so several services can live in one process)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.scored = PromCounter(
            "fraudstream_scoring_scored",
            "transactions scored and published to risk.scores, by decision",
            ["decision"],
            registry=registry,
        )
        self.rejected = PromCounter(
            "fraudstream_scoring_rejected",
            "transactions.valid records sent to transactions.dlq, by error code",
            ["code"],
            registry=registry,
        )
        self.velocity = PromCounter(
            "fraudstream_scoring_velocity_results",
            "velocity results by status: applied, duplicate (a replay), late (not counted)",
            ["status"],
            registry=registry,
        )
        self.rule_hits = PromCounter(
            "fraudstream_scoring_rule_hits",
            "transactions a rule fired on, by rule and mode (shadow rules never act)",
            ["rule", "mode"],
            registry=registry,
        )
        self.reloads = PromCounter(
            "fraudstream_scoring_reloads",
            "rules/model file changes seen, by artifact and outcome (reloaded, failed)",
            ["artifact", "outcome"],
            registry=registry,
        )
        self.version = Gauge(
            "fraudstream_scoring_version_info",
            "1 for the rules and model versions in force",
            ["artifact", "version"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "fraudstream_scoring_batch_size",
            "records per committed batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "fraudstream_scoring_batch_seconds",
            "seconds from a batch's transform to its committed transaction",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.input_age = Histogram(
            "fraudstream_scoring_input_age_seconds",
            "age of a batch's oldest record when scored (time since it entered the pipeline)",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
            registry=registry,
        )
        self._versions: dict[str, str] = {}

    def set_version(self, artifact: str, version: str) -> None:
        old = self._versions.get(artifact)
        if old == version:
            return
        if old is not None:
            self.version.remove(artifact, old)
        self.version.labels(artifact=artifact, version=version).set(1)
        self._versions[artifact] = version

    def observe(self, outcome: BatchOutcome, records: int, seconds: float) -> None:
        for decision, count in outcome.scored.items():
            self.scored.labels(decision=decision).inc(count)
        for code, count in outcome.rejected.items():
            self.rejected.labels(code=code).inc(count)
        for status, count in outcome.velocity.items():
            self.velocity.labels(status=status).inc(count)
        for (rule, mode), count in outcome.rule_hits.items():
            if count:
                self.rule_hits.labels(rule=rule, mode=mode.value).inc(count)
        self.batch_size.observe(records)
        self.batch_seconds.observe(seconds)
        if outcome.input_age_s is not None:
            self.input_age.observe(max(outcome.input_age_s, 0.0))


class ScoringService:
    """The scoring transform with its dependencies handed in (see `__main__` for the wiring)."""

    def __init__(
        self,
        *,
        topics: TopicSettings,
        engine: ScoringEngine,
        velocity: VelocityStore,
        assessments: AssessmentStore,
        metrics: ScoringMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topics = topics
        self._engine = engine
        self._velocity = velocity
        self._assessments = assessments
        self._metrics = metrics
        self._clock = clock
        # Outcomes of transformed batches not yet committed, oldest first (the pipeline depth).
        self._pending: deque[BatchOutcome] = deque()
        # batches whose velocity call is sent and whose assessment write is not (see prepare)
        self._unwritten = 0
        self._turns = asyncio.Condition()
        self.totals = BatchOutcome()  # committed totals, for the shutdown log line and tests
        if metrics is not None:
            versions = engine.versions
            metrics.set_version("rules", versions.rules)
            metrics.set_version("model", versions.model)

    @property
    def engine(self) -> ScoringEngine:
        return self._engine

    def reload(self) -> ReloadOutcome:
        """Pick up changed rules/model files; count and log what happened."""
        outcome = self._engine.maybe_reload()
        for artifact, result in (("rules", outcome.rules), ("model", outcome.model)):
            if result.status is ReloadStatus.UNCHANGED:
                continue
            if self._metrics is not None:
                self._metrics.reloads.labels(artifact=artifact, outcome=result.status.value).inc()
            if result.status is ReloadStatus.FAILED:
                log.error(
                    "reload_failed_keeping_old",
                    artifact=artifact,
                    version_in_force=result.version,
                    error=str(result.error),
                )
            else:
                log.info("reloaded", artifact=artifact, version=result.version)
                if self._metrics is not None:
                    self._metrics.set_version(artifact, result.version)
        return outcome

    def _reject(self, record: ConsumerRecord, error: UnscorableRecord) -> OutputRecord:
        log.error(
            "unscorable_record_dead_lettered",
            code=error.code,
            field=error.field,
            reason=error.message,
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
        )
        return dead_letter(record, error, self._topics.dlq)

    @property
    def stages(self) -> StagedTransform[PreparedBatch]:
        """The transform for `run_exactly_once(pipeline_depth=...)`: the next batch's velocity
        call (Redis) runs while this process scores and encodes the ones before it."""
        return StagedTransform(self.prepare, self.finish)

    async def transform(self, records: list[ConsumerRecord]) -> list[OutputRecord]:
        """Both stages at once (tests, training, and a loop without overlap)."""
        return await self.finish(await self.prepare(records))

    async def prepare(self, records: list[ConsumerRecord]) -> PreparedBatch:
        """Steps 1-3: decode, dead-letter, and apply the velocity batch (in batch order: the
        counters of the next batch build on these)."""
        self.reload()
        outcome = BatchOutcome()
        # Source order: a slot is either a dead letter or the index of a scored transaction.
        slots: list[OutputRecord | int] = []
        good: list[ConsumerRecord] = []
        txs: list[transaction_pb2.Transaction] = []
        tx_records: list[TxRecord] = []
        for record in records:
            try:
                tx, tx_record = decode_valid(record)
            except UnscorableRecord as error:
                outcome.rejected[error.code] += 1
                slots.append(self._reject(record, error))
                continue
            slots.append(len(good))
            good.append(record)
            txs.append(tx)
            tx_records.append(tx_record)

        velocity = None
        if good:
            # Sent now, read in `finish`: Redis runs it while this process reads and decodes
            # the next batch. At most _VELOCITY_AHEAD batches have their velocity call sent and
            # their assessment write not yet sent: the writes then reach Redis between the
            # velocity calls (V2, A1, V3, A2, ...) on the one ordered connection, never behind a
            # queue of them. Packed before the turn: when it comes, Redis may have little queued.
            packed = self._velocity.pack_batch(tx_records)
            async with self._turns:
                await self._turns.wait_for(lambda: self._unwritten < _VELOCITY_AHEAD)
                self._unwritten += 1
            velocity = await packed.submit()
        return PreparedBatch(outcome, slots, good, txs, tx_records, velocity)

    async def finish(self, prepared: PreparedBatch) -> list[OutputRecord]:
        """Steps 4-6: score, encode, write the assessments; the batch's output records."""
        velocity = await self._velocity_of(prepared)
        outcome, slots, good = prepared.outcome, prepared.slots, prepared.good
        txs, tx_records = prepared.txs, prepared.tx_records
        encoded = []
        if good:
            result = self._engine.evaluate(tx_records, velocity)
            timestamps = [r.timestamp for r in good]
            now_ms = int(self._clock() * 1000)
            encoded = self._engine.encode(
                [r.value for r in good],  # never None: those were dead-lettered
                result,
                ingested_at_ms=timestamps,
                scored_at_ms=now_ms,
            )
            decisions = result.decisions
            firsts = first_applications(velocity)
            # the write is sent right away, before a velocity call waiting for this turn
            await self._release_turn(prepared)
            await self._assessments.write_encoded(
                [
                    AssessmentEntry(
                        account_id=tx.account_id,
                        transaction_id=tx.transaction_id,
                        event_ms=rec.event_ms,
                        decision=DECISION_TO_PROTO[decision],
                        payload=enc.core,
                        first=first,
                    )
                    for tx, rec, decision, enc, first in zip(
                        txs, tx_records, decisions, encoded, firsts, strict=True
                    )
                ]
            )
            outcome.scored.update(Counter(d.value for d in decisions))
            statuses = np.bincount(velocity.statuses.clip(0, 3), minlength=4).tolist()
            for status, name in _STATUS_NAMES.items():
                if statuses[status]:
                    outcome.velocity[name] += statuses[status]
            outcome.rule_hits = result.rule_hit_counts()
            outcome.input_age_s = now_ms / 1000 - min(timestamps) / 1000
            declined = [i for i, d in enumerate(decisions) if d is Decision.DECLINE]
            if declined:
                self._log_declines(txs, result.assessed, declined)

        await self._release_turn(prepared)  # when nothing was left to write
        outputs: list[OutputRecord] = []
        scores_topic = self._topics.scores
        for slot in slots:
            if isinstance(slot, OutputRecord):
                outputs.append(slot)
                continue
            outputs.append(
                OutputRecord(
                    topic=scores_topic,
                    value=encoded[slot].full,
                    key=txs[slot].account_id.encode(),
                    # The input's timestamp travels on: when the transaction entered the pipeline.
                    timestamp_ms=good[slot].timestamp,
                )
            )
        self._pending.append(outcome)
        return outputs

    async def _release_turn(self, prepared: PreparedBatch) -> None:
        if prepared.velocity is not None:
            prepared.velocity = None
            async with self._turns:
                self._unwritten -= 1
                self._turns.notify_all()

    async def _velocity_of(self, prepared: PreparedBatch) -> VelocityBatch:
        """The batch's velocity results. A script error (a bug of ours on some odd input: it
        must not become a poison pill that stops the partition) sends the batch through
        `_apply_isolating`, and the records it fails on are dead-lettered here. (These
        re-applications run after the calls queued behind this one: only this failed call's
        records, in this bug path, can see the next batch applied before them.)"""
        if prepared.velocity is None:
            return VelocityBatch(np.empty((0, len(RAW_COLUMNS))))
        try:
            return await prepared.velocity.result()
        except ResponseError as e:
            log.error("velocity_script_failed_isolating", error=str(e)[:300])
        velocity, poisoned = await self._apply_isolating(prepared.tx_records)
        if poisoned:
            # Dead-letter them and renumber the rest (slots point into `good`).
            good, slots, outcome = prepared.good, prepared.slots, prepared.outcome
            keep = [i for i in range(len(good)) if i not in poisoned]
            renumber = {old: new for new, old in enumerate(keep)}
            for k, slot in enumerate(slots):
                if isinstance(slot, int):
                    if slot in poisoned:
                        bug = UnscorableRecord(
                            INTERNAL_ERROR,
                            f"the velocity script failed on it: {poisoned[slot]}",
                        )
                        outcome.rejected[bug.code] += 1
                        slots[k] = self._reject(good[slot], bug)
                    else:
                        slots[k] = renumber[slot]
            prepared.good = [good[i] for i in keep]
            prepared.txs = [prepared.txs[i] for i in keep]
            prepared.tx_records = [prepared.tx_records[i] for i in keep]
        return velocity

    async def _apply_isolating(
        self, records: list[TxRecord]
    ) -> tuple[VelocityBatch, dict[int, str]]:
        """`apply_batch`, isolating records the velocity script fails on (a Lua runtime
        error is a bug of ours on some odd input; it must not become a poison pill that stops
        the partition forever). On a script error the batch is split in halves, applied in
        order, down to the single records that fail: those are returned (position -> error) to
        be dead-lettered, and the rest is scored. Re-applying is safe: the store is idempotent
        per transaction, and a failed script call keeps what it wrote before failing.
        Connection errors are not script errors: they propagate and the loop retries."""
        try:
            return await self._velocity.apply_batch(records), {}
        except ResponseError as e:
            if len(records) == 1:
                return VelocityBatch(np.empty((0, len(RAW_COLUMNS)))), {0: str(e)[:300]}
            log.error("velocity_script_failed_isolating", error=str(e)[:300], size=len(records))
        middle = len(records) // 2
        first, bad_first = await self._apply_isolating(records[:middle])
        second, bad_second = await self._apply_isolating(records[middle:])
        poisoned = {**bad_first, **{middle + i: err for i, err in bad_second.items()}}
        return VelocityBatch.concat([first, second]), poisoned

    @staticmethod
    def _log_declines(
        txs: Sequence[transaction_pb2.Transaction],
        assessed: BatchAssessment,
        positions: list[int],
    ) -> None:
        # DECLINEs are rare and what an operator looks for in the log; APPROVE/REVIEW are
        # counted only (a line per transaction would cost more than scoring it). At most 20
        # lines per batch: a rules mistake that declines everything must not flood the log.
        for i in positions[:20]:
            tx = txs[i]
            log.info(
                "transaction_declined",
                transaction_id=_printable(tx.transaction_id),
                account_id=_printable(tx.account_id),
                score=round(float(assessed.scores[i]), 4),
                reasons=[r.code for r in assessed.reasons_of(i)[:5]],
            )

    def on_batches_discarded(self) -> None:
        """`on_discard` of run_exactly_once: every batch transformed but not committed was
        dropped (it is read and scored again), so what it staged must not be counted."""
        self._pending.clear()
        self._unwritten = 0  # their writes will not come; the loop is not preparing meanwhile

    def on_batch_committed(self, records_in: int, records_out: int, seconds: float) -> None:
        """`on_batch` of run_exactly_once: the oldest transformed batch has committed."""
        outcome = self._pending.popleft() if self._pending else BatchOutcome()
        self.totals.add(outcome)
        if self._metrics is not None:
            self._metrics.observe(outcome, records_in, seconds)
