"""The query service's bearer-token check, without a network: the interceptor is called the way
grpc.aio calls it, with small hand-written stand-ins for the call details and the context."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest

from services.query.auth import BearerTokenInterceptor, bearer_token

RISK_METHOD = "/fraud.v1.RiskService/CheckTransaction"
WATCH_METHOD = "/fraud.v1.RiskService/WatchAlerts"


@dataclass
class Details:
    """What grpc.aio hands an interceptor: the method and the call's metadata."""

    method: str
    invocation_metadata: tuple[tuple[str, str | bytes], ...] = ()


class Aborted(Exception):
    pass


class FakeContext:
    """Records the status a handler aborts with (grpc.aio's abort raises; so does this)."""

    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> None:
        self.code, self.details = code, details
        raise Aborted(details)


async def real_unary(request: Any, context: Any) -> str:
    return "served"


async def real_stream(request: Any, context: Any) -> Any:
    yield "served"


def continuation_for(
    handler: grpc.RpcMethodHandler | None,
) -> Callable[[Any], Awaitable[grpc.RpcMethodHandler | None]]:
    async def continuation(details: Any) -> grpc.RpcMethodHandler | None:
        return handler

    return continuation


UNARY = grpc.unary_unary_rpc_method_handler(
    real_unary, request_deserializer=bytes, response_serializer=str.encode
)
STREAM = grpc.unary_stream_rpc_method_handler(real_stream)


def auth(metadata: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", metadata),)


@pytest.mark.parametrize(
    ("metadata", "token"),
    [
        ((), None),
        ((("x-other", "Bearer t"),), None),
        (auth("Bearer t0k3n"), "t0k3n"),
        (auth("bearer   t0k3n  "), "t0k3n"),
        (auth("BEARER t0k3n"), "t0k3n"),
        ((("authorization", b"Bearer t0k3n"),), "t0k3n"),
        (auth("Basic dXNlcjpwdw=="), None),
        (auth("Bearer"), None),
        (auth("Bearer   "), None),
        (auth("t0k3n"), None),
    ],
)
def test_bearer_token_parsing(metadata: Any, token: str | None) -> None:
    assert bearer_token(metadata) == token


def test_no_tokens_is_a_wiring_error() -> None:
    with pytest.raises(ValueError):
        BearerTokenInterceptor([])
    with pytest.raises(ValueError):
        BearerTokenInterceptor(["  ", ""])


async def test_a_valid_token_reaches_the_real_handler() -> None:
    interceptor = BearerTokenInterceptor(["one", "two"])
    for token in ("one", "two"):
        handler = await interceptor.intercept_service(
            continuation_for(UNARY), Details(RISK_METHOD, auth(f"Bearer {token}"))
        )
        assert handler is UNARY


@pytest.mark.parametrize(
    ("metadata", "said"),
    [((), "missing"), (auth("Bearer nope"), "invalid"), (auth("Bearer one-two"), "invalid")],
)
async def test_a_call_without_a_valid_token_is_unauthenticated(metadata: Any, said: str) -> None:
    interceptor = BearerTokenInterceptor(["one"])
    handler = await interceptor.intercept_service(
        continuation_for(UNARY), Details(RISK_METHOD, metadata)
    )
    assert handler is not UNARY
    # Same kind and (de)serializers, so the server can still dispatch and parse the call.
    assert not handler.request_streaming and not handler.response_streaming
    assert handler.request_deserializer is UNARY.request_deserializer
    assert handler.response_serializer is UNARY.response_serializer
    context = FakeContext()
    with pytest.raises(Aborted):
        await handler.unary_unary(b"request", context)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert said in context.details


async def test_a_streaming_call_is_refused_with_a_streaming_handler() -> None:
    interceptor = BearerTokenInterceptor(["one"])
    handler = await interceptor.intercept_service(continuation_for(STREAM), Details(WATCH_METHOD))
    assert handler.response_streaming and not handler.request_streaming
    context = FakeContext()
    with pytest.raises(Aborted):
        async for _ in handler.unary_stream(b"request", context):
            pass
    assert context.code == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    "method",
    [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    ],
)
async def test_health_and_reflection_need_no_token(method: str) -> None:
    interceptor = BearerTokenInterceptor(["one"])
    handler = await interceptor.intercept_service(continuation_for(UNARY), Details(method))
    assert handler is UNARY


async def test_an_unknown_method_stays_unimplemented() -> None:
    interceptor = BearerTokenInterceptor(["one"])
    handler = await interceptor.intercept_service(
        continuation_for(None), Details("/fraud.v1.RiskService/Nope")
    )
    assert handler is None
