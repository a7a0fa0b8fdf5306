"""The velocity store: per-account and per-terminal state in Redis, updated and read by Lua.

What the numbers mean is defined in `shared.scoring.features` (module docstring and
`ReferenceVelocity`, which the integration tests hold these scripts to). This module is the
adapter: key layout, script loading, batching. The scripts are `lua/account.lua` and
`lua/terminal.lua` (package data, read with importlib.resources).

Key layout (`<p>` is the key prefix: REDIS_KEY_PREFIX, or a training namespace under it):

    <p>:{acct:<id>}:vc  hash  M1, M2, M3: meta packed as doubles, at most 64 bytes each
                              (watermark, horizon floor, next prunes, newest location, running
                              count and sum of the five windows ending at the watermark, sizes
                              of vt and vz, a bound below vt's oldest member); q<6h> and d<day>
                              buckets, packed (count, sum in 1e-4 major units)
    <p>:{acct:<id>}:vz  zset  m<merchant>, c<country>, d<device> at their last-seen ms, each kind
                              in its own score range of 1e13 ms; x<txid> (index of the late
                              results) above them
    <p>:{acct:<id>}:vt  zset  the applied transactions at their event ms; a member is the amount,
                              the id and the stored result, so a replay returns exactly what the
                              first application returned (the exact 1m/1h/24h windows, the
                              previous transaction and the id retention all read this one index)
    <p>:{acct:<id>}:vr  hash  <txid> -> stored result of a LATE transaction (usually absent)
    <p>:{term:<id>}:vc  hash  M1, M2 packed meta (watermark, floors, sizes, running totals of the
                              delayed windows); b<day> packed (transactions, labeled fraud)
    <p>:{term:<id>}:vz  zset  f<txid> fraud-labeled transactions at their ms, x<txid> late index
    <p>:{term:<id>}:vt  zset  applied transactions with their stored results (as for accounts)
    <p>:{term:<id>}:vr  hash  stored results of LATE transactions (usually absent)

Why this shape (measured on Redis 7.0, see bench/velocity_bench.py): each Redis key costs ~100
bytes before any data, and a hash or sorted set stays in the compact listpack encoding only while
its values are at most 64 bytes, hence few keys and meta in 64-byte fields. Inside a script
every redis.call costs 1-2 us and turning a Lua number into a string ~0.5 us, so the windows are
running totals that read only what leaves them (O(1) amortized for in-order traffic), the
distinct counts are one O(log n) ZCOUNT per kind (none when the kind's only member is the
transaction's own), and the client sends times and bucket names as strings, each field an
argument of its own (Redis builds ARGV in C; splitting one payload in Lua cost ~0.25 us a field),
with the numbers the script computes with packed in one binary argument (one struct.unpack, not
a strtod each). The scripts reply with the compact record they store for replays and a status
byte per entry, which numpy decodes.
A window is read only when something can leave it, and prunes and expiries that would do nothing
are skipped, so an in-order transaction costs six to eight calls for its account and three or
four for its terminal. The hash tag keeps an account's keys in one Cluster slot, so one script
may touch them all; a terminal is in another slot and gets its own script.

Bounded memory: every structure is pruned by event time relative to the watermark (buckets and
merchants once per `prune_every_ms`, ids and results once per `index_prune_every_ms`) and capped
in size (`VelocityConfig`), so an account's footprint has a fixed upper bound whatever its
volume; quiet keys also expire (`ttl_ms`, wall clock, refreshed at most weekly).

Calls. `call_mode="batch"` (default): the whole batch is one EVALSHA for the accounts and one
for the terminals, sent in one write: one round trip and two commands for the client to pack and
parse, whatever the batch size. The scripts declare every key they touch in KEYS, but a call that
spans slots only runs on a single Redis. `call_mode="slot"` groups the calls by hash slot, so
each stays within one slot (what Redis Cluster requires; a cluster client routing per slot is not
wired here). `call_mode="per_tx"` is one call per transaction and per terminal, the baseline
the benchmark compares with. The commands are packed by hiredis and written on a pooled
connection directly (`shared.redis_packing.send_pipeline`): redis-py 5.2's asyncio packer was
the largest client cost (~10 us/tx).

Errors: Redis errors propagate (redis.exceptions.RedisError); every call is idempotent, so the
caller retries the whole batch. NOSCRIPT (Redis restarted or flushed its scripts) is handled here:
the scripts are loaded again and the failed calls are sent once more.
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal

import numpy as np
import redis.asyncio as aioredis
from redis.crc import key_slot
from redis.exceptions import NoScriptError, RedisError

from shared.config import Settings
from shared.redis_client import account_key, terminal_key
from shared.redis_packing import OrderedConnection, PendingReplies, pack, send_pipeline
from shared.scoring.features import (
    DAY_MS,
    DEFAULT_CONFIG,
    N_ACCOUNT,
    N_TERMINAL,
    NO_TERMINAL,
    QUARTER_MS,
    RAW_COLUMNS,
    UNKNOWN_ACCOUNT,
    BoolArray,
    FloatArray,
    LabelRecord,
    TxRecord,
    VelocityBatch,
    VelocityConfig,
    VelocitySnapshot,
)

__all__ = [
    "RECOMMENDED_ZSET_LISTPACK_VALUE",
    "CallMode",
    "PackedVelocity",
    "PendingVelocity",
    "VelocityStore",
    "render_script",
    "zset_encoding_advice",
]

CallMode = Literal["batch", "slot", "per_tx"]

_DAY_LESS_1: Final = DAY_MS - 1
# An account's index of applied transactions (vt) holds members of ~150-180 bytes (amount, id,
# stored result): a sorted set keeps the compact listpack encoding only while every member is
# at most zset-max-listpack-value bytes (Redis's default: 64). Measured (bench.velocity_bench,
# realistic 30-day history): 2,722 B of velocity per account with 256, 3,872 B with 64; the same
# speed.
RECOMMENDED_ZSET_LISTPACK_VALUE: Final = 256
# An entry's numbers as the scripts unpack them: account number, event ms, amount (1e-4 major
# units); terminal number, event ms. Little-endian, no padding: struct.unpack("<Idd") in Lua.
_account_head: Final = struct.Struct("<Idd").pack
_terminal_head: Final = struct.Struct("<Id").pack
_PLACEHOLDER: Final = re.compile(r"__[A-Z_]+__")


def render_script(name: str, config: VelocityConfig) -> str:
    """The Lua source of `lua/<name>` with the config's numbers filled in."""
    source = resources.files("shared.scoring").joinpath("lua", name).read_text(encoding="utf-8")
    values = {
        "LATE_MS": config.late_tolerance_ms,
        "ID_CAP": config.account_id_cap,
        "LATE_CAP": config.account_late_cap,
        "PRUNE_EVERY_MS": config.prune_every_ms,
        "INDEX_PRUNE_EVERY_MS": config.index_prune_every_ms,
        "TTL_MS": config.ttl_ms,
        "LABEL_DELAY_MS": config.label_delay_ms,
        "TTL_REFRESH_MS": config.ttl_refresh_ms,
        "SCAN_K": config.late_scan,
        "QUARTER_RETENTION": config.quarter_retention,
        "DAY_RETENTION": config.day_retention,
        "MERCHANT_RETENTION_MS": config.merchant_retention_ms,
        "DISTINCT_RETENTION_MS": config.distinct_retention_ms,
        "MERCHANT_CAP": config.merchant_cap,
        "COUNTRY_CAP": config.country_cap,
        "DEVICE_CAP": config.device_cap,
        "TERMINAL_ID_CAP": config.terminal_id_cap,
        "TERMINAL_LATE_CAP": config.terminal_late_cap,
        "LABEL_CAP": config.label_cap,
        "TERMINAL_DAY_RETENTION": config.terminal_day_retention,
    }
    for key, value in values.items():
        source = source.replace(f"__{key}__", str(int(value)))
    leftover = _PLACEHOLDER.search(source)
    if leftover:
        raise ValueError(f"lua/{name}: no value for placeholder {leftover.group(0)}")
    return source


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source, hashlib.sha1(source.encode()).hexdigest())


