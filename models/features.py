"""The stateful feature definition: (state, events in time order) -> (features, new state).

One pure function on Arrow/pandas, with no I/O, so the in-process runner, the history replay used
for training and a Spark executor all compute the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.schema import CHANNELS, TIMESTAMP

FEATURE_VERSION = "1"

# Sliding event-time windows over the customer's own earlier transactions.
CUSTOMER_WINDOWS: dict[str, int] = {"1h": 3600, "1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
# Windows over the terminal's transactions, for the share already reported as fraud.
TERMINAL_WINDOWS: dict[str, int] = {"1d": 86_400, "7d": 7 * 86_400, "30d": 30 * 86_400}
HISTORY_SECONDS = max(max(CUSTOMER_WINDOWS.values()), max(TERMINAL_WINDOWS.values()))

FEATURE_COLUMNS: list[str] = [
    "amount",
    "is_debit",
    "balance_before",
    "amount_balance_ratio",
    "location_seen_before",
    "n_locations_seen",
    "seconds_since_prev",
    *[f"{stat}_{w}" for w in CUSTOMER_WINDOWS for stat in ("count", "mean_amount")],
    "amount_to_mean_30d",
    *[f"terminal_{stat}_{w}" for w in TERMINAL_WINDOWS for stat in ("tx_count", "fraud_rate")],
    "channel_atm",
    "channel_pos",
    "channel_online",
    "channel_wire",
    "hour_of_day",
]
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
        pa.field("history_times", pa.list_(TIMESTAMP)),
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
        *[pa.field(name, pa.float64()) for name in FEATURE_COLUMNS],
    ]
)

_US = 1_000_000


@dataclass(frozen=True)
class FeatureState:
    """Per-customer and per-terminal state; one row per key (CUSTOMER/TERMINAL_STATE_SCHEMA)."""

    customers: pa.Table
    terminals: pa.Table

    @classmethod
    def empty(cls) -> FeatureState:
        return cls(CUSTOMER_STATE_SCHEMA.empty_table(), TERMINAL_STATE_SCHEMA.empty_table())

    def updated(self, changed: FeatureState) -> FeatureState:
        """This state with `changed`'s rows replacing (or adding) theirs: an in-memory upsert."""
        return FeatureState(
            _upsert(self.customers, changed.customers, "customer_id"),
            _upsert(self.terminals, changed.terminals, "terminal_id"),
        )


