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
# 4: bounded customer state (7d/30d spend windows in calendar days, sums in cents), terminal
# counts and risk over windows shifted by the label delay, weekend/night, amount and velocity
# relative to the customer's own norm.
FEATURE_VERSION = "4"

# Exact sliding event-time windows over the customer's own earlier debits: the state keeps the
# customer's debits of the last day, however many, which a day's activity bounds.
CUSTOMER_WINDOWS: dict[str, int] = {"1h": 3600, "1d": 86_400}
# Calendar-day windows (UTC) over the customer's debits: "w days" is the event's day so far and
# the w days before it, from one count and one sum per day (at most 31 days kept per customer).
CUSTOMER_DAY_WINDOWS: dict[str, int] = {"7d": 7, "30d": 30}
# Windows over the terminal's transactions, also calendar days: the share already reported as
# fraud (`terminal_fraud_rate_*`, which any label reported by the event's time feeds), and the
# same counts shifted back by the label delay (`terminal_*_delayed`: the w days that end D days
# (the label delay, below) before the event's day, old enough for most of their frauds to be
# known, as in Le Borgne et al.'s handbook). A terminal's state is one count per day, whatever
# its traffic.
TERMINAL_WINDOWS: dict[str, int] = {"1d": 1, "7d": 7, "30d": 30}  # days before the event's day
# The label delay D the shifted windows assume by default: training estimates it from the
# reporting delays of the labels (`models.label_delay`: a high quantile, this when too few labels
# are old enough), up to MAX_LABEL_DELAY_DAYS, which the terminal's kept days cover. D is part of
# the feature version (`feature_version`: FEATURE_VERSION itself for this default), stored with
# the model, and a model scores only features computed with its own D.
LABEL_DELAY_DAYS = 7
MAX_LABEL_DELAY_DAYS = 14
CUSTOMER_DAYS = max(CUSTOMER_DAY_WINDOWS.values())
TERMINAL_DAYS = max(TERMINAL_WINDOWS.values()) + MAX_LABEL_DELAY_DAYS
# How long a customer's exact debits are kept: the longest exact window.
EXACT_SECONDS = max(CUSTOMER_WINDOWS.values())
# How far back a fraud can still count for an event: the longest terminal window's first day.
LOOKBACK_SECONDS = (TERMINAL_DAYS + 1) * 86_400


class FeatureVersionError(ValueError):
    """Features computed with one version were about to be scored by a model of another."""


def feature_version(label_delay_days: int = LABEL_DELAY_DAYS) -> str:
    """The feature version of features computed with this delay: a model scores only its own.

    FEATURE_VERSION itself for the default delay (so the tables and models from before the delay
    was estimated stay valid), else FEATURE_VERSION + ".d<days>" (e.g. "4.d3").
    """
    _check_delay(label_delay_days)
    if label_delay_days == LABEL_DELAY_DAYS:
        return FEATURE_VERSION
    return f"{FEATURE_VERSION}.d{label_delay_days}"


def label_delay_of(version: str) -> int:
    """The delay a feature version's shifted windows use, so a scorer can compute them alike.

    Raises FeatureVersionError for a version this code cannot compute (another FEATURE_VERSION).
    """
    if version == FEATURE_VERSION:
        return LABEL_DELAY_DAYS
    base, _, suffix = version.partition(".d")
    # One spelling per delay: "4.d3", never "4.d03" nor "4.d7" (that is "4").
    if (
        base == FEATURE_VERSION
        and suffix.isdigit()
        and int(suffix) <= MAX_LABEL_DELAY_DAYS
        and feature_version(int(suffix)) == version
    ):
        return int(suffix)
    raise FeatureVersionError(
        f"feature version {version!r} cannot be computed by this code (FEATURE_VERSION "
        f"{FEATURE_VERSION}, delays 0..{MAX_LABEL_DELAY_DAYS}): retrain the model"
    )


def _check_delay(label_delay_days: int) -> None:
    if not 0 <= label_delay_days <= MAX_LABEL_DELAY_DAYS:
        raise ValueError(f"label_delay_days must be 0..{MAX_LABEL_DELAY_DAYS}: {label_delay_days}")


# The schema metadata key under which a feature table says which version computed it.
_VERSION_KEY = b"streamguard.feature_version"


def with_feature_version(features: pa.Table, label_delay_days: int) -> pa.Table:
    """`features` marked with the version they were computed at, for `check_feature_version`."""
    return features.replace_schema_metadata({_VERSION_KEY: feature_version(label_delay_days)})


