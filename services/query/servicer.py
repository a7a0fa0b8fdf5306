"""The RiskService servicer: synchronous risk checks and lookups over the pipeline's Redis state.

CheckTransaction
    1. `request.transaction` is validated with ingest's rules (`shared.validation`); a bad field
       is INVALID_ARGUMENT naming it (`transaction.<field>: <message>`), a missing transaction
       too. The error code and field also go out as trailing metadata
       (`fraudstream-error-code`, `fraudstream-error-field`) for programs.
    2. Features are computed read-only, "as if this transaction were added"
       (`VelocityStore.peek_batch`: one Redis round trip, no writes), and scored by the shared
       scoring engine, the code the scoring service runs: for the same transaction and the
       same state the score, decision, reasons and features are the ones scoring produces.
       Concurrent checks share the round trip and the engine pass (`CheckBatcher`).
    3. `record = true` also publishes the validated transaction to `transactions.raw`, keyed by
       account_id, with the idempotent producer; ingest drops a retry with the same
       transaction_id, so a caller may repeat a recorded check safely. `recorded` is true once
       Kafka acknowledged it (acks=all) within the time budget. When not confirmed, the record
       may still arrive later; a SYSTEM reason RECORD_NOT_CONFIRMED says so.

Deadlines and the failure policy. The time budget of a check is the caller's deadline
(`context.time_remaining()`) minus a safety margin for sending the answer, or
QUERY_REDIS_TIMEOUT_MS when the caller sets no deadline. When Redis fails, or does not answer
within the budget, the check still answers with status OK, before the deadline, as the policy
says (QUERY_FAILURE_POLICY: fail_open -> APPROVE, fail_closed_review -> REVIEW,
fail_closed_decline -> DECLINE), with `degraded = true`, no features, and two SYSTEM reasons:
what failed (DEGRADED_REDIS_TIMEOUT, DEGRADED_REDIS_UNAVAILABLE, DEGRADED_REDIS_ERROR, or
DEGRADED_DEADLINE when the deadline left no time to ask Redis at all) and the policy applied
(DEGRADED_FAIL_OPEN, DEGRADED_FAIL_CLOSED_REVIEW, DEGRADED_FAIL_CLOSED_DECLINE). The score of a
degraded answer is the lowest score that earns its decision under the current thresholds (0,
the review threshold, the decline threshold), so a caller who wrongly thresholds the score
still gets the policy's decision.

GetAccountRisk: the velocity windows ending now, the latest assessment the scoring service
stored, and the alerts opened in the last 24 h. An empty account_id is INVALID_ARGUMENT; an
account with none of the three is NOT_FOUND.

ListAlerts: newest first, for one account (its recent alerts) or all (the alert stream), paged
with opaque tokens. A bad token or a negative page_size is INVALID_ARGUMENT naming the field.

WatchAlerts: a server stream of new alerts, for one account or all. With `after_alert_id` it
resumes after that alert (every alert since, then new ones); an id that is unknown, or older
than the alert stream keeps, is NOT_FOUND before anything is sent (resuming there would skip
alerts silently; list older ones with ListAlerts). The initial metadata
(`fraudstream-watch-started`) is sent once the start position is fixed, so a client that waits
for it knows nothing stored afterwards can be missed. The stream ends with OK on server shutdown
(`shutdown()`, before the server's grace period) and stops at once when the client cancels;
if Redis fails mid-stream it ends with UNAVAILABLE, and the client resumes after the last
alert it received. At most `max_watchers` streams run at a time (each holds a Redis
connection for its blocking reads); beyond that, RESOURCE_EXHAUSTED.

Lookups (GetAccountRisk, ListAlerts, starting a watch) have no failure policy: Redis down is
UNAVAILABLE, and running out of the caller's deadline is DEADLINE_EXCEEDED. A bug is INTERNAL,
with the traceback in the server's log only.

Metrics (Prometheus): calls by method and status code, latency by method (unary methods; a
stream's duration is not a latency), degraded answers by cause, decisions, active watchers.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import grpc
from aiokafka import AIOKafkaProducer
from grpc import aio
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protos.fraud.v1 import risk_service_pb2, risk_service_pb2_grpc, scoring_pb2, transaction_pb2
from shared.alert_store import AlertStore
from shared.errors import InputError
from shared.logging import get_logger
from shared.scoring.decision import Assessment, Decision, ReasonSource, Thresholds
from shared.scoring.engine import ScoringEngine
from shared.scoring.features import TxRecord, VelocitySnapshot
from shared.scoring.velocity import VelocityStore
from shared.validation import ValidationLimits, validate_transaction

__all__ = [
    "ERROR_CODE_KEY",
    "ERROR_FIELD_KEY",
    "WATCH_STARTED_KEY",
    "CheckBatcher",
    "Degraded",
    "FailurePolicy",
    "QueryMetrics",
    "RiskServicer",
    "TransactionRecorder",
    "time_budget",
]

log = get_logger(__name__)

T = TypeVar("T")

ERROR_CODE_KEY: Final = "fraudstream-error-code"
ERROR_FIELD_KEY: Final = "fraudstream-error-field"
WATCH_STARTED_KEY: Final = "fraudstream-watch-started"
MAX_ACCOUNT_ID_LENGTH: Final = 128  # as ingest's ValidationLimits.max_id_length

_OK = grpc.StatusCode.OK
# The engine's _DECISION_PB / _SOURCE_PB hold plain ints; these keep the protobuf
# enum types, so the message constructors type-check.
_DECISION_PB: Final[dict[Decision, scoring_pb2.Decision]] = {
    Decision.APPROVE: scoring_pb2.DECISION_APPROVE,
    Decision.REVIEW: scoring_pb2.DECISION_REVIEW,
    Decision.DECLINE: scoring_pb2.DECISION_DECLINE,
}
_SOURCE_PB: Final[dict[ReasonSource, scoring_pb2.Reason.Source]] = {
    ReasonSource.RULE: scoring_pb2.Reason.SOURCE_RULE,
    ReasonSource.SHADOW_RULE: scoring_pb2.Reason.SOURCE_SHADOW_RULE,
    ReasonSource.MODEL: scoring_pb2.Reason.SOURCE_MODEL,
    ReasonSource.SYSTEM: scoring_pb2.Reason.SOURCE_SYSTEM,
}
_SYSTEM: Final = scoring_pb2.Reason.SOURCE_SYSTEM
# A bug is logged with its traceback on the server; the caller learns only that it happened.
_INTERNAL_MESSAGE: Final = "internal error (logged by the server)"


# ---- the failure policy ---------------------------------------------------------------------


class FailurePolicy(enum.StrEnum):
    """QUERY_FAILURE_POLICY: the decision of a check that could not read Redis in time."""

    FAIL_OPEN = "fail_open"
    FAIL_CLOSED_REVIEW = "fail_closed_review"
    FAIL_CLOSED_DECLINE = "fail_closed_decline"

    @property
    def decision(self) -> Decision:
        return _POLICY_DECISION[self]

    @property
    def reason_code(self) -> str:
        return f"DEGRADED_{self.value.upper()}"

    def score(self, thresholds: Thresholds) -> float:
        """The lowest score that earns the policy's decision (see the module docstring)."""
        return {
            Decision.APPROVE: 0.0,
            Decision.REVIEW: thresholds.review,
            Decision.DECLINE: thresholds.decline,
        }[self.decision]


