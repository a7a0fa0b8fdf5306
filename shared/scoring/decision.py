"""From features to a score, a decision and ranked reasons, for a whole batch at once.

    score    = max(model probability, score floors of the active rules that fired)
    decision = from the score and the thresholds (at or above `review` -> REVIEW, at or above
               `decline` -> DECLINE), then raised by active rules: a "review" hit makes it at
               least REVIEW, a "decline" hit makes it DECLINE.

Forced decisions do NOT move the score: the score stays an honest risk estimate (the model, or
a rule's explicit `score_floor`), so score-based evaluation (AUC, precision@k) measures the
model and the floors, and a forced decision is explained by its rule reason. Consumers act on
`decision`, never on `score >= threshold`. A rule that should raise the score uses
`action = "score_floor"`.

Shadow rules are evaluated and reported (source SHADOW_RULE) but never change score or decision.

Reasons, in order: active rule hits (file order), shadow rule hits (file order), system reasons,
then up to `max_model_reasons` features with the largest POSITIVE log-odds contributions
(largest first). Rule reasons carry contribution 1.0 (see protos/fraud/v1/scoring.proto).

A row with a non-finite feature (nan, inf: a bug upstream) is still scored: the model sees the
feature at its training mean (contribution 0), the rules see the raw value (where every
comparison with it is False, see shared.scoring.rules), and a SYSTEM reason FEATURES_NOT_FINITE
names the features.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from shared.errors import ConfigError
from shared.scoring.features import FloatArray
from shared.scoring.model import ModelArtifact, contributions, sigmoid
from shared.scoring.rules import RuleAction, RuleMode, RuleSet

__all__ = [
    "MODEL_TEXT_INFIX",
    "MODEL_TEXT_SUFFIX",
    "Assessment",
    "BatchAssessment",
    "Decision",
    "Reason",
    "ReasonSource",
    "Thresholds",
    "ThresholdsError",
    "assess_batch",
    "assess_columns",
    "model_reason_code",
    "model_reason_text",
]

RULE_CONTRIBUTION = 1.0
NOT_FINITE_CODE = "FEATURES_NOT_FINITE"


class Decision(enum.StrEnum):
    # Values are the protobuf names without the prefix: DECISION_<value>.
    APPROVE = "APPROVE"
    REVIEW = "REVIEW"
    DECLINE = "DECLINE"


class ReasonSource(enum.StrEnum):
    # Protobuf Reason.Source is SOURCE_<value.upper()>.
    RULE = "rule"
    SHADOW_RULE = "shadow_rule"
    MODEL = "model"
    SYSTEM = "system"


class ThresholdsError(ConfigError, ValueError):
    """Thresholds outside 0 <= review <= decline <= 1."""


@dataclass(frozen=True)
class Thresholds:
    review: float = 0.5
    decline: float = 0.85

    def __post_init__(self) -> None:
        review, decline = float(self.review), float(self.decline)
        if not (math.isfinite(review) and math.isfinite(decline)):
            raise ThresholdsError(f"thresholds must be finite, got {review=} {decline=}")
        if not 0.0 <= review <= decline <= 1.0:
            raise ThresholdsError(
                f"thresholds need 0 <= review <= decline <= 1, got review={review} "
                f"decline={decline}"
            )

    def decide(self, score: float) -> Decision:
        """The decision the score alone earns."""
        if score >= self.decline:
            return Decision.DECLINE
        if score >= self.review:
            return Decision.REVIEW
        return Decision.APPROVE


@dataclass(frozen=True)
class Reason:
    code: str
    text: str
    contribution: float  # model: log-odds contribution; rules: 1.0
    source: ReasonSource


# A model reason's text is MODEL_TEXT_INFIX between the feature's name and its value formatted
# with "%.6g", then MODEL_TEXT_SUFFIX. Spelled out as parts because the hot-path encoder
# (shared.scoring.engine.ScoredEncoder) splices the same parts into bytes without a Reason.
MODEL_TEXT_INFIX = " = "
MODEL_TEXT_SUFFIX = " raised the risk"


def model_reason_code(name: str) -> str:
    return f"MODEL_{name.upper()}"


def model_reason_text(name: str, value: float) -> str:
    return f"{name}{MODEL_TEXT_INFIX}{value:.6g}{MODEL_TEXT_SUFFIX}"


_LEVELS = (Decision.APPROVE, Decision.REVIEW, Decision.DECLINE)


@dataclass(frozen=True, eq=False)
class BatchAssessment:
    """What `assess_batch` decided for a batch, as columns (plain lists, one entry per row).

    The scoring hot path reads these directly: the encoder writes scores, decisions and
    reasons into protobuf bytes without a `Reason` object per model reason, and the
    `Assessment`s handed out are views of a row that build their reasons and features only
    when asked (`reasons_of`, `features_of`).

    Model reasons are flattened row after row: row r's are entries
    `model_start[r]:model_start[r + 1]` of `model_feature` (an index into `feature_names`),
    `model_contribution` and `model_value` (the raw feature value), largest contribution first.
    """

    feature_names: tuple[str, ...]
    features: FloatArray  # (n, len(feature_names)), the values the score used
    scores: list[float]
    levels: list[int]  # index into (APPROVE, REVIEW, DECLINE)
    rule_reasons: tuple[Reason, ...]  # active rules in file order, then shadow ones
    rule_hits: dict[int, list[int]]  # row -> indices into rule_reasons, ranked; no hit: absent
    rule_hit_totals: list[int]  # per rule, in the rules file's order: rows it fired on
    system_reasons: dict[int, Reason]  # row -> FEATURES_NOT_FINITE
    model_start: list[int]  # n + 1 offsets
    model_feature: list[int]
    model_contribution: list[float]
    model_value: list[float]
    model_version: str
    rules_version: str
    _reasons: dict[int, tuple[Reason, ...]] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.scores)

    @property
    def decisions(self) -> list[Decision]:
        levels = _LEVELS
        return [levels[level] for level in self.levels]

    def reasons_of(self, row: int) -> tuple[Reason, ...]:
        """Row `row`'s ranked reasons (built once, then the same tuple)."""
        reasons = self._reasons.get(row)
        if reasons is None:
            rule_reasons = self.rule_reasons
            out = [rule_reasons[i] for i in self.rule_hits.get(row, ())]
            system = self.system_reasons.get(row)
            if system is not None:
                out.append(system)
            names = self.feature_names
            for p in range(self.model_start[row], self.model_start[row + 1]):
                name = names[self.model_feature[p]]
                out.append(
                    Reason(
                        model_reason_code(name),
                        model_reason_text(name, self.model_value[p]),
                        self.model_contribution[p],
                        ReasonSource.MODEL,
                    )
                )
            reasons = self._reasons[row] = tuple(out)
        return reasons

    def features_of(self, row: int) -> dict[str, float]:
        """Row `row`'s feature values by name (a new dict each call)."""
        return dict(zip(self.feature_names, self.features[row].tolist(), strict=True))

    def assessments(self) -> list[Assessment]:
        """One `Assessment` per row, each a view of this batch."""
        view = Assessment._row_view
        levels = _LEVELS
        return [
            view(self, row, score, levels[level])
            for row, (score, level) in enumerate(zip(self.scores, self.levels, strict=True))
        ]