@dataclass(frozen=True)
class FeatureResult:
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
    tl: _Timeline, values: np.ndarray, windows: dict[str, int], weights: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Count and sum of `values` over earlier rows of the same key in each window, per batch row.

    Earlier means before the row in processing order and with event time > t - window. With
    `weights` (0/1 per row), only rows of weight 1 are counted.
    """
    n_batch = len(tl.codes) - tl.n_hist
    out = {w: (np.zeros(n_batch, np.int64), np.zeros(n_batch)) for w in windows}
    if n_batch == 0:
        return out
    codes = tl.codes[tl.order]
    times = tl.times[tl.order]
    vals = values[tl.order]
    csum = _prefix_sums(codes, vals)
    wsum = None if weights is None else _prefix_sums(codes, weights[tl.order])
    wmax = max(windows.values()) * _US
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
        for w, seconds in windows.items():
            query = packed[local] - seconds * _US
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


def compute_features(
    transactions: pa.Table, state: FeatureState, known_frauds: pa.Table | None = None
) -> FeatureResult:
    """Features of each transaction against the state just before it, and the state after the batch.

    The batch is processed in event-time order (arrival order breaks ties), after everything the
    state has seen. `known_frauds` may hold any frauds: one only counts for an event once it had
    been reported by the event's time, so replaying history with all labels leaks nothing.
    """
    n = transactions.num_rows
    cust = np.asarray(transactions["customer_id"].to_numpy(zero_copy_only=False), dtype=object)
    term = np.asarray(transactions["terminal_id"].to_numpy(zero_copy_only=False), dtype=object)
    times = _micros(transactions["event_time"])
    amount = np.asarray(transactions["amount"].to_numpy(zero_copy_only=False), dtype=np.float64)
    is_debit = np.asarray(
        pc.equal(transactions["kind"], "debit").to_numpy(zero_copy_only=False), dtype=bool
    )
    signed = np.where(is_debit, -amount, amount)

    cstate = _select(state.customers, "customer_id", np.unique(cust))
    tstate = _select(state.terminals, "terminal_id", np.unique(term))
    feats: dict[str, np.ndarray] = {"amount": amount, "is_debit": is_debit.astype(np.float64)}

    # --- customers -------------------------------------------------------------------------
    c_ids = np.asarray(cstate["customer_id"].to_numpy(zero_copy_only=False), dtype=object)
    codes, uniques = pd.factorize(np.concatenate([c_ids, cust]))
    state_code, batch_code = codes[: len(c_ids)], codes[len(c_ids) :]
    k = len(uniques)
    parents, hist_t = _flatten(cstate, "history_times")
    _, hist_a = _flatten(cstate, "history_amounts")
    tl = _timeline(state_code[parents], _micros(hist_t), batch_code, times)
    hist_amounts = np.asarray(hist_a.to_numpy(zero_copy_only=False), dtype=np.float64)
    # Spend and velocity windows count debits only: salary and transfers in are not spending.
    # The state's history holds debits only, so every history row counts.
    spend = np.concatenate([np.ones(len(hist_amounts)), is_debit.astype(np.float64)])
    amounts = np.concatenate([hist_amounts, amount])
    sums = _window_sums(tl, amounts * spend, CUSTOMER_WINDOWS, weights=spend)
    for w, (count, total) in sums.items():
        feats[f"count_{w}"] = count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            feats[f"mean_amount_{w}"] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    with np.errstate(invalid="ignore", divide="ignore"):
        feats["amount_to_mean_30d"] = amount / feats["mean_amount_30d"]

    # Per-key values from the state, indexed by key code (NaN / 0 for keys the state lacks).
    def by_code(column: str, fill: float) -> np.ndarray:
        out = np.full(k, fill, dtype=np.float64)
        if len(c_ids):
            vals = cstate[column].to_numpy(zero_copy_only=False)
            if column == "last_event_time":
                vals = np.where(pd.isna(vals), np.nan, _micros(cstate[column]).astype(np.float64))
            out[state_code] = np.asarray(vals, dtype=np.float64)
        return out

    state_balance = np.nan_to_num(by_code("balance", 0.0))
    state_last = by_code("last_event_time", np.nan)

    # Processing order of the batch rows only: (customer, time, arrival).
    border = np.lexsort((np.arange(n), times, batch_code))
    bc, bt = batch_code[border], times[border]
    first = np.ones(n, dtype=bool)
    first[1:] = bc[1:] != bc[:-1]
    group_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    before = _prefix_sums(bc, signed[border])[:-1]
    balance_before = np.empty(n)
    balance_before[border] = state_balance[bc] + before
    feats["balance_before"] = balance_before
    feats["amount_balance_ratio"] = amount / np.maximum(balance_before, 1.0)
    prev = np.where(first, state_last[bc], np.concatenate([[np.nan], bt[:-1].astype(np.float64)]))
    since = np.empty(n)
    since[border] = (bt - prev) / _US
    feats["seconds_since_prev"] = since

    # Locations: seen before this event = in the state's set or earlier in the batch.
    loc_col = transactions["location"]
    loc = np.asarray(loc_col.to_numpy(zero_copy_only=False), dtype=object)
    has_loc = ~pd.isna(loc)
    lp, lv = _flatten(cstate, "locations")
    state_pairs = pd.MultiIndex.from_arrays(
        [state_code[lp], np.asarray(lv.to_numpy(zero_copy_only=False), dtype=object)]
    )
    pairs = pd.MultiIndex.from_arrays([batch_code, loc])
    in_state = np.asarray(pairs.isin(state_pairs)) & has_loc
    sorted_pairs = pd.DataFrame({"c": bc, "l": loc[border]})
    dup_sorted = sorted_pairs.duplicated().to_numpy() & has_loc[border]
    seen_sorted = in_state[border] | dup_sorted
    new_sorted = (has_loc[border] & ~seen_sorted).astype(np.int64)
    n_state_locs = np.bincount(state_code[lp], minlength=k) if len(lp) else np.zeros(k, np.int64)
    cum_new = np.cumsum(new_sorted)
    new_before = cum_new - new_sorted - np.where(group_start > 0, cum_new[group_start - 1], 0)
    n_locs = np.empty(n)
    n_locs[border] = n_state_locs[bc] + new_before
    seen = np.empty(n)
    seen[border] = np.where(has_loc[border], seen_sorted.astype(np.float64), np.nan)
    feats["location_seen_before"] = seen
    feats["n_locations_seen"] = n_locs

    # --- terminals -------------------------------------------------------------------------
    t_ids = np.asarray(tstate["terminal_id"].to_numpy(zero_copy_only=False), dtype=object)
    tcodes, tuniques = pd.factorize(np.concatenate([t_ids, term]))
    t_state_code, t_batch_code = tcodes[: len(t_ids)], tcodes[len(t_ids) :]
    tparents, thist = _flatten(tstate, "history_times")
    ttl = _timeline(t_state_code[tparents], _micros(thist), t_batch_code, times)
    tsums = _window_sums(ttl, np.ones(len(ttl.codes)), TERMINAL_WINDOWS)
    fraud_counts = _known_fraud_counts(term, times, known_frauds)
    for w, (count, _) in tsums.items():
        feats[f"terminal_tx_count_{w}"] = count.astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = np.where(count > 0, fraud_counts[w] / np.maximum(count, 1), np.nan)
        feats[f"terminal_fraud_rate_{w}"] = np.clip(rate, 0.0, 1.0)

    # --- event attributes ------------------------------------------------------------------
    channel = np.asarray(transactions["channel"].to_numpy(zero_copy_only=False), dtype=object)
    has_channel = ~pd.isna(channel)
    for name in CHANNELS:
        feats[f"channel_{name}"] = np.where(
            has_channel, (channel == name).astype(np.float64), np.nan
        )
    feats["hour_of_day"] = ((times // (3600 * _US)) % 24).astype(np.float64)

    features = pa.Table.from_arrays(
        [
            transactions[c].combine_chunks()
            if isinstance(transactions[c], pa.ChunkedArray)
            else transactions[c]
            for c in KEY_COLUMNS
        ]
        + [pa.array(feats[c], type=pa.float64(), from_pandas=True) for c in FEATURE_COLUMNS],
        schema=FEATURE_SCHEMA,
    )
    new_state = FeatureState(
        _new_customer_state(
            cstate,
            state_code,
            uniques,
            tl,
            amounts,
            spend.astype(bool),
            state_balance,
            state_last,
            batch_code,
            signed,
            times,
            lp,
            lv,
            bc,
            loc[border],
            new_sorted,
        ),
        _new_terminal_state(tstate, t_state_code, tuniques, ttl, t_batch_code, times),
    )
    return FeatureResult(features, new_state)


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
    wmax = max(TERMINAL_WINDOWS.values()) * _US
    useful = (fr <= times.max()) & (fe > times.min() - wmax) & np.isin(fterm, np.unique(term))
    if not useful.any():
        return out
    frauds = pd.DataFrame({"terminal_id": fterm[useful], "fe": fe[useful], "fr": fr[useful]})
    events = pd.DataFrame({"terminal_id": term, "t": times, "row": np.arange(n)})
    pairs = events.merge(frauds, on="terminal_id")
    t, pe, pr = pairs["t"].to_numpy(), pairs["fe"].to_numpy(), pairs["fr"].to_numpy()
    rows = pairs["row"].to_numpy()
    known = (pe <= t) & (pr <= t)
    for w, seconds in TERMINAL_WINDOWS.items():
        mask = known & (pe > t - seconds * _US)
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


def _new_customer_state(
    cstate: pa.Table,
    state_code: np.ndarray,
    uniques: np.ndarray,
    tl: _Timeline,
    amounts: np.ndarray,
    is_spend: np.ndarray,
    state_balance: np.ndarray,
    state_last: np.ndarray,
    batch_code: np.ndarray,
    signed: np.ndarray,
    times: np.ndarray,
    loc_parents: np.ndarray,
    loc_values: pa.Array,
    sorted_codes: np.ndarray,
    sorted_locs: np.ndarray,
    new_sorted: np.ndarray,
) -> pa.Table:
    k = len(uniques)
    balance = state_balance + np.bincount(batch_code, weights=signed, minlength=k)
    batch_last = np.full(k, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(batch_last, batch_code, times)
    last = np.fmax(state_last, batch_last.astype(np.float64)).astype(np.int64)
    n_tx = np.zeros(k, np.int64)
    if cstate.num_rows:
        n_tx[state_code] = np.asarray(
            cstate["n_transactions"].to_numpy(zero_copy_only=False), np.int64
        )
    n_tx += np.bincount(batch_code, minlength=k)

    old_locs = np.asarray(loc_values.to_numpy(zero_copy_only=False), dtype=object)
    added = new_sorted.astype(bool)
    loc_codes = np.concatenate([state_code[loc_parents], sorted_codes[added]])
    loc_vals = np.concatenate([old_locs, sorted_locs[added]])
    lorder = np.argsort(loc_codes, kind="stable")
    locations = _lists(loc_codes[lorder], pa.array(loc_vals[lorder], pa.string()), k)

    keep, hcodes = _history(tl, last, is_spend)
    history_times = _lists(hcodes, _timestamps(tl.times[keep]), k)
    history_amounts = _lists(hcodes, pa.array(amounts[keep], pa.float64()), k)
    return pa.Table.from_arrays(
        [
            pa.array(uniques, pa.string()),
            pa.array(balance, pa.float64()),
            _timestamps(last),
            pa.array(n_tx, pa.int64()),
            locations,
            history_times,
            history_amounts,
        ],
        schema=CUSTOMER_STATE_SCHEMA,
    )


def _new_terminal_state(
    tstate: pa.Table,
    state_code: np.ndarray,
    uniques: np.ndarray,
    tl: _Timeline,
    batch_code: np.ndarray,
    times: np.ndarray,
) -> pa.Table:
    k = len(uniques)
    last = np.full(k, np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(last, batch_code, times)
    n_tx = np.bincount(batch_code, minlength=k).astype(np.int64)
    if tstate.num_rows:
        old_last = _micros(tstate["last_event_time"])
        last[state_code] = np.maximum(last[state_code], old_last)
        n_tx[state_code] += np.asarray(
            tstate["n_transactions"].to_numpy(zero_copy_only=False), np.int64
        )
    keep, hcodes = _history(tl, last.astype(np.float64))
    return pa.Table.from_arrays(
        [
            pa.array(uniques, pa.string()),
            _timestamps(last),
            pa.array(n_tx, pa.int64()),
            _lists(hcodes, _timestamps(tl.times[keep]), k),
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
) -> FeatureResult:
    """Replay history through `compute_features` in event-time chunks: features as they were.

    This is how training gets point-in-time features without a feature log: every transaction
    sees only earlier transactions and only labels reported before it.
    """
    transactions = transactions.sort_by([("event_time", "ascending")])
    frauds = known_frauds(transactions, labels) if labels is not None else None
    current = state or FeatureState.empty()
    parts = []
    for chunk in time_chunks(transactions, chunk_seconds):
        result = compute_features(chunk, current, frauds)
        parts.append(result.features)
        current = current.updated(result.state)
    features = pa.concat_tables(parts) if parts else FEATURE_SCHEMA.empty_table()
    return FeatureResult(features, current)
