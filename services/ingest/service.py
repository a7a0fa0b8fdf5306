"""The ingest batch transform: decode -> validate -> deduplicate -> output records.

`IngestService.transform` is the `transform` of `shared.kafka.run_exactly_once`: it turns one
batch of `transactions.raw` records into the records of one Kafka transaction, in source order:

  * a valid, first-seen transaction -> `transactions.valid`, normalized protobuf, keyed by
    account_id;
  * a producer retry (same account and transaction_id, another source record, within the
    window) -> nothing (counted and logged at debug);
  * anything undecodable or invalid -> `transactions.dlq`: the original key and value, the
    original headers, and `fraudstream.*` headers naming the error and the source record. The
    one change to the value: a raw card number in it is masked (`dlq_record`), because no topic
    of ours may hold a PAN, the DLQ included.

It never raises on bad input; it raises only when a dependency fails (Redis), which makes the
loop abort the transaction and retry the batch. Deduplication is idempotent per source record
(see `dedup.py`), so a retried batch yields the same outputs.

Metrics count committed batches only: the outcome of a transform is held until
`on_batch_committed`, so a batch retried after a failure is not counted twice.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, Histogram
from prometheus_client import Counter as PromCounter

from protos.fraud.v1 import transaction_pb2
from services.ingest.dedup import Claim, Deduplicator
from shared.codecs import decode_transaction
from shared.config import TopicSettings
from shared.dlq import (
    DLQ_HEADER_CODE,
    DLQ_HEADER_FIELD,
    DLQ_HEADER_MESSAGE,
    DLQ_HEADER_PREFIX,
    DLQ_HEADER_REDACTED,
    DLQ_HEADER_SERVICE,
    DLQ_HEADER_SOURCE_OFFSET,
    DLQ_HEADER_SOURCE_PARTITION,
    DLQ_HEADER_SOURCE_TOPIC,
    DLQ_HEADER_VERSION,
    SERVICE_VERSION,
)
from shared.errors import InputError
from shared.kafka import ConsumerRecord, OutputRecord
from shared.logging import get_logger
from shared.validation import (
    ValidationLimits,
    is_luhn_valid,
    looks_like_pan,
    validate_transaction,
)

__all__ = [
    "DLQ_HEADER_CODE",
    "DLQ_HEADER_FIELD",
    "DLQ_HEADER_MESSAGE",
    "DLQ_HEADER_PREFIX",
    "DLQ_HEADER_REDACTED",
    "DLQ_HEADER_SERVICE",
    "DLQ_HEADER_SOURCE_OFFSET",
    "DLQ_HEADER_SOURCE_PARTITION",
    "DLQ_HEADER_SOURCE_TOPIC",
    "DLQ_HEADER_VERSION",
    "INTERNAL_ERROR",
    "SERVICE_NAME",
    "SERVICE_VERSION",
    "BatchOutcome",
    "IngestMetrics",
    "IngestService",
    "dlq_record",
    "mask_pan",
]

log = get_logger(__name__)

SERVICE_NAME = "ingest"


# Code of a record we failed on through a bug of ours rather than a fault of the producer.
INTERNAL_ERROR = "INTERNAL_ERROR"

_MAX_HEADER_MESSAGE = 1000
_MAX_LOGGED_ID = 128


@dataclass
class BatchOutcome:
    """What one transform decided, applied to the metrics once its transaction commits."""

    accepted: int = 0
    duplicates: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class IngestMetrics:
    """The ingest service's Prometheus metrics, in a registry of the caller's choice (tests use
    their own, so several services can live in one process)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.accepted = PromCounter(
            "fraudstream_ingest_accepted",
            "transactions forwarded to transactions.valid",
            registry=registry,
        )
        self.rejected = PromCounter(
            "fraudstream_ingest_rejected",
            "records sent to transactions.dlq, by error code",
            ["code"],
            registry=registry,
        )
        self.duplicates = PromCounter(
            "fraudstream_ingest_duplicates",
            "producer retries dropped (same account and transaction_id within the window)",
            registry=registry,
        )
        self.batch_size = Histogram(
            "fraudstream_ingest_batch_size",
            "records per committed batch",
            buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
            registry=registry,
        )
        self.batch_seconds = Histogram(
            "fraudstream_ingest_batch_seconds",
            "seconds from a batch's transform to its committed transaction",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )

    def observe(self, outcome: BatchOutcome, records: int, seconds: float) -> None:
        self.accepted.inc(outcome.accepted)
        self.duplicates.inc(outcome.duplicates)
        for code, count in outcome.rejected.items():
            self.rejected.labels(code=code).inc(count)
        self.batch_size.observe(records)
        self.batch_seconds.observe(seconds)