def feature_version_of(features: pa.Table) -> str:
    """The version a feature table is marked with; unmarked tables are the default version."""
    metadata = features.schema.metadata or {}
    return metadata.get(_VERSION_KEY, FEATURE_VERSION.encode()).decode()


def check_feature_version(features: pa.Table, model_version: str, what: str = "the model") -> None:
    """Refuse to score features of another version than the model's: the numbers would differ.

    `model_version` is the model's `feature_version` tag; `what` names it in the error.
    """
    computed = feature_version_of(features)
    if computed != model_version:
        raise FeatureVersionError(
            f"{what} was trained on feature version {model_version} but the features were "
            f"computed at version {computed}: compute them with the model's label delay "
            f"(`label_delay_of({model_version!r})`) before scoring"
        )


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
        for w in [*CUSTOMER_WINDOWS, *CUSTOMER_DAY_WINDOWS]
        for feature in (
            Feature(f"count_{w}", "customer", f"The customer's debits in the last {w}."),
            Feature(
                f"mean_amount_{w}", "customer", f"Mean amount of those debits in the last {w}."
            ),
        )
    ),
    Feature("amount_to_mean_7d", "customer", "Amount over the customer's 7-day mean debit."),
    Feature("amount_to_mean_30d", "customer", "Amount over the customer's 30-day mean debit."),
    Feature(
        "velocity_1d_to_30d",
        "customer",
        "Debits in the last day over the customer's daily mean of the 30-day window.",
    ),
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
    *(
        feature
        for w, d in TERMINAL_WINDOWS.items()
        for feature in (
            Feature(
                f"terminal_tx_count_{w}_delayed",
                "terminal",
                f"The terminal's events in the {d} day(s) ending D days before the event's day"
                f" (D: the model's label delay, {LABEL_DELAY_DAYS} by default).",
            ),
            Feature(
                f"terminal_risk_{w}_delayed",
                "terminal",
                f"Share of those reported as fraud by the event's time ({w}, delayed).",
            ),
        )
    ),
    *(Feature(f"channel_{c}", "event", f"1 if the channel is {c}.") for c in CHANNELS),
    Feature("hour_of_day", "event", "The event time's hour (UTC)."),
    Feature("is_weekend", "event", "1 on a Saturday or Sunday (UTC)."),
    Feature("is_night", "event", "1 between midnight and 6 am (UTC)."),
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

# The only features the label delay D changes: two versions that differ in D alone differ there.
DELAYED_FEATURES: list[str] = [c for c in FEATURE_COLUMNS if c.endswith("_delayed")]


def at_version(column: str, version: str) -> str:
    """The name a table stores `column` under as computed at feature `version`, next to the
    column of its own version (a holdout that two models of other delays are compared on)."""
    return f"{column}@{version}"


def features_at_version(frame: pd.DataFrame, version: str) -> pd.DataFrame | None:
    """`frame` with its delay-dependent features replaced by those stored for `version`
    (`at_version`), None when it holds none for that version or it is another base version."""
    try:
        label_delay_of(version)
    except FeatureVersionError:
        return None
    stored = {at_version(c, version): c for c in DELAYED_FEATURES}
    if not set(stored) <= set(frame.columns):
        return None
    return frame.drop(columns=DELAYED_FEATURES).rename(columns=stored)


# Identifies the event a feature row belongs to; comes before FEATURE_COLUMNS in the output.
KEY_COLUMNS: list[str] = ["transaction_id", "event_time", "customer_id", "terminal_id"]

