"""`send_pipeline` against real Redis: every reply in order, errors in their place, and the
connection back in the pool in step (the next command gets its own reply)."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared.config import Settings
from shared.redis_packing import send_pipeline, use_hiredis_packing


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
