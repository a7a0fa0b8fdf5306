"""`fraudstream evaluate` against the real broker: the reader takes both topics to their end
(read_committed, no consumer group), and the evaluation of what it read equals the evaluation
of the same messages computed directly."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import structlog

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.cli import main as cli_main
from shared.config import Settings, TopicSettings
from shared.errors import ConfigError
from shared.evaluation import (
    DAY_S,
    EvaluationResult,
    LabelTable,
    LabelTableBuilder,
    ScoreTable,
    ScoreTableBuilder,
    evaluate,
)
from shared.evaluation_io import LABELS_FILE, SCORES_FILE, load_from_files, load_from_kafka
from shared.kafka import make_transactional_producer
from shared.scoring.features import FEATURE_NAMES
from shared.simulation.metrics import average_precision, roc_auc
from tests.kafka_helpers import produce

T0 = 1_714_521_600  # 2024-05-01T00:00:00Z
N = 400
TIMEOUT_S = 60.0  # a bound on every read, never an assertion


def _history(
    seed: int = 7, n: int = N, days: int = 24
) -> tuple[list[scoring_pb2.ScoredTransaction], list[transaction_pb2.Label]]:
    """n scored transactions over `days` days, a card each; labels for all but the last 3 days.
    Fraud is rarer than genuine and scores higher on average; `amount` tells them apart too."""
    rng = np.random.default_rng(seed)
    scored, labels = [], []
    for i in range(n):
        fraud = bool(i % 5 == 0)  # every fifth: both classes in every window
        seconds = int(rng.uniform(0, days * DAY_S))
        score = float(np.clip(rng.normal(0.65 if fraud else 0.35, 0.2), 0.0, 1.0))
        message = scoring_pb2.ScoredTransaction(
            score=score,
            decision="DECISION_REVIEW" if score >= 0.5 else "DECISION_APPROVE",
            model_version="m-test",
            rules_version="r-test",
        )
        tx = message.transaction
        tx.transaction_id, tx.account_id, tx.card_id = f"tx-{i}", f"acct-{i}", f"card-{i}"
        tx.event_time.FromSeconds(T0 + seconds)
        amount = float(rng.gamma(2.0, 60.0 if fraud else 20.0))
        message.features.update({name: 0.0 for name in FEATURE_NAMES})
        message.features["amount"] = amount
        message.features["amount_log"] = math.log1p(amount)
        scored.append(message)
        if seconds < (days - 3) * DAY_S:
            label = transaction_pb2.Label(
                transaction_id=tx.transaction_id,
                account_id=tx.account_id,
                is_fraud=fraud,
                source="test",
            )
            label.reported_at.FromSeconds(T0 + seconds + 7 * 86_400)
            labels.append(label)
    return scored, labels


def _direct_tables(
    scored: list[scoring_pb2.ScoredTransaction], labels: list[transaction_pb2.Label]
) -> tuple[ScoreTable, LabelTable]:
    score_builder, label_builder = ScoreTableBuilder(), LabelTableBuilder()
    for message in scored:
        score_builder.add_proto(message)
    for label in labels:
        label_builder.add_proto(label)
    return score_builder.build(), label_builder.build()


async def _publish(
    settings: Settings,
    scored: list[scoring_pb2.ScoredTransaction],
    labels: list[transaction_pb2.Label],
) -> None:
    await produce(
        settings,
        settings.topics.scores,
        [(m.transaction.account_id.encode(), m.SerializeToString(), None) for m in scored],
    )
    await produce(
        settings,
        settings.topics.labels,
        [(m.account_id.encode(), m.SerializeToString(), None) for m in labels],
    )


def _assert_same_evaluation(got: EvaluationResult, expected: EvaluationResult) -> None:
    assert got.join == expected.join
    assert got.split == expected.split
    assert (got.train, got.test_all, got.test) == (expected.train, expected.test_all, expected.test)
    for a, b in zip(got.detectors, expected.detectors, strict=True):
        assert a.name == b.name
        # The read order differs from the publish order (three partitions), which moves the
        # offline model's floating-point sums in the last digits, nothing more.
        for metric in ("auc", "average_precision", "card_precision", "flag_precision"):
            value, want = getattr(a, metric), getattr(b, metric)
            assert value == (None if want is None else pytest.approx(want, rel=1e-9))


async def test_both_topics_are_read_to_the_end_and_evaluate_as_computed_directly(
    settings: Settings, tmp_path: Path
) -> None:
    scored, labels = _history()
    await _publish(settings, scored, labels)
    # Not a ScoredTransaction: counted and skipped, never fatal.
    await produce(settings, settings.topics.scores, [(b"acct-x", b"\xff\xfe not protobuf", None)])

    loaded = await load_from_kafka(settings, timeout_s=TIMEOUT_S, dump_dir=tmp_path / "dump")
    score_source, label_source = loaded.sources
    assert (score_source.name, score_source.read, score_source.rejected) == (
        settings.topics.scores,
        N + 1,
        1,
    )
    assert score_source.complete and score_source.stopped_by == "end"
    assert score_source.available == N + 1
    assert (label_source.read, label_source.rejected, label_source.complete) == (
        len(labels),
        0,
        True,
    )
    assert len(loaded.scores) == N
    assert sorted(loaded.scores.transaction_id.tolist()) == sorted(
        m.transaction.transaction_id for m in scored
    )

    result = evaluate(loaded.scores, loaded.labels)
    assert result.join.joined == len(labels)
    assert result.join.unlabelled == N - len(labels)
    assert result.split is not None and result.split.mode == "handbook"
    _assert_same_evaluation(result, evaluate(*_direct_tables(scored, labels)))

    # And against the metrics themselves, on the test window written out by hand (one card per
    # transaction, so no card is known compromised before its day).
    first_day = min(m.transaction.event_time.seconds for m, _ in _labelled(scored, labels))
    start = T0 + ((first_day - T0) // DAY_S + 14) * DAY_S
    test = [
        (m, lab)
        for m, lab in _labelled(scored, labels)
        if start <= m.transaction.event_time.seconds < start + 7 * DAY_S
    ]
    y = [lab.is_fraud for _, lab in test]
    s = [m.score for m, _ in test]
    live = result.detectors[0]
    assert result.test.transactions == len(test) == result.test_all.transactions
    assert live.auc == pytest.approx(roc_auc(y, s))
    assert live.average_precision == pytest.approx(average_precision(y, s))

    # What was read was dumped, and evaluates the same from the files.
    from_files = load_from_files(tmp_path / "dump" / SCORES_FILE, tmp_path / "dump" / LABELS_FILE)
    assert (len(from_files.scores), len(from_files.labels)) == (N, len(labels))
    _assert_same_evaluation(evaluate(from_files.scores, from_files.labels), result)


def _labelled(
    scored: list[scoring_pb2.ScoredTransaction], labels: list[transaction_pb2.Label]
) -> list[tuple[scoring_pb2.ScoredTransaction, transaction_pb2.Label]]:
    by_id = {label.transaction_id: label for label in labels}
    return [
        (m, by_id[m.transaction.transaction_id])
        for m in scored
        if m.transaction.transaction_id in by_id
    ]


async def test_only_committed_records_are_read_and_an_open_transaction_is_not_waited_for(
    settings: Settings,
) -> None:
    _, labels = _history(n=100, days=10)
    producer = make_transactional_producer(settings, f"evaluate-test-{settings.instance_id}")
    await producer.start()
    try:
        async with producer.transaction():
            for label in labels[:40]:
                await producer.send(settings.topics.labels, label.SerializeToString(), key=b"a")
        await producer.begin_transaction()
        for label in labels[40:60]:
            await producer.send(settings.topics.labels, label.SerializeToString(), key=b"a")
        await producer.abort_transaction()
        async with producer.transaction():
            for label in labels[60:70]:
                await producer.send(settings.topics.labels, label.SerializeToString(), key=b"a")
        # Left open while reading: its records are past the last stable offset.
        await producer.begin_transaction()
        for label in labels[70:]:
            await producer.send(settings.topics.labels, label.SerializeToString(), key=b"a")
        await producer.flush()

        loaded = await load_from_kafka(settings, timeout_s=TIMEOUT_S)
        _, label_source = loaded.sources
        assert label_source.complete and label_source.stopped_by == "end"
        assert sorted(loaded.labels.transaction_id.tolist()) == sorted(
            label.transaction_id for label in labels[:40] + labels[60:70]
        )
        await producer.abort_transaction()
    finally:
        await producer.stop()


async def test_max_records_bounds_the_read_and_says_it_is_partial(settings: Settings) -> None:
    scored, _ = _history(n=120)
    await _publish(settings, scored, [])
    loaded = await load_from_kafka(settings, max_records=50, timeout_s=TIMEOUT_S)
    score_source, label_source = loaded.sources
    assert (score_source.read, score_source.complete, score_source.stopped_by) == (
        50,
        False,
        "max_records",
    )
    assert "PARTIAL: --max-records reached, 50 of about 120 records" in score_source.describe()
    assert len(loaded.scores) == 50
    # An empty topic is read to its end at once.
    assert (label_source.read, label_source.complete) == (0, True)

    # A budget spent before the first poll: nothing read, and the report says why.
    expired = await load_from_kafka(settings, timeout_s=1e-9)
    assert (expired.sources[0].read, expired.sources[0].stopped_by) == (0, "timeout")
    assert "PARTIAL: --timeout reached, 0 of about 120 records" in expired.sources[0].describe()


async def test_a_missing_topic_names_its_variable(settings: Settings) -> None:
    missing = dataclasses.replace(
        settings, topics=dataclasses.replace(settings.topics, scores="no-such-topic-evaluate")
    )
    with pytest.raises(ConfigError, match="TOPIC_RISK_SCORES"):
        await load_from_kafka(missing, timeout_s=TIMEOUT_S)


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """The command configures logging for the process, onto this test's captured stderr; later
    tests must not log into that closed file."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    config = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        structlog.configure(**config)
        structlog.contextvars.clear_contextvars()