class _Given:
    """The reasons and features of an `Assessment` built directly (not by `assess_batch`)."""

    __slots__ = ("features", "model_version", "reasons", "rules_version")

    def __init__(
        self,
        reasons: tuple[Reason, ...],
        features: dict[str, float],
        model_version: str,
        rules_version: str,
    ) -> None:
        self.reasons = reasons
        self.features = features
        self.model_version = model_version
        self.rules_version = rules_version

    def reasons_of(self, row: int) -> tuple[Reason, ...]:
        return self.reasons

    def features_of(self, row: int) -> dict[str, float]:
        return self.features


class Assessment:
    """One transaction's score, decision and ranked reasons, with the feature values the score
    used. Immutable, compared by value like the frozen dataclass it once was.

    `score` and `decision` are plain attributes. `reasons` and `features` come from where the
    assessment was made: `assess_batch` hands out views of one row of a `BatchAssessment`, which
    build them on first access (the scoring service reads only the decision of most rows, and
    a row's features dict and reason objects cost more than the rest of the scoring together).
    `reasons` is the same tuple on every access; `features` is a new dict each time when the
    assessment is a row view (mutating it changes nothing)."""

    __slots__ = ("_row", "_source", "decision", "score")

    score: float  # in [0, 1]
    decision: Decision
    _source: BatchAssessment | _Given
    _row: int

    def __init__(
        self,
        score: float,
        decision: Decision,
        reasons: tuple[Reason, ...],  # ranked
        features: dict[str, float],  # the values the score used, by feature name
        model_version: str,
        rules_version: str,
    ) -> None:
        given = _Given(tuple(reasons), features, model_version, rules_version)
        _set(self, "score", score)
        _set(self, "decision", decision)
        _set(self, "_source", given)
        _set(self, "_row", 0)

    @classmethod
    def _row_view(
        cls, batch: BatchAssessment, row: int, score: float, decision: Decision
    ) -> Assessment:
        self = _new(cls)
        _set(self, "score", score)
        _set(self, "decision", decision)
        _set(self, "_source", batch)
        _set(self, "_row", row)
        return self

    @property
    def reasons(self) -> tuple[Reason, ...]:
        return self._source.reasons_of(self._row)

    @property
    def features(self) -> dict[str, float]:
        return self._source.features_of(self._row)

    @property
    def model_version(self) -> str:
        return self._source.model_version

    @property
    def rules_version(self) -> str:
        return self._source.rules_version

    def _values(self) -> tuple[object, ...]:
        return (
            self.score,
            self.decision,
            self.reasons,
            self.features,
            self.model_version,
            self.rules_version,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Assessment):
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None  # type: ignore[assignment]  # holds a dict, like the dataclass did

    def __setattr__(self, name: str, value: object) -> None:
        raise FrozenInstanceError(f"cannot assign to field {name!r}")

    def __delattr__(self, name: str) -> None:
        raise FrozenInstanceError(f"cannot delete field {name!r}")

    def __reduce__(self) -> tuple[type[Assessment], tuple[object, ...]]:
        return (Assessment, self._values())

    def __repr__(self) -> str:
        return (
            f"Assessment(score={self.score!r}, decision={self.decision!r}, "
            f"reasons={self.reasons!r}, features={self.features!r}, "
            f"model_version={self.model_version!r}, rules_version={self.rules_version!r})"
        )


