"""The alert policy: which scored transactions raise an alert, and at what severity.

`ALERT_POLICY` is a comma separated list of `MATCH=SEVERITY` terms:

    DECLINE=HIGH,REVIEW=MEDIUM,score>=0.3=LOW

MATCH is a decision (APPROVE, REVIEW, DECLINE) or a score band (`score>=X` or `score>X`, X in
[0, 1]); SEVERITY is LOW, MEDIUM, HIGH or CRITICAL. Names are case-insensitive. Every term that
matches a scored transaction is a candidate and the most severe one wins, so the order of terms
does not matter. A transaction no term matches raises no alert.

Also here: the suppression reason code of an alert (which reason suppression groups by), and the
deterministic alert id. Everything is pure: no I/O, no clock.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from protos.fraud.v1 import scoring_pb2
from shared.errors import ConfigError

__all__ = [
    "DECISIONS",
    "NO_REASON_CODE",
    "SEVERITIES",
    "AlertPolicy",
    "DecisionTerm",
    "ScoreTerm",
    "alert_id_for",
    "parse_policy",
    "severity_name",
    "suppression_code",
]

# Names an operator writes in ALERT_POLICY -> protobuf enum values.
DECISIONS: dict[str, scoring_pb2.Decision] = {
    "APPROVE": scoring_pb2.DECISION_APPROVE,
    "REVIEW": scoring_pb2.DECISION_REVIEW,
    "DECLINE": scoring_pb2.DECISION_DECLINE,
}
SEVERITIES: dict[str, scoring_pb2.Severity] = {
    "LOW": scoring_pb2.SEVERITY_LOW,
    "MEDIUM": scoring_pb2.SEVERITY_MEDIUM,
    "HIGH": scoring_pb2.SEVERITY_HIGH,
    "CRITICAL": scoring_pb2.SEVERITY_CRITICAL,
}
_SEVERITY_NAMES: dict[int, str] = {int(value): name for name, value in SEVERITIES.items()}

# Suppression key of an alert whose transaction carries no (acted-on) reason at all.
NO_REASON_CODE = "NO_REASON"

# uuid5 namespace of alert ids. Never change it: alert ids are what receivers dedupe by, and a
# replay after a change would raise "new" alerts for transactions already alerted on.
_ALERT_ID_NAMESPACE = uuid.UUID("5b0c7a52-3f6e-4f0e-9a51-6a1e2d7c9f10")


@dataclass(frozen=True)
class DecisionTerm:
    decision: scoring_pb2.Decision
    severity: scoring_pb2.Severity

    def matches(self, decision: int, score: float) -> bool:
        return decision == self.decision


@dataclass(frozen=True)
class ScoreTerm:
    threshold: float
    inclusive: bool  # `>=` rather than `>`
    severity: scoring_pb2.Severity

    def matches(self, decision: int, score: float) -> bool:
        # A NaN score compares False either way: it never lands in a band.
        return score >= self.threshold if self.inclusive else score > self.threshold


Term = DecisionTerm | ScoreTerm


@dataclass(frozen=True)
class AlertPolicy:
    terms: tuple[Term, ...]

    def severity_for(self, decision: int, score: float) -> scoring_pb2.Severity | None:
        """The most severe matching term's severity (a `Severity` value), or None: no alert."""
        matched = [t.severity for t in self.terms if t.matches(decision, score)]
        return max(matched) if matched else None

    def describe(self) -> str:
        """The policy in canonical form, for the start-up log line."""
        parts: list[str] = []
        for term in self.terms:
            if isinstance(term, DecisionTerm):
                match = next(n for n, v in DECISIONS.items() if v == term.decision)
            else:
                match = f"score{'>=' if term.inclusive else '>'}{term.threshold:g}"
            parts.append(f"{match}={severity_name(term.severity)}")
        return ",".join(parts)


def severity_name(severity: int) -> str:
    return _SEVERITY_NAMES.get(int(severity), "UNSPECIFIED")


