"""Velocity features: the data the velocity store returns, the feature matrix, and a reference.

Pure: no I/O. `shared.scoring.velocity` is the Redis adapter that produces `VelocityBatch`es;
this module turns them into the feature matrix (`build_feature_matrix`) the rules and the model
read, and defines, in plain Python, what every number means (`ReferenceVelocity`,
`reference_result`, `reference_features`): the integration tests hold the Lua scripts to it and
`fraudstream train` can use it to validate a replay.

Semantics (times are event times in integer milliseconds, UTC; "wm" is the account's watermark,
the largest event time applied so far, and wm1 = max(wm, t) for a transaction at t):

* Windows include the current transaction. 1 min, 1 h and 24 h are exact sliding windows
  (t - W, t] over the account's transaction index (which keeps the late tolerance, 48 h by
  default, and at most `account_id_cap` transactions: an account past that many a day has its
  exact windows count the newest ones). 7 d is the last 28 six-hour buckets (floor(t / 6 h)) up
  to and including t's, 30 d the last 30 day buckets (UTC days): a bucketed window covers between
  W minus one bucket and W. An out-of-order transaction lands in its own buckets and sees windows
  ending at its own time (a bucket it shares with later events counts them too).
* Retention (what bounds memory): 6 h buckets for 7 d + the late tolerance, day buckets for
  30 d + the late tolerance, the transaction index as above, distinct members for 24 h (merchants
  30 d) + the late tolerance and at most a cap each (the oldest goes first). Reads ignore
  anything past retention relative to wm1, so when the store physically prunes changes nothing.
* Idempotency: a transaction applied before (same id and event time, still retained, i.e. within
  the late tolerance of wm) is a DUPLICATE and gets the numbers it got the first time, from the
  stored result. A transaction at or before the account's horizon max(wm - late_tolerance,
  newest id evicted by the cap) is LATE: scored "as if added" from the current state, not counted
  (its id could have been evicted, so counting it might count it twice), and its result is kept
  too (for the late tolerance), so a replay returns it unchanged. Otherwise it is APPLIED. Ids,
  results and counters move together in one Lua script per call. So replaying anything still
  within the late tolerance changes nothing and returns the same numbers; an older replay is
  never counted twice (LATE) but is scored from the current state.
* seconds_since_last / travel_speed_kmh use the previous transaction by event time: for an
  in-order transaction (t >= wm) the newest one (ties: the last applied) and the newest located
  one; for an out-of-order one, the newest retained transaction at or before t (ties: the larger
  index member) and the first located among the `late_scan` newest such. No previous: 30 d and
  0 km/h. Elapsed time under 1 s counts as 1 s.
* first_time_merchant is 1 unless the account's merchant was seen at a time > t - 30 d (a visit
  after t, known from an earlier-applied later event, counts as seen); 0 without a merchant id.
* Distinct merchants / countries / devices over 24 h: members whose latest time is > t - 24 h
  (again including visits after t), plus the current one; empty ids are not members.
* amount_ratio_30d = amount / mean of the other transactions of the 30 d window (the mean is
  floored at 0.01); 1.0 without history. Sums mix currencies in major units (no FX rates).
* is_night: UTC hour <= 6 and is_weekend: UTC Saturday/Sunday; the payer's local time is not
  known.
* Terminal features (the handbook's delayed windows): D = day(t - label_delay); count_Nd is the
  number of transactions the terminal saw on days (D - N, D] (the current one excluded), risk_Nd
  the labeled-fraud ones among them (clipped to [0, 1]; 0 with no transactions). Fraud is booked
  on the day of the transaction's event time as carried by the label (`LabelRecord.event_ms`).
  A label sets the transaction's verdict (the last one given wins): the same label again changes
  nothing, a withdrawal (is_fraud false) takes a fraud back out. The terminal has its own ids,
  horizon and stored results, exactly like an account.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, cast, overload

import numpy as np
import numpy.typing as npt

from shared.validation import currency_exponent

__all__ = [
    "ACCOUNT_COLUMNS",
    "AMOUNT_SCALE",
    "APPLIED",
    "DAY_MS",
    "DEFAULT_CONFIG",
    "DUPLICATE",
    "FEATURE_NAMES",
    "HOUR_MS",
    "LATE",
    "MINUTE_MS",
    "NO_TERMINAL",
    "QUARTER_MS",
    "RAW_COLUMNS",
    "TERMINAL_COLUMNS",
    "LabelRecord",
    "ReferenceVelocity",
    "TransactionView",
    "TxRecord",
    "VelocityBatch",
    "VelocityConfig",
    "VelocityResult",
    "VelocitySnapshot",
    "build_feature_matrix",
    "features_of",
    "haversine_km",
    "reference_features",
    "reference_result",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

FEATURE_NAMES: Final[tuple[str, ...]] = (
    "amount",
    "amount_log",
    "is_weekend",
    "is_night",
    "count_1m",
    "count_1h",
    "count_24h",
    "count_7d",
    "count_30d",
    "sum_1m",
    "sum_1h",
    "sum_24h",
    "sum_7d",
    "sum_30d",
    "avg_amount_7d",
    "avg_amount_30d",
    "amount_ratio_30d",
    "distinct_merchants_24h",
    "distinct_countries_24h",
    "distinct_devices_24h",
    "seconds_since_last",
    "travel_speed_kmh",
    "first_time_merchant",
    "terminal_count_1d",
    "terminal_count_7d",
    "terminal_count_30d",
    "terminal_risk_1d",
    "terminal_risk_7d",
    "terminal_risk_30d",
)
_F: Final = {name: i for i, name in enumerate(FEATURE_NAMES)}

MINUTE_MS: Final = 60_000
HOUR_MS: Final = 3_600_000
QUARTER_MS: Final = 6 * HOUR_MS  # the 7 d window's buckets
DAY_MS: Final = 86_400_000
# Redis keeps amount sums as integers in 1e-4 major units: exact (no float drift between the first
# application and a replay), and fine-grained enough for every ISO 4217 currency (exponent <= 4).
AMOUNT_SCALE_EXPONENT: Final = 4
AMOUNT_SCALE: Final = 10**AMOUNT_SCALE_EXPONENT
SECONDS_SINCE_LAST_CAP_S: Final = 30 * 86_400.0
MIN_PREVIOUS_AVERAGE: Final = 0.01
EARTH_RADIUS_KM: Final = 6371.0088
# The scripts write event times as 13 decimal digits and keep member kinds of a sorted set in
# score ranges of 1e13 ms: a time from year 2286 on would spill into the next kind. Ingest
# rejects such times long before.
MAX_EVENT_MS: Final = 10**13 - 1

# Result statuses (the first column of each half of a raw row).
APPLIED: Final = 0
DUPLICATE: Final = 1
LATE: Final = 2
UNKNOWN_ACCOUNT: Final = 3  # snapshot of an account the store has never seen
NO_TERMINAL: Final = -1  # the transaction has no terminal_id

ACCOUNT_COLUMNS: Final[tuple[str, ...]] = (
    "status",
    "count_1m",
    "sum_1m_scaled",
    "count_1h",
    "sum_1h_scaled",
    "count_24h",
    "sum_24h_scaled",
    "count_7d",
    "sum_7d_scaled",
    "count_30d",
    "sum_30d_scaled",
    "distinct_merchants_24h",
    "distinct_countries_24h",
    "distinct_devices_24h",
    "prev_event_ms",
    "prev_located_ms",
    "prev_latitude",
    "prev_longitude",
    "merchant_last_ms",
)
TERMINAL_COLUMNS: Final[tuple[str, ...]] = (
    "terminal_status",
    "terminal_count_1d",
    "terminal_count_7d",
    "terminal_count_30d",
    "terminal_fraud_1d",
    "terminal_fraud_7d",
    "terminal_fraud_30d",
)
RAW_COLUMNS: Final[tuple[str, ...]] = ACCOUNT_COLUMNS + TERMINAL_COLUMNS
N_ACCOUNT: Final = len(ACCOUNT_COLUMNS)
N_TERMINAL: Final = len(TERMINAL_COLUMNS)
_R: Final = {name: i for i, name in enumerate(RAW_COLUMNS)}
# Columns that hold a time, a coordinate or "none" (NaN) rather than an integer.
_OPTIONAL_COLUMNS: Final = frozenset(
    ("prev_event_ms", "prev_located_ms", "prev_latitude", "prev_longitude", "merchant_last_ms")
)
_FLOAT_COLUMNS: Final = frozenset(("prev_latitude", "prev_longitude"))

# Window k (1-based, as in the Lua scripts): (label, width in ms or in buckets, bucket size in
# ms or 0 for an exact window).
WINDOWS: Final[tuple[tuple[str, int, int], ...]] = (
    ("1m", MINUTE_MS, 0),
    ("1h", HOUR_MS, 0),
    ("24h", DAY_MS, 0),
    ("7d", 28, QUARTER_MS),
    ("30d", 30, DAY_MS),
)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class VelocityConfig:
    """Retention, caps and the label delay; every number here is part of the semantics.

    The Lua scripts are generated from these values, so two stores with different configs never
    share a script (and the reference takes the same object)."""

    late_tolerance_ms: int = 48 * HOUR_MS
    label_delay_ms: int = 7 * DAY_MS
    account_id_cap: int = 1024  # applied ids (and their results) kept per account
    account_late_cap: int = 256  # results of LATE transactions kept per account
    merchant_cap: int = 512
    country_cap: int = 64
    device_cap: int = 128
    terminal_id_cap: int = 4096
    terminal_late_cap: int = 1024
    label_cap: int = 4096  # fraud-labeled ids kept per terminal
    prune_every_ms: int = DAY_MS  # buckets and merchants are pruned this often (event time)
    index_prune_every_ms: int = HOUR_MS  # ids and stored results past retention, this often
    late_scan: int = 16  # an out-of-order transaction looks this far back for a location

    def __post_init__(self) -> None:
        if self.late_tolerance_ms < DAY_MS:
            # The exact windows (up to 24 h) are running totals over the transaction index,
            # which must therefore hold at least the last 24 h.
            raise ValueError(f"late_tolerance_ms must be at least {DAY_MS} (24 h)")
        if self.label_delay_ms < 0:
            raise ValueError("label_delay_ms must not be negative")
        for name in (
            "account_id_cap",
            "account_late_cap",
            "merchant_cap",
            "country_cap",
            "device_cap",
            "terminal_id_cap",
            "terminal_late_cap",
            "label_cap",
            "late_scan",
        ):
            value = getattr(self, name)
            if not 1 <= value <= 1_000_000:
                raise ValueError(f"{name} must be within [1, 1000000], got {value}")
        for name in ("prune_every_ms", "index_prune_every_ms"):
            if not MINUTE_MS <= getattr(self, name) <= DAY_MS:
                raise ValueError(f"{name} must be within [1 min, 1 d]")

    @classmethod
    def from_label_delay_s(cls, label_delay_s: int, **overrides: Any) -> VelocityConfig:
        return cls(label_delay_ms=label_delay_s * 1000, **overrides)

    @property
    def quarter_retention(self) -> int:
        """6 h buckets kept: 7 d plus the late tolerance, so an accepted late event's own 7 d
        window is complete."""
        return 28 + _ceil_div(self.late_tolerance_ms, QUARTER_MS) + 1

    @property
    def day_retention(self) -> int:
        return 30 + _ceil_div(self.late_tolerance_ms, DAY_MS) + 1

    @property
    def merchant_retention_ms(self) -> int:
        return 30 * DAY_MS + self.late_tolerance_ms

    @property
    def distinct_retention_ms(self) -> int:
        return DAY_MS + self.late_tolerance_ms

    @property
    def terminal_day_retention(self) -> int:
        return (
            30
            + _ceil_div(self.label_delay_ms, DAY_MS)
            + _ceil_div(self.late_tolerance_ms, DAY_MS)
            + 1
        )

    @property
    def ttl_refresh_ms(self) -> int:
        """Expiry is pushed back at most this often (event time): a PEXPIRE per key and
        transaction would be a fifth of the script's calls."""
        return 7 * DAY_MS

    @property
    def ttl_ms(self) -> int:
        """Wall-clock expiry of a dormant account's or terminal's keys (refreshed by writes at
        most every `ttl_refresh_ms`): longer than any retention plus that interval."""
        longest = max(self.merchant_retention_ms, self.terminal_day_retention * DAY_MS)
        return longest + self.ttl_refresh_ms + 2 * DAY_MS


