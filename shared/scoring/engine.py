"""The one scoring core: Transactions + velocity -> features -> rules, model, decision -> protobuf.

Both the scoring service (a Kafka batch) and the gRPC query service (one CheckTransaction) call
this module; only the adapters around it differ (where the velocity numbers come from: the
store's `apply_batch` or `peek_batch`; where the results go). Pure: no I/O beyond reading the
rules and model files, which `ReloadingRules` / `ReloadingModel` swap on change.

    engine = ScoringEngine.from_settings(settings.scoring)     # RulesError / ModelError at start
    records = transaction_records(transactions)                # protobuf -> TxRecord (pure)
    velocity = await store.apply_batch(records)                # or peek_batch (read-only)
    result = engine.evaluate(records, velocity)                # ONE rules + model evaluation
    messages = engine.to_protos(transactions, result, ingested_at_ms=..., scored_at_ms=...)

`evaluate` pins the rules and model in force for the whole batch (a reload between two batches
never mixes versions inside one), builds the feature matrix with
`shared.scoring.features.build_feature_matrix` (the same function `fraudstream train` uses, so
training and serving compute the same numbers) and runs `assess_columns` once.

Two ways to get a `ScoredTransaction` out:

* `to_proto` / `to_protos`: protobuf messages built with the protobuf API (the query service,
  tests, anything that wants objects);
* `ScoredEncoder.encode` (`engine.encode`): serialized bytes for the hot path. It splices the
  transaction's bytes as received from Kafka into the output (no re-serialization), writes the
  feature map from the feature matrix with numpy (one template row, 29 doubles copied in per
  transaction) and reuses the encoded bytes of rule reasons and version strings. The result
  parses to a message equal to `to_proto`'s (tests/unit/test_engine.py holds the two to that);
  protobuf parsers accept fields in any order, and the feature map is written last so the same
  bytes minus the map are what `AssessmentStore` keeps as an account's latest assessment.

Timestamps: `ingested_at` is the timestamp of the Kafka record that carried the transaction
into this stage (ingest passes the raw record's timestamp through, so it is when the
transaction entered the pipeline); `scored_at` is the wall clock when the batch was scored.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.config import ScoringSettings
from shared.scoring.decision import (
    MODEL_TEXT_INFIX,
    MODEL_TEXT_SUFFIX,
    Assessment,
    BatchAssessment,
    Decision,
    Reason,
    ReasonSource,
    Thresholds,
    assess_columns,
    model_reason_code,
)
from shared.scoring.features import (
    FEATURE_NAMES,
    FloatArray,
    TransactionView,
    TxRecord,
    VelocityBatch,
    build_feature_matrix,
)
from shared.scoring.model import ModelArtifact, ReloadingModel
from shared.scoring.reloading import ReloadResult, ReloadStatus
from shared.scoring.rules import ReloadingRules, RuleMode, RuleSet

__all__ = [
    "DECISION_TO_PROTO",
    "SOURCE_TO_PROTO",
    "EncodedScore",
    "EngineResult",
    "EngineVersions",
    "ReloadOutcome",
    "ScoredEncoder",
    "ScoringEngine",
    "compute_features",
    "event_ms_of",
    "transaction_records",
    "transaction_view",
]

DECISION_TO_PROTO: Final[dict[Decision, scoring_pb2.Decision]] = {
    Decision.APPROVE: scoring_pb2.DECISION_APPROVE,
    Decision.REVIEW: scoring_pb2.DECISION_REVIEW,
    Decision.DECLINE: scoring_pb2.DECISION_DECLINE,
}
SOURCE_TO_PROTO: Final[dict[ReasonSource, scoring_pb2.Reason.Source]] = {
    ReasonSource.RULE: scoring_pb2.Reason.SOURCE_RULE,
    ReasonSource.SHADOW_RULE: scoring_pb2.Reason.SOURCE_SHADOW_RULE,
    ReasonSource.MODEL: scoring_pb2.Reason.SOURCE_MODEL,
    ReasonSource.SYSTEM: scoring_pb2.Reason.SOURCE_SYSTEM,
}


# --- protobuf Transaction -> the velocity and feature inputs (pure) -------------------------


def event_ms_of(tx: transaction_pb2.Transaction) -> int:
    """The transaction's event time in integer milliseconds (UTC)."""
    ts = tx.event_time
    return int(ts.seconds) * 1000 + int(ts.nanos) // 1_000_000


