"""Producer-retry deduplication in Redis: one pipeline round trip per batch.

Each forwarded transaction claims `<prefix>:{acct:<account_id>}:txid:<transaction_id>` with the
source position that first carried it (`<partition>:<offset>`), for the dedup window:

    SET key "<partition>:<offset>" NX EX <window> GET

The reply says what happened, atomically, in one command:
  * nil                       -> nobody had claimed it: the first sighting, forward it;
  * our own "<partition>:<offset>" -> the same Kafka record seen again (a batch retried after a
                                 crash, an aborted transaction, a rebalance): forward it, the
                                 earlier attempt's output never committed;
  * another position          -> a producer retry published twice: drop it.

Because the claim names the source record and not the instance or the attempt, processing a
batch again is idempotent, which is what the exactly-once loop requires of Redis writes.

One round trip per batch, two ways: on a single Redis, one Lua call runs the SETs of the whole
batch and returns the verdicts (measured here about 3x less client CPU than a pipeline of SETs:
redis-py packs and parses every pipelined command in Python); on Redis Cluster, where one script
may not touch keys of many slots, a non-transactional pipeline of the same SETs (split per node
by the client). Keys are hash-tagged by account either way. SET with both NX and GET needs
Redis 7.0 or later (`check_server`).
Duplicates are detected per account: the same transaction_id under two accounts is two
transactions, which is also what a producer sharing ids across accounts would mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

from shared.errors import ConfigError
from shared.redis_client import account_key

__all__ = ["MIN_REDIS_VERSION", "Claim", "Deduplicator"]

MIN_REDIS_VERSION = (7, 0)

# KEYS: the claim keys; ARGV[1]: the window in seconds, ARGV[i + 1]: the source of KEYS[i].
# Returns 1 (forward) or 0 (duplicate) per key, in order.
_CLAIM_BATCH = """
local window = ARGV[1]
local verdicts = {}
for i, key in ipairs(KEYS) do
  local source = ARGV[i + 1]
  local prior = redis.call('SET', key, source, 'EX', window, 'NX', 'GET')
  if prior == false or prior == source then verdicts[i] = 1 else verdicts[i] = 0 end
end
return verdicts
"""


@dataclass(frozen=True, slots=True)
class Claim:
    account_id: str
    transaction_id: str
    source: str  # "<partition>:<offset>" of the raw record carrying the transaction


class Deduplicator:
    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        *,
        prefix: str,
        window_s: int,
        use_script: bool | None = None,
    ) -> None:
        """`use_script`: one Lua call per batch (default on a single Redis) or a pipeline
        (default, and the only choice, on Redis Cluster)."""
        if window_s < 1:
            raise ValueError(f"dedup window must be at least 1 s, got {window_s}")
        self._redis = redis
        self._prefix = prefix
        self._window_s = window_s
        self._script: AsyncScript | None = None
        if use_script is None:
            use_script = not isinstance(redis, RedisCluster)
        if use_script:
            if isinstance(redis, RedisCluster):
                raise ValueError("one Lua call cannot claim keys of many slots on Redis Cluster")
            self._script = redis.register_script(_CLAIM_BATCH)

    def key(self, account_id: str, transaction_id: str) -> str:
        return account_key(self._prefix, account_id, f"txid:{transaction_id}")

    async def check_server(self) -> None:
        """Fail at start, with a clear message, on a Redis too old for SET NX GET."""
        info = await self._redis.info("server")
        # A single server answers one dict; a cluster client one dict per node.
        for server in [info] if "redis_version" in info else list(info.values()):
            version = str(server.get("redis_version", "0"))
            parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
            if parts < MIN_REDIS_VERSION:
                raise ConfigError(
                    f"Redis {version} is too old: ingest deduplication needs Redis 7.0 or later"
                )

    async def claim(self, claims: Sequence[Claim]) -> list[bool]:
        """For each claim, True to forward (first sighting or a redelivery of the same record),
        False for a duplicate. One round trip for the whole batch."""
        if not claims:
            return []
        if self._script is not None:
            keys = [self.key(c.account_id, c.transaction_id) for c in claims]
            verdicts = await self._script(
                keys=keys, args=[self._window_s, *(c.source for c in claims)]
            )
            return [v == 1 for v in verdicts]
        pipe = self._redis.pipeline(transaction=False)
        for c in claims:
            pipe.set(
                self.key(c.account_id, c.transaction_id),
                c.source,
                ex=self._window_s,
                nx=True,
                get=True,
            )
        replies = await pipe.execute()
        return [
            reply is None or reply == c.source.encode()
            for c, reply in zip(claims, replies, strict=True)
        ]

    async def claimant(self, account_id: str, transaction_id: str) -> str | None:
        """The source position holding a claim (for tests and operators), or None."""
        value = await self._redis.get(self.key(account_id, transaction_id))
        return None if value is None else bytes(value).decode()