CUSTOMER_STATE_SCHEMA = pa.schema(
    [
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("balance", pa.float64()),
        pa.field("last_event_time", TIMESTAMP),
        pa.field("n_transactions", pa.int64()),
        pa.field("locations", pa.list_(pa.string())),
        # The customer's debits of the last EXACT_SECONDS before its last event.
        pa.field("history_times", pa.list_(TIMESTAMP)),
        pa.field("history_amounts", pa.list_(pa.float64())),
        # Its debits per UTC day (days since 1970-01-01), the last CUSTOMER_DAYS + 1: how many
        # and their sum in cents (integers, so sums never depend on how batches were cut).
        pa.field("days", pa.list_(pa.int64())),
        pa.field("day_counts", pa.list_(pa.int64())),
        pa.field("day_cents", pa.list_(pa.int64())),
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


def _select(state: pa.Table, key: str, values: pa.Array) -> pa.Table:
    if state.num_rows == 0:
        return state
    keep = pc.is_in(state[key], value_set=values)
    if pc.all(keep).as_py():
        return state  # only the batch's keys already (as `load_state` reads it): no copy
    return state.filter(keep)


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
    # Gathered once into processing order for the window sums and the state lists built on them.
    sorted_codes: np.ndarray  # codes[order]: ascending
    sorted_times: np.ndarray  # times[order]
    batch_pos: np.ndarray  # processing positions of the batch rows, ascending
    batch_rows: np.ndarray  # the arrival index (0..n_batch-1) of the batch row at each of them


def _timeline(
    hist_codes: np.ndarray, hist_times: np.ndarray, codes: np.ndarray, times: np.ndarray
) -> _Timeline:
    all_codes = np.concatenate([hist_codes, codes])
    all_times = np.concatenate([hist_times, times])
    n_hist = len(hist_codes)
    order = _processing_order(all_codes, all_times, n_hist)
    batch_pos = np.flatnonzero(order >= n_hist)
    return _Timeline(
        order,
        all_codes,
        all_times,
        n_hist,
        sorted_codes=all_codes[order],
        sorted_times=all_times[order],
        batch_pos=batch_pos,
        batch_rows=order[batch_pos] - n_hist,
    )


def _processing_order(codes: np.ndarray, times: np.ndarray, n_hist: int) -> np.ndarray:
    """Key, then time; at equal times history came first, then the batch in arrival order.

    (code, time, is batch) packed into one int64 when it fits, sorted by one stable argsort (the
    concatenation order breaks the remaining ties): the stored history is already a sorted run,
    which the stable sort (timsort) merges with the batch's rows, ~8x faster than the 4-key
    lexsort it replaces (the fallback for codes or times that do not fit).
    """
    n = len(codes)
    if n == 0:
        return np.zeros(0, dtype=np.intp)
    tmin, tmax = int(times.min()), int(times.max())
    span = tmax - tmin + 1
    if int(codes.min()) >= 0 and (int(codes.max()) + 1) * span * 2 < 2**63:
        key = (codes.astype(np.int64) * span + (times - tmin)) * 2
        key[n_hist:] += 1
        return np.argsort(key, kind="stable")
    is_batch = np.concatenate([np.zeros(n_hist, np.int8), np.ones(n - n_hist, np.int8)])
    return np.lexsort((np.arange(n), is_batch, times, codes))


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


def _window_prefix(codes: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Prefix sums whose difference `p[end] - p[start]` sums one key's rows start..end-1.

    Whole numbers >= 0 (counts, cents) totalling at most 2**52 sum exactly in float64 in any
    order, so one int64 cumsum over all keys gives every such difference as the same integer as
    the per-key float sums (`_prefix_sums`, used for any other values), several times faster.
    """
    whole = _whole_numbers(values)
    if whole is None:
        return _prefix_sums(codes, values)
    out = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(whole, out=out[1:])
    return out


def _whole_numbers(values: np.ndarray) -> np.ndarray | None:
    """`values` as int64 if all are whole numbers >= +0.0 with a total of at most 2**52."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    # signbit: negatives and -0.0; a NaN or inf total fails the bound.
    if np.signbit(values).any() or not values.sum() <= 2**52:
        return None
    whole = values.astype(np.int64)
    return whole if np.array_equal(whole, values) else None


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
    codes, times = tl.sorted_codes, tl.sorted_times
    csum = _window_prefix(codes, values[tl.order])
    if weights is None:
        wsum = None
    elif weights is values:  # a terminal's rows: counted and summed alike
        wsum = csum
    else:
        wsum = _window_prefix(codes, weights[tl.order])
    wmax = max(int(o.max()) for o in offsets.values())
    tmin = int(times.min())
    span = int(times.max()) - tmin + wmax + 1
    rel = times - tmin + wmax
    # Keys are (code, time) packed into one int64; split the codes into groups that fit. The
    # codes ascend in processing order, so a group is one run of positions [g0, g1).
    per_group = max(1, (2**62) // span)
    batch_pos = tl.batch_pos
    one_group = int(codes[-1]) < per_group  # the usual case
    for g in [0] if one_group else np.unique(codes[batch_pos] // per_group).tolist():
        g0, g1 = np.searchsorted(codes, [g * per_group, (g + 1) * per_group]).tolist()
        b0, b1 = np.searchsorted(batch_pos, [g0, g1]).tolist()
        packed = (codes[g0:g1] - g * per_group) * span + rel[g0:g1]
        local = batch_pos[b0:b1] - g0  # position of each batch row inside the group
        rows = tl.batch_rows[b0:b1]
        # What every window reads at the batch rows themselves, gathered once for all windows.
        here = packed[local]
        csum_here = csum[g0 + local]
        wsum_here = None if wsum is None else wsum[g0 + local]
        for w, offset in offsets.items():
            start = np.searchsorted(packed, here - offset[rows], side="right")
            # start == local (empty window) gives exactly 0; otherwise both prefixes are sums of
            # this key's own rows, so the result never depends on which other keys share the batch.
            summed = csum_here - csum[g0 + start]
            if wsum is None or wsum_here is None:  # (both or neither)
                count = local - start
            else:
                counted = summed if wsum is csum else wsum_here - wsum[g0 + start]
                count = counted if counted.dtype == np.int64 else np.rint(counted).astype(np.int64)
            out[w][0][rows] = count
            out[w][1][rows] = summed
    return out


def _offsets(window: int | np.ndarray, n: int) -> np.ndarray:
    """A window as microseconds per batch row."""
    if isinstance(window, np.ndarray):
        return window.astype(np.int64)
    return np.full(n, window * _US, np.int64)


@dataclass(frozen=True)
class _Batch:
    """The batch's columns as numpy arrays, in arrival order."""

    times: np.ndarray  # event time (us)
    amounts: np.ndarray
    is_debit: np.ndarray  # bool
    balance_change: np.ndarray  # -amount for a debit, +amount for a credit
    channels: np.ndarray  # object, None when absent
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
    """The customers' stored debits of the last day then the batch's rows, on one timeline."""

    timeline: _Timeline
    amounts: np.ndarray  # per timeline row
    # 1 per row that counts as spend: every stored row (the state keeps debits only), batch debits.
    weights: np.ndarray


@dataclass(frozen=True)
class _DayCounts:
    """Stored per-day counts as rows at their day's start, then the batch's rows, on one timeline.

    A day row weighs its day's count and carries its day's sum; a batch row weighs 0 or 1.
    """

    timeline: _Timeline
    weights: np.ndarray
    values: np.ndarray


@dataclass(frozen=True)
class _Locations:
    """The customers' stored locations and, per sorted batch row, whether its location is new."""

    stored_codes: np.ndarray  # customer code per stored location
    values: pa.Array  # the stored locations, then the batch's in arrival order (null if absent)
    sorted_codes: np.ndarray  # customer code per sorted batch row
    sorted_index: np.ndarray  # per sorted batch row: its location's position in `values`
    has: np.ndarray  # per sorted batch row: a location is given
    seen: np.ndarray  # per sorted batch row: stored, or earlier in the batch
    new: np.ndarray  # per sorted batch row: 1 for a location given and not seen, else 0


def compute_features(
    transactions: pa.Table,
    state: FeatureState,
    known_frauds: pa.Table | None = None,
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> FeatureResult:
    """Features of each transaction against the state just before it, and the state after the batch.

    The batch is processed in event-time order (arrival order breaks ties), after everything the
    state has seen. `known_frauds` may hold any frauds: one only counts for an event once it had
    been reported by the event's time, so replaying history with all labels leaks nothing.
    `label_delay_days` shifts the `*_delayed` terminal windows (part of the version:
    `feature_version`).
    """
    _check_delay(label_delay_days)
    batch = _read_batch(transactions)
    customers = _keys(state.customers, "customer_id", transactions["customer_id"])
    terminals = _keys(state.terminals, "terminal_id", transactions["terminal_id"])
    order = _customer_order(customers, batch.times)
    start = _customer_start(customers)
    balances = _balances(order, start, batch, customers.k)
    spend = _spend_history(customers, batch)
    spend_days = _spend_days(customers, batch)
    locations = _locations(customers, order, transactions["location"])
    terminal_days = _terminal_days(terminals, batch.times)
    frauds = _known_fraud_counts(
        terminals, terminal_days.timeline, batch.times, known_frauds, label_delay_days
    )
    values = {
        **_event_features(batch),
        **_balance_features(balances, order, batch),
        **_recency_features(order, start),
        **_location_features(locations, order, customers.k),
        **_spend_features(spend, spend_days, batch),
        **_terminal_features(terminal_days, batch.times, frauds, label_delay_days),
    }
    new_state = FeatureState(
        _new_customer_state(
            customers,
            balance=balances.after,
            spend=spend,
            spend_days=spend_days,
            locations=locations,
            batch=batch,
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
        times=_micros(transactions["event_time"]),
        amounts=amounts,
        is_debit=is_debit,
        balance_change=np.where(is_debit, -amounts, amounts),
        channels=_objects(transactions["channel"]),
        ledger_balance=ledger_balance,
        ledger_time=ledger_time,
        account_status=optional("account_status"),
        card_status=optional("card_status"),
    )


def _nullable_micros(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A timestamp column in us as float64, NaN where null."""
    micros = pc.cast(column, pa.int64())
    return np.asarray(micros.to_numpy(zero_copy_only=False), dtype=np.float64)


def _keys(state: pa.Table, key: str, batch_keys: pa.ChunkedArray | pa.Array) -> _Keys:
    """Only the state rows of the batch's keys are read, so the state may hold any others."""
    batch_keys = pc.cast(batch_keys, pa.string())
    # pc.unique, not a sort: `_select` keeps the state's order.
    rows = _select(state, key, pc.unique(batch_keys))
    stored = pc.cast(rows[key], pa.string())
    both = pa.chunked_array([*_chunks(stored), *_chunks(batch_keys)], pa.string())
    # Codes in order of first appearance, as pd.factorize numbers them, from Arrow's hash table
    # of the strings (~3x faster than pandas' over Python strings).
    encoded = both.combine_chunks().dictionary_encode()
    if encoded.null_count:
        codes, keys = pd.factorize(_objects(both))
    else:
        codes, keys = _ints(encoded.indices), _objects(encoded.dictionary)
    return _Keys(rows, codes[: len(stored)], codes[len(stored) :], keys)


def _chunks(column: pa.ChunkedArray | pa.Array) -> list[pa.Array]:
    return column.chunks if isinstance(column, pa.ChunkedArray) else [column]


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


def _cents(amounts: np.ndarray) -> np.ndarray:
    """Amounts in whole cents (as float64, exact below 2**53): sums then never depend on order."""
    return np.rint(amounts * 100.0)


def _day_rows(
    keys: _Keys, sums_column: str | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The stored days of the keys: code, day start (us), count and sum (0 without a column)."""
    parents, days = _flatten(keys.state, "days")
    counts = _ints(_flatten(keys.state, "day_counts")[1]).astype(np.float64)
    sums = (
        _ints(_flatten(keys.state, sums_column)[1]).astype(np.float64)
        if sums_column
        else np.zeros(len(counts))
    )
    return keys.state_codes[parents], _ints(days) * _DAY_US, counts, sums


def _spend_days(customers: _Keys, batch: _Batch) -> _DayCounts:
    """The customers' debits per day (counts, cents), then the batch's debits.

    A state row written before the day columns existed (`days` null) holds its customer's debits
    of the last 30 days one by one instead: they serve as rows of their own.
    """
    codes, starts, counts, sums = _day_rows(customers, "day_cents")
    state = customers.state
    if state.num_rows and "days" in state.column_names and state["days"].null_count:
        legacy = np.asarray(pc.is_null(state["days"]).to_numpy(zero_copy_only=False), dtype=bool)
        parents, times = _flatten(state, "history_times")
        amounts = _floats(_flatten(state, "history_amounts")[1])
        old = legacy[parents]
        codes = np.concatenate([codes, customers.state_codes[parents][old]])
        starts = np.concatenate([starts, _micros(times)[old]])
        counts = np.concatenate([counts, np.ones(int(old.sum()))])
        sums = np.concatenate([sums, _cents(amounts[old])])
    debit = batch.is_debit.astype(np.float64)
    return _DayCounts(
        timeline=_timeline(codes, starts, customers.batch_codes, batch.times),
        weights=np.concatenate([counts, debit]),
        values=np.concatenate([sums, _cents(batch.amounts) * debit]),
    )


def _locations(customers: _Keys, order: _CustomerOrder, locations: pa.ChunkedArray) -> _Locations:
    """A location is seen before an event if stored or at the customer's earlier batch rows."""
    parents, stored = _flatten(customers.state, "locations")
    stored_codes = customers.state_codes[parents]
    n_stored = len(stored_codes)
    # Locations as integer codes (Arrow's hash table of the strings, -1 for null) and (customer,
    # location) pairs as one int64: no Python strings, no MultiIndex.
    values = pa.concat_arrays(
        [pc.cast(stored, pa.string()), pc.cast(locations, pa.string()).combine_chunks()]
    )
    encoded = values.dictionary_encode()
    location_codes = _ints(pc.fill_null(encoded.indices, -1))
    n_codes = len(encoded.dictionary) + 1
    sorted_index = n_stored + order.rows
    sorted_has = location_codes[sorted_index] >= 0
    pairs = np.concatenate([stored_codes, order.codes]) * n_codes + (
        np.concatenate([location_codes[:n_stored], location_codes[sorted_index]]) + 1
    )
    # Seen: the pair is stored or at an earlier sorted row (of the same customer, as it is).
    seen = pd.Series(pairs).duplicated().to_numpy()[n_stored:] & sorted_has
    return _Locations(
        stored_codes=stored_codes,
        values=values,
        sorted_codes=order.codes,
        sorted_index=sorted_index,
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
    hours = (batch.times // (3600 * _US)) % 24
    features["hour_of_day"] = hours.astype(np.float64)
    # 1970-01-01 was a Thursday: Monday is 0, Saturday 5.
    features["is_weekend"] = ((batch.times // _DAY_US + 3) % 7 >= 5).astype(np.float64)
    features["is_night"] = (hours < 6).astype(np.float64)
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


def _spend_features(
    spend: _SpendHistory, spend_days: _DayCounts, batch: _Batch
) -> dict[str, np.ndarray]:
    exact = _window_sums(
        spend.timeline,
        _cents(spend.amounts) * spend.weights,
        CUSTOMER_WINDOWS,
        weights=spend.weights,
    )
    daily = _window_sums(
        spend_days.timeline,
        spend_days.values,
        _calendar_offsets(batch.times, CUSTOMER_DAY_WINDOWS),
        weights=spend_days.weights,
    )
    features: dict[str, np.ndarray] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        for w, (count, cents) in {**exact, **daily}.items():
            features[f"count_{w}"] = count.astype(np.float64)
            mean = cents / np.maximum(count, 1) / 100.0
            features[f"mean_amount_{w}"] = np.where(count > 0, mean, np.nan)
        for w in CUSTOMER_DAY_WINDOWS:
            features[f"amount_to_mean_{w}"] = batch.amounts / features[f"mean_amount_{w}"]
        per_day = features["count_30d"] / CUSTOMER_DAY_WINDOWS["30d"]
        features["velocity_1d_to_30d"] = np.where(
            per_day > 0, features["count_1d"] / per_day, np.nan
        )
    return features


def _terminal_days(terminals: _Keys, times: np.ndarray) -> _DayCounts:
    codes, starts, counts, _ = _day_rows(terminals, None)
    timeline = _timeline(codes, starts, terminals.batch_codes, times)
    weights = np.concatenate([counts, np.ones(len(times))])
    return _DayCounts(timeline, weights, weights)


def _calendar_offsets(times: np.ndarray, windows: dict[str, int]) -> dict[str, np.ndarray]:
    """Per event, how far back each calendar window reaches (us): to its first day's start."""
    day_start = times // _DAY_US * _DAY_US
    return {w: times - (day_start - days * _DAY_US) + 1 for w, days in windows.items()}


def _terminal_features(
    terminal_days: _DayCounts, times: np.ndarray, fraud_counts: dict[str, np.ndarray], delay: int
) -> dict[str, np.ndarray]:
    # From the event back to the start of each window, the delayed windows' both ends included:
    # a delayed window's count is the events from its first day on minus those from its end on.
    reach = {
        **TERMINAL_WINDOWS,
        "delay": delay,
        **{f"{w}_delayed": d + delay for w, d in TERMINAL_WINDOWS.items()},
    }
    sums = _window_sums(
        terminal_days.timeline,
        terminal_days.weights,
        _calendar_offsets(times, reach),
        weights=terminal_days.weights,
    )
    counts = {w: sums[w][0] for w in reach}
    for w in TERMINAL_WINDOWS:
        counts[f"{w}_delayed"] = counts[f"{w}_delayed"] - counts["delay"]
    features: dict[str, np.ndarray] = {}
    for w in TERMINAL_WINDOWS:
        for window, count_name, rate_name in (
            (w, f"terminal_tx_count_{w}", f"terminal_fraud_rate_{w}"),
            (f"{w}_delayed", f"terminal_tx_count_{w}_delayed", f"terminal_risk_{w}_delayed"),
        ):
            count = counts[window]
            features[count_name] = count.astype(np.float64)
            with np.errstate(invalid="ignore", divide="ignore"):
                rate = np.where(count > 0, fraud_counts[window] / np.maximum(count, 1), np.nan)
            features[rate_name] = np.clip(rate, 0.0, 1.0)
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
    terminals: _Keys,
    timeline: _Timeline,
    times: np.ndarray,
    known_frauds: pa.Table | None,
    delay: int,
) -> dict[str, np.ndarray]:
    """Frauds at the event's terminal inside each window that were reported by the event's time.

    Cost O((events + frauds) log frauds): frauds reported (and happened) before the batch's first
    event count for every event of their terminal, so they are counted by a binary search over
    their sorted (terminal, day) keys. Only those reported during the batch need a per-event
    check, pairing them with the events of their terminal (few: the batch's time span of
    reports). Pairing all frauds made a batch cost grow with the terminals' fraud history.
    `timeline`: the terminals' (`_terminal_days`), whose batch rows are in (terminal, time) order.
    """
    n = len(times)
    out = {w: np.zeros(n) for w in _FRAUD_WINDOWS}
    if known_frauds is None or known_frauds.num_rows == 0 or n == 0:
        return out
    fe = _micros(known_frauds["event_time"])
    fr = _micros(known_frauds["reported_at"])
    codes = terminals.batch_codes
    # Each fraud's terminal code (-1: none of the batch's): Arrow's hash lookup of the strings,
    # some 20x faster than a pandas Index.get_indexer over them.
    found = pc.index_in(
        pc.cast(known_frauds["terminal_id"], pa.string()),
        value_set=pa.array(terminals.keys, pa.string()),
    )
    fcode = _ints(pc.fill_null(found, -1))
    first = times.min()
    useful = (fcode >= 0) & (fr <= times.max()) & (fe > first - LOOKBACK_SECONDS * _US)
    settled = useful & (fr <= first) & (fe <= first)
    event_day = times // _DAY_US
    if settled.any():
        keys = np.sort(_day_keys(fcode[settled], fe[settled] // _DAY_US))
        # The events in (terminal, time) order: their keys, shifted by any number of days, ascend,
        # which keeps numpy's binary search local (several times faster than in arrival order).
        rows = timeline.batch_rows
        event_keys = _day_keys(codes[rows], event_day[rows])
        before: dict[int, np.ndarray] = {}

        def count(lo: int, hi: int) -> np.ndarray:
            """Settled frauds of the event's terminal on days day+lo..day+hi-1."""
            for shift in (lo, hi):
                if shift not in before:  # the windows share their ends: search each once
                    before[shift] = np.searchsorted(keys, event_keys + shift)
            counted = np.empty(n)
            counted[rows] = before[hi] - before[lo]
            return counted

        for w, days in TERMINAL_WINDOWS.items():
            out[w] += count(-days, 1)
            out[f"{w}_delayed"] += count(-days - delay, -delay)
    pending = useful & ~settled
    if pending.any():
        frauds = pd.DataFrame({"code": fcode[pending], "fe": fe[pending], "fr": fr[pending]})
        events = pd.DataFrame({"code": codes, "t": times, "row": np.arange(n)})
        pairs = events.merge(frauds, on="code")
        t, pe, pr = pairs["t"].to_numpy(), pairs["fe"].to_numpy(), pairs["fr"].to_numpy()
        pair_rows = pairs["row"].to_numpy()
        known = (pe <= t) & (pr <= t)
        fraud_day, day = pe // _DAY_US, t // _DAY_US
        for w, days in TERMINAL_WINDOWS.items():
            mask = known & (fraud_day >= day - days)
            out[w] += np.bincount(pair_rows[mask], minlength=n)
            shifted = known & (fraud_day >= day - days - delay) & (fraud_day < day - delay)
            out[f"{w}_delayed"] += np.bincount(pair_rows[shifted], minlength=n)
    return out


_FRAUD_WINDOWS = [*TERMINAL_WINDOWS, *(f"{w}_delayed" for w in TERMINAL_WINDOWS)]


def _day_keys(codes: np.ndarray, days: np.ndarray) -> np.ndarray:
    """One int64 per (terminal code, day), ordered by code then day (|day| < 2**31)."""
    return codes.astype(np.int64) * (1 << 32) + days


def _lists(codes: np.ndarray, values: pa.Array, k: int) -> pa.ListArray:
    """One list per key code 0..k-1 from values already grouped by code in ascending order."""
    return pa.ListArray.from_arrays(_list_offsets(codes, k), values)


def _list_offsets(codes: np.ndarray, k: int) -> pa.Array:
    """The list offsets of `_lists`, to share between lists of the same codes."""
    offsets = np.concatenate([[0], np.cumsum(np.bincount(codes, minlength=k))]).astype(np.int32)
    return pa.array(offsets, pa.int32())


def _timestamps(micros: np.ndarray) -> pa.Array:
    return pa.array(micros.astype(np.int64), pa.int64()).cast(TIMESTAMP)


def _history(
    tl: _Timeline, last: np.ndarray, rows: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Positions (processing order) of the rows still inside the exact windows after the batch.

    `rows` (bool per timeline row) restricts the history to the rows worth keeping.
    """
    codes, times = tl.sorted_codes, tl.sorted_times
    keep = times > last[codes] - EXACT_SECONDS * _US
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
    n_stored = len(locations.stored_codes)
    index = np.concatenate([np.arange(n_stored), locations.sorted_index[added]])
    order = np.argsort(codes, kind="stable")
    # An Arrow take of the strings, not a pa.array of Python strings (several times faster).
    return _lists(codes[order], locations.values.take(pa.array(index[order])), k)


def _day_lists(
    day_counts: _DayCounts, latest: np.ndarray, keep_days: int, k: int, sums: bool = True
) -> list[pa.ListArray]:
    """Per key, its days with events (the last `keep_days` + 1 before its latest), counts and,
    with `sums`, the days' sums of the values (terminals keep none)."""
    # The timeline's processing order is by key, then time: the (key, day) groups are runs.
    tl = day_counts.timeline
    codes, days = tl.sorted_codes, tl.sorted_times // _DAY_US
    weights = day_counts.weights[tl.order]
    keep = (days >= latest[codes] // _DAY_US - keep_days) & (weights > 0)
    codes, days, weights = codes[keep], days[keep], weights[keep]
    new_day = np.ones(len(codes), dtype=bool)
    new_day[1:] = (codes[1:] != codes[:-1]) | (days[1:] != days[:-1])
    starts = np.flatnonzero(new_day)
    offsets = _list_offsets(codes[starts], k)  # the same for the three lists

    def ints(per_day: np.ndarray) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(per_day, pa.int64()))

    def day_sums(per_row: np.ndarray) -> np.ndarray:
        # Whole numbers (counts, cents) as floats: exact in any order of addition.
        summed = np.add.reduceat(per_row, starts) if len(starts) else per_row[:0]
        return np.rint(summed).astype(np.int64)

    lists = [ints(days[starts]), ints(day_sums(weights))]
    if sums:
        lists.append(ints(day_sums(day_counts.values[tl.order][keep])))
    return lists


def _new_customer_state(
    customers: _Keys,
    *,
    balance: np.ndarray,
    spend: _SpendHistory,
    spend_days: _DayCounts,
    locations: _Locations,
    batch: _Batch,
) -> pa.Table:
    k = customers.k
    latest = _latest_times(customers, batch.times)
    keep, codes = _history(spend.timeline, latest, spend.weights.astype(bool))
    history_offsets = _list_offsets(codes, k)
    days, day_counts, day_cents = _day_lists(spend_days, latest, CUSTOMER_DAYS, k)
    return pa.Table.from_arrays(
        [
            pa.array(customers.keys, pa.string()),
            pa.array(balance, pa.float64()),
            _timestamps(latest),
            pa.array(_event_counts(customers), pa.int64()),
            _location_lists(locations, k),
            pa.ListArray.from_arrays(history_offsets, _timestamps(spend.timeline.times[keep])),
            pa.ListArray.from_arrays(history_offsets, pa.array(spend.amounts[keep], pa.float64())),
            days,
            day_counts,
            day_cents,
        ],
        schema=CUSTOMER_STATE_SCHEMA,
    )


def _new_terminal_state(terminals: _Keys, terminal_days: _DayCounts, times: np.ndarray) -> pa.Table:
    """Per terminal, its events per day: the stored days and the batch's, the last ones only."""
    latest = _latest_times(terminals, times)
    days, day_counts = _day_lists(terminal_days, latest, TERMINAL_DAYS, terminals.k, sums=False)
    return pa.Table.from_arrays(
        [
            pa.array(terminals.keys, pa.string()),
            _timestamps(latest),
            pa.array(_event_counts(terminals), pa.int64()),
            days,
            day_counts,
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
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> FeatureResult:
    """Replay history through `compute_features` in event-time chunks: features as they were.

    This is how training gets point-in-time features without a feature log: every transaction
    sees only earlier transactions, only labels reported before it and, with `accounts` (the
    `accounts_history` SCD 2 versions), the bank's account as of its time. `label_delay_days`:
    the delayed windows' shift, the one the model trained on them will score with.
    """
    transactions = transactions.sort_by([("event_time", "ascending")])
    if accounts is not None:
        transactions = with_accounts(transactions, accounts)
    frauds = known_frauds(transactions, labels) if labels is not None else None
    current = state or FeatureState.empty()
    parts = []
    for chunk in time_chunks(transactions, chunk_seconds):
        result = compute_features(chunk, current, frauds, label_delay_days)
        parts.append(result.features)
        current = current.updated(result.state)
    features = pa.concat_tables(parts) if parts else FEATURE_SCHEMA.empty_table()
    return FeatureResult(features, current)
