"""The assessment store in Redis: each account's latest assessment, and recent decisions.

Written by the scoring service after every batch (`write_batch` / `write_encoded`); read by the
query service (`latest`) and by scoring's label loop (`match_labels`, for the live
precision/recall of past decisions and for the event time a label books fraud on). Key layout,
`P` being the key prefix (REDIS_KEY_PREFIX):

    P:{acct:<id>}:latest  STRING  the newest ScoredTransaction of the account (by event time),
                                  serialized, WITHOUT its `features` map (the full message is on
                                  risk.scores; the map is two thirds of the bytes and the query
                                  service answers with a live velocity snapshot instead)
    P:{acct:<id>}:dec     HASH    <transaction id> -> "<event ms> <decision> <label>": the
                                  decision (protobuf Decision number) of every recent
                                  transaction, and its label once one came: "-" none, "1" fraud,
                                  "0" genuine;
                                  and bookkeeping fields whose names start with \x01 (no
                                  transaction id can: ingest refuses control characters):
                                  "\x01@" -> "<event ms> <transaction id>" of the latest
                                  assessment; for the careful path: "\x01p" -> event ms of
                                  the last pruning, "\x01e" -> wall-clock ms of its last expiry
                                  refresh, "\x01n" -> decisions left by the last pruning plus
                                  those the careful path added since

Both keys carry the `{acct:<id>}` hash tag: one account's writes stay in one Redis Cluster
slot.

Two write paths, chosen per account, sent together in one round trip:

- The fast path, for accounts whose every entry carries `FirstApplication`: the velocity store
  has just applied the transaction for the first time (status APPLIED), so no decision or label
  can be recorded for it yet and no later transaction can have been stored as the latest when it
  was the account's newest (`in_order`). Nothing needs reading: plain commands, one HSET of the
  decisions (and the latest pointer), a SET of the latest, and, when `maintenance_due` says so
  from the velocity store's facts (the account's previous transaction, its 30-day count), a
  PEXPIRE and the pruning script. This is the path of nearly every transaction. Measured in
  the scoring benchmark: ~5 us of Redis CPU per transaction instead of ~17 for the careful
  script, whose Lua calls, arguments and replies cost three times what the same plain commands
  do.
- The careful path (`_WRITE_SCRIPT`), for replays and for callers without velocity facts
  (`write_batch`): it reads first. The latest is compare-and-set: replaced only by a later
  (event ms, transaction id), so an out-of-order or replayed older transaction never hides a
  newer one, and a replay of the newest rewrites it with itself. A decision written again keeps
  the label already recorded for it, so a redelivered transaction does not make its label
  count twice.

Writes are idempotent: a batch processed again after a crash (before its Kafka commit) comes
back with velocity status DUPLICATE and takes the careful path, writing the same values. (The
fast path trusts APPLIED: a decision can only exist for an APPLIED transaction if the account's
velocity keys were lost while its decisions were not, and then a recorded label is reset.)

Retention (bounded memory): decisions are kept `decision_retention_ms` of event time (default:
twice the label delay, at least the delay + 7 days, so a label that arrives on time finds its
decision) and at most about `decision_cap` per account (the oldest go first, down to three
quarters of the cap, so pruning costs O(1) per write amortized). The fast path prunes at most
once per `prune_every_ms` of the account's event time (weekly for sparse accounts) and every
quarter of the cap during a burst; the careful script prunes on its own marks. Both keys expire
about `ttl_ms` after the account's last write (the fast path pushes the decisions' expiry back
once per `refresh_every_ms` of the account's event time: half the margin between the TTL and
the retention, so a decision always outlives its retention).

Calls: `call_mode="batch"` (default) sends the careful accounts of a batch as ONE script call.
Such a call spans hash slots, which only a single Redis allows; `call_mode="slot"` groups them
by slot (one call per slot), which Redis Cluster needs; the fast path's commands are single-key
in both modes. Scripts are sent by SHA and loaded again after a NOSCRIPT (Redis restarted or
flushed its script cache). Redis errors propagate (redis.exceptions.RedisError); every command
is idempotent, so the caller retries the batch.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple, cast

import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from protos.fraud.v1 import scoring_pb2
from shared.config import Settings
from shared.redis_client import account_key
from shared.redis_packing import OrderedConnection, send_pipeline

__all__ = [
    "DEFAULT_DECISION_CAP",
    "AssessmentEntry",
    "AssessmentStore",
    "CallMode",
    "DecisionRecord",
    "FirstApplication",
    "LabelMatch",
    "LabelStatus",
    "entry_of",
    "maintenance_due",
]

CallMode = Literal["batch", "slot"]

DAY_MS: Final = 86_400_000
DEFAULT_LABEL_DELAY_MS: Final = 7 * DAY_MS
DEFAULT_DECISION_CAP: Final = 2048
DEFAULT_PRUNE_EVERY_MS: Final = DAY_MS
# A sparse account's decisions are pruned at least this often (event time) on the fast path;
# an account with more than SPARSE_DECISIONS transactions in 30 days every prune_every_ms.
SPARSE_PRUNE_EVERY_MS: Final = 7 * DAY_MS
SPARSE_DECISIONS: Final = 32
_SEP: Final = "\x1f"
_META: Final = "\x01"  # bookkeeping fields of the decisions hash start with it


class LabelStatus:
    """What `match_labels` found for a label (ints: they come straight from the script)."""

    UNKNOWN = 0  # no decision recorded for the transaction (too old, or never scored here)
    FIRST = 1  # the first label of a known transaction: count it
    REPEATED = 2  # the same verdict again (a redelivery): count nothing
    CHANGED = 3  # the verdict flipped (a chargeback withdrawn): move the count


class FirstApplication(NamedTuple):
    """What the velocity store reported for a transaction it applied for the first time (status
    APPLIED) in this batch. No decision can be recorded for such a transaction yet, so writing
    it needs no read: the store's fast path (see the module docstring)."""

    in_order: bool  # no later transaction of the account had been applied before it
    previous_ms: int | None  # the account's previous transaction (event ms); None: its first
    count_30d: int  # the account's transactions in the 30 days ending at it, itself included


