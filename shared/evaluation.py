"""`fraudstream evaluate`: how well the live pipeline caught fraud, measured against the labels.

    fraudstream evaluate                                   risk.scores + risk.labels, up to now
    fraudstream evaluate --dump out/eval-input             ... and keep a copy of what was read
    fraudstream evaluate --scores-file S.jsonl --labels-file L.jsonl --out out/eval

Protocol (the handbook's, "Reproducible Machine Learning for Credit Card Fraud Detection"):
scored transactions are joined to their labels by transaction_id (the latest label of a
transaction counts; scored transactions without a label yet, usually the last week's, are left
out and counted). By UTC event day: train on the first --train-days days of the labelled history,
skip --delay-days days (the labels of the training days arrive during the delay), test on the
next --test-days days. A history too short for that is split in the same proportions instead,
and the report says so. In the test window, the transactions of cards already known compromised
(a fraud label on the card reported before the transaction's day) are removed, as in the
handbook: those cards are blocked already, finding them again proves nothing.

Rows of the report, all on the same test transactions:
  1. the live pipeline's score and decision (REVIEW or DECLINE count as flagged);
  2. an offline batch logistic regression (`fit_logistic_regression`) trained on the training
     window with the exact feature values the pipeline used (ScoredTransaction.features);
  3. each rule of the rules file alone, its hit as a 0/1 score;
  4. the handbook's published figures, as a reference (its data, not ours).
Metrics: AUC ROC, average precision, card precision@k per test day averaged (cards by card_id,
detected cards dropped from later days), and alert precision and recall. The report goes to
--out DIR/report.md (and stdout) with the curves in DIR/roc.png and DIR/pr.png.

The core here is pure (tables of plain numpy arrays in, a result out); reading Kafka and files is
`shared.evaluation_io`, imported only when the command runs.
"""

from __future__ import annotations

import argparse
import math
import sys
from array import array
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import numpy.typing as npt

from protos.fraud.v1 import scoring_pb2, transaction_pb2
from shared import plotting
from shared.errors import ConfigError
from shared.scoring.features import FEATURE_NAMES
from shared.scoring.model import TrainingError, decision_function, fit_logistic_regression
from shared.scoring.rules import RulesError, RuleSet, load_rules
from shared.simulation.metrics import (
    average_precision,
    card_precision_at_k_per_day,
    precision_recall_at,
    precision_recall_curve,
    roc_auc,
    roc_curve,
)

if TYPE_CHECKING:
    from shared.config import Settings
    from shared.evaluation_io import LoadedData

__all__ = [
    "DAY_S",
    "HANDBOOK_REFERENCES",
    "Curve",
    "DetectorResult",
    "EvaluationOptions",
    "EvaluationResult",
    "JoinStats",
    "Joined",
    "LabelTable",
    "LabelTableBuilder",
    "Reference",
    "ScoreTable",
    "ScoreTableBuilder",
    "Split",
    "Window",
    "WindowCounts",
    "evaluate",
    "join_scores_and_labels",
    "known_compromised",
    "plan_split",
    "register",
    "render_report",
    "write_plots",
]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]
IntArray = npt.NDArray[np.int64]
StrArray = npt.NDArray[np.str_]

DAY_S: Final = 86_400

DECISION_APPROVE: Final = int(scoring_pb2.DECISION_APPROVE)
DECISION_REVIEW: Final = int(scoring_pb2.DECISION_REVIEW)
DECISION_DECLINE: Final = int(scoring_pb2.DECISION_DECLINE)
_DECISION_CODES: Final = {
    "APPROVE": DECISION_APPROVE,
    "REVIEW": DECISION_REVIEW,
    "DECLINE": DECISION_DECLINE,
}

LIVE: Final = "live pipeline score"
OFFLINE: Final = "offline logistic regression"
OFFLINE_VERSION: Final = "offline-evaluation"


@dataclass(frozen=True)
class Reference:
    """Published figures quoted for orientation: another dataset, so not a like-for-like row."""

    name: str
    auc: float
    average_precision: float
    card_precision: float


HANDBOOK_REFERENCES: Final = (
    Reference("handbook: logistic regression (its data; reference)", 0.871, 0.606, 0.291),
    Reference("handbook: best over the book (its data; reference)", 0.879, 0.687, 0.305),
)


# --- input tables -----------------------------------------------------------------------------


def _strings(values: Sequence[str]) -> StrArray:
    # Fixed-width unicode sorts and compares in C, far faster than object arrays of str.
    return np.array(values, dtype=np.str_) if values else np.zeros(0, dtype="<U1")


@dataclass(frozen=True, eq=False)
class ScoreTable:
    """Scored transactions as columns, one row per ScoredTransaction read (in read order).

    `card_id` is the transaction's card, or its account when it carries no card (counted in
    `cards_from_account`). `features` has one column per `feature_names` entry; a feature
    missing from a message is nan there (counted per name in `missing_features`), and names
    outside `feature_names` are ignored (counted in `unknown_features`)."""

    transaction_id: StrArray
    card_id: StrArray
    event_time: FloatArray  # Unix seconds, UTC
    score: FloatArray
    decision: npt.NDArray[np.int8]  # protobuf Decision values
    features: FloatArray  # (n, len(feature_names))
    feature_names: tuple[str, ...]
    model_version: StrArray
    rules_version: StrArray
    cards_from_account: int = 0
    degraded: int = 0  # scored in a degraded mode (ScoredTransaction.degraded)
    missing_features: Mapping[str, int] = field(default_factory=dict)
    unknown_features: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = self.transaction_id.shape[0]
        columns = (
            self.card_id,
            self.event_time,
            self.score,
            self.decision,
            self.model_version,
            self.rules_version,
        )
        if any(c.shape != (n,) for c in columns):
            raise ValueError("every ScoreTable column must have one entry per row")
        if self.features.shape != (n, len(self.feature_names)):
            raise ValueError(
                f"features has shape {self.features.shape}, expected ({n}, "
                f"{len(self.feature_names)})"
            )

    def __len__(self) -> int:
        return int(self.transaction_id.shape[0])

    def take(self, rows: npt.ArrayLike) -> ScoreTable:
        """The rows selected by an index array or a boolean mask (metadata kept)."""
        index = np.asarray(rows)
        return replace(
            self,
            transaction_id=self.transaction_id[index],
            card_id=self.card_id[index],
            event_time=self.event_time[index],
            score=self.score[index],
            decision=self.decision[index],
            features=self.features[index],
            model_version=self.model_version[index],
            rules_version=self.rules_version[index],
        )