_new = object.__new__
_set = object.__setattr__


def assess_batch(
    features: ArrayLike,
    feature_names: Sequence[str],
    model: ModelArtifact,
    rules: RuleSet,
    thresholds: Thresholds,
    max_model_reasons: int = 3,
) -> list[Assessment]:
    """Assess a batch of shape (n, len(feature_names)); one Assessment per row, in order.

    `assess_columns(...).assessments()`: see there."""
    return assess_columns(
        features, feature_names, model, rules, thresholds, max_model_reasons
    ).assessments()


def assess_columns(
    features: ArrayLike,
    feature_names: Sequence[str],
    model: ModelArtifact,
    rules: RuleSet,
    thresholds: Thresholds,
    max_model_reasons: int = 3,
) -> BatchAssessment:
    """Assess a batch of shape (n, len(feature_names)), as columns.

    One model evaluation and one rules evaluation for the whole batch, and numpy for the rest:
    the only per-row Python is converting the results to lists. Raises ValueError when the
    model's or the rules' feature names differ from `feature_names` (a wiring bug, not bad
    data).
    """
    names = tuple(feature_names)
    X = np.asarray(features, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != len(names):
        raise ValueError(f"features must have shape (n, {len(names)}), got {X.shape}")
    if model.feature_names != names:
        raise ValueError(f"model {model.version!r} was trained on different feature names")
    if rules.feature_names != names:
        raise ValueError(f"rules {rules.version!r} were compiled for different feature names")
    if max_model_reasons < 0:
        raise ValueError(f"max_model_reasons must be >= 0, got {max_model_reasons}")
    n, d = X.shape

    # --- rules: one evaluation, then the active ones act -------------------------------------
    hits = rules.evaluate(X).matrix  # (n_rules, n)
    active = [i for i, r in enumerate(rules.rules) if r.mode is RuleMode.ACTIVE]
    shadow = [i for i, r in enumerate(rules.rules) if r.mode is RuleMode.SHADOW]

    # --- model: one evaluation; non-finite features sit at the mean (contribution 0) ---------
    finite = np.isfinite(X)
    bad_rows = ~finite.all(axis=1)
    any_bad = bool(bad_rows.any())
    X_model = np.where(finite, X, model.mean) if any_bad else X
    contrib = contributions(model, X_model)
    probability = sigmoid(contrib.sum(axis=1) + model.bias)

    score = probability
    floor_rules = [i for i in active if rules.rules[i].action is RuleAction.SCORE_FLOOR]
    if floor_rules:
        floors = np.array([rules.rules[i].score_floor for i in floor_rules], dtype=np.float64)
        floor = np.where(hits[floor_rules], floors[:, None], 0.0).max(axis=0)
        score = np.maximum(score, floor)
    score = np.clip(score, 0.0, 1.0)

    level = (score >= thresholds.review).astype(np.int8) + (score >= thresholds.decline)
    review_rules = [i for i in active if rules.rules[i].action is RuleAction.REVIEW]
    if review_rules:
        level = np.maximum(level, hits[review_rules].any(axis=0).astype(np.int8))
    decline_rules = [i for i in active if rules.rules[i].action is RuleAction.DECLINE]
    if decline_rules:
        level = np.where(hits[decline_rules].any(axis=0), 2, level)

    # --- rule reasons: one nonzero over the ranked hit matrix; few rows have any -------------
    ranked = active + shadow
    rule_reasons = tuple(
        Reason(
            code=rules.rules[i].reason_code,
            text=rules.rules[i].reason_text,
            contribution=RULE_CONTRIBUTION,
            source=source,
        )
        for indices, source in ((active, ReasonSource.RULE), (shadow, ReasonSource.SHADOW_RULE))
        for i in indices
    )
    rule_hits: dict[int, list[int]] = {}
    if ranked and n:
        # Row-major nonzero of (n, n_rules): grouped by row, each row in ranked order.
        rows, cols = np.nonzero(hits[ranked].T)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            rule_hits.setdefault(r, []).append(c)

    system_reasons: dict[int, Reason] = {}
    if any_bad:
        for r in np.flatnonzero(bad_rows).tolist():
            bad = [names[j] for j in np.flatnonzero(~finite[r]).tolist()]
            system_reasons[r] = Reason(
                code=NOT_FINITE_CODE,
                text=f"non-finite feature(s) {', '.join(bad)}; the model ignored them",
                contribution=0.0,
                source=ReasonSource.SYSTEM,
            )

    # --- model reasons: top-k positive contributions per row ---------------------------------
    k = min(max_model_reasons, d)
    model_start = [0] * (n + 1)
    model_feature: list[int] = []
    model_contribution: list[float] = []
    model_value: list[float] = []
    if k > 0 and n:
        if k < d:
            top = np.argpartition(-contrib, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(d), (n, d))
        top_contrib = np.take_along_axis(contrib, top, axis=1)
        # Largest first; equal contributions in feature order, so output is deterministic.
        order = np.lexsort((top, -top_contrib), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        top_contrib = np.take_along_axis(top_contrib, order, axis=1)
        top_values = np.take_along_axis(X, top, axis=1)
        # A row's reasons stop at the first contribution that did not raise the risk (sorted:
        # the rest did not either; NaN compares False and stops them too).
        keep = np.logical_and.accumulate(top_contrib > 0.0, axis=1)
        model_start = np.concatenate(([0], np.cumsum(keep.sum(axis=1)))).tolist()
        # Boolean indexing of a 2-D array is row-major: row after row, ranked within a row.
        model_feature = top[keep].tolist()
        model_contribution = top_contrib[keep].tolist()
        model_value = top_values[keep].tolist()

    return BatchAssessment(
        feature_names=names,
        features=X,
        scores=score.tolist(),
        levels=level.tolist(),
        rule_reasons=rule_reasons,
        rule_hits=rule_hits,
        rule_hit_totals=hits.sum(axis=1).tolist(),
        system_reasons=system_reasons,
        model_start=model_start,
        model_feature=model_feature,
        model_contribution=model_contribution,
        model_value=model_value,
        model_version=model.version,
        rules_version=rules.version,
    )