class AssessmentEntry(NamedTuple):
    """What the store keeps of one scored transaction. `payload` is the serialized
    ScoredTransaction to keep as the account's latest (without its features map); it is only
    sent to Redis when the entry is the newest of its account in the batch. `first` carries the
    velocity store's facts when it applied the transaction for the first time; without them the
    write reads before it writes (a replay, or a caller without velocity)."""

    account_id: str
    transaction_id: str
    event_ms: int
    decision: int  # scoring_pb2.Decision value
    payload: bytes
    first: FirstApplication | None = None


@dataclass(frozen=True, slots=True)
class DecisionRecord:
    event_ms: int
    decision: int  # scoring_pb2.Decision value
    label: bool | None  # None: not labeled yet


@dataclass(frozen=True, slots=True)
class LabelMatch:
    status: int  # LabelStatus
    event_ms: int | None  # the labeled transaction's event time, when known
    decision: int | None  # the decision it got, when known
    previous: bool | None  # the verdict recorded before this label (CHANGED / REPEATED)

    @property
    def known(self) -> bool:
        return self.status != LabelStatus.UNKNOWN


def maintenance_due(
    entries: Sequence[AssessmentEntry], *, refresh_every_ms: int, prune_every_ms: int, cap: int
) -> tuple[bool, bool]:
    """(refresh the decisions' expiry, prune them) for one account's fast-path entries, decided
    from what the velocity store reported, with no read and no bookkeeping field: the same
    entries always give the same answer, so a retried batch does the same.

    Refresh when the account is new or one of its transactions is the first in a new period of
    `refresh_every_ms` (event time; 8 days with the default TTL and retention). Prune when one
    is the first of a new period of `prune_every_ms` (SPARSE_PRUNE_EVERY_MS for an account with at
    most SPARSE_DECISIONS transactions in 30 days: its hash is small), or when the account's
    30-day count passes a multiple of a quarter of the cap beyond the cap (a burst: the hash
    stays within 1.25 x the cap between prunings)."""
    refresh = prune = False
    quarter = max(1, cap // 4)
    for entry in entries:
        first = entry.first
        if first is None:
            continue
        t, previous = entry.event_ms, first.previous_ms
        if previous is None:
            refresh = True
            continue
        if t // refresh_every_ms != previous // refresh_every_ms:
            refresh = True
        every = prune_every_ms if first.count_30d > SPARSE_DECISIONS else SPARSE_PRUNE_EVERY_MS
        if t // every != previous // every or (
            first.count_30d > cap and first.count_30d % quarter == 0
        ):
            prune = True
    return refresh, prune


