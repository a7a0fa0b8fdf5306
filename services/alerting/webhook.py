"""The webhook sink: POST each alert as JSON to ALERT_WEBHOOK_URL, never slowing Kafka output.

Delivery is at least once and happens only AFTER the Kafka transaction holding the alert
committed (an aborted batch must not notify anyone). A crash between the commit and the POST
loses that POST (the alert itself is safe on `risk.alerts` and in Redis), and a redelivered
batch POSTs its alerts again: receivers dedupe by `alertId` (also sent as `Idempotency-Key`).

Back pressure never reaches the Kafka path: alerts are offered with `put_nowait` to a bounded
queue and dropped (counted, logged) when it is full. A few workers drain it, each request bounded
by a timeout and retried with exponential backoff on connection errors, timeouts, 5xx, 408 and
429; other statuses are final (a 400 will not get better by asking again). Several workers send
concurrently, so order between alerts is not guaranteed.

The HTTP client is a deliberately minimal HTTP/1.1 POST over `asyncio.open_connection`
(`Connection: close`, one request per connection; https when the URL says so): alert rates are
far below where keep-alive matters, and it keeps the service free of an HTTP dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from google.protobuf import json_format
from prometheus_client import Counter, Gauge

from protos.fraud.v1 import scoring_pb2
from shared.errors import ConfigError
from shared.logging import get_logger

__all__ = [
    "HttpProtocolError",
    "RetryPolicy",
    "WebhookSink",
    "WebhookStats",
    "WebhookTarget",
    "alert_to_json",
    "post",
]

log = get_logger(__name__)

WEBHOOK_SENT = Counter("fraudstream_alerting_webhook_sent_total", "alerts the webhook accepted")
WEBHOOK_FAILED = Counter(
    "fraudstream_alerting_webhook_failed_total", "alerts given up on after the last attempt"
)
WEBHOOK_RETRIES = Counter("fraudstream_alerting_webhook_retries_total", "webhook attempts retried")
WEBHOOK_DROPPED = Counter(
    "fraudstream_alerting_webhook_dropped_total",
    "alerts never sent: queue full, or left in the queue at shutdown",
    ["reason"],
)
WEBHOOK_QUEUE = Gauge("fraudstream_alerting_webhook_queue_depth", "alerts waiting for the webhook")

_MAX_LINE = 8192
_MAX_INTERIM = 5  # 1xx interim responses tolerated before the final status


class HttpProtocolError(Exception):
    """The server's reply is not HTTP/1.x."""


