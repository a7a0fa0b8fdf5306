"""Pack Redis commands with hiredis in the asyncio client, as redis-py's sync client does.

redis-py 5.2's asyncio connection packs every command argument in Python (an isinstance chain
and an encode per argument: ~2 us each, measured here), while its sync client hands the whole
command to `hiredis.pack_command` (~0.1 us per argument). Scoring's Lua calls carry thousands of
arguments per batch (the keys of every account and terminal), so the Python packer alone cost
~30 us per scored transaction, a third of the service's CPU. `use_hiredis_packing(client)`
gives a client's pool connections the hiredis packer; the bytes on the wire are identical
(tests/unit/test_redis_packing.py checks), and without hiredis the client is left as it is.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.exceptions import ConnectionError, DataError, ResponseError

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _pack = getattr(hiredis, "pack_command", None)
except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
    _pack = None

try:  # what redis-py's hiredis reader returns while a reply is incomplete
    from redis._parsers.hiredis import NOT_ENOUGH_DATA as _INCOMPLETE
except ImportError:  # pragma: no cover - other redis-py versions: hiredis's default
    _INCOMPLETE = False

__all__ = [
    "OrderedConnection",
    "PendingReplies",
    "pack",
    "packed_connection_class",
    "send_pipeline",
    "use_hiredis_packing",
]

_CLASSES: dict[type[Any], type[Any]] = {}


class _HiredisPacking:
    """Mixin over a redis.asyncio Connection class: `pack_command` through hiredis."""

    def pack_command(self, *args: Any) -> list[bytes]:
        # Same handling of a multi-word command name ("CONFIG GET") as redis-py's packers.
        first = args[0]
        if isinstance(first, str):
            args = (*first.encode().split(), *args[1:])
        elif b" " in first:
            args = (*first.split(), *args[1:])
        assert _pack is not None  # only installed when hiredis can pack
        try:
            return [_pack(args)]
        except TypeError as e:  # redis-py raises DataError for an argument it cannot encode
            raise DataError(str(e)) from e


def packed_connection_class(base: type[Any]) -> type[Any]:
    """`base` (Connection, SSLConnection, UnixDomainSocketConnection) with the hiredis packer."""
    cls = _CLASSES.get(base)
    if cls is None:
        cls = _CLASSES[base] = type(f"HiredisPacked{base.__name__}", (_HiredisPacking, base), {})
    return cls


def use_hiredis_packing(client: aioredis.Redis) -> aioredis.Redis:
    """Make the client's future connections pack with hiredis; call before first use."""
    if _pack is None:
        return client
    pool = client.connection_pool
    if not issubclass(pool.connection_class, _HiredisPacking):
        pool.connection_class = packed_connection_class(pool.connection_class)
    return client


def pack(command: Sequence[str | bytes | int]) -> bytes:
    """One command in the Redis protocol (RESP): hiredis when it is there, else in Python."""
    if _pack is not None:
        return _pack(tuple(command))
    parts = [b"*%d\r\n" % len(command)]
    for arg in command:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(parts)


async def _read_replies(conn: Connection, count: int) -> list[object]:
    """`count` replies, raw, a ResponseError in the place of a command that failed. The replies
    already buffered are taken straight from the hiredis reader when the connection has one
    (redis-py's parser does the same, through two coroutines and its checks per reply: ~1.5 us
    each, thousands per batch); redis-py reads the socket otherwise."""
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    gets = getattr(reader, "gets", None)
    results: list[object] = []
    for _ in range(count):
        reply = gets(False) if gets is not None else _INCOMPLETE
        if reply is _INCOMPLETE:  # nothing complete buffered: read the socket
            try:
                reply = await conn.read_response(disable_decoding=True)
            except ResponseError as error:  # read on: the connection stays in step
                reply = error
        elif isinstance(reply, ConnectionError):
            raise reply
        results.append(reply)
    return results


