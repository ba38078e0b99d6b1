"""A seeded synthetic transaction stream with labelled fraud, for training, tests and the demo.

Real card data cannot be shipped, so the platform trains and demonstrates on a simulation whose
fraud is learnable from exactly the signals `models.features` computes: balance drained, a place
never seen, a terminal with reported fraud, amounts far above the customer's mean, bursts of
activity. Legitimate behaviour overlaps each signal a little (travel, large purchases, low
balances) so no single feature decides. Beside those, the three fixed rules of the fraud-detection
literature's simulator (a card payment above a threshold, a terminal compromised for 28 days, a
customer's card compromised for 14 days with inflated amounts), so that the literature's baseline
is measured on the kinds of fraud it was built for.

Everything is drawn from `numpy.random.default_rng(seed)` in a fixed order (the literature's
scenarios from a second generator of the same seed, so that adding them left the other scenarios'
draws as they were), so the same arguments give byte-identical tables. Balances are simulated in
integer cents over each customer's merged (legitimate + fraudulent) events in time order, so the
balance recomputed from the emitted stream alone (opening credit first) never goes below zero.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from models.schema import CHANNELS, KINDS, LABEL_SCHEMA, TIMESTAMP, TRANSACTION_SCHEMA

FRAUD_SCENARIOS: tuple[str, ...] = (
    "low_balance_drain",
    "new_location",
    "compromised_terminal",
    "card_not_present",
    "card_testing",
    "blocked_card",
    # The three scenarios of the literature's simulator (Le Borgne et al., "Reproducible machine
    # learning for credit card fraud detection", ch. 3), so the backtest's comparison with the
    # literature's baseline is on the kinds of fraud that baseline was designed for.
    "amount_over_threshold",
    "compromised_terminal_28d",
    "compromised_customer",
)
(
    _DRAIN, _NEW_LOCATION, _TERMINAL, _CNP, _TESTING, _BLOCKED, _OVER_THRESHOLD, _TERMINAL_28D,
    _CUSTOMER,
) = range(len(FRAUD_SCENARIOS))  # fmt: skip
_LEGIT = -1
# Scenarios that label the customer's own card payments (the literature's convention: a skimmed
# terminal's or a compromised card's transactions are the fraud). A card block declines them like
# any of the customer's payments; the fraudster's own attempts (the other scenarios) go through.
_OWN_PAYMENTS = (_LEGIT, _TERMINAL, _OVER_THRESHOLD, _TERMINAL_28D, _CUSTOMER)

_US = 1_000_000
_MINUTE = 60 * _US
_HOUR = 3600 * _US
_DAY = 86_400 * _US
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# What the bank's core system blocked, and when: a card ("card") or the whole account
# ("account", a freeze). During a block the customer's own debits of that kind are declined, so
# the stream has none; `models.accounts` turns blocks into the accounts table's changes.
BLOCK_KINDS: tuple[str, ...] = ("card", "account")
BLOCK_REASONS: tuple[str, ...] = ("fraud_reported", "lost", "compliance_hold")
BLOCK_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("blocks", pa.string(), nullable=False),  # one of BLOCK_KINDS
        pa.field("reason", pa.string(), nullable=False),  # one of BLOCK_REASONS
        pa.field("start_at", TIMESTAMP, nullable=False),
        pa.field("end_at", TIMESTAMP, nullable=False),  # may be after the period
    ]
)

_ATM, _POS, _ONLINE, _WIRE = (CHANNELS.index(c) for c in ("atm", "pos", "online", "wire"))
_DEBIT, _CREDIT = KINDS.index("debit"), KINDS.index("credit")

# How the balance step treats an event: a credit; a legitimate debit (shrunk or skipped when the
# balance cannot cover it); a fraudulent debit (capped at the balance); a drain (a share of it);
# a debit that goes through whole or not at all (declined when the balance cannot cover it).
_RULE_CREDIT, _RULE_LEGIT, _RULE_FRAUD, _RULE_DRAIN, _RULE_WHOLE = range(5)

# Legitimate behaviour. Channel shares are indexed like CHANNELS (atm, pos, online, wire).
_CHANNEL_MIX = np.array([0.12, 0.55, 0.25, 0.08])
# Mean amount of each channel relative to the customer's amount scale (see `_legit_debits`).
_CHANNEL_MEAN = np.array(
    [
        2.5 * math.exp(0.5**2 / 2),
        math.exp(0.7**2 / 2),
        1.2 * math.exp(0.8**2 / 2),
        6 * math.exp(0.6**2 / 2),
    ]
)
# Share of transactions per hour of day (UTC): quiet nights, a lunch and an evening peak.
_HOUR_WEIGHTS = np.array(
    [
        *(0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 1.0, 1.5, 1.8, 2.0, 2.2),  # 00-11h
        *(2.6, 2.4, 2.0, 2.0, 2.2, 2.5, 2.8, 2.6, 2.0, 1.5, 0.9, 0.5),  # 12-23h
    ]
)
_HOUR_P = _HOUR_WEIGHTS / _HOUR_WEIGHTS.sum()
_HOME_POS = 6  # at most this many POS terminals near home
_HOME_ATM = 2
_FAVOURITE_ONLINE = 4
_TRANSFERS_PER_DAY = 1 / 25  # occasional incoming transfers
_SHRINK_SHARE = 0.4  # share of unaffordable legit debits shrunk to fit (the rest are skipped)

# Fraud incidents per customer-day (at least one incident of each scenario is always drawn).
_DRAIN_RATE = 0.0017
_NEW_LOCATION_RATE = 0.0015
_CNP_RATE = 0.0004
_TESTING_RATE = 0.0005
# A drain empties a balance of _DRAIN_MIN.._DRAIN_MAX cents (what a thief can take at an ATM).
_DRAIN_MIN, _DRAIN_MAX = 2_000, 150_000
# ... of a balance that is low for its owner: at most this share of their usual (median) balance.
_DRAIN_LOW = 0.5
# Compromised terminals per in-person-terminal-day.
_TERMINAL_RATE = 1 / 6_000
# Reporting delay: log-normal, median 4 days; a few take ~3 weeks.
_REPORT_MEDIAN_DAYS = 4.0
_REPORT_SIGMA = 0.7
# After the first fraud on a card is reported, the bank blocks it 5-60 minutes later and issues a
# new one 3-7 days after that. The customer's own card debits stop meanwhile; the fraudster, who
# does not know, retries the stolen card a few times within 2 days (`blocked_card`).
_BLOCK_DELAY_MINUTES = (5, 60)
_BLOCK_DAYS = (3, 7)
_RETRY_SHARE = 0.3  # of blocked cards, retried (at least one card)
_RETRY_DOLLARS = 40.0  # median retry amount (log-normal), capped at what the balance allows
_LOST_CARD_SHARE = 0.01  # of customers: card reported lost, blocked, replaced 2-10 days later
_LOST_DAYS = (2, 10)
_HOLD_SHARE = 0.005  # of customers: a compliance hold freezes the account for 1-5 days
_HOLD_DAYS = (1, 5)

# The literature's scenarios. Its simulator (5,000 customers, 10,000 terminals, amounts with a
# customer mean of 5-100) labels fraud by three fixed rules; the same rules here, at about half
# its rates so the overall fraud rate stays near 1 % (the literature's is 0.8 % with only these):
# - amount_over_threshold: every card payment (ATM, POS, online debit) above a fixed amount is
#   fraud. The literature's 220 sits above ~99.9 % of its amounts; amounts here have a heavier
#   tail (wealthier customers, ATM withdrawals), so the threshold is the amount with about the
#   same share above it. Wire transfers are not card payments and are left alone.
OVER_THRESHOLD_DOLLARS = 600.0
# - compromised_terminal_28d: each day, about this many of the ATM, POS and online terminals
#   (the literature: 2 of 10,000 a day) are compromised; every payment there during the 28 days
#   from the start of that day is fraud.
_TERMINAL_28D_RATE = 1 / 10_000  # per terminal-day
TERMINAL_28D_DAYS = 28
# - compromised_customer: each day, about this many customers (the literature: 3 of 5,000) have
#   their card details stolen; for the 14 days from the start of that day, a third of their card
#   payments are fraud with their amount multiplied by 5 (declined whole if the balance cannot
#   cover it).
_CUSTOMER_RATE = 3 / 10_000  # per customer-day
CUSTOMER_DAYS = 14
CUSTOMER_SHARE = 1 / 3
CUSTOMER_FACTOR = 5
# Their draws come from a generator of their own (seeded with the seed and this), so the seed's
# other scenarios are drawn exactly as before they existed.
_LITERATURE_STREAM = 12


@dataclass(frozen=True)
class Simulation:
    """A simulated stream and its fraud labels, ready to produce to Kinesis or train on."""

    transactions: pa.Table  # exactly TRANSACTION_SCHEMA, sorted by event_time
    labels: pa.Table  # exactly LABEL_SCHEMA, one row per fraudulent transaction
    # Cards blocked and accounts frozen (BLOCK_SCHEMA): core-banking facts, not in the stream.
    blocks: pa.Table = dataclasses.field(default_factory=lambda: BLOCK_SCHEMA.empty_table())


@dataclass(frozen=True)
class _World:
    """Terminals and the grid of location cells the in-person ones stand on."""

    grid: int
    channel: np.ndarray  # channel code per terminal
    cell: np.ndarray  # location cell per terminal, -1 for online merchants and wire
    atm: np.ndarray  # terminal indices of each type
    pos: np.ndarray
    online: np.ndarray
    wire: np.ndarray


@dataclass(frozen=True)
class _Customers:
    """Per-customer habits; every array has one row per customer."""

    xy: np.ndarray  # (n, 2) home position on the grid
    home_pos: np.ndarray  # (n, _HOME_POS) nearest POS terminals, nearest first
    n_home_pos: np.ndarray
    home_atm: np.ndarray  # (n, _HOME_ATM)
    n_home_atm: np.ndarray
    favourite_online: np.ndarray  # (n, _FAVOURITE_ONLINE)
    bank: np.ndarray  # wire terminal of the customer's bank
    opening: np.ndarray  # opening balance, cents
    period: np.ndarray  # salary period in days
    first_pay: np.ndarray  # day of the first salary
    salary: np.ndarray  # cents
    rate: np.ndarray  # legitimate debits per day
    scale: np.ndarray  # amount scale
    mix: np.ndarray  # (n, 4) cumulative channel shares
    travel: np.ndarray  # chance an in-person debit is at a random place


class _Events:
    """Columns of candidate events, appended block by block."""

    FIELDS = ("cust", "time", "cents", "kind", "channel", "terminal", "rule", "param", "scenario")

    def __init__(self) -> None:
        self.parts: dict[str, list[np.ndarray]] = {f: [] for f in self.FIELDS}

    def add(
        self,
        cust: np.ndarray,
        time: np.ndarray,
        cents: np.ndarray | int,
        kind: int,
        channel: np.ndarray | int,
        terminal: np.ndarray,
        rule: int,
        param: np.ndarray | float = 0.0,
        scenario: int = _LEGIT,
    ) -> None:
        n = len(cust)
        values = {
            "cust": cust,
            "time": time,
            "cents": cents,
            "kind": kind,
            "channel": channel,
            "terminal": terminal,
            "rule": rule,
            "param": param,
            "scenario": scenario,
        }
        for name, value in values.items():
            dtype = np.float64 if name == "param" else np.int64
            arr = np.broadcast_to(np.asarray(value, dtype=dtype), (n,))
            self.parts[name].append(np.array(arr, dtype=dtype))

    def build(self) -> dict[str, np.ndarray]:
        return {name: np.concatenate(parts) for name, parts in self.parts.items()}


def _micros(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("start must be time-zone aware (UTC)")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


def _to_cents(dollars: np.ndarray) -> np.ndarray:
    return np.maximum(np.rint(dollars * 100), 1).astype(np.int64)


def _daily_times(rng: np.random.Generator, t0: int, days: np.ndarray) -> np.ndarray:
    """Times on the given days (offsets from t0) following the daily activity pattern."""
    hours = rng.choice(24, size=len(days), p=_HOUR_P)
    return t0 + days * _DAY + hours * _HOUR + rng.integers(0, _HOUR, size=len(days))


def _nearest(points: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    """Indices (into targets) of the k nearest targets to each point, nearest first."""
    k = min(k, len(targets))
    out = np.empty((len(points), k), dtype=np.int64)
    for lo in range(0, len(points), 512):
        chunk = points[lo : lo + 512]
        d = ((chunk[:, None, :] - targets[None, :, :]) ** 2).sum(axis=2)
        part = np.argpartition(d, k - 1, axis=1)[:, :k] if k < len(targets) else None
        if part is None:
            part = np.broadcast_to(np.arange(len(targets)), d.shape)
        dk = np.take_along_axis(d, part, axis=1)
        out[lo : lo + len(chunk)] = np.take_along_axis(part, np.argsort(dk, axis=1), axis=1)
    return out


def _make_world(rng: np.random.Generator, terminals: int) -> _World:
    n_wire = max(1, round(0.02 * terminals))
    n_online = max(2, round(0.18 * terminals))
    n_atm = max(2, round(0.15 * terminals))
    n_pos = terminals - n_wire - n_online - n_atm
    kinds = np.repeat([_WIRE, _ONLINE, _ATM, _POS], [n_wire, n_online, n_atm, n_pos])
    channel = kinds[rng.permutation(terminals)]  # ids do not give the type away
    in_person = (channel == _ATM) | (channel == _POS)
    grid = max(10, math.ceil(math.sqrt(2 * int(in_person.sum()))))
    cell = np.where(in_person, rng.integers(0, grid * grid, size=terminals), -1)
    return _World(
        grid=grid,
        channel=channel,
        cell=cell,
        atm=np.flatnonzero(channel == _ATM),
        pos=np.flatnonzero(channel == _POS),
        online=np.flatnonzero(channel == _ONLINE),
        wire=np.flatnonzero(channel == _WIRE),
    )


def _cell_xy(world: _World, terminals: np.ndarray) -> np.ndarray:
    cells = world.cell[terminals]
    return np.stack([cells % world.grid, cells // world.grid], axis=1) + 0.5


def _make_customers(rng: np.random.Generator, world: _World, n: int, days: int) -> _Customers:
    xy = rng.uniform(0, world.grid, size=(n, 2))
    home_pos = world.pos[_nearest(xy, _cell_xy(world, world.pos), _HOME_POS)]
    home_atm = world.atm[_nearest(xy, _cell_xy(world, world.atm), _HOME_ATM)]
    n_home_pos = np.minimum(rng.integers(3, _HOME_POS + 1, size=n), home_pos.shape[1])
    n_home_atm = np.minimum(rng.integers(1, _HOME_ATM + 1, size=n), home_atm.shape[1])
    favourite_online = world.online[rng.integers(0, len(world.online), (n, _FAVOURITE_ONLINE))]
    bank = world.wire[rng.integers(0, len(world.wire), size=n)]
    opening = _to_cents(rng.lognormal(math.log(1500), 1.0, size=n))
    period = np.where(rng.random(n) < 0.5, 14, 30)
    first_pay = (rng.random(n) * period).astype(np.int64)
    rate = np.clip(rng.lognormal(math.log(2.2), 0.5, size=n), 0.3, 10.0)
    scale = np.clip(rng.lognormal(math.log(30), 0.5, size=n), 3.0, 500.0)
    shares = rng.dirichlet(20 * _CHANNEL_MIX, size=n)
    # Salary covers the customer's expected spending give or take: some run low before payday.
    spend_per_day = rate * scale * (shares @ _CHANNEL_MEAN)
    salary = _to_cents(spend_per_day * period * rng.uniform(0.85, 1.35, size=n))
    return _Customers(
        xy=xy,
        home_pos=home_pos,
        n_home_pos=n_home_pos,
        home_atm=home_atm,
        n_home_atm=n_home_atm,
        favourite_online=favourite_online,
        bank=bank,
        opening=opening,
        period=period,
        first_pay=first_pay,
        salary=salary,
        rate=rate,
        scale=scale,
        mix=np.cumsum(shares, axis=1),
        travel=rng.uniform(0.01, 0.03, size=n),
    )


def _group_rank(counts: np.ndarray) -> np.ndarray:
    """0, 1, ... within each consecutive group of the given sizes."""
    total = int(counts.sum())
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts


def _credits(rng: np.random.Generator, cs: _Customers, ev: _Events, t0: int, days: int) -> None:
    """Opening balance at the start, salary every period, occasional transfers in."""
    n = len(cs.rate)
    everyone = np.arange(n)
    ev.add(everyone, np.full(n, t0), cs.opening, _CREDIT, _WIRE, cs.bank, _RULE_CREDIT)

    n_pay = np.maximum(0, -((cs.first_pay - days) // cs.period))  # ceil((days - first) / period)
    cust = np.repeat(everyone, n_pay)
    day = cs.first_pay[cust] + _group_rank(n_pay) * cs.period[cust]
    time = t0 + day * _DAY + 6 * _HOUR + rng.integers(0, 3 * _HOUR, size=len(cust))
    ev.add(cust, time, cs.salary[cust], _CREDIT, _WIRE, cs.bank[cust], _RULE_CREDIT)

    cust = np.repeat(everyone, rng.poisson(_TRANSFERS_PER_DAY * days, size=n))
    time = _daily_times(rng, t0, rng.integers(0, days, size=len(cust)))
    cents = _to_cents(cs.scale[cust] * rng.lognormal(math.log(4), 0.7, size=len(cust)))
    ev.add(cust, time, cents, _CREDIT, _WIRE, cs.bank[cust], _RULE_CREDIT)


def _pick_home(
    rng: np.random.Generator,
    cust: np.ndarray,
    home: np.ndarray,
    n_home: np.ndarray,
    everywhere: np.ndarray,
    travel: np.ndarray,
) -> np.ndarray:
    """A home terminal (nearer ones more often), or with the travel chance any terminal."""
    j = (n_home[cust] * rng.random(len(cust)) ** 1.5).astype(np.int64)
    picked = home[cust, j]
    away = rng.random(len(cust)) < travel[cust]
    picked[away] = everywhere[rng.integers(0, len(everywhere), size=int(away.sum()))]
    return picked


def _legit_debits(
    rng: np.random.Generator, world: _World, cs: _Customers, ev: _Events, t0: int, days: int
) -> None:
    n = len(cs.rate)
    cust = np.repeat(np.arange(n), rng.poisson(cs.rate * days))
    m = len(cust)
    time = _daily_times(rng, t0, rng.integers(0, days, size=m))
    channel = np.minimum((rng.random(m)[:, None] >= cs.mix[cust]).sum(axis=1), 3)

    terminal = np.empty(m, dtype=np.int64)
    for code, home, n_home, everywhere in (
        (_POS, cs.home_pos, cs.n_home_pos, world.pos),
        (_ATM, cs.home_atm, cs.n_home_atm, world.atm),
    ):
        rows = np.flatnonzero(channel == code)
        terminal[rows] = _pick_home(rng, cust[rows], home, n_home, everywhere, cs.travel)
    rows = np.flatnonzero(channel == _ONLINE)
    favourite = cs.favourite_online[cust[rows], rng.integers(0, _FAVOURITE_ONLINE, len(rows))]
    anywhere = world.online[rng.integers(0, len(world.online), len(rows))]
    terminal[rows] = np.where(rng.random(len(rows)) < 0.85, favourite, anywhere)
    rows = np.flatnonzero(channel == _WIRE)
    terminal[rows] = cs.bank[cust[rows]]

    scale = cs.scale[cust]
    atm_units = np.maximum(1, np.rint(scale * 2.5 * rng.lognormal(0, 0.5, m) / 20))
    dollars = np.select(
        [channel == _ATM, channel == _POS, channel == _ONLINE],
        [20 * atm_units, scale * rng.lognormal(0, 0.7, m), 1.2 * scale * rng.lognormal(0, 0.8, m)],
        default=6 * scale * rng.lognormal(0, 0.6, m),
    )
    # param: the share of the balance an unaffordable debit is shrunk to (0: skip it instead).
    shrink = np.where(rng.random(m) < _SHRINK_SHARE, rng.uniform(0.3, 0.7, m), 0.0)
    ev.add(cust, time, _to_cents(dollars), _DEBIT, channel, terminal, _RULE_LEGIT, shrink)


def _incidents(rng: np.random.Generator, rate: float, customers: int, days: int) -> np.ndarray:
    """Distinct victims of one scenario: at least one, about rate per customer-day."""
    n = min(customers, max(1, int(rng.poisson(rate * customers * days))))
    return np.sort(rng.choice(customers, size=n, replace=False))


def _affordable(legit: _Settled, c: int, tries: np.ndarray, need: float) -> int:
    """The first of the candidate times at which customer c's legit balance covers `need`.

    Fraud that the balance cannot cover is declined and never reaches the stream, so incidents
    are placed where they can happen (falling back to the first candidate).
    """
    rows = slice(legit.starts[c], legit.starts[c] + legit.counts[c])
    kept = legit.cents[rows] > 0
    t, bal = legit.events["time"][rows][kept], legit.balance[rows][kept]
    ok = np.flatnonzero(bal[np.maximum(np.searchsorted(t, tries, side="right") - 1, 0)] >= need)
    return int(tries[ok[0]] if len(ok) else tries[0])


def _frauds(
    rng: np.random.Generator,
    world: _World,
    cs: _Customers,
    ev: _Events,
    t0: int,
    days: int,
    legit: _Settled,
) -> None:
    """Candidate fraudulent debits of the per-customer scenarios (terminals are labelled later)."""
    customers = len(cs.rate)

    # low_balance_drain: an ATM takes most of the balance while it is low for its owner, on days
    # spread over the whole period. Half the stolen cards are used near home, so a new place is a
    # hint, not the giveaway.
    cust, time = _drain_times(rng, legit, t0, days, customers)
    half = np.full(customers, 0.5)
    atm = _pick_home(rng, cust, cs.home_atm, cs.n_home_atm, world.atm, half)
    share = rng.uniform(0.85, 1.0, size=len(cust))
    ev.add(cust, time, 0, _DEBIT, _ATM, atm, _RULE_DRAIN, share, _DRAIN)

    # new_location: a large POS purchase (sometimes two) far from anywhere the customer has been,
    # at a usual time of day.
    victims = _incidents(rng, _NEW_LOCATION_RATE, customers, days)
    repeat = np.where(rng.random(len(victims)) < 0.3, 2, 1)
    cust = np.repeat(victims, repeat)
    dollars = cs.scale[cust] * rng.uniform(3, 8, len(cust)) * rng.lognormal(0, 0.3, len(cust))
    cents = _to_cents(dollars)
    need = np.bincount(np.repeat(np.arange(len(victims)), repeat), weights=cents)
    # Days spread evenly over the period (in a random order of the victims); if the balance does
    # not cover the purchase then, another of 7 random days that it does.
    tries = rng.integers(0, days, (len(victims), 8))
    tries[:, 0] = rng.permutation(_spread_days(rng, len(victims), 0, days))
    pos_xy = _cell_xy(world, world.pos)
    far = np.empty(len(victims), dtype=np.int64)
    first = np.empty(len(victims), dtype=np.int64)
    for i, c in enumerate(victims):
        rows = slice(legit.starts[c], legit.starts[c] + legit.counts[c])
        visited = world.cell[legit.events["terminal"][rows]]
        visited = np.unique(visited[visited >= 0])
        been = np.vstack(
            [cs.xy[c][None, :], np.stack([visited % world.grid, visited // world.grid], 1) + 0.5]
        )
        gap = np.sqrt(((pos_xy[:, None, :] - been[None, :, :]) ** 2).sum(axis=2)).min(axis=1)
        candidates = np.flatnonzero(gap >= max(3.0, world.grid / 5))
        if len(candidates) == 0:
            candidates = np.array([int(np.argmax(gap))])
        far[i] = world.pos[candidates[rng.integers(0, len(candidates))]]
        first[i] = _affordable(legit, c, _daily_times(rng, t0, tries[i]), need[i])
    later = _group_rank(repeat) * rng.integers(10 * _MINUTE, 3 * _HOUR, size=len(cust))
    ev.add(
        cust, np.repeat(first, repeat) + later, cents, _DEBIT, _POS, np.repeat(far, repeat),
        _RULE_FRAUD, scenario=_NEW_LOCATION,
    )  # fmt: skip

    # card_not_present: for ~2 weeks, extra inflated online purchases, a third of the activity.
    victims = _incidents(rng, _CNP_RATE, customers, days)
    span = rng.uniform(10, 18, len(victims)) * _DAY
    span = np.minimum(span, days * _DAY).astype(np.int64)
    tries = t0 + (rng.random((len(victims), 8)) * (days * _DAY - span)[:, None]).astype(np.int64)
    need = 1.2 * 300 * cs.scale[victims]  # about the first purchase, in cents
    begin = np.array([_affordable(legit, c, tries[i], need[i]) for i, c in enumerate(victims)])
    count = np.maximum(1, rng.poisson(0.5 * cs.rate[victims] * span / _DAY))
    cust = np.repeat(victims, count)
    time = np.repeat(begin, count) + (rng.random(len(cust)) * np.repeat(span, count)).astype(
        np.int64
    )
    terminal = world.online[rng.integers(0, len(world.online), len(cust))]
    dollars = 1.2 * cs.scale[cust] * rng.uniform(3, 6, len(cust)) * rng.lognormal(0, 0.4, len(cust))
    ev.add(cust, time, _to_cents(dollars), _DEBIT, _ONLINE, terminal, _RULE_FRAUD, scenario=_CNP)

    # card_testing: 5-15 tiny online purchases at one merchant within a few minutes.
    victims = _incidents(rng, _TESTING_RATE, customers, days)
    count = rng.integers(5, 16, len(victims))
    cust = np.repeat(victims, count)
    tries = t0 + rng.integers(0, max(1, days * _DAY - 10 * _MINUTE), (len(victims), 8))
    need = 500 * count  # enough for the whole burst at the largest amount, in cents
    begin = np.array([_affordable(legit, c, tries[i], need[i]) for i, c in enumerate(victims)])
    within = rng.integers(1 * _MINUTE, 5 * _MINUTE, len(victims))
    time = np.repeat(begin, count) + (rng.random(len(cust)) * np.repeat(within, count)).astype(
        np.int64
    )
    merchant = world.online[rng.integers(0, len(world.online), len(victims))]
    cents = rng.integers(50, 501, len(cust))
    ev.add(
        cust, time, cents, _DEBIT, _ONLINE, np.repeat(merchant, count), _RULE_FRAUD,
        scenario=_TESTING,
    )  # fmt: skip


@dataclass(frozen=True)
class _Settled:
    """Events sorted by (customer, time) with the amounts the balance allowed (0 = dropped)."""

    events: dict[str, np.ndarray]
    cents: np.ndarray
    balance: np.ndarray  # balance after each event, cents
    starts: np.ndarray  # first row of each customer
    counts: np.ndarray  # rows of each customer


def _settle(unsorted: dict[str, np.ndarray], customers: int) -> _Settled:
    """Sort events per customer by time and apply the balance rules in that order.

    One vectorised step per event position: step k handles every customer's k-th event. Ties in
    time keep insertion order, so the opening balance comes first.
    """
    order = np.lexsort((np.arange(len(unsorted["cust"])), unsorted["time"], unsorted["cust"]))
    ev = {name: values[order] for name, values in unsorted.items()}
    cust, cents, rule, param = ev["cust"], ev["cents"], ev["rule"], ev["param"]
    is_atm = ev["channel"] == _ATM
    counts = np.bincount(cust, minlength=customers)
    starts = np.cumsum(counts) - counts
    by_count = np.argsort(-counts, kind="stable")
    neg_sorted = -counts[by_count]
    balance = np.zeros(customers, dtype=np.int64)
    out = np.zeros(len(cust), dtype=np.int64)
    after = np.zeros(len(cust), dtype=np.int64)
    for k in range(int(counts.max(initial=0))):
        active = by_count[: np.searchsorted(neg_sorted, -k, side="left")]
        idx = starts[active] + k
        a, r, b = cents[idx], rule[idx], balance[active]
        # Legit debit the balance cannot cover: shrink to a share of it (ATMs: whole tens) or skip.
        shrunk = np.floor(b * param[idx]).astype(np.int64)
        shrunk = np.where(is_atm[idx], shrunk // 1000 * 1000, shrunk)
        legit = np.where(a <= b, a, np.where(shrunk >= 100, shrunk, 0))
        # Fraud is capped at the balance; tiny leftovers (below the intended amount) are declined.
        capped = np.minimum(a, b)
        fraud = np.where(capped >= np.minimum(a, 500), capped, 0)
        drained = np.minimum(np.ceil(b * param[idx]).astype(np.int64), b)
        drain = np.where((drained >= _DRAIN_MIN) & (b <= _DRAIN_MAX), drained, 0)
        amount = np.select(
            [r == _RULE_CREDIT, r == _RULE_LEGIT, r == _RULE_FRAUD, r == _RULE_WHOLE],
            [a, legit, fraud, np.where(a <= b, a, 0)],
            drain,
        )
        out[idx] = amount
        balance[active] = after[idx] = b + np.where(r == _RULE_CREDIT, amount, -amount)
    return _Settled(ev, out, after, starts, counts)


def _spread_days(rng: np.random.Generator, n: int, first: int, days: int) -> np.ndarray:
    """n incident days in [first, days), evenly spread: the i-th falls in the i-th of n strata.

    Each day is uniform within its stratum, so every week of the period gets its share of
    incidents (a Poisson count per week would leave some test weeks of a backtest almost empty).
    """
    first = min(first, days - 1)
    strata = (np.arange(n) + rng.random(n)) / max(n, 1)
    return first + np.minimum((strata * (days - first)).astype(np.int64), days - first - 1)


def _drain_times(
    rng: np.random.Generator, legit: _Settled, t0: int, days: int, customers: int
) -> tuple[np.ndarray, np.ndarray]:
    """Victims of the drain and when: on a day drawn first, a customer whose balance is low then.

    Days are spread evenly over the period from day 1 (`_spread_days`); the time of day follows
    the usual daily pattern. The victim is drawn among the customers whose legit balance at that
    moment is low: small enough for a thief to empty at an ATM (_DRAIN_MIN.._DRAIN_MAX) and at
    most _DRAIN_LOW of the customer's usual (median) balance. Each customer is drained at most
    once. When no low balance spans that moment, a low stretch of the same day is used (at a
    time inside it); without any low stretch at all, any balance of _DRAIN_MIN or more is.
    """
    ev = legit.events
    kept = legit.cents > 0
    cust, time, bal = ev["cust"][kept], ev["time"][kept], legit.balance[kept]
    end = np.full(len(time), t0 + days * _DAY, dtype=np.int64)  # the balance holds until then
    same = cust[1:] == cust[:-1]
    end[:-1] = np.where(same, time[1:], end[:-1])
    # Usual level: the median balance after the customer's events.
    order = np.lexsort((bal, cust))
    counts = np.bincount(cust, minlength=customers)
    starts = np.cumsum(counts) - counts
    usual = np.zeros(customers, dtype=np.float64)
    has = counts > 0
    usual[has] = bal[order][starts[has] + counts[has] // 2]
    warm = t0 + min(1, days - 1) * _DAY  # not on the first day (unless that is all there is)
    usable = (bal >= _DRAIN_MIN) & (end > warm)
    low = usable & (bal <= _DRAIN_MAX) & (bal <= _DRAIN_LOW * usual[cust])
    seg = np.flatnonzero(low if low.any() else usable)
    if len(seg) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    # Each low stretch, once per day it covers, grouped by day.
    first_day = (np.maximum(time[seg], warm) - t0) // _DAY
    n_days = (end[seg] - 1 - t0) // _DAY - first_day + 1
    on_day = np.repeat(first_day, n_days) + _group_rank(n_days)
    seg = np.repeat(seg, n_days)
    by_day = np.argsort(on_day, kind="stable")
    seg, on_day = seg[by_day], on_day[by_day]
    bounds = np.searchsorted(on_day, np.arange(days + 1))
    nonempty = np.flatnonzero(np.diff(bounds) > 0)

    wanted = min(customers, max(1, int(rng.poisson(_DRAIN_RATE * customers * days))))
    drain_days = _spread_days(rng, wanted, 1, days)
    moments = _daily_times(rng, t0, drain_days)
    used = np.zeros(customers, dtype=bool)
    victims: list[int] = []
    times: list[int] = []
    for d, moment in zip(drain_days, moments, strict=True):
        if bounds[d] == bounds[d + 1]:  # nothing low that day: the nearest day with something
            d = nonempty[np.argmin(np.abs(nonempty - d))]
            moment = t0 + d * _DAY + int(moment - t0) % _DAY
        rows = seg[bounds[d] : bounds[d + 1]]
        rows = rows[~used[cust[rows]]]
        if len(rows) == 0:
            continue
        spans = rows[(time[rows] < moment) & (end[rows] > moment + 1)]
        if len(spans):
            j = int(spans[rng.integers(0, len(spans))])
        else:  # a low stretch of the day, at a moment inside it
            j = int(rows[rng.integers(0, len(rows))])
            lo = max(int(time[j]) + 1, t0 + int(d) * _DAY)
            hi = min(int(end[j]) - 1, t0 + (int(d) + 1) * _DAY)
            moment = lo + int(rng.integers(0, max(1, hi - lo)))
        used[cust[j]] = True
        victims.append(int(cust[j]))
        times.append(int(moment))
    order = np.argsort(victims, kind="stable")
    return np.array(victims, dtype=np.int64)[order], np.array(times, dtype=np.int64)[order]


def _compromise_terminals(
    rng: np.random.Generator,
    world: _World,
    terminal: np.ndarray,
    time: np.ndarray,
    scenario: np.ndarray,
    t0: int,
    days: int,
) -> None:
    """Label every legit transaction at a few skimmed terminals during their window (in place)."""
    in_person = np.concatenate([world.atm, world.pos])
    legit = scenario == _LEGIT
    traffic = np.bincount(terminal[legit], minlength=len(world.channel))[in_person]
    busy = np.flatnonzero(traffic > 0)
    if len(busy) == 0:
        return
    wanted = max(1, int(rng.poisson(_TERMINAL_RATE * len(in_person) * days)))
    chosen = in_person[rng.choice(busy, size=min(wanted, len(busy)), replace=False)]
    for term in np.sort(chosen):
        # Some weeks; in a short simulation a part of it, so not all its activity is fraud.
        span = int(min(rng.uniform(14, 28), rng.uniform(0.25, 0.5) * days) * _DAY)
        begin = t0 + int(rng.integers(0, days * _DAY - span + 1))
        hit = legit & (terminal == term) & (time >= begin) & (time < begin + span)
        scenario[hit] = _TERMINAL


def _daily_compromises(
    rng: np.random.Generator, rate: float, population: np.ndarray | int, t0: int, days: int
) -> Iterator[tuple[int, np.ndarray]]:
    """The literature's daily compromises: each day a Poisson number (`rate` per member-day) of
    distinct members of `population` (an array, or a count for the indices below it), at least
    one over the period. Yields the start of each day with any and that day's members, lazily:
    what the caller draws for a day comes before the next day's draw."""
    size = len(population) if isinstance(population, np.ndarray) else population
    per_day = rng.poisson(rate * size, size=days)
    if per_day.sum() == 0:
        per_day[rng.integers(0, days)] = 1
    for day in np.flatnonzero(per_day):
        members = rng.choice(population, size=min(int(per_day[day]), size), replace=False)
        yield t0 + int(day) * _DAY, members