def entry_of(scored: scoring_pb2.ScoredTransaction) -> AssessmentEntry:
    """The store entry of a ScoredTransaction message (the features map is dropped)."""
    tx = scored.transaction
    slim = scoring_pb2.ScoredTransaction()
    slim.CopyFrom(scored)
    slim.ClearField("features")
    ts = tx.event_time
    return AssessmentEntry(
        account_id=tx.account_id,
        transaction_id=tx.transaction_id,
        event_ms=int(ts.seconds) * 1000 + int(ts.nanos) // 1_000_000,
        decision=int(scored.decision),
        payload=slim.SerializeToString(),
    )


# The pruning both scripts below share: drop decisions older than the retention (by event time,
# relative to `newest`), then the oldest beyond the cap (down to three quarters of it), and
# record when and how many are left.
_PRUNE_FUNCTION: Final = r"""
local RETENTION = tonumber('__RETENTION_MS__')
local CAP = tonumber('__CAP__')
local call = redis.call
local find, sub, unpack = string.find, string.sub, unpack

local function hdel_chunked(key, fields)
  for i = 1, #fields, 500 do
    call('HDEL', key, unpack(fields, i, math.min(i + 499, #fields)))
  end
end

local function prune(dec, newest)
  local flat = call('HGETALL', dec)
  local gone, kept = {}, {}
  local cutoff = newest - RETENTION
  for i = 1, #flat, 2 do
    local f = flat[i]
    if sub(f, 1, 1) ~= '\1' then
      local v = flat[i + 1]
      local ms = tonumber(sub(v, 1, find(v, ' ', 1, true) - 1))
      if ms <= cutoff then gone[#gone + 1] = f else kept[#kept + 1] = {ms, f} end
    end
  end
  local remaining = #kept
  if #kept > CAP then
    table.sort(kept, function(a, b) return a[1] < b[1] end)
    local drop = #kept - math.floor(CAP * 3 / 4)
    for i = 1, drop do gone[#gone + 1] = kept[i][2] end
    remaining = #kept - drop
  end
  if #gone > 0 then hdel_chunked(dec, gone) end
  call('HSET', dec, '\1p', newest, '\1n', remaining)
end
"""

# The fast path's pruning, when `prune_due` says so. KEYS[1]: the dec hash; ARGV[1]: the
# account's newest event ms in the batch.
_PRUNE_SCRIPT: Final = (
    _PRUNE_FUNCTION
    + r"""
prune(KEYS[1], tonumber(ARGV[1]))
return 0
"""
)

