"""Service lifecycle: signals set a stop event; clients start in order and close in reverse.

    async with ServiceLifecycle("scoring") as life:
        consumer = await life.start(make_consumer(...), close=lambda c: c.stop())
        ...
        await run(..., stop=life.stop_event)

SIGTERM or SIGINT set `stop_event`; the processing loop checks it between batches, so the
batch in hand is finished and committed before the clients close. A second signal while
stopping exits at once (an operator who presses Ctrl-C twice means it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, TypeVar

from aiokafka.errors import KafkaError, ProducerFenced
from redis import exceptions as redis_errors

from shared.errors import ConfigError
from shared.logging import get_logger

__all__ = [
    "BATCH_GC_THRESHOLDS",
    "STARTUP_RETRYABLE",
    "ServiceLifecycle",
    "Startable",
    "add_run_options",
    "retry_until_ready",
    "run_batch_service",
    "tune_gc_for_batches",
]

log = get_logger(__name__)

T = TypeVar("T")


class Startable(Protocol):
    async def start(self) -> Any: ...
    async def stop(self) -> Any: ...


class ServiceLifecycle:
    def __init__(self, name: str, *, handle_signals: bool = True) -> None:
        self.name = name
        self.stop_event = asyncio.Event()
        self._handle_signals = handle_signals
        self._closers: list[tuple[str, Callable[[], Awaitable[Any]]]] = []
        self._signals_seen = 0

    def _on_signal(self, signum: int) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            log.warning("second_signal_exiting_now", signal=signal.Signals(signum).name)
            os._exit(130)
        log.info("stop_requested", signal=signal.Signals(signum).name)
        self.stop_event.set()

    async def __aenter__(self) -> ServiceLifecycle:
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info("service_starting", pid=os.getpid())
        return self

    async def start(self, client: T, *, name: str | None = None) -> T:
        """Start a client with `start()`/`stop()` and register it to be stopped on exit."""
        await client.start()  # type: ignore[attr-defined]
        self.on_close(name or type(client).__name__, client.stop)  # type: ignore[attr-defined]
        return client

    def on_close(self, name: str, close: Callable[[], Awaitable[Any]]) -> None:
        self._closers.append((name, close))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_event.set()
        for name, close in reversed(self._closers):
            try:
                await asyncio.wait_for(close(), timeout=30)
            except Exception as e:  # closing must go on: one stuck client must not hold others
                log.warning("close_failed", client=name, error=repr(e))
        if self._handle_signals:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(sig)
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.error("service_failed", error=repr(exc))
        log.info("service_stopped")


# A dependency that is not there yet at start (a broker still booting, Redis restarting).
STARTUP_RETRYABLE: tuple[type[BaseException], ...] = (
    KafkaError,
    OSError,
    TimeoutError,
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
)


async def retry_until_ready(
    what: str, attempt: Callable[[], Awaitable[T]], stop: asyncio.Event, deadline: float
) -> T:
    """Retry `attempt` with backoff until it succeeds, `stop` is set or `deadline` passes."""
    backoff = 0.5
    while True:
        try:
            return await attempt()
        except STARTUP_RETRYABLE as e:
            if stop.is_set() or time.monotonic() + backoff > deadline:
                raise
            log.warning("startup_waiting", dependency=what, error=repr(e), retry_in_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=backoff)
            if stop.is_set():
                raise
            backoff = min(backoff * 2, 10.0)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every consumer service takes: stop conditions (tests and benchmarks run the
    real loop to an end) and start-up behaviour."""
    parser.add_argument(
        "--max-batches", type=int, metavar="N", help="stop after N committed batches"
    )
    parser.add_argument(
        "--max-records", type=int, metavar="N", help="stop once N records have been committed"
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="stop after S seconds (the batch in hand is still finished)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="give up when Kafka or Redis is still unreachable after S seconds (default 300)",
    )
    parser.add_argument(
        "--no-create-topics",
        action="store_true",
        help="do not create missing topics at start (when topics are provisioned elsewhere)",
    )


# A batch of 1,000 records allocates tens of thousands of short-lived objects (records, protobuf
# messages, lists, futures). By default the cyclic collector runs every 700 allocations and
# walks every young object; almost none of them is cyclic garbage (reference counting frees
# them). Collecting every 100,000 allocations, with the objects alive after start-up frozen out
# of the collector, cut the scoring service's CPU per transaction from ~41 to ~35-38 us and the
# passthrough's from ~8 to ~6-7 (bench/scoring_bench.py, alternating runs). The query service
# keeps its defaults: a young generation this large means fewer but longer pauses, which its
# p99 would feel.
BATCH_GC_THRESHOLDS = (100_000, 50, 100)


def tune_gc_for_batches() -> None:
    """Tune the garbage collector for a batch-processing service; call once the service's
    modules are imported and its configuration is loaded."""
    gc.freeze()
    gc.set_threshold(*BATCH_GC_THRESHOLDS)


def run_batch_service(
    name: str,
    main: Coroutine[Any, Any, object],
    *,
    cannot_start: tuple[type[Exception], ...] = (ConfigError,),
) -> int:
    """Run a consumer service's main coroutine to its end; return the process's exit code.

    0: it stopped (a signal, or a stop condition). 2: it cannot start with this configuration
    (`cannot_start`), printed plainly too, because that is the message an operator needs
    whatever the log format. 1: another instance took over our transactional id (it owns the
    work now), or Kafka or Redis was still unreachable when the start-up timeout ran out.
    """
    try:
        asyncio.run(main)
    except cannot_start as e:
        print(f"{name}: cannot start: {e}", file=sys.stderr)
        log.error(f"{name}_cannot_start", error=str(e))
        return 2
    except ProducerFenced:
        log.error(f"{name}_fenced_exiting")
        return 1
    except STARTUP_RETRYABLE as e:
        log.error(f"{name}_dependency_unavailable", error=repr(e))
        return 1
    return 0
