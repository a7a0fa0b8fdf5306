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

from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import DataError

_pack: Callable[[tuple[Any, ...]], bytes] | None
try:
    import hiredis

    _pack = getattr(hiredis, "pack_command", None)
except ImportError:  # pragma: no cover - hiredis is a dependency (redis[hiredis])
    _pack = None

__all__ = ["packed_connection_class", "use_hiredis_packing"]

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