class ScoreTableBuilder:
    """Collects scored transactions one at a time (from Kafka, a file, a test) into a table."""

    def __init__(self, feature_names: Sequence[str] = FEATURE_NAMES) -> None:
        self.feature_names = tuple(feature_names)
        self._known = frozenset(self.feature_names)
        self._ids: list[str] = []
        self._cards: list[str] = []
        self._times = array("d")
        self._scores = array("d")
        self._decisions = array("b")
        self._features = array("d")  # flat, row after row: 8 bytes per value
        self._models: list[str] = []
        self._rules: list[str] = []
        self._cards_from_account = 0
        self._degraded = 0
        self._missing: Counter[str] = Counter()
        self._unknown: Counter[str] = Counter()
        # One shared str per distinct version: 300k rows carry a handful of versions.
        self._interned: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._ids)

    def add(
        self,
        *,
        transaction_id: str,
        card_id: str,
        event_time: float,
        score: float,
        decision: int | str,
        features: Mapping[str, float],
        account_id: str = "",
        model_version: str = "",
        rules_version: str = "",
    ) -> None:
        if not card_id:
            self._cards_from_account += 1
        self._ids.append(transaction_id)
        self._cards.append(card_id or account_id)
        self._times.append(float(event_time))
        self._scores.append(float(score))
        code = _DECISION_CODES.get(decision, 0) if isinstance(decision, str) else int(decision)
        self._decisions.append(code)
        missing = [name for name in self.feature_names if name not in features]
        if missing:
            self._missing.update(missing)
        if len(features) + len(missing) != len(self.feature_names):
            self._unknown.update(k for k in features if k not in self._known)
        self._features.extend(features.get(name, math.nan) for name in self.feature_names)
        self._models.append(self._interned.setdefault(model_version, model_version))
        self._rules.append(self._interned.setdefault(rules_version, rules_version))

    def add_proto(self, message: scoring_pb2.ScoredTransaction) -> None:
        tx = message.transaction
        self._degraded += bool(message.degraded)
        self.add(
            transaction_id=tx.transaction_id,
            card_id=tx.card_id,
            account_id=tx.account_id,
            event_time=tx.event_time.seconds + tx.event_time.nanos / 1e9,
            score=message.score,
            decision=int(message.decision),
            features=message.features,
            model_version=message.model_version,
            rules_version=message.rules_version,
        )

    def build(self) -> ScoreTable:
        n, d = len(self._ids), len(self.feature_names)
        return ScoreTable(
            transaction_id=_strings(self._ids),
            card_id=_strings(self._cards),
            event_time=np.frombuffer(self._times, dtype=np.float64).copy(),
            score=np.frombuffer(self._scores, dtype=np.float64).copy(),
            decision=np.frombuffer(self._decisions, dtype=np.int8).copy(),
            features=np.frombuffer(self._features, dtype=np.float64).reshape(n, d).copy(),
            feature_names=self.feature_names,
            model_version=_strings(self._models),
            rules_version=_strings(self._rules),
            cards_from_account=self._cards_from_account,
            degraded=self._degraded,
            missing_features=dict(self._missing),
            unknown_features=dict(self._unknown),
        )


@dataclass(frozen=True, eq=False)
class LabelTable:
    """Labels as columns, one row per Label read; a transaction may have several."""

    transaction_id: StrArray
    is_fraud: BoolArray
    reported_at: FloatArray  # Unix seconds, UTC

    def __len__(self) -> int:
        return int(self.transaction_id.shape[0])


class LabelTableBuilder:
    def __init__(self) -> None:
        self._ids: list[str] = []
        self._fraud = array("b")
        self._reported = array("d")

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, *, transaction_id: str, is_fraud: bool, reported_at: float) -> None:
        self._ids.append(transaction_id)
        self._fraud.append(bool(is_fraud))
        self._reported.append(float(reported_at))

    def add_proto(self, message: transaction_pb2.Label) -> None:
        self.add(
            transaction_id=message.transaction_id,
            is_fraud=message.is_fraud,
            reported_at=message.reported_at.seconds + message.reported_at.nanos / 1e9,
        )

    def build(self) -> LabelTable:
        return LabelTable(
            transaction_id=_strings(self._ids),
            is_fraud=np.frombuffer(self._fraud, dtype=np.int8).astype(np.bool_),
            reported_at=np.frombuffer(self._reported, dtype=np.float64).copy(),
        )


# --- the join ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class JoinStats:
    scored: int  # scored transactions read
    duplicate_scores: int  # the same transaction_id scored again (the first one counts)
    labels: int  # labels read
    labelled_transactions: int  # distinct transaction ids among the labels
    relabelled: int  # transactions with more than one label (the latest one counts)
    conflicting: int  # ... whose labels disagree
    joined: int  # scored transactions with a label: what is evaluated
    unlabelled: int  # scored transactions without a label yet: left out
    labels_without_score: int  # labels of transactions not among the scores read


