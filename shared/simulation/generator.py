"""A seeded, streaming generator of card transactions with known fraud.

Built from the description of the simulator in the "Reproducible Machine Learning for Credit Card
Fraud Detection" handbook (Le Borgne, Bontempi et al.), not from its code:

- customers and terminals uniform on a 100 x 100 grid; a customer uses only the terminals within
  `radius` of home (customers with none make no transactions);
- per customer: mean amount U[5, 100] EUR, sd half the mean, mean transactions per day U[0, 4];
- per day: a Poisson count per customer, times normal around noon (sd 20,000 s; draws outside the
  day dropped), amounts normal (a negative draw redrawn uniform in [0, 2 x mean]), the terminal
  uniform among those in range.

Fraud, with `fraud_scenario` naming the one that made a transaction fraudulent (3 > 2 > 1 when
several apply, as in the handbook, where each scenario overwrites the earlier ones):

1. HIGH_AMOUNT: amount > 220 EUR.
2. COMPROMISED_TERMINAL: each day 2 random terminals are compromised for 28 days (that day
   included); every transaction there is fraud.
3. COMPROMISED_CUSTOMER: each day 3 random customers are compromised for 14 days; each of their
   transactions in that window is, with probability 1/3, inflated 5x and fraud. (The handbook
   samples exactly a third of the window; a stream cannot see the window ahead, so we draw per
   transaction.)
4. CARD_TESTING (ours): a stolen card is tested with a burst of 8-20 e-commerce payments of
   0.50-3.00 EUR at distinct online merchants within 1-3 minutes, from a device and IPs that are
   not the customer's. A Poisson number of bursts per day (mean 0.5: most days have none).
5. IMPOSSIBLE_TRAVEL (ours): a cloned card is used at a terminal in a far country (US, BR, JP,
   NG, TH) 5 minutes to 2 hours after one of the customer's genuine card-present payments at
   home, 1-3 times. A Poisson number of episodes per day (mean 1).

Geography: the grid is laid over the Meuse-Rhine region (Maastricht, Liege, Aachen) with one grid
unit = 1 km, so the radius of 5 is 5 km and speeds in km/h are meaningful: a customer's genuine
terminals are at most 10 km apart, a far-travel fraud is thousands of km away. The country of a
card-present payment is the terminal's (BE, NL or DE by straight-line approximations of the
borders), so most customers shop in one country and those near a border in two. A share of genuine
payments (10%) is e-commerce at online merchants that have no location (latitude/longitude None),
so that the e-commerce channel alone does not give card testing away; `SimulationConfig.handbook()`
turns that and scenarios 4 and 5 off.

Reproducibility: one `np.random.Generator` seeded from `seed` draws the world, then each day in
the same order, so the same config gives the same stream, and the first days of a run do not
depend on `n_days`. Transactions are yielded day by day in event-time order; transaction ids
(`tx-0000000000`, ...) follow that order.

The transaction's `is_fraud` and `fraud_scenario` are ground truth for labels and evaluation; a
publisher must not put them on the transaction topic. Labels: `label_for`, `labels` and
`interleave_labels` release every transaction's label (fraud or not, as the handbook's delayed
terminal-risk feature assumes) `label_delay` after its event time.
"""

from __future__ import annotations

import json
import math
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, timedelta
from enum import IntEnum
from os import PathLike
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from shared.errors import ConfigError, InputError

__all__ = [
    "CHANNEL_CARD_PRESENT",
    "CHANNEL_ECOMMERCE",
    "DEFAULT_LABEL_DELAY",
    "GRID_KM_PER_UNIT",
    "GRID_SIZE",
    "LABEL_SOURCE",
    "FraudScenario",
    "SimDay",
    "SimLabel",
    "SimTransaction",
    "SimulationConfig",
    "days",
    "generate",
    "grid_country",
    "grid_to_latlon",
    "interleave_labels",
    "label_for",
    "labels",
    "read_jsonl",
    "simulate",
    "transaction_from_dict",
    "transaction_to_dict",
    "write_jsonl",
]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

CHANNEL_CARD_PRESENT: Final = "card_present"
CHANNEL_ECOMMERCE: Final = "ecommerce"
LABEL_SOURCE: Final = "simulator"
DEFAULT_LABEL_DELAY: Final = timedelta(days=7)
CURRENCY: Final = "EUR"

GRID_SIZE: Final = 100.0
SECONDS_PER_DAY: Final = 86_400