def transaction_records(transactions: Sequence[transaction_pb2.Transaction]) -> list[TxRecord]:
    """What the velocity store and the feature maths need of each Transaction.

    Amounts become major units with the currency's ISO 4217 exponent (`currency_exponent`: EUR
    1234 -> 12.34, JPY 500 -> 500.0), so amount features compare across currencies. Raises
    ValueError for an event time outside [0, 2**44) ms, which ingest never lets through; the
    scoring service converts one record at a time and dead-letters such a record."""
    return [TxRecord.from_proto(tx) for tx in transactions]


def transaction_view(records: Sequence[TxRecord]) -> TransactionView:
    """The per-transaction columns `build_feature_matrix` reads."""
    return TransactionView.from_records(records)


def compute_features(
    records: Sequence[TxRecord],
    velocity: VelocityBatch,
    view: TransactionView | None = None,
) -> FloatArray:
    """The (n, len(FEATURE_NAMES)) feature matrix of a batch: what the model and rules read.

    The one place serving (`ScoringEngine.evaluate`) and training (`shared.training`) turn
    velocity results into features, so both compute the same numbers."""
    if len(velocity) != len(records):
        raise ValueError(f"{len(velocity)} velocity rows for {len(records)} transactions")
    return build_feature_matrix(view or transaction_view(records), velocity)


# --- results ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineVersions:
    model: str
    rules: str


@dataclass(frozen=True)
class ReloadOutcome:
    """What one `maybe_reload` did to the rules and to the model."""

    rules: ReloadResult
    model: ReloadResult

    @property
    def failed(self) -> list[tuple[str, ReloadResult]]:
        return [(k, r) for k, r in (("rules", self.rules), ("model", self.model)) if r.error]

    @property
    def reloaded(self) -> list[tuple[str, ReloadResult]]:
        return [
            (k, r)
            for k, r in (("rules", self.rules), ("model", self.model))
            if r.status is ReloadStatus.RELOADED
        ]


@dataclass(frozen=True, eq=False)
class EngineResult:
    """One batch's evaluation: inputs, the feature matrix and one Assessment per transaction,
    with the rules and model that produced them (pinned for the whole batch)."""

    records: Sequence[TxRecord]
    features: FloatArray  # (n, len(FEATURE_NAMES)), the values the score used
    rules: RuleSet
    model: ModelArtifact
    assessed: BatchAssessment  # the assessments as columns: what the encoder reads

    @cached_property
    def assessments(self) -> list[Assessment]:
        """Row views of `assessed`, built on first access: the scoring service reads the
        columns (decisions, the encoder) and a row only for the rare DECLINE it logs, and a
        thousand views cost ~8% of its CPU."""
        return self.assessed.assessments()

    def __len__(self) -> int:
        return len(self.records)

    @property
    def versions(self) -> EngineVersions:
        return EngineVersions(model=self.model.version, rules=self.rules.version)

    @property
    def decisions(self) -> list[Decision]:
        """Every row's decision, without touching the `Assessment`s."""
        return self.assessed.decisions

    def rule_hit_counts(self) -> dict[tuple[str, RuleMode], int]:
        """(rule name, mode) -> rows it fired on, for metrics (by rule, not by reason code:
        rules may share a code)."""
        if not len(self.records):
            return {}
        return {
            (rule.name, rule.mode): total
            for rule, total in zip(self.rules.rules, self.assessed.rule_hit_totals, strict=True)
        }


# --- the engine -------------------------------------------------------------------------------


