"""`fraudstream evaluate` without a broker: the join, the split, known-compromised cards, every
row of the report on data with known answers, the JSON-lines files and the command itself."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared.cli import main as cli_main
from shared.evaluation import (
    DAY_S,
    HANDBOOK_REFERENCES,
    DetectorResult,
    EvaluationOptions,
    EvaluationResult,
    LabelTable,
    LabelTableBuilder,
    ScoreTable,
    ScoreTableBuilder,
    evaluate,
    join_scores_and_labels,
    known_compromised,
    plan_split,
    render_report,
    write_plots,
)
from shared.evaluation_io import load_from_files, write_jsonl
from shared.scoring.features import FEATURE_NAMES
from shared.scoring.model import decision_function, fit_logistic_regression
from shared.scoring.rules import parse_rules
from shared.simulation.metrics import average_precision, card_precision_at_k, roc_auc

T0 = 1_714_521_600.0  # 2024-05-01T00:00:00Z, a UTC midnight
HOUR = 3600.0

RULES = """
version = "test-rules-1"

[[rule]]
name = "big_amount"
expression = "amount > 100"
action = "review"
reason_code = "BIG"
reason_text = "big"
mode = "active"

[[rule]]
name = "never"
expression = "amount > 1000000000"
action = "decline"
reason_code = "NEVER"
reason_text = "never fires"
mode = "shadow"
"""


@dataclass
class Row:
    """One scored transaction with its (optional) label, as a test writes it."""

    tx: str
    card: str
    day: float  # days after T0 (fractions are times of day)
    score: float
    fraud: bool | None  # None: no label
    reported_day: float | None = None  # default: 7 days after the transaction
    decision: str = "APPROVE"
    amount: float = 10.0
    features: dict[str, float] = field(default_factory=dict)


def _tables(rows: Sequence[Row]) -> tuple[ScoreTable, LabelTable]:
    scores, labels = ScoreTableBuilder(), LabelTableBuilder()
    for r in rows:
        features = {name: 0.0 for name in FEATURE_NAMES}
        features.update(amount=r.amount, amount_log=math.log1p(r.amount), **r.features)
        scores.add(
            transaction_id=r.tx,
            card_id=r.card,
            event_time=T0 + r.day * DAY_S,
            score=r.score,
            decision=r.decision,
            features=features,
            model_version="m1",
            rules_version="r1",
        )
        if r.fraud is not None:
            reported = r.reported_day if r.reported_day is not None else r.day + 7
            labels.add(transaction_id=r.tx, is_fraud=r.fraud, reported_at=T0 + reported * DAY_S)
    return scores.build(), labels.build()


def _row(result: EvaluationResult, name: str) -> DetectorResult:
    [row] = [d for d in result.detectors if d.name.startswith(name)]
    return row


# --- tables and the join ----------------------------------------------------------------------


def test_the_builder_counts_missing_and_unknown_features_and_falls_back_to_the_account() -> None:
    builder = ScoreTableBuilder(("a", "b"))
    builder.add(
        transaction_id="t1",
        card_id="",
        account_id="acct-1",
        event_time=T0,
        score=0.5,
        decision="REVIEW",
        features={"a": 1.0, "zzz": 2.0},
    )
    builder.add(
        transaction_id="t2",
        card_id="card-2",
        event_time=T0 + 1,
        score=0.1,
        decision=scoring_pb2.DECISION_DECLINE,
        features={"a": 3.0, "b": 4.0},
    )
    table = builder.build()
    assert table.card_id.tolist() == ["acct-1", "card-2"]
    assert table.cards_from_account == 1
    assert dict(table.missing_features) == {"b": 1}
    assert dict(table.unknown_features) == {"zzz": 1}
    np.testing.assert_array_equal(table.features, [[1.0, np.nan], [3.0, 4.0]])
    assert table.decision.tolist() == [scoring_pb2.DECISION_REVIEW, scoring_pb2.DECISION_DECLINE]


def test_add_proto_reads_the_scored_transaction() -> None:
    message = scoring_pb2.ScoredTransaction(
        score=0.75,
        decision=scoring_pb2.DECISION_DECLINE,
        model_version="m",
        rules_version="r",
        degraded=True,
    )
    message.transaction.transaction_id = "tx-1"
    message.transaction.card_id = "card-1"
    message.transaction.event_time.FromSeconds(int(T0) + 5)
    message.features["amount"] = 12.5
    builder = ScoreTableBuilder()
    builder.add_proto(message)
    table = builder.build()
    assert table.transaction_id.tolist() == ["tx-1"]
    assert table.event_time.tolist() == [T0 + 5]
    assert table.features[0, FEATURE_NAMES.index("amount")] == 12.5
    assert table.missing_features["terminal_risk_7d"] == 1
    assert table.degraded == 1


def test_the_join_keeps_the_first_score_the_latest_label_and_counts_the_rest() -> None:
    scores, _ = _tables(
        [
            Row("t1", "c1", 0, 0.9, None),
            Row("t1", "c1", 0, 0.1, None),  # scored twice: the first one counts
            Row("t2", "c2", 0, 0.2, None),  # never labelled
            Row("t3", "c3", 0, 0.3, None),
        ]
    )
    builder = LabelTableBuilder()
    builder.add(transaction_id="t1", is_fraud=False, reported_at=T0 + 2 * DAY_S)
    builder.add(transaction_id="t1", is_fraud=True, reported_at=T0 + 1 * DAY_S)
    builder.add(transaction_id="t3", is_fraud=True, reported_at=T0 + 3 * DAY_S)
    builder.add(transaction_id="t3", is_fraud=True, reported_at=T0 + 5 * DAY_S)
    builder.add(transaction_id="orphan", is_fraud=True, reported_at=T0)
    joined = join_scores_and_labels(scores, builder.build())

    assert joined.table.transaction_id.tolist() == ["t1", "t3"]
    assert joined.table.score.tolist() == [0.9, 0.3]
    # t1: reported fraud, then cleared: the latest label (genuine) counts, and a genuine
    # transaction marks nothing as compromised.
    assert joined.is_fraud.tolist() == [False, True]
    assert joined.fraud_known_at.tolist() == [math.inf, T0 + 3 * DAY_S]  # the first report
    s = joined.stats
    assert (s.scored, s.duplicate_scores, s.joined, s.unlabelled) == (4, 1, 2, 1)
    assert (s.labels, s.labelled_transactions, s.relabelled, s.conflicting) == (5, 3, 2, 1)
    assert s.labels_without_score == 1


def test_the_join_of_nothing_is_nothing() -> None:
    scores, labels = _tables([])
    joined = join_scores_and_labels(scores, labels)
    assert len(joined.table) == 0
    assert joined.stats.joined == 0


# --- the split --------------------------------------------------------------------------------


def test_the_handbook_split_is_seven_seven_seven_days_from_the_first_labelled_day() -> None:
    times = T0 + np.array([0.5, 3.2, 20.9, 24.1]) * DAY_S
    split = plan_split(times)
    assert split.mode == "handbook"
    assert (split.train.start, split.train.end) == (T0, T0 + 7 * DAY_S)
    assert (split.delay.start, split.delay.end) == (T0 + 7 * DAY_S, T0 + 14 * DAY_S)
    assert (split.test.start, split.test.end) == (T0 + 14 * DAY_S, T0 + 21 * DAY_S)
    assert split.history_days == 25
    assert "4 labelled days after the test window are not used" in split.note


def test_the_window_lengths_and_the_start_are_options() -> None:
    times = T0 + np.arange(30) * DAY_S + HOUR
    split = plan_split(times, train_days=3, delay_days=0, test_days=2, start=T0 + 10.5 * DAY_S)
    assert split.mode == "handbook"
    assert (split.train.start, split.train.end) == (T0 + 10 * DAY_S, T0 + 13 * DAY_S)
    assert split.delay.days == 0
    assert (split.test.start, split.test.end) == (T0 + 13 * DAY_S, T0 + 15 * DAY_S)


def test_a_shorter_history_is_split_in_proportion_by_whole_days_and_says_so() -> None:
    times = T0 + np.arange(10) * DAY_S + HOUR  # 10 days for 7 + 7 + 7
    split = plan_split(times)
    assert split.mode == "proportional days"
    assert [split.train.days, split.delay.days, split.test.days] == [3, 3, 4]
    assert split.train.start == T0
    assert split.test.end == T0 + 10 * DAY_S
    assert "SHORT HISTORY" in split.note
    assert "train 3 + delay 3 + test 4" in split.note


def test_a_history_of_hours_is_split_in_proportion_by_time() -> None:
    times = T0 + np.array([1.0, 4.0, 7.0, 10.0]) * HOUR
    split = plan_split(times, train_days=2, delay_days=1, test_days=1)
    assert split.mode == "proportional time"
    assert split.train.start == T0 + 1 * HOUR
    assert split.delay.start == pytest.approx(T0 + 5.5 * HOUR)
    assert split.test.start == pytest.approx(T0 + 7.75 * HOUR)
    # Every transaction is in exactly one window, the last one included.
    windows = (split.train, split.delay, split.test)
    assert sum(w.contains(times).sum() for w in windows) == 4
    assert split.test.contains(times)[-1]
    assert "SHORT HISTORY" in split.note


@given(
    days=st.lists(st.floats(0, 60, allow_nan=False), min_size=1, max_size=30),
    train=st.integers(1, 10),
    delay=st.integers(0, 10),
    test=st.integers(1, 10),
)
def test_every_split_is_three_adjacent_windows_over_the_history(
    days: list[float], train: int, delay: int, test: int
) -> None:
    times = T0 + np.array(days) * DAY_S
    split = plan_split(times, train_days=train, delay_days=delay, test_days=test)
    assert split.train.end == split.delay.start
    assert split.delay.end == split.test.start
    assert split.train.start <= times.min()
    if split.mode != "proportional time":  # by time, a single instant has nothing to split
        assert split.train.days >= 1 and split.test.days >= 1
        assert (split.delay.days > 0) == (delay > 0)
    if split.mode == "handbook":
        assert (split.train.days, split.delay.days, split.test.days) == (train, delay, test)
    else:
        # The whole history is used, and only then is the split not the protocol's own.
        assert split.test.end > times.max()
        assert split.history_days < train + delay + test
        assert "SHORT HISTORY" in split.note


@pytest.mark.parametrize(("train", "delay", "test"), [(0, 7, 7), (7, -1, 7), (7, 7, 0)])
def test_impossible_window_lengths_are_refused(train: int, delay: int, test: int) -> None:
    with pytest.raises(ValueError):
        plan_split([T0], train_days=train, delay_days=delay, test_days=test)


def test_no_history_cannot_be_split() -> None:
    with pytest.raises(ValueError, match="no labelled transactions"):
        plan_split([T0], start=T0 + 5 * DAY_S)


# --- known-compromised cards ------------------------------------------------------------------


def test_a_card_is_known_compromised_from_the_day_after_its_fraud_was_reported() -> None:
    inf = math.inf
    rows = [
        # card, event day, fraud reported at (day) or inf
        ("A", 2.5, 3.2),  # the fraud itself: reported after its own day began
        ("A", 3.1, inf),  # same day as the report: not known before the day began
        ("A", 4.0, inf),  # the next day: known
        ("B", 1.0, inf),  # genuine only: never
        ("B", 9.0, inf),
        ("C", 5.0, 30.0),  # reported late: not yet known on day 9
        ("C", 9.0, inf),
        ("C", 31.0, inf),  # but known on day 31
    ]
    mask = known_compromised(
        [c for c, _, _ in rows],
        [T0 + d * DAY_S for _, d, _ in rows],
        [T0 + r * DAY_S for _, _, r in rows],
    )
    assert mask.tolist() == [False, False, True, False, False, False, False, True]
    assert known_compromised([], [], []).tolist() == []


# --- every row, on known answers --------------------------------------------------------------


def _known_answer_rows() -> list[Row]:
    train = [
        # Training window (days 0-6): frauds are big, genuine payments small.
        *(Row(f"g{i}", f"cg{i}", i % 7 + 0.5, 0.1, False, amount=10.0 + i) for i in range(12)),
        *(Row(f"f{i}", f"cf{i}", i % 7 + 0.6, 0.8, True, amount=200.0 + i) for i in range(4)),
        # Card A: a fraud on day 2, reported on day 3: A is blocked by the test window.
        Row("a-fraud", "A", 2.0, 0.9, True, reported_day=3.0, amount=300.0),
    ]
    test = [
        # The test window (day 14 with train 7, delay 7, test 1 and 15 days of history).
        Row("e", "E", 14.1, 0.9, True, decision="DECLINE", amount=150.0),
        Row("f", "F", 14.2, 0.8, False, decision="REVIEW", amount=80.0),
        Row("g", "G", 14.3, 0.3, True, amount=50.0),
        Row("h", "H", 14.4, 0.1, False, amount=10.0),
        # Card A again: a genuine payment the live score ranks first; it must not count.
        Row("a-later", "A", 14.5, 0.95, False, decision="DECLINE", amount=120.0),
        Row("unlabelled", "U", 14.6, 0.99, None),
    ]
    return train + test


def test_every_row_on_a_test_window_with_known_answers() -> None:
    scores, labels = _tables(_known_answer_rows())
    rules = parse_rules(RULES, FEATURE_NAMES)
    options = EvaluationOptions(train_days=7, delay_days=7, test_days=1, k=2)
    result = evaluate(scores, labels, rules=rules, options=options)

    assert result.split is not None and result.split.mode == "handbook"
    assert result.join.unlabelled == 1
    assert (result.test_all.transactions, result.test_all.frauds) == (5, 2)
    assert (result.test.transactions, result.test.frauds, result.test.cards) == (4, 2, 4)
    assert (result.train.transactions, result.train.frauds) == (17, 5)

    live = _row(result, "live pipeline score")
    # Frauds 0.9 and 0.3, genuine 0.8 and 0.1: 3 of the 4 pairs ordered right.
    assert live.auc == pytest.approx(0.75)
    # Thresholds 0.9 (P 1, R 1/2), 0.8 (P 1/2), 0.3 (P 2/3, R 1).
    assert live.average_precision == pytest.approx(0.5 * 1.0 + 0.5 * 2 / 3)
    # One day; its top 2 cards are E (fraud) and F (genuine).
    assert live.card_precision == pytest.approx(0.5)
    assert (live.flagged, live.flag_precision, live.flag_recall) == (2, 0.5, 0.5)
    assert (live.decline_precision, live.decline_recall) == (1.0, 0.5)

    big = _row(result, "rule big_amount")
    assert big.name == "rule big_amount (review, active)"
    # Hits E only (F's 80 and A's 120 are not in the evaluated rows or not over 100).
    assert (big.flagged, big.flag_precision, big.flag_recall) == (1, 1.0, 0.5)
    assert big.auc == pytest.approx(0.75)
    assert big.average_precision == pytest.approx(0.5 * 1.0 + 0.5 * 0.5)
    assert big.card_precision is None
    never = _row(result, "rule never")
    assert (never.flagged, never.flag_precision, never.flag_recall) == (0, None, 0.0)
    assert never.auc == pytest.approx(0.5)

    references = [d for d in result.detectors if d.kind == "reference"]
    assert [(d.auc, d.average_precision, d.card_precision) for d in references] == [
        (r.auc, r.average_precision, r.card_precision) for r in HANDBOOK_REFERENCES
    ]


def test_the_offline_model_is_the_logistic_regression_of_the_training_window() -> None:
    rows = _known_answer_rows()
    scores, labels = _tables(rows)
    options = EvaluationOptions(train_days=7, delay_days=7, test_days=1, k=2)
    result = evaluate(scores, labels, options=options)

    train_rows = [r for r in rows if r.day < 7]
    test_rows = [r for r in rows if r.tx in ("e", "f", "g", "h")]
    train_scores, _ = _tables(train_rows)
    test_scores, _ = _tables(test_rows)
    model = fit_logistic_regression(
        train_scores.features, [bool(r.fraud) for r in train_rows], FEATURE_NAMES, version="x"
    )
    expected = roc_auc(
        [bool(r.fraud) for r in test_rows], decision_function(model, test_scores.features)
    )
    offline = _row(result, "offline logistic regression")
    assert offline.auc == pytest.approx(expected)
    assert result.offline_features == FEATURE_NAMES


def _random_rows(seed: int, n: int = 1500, days: int = 25) -> list[Row]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        fraud = bool(rng.random() < 0.08)
        day = float(rng.uniform(0, days))
        amount = float(rng.gamma(2.0, 40.0) * (4 if fraud else 1))
        score = float(np.clip(rng.normal(0.6 if fraud else 0.3, 0.2), 0, 1))
        label: bool | None = fraud if day < days - 3 else None  # the last days: no labels yet
        reported = day + float(rng.uniform(0.5, 9.0))
        decision = "DECLINE" if score > 0.8 else "REVIEW" if score > 0.55 else "APPROVE"
        rows.append(
            Row(f"t{i}", f"c{rng.integers(150)}", day, score, label, reported, decision, amount)
        )
    return rows


def test_the_live_row_equals_the_protocol_written_out_by_hand() -> None:
    rows = _random_rows(seed=5)
    scores, labels = _tables(rows)
    result = evaluate(scores, labels, rules=parse_rules(RULES, FEATURE_NAMES))

    # The protocol in plain Python: labelled rows, first labelled day, test days 14-20, minus
    # rows of cards with a fraud reported before the row's day.
    labelled = [r for r in rows if r.fraud is not None]
    first = math.floor(min(r.day for r in labelled))
    compromised_since: dict[str, float] = {}
    for r in labelled:
        if r.fraud:
            reported = r.reported_day if r.reported_day is not None else r.day + 7
            compromised_since[r.card] = min(compromised_since.get(r.card, math.inf), reported)
    test = [
        r
        for r in labelled
        if first + 14 <= r.day < first + 21
        and not compromised_since.get(r.card, math.inf) < math.floor(r.day)
    ]
    y = [bool(r.fraud) for r in test]
    s = [r.score for r in test]
    live = _row(result, "live pipeline score")
    assert result.test.transactions == len(test)
    assert result.test_all.transactions > len(test)  # some cards were dropped
    assert live.auc == pytest.approx(roc_auc(y, s))
    assert live.average_precision == pytest.approx(average_precision(y, s))
    days = [math.floor(r.day) for r in test]
    assert live.card_precision == pytest.approx(
        card_precision_at_k(days, [r.card for r in test], y, s, k=100)
    )
    flagged = [r.decision != "APPROVE" for r in test]
    true_flags = sum(f and t for f, t in zip(flagged, y, strict=True))
    assert live.flag_precision == pytest.approx(true_flags / sum(flagged))
    assert live.flag_recall == pytest.approx(true_flags / sum(y))

    big = _row(result, "rule big_amount")
    hits = [r.amount > 100 for r in test]
    true_hits = sum(h and t for h, t in zip(hits, y, strict=True))
    assert big.flag_precision == pytest.approx(true_hits / sum(hits))
    assert big.flag_recall == pytest.approx(true_hits / sum(y))
    assert big.auc == pytest.approx(roc_auc(y, [float(h) for h in hits]))


def test_a_test_window_of_one_class_reports_undefined_metrics_not_numbers() -> None:
    rows = [
        Row("f", "F", 1.0, 0.9, True),
        Row("g", "G", 1.5, 0.1, False),
        Row("t", "T", 3.5, 0.2, False),
    ]
    scores, labels = _tables(rows)
    options = EvaluationOptions(train_days=1, delay_days=1, test_days=1)
    result = evaluate(scores, labels, options=options)
    live = _row(result, "live pipeline score")
    assert live.auc is None and live.average_precision is None
    assert any("only genuine transactions" in note for note in result.notes)
    assert "n/a" in render_report(result)


def test_nothing_labelled_is_reported_as_nothing_to_evaluate(tmp_path: Path) -> None:
    scores, labels = _tables([Row("t", "T", 1.0, 0.5, None)])
    result = evaluate(scores, labels)
    assert result.split is None
    assert result.join.unlabelled == 1
    report = render_report(result)
    assert "Nothing to evaluate" in report
    assert write_plots(result, tmp_path) == []


def test_rules_for_other_features_are_refused() -> None:
    scores, labels = _tables([Row("t", "T", 1.0, 0.5, False)])
    rules = parse_rules(RULES.replace("amount >", "x >"), ("x",))
    with pytest.raises(ValueError, match="feature names"):
        evaluate(scores, labels, rules=rules)


# --- the report and the plots -----------------------------------------------------------------


def test_the_report_has_the_windows_counts_and_every_row(tmp_path: Path) -> None:
    scores, labels = _tables(_random_rows(seed=8))
    result = evaluate(scores, labels, rules=parse_rules(RULES, FEATURE_NAMES))
    plots = write_plots(result, tmp_path)
    assert [p.name for p in plots] == ["roc.png", "pr.png"]
    assert all(p.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for p in plots)
    report = render_report(result, source=["from somewhere"], plots=[p.name for p in plots])

    assert "The handbook's protocol: train 7 + delay 7 + test 7 days." in report
    for window in ("| train |", "| delay (not used) |", "| test, all |", "| test, evaluated |"):
        assert window in report
    assert f"| test, evaluated | 2024-05-15 | 2024-05-22 | {result.test.transactions:,} |" in report
    for name in (
        "| live pipeline score |",
        "| offline logistic regression |",
        "| rule big_amount (review, active) |",
        "| rule never (decline, shadow) |",
        "| handbook: logistic regression (its data; reference) | 0.871 | 0.606 | 0.291 |",
        "| handbook: best over the book (its data; reference) | 0.879 | 0.687 | 0.305 |",
    ):
        assert name in report
    live = _row(result, "live pipeline score")
    assert f"| live pipeline score | {live.auc:.3f} | {live.average_precision:.3f} |" in report
    assert f"{result.join.unlabelled:,} have none yet" in report
    assert "## Card precision@100 per test day" in report
    assert "| 2024-05-21 |" in report
    assert "![roc](roc.png)" in report
    assert "- from somewhere" in report


def test_the_drawn_precision_recall_steps_enclose_the_average_precision() -> None:
    from shared.evaluation import _pr_steps  # the curve as pr.png draws it

    scores, labels = _tables(_random_rows(seed=6))
    result = evaluate(scores, labels)
    [live] = [c for c in result.curves if c.name == "live pipeline score"]
    xs, ys = _pr_steps(live.recall, live.precision)
    assert xs[0] == 0.0 and xs[-1] == 1.0
    area = float(np.sum(np.diff(xs) * ys[1:]))
    assert area == pytest.approx(_row(result, "live pipeline score").average_precision)


def test_a_short_history_is_said_in_the_report() -> None:
    scores, labels = _tables(_random_rows(seed=2, n=400, days=8))
    report = render_report(evaluate(scores, labels))
    assert "SHORT HISTORY" in report


# --- files and the command --------------------------------------------------------------------


def _messages(
    rows: Sequence[Row],
) -> tuple[list[scoring_pb2.ScoredTransaction], list[transaction_pb2.Label]]:
    scored, labels = [], []
    for r in rows:
        message = scoring_pb2.ScoredTransaction(
            score=r.score,
            decision=f"DECISION_{r.decision}",
            model_version="m1",
            rules_version="r1",
        )
        tx = message.transaction
        tx.transaction_id, tx.card_id, tx.account_id = r.tx, r.card, f"acct-{r.card}"
        tx.event_time.FromMicroseconds(round((T0 + r.day * DAY_S) * 1e6))
        message.features.update({name: 0.0 for name in FEATURE_NAMES})
        message.features["amount"] = r.amount
        message.features["amount_log"] = math.log1p(r.amount)
        reason = message.reasons.add(code="MODEL_AMOUNT", text="amount", contribution=0.3)
        reason.source = scoring_pb2.Reason.SOURCE_MODEL
        scored.append(message)
        if r.fraud is not None:
            label = transaction_pb2.Label(
                transaction_id=r.tx, account_id=f"acct-{r.card}", is_fraud=r.fraud, source="test"
            )
            reported = r.reported_day if r.reported_day is not None else r.day + 7
            label.reported_at.FromMicroseconds(round((T0 + reported * DAY_S) * 1e6))
            labels.append(label)
    return scored, labels


def test_json_lines_files_load_into_the_same_tables(tmp_path: Path) -> None:
    rows = _random_rows(seed=3, n=300)
    scored, labels = _messages(rows)
    assert write_jsonl(tmp_path / "s.jsonl", scored) == 300
    write_jsonl(tmp_path / "l.jsonl", labels)
    # A broken line, a message without id and a blank line are skipped and counted.
    with open(tmp_path / "s.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n\n" + json.dumps({"score": 0.5}) + "\n")

    loaded = load_from_files(tmp_path / "s.jsonl", tmp_path / "l.jsonl")
    expected_scores, expected_labels = _tables(rows)
    np.testing.assert_array_equal(loaded.scores.transaction_id, expected_scores.transaction_id)
    np.testing.assert_allclose(loaded.scores.event_time, expected_scores.event_time)
    np.testing.assert_array_equal(loaded.scores.features, expected_scores.features)
    np.testing.assert_array_equal(loaded.scores.decision, expected_scores.decision)
    np.testing.assert_array_equal(loaded.labels.is_fraud, expected_labels.is_fraud)
    np.testing.assert_allclose(loaded.labels.reported_at, expected_labels.reported_at)
    score_source = loaded.sources[0]
    assert (score_source.read, score_source.rejected, score_source.complete) == (302, 2, True)
    assert "s.jsonl line 301: not a JSON ScoredTransaction" in score_source.first_problem
    assert "2 invalid records skipped" in score_source.describe()

    partial = load_from_files(tmp_path / "s.jsonl", tmp_path / "l.jsonl", max_records=10)
    assert len(partial.scores) == 10
    assert not partial.sources[0].complete
    assert "PARTIAL: --max-records reached" in partial.sources[0].describe()


def test_a_file_of_something_else_is_refused(tmp_path: Path) -> None:
    (tmp_path / "tx.jsonl").write_text('{"transaction_id": "tx-1", "amount_minor": 100}\n')
    _, labels = _messages([Row("t", "T", 1.0, 0.5, False)])
    write_jsonl(tmp_path / "l.jsonl", labels)
    with pytest.raises(ValueError, match="no valid ScoredTransaction"):
        load_from_files(tmp_path / "tx.jsonl", tmp_path / "l.jsonl")


def test_the_command_writes_the_report_and_the_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scored, labels = _messages(_random_rows(seed=4, n=800))
    write_jsonl(tmp_path / "s.jsonl", scored)
    write_jsonl(tmp_path / "l.jsonl", labels)
    (tmp_path / "rules.toml").write_text(RULES)
    out = tmp_path / "out"
    code = cli_main(
        [
            "evaluate",
            "--scores-file", str(tmp_path / "s.jsonl"),
            "--labels-file", str(tmp_path / "l.jsonl"),
            "--rules", str(tmp_path / "rules.toml"),
            "--out", str(out),
            "--test-days", "6",
        ]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr()
    report = (out / "report.md").read_text()
    assert printed.out == report
    assert "train 7 + delay 7 + test 6 days" in report
    assert "| rule big_amount (review, active) |" in report
    assert (out / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pr.png").exists()
    assert "wrote" in printed.err


@pytest.mark.parametrize(
    "arguments",
    [
        ["--scores-file", "s.jsonl"],
        ["--from-kafka", "--scores-file", "s.jsonl", "--labels-file", "l.jsonl"],
        ["--scores-file", "s.jsonl", "--labels-file", "l.jsonl", "--dump", "d"],
    ],
)
def test_contradicting_arguments_are_refused(
    arguments: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli_main(["evaluate", *arguments]) == 2
    assert "evaluate:" in capsys.readouterr().err


def test_a_broken_rules_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "rules.toml").write_text('version = "x"\n[[rule]]\nname = "bad"\n')
    code = cli_main(
        [
            "evaluate",
            "--scores-file",
            "s",
            "--labels-file",
            "l",
            "--rules",
            str(tmp_path / "rules.toml"),
        ]
    )
    assert code == 2
    assert "missing required field" in capsys.readouterr().err