def _content_type(headers: Sequence[tuple[str, bytes]]) -> str | None:
    for name, value in headers:
        if name.lower() == "content-type" and value is not None:
            return bytes(value).decode("utf-8", errors="replace")
    return None


def _printable(value: str) -> str:
    """A producer's id made safe for a log field: bounded, control characters escaped."""
    cut = value[:_MAX_LOGGED_ID]
    return cut if cut.isprintable() else cut.encode("unicode_escape").decode("ascii")


def mask_pan(card_id: str) -> str:
    """The card number with every digit but the first six and last four replaced by `*`
    (separators kept): the truncation PCI DSS allows to be displayed. Same length in bytes."""
    total = sum(c.isdigit() for c in card_id)
    seen = 0
    masked = []
    for char in card_id:
        if char.isdigit():
            masked.append("*" if 6 <= seen < total - 4 else char)
            seen += 1
        else:
            masked.append(char)
    return "".join(masked)


_DIGIT_RUN = re.compile(rb"(?<![0-9])[0-9]{13,19}(?![0-9])")


def _mask_bytes(value: bytes, raw: bytes) -> bytes:
    # Same length: protobuf length prefixes and JSON stay valid, so the record can still be
    # inspected, and replayed once the producer sends a token.
    return value.replace(raw, mask_pan(raw.decode()).encode())


def _redact_pans(
    value: bytes, decoded: transaction_pb2.Transaction | None
) -> tuple[bytes, str | None]:
    """The payload with raw card numbers masked, and what was redacted (None: nothing).

    Decoded: its card_id is checked whatever the error was (a PAN in a record that failed
    for another reason must not leak either); if the number cannot be found byte for byte (a
    JSON string with escapes) the value is dropped. Not decodable: we cannot tell the fields
    apart, so every free-standing run of 13-19 digits that passes Luhn is masked.
    """
    if decoded is not None:
        card_id = decoded.card_id
        if not looks_like_pan(card_id.strip()):
            return value, None
        raw = card_id.encode()
        if raw and raw in value:
            return _mask_bytes(value, raw), "card_id"
        return b"", "value"
    runs = {m.group() for m in _DIGIT_RUN.finditer(value) if is_luhn_valid(m.group().decode())}
    for run in runs:
        value = _mask_bytes(value, run)
    return value, ("digits" if runs else None)


def dlq_record(
    record: ConsumerRecord,
    error: InputError,
    *,
    dlq_topic: str,
    decoded: transaction_pb2.Transaction | None = None,
) -> OutputRecord:
    """The dead letter of `record`: its original key, value and headers, plus ours.

    A raw card number is the one exception to "value untouched": it is masked (or the value
    dropped, see `_redact_pans`) so that no topic of ours ever holds a PAN.
    """
    value, redacted = _redact_pans(record.value if record.value is not None else b"", decoded)
    headers: list[tuple[str, bytes]] = [
        (name, bytes(v) if v is not None else b"")
        for name, v in (record.headers or ())
        # A record re-published from the DLQ for a replay carries our old error headers.
        if not name.startswith(DLQ_HEADER_PREFIX)
    ]
    if redacted is not None:
        headers.append((DLQ_HEADER_REDACTED, redacted.encode()))
    headers += [
        (DLQ_HEADER_CODE, error.code.encode()),
        (DLQ_HEADER_MESSAGE, error.message[:_MAX_HEADER_MESSAGE].encode()),
        (DLQ_HEADER_FIELD, error.field.encode()),
        (DLQ_HEADER_SOURCE_TOPIC, record.topic.encode()),
        (DLQ_HEADER_SOURCE_PARTITION, str(record.partition).encode()),
        (DLQ_HEADER_SOURCE_OFFSET, str(record.offset).encode()),
        (DLQ_HEADER_SERVICE, SERVICE_NAME.encode()),
        (DLQ_HEADER_VERSION, SERVICE_VERSION.encode()),
    ]
    return OutputRecord(topic=dlq_topic, value=value, key=record.key, headers=headers)