DEFAULT_CONFIG: Final = VelocityConfig()


# Currency code as written on the wire -> its ISO 4217 exponent: `currency_exponent` strips and
# upper-cases on every call, and every transaction asks. Only known codes are kept, and at most
# _EXPONENT_MEMO_SIZE spellings of them, so odd input cannot grow it.
_EXPONENT_MEMO: Final[dict[str, int]] = {}
_EXPONENT_MEMO_SIZE: Final = 1024


def _exponent(currency: str) -> int:
    exponent = _EXPONENT_MEMO.get(currency)
    if exponent is None:
        try:
            exponent = currency_exponent(currency)
        except KeyError:
            # Ingest rejects unknown currencies; a record built by hand (tests, training files)
            # falls back to the most common exponent rather than failing the whole batch.
            return 2
        if len(_EXPONENT_MEMO) < _EXPONENT_MEMO_SIZE:
            _EXPONENT_MEMO[currency] = exponent
    return exponent


def _scaled_amount(units: int, currency: str) -> tuple[int, float]:
    """(amount in 1e-4 major units, amount in major units) of `units` minor units."""
    exponent = _exponent(currency)
    if exponent <= AMOUNT_SCALE_EXPONENT:
        scaled = units * 10 ** (AMOUNT_SCALE_EXPONENT - exponent)
    else:  # no ISO 4217 currency has more than 4 minor digits; truncate if one ever does
        scaled = units // 10 ** (exponent - AMOUNT_SCALE_EXPONENT)
    return scaled, units / 10**exponent


