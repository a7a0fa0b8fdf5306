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

__all__ = ["pack", "packed_connection_class", "send_pipeline", "use_hiredis_packing"]

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
    # The replies already buffered are taken straight from the hiredis reader when the
    # connection has one (redis-py's parser does the same, through two coroutines and its
    # checks per reply: ~1.5 us each, thousands per batch); redis-py reads the socket otherwise.
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    gets = getattr(reader, "gets", None)
    try:
        await conn.send_packed_command([pack(command) for command in commands])
        results: list[object] = []
        for _ in commands:
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
    except BaseException:
        # cancelled or broken halfway: replies may be pending, never reuse the connection
        await conn.disconnect()
        raise
    finally:
        await pool.release(conn)
