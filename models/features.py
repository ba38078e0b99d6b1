"""The stateful feature definition: (state, events in time order) -> (features, new state).

One pure function on Arrow/pandas, with no I/O, so the in-process runner, the history replay used
for training and a Spark executor all compute the same numbers.

Every feature is declared once in `FEATURES`, with the entity whose state it needs (as a Feast
FeatureView declares its entities and schema): an executor that splits the work by key computes
the customer and event features grouped by customer and the terminal features grouped by terminal.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.accounts import with_accounts
from models.schema import (
    ACCOUNT_CLOSED,
    ACCOUNT_FROZEN,
    ACCOUNT_OPEN,
    CARD_ACTIVE,
    CARD_BLOCKED,
    CHANNELS,
    FEATURE_INPUT_SCHEMA,
    TIMESTAMP,
)

# 2: the bank's account as of each event (CDC): card_blocked, account_not_open, and the balance
# re-anchored on the ledger balance. 3: terminal windows in calendar days (bounded state).
FEATURE_VERSION = "3"

# Sliding event-time windows over the customer's own earlier transactions.
CUSTOMER_WINDOWS: dict[str, int] = {"1h": 3600, "1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
# Windows over the terminal's transactions, for the share already reported as fraud: calendar
# days (UTC), "w days" being the event's day so far and the w days before it. A terminal's state
# is then one count per day (at most 31), whatever its traffic; a customer's sliding windows keep
# the customer's own events of the last 30 days.
TERMINAL_WINDOWS: dict[str, int] = {"1d": 1, "7d": 7, "30d": 30}  # days before the event's day
TERMINAL_DAYS = max(TERMINAL_WINDOWS.values())
HISTORY_SECONDS = max(CUSTOMER_WINDOWS.values())
# How far back a fraud can still count for an event: the longest terminal window's first day.
LOOKBACK_SECONDS = (TERMINAL_DAYS + 1) * 86_400

# What a feature is computed from: the customer's state and earlier events, the terminal's state
# and known frauds, or the event alone.
FeatureEntity = Literal["customer", "terminal", "event"]
ENTITIES: tuple[FeatureEntity, ...] = get_args(FeatureEntity)


@dataclass(frozen=True)
class Feature:
    """One model input, declared with its entity so executors need not guess it from its name.

    Every feature is a float64 column; undefined values (no earlier event, no location) are null.
    """

    name: str
    entity: FeatureEntity
    description: str


FEATURES: tuple[Feature, ...] = (
    Feature("amount", "event", "The transaction's amount."),
    Feature("is_debit", "event", "1 for a debit, 0 for a credit."),
    Feature("balance_before", "customer", "The customer's balance just before the event."),
    Feature("amount_balance_ratio", "customer", "Amount over the balance before (at least 1)."),
    Feature("location_seen_before", "customer", "1 if the customer was at this location before."),
    Feature("n_locations_seen", "customer", "Distinct locations of the customer before the event."),
    Feature("seconds_since_prev", "customer", "Seconds since the customer's previous event."),
    *(
        feature
        for w in CUSTOMER_WINDOWS
        for feature in (
            Feature(f"count_{w}", "customer", f"The customer's debits in the last {w}."),
            Feature(
                f"mean_amount_{w}", "customer", f"Mean amount of those debits in the last {w}."
            ),
        )
    ),
    Feature("amount_to_mean_30d", "customer", "Amount over the customer's 30-day mean debit."),
    *(
        feature
        for w, d in TERMINAL_WINDOWS.items()
        for feature in (
            Feature(
                f"terminal_tx_count_{w}",
                "terminal",
                f"The terminal's events that day so far and the {d} day(s) before (UTC).",
            ),
            Feature(
                f"terminal_fraud_rate_{w}",
                "terminal",
                f"Share of those already reported as fraud by the event's time ({w}).",
            ),
        )
    ),
    *(Feature(f"channel_{c}", "event", f"1 if the channel is {c}.") for c in CHANNELS),
    Feature("hour_of_day", "event", "The event time's hour (UTC)."),
    Feature("card_blocked", "event", "1 if the bank had blocked the card at the event time."),
    Feature("account_not_open", "event", "1 if the bank had frozen or closed the account by then."),
)


def feature_names(*entities: FeatureEntity) -> list[str]:
    """The features of these entities, in FEATURE_COLUMNS order: the columns of one key's part."""
    unknown = set(entities) - set(ENTITIES)
    if unknown:
        raise ValueError(f"unknown entities {sorted(unknown)}; expected some of {ENTITIES}")
    return [f.name for f in FEATURES if f.entity in entities]


FEATURE_COLUMNS: list[str] = [f.name for f in FEATURES]
CUSTOMER_FEATURES: list[str] = feature_names("customer")
TERMINAL_FEATURES: list[str] = feature_names("terminal")
EVENT_FEATURES: list[str] = feature_names("event")