def _bad(term: str, why: str) -> ConfigError:
    return ConfigError(f"ALERT_POLICY term {term!r}: {why}")


def _parse_match(term: str, match: str, severity: scoring_pb2.Severity) -> Term:
    lowered = match.lower()
    if lowered.startswith("score"):
        rest = lowered[len("score") :].strip()
        if rest.startswith(">="):
            inclusive, number = True, rest[2:]
        elif rest.startswith(">"):
            inclusive, number = False, rest[1:]
        else:
            raise _bad(term, "a score band is score>=X or score>X")
        try:
            threshold = float(number)
        except ValueError:
            raise _bad(term, f"{number.strip()!r} is not a number") from None
        if not (math.isfinite(threshold) and 0.0 <= threshold <= 1.0):
            raise _bad(term, f"score threshold {threshold} must be within [0, 1]")
        return ScoreTerm(threshold=threshold, inclusive=inclusive, severity=severity)
    decision = DECISIONS.get(match.upper())
    if decision is None:
        raise _bad(term, f"{match!r} is neither a decision ({', '.join(DECISIONS)}) nor score>=X")
    return DecisionTerm(decision=decision, severity=severity)


def parse_policy(text: str) -> AlertPolicy:
    """Parse ALERT_POLICY; a malformed policy raises ConfigError naming the variable and term.

    An empty policy is an error rather than "never alert": an alerting service that can never
    raise an alert is a misconfiguration, not a choice (stop the service to silence it).
    A match named twice is an error too, since which severity was meant would be a guess.
    """
    if not text.strip():
        raise ConfigError("ALERT_POLICY is empty: give terms like DECLINE=HIGH,score>=0.3=LOW")
    terms: list[Term] = []
    for raw in text.split(","):
        term = raw.strip()
        if not term:
            raise ConfigError(f"ALERT_POLICY={text!r} has an empty term (a stray comma)")
        # rpartition: the band `score>=0.3=LOW` contains an `=` of its own.
        match, sep, severity_text = term.rpartition("=")
        match = match.strip()
        if not sep or not match or match.lower().rstrip(" >") == "score":
            raise _bad(term, "expected MATCH=SEVERITY, e.g. DECLINE=HIGH or score>=0.3=LOW")
        severity = SEVERITIES.get(severity_text.strip().upper())
        if severity is None:
            raise _bad(
                term, f"{severity_text.strip()!r} is not a severity ({', '.join(SEVERITIES)})"
            )
        parsed = _parse_match(term, match, severity)
        if any(_same_match(parsed, t) for t in terms):
            raise _bad(term, "this match is already given a severity by an earlier term")
        terms.append(parsed)
    return AlertPolicy(terms=tuple(terms))


def _same_match(a: Term, b: Term) -> bool:
    if isinstance(a, DecisionTerm) and isinstance(b, DecisionTerm):
        return a.decision == b.decision
    if isinstance(a, ScoreTerm) and isinstance(b, ScoreTerm):
        return (a.threshold, a.inclusive) == (b.threshold, b.inclusive)
    return False


def suppression_code(reasons: Sequence[scoring_pb2.Reason]) -> str:
    """The reason code suppression groups an alert by: its top acted-on reason.

    Reasons arrive ranked (rule hits first, then the largest model contributions), so the first
    one is what drove the decision and what an analyst triages by. Grouping by every reason would
    let one repeated minor reason hide a new kind of fraud; grouping by the whole set would let
    near-identical alerts through whenever a minor model contribution shifts rank. Shadow-rule
    reasons are skipped: they are reported but never acted on, so they must not drive alerting.
    """
    for reason in reasons:
        if reason.source != scoring_pb2.Reason.SOURCE_SHADOW_RULE and reason.code:
            return reason.code
    return NO_REASON_CODE


def alert_id_for(transaction_id: str) -> str:
    """Deterministic: the same scored transaction always yields the same alert id, so a
    redelivered record republishes the same alert and receivers can dedupe by alert_id."""
    return str(uuid.uuid5(_ALERT_ID_NAMESPACE, transaction_id))
