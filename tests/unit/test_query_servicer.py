"""The query service's pure parts: time budgets, the failure policy, and how CheckBatcher
coalesces checks and turns Redis trouble into degraded causes. Small hand-written fakes stand in
for the velocity store and the engine (the real ones are exercised end to end in
tests/integration/test_query.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from services.query.servicer import CheckBatcher, Degraded, FailurePolicy, time_budget
from shared.scoring.decision import Assessment, Decision, Thresholds
from shared.scoring.features import TxRecord


def test_budget_without_a_deadline_is_the_configured_one() -> None:
    assert time_budget(None, 0.05) == 0.05


@pytest.mark.parametrize(
    ("remaining", "budget"),
    [
        (1.0, 0.995),  # margin capped at 5 ms
        (0.01, 0.008),  # a fifth of the time left
        (0.004, 0.003),  # at least 1 ms
        (0.0008, 0.0),  # no time for Redis at all: answer by the policy at once
        (0.0, 0.0),
    ],
)
def test_budget_keeps_a_margin_for_the_answer(remaining: float, budget: float) -> None:
    assert time_budget(remaining, 0.05) == pytest.approx(budget)


@pytest.mark.parametrize(
    ("policy", "decision", "score", "code"),
    [
        ("fail_open", Decision.APPROVE, 0.0, "DEGRADED_FAIL_OPEN"),
        ("fail_closed_review", Decision.REVIEW, 0.4, "DEGRADED_FAIL_CLOSED_REVIEW"),
        ("fail_closed_decline", Decision.DECLINE, 0.9, "DEGRADED_FAIL_CLOSED_DECLINE"),
    ],
)
def test_failure_policy(policy: str, decision: Decision, score: float, code: str) -> None:
    chosen = FailurePolicy(policy)
    assert chosen.decision is decision
    assert chosen.reason_code == code
    thresholds = Thresholds(review=0.4, decline=0.9)
    assert chosen.score(thresholds) == score
    assert thresholds.decide(chosen.score(thresholds)) is decision


# ---- CheckBatcher ---------------------------------------------------------------------------


def record(i: int) -> TxRecord:
    return TxRecord(f"tx-{i}", f"acct-{i}", 1_700_000_000_000 + i, 100 + i)


class FakeVelocity:
    """peek_batch records each batch; it can be held (Redis slow) or fail (Redis down)."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = asyncio.Event()
        self.release.set()
        self.error: Exception | None = None

    async def peek_batch(self, records: Sequence[TxRecord]) -> Any:
        self.batches.append([r.transaction_id for r in records])
        await self.release.wait()
        if self.error is not None:
            raise self.error
        return [r.transaction_id for r in records]


class FakeEngine:
    """One Assessment per record, its score telling which record it was."""

    def __init__(self) -> None:
        self.error: Exception | None = None

    def evaluate(self, records: Sequence[TxRecord], velocity: Any) -> Any:
        if self.error is not None:
            raise self.error
        assert velocity == [r.transaction_id for r in records]  # rows stay in order
        return SimpleNamespace(
            assessments=[
                Assessment(r.amount_minor / 1000, Decision.APPROVE, (), {}, "m", "r")
                for r in records
            ]
        )


def batcher(
    velocity: FakeVelocity,
    engine: FakeEngine,
    failures: list[int] | None = None,
    **options: Any,
) -> CheckBatcher:
    def failed() -> None:
        if failures is not None:
            failures.append(1)

    return CheckBatcher(
        velocity,  # type: ignore[arg-type]
        engine,  # type: ignore[arg-type]
        on_redis_failure=failed,
        **options,
    )


def in_s(seconds: float) -> float:
    return asyncio.get_running_loop().time() + seconds


async def test_checks_arriving_together_share_one_batch() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    checks = batcher(velocity, engine)
    results = await asyncio.gather(*(checks.assess(record(i), in_s(5)) for i in range(5)))
    assert [r.score for r in results] == [(100 + i) / 1000 for i in range(5)]
    assert velocity.batches == [[f"tx-{i}" for i in range(5)]]
    assert (checks.batches, checks.checks) == (1, 5)


async def test_checks_arriving_during_a_batch_go_together_next() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    checks = batcher(velocity, engine)
    velocity.release.clear()  # the first batch waits on "Redis"
    first = asyncio.create_task(checks.assess(record(0), in_s(5)))
    for _ in range(10):  # bounded: until the first batch is at Redis
        await asyncio.sleep(0)
        if velocity.batches:
            break
    later = [asyncio.create_task(checks.assess(record(i), in_s(5))) for i in range(1, 4)]
    await asyncio.sleep(0)
    assert velocity.batches == [["tx-0"]]  # one batch at Redis at a time
    velocity.release.set()
    await asyncio.gather(first, *later)
    assert velocity.batches == [["tx-0"], ["tx-1", "tx-2", "tx-3"]]


