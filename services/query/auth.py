"""Bearer-token authentication for the query service's gRPC server.

`BearerTokenInterceptor` admits a call when its `authorization` metadata is `Bearer <token>`
with one of the configured tokens (QUERY_AUTH_TOKENS); anything else is refused with
UNAUTHENTICATED before the handler runs. The standard health and reflection services stay open:
load balancers and Kubernetes probes carry no tokens, and reflection only describes the
contract that `protos/` publishes anyway.

The server installs the interceptor only when tokens are configured, so the default local setup
pays nothing per call.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Any

import grpc
from grpc import aio

__all__ = ["OPEN_SERVICE_PREFIXES", "BearerTokenInterceptor", "bearer_token"]

# Method names are "/<package>.<Service>/<Method>"; these services never need a token.
OPEN_SERVICE_PREFIXES: tuple[str, ...] = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_SCHEME = "bearer"
_MISSING = "missing authorization metadata: send 'authorization: Bearer <token>'"
_INVALID = "invalid bearer token"


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the first `authorization: Bearer <token>` entry, or None.

    The scheme is case-insensitive (RFC 7235); metadata keys arrive lower-cased from gRPC.
    """
    for key, value in metadata or ():
        if key != "authorization":
            continue
        text = value.decode("latin-1") if isinstance(value, bytes) else value
        scheme, _, token = text.strip().partition(" ")
        if scheme.lower() == _SCHEME and token.strip():
            return token.strip()
        return None
    return None


class BearerTokenInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    """Refuses calls without a valid bearer token with UNAUTHENTICATED (see the module doc)."""

    def __init__(
        self, tokens: Sequence[str], open_prefixes: Sequence[str] = OPEN_SERVICE_PREFIXES
    ) -> None:
        cleaned = [t.strip() for t in tokens if t.strip()]
        if not cleaned:
            raise ValueError("BearerTokenInterceptor needs at least one token")
        # Bytes, so the comparison can be constant-time (hmac.compare_digest on str needs ASCII).
        self._tokens = tuple(t.encode() for t in cleaned)
        self._open = tuple(open_prefixes)
        self._refuse_missing = _Refusal(_MISSING)
        self._refuse_invalid = _Refusal(_INVALID)

    def _valid(self, token: str) -> bool:
        given = token.encode()
        # Check every configured token (no early exit) so timing does not tell which one matched.
        ok = False
        for expected in self._tokens:
            ok |= hmac.compare_digest(given, expected)
        return ok

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method or ""
        if method.startswith(self._open):
            return await continuation(handler_call_details)
        token = bearer_token(handler_call_details.invocation_metadata)
        if token is not None and self._valid(token):
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: let gRPC answer UNIMPLEMENTED as usual
            return handler
        refusal = self._refuse_missing if token is None else self._refuse_invalid
        return refusal.handler_like(handler)


class _Refusal:
    """Handlers that abort with UNAUTHENTICATED and a fixed message, of any RPC kind."""

    def __init__(self, message: str) -> None:
        self.message = message

    async def _unary(self, request: Any, context: aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.message)

    async def _stream(self, request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, self.message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler is

    def handler_like(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """A refusing handler of the same kind as `handler` (the server dispatches on the kind),
        with its (de)serializers."""
        kinds = {
            (False, False): (grpc.unary_unary_rpc_method_handler, self._unary),
            (False, True): (grpc.unary_stream_rpc_method_handler, self._stream),
            (True, False): (grpc.stream_unary_rpc_method_handler, self._unary),
            (True, True): (grpc.stream_stream_rpc_method_handler, self._stream),
        }
        factory, behavior = kinds[
            (bool(handler.request_streaming), bool(handler.response_streaming))
        ]
        refusing: grpc.RpcMethodHandler = factory(
            behavior,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
        return refusing