_POLICY_DECISION: Final = {
    FailurePolicy.FAIL_OPEN: Decision.APPROVE,
    FailurePolicy.FAIL_CLOSED_REVIEW: Decision.REVIEW,
    FailurePolicy.FAIL_CLOSED_DECLINE: Decision.DECLINE,
}


class Degraded(Exception):
    """A check's features could not be read in time; `code` names the cause (the SYSTEM reason
    of the degraded answer), `text` says it for humans."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


# ---- deadlines ------------------------------------------------------------------------------

MIN_MARGIN_S: Final = 0.001
MAX_MARGIN_S: Final = 0.005


def time_budget(remaining_s: float | None, default_s: float) -> float:
    """Seconds the handler may spend waiting on dependencies.

    With a caller deadline: the time remaining minus a margin for building and sending the
    answer (a fifth of the remaining time, at least 1 ms, at most 5 ms). Without one: the
    configured default. Never negative."""
    if remaining_s is None:
        return default_s
    margin = min(max(remaining_s * 0.2, MIN_MARGIN_S), MAX_MARGIN_S)
    return max(remaining_s - margin, 0.0)


# ---- recording to transactions.raw ----------------------------------------------------------


class TransactionRecorder:
    """Publishes recorded checks to `transactions.raw` with an idempotent producer.

    The producer starts in the background and retries until Kafka answers, so the query
    service serves checks (record=false, and record=true with recorded=false) while Kafka is
    away; `ready` says whether records can be sent. Each attempt builds a fresh producer from
    `make_producer` (called inside the running loop, as aiokafka requires): a producer whose
    start failed is stopped and cannot be started again."""

    def __init__(self, make_producer: Callable[[], AIOKafkaProducer], topic: str) -> None:
        self._make_producer = make_producer
        self._topic = topic
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def ready(self) -> bool:
        return self._producer is not None

    def start(self, *, retry_backoff_s: tuple[float, float] = (0.5, 10.0)) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._start(retry_backoff_s), name="kafka-recorder")

    async def _start(self, retry_backoff_s: tuple[float, float]) -> None:
        backoff = retry_backoff_s[0]
        # Until it works or the service stops (the task is cancelled); the count only bounds
        # the loop on paper (with the 10 s backoff cap it outlasts any outage).
        for attempt in range(1, 1_000_000):
            producer = self._make_producer()
            try:
                await producer.start()
            except BaseException as e:
                with contextlib.suppress(Exception):  # release its sockets; it is not reusable
                    await producer.stop()
                if not isinstance(e, Exception):  # cancelled (shutdown): stop trying
                    raise
                log.warning(
                    "record_producer_unavailable", error=repr(e), attempt=attempt,
                    retry_in_s=backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, retry_backoff_s[1])
                continue
            self._producer = producer
            log.info("record_producer_started", topic=self._topic)
            return

    async def send(self, tx: transaction_pb2.Transaction) -> asyncio.Future[Any] | None:
        """Enqueue the transaction; the returned future resolves once Kafka acknowledged it."""
        producer = self._producer
        if producer is None:
            return None
        future: asyncio.Future[Any] = await producer.send(
            self._topic, tx.SerializeToString(), key=tx.account_id.encode()
        )
        return future

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()


# ---- batching concurrent checks ---------------------------------------------------------------


def _degraded_of(error: BaseException) -> Degraded | None:
    """The degraded cause of a failed velocity read; None when it is not a Redis failure."""
    if isinstance(error, TimeoutError):
        return Degraded("DEGRADED_REDIS_TIMEOUT", "Redis did not answer within the time budget")
    if isinstance(error, RedisTimeoutError):
        return Degraded("DEGRADED_REDIS_TIMEOUT", "Redis timed out")
    if isinstance(error, RedisConnectionError | OSError):
        return Degraded(
            "DEGRADED_REDIS_UNAVAILABLE", f"Redis is unavailable ({type(error).__name__})"
        )
    if isinstance(error, RedisError):
        return Degraded("DEGRADED_REDIS_ERROR", f"Redis failed ({type(error).__name__})")
    return None


# A check waiting for its batch: the transaction, its budget (loop time) and where the outcome
# goes (an Assessment, or the exception of a failed batch, passed as a value so a future whose
# caller already left never holds an unretrieved exception).
_Waiting = tuple[TxRecord, float, "asyncio.Future[Assessment | BaseException]"]


_TIMED_OUT: Final = TimeoutError("the check's time budget ran out")


def _expire(future: asyncio.Future[Assessment | BaseException]) -> None:
    if not future.done():
        future.set_result(_TIMED_OUT)


RATE_WINDOW_S: Final = 0.1  # the arrival rate is measured over windows of at least this


class CheckBatcher:
    """Coalesces concurrent checks into one velocity peek and one engine evaluation.

    At most `max_in_flight` batches wait on Redis at a time; checks that arrive meanwhile queue
    and go together as the next batch as soon as a reply comes back (before that reply's
    batch is evaluated, so the next round trip overlaps the evaluation). A lone check goes at
    once; under load the batches grow by themselves, and one Redis round trip (`peek_batch`
    peeks each transaction alone, so batching changes no number) and one numpy pass through
    the engine, whose fixed cost (some 0.5 ms here) dominates a single check, serve many.

    How big batches grow by themselves depends on the Redis round trip: a Redis that answers
    in 0.1 ms leaves batches of one or two, and the server spends its core on fixed costs.
    So above `hold_above_qps` checks per second, where one-by-one evaluation would saturate a
    core, the next batch waits a little longer for company: until `target_batch` checks are
    queued, `max_hold_s` passes, or half the time the most pressed caller has left, whichever
    comes first. Below that rate no check ever waits for another.

    Each caller waits for its own time budget only: a caller whose budget runs out leaves (its
    future is resolved with a timeout) and the batch goes on for the others; the batch's Redis
    call itself is bounded by the longest budget in it, so a hung Redis never holds a
    connection for longer.
    """

    def __init__(
        self,
        velocity: VelocityStore,
        engine: ScoringEngine,
        *,
        max_batch: int = 256,
        max_in_flight: int = 1,
        hold_above_qps: float = 1200.0,
        target_batch: int = 16,
        max_hold_s: float = 0.004,
        on_redis_failure: Callable[[], None] = lambda: None,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1 or target_batch < 1:
            raise ValueError("max_batch, max_in_flight and target_batch must be at least 1")
        self._velocity = velocity
        self._engine = engine
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._on_redis_failure = on_redis_failure
        self._pending: list[_Waiting] = []
        self._scheduled = False
        self._at_redis = 0  # batches sent to Redis and not answered yet
        self._closed = False
        self._hold_above_qps = hold_above_qps
        self._target_batch = min(target_batch, max_batch)
        self._max_hold_s = max_hold_s
        self._held: asyncio.TimerHandle | None = None  # the delayed flush of a held batch
        self._rate = 0.0  # checks per second over the last window of >= RATE_WINDOW_S
        self._window_start = 0.0
        self._window_arrivals = 0
        self._running: set[asyncio.Task[None]] = set()
        self.batches = 0  # for tests and the benchmark: how much coalescing happened
        self.checks = 0

    async def assess(self, record: TxRecord, end: float) -> Assessment:
        """The assessment of `record` "as if added", or Degraded when Redis fails or the
        budget (loop time `end`) runs out first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Assessment | BaseException] = loop.create_future()
        # A timer that resolves the future with a timeout, rather than asyncio.timeout_at: no
        # cancellation machinery on the hot path, one timer handle per check.
        expiry = loop.call_at(end, _expire, future)
        self._pending.append((record, end, future))
        self._count_arrival(loop.time())
        self._schedule(loop)
        try:
            outcome = await future
        finally:
            expiry.cancel()
        if outcome is _TIMED_OUT:
            self._on_redis_failure()
            raise Degraded("DEGRADED_REDIS_TIMEOUT", "Redis did not answer within the time budget")
        if isinstance(outcome, BaseException):
            degraded = _degraded_of(outcome)
            if degraded is None:
                raise outcome
            raise degraded
        return outcome

    def _count_arrival(self, now: float) -> None:
        self._window_arrivals += 1
        elapsed = now - self._window_start
        if elapsed >= RATE_WINDOW_S:
            self._rate = self._window_arrivals / elapsed
            self._window_start, self._window_arrivals = now, 0

    def _schedule(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._held is not None and len(self._pending) >= self._target_batch:
            self._held.cancel()  # company enough: go now
            self._held = None
            loop.call_soon(self._flush)
        # call_soon rather than now: the other checks ready in this loop iteration join in.
        elif self._pending and not self._scheduled and self._at_redis < self._max_in_flight:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _hold_s(self, now: float) -> float:
        """How long the next batch should wait for more checks (see the class docstring)."""
        waiting = len(self._pending)
        if self._rate <= 0.0 or self._rate < self._hold_above_qps or waiting >= self._target_batch:
            return 0.0
        hold = min(self._max_hold_s, (self._target_batch - waiting) / self._rate)
        earliest = min(end for _, end, _ in self._pending)
        return max(0.0, min(hold, (earliest - now) / 2))

    def _flush(self) -> None:
        self._scheduled = False
        self._held = None
        if self._closed or self._at_redis >= self._max_in_flight:
            return
        # Callers that gave up while waiting are dropped here, not sent to Redis.
        live = [entry for entry in self._pending if not entry[2].done()]
        batch, self._pending = live[: self._max_batch], live[self._max_batch :]
        if not batch:
            return
        self._at_redis += 1
        task = asyncio.create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        records = [record for record, _, _ in batch]
        self.batches += 1
        self.checks += len(records)
        outcomes: list[Assessment | BaseException]
        try:
            try:
                async with asyncio.timeout_at(max(end for _, end, _ in batch)):
                    velocity = await self._velocity.peek_batch(records)
            finally:
                self._at_redis -= 1
                if self._pending and not self._scheduled:
                    loop = asyncio.get_running_loop()
                    hold = self._hold_s(loop.time())
                    if hold > 0.0:
                        self._scheduled = True
                        self._held = loop.call_later(hold, self._flush)
                    else:
                        # Send the next batch before evaluating this one: one yield lets its
                        # task write the request, so Redis works while we evaluate.
                        self._flush()
                        await asyncio.sleep(0)
            outcomes = list(self._engine.evaluate(records, velocity).assessments)
        except Exception as e:  # handed to every caller, which decides what it means
            if _degraded_of(e) is not None:
                self._on_redis_failure()
                if isinstance(e, RedisError) and not isinstance(e, RedisConnectionError):
                    log.warning("check_redis_error", error=repr(e))
            else:
                log.exception("check_batch_failed", size=len(records))
            outcomes = [e] * len(batch)
        for (_, _, future), outcome in zip(batch, outcomes, strict=True):
            if not future.done():
                future.set_result(outcome)

    async def close(self) -> None:
        """Cancel the batches still running (after the server stopped: nobody waits)."""
        self._closed = True
        if self._held is not None:
            self._held.cancel()
        for task in list(self._running):
            task.cancel()
        for task in list(self._running):
            with contextlib.suppress(asyncio.CancelledError):
                await task


# ---- metrics --------------------------------------------------------------------------------

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_METHODS = ("CheckTransaction", "GetAccountRisk", "ListAlerts", "WatchAlerts")


class QueryMetrics:
    """The query service's Prometheus metrics, in a registry of the caller's choice."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.calls = Counter(
            "fraudstream_query_rpcs",
            "RiskService calls finished, by method and gRPC status code",
            ["method", "code"],
            registry=registry,
        )
        self.latency = Histogram(
            "fraudstream_query_rpc_seconds",
            "RiskService unary call latency in the handler, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.degraded = Counter(
            "fraudstream_query_degraded",
            "checks answered by the failure policy, by cause",
            ["cause"],
            registry=registry,
        )
        self.decisions = Counter(
            "fraudstream_query_decisions",
            "check decisions (degraded ones included)",
            ["decision"],
            registry=registry,
        )
        self.recorded = Counter(
            "fraudstream_query_recorded",
            "record=true checks, by outcome (confirmed or not_confirmed)",
            ["outcome"],
            registry=registry,
        )
        self.watchers = Gauge(
            "fraudstream_query_watchers", "WatchAlerts streams open", registry=registry
        )
        # Bound children up front: `labels()` costs a dict lookup and a lock per call.
        self._latency = {m: self.latency.labels(method=m) for m in _METHODS}
        self._calls: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._decisions = {d: self.decisions.labels(decision=d.value) for d in Decision}
        for m in _METHODS:
            self._calls[(m, _OK)] = self.calls.labels(method=m, code=_OK.name)

    def finished(self, method: str, code: grpc.StatusCode, seconds: float | None) -> None:
        child = self._calls.get((method, code))
        if child is None:
            child = self._calls[(method, code)] = self.calls.labels(method=method, code=code.name)
        child.inc()
        if seconds is not None:
            self._latency[method].observe(seconds)

    def decision(self, decision: Decision) -> None:
        self._decisions[decision].inc()


# ---- errors turned into statuses -------------------------------------------------------------


class _Status(Exception):
    """A handler's non-OK answer; the call wrapper records it and aborts with it."""

    def __init__(
        self, code: grpc.StatusCode, message: str, error_code: str = "", field: str = ""
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailing: tuple[tuple[str, str], ...] = tuple(
            (k, v) for k, v in ((ERROR_CODE_KEY, error_code), (ERROR_FIELD_KEY, field)) if v
        )


def _invalid(error: InputError, prefix: str = "") -> _Status:
    field = f"{prefix}{error.field}" if error.field else prefix.rstrip(".")
    message = f"{field}: {error.message}" if field else error.message
    return _Status(grpc.StatusCode.INVALID_ARGUMENT, message, error.code, field)


def _redis_status(error: BaseException, deadline_given: bool) -> _Status:
    if isinstance(error, TimeoutError | RedisTimeoutError):
        if deadline_given:
            return _Status(
                grpc.StatusCode.DEADLINE_EXCEEDED, "Redis did not answer within the deadline"
            )
        return _Status(grpc.StatusCode.UNAVAILABLE, "Redis did not answer in time")
    return _Status(grpc.StatusCode.UNAVAILABLE, f"Redis is unavailable: {type(error).__name__}")


def _check_account_id(raw: str, field: str, *, required: bool) -> str:
    value = raw.strip()
    if not value:
        if required:
            raise _Status(
                grpc.StatusCode.INVALID_ARGUMENT, f"{field}: required", "MISSING_FIELD", field
            )
        return ""
    if len(value) > MAX_ACCOUNT_ID_LENGTH:
        raise _Status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"{field}: {len(value)} characters long; at most {MAX_ACCOUNT_ID_LENGTH} allowed",
            "FIELD_TOO_LONG",
            field,
        )
    return value


_REDIS_FAILURES: Final = (RedisError, OSError, TimeoutError)


# ---- the servicer ---------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryLimits:
    redis_timeout_s: float = 0.05  # QUERY_REDIS_TIMEOUT_MS: a check's budget without a deadline
    lookup_timeout_s: float = 2.0  # lookups without a deadline
    record_timeout_s: float = 2.0  # waiting for Kafka's ack without a deadline
    max_watchers: int = 1000


class RiskServicer(risk_service_pb2_grpc.RiskServiceServicer):
    """fraud.v1.RiskService over the pipeline's Redis state (see the module docstring)."""

    def __init__(
        self,
        *,
        engine: ScoringEngine,
        velocity: VelocityStore,
        alerts: AlertStore,
        latest_assessment: Callable[[str], Awaitable[scoring_pb2.ScoredTransaction | None]],
        validation: ValidationLimits,
        policy: FailurePolicy,
        limits: QueryLimits = QueryLimits(),
        watch_alerts: AlertStore | None = None,
        recorder: TransactionRecorder | None = None,
        metrics: QueryMetrics | None = None,
        on_redis_failure: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._engine = engine
        self._velocity = velocity
        self._alerts = alerts
        self._watch_alerts = watch_alerts or alerts
        self._latest = latest_assessment
        self._validation = validation
        self._policy = policy
        self._limits = limits
        self._recorder = recorder
        self._metrics = metrics or QueryMetrics(CollectorRegistry())
        self._on_redis_failure = on_redis_failure or (lambda: None)
        self._batcher = CheckBatcher(velocity, engine, on_redis_failure=self._on_redis_failure)
        self._clock = clock
        self._stop = asyncio.Event()
        self._watchers = 0

    # ---- lifecycle

    @property
    def metrics(self) -> QueryMetrics:
        return self._metrics

    @property
    def watchers(self) -> int:
        """WatchAlerts streams open now."""
        return self._watchers

    @property
    def batcher(self) -> CheckBatcher:
        return self._batcher

    def shutdown(self) -> None:
        """End every WatchAlerts stream (each notices within one blocking read, about 1 s)."""
        self._stop.set()

    async def close(self) -> None:
        """After the server stopped: cancel velocity reads still running for gone callers."""
        await self._batcher.close()

    # ---- CheckTransaction

    async def CheckTransaction(
        self,
        request: risk_service_pb2.CheckTransactionRequest,
        context: aio.ServicerContext,
    ) -> risk_service_pb2.CheckTransactionResponse:
        started = time.perf_counter()
        code = _OK
        try:
            return await self._check(request, context)
        except _Status as status:
            code = status.code
            await context.abort(status.code, status.message, trailing_metadata=status.trailing)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("check_failed")
            await context.abort(code, _INTERNAL_MESSAGE)
            raise  # unreachable: abort raises
        finally:
            self._metrics.finished("CheckTransaction", code, time.perf_counter() - started)

    async def _check(
        self, request: risk_service_pb2.CheckTransactionRequest, context: aio.ServicerContext
    ) -> risk_service_pb2.CheckTransactionResponse:
        if not request.HasField("transaction"):
            raise _Status(
                grpc.StatusCode.INVALID_ARGUMENT,
                "transaction: required (the transaction to check)",
                "MISSING_FIELD",
                "transaction",
            )
        try:
            # in_place: the request was decoded for this call alone; saves a copy.
            tx = validate_transaction(
                request.transaction, self._validation, self._clock(), in_place=True
            )
        except InputError as e:
            raise _invalid(e, "transaction.") from None
        try:
            record = TxRecord.from_proto(tx)
        except ValueError as e:  # an event time past 2**44 ms; validation's limits stop it first
            raise _Status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"transaction.event_time: {e}",
                "INVALID_EVENT_TIME",
                "transaction.event_time",
            ) from None

        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        end = loop.time() + time_budget(remaining, self._limits.redis_timeout_s)

        pending_record: asyncio.Future[Any] | None = None
        record_failed = ""
        if request.record:
            # Enqueue first: Kafka's acknowledgement then overlaps the Redis round trip.
            pending_record, record_failed = await self._start_record(tx, end, remaining)

        try:
            assessment = await self._assess(record, end)
            response = _response(tx.transaction_id, assessment)
        except Degraded as degraded:
            response = self._degraded_response(tx.transaction_id, degraded)
        self._metrics.decision(_DECISION_OF_PB[response.decision])

        if request.record:
            if pending_record is not None:
                record_failed = await self._finish_record(pending_record, end, remaining)
            response.recorded = not record_failed
            if record_failed:
                response.reasons.add(
                    code="RECORD_NOT_CONFIRMED",
                    text=record_failed,
                    contribution=0.0,
                    source=_SYSTEM,
                )
            self._metrics.recorded.labels(
                outcome="not_confirmed" if record_failed else "confirmed"
            ).inc()
        return response

    async def _assess(self, record: TxRecord, end: float) -> Assessment:
        if end - asyncio.get_running_loop().time() <= 0:
            raise Degraded("DEGRADED_DEADLINE", "the caller's deadline left no time to read Redis")
        return await self._batcher.assess(record, end)

    def _degraded_response(
        self, transaction_id: str, degraded: Degraded
    ) -> risk_service_pb2.CheckTransactionResponse:
        policy = self._policy
        versions = self._engine.versions
        self._metrics.degraded.labels(cause=degraded.code).inc()
        response = risk_service_pb2.CheckTransactionResponse(
            transaction_id=transaction_id,
            score=policy.score(self._engine.thresholds),
            decision=_DECISION_PB[policy.decision],
            model_version=versions.model,
            rules_version=versions.rules,
            degraded=True,
        )
        response.reasons.add(
            code=degraded.code, text=degraded.text, contribution=0.0, source=_SYSTEM
        )
        response.reasons.add(
            code=policy.reason_code,
            text=f"answered by the failure policy {policy.value}: {policy.decision.value}",
            contribution=0.0,
            source=_SYSTEM,
        )
        return response

    async def _start_record(
        self, tx: transaction_pb2.Transaction, end: float, remaining: float | None
    ) -> tuple[asyncio.Future[Any] | None, str]:
        recorder = self._recorder
        if recorder is None:
            return None, "recording is off on this server"
        if not recorder.ready:
            return None, "Kafka is not available to record the transaction"
        try:
            async with asyncio.timeout_at(self._record_end(end, remaining)):
                return await recorder.send(tx), ""
        except TimeoutError:
            return None, "Kafka did not accept the transaction in time"
        except Exception as e:  # KafkaError and friends: the check itself still answers
            log.warning("record_failed", error=repr(e), transaction_id=tx.transaction_id)
            return None, f"Kafka refused the transaction ({type(e).__name__})"

    async def _finish_record(
        self, pending: asyncio.Future[Any], end: float, remaining: float | None
    ) -> str:
        try:
            async with asyncio.timeout_at(self._record_end(end, remaining)):
                # shield: a timeout here must not cancel the send itself; it may still land.
                await asyncio.shield(pending)
            return ""
        except TimeoutError:
            return "Kafka did not acknowledge the transaction in time; it may still arrive"
        except Exception as e:
            log.warning("record_failed", error=repr(e))
            return f"Kafka refused the transaction ({type(e).__name__})"

    def _record_end(self, end: float, remaining: float | None) -> float:
        if remaining is not None:
            return end  # the caller's deadline bounds everything
        loop = asyncio.get_running_loop()
        return max(end, loop.time() + self._limits.record_timeout_s)

    # ---- GetAccountRisk

    async def GetAccountRisk(
        self, request: risk_service_pb2.GetAccountRiskRequest, context: aio.ServicerContext
    ) -> risk_service_pb2.AccountRisk:
        return await self._unary("GetAccountRisk", self._account_risk, request, context)

    async def _account_risk(
        self, request: risk_service_pb2.GetAccountRiskRequest, context: aio.ServicerContext
    ) -> risk_service_pb2.AccountRisk:
        account_id = _check_account_id(request.account_id, "account_id", required=True)
        now_ms = int(self._clock() * 1000)
        snapshot, latest, open_alerts = await self._lookup(
            context,
            lambda: asyncio.gather(
                self._velocity.snapshot(account_id, now_ms),
                self._latest(account_id),
                self._alerts.open_alert_count(account_id),
            ),
        )
        if snapshot is None and latest is None and not open_alerts:
            raise _Status(
                grpc.StatusCode.NOT_FOUND,
                f"account_id: {account_id!r} is not known to the risk state",
                "UNKNOWN_ACCOUNT",
                "account_id",
            )
        response = risk_service_pb2.AccountRisk(account_id=account_id, open_alert_count=open_alerts)
        if snapshot is not None:
            response.velocity.update(_velocity_map(snapshot))
        if latest is not None:
            _fill_assessment(response.latest, latest)
        return response

    # ---- ListAlerts

    async def ListAlerts(
        self, request: risk_service_pb2.ListAlertsRequest, context: aio.ServicerContext
    ) -> risk_service_pb2.ListAlertsResponse:
        return await self._unary("ListAlerts", self._list_alerts, request, context)

    async def _list_alerts(
        self, request: risk_service_pb2.ListAlertsRequest, context: aio.ServicerContext
    ) -> risk_service_pb2.ListAlertsResponse:
        account_id = _check_account_id(request.account_id, "account_id", required=False)
        if request.page_size < 0:
            raise _Status(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"page_size: must not be negative, got {request.page_size}",
                "INVALID_PAGE_SIZE",
                "page_size",
            )
        try:
            alerts, token = await self._lookup(
                context,
                lambda: self._alerts.list_alerts(
                    account_id or None, request.page_size, request.page_token
                ),
            )
        except InputError as e:
            raise _invalid(e) from None
        return risk_service_pb2.ListAlertsResponse(alerts=alerts, next_page_token=token)

    # ---- WatchAlerts

    async def WatchAlerts(
        self, request: risk_service_pb2.WatchAlertsRequest, context: aio.ServicerContext
    ) -> AsyncIterator[scoring_pb2.Alert]:
        code = _OK
        counted = False
        try:
            if self._watchers >= self._limits.max_watchers:
                raise _Status(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many WatchAlerts streams (at most {self._limits.max_watchers})",
                )
            self._watchers += 1
            counted = True
            self._metrics.watchers.inc()
            account_id = _check_account_id(request.account_id, "account_id", required=False)
            try:
                stream = await self._lookup(
                    context,
                    lambda: self._watch_alerts.watch(
                        account_id or None, request.after_alert_id or None, self._stop
                    ),
                )
            except InputError as e:  # UnknownAlertId: unknown or expired
                raise _Status(
                    grpc.StatusCode.NOT_FOUND, f"{e.field}: {e.message}", e.code, e.field
                ) from None
            # Initial metadata goes out once the start position is fixed: a client that waits
            # for it knows every alert stored from then on will reach it.
            await context.send_initial_metadata(((WATCH_STARTED_KEY, "1"),))
            try:
                async for alert in stream:
                    yield alert
            except _REDIS_FAILURES as e:
                raise _redis_status(e, deadline_given=False) from None
        except _Status as status:
            code = status.code
            await context.abort(status.code, status.message, trailing_metadata=status.trailing)
        except (asyncio.CancelledError, GeneratorExit):
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("watch_failed")
            await context.abort(code, _INTERNAL_MESSAGE)
            raise  # unreachable: abort raises
        finally:
            if counted:
                self._watchers -= 1
                self._metrics.watchers.dec()
            self._metrics.finished("WatchAlerts", code, None)

    # ---- shared plumbing of the lookups

    async def _unary(
        self,
        method: str,
        handler: Callable[[Any, aio.ServicerContext], Awaitable[T]],
        request: Any,
        context: aio.ServicerContext,
    ) -> T:
        started = time.perf_counter()
        code = _OK
        try:
            return await handler(request, context)
        except _Status as status:
            code = status.code
            await context.abort(status.code, status.message, trailing_metadata=status.trailing)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            log.exception("rpc_failed", method=method)
            await context.abort(code, _INTERNAL_MESSAGE)
            raise  # unreachable: abort raises
        finally:
            self._metrics.finished(method, code, time.perf_counter() - started)

    async def _lookup(self, context: aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
        remaining = context.time_remaining()
        budget = time_budget(remaining, self._limits.lookup_timeout_s)
        try:
            async with asyncio.timeout(budget):
                return await call()
        except _REDIS_FAILURES as e:
            self._on_redis_failure()
            raise _redis_status(e, deadline_given=remaining is not None) from None


# ---- conversions ----------------------------------------------------------------------------

_DECISION_OF_PB: Final = {v: k for k, v in _DECISION_PB.items()}


def _response(
    transaction_id: str, assessment: Assessment
) -> risk_service_pb2.CheckTransactionResponse:
    response = risk_service_pb2.CheckTransactionResponse(
        transaction_id=transaction_id,
        score=assessment.score,
        decision=_DECISION_PB[assessment.decision],
        model_version=assessment.model_version,
        rules_version=assessment.rules_version,
    )
    reasons = response.reasons
    for r in assessment.reasons:
        reasons.add(
            code=r.code, text=r.text, contribution=r.contribution, source=_SOURCE_PB[r.source]
        )
    response.features.update(assessment.features)
    return response


def _velocity_map(snapshot: VelocitySnapshot) -> dict[str, float]:
    values: dict[str, float] = {}
    for window, count in snapshot.counts.items():
        values[f"count_{window}"] = float(count)
        values[f"sum_{window}"] = float(snapshot.sums[window])
    for window in ("7d", "30d"):
        values[f"avg_amount_{window}"] = snapshot.average(window)
    values["distinct_merchants_24h"] = float(snapshot.distinct_merchants_24h)
    values["distinct_countries_24h"] = float(snapshot.distinct_countries_24h)
    values["distinct_devices_24h"] = float(snapshot.distinct_devices_24h)
    if snapshot.seconds_since_last is not None:
        values["seconds_since_last"] = snapshot.seconds_since_last
    return values


def _fill_assessment(
    out: risk_service_pb2.Assessment, scored: scoring_pb2.ScoredTransaction
) -> None:
    out.transaction_id = scored.transaction.transaction_id
    out.score = scored.score
    out.decision = scored.decision
    out.reasons.extend(scored.reasons)
    if scored.HasField("scored_at"):
        out.scored_at.CopyFrom(scored.scored_at)
    out.model_version = scored.model_version
    out.rules_version = scored.rules_version