# One grid unit is 1 km over the Meuse-Rhine tri-border region; the grid's south-west corner is
# at (50.30 N, 5.29 E). Longitude degrees are scaled at the grid's middle latitude, which is
# exact enough over 100 km for speeds within a few percent.
GRID_KM_PER_UNIT: Final = 1.0
_ORIGIN_LAT: Final = 50.30
_ORIGIN_LON: Final = 5.29
_KM_PER_DEG_LAT: Final = 111.32
_KM_PER_DEG_LON: Final = 111.32 * math.cos(math.radians(_ORIGIN_LAT + 0.45))

# Far-away cities for impossible travel: (country, latitude, longitude). The nearest (Lagos) is
# about 4,900 km from the grid, so even the latest allowed use abroad implies > 2,000 km/h.
_FAR_CITIES: Final = (
    ("US", 40.7128, -74.0060),  # New York
    ("BR", -23.5505, -46.6333),  # Sao Paulo
    ("JP", 35.6762, 139.6503),  # Tokyo
    ("NG", 6.5244, 3.3792),  # Lagos
    ("TH", 13.7563, 100.5018),  # Bangkok
)

# Merchant category codes (ISO 18245) with rough shares of card-present payments.
_PHYSICAL_MCCS: Final = (
    ("5411", 0.30),  # grocery stores, supermarkets
    ("5812", 0.12),  # restaurants
    ("5814", 0.12),  # fast food
    ("5541", 0.10),  # service stations
    ("5912", 0.07),  # drug stores, pharmacies
    ("5311", 0.06),  # department stores
    ("5999", 0.06),  # miscellaneous retail
    ("5651", 0.05),  # family clothing
    ("5732", 0.04),  # electronics
    ("4121", 0.03),  # taxis
    ("5942", 0.03),  # book stores
    ("7011", 0.02),  # hotels
)
# Online merchants: digital goods and donations are where stolen cards get tested.
_ONLINE_MCCS: Final = (
    ("5815", 0.15),  # digital goods: media
    ("5816", 0.10),  # digital goods: games
    ("5818", 0.10),  # digital goods: large merchants
    ("4899", 0.15),  # streaming, cable
    ("5399", 0.20),  # general merchandise
    ("5969", 0.10),  # direct marketing
    ("5732", 0.10),  # electronics
    ("8398", 0.10),  # charitable organisations
)
_ONLINE_COUNTRIES: Final = (
    ("NL", 0.30),
    ("DE", 0.30),
    ("BE", 0.20),
    ("IE", 0.10),
    ("LU", 0.05),
    ("US", 0.05),
)

_FRAUD_DEVICE_SPACE: Final = 10_000_000
# Fraudsters' IPs come from the documentation ranges (RFC 5737), customers' from 10/8.
_CARD_TESTING_NET: Final = "203.0.113"
_TRAVEL_NET: Final = "198.51.100"
_FAR_JITTER_DEG: Final = 0.05
_TRAVEL_NEXT_GAP_S: Final = (120, 1800)


class FraudScenario(IntEnum):
    GENUINE = 0
    HIGH_AMOUNT = 1
    COMPROMISED_TERMINAL = 2
    COMPROMISED_CUSTOMER = 3
    CARD_TESTING = 4
    IMPOSSIBLE_TRAVEL = 5


@dataclass(frozen=True, slots=True)
class SimTransaction:
    """One simulated payment, with the fields of the Kafka `Transaction` plus the ground truth."""

    transaction_id: str
    account_id: str
    card_id: str
    merchant_id: str
    merchant_category: str
    terminal_id: str
    amount_minor: int
    currency: str
    event_time: datetime
    country: str
    latitude: float | None
    longitude: float | None
    channel: str
    device_id: str
    ip_address: str
    is_fraud: bool
    fraud_scenario: int


@dataclass(frozen=True, slots=True)
class SimLabel:
    """The label the simulator publishes for a transaction once its delay has passed."""

    transaction_id: str
    account_id: str
    terminal_id: str
    is_fraud: bool
    source: str
    reported_at: datetime
    event_time: datetime | None = None  # the labeled transaction's event time


@dataclass(frozen=True)
class SimDay:
    """One simulated day: its transactions in event-time order, and the compromises in force."""

    index: int
    day: date
    transactions: tuple[SimTransaction, ...]
    compromised_terminals: frozenset[str]
    compromised_accounts: frozenset[str]


def _check_range(name: str, bounds: tuple[int, int], minimum: int) -> None:
    low, high = bounds
    if not minimum <= low <= high:
        raise ConfigError(f"{name}={bounds} must be (low, high) with {minimum} <= low <= high")