async def send_pipeline(
    client: aioredis.Redis, commands: Sequence[Sequence[str | bytes | int]]
) -> list[object]:
    """Send `commands` in one write on one pooled connection and read every reply, raw
    (bytes, ints, lists), a ResponseError in the place of a command that failed.

    redis-py's asyncio pipeline packs and parses every command in Python (~10 us a command);
    this packs them with hiredis and reads the replies straight off the connection's parser,
    for the hot paths that send thousands of small commands a second. No MULTI: each command
    stands alone, as in `pipeline(transaction=False)`."""
    pool = client.connection_pool
    # redis-py leaves get_connection unannotated
    get_connection = cast(Callable[[str], Awaitable[Connection]], pool.get_connection)
    conn = await get_connection("PIPELINE")
    try:
        await conn.send_packed_command([pack(command) for command in commands])
        return await _read_replies(conn, len(commands))
    except BaseException:
        # cancelled or broken halfway: replies may be pending, never reuse the connection
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)


class PendingReplies:
    """The replies of one `OrderedConnection.send`, read when awaited (`replies()`)."""

    def __init__(self, channel: OrderedConnection, count: int) -> None:
        self._channel = channel
        self.count = count
        self.future: asyncio.Future[list[object]] = asyncio.get_running_loop().create_future()

    async def replies(self) -> list[object]:
        """Every reply, raw, a ResponseError in the place of a command that failed; raises
        ConnectionError when the connection broke before they were read."""
        return await self._channel.wait(self)


class OrderedConnection:
    """Calls pipelined on one dedicated connection of `client`'s pool, run by Redis in the order
    they are sent (one connection's commands run in order): `send` writes a call's commands and
    returns before Redis has run them, so the caller can queue its next call behind it. The
    replies are read in the same order, whoever awaits them (a call nobody awaits has its
    replies read, and dropped, when a later one is awaited).

    Why (the scoring service): a batch's velocity call keeps Redis busy for tens of
    milliseconds; sent only once the previous reply is in, Redis idles while the service reads
    and decodes the next batch. Pooled connections cannot queue calls in order: two calls on
    two connections may run in either order. And Redis runs a connection's queued commands
    before it turns to another connection's, so a call that must not wait behind the queue (a
    batch's assessment write) goes on the same connection, in its place.

    A failure while sending or reading (or a reader cancelled halfway) leaves the connection out
    of step: it is closed, every call not yet read fails with ConnectionError (the callers
    retry: their calls are idempotent), and the next `send` opens a new one."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._pool = client.connection_pool
        self._conn: Connection | None = None
        self._unread: deque[PendingReplies] = deque()
        self._send_lock = asyncio.Lock()
        self._read_lock = asyncio.Lock()

    async def send(self, commands: Sequence[Sequence[str | bytes | int]]) -> PendingReplies:
        return await self.send_packed([pack(command) for command in commands])

    async def send_packed(self, packed: Sequence[bytes]) -> PendingReplies:
        """`send` of commands already packed (`pack`, one command each): a caller that must
        send at a given moment packs first, so that the moment costs only the write."""
        async with self._send_lock:
            if self._conn is None:
                get_connection = cast(
                    Callable[[str], Awaitable[Connection]], self._pool.get_connection
                )
                self._conn = await get_connection("PIPELINE")
            pending = PendingReplies(self, len(packed))
            self._unread.append(pending)
            try:
                await self._conn.send_packed_command(packed)
            except BaseException as error:
                await self._break(error)
                raise
            return pending

    async def call(self, commands: Sequence[Sequence[str | bytes | int]]) -> list[object]:
        """`send` and wait for the replies."""
        return await (await self.send(commands)).replies()

    async def wait(self, pending: PendingReplies) -> list[object]:
        while not pending.future.done():
            async with self._read_lock:
                if pending.future.done():
                    break
                head = self._unread[0]
                try:
                    assert self._conn is not None  # kept while calls are unread
                    replies = await _read_replies(self._conn, head.count)
                except BaseException as error:
                    await self._break(error)
                    raise
                self._unread.popleft()
                head.future.set_result(replies)
        return pending.future.result()

    async def aclose(self) -> None:
        """Give the connection back (closed: replies may be unread); unread calls fail."""
        await self._break(ConnectionError("closed"))

    async def _break(self, error: BaseException) -> None:
        conn, self._conn = self._conn, None
        failure = ConnectionError(f"the ordered Redis connection broke: {error!r}")
        while self._unread:
            pending = self._unread.popleft()
            if not pending.future.done():
                pending.future.set_exception(failure)
                pending.future.exception()  # retrieved: a waiter, if any, raises it
        if conn is not None:
            await conn.disconnect()
            await self._pool.release(conn)