@dataclass(frozen=True, slots=True)
class TxRecord:
    """What the velocity code needs of a Transaction, already converted (see `from_proto`)."""

    transaction_id: str
    account_id: str
    event_ms: int
    amount_minor: int
    currency: str = "EUR"
    merchant_id: str = ""
    country: str = ""
    device_id: str = ""
    terminal_id: str = ""
    latitude: float | None = None
    longitude: float | None = None
    amount_scaled: int = field(init=False, repr=False, compare=False)
    amount: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        scaled, major = _scaled_amount(self.amount_minor, self.currency)
        object.__setattr__(self, "amount_scaled", scaled)
        object.__setattr__(self, "amount", major)
        if not 0 <= self.event_ms <= MAX_EVENT_MS:
            raise ValueError(f"event_ms {self.event_ms} is outside [0, 1e13)")
        lat, lon = self.latitude, self.longitude
        # A location is both coordinates, finite; anything else is "no location" (travel 0).
        if lat is None or lon is None or not (math.isfinite(lat) and math.isfinite(lon)):
            object.__setattr__(self, "latitude", None)
            object.__setattr__(self, "longitude", None)

    @property
    def located(self) -> bool:
        return self.latitude is not None

    @classmethod
    def from_proto(cls, tx: Any) -> TxRecord:
        """From a `fraud.v1.Transaction` (typed Any: generated code is not type-checked).

        The same checks and conversions as the constructor, written out so that the object is
        filled in directly: the scoring service makes one per transaction, and the frozen
        dataclass's `__init__` plus `__post_init__` cost twice as much."""
        ts = tx.event_time
        event_ms = ts.seconds * 1000 + ts.nanos // 1_000_000
        if not 0 <= event_ms <= MAX_EVENT_MS:
            raise ValueError(f"event_ms {event_ms} is outside [0, 1e13)")
        money = tx.amount
        units = money.units
        currency = money.currency
        scaled, major = _scaled_amount(units, currency)
        latitude = longitude = None
        if tx.HasField("latitude") and tx.HasField("longitude"):
            latitude, longitude = tx.latitude, tx.longitude
            # A location is both coordinates, finite; anything else is "no location".
            if not (_isfinite(latitude) and _isfinite(longitude)):
                latitude = longitude = None
        record = _new_object(cls)
        _set_attribute(record, "transaction_id", tx.transaction_id)
        _set_attribute(record, "account_id", tx.account_id)
        _set_attribute(record, "event_ms", event_ms)
        _set_attribute(record, "amount_minor", units)
        _set_attribute(record, "currency", currency)
        _set_attribute(record, "merchant_id", tx.merchant_id)
        _set_attribute(record, "country", tx.country)
        _set_attribute(record, "device_id", tx.device_id)
        _set_attribute(record, "terminal_id", tx.terminal_id)
        _set_attribute(record, "latitude", latitude)
        _set_attribute(record, "longitude", longitude)
        _set_attribute(record, "amount_scaled", scaled)
        _set_attribute(record, "amount", major)
        return record


_new_object = object.__new__
_set_attribute = object.__setattr__  # what a frozen dataclass's own __init__ uses
_isfinite = math.isfinite