@dataclass(frozen=True, eq=False)
class Joined:
    table: ScoreTable  # the labelled scored transactions, in read order
    is_fraud: BoolArray
    # When the transaction's fraud was first reported (the earliest fraud label); inf when
    # its latest label says genuine.
    fraud_known_at: FloatArray
    stats: JoinStats


def join_scores_and_labels(scores: ScoreTable, labels: LabelTable) -> Joined:
    """Join by transaction_id; see `JoinStats` for what happens to duplicates and orphans."""
    _, first = np.unique(scores.transaction_id, return_index=True)
    unique_scores = scores.take(np.sort(first))  # read order, first score of each id

    order = np.lexsort((labels.reported_at, labels.transaction_id))
    ids = labels.transaction_id[order]
    fraud = labels.is_fraud[order]
    label_ids, starts, counts = np.unique(ids, return_index=True, return_counts=True)
    if label_ids.size:
        latest_is_fraud = fraud[starts + counts - 1]  # sorted by time within an id
        any_fraud = np.logical_or.reduceat(fraud, starts)
        all_fraud = np.logical_and.reduceat(fraud, starts)
        first_fraud_at = np.minimum.reduceat(
            np.where(fraud, labels.reported_at[order], np.inf), starts
        )
    else:
        latest_is_fraud = any_fraud = all_fraud = np.zeros(0, dtype=np.bool_)
        first_fraud_at = np.zeros(0, dtype=np.float64)

    position = np.searchsorted(label_ids, unique_scores.transaction_id)
    position = np.minimum(position, max(label_ids.size - 1, 0))
    matched = (
        label_ids[position] == unique_scores.transaction_id
        if label_ids.size
        else np.zeros(len(unique_scores), dtype=np.bool_)
    )
    label_index = position[matched]
    is_fraud = latest_is_fraud[label_index]
    known_at = np.where(is_fraud, first_fraud_at[label_index], np.inf)
    stats = JoinStats(
        scored=len(scores),
        duplicate_scores=len(scores) - len(unique_scores),
        labels=len(labels),
        labelled_transactions=int(label_ids.size),
        relabelled=int((counts > 1).sum()),
        conflicting=int((any_fraud != all_fraud).sum()),
        joined=int(matched.sum()),
        unlabelled=int((~matched).sum()),
        labels_without_score=int(label_ids.size - np.unique(label_index).size),
    )
    return Joined(unique_scores.take(matched), is_fraud, known_at.astype(np.float64), stats)


# --- the split --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    name: str
    start: float  # Unix seconds, inclusive
    end: float  # Unix seconds, exclusive

    def contains(self, times: FloatArray) -> BoolArray:
        result: BoolArray = (times >= self.start) & (times < self.end)
        return result

    @property
    def days(self) -> float:
        return (self.end - self.start) / DAY_S


@dataclass(frozen=True)
class Split:
    train: Window
    delay: Window
    test: Window
    mode: str  # "handbook", "proportional days" or "proportional time"
    note: str  # what was done and why, in a sentence or two for the report
    history_days: int  # UTC days from the first to the last labelled day, both included


def _day(seconds: float) -> int:
    return math.floor(seconds / DAY_S)


def _apportion(parts: Sequence[int], total: int) -> list[int]:
    """Whole days per part in proportion to `parts`, at least 1 for each positive part
    (largest remainders get the leftovers). Needs total >= number of positive parts."""
    weight = sum(parts)
    ideal = [p * total / weight for p in parts]
    alloc = [max(1, math.floor(x)) if p > 0 else 0 for p, x in zip(parts, ideal, strict=True)]
    while sum(alloc) > total:  # the minimum of 1 overshot: take from the largest part
        i = max(range(len(alloc)), key=lambda j: (alloc[j], j))
        alloc[i] -= 1
    while sum(alloc) < total:
        i = max(
            (j for j in range(len(parts)) if parts[j] > 0), key=lambda j: (ideal[j] - alloc[j], j)
        )
        alloc[i] += 1
    return alloc


def plan_split(
    event_times: npt.ArrayLike,
    *,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    start: float | None = None,
) -> Split:
    """Train, delay and test windows over the labelled history (see the module docstring).

    `start` (Unix seconds) moves the first training day to the UTC day containing it; earlier
    transactions are then in no window. Raises ValueError on bad lengths or no history."""
    if train_days < 1 or test_days < 1 or delay_days < 0:
        raise ValueError(
            f"need train_days >= 1, test_days >= 1 and delay_days >= 0, got "
            f"{train_days}, {test_days}, {delay_days}"
        )
    times = np.asarray(event_times, dtype=np.float64)
    if start is not None:
        times = times[times >= _day(start) * DAY_S]
    if times.size == 0:
        raise ValueError("no labelled transactions to split")
    first_day = _day(start) if start is not None else _day(float(times.min()))
    last_day = _day(float(times.max()))
    history = last_day - first_day + 1
    parts = (train_days, delay_days, test_days)
    needed = sum(parts)
    protocol = f"train {train_days} + delay {delay_days} + test {test_days} days"

    def windows(bounds: Sequence[float]) -> tuple[Window, Window, Window]:
        return (
            Window("train", bounds[0], bounds[1]),
            Window("delay", bounds[1], bounds[2]),
            Window("test", bounds[2], bounds[3]),
        )

    if history >= needed:
        days = np.cumsum([first_day, *parts]) * DAY_S
        unused = history - needed
        note = f"The handbook's protocol: {protocol}."
        if unused:
            note += (
                f" The {unused} labelled day{'s' if unused > 1 else ''} after the test window "
                "are not used."
            )
        return Split(*windows(days.astype(float).tolist()), "handbook", note, history)

    positive = sum(1 for p in parts if p > 0)
    if history >= positive:
        alloc = _apportion(parts, history)
        days = np.cumsum([first_day, *alloc]) * DAY_S
        note = (
            f"SHORT HISTORY: the labelled history spans {history} day(s), fewer than the "
            f"{needed} the protocol needs ({protocol}), so it was split in the same "
            f"proportions into train {alloc[0]} + delay {alloc[1]} + test {alloc[2]} whole days "
            "instead. The figures are not comparable with the handbook's."
        )
        return Split(*windows(days.astype(float).tolist()), "proportional days", note, history)

    low, high = float(times.min()), float(np.nextafter(times.max(), np.inf))
    cuts = np.cumsum([0, *parts]) / needed
    bounds = (low + cuts * (high - low)).tolist()
    bounds[-1] = high  # exactly past the last transaction, whatever the rounding
    hours = (high - low) / 3600
    note = (
        f"SHORT HISTORY: the labelled history spans only {hours:.1f} hours over {history} UTC "
        f"day(s), too short for whole-day windows ({protocol}), so it was split by event time "
        f"in the proportions {train_days}:{delay_days}:{test_days} instead. Card precision is "
        "still per UTC day of the test window. The figures are not comparable with the "
        "handbook's."
    )
    return Split(*windows(bounds), "proportional time", note, history)