# Identifies the event a feature row belongs to; comes before FEATURE_COLUMNS in the output.
KEY_COLUMNS: list[str] = ["transaction_id", "event_time", "customer_id", "terminal_id"]

CUSTOMER_STATE_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("balance", pa.float64()),
        pa.field("last_event_time", TIMESTAMP),
        pa.field("n_transactions", pa.int64()),
        pa.field("locations", pa.list_(pa.string())),
        pa.field("history_times", pa.list_(TIMESTAMP)),
        pa.field("history_amounts", pa.list_(pa.float64())),
    ]
)
TERMINAL_STATE_SCHEMA = pa.schema(
    [
        pa.field("terminal_id", pa.string(), nullable=False),
        pa.field("last_event_time", TIMESTAMP),
        pa.field("n_transactions", pa.int64()),
        # The terminal's events per UTC day (days since 1970-01-01), the last TERMINAL_DAYS + 1.
        pa.field("days", pa.list_(pa.int64())),
        pa.field("day_counts", pa.list_(pa.int64())),
    ]
)
# Frauds known to the platform: which terminal, when the fraud happened, when it was reported.
KNOWN_FRAUD_SCHEMA = pa.schema(
    [
        pa.field("terminal_id", pa.string()),
        pa.field("event_time", TIMESTAMP),
        pa.field("reported_at", TIMESTAMP),
    ]
)
FEATURE_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("terminal_id", pa.string(), nullable=False),
        *[pa.field(feature.name, pa.float64()) for feature in FEATURES],
    ]
)

_US = 1_000_000
_DAY_US = 86_400 * _US


@dataclass(frozen=True)
class FeatureState:
    """Per-customer and per-terminal state; one row per key (CUSTOMER/TERMINAL_STATE_SCHEMA)."""

    customers: pa.Table
    terminals: pa.Table

    @classmethod
    def empty(cls) -> FeatureState:
        """The state before any event: what a new deployment or a full replay starts from."""
        return cls(CUSTOMER_STATE_SCHEMA.empty_table(), TERMINAL_STATE_SCHEMA.empty_table())

    def updated(self, changed: FeatureState) -> FeatureState:
        """This state with `changed`'s rows replacing (or adding) theirs: an in-memory upsert."""
        return FeatureState(
            _upsert(self.customers, changed.customers, "customer_id"),
            _upsert(self.terminals, changed.terminals, "terminal_id"),
        )


@dataclass(frozen=True)
class FeatureResult:
    """What a batch produced: its feature rows and the state rows to upsert after it."""

    features: pa.Table  # FEATURE_SCHEMA, one row per input transaction, in input order
    state: FeatureState  # new state of the customers and terminals the batch touched


def _upsert(base: pa.Table, changed: pa.Table, key: str) -> pa.Table:
    if changed.num_rows == 0:
        return base
    keep = pc.invert(pc.is_in(base[key], value_set=changed[key]))
    return pa.concat_tables([base.filter(keep), changed.cast(base.schema)])


def _micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(pc.cast(column, pa.int64()).to_numpy(zero_copy_only=False), dtype=np.int64)


def _select(state: pa.Table, key: str, values: np.ndarray) -> pa.Table:
    if state.num_rows == 0:
        return state
    return state.filter(pc.is_in(state[key], value_set=pa.array(values, type=pa.string())))


def _flatten(state: pa.Table, column: str) -> tuple[np.ndarray, pa.Array]:
    """Parent row index and values of a list column."""
    lists = (
        state[column].combine_chunks()
        if state.num_rows
        else pa.array([], state.schema.field(column).type)
    )
    parents = np.asarray(
        pc.list_parent_indices(lists).to_numpy(zero_copy_only=False), dtype=np.int64
    )
    return parents, pc.list_flatten(lists)


@dataclass(frozen=True)
class _Timeline:
    """History rows followed by batch rows of many keys, sorted into processing order."""

    order: np.ndarray  # positions (into the concatenated rows) in processing order
    codes: np.ndarray  # key code per concatenated row
    times: np.ndarray  # event time (us) per concatenated row
    n_hist: int


def _timeline(
    hist_codes: np.ndarray, hist_times: np.ndarray, codes: np.ndarray, times: np.ndarray
) -> _Timeline:
    all_codes = np.concatenate([hist_codes, codes])
    all_times = np.concatenate([hist_times, times])
    is_batch = np.concatenate([np.zeros(len(hist_codes), np.int8), np.ones(len(codes), np.int8)])
    seq = np.arange(len(all_codes))
    # Key, then time; at equal times history came first, then the batch in arrival order.
    order = np.lexsort((seq, is_batch, all_times, all_codes))
    return _Timeline(order, all_codes, all_times, len(hist_codes))