@dataclass(frozen=True)
class WebhookTarget:
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent on the request line

    @classmethod
    def parse(cls, url: str) -> WebhookTarget:
        """Parse ALERT_WEBHOOK_URL; a URL we cannot POST to is a ConfigError naming it."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ConfigError(f"ALERT_WEBHOOK_URL={url!r} must start with http:// or https://")
        try:
            port = parts.port
        except ValueError:
            raise ConfigError(f"ALERT_WEBHOOK_URL={url!r} has an invalid port") from None
        if not parts.hostname:
            raise ConfigError(f"ALERT_WEBHOOK_URL={url!r} has no host")
        if parts.username or parts.password:
            raise ConfigError(f"ALERT_WEBHOOK_URL={url!r}: credentials in the URL are not sent")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        default = 443 if parts.scheme == "https" else 80
        return cls(parts.scheme, parts.hostname, port or default, path)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


async def post(
    target: WebhookTarget,
    body: bytes,
    *,
    timeout_s: float,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    """POST `body` and return the final HTTP status. The whole exchange (connect, send, status)
    is bounded by `timeout_s` (TimeoutError). Connection errors raise OSError; a reply that is
    not HTTP raises HttpProtocolError. The response body is not read: only the status matters."""
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"Host: {target.host_header}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "User-Agent: fraudstream-alerting",
        *(f"{name}: {value}" for name, value in (headers or {}).items()),
    ]
    request = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    tls = (ssl_context or ssl.create_default_context()) if target.scheme == "https" else None
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(target.host, target.port, ssl=tls)
        try:
            writer.write(request)
            await writer.drain()
            for _ in range(_MAX_INTERIM + 1):
                status = _parse_status(await reader.readuntil(b"\r\n"))
                if status >= 200:
                    return status
                await _skip_headers(reader)  # an interim 1xx: the final status follows
            raise HttpProtocolError(f"more than {_MAX_INTERIM} interim responses")
        except asyncio.IncompleteReadError as e:
            raise HttpProtocolError(f"connection closed before a status line ({e})") from None
        except asyncio.LimitOverrunError:
            raise HttpProtocolError("status line too long") from None
        finally:
            writer.close()


def _parse_status(line: bytes) -> int:
    parts = line.decode("latin-1").split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise HttpProtocolError(f"not an HTTP/1.x status line: {line[:80]!r}")
    return int(parts[1])


async def _skip_headers(reader: asyncio.StreamReader) -> None:
    for _ in range(100):
        line = await reader.readuntil(b"\r\n")
        if line == b"\r\n":
            return
    raise HttpProtocolError("too many header lines")


def alert_to_json(alert: scoring_pb2.Alert) -> bytes:
    """The protobuf JSON mapping (camelCase, enum names, int64 as strings), every field present
    so receivers see a stable shape (`suppressedCount: "0"` rather than a missing key)."""
    document = json_format.MessageToDict(alert, always_print_fields_with_no_presence=True)
    return json.dumps(document, separators=(",", ":")).encode()


def _retryable_status(status: int) -> bool:
    return status >= 500 or status in (408, 429)


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 5
    backoff_s: float = 0.25
    backoff_max_s: float = 8.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.backoff_s < 0 or self.backoff_max_s < self.backoff_s:
            raise ValueError(f"invalid retry policy {self!r}")

    def delay(self, attempt: int) -> float:
        """Exponential backoff with jitter (0.5x-1x), so workers do not retry in lockstep."""
        base = min(self.backoff_s * 2.0 ** (attempt - 1), self.backoff_max_s)
        return base * (0.5 + random.random() / 2)


@dataclass
class WebhookStats:
    sent: int = 0
    failed: int = 0
    retries: int = 0
    dropped: int = 0  # queue full or sink closed
    left_at_shutdown: int = 0


class WebhookSink:
    """A bounded queue and a few workers POSTing alerts; see the module docstring."""

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float,
        queue_max: int,
        workers: int = 4,
        retry: RetryPolicy | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.target = WebhookTarget.parse(url)
        self._url = url
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._ssl_context = ssl_context
        self._queue: asyncio.Queue[scoring_pb2.Alert] = asyncio.Queue(maxsize=queue_max)
        self._worker_count = workers
        self._workers: list[asyncio.Task[None]] = []
        self._in_flight = 0
        self._closed = False
        self.stats = WebhookStats()

    def start(self) -> None:
        """Start the workers (inside the running event loop)."""
        WEBHOOK_QUEUE.set_function(self._queue.qsize)
        self._workers = [
            asyncio.create_task(self._work(), name=f"webhook-{i}")
            for i in range(self._worker_count)
        ]
        log.info("webhook_started", url=self._url, workers=self._worker_count)

    def offer(self, alert: scoring_pb2.Alert) -> bool:
        """Queue an alert without ever waiting; False (counted, logged) when it was dropped."""
        if self._closed:
            return self._drop(alert, "closed")
        try:
            self._queue.put_nowait(alert)
        except asyncio.QueueFull:
            return self._drop(alert, "queue_full")
        return True

    def _drop(self, alert: scoring_pb2.Alert, reason: str) -> bool:
        self.stats.dropped += 1
        WEBHOOK_DROPPED.labels(reason=reason).inc()
        log.warning(
            "webhook_alert_dropped",
            reason=reason,
            alert_id=alert.alert_id,
            account_id=alert.account_id,
            queue_max=self._queue.maxsize,
        )
        return False

    @property
    def pending(self) -> int:
        """Alerts queued or being sent right now."""
        return self._queue.qsize() + self._in_flight

    async def close(self, drain_timeout_s: float) -> int:
        """Stop taking alerts, let the workers drain the queue for at most `drain_timeout_s`,
        then stop them; return (and log, and count as dropped) what was left unsent."""
        self._closed = True
        if self._workers:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._queue.join(), timeout=drain_timeout_s)
        left = self.pending
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []
        self.stats.left_at_shutdown = left
        if left:
            WEBHOOK_DROPPED.labels(reason="shutdown").inc(left)
            log.warning("webhook_unsent_at_shutdown", alerts=left, drain_timeout_s=drain_timeout_s)
        log.info(
            "webhook_stopped",
            sent=self.stats.sent,
            failed=self.stats.failed,
            dropped=self.stats.dropped,
            left=left,
        )
        return left

    async def _work(self) -> None:
        while True:  # ends by cancellation in close()
            alert = await self._queue.get()
            self._in_flight += 1
            try:
                await self._deliver(alert)
            finally:
                self._in_flight -= 1
                self._queue.task_done()

    async def _deliver(self, alert: scoring_pb2.Alert) -> None:
        body = alert_to_json(alert)
        headers = {"Idempotency-Key": alert.alert_id}
        last_error = ""
        for attempt in range(1, self._retry.attempts + 1):
            try:
                status = await post(
                    self.target,
                    body,
                    timeout_s=self._timeout_s,
                    headers=headers,
                    ssl_context=self._ssl_context,
                )
            except (OSError, TimeoutError, HttpProtocolError) as e:
                last_error = repr(e) if not isinstance(e, TimeoutError) else "timeout"
            else:
                if 200 <= status < 300:
                    self.stats.sent += 1
                    WEBHOOK_SENT.inc()
                    return
                last_error = f"HTTP {status}"
                if not _retryable_status(status):
                    break
            if attempt < self._retry.attempts:
                self.stats.retries += 1
                WEBHOOK_RETRIES.inc()
                await asyncio.sleep(self._retry.delay(attempt))
        self.stats.failed += 1
        WEBHOOK_FAILED.inc()
        log.error(
            "webhook_failed",
            alert_id=alert.alert_id,
            account_id=alert.account_id,
            error=last_error,
            attempts=attempt,
        )