def known_compromised(
    cards: npt.ArrayLike, event_times: npt.ArrayLike, fraud_known_at: npt.ArrayLike
) -> BoolArray:
    """Rows whose card was known compromised before the row's UTC day began: some transaction
    of the card (any row given) had a fraud label reported before that day. The handbook
    removes these from the test set: the card is blocked, catching it again proves nothing."""
    card_keys = np.asarray(cards)
    times = np.asarray(event_times, dtype=np.float64)
    known = np.asarray(fraud_known_at, dtype=np.float64)
    if card_keys.size == 0:
        return np.zeros(0, dtype=np.bool_)
    _, card_index = np.unique(card_keys, return_inverse=True)
    card_known = np.full(int(card_index.max()) + 1, np.inf)
    np.minimum.at(card_known, card_index, known)
    day_start = np.floor(times / DAY_S) * DAY_S
    result: BoolArray = card_known[card_index] < day_start
    return result


# --- evaluation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvaluationOptions:
    train_days: int = 7
    delay_days: int = 7
    test_days: int = 7
    start: float | None = None  # Unix seconds within the first training day; None: the first
    k: int = 100  # card precision@k
    # The live thresholds, applied to the offline model's probability for its alert columns.
    review_threshold: float = 0.5
    decline_threshold: float = 0.85


@dataclass(frozen=True)
class WindowCounts:
    transactions: int = 0
    frauds: int = 0
    cards: int = 0

    @property
    def fraud_rate(self) -> float | None:
        return self.frauds / self.transactions if self.transactions else None


@dataclass(frozen=True)
class DetectorResult:
    """One row of the results table; None where a metric does not apply or is undefined."""

    name: str
    kind: str  # "live", "offline", "rule" or "reference"
    auc: float | None = None
    average_precision: float | None = None
    card_precision: float | None = None
    flagged: int | None = None
    flag_precision: float | None = None
    flag_recall: float | None = None
    decline_precision: float | None = None
    decline_recall: float | None = None


@dataclass(frozen=True, eq=False)
class Curve:
    """ROC and precision-recall points of a detector on the test window. `point` marks a 0/1
    detector (a rule), drawn as its one operating point."""

    name: str
    fpr: FloatArray
    tpr: FloatArray
    recall: FloatArray
    precision: FloatArray
    point: bool = False


@dataclass(frozen=True, eq=False)
class EvaluationResult:
    options: EvaluationOptions
    join: JoinStats
    split: Split | None  # None when nothing could be evaluated
    train: WindowCounts
    delay: WindowCounts
    test_all: WindowCounts  # the test window before removing known-compromised cards
    test: WindowCounts  # what every metric is computed on
    detectors: tuple[DetectorResult, ...]
    cp_days: IntArray  # UTC day numbers of the test window
    cp_per_day: Mapping[str, FloatArray]  # detector name -> card precision@k per day
    curves: tuple[Curve, ...]
    offline_features: tuple[str, ...]  # features the offline model was trained on
    versions: Mapping[str, Mapping[str, int]]  # "model"/"rules" -> version -> test rows
    input_notes: tuple[str, ...]  # about what was read (missing features, card fallbacks)
    notes: tuple[str, ...]  # about the evaluation (undefined metrics, fallbacks)


def _counts(cards: StrArray, y: BoolArray) -> WindowCounts:
    return WindowCounts(int(y.size), int(y.sum()), int(np.unique(cards).size))


def _try(metric: Callable[..., float], *args: Any) -> float | None:
    # The metrics raise ValueError when undefined for the data (one class only); the report
    # says why once, in a note, rather than per cell.
    try:
        return metric(*args)
    except ValueError:
        return None


def _score_row(
    name: str,
    kind: str,
    y: BoolArray,
    ranking: FloatArray,
    days: IntArray,
    cards: StrArray,
    k: int,
    flags: BoolArray,
    declines: BoolArray,
) -> tuple[DetectorResult, FloatArray | None]:
    per_day: FloatArray | None = None
    if y.size:
        _, per_day = card_precision_at_k_per_day(days, cards, y, ranking, k)
    flagged = precision_recall_at(flags, y)
    declined = precision_recall_at(declines, y)
    row = DetectorResult(
        name=name,
        kind=kind,
        auc=_try(roc_auc, y, ranking),
        average_precision=_try(average_precision, y, ranking),
        card_precision=float(per_day.mean()) if per_day is not None else None,
        flagged=int(flags.sum()),
        flag_precision=flagged.precision if flags.any() else None,
        flag_recall=flagged.recall if y.any() else None,
        decline_precision=declined.precision if declines.any() else None,
        decline_recall=declined.recall if y.any() else None,
    )
    return row, per_day