class ScoringEngine:
    """Rules, model and thresholds in force, and the batch evaluation over them.

    Not thread-safe; the services are single-threaded asyncio. `maybe_reload` swaps rules and
    model between batches; a broken file leaves the version in force (see `ReloadingFile`)."""

    def __init__(
        self,
        rules: ReloadingRules,
        model: ReloadingModel,
        thresholds: Thresholds,
        *,
        max_model_reasons: int = 3,
    ) -> None:
        if rules.rules.feature_names != FEATURE_NAMES:
            raise ValueError("the rules were compiled for other features than FEATURE_NAMES")
        if model.model.feature_names != FEATURE_NAMES:
            raise ValueError("the model was trained on other features than FEATURE_NAMES")
        self._rules = rules
        self._model = model
        self.thresholds = thresholds
        self.max_model_reasons = max_model_reasons
        self.encoder = ScoredEncoder()

    @classmethod
    def from_paths(
        cls,
        rules_path: str | os.PathLike[str],
        model_path: str | os.PathLike[str],
        thresholds: Thresholds | None = None,
        *,
        max_model_reasons: int = 3,
    ) -> ScoringEngine:
        """Load both files now. Raises `RulesError` / `ModelError` (a model whose features do
        not match FEATURE_NAMES is refused here, with the difference spelled out)."""
        return cls(
            ReloadingRules(rules_path, FEATURE_NAMES),
            ReloadingModel(model_path, FEATURE_NAMES),
            thresholds or Thresholds(),
            max_model_reasons=max_model_reasons,
        )

    @classmethod
    def from_settings(cls, scoring: ScoringSettings) -> ScoringEngine:
        return cls.from_paths(
            scoring.rules_path,
            scoring.model_path,
            Thresholds(review=scoring.review_threshold, decline=scoring.decline_threshold),
        )

    # ---- what is in force

    @property
    def rules(self) -> RuleSet:
        return self._rules.rules

    @property
    def model(self) -> ModelArtifact:
        return self._model.model

    @property
    def versions(self) -> EngineVersions:
        return EngineVersions(model=self._model.version, rules=self._rules.version)

    @property
    def reloading_rules(self) -> ReloadingRules:
        return self._rules

    @property
    def reloading_model(self) -> ReloadingModel:
        return self._model

    def maybe_reload(self) -> ReloadOutcome:
        """Swap in changed rules / model files (one `stat` each when nothing changed). Never
        raises for a bad file: the result says FAILED and the old version stays in force."""
        return ReloadOutcome(rules=self._rules.maybe_reload(), model=self._model.maybe_reload())

    # ---- evaluation

    def evaluate(
        self,
        records: Sequence[TxRecord],
        velocity: VelocityBatch,
        view: TransactionView | None = None,
    ) -> EngineResult:
        """Features, rules, model and decision for a batch, in one numpy pass each.

        `velocity` must hold one row per record, in order (`VelocityStore.apply_batch` or
        `peek_batch` of the same records)."""
        rules = self._rules.rules
        model = self._model.model
        matrix = compute_features(records, velocity, view)
        assessed = assess_columns(
            matrix, FEATURE_NAMES, model, rules, self.thresholds, self.max_model_reasons
        )
        return EngineResult(records, matrix, rules, model, assessed)

    # ---- protobuf out

    def to_proto(
        self,
        transaction: transaction_pb2.Transaction,
        assessment: Assessment,
        *,
        ingested_at_ms: int | None,
        scored_at_ms: int,
        degraded: bool = False,
    ) -> scoring_pb2.ScoredTransaction:
        """One ScoredTransaction message (the transaction is copied in)."""
        return to_scored_proto(
            transaction,
            assessment,
            ingested_at_ms=ingested_at_ms,
            scored_at_ms=scored_at_ms,
            degraded=degraded,
        )

    def to_protos(
        self,
        transactions: Sequence[transaction_pb2.Transaction],
        result: EngineResult,
        *,
        ingested_at_ms: Sequence[int | None] | None = None,
        scored_at_ms: int,
        degraded: bool = False,
    ) -> list[scoring_pb2.ScoredTransaction]:
        n = len(result)
        if len(transactions) != n:
            raise ValueError(f"{len(transactions)} transactions for {n} assessments")
        entered = ingested_at_ms if ingested_at_ms is not None else [None] * n
        return [
            to_scored_proto(tx, a, ingested_at_ms=t, scored_at_ms=scored_at_ms, degraded=degraded)
            for tx, a, t in zip(transactions, result.assessments, entered, strict=True)
        ]

    def encode(
        self,
        raw_transactions: Sequence[bytes],
        result: EngineResult,
        *,
        ingested_at_ms: Sequence[int | None],
        scored_at_ms: int,
        degraded: bool = False,
    ) -> list[EncodedScore]:
        """Serialized ScoredTransactions for the hot path (see `ScoredEncoder`)."""
        return self.encoder.encode(
            raw_transactions,
            result,
            ingested_at_ms=ingested_at_ms,
            scored_at_ms=scored_at_ms,
            degraded=degraded,
        )


