"""`send_pipeline` and `OrderedConnection` against real Redis: every reply in order and to its
own caller, errors in their place, connections kept in step (or closed when they cannot be)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError, ResponseError

from shared.config import Settings
from shared.redis_packing import OrderedConnection, send_pipeline, use_hiredis_packing


@pytest.fixture(autouse=True)
async def _clean_keys(settings: Settings, redis: aioredis.Redis) -> AsyncIterator[None]:
    yield
    keys = [k async for k in redis.scan_iter(match=f"{settings.redis_key_prefix}:*")]
    for start in range(0, len(keys), 500):
        await redis.unlink(*keys[start : start + 500])


async def test_thousands_of_replies_in_order_with_an_error_in_place(
    settings: Settings, redis: aioredis.Redis
) -> None:
    prefix = settings.redis_key_prefix
    commands: list[tuple[str | bytes | int, ...]] = []
    for i in range(3000):  # more than one socket read's worth of replies
        commands.append(("SET", f"{prefix}:p:{i}", b"\x00value-%d" % i))
        commands.append(("INCRBY", f"{prefix}:n", i))
    commands.insert(1000, ("INCRBY", f"{prefix}:p:0", 1))  # a string that is not a number
    commands.append(("GET", f"{prefix}:p:2999"))
    replies = await send_pipeline(use_hiredis_packing(redis), commands)
    assert len(replies) == len(commands)
    assert isinstance(replies[1000], ResponseError)
    assert "not an integer" in str(replies[1000])
    counter = f"{prefix}:n"
    counts = [r for c, r in zip(commands, replies, strict=True) if c[1] == counter]
    assert counts == [sum(range(i + 1)) for i in range(3000)]
    assert replies[-1] == b"\x00value-2999"
    # the pooled connection is in step: a plain command after it reads its own reply
    assert await redis.get(f"{prefix}:p:7") == b"\x00value-7"


async def test_a_cancelled_pipeline_does_not_leave_a_connection_out_of_step(
    settings: Settings, redis: aioredis.Redis
) -> None:
    prefix = settings.redis_key_prefix
    commands = [("SET", f"{prefix}:c:{i}", "x" * 100) for i in range(20_000)]
    task = asyncio.ensure_future(send_pipeline(redis, commands))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    for i in range(50):
        assert await redis.set(f"{prefix}:after:{i}", str(i)) is True
        assert await redis.get(f"{prefix}:after:{i}") == str(i).encode()


async def test_ordered_calls_run_in_send_order_and_reply_to_their_own_caller(
    settings: Settings, redis: aioredis.Redis
) -> None:
    """Calls sent one after the other run in that order (each appends to one list), each
    caller gets its own replies whichever is awaited first, and a call nobody awaits does not
    shift the replies of the next."""
    key = f"{settings.redis_key_prefix}:ordered"
    channel = OrderedConnection(redis)
    try:
        first = await channel.send([("RPUSH", key, "a"), ("LRANGE", key, 0, -1)])
        abandoned = await channel.send([("RPUSH", key, "b")])
        second = await channel.send([("RPUSH", key, "c"), ("INCR", key), ("LLEN", key)])
        # awaited out of order: the first call's replies are read (and kept) on the way
        (pushed, wrong_type, length) = await second.replies()
        assert pushed == 3 and length == 3
        assert isinstance(wrong_type, ResponseError)
        assert await first.replies() == [1, [b"a"]]
        assert await channel.call([("LRANGE", key, 0, -1)]) == [[b"a", b"b", b"c"]]
        del abandoned
    finally:
        await channel.aclose()


async def test_a_broken_ordered_connection_fails_every_unread_call_and_reconnects(
    settings: Settings, redis: aioredis.Redis
) -> None:
    key = f"{settings.redis_key_prefix}:broken"
    channel = OrderedConnection(redis)
    try:
        slow = await channel.send([("BLPOP", f"{key}:empty", "0.5")])  # blocks this connection
        queued = await channel.send([("SET", key, "queued")])
        reader = asyncio.ensure_future(slow.replies())
        await asyncio.sleep(0.05)
        reader.cancel()  # a reader cancelled halfway: the connection is out of step
        with pytest.raises(asyncio.CancelledError):
            await reader
        with pytest.raises(ConnectionError):
            await queued.replies()
        # the next call opens a new connection and is answered in step
        assert await channel.call([("SET", key, "after"), ("GET", key)]) == [b"OK", b"after"]
    finally:
        await channel.aclose()
