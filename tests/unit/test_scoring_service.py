"""The scoring transform with hand-written fakes for its two stores (no network): order of
outputs, dead letters for bad records and for records the velocity script fails on, metrics
applied only after the commit, reload failures counted.

The real stores run in tests/integration/test_scoring.py; these fakes keep their contracts
(the velocity fake is the store's reference semantics, `ReferenceVelocity`)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
from aiokafka.structs import ConsumerRecord
from prometheus_client import CollectorRegistry
from redis.exceptions import ResponseError

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from services.scoring.labels import LabelMetrics, LabelProcessor, cell_of
from services.scoring.service import (
    ScoringMetrics,
    ScoringService,
    first_applications,
)
from shared.config import TopicSettings
from shared.dlq import DLQ_HEADER_CODE, DLQ_HEADER_SOURCE_OFFSET
from shared.scoring.assessments import AssessmentEntry, FirstApplication, LabelMatch, LabelStatus
from shared.scoring.engine import ScoringEngine
from shared.scoring.features import (
    APPLIED,
    DUPLICATE,
    FEATURE_NAMES,
    RAW_COLUMNS,
    LabelRecord,
    ReferenceVelocity,
    TxRecord,
    VelocityBatch,
)
from shared.scoring.model import ModelArtifact, save_model

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RULES_VERSION = tomllib.loads((REPO / "rules" / "default.toml").read_text())["version"]
T0 = 1_767_225_600_000
D = len(FEATURE_NAMES)


class FakeVelocity:
    """The velocity store's semantics in memory; a transaction id "poison" makes the "script"
    fail, as a Lua runtime error would (after applying what came before it, like Redis)."""

    def __init__(self) -> None:
        self.reference = ReferenceVelocity()
        self.calls = 0

    async def apply_batch(self, records: list[TxRecord]) -> VelocityBatch:
        self.calls += 1
        results = []
        for record in records:
            if record.transaction_id == "poison":
                raise ResponseError("Error running script: attempt to compare nil with number")
            results.append(self.reference.apply(record))
        return VelocityBatch.from_results(results)

    def pack_batch(self, records: list[TxRecord]) -> FakePacked:
        return FakePacked(self, records)


class FakePacked:
    """A packed batch: submitted as is."""

    def __init__(self, velocity: FakeVelocity, records: list[TxRecord]) -> None:
        self.velocity = velocity
        self.records = records

    async def submit(self) -> FakePending:
        return FakePending(self.velocity, self.records)


class FakePending:
    """A submitted batch: applied when its result is read (results are read in order)."""

    def __init__(self, velocity: FakeVelocity, records: list[TxRecord]) -> None:
        self.velocity = velocity
        self.records = records

    async def result(self) -> VelocityBatch:
        return await self.velocity.apply_batch(self.records)


class FakeAssessments:
    def __init__(self) -> None:
        self.written: list[AssessmentEntry] = []

    async def write_encoded(self, entries: list[AssessmentEntry]) -> int:
        self.written.extend(entries)
        return len({e.account_id for e in entries})


def make_tx(index: int, transaction_id: str | None = None) -> transaction_pb2.Transaction:
    tx = transaction_pb2.Transaction(
        transaction_id=transaction_id or f"tx-{index}",
        account_id=f"acct-{index % 2}",
        merchant_id="m-1",
        terminal_id="t-1",
        amount=transaction_pb2.Money(units=1500, currency="EUR"),
        country="NL",
    )
    tx.event_time.FromMilliseconds(T0 + index * 1000)
    return tx


def record(offset: int, value: bytes | None, timestamp: int | None = None) -> ConsumerRecord:
    return ConsumerRecord(
        "transactions.valid",
        2,
        offset,
        timestamp if timestamp is not None else T0 + 10 * offset,
        0,
        b"key",
        value,
        None,
        len(value or b""),
        0,
        [("trace", b"t-1")],
    )


@pytest.fixture
def service(tmp_path: Path) -> tuple[ScoringService, FakeVelocity, FakeAssessments, Any]:
    model = tmp_path / "model.json"
    save_model(
        ModelArtifact(
            version="m-1",
            feature_names=FEATURE_NAMES,
            mean=np.zeros(D),
            scale=np.ones(D),
            weights=np.zeros(D),
            bias=-3.0,
            trained_at="2026-11-25T00:00:00+00:00",
        ),
        model,
    )
    rules = tmp_path / "rules.toml"
    rules.write_text((REPO / "rules" / "default.toml").read_text())
    registry = CollectorRegistry()
    velocity, assessments = FakeVelocity(), FakeAssessments()
    svc = ScoringService(
        topics=TopicSettings(),
        engine=ScoringEngine.from_paths(rules, model),
        velocity=cast(Any, velocity),
        assessments=cast(Any, assessments),
        metrics=ScoringMetrics(registry),
        clock=lambda: T0 / 1000 + 60,
    )
    return svc, velocity, assessments, (registry, rules)


async def test_outputs_in_source_order_with_dead_letters_in_place(service: Any) -> None:
    svc, _, assessments, _ = service
    records = [
        record(0, make_tx(0).SerializeToString()),
        record(1, b"\xff\xff not protobuf"),
        record(2, make_tx(2).SerializeToString()),
        record(3, None),
        record(4, transaction_pb2.Transaction(transaction_id="no-account").SerializeToString()),
        record(5, make_tx(5).SerializeToString()),
    ]
    outputs = await svc.transform(records)
    assert [o.topic for o in outputs] == [
        "risk.scores",
        "transactions.dlq",
        "risk.scores",
        "transactions.dlq",
        "transactions.dlq",
        "risk.scores",
    ]
    codes = [dict(o.headers)[DLQ_HEADER_CODE] for o in outputs if o.headers]
    assert codes == [b"UNDECODABLE", b"EMPTY_PAYLOAD", b"MISSING_FIELD"]
    dead = outputs[1]
    assert dead.value == records[1].value and dead.key == b"key"
    assert dict(dead.headers)["trace"] == b"t-1"
    assert dict(dead.headers)[DLQ_HEADER_SOURCE_OFFSET] == b"1"
    scored = scoring_pb2.ScoredTransaction.FromString(outputs[5].value)
    assert scored.transaction == make_tx(5)
    assert outputs[5].key == b"acct-1"
    assert outputs[5].timestamp_ms == records[5].timestamp == scored.ingested_at.ToMilliseconds()
    assert scored.scored_at.ToMilliseconds() == T0 + 60_000
    assert [e.transaction_id for e in assessments.written] == ["tx-0", "tx-2", "tx-5"]
    slim = scoring_pb2.ScoredTransaction.FromString(assessments.written[2].payload)
    scored.ClearField("features")
    assert slim == scored


async def test_a_record_the_velocity_script_fails_on_is_isolated_and_dead_lettered(
    service: Any,
) -> None:
    svc, velocity, _, (registry, _) = service
    txs = [make_tx(i) for i in range(7)]
    txs[4] = make_tx(4, transaction_id="poison")
    outputs = await svc.transform([record(i, t.SerializeToString()) for i, t in enumerate(txs)])
    assert [o.topic for o in outputs] == ["risk.scores"] * 4 + ["transactions.dlq"] + [
        "risk.scores"
    ] * 2
    assert dict(outputs[4].headers)[DLQ_HEADER_CODE] == b"INTERNAL_ERROR"
    assert velocity.calls > 1  # split until the poison was alone
    scored = [scoring_pb2.ScoredTransaction.FromString(o.value) for o in outputs if not o.headers]
    # Every other transaction counted once: acct-0 has tx 0, 2, 6 (the 4th was the poison).
    counts = {s.transaction.transaction_id: s.features["count_1h"] for s in scored}
    assert counts == {"tx-0": 1, "tx-1": 1, "tx-2": 2, "tx-3": 2, "tx-5": 3, "tx-6": 3}
    svc.on_batch_committed(7, 7, 0.01)
    value = registry.get_sample_value
    assert value("fraudstream_scoring_rejected_total", {"code": "INTERNAL_ERROR"}) == 1


async def test_metrics_move_only_when_the_batch_commits(service: Any) -> None:
    svc, _, _, (registry, _) = service
    batch = [record(i, make_tx(i).SerializeToString()) for i in range(3)]
    await svc.transform(batch)
    svc.on_batches_discarded()  # the attempt aborted: the loop reads the batch again
    await svc.transform(batch)
    value = registry.get_sample_value
    assert value("fraudstream_scoring_scored_total", {"decision": "APPROVE"}) is None
    svc.on_batch_committed(3, 3, 0.01)
    assert value("fraudstream_scoring_scored_total", {"decision": "APPROVE"}) == 3
    assert value("fraudstream_scoring_batch_size_count") == 1
    assert sum(svc.totals.scored.values()) == 3


async def test_overlapping_batches_are_counted_in_commit_order(service: Any) -> None:
    # With a pipeline depth the next batch is transformed before the previous one commits.
    svc, _, _, (registry, _) = service
    await svc.transform([record(i, make_tx(i).SerializeToString()) for i in range(3)])
    await svc.transform([record(i, make_tx(i).SerializeToString()) for i in range(3, 5)])
    value = registry.get_sample_value
    svc.on_batch_committed(3, 3, 0.01)
    assert value("fraudstream_scoring_scored_total", {"decision": "APPROVE"}) == 3
    svc.on_batch_committed(2, 2, 0.01)
    assert value("fraudstream_scoring_scored_total", {"decision": "APPROVE"}) == 5
    assert value("fraudstream_scoring_batch_size_count") == 2


async def test_a_broken_rules_file_is_counted_and_the_old_rules_stay(service: Any) -> None:
    svc, _, _, (registry, rules) = service
    rules.write_text('version = "broken"\n[[rule]]\nname = "x"\nexpression = "open(1)"\n')
    outputs = await svc.transform([record(0, make_tx(0).SerializeToString())])
    scored = scoring_pb2.ScoredTransaction.FromString(outputs[0].value)
    assert scored.rules_version == DEFAULT_RULES_VERSION
    value = registry.get_sample_value
    assert (
        value("fraudstream_scoring_reloads_total", {"artifact": "rules", "outcome": "failed"}) == 1
    )
    assert (
        value(
            "fraudstream_scoring_version_info",
            {"artifact": "rules", "version": DEFAULT_RULES_VERSION},
        )
        == 1
    )


# --- labels -----------------------------------------------------------------------------------


class FakeLabelStores:
    """Both stores of the label processor: decisions recorded per transaction, terminal labels
    taken as given; a transaction id "poison" fails the terminal script."""

    def __init__(self, decisions: dict[str, tuple[int, int]]) -> None:
        self.decisions = decisions  # transaction id -> (event ms, decision)
        self.verdicts: dict[str, bool] = {}
        self.applied: list[LabelRecord] = []

    async def match_labels(self, labels: list[tuple[str, str, bool]]) -> list[LabelMatch]:
        out = []
        for _, txid, is_fraud in labels:
            if txid not in self.decisions:
                out.append(LabelMatch(LabelStatus.UNKNOWN, None, None, None))
                continue
            ms, decision = self.decisions[txid]
            previous = self.verdicts.get(txid)
            status = (
                LabelStatus.FIRST
                if previous is None
                else LabelStatus.REPEATED
                if previous == is_fraud
                else LabelStatus.CHANGED
            )
            self.verdicts[txid] = is_fraud
            out.append(LabelMatch(status, ms, decision, previous))
        return out

    async def apply_labels(self, labels: list[LabelRecord]) -> list[bool]:
        if any(label.transaction_id == "poison" for label in labels):
            raise ResponseError("Error running script")
        self.applied.extend(labels)
        return [label.is_fraud for label in labels]


def label(txid: str, is_fraud: bool, reported_ms: int = T0 + 7 * 86_400_000) -> bytes:
    message = transaction_pb2.Label(
        transaction_id=txid, account_id="acct-1", terminal_id="t-1", is_fraud=is_fraud
    )
    message.reported_at.FromMilliseconds(reported_ms)
    return message.SerializeToString()


async def test_labels_are_matched_counted_and_booked_on_the_transaction_day() -> None:
    review, approve = scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_APPROVE
    stores = FakeLabelStores({"a": (T0, review), "b": (T0 + 5, approve), "c": (T0 + 9, review)})
    processor = LabelProcessor(velocity=cast(Any, stores), assessments=cast(Any, stores))
    registry = CollectorRegistry()
    metrics = LabelMetrics(registry)
    first = await processor.process(
        [
            record(0, label("a", True)),  # flagged fraud: tp
            record(1, label("b", True)),  # approved fraud: fn
            record(2, label("c", False)),  # flagged genuine: fp
            record(3, label("zz", True)),  # never scored here: unknown
            record(4, b"\x00garbage"),
        ]
    )
    metrics.observe(first)
    assert first.verdicts == {"tp": 1, "fn": 1, "fp": 1}
    assert first.outcomes == {"matched": 3, "unknown": 1, "malformed": 1}
    # Fraud is booked on the transaction's day (from its decision), or the report day when
    # the transaction is unknown.
    booked = {lb.transaction_id: lb.event_ms for lb in stores.applied}
    assert booked == {"a": T0, "b": T0 + 5, "c": T0 + 9, "zz": T0 + 7 * 86_400_000}
    value = registry.get_sample_value
    assert value("fraudstream_scoring_live_precision") == 0.5
    assert value("fraudstream_scoring_live_recall") == 0.5

    again = await processor.process([record(5, label("a", True)), record(6, label("c", True))])
    metrics.observe(again)
    assert again.outcomes == {"repeated": 1, "changed": 1}
    assert again.withdrawn == {"fp": 1} and again.verdicts == {"tp": 1}
    assert value("fraudstream_scoring_live_confusion", {"cell": "tp"}) == 2
    assert value("fraudstream_scoring_live_confusion", {"cell": "fp"}) == 0
    assert value("fraudstream_scoring_live_precision") == 1.0
    assert value("fraudstream_scoring_label_verdicts_withdrawn_total", {"cell": "fp"}) == 1


async def test_a_label_the_script_fails_on_is_skipped_not_a_poison_pill() -> None:
    stores = FakeLabelStores({"a": (T0, scoring_pb2.DECISION_APPROVE)})
    processor = LabelProcessor(velocity=cast(Any, stores), assessments=cast(Any, stores))
    outcome = await processor.process(
        [record(0, label("a", True)), record(1, label("poison", True))]
    )
    assert outcome.outcomes["failed"] == 1
    assert [lb.transaction_id for lb in stores.applied] == ["a"]


def test_cells() -> None:
    assert cell_of(scoring_pb2.DECISION_DECLINE, True) == "tp"
    assert cell_of(scoring_pb2.DECISION_REVIEW, False) == "fp"
    assert cell_of(scoring_pb2.DECISION_APPROVE, True) == "fn"
    assert cell_of(scoring_pb2.DECISION_APPROVE, False) == "tn"


def test_first_applications_come_from_the_velocity_statuses_and_flags() -> None:
    """Only a transaction the store applied now takes the assessment store's fast path, with
    the store's newest flag, previous transaction and 30-day count; a replay (DUPLICATE) and a
    batch whose store reported no flags take the careful path (None)."""
    raw = np.zeros((3, len(RAW_COLUMNS)))
    column = RAW_COLUMNS.index
    raw[:, 0] = [APPLIED, DUPLICATE, APPLIED]
    raw[:, column("prev_event_ms")] = [np.nan, 5_000.0, 7_000.0]
    raw[:, column("count_30d")] = [1, 4, 9]
    flagged = VelocityBatch(raw, np.array([True, True, False]))
    assert first_applications(flagged) == [
        FirstApplication(in_order=True, previous_ms=None, count_30d=1),
        None,
        FirstApplication(in_order=False, previous_ms=7_000, count_30d=9),
    ]
    assert first_applications(VelocityBatch(raw)) == [None, None, None]