def to_scored_proto(
    transaction: transaction_pb2.Transaction,
    assessment: Assessment,
    *,
    ingested_at_ms: int | None,
    scored_at_ms: int,
    degraded: bool = False,
) -> scoring_pb2.ScoredTransaction:
    """A ScoredTransaction built with the protobuf API (the reference for `ScoredEncoder`)."""
    scored = scoring_pb2.ScoredTransaction(
        score=assessment.score,
        decision=DECISION_TO_PROTO[assessment.decision],
        model_version=assessment.model_version,
        rules_version=assessment.rules_version,
        degraded=degraded,
    )
    scored.transaction.CopyFrom(transaction)
    for reason in assessment.reasons:
        scored.reasons.add(
            code=reason.code,
            text=reason.text,
            contribution=reason.contribution,
            source=SOURCE_TO_PROTO[reason.source],
        )
    scored.features.update(assessment.features)
    if ingested_at_ms is not None:
        scored.ingested_at.FromMilliseconds(ingested_at_ms)
    scored.scored_at.FromMilliseconds(scored_at_ms)
    return scored


# --- the hot-path encoder ---------------------------------------------------------------------

_DOUBLE: Final = struct.Struct("<d")

# Wire tags of ScoredTransaction (field number << 3 | wire type) and of its nested messages.
_T_TRANSACTION: Final = b"\x0a"  # 1, length-delimited
_T_SCORE: Final = b"\x11"  # 2, fixed64
_T_DECISION: Final = b"\x18"  # 3, varint
_T_REASON: Final = b"\x22"  # 4, length-delimited
_T_FEATURE: Final = b"\x2a"  # 5, map entry
_T_MODEL_VERSION: Final = b"\x32"  # 6
_T_RULES_VERSION: Final = b"\x3a"  # 7
_T_INGESTED_AT: Final = b"\x42"  # 8
_T_SCORED_AT: Final = b"\x4a"  # 9
_T_DEGRADED: Final = b"\x50"  # 10, varint


_SMALL_VARINTS: Final = tuple(bytes((i,)) for i in range(128))


def _varint(value: int) -> bytes:
    if 0 <= value < 128:  # lengths of ids, codes and texts: the common case, one table lookup
        return _SMALL_VARINTS[value]
    if value < 0:
        value += 1 << 64  # protobuf encodes negative int64 as ten-byte two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + _varint(len(payload)) + payload


def _timestamp_field(tag: bytes, ms: int) -> bytes:
    seconds, millis = divmod(ms, 1000)
    body = b""
    if seconds:
        body += b"\x08" + _varint(seconds)
    if millis:
        body += b"\x10" + _varint(millis * 1_000_000)
    return _length_delimited(tag, body)


def _reason_bytes(reason: Reason) -> bytes:
    """One Reason, as field 4 of a ScoredTransaction."""
    code = reason.code.encode()
    code_field = b"\x0a" + _varint(len(code)) + code
    text = reason.text.encode()
    body = b"".join(
        (
            code_field,
            b"\x12",
            _varint(len(text)),
            text,
            b"\x19",
            _DOUBLE.pack(reason.contribution),
            _SOURCE_FIELDS[reason.source],
        )
    )
    return _T_REASON + _varint(len(body)) + body


_SOURCE_FIELDS: Final = {s: b"\x20" + _varint(v) for s, v in SOURCE_TO_PROTO.items()}


class EncodedScore(NamedTuple):
    """A serialized ScoredTransaction in two parts: `core` (everything but the feature map)
    and `features` (the map). `core + features` is the full message (what goes to
    risk.scores); `core` alone is a valid ScoredTransaction without features (what the
    assessment store keeps per account, a third of the size). A NamedTuple rather than a
    frozen dataclass: one is made per transaction, and a tuple is made three times faster."""

    core: bytes
    features: bytes

    @property
    def full(self) -> bytes:
        return self.core + self.features