async def test_redis_down_is_a_degraded_cause_for_every_check() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    velocity.error = RedisConnectionError("connection refused")
    failures: list[int] = []
    checks = batcher(velocity, engine, failures)
    outcomes = await asyncio.gather(
        *(checks.assess(record(i), in_s(5)) for i in range(3)), return_exceptions=True
    )
    assert [type(o) for o in outcomes] == [Degraded] * 3
    assert {o.code for o in outcomes if isinstance(o, Degraded)} == {"DEGRADED_REDIS_UNAVAILABLE"}
    assert failures  # the health monitor is told


async def test_a_redis_error_reply_is_its_own_cause() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    velocity.error = ResponseError("BUSY Redis is busy running a script")
    with pytest.raises(Degraded) as caught:
        await batcher(velocity, engine).assess(record(0), in_s(5))
    assert caught.value.code == "DEGRADED_REDIS_ERROR"


async def test_each_check_waits_for_its_own_budget_only() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    velocity.release.clear()  # Redis is slow
    checks = batcher(velocity, engine)
    impatient = asyncio.create_task(checks.assess(record(0), in_s(0.02)))
    patient = asyncio.create_task(checks.assess(record(1), in_s(30)))
    with pytest.raises(Degraded) as caught:
        await impatient
    assert caught.value.code == "DEGRADED_REDIS_TIMEOUT"
    velocity.release.set()  # Redis answers after all: the patient one gets its assessment
    assert (await patient).score == 0.101


async def test_a_caller_that_left_is_not_sent_to_redis() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    velocity.release.clear()
    checks = batcher(velocity, engine)
    first = asyncio.create_task(checks.assess(record(0), in_s(30)))
    for _ in range(10):
        await asyncio.sleep(0)
        if velocity.batches:
            break
    gone = asyncio.create_task(checks.assess(record(1), in_s(30)))
    stays = asyncio.create_task(checks.assess(record(2), in_s(30)))
    await asyncio.sleep(0)
    gone.cancel()  # the client cancelled its call
    velocity.release.set()
    await asyncio.gather(first, stays)
    assert velocity.batches == [["tx-0"], ["tx-2"]]


async def test_an_engine_bug_is_not_a_degraded_answer() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    engine.error = ValueError("shape mismatch")
    with pytest.raises(ValueError, match="shape mismatch"):
        await batcher(velocity, engine).assess(record(0), in_s(5))


async def until_at_redis(velocity: FakeVelocity, batches: int) -> None:
    for _ in range(20):  # bounded: a few loop iterations get a batch to "Redis"
        if len(velocity.batches) >= batches:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"only {len(velocity.batches)} batches reached Redis")


async def test_under_high_load_the_next_batch_waits_for_company() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    # Every rate counts as high here; the batch goes once 3 checks wait (or after 10 s).
    checks = batcher(velocity, engine, hold_above_qps=0.0, target_batch=3, max_hold_s=10.0)
    velocity.release.clear()
    first = asyncio.create_task(checks.assess(record(0), in_s(30)))
    await until_at_redis(velocity, 1)
    second = asyncio.create_task(checks.assess(record(1), in_s(30)))
    await asyncio.sleep(0)
    velocity.release.set()  # the reply comes: one check waits, held for company
    await first
    assert velocity.batches == [["tx-0"]]
    rest = [asyncio.create_task(checks.assess(record(i), in_s(30))) for i in (2, 3)]
    await asyncio.wait_for(asyncio.gather(second, *rest), 5)  # 3 waiting: no 10 s hold
    assert velocity.batches == [["tx-0"], ["tx-1", "tx-2", "tx-3"]]


async def test_a_held_batch_never_eats_up_a_callers_budget() -> None:
    velocity, engine = FakeVelocity(), FakeEngine()
    checks = batcher(velocity, engine, hold_above_qps=0.0, target_batch=100, max_hold_s=10.0)
    velocity.release.clear()
    first = asyncio.create_task(checks.assess(record(0), in_s(30)))
    await until_at_redis(velocity, 1)
    pressed = asyncio.create_task(checks.assess(record(1), in_s(0.5)))
    await asyncio.sleep(0)
    velocity.release.set()
    await first
    # Held for at most half of its remaining 0.5 s, then sent: answered, not timed out.
    assert (await asyncio.wait_for(pressed, 5)).score == 0.101
    assert velocity.batches == [["tx-0"], ["tx-1"]]
