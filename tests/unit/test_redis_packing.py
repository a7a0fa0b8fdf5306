"""The hiredis packer puts the same bytes on the wire as redis-py's own asyncio packer."""

from __future__ import annotations

from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.exceptions import DataError

from shared.redis_packing import packed_connection_class, use_hiredis_packing

COMMANDS: list[tuple[Any, ...]] = [
    ("PING",),
    ("CONFIG GET", "maxmemory"),  # a two-word command name is split, as redis-py does
    ("EVALSHA", "a" * 40, 2, "fs:{acct:a}:vc", "fs:{acct:b}:vc", "A", "x\x1fy\x1f"),
    ("SET", "k", b"\x00\xff binary", "PX", 1000),
    ("SET", "unicode-\u00fc-\u20ac", "v", "EX", 10),
    ("HSET", "h", "f", 1.5, "g", -3, "e", 10**15),
]


@pytest.mark.parametrize("args", COMMANDS)
def test_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    plain = Connection()
    packed = packed_connection_class(Connection)()
    assert b"".join(packed.pack_command(*args)) == b"".join(plain.pack_command(*args))


def test_pipelines_pack_the_same_too() -> None:
    plain = Connection()
    packed = packed_connection_class(Connection)()
    assert b"".join(packed.pack_commands(COMMANDS)) == b"".join(plain.pack_commands(COMMANDS))


def test_unencodable_arguments_are_a_data_error() -> None:
    with pytest.raises(DataError):
        packed_connection_class(Connection)().pack_command("SET", "k", object())


async def test_the_client_pool_gets_the_packer_once() -> None:
    client = aioredis.Redis.from_url("unix:///tmp/fraudstream-no-such.sock")
    try:
        use_hiredis_packing(client)
        use_hiredis_packing(client)
        cls = client.connection_pool.connection_class
        assert issubclass(cls, UnixDomainSocketConnection)
        assert cls.__name__ == "HiredisPackedUnixDomainSocketConnection"
        assert cls.__mro__[2] is UnixDomainSocketConnection  # wrapped once, not twice
    finally:
        await client.aclose()