@pytest.mark.usefixtures("restore_logging")
def test_the_command_reads_kafka_and_writes_the_report(
    settings: Settings,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # A plain test: the command runs its own event loop (asyncio.run), as from a shell.
    scored, labels = _history(seed=3)
    asyncio.run(_publish(settings, scored, labels))
    topics: TopicSettings = settings.topics
    monkeypatch.setenv("KAFKA_BOOTSTRAP_SERVERS", settings.kafka.bootstrap_servers)
    monkeypatch.setenv("TOPIC_RISK_SCORES", topics.scores)
    monkeypatch.setenv("TOPIC_RISK_LABELS", topics.labels)
    monkeypatch.setenv("LOG_FORMAT", "console")
    out = tmp_path / "out"
    code = cli_main(
        ["evaluate", "--out", str(out), "--dump", str(tmp_path / "dump"), "--rules",
         "rules/default.toml", "--timeout", str(TIMEOUT_S)]
    )  # fmt: skip
    assert code == 0
    report = (out / "report.md").read_text()
    assert capsys.readouterr().out == report
    assert f"scored transactions: {N:,} from `{topics.scores}` (read to the end)" in report
    assert "| live pipeline score |" in report
    assert "| rule compromised_terminal (score_floor, active) |" in report
    assert (out / "roc.png").exists() and (out / "pr.png").exists()
    assert (tmp_path / "dump" / SCORES_FILE).read_text().count("\n") == N
