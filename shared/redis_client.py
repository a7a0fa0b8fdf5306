"""The Redis client factory and key naming.

Every key is `<prefix>:{<entity>:<id>}:<name>`: the braces are a Redis Cluster hash tag, so all
of one account's keys live in one slot and a Lua script may touch them together. The prefix
(REDIS_KEY_PREFIX) isolates test runs and the training replay from live state.
"""

from __future__ import annotations

import redis.asyncio as aioredis

from shared.config import Settings

__all__ = ["account_key", "make_redis", "terminal_key"]


def make_redis(settings: Settings, *, url: str | None = None) -> aioredis.Redis:
    """A pooled asyncio client. Replies stay bytes: scripts return numbers and ids, and decoding
    every reply costs CPU in the scoring hot path."""
    client: aioredis.Redis = aioredis.Redis.from_url(
        url or settings.redis_url,
        decode_responses=False,
        socket_connect_timeout=5.0,
        socket_keepalive=True,
        health_check_interval=30,
    )
    return client


def account_key(prefix: str, account_id: str, name: str) -> str:
    return f"{prefix}:{{acct:{account_id}}}:{name}"


def terminal_key(prefix: str, terminal_id: str, name: str) -> str:
    return f"{prefix}:{{term:{terminal_id}}}:{name}"
