"""The alert store in Redis: suppression, recent alerts per account, the global alert stream.

Written by the alerting service (`record`), read by the query service (`list_alerts`, `watch`,
`open_alert_count`, `get_alert`). Key layout, `P` being REDIS_KEY_PREFIX:

    P:{acct:<id>}:alerts:recent          ZSET  member: serialized Alert, score: per-account seq;
                                               the newest ALERT_RECENT_PER_ACCOUNT are kept
    P:{acct:<id>}:alerts:seq             STR   the per-account sequence (INCR)
    P:{acct:<id>}:alerts:open            ZSET  member: alert_id, score: created_at (ms)
    P:{acct:<id>}:alerts:sup:<code>      HASH  until (event ms), sev, pending: suppression state
    P:{acct:<id>}:alerts:tx:<tx id>      STR   outcome of a transaction, for idempotency:
                                               "E<origin>\\n<alert bytes>" or "S<origin>\\n"
    P:{alerts}:stream                    STREAM fields id, account, alert (serialized Alert);
                                               XADD MAXLEN ~ ALERT_STREAM_MAXLEN
    P:{alerts}:idx:<alert id>            STR   the alert's stream entry id (resume, dedupe)

Per-account keys share the `{acct:<id>}` hash tag and the global ones `{alerts}`, so each Lua
script touches one Redis Cluster slot. One batch is two round trips: a pipeline with one
account script per account (suppression, recent, open, idempotency marker, atomically), then one
stream script for the batch's alerts. Both scripts are idempotent, so a batch processed again
after a crash (before its Kafka commit) changes nothing and returns the same alerts:

- the account script looks the transaction up first. Seen with the same origin (topic,
  partition, offset): a redelivery, the stored alert bytes are returned as they were. Seen with a
  different origin: a duplicate score for an already handled transaction, nothing is emitted.
- the stream script skips alerts whose `idx` key exists. Because every redelivered alert goes
  through it again, a crash between the two round trips is repaired by the redelivery.

Suppression: at most one alert per (account, reason code) per window, windows measured in
EVENT time (the transaction's event_time), so a replay suppresses exactly like the live run and
tests need no sleeping. An alert opens a window [t, t + window); alerts inside it with the same
or a lower severity are suppressed and counted in `pending`; the next alert emitted for that
(account, code) carries the count as `suppressed_count`. A MORE severe alert is never held back
by a milder one: it is emitted (with the count) and opens a new window at its severity, because
a HIGH routed to a pager must not vanish behind a LOW sent minutes earlier. State expires
(wall clock) a day after the window, so a count older than that is forgotten.

"Open" alerts: those created in the last 24 hours (OPEN_WINDOW_S). There is no acknowledgement
API yet; when case management gets one it can ZREM from the `open` set.

A deliberate replay (an operator resetting the group's offsets) within the 7-day marker
retention republishes the stored alerts unchanged, same ids, like a redelivery; later than that,
records are processed afresh.

Retention: per-account keys live 30 days after the account's last alert (recent alerts of a
long-quiet account disappear); idempotency markers and stream indexes 7 days, longer than any
realistic outage before an uncommitted batch is redelivered.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, cast

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError

from protos.fraud.v1 import scoring_pb2
from shared.config import Settings
from shared.errors import InputError
from shared.redis_client import account_key

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "OPEN_WINDOW_S",
    "AlertCandidate",
    "AlertStore",
    "InvalidPageToken",
    "Outcome",
    "StoreResult",
    "UnknownAlertId",
]

OPEN_WINDOW_S = 24 * 3600
OPEN_CAP = 10_000  # open alert ids kept per account (bounds memory of a runaway account)
STATE_GRACE_S = 24 * 3600  # suppression state outlives its window by this (pending counts)
TX_TTL_S = 7 * 86400
IDX_TTL_S = 7 * 86400
ACCOUNT_TTL_S = 30 * 86400
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
WATCH_BLOCK_MS = 1000

# The account script appends field 9 (suppressed_count, varint; tag (9 << 3) | 0 = 72) to the
# serialized alert. That is exactly the canonical serialization, because 9 is Alert's highest
# field number and a zero count is omitted (proto3) as the base already does; were a higher field
# ever added, the bytes would still parse the same, merely not in canonical field order.

_ACCOUNT_SCRIPT = """
-- KEYS: seq, recent, open, then per candidate: sup, tx
-- ARGV: window_ms, recent_cap, open_window_ms, open_cap, state_ttl_ms, tx_ttl_ms, account_ttl_ms,
--       then per candidate: origin, event_ms, severity, alert_id, created_ms, base alert bytes
local FIXED, PER = 7, 6
local window_ms, recent_cap = tonumber(ARGV[1]), tonumber(ARGV[2])
local open_window_ms, open_cap = tonumber(ARGV[3]), tonumber(ARGV[4])
local state_ttl_ms, tx_ttl_ms, account_ttl_ms = ARGV[5], ARGV[6], ARGV[7]
local function varint(n)
  local out = {}
  repeat
    local b = n % 128
    n = (n - b) / 128
    if n > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until n == 0
  return table.concat(out)
