"""Standard gRPC health for the query service, driven by a periodic Redis ping.

Service names reported by the `grpc.health.v1.Health` servicer:

    ""                      the server as a whole: SERVING while Redis answers, NOT_SERVING while
    fraud.v1.RiskService    it does not (checks would only get the failure-policy answer)
    liveness                SERVING until shutdown, whatever Redis does: for a liveness probe,
                            which must not restart a healthy process because Redis is away

`RedisHealthMonitor` pings Redis every `interval_s` with a timeout and flips the first two
names after `failures_to_trip` consecutive failed pings (one by default: an unreachable Redis
is reported at once) and back after one good ping. The request path can also `report_failure()`
to have the next ping happen right away instead of waiting up to an interval.

At shutdown, `enter_graceful_shutdown()` on the servicer turns every name to NOT_SERVING for good
(the monitor's later writes are ignored by the servicer), so load balancers stop sending new
calls while the server drains.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer
from redis.exceptions import RedisError

from protos.fraud.v1 import risk_service_pb2
from shared.logging import get_logger

__all__ = [
    "LIVENESS_SERVICE",
    "NOT_SERVING",
    "RISK_SERVICE",
    "SERVING",
    "RedisHealthMonitor",
    "make_health_servicer",
]

log = get_logger(__name__)

RISK_SERVICE: str = risk_service_pb2.DESCRIPTOR.services_by_name["RiskService"].full_name
LIVENESS_SERVICE = "liveness"
SERVING: Any = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING: Any = health_pb2.HealthCheckResponse.NOT_SERVING

_READINESS_NAMES = ("", RISK_SERVICE)


async def make_health_servicer(*, redis_up: bool = False) -> HealthServicer:
    """A health servicer with the query service's names set (readiness as `redis_up`).

    Async because the servicer's asyncio primitives must be created inside the running loop."""
    servicer = HealthServicer()
    await servicer.set(LIVENESS_SERVICE, SERVING)
    for name in _READINESS_NAMES:
        await servicer.set(name, SERVING if redis_up else NOT_SERVING)
    return servicer


class RedisHealthMonitor:
    """Pings Redis periodically and sets the readiness names on the health servicer."""

    def __init__(
        self,
        redis: aioredis.Redis,
        health: HealthServicer,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 0.5,
        failures_to_trip: int = 1,
    ) -> None:
        if interval_s <= 0 or timeout_s <= 0 or failures_to_trip < 1:
            raise ValueError("interval_s and timeout_s must be > 0, failures_to_trip >= 1")
        self._redis = redis
        self._health = health
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failures_to_trip = failures_to_trip
        self._failures = 0
        self._serving: bool | None = None  # unknown until the first ping
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def serving(self) -> bool:
        """Whether Redis answered the last ping(s); False before the first ping."""
        return bool(self._serving)

    def report_failure(self) -> None:
        """A request saw Redis fail: ping now rather than at the next interval."""
        self._wake.set()

    async def check_once(self) -> bool:
        """Ping once, update the servicer; return whether Redis answered."""
        error = ""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._redis.ping()
        except (RedisError, OSError, TimeoutError) as e:
            error = repr(e) or type(e).__name__
        if not error:
            self._failures = 0
            await self._set(True)
            return True
        self._failures += 1
        if self._failures >= self._failures_to_trip:
            if self._serving is not False:
                log.warning("redis_unreachable_not_serving", error=error)
            await self._set(False)
        return False

    async def _set(self, serving: bool) -> None:
        if serving == self._serving:
            return
        if serving and self._serving is False:
            log.info("redis_reachable_serving")
        self._serving = serving
        for name in _READINESS_NAMES:
            await self._health.set(name, SERVING if serving else NOT_SERVING)

    async def run(self) -> None:
        """Ping forever (until cancelled): every interval, or sooner after `report_failure`,
        but never more often than every tenth of an interval (failing requests all report)."""
        min_gap_s = self._interval_s / 10
        while True:
            self._wake.clear()
            await self.check_once()
            await asyncio.sleep(min_gap_s)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s - min_gap_s):
                    await self._wake.wait()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="redis-health-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
