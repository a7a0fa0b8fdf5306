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
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from shared.errors import ConfigError
from shared.scoring.model import ModelArtifact, contributions, sigmoid
from shared.scoring.rules import RuleAction, RuleMode, RuleSet

__all__ = [
    "Assessment",
    "Decision",
    "Reason",
    "ReasonSource",
    "Thresholds",
    "ThresholdsError",
    "assess_batch",
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


@dataclass(frozen=True)
class Assessment:
    score: float  # in [0, 1]
    decision: Decision
    reasons: tuple[Reason, ...]  # ranked
    features: dict[str, float]  # the values the score used, by feature name
    model_version: str
    rules_version: str


_LEVELS = (Decision.APPROVE, Decision.REVIEW, Decision.DECLINE)


def assess_batch(
    features: ArrayLike,
    feature_names: Sequence[str],
    model: ModelArtifact,
    rules: RuleSet,
    thresholds: Thresholds,
    max_model_reasons: int = 3,
) -> list[Assessment]:
    """Assess a batch of shape (n, len(feature_names)); one Assessment per row, in order.

    One model evaluation and one rules evaluation for the whole batch; the per-row work is
    building the result objects. Raises ValueError when the model's or the rules' feature
    names differ from `feature_names` (a wiring bug, not bad data).
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
    if n == 0:
        return []

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

    # --- rule reasons: one nonzero over the ranked hit matrix --------------------------------
    ranked = active + shadow
    rule_reasons = [
        Reason(
            code=rules.rules[i].reason_code,
            text=rules.rules[i].reason_text,
            contribution=RULE_CONTRIBUTION,
            source=source,
        )
        for indices, source in ((active, ReasonSource.RULE), (shadow, ReasonSource.SHADOW_RULE))
        for i in indices
    ]
    per_row: list[list[Reason]] = [[] for _ in range(n)]
    if ranked:
        # Row-major nonzero of (n, n_rules): grouped by row, each row in ranked order.
        rows, cols = np.nonzero(hits[ranked].T)
        for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
            per_row[r].append(rule_reasons[c])

    if any_bad:
        for r in np.flatnonzero(bad_rows).tolist():
            bad = [names[j] for j in np.flatnonzero(~finite[r]).tolist()]
            per_row[r].append(
                Reason(
                    code=NOT_FINITE_CODE,
                    text=f"non-finite feature(s) {', '.join(bad)}; the model ignored them",
                    contribution=0.0,
                    source=ReasonSource.SYSTEM,
                )
            )

    # --- model reasons: top-k positive contributions per row ---------------------------------
    k = min(max_model_reasons, d)
    if k > 0:
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
        codes = [f"MODEL_{name.upper()}" for name in names]
        for r, (feats, cs, vs) in enumerate(
            zip(top.tolist(), top_contrib.tolist(), top_values.tolist(), strict=True)
        ):
            reasons = per_row[r]
            for j, c, v in zip(feats, cs, vs, strict=True):
                if not c > 0.0:  # sorted: the rest did not raise the risk either
                    break
                reasons.append(
                    Reason(codes[j], f"{names[j]} = {v:.6g} raised the risk", c, ReasonSource.MODEL)
                )

    scores = score.tolist()
    levels = level.tolist()
    rows_values = X.tolist()
    return [
        Assessment(
            score=scores[r],
            decision=_LEVELS[levels[r]],
            reasons=tuple(per_row[r]),
            features=dict(zip(names, rows_values[r], strict=True)),
            model_version=model.version,
            rules_version=rules.version,
        )
        for r in range(n)
    ]