def _compromise_terminals_28d(
    rng: np.random.Generator,
    world: _World,
    terminal: np.ndarray,
    time: np.ndarray,
    scenario: np.ndarray,
    t0: int,
    days: int,
) -> None:
    """The literature's compromised terminals: each day a few random card terminals, every
    payment there fraud for the next 28 days (legit rows relabelled in place; at least one)."""
    cards = np.concatenate([world.atm, world.pos, world.online])
    legit = scenario == _LEGIT
    for begin, chosen in _daily_compromises(rng, _TERMINAL_28D_RATE, cards, t0, days):
        window = legit & (time >= begin) & (time < begin + TERMINAL_28D_DAYS * _DAY)
        scenario[window & np.isin(terminal, chosen)] = _TERMINAL_28D


def _compromise_customers(
    rng: np.random.Generator, ev: dict[str, np.ndarray], customers: int, t0: int, days: int
) -> None:
    """The literature's compromised customers: each day a few random customers, a third of their
    card payments over the next 14 days fraud at 5 times the amount (candidate events, in place,
    before the balance is settled; at least one customer)."""
    card = (ev["kind"] == _DEBIT) & (ev["channel"] != _WIRE) & (ev["scenario"] == _LEGIT)
    for begin, victims in _daily_compromises(rng, _CUSTOMER_RATE, customers, t0, days):
        window = (ev["time"] >= begin) & (ev["time"] < begin + CUSTOMER_DAYS * _DAY)
        rows = np.flatnonzero(card & window & np.isin(ev["cust"], victims))
        picked = rng.random(len(rows)) < CUSTOMER_SHARE
        if len(rows) and not picked.any():  # a short window: at least one payment
            picked[rng.integers(0, len(rows))] = True
        rows = rows[picked]
        ev["cents"][rows] *= CUSTOMER_FACTOR
        ev["rule"][rows] = _RULE_WHOLE
        ev["scenario"][rows] = _CUSTOMER
        card[rows] = False