@dataclass(frozen=True, slots=True)
class LabelRecord:
    """A fraud label as the terminal counters need it. `event_ms` is the labeled transaction's
    event time: fraud is booked on that day (the handbook's delayed window)."""

    transaction_id: str
    terminal_id: str
    is_fraud: bool
    event_ms: int

    @classmethod
    def from_proto(cls, label: Any) -> LabelRecord:
        """From a `fraud.v1.Label`. The transaction's event time is taken from `event_time` when
        the message has that field; otherwise `reported_at` stands in, which books fraud on the
        report day rather than the transaction day."""
        ts = label.reported_at
        descriptor = label.DESCRIPTOR.fields_by_name
        if "event_time" in descriptor and label.HasField("event_time"):
            ts = label.event_time
        return cls(
            transaction_id=label.transaction_id,
            terminal_id=label.terminal_id,
            is_fraud=bool(label.is_fraud),
            event_ms=max(0, min(MAX_EVENT_MS, ts.seconds * 1000 + ts.nanos // 1_000_000)),
        )


def _opt_int(value: float) -> int | None:
    return None if math.isnan(value) else int(value)


def _opt_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass(frozen=True, slots=True)
class VelocityResult:
    """The raw velocity numbers of one transaction, as the store returns them.

    Counts and sums include the transaction itself; sums are integers in 1e-4 major units
    (`AMOUNT_SCALE`). Times are event-time milliseconds; None means "none known"."""

    status: int
    count_1m: int
    sum_1m_scaled: int
    count_1h: int
    sum_1h_scaled: int
    count_24h: int
    sum_24h_scaled: int
    count_7d: int
    sum_7d_scaled: int
    count_30d: int
    sum_30d_scaled: int
    distinct_merchants_24h: int
    distinct_countries_24h: int
    distinct_devices_24h: int
    prev_event_ms: int | None
    prev_located_ms: int | None
    prev_latitude: float | None
    prev_longitude: float | None
    merchant_last_ms: int | None
    terminal_status: int = NO_TERMINAL
    terminal_count_1d: int = 0
    terminal_count_7d: int = 0
    terminal_count_30d: int = 0
    terminal_fraud_1d: int = 0
    terminal_fraud_7d: int = 0
    terminal_fraud_30d: int = 0

    @classmethod
    def from_row(cls, row: Sequence[float] | FloatArray) -> VelocityResult:
        values: dict[str, Any] = {}
        for name, value in zip(RAW_COLUMNS, row, strict=True):
            v = float(value)
            if name in _FLOAT_COLUMNS:
                values[name] = _opt_float(v)
            elif name in _OPTIONAL_COLUMNS:
                values[name] = _opt_int(v)
            else:
                values[name] = int(v)
        return cls(**values)

    def to_row(self) -> FloatArray:
        row = np.empty(len(RAW_COLUMNS), dtype=np.float64)
        for i, name in enumerate(RAW_COLUMNS):
            value = getattr(self, name)
            row[i] = math.nan if value is None else float(value)
        return row

    def account_values(self) -> tuple[float | None, ...]:
        """The account half without the status: what a replay must return unchanged (None for
        "none", so that tuples compare equal)."""
        return tuple(_opt_float(float(x)) for x in self.to_row()[1:N_ACCOUNT])

    def terminal_values(self) -> tuple[float | None, ...]:
        return tuple(_opt_float(float(x)) for x in self.to_row()[N_ACCOUNT + 1 :])


class VelocityBatch(Sequence[VelocityResult]):
    """The results of one batch: a (n, len(RAW_COLUMNS)) float64 matrix, viewed as a sequence of
    `VelocityResult`s. The scoring hot path hands `raw` to numpy and never builds the objects."""

    __slots__ = ("newest", "raw")

    def __init__(self, raw: FloatArray, newest: BoolArray | None = None) -> None:
        if raw.ndim != 2 or raw.shape[1] != len(RAW_COLUMNS):
            raise ValueError(f"raw must have shape (n, {len(RAW_COLUMNS)}), got {raw.shape}")
        if newest is not None and newest.shape != (raw.shape[0],):
            raise ValueError(f"newest must have shape ({raw.shape[0]},), got {newest.shape}")
        self.raw = raw
        # Per transaction, when the store reports it (apply_batch does): whether it was its
        # account's newest when the store saw it (no later transaction of the account had
        # been applied before it). Not a feature: the assessment store's fast path uses it.
        self.newest = newest

    def __len__(self) -> int:
        return int(self.raw.shape[0])

    @overload
    def __getitem__(self, index: int) -> VelocityResult: ...

    @overload
    def __getitem__(self, index: slice) -> VelocityBatch: ...

    def __getitem__(self, index: int | slice) -> VelocityResult | VelocityBatch:
        if isinstance(index, slice):
            return VelocityBatch(
                self.raw[index], None if self.newest is None else self.newest[index]
            )
        return VelocityResult.from_row(self.raw[index])

    def __iter__(self) -> Iterator[VelocityResult]:
        for i in range(len(self)):
            yield VelocityResult.from_row(self.raw[i])

    @property
    def statuses(self) -> IntArray:
        return self.raw[:, 0].astype(np.int64)

    @classmethod
    def concat(cls, batches: Sequence[VelocityBatch]) -> VelocityBatch:
        """The batches one after the other (`newest` only when every one has it)."""
        raw = np.vstack([b.raw for b in batches]) if batches else np.empty((0, len(RAW_COLUMNS)))
        flags = [b.newest for b in batches]
        newest = None
        if batches and all(f is not None for f in flags):
            newest = np.concatenate(cast(list[BoolArray], flags))
        return cls(raw, newest)

    @classmethod
    def from_results(cls, results: Iterable[VelocityResult]) -> VelocityBatch:
        rows = [r.to_row() for r in results]
        if not rows:
            return cls(np.empty((0, len(RAW_COLUMNS)), dtype=np.float64))
        return cls(np.vstack(rows))


@dataclass(frozen=True, slots=True)
class VelocitySnapshot:
    """An account's velocity as of `as_of_ms` (GetAccountRisk): windows end at `as_of_ms`, no
    hypothetical transaction is added. Amounts in major units."""

    account_id: str
    as_of_ms: int
    counts: Mapping[str, int]  # window ("1m", "1h", "24h", "7d", "30d") -> count
    sums: Mapping[str, float]
    distinct_merchants_24h: int
    distinct_countries_24h: int
    distinct_devices_24h: int
    last_event_ms: int | None  # newest transaction at or before as_of_ms
    seconds_since_last: float | None

    def average(self, window: str) -> float:
        count = self.counts[window]
        return self.sums[window] / count if count else 0.0

    @classmethod
    def from_row(cls, account_id: str, as_of_ms: int, row: Sequence[float]) -> VelocitySnapshot:
        labels = [w[0] for w in WINDOWS]
        counts = {w: int(row[1 + 2 * k]) for k, w in enumerate(labels)}
        sums = {w: row[2 + 2 * k] / AMOUNT_SCALE for k, w in enumerate(labels)}
        last = _opt_int(row[_R["prev_event_ms"]])
        return cls(
            account_id=account_id,
            as_of_ms=as_of_ms,
            counts=counts,
            sums=sums,
            distinct_merchants_24h=int(row[_R["distinct_merchants_24h"]]),
            distinct_countries_24h=int(row[_R["distinct_countries_24h"]]),
            distinct_devices_24h=int(row[_R["distinct_devices_24h"]]),
            last_event_ms=last,
            seconds_since_last=None if last is None else (as_of_ms - last) / 1000.0,
        )


@dataclass(frozen=True)
class TransactionView:
    """The per-transaction inputs of the feature maths, as columns (one numpy array each)."""

    amount: FloatArray  # major units
    amount_scaled: FloatArray  # 1e-4 major units, exact integers
    event_ms: IntArray
    latitude: FloatArray  # NaN when the transaction has no location
    longitude: FloatArray
    has_merchant: BoolArray

    def __len__(self) -> int:
        return int(self.amount.shape[0])

    @classmethod
    def from_records(cls, records: Sequence[TxRecord]) -> TransactionView:
        n = len(records)
        nan = math.nan
        return cls(
            amount=np.fromiter((r.amount for r in records), np.float64, n),
            amount_scaled=np.fromiter((r.amount_scaled for r in records), np.float64, n),
            event_ms=np.fromiter((r.event_ms for r in records), np.int64, n),
            latitude=np.fromiter(
                (nan if r.latitude is None else r.latitude for r in records), np.float64, n
            ),
            longitude=np.fromiter(
                (nan if r.longitude is None else r.longitude for r in records), np.float64, n
            ),
            has_merchant=np.fromiter((r.merchant_id != "" for r in records), np.bool_, n),
        )


def _raw_matrix(results: VelocityBatch | Sequence[VelocityResult] | FloatArray) -> FloatArray:
    if isinstance(results, VelocityBatch):
        return results.raw
    if isinstance(results, np.ndarray):
        return np.asarray(results, dtype=np.float64)
    return VelocityBatch.from_results(results).raw


def _haversine_np(lat1: FloatArray, lon1: FloatArray, lat2: FloatArray, lon2: FloatArray) -> Any:
    p1, p2 = np.radians(lat1), np.radians(lat2)
    dp, dl = p2 - p1, np.radians(lon2 - lon1)
    a = np.sin(dp / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def build_feature_matrix(
    transactions_view: TransactionView,
    velocity_results: VelocityBatch | Sequence[VelocityResult] | FloatArray,
) -> FloatArray:
    """The (n, len(FEATURE_NAMES)) float64 feature matrix of a batch, column per column."""
    view = transactions_view
    raw = _raw_matrix(velocity_results)
    n = len(view)
    if raw.shape != (n, len(RAW_COLUMNS)):
        raise ValueError(f"velocity results have shape {raw.shape}, expected ({n}, 26)")
    out = np.empty((n, len(FEATURE_NAMES)), dtype=np.float64)
    amount = view.amount
    t = view.event_ms
    tf = t.astype(np.float64)

    out[:, _F["amount"]] = amount
    out[:, _F["amount_log"]] = np.log1p(np.maximum(amount, 0.0))
    days = t // DAY_MS
    out[:, _F["is_weekend"]] = (days + 3) % 7 >= 5  # 1970-01-01 was a Thursday (weekday 3)
    out[:, _F["is_night"]] = (t // HOUR_MS) % 24 <= 6

    for label, _, _ in WINDOWS:
        out[:, _F[f"count_{label}"]] = raw[:, _R[f"count_{label}"]]
        out[:, _F[f"sum_{label}"]] = raw[:, _R[f"sum_{label}_scaled"]] / AMOUNT_SCALE
    for label in ("7d", "30d"):
        # Counts include the transaction itself, so they are >= 1; the floor only guards a
        # hand-made row of zeros.
        count = np.maximum(raw[:, _R[f"count_{label}"]], 1.0)
        out[:, _F[f"avg_amount_{label}"]] = out[:, _F[f"sum_{label}"]] / count

    prev_count = raw[:, _R["count_30d"]] - 1.0
    prev_sum = (raw[:, _R["sum_30d_scaled"]] - view.amount_scaled) / AMOUNT_SCALE
    prev_avg = np.maximum(prev_sum / np.maximum(prev_count, 1.0), MIN_PREVIOUS_AVERAGE)
    out[:, _F["amount_ratio_30d"]] = np.where(prev_count > 0, amount / prev_avg, 1.0)

    for name in ("distinct_merchants_24h", "distinct_countries_24h", "distinct_devices_24h"):
        out[:, _F[name]] = raw[:, _R[name]]

    prev = raw[:, _R["prev_event_ms"]]
    since = np.minimum((tf - prev) / 1000.0, SECONDS_SINCE_LAST_CAP_S)
    out[:, _F["seconds_since_last"]] = np.where(np.isnan(prev), SECONDS_SINCE_LAST_CAP_S, since)

    speed = np.zeros(n, dtype=np.float64)
    prev_loc = raw[:, _R["prev_located_ms"]]
    moving = ~np.isnan(view.latitude) & ~np.isnan(prev_loc)
    if moving.any():
        km = _haversine_np(
            raw[moving, _R["prev_latitude"]],
            raw[moving, _R["prev_longitude"]],
            view.latitude[moving],
            view.longitude[moving],
        )
        elapsed_s = np.maximum(np.abs(tf[moving] - prev_loc[moving]) / 1000.0, 1.0)
        speed[moving] = km / (elapsed_s / 3600.0)
    out[:, _F["travel_speed_kmh"]] = speed

    merchant_last = raw[:, _R["merchant_last_ms"]]
    seen = merchant_last > tf - 30 * DAY_MS  # NaN compares False: never seen
    out[:, _F["first_time_merchant"]] = view.has_merchant & ~seen

    for label in ("1d", "7d", "30d"):
        count = raw[:, _R[f"terminal_count_{label}"]]
        fraud = raw[:, _R[f"terminal_fraud_{label}"]]
        out[:, _F[f"terminal_count_{label}"]] = count
        risk = np.clip(fraud / np.maximum(count, 1.0), 0.0, 1.0)
        out[:, _F[f"terminal_risk_{label}"]] = np.where(count > 0, risk, 0.0)
    return out


# --------------------------------------------------------------------------------------------
# Scalar maths and the reference model. Written independently of the numpy code above (plain
# loops, the math module) so that the tests compare two implementations, not one with itself.


def haversine_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle distance in km on a sphere of the Earth's mean radius."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(math.sqrt(min(1.0, max(0.0, a))))


def features_of(tx: TxRecord, result: VelocityResult) -> dict[str, float]:
    """The features of one transaction from its raw result, in scalar Python."""
    t = tx.event_ms
    hour = (t // HOUR_MS) % 24
    weekday = (t // DAY_MS + 3) % 7
    f: dict[str, float] = {
        "amount": tx.amount,
        "amount_log": math.log1p(max(tx.amount, 0.0)),
        "is_weekend": float(weekday >= 5),
        "is_night": float(hour <= 6),
    }
    for label, _, _ in WINDOWS:
        f[f"count_{label}"] = float(getattr(result, f"count_{label}"))
        f[f"sum_{label}"] = getattr(result, f"sum_{label}_scaled") / AMOUNT_SCALE
    f["avg_amount_7d"] = f["sum_7d"] / max(result.count_7d, 1)
    f["avg_amount_30d"] = f["sum_30d"] / max(result.count_30d, 1)
    others = result.count_30d - 1
    if others > 0:
        previous_average = (result.sum_30d_scaled - tx.amount_scaled) / AMOUNT_SCALE / others
        f["amount_ratio_30d"] = tx.amount / max(previous_average, MIN_PREVIOUS_AVERAGE)
    else:
        f["amount_ratio_30d"] = 1.0
    f["distinct_merchants_24h"] = float(result.distinct_merchants_24h)
    f["distinct_countries_24h"] = float(result.distinct_countries_24h)
    f["distinct_devices_24h"] = float(result.distinct_devices_24h)
    if result.prev_event_ms is None:
        f["seconds_since_last"] = SECONDS_SINCE_LAST_CAP_S
    else:
        f["seconds_since_last"] = min((t - result.prev_event_ms) / 1000.0, SECONDS_SINCE_LAST_CAP_S)
    speed = 0.0
    if (
        tx.latitude is not None
        and tx.longitude is not None
        and result.prev_located_ms is not None
        and result.prev_latitude is not None
        and result.prev_longitude is not None
    ):
        km = haversine_km(result.prev_latitude, result.prev_longitude, tx.latitude, tx.longitude)
        elapsed_s = max(abs(t - result.prev_located_ms) / 1000.0, 1.0)
        speed = km / (elapsed_s / 3600.0)
    f["travel_speed_kmh"] = speed
    seen = result.merchant_last_ms is not None and result.merchant_last_ms > t - 30 * DAY_MS
    f["first_time_merchant"] = float(tx.merchant_id != "" and not seen)
    for label in ("1d", "7d", "30d"):
        count = getattr(result, f"terminal_count_{label}")
        fraud = getattr(result, f"terminal_fraud_{label}")
        f[f"terminal_count_{label}"] = float(count)
        f[f"terminal_risk_{label}"] = min(1.0, max(0.0, fraud / count)) if count > 0 else 0.0
    return {name: f[name] for name in FEATURE_NAMES}


def _tx_member(tx: TxRecord) -> bytes:
    """The start of an applied transaction's member in the account's transaction index (amount,
    id length, id; the stored result follows): what orders transactions of equal time."""
    tid = tx.transaction_id.encode()
    return struct.pack("<dH", float(tx.amount_scaled), len(tid)) + tid


def _terminal_member(tx: TxRecord) -> bytes:
    tid = tx.transaction_id.encode()
    return struct.pack("<H", len(tid)) + tid


@dataclass
class _Entry:
    """One retained id of a capped, time-ordered index (the store's sorted-set dimensions)."""

    score: int
    member: bytes


class _CappedIndex:
    """An index of members by time with "evict the oldest (score, member) over the cap"."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.entries: dict[str, _Entry] = {}

    def expire(self, cutoff: int) -> list[str]:
        """Drop the entries with score <= cutoff; return their keys."""
        gone = [k for k, e in self.entries.items() if e.score <= cutoff]
        for k in gone:
            del self.entries[k]
        return gone

    def evict_over_cap(self) -> list[tuple[str, _Entry]]:
        evicted: list[tuple[str, _Entry]] = []
        for _ in range(len(self.entries)):  # bounded: one eviction per entry at most
            if len(self.entries) <= self.cap:
                break
            key = min(self.entries, key=lambda k: (self.entries[k].score, self.entries[k].member))
            evicted.append((key, self.entries.pop(key)))
        return evicted


@dataclass
class _Stored:
    key: int  # the retention time: the event time (applied) or the watermark then (late)
    values: tuple[float, ...]


def _applied_key(tx: TxRecord) -> str:
    # The store finds an applied transaction by its event time and then its id, so an id reused
    # with another time is another transaction.
    return f"{tx.event_ms}\x00{tx.transaction_id}"


class _EntityModel:
    """What accounts and terminals share: watermark, horizon, applied ids with their stored
    results (capped, by event time), results of late transactions (capped, by watermark)."""

    def __init__(self, config: VelocityConfig, id_cap: int, late_cap: int) -> None:
        self.cfg = config
        self.applied: list[TxRecord] = []
        self.wm: int | None = None
        self.floor: int | None = None
        self.index = _CappedIndex(id_cap)  # applied key -> (event ms, member)
        self.index_tx: dict[str, TxRecord] = {}
        self.applied_results: dict[str, _Stored] = {}
        self.late_index = _CappedIndex(late_cap)  # txid -> (watermark then, member)
        self.late_results: dict[str, _Stored] = {}

    def member(self, tx: TxRecord) -> bytes:
        raise NotImplementedError

    def values(self, t: int, own: TxRecord | None) -> tuple[float, ...]:
        raise NotImplementedError

    def on_applied(self, tx: TxRecord, wm1: int) -> None:
        """Entity-specific writes of an applied transaction (after the id bookkeeping)."""

    def lookup(self, tx: TxRecord) -> tuple[int, tuple[float, ...]] | None:
        wm = self.wm
        if wm is None or tx.event_ms > wm:
            return None  # a replay carries its original time, which is <= the watermark
        horizon = wm - self.cfg.late_tolerance_ms
        stored = self.applied_results.get(_applied_key(tx))
        if stored is not None and stored.key > horizon:
            return DUPLICATE, stored.values
        stored = self.late_results.get(tx.transaction_id)
        if stored is not None and stored.key > horizon:
            return LATE, stored.values
        return None

    def status_of(self, t: int) -> int:
        if self.wm is None:
            return APPLIED
        if t <= self.wm - self.cfg.late_tolerance_ms or (
            self.floor is not None and t <= self.floor
        ):
            return LATE
        return APPLIED

    def process(self, tx: TxRecord, write: bool) -> tuple[int, tuple[float, ...]]:
        found = self.lookup(tx)
        if found is not None:
            return found
        t = tx.event_ms
        status = self.status_of(t)
        values = self.values(t, tx)
        if not write:
            return status, values
        late = self.cfg.late_tolerance_ms
        if status == LATE:
            assert self.wm is not None
            self.late_results[tx.transaction_id] = _Stored(self.wm, values)
            self.late_index.expire(self.wm - late)
            member = f"x{tx.transaction_id}".encode()
            self.late_index.entries[tx.transaction_id] = _Entry(self.wm, member)
            for key, _ in self.late_index.evict_over_cap():
                self.late_results.pop(key, None)
            return status, values

        wm1 = t if self.wm is None else max(self.wm, t)
        self.wm = wm1
        self.applied.append(tx)
        for key in self.index.expire(wm1 - late):
            self.index_tx.pop(key, None)
            self.applied_results.pop(key, None)
        for key in self.late_index.expire(wm1 - late):
            self.late_results.pop(key, None)
        key = _applied_key(tx)
        self.index.entries[key] = _Entry(t, self.member(tx))
        self.index_tx[key] = tx
        self.applied_results[key] = _Stored(t, values)
        for gone, entry in self.index.evict_over_cap():
            self.index_tx.pop(gone, None)
            self.applied_results.pop(gone, None)
            self.floor = entry.score if self.floor is None else max(self.floor, entry.score)
        self.on_applied(tx, wm1)
        return status, values


class _AccountModel(_EntityModel):
    def __init__(self, config: VelocityConfig) -> None:
        super().__init__(config, config.account_id_cap, config.account_late_cap)
        self.dims = (
            _CappedIndex(config.merchant_cap),
            _CappedIndex(config.country_cap),
            _CappedIndex(config.device_cap),
        )
        self.dim_retention = (
            config.merchant_retention_ms,
            config.distinct_retention_ms,
            config.distinct_retention_ms,
        )
        self.location: tuple[int, float, float] | None = None  # newest located (ms, lat, lon)

    def member(self, tx: TxRecord) -> bytes:
        return _tx_member(tx)

    @staticmethod
    def _dim_keys(tx: TxRecord) -> tuple[str, str, str]:
        return tx.merchant_id, tx.country, tx.device_id

    def values(self, t: int, own: TxRecord | None) -> tuple[float, ...]:
        """The 18 account values of a transaction at t "as if added" (own=None: a snapshot)."""
        cfg = self.cfg
        late = cfg.late_tolerance_ms
        wm1 = t if self.wm is None else max(self.wm, t)
        nan = math.nan
        sums: list[float] = []
        for _, width, bucket in WINDOWS:
            if bucket == 0:
                # exact window over the retained transaction index
                lo = max(t - width, wm1 - late)
                members = [
                    self.index_tx[k] for k, e in self.index.entries.items() if lo < e.score <= t
                ]
            else:
                retention = cfg.quarter_retention if bucket == QUARTER_MS else cfg.day_retention
                bt, bw = t // bucket, wm1 // bucket
                members = [
                    h
                    for h in self.applied
                    if bt - width < h.event_ms // bucket <= bt
                    and h.event_ms // bucket > bw - retention
                ]
            c = len(members) + (1 if own is not None else 0)
            s = sum(h.amount_scaled for h in members) + (own.amount_scaled if own else 0)
            sums += [float(c), float(s)]

        distinct: list[float] = []
        own_keys = self._dim_keys(own) if own is not None else ("", "", "")
        for j, (dim, retention) in enumerate(zip(self.dims, self.dim_retention, strict=True)):
            lo = max(t - DAY_MS, wm1 - retention)
            live = {k for k, e in dim.entries.items() if e.score > lo}
            if own_keys[j]:
                live.add(own_keys[j])
            distinct.append(float(len(live)))
        merchant_last = nan
        if own is not None and own.merchant_id in self.dims[0].entries:
            score = self.dims[0].entries[own.merchant_id].score
            if score > wm1 - cfg.merchant_retention_ms:
                merchant_last = float(score)

        prev = prev_loc = prev_lat = prev_lon = nan
        if self.wm is not None:
            if t >= self.wm:
                prev = float(self.wm)
                if self.location is not None:
                    prev_loc, prev_lat, prev_lon = (float(x) for x in self.location)
            else:
                lo = wm1 - late
                candidates = sorted(
                    ((e.score, e.member, k) for k, e in self.index.entries.items()),
                    reverse=True,
                )
                candidates = [c for c in candidates if lo < c[0] <= t][: cfg.late_scan]
                if candidates:
                    prev = float(candidates[0][0])
                for score, _, key in candidates:
                    h = self.index_tx[key]
                    if h.latitude is not None and h.longitude is not None:
                        prev_loc, prev_lat, prev_lon = float(score), h.latitude, h.longitude
                        break
        return (*sums, *distinct, prev, prev_loc, prev_lat, prev_lon, merchant_last)

    def on_applied(self, tx: TxRecord, wm1: int) -> None:
        t = tx.event_ms
        lat, lon = tx.latitude, tx.longitude
        newest = self.location is None or t >= self.location[0]
        if lat is not None and lon is not None and newest:
            self.location = (t, lat, lon)
        prefixes = ("m", "c", "d")
        for j, (dim, retention) in enumerate(zip(self.dims, self.dim_retention, strict=True)):
            member_key = self._dim_keys(tx)[j]
            dim.expire(wm1 - retention)
            if not member_key:
                continue
            existing = dim.entries.get(member_key)
            if existing is None:
                dim.entries[member_key] = _Entry(t, f"{prefixes[j]}{member_key}".encode())
                dim.evict_over_cap()
            else:
                existing.score = max(existing.score, t)


class _TerminalModel(_EntityModel):
    def __init__(self, config: VelocityConfig) -> None:
        super().__init__(config, config.terminal_id_cap, config.terminal_late_cap)
        self.fraud = _CappedIndex(config.label_cap)
        self.label_floor: int | None = None
        self.fraud_days: dict[int, int] = {}

    def member(self, tx: TxRecord) -> bytes:
        return _terminal_member(tx)

    def _retained_day(self, day: int, wm: int | None) -> bool:
        return wm is None or day > wm // DAY_MS - self.cfg.terminal_day_retention

    def values(self, t: int, own: TxRecord | None) -> tuple[float, ...]:
        # the current transaction is never in its own delayed window
        wm1 = t if self.wm is None else max(self.wm, t)
        d = (t - self.cfg.label_delay_ms) // DAY_MS
        counts: list[float] = []
        frauds: list[float] = []
        for width in (1, 7, 30):

            def in_window(day: int, width: int = width) -> bool:
                return d - width < day <= d and self._retained_day(day, wm1)

            counts.append(float(sum(1 for h in self.applied if in_window(h.event_ms // DAY_MS))))
            frauds.append(float(sum(c for day, c in self.fraud_days.items() if in_window(day))))
        return (*counts, *frauds)

    def on_applied(self, tx: TxRecord, wm1: int) -> None:
        cut = wm1 // DAY_MS - self.cfg.terminal_day_retention
        self.fraud.expire((cut + 1) * DAY_MS - 1)

    def label(self, label: LabelRecord) -> bool:
        day = label.event_ms // DAY_MS
        if not self._retained_day(day, self.wm):
            return False
        if self.label_floor is not None and label.event_ms <= self.label_floor:
            return False
        if self.wm is not None:
            cut = self.wm // DAY_MS - self.cfg.terminal_day_retention
            self.fraud.expire((cut + 1) * DAY_MS - 1)
        known = label.transaction_id in self.fraud.entries
        if label.is_fraud and not known:
            member = f"f{label.transaction_id}".encode()
            self.fraud.entries[label.transaction_id] = _Entry(label.event_ms, member)
            self.fraud_days[day] = self.fraud_days.get(day, 0) + 1
            for _, entry in self.fraud.evict_over_cap():
                floor = self.label_floor
                self.label_floor = entry.score if floor is None else max(floor, entry.score)
            return True
        if not label.is_fraud and known:
            old_day = self.fraud.entries.pop(label.transaction_id).score // DAY_MS
            self.fraud_days[old_day] = self.fraud_days.get(old_day, 0) - 1
            return True
        return False


class ReferenceVelocity:
    """The velocity store's semantics as a plain in-memory model (slow: brute-force windows).

    Feed it the same transactions and labels in the same order as the store; `apply` and `peek`
    return exactly the result the store returns. Used by the tests and to validate a training
    replay."""

    def __init__(self, config: VelocityConfig = DEFAULT_CONFIG) -> None:
        self.config = config
        self._accounts: dict[str, _AccountModel] = {}
        self._terminals: dict[str, _TerminalModel] = {}

    def _account(self, account_id: str) -> _AccountModel:
        model = self._accounts.get(account_id)
        if model is None:
            model = self._accounts[account_id] = _AccountModel(self.config)
        return model

    def _terminal(self, terminal_id: str) -> _TerminalModel:
        model = self._terminals.get(terminal_id)
        if model is None:
            model = self._terminals[terminal_id] = _TerminalModel(self.config)
        return model

    def _process(self, tx: TxRecord, write: bool) -> VelocityResult:
        status, values = self._account(tx.account_id).process(tx, write)
        t_status, t_values = NO_TERMINAL, (0.0,) * (N_TERMINAL - 1)
        if tx.terminal_id:
            t_status, t_values = self._terminal(tx.terminal_id).process(tx, write)
        return VelocityResult.from_row([float(status), *values, float(t_status), *t_values])

    def apply(self, tx: TxRecord) -> VelocityResult:
        return self._process(tx, write=True)

    def peek(self, tx: TxRecord) -> VelocityResult:
        return self._process(tx, write=False)

    def apply_label(self, label: LabelRecord) -> bool:
        if not label.terminal_id:
            return False
        return self._terminal(label.terminal_id).label(label)

    def snapshot_row(self, account_id: str, now_ms: int) -> tuple[float, ...] | None:
        model = self._accounts.get(account_id)
        if model is None or model.wm is None:
            return None
        return (float(APPLIED), *model.values(now_ms, None))


def reference_result(
    history: Sequence[TxRecord | LabelRecord],
    tx: TxRecord,
    config: VelocityConfig = DEFAULT_CONFIG,
) -> VelocityResult:
    """What the store returns for `tx` after `history` (every transaction and label given to it
    before, in order: duplicates and late ones included), recomputed from the list."""
    model = ReferenceVelocity(config)
    for item in history:
        if isinstance(item, LabelRecord):
            model.apply_label(item)
        else:
            model.apply(item)
    return model.peek(tx)


def reference_features(
    history: Sequence[TxRecord | LabelRecord],
    tx: TxRecord,
    config: VelocityConfig = DEFAULT_CONFIG,
) -> dict[str, float]:
    """The features of `tx` after `history`, recomputed from the list (see `reference_result`)."""
    return features_of(tx, reference_result(history, tx, config))
