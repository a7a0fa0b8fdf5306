"""The webhook sink against real HTTP servers on loopback: one that accepts, one that fails with
500s, one that hangs, one that rejects, one that speaks no HTTP, and a closed port."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from protos.fraud.v1 import scoring_pb2
from services.alerting.webhook import (
    HttpProtocolError,
    RetryPolicy,
    WebhookSink,
    WebhookTarget,
    alert_to_json,
    post,
)
from shared.errors import ConfigError

FAST_RETRY = RetryPolicy(attempts=3, backoff_s=0.01, backoff_max_s=0.02)


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Server:
    """A loopback HTTP server whose reply to the n-th request is `reply(n)`: a status, or None
    to hang until the test ends."""

    reply: Callable[[int], int | None]
    raw_reply: bytes | None = None
    requests: list[Request] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (h.partition(":") for h in header_lines if h)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            method, path, _ = request_line.split(" ", 2)
            self.requests.append(Request(method, path, headers, body))
            if self.raw_reply is not None:
                writer.write(self.raw_reply)
            else:
                status = self.reply(len(self.requests))
                if status is None:
                    await self.release.wait()
                else:
                    writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\nok".encode())
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/alerts?src=fs"


ServerFactory = Callable[..., Awaitable[Server]]


@pytest.fixture
async def http_server() -> AsyncIterator[ServerFactory]:
    started: list[tuple[Server, asyncio.Server]] = []

    async def start(reply: Callable[[int], int | None], raw_reply: bytes | None = None) -> Server:
        server = Server(reply=reply, raw_reply=raw_reply)
        listener = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        server.port = listener.sockets[0].getsockname()[1]
        started.append((server, listener))
        return server

    yield start
    for server, listener in started:
        server.release.set()
        listener.close()
        await listener.wait_closed()
    await asyncio.sleep(0.05)  # let released handlers finish closing their sockets


def _alert(n: int = 1, suppressed: int = 0) -> scoring_pb2.Alert:
    return scoring_pb2.Alert(
        alert_id=f"alert-{n}",
        account_id="acct-1",
        transaction_id=f"tx-{n}",
        severity=scoring_pb2.SEVERITY_HIGH,
        score=0.93,
        decision=scoring_pb2.DECISION_DECLINE,
        reasons=[scoring_pb2.Reason(code="VELOCITY_1M", text="many", contribution=1.0)],
        created_at=Timestamp(seconds=1_700_000_000),
        suppressed_count=suppressed,
    )


async def _settle(sink: WebhookSink, rounds: int = 500) -> None:
    """Wait (bounded) until the sink has nothing queued or in flight."""
    for _ in range(rounds):
        if sink.pending == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"webhook still has {sink.pending} pending")


def test_alert_json_is_the_protobuf_mapping_with_every_field() -> None:
    document = json.loads(alert_to_json(_alert(7)))
    assert document["alertId"] == "alert-7"
    assert document["severity"] == "SEVERITY_HIGH"
    assert document["decision"] == "DECISION_DECLINE"
    assert document["suppressedCount"] == "0"  # int64 is a string in the JSON mapping
    assert document["createdAt"] == "2023-11-14T22:13:20Z"
    assert document["reasons"][0]["code"] == "VELOCITY_1M"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/x", "must start with http"),
        ("example.com/hook", "must start with http"),
        ("http:///hook", "no host"),
        ("http://example.com:99999/", "invalid port"),
        ("https://user:pw@example.com/", "credentials"),
    ],
)
def test_bad_urls_are_config_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        WebhookTarget.parse(url)
    assert "ALERT_WEBHOOK_URL" in str(info.value)


def test_target_parsing() -> None:
    target = WebhookTarget.parse("https://hooks.example.com/a/b?x=1")
    assert (target.scheme, target.host, target.port, target.path) == (
        "https",
        "hooks.example.com",
        443,
        "/a/b?x=1",
    )
    assert target.host_header == "hooks.example.com"
    assert WebhookTarget.parse("http://[::1]:8080").host_header == "[::1]:8080"
    assert WebhookTarget.parse("http://[::1]:8080").path == "/"


async def test_post_sends_a_well_formed_request(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 201)
    target = WebhookTarget.parse(server.url)
    status = await post(target, b'{"a":1}', timeout_s=5, headers={"Idempotency-Key": "k1"})
    assert status == 201
    [request] = server.requests
    assert (request.method, request.path) == ("POST", "/hooks/alerts?src=fs")
    assert request.body == b'{"a":1}'
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["idempotency-key"] == "k1"


async def test_post_skips_interim_responses(http_server: ServerFactory) -> None:
    raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    server = await http_server(lambda n: 0, raw_reply=raw)
    assert await post(WebhookTarget.parse(server.url), b"{}", timeout_s=5) == 204


async def test_post_rejects_a_reply_that_is_not_http(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 0, raw_reply=b"SSH-2.0-OpenSSH\r\n")
    with pytest.raises(HttpProtocolError, match="not an HTTP"):
        await post(WebhookTarget.parse(server.url), b"{}", timeout_s=5)


async def test_post_times_out_on_a_hanging_server(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: None)
    with pytest.raises(TimeoutError):
        await post(WebhookTarget.parse(server.url), b"{}", timeout_s=0.2)


async def test_sink_delivers_every_alert(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 200)
    sink = WebhookSink(server.url, timeout_s=5, queue_max=100, workers=2, retry=FAST_RETRY)
    sink.start()
    try:
        assert all(sink.offer(_alert(n)) for n in range(10))
        await _settle(sink)
    finally:
        assert await sink.close(drain_timeout_s=5) == 0
    assert sink.stats.sent == 10
    assert (sink.stats.failed, sink.stats.dropped, sink.stats.retries) == (0, 0, 0)
    ids = sorted(json.loads(r.body)["alertId"] for r in server.requests)
    assert ids == sorted(f"alert-{n}" for n in range(10))
    for request in server.requests:
        assert request.headers["idempotency-key"] == json.loads(request.body)["alertId"]


async def test_sink_retries_500s_then_succeeds(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 500 if n <= 2 else 200)
    sink = WebhookSink(server.url, timeout_s=5, queue_max=10, workers=1, retry=FAST_RETRY)
    sink.start()
    try:
        sink.offer(_alert())
        await _settle(sink)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.sent, sink.stats.failed, sink.stats.retries) == (1, 0, 2)
    assert len(server.requests) == 3


async def test_sink_gives_up_after_the_last_attempt(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 503)
    sink = WebhookSink(server.url, timeout_s=5, queue_max=10, workers=1, retry=FAST_RETRY)
    sink.start()
    try:
        sink.offer(_alert(1))
        sink.offer(_alert(2))
        await _settle(sink)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.sent, sink.stats.failed, sink.stats.retries) == (0, 2, 4)
    assert len(server.requests) == 6


async def test_client_errors_are_not_retried(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 400)
    sink = WebhookSink(server.url, timeout_s=5, queue_max=10, workers=1, retry=FAST_RETRY)
    sink.start()
    try:
        sink.offer(_alert())
        await _settle(sink)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.failed, sink.stats.retries, len(server.requests)) == (1, 0, 1)


async def test_throttling_is_retried(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: 429 if n == 1 else 200)
    sink = WebhookSink(server.url, timeout_s=5, queue_max=10, workers=1, retry=FAST_RETRY)
    sink.start()
    try:
        sink.offer(_alert())
        await _settle(sink)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.sent, sink.stats.retries) == (1, 1)


async def test_refused_connections_fail_after_retries() -> None:
    # Bind then close a listener: its port is now (almost certainly) closed.
    listener = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    listener.close()
    await listener.wait_closed()
    sink = WebhookSink(
        f"http://127.0.0.1:{port}/", timeout_s=5, queue_max=10, workers=1, retry=FAST_RETRY
    )
    sink.start()
    try:
        sink.offer(_alert())
        await _settle(sink)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.sent, sink.stats.failed, sink.stats.retries) == (0, 1, 2)


async def test_hanging_server_times_out_and_never_blocks_offers(
    http_server: ServerFactory,
) -> None:
    server = await http_server(lambda n: None)
    retry = RetryPolicy(attempts=2, backoff_s=0.01, backoff_max_s=0.01)
    sink = WebhookSink(server.url, timeout_s=0.2, queue_max=2, workers=1, retry=retry)
    sink.start()
    try:
        # offer() is synchronous: no worker runs in between, so exactly the queue's size is kept
        # and the rest is dropped at once instead of waiting for the hanging server.
        accepted = [sink.offer(_alert(n)) for n in range(5)]
        assert accepted == [True, True, False, False, False]
        assert sink.stats.dropped == 3
        await _settle(sink, rounds=1000)
    finally:
        await sink.close(drain_timeout_s=5)
    assert (sink.stats.sent, sink.stats.failed) == (0, 2)
    assert len(server.requests) == 4  # two alerts, two attempts each, each timed out


async def test_close_drains_then_reports_what_was_left(http_server: ServerFactory) -> None:
    server = await http_server(lambda n: None)
    sink = WebhookSink(server.url, timeout_s=30, queue_max=10, workers=1, retry=FAST_RETRY)
    sink.start()
    for n in range(3):
        sink.offer(_alert(n))
    for _ in range(500):  # until the worker holds the first alert at the hanging server
        if server.requests:
            break
        await asyncio.sleep(0.01)
    left = await sink.close(drain_timeout_s=0.1)
    assert left == 3  # one in flight, two queued
    assert sink.stats.left_at_shutdown == 3
    assert sink.offer(_alert(9)) is False  # closed: counted as dropped, never queued
    assert sink.stats.dropped == 1


async def test_close_without_start_reports_the_queue() -> None:
    sink = WebhookSink("http://127.0.0.1:9/", timeout_s=1, queue_max=10, retry=FAST_RETRY)
    sink.offer(_alert())
    assert await sink.close(drain_timeout_s=0.01) == 1