class IngestService:
    """The ingest transform with its dependencies handed in (see `__main__` for the wiring)."""

    def __init__(
        self,
        *,
        topics: TopicSettings,
        limits: ValidationLimits,
        dedup: Deduplicator,
        metrics: IngestMetrics | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._topics = topics
        self._limits = limits
        self._dedup = dedup
        self._metrics = metrics
        self._clock = clock
        self._pending = BatchOutcome()
        self.totals = BatchOutcome()  # committed totals, for the shutdown log line and tests

    def _reject(
        self,
        record: ConsumerRecord,
        error: InputError,
        decoded: transaction_pb2.Transaction | None,
    ) -> OutputRecord:
        context: dict[str, str] = {}
        if decoded is not None:
            context = {
                "transaction_id": _printable(decoded.transaction_id),
                "account_id": _printable(decoded.account_id),
            }
        with structlog.contextvars.bound_contextvars(**context):
            log.warning(
                "transaction_rejected",
                code=error.code,
                field=error.field,
                reason=error.message,
                partition=record.partition,
                offset=record.offset,
            )
        return dlq_record(record, error, dlq_topic=self._topics.dlq, decoded=decoded)

    async def transform(self, records: list[ConsumerRecord]) -> list[OutputRecord]:
        now = self._clock()
        outcome = BatchOutcome()
        # One slot per record in source order: an OutputRecord (a rejection), or a valid
        # transaction waiting for the dedup verdict.
        slots: list[OutputRecord | transaction_pb2.Transaction] = []
        claims: list[Claim] = []
        entered_ms: list[int] = []
        for record in records:
            decoded: transaction_pb2.Transaction | None = None
            try:
                headers = record.headers
                content_type = _content_type(headers) if headers else None
                decoded = decode_transaction(record.value, content_type)
                # In place: the message was just decoded and is ours alone.
                valid = validate_transaction(decoded, self._limits, now, in_place=True)
            except InputError as error:
                outcome.rejected[error.code] += 1
                slots.append(self._reject(record, error, decoded))
                continue
            except Exception as bug:
                # A bug of ours on some odd input must not become a poison pill that stops the
                # partition forever: dead-letter the record, and say loudly that it is our fault.
                log.exception("validation_bug", partition=record.partition, offset=record.offset)
                internal = InputError(INTERNAL_ERROR, f"ingest failed on this record: {bug!r}")
                outcome.rejected[internal.code] += 1
                slots.append(self._reject(record, internal, decoded))
                continue
            slots.append(valid)
            entered_ms.append(record.timestamp)
            claims.append(
                Claim(valid.account_id, valid.transaction_id, f"{record.partition}:{record.offset}")
            )

        verdicts = iter(await self._dedup.claim(claims))
        entered = iter(entered_ms)
        outputs: list[OutputRecord] = []
        valid_topic = self._topics.valid
        for slot in slots:
            if isinstance(slot, OutputRecord):
                outputs.append(slot)
                continue
            entered_at = next(entered)
            if next(verdicts):
                outcome.accepted += 1
                outputs.append(
                    OutputRecord(
                        topic=valid_topic,
                        value=slot.SerializeToString(deterministic=True),
                        key=slot.account_id.encode(),
                        # The raw record's timestamp travels on: end-to-end latency downstream.
                        timestamp_ms=entered_at,
                    )
                )
            else:
                outcome.duplicates += 1
                log.debug(
                    "duplicate_dropped",
                    transaction_id=_printable(slot.transaction_id),
                    account_id=_printable(slot.account_id),
                )
        self._pending = outcome
        return outputs

    def on_batch_committed(self, records_in: int, records_out: int, seconds: float) -> None:
        """`on_batch` of run_exactly_once: the last transform's transaction has committed."""
        outcome, self._pending = self._pending, BatchOutcome()
        self.totals.accepted += outcome.accepted
        self.totals.duplicates += outcome.duplicates
        self.totals.rejected.update(outcome.rejected)
        if self._metrics is not None:
            self._metrics.observe(outcome, records_in, seconds)