# The careful path (entries without FirstApplication: replays, callers without velocity).
# KEYS: two per account, in order: latest, dec.
# ARGV[1]: wall-clock now (ms), for the expiry refresh.
# ARGV[2..]: per account: the number of its decisions k; "1" and the latest candidate's event
#          ms, transaction id and payload, or "0" when the account has no candidate; then k
#          pairs (transaction id, "<event ms> <decision>"). Each field is an argument of its
#          own: Redis builds ARGV in C, where splitting one joined string in Lua cost ~0.25 us
#          a field.
# Returns the number of latest assessments replaced.
#
# Per account: one HMGET (latest pointer, prune and expiry marks, the known decisions), one HSET
# (the decisions, the pointer, the marks), a SET of the latest when it is newer, and a PEXPIRE
# at most once a day: a redis.call from Lua costs microseconds, so they are counted. The
# candidate is the account's newest entry, so its event ms is the newest of the decisions too
# (a decision's ms is parsed only when there is no candidate); one decision, the common case,
# needs no table for the HMGET. "\1n" counts only what this script added since the last
# pruning (the fast path does not keep it): it can only make the cap act later, and the fast
# path enforces the cap itself.
_WRITE_SCRIPT: Final = (
    _PRUNE_FUNCTION
    + r"""
local PRUNE_EVERY = tonumber('__PRUNE_EVERY_MS__')
local TTL = tonumber('__TTL_MS__')
local REFRESH = math.floor(TTL / 30)

local args, n = ARGV, #ARGV
local now = tonumber(ARGV[1])

local replaced, i, a = 0, 2, 0
while i <= n do
  a = a + 1
  local latest, dec = KEYS[2 * a - 1], KEYS[2 * a]
  local k = tonumber(args[i])
  local cand = args[i + 1] == '1'
  local ms_s, ms, txid, payload
  if cand then
    ms_s, txid, payload = args[i + 2], args[i + 3], args[i + 4]
    ms = tonumber(ms_s)
    i = i + 5
  else
    i = i + 2
  end
  -- the k pairs are args[i], args[i + 1], .., args[i + 2k - 1]
  local known
  if k == 1 then
    known = call('HMGET', dec, '\1@', '\1p', '\1e', '\1n', args[i])
  else
    local fields = {'\1@', '\1p', '\1e', '\1n'}
    for j = 1, k do fields[4 + j] = args[i + 2 * j - 2] end
    known = call('HMGET', dec, unpack(fields))
  end
  local sets, newest, added = {}, 0, 0
  for j = 1, k do
    local id, value = args[i + 2 * j - 2], args[i + 2 * j - 1]
    -- a decision written again keeps the label already recorded for it
    local old = known[4 + j]
    if not old then added = added + 1 end
    local label = old and sub(old, -1) or '-'
    sets[2 * j - 1] = id
    sets[2 * j] = value .. ' ' .. label
    if not cand then
      local vms = tonumber(sub(value, 1, find(value, ' ', 1, true) - 1))
      if vms > newest then newest = vms end
    end
  end
  i = i + 2 * k
  if cand then
    local write = true
    local cur = known[1]
    if cur then
      local at = find(cur, ' ', 1, true)
      local cms, ctx = tonumber(sub(cur, 1, at - 1)), sub(cur, at + 1)
      if ms < cms or (ms == cms and txid < ctx) then
        -- older than what is stored: keep it, unless the stored one expired meanwhile
        write = call('EXISTS', latest) == 0
      end
    end
    if write then
      call('SET', latest, payload, 'PX', TTL)
      sets[#sets + 1] = '\1@'
      sets[#sets + 1] = ms_s .. ' ' .. txid
      replaced = replaced + 1
    end
    if ms > newest then newest = ms end
  end
  local refresh = (not known[3]) or now - tonumber(known[3]) >= REFRESH
  if refresh then
    sets[#sets + 1] = '\1e'
    sets[#sets + 1] = now
  end
  -- '\1n' counts the decisions kept, so the cap is checked without an HLEN per account.
  local count = tonumber(known[4] or '0') + added
  if added > 0 then
    sets[#sets + 1] = '\1n'
    sets[#sets + 1] = count
  end
  if #sets > 0 then call('HSET', dec, unpack(sets)) end
  if refresh then call('PEXPIRE', dec, TTL) end
  local last = tonumber(known[2] or '0')
  if count > CAP + 3 or (count > 32 and newest - last >= PRUNE_EVERY) then
    prune(dec, newest)
  end
end
return replaced
"""
)

# KEYS: the dec hash of each account, in order.
# ARGV[1]: the labels, fields separated by \31, three per label: account number (1-based into
#          KEYS), transaction id, verdict ("1" fraud, "0" genuine).
# Returns four integers per label: status (LabelStatus), event ms, decision, previous verdict
# (-1 none, 0, 1).
_LABEL_SCRIPT: Final = r"""
local call = redis.call
local find, sub = string.find, string.sub
local SEP = '\31'
local args, n, pos = {}, 0, 1
local s = ARGV[1]
while s ~= '' do
  local at = find(s, SEP, pos, true)
  n = n + 1
  if not at then args[n] = sub(s, pos); break end
  args[n] = sub(s, pos, at - 1)
  pos = at + 1
end
local out = {}
for i = 1, n, 3 do
  local dec = KEYS[tonumber(args[i])]
  local txid, verdict = args[i + 1], args[i + 2]
  local v = call('HGET', dec, txid)
  if not v then
    out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = 0; out[#out + 1] = -1
  else
    local a = find(v, ' ', 1, true)
    local b = find(v, ' ', a + 1, true)
    local ms, d, old = sub(v, 1, a - 1), sub(v, a + 1, b - 1), sub(v, b + 1)
    local status = 1
    if old == verdict then status = 2
    elseif old ~= '-' then status = 3 end
    if status ~= 2 then call('HSET', dec, txid, ms .. ' ' .. d .. ' ' .. verdict) end
    out[#out + 1] = status
    out[#out + 1] = tonumber(ms)
    out[#out + 1] = tonumber(d)
    if old == '-' then out[#out + 1] = -1 else out[#out + 1] = tonumber(old) end
  end
end
return out
"""


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


