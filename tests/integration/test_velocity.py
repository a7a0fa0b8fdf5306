"""The velocity store against a real Redis, held to the reference model of shared.scoring.features.

No mocks: every test runs the Lua scripts on the session's Redis, each in a key namespace of its
own under the test's `settings.redis_key_prefix`, removed at the end.
"""

from __future__ import annotations

import dataclasses
import random
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from datetime import UTC, datetime
from typing import Any, cast

import numpy as np
import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from redis import exceptions as redis_exceptions

from shared.config import Settings
from shared.redis_client import make_redis
from shared.scoring.features import (
    APPLIED,
    DAY_MS,
    DEFAULT_CONFIG,
    DUPLICATE,
    FEATURE_NAMES,
    HOUR_MS,
    LATE,
    MINUTE_MS,
    LabelRecord,
    ReferenceVelocity,
    TransactionView,
    TxRecord,
    VelocityConfig,
    VelocityResult,
    build_feature_matrix,
    reference_features,
)
from shared.scoring.velocity import (
    RECOMMENDED_ZSET_LISTPACK_VALUE,
    CallMode,
    VelocityStore,
    zset_encoding_advice,
)

T0 = int(datetime(2024, 5, 15, 12, tzinfo=UTC).timestamp() * 1000)

# Small caps so that random sequences run into every eviction path.
TINY = VelocityConfig(
    account_id_cap=4,
    account_late_cap=3,
    merchant_cap=3,
    country_cap=2,
    device_cap=2,
    terminal_id_cap=4,
    terminal_late_cap=3,
    label_cap=2,
    late_scan=2,
    label_delay_ms=2 * DAY_MS,
)
# Everything a generated sequence holds stays within retention: replays are exact.
WIDE = VelocityConfig(late_tolerance_ms=400 * DAY_MS, label_delay_ms=DAY_MS)

STEPS = [0, 0, 1, 1, 999, 1000, 59_999, 60_000, 61_000, 10 * MINUTE_MS, HOUR_MS - 1, HOUR_MS]
STEPS += [3 * HOUR_MS, 6 * HOUR_MS, 23 * HOUR_MS, DAY_MS, DAY_MS + 1, 2 * DAY_MS, 3 * DAY_MS]
LONG_STEPS = [8 * DAY_MS, 31 * DAY_MS]
LATENESS = [0, 0, 0, 0, 0, 1000, 30_000, 2 * MINUTE_MS, HOUR_MS, 5 * HOUR_MS, 23 * HOUR_MS]
LATENESS += [DAY_MS, 47 * HOUR_MS, 2 * DAY_MS, 3 * DAY_MS]

Event = TxRecord | LabelRecord


@pytest.fixture
async def namespace(settings: Settings) -> str:
    return f"{settings.redis_key_prefix}:{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def store(redis: aioredis.Redis, namespace: str) -> AsyncIterator[VelocityStore]:
    velocity = VelocityStore(redis, namespace)
    try:
        yield velocity
    finally:
        await velocity.clear()


async def awaited(call: Awaitable[Any] | Any) -> Any:
    """redis-py types its commands as `Awaitable[T] | T` (sync and async share signatures)."""
    return await cast(Awaitable[Any], call)