def simulate(
    days: int,
    customers: int,
    seed: int,
    terminals: int | None = None,
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC),
) -> Simulation:
    """Simulate `days` of transactions of `customers` customers, with labelled fraud.

    Deterministic in its arguments (same arguments, byte-identical tables). `terminals` defaults
    to one per five customers, at least 20. Every scenario gets at least one incident so even a
    small test simulation has each kind of fraud; at such sizes the fraud rate can therefore be
    higher (a few %) than the ~1-1.5 % of 60 days x 1,000 customers.
    """
    if days < 1 or customers < 1:
        raise ValueError(f"days and customers must be >= 1, got {days} and {customers}")
    n_terminals = max(20, customers // 5) if terminals is None else terminals
    if n_terminals < 10:
        raise ValueError(f"need at least 10 terminals (every kind), got {n_terminals}")
    t0 = _micros(start)
    rng = np.random.default_rng(seed)
    literature = np.random.default_rng((seed, _LITERATURE_STREAM))
    world = _make_world(rng, n_terminals)
    cs = _make_customers(rng, world, customers, days)

    ev = _Events()
    _credits(rng, cs, ev, t0, days)
    _legit_debits(rng, world, cs, ev, t0, days)
    legit = _settle(ev.build(), customers)  # where balances run low, for the drain
    _frauds(rng, world, cs, ev, t0, days, legit)
    del legit
    candidates = ev.build()
    _compromise_customers(literature, candidates, customers, t0, days)
    candidates["time"] = np.minimum(candidates["time"], t0 + days * _DAY - 1)
    settled = _settle(candidates, customers)
    del ev
    kept = settled.cents > 0
    events = {name: values[kept] for name, values in settled.events.items()}
    cents = settled.cents[kept]
    del settled
    scenario = events["scenario"].copy()
    _compromise_terminals(rng, world, events["terminal"], events["time"], scenario, t0, days)
    _compromise_terminals_28d(
        literature, world, events["terminal"], events["time"], scenario, t0, days
    )
    card = (events["kind"] == _DEBIT) & (events["channel"] != _WIRE)
    over = card & (cents > round(OVER_THRESHOLD_DOLLARS * 100)) & (scenario == _LEGIT)
    scenario[over] = _OVER_THRESHOLD

    # Stream order: event time; ties keep (customer, per-customer) order, so balances replay.
    order = np.argsort(events["time"], kind="stable")
    stream = {name: events[name][order] for name in ("time", "cust", "terminal", "kind", "channel")}
    stream["cents"], stream["scenario"] = cents[order], scenario[order]
    fraud = scenario[order] != _LEGIT
    delay = rng.lognormal(math.log(_REPORT_MEDIAN_DAYS * _DAY), _REPORT_SIGMA, int(fraud.sum()))
    reported = np.full(len(order), -1, dtype=np.int64)
    reported[fraud] = stream["time"][fraud] + _report_delay(delay)
    stream["reported"] = reported
    end = t0 + days * _DAY
    # Lost cards and holds first: a payment of the customer's own they declined (one labelled
    # fraud too) never happened, so it cannot be the report that blocks the card.
    random_blocks = _Blocks.concat(_random_blocks(rng, customers, t0, end))
    stream = _decline_blocked(stream, random_blocks)
    fraud_blocks = _card_blocks(rng, stream, customers, end)
    stream = _decline_blocked(stream, fraud_blocks)
    blocks = _Blocks.concat([fraud_blocks, random_blocks])
    stream = _retry_blocked_cards(rng, world, stream, fraud_blocks, end)

    time, cust, terminal = stream["time"], stream["cust"], stream["terminal"]
    n = len(time)
    cell = world.cell[terminal]
    cell_names = pa.array([f"L{i:04d}" for i in range(world.grid**2)], pa.string())
    ids = pa.array([f"tx-{seed}-{i:09d}" for i in range(n)], pa.string())
    customer_ids = pa.array([f"C{i:06d}" for i in range(customers)], pa.string())
    transactions = pa.Table.from_arrays(
        [
            ids,
            pa.array(time, pa.int64()).cast(TIMESTAMP),
            customer_ids.take(cust),
            pa.array([f"T{i:05d}" for i in range(n_terminals)], pa.string()).take(terminal),
            pa.array(stream["cents"] / 100, pa.float64()),
            pa.array(KINDS, pa.string()).take(stream["kind"]),
            pa.array(CHANNELS, pa.string()).take(stream["channel"]),
            cell_names.take(pa.array(np.maximum(cell, 0), mask=cell < 0)),
        ],
        schema=TRANSACTION_SCHEMA,
    )

    fraud_rows = np.flatnonzero(stream["scenario"] != _LEGIT)
    labels = pa.Table.from_arrays(
        [
            ids.take(fraud_rows),
            pa.array(np.ones(len(fraud_rows), dtype=bool), pa.bool_()),
            pa.array(stream["reported"][fraud_rows], pa.int64()).cast(TIMESTAMP),
            pa.array(FRAUD_SCENARIOS, pa.string()).take(stream["scenario"][fraud_rows]),
        ],
        schema=LABEL_SCHEMA,
    )
    block_table = pa.Table.from_arrays(
        [
            customer_ids.take(pa.array(blocks.cust)),
            pa.array(BLOCK_KINDS, pa.string()).take(pa.array(blocks.kind)),
            pa.array(BLOCK_REASONS, pa.string()).take(pa.array(blocks.reason)),
            pa.array(blocks.start, pa.int64()).cast(TIMESTAMP),
            pa.array(blocks.end, pa.int64()).cast(TIMESTAMP),
        ],
        schema=BLOCK_SCHEMA,
    )
    return Simulation(transactions=transactions, labels=labels, blocks=block_table)


def _report_delay(delay: np.ndarray) -> np.ndarray:
    return np.clip(delay, _HOUR, 28 * _DAY).astype(np.int64)


_CARD, _ACCOUNT = range(len(BLOCK_KINDS))
_FRAUD_REPORTED, _LOST, _HOLD = range(len(BLOCK_REASONS))


@dataclass(frozen=True)
class _Blocks:
    """Blocks of cards or accounts, sorted by customer then start."""

    cust: np.ndarray
    start: np.ndarray
    end: np.ndarray
    kind: np.ndarray  # _CARD or _ACCOUNT
    reason: np.ndarray

    @classmethod
    def of(
        cls, cust: np.ndarray, start: np.ndarray, end: np.ndarray, kind: int, reason: int
    ) -> _Blocks:
        n = len(cust)
        return cls(cust, start, end, np.full(n, kind), np.full(n, reason))

    @classmethod
    def concat(cls, parts: list[_Blocks]) -> _Blocks:
        fields = ("cust", "start", "end", "kind", "reason")
        merged = {
            f: np.concatenate([getattr(p, f) for p in parts]).astype(np.int64) for f in fields
        }
        order = np.lexsort((merged["start"], merged["cust"]))
        return cls(**{f: merged[f][order] for f in fields})


def _card_blocks(
    rng: np.random.Generator, stream: dict[str, np.ndarray], customers: int, end: int
) -> _Blocks:
    """Each victim's card, blocked after the first report of a fraud on it, inside the period."""
    fraud = stream["reported"] >= 0
    first = np.full(customers, np.iinfo(np.int64).max, dtype=np.int64)
    np.minimum.at(first, stream["cust"][fraud], stream["reported"][fraud])
    victims = np.flatnonzero(first < np.iinfo(np.int64).max)
    low, high = _BLOCK_DELAY_MINUTES
    start = first[victims] + rng.integers(low * _MINUTE, high * _MINUTE, len(victims))
    span = (rng.uniform(*_BLOCK_DAYS, len(victims)) * _DAY).astype(np.int64)
    inside = start < end
    return _Blocks.of(
        victims[inside], start[inside], start[inside] + span[inside], _CARD, _FRAUD_REPORTED
    )


def _random_blocks(rng: np.random.Generator, customers: int, t0: int, end: int) -> list[_Blocks]:
    """Lost cards and compliance holds: a few customers each (at least one), after day 1."""
    parts = []
    for share, (low, high), kind, reason in (
        (_LOST_CARD_SHARE, _LOST_DAYS, _CARD, _LOST),
        (_HOLD_SHARE, _HOLD_DAYS, _ACCOUNT, _HOLD),
    ):
        who = np.sort(
            rng.choice(
                customers, size=min(customers, max(1, round(share * customers))), replace=False
            )
        )
        start = t0 + _DAY + (rng.random(len(who)) * max(1, end - t0 - _DAY)).astype(np.int64)
        span = (rng.uniform(low, high, len(who)) * _DAY).astype(np.int64)
        parts.append(_Blocks.of(who, start, start + span, kind, reason))
    return parts


def _decline_blocked(stream: dict[str, np.ndarray], blocks: _Blocks) -> dict[str, np.ndarray]:
    """The stream without the customers' own debits a block declined: card debits while the card
    is blocked, every debit while the account is frozen. Credits still arrive; the fraudster's own
    attempts stay (one on a blocked card is exactly what the platform must flag), while the
    customer's own payments labelled fraud (`_OWN_PAYMENTS`) are declined like the others."""
    cust, time = stream["cust"], stream["time"]
    order = np.lexsort((time, cust))
    sorted_cust, sorted_time = cust[order], time[order]
    debit = stream["kind"][order] == _DEBIT
    card = debit & (stream["channel"][order] != _WIRE)
    own = np.isin(stream["scenario"][order], _OWN_PAYMENTS)
    declined = np.zeros(len(order), dtype=bool)
    for c, t_on, t_off, kind in zip(
        blocks.cust.tolist(),
        blocks.start.tolist(),
        blocks.end.tolist(),
        blocks.kind.tolist(),
        strict=True,
    ):
        lo, hi = np.searchsorted(sorted_cust, [c, c + 1])
        a, b = lo + np.searchsorted(sorted_time[lo:hi], [t_on, t_off])
        declined[a:b] |= (card if kind == _CARD else debit)[a:b] & own[a:b]
    keep = np.ones(len(order), dtype=bool)
    keep[order[declined]] = False
    return {name: values[keep] for name, values in stream.items()}


def _retry_blocked_cards(
    rng: np.random.Generator,
    world: _World,
    stream: dict[str, np.ndarray],
    blocks: _Blocks,
    period_end: int,
) -> dict[str, np.ndarray]:
    """The fraudsters' retries of some cards blocked after a reported fraud (`blocked_card`).

    Online debits within 2 days of the block, each at most what the balance allows at every
    later point, so the balance replayed from the stream still never goes below zero.
    """
    if len(blocks.cust) == 0:
        return stream
    cust, time = stream["cust"], stream["time"]
    signed = np.where(stream["kind"] == _DEBIT, -stream["cents"], stream["cents"])
    by_customer = np.lexsort((np.arange(len(cust)), cust))
    sorted_cust = cust[by_customer]
    grouped = pd.Series(signed[by_customer]).groupby(sorted_cust)
    balance = grouped.cumsum().to_numpy()  # after each row
    # The lowest balance from each row on (its customer's rows only): what a new debit may take.
    floor = pd.Series(balance[::-1]).groupby(sorted_cust[::-1]).cummin().to_numpy()[::-1]
    sorted_time = time[by_customer]
    picked = np.sort(
        rng.choice(
            len(blocks.cust),
            size=max(1, round(_RETRY_SHARE * len(blocks.cust))),
            replace=False,
        )
    )
    tries = rng.integers(1, 4, len(picked))
    rows: list[tuple[int, int, int, int]] = []
    for i, k in zip(picked.tolist(), tries.tolist(), strict=True):
        c, t_block = int(blocks.cust[i]), int(blocks.start[i])
        window = min(t_block + 2 * _DAY, int(blocks.end[i]), period_end - 1) - t_block
        if window <= _MINUTE:
            continue
        times = np.sort(t_block + _MINUTE + rng.integers(0, max(1, window - _MINUTE), k))
        dollars = rng.lognormal(math.log(_RETRY_DOLLARS), 0.6, k)
        merchant = world.online[rng.integers(0, len(world.online), k)]
        lo = np.searchsorted(sorted_cust, c, side="left")
        hi = np.searchsorted(sorted_cust, c, side="right")
        taken = 0
        for t, amount, term in zip(
            times.tolist(), dollars.tolist(), merchant.tolist(), strict=True
        ):
            before = lo + int(np.searchsorted(sorted_time[lo:hi], t, side="right")) - 1
            if before < lo:
                continue  # no balance yet
            room = int(floor[before]) - taken
            cents = min(round(amount * 100), room)
            if cents >= 100:
                rows.append((c, t, cents, int(term)))
                taken += cents
    if not rows:
        return stream
    extra = np.array(rows, dtype=np.int64)
    n = len(extra)
    retries = {
        "cust": extra[:, 0],
        "time": extra[:, 1],
        "cents": extra[:, 2],
        "terminal": extra[:, 3],
        "kind": np.full(n, _DEBIT),
        "channel": np.full(n, _ONLINE),
        "scenario": np.full(n, _BLOCKED),
        "reported": extra[:, 1]
        + _report_delay(rng.lognormal(math.log(_REPORT_MEDIAN_DAYS * _DAY), _REPORT_SIGMA, n)),
    }
    merged = {name: np.concatenate([stream[name], retries[name]]) for name in stream}
    order = np.argsort(merged["time"], kind="stable")
    return {name: values[order] for name, values in merged.items()}


def write_simulation(sim: Simulation, out_dir: Path) -> tuple[Path, Path]:
    """Write DIR/transactions.parquet and DIR/labels.parquet, the files the CLI and demo read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tx_path, labels_path = out_dir / "transactions.parquet", out_dir / "labels.parquet"
    pq.write_table(sim.transactions, tx_path)
    pq.write_table(sim.labels, labels_path)
    return tx_path, labels_path