def _field(value: str) -> str:
    """An id as a hash field / script argument. An id holding the separator would shift every
    field after it, and one starting with \x01 could overwrite the bookkeeping fields. Ingest
    lets neither through; if one comes anyway it is replaced by a stable digest of itself."""
    if _SEP in value or value.startswith(_META):
        return "#" + hashlib.sha1(value.encode()).hexdigest()
    return value


def _join(parts: list[str]) -> str:
    payload = _SEP.join(parts)
    if payload.count(_SEP) != len(parts) - 1 or _META in payload:
        payload = _SEP.join(_field(p) for p in parts)
    return payload


class AssessmentStore:
    """Latest assessment per account and recent decisions per transaction, under `prefix`.

    `AssessmentStore(redis, prefix)` is all the query service needs (`latest`); the scoring
    service passes the retention from its settings (`from_settings`). The Redis client must
    return bytes (`decode_responses=False`, as `shared.redis_client.make_redis` builds it)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        decision_retention_ms: int | None = None,
        decision_cap: int = DEFAULT_DECISION_CAP,
        prune_every_ms: int = DEFAULT_PRUNE_EVERY_MS,
        ttl_ms: int | None = None,
        call_mode: CallMode = "batch",
        ordered: OrderedConnection | None = None,
    ) -> None:
        if call_mode not in ("batch", "slot"):
            raise ValueError(f"call_mode must be batch or slot, got {call_mode!r}")
        retention = decision_retention_ms
        if retention is None:
            retention = 2 * DEFAULT_LABEL_DELAY_MS
        if retention < DAY_MS:
            raise ValueError("decision_retention_ms must be at least a day")
        if not 8 <= decision_cap <= 1_000_000:
            raise ValueError("decision_cap must be within [8, 1000000]")
        ttl = ttl_ms if ttl_ms is not None else max(30 * DAY_MS, retention + 2 * DAY_MS)
        self._redis = redis
        self.prefix = prefix
        self.decision_retention_ms = retention
        self.decision_cap = decision_cap
        self.ttl_ms = ttl
        self.call_mode: CallMode = call_mode
        self.prune_every_ms = prune_every_ms
        values = {
            "RETENTION_MS": retention,
            "CAP": decision_cap,
            "PRUNE_EVERY_MS": prune_every_ms,
            "TTL_MS": ttl,
        }

        def render(source: str) -> _Script:
            for name, value in values.items():
                source = source.replace(f"__{name}__", str(int(value)))
            return _Script.of(source)

        self._write = render(_WRITE_SCRIPT)
        self._prune = render(_PRUNE_SCRIPT)
        self._label = _Script.of(_LABEL_SCRIPT)
        self._ttl_arg = str(ttl)
        # The fast path pushes the decisions' expiry back once per this much of an account's
        # event time: a decision then outlives its retention whenever the account stops.
        self.refresh_every_ms = max(DAY_MS, (ttl - retention) // 2)
        # write_encoded's connection when given: the velocity store's, so that a batch's write
        # runs in its place among the queued velocity calls (see OrderedConnection)
        self._ordered = ordered

    @classmethod
    def from_settings(
        cls,
        redis: aioredis.Redis,
        settings: Settings,
        *,
        call_mode: CallMode = "batch",
        ordered: OrderedConnection | None = None,
    ) -> AssessmentStore:
        """Decisions kept twice the label delay (at least the delay plus 7 days)."""
        delay_ms = settings.scoring.label_delay_s * 1000
        retention = max(2 * delay_ms, delay_ms + 7 * DAY_MS)
        return cls(
            redis,
            settings.redis_key_prefix,
            decision_retention_ms=retention,
            call_mode=call_mode,
            ordered=ordered,
        )

    # ---- keys

    def latest_key(self, account_id: str) -> str:
        return account_key(self.prefix, account_id, "latest")

    def decisions_key(self, account_id: str) -> str:
        return account_key(self.prefix, account_id, "dec")

    # ---- reads

    async def latest(self, account_id: str) -> scoring_pb2.ScoredTransaction | None:
        """The account's newest assessment (by event time), without its features map; None
        when the store has none (never scored, or expired)."""
        value = await self._redis.get(self.latest_key(account_id))
        if value is None:
            return None
        return scoring_pb2.ScoredTransaction.FromString(bytes(value))

    async def decision_of(self, account_id: str, transaction_id: str) -> DecisionRecord | None:
        """The recorded decision (and label) of one transaction, if still retained."""
        value = await cast(
            Awaitable[Any],
            self._redis.hget(self.decisions_key(account_id), _field(transaction_id)),
        )
        if value is None:
            return None
        ms, decision, label = bytes(value).decode().split(" ")
        return DecisionRecord(int(ms), int(decision), None if label == "-" else label == "1")

    # ---- writes

    async def load_scripts(self) -> None:
        for script in (self._write, self._prune, self._label):
            sha = await self._redis.script_load(script.source)
            if sha != script.sha:
                raise RuntimeError(f"Redis returned SHA {sha!r} for a script hashed {script.sha}")

    async def write_batch(self, scored: Sequence[scoring_pb2.ScoredTransaction]) -> int:
        """Record the decisions of a batch of scored transactions and keep each account's
        newest as its latest; return how many latest assessments were replaced."""
        return await self.write_encoded([entry_of(s) for s in scored])

    async def write_encoded(self, entries: Sequence[AssessmentEntry]) -> int:
        """`write_batch` for callers that already hold the serialized payloads (the scoring
        service: the bytes it publishes minus the features map). One round trip: an account
        whose entries all carry `first` takes the fast path (plain commands), the others the
        careful script."""
        if not entries:
            return 0
        by_account: dict[str, list[AssessmentEntry]] = {}
        for entry in entries:
            by_account.setdefault(entry.account_id, []).append(entry)
        commands: list[tuple[str | bytes, ...]] = []
        careful: list[str] = []
        replaced = 0
        for account, mine in by_account.items():
            if all(entry.first is not None for entry in mine):
                replaced += self._fast_commands(account, mine, commands)
            else:
                careful.append(account)
        counted = len(commands)  # the careful calls' replies are their counts of replacements
        now = str(int(time.time() * 1000))
        for group in self._groups(careful):
            keys: list[str] = []
            # every field an argument of its own (see _WRITE_SCRIPT)
            args: list[str | bytes] = [now]
            for account in group:
                keys += (self.latest_key(account), self.decisions_key(account))
                mine = by_account[account]
                candidate = max(mine, key=lambda e: (e.event_ms, e.transaction_id))
                args += (
                    str(len(mine)),
                    "1",
                    str(candidate.event_ms),
                    _field(candidate.transaction_id),
                    candidate.payload,
                )
                for entry in mine:
                    args += (_field(entry.transaction_id), f"{entry.event_ms} {entry.decision}")
            commands.append(self._script_call(self._write, keys, args))
        if self._ordered is not None:
            replies = _raise_first_error(await self._ordered.call(commands))
        else:
            replies = await self._send(commands)
        return replaced + sum(int(cast(int, r)) for r in replies[counted:])

    def _fast_commands(
        self, account: str, mine: list[AssessmentEntry], commands: list[tuple[str | bytes, ...]]
    ) -> int:
        """The fast path of one account (every entry applied for the first time): its decisions
        in one HSET (there is no label to keep), the newest in-order entry as the latest (no
        later transaction was applied before it, so nothing newer is stored: no compare), and
        the expiry refresh and the pruning when `maintenance_due` says so. Returns 1 when the
        latest is replaced."""
        dec = self.decisions_key(account)
        fields: list[str | bytes] = []
        candidate: AssessmentEntry | None = None
        for entry in mine:
            fields += (_field(entry.transaction_id), f"{entry.event_ms} {entry.decision} -")
            first = cast(FirstApplication, entry.first)
            if first.in_order and (
                candidate is None
                or (entry.event_ms, entry.transaction_id)
                > (candidate.event_ms, candidate.transaction_id)
            ):
                candidate = entry
        if candidate is not None:
            pointer = f"{candidate.event_ms} {_field(candidate.transaction_id)}"
            commands.append(("HSET", dec, _META + "@", pointer, *fields))
            commands.append(
                ("SET", self.latest_key(account), candidate.payload, "PX", self._ttl_arg)
            )
        else:
            commands.append(("HSET", dec, *fields))
        refresh, prune = maintenance_due(
            mine,
            refresh_every_ms=self.refresh_every_ms,
            prune_every_ms=self.prune_every_ms,
            cap=self.decision_cap,
        )
        if refresh:
            commands.append(("PEXPIRE", dec, self._ttl_arg))
        if prune:
            newest = max(entry.event_ms for entry in mine)
            commands.append(self._script_call(self._prune, [dec], [str(newest)]))
        return 1 if candidate is not None else 0

    async def match_labels(self, labels: Sequence[tuple[str, str, bool]]) -> list[LabelMatch]:
        """Match (account_id, transaction_id, is_fraud) labels with the recorded decisions and
        record the verdicts, idempotently: a label seen again with the same verdict is
        REPEATED. Labels without an account id are UNKNOWN without asking Redis."""
        matches = [LabelMatch(LabelStatus.UNKNOWN, None, None, None)] * len(labels)
        positions = [i for i, (account, _, _) in enumerate(labels) if account]
        if not positions:
            return matches
        by_account: dict[str, list[int]] = {}
        for i in positions:
            by_account.setdefault(labels[i][0], []).append(i)
        commands: list[tuple[str | bytes, ...]] = []
        rows: list[list[int]] = []
        for group in self._groups(list(by_account)):
            keys = [self.decisions_key(account) for account in group]
            parts: list[str] = []
            order: list[int] = []
            for n, account in enumerate(group, 1):
                for i in by_account[account]:
                    _, txid, is_fraud = labels[i]
                    parts += (str(n), txid, "1" if is_fraud else "0")
                    order.append(i)
            commands.append(("EVALSHA", self._label.sha, str(len(keys)), *keys, _join(parts)))
            rows.append(order)
        replies = await self._send(commands)
        for order, reply in zip(rows, replies, strict=True):
            values = [int(v) for v in cast(list[int], reply)]
            if len(values) != 4 * len(order):
                raise ValueError(f"label script returned {len(values)} values for {len(order)}")
            for k, i in enumerate(order):
                status, ms, decision, previous = values[4 * k : 4 * k + 4]
                if status == LabelStatus.UNKNOWN:
                    continue
                matches[i] = LabelMatch(
                    status, ms, decision, None if previous < 0 else previous == 1
                )
        return matches

    # ---- internals

    def _groups(self, accounts: list[str]) -> list[list[str]]:
        if self.call_mode == "batch" or not accounts:
            return [accounts] if accounts else []
        by_slot: dict[int, list[str]] = {}
        for account in accounts:
            by_slot.setdefault(key_slot(f"{{acct:{account}}}".encode()), []).append(account)
        return list(by_slot.values())

    def _script_call(
        self, script: _Script, keys: list[str], args: Sequence[str | bytes]
    ) -> tuple[str | bytes, ...]:
        """A script call: by SHA on pooled connections (`_send` loads the scripts after a
        NOSCRIPT and resends), in full on the ordered connection (where a resend would come
        after the calls queued behind it; Redis caches the script by its SHA1)."""
        if self._ordered is not None:
            return ("EVAL", script.source, str(len(keys)), *keys, *args)
        return ("EVALSHA", script.sha, str(len(keys)), *keys, *args)

    async def _send(self, commands: list[tuple[str | bytes, ...]]) -> list[object]:
        """One round trip; after NOSCRIPT (Redis restarted or flushed its scripts) the scripts
        are loaded and the failed calls sent once more (at most twice: a script cache flushed
        again right away is an error worth seeing). Every command here is idempotent. The first
        error is raised once every reply is in."""
        replies: list[object] = [None] * len(commands)
        pending = list(range(len(commands)))
        for attempt in range(3):
            results = await send_pipeline(self._redis, [commands[j] for j in pending])
            missing = []
            for j, result in zip(pending, results, strict=True):
                if isinstance(result, NoScriptError) and attempt < 2:
                    missing.append(j)
                else:
                    replies[j] = result
            if not missing:
                break
            await self.load_scripts()
            pending = missing
        return _raise_first_error(replies)


def _raise_first_error(replies: list[object]) -> list[object]:
    """`replies`, once every one is in; the first error among them is raised."""
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
    return replies