end
local out, emitted = {}, false
local n = (#ARGV - FIXED) / PER
for i = 0, n - 1 do
  local sup_key, tx_key = KEYS[4 + 2 * i], KEYS[5 + 2 * i]
  local a = FIXED + PER * i
  local origin, event_ms, sev = ARGV[a + 1], tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  local alert_id, created_ms, base = ARGV[a + 4], tonumber(ARGV[a + 5]), ARGV[a + 6]
  local done = redis.call('GET', tx_key)
  if done then
    local nl = string.find(done, '\\n', 2, true)
    if string.sub(done, 2, nl - 1) ~= origin then
      out[#out + 1] = 'duplicate'
      out[#out + 1] = ''
    elseif string.sub(done, 1, 1) == 'E' then
      out[#out + 1] = 'replayed'
      out[#out + 1] = string.sub(done, nl + 1)
    else
      out[#out + 1] = 'replayed_suppressed'
      out[#out + 1] = ''
    end
  else
    local st = redis.call('HMGET', sup_key, 'until', 'sev', 'pending')
    local until_ms, held_sev = tonumber(st[1]), tonumber(st[2])
    if until_ms and event_ms < until_ms and sev <= held_sev then
      redis.call('HINCRBY', sup_key, 'pending', 1)
      redis.call('PEXPIRE', sup_key, state_ttl_ms)
      redis.call('SET', tx_key, 'S' .. origin .. '\\n', 'PX', tx_ttl_ms)
      out[#out + 1] = 'suppressed'
      out[#out + 1] = ''
    else
      local pending = tonumber(st[3]) or 0
      local bytes = base
      if pending > 0 then bytes = base .. string.char(72) .. varint(pending) end
      redis.call('HSET', sup_key, 'until', string.format('%d', event_ms + window_ms),
                 'sev', sev, 'pending', 0)
      redis.call('PEXPIRE', sup_key, state_ttl_ms)
      local seq = redis.call('INCR', KEYS[1])
      redis.call('ZADD', KEYS[2], seq, bytes)
      redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(recent_cap + 1))
      redis.call('ZADD', KEYS[3], string.format('%d', created_ms), alert_id)
      redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf',
                 '(' .. string.format('%d', created_ms - open_window_ms))
      redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(open_cap + 1))
      redis.call('SET', tx_key, 'E' .. origin .. '\\n' .. bytes, 'PX', tx_ttl_ms)
      out[#out + 1] = 'new'
      out[#out + 1] = bytes
      emitted = true
    end
  end
end
if emitted then
  for k = 1, 3 do redis.call('PEXPIRE', KEYS[k], account_ttl_ms) end
end
return out
"""

_STREAM_SCRIPT = """
-- KEYS: stream, then per alert: idx.  ARGV: maxlen, idx_ttl_ms, then per alert: id, account, bytes
local out = {}
for i = 1, #KEYS - 1 do
  local a = 2 + 3 * (i - 1)
  local entry = redis.call('GET', KEYS[i + 1])
  if not entry then
    entry = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                       'id', ARGV[a + 1], 'account', ARGV[a + 2], 'alert', ARGV[a + 3])
    redis.call('SET', KEYS[i + 1], entry, 'PX', ARGV[2])
  end
  out[i] = entry
end
return out
"""

_STREAM_ID = re.compile(r"^\d{1,20}-\d{1,20}$")


class InvalidPageToken(InputError):
    """A ListAlerts page token that is not one of ours, or belongs to another listing."""

    def __init__(self, message: str) -> None:
        super().__init__("INVALID_PAGE_TOKEN", message, field="page_token")


class UnknownAlertId(InputError):
    """WatchAlerts cannot resume after this alert id: unknown, or older than the retention."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, field="after_alert_id")


class Outcome(Enum):
    NEW = "new"  # emitted now
    REPLAYED = "replayed"  # emitted before from this very record: publish the same bytes again
    SUPPRESSED = "suppressed"  # held back by an open window; counted
    REPLAYED_SUPPRESSED = "replayed_suppressed"  # suppressed before from this very record
    DUPLICATE = "duplicate"  # the transaction was handled before from another record

    @property
    def emits(self) -> bool:
        return self in (Outcome.NEW, Outcome.REPLAYED)


@dataclass(frozen=True)
class AlertCandidate:
    """An alert the policy wants raised, before suppression.

    `alert` has suppressed_count 0 (the store sets it); `origin` names the input record
    (`topic:partition:offset`) so a redelivery can be told from a duplicate score.
    """

    alert: scoring_pb2.Alert
    reason_code: str
    event_time_ms: int
    origin: str


@dataclass(frozen=True)
class StoreResult:
    outcome: Outcome
    alert: scoring_pb2.Alert | None  # the alert to publish, when outcome.emits
    payload: bytes  # its serialized bytes (b"" when nothing is emitted)


async def _call(awaitable: Awaitable[Any] | Any) -> Any:
    """redis-py types its commands as `Awaitable[T] | T` (sync and async share signatures)."""
    return await cast(Awaitable[Any], awaitable)


class AlertStore:
    """Alert state in Redis; see the module docstring for the layout and the guarantees.

    The client must return bytes (`decode_responses=False`, as `make_redis` does), and its
    socket timeout, if any, must exceed the `block_ms` of `watch`.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        suppression_window_s: float = 600,
        recent_per_account: int = 100,
        stream_maxlen: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._window_ms = int(suppression_window_s * 1000)
        self._recent_cap = recent_per_account
        self._stream_maxlen = stream_maxlen
        self._clock = clock
        self._stream_key = f"{prefix}:{{alerts}}:stream"
        self._account_sha = ""
        self._stream_sha = ""

    @classmethod
    def from_settings(cls, redis: aioredis.Redis, settings: Settings) -> AlertStore:
        alerting = settings.alerting
        return cls(
            redis,
            settings.redis_key_prefix,
            suppression_window_s=alerting.suppression_window_s,
            recent_per_account=alerting.recent_per_account,
            stream_maxlen=alerting.stream_maxlen,
        )

    # ---- keys -------------------------------------------------------------------------------

    def _acct(self, account_id: str, name: str) -> str:
        return account_key(self._prefix, account_id, f"alerts:{name}")

    def _idx_key(self, alert_id: str) -> str:
        return f"{self._prefix}:{{alerts}}:idx:{alert_id}"

    # ---- write side (the alerting service) --------------------------------------------------

    async def load_scripts(self) -> None:
        """Load both scripts (at start, and again after Redis lost them)."""
        self._account_sha = await _call(self._redis.script_load(_ACCOUNT_SCRIPT))
        self._stream_sha = await _call(self._redis.script_load(_STREAM_SCRIPT))

    async def record(self, candidates: Sequence[AlertCandidate]) -> list[StoreResult]:
        """Apply suppression and store the emitted alerts; one result per candidate, in order.

        Idempotent per transaction (see the module docstring): calling it again with the same
        candidates returns the same alerts and counts nothing twice.
        """
        if not candidates:
            return []
        if not self._account_sha:
            await self.load_scripts()
        try:
            return await self._record(candidates)
        except NoScriptError:  # Redis restarted or flushed its script cache; both are idempotent
            await self.load_scripts()
            return await self._record(candidates)

    async def _record(self, candidates: Sequence[AlertCandidate]) -> list[StoreResult]:
        by_account: dict[str, list[int]] = {}
        for i, candidate in enumerate(candidates):
            if candidate.alert.suppressed_count:
                raise ValueError("a candidate's suppressed_count is set by the store")
            by_account.setdefault(candidate.alert.account_id, []).append(i)
        fixed = [
            self._window_ms,
            self._recent_cap,
            OPEN_WINDOW_S * 1000,
            OPEN_CAP,
            (self._window_ms + STATE_GRACE_S * 1000),
            TX_TTL_S * 1000,
            ACCOUNT_TTL_S * 1000,
        ]
        pipe = self._redis.pipeline(transaction=False)
        for account_id, indexes in by_account.items():
            keys = [self._acct(account_id, n) for n in ("seq", "recent", "open")]
            args: list[Any] = list(fixed)
            for i in indexes:
                c = candidates[i]
                keys.append(self._acct(account_id, f"sup:{c.reason_code}"))
                keys.append(self._acct(account_id, f"tx:{c.alert.transaction_id}"))
                args += [
                    c.origin,
                    c.event_time_ms,
                    c.alert.severity,
                    c.alert.alert_id,
                    c.alert.created_at.ToMilliseconds(),
                    c.alert.SerializeToString(deterministic=True),
                ]
            pipe.execute_command("EVALSHA", self._account_sha, len(keys), *keys, *args)
        replies = await pipe.execute()

        results: list[StoreResult | None] = [None] * len(candidates)
        for (_, indexes), reply in zip(by_account.items(), replies, strict=True):
            for n, i in enumerate(indexes):
                outcome = Outcome(reply[2 * n].decode())
                payload: bytes = reply[2 * n + 1]
                alert = scoring_pb2.Alert.FromString(payload) if outcome.emits else None
                results[i] = StoreResult(outcome, alert, payload if outcome.emits else b"")
        done = [r for r in results if r is not None]

        emitted = [r for r in done if r.alert is not None]
        if emitted:
            alerts = [r.alert for r in emitted if r.alert is not None]
            keys = [self._stream_key, *(self._idx_key(a.alert_id) for a in alerts)]
            args = [self._stream_maxlen, IDX_TTL_S * 1000]
            for alert, r in zip(alerts, emitted, strict=True):
                args += [alert.alert_id, alert.account_id, r.payload]
            await _call(
                cast(Any, self._redis).execute_command(
                    "EVALSHA", self._stream_sha, len(keys), *keys, *args
                )
            )
        return done

    # ---- read side (the query service) ------------------------------------------------------

    async def list_alerts(
        self, account_id: str | None, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[scoring_pb2.Alert], str]:
        """Alerts newest first, for one account (its recent alerts) or all (the stream).

        `page_size` 0 means DEFAULT_PAGE_SIZE; larger than MAX_PAGE_SIZE is clamped; negative
        raises InputError. Returns the page and the token of the next one ("" at the end).
        Tokens are opaque and stable while new alerts arrive (they hold a position, not an
        offset); a token from another listing or not from us raises InvalidPageToken.
        """
        if page_size < 0:
            raise InputError("INVALID_PAGE_SIZE", f"page_size {page_size} < 0", "page_size")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        scope = f"a:{account_id}" if account_id else "*"
        cursor = _decode_token(page_token, scope) if page_token else ""
        if account_id:
            return await self._list_account(account_id, size, cursor, scope)
        return await self._list_all(size, cursor, scope)

    async def _list_account(
        self, account_id: str, size: int, cursor: str, scope: str
    ) -> tuple[list[scoring_pb2.Alert], str]:
        if cursor and not cursor.isdigit():
            raise InvalidPageToken("page_token is malformed")
        high = f"({cursor}" if cursor else "+inf"
        rows: list[tuple[bytes, float]] = await _call(
            self._redis.zrevrangebyscore(
                self._acct(account_id, "recent"),
                high,
                "-inf",
                start=0,
                num=size + 1,
                withscores=True,
            )
        )
        page = rows[:size]
        alerts = [scoring_pb2.Alert.FromString(member) for member, _ in page]
        more = len(rows) > size
        token = _encode_token(scope, str(int(page[-1][1]))) if more else ""
        return alerts, token

    async def _list_all(
        self, size: int, cursor: str, scope: str
    ) -> tuple[list[scoring_pb2.Alert], str]:
        if cursor and not _STREAM_ID.match(cursor):
            raise InvalidPageToken("page_token is malformed")
        high = f"({cursor}" if cursor else "+"
        rows: list[tuple[bytes, dict[bytes, bytes]]] = await _call(
            self._redis.xrevrange(self._stream_key, high, "-", count=size + 1)
        )
        page = rows[:size]
        alerts = [scoring_pb2.Alert.FromString(fields[b"alert"]) for _, fields in page]
        more = len(rows) > size
        token = _encode_token(scope, page[-1][0].decode()) if more else ""
        return alerts, token

    async def open_alert_count(self, account_id: str) -> int:
        """Alerts of the account created in the last OPEN_WINDOW_S (24 h)."""
        since_ms = int((self._clock() - OPEN_WINDOW_S) * 1000)
        count: int = await _call(
            self._redis.zcount(self._acct(account_id, "open"), since_ms, "+inf")
        )
        return count

    async def alert_exists(self, alert_id: str) -> bool:
        """Whether the alert is known to the stream index (kept IDX_TTL_S, 7 days)."""
        return bool(await _call(self._redis.exists(self._idx_key(alert_id))))

    async def get_alert(self, alert_id: str) -> scoring_pb2.Alert | None:
        """The alert from the global stream; None when unknown or trimmed away."""
        entry = await _call(self._redis.get(self._idx_key(alert_id)))
        if entry is None:
            return None
        rows = await _call(self._redis.xrange(self._stream_key, entry, entry, count=1))
        return scoring_pb2.Alert.FromString(rows[0][1][b"alert"]) if rows else None

    async def watch(
        self,
        account_id: str | None,
        after_alert_id: str | None,
        stop: asyncio.Event,
        *,
        block_ms: int = WATCH_BLOCK_MS,
        batch: int = 100,
    ) -> AsyncIterator[scoring_pb2.Alert]:
        """Resolve where to start, then return an iterator of alerts as they are stored.

        Awaiting `watch` fixes the start position and raises UnknownAlertId before anything is
        streamed (so a gRPC handler can answer with a status): without `after_alert_id`, alerts
        stored from now on; with it, every alert after that one (UnknownAlertId when it is
        unknown or trimmed from the stream, since resuming there would silently skip alerts).

        The iterator yields oldest first until `stop` is set; each XREAD blocks at most
        `block_ms`, so `stop` is noticed within that time. `account_id` filters (the stream is
        global).
        """
        last_id = await self._start_id(after_alert_id)
        return self._follow(
            last_id, account_id.encode() if account_id else None, stop, block_ms, batch
        )

    async def _follow(
        self, last_id: str, want: bytes | None, stop: asyncio.Event, block_ms: int, batch: int
    ) -> AsyncIterator[scoring_pb2.Alert]:
        while not stop.is_set():
            reply = await _call(
                self._redis.xread({self._stream_key: last_id}, count=batch, block=block_ms)
            )
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id.decode()
                    if want is None or fields.get(b"account") == want:
                        yield scoring_pb2.Alert.FromString(fields[b"alert"])

    async def _start_id(self, after_alert_id: str | None) -> str:
        if not after_alert_id:
            newest = await _call(self._redis.xrevrange(self._stream_key, "+", "-", count=1))
            return str(newest[0][0].decode()) if newest else "0-0"
        entry = await _call(self._redis.get(self._idx_key(after_alert_id)))
        if entry is None:
            raise UnknownAlertId(
                "UNKNOWN_ALERT_ID", f"after_alert_id {after_alert_id!r} is not a known alert"
            )
        entry_id = entry.decode()
        oldest = await _call(self._redis.xrange(self._stream_key, "-", "+", count=1))
        if not oldest or _id_key(oldest[0][0].decode()) > _id_key(entry_id):
            raise UnknownAlertId(
                "ALERT_ID_EXPIRED",
                f"after_alert_id {after_alert_id!r} is older than the alert stream keeps; "
                "resume without it and list older alerts with ListAlerts",
            )
        return str(entry_id)


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


_TOKEN_VERSION = "1"


def _encode_token(scope: str, cursor: str) -> str:
    raw = f"{_TOKEN_VERSION}|{scope}|{cursor}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(token: str, scope: str) -> str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidPageToken("page_token is not a token from a previous response") from None
    version, sep, rest = raw.partition("|")
    token_scope, sep2, cursor = rest.rpartition("|")
    if version != _TOKEN_VERSION or not sep or not sep2 or not cursor:
        raise InvalidPageToken("page_token is not a token from a previous response")
    if token_scope != scope:
        raise InvalidPageToken("page_token belongs to a listing of another account_id")
    return cursor