async def dump(redis: aioredis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under `prefix` with its content (not its expiry, which only counts down)."""
    out: dict[bytes, Any] = {}
    async for key in redis.scan_iter(match=f"{prefix}:*", count=1000):
        kind = await redis.type(key)
        if kind == b"hash":
            out[key] = sorted((await awaited(redis.hgetall(key))).items())
        elif kind == b"zset":
            out[key] = await redis.zrange(key, 0, -1, withscores=True)
        else:
            out[key] = kind
    return out


@st.composite
def event_sequences(draw: st.DrawFn, max_size: int, long_gaps: bool) -> list[Event]:
    """Transactions of three accounts and two terminals, times mostly increasing with bursts,
    gaps and out-of-order events within and beyond the late tolerance; replays of earlier
    transactions and fraud labels (and withdrawals) in between."""
    steps = STEPS + LONG_STEPS if long_gaps else STEPS
    n = draw(st.integers(1, max_size))
    clock = T0
    events: list[Event] = []
    txs: list[TxRecord] = []
    for i in range(n):
        kind = draw(st.sampled_from(["tx"] * 6 + ["replay", "label"]))
        if kind == "replay" and txs:
            events.append(draw(st.sampled_from(txs)))
            continue
        if kind == "label" and txs:
            target = draw(st.sampled_from(txs))
            fraud = draw(st.booleans())
            events.append(
                LabelRecord(target.transaction_id, target.terminal_id, fraud, target.event_ms)
            )
            continue
        clock += draw(st.sampled_from(steps))
        located = draw(st.booleans())
        record = TxRecord(
            transaction_id=f"tx{i}",
            account_id=draw(st.sampled_from(["a1", "a2", "a3"])),
            event_ms=clock - draw(st.sampled_from(LATENESS)),
            amount_minor=draw(st.integers(0, 50_000)),
            currency=draw(st.sampled_from(["EUR", "EUR", "JPY"])),
            merchant_id=draw(st.sampled_from(["m1", "m2", "m3", "m4", "m5", ""])),
            country=draw(st.sampled_from(["FR", "DE", "US", ""])),
            device_id=draw(st.sampled_from(["d1", "d2", "d3", ""])),
            terminal_id=draw(st.sampled_from(["T1", "T2", ""])),
            latitude=draw(st.floats(-80, 80)) if located else None,
            longitude=draw(st.floats(-179, 179)) if located else None,
        )
        events.append(record)
        txs.append(record)
    return events


def chunks(events: Sequence[Event], cuts: Sequence[bool]) -> list[list[Event]]:
    """Consecutive runs of one kind (transactions or labels), also cut where `cuts` says."""
    out: list[list[Event]] = []
    for event, cut in zip(events, cuts, strict=True):
        if not out or cut or isinstance(event, LabelRecord) != isinstance(out[-1][0], LabelRecord):
            out.append([])
        out[-1].append(event)
    return out


async def run(
    store: VelocityStore, events: Sequence[Event], cuts: Sequence[bool]
) -> list[VelocityResult | bool]:
    results: list[VelocityResult | bool] = []
    for chunk in chunks(events, cuts):
        if isinstance(chunk[0], LabelRecord):
            labels = [e for e in chunk if isinstance(e, LabelRecord)]
            results += await store.apply_labels(labels)
        else:
            txs = [e for e in chunk if isinstance(e, TxRecord)]
            results += list(await store.apply_batch(txs))
    return results


def same_values(a: VelocityResult, b: VelocityResult) -> bool:
    return a.account_values() == b.account_values() and a.terminal_values() == b.terminal_values()


HYPOTHESIS = hsettings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@HYPOTHESIS
@given(data=st.data())
async def test_the_store_computes_what_the_reference_recomputes_from_the_list(
    redis: aioredis.Redis, namespace: str, data: st.DataObject
) -> None:
    config = data.draw(st.sampled_from([DEFAULT_CONFIG, TINY]), label="config")
    mode: CallMode = data.draw(st.sampled_from(["batch", "slot", "per_tx"]), label="mode")
    events = data.draw(event_sequences(max_size=45, long_gaps=True), label="events")
    cuts = data.draw(st.lists(st.booleans(), min_size=len(events), max_size=len(events)))
    store = VelocityStore(redis, f"{namespace}:{uuid.uuid4().hex[:6]}", config, call_mode=mode)
    model = ReferenceVelocity(config)
    watermark: dict[str, int] = {}  # per account, the newest event time applied so far
    try:
        history: list[Event] = []
        for chunk in chunks(events, cuts):
            if isinstance(chunk[0], LabelRecord):
                labels = [e for e in chunk if isinstance(e, LabelRecord)]
                assert await store.apply_labels(labels) == [model.apply_label(x) for x in labels]
                history += labels
                continue
            txs = [e for e in chunk if isinstance(e, TxRecord)]
            peeked = await store.peek_batch(txs[:1])
            got = await store.apply_batch(txs)
            expected = [model.apply(x) for x in txs]
            assert list(got) == expected  # exact: integer counts and sums, the same doubles
            # "newest": nothing later of the account had been applied when it was reached
            assert got.newest is not None
            for record, result, newest in zip(txs, got, got.newest.tolist(), strict=True):
                mark = watermark.get(record.account_id)
                assert newest == (mark is None or record.event_ms >= mark), record
                if result.status == APPLIED:
                    watermark[record.account_id] = max(mark or 0, record.event_ms)
            assert same_values(peeked[0], got[0])  # a peek is what the application returns
            # the features, against a recomputation from the raw list of everything before
            matrix = build_feature_matrix(TransactionView.from_records(txs), got)
            for i, record in enumerate(txs):
                want = reference_features(history, record, config)
                for j, name in enumerate(FEATURE_NAMES):
                    assert matrix[i, j] == pytest.approx(want[name], rel=1e-9, abs=1e-9), name
                history.append(record)
        now = max(e.event_ms for e in events)
        for account in ("a1", "a2", "a3", "nobody"):
            snap = await store.snapshot(account, now)
            row = model.snapshot_row(account, now)
            assert (snap is None) == (row is None)
            if snap is not None and row is not None:
                assert snap.counts["24h"] == row[5] and snap.distinct_merchants_24h == row[11]
                assert round(snap.sums["30d"] * 10_000) == row[10]
    finally:
        await store.clear()


@HYPOTHESIS
@given(data=st.data())
async def test_replaying_any_prefix_twice_changes_nothing(
    redis: aioredis.Redis, namespace: str, data: st.DataObject
) -> None:
    events = data.draw(event_sequences(max_size=30, long_gaps=False), label="events")
    k = data.draw(st.integers(1, len(events)), label="prefix")
    prefix = events[:k]
    cuts1 = data.draw(st.lists(st.booleans(), min_size=k, max_size=k))
    cuts2 = data.draw(st.lists(st.booleans(), min_size=k, max_size=k))
    store = VelocityStore(redis, f"{namespace}:{uuid.uuid4().hex[:6]}", WIDE)
    model = ReferenceVelocity(WIDE)
    try:
        first = await run(store, prefix, cuts1)
        before = await dump(redis, store.prefix)
        again = await run(store, prefix, cuts2)  # batched differently: no difference
        assert await dump(redis, store.prefix) == before
        for event in prefix:
            if isinstance(event, LabelRecord):
                model.apply_label(event)
        for a, b, event in zip(first, again, prefix, strict=True):
            if isinstance(event, LabelRecord):
                # a label's verdict is the last one given for its transaction: replayed alone
                # it changes nothing; a replayed flag and withdrawal flip twice, back to the
                # same state (as the reference says)
                assert b == model.apply_label(event)
                continue
            assert isinstance(a, VelocityResult) and isinstance(b, VelocityResult)
            assert same_values(a, b)
            assert b.status == (LATE if a.status == LATE else DUPLICATE)
    finally:
        await store.clear()


@pytest.mark.parametrize("late", [False, True])
async def test_window_boundaries_match_the_reference(
    redis: aioredis.Redis, namespace: str, late: bool
) -> None:
    """Members exactly W before the transaction are out, 1 ms later in, for a transaction in
    order (running totals) and one out of order (explicit sums)."""
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    t = T0 - HOUR_MS if late else T0
    history = [
        TxRecord(f"b{i}", "acct", t - offset, 100 * (i + 1))
        for i, offset in enumerate(
            [DAY_MS, DAY_MS - 1, HOUR_MS, HOUR_MS - 1, MINUTE_MS, MINUTE_MS - 1, 0]
        )
    ]
    if late:
        history.append(TxRecord("newest", "acct", T0, 1))  # makes the probe out of order
    probe = TxRecord("probe", "acct", t, 7)
    try:
        for record in history:
            assert list(await store.apply_batch([record])) == [model.apply(record)]
        assert list(await store.apply_batch([probe])) == [model.apply(probe)]
        expected = model.peek(TxRecord("next", "acct", T0 + MINUTE_MS, 1))
        (got,) = await store.peek_batch([TxRecord("next", "acct", T0 + MINUTE_MS, 1)])
        assert got == expected
    finally:
        await store.clear()


async def test_ids_evicted_by_the_cap_leave_the_running_totals(
    redis: aioredis.Redis, namespace: str
) -> None:
    config = VelocityConfig(account_id_cap=3)
    store = VelocityStore(redis, namespace, config)
    model = ReferenceVelocity(config)
    burst = [TxRecord(f"c{i}", "acct", T0 + i * 1000, 100 + i) for i in range(8)]
    try:
        for part in (burst[:5], burst[5:6], burst[6:]):
            assert list(await store.apply_batch(part)) == [model.apply(x) for x in part]
        (after,) = await store.apply_batch([TxRecord("d", "acct", T0 + 30_000, 1)])
        assert after == model.apply(TxRecord("d", "acct", T0 + 30_000, 1))
        assert after.count_1m == 4  # the three retained ids and itself
        assert after.count_30d == 9  # buckets are not capped
    finally:
        await store.clear()


async def test_newest_tells_whether_anything_later_was_applied_before(
    store: VelocityStore,
) -> None:
    first = TxRecord("t1", "acct", T0, 1000)
    second = TxRecord("t2", "acct", T0 + HOUR_MS, 1000)
    between = TxRecord("t3", "acct", T0 + MINUTE_MS, 1000)  # late, but within the tolerance
    batch = await store.apply_batch([first, second, between])
    assert batch.newest is not None and batch.newest.tolist() == [True, True, False]
    assert [r.status for r in batch] == [APPLIED, APPLIED, APPLIED]
    # replays: the newest is still the newest, the others are not
    again = await store.apply_batch([second, first])
    assert again.newest is not None and again.newest.tolist() == [True, False]
    assert [r.status for r in again] == [DUPLICATE, DUPLICATE]
    # peeks and batch slices carry it too
    peeked = await store.peek_batch([TxRecord("t4", "acct", T0 + 2 * HOUR_MS, 1)])
    assert peeked.newest is not None and peeked.newest.tolist() == [True]
    sliced = batch[1:]
    assert sliced.newest is not None and sliced.newest.tolist() == [True, False]


async def test_a_replay_older_than_retention_is_never_counted_twice(
    redis: aioredis.Redis, namespace: str
) -> None:
    store = VelocityStore(redis, namespace, VelocityConfig(late_tolerance_ms=DAY_MS))
    try:
        old = TxRecord("old", "acct", T0, 1000)
        await store.apply_batch([old])
        await store.apply_batch([TxRecord("new", "acct", T0 + 3 * DAY_MS, 1000)])
        (replayed,) = await store.apply_batch([old])
        assert replayed.status == LATE  # its id is gone, but it is behind the horizon
        (probe,) = await store.peek_batch([TxRecord("probe", "acct", T0 + 3 * DAY_MS + 1, 1)])
        assert probe.count_30d == 3  # old, new, the probe itself: old was not counted again
    finally:
        await store.clear()


async def test_terminal_risk_counts_labels_after_the_delay(
    redis: aioredis.Redis, namespace: str
) -> None:
    store = VelocityStore(redis, namespace, VelocityConfig(label_delay_ms=7 * DAY_MS))
    try:
        day = T0 - T0 % DAY_MS
        old = [
            TxRecord(f"o{i}", f"c{i}", day - 10 * DAY_MS + i, 500, terminal_id="T")
            for i in range(4)
        ]
        recent = TxRecord("r", "cx", day - 2 * DAY_MS, 500, terminal_id="T")
        await store.apply_batch([*old, recent])
        labels = [
            LabelRecord("o0", "T", True, old[0].event_ms),
            LabelRecord("o1", "T", True, old[1].event_ms),
            LabelRecord("r", "T", True, recent.event_ms),  # newer than the delay: not yet counted
        ]
        assert await store.apply_labels(labels) == [True, True, True]
        assert await store.apply_labels(labels) == [False, False, False]  # idempotent
        assert await store.apply_labels([LabelRecord("o1", "T", False, old[1].event_ms)]) == [True]
        probe = TxRecord("p", "cy", T0, 500, terminal_id="T")
        (result,) = await store.apply_batch([probe])
        assert (result.terminal_count_7d, result.terminal_fraud_7d) == (4, 1)
        assert (result.terminal_count_1d, result.terminal_count_30d) == (0, 4)
        features = build_feature_matrix(TransactionView.from_records([probe]), [result])
        assert features[0, FEATURE_NAMES.index("terminal_risk_7d")] == 0.25
        (again,) = await store.apply_batch([probe])
        assert again.status == DUPLICATE and again.terminal_status == DUPLICATE
    finally:
        await store.clear()


async def test_peek_writes_nothing(redis: aioredis.Redis, store: VelocityStore) -> None:
    txs = [TxRecord(f"x{i}", "acct", T0 + i * MINUTE_MS, 100, terminal_id="T") for i in range(5)]
    await store.apply_batch(txs[:3])
    before = await dump(redis, store.prefix)
    peeked = await store.peek_batch(txs[3:])
    assert await dump(redis, store.prefix) == before
    assert [r.count_1h for r in peeked] == [4, 4]  # each peeked alone, "as if added"
    assert [r.status for r in await store.peek_batch(txs[:1])] == [DUPLICATE]


async def test_snapshot(store: VelocityStore) -> None:
    assert await store.snapshot("nobody", T0) is None
    await store.apply_batch(
        [
            TxRecord("s1", "acct", T0 - 2 * HOUR_MS, 1000, merchant_id="m1", country="FR"),
            TxRecord("s2", "acct", T0 - 30 * MINUTE_MS, 3000, merchant_id="m2", country="FR"),
        ]
    )
    snap = await store.snapshot("acct", T0)
    assert snap is not None
    assert snap.counts == {"1m": 0, "1h": 1, "24h": 2, "7d": 2, "30d": 2}
    assert snap.sums["24h"] == 40.0 and snap.average("24h") == 20.0
    assert snap.distinct_merchants_24h == 2 and snap.distinct_countries_24h == 1
    assert snap.last_event_ms == T0 - 30 * MINUTE_MS and snap.seconds_since_last == 1800.0


async def test_scripts_are_reloaded_after_redis_forgets_them(
    redis: aioredis.Redis, store: VelocityStore
) -> None:
    await store.apply_batch([TxRecord("n1", "acct", T0, 100, terminal_id="T")])
    await redis.script_flush()  # what a Redis restart does to the script cache
    (result,) = await store.apply_batch([TxRecord("n2", "acct", T0 + 1, 100, terminal_id="T")])
    assert result.status == APPLIED and result.count_1m == 2
    assert result.terminal_status == APPLIED


async def test_memory_per_account_is_bounded_whatever_the_volume(
    redis: aioredis.Redis, store: VelocityStore
) -> None:
    """20,000 payments of one account at one terminal over 60 days, with ever new merchants,
    devices and countries: the structures stay within their retention and caps."""
    config = store.config
    n, span = 20_000, 60 * DAY_MS
    txs = [
        TxRecord(
            transaction_id=f"heavy{i}",
            account_id="heavy",
            event_ms=T0 + i * (span // n),
            amount_minor=100 + i % 1000,
            merchant_id=f"m{i}",
            country=f"C{i % 300}",
            device_id=f"d{i % 5000}",
            terminal_id="busy",
            latitude=45.0,
            longitude=5.0,
        )
        for i in range(n)
    ]
    for start in range(0, n, 1000):
        await store.apply_batch(txs[start : start + 1000])
    kc, kz, kt, kr = store.account_keys("heavy")
    fields = await awaited(redis.hlen(kc))
    # 3 meta fields, 6 h buckets and day buckets within retention + one pruning interval
    slack_q = config.prune_every_ms // (6 * HOUR_MS) + 2
    slack_d = config.prune_every_ms // DAY_MS + 2
    assert fields <= 3 + config.quarter_retention + slack_q + config.day_retention + slack_d
    assert await redis.zcard(kt) <= config.account_id_cap
    caps = config.merchant_cap + config.country_cap + config.device_cap
    assert await redis.zcard(kz) <= caps + config.account_late_cap
    assert await redis.exists(kr) == 0  # no late transaction, no late results
    tc, _, tt, _ = store.terminal_keys("busy")
    assert await redis.zcard(tt) <= config.terminal_id_cap
    assert await awaited(redis.hlen(tc)) <= 2 + config.terminal_day_retention + slack_d
    for key in (kc, kz, kt, tc, tt):
        assert 0 < await redis.pttl(key) <= config.ttl_ms  # dormant keys expire
    account_bytes = sum([int(await redis.memory_usage(k, samples=0) or 0) for k in (kc, kz, kt)])
    terminal_bytes = sum([int(await redis.memory_usage(k, samples=0) or 0) for k in (tc, tt)])
    print(
        f"\nvelocity memory after {n:,} tx over 60 d: account {account_bytes:,} B "
        f"(vc {fields} fields, vt {await redis.zcard(kt)}, vz {await redis.zcard(kz)} members), "
        f"terminal {terminal_bytes:,} B"
    )
    (after,) = await store.peek_batch(
        [TxRecord("probe", "heavy", txs[-1].event_ms + 1, 100, merchant_id="m1")]
    )
    per_day = n / 60
    assert after.count_24h == pytest.approx(per_day + 1, abs=1)  # exact, under the id cap
    assert after.count_30d == pytest.approx(30 * per_day, rel=0.05)  # day buckets
    assert after.distinct_merchants_24h == after.count_24h  # a new merchant every time


async def test_a_server_that_keeps_the_index_out_of_the_compact_encoding_gets_advice(
    redis: aioredis.Redis, settings: Settings
) -> None:
    (before,) = (await redis.config_get("zset-max-listpack-value")).values()
    store = VelocityStore.from_settings(redis, settings, namespace=f"enc-{uuid.uuid4().hex[:6]}")
    tx = TxRecord(f"enc-{'x' * 30}", "enc-acct", T0, 1500, merchant_id="m1")
    try:
        await redis.config_set("zset-max-listpack-value", 64)
        advice = await zset_encoding_advice(redis)
        assert advice is not None
        assert "zset-max-listpack-value is 64" in advice
        assert str(RECOMMENDED_ZSET_LISTPACK_VALUE) in advice
        # what the advice is about: the index member (~170 bytes) leaves the listpack at 64
        await store.apply_batch([tx])
        _, _, kt, _ = store.account_keys(tx.account_id)
        assert await redis.object("encoding", kt) == b"skiplist"

        await redis.config_set("zset-max-listpack-value", RECOMMENDED_ZSET_LISTPACK_VALUE)
        assert await zset_encoding_advice(redis) is None
        other = dataclasses.replace(tx, account_id="enc-acct-2")
        await store.apply_batch([other])
        _, _, kt2, _ = store.account_keys(other.account_id)
        assert await redis.object("encoding", kt2) == b"listpack"
    finally:
        await redis.config_set("zset-max-listpack-value", before)
        await store.clear()


async def test_no_advice_when_the_server_does_not_let_clients_read_its_config(
    redis: aioredis.Redis, settings: Settings
) -> None:
    # as managed Redis services do: a user without the CONFIG command
    user = f"fs-noconfig-{uuid.uuid4().hex[:6]}"
    await redis.acl_setuser(
        user, enabled=True, passwords=["+secret"], keys=["*"], commands=["+@all", "-config"]
    )
    restricted = make_redis(settings)
    restricted.connection_pool.connection_kwargs.update(username=user, password="secret")
    try:
        with pytest.raises(redis_exceptions.NoPermissionError):
            await restricted.config_get("zset-max-listpack-value")
        assert await zset_encoding_advice(restricted) is None
    finally:
        await restricted.aclose()
        await redis.acl_deluser(user)


async def test_clear_removes_only_its_namespace(redis: aioredis.Redis, settings: Settings) -> None:
    training = VelocityStore.from_settings(
        redis, settings, namespace=f"train-{uuid.uuid4().hex[:6]}"
    )
    live = VelocityStore.from_settings(redis, settings)
    assert training.prefix.startswith(settings.redis_key_prefix + ":train-")
    assert training.config.label_delay_ms == settings.scoring.label_delay_s * 1000
    record = TxRecord("c1", "acct", T0, 100, merchant_id="m", terminal_id="T")
    try:
        await training.apply_batch([record])
        await live.apply_batch([record])
        assert await training.clear() == 5  # account vc, vz, vt; terminal vc, vt
        assert await redis.exists(*training.account_keys("acct")) == 0
        assert await redis.exists(*live.account_keys("acct")) == 3
    finally:
        await live.clear()
        await training.clear()


async def test_batches_and_results_keep_the_input_order(store: VelocityStore) -> None:
    txs = [
        TxRecord(f"o{i}", f"acct{i % 7}", T0 + i, 100 * (i + 1), terminal_id="T" if i % 2 else "")
        for i in range(60)
    ]
    results = await store.apply_batch(txs)
    assert len(results) == 60 and all(r.status == APPLIED for r in results)
    assert [r.sum_1m_scaled for r in results[:7]] == [100 * (i + 1) * 100 for i in range(7)]
    assert [r.count_1m for r in results] == [i // 7 + 1 for i in range(60)]
    assert np.array_equal(results.raw[0::2, 19], np.full(30, -1.0))  # no terminal
    assert [r.terminal_count_30d for r in results[1::2]] == [0] * 30  # delayed: nothing yet
    assert len(await store.apply_batch([])) == 0


def long_history(seed: int) -> list[Event]:
    """Weeks of traffic, longer than the generated sequences: sparse accounts (a few payments a
    day: windows holding one member, buckets leaving the 7 and 30 d windows), dense ones (bursts
    within a minute and an hour: nested windows holding as many), sparse and busy terminals with
    fraud labels, some events late or replayed."""
    rnd = random.Random(seed)
    events: list[Event] = []
    txs: list[TxRecord] = []
    for account, per_day, burst in (("s1", 1, 1), ("s2", 3, 1), ("b1", 4, 6), ("b2", 2, 25)):
        t = T0
        for day in range(45):
            for k in range(rnd.randint(0, per_day)):
                t = max(t, T0 + day * DAY_MS + rnd.randint(0, DAY_MS - 1))
                for b in range(rnd.randint(1, burst)):
                    t += rnd.choice([0, 1, 999, 30_000, MINUTE_MS, 20 * MINUTE_MS])
                    late = rnd.choice([0] * 12 + [HOUR_MS, DAY_MS, 3 * DAY_MS])
                    record = TxRecord(
                        f"{account}-{day}-{k}-{b}",
                        account,
                        t - late,
                        rnd.randint(1, 90_000),
                        merchant_id=f"m{rnd.randrange(6)}",
                        country=rnd.choice(["FR", "FR", "DE"]),
                        device_id=rnd.choice(["d1", "d1", "d2"]),
                        terminal_id=rnd.choice(["T1", "T2", "T3", ""]),
                        latitude=45.5 if rnd.random() < 0.7 else None,
                        longitude=4.25,
                    )
                    txs.append(record)
                    events.append(record)
                    if rnd.random() < 0.05:
                        events.append(rnd.choice(txs))
                    if rnd.random() < 0.1:
                        target = rnd.choice(txs)
                        fraud = rnd.random() < 0.8
                        events.append(
                            LabelRecord(
                                target.transaction_id, target.terminal_id, fraud, target.event_ms
                            )
                        )
    # the accounts interleave by (roughly) event time, as a stream would
    order = sorted(range(len(events)), key=lambda i: (events[i].event_ms // HOUR_MS, i))
    return [events[i] for i in order]


@pytest.mark.parametrize("seed", [1, 2])
async def test_long_histories_match_the_reference(
    redis: aioredis.Redis, namespace: str, seed: int
) -> None:
    """The reads the scripts skip (a window that nothing can leave, a prune with nothing to
    prune) change no result over weeks of sparse and dense traffic."""
    events = long_history(seed)
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    try:
        cuts = [i % 37 == 0 for i in range(len(events))]
        for chunk in chunks(events, cuts):
            if isinstance(chunk[0], LabelRecord):
                labels = [e for e in chunk if isinstance(e, LabelRecord)]
                assert await store.apply_labels(labels) == [model.apply_label(x) for x in labels]
                continue
            txs = [e for e in chunk if isinstance(e, TxRecord)]
            assert list(await store.apply_batch(txs)) == [model.apply(x) for x in txs]
    finally:
        await store.clear()


async def test_fields_are_sent_verbatim(redis: aioredis.Redis, namespace: str) -> None:
    """Every field is an argument of its own: ids and names may hold any character (the unit
    separator too, which once split a single payload), and a replay still finds its original."""
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    odd = TxRecord(
        "id\x1fwith\x1fseparators",
        "acct\x1f1",
        T0,
        1234,
        merchant_id="m\x1f",
        country="",
        device_id="dev ice",
        terminal_id="T\x1fx",
    )
    plain = TxRecord("plain", "acct\x1f1", T0 + 1000, 10, merchant_id="m", terminal_id="T\x1fx")
    try:
        for batch in ([odd], [plain], [odd, plain]):
            assert list(await store.apply_batch(batch)) == [model.apply(x) for x in batch]
        (again,) = await store.apply_batch([odd])
        assert again.status == DUPLICATE
        label = LabelRecord(odd.transaction_id, odd.terminal_id, True, odd.event_ms)
        assert await store.apply_labels([label]) == [model.apply_label(label)] == [True]
    finally:
        await store.clear()


async def test_state_written_before_the_index_bound_still_matches(
    redis: aioredis.Redis, namespace: str
) -> None:
    """An account's M3 of seven doubles (written before the eighth slot held the bound on vt's
    members) is read as "bound unknown": every result stays the reference's."""
    events = long_history(3)
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    try:
        cuts = [i % 29 == 0 for i in range(len(events))]
        for n, chunk in enumerate(chunks(events, cuts)):
            if isinstance(chunk[0], LabelRecord):
                labels = [e for e in chunk if isinstance(e, LabelRecord)]
                assert await store.apply_labels(labels) == [model.apply_label(x) for x in labels]
                continue
            if n % 3 == 0:
                for account in ("s1", "s2", "b1", "b2"):
                    key = store.account_keys(account)[0]
                    m3 = await awaited(redis.hget(key, "M3"))
                    if m3 is not None:
                        await redis.execute_command("HSET", key, "M3", bytes(m3)[:56])
            txs = [e for e in chunk if isinstance(e, TxRecord)]
            assert list(await store.apply_batch(txs)) == [model.apply(x) for x in txs]
    finally:
        await store.clear()