def _curve(name: str, y: BoolArray, ranking: FloatArray) -> Curve | None:
    if not (y.any() and not y.all()):
        return None
    fpr, tpr, _ = roc_curve(y, ranking)
    precision, recall, _ = precision_recall_curve(y, ranking)
    return Curve(name, fpr, tpr, recall, precision)


def _point(name: str, y: BoolArray, hit: BoolArray) -> Curve | None:
    """The one operating point of a 0/1 detector; none when it never fired (precision 0/0)
    or the test window lacks a class."""
    if not (hit.any() and y.any() and not y.all()):
        return None
    flagged = precision_recall_at(hit, y)
    fpr = flagged.false_positives / (flagged.false_positives + flagged.true_negatives)
    recall = np.array([flagged.recall])
    return Curve(name, np.array([fpr]), recall, recall, np.array([flagged.precision]), True)


@dataclass(frozen=True, eq=False)
class _TestSet:
    """The evaluated test transactions, as every scored detector needs them."""

    y: BoolArray
    days: IntArray  # UTC day numbers
    cards: StrArray
    k: int


@dataclass
class _Rows:
    """The rows of the results table as they are worked out, with their curves and notes."""

    detectors: list[DetectorResult] = field(default_factory=list)
    per_day: dict[str, FloatArray] = field(default_factory=dict)
    curves: list[Curve] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_scored(
        self,
        name: str,
        kind: str,
        test: _TestSet,
        ranking: FloatArray,
        flags: BoolArray,
        declines: BoolArray,
    ) -> None:
        row, per_day = _score_row(
            name, kind, test.y, ranking, test.days, test.cards, test.k, flags, declines
        )
        self.detectors.append(row)
        if per_day is not None:
            self.per_day[name] = per_day
        if (curve := _curve(name, test.y, ranking)) is not None:
            self.curves.append(curve)


def _offline_model(
    joined: Joined, train: BoolArray, test: BoolArray, split: Split
) -> tuple[FloatArray | None, tuple[str, ...], str]:
    """(log-odds on the test rows or None, features used, a note when it could not be made)."""
    table = joined.table
    X_train = table.features[train]
    if X_train.shape[0] == 0:
        return None, (), "has no training window transactions to learn from"
    columns = np.flatnonzero(np.isfinite(X_train).all(axis=0))
    names = tuple(table.feature_names[i] for i in columns.tolist())
    if not names:
        return None, (), "has no feature complete in every training window transaction"
    try:
        model = fit_logistic_regression(
            X_train[:, columns],
            joined.is_fraud[train],
            names,
            version=OFFLINE_VERSION,
            # Fixed, so that the same input gives a byte-identical model and report.
            trained_at=datetime.fromtimestamp(split.train.end, UTC).isoformat(),
        )
    except TrainingError as e:
        return None, names, f"cannot be trained: {e}"
    X_test = table.features[test][:, columns]
    # A missing test value sits at the training mean, where it contributes nothing: the same
    # treatment the live scorer gives a non-finite feature.
    X_test = np.where(np.isfinite(X_test), X_test, model.mean)
    return decision_function(model, X_test), names, ""


def _add_offline(
    rows: _Rows,
    joined: Joined,
    train: BoolArray,
    test: BoolArray,
    test_set: _TestSet,
    split: Split,
    options: EvaluationOptions,
) -> tuple[str, ...]:
    log_odds, features, problem = _offline_model(joined, train, test, split)
    if log_odds is None:
        rows.notes.append(f"The offline logistic regression {problem}.")
        rows.detectors.append(DetectorResult(OFFLINE, "offline"))
        return features
    # Thresholds on the log-odds: the same as on the probability, without its saturation.
    rows.add_scored(
        OFFLINE,
        "offline",
        test_set,
        log_odds,
        log_odds >= _logit(options.review_threshold),
        log_odds >= _logit(options.decline_threshold),
    )
    left_out = [n for n in joined.table.feature_names if n not in features]
    if left_out:
        rows.notes.append(
            "The offline logistic regression left out feature(s) missing or not finite in the "
            f"training window: {', '.join(left_out)}."
        )
    return features


def _add_rules(rows: _Rows, rules: RuleSet, features: FloatArray, y: BoolArray) -> None:
    hits = rules.evaluate(features).matrix
    for rule, hit in zip(rules.rules, hits, strict=True):
        flagged = precision_recall_at(hit, y)
        ranking = hit.astype(np.float64)
        rows.detectors.append(
            DetectorResult(
                name=f"rule {rule.name} ({rule.action.value}, {rule.mode.value})",
                kind="rule",
                auc=_try(roc_auc, y, ranking),
                average_precision=_try(average_precision, y, ranking),
                flagged=int(hit.sum()),
                flag_precision=flagged.precision if hit.any() else None,
                flag_recall=flagged.recall if y.any() else None,
            )
        )
        if (point := _point(f"rule {rule.name}", y, hit)) is not None:
            rows.curves.append(point)