# The fixed-size tail of a model reason after its value's text: the rest of the text, the
# contribution (fixed64, field 3) and the source (varint, field 4). Filled in with numpy.
_MODEL_TEXT_SUFFIX: Final = MODEL_TEXT_SUFFIX.encode()
_MODEL_TAIL: Final = (
    _MODEL_TEXT_SUFFIX + b"\x19" + bytes(8) + b"\x20" + _varint(SOURCE_TO_PROTO[ReasonSource.MODEL])
)
_MODEL_TAIL_DOUBLE: Final = len(_MODEL_TEXT_SUFFIX) + 1  # offset of the contribution's bytes
# Score (fixed64, field 2) and decision (varint, field 3: every Decision is 1..3, one byte).
_SCORE_DECISION: Final = _T_SCORE + bytes(8) + _T_DECISION + b"\x00"
_LEVEL_VALUES: Final = np.array(
    [DECISION_TO_PROTO[d] for d in (Decision.APPROVE, Decision.REVIEW, Decision.DECLINE)],
    dtype=np.uint8,
)


def _fixed_rows(template: bytes, n: int) -> npt.NDArray[np.uint8]:
    """`n` copies of `template` as the rows of a (n, len(template)) byte matrix."""
    return np.tile(np.frombuffer(template, dtype=np.uint8), (n, 1))


def _split_rows(rows: npt.NDArray[np.uint8]) -> list[bytes]:
    """Each row of a byte matrix as one bytes object, in C (a fixed-width numpy bytes view).
    Only for rows that never end in a zero byte: numpy strips trailing NULs from those."""
    width = rows.shape[1]
    split: list[bytes] = np.ascontiguousarray(rows).view(f"S{width}").ravel().tolist()
    return split


def _write_doubles(rows: npt.NDArray[np.uint8], offset: int, values: Sequence[float]) -> None:
    doubles = np.asarray(values, dtype="<f8").view(np.uint8).reshape(len(values), 8)
    rows[:, offset : offset + 8] = doubles