async def test_a_sparse_account_reads_and_prunes_nothing_it_need_not(
    redis: aioredis.Redis, namespace: str
) -> None:
    """One payment every 50 minutes: M3 keeps a bound below every member of vt (the first
    transaction's ms - 1: nothing was pruned), which lets the script skip the index prune and
    the window reads nothing can leave; the results are the reference's."""
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    txs = [
        TxRecord(f"p{i}", "sparse", T0 + i * 50 * MINUTE_MS, 100 + i, merchant_id=f"m{i % 2}")
        for i in range(12)
    ]
    try:
        for tx in txs:
            assert list(await store.apply_batch([tx])) == [model.apply(tx)]
        m3 = await awaited(redis.hget(store.account_keys("sparse")[0], "M3"))
        bound = np.frombuffer(bytes(m3), dtype="<f8")[7]
        assert bound == T0 - 1  # every member is later than the first transaction
        assert await redis.zcard(store.account_keys("sparse")[2]) == len(txs)
    finally:
        await store.clear()


async def test_buckets_leaving_the_windows_are_read_for_every_gap(
    redis: aioredis.Redis, namespace: str
) -> None:
    """The 6 h bucket that leaves the 7 d window when a transaction moves it by one bucket is
    read with the meta; longer gaps (several buckets, days leaving the 30 d window, a gap past
    the window) read the rest in a second call: every total is the reference's."""
    store = VelocityStore(redis, namespace)
    model = ReferenceVelocity()
    quarter = 6 * HOUR_MS
    gaps = [quarter, quarter + 1, 2 * quarter, 3 * quarter - 1, DAY_MS, 3 * DAY_MS, 8 * DAY_MS]
    rnd = random.Random(5)
    t, txs = T0, []
    for i in range(120):  # ~45 days: buckets leave both windows, by one and by many
        t += rnd.choice([*gaps, quarter, quarter, 2 * quarter, 5 * MINUTE_MS])
        txs.append(TxRecord(f"g{i}", "gaps", t, rnd.randint(1, 90_000), merchant_id="m"))
    try:
        for tx in txs:
            assert list(await store.apply_batch([tx])) == [model.apply(tx)]
        for probe_gap in gaps:
            probe = TxRecord("probe", "gaps", t + probe_gap, 1)
            assert list(await store.peek_batch([probe])) == [model.peek(probe)]
    finally:
        await store.clear()