def evaluate(
    scores: ScoreTable,
    labels: LabelTable,
    *,
    rules: RuleSet | None = None,
    options: EvaluationOptions | None = None,
) -> EvaluationResult:
    """Every row of the report, on the same test transactions (see the module docstring)."""
    options = options or EvaluationOptions()
    if options.k < 1:
        raise ValueError(f"k must be at least 1, got {options.k}")
    if rules is not None and rules.feature_names != scores.feature_names:
        raise ValueError("the rules were compiled for other feature names than the scores'")
    joined = join_scores_and_labels(scores, labels)
    table, y_all = joined.table, joined.is_fraud
    if len(table) == 0:
        return EvaluationResult(
            options=options,
            join=joined.stats,
            split=None,
            train=WindowCounts(),
            delay=WindowCounts(),
            test_all=WindowCounts(),
            test=WindowCounts(),
            detectors=(),
            cp_days=np.zeros(0, np.int64),
            cp_per_day={},
            curves=(),
            offline_features=(),
            versions={},
            input_notes=_input_notes(scores),
            notes=("Nothing to evaluate: no scored transaction has a label yet.",),
        )

    split = plan_split(
        table.event_time,
        train_days=options.train_days,
        delay_days=options.delay_days,
        test_days=options.test_days,
        start=options.start,
    )
    train = split.train.contains(table.event_time)
    delay = split.delay.contains(table.event_time)
    in_test = split.test.contains(table.event_time)
    dropped = known_compromised(table.card_id, table.event_time, joined.fraud_known_at)
    test = in_test & ~dropped
    test_set = _TestSet(
        y=y_all[test],
        days=np.floor(table.event_time[test] / DAY_S).astype(np.int64),
        cards=table.card_id[test],
        k=options.k,
    )
    y = test_set.y
    rows = _Rows()
    if y.size == 0:
        rows.notes.append("The test window has no transactions to evaluate.")
    elif not y.any() or y.all():
        only = "genuine transactions" if not y.any() else "frauds"
        rows.notes.append(
            f"The test window has only {only}: AUC ROC and average precision are undefined (n/a)."
        )

    decision = table.decision[test]
    rows.add_scored(
        LIVE,
        "live",
        test_set,
        table.score[test],
        decision >= DECISION_REVIEW,
        decision == DECISION_DECLINE,
    )
    unspecified = int((decision < DECISION_APPROVE).sum())
    if unspecified:
        rows.notes.append(
            f"{unspecified:,} test transactions carry no decision: counted as not flagged."
        )
    offline_features = _add_offline(rows, joined, train, test, test_set, split, options)
    if rules is not None:
        _add_rules(rows, rules, table.features[test], y)
    rows.detectors.extend(
        DetectorResult(r.name, "reference", r.auc, r.average_precision, r.card_precision)
        for r in HANDBOOK_REFERENCES
    )
    if split.train.start <= float(scores.event_time.min()):
        rows.notes.append(
            "The training window starts with the scored history itself, where the pipeline's "
            "features are still warming up: 30-day velocity has no past, and terminal risk, "
            "measured with the label delay, stays 0 for its first days. That handicaps the "
            "offline model; with a longer history, --start a week or more later."
        )
    return EvaluationResult(
        options=options,
        join=joined.stats,
        split=split,
        train=_counts(table.card_id[train], y_all[train]),
        delay=_counts(table.card_id[delay], y_all[delay]),
        test_all=_counts(table.card_id[in_test], y_all[in_test]),
        test=_counts(test_set.cards, y),
        detectors=tuple(rows.detectors),
        cp_days=np.unique(test_set.days),
        cp_per_day=rows.per_day,
        curves=tuple(rows.curves),
        offline_features=offline_features,
        versions={
            "model": dict(Counter(table.model_version[test].tolist())),
            "rules": dict(Counter(table.rules_version[test].tolist())),
        },
        input_notes=_input_notes(scores),
        notes=tuple(rows.notes),
    )


def _logit(p: float) -> float:
    if p <= 0.0:
        return -math.inf
    if p >= 1.0:
        return math.inf
    return math.log(p / (1.0 - p))


def _input_notes(scores: ScoreTable) -> tuple[str, ...]:
    notes = []
    if scores.cards_from_account:
        notes.append(
            f"{scores.cards_from_account:,} scored transactions carry no card_id; their "
            "account_id stands in for the card."
        )
    if scores.degraded:
        notes.append(
            f"{scores.degraded:,} transactions were scored degraded (a dependency was down); "
            "their scores and decisions count as they were published."
        )
    if scores.missing_features:
        missing = ", ".join(f"{k} ({v:,})" for k, v in sorted(scores.missing_features.items()))
        notes.append(f"Features missing from some scored transactions (rows): {missing}.")
    if scores.unknown_features:
        unknown = ", ".join(sorted(scores.unknown_features))
        notes.append(f"Features not in this version's feature list, ignored: {unknown}.")
    return tuple(notes)


