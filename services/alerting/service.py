"""The alerting transform: a batch of `risk.scores` records -> `risk.alerts` records.

Run inside `shared.kafka.run_exactly_once`: decode every ScoredTransaction, let the policy pick
a severity, hand the candidates to the alert store (suppression and storage in Redis, idempotent
per transaction) and return the alerts to publish, keyed by account_id, in input order.

Metrics, stats and webhook deliveries of a batch are staged and applied only in `on_batch`,
which `run_exactly_once` calls after the batch's Kafka transaction committed: an aborted and
retried batch is neither counted twice nor announced to the webhook before it is real.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from google.protobuf.message import DecodeError as ProtobufDecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram

from protos.fraud.v1 import scoring_pb2
from services.alerting.policy import AlertPolicy, alert_id_for, severity_name, suppression_code
from services.alerting.webhook import WebhookSink
from shared.alert_store import AlertCandidate, AlertStore, Outcome
from shared.kafka import ConsumerRecord, OutputRecord
from shared.logging import get_logger

__all__ = ["AlertTransform", "AlertingStats", "MalformedScore", "decode_score"]

log = get_logger(__name__)

ALERTS = Counter(
    "fraudstream_alerting_alerts_total", "alerts published to risk.alerts", ["severity"]
)
SUPPRESSED = Counter(
    "fraudstream_alerting_suppressed_total", "alerts held back by a suppression window"
)
SCORES = Counter(
    "fraudstream_alerting_scores_total",
    "scored transactions consumed, by what became of them",
    ["outcome"],
)
MALFORMED = Counter(
    "fraudstream_alerting_malformed_scores_total", "risk.scores records skipped as malformed"
)
BATCH_SECONDS = Histogram(
    "fraudstream_alerting_batch_seconds",
    "one batch: decode, Redis, produce and commit",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


class MalformedScore(Exception):
    """A risk.scores record that is not a usable ScoredTransaction."""


def decode_score(value: bytes | None) -> scoring_pb2.ScoredTransaction:
    """Decode a risk.scores value; MalformedScore when it is empty, not protobuf, or lacks the
    ids an alert is keyed by (garbage bytes often parse as unknown fields, so the ids are the
    real test)."""
    if not value:
        raise MalformedScore("empty value")
    scored = scoring_pb2.ScoredTransaction()
    try:
        scored.ParseFromString(value)
    except (ProtobufDecodeError, RuntimeError, ValueError) as e:
        raise MalformedScore(f"not a ScoredTransaction: {e}") from None
    if not scored.transaction.transaction_id:
        raise MalformedScore("missing transaction.transaction_id")
    if not scored.transaction.account_id:
        raise MalformedScore("missing transaction.account_id")
    return scored


def _event_time_ms(scored: scoring_pb2.ScoredTransaction, now_ms: int) -> int:
    """Suppression windows run on event time; fall back to when it was scored, then to now."""
    if scored.transaction.HasField("event_time"):
        return int(scored.transaction.event_time.ToMilliseconds())
    if scored.HasField("scored_at"):
        return int(scored.scored_at.ToMilliseconds())
    return now_ms


@dataclass
class AlertingStats:
    """Totals of committed batches (the same numbers as the metrics, for tests and logs)."""

    scores: int = 0
    alerts: int = 0  # published: new, or replayed after an aborted attempt
    suppressed: int = 0
    duplicates: int = 0
    malformed: int = 0
    no_alert: int = 0
    by_severity: dict[str, int] = field(default_factory=dict)


@dataclass
class _Staged:
    """What one transform attempt found; applied once its transaction committed."""

    alerts: list[scoring_pb2.Alert] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)


class AlertTransform:
    """The `transform` and `on_batch` callbacks of `run_exactly_once` for the alerting stage."""

    def __init__(
        self,
        *,
        policy: AlertPolicy,
        store: AlertStore,
        alerts_topic: str,
        webhook: WebhookSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._store = store
        self._alerts_topic = alerts_topic
        self._webhook = webhook
        self._clock = clock
        self._staged = _Staged()
        self.stats = AlertingStats()

    async def __call__(self, records: list[ConsumerRecord]) -> list[OutputRecord]:
        staged = _Staged()
        self._staged = staged  # a retried batch replaces what an aborted attempt staged
        now_ms = int(self._clock() * 1000)
        created_at = Timestamp()
        created_at.FromMilliseconds(now_ms)
        candidates: list[AlertCandidate] = []
        timestamps: list[int] = []
        for record in records:
            try:
                scored = decode_score(record.value)
            except MalformedScore as e:
                # There is no DLQ for scores: scoring produced them, so a bad one is a bug upstream
                # to be found in the log (partition/offset), not input a producer could fix and
                # resend. Skipping keeps every other account's alerts flowing.
                _count(staged, "malformed")
                log.error(
                    "malformed_score_skipped",
                    error=str(e),
                    topic=record.topic,
                    partition=record.partition,
                    offset=record.offset,
                )
                continue
            severity = self._policy.severity_for(scored.decision, scored.score)
            if severity is None:
                _count(staged, "no_alert")
                continue
            tx = scored.transaction
            alert = scoring_pb2.Alert(
                alert_id=alert_id_for(tx.transaction_id),
                account_id=tx.account_id,
                transaction_id=tx.transaction_id,
                severity=severity,
                score=scored.score,
                decision=scored.decision,
                reasons=scored.reasons,
                created_at=created_at,
            )
            candidates.append(
                AlertCandidate(
                    alert=alert,
                    reason_code=suppression_code(scored.reasons),
                    event_time_ms=_event_time_ms(scored, now_ms),
                    origin=f"{record.topic}:{record.partition}:{record.offset}",
                )
            )
            timestamps.append(record.timestamp)

        outputs: list[OutputRecord] = []
        results = await self._store.record(candidates)
        for candidate, result, timestamp in zip(candidates, results, timestamps, strict=True):
            _count(staged, result.outcome.value)
            if result.alert is None:
                if result.outcome is Outcome.DUPLICATE:
                    log.warning(
                        "duplicate_score_ignored",
                        transaction_id=candidate.alert.transaction_id,
                        account_id=candidate.alert.account_id,
                        origin=candidate.origin,
                    )
                continue
            staged.alerts.append(result.alert)
            outputs.append(
                OutputRecord(
                    topic=self._alerts_topic,
                    value=result.payload,
                    key=result.alert.account_id.encode(),
                    # The input's timestamp travels on (when the transaction entered the pipeline).
                    timestamp_ms=timestamp,
                )
            )
        return outputs

    def on_batch(self, records_in: int, records_out: int, seconds: float) -> None:
        """After the batch's transaction committed: metrics, stats, logs, webhook."""
        staged, self._staged = self._staged, _Staged()
        BATCH_SECONDS.observe(seconds)
        outcomes = staged.outcomes
        self.stats.scores += records_in
        self.stats.malformed += outcomes.get("malformed", 0)
        self.stats.no_alert += outcomes.get("no_alert", 0)
        self.stats.duplicates += outcomes.get("duplicate", 0)
        suppressed = outcomes.get("suppressed", 0) + outcomes.get("replayed_suppressed", 0)
        self.stats.suppressed += suppressed
        for outcome, count in outcomes.items():
            SCORES.labels(outcome=outcome).inc(count)
        MALFORMED.inc(outcomes.get("malformed", 0))
        SUPPRESSED.inc(suppressed)
        for alert in staged.alerts:
            severity = severity_name(alert.severity)
            ALERTS.labels(severity=severity).inc()
            self.stats.alerts += 1
            self.stats.by_severity[severity] = self.stats.by_severity.get(severity, 0) + 1
            log.info(
                "alert_published",
                alert_id=alert.alert_id,
                account_id=alert.account_id,
                transaction_id=alert.transaction_id,
                severity=severity,
                score=round(alert.score, 4),
                suppressed_count=alert.suppressed_count,
            )
            if self._webhook is not None:
                self._webhook.offer(alert)


def _count(staged: _Staged, outcome: str) -> None:
    staged.outcomes[outcome] = staged.outcomes.get(outcome, 0) + 1