@dataclass(frozen=True)
class SimulationConfig:
    """Everything that shapes a simulated stream. Defaults are the handbook's, plus ours (4, 5)."""

    seed: int = 0
    n_customers: int = 5000
    n_terminals: int = 10000
    n_days: int = 183
    start: datetime = datetime(2018, 4, 1, tzinfo=UTC)
    radius: float = 5.0
    # Scenario 1; None turns it off.
    fraud_amount_threshold_minor: int | None = 22_000
    # Scenario 2; 0 per day turns it off.
    compromised_terminals_per_day: int = 2
    compromised_terminal_days: int = 28
    # Scenario 3; 0 per day turns it off.
    compromised_customers_per_day: int = 3
    compromised_customer_days: int = 14
    compromised_customer_fraud_share: float = 1 / 3
    compromised_customer_amount_factor: int = 5
    # Scenario 4 (card testing); a Poisson mean of bursts per day, 0 turns it off.
    card_testing_bursts_per_day: float = 0.5
    card_testing_tx_range: tuple[int, int] = (8, 20)
    card_testing_seconds_range: tuple[int, int] = (60, 180)
    card_testing_amount_minor_range: tuple[int, int] = (50, 300)
    # Scenario 5 (impossible travel); a Poisson mean of episodes per day, 0 turns it off.
    impossible_travel_per_day: float = 1.0
    impossible_travel_tx_range: tuple[int, int] = (1, 3)
    impossible_travel_gap_seconds_range: tuple[int, int] = (300, 7200)
    # Share of genuine payments made online (no location); 0 is the handbook's world.
    ecommerce_share: float = 0.1
    n_online_merchants: int = 300
    n_foreign_terminals_per_city: int = 20
    label_delay: timedelta = DEFAULT_LABEL_DELAY

    def __post_init__(self) -> None:
        for name in ("n_customers", "n_terminals", "n_online_merchants"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        for name in (
            "n_days",
            "compromised_terminals_per_day",
            "compromised_terminal_days",
            "compromised_customers_per_day",
            "compromised_customer_days",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}={getattr(self, name)} must not be negative")
        if self.n_foreign_terminals_per_city < 1:
            raise ConfigError("n_foreign_terminals_per_city must be at least 1")
        if self.start.tzinfo is None:
            raise ConfigError(f"start={self.start.isoformat()} must be timezone-aware")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ConfigError(f"radius={self.radius} must be a positive number of grid units")
        if self.fraud_amount_threshold_minor is not None and self.fraud_amount_threshold_minor < 1:
            raise ConfigError("fraud_amount_threshold_minor must be positive or None")
        for name in ("compromised_customer_fraud_share", "ecommerce_share"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"{name}={value} must be within [0, 1]")
        if self.compromised_customer_amount_factor < 1:
            raise ConfigError("compromised_customer_amount_factor must be at least 1")
        for name in ("card_testing_bursts_per_day", "impossible_travel_per_day"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name}={value} must be a finite rate >= 0")
        _check_range("card_testing_tx_range", self.card_testing_tx_range, 1)
        _check_range("card_testing_seconds_range", self.card_testing_seconds_range, 1)
        if self.card_testing_seconds_range[1] >= SECONDS_PER_DAY:
            raise ConfigError("card_testing_seconds_range must stay within a day")
        _check_range("card_testing_amount_minor_range", self.card_testing_amount_minor_range, 1)
        _check_range("impossible_travel_tx_range", self.impossible_travel_tx_range, 1)
        _check_range(
            "impossible_travel_gap_seconds_range", self.impossible_travel_gap_seconds_range, 1
        )
        if self.label_delay < timedelta(0):
            raise ConfigError("label_delay must not be negative")
        # Days start at midnight in UTC; normalising here keeps event times in UTC throughout.
        object.__setattr__(self, "start", self.start.astimezone(UTC))

    @classmethod
    def handbook(cls, **overrides: Any) -> SimulationConfig:
        """The handbook's world: scenarios 1-3 only, every payment card-present."""
        settings: dict[str, Any] = {
            "card_testing_bursts_per_day": 0.0,
            "impossible_travel_per_day": 0.0,
            "ecommerce_share": 0.0,
        }
        settings.update(overrides)
        return cls(**settings)


def grid_to_latlon(x: FloatArray, y: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Grid coordinates (x east, y north, in units) to latitude and longitude in degrees."""
    lat = _ORIGIN_LAT + y * GRID_KM_PER_UNIT / _KM_PER_DEG_LAT
    lon = _ORIGIN_LON + x * GRID_KM_PER_UNIT / _KM_PER_DEG_LON
    return lat, lon


def grid_country(x: FloatArray, y: FloatArray) -> npt.NDArray[np.str_]:
    """The country at grid points: straight-line stand-ins for the real borders (Germany east of
    Aachen, the Dutch strip of South Limburg north of Maastricht, Belgium west and south)."""
    germany = ((x >= 53) & (y >= 17)) | (x >= 71)
    netherlands = ~germany & (x >= 28) & (y >= 51)
    return np.where(germany, "DE", np.where(netherlands, "NL", "BE"))


@dataclass(frozen=True, eq=False)
class _World:
    """Customers and merchants, drawn once. Merchants are indexed grid terminals first, then
    online merchants, then foreign terminals by city; per-merchant strings are lists so that
    building records is plain indexing."""

    mean_amount: FloatArray
    sd_amount: FloatArray
    tx_per_day: FloatArray
    has_terminal: BoolArray
    near_start: IntArray
    near_count: IntArray
    near_terminals: IntArray
    n_grid: int
    n_online: int
    foreign: tuple[IntArray, ...]
    account_ids: list[str]
    card_ids: list[str]
    device_ids: list[str]
    ip_addresses: list[str]
    merchant_ids: list[str]
    terminal_ids: list[str]
    mccs: list[str]
    countries: list[str]
    latitudes: list[float | None]
    longitudes: list[float | None]
    channels: list[str]


def _weighted_choice(
    rng: np.random.Generator, table: tuple[tuple[str, float], ...], size: int
) -> list[str]:
    values = [value for value, _ in table]
    weights = np.array([weight for _, weight in table])
    picks = rng.choice(len(values), size=size, p=weights / weights.sum())
    return [values[i] for i in picks.tolist()]


def _terminals_in_range(
    cust_xy: FloatArray, term_xy: FloatArray, radius: float
) -> tuple[IntArray, IntArray, IntArray]:
    """CSR lists (start, count, terminals) of the terminals strictly within `radius` of each
    customer, in ascending terminal id. Customers are taken in chunks sorted by x, each compared
    only with the terminals in its x band, so the 5,000 x 10,000 distance matrix is never built."""
    by_x = np.argsort(term_xy[:, 0], kind="stable")
    term_x, term_y = term_xy[by_x, 0], term_xy[by_x, 1]
    cust_by_x = np.argsort(cust_xy[:, 0], kind="stable")
    customers: list[IntArray] = []
    terminals: list[IntArray] = []
    for low in range(0, cust_by_x.size, 256):
        ids = cust_by_x[low : low + 256]
        x, y = cust_xy[ids, 0], cust_xy[ids, 1]
        first = int(np.searchsorted(term_x, x.min() - radius))
        last = int(np.searchsorted(term_x, x.max() + radius, side="right"))
        dx = x[:, None] - term_x[None, first:last]
        dy = y[:, None] - term_y[None, first:last]
        rows, cols = np.nonzero(dx * dx + dy * dy < radius * radius)
        customers.append(ids[rows].astype(np.int64))
        terminals.append(by_x[first + cols].astype(np.int64))
    customer = np.concatenate(customers)
    terminal = np.concatenate(terminals)
    terminal = terminal[np.lexsort((terminal, customer))]
    count = np.bincount(customer, minlength=cust_xy.shape[0]).astype(np.int64)
    start = np.concatenate(([0], np.cumsum(count)[:-1])).astype(np.int64)
    return start, count, terminal


def _build_world(cfg: SimulationConfig, rng: np.random.Generator) -> _World:
    n_cust, n_term, n_online = cfg.n_customers, cfg.n_terminals, cfg.n_online_merchants
    cust_xy = rng.uniform(0.0, GRID_SIZE, size=(n_cust, 2))
    mean_amount = rng.uniform(5.0, 100.0, size=n_cust)
    tx_per_day = rng.uniform(0.0, 4.0, size=n_cust)
    term_xy = rng.uniform(0.0, GRID_SIZE, size=(n_term, 2))
    near_start, near_count, near_terminals = _terminals_in_range(cust_xy, term_xy, cfg.radius)

    grid_lat, grid_lon = grid_to_latlon(term_xy[:, 0], term_xy[:, 1])
    grid_countries = grid_country(term_xy[:, 0], term_xy[:, 1]).tolist()
    grid_mccs = _weighted_choice(rng, _PHYSICAL_MCCS, n_term)
    online_mccs = _weighted_choice(rng, _ONLINE_MCCS, n_online)
    online_countries = _weighted_choice(rng, _ONLINE_COUNTRIES, n_online)

    per_city = cfg.n_foreign_terminals_per_city
    n_foreign = per_city * len(_FAR_CITIES)
    city_of = np.repeat(np.arange(len(_FAR_CITIES)), per_city)
    far_lat = np.array([c[1] for c in _FAR_CITIES])[city_of] + rng.uniform(
        -_FAR_JITTER_DEG, _FAR_JITTER_DEG, n_foreign
    )
    far_lon = np.array([c[2] for c in _FAR_CITIES])[city_of] + rng.uniform(
        -_FAR_JITTER_DEG, _FAR_JITTER_DEG, n_foreign
    )
    far_mccs = _weighted_choice(rng, _PHYSICAL_MCCS, n_foreign)
    first_foreign = n_term + n_online
    foreign = tuple(
        np.arange(first_foreign + i * per_city, first_foreign + (i + 1) * per_city, dtype=np.int64)
        for i in range(len(_FAR_CITIES))
    )

    n_merchants = first_foreign + n_foreign
    no_location: list[float | None] = [None] * n_online
    return _World(
        mean_amount=mean_amount,
        sd_amount=mean_amount / 2.0,
        tx_per_day=tx_per_day,
        has_terminal=near_count > 0,
        near_start=near_start,
        near_count=near_count,
        near_terminals=near_terminals,
        n_grid=n_term,
        n_online=n_online,
        foreign=foreign,
        account_ids=[f"acct-{c:05d}" for c in range(n_cust)],
        card_ids=[f"card-{c:05d}" for c in range(n_cust)],
        device_ids=[f"dev-{c:05d}" for c in range(n_cust)],
        ip_addresses=[f"10.{c >> 16 & 255}.{c >> 8 & 255}.{c & 255}" for c in range(n_cust)],
        merchant_ids=[f"merch-{m:05d}" for m in range(n_merchants)],
        terminal_ids=[f"term-{m:05d}" for m in range(n_merchants)],
        mccs=grid_mccs + online_mccs + far_mccs,
        countries=grid_countries + online_countries + [_FAR_CITIES[c][0] for c in city_of],
        latitudes=[round(v, 6) for v in grid_lat.tolist()]
        + no_location
        + [round(v, 6) for v in far_lat.tolist()],
        longitudes=[round(v, 6) for v in grid_lon.tolist()]
        + no_location
        + [round(v, 6) for v in far_lon.tolist()],
        channels=[CHANNEL_CARD_PRESENT] * n_term
        + [CHANNEL_ECOMMERCE] * n_online
        + [CHANNEL_CARD_PRESENT] * n_foreign,
    )


@dataclass(frozen=True, eq=False)
class _Rows:
    """A day's transactions as columns, before ordering. Device and IP codes of -1 mean the
    customer's own; other values are fraudsters' (see `_device`, `_ip`)."""

    second: IntArray
    customer: IntArray
    merchant: IntArray
    amount_minor: IntArray
    scenario: IntArray
    device: IntArray
    ip: IntArray


def _concat(parts: list[_Rows]) -> _Rows:
    return _Rows(*(np.concatenate([getattr(p, f.name) for p in parts]) for f in fields(_Rows)))


def _genuine(
    cfg: SimulationConfig,
    world: _World,
    rng: np.random.Generator,
    day: int,
    terminal_until: IntArray,
    customer_until: IntArray,
) -> _Rows:
    # Every customer draws a count, even those without terminals, so that one customer's
    # reachability never shifts the random stream of the others.
    counts = rng.poisson(world.tx_per_day)
    counts[~world.has_terminal] = 0
    customer = np.repeat(np.arange(cfg.n_customers, dtype=np.int64), counts)
    when = rng.normal(SECONDS_PER_DAY / 2, 20_000.0, size=customer.size)
    inside = (when > 0) & (when < SECONDS_PER_DAY)
    customer, second = customer[inside], when[inside].astype(np.int64)
    n = customer.size

    mean = world.mean_amount[customer]
    amount = rng.normal(mean, world.sd_amount[customer])
    negative = amount < 0
    amount[negative] = rng.uniform(0.0, 2.0 * mean[negative])
    # A draw of a fraction of a cent still is a payment: at least one minor unit.
    amount_minor = np.maximum(np.rint(amount * 100.0).astype(np.int64), 1)

    pick = (rng.random(n) * world.near_count[customer]).astype(np.int64)
    merchant = world.near_terminals[world.near_start[customer] + pick]
    online = rng.random(n) < cfg.ecommerce_share
    merchant[online] = world.n_grid + rng.integers(0, world.n_online, size=int(online.sum()))

    at_compromised = ~online & (terminal_until[np.where(online, 0, merchant)] > day)
    inflated = (customer_until[customer] > day) & (
        rng.random(n) < cfg.compromised_customer_fraud_share
    )
    amount_minor[inflated] *= cfg.compromised_customer_amount_factor
    threshold = cfg.fraud_amount_threshold_minor
    high = amount_minor > threshold if threshold is not None else np.zeros(n, dtype=np.bool_)
    scenario = np.select(
        [inflated, at_compromised, high],
        [
            FraudScenario.COMPROMISED_CUSTOMER,
            FraudScenario.COMPROMISED_TERMINAL,
            FraudScenario.HIGH_AMOUNT,
        ],
        FraudScenario.GENUINE,
    ).astype(np.int64)
    own = np.full(n, -1, dtype=np.int64)
    return _Rows(second, customer, merchant, amount_minor, scenario, own, own)


def _card_testing(cfg: SimulationConfig, world: _World, rng: np.random.Generator) -> _Rows:
    parts: list[_Rows] = []
    n_bursts = min(int(rng.poisson(cfg.card_testing_bursts_per_day)), cfg.n_customers)
    for victim in rng.choice(cfg.n_customers, size=n_bursts, replace=False).tolist():
        n = int(rng.integers(cfg.card_testing_tx_range[0], cfg.card_testing_tx_range[1] + 1))
        low, high = cfg.card_testing_seconds_range
        duration = int(rng.integers(low, high + 1))
        start = int(rng.integers(0, SECONDS_PER_DAY - duration))
        second = start + np.sort(rng.integers(0, duration + 1, size=n))
        merchant = world.n_grid + rng.choice(world.n_online, size=n, replace=world.n_online < n)
        low, high = cfg.card_testing_amount_minor_range
        amount = rng.integers(low, high + 1, size=n)
        # One bot device per burst, a fresh proxy IP per attempt.
        device = np.full(n, rng.integers(_FRAUD_DEVICE_SPACE), dtype=np.int64)
        ip = rng.integers(1, 255, size=n)
        parts.append(
            _Rows(
                second.astype(np.int64),
                np.full(n, victim, dtype=np.int64),
                merchant.astype(np.int64),
                amount.astype(np.int64),
                np.full(n, FraudScenario.CARD_TESTING, dtype=np.int64),
                device,
                ip.astype(np.int64),
            )
        )
    return _concat(parts) if parts else _empty_rows()


def _impossible_travel(
    cfg: SimulationConfig, world: _World, rng: np.random.Generator, genuine: _Rows
) -> _Rows:
    parts: list[_Rows] = []
    n_episodes = int(rng.poisson(cfg.impossible_travel_per_day))
    present = np.flatnonzero(genuine.merchant < world.n_grid)
    candidates = np.unique(genuine.customer[present])
    chosen = rng.choice(candidates, size=min(n_episodes, candidates.size), replace=False)
    for victim in chosen.tolist():
        theirs = present[genuine.customer[present] == victim]
        anchor = int(theirs[rng.integers(theirs.size)])
        low, high = cfg.impossible_travel_tx_range
        n = int(rng.integers(low, high + 1))
        low, high = cfg.impossible_travel_gap_seconds_range
        gaps = np.concatenate(
            (
                [rng.integers(low, high + 1)],
                rng.integers(_TRAVEL_NEXT_GAP_S[0], _TRAVEL_NEXT_GAP_S[1] + 1, size=n - 1),
            )
        )
        second = genuine.second[anchor] + np.cumsum(gaps)
        city = int(rng.integers(len(_FAR_CITIES)))
        merchant = rng.choice(world.foreign[city], size=n)
        # Fraudsters abroad spend more than the customer usually does.
        mean = world.mean_amount[victim]
        amount = np.rint(mean * rng.uniform(1.0, 4.0, size=n) * 100.0).astype(np.int64)
        device = np.full(n, rng.integers(_FRAUD_DEVICE_SPACE), dtype=np.int64)
        ip = rng.integers(1, 255, size=n) + 1000
        # Uses that would fall on the next day are dropped: a day is generated, ordered and
        # yielded as a whole, and the episode's first use is what makes it impossible travel.
        today = second < SECONDS_PER_DAY
        parts.append(
            _Rows(
                second[today].astype(np.int64),
                np.full(int(today.sum()), victim, dtype=np.int64),
                merchant[today].astype(np.int64),
                amount[today],
                np.full(int(today.sum()), FraudScenario.IMPOSSIBLE_TRAVEL, dtype=np.int64),
                device[today],
                ip[today].astype(np.int64),
            )
        )
    return _concat(parts) if parts else _empty_rows()


def _empty_rows() -> _Rows:
    empty = np.zeros(0, dtype=np.int64)
    return _Rows(empty, empty, empty, empty, empty, empty, empty)


def _ip(code: int, own: str) -> str:
    if code < 0:
        return own
    if code >= 1000:
        return f"{_TRAVEL_NET}.{code - 1000}"
    return f"{_CARD_TESTING_NET}.{code}"


def _records(
    world: _World, rows: _Rows, day_start: datetime, first_seq: int
) -> list[SimTransaction]:
    order = np.argsort(rows.second, kind="stable")
    w = world
    out: list[SimTransaction] = []
    append = out.append
    columns = zip(
        rows.second[order].tolist(),
        rows.customer[order].tolist(),
        rows.merchant[order].tolist(),
        rows.amount_minor[order].tolist(),
        rows.scenario[order].tolist(),
        rows.device[order].tolist(),
        rows.ip[order].tolist(),
        strict=True,
    )
    for seq, (second, c, m, amount, scenario, device, ip) in enumerate(columns, first_seq):
        append(
            SimTransaction(
                f"tx-{seq:010d}",
                w.account_ids[c],
                w.card_ids[c],
                w.merchant_ids[m],
                w.mccs[m],
                w.terminal_ids[m],
                amount,
                CURRENCY,
                day_start + timedelta(seconds=second),
                w.countries[m],
                w.latitudes[m],
                w.longitudes[m],
                w.channels[m],
                w.device_ids[c] if device < 0 else f"dev-f{device:07d}",
                _ip(ip, w.ip_addresses[c]),
                scenario != 0,
                scenario,
            )
        )
    return out


def simulate(config: SimulationConfig) -> Iterator[SimDay]:
    """The simulated days, one at a time: only the world and the current day are in memory."""
    rng = np.random.default_rng(config.seed)
    world = _build_world(config, rng)
    terminal_until = np.zeros(config.n_terminals, dtype=np.int64)
    customer_until = np.zeros(config.n_customers, dtype=np.int64)
    seq = 0
    for day in range(config.n_days):
        # Compromises drawn today take effect today, as in the handbook.
        k = min(config.compromised_terminals_per_day, config.n_terminals)
        new = rng.choice(config.n_terminals, size=k, replace=False)
        terminal_until[new] = np.maximum(
            terminal_until[new], day + config.compromised_terminal_days
        )
        k = min(config.compromised_customers_per_day, config.n_customers)
        new = rng.choice(config.n_customers, size=k, replace=False)
        customer_until[new] = np.maximum(
            customer_until[new], day + config.compromised_customer_days
        )

        genuine = _genuine(config, world, rng, day, terminal_until, customer_until)
        testing = _card_testing(config, world, rng)
        travel = _impossible_travel(config, world, rng, genuine)
        day_start = config.start + timedelta(days=day)
        records = _records(world, _concat([genuine, testing, travel]), day_start, seq)
        seq += len(records)
        yield SimDay(
            index=day,
            day=day_start.date(),
            transactions=tuple(records),
            compromised_terminals=frozenset(
                world.terminal_ids[t] for t in np.flatnonzero(terminal_until > day).tolist()
            ),
            compromised_accounts=frozenset(
                world.account_ids[c] for c in np.flatnonzero(customer_until > day).tolist()
            ),
        )


def days(config: SimulationConfig) -> Iterator[tuple[date, list[SimTransaction]]]:
    """Each simulated day's date and transactions in event-time order."""
    for sim_day in simulate(config):
        yield sim_day.day, list(sim_day.transactions)


def generate(config: SimulationConfig) -> Iterator[SimTransaction]:
    """All simulated transactions in event-time order, generated a day at a time."""
    for sim_day in simulate(config):
        yield from sim_day.transactions


def label_for(tx: SimTransaction, delay: timedelta = DEFAULT_LABEL_DELAY) -> SimLabel:
    """The label of `tx`, reported `delay` after the payment."""
    return SimLabel(
        transaction_id=tx.transaction_id,
        account_id=tx.account_id,
        terminal_id=tx.terminal_id,
        is_fraud=tx.is_fraud,
        source=LABEL_SOURCE,
        reported_at=tx.event_time + delay,
        event_time=tx.event_time,
    )


def labels(
    stream: Iterable[SimTransaction], delay: timedelta = DEFAULT_LABEL_DELAY
) -> Iterator[tuple[datetime, SimLabel]]:
    """(release time, label) for every transaction; in release order since the delay is fixed
    and the stream is in event-time order."""
    for tx in stream:
        label = label_for(tx, delay)
        yield label.reported_at, label


def interleave_labels(
    stream: Iterable[SimTransaction], delay: timedelta = DEFAULT_LABEL_DELAY
) -> Iterator[tuple[datetime, SimTransaction | SimLabel]]:
    """Transactions and their labels merged into one stream ordered by (simulated) time, for a
    publisher that paces both on one clock. A label due at the same instant as a transaction
    comes first. Labels still pending when the transactions end are flushed at the end. Holds
    `delay` worth of labels in memory (about 70,000 for the default world and 7 days)."""
    pending: deque[SimLabel] = deque()
    for tx in stream:
        while pending and pending[0].reported_at <= tx.event_time:
            label = pending.popleft()
            yield label.reported_at, label
        yield tx.event_time, tx
        pending.append(label_for(tx, delay))
    for label in pending:
        yield label.reported_at, label


_STR_FIELDS: Final = (
    "transaction_id",
    "account_id",
    "card_id",
    "merchant_id",
    "merchant_category",
    "terminal_id",
    "currency",
    "country",
    "channel",
    "device_id",
    "ip_address",
)
_FIELD_NAMES: Final = tuple(f.name for f in fields(SimTransaction))


def transaction_to_dict(tx: SimTransaction) -> dict[str, Any]:
    """JSON-ready dict: the dataclass field names, event_time as ISO-8601 with its UTC offset."""
    record: dict[str, Any] = {name: getattr(tx, name) for name in _FIELD_NAMES}
    record["event_time"] = tx.event_time.isoformat()
    return record


def _bad(field: str, message: str) -> InputError:
    return InputError("BAD_SIM_RECORD", f"{field}: {message}", field)


def transaction_from_dict(record: dict[str, Any]) -> SimTransaction:
    """Inverse of `transaction_to_dict`; raises InputError naming the first bad field."""
    missing = [name for name in _FIELD_NAMES if name not in record]
    if missing:
        raise _bad(missing[0], "missing")
    for name in _STR_FIELDS:
        if not isinstance(record[name], str):
            raise _bad(name, f"expected a string, got {record[name]!r}")
    for name in ("amount_minor", "fraud_scenario"):
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise _bad(name, f"expected an integer, got {value!r}")
    if record["amount_minor"] < 1:
        raise _bad("amount_minor", f"must be positive, got {record['amount_minor']}")
    if record["fraud_scenario"] not in set(FraudScenario):
        raise _bad("fraud_scenario", f"unknown scenario {record['fraud_scenario']}")
    if not isinstance(record["is_fraud"], bool):
        raise _bad("is_fraud", f"expected a boolean, got {record['is_fraud']!r}")
    coords: dict[str, float | None] = {}
    for name in ("latitude", "longitude"):
        value = record[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise _bad(name, f"expected a number or null, got {value!r}")
        coords[name] = None if value is None else float(value)
    try:
        event_time = datetime.fromisoformat(record["event_time"])
    except (TypeError, ValueError):
        raise _bad("event_time", f"not an ISO-8601 time: {record['event_time']!r}") from None
    if event_time.tzinfo is None:
        raise _bad("event_time", f"needs a UTC offset: {record['event_time']!r}")
    return SimTransaction(
        transaction_id=record["transaction_id"],
        account_id=record["account_id"],
        card_id=record["card_id"],
        merchant_id=record["merchant_id"],
        merchant_category=record["merchant_category"],
        terminal_id=record["terminal_id"],
        amount_minor=record["amount_minor"],
        currency=record["currency"],
        event_time=event_time.astimezone(UTC),
        country=record["country"],
        latitude=coords["latitude"],
        longitude=coords["longitude"],
        channel=record["channel"],
        device_id=record["device_id"],
        ip_address=record["ip_address"],
        is_fraud=record["is_fraud"],
        fraud_scenario=record["fraud_scenario"],
    )


def write_jsonl(stream: Iterable[SimTransaction], path: str | PathLike[str]) -> int:
    """Write one JSON object per line; returns the number written. Streams: the whole run never
    needs to be in memory."""
    count = 0
    with Path(path).open("w", encoding="utf-8") as out:
        for tx in stream:
            out.write(json.dumps(transaction_to_dict(tx), separators=(",", ":")))
            out.write("\n")
            count += 1
    return count


def read_jsonl(path: str | PathLike[str]) -> Iterator[SimTransaction]:
    """Read a file written by `write_jsonl`, lazily. Blank lines are skipped; a bad line raises
    InputError whose message starts with the file and line number."""
    with Path(path).open(encoding="utf-8") as source:
        for number, line in enumerate(source, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise _bad("", "a line must be a JSON object")
                yield transaction_from_dict(record)
            except json.JSONDecodeError as e:
                raise InputError("BAD_SIM_RECORD", f"{path}:{number}: not JSON: {e}") from None
            except InputError as e:
                raise InputError(e.code, f"{path}:{number}: {e.message}", e.field) from None