# --- the report -------------------------------------------------------------------------------


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _int(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def _when(seconds: float) -> str:
    moment = datetime.fromtimestamp(seconds, UTC)
    if seconds % DAY_S == 0:
        return moment.strftime("%Y-%m-%d")
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _pct(counts: WindowCounts) -> str:
    rate = counts.fraud_rate
    return "n/a" if rate is None else f"{rate:.2%}"


def render_report(
    result: EvaluationResult,
    *,
    source: Sequence[str] = (),
    generated_at: str | None = None,
    plots: Sequence[str] = (),
) -> str:
    """The report as markdown. `source` lines say where the input came from; `plots` are file
    names next to the report."""
    o, j = result.options, result.join
    out: list[str] = ["# fraudstream evaluation", ""]
    if generated_at:
        out += [f"Generated {generated_at}.", ""]
    out += ["## Input", ""]
    out += [f"- {line}" for line in source]
    out.append(
        f"- Of {j.scored - j.duplicate_scores:,} scored transactions, {j.joined:,} have a label "
        f"and are evaluated; {j.unlabelled:,} have none yet (recent ones whose labels are not "
        f"reported yet) and are left out. {j.labels_without_score:,} of the "
        f"{j.labelled_transactions:,} labelled transactions were not among the scores read."
    )
    if j.duplicate_scores:
        out.append(
            f"- {j.duplicate_scores:,} scores repeat a transaction scored before: the first "
            "score counts."
        )
    if j.relabelled:
        out.append(
            f"- {j.relabelled:,} transactions have several labels ({j.conflicting:,} "
            "disagreeing): the latest label counts."
        )
    out += [f"- {note}" for note in result.input_notes]
    for kind in ("model", "rules"):
        seen = result.versions.get(kind, {})
        if seen:
            listed = ", ".join(f"`{v or '(none)'}` ({n:,})" for v, n in sorted(seen.items()))
            out.append(f"- {kind.capitalize()} version(s) in the test window: {listed}")
    out.append("")

    split = result.split
    if split is None:
        out += ["## Result", ""] + [f"**{note}**" for note in result.notes]
        return "\n".join(out) + "\n"

    out += ["## Protocol", "", split.note, ""]
    out += [
        "| window | from | until (excluded) | transactions | frauds | fraud rate | cards |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    rows = (
        ("train", split.train, result.train),
        ("delay (not used)", split.delay, result.delay),
        ("test, all", split.test, result.test_all),
        ("test, evaluated", split.test, result.test),
    )
    for label, window, counts in rows:
        out.append(
            f"| {label} | {_when(window.start)} | {_when(window.end)} | "
            f"{counts.transactions:,} | {counts.frauds:,} | {_pct(counts)} | {counts.cards:,} |"
        )
    removed = result.test_all.transactions - result.test.transactions
    out += [
        "",
        f"Known-compromised cards: {removed:,} test transactions were removed, of cards with a "
        "fraud label reported before the transaction's day (as in the handbook: a card known "
        "compromised is blocked, catching it again proves nothing). Every metric below is on "
        "the evaluated test transactions.",
        "",
        "## Results on the test window",
        "",
        f"| detector | AUC ROC | average precision | card precision@{o.k} | flagged | "
        "flag precision | flag recall | decline precision | decline recall |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for d in result.detectors:
        dash = d.kind in ("reference", "rule")
        out.append(
            f"| {d.name} | {_num(d.auc)} | {_num(d.average_precision)} | "
            f"{'-' if d.kind == 'rule' else _num(d.card_precision)} | {_int(d.flagged)} | "
            f"{'-' if d.kind == 'reference' else _num(d.flag_precision)} | "
            f"{'-' if d.kind == 'reference' else _num(d.flag_recall)} | "
            f"{'-' if dash else _num(d.decline_precision)} | "
            f"{'-' if dash else _num(d.decline_recall)} |"
        )
    feature_count = len(result.offline_features)
    out += [
        "",
        f"- **{LIVE}**: the `score` of each ScoredTransaction ranks; flagged = decision REVIEW "
        "or DECLINE, decline = DECLINE.",
        f"- **{OFFLINE}**: `fit_logistic_regression` on the {result.train.transactions:,} "
        f"training-window transactions, with the {feature_count} feature values the live "
        "pipeline used (ScoredTransaction.features); no rules. Flagged = probability >= "
        f"{o.review_threshold:g} (the review threshold), decline = probability >= "
        f"{o.decline_threshold:g}.",
        "- **rule** rows: each rule alone, its hit as a 0/1 score (shadow rules too), whatever "
        "its action; flagged = hit. Card precision@k is left out: with a 0/1 score the top k "
        "cards are a tie broken by card id.",
        "- **handbook** rows: figures published by the handbook for its own simulated data and "
        "features, quoted for orientation; they are not measured here.",
        "- n/a: undefined for this data (nothing flagged, one class only) or not applicable.",
    ]
    out += [f"- {note}" for note in result.notes]

    if result.cp_days.size and result.cp_per_day:
        names = list(result.cp_per_day)
        out += ["", f"## Card precision@{o.k} per test day", ""]
        out += ["| day | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for i, day in enumerate(result.cp_days.tolist()):
            values = " | ".join(_num(float(result.cp_per_day[n][i])) for n in names)
            out.append(f"| {date.fromordinal(date(1970, 1, 1).toordinal() + day)} | {values} |")
    if plots:
        out += ["", "## Curves", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _pr_steps(recall: FloatArray, precision: FloatArray) -> tuple[FloatArray, FloatArray]:
    """The precision-recall curve as the step function average precision integrates: precision
    P_n holds over the recall interval (R_{n-1}, R_n]. Input as precision_recall_curve gives
    it (recall decreasing to 0)."""
    r, p = recall[::-1], precision[::-1]
    return np.repeat(r, 2)[1:-1], np.repeat(p[1:], 2)


def write_plots(result: EvaluationResult, out_dir: str | Path) -> list[Path]:
    """roc.png and pr.png in `out_dir` (created), when the test window has both classes."""
    if not result.curves:
        return []
    directory = Path(out_dir)
    directory.mkdir(parents=True, exist_ok=True)
    roc_series = [plotting.Series(c.name, c.fpr, c.tpr, markers=c.point) for c in result.curves]
    pr_series = []
    for c in result.curves:
        if c.point:
            pr_series.append(plotting.Series(c.name, c.recall, c.precision, markers=True))
        else:
            pr_series.append(plotting.Series(c.name, *_pr_steps(c.recall, c.precision)))
    roc_path, pr_path = directory / "roc.png", directory / "pr.png"
    plotting.write_png(roc_path, plotting.roc_plot(roc_series, title="ROC curve (test window)"))
    plotting.write_png(
        pr_path,
        plotting.pr_plot(pr_series, result.test.fraud_rate, title="Precision-recall (test window)"),
    )
    return [roc_path, pr_path]


# --- the command ------------------------------------------------------------------------------

DEFAULT_OUT: Final = "out/evaluation"
DEFAULT_TIMEOUT_S: Final = 120.0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text}")
    return value


def _day_start(text: str) -> float:
    try:
        day = date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date (2024-05-01)") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def _argument_problem(args: argparse.Namespace) -> str:
    files = args.scores_file is not None or args.labels_file is not None
    if files and args.from_kafka:
        return "--from-kafka and --scores-file/--labels-file exclude each other"
    if files and (args.scores_file is None or args.labels_file is None):
        return "--scores-file and --labels-file go together"
    if files and args.dump is not None:
        return "--dump saves what was read from Kafka; the files are already files"
    return ""


def _load_rules(args: argparse.Namespace, settings: Settings) -> tuple[RuleSet | None, str]:
    """The rules for the single-rule rows; a missing default file leaves them out (a note)."""
    path = args.rules or settings.scoring.rules_path
    if args.rules is None and not Path(path).exists():
        return None, f"no rules file at {path} (SCORING_RULES_PATH): single-rule rows left out"
    return load_rules(path, FEATURE_NAMES), ""


def _handle(args: argparse.Namespace) -> int | Coroutine[Any, Any, int]:
    from shared.config import load_settings

    problem = _argument_problem(args)
    if problem:
        print(f"evaluate: {problem}", file=sys.stderr)
        return 2
    try:
        settings = load_settings()
        rules, rules_note = _load_rules(args, settings)
    except (ConfigError, RulesError) as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    if rules_note:
        print(f"evaluate: {rules_note}", file=sys.stderr)
    if args.scores_file is not None:
        from shared.evaluation_io import load_from_files

        try:
            loaded = load_from_files(
                args.scores_file, args.labels_file, max_records=args.max_records
            )
        except (OSError, ValueError) as e:
            print(f"evaluate: {e}", file=sys.stderr)
            return 1
        return _finish(args, settings, rules, loaded)
    return _from_kafka(args, settings, rules)


async def _from_kafka(args: argparse.Namespace, settings: Settings, rules: RuleSet | None) -> int:
    from aiokafka.errors import KafkaError

    from shared.evaluation_io import load_from_kafka
    from shared.logging import configure_logging

    configure_logging("evaluate", settings.log_level, settings.log_format)
    try:
        loaded = await load_from_kafka(
            settings,
            max_records=args.max_records,
            timeout_s=args.timeout,
            dump_dir=args.dump,
            progress=lambda line: print(f"evaluate: {line}", file=sys.stderr, flush=True),
        )
    except ConfigError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    except (KafkaError, OSError) as e:
        print(f"evaluate: cannot read from Kafka: {e!r}", file=sys.stderr)
        return 1
    return _finish(args, settings, rules, loaded)


def _finish(
    args: argparse.Namespace, settings: Settings, rules: RuleSet | None, loaded: LoadedData
) -> int:
    options = EvaluationOptions(
        train_days=args.train_days,
        delay_days=args.delay_days,
        test_days=args.test_days,
        start=args.start,
        k=args.k,
        review_threshold=settings.scoring.review_threshold,
        decline_threshold=settings.scoring.decline_threshold,
    )
    result = evaluate(loaded.scores, loaded.labels, rules=rules, options=options)
    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(result, out_dir)
        report = render_report(
            result,
            source=[s.describe() for s in loaded.sources],
            generated_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
            plots=[p.name for p in plots],
        )
        (out_dir / "report.md").write_text(report, encoding="utf-8")
    except OSError as e:
        print(f"evaluate: cannot write to {out_dir}: {e}", file=sys.stderr)
        return 1
    print(report, end="")
    written = ", ".join(str(p) for p in [out_dir / "report.md", *plots])
    print(f"evaluate: wrote {written}", file=sys.stderr)
    # Nothing evaluated is a failure a script should notice (no labels yet, wrong topics).
    return 0 if result.test.transactions else 1


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="AUC ROC, average precision, card precision@100 of the live scores vs labels",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("input")
    source.add_argument(
        "--from-kafka",
        action="store_true",
        help="read TOPIC_RISK_SCORES and TOPIC_RISK_LABELS from the beginning up to their "
        "current end (read_committed, no consumer group); the default without files",
    )
    source.add_argument(
        "--scores-file", metavar="FILE.jsonl", help="ScoredTransactions, JSON lines"
    )
    source.add_argument("--labels-file", metavar="FILE.jsonl", help="Labels, JSON lines")
    source.add_argument(
        "--dump",
        metavar="DIR",
        help="also save what was read from Kafka as DIR/scores.jsonl and DIR/labels.jsonl "
        "(the format of --scores-file/--labels-file)",
    )
    source.add_argument(
        "--max-records",
        type=_positive_int,
        metavar="N",
        help="read at most N records per topic or file (the report then says it is partial)",
    )
    source.add_argument(
        "--timeout",
        type=_positive_float,
        default=DEFAULT_TIMEOUT_S,
        metavar="SECONDS",
        help="stop reading Kafka after this long; the report says what was not read "
        "(default: %(default)s)",
    )
    protocol = parser.add_argument_group("protocol")
    protocol.add_argument(
        "--train-days", type=_positive_int, default=7, metavar="DAYS", help="(default: 7)"
    )
    protocol.add_argument(
        "--delay-days",
        type=_non_negative_int,
        default=7,
        metavar="DAYS",
        help="days skipped between training and test, the label delay (default: 7)",
    )
    protocol.add_argument(
        "--test-days", type=_positive_int, default=7, metavar="DAYS", help="(default: 7)"
    )
    protocol.add_argument(
        "--start",
        type=_day_start,
        metavar="ISO_DATE",
        help="first training day (UTC); default: the first labelled day",
    )
    protocol.add_argument(
        "--k",
        type=_positive_int,
        default=100,
        metavar="CARDS",
        help="cards per day for card precision@k (default: 100)",
    )
    protocol.add_argument(
        "--rules",
        metavar="PATH",
        help="rules file for the single-rule rows (default: SCORING_RULES_PATH)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="where report.md, roc.png and pr.png go (default: %(default)s)",
    )
    parser.set_defaults(handler=_handle)
