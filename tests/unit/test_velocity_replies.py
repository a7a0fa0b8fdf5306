"""Decoding the velocity scripts' replies (no Redis: the bytes are built here as the scripts
pack them, with Lua's struct formats account.lua REC and terminal.lua REC)."""

from __future__ import annotations

import math
import random
import struct
from collections.abc import Callable

import numpy as np
import pytest

from shared.scoring.features import N_ACCOUNT, N_TERMINAL
from shared.scoring.velocity import _account_rows, _terminal_rows

ACCOUNT_REC = struct.Struct("<Bddi4di4di4di4di4di4i4i4ddddd".replace("i4", "i"))
TERMINAL_REC = struct.Struct("<6i")


def account_entry(rnd: random.Random) -> tuple[tuple[float, ...], bytes]:
    """(the 18 values, the record) of one made-up entry; NaN where a value is "none"."""
    counts = [rnd.randrange(0, 5000) for _ in range(5)]
    sums = [rnd.randrange(0, 10**9) / 1.0 for _ in range(5)]
    distinct = [rnd.randrange(0, 600) for _ in range(3)]
    times = [rnd.choice([math.nan, float(rnd.randrange(10**12, 2 * 10**12))]) for _ in range(5)]
    values = (*[x for pair in zip(counts, sums, strict=True) for x in pair], *distinct, *times)
    record = ACCOUNT_REC.pack(1, 48.5, 2.25, *values)
    return tuple(float(v) for v in values), record


@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 9, 50])  # both sides of the small-batch path
def test_account_records_and_flags_decode_to_rows(count: int) -> None:
    rnd = random.Random(count)
    entries = [account_entry(rnd) for _ in range(count)]
    statuses = [rnd.randrange(0, 4) for _ in range(count)]
    newest = [rnd.random() < 0.5 for _ in range(count)]
    reply = b"".join(r for _, r in entries) + bytes(
        s * 2 + int(n) for s, n in zip(statuses, newest, strict=True)
    )
    rows, flags = _account_rows(reply, count)
    assert rows.shape == (count, N_ACCOUNT) and rows.dtype == np.float64
    assert flags.tolist() == newest
    expected = np.array([(s, *v) for s, (v, _) in zip(statuses, entries, strict=True)])
    np.testing.assert_array_equal(rows, expected.reshape(count, N_ACCOUNT))


@pytest.mark.parametrize("count", [1, 12])
def test_terminal_records_and_statuses_decode_to_rows(count: int) -> None:
    rnd = random.Random(count)
    values = [[rnd.randrange(0, 10**6) for _ in range(6)] for _ in range(count)]
    statuses = [rnd.randrange(0, 3) for _ in range(count)]
    reply = b"".join(TERMINAL_REC.pack(*v) for v in values) + bytes(statuses)
    rows = _terminal_rows(reply, count)
    assert rows.shape == (count, N_TERMINAL)
    np.testing.assert_array_equal(
        rows, np.array([(s, *v) for s, v in zip(statuses, values, strict=True)])
    )


@pytest.mark.parametrize(
    ("decode", "reply"),
    [
        (lambda r: _account_rows(r, 2), bytes(129 * 2)),  # no flags
        (lambda r: _account_rows(r, 1), bytes(152 + 1)),  # the old row of 19 doubles
        (lambda r: _terminal_rows(r, 1), bytes(7 * 8)),  # the old terminal row
    ],
)
def test_a_reply_of_the_wrong_size_is_refused_with_what_was_expected(
    decode: Callable[[bytes], object], reply: bytes
) -> None:
    with pytest.raises(ValueError, match="expected"):
        decode(reply)