@dataclass(frozen=True)
class _Call:
    script: _Script
    keys: list[str]
    args: Sequence[str | bytes]
    rows: list[int]  # the batch positions the reply's rows belong to, in order


class VelocityStore:
    """Velocity state of accounts and terminals in Redis, under one key prefix.

    `prefix` isolates a namespace: the services use REDIS_KEY_PREFIX, `fraudstream train` a
    prefix of its own (`from_settings(..., namespace="train-<run>")`) and `clear()`s it after."""

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        config: VelocityConfig = DEFAULT_CONFIG,
        *,
        call_mode: CallMode = "batch",
        ordered: OrderedConnection | None = None,
    ) -> None:
        if call_mode not in ("batch", "slot", "per_tx"):
            raise ValueError(f"call_mode must be batch, slot or per_tx, got {call_mode!r}")
        self._redis = redis
        self.prefix = prefix
        self.config = config
        self.call_mode: CallMode = call_mode
        self._account = _Script.of(render_script("account.lua", config))
        self._terminal = _Script.of(render_script("terminal.lua", config))
        # pack_batch's connection: shared with the assessment store by the scoring service
        self._ordered = ordered if ordered is not None else OrderedConnection(redis)

    @classmethod
    def from_settings(
        cls,
        redis: aioredis.Redis,
        settings: Settings,
        *,
        namespace: str | None = None,
        call_mode: CallMode = "batch",
        ordered: OrderedConnection | None = None,
    ) -> VelocityStore:
        prefix = settings.redis_key_prefix
        if namespace:
            prefix = f"{prefix}:{namespace}"
        config = VelocityConfig.from_label_delay_s(settings.scoring.label_delay_s)
        return cls(redis, prefix, config, call_mode=call_mode, ordered=ordered)

    # ---- keys

    def account_keys(self, account_id: str) -> tuple[str, str, str, str]:
        base = account_key(self.prefix, account_id, "v")
        return base + "c", base + "z", base + "t", base + "r"

    def terminal_keys(self, terminal_id: str) -> tuple[str, str, str, str]:
        base = terminal_key(self.prefix, terminal_id, "v")
        return base + "c", base + "z", base + "t", base + "r"

    # ---- public API

    async def load_scripts(self) -> None:
        """Load the scripts (optional: the first call loads them when Redis does not know them)."""
        for script in (self._account, self._terminal):
            sha = await self._redis.script_load(script.source)
            if sha != script.sha:  # our SHA-1 must be Redis's, or EVALSHA would never match
                raise RuntimeError(
                    f"Redis returned SHA {sha!r} for a script we hash as {script.sha}"
                )

    async def apply_batch(self, txs: Sequence[TxRecord]) -> VelocityBatch:
        """Count the batch (idempotently) and return each transaction's raw velocity numbers,
        in order. Transactions of one account are applied in batch order."""
        return await self._run(txs, "A")

    def pack_batch(self, txs: Sequence[TxRecord]) -> PackedVelocity:
        """`apply_batch` in three steps. This one builds and packs the batch's calls (CPU only,
        nothing sent); `await packed.submit()` sends them on the store's ordered connection; and
        `await pending.result()` reads their results. Batches submitted one after the other run
        in Redis in that order, so a caller can queue the next batch while Redis still runs this
        one, and pack it before its turn to send comes. The scripts go in full (EVAL; Redis
        caches them by their SHA1, ~0.1 ms a call to hash it): a queued call cannot be retried
        in order after a NOSCRIPT."""
        calls = self._calls(txs, "A")
        packed = [pack(("EVAL", c.script.source, len(c.keys), *c.keys, *c.args)) for c in calls]
        return PackedVelocity(self._ordered, self._assemble, len(txs), calls, packed)

    async def peek_batch(self, txs: Sequence[TxRecord]) -> VelocityBatch:
        """The numbers each transaction would get if applied now, without writing anything (a
        transaction seen before gets its stored result). Each is peeked alone: two transactions
        of one account in the batch do not see each other."""
        return await self._run(txs, "P")

    async def snapshot(self, account_id: str, now_ms: int) -> VelocitySnapshot | None:
        """The account's windows ending at `now_ms`; None when the store has never seen it."""
        keys = list(self.account_keys(account_id))
        now = int(now_ms)
        args: list[str | bytes] = ["S", _account_head(1, now, 0), "", *_time_fields(now)]
        args += ("", "", "", "")  # no merchant, country, device or location
        call = _Call(self._account, keys, args, [0])
        (reply,) = await self._execute([call])
        row = _account_rows(reply, 1)[0][0]
        if int(row[0]) == UNKNOWN_ACCOUNT:
            return None
        return VelocitySnapshot.from_row(account_id, int(now_ms), [float(x) for x in row])

    async def apply_labels(self, labels: Sequence[LabelRecord]) -> list[bool]:
        """Book fraud labels on their terminals; True where a label changed a count (a new fraud
        label, or a fraud label withdrawn). Idempotent per transaction id; labels without a
        terminal change nothing."""
        positions = [i for i, label in enumerate(labels) if label.terminal_id]
        changed = [False] * len(labels)
        if not positions:
            return changed
        calls: list[_Call] = []
        for group in self._groups(positions, lambda i: labels[i].terminal_id, "term"):
            index: dict[str, int] = {}
            keys: list[str] = []
            parts: list[str] = ["L"]
            for i in group:
                label = labels[i]
                number = index.get(label.terminal_id)
                if number is None:
                    number = index[label.terminal_id] = len(index) + 1
                    keys.extend(self.terminal_keys(label.terminal_id))
                parts += (
                    str(number),
                    label.transaction_id,
                    "1" if label.is_fraud else "0",
                    f"{label.event_ms:013d}",
                    str(label.event_ms // DAY_MS),
                )
            calls.append(_Call(self._terminal, keys, parts, group))
        replies = await self._execute(calls)
        for call, reply in zip(calls, replies, strict=True):
            values = _rows(reply, 1, len(call.rows))[:, 0]
            for position, value in zip(call.rows, values, strict=True):
                changed[position] = bool(value)
        return changed

    async def clear(self, *, max_keys: int = 10_000_000) -> int:
        """Delete every velocity key under this store's prefix (a training namespace after its
        run); return how many. Only the velocity keys: other components' keys under the same
        prefix are left alone."""
        pattern = _glob_escape(self.prefix) + ":{*}:v[cztr]"
        deleted = 0
        batch: list[bytes] = []
        async for key in self._redis.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += await self._redis.unlink(*batch)
                batch.clear()
            if deleted + len(batch) >= max_keys:
                break
        if batch:
            deleted += await self._redis.unlink(*batch)
        return deleted

    # ---- internals

    async def _run(self, txs: Sequence[TxRecord], mode: str) -> VelocityBatch:
        calls = self._calls(txs, mode)
        return self._assemble(len(txs), calls, await self._execute(calls) if calls else [])

    def _calls(self, txs: Sequence[TxRecord], mode: str) -> list[_Call]:
        if not txs:
            return []
        return self._account_calls(txs, mode) + self._terminal_calls(txs, mode)

    def _assemble(self, n: int, calls: list[_Call], replies: list[bytes]) -> VelocityBatch:
        """The batch's results from its calls' replies."""
        raw = np.zeros((n, len(RAW_COLUMNS)), dtype=np.float64)
        raw[:, N_ACCOUNT] = NO_TERMINAL
        newest = np.zeros(n, dtype=np.bool_)
        for call, reply in zip(calls, replies, strict=True):
            if call.script is self._account:
                rows, flags = _account_rows(reply, len(call.rows))
                raw[call.rows, :N_ACCOUNT] = rows
                newest[call.rows] = flags
            else:
                raw[call.rows, N_ACCOUNT:] = _terminal_rows(reply, len(call.rows))
        return VelocityBatch(raw, newest)

    def _groups(
        self,
        positions: list[int],
        entity: Callable[[int], str],
        kind: str,
    ) -> list[list[int]]:
        """Batch positions grouped into calls according to the call mode (order kept)."""
        if self.call_mode == "batch":
            return [positions]
        if self.call_mode == "per_tx":
            return [[i] for i in positions]
        by_slot: dict[int, list[int]] = {}
        for i in positions:
            # the slot of "{kind:<id>}" is the slot of every key of the entity (hash tag)
            slot = key_slot(f"{{{kind}:{entity(i)}}}".encode())
            by_slot.setdefault(slot, []).append(i)
        return list(by_slot.values())

    def _account_calls(self, txs: Sequence[TxRecord], mode: str) -> list[_Call]:
        calls: list[_Call] = []
        account_keys = self.account_keys
        for group in self._groups(list(range(len(txs))), lambda i: txs[i].account_id, "acct"):
            index: dict[str, int] = {}
            keys: list[str] = []
            parts: list[str | bytes] = [mode]
            extend = parts.extend
            for i in group:
                tx = txs[i]
                account = tx.account_id
                number = index.get(account)
                if number is None:
                    number = index[account] = len(index) + 1
                    keys.extend(account_keys(account))
                lat, t = tx.latitude, tx.event_ms
                extend(
                    (
                        # the numbers the script computes with, packed: one struct.unpack
                        # there, not a strtod per number
                        _account_head(number, t, tx.amount_scaled),
                        tx.transaction_id,
                        # times, bucket names and score bounds go as strings too: the script
                        # then builds field names and scores by concatenation, not by
                        # formatting numbers
                        *_time_fields(t),
                        tx.merchant_id,
                        tx.country,
                        tx.device_id,
                        # repr round-trips a double exactly: the location comes back bit-equal
                        "" if lat is None else f"{lat!r} {tx.longitude!r}",
                    )
                )
            calls.append(_Call(self._account, keys, parts, group))
        return calls

    def _terminal_calls(self, txs: Sequence[TxRecord], mode: str) -> list[_Call]:
        positions = [i for i, tx in enumerate(txs) if tx.terminal_id]
        calls: list[_Call] = []
        if not positions:
            return calls
        terminal_keys = self.terminal_keys
        for group in self._groups(positions, lambda i: txs[i].terminal_id, "term"):
            index: dict[str, int] = {}
            keys: list[str] = []
            parts: list[str | bytes] = [mode]
            extend = parts.extend
            for i in group:
                tx = txs[i]
                terminal = tx.terminal_id
                number = index.get(terminal)
                if number is None:
                    number = index[terminal] = len(index) + 1
                    keys.extend(terminal_keys(terminal))
                t = tx.event_ms
                ms = str(t)
                extend(
                    (
                        _terminal_head(number, t),
                        tx.transaction_id,
                        ms if len(ms) == 13 else ms.zfill(13),
                        f"b{t // DAY_MS}",  # the script computes the days from the ms
                    )
                )
            calls.append(_Call(self._terminal, keys, parts, group))
        return calls

    async def _execute(self, calls: list[_Call]) -> list[bytes]:
        """One pipeline round trip; after NOSCRIPT, load the scripts and resend the failed calls
        (at most twice: a script cache flushed again right away is an error worth seeing)."""
        replies: list[object] = [None] * len(calls)
        pending = list(range(len(calls)))
        for attempt in range(3):
            results = await send_pipeline(
                self._redis,
                [
                    ("EVALSHA", calls[j].script.sha, len(calls[j].keys), *calls[j].keys,
                     *calls[j].args)
                    for j in pending
                ]
            )  # fmt: skip
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
        return _script_replies(replies)


class PackedVelocity:
    """A batch's velocity calls, packed and not sent yet (`VelocityStore.pack_batch`)."""

    def __init__(
        self,
        ordered: OrderedConnection,
        assemble: Callable[[int, list[_Call], list[bytes]], VelocityBatch],
        n: int,
        calls: list[_Call],
        packed: list[bytes],
    ) -> None:
        self._ordered = ordered
        self._assemble = assemble
        self._n = n
        self._calls = calls
        self._packed = packed

    async def submit(self) -> PendingVelocity:
        """Send the calls on the store's ordered connection (Redis runs them after whatever was
        sent on it before); their results are read with `await pending.result()`."""
        pending = await self._ordered.send_packed(self._packed) if self._packed else None
        return PendingVelocity(self._assemble, self._n, self._calls, pending)


class PendingVelocity:
    """A submitted batch (`PackedVelocity.submit`) whose results are not read yet."""

    def __init__(
        self,
        assemble: Callable[[int, list[_Call], list[bytes]], VelocityBatch],
        n: int,
        calls: list[_Call],
        pending: PendingReplies | None,
    ) -> None:
        self._assemble = assemble
        self._n = n
        self._calls = calls
        self._pending = pending

    async def result(self) -> VelocityBatch:
        """The batch's results, as `apply_batch` returns them; a script error (ResponseError)
        or a broken connection (ConnectionError) is raised."""
        replies = await self._pending.replies() if self._pending is not None else []
        return self._assemble(self._n, self._calls, _script_replies(replies))


def _script_replies(replies: Sequence[object]) -> list[bytes]:
    """The scripts' replies as bytes; the first error among them is raised."""
    out: list[bytes] = []
    for reply in replies:
        if isinstance(reply, BaseException):
            raise reply
        if not isinstance(reply, bytes):
            raise TypeError(f"a velocity script replied {type(reply).__name__}, not bytes")
        out.append(reply)
    return out


async def zset_encoding_advice(redis: aioredis.Redis) -> str | None:
    """What to tell the operator when the server's zset-max-listpack-value keeps the accounts'
    transaction indexes out of the compact encoding (velocity memory ~40% higher); None when it
    is high enough, or when the server does not let clients read its configuration (managed
    Redis services often disable CONFIG)."""
    try:
        reply = await redis.config_get("zset-max-listpack-value")
    except RedisError:
        return None
    raw = next(iter(reply.values()), None) if isinstance(reply, dict) else None
    try:
        value = int(raw) if raw is not None else None
    except (TypeError, ValueError):
        return None
    if value is None or value >= RECOMMENDED_ZSET_LISTPACK_VALUE:
        return None
    return (
        f"Redis zset-max-listpack-value is {value}: each account's index of applied transactions "
        f"(members of ~150-180 bytes) is stored as a skiplist, ~40% more velocity memory per "
        f"account; set it to {RECOMMENDED_ZSET_LISTPACK_VALUE} (CONFIG SET or redis.conf)"
    )


def _time_fields(t: int) -> tuple[str, str, str, str, str]:
    """An account entry's time fields: ms and ms - 24 h + 1 (13 digits); the field names of its
    6 h and day buckets, and of the 6 h bucket that leaves the 7 d window when it moves the
    window by one bucket (the script reads it with the meta)."""
    # str() and a length test: a third of the cost of f"{t:013d}" (times are 13 digits since
    # 2001); zfill pads the others
    ms, lo = str(t), str(t - _DAY_LESS_1)
    if len(ms) != 13:
        ms = ms.zfill(13)
    if len(lo) != 13:
        lo = f"{max(0, t - _DAY_LESS_1):013d}"
    q, d = t // QUARTER_MS, t // DAY_MS
    return ms, lo, f"q{q}", f"d{d}", f"q{q - 28}"


def _rows(reply: bytes, width: int, count: int) -> FloatArray:
    rows = np.frombuffer(reply, dtype="<f8")
    if rows.size != width * count:
        raise ValueError(f"velocity script returned {rows.size} values, expected {width * count}")
    return rows.reshape(count, width)


# The records the scripts store for replays and return (account.lua's REC: the transaction's
# own location, which only a stored record needs, then the 18 values; terminal.lua's REC: the
# six values), as numpy reads them: packed, little-endian.
_ACCOUNT_RECORD: Final = np.dtype(
    [("located", "u1"), ("lat", "<f8"), ("lon", "<f8")]
    + [
        (name, "<i4" if kind == "i" else "<f8")
        for name, kind in zip(
            RAW_COLUMNS[1:N_ACCOUNT],
            "ifififififiiifffff",  # counts and distinct counts int32, the rest doubles
            strict=True,
        )
    ]
)
_TERMINAL_RECORD: Final = np.dtype(("<i4", (N_TERMINAL - 1,)))
# The account record again, for struct: below _FEW rows it decodes faster than numpy's column
# by column copies (~4 against ~16 us for the query service's one-row peeks; even at 8 rows).
_ACCOUNT_RECORD_STRUCT: Final = struct.Struct("<Bdd" + "id" * 5 + "iii" + "ddddd")
_FEW: Final = 8


def _account_rows(reply: bytes, count: int) -> tuple[FloatArray, BoolArray]:
    """The account script's reply: `count` records, then one byte per entry (status * 2 +
    newest); as rows of doubles (status, the 18 values) and the "newest" flags."""
    size = count * _ACCOUNT_RECORD.itemsize
    if len(reply) != size + count:
        raise ValueError(f"account script returned {len(reply)} bytes, expected {size + count}")
    if count < _FEW:
        unpack, width = _ACCOUNT_RECORD_STRUCT.unpack_from, _ACCOUNT_RECORD.itemsize
        flag_bytes = reply[size:]
        rows = np.array(
            [(flag_bytes[k] >> 1, *unpack(reply, k * width)[3:]) for k in range(count)],
            dtype=np.float64,
        ).reshape(count, N_ACCOUNT)
        return rows, np.array([flag & 1 == 1 for flag in flag_bytes], dtype=np.bool_)
    records = np.frombuffer(reply, dtype=_ACCOUNT_RECORD, count=count)
    flags = np.frombuffer(reply, dtype=np.uint8, offset=size)
    rows = np.empty((count, N_ACCOUNT), dtype=np.float64)
    rows[:, 0] = flags >> 1
    for column, name in enumerate(RAW_COLUMNS[1:N_ACCOUNT], start=1):
        rows[:, column] = records[name]
    return rows, (flags & 1) == 1


def _terminal_rows(reply: bytes, count: int) -> FloatArray:
    """The terminal script's reply: `count` records, then one status byte per entry; as rows of
    doubles (status, the six values)."""
    size = count * _TERMINAL_RECORD.itemsize
    if len(reply) != size + count:
        raise ValueError(f"terminal script returned {len(reply)} bytes, expected {size + count}")
    rows = np.empty((count, N_TERMINAL), dtype=np.float64)
    rows[:, 0] = np.frombuffer(reply, dtype=np.uint8, offset=size)
    rows[:, 1:] = np.frombuffer(reply, dtype=_TERMINAL_RECORD, count=count)
    return rows


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