def _prefix_sums(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row, the sum of the earlier rows of the same key (rows grouped by key), plus a total.

    Accumulated key by key, restarting at each key: a customer's numbers are then bit-identical
    whatever other customers share the batch (so a Spark executor grouping by key agrees).
    Returns len(values) + 1 entries; the last is unused padding for a window ending at the end.
    """
    n = len(values)
    out = np.zeros(n + 1)
    if n == 0:
        return out
    inclusive = pd.Series(values).groupby(codes, sort=False).cumsum().to_numpy()
    first = np.ones(n, dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    out[1:n][~first[1:]] = inclusive[:-1][~first[1:]]
    return out


def _window_sums(
    tl: _Timeline,
    values: np.ndarray,
    windows: dict[str, int] | dict[str, np.ndarray],
    weights: np.ndarray | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Count and sum of `values` over earlier rows of the same key in each window, per batch row.

    Earlier means before the row in processing order and with event time > t - window, a window
    being seconds, or per batch row (arrival order) microseconds. With `weights` (a count per
    row: 0/1, or a day's events), rows count that many times.
    """
    n_batch = len(tl.codes) - tl.n_hist
    out = {w: (np.zeros(n_batch, np.int64), np.zeros(n_batch)) for w in windows}
    if n_batch == 0:
        return out
    offsets = {w: _offsets(v, n_batch) for w, v in windows.items()}
    codes = tl.codes[tl.order]
    times = tl.times[tl.order]
    vals = values[tl.order]
    csum = _prefix_sums(codes, vals)
    wsum = None if weights is None else _prefix_sums(codes, weights[tl.order])
    wmax = max(int(o.max()) for o in offsets.values())
    tmin = int(times.min())
    span = int(times.max()) - tmin + wmax + 1
    rel = times - tmin + wmax
    pos = np.arange(len(codes))
    batch_pos = np.flatnonzero(tl.order >= tl.n_hist)
    batch_row = tl.order[batch_pos] - tl.n_hist
    # Keys are (code, time) packed into one int64; split the codes into groups that fit.
    per_group = max(1, (2**62) // span)
    group = codes // per_group
    for g in np.unique(group[batch_pos]):
        in_group = group == g
        gpos = pos[in_group]
        packed = (codes[in_group] - g * per_group) * span + rel[in_group]
        gb = batch_pos[group[batch_pos] == g]
        rows = batch_row[group[batch_pos] == g]
        local = np.searchsorted(gpos, gb)  # position of each batch row inside the group
        for w, offset in offsets.items():
            query = packed[local] - offset[rows]
            start = np.searchsorted(packed, query, side="right")
            if wsum is None:
                count = local - start
            else:
                count = np.rint(wsum[gpos[0] + local] - wsum[gpos[0] + start]).astype(np.int64)
            # start == local (empty window) gives exactly 0; otherwise both prefixes are sums of
            # this key's own rows, so the result never depends on which other keys share the batch.
            out[w][0][rows] = count
            out[w][1][rows] = csum[gpos[0] + local] - csum[gpos[0] + start]
    return out


def _offsets(window: int | np.ndarray, n: int) -> np.ndarray:
    """A window as microseconds per batch row."""
    if isinstance(window, np.ndarray):
        return window.astype(np.int64)
    return np.full(n, window * _US, np.int64)


@dataclass(frozen=True)
class _Batch:
    """The batch's columns as numpy arrays, in arrival order."""

    customers: np.ndarray  # customer_id (object)
    terminals: np.ndarray  # terminal_id (object)
    times: np.ndarray  # event time (us)
    amounts: np.ndarray
    is_debit: np.ndarray  # bool
    balance_change: np.ndarray  # -amount for a debit, +amount for a credit
    channels: np.ndarray  # object, None when absent
    locations: np.ndarray  # object, None when absent
    # The bank's account as of the event (ACCOUNT_AS_OF_SCHEMA; NaN/None where unknown).
    ledger_balance: np.ndarray
    ledger_time: np.ndarray  # us as float
    account_status: np.ndarray  # object
    card_status: np.ndarray  # object


@dataclass(frozen=True)
class _Keys:
    """The batch's keys of one entity and their state rows, coded 0..k-1 (state keys first)."""

    state: pa.Table  # the state rows of the batch's keys
    state_codes: np.ndarray  # key code per state row
    batch_codes: np.ndarray  # key code per batch row
    keys: np.ndarray  # the key of each code

    @property
    def k(self) -> int:
        return len(self.keys)


@dataclass(frozen=True)
class _CustomerOrder:
    """The batch rows sorted by (customer, event time, arrival): each customer's events in turn."""

    rows: np.ndarray  # arrival position of each sorted row
    codes: np.ndarray  # customer code per sorted row
    times: np.ndarray  # event time per sorted row
    first: np.ndarray  # True on each customer's first sorted row
    group_start: np.ndarray  # sorted position of the first row of each row's customer

    def unsort(self, values: np.ndarray) -> np.ndarray:
        """Values per sorted row back in arrival order, as float64."""
        out = np.empty(len(values))
        out[self.rows] = values
        return out


@dataclass(frozen=True)
class _CustomerStart:
    """Each customer's balance and last event time (us, NaN if none) before the batch, by code."""

    balance: np.ndarray
    last_time: np.ndarray


@dataclass(frozen=True)
class _SpendHistory:
    """The customers' stored debits then the batch's rows, on one timeline."""

    timeline: _Timeline
    amounts: np.ndarray  # per timeline row
    # 1 per row that counts as spend: every stored row (the state keeps debits only), batch debits.
    weights: np.ndarray


@dataclass(frozen=True)
class _Locations:
    """The customers' stored locations and, per sorted batch row, whether its location is new."""

    stored_codes: np.ndarray  # customer code per stored location
    stored_values: np.ndarray  # the stored locations (object)
    sorted_codes: np.ndarray  # customer code per sorted batch row
    sorted_values: np.ndarray  # location per sorted batch row (object, None when absent)
    has: np.ndarray  # per sorted batch row: a location is given
    seen: np.ndarray  # per sorted batch row: stored, or earlier in the batch
    new: np.ndarray  # per sorted batch row: 1 for a location given and not seen, else 0


def compute_features(
    transactions: pa.Table, state: FeatureState, known_frauds: pa.Table | None = None
) -> FeatureResult:
    """Features of each transaction against the state just before it, and the state after the batch.

    The batch is processed in event-time order (arrival order breaks ties), after everything the
    state has seen. `known_frauds` may hold any frauds: one only counts for an event once it had
    been reported by the event's time, so replaying history with all labels leaks nothing.
    """
    batch = _read_batch(transactions)
    customers = _keys(state.customers, "customer_id", batch.customers)
    terminals = _keys(state.terminals, "terminal_id", batch.terminals)
    order = _customer_order(customers, batch.times)
    start = _customer_start(customers)
    balances = _balances(order, start, batch, customers.k)
    spend = _spend_history(customers, batch)
    locations = _locations(customers, order, batch.locations)
    terminal_days = _terminal_days(terminals, batch.times)
    frauds = _known_fraud_counts(batch.terminals, batch.times, known_frauds)
    values = {
        **_event_features(batch),
        **_balance_features(balances, order, batch),
        **_recency_features(order, start),
        **_location_features(locations, order, customers.k),
        **_spend_features(spend, batch.amounts),
        **_terminal_features(terminal_days, batch.times, frauds),
    }
    new_state = FeatureState(
        _new_customer_state(
            customers, balance=balances.after, spend=spend, locations=locations, batch=batch
        ),
        _new_terminal_state(terminals, terminal_days, batch.times),
    )
    return FeatureResult(_feature_table(transactions, values), new_state)


def feature_input(transactions: pa.Table) -> pa.Table:
    """`transactions` as FEATURE_INPUT_SCHEMA: the account columns null where not joined."""
    n = transactions.num_rows
    columns = [
        transactions[f.name] if f.name in transactions.column_names else pa.nulls(n, f.type)
        for f in FEATURE_INPUT_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=FEATURE_INPUT_SCHEMA)


def _objects(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=object)


def _floats(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


def _ints(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.int64)


def _read_batch(transactions: pa.Table) -> _Batch:
    amounts = _floats(transactions["amount"])
    is_debit = np.asarray(
        pc.equal(transactions["kind"], "debit").to_numpy(zero_copy_only=False), dtype=bool
    )
    n = transactions.num_rows
    names = set(transactions.column_names)

    def optional(name: str) -> np.ndarray:
        if name in names:
            return _objects(transactions[name])
        return np.full(n, None, dtype=object)

    if {"account_balance", "account_updated_at"} <= names:
        ledger_balance = _floats(transactions["account_balance"])
        ledger_time = _nullable_micros(transactions["account_updated_at"])
    else:
        ledger_balance = ledger_time = np.full(n, np.nan)
    return _Batch(
        customers=_objects(transactions["customer_id"]),
        terminals=_objects(transactions["terminal_id"]),
        times=_micros(transactions["event_time"]),
        amounts=amounts,
        is_debit=is_debit,
        balance_change=np.where(is_debit, -amounts, amounts),
        channels=_objects(transactions["channel"]),
        locations=_objects(transactions["location"]),
        ledger_balance=ledger_balance,
        ledger_time=ledger_time,
        account_status=optional("account_status"),
        card_status=optional("card_status"),
    )


def _nullable_micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A timestamp column in us as float64, NaN where null."""
    micros = pc.cast(column, pa.int64())
    return np.asarray(micros.to_numpy(zero_copy_only=False), dtype=np.float64)


def _keys(state: pa.Table, key: str, batch_keys: np.ndarray) -> _Keys:
    """Only the state rows of the batch's keys are read, so the state may hold any others."""
    rows = _select(state, key, np.unique(batch_keys))
    stored = _objects(rows[key])
    codes, keys = pd.factorize(np.concatenate([stored, batch_keys]))
    return _Keys(rows, codes[: len(stored)], codes[len(stored) :], keys)


def _customer_order(customers: _Keys, times: np.ndarray) -> _CustomerOrder:
    n = len(times)
    rows = np.lexsort((np.arange(n), times, customers.batch_codes))
    codes = customers.batch_codes[rows]
    first = np.ones(n, dtype=bool)
    first[1:] = codes[1:] != codes[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    return _CustomerOrder(rows, codes, times[rows], first, group_start)


def _stored(keys: _Keys, column: str, fill: float) -> np.ndarray:
    """A numeric state column by key code (`fill` for keys the state lacks)."""
    out = np.full(keys.k, fill, dtype=np.float64)
    if keys.state.num_rows:
        out[keys.state_codes] = _floats(keys.state[column])
    return out


def _stored_times(keys: _Keys, column: str) -> np.ndarray:
    """A timestamp state column by key code, in us as float (NaN where null or missing)."""
    out = np.full(keys.k, np.nan)
    if keys.state.num_rows:
        stamps = keys.state[column].to_numpy(zero_copy_only=False)
        micros = _micros(keys.state[column]).astype(np.float64)
        out[keys.state_codes] = np.where(pd.isna(stamps), np.nan, micros)
    return out


def _customer_start(customers: _Keys) -> _CustomerStart:
    return _CustomerStart(
        balance=np.nan_to_num(_stored(customers, "balance", 0.0)),
        last_time=_stored_times(customers, "last_event_time"),
    )


def _key_timeline(keys: _Keys, times: np.ndarray) -> _Timeline:
    """The keys' stored history times, then the batch's times, in processing order."""
    parents, stored_times = _flatten(keys.state, "history_times")
    return _timeline(keys.state_codes[parents], _micros(stored_times), keys.batch_codes, times)


def _spend_history(customers: _Keys, batch: _Batch) -> _SpendHistory:
    # Spend and velocity windows count debits only: salary and transfers in are not spending.
    stored_amounts = _floats(_flatten(customers.state, "history_amounts")[1])
    return _SpendHistory(
        timeline=_key_timeline(customers, batch.times),
        amounts=np.concatenate([stored_amounts, batch.amounts]),
        weights=np.concatenate([np.ones(len(stored_amounts)), batch.is_debit.astype(np.float64)]),
    )


def _locations(customers: _Keys, order: _CustomerOrder, locations: np.ndarray) -> _Locations:
    """A location is seen before an event if stored or at the customer's earlier batch rows."""
    has = ~pd.isna(locations)
    parents, stored = _flatten(customers.state, "locations")
    stored_codes = customers.state_codes[parents]
    stored_values = _objects(stored)
    stored_pairs = pd.MultiIndex.from_arrays([stored_codes, stored_values])
    pairs = pd.MultiIndex.from_arrays([customers.batch_codes, locations])
    in_state = np.asarray(pairs.isin(stored_pairs)) & has
    sorted_values = locations[order.rows]
    sorted_has = has[order.rows]
    earlier = pd.DataFrame({"c": order.codes, "l": sorted_values}).duplicated().to_numpy()
    seen = in_state[order.rows] | (earlier & sorted_has)
    return _Locations(
        stored_codes=stored_codes,
        stored_values=stored_values,
        sorted_codes=order.codes,
        sorted_values=sorted_values,
        has=sorted_has,
        seen=seen,
        new=(sorted_has & ~seen).astype(np.int64),
    )


def _event_features(batch: _Batch) -> dict[str, np.ndarray]:
    features = {"amount": batch.amounts, "is_debit": batch.is_debit.astype(np.float64)}
    has_channel = ~pd.isna(batch.channels)
    for name in CHANNELS:
        is_channel = (batch.channels == name).astype(np.float64)
        features[f"channel_{name}"] = np.where(has_channel, is_channel, np.nan)
    features["hour_of_day"] = ((batch.times // (3600 * _US)) % 24).astype(np.float64)
    features["card_blocked"] = _flag(batch.card_status, (CARD_BLOCKED,), (CARD_ACTIVE,))
    features["account_not_open"] = _flag(
        batch.account_status, (ACCOUNT_FROZEN, ACCOUNT_CLOSED), (ACCOUNT_OPEN,)
    )
    return features


def _flag(values: np.ndarray, yes: tuple[str, ...], no: tuple[str, ...]) -> np.ndarray:
    """1 for a value in `yes`, 0 in `no`, NaN otherwise (unknown: no account, another value)."""
    return np.where(np.isin(values, yes), 1.0, np.where(np.isin(values, no), 0.0, np.nan))


@dataclass(frozen=True)
class _Balances:
    """Each sorted batch row's balance before it, and each customer's balance after the batch."""

    before: np.ndarray  # per sorted row
    after: np.ndarray  # per customer code


def _balances(order: _CustomerOrder, start: _CustomerStart, batch: _Batch, k: int) -> _Balances:
    """The running balance, re-anchored on the bank's ledger at the first event after a posting.

    An event whose account version (ledger balance B, committed at U <= t) is newer than every
    event of the customer processed before it is the first one after that posting: the ledger
    holds everything up to U and nothing happened since, so its balance before is B exactly.
    Every other event continues from the event before it (or from the stored balance). Whether
    an event anchors depends only on the customer's earlier events, never on where batches were
    cut, and everything is accumulated per customer, so other customers in the batch change
    nothing either.
    """
    rows, codes = order.rows, order.codes
    change = batch.balance_change[rows]
    earlier = _prefix_sums(codes, change)[:-1]  # changes of the customer's earlier batch rows
    plain = start.balance[codes] + earlier
    # Summed in arrival order, as always: unchanged for customers without an anchored event.
    arrival_codes = np.empty_like(codes)
    arrival_codes[rows] = codes
    balance_after = start.balance + np.bincount(
        arrival_codes, weights=batch.balance_change, minlength=k
    )
    posted_at = batch.ledger_time[rows]
    ledger = batch.ledger_balance[rows]
    previous = np.concatenate([[np.nan], order.times[:-1].astype(np.float64)])
    previous = np.where(order.first, start.last_time[codes], previous)
    with np.errstate(invalid="ignore"):
        anchored = ~np.isnan(posted_at) & ~np.isnan(ledger)
        anchored &= np.isnan(previous) | (posted_at >= previous)
    if not anchored.any():
        return _Balances(plain, balance_after)
    # Other events: the last anchored earlier event's balance carried forward.
    n = len(rows)
    offset = np.where(anchored, ledger - earlier, np.nan)
    last = np.maximum.accumulate(np.where(anchored, np.arange(n), -1))
    carried = last >= order.group_start
    before = np.where(
        anchored, ledger, np.where(carried, offset[np.maximum(last, 0)] + earlier, plain)
    )
    # After the batch: from the customer's last event (only customers with an anchor differ).
    last_row = np.r_[order.first[1:], True]
    touched = np.zeros(k, dtype=bool)
    touched[codes[anchored]] = True
    ends = np.flatnonzero(last_row & touched[codes])
    balance_after[codes[ends]] = before[ends] + change[ends]
    return _Balances(before, balance_after)


def _balance_features(
    balances: _Balances, order: _CustomerOrder, batch: _Batch
) -> dict[str, np.ndarray]:
    balance_before = order.unsort(balances.before)
    return {
        "balance_before": balance_before,
        "amount_balance_ratio": batch.amounts / np.maximum(balance_before, 1.0),
    }


def _recency_features(order: _CustomerOrder, start: _CustomerStart) -> dict[str, np.ndarray]:
    previous_in_batch = np.concatenate([[np.nan], order.times[:-1].astype(np.float64)])
    previous = np.where(order.first, start.last_time[order.codes], previous_in_batch)
    return {"seconds_since_prev": order.unsort((order.times - previous) / _US)}


def _location_features(
    locations: _Locations, order: _CustomerOrder, k: int
) -> dict[str, np.ndarray]:
    n_stored = np.bincount(locations.stored_codes, minlength=k)
    # New locations of the customer's earlier batch rows: a running count restarted per customer.
    new_total = np.cumsum(locations.new)
    before_customer = np.where(order.group_start > 0, new_total[order.group_start - 1], 0)
    new_before = new_total - locations.new - before_customer
    seen = np.where(locations.has, locations.seen.astype(np.float64), np.nan)
    return {
        "location_seen_before": order.unsort(seen),
        "n_locations_seen": order.unsort(n_stored[order.codes] + new_before),
    }


def _spend_features(spend: _SpendHistory, amounts: np.ndarray) -> dict[str, np.ndarray]:
    sums = _window_sums(
        spend.timeline, spend.amounts * spend.weights, CUSTOMER_WINDOWS, weights=spend.weights
    )
    features: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for w, (count, total) in sums.items():
            features[f"count_{w}"] = count.astype(np.float64)
            features[f"mean_amount_{w}"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
        features["amount_to_mean_30d"] = amounts / features["mean_amount_30d"]
    return features


@dataclass(frozen=True)
class _TerminalDays:
    """The terminals' stored day counts (as rows at their day's start) then the batch's rows."""

    timeline: _Timeline
    weights: np.ndarray  # events per timeline row: a stored day's count, 1 per batch row


def _terminal_days(terminals: _Keys, times: np.ndarray) -> _TerminalDays:
    parents, days = _flatten(terminals.state, "days")
    counts = _ints(_flatten(terminals.state, "day_counts")[1])
    stored_times = _ints(days) * _DAY_US
    timeline = _timeline(terminals.state_codes[parents], stored_times, terminals.batch_codes, times)
    weights = np.concatenate([counts, np.ones(len(times), np.int64)]).astype(np.float64)
    return _TerminalDays(timeline, weights)


def _window_starts(times: np.ndarray) -> dict[str, np.ndarray]:
    """Per event, how far back each terminal window reaches (us): to its first day's start."""
    day_start = times // _DAY_US * _DAY_US
    return {w: times - (day_start - days * _DAY_US) + 1 for w, days in TERMINAL_WINDOWS.items()}


def _terminal_features(
    terminal_days: _TerminalDays, times: np.ndarray, fraud_counts: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    sums = _window_sums(
        terminal_days.timeline,
        terminal_days.weights,
        _window_starts(times),
        weights=terminal_days.weights,
    )
    features: dict[str, np.ndarray] = {}
    for w, (count, _) in sums.items():
        features[f"terminal_tx_count_{w}"] = count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(count > 0, fraud_counts[w] / np.maximum(count, 1), np.nan)
        features[f"terminal_fraud_rate_{w}"] = np.clip(rate, 0.0, 1.0)
    return features


def _feature_table(transactions: pa.Table, values: dict[str, np.ndarray]) -> pa.Table:
    """FEATURE_SCHEMA rows; fails if the steps computed other features than those declared."""
    if values.keys() != set(FEATURE_COLUMNS):
        raise AssertionError(f"computed {sorted(values)}, declared {FEATURE_COLUMNS}")
    return pa.Table.from_arrays(
        [transactions[c].combine_chunks() for c in KEY_COLUMNS]
        + [pa.array(values[c], type=pa.float64(), from_pandas=True) for c in FEATURE_COLUMNS],
        schema=FEATURE_SCHEMA,
    )


def _known_fraud_counts(
    term: np.ndarray, times: np.ndarray, known_frauds: pa.Table | None
) -> dict[str, np.ndarray]:
    """Frauds at the event's terminal inside each window that were reported by the event's time."""
    n = len(term)
    out = {w: np.zeros(n) for w in TERMINAL_WINDOWS}
    if known_frauds is None or known_frauds.num_rows == 0 or n == 0:
        return out
    fe = _micros(known_frauds["event_time"])
    fr = _micros(known_frauds["reported_at"])
    fterm = np.asarray(known_frauds["terminal_id"].to_numpy(zero_copy_only=False), dtype=object)
    useful = (
        (fr <= times.max())
        & (fe > times.min() - LOOKBACK_SECONDS * _US)
        & np.isin(fterm, np.unique(term))
    )
    if not useful.any():
        return out
    frauds = pd.DataFrame({"terminal_id": fterm[useful], "fe": fe[useful], "fr": fr[useful]})
    events = pd.DataFrame({"terminal_id": term, "t": times, "row": np.arange(n)})
    pairs = events.merge(frauds, on="terminal_id")
    t, pe, pr = pairs["t"].to_numpy(), pairs["fe"].to_numpy(), pairs["fr"].to_numpy()
    rows = pairs["row"].to_numpy()
    known = (pe <= t) & (pr <= t)
    fraud_day, event_day = pe // _DAY_US, t // _DAY_US
    for w, days in TERMINAL_WINDOWS.items():
        mask = known & (fraud_day >= event_day - days)
        out[w] = np.bincount(rows[mask], minlength=n).astype(np.float64)
    return out


def _lists(codes: np.ndarray, values: pa.Array, k: int) -> pa.ListArray:
    """One list per key code 0..k-1 from values already grouped by code in ascending order."""
    offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=k))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _timestamps(micros: np.ndarray) -> pa.Array:
    return pa.array(micros.astype(np.int64), pa.int64()).cast(TIMESTAMP)


def _history(
    tl: _Timeline, last: np.ndarray, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (processing order) of the rows still inside the longest window after the batch.

    `rows` (bool per timeline row) restricts the history to the rows worth keeping.
    """
    codes, times = tl.codes[tl.order], tl.times[tl.order]
    keep = times > last[codes] - HISTORY_SECONDS * _US
    if rows is not None:
        keep &= rows[tl.order]
    return tl.order[keep], codes[keep]


def _latest_times(keys: _Keys, times: np.ndarray) -> np.ndarray:
    """Latest event time (us) per key code, of the state's (nulls ignored) and the batch's."""
    latest = np.full(keys.k, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(latest, keys.batch_codes, times)
    if keys.state.num_rows:
        stored = pc.fill_null(
            pc.cast(keys.state["last_event_time"], pa.int64()), np.iinfo(np.int64).min
        )
        latest[keys.state_codes] = np.maximum(latest[keys.state_codes], _ints(stored))
    return latest


def _event_counts(keys: _Keys) -> np.ndarray:
    """Events per key code so far: the state's count plus the batch's."""
    counts = np.bincount(keys.batch_codes, minlength=keys.k).astype(np.int64)
    if keys.state.num_rows:
        counts[keys.state_codes] += _ints(keys.state["n_transactions"])
    return counts


def _location_lists(locations: _Locations, k: int) -> pa.ListArray:
    """Each customer's stored locations, then its new ones in the order first seen."""
    added = locations.new.astype(bool)
    codes = np.concatenate([locations.stored_codes, locations.sorted_codes[added]])
    values = np.concatenate([locations.stored_values, locations.sorted_values[added]])
    order = np.argsort(codes, kind="stable")
    return _lists(codes[order], pa.array(values[order], pa.string()), k)


def _new_customer_state(
    customers: _Keys,
    *,
    balance: np.ndarray,
    spend: _SpendHistory,
    locations: _Locations,
    batch: _Batch,
) -> pa.Table:
    k = customers.k
    latest = _latest_times(customers, batch.times)
    keep, codes = _history(spend.timeline, latest, spend.weights.astype(bool))
    return pa.Table.from_arrays(
        [
            pa.array(customers.keys, pa.string()),
            pa.array(balance, pa.float64()),
            _timestamps(latest),
            pa.array(_event_counts(customers), pa.int64()),
            _location_lists(locations, k),
            _lists(codes, _timestamps(spend.timeline.times[keep]), k),
            _lists(codes, pa.array(spend.amounts[keep], pa.float64()), k),
        ],
        schema=CUSTOMER_STATE_SCHEMA,
    )


def _new_terminal_state(
    terminals: _Keys, terminal_days: _TerminalDays, times: np.ndarray
) -> pa.Table:
    """Per terminal, its events per day: the stored days and the batch's, the last ones only."""
    latest = _latest_times(terminals, times)
    tl = terminal_days.timeline
    days = tl.times // _DAY_US
    keep = days >= latest[tl.codes] // _DAY_US - TERMINAL_DAYS
    frame = pd.DataFrame(
        {"code": tl.codes[keep], "day": days[keep], "n": terminal_days.weights[keep]}
    )
    per_day = frame.groupby(["code", "day"], sort=True)["n"].sum()
    codes = per_day.index.get_level_values("code").to_numpy()
    return pa.Table.from_arrays(
        [
            pa.array(terminals.keys, pa.string()),
            _timestamps(latest),
            pa.array(_event_counts(terminals), pa.int64()),
            _lists(codes, pa.array(per_day.index.get_level_values("day"), pa.int64()), terminals.k),
            _lists(codes, pa.array(np.rint(per_day.to_numpy()).astype(np.int64)), terminals.k),
        ],
        schema=TERMINAL_STATE_SCHEMA,
    )


def known_frauds(transactions: pa.Table, labels: pa.Table) -> pa.Table:
    """Fraud labels joined to their transactions' terminal and time (KNOWN_FRAUD_SCHEMA)."""
    frauds = labels.filter(pc.equal(labels["is_fraud"], True)).select(
        ["transaction_id", "reported_at"]
    )
    joined = transactions.select(["transaction_id", "terminal_id", "event_time"]).join(
        frauds, "transaction_id", join_type="inner"
    )
    return joined.select(KNOWN_FRAUD_SCHEMA.names).cast(KNOWN_FRAUD_SCHEMA)


def time_chunks(transactions: pa.Table, seconds: int = 86_400) -> Iterator[pa.Table]:
    """Split a time-sorted table into consecutive event-time chunks (micro-batches of history)."""
    times = _micros(transactions["event_time"])
    if len(times) == 0:
        return
    if np.any(np.diff(times) < 0):
        raise ValueError("transactions must be sorted by event_time to be replayed")
    bucket = (times - times[0]) // (seconds * _US)
    bounds = np.flatnonzero(np.diff(bucket)) + 1
    start = 0
    for end in [*bounds.tolist(), len(times)]:
        yield transactions.slice(start, end - start)
        start = end


def replay(
    transactions: pa.Table,
    labels: pa.Table | None = None,
    state: FeatureState | None = None,
    chunk_seconds: int = 86_400,
    accounts: pa.Table | None = None,
) -> FeatureResult:
    """Replay history through `compute_features` in event-time chunks: features as they were.

    This is how training gets point-in-time features without a feature log: every transaction
    sees only earlier transactions, only labels reported before it and, with `accounts` (the
    `accounts_history` SCD 2 versions), the bank's account as of its time.
    """
    transactions = transactions.sort_by([("event_time", "ascending")])
    if accounts is not None:
        transactions = with_accounts(transactions, accounts)
    frauds = known_frauds(transactions, labels) if labels is not None else None
    current = state or FeatureState.empty()
    parts = []
    for chunk in time_chunks(transactions, chunk_seconds):
        result = compute_features(chunk, current, frauds)
        parts.append(result.features)
        current = current.updated(result.state)
    features = pa.concat_tables(parts) if parts else FEATURE_SCHEMA.empty_table()
    return FeatureResult(features, current)
