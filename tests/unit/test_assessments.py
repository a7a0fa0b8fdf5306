"""The assessment store's fast-path maintenance decisions (pure: no Redis)."""

from __future__ import annotations

from shared.scoring.assessments import (
    SPARSE_DECISIONS,
    SPARSE_PRUNE_EVERY_MS,
    AssessmentEntry,
    FirstApplication,
    maintenance_due,
)
from shared.scoring.features import DAY_MS

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z, a day boundary (and a Thursday)
CAP = 64


def entry(at_ms: int, previous_ms: int | None, count_30d: int = 1) -> AssessmentEntry:
    return AssessmentEntry(
        account_id="a",
        transaction_id=f"tx-{at_ms}",
        event_ms=at_ms,
        decision=1,
        payload=b"",
        first=FirstApplication(in_order=True, previous_ms=previous_ms, count_30d=count_30d),
    )


def due(*entries: AssessmentEntry) -> tuple[bool, bool]:
    return maintenance_due(entries, refresh_every_ms=DAY_MS, prune_every_ms=DAY_MS, cap=CAP)


def test_a_new_account_gets_its_expiry_and_nothing_to_prune() -> None:
    assert due(entry(T0 + 5, None)) == (True, False)


def test_nothing_is_due_within_the_same_day() -> None:
    assert due(entry(T0 + 7200_000, T0 + 3600_000, count_30d=100)) == (False, False)


def test_the_first_transaction_of_a_day_refreshes_and_prunes_a_busy_account() -> None:
    busy = SPARSE_DECISIONS + 1
    assert due(entry(T0 + DAY_MS, T0 + DAY_MS - 1, count_30d=busy)) == (True, True)


def test_a_sparse_account_is_pruned_once_a_period_only() -> None:
    # a new day: refresh, but a sparse account's hash is small: no pruning yet
    assert due(entry(T0 + DAY_MS, T0, count_30d=SPARSE_DECISIONS)) == (True, False)
    period_end = (T0 // SPARSE_PRUNE_EVERY_MS + 1) * SPARSE_PRUNE_EVERY_MS
    assert due(entry(period_end, period_end - 1, count_30d=3)) == (True, True)


def test_a_burst_past_the_cap_prunes_every_quarter_of_the_cap() -> None:
    same_day = (T0 + 2000, T0 + 1000)
    hits = [n for n in range(1, 4 * CAP) if due(entry(*same_day, count_30d=n))[1]]
    assert hits == list(range(CAP + CAP // 4, 4 * CAP, CAP // 4))


def test_entries_without_first_application_decide_nothing() -> None:
    careful = AssessmentEntry("a", "tx", T0, 1, b"")
    assert due(careful) == (False, False)