class ScoredEncoder:
    """Builds serialized ScoredTransactions from an `EngineResult` without protobuf objects.

    Reads the batch's columns (`BatchAssessment`), never the per-row `Assessment`s. Per
    transaction what is left in Python is a handful of byte concatenations: the Transaction
    bytes are the ones received (ingest serialized them deterministically); the feature map is
    a numpy template row with the doubles written in; score and decision likewise, as are the
    fixed-size parts of model reasons; the values in model reasons' texts are formatted for the
    whole batch in one bytes % operation; rule reasons, versions and repeated lengths and
    timestamps are encoded once and looked up."""

    def __init__(self, feature_names: Sequence[str] = FEATURE_NAMES) -> None:
        self.feature_names = tuple(feature_names)
        template = bytearray()
        offsets: list[int] = []
        for name in self.feature_names:
            key = name.encode()
            entry = b"\x0a" + _varint(len(key)) + key + b"\x11"
            head = _T_FEATURE + _varint(len(entry) + 8) + entry
            template += head
            offsets.append(len(template))
            template += b"\x00" * 8
        self._template = np.frombuffer(bytes(template), dtype=np.uint8)
        self._offsets = offsets
        self._row = len(template)
        # Model reason heads by (feature index << 8 | length of the value's text): everything
        # of the reason before the value's text.
        self._model_heads: dict[int, bytes] = {}
        # Transaction field heads (tag and length) by the transaction's length.
        self._transaction_heads: dict[int, bytes] = {}
        self._versions: tuple[str, str, bytes] = ("", "", b"")

    def _version_bytes(self, model: str, rules: str) -> bytes:
        if self._versions[:2] != (model, rules):
            encoded = _length_delimited(_T_MODEL_VERSION, model.encode()) + _length_delimited(
                _T_RULES_VERSION, rules.encode()
            )
            self._versions = (model, rules, encoded)
        return self._versions[2]

    def feature_blob(self, features: FloatArray) -> bytes:
        """The feature maps of every row, concatenated (each `self._row` bytes long)."""
        n = features.shape[0]
        rows = np.tile(self._template, (n, 1))
        doubles = np.ascontiguousarray(features, dtype="<f8").view(np.uint8)
        for j, offset in enumerate(self._offsets):
            rows[:, offset : offset + 8] = doubles[:, 8 * j : 8 * j + 8]
        return rows.tobytes()

    def _model_head(self, key: int) -> bytes:
        name = self.feature_names[key >> 8]
        code = model_reason_code(name).encode()
        text_head = (name + MODEL_TEXT_INFIX).encode()
        text_length = len(text_head) + (key & 0xFF) + len(_MODEL_TEXT_SUFFIX)
        body_head = b"\x0a" + _varint(len(code)) + code + b"\x12" + _varint(text_length)
        body_length = len(body_head) + text_length + len(_MODEL_TAIL) - len(_MODEL_TEXT_SUFFIX)
        return _T_REASON + _varint(body_length) + body_head + text_head

    def model_reasons(self, batch: BatchAssessment) -> list[bytes]:
        """Every model reason of the batch as field-4 bytes, in `batch`'s flat order."""
        m = len(batch.model_feature)
        if m == 0:
            return []
        values = ((b"%.6g\x00" * m) % tuple(batch.model_value)).split(b"\x00")[:m]
        keys = [j << 8 | len(v) for j, v in zip(batch.model_feature, values, strict=True)]
        heads = self._model_heads
        for key in set(keys).difference(heads):
            heads[key] = self._model_head(key)
        tails = _fixed_rows(_MODEL_TAIL, m)
        _write_doubles(tails, _MODEL_TAIL_DOUBLE, batch.model_contribution)
        parts = zip(map(heads.__getitem__, keys), values, _split_rows(tails), strict=True)
        return list(map(b"".join, parts))

    def encode(
        self,
        raw_transactions: Sequence[bytes],
        result: EngineResult,
        *,
        ingested_at_ms: Sequence[int | None],
        scored_at_ms: int,
        degraded: bool = False,
    ) -> list[EncodedScore]:
        n = len(result)
        if len(raw_transactions) != n or len(ingested_at_ms) != n:
            raise ValueError(
                f"{len(raw_transactions)} transactions and {len(ingested_at_ms)} timestamps "
                f"for {n} assessments"
            )
        if n == 0:
            return []
        if result.features.shape[1] != len(self.feature_names):
            raise ValueError("the result's features do not match the encoder's feature names")
        batch = result.assessed
        row = self._row
        blob = self.feature_blob(result.features)
        tail = self._version_bytes(result.model.version, result.rules.version)
        tail += _timestamp_field(_T_SCORED_AT, scored_at_ms)
        if degraded:
            tail += _T_DEGRADED + b"\x01"

        lengths = list(map(len, raw_transactions))
        heads = self._transaction_heads
        for length in set(lengths).difference(heads):
            heads[length] = _T_TRANSACTION + _varint(length)
        transaction_heads = list(map(heads.__getitem__, lengths))

        fixed = _fixed_rows(_SCORE_DECISION, n)
        _write_doubles(fixed, 1, batch.scores)
        fixed[:, -1] = _LEVEL_VALUES[np.asarray(batch.levels, dtype=np.intp)]
        score_decision = _split_rows(fixed)

        # Rule and system reasons: on few rows, from few distinct Reasons, encoded once each.
        rule_fields = [_reason_bytes(r) for r in batch.rule_reasons]
        before_model: dict[int, bytes] = {
            r: b"".join(rule_fields[i] for i in hits) for r, hits in batch.rule_hits.items()
        }
        for r, reason in batch.system_reasons.items():
            before_model[r] = before_model.get(r, b"") + _reason_bytes(reason)

        model_fields = self.model_reasons(batch)
        start = batch.model_start
        # Records of one producer batch share a timestamp: encode each distinct one once.
        entered_fields: dict[int | None, bytes] = {None: b""}
        for entered in set(ingested_at_ms).difference(entered_fields):
            assert entered is not None
            entered_fields[entered] = _timestamp_field(_T_INGESTED_AT, entered)

        join = b"".join
        out: list[EncodedScore] = []
        for r, (head, raw, scored, entered) in enumerate(
            zip(transaction_heads, raw_transactions, score_decision, ingested_at_ms, strict=True)
        ):
            core = join(
                (
                    head,
                    raw,
                    scored,
                    before_model.get(r, b""),
                    join(model_fields[start[r] : start[r + 1]]),
                    tail,
                    entered_fields[entered],
                )
            )
            out.append(EncodedScore(core, blob[r * row : (r + 1) * row]))
        return out
