"""The customer side of the state-store fraud job: what runs on the executors.

`parse_partition` (under `mapInArrow`) parses raw records with `models.schema.parse_records`;
`CustomerProcessor` (under `transformWithStateInPandas`) keeps each customer's state in a
`MapState` entry with a TTL and runs `models.features.compute_features` against it. Kept apart from
`streamguard.spark.fraud_state` (the driver side) so Spark's Python workers import only the
feature function, not the scoring job and its registry (MLflow): seconds per worker.
See `streamguard.spark.fraud_state` for the design.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError
from pyspark.sql.streaming.stateful_processor import (
    StatefulProcessor,
    StatefulProcessorHandle,
    TimerValues,
)

from models.accounts import HISTORY_COLUMNS, history_filter, with_accounts
from models.features import (
    CUSTOMER_STATE_SCHEMA,
    TERMINAL_STATE_SCHEMA,
    FeatureState,
    compute_features,
    feature_names,
)
from models.schema import (
    DUPLICATE_EARLIER,
    DUPLICATE_IN_BATCH,
    RESCUED_DATA,
    TIMESTAMP,
    TRANSACTION_SCHEMA,
    parse_records,
)

# What each side of a Spark batch computes, from the features' declared entities: terminal
# features need the terminal state and the known frauds; the customer side computes the customer
# features and the event's own (amount, channel, hour), which need no state.
CUSTOMER_SIDE_FEATURES = feature_names("customer", "event")

_US = 1_000_000
# How long a customer's transaction ids stay in its state for duplicate detection.
DUPLICATE_WINDOW_SECONDS = 30 * 86_400
DUPLICATE_WINDOW_US = DUPLICATE_WINDOW_SECONDS * _US
REJECTED_KEY = ""  # grouping key of records the parser rejected (never a valid customer id)

# One stored customer (the map value; the map key is the customer id). Times: int64 microseconds.
STORED_FIELDS = [
    ("balance", "double"),
    ("last_us", "bigint"),
    ("n_transactions", "bigint"),
    ("locations", "array<string>"),
    ("history_us", "array<bigint>"),
    ("history_amounts", "array<double>"),
    ("days", "array<bigint>"),
    ("day_counts", "array<bigint>"),
    ("day_cents", "array<bigint>"),
    ("seen_ids", "array<string>"),
    ("seen_us", "array<bigint>"),
]
STORED_COLUMNS = [name for name, _ in STORED_FIELDS]
DAY_COLUMNS = ["days", "day_counts", "day_cents"]  # the customer's debits per day
STORED_DDL = ", ".join(f"{n} {t}" for n, t in STORED_FIELDS)
# Parsed records: the processor's input ('t' transaction / 'r' rejected by the parser).
PARSED_FIELDS = [
    ("gkey", "string"),
    ("row_type", "string"),
    ("shard_id", "string"),
    ("sequence_number", "string"),
    ("partition_key", "string"),
    (RESCUED_DATA, "string"),  # the payload's rescued object as canonical JSON (for lineage)
    ("arrival_us", "bigint"),
    ("data", "binary"),
    ("reason", "string"),
    ("transaction_id", "string"),
    ("event_us", "bigint"),
    ("customer_id", "string"),
    ("terminal_id", "string"),
    ("amount", "double"),
    ("kind", "string"),
    ("channel", "string"),
    ("location", "string"),
]
PARSED_COLUMNS = [name for name, _ in PARSED_FIELDS]
# The transaction itself, event time as microseconds.
_TX_FIELDS = PARSED_COLUMNS[PARSED_COLUMNS.index("transaction_id") :]
# The processor's output: 'f' customer features of a transaction, 's' a customer's new state,
# 'd' a record to dead-letter.
# (The `amount` feature is the transaction's amount, carried once.)
OUT_FEATURES = [c for c in CUSTOMER_SIDE_FEATURES if c not in PARSED_COLUMNS]
OUT_FIELDS = [
    *PARSED_FIELDS[1:],
    *[(c, "double") for c in OUT_FEATURES],
    *[(n, t) for n, t in STORED_FIELDS if not n.startswith("seen_")],
    # On 'f' rows: the `accounts_history` version the batch's as-of lookup read (null: none).
    ("accounts_version", "bigint"),
]
OUT_COLUMNS = [name for name, _ in OUT_FIELDS]
OUT_DDL = ", ".join(f"{n} {t}" for n, t in OUT_FIELDS)
_ARROW = {
    "string": pa.string(),
    "binary": pa.binary(),
    "bigint": pa.int64(),
    "double": pa.float64(),
    "array<string>": pa.list_(pa.string()),
    "array<bigint>": pa.list_(pa.int64()),
    "array<double>": pa.list_(pa.float64()),
}
OUT_SCHEMA = pa.schema([pa.field(n, _ARROW[t]) for n, t in OUT_FIELDS])
PARSED_SCHEMA = pa.schema([pa.field(n, _ARROW[t]) for n, t in PARSED_FIELDS])


def _seq_key(shard: str, seq: str) -> tuple[str, int]:
    """Arrival order: shard, then sequence number as a number (as the Delta mode sorts)."""
    try:
        return shard, int(seq)
    except (TypeError, ValueError):
        return shard, 0


def arrival_order(shard: Any, seq: Any) -> np.ndarray:
    keys = [_seq_key(s, q) for s, q in zip(shard, seq, strict=True)]
    return np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)


def parse_partition(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    """`mapInArrow`: raw records -> parsed rows, on the executors, with `parse_records`.

    A record's validity never depends on its neighbours, so parsing partition by partition rejects
    exactly what the runner rejects. Duplicates are the processor's and the driver's business.
    """
    for batch in batches:
        n = batch.num_rows
        if n == 0:
            continue
        payloads = batch.column("data").to_pylist()
        parsed = parse_records(payloads)
        valid, rejected = parsed.valid, parsed.rejected
        idx = np.concatenate(
            [
                valid["record_index"].to_numpy(),
                np.array([r.index for r in rejected], dtype=np.int64),
            ]
        )
        take = pa.array(idx, pa.int64())
        m, k = valid.num_rows, len(rejected)

        def tx(name: str, t: pa.DataType, valid: pa.Table = valid, k: int = k) -> pa.Array:
            return pa.concat_arrays([valid[name].combine_chunks().cast(t), pa.nulls(k, t)])

        event_us = pc.cast(valid["event_time"], pa.int64()).combine_chunks()
        columns = {
            "gkey": pa.concat_arrays(
                [valid["customer_id"].combine_chunks(), pa.array([REJECTED_KEY] * k, pa.string())]
            ),
            "row_type": pa.array(["t"] * m + ["r"] * k, pa.string()),
            "shard_id": batch.column("shard_id").take(take),
            "partition_key": batch.column("partition_key").take(take),
            "sequence_number": batch.column("sequence_number").take(take),
            RESCUED_DATA: tx(RESCUED_DATA, pa.string()),
            "arrival_us": batch.column("arrival_us").take(take),
            "data": batch.column("data").take(take),
            "reason": pa.array([None] * m + [r.reason for r in rejected], pa.string()),
            "transaction_id": tx("transaction_id", pa.string()),
            "event_us": pa.concat_arrays([event_us, pa.array(np.zeros(k, np.int64))]),
            "customer_id": tx("customer_id", pa.string()),
            "terminal_id": tx("terminal_id", pa.string()),
            "amount": pa.concat_arrays(
                [valid["amount"].combine_chunks(), pa.array(np.zeros(k), pa.float64())]
            ),
            "kind": tx("kind", pa.string()),
            "channel": tx("channel", pa.string()),
            "location": tx("location", pa.string()),
        }
        yield pa.RecordBatch.from_pydict(columns, schema=PARSED_SCHEMA)


def _frame(table: pa.Table) -> pd.DataFrame:
    """An output table as pandas for the operator (all of OUT_COLUMNS, in order)."""
    return table.select(OUT_COLUMNS).cast(OUT_SCHEMA).to_pandas()


def _empty_columns(n: int, skip: set[str]) -> dict[str, pa.Array]:
    return {f.name: pa.nulls(n, f.type) for f in OUT_SCHEMA if f.name not in skip}


class AccountsAsOf:
    """The bank's account history as it was at a batch's processing time, read on an executor.

    The operator replays a batch with its recorded processing time, so a replay reads the same
    version; the version goes out with the feature rows and the driver records it in the plan.
    """

    def __init__(self, uri: str | None) -> None:
        self.uri = uri
        self._ms: int | None = None
        self._table: DeltaTable | None = None

    def at(self, ms: int) -> DeltaTable | None:
        """The table at the last version committed by `ms` (None: no table, or none by then)."""
        if self.uri is None:
            return None
        if ms != self._ms:
            self._ms, self._table = ms, None
            try:
                latest = DeltaTable(self.uri)
            except TableNotFoundError:
                return None
            # The commits' own timestamps (delta-rs's `load_as_version(datetime)` loads version 0
            # for a time before the table existed).
            by_then = [c["version"] for c in latest.history() if c["timestamp"] <= ms]
            if by_then:
                self._table = DeltaTable(self.uri, version=max(by_then))
        return self._table

    def lookup(self, transactions: pa.Table, ms: int) -> tuple[pa.Table, int | None]:
        """`transactions` with their account as of each event, and the version read."""
        table = self.at(ms)
        if table is None:
            return with_accounts(transactions, None), None
        history = table.to_pyarrow_dataset().to_table(
            columns=HISTORY_COLUMNS, filter=history_filter(transactions)
        )
        return with_accounts(transactions, history), table.version()


class CustomerProcessor(StatefulProcessor):
    """Per customer: duplicate check and `compute_features` against the state-store state.

    Grouped by customer or by a bucket of customers (the `gkey` column); the map state is keyed by
    customer, each entry with the TTL. Emits feature rows ('f'), new state rows ('s') and records
    to dead-letter ('d'); the parser's rejects (group `""`) pass through untouched.
    """

    def __init__(self, ttl_ms: int | None, accounts_uri: str | None = None) -> None:
        self.ttl_ms = ttl_ms
        self.accounts = AccountsAsOf(accounts_uri)

    def init(self, handle: StatefulProcessorHandle) -> None:
        self.customers = handle.getMapState(
            "customers", "customer_id string", STORED_DDL, self.ttl_ms
        )

    def handleInitialState(self, key: Any, initialState: Any, timerValues: TimerValues) -> None:
        """First batch of a fresh checkpoint: the customers from Delta (see the module doc)."""
        frame = initialState.set_axis(["gkey", "customer_id", *STORED_COLUMNS], axis=1)
        for row in frame.itertuples(index=False):
            self.customers.updateValue(
                (row.customer_id,), tuple(_plain(getattr(row, c)) for c in STORED_COLUMNS)
            )

    def handleInputRows(
        self, key: Any, rows: Any, timerValues: TimerValues
    ) -> Iterator[pd.DataFrame]:
        frame = pd.concat([r.set_axis(PARSED_COLUMNS, axis=1) for r in rows], ignore_index=True)
        if key[0] == REJECTED_KEY:
            yield _frame(_dead(frame, frame["reason"].tolist()))
            return
        yield from self._customers(frame, timerValues.getCurrentProcessingTimeInMs())

    def _customers(self, frame: pd.DataFrame, now_ms: int) -> Iterator[pd.DataFrame]:
        order = arrival_order(frame["shard_id"], frame["sequence_number"])
        frame = frame.iloc[order].reset_index(drop=True)
        ids = frame["transaction_id"].to_numpy(dtype=object)
        first = ~pd.Series(ids).duplicated().to_numpy()
        reasons: list[str | None] = [None if f else DUPLICATE_IN_BATCH for f in first]
        stored: dict[str, tuple[Any, ...]] = {}
        for customer in pd.unique(frame["customer_id"]):
            value = self.customers.getValue((customer,))
            if value is not None:
                stored[customer] = value
        seen = {c: set(v[STORED_COLUMNS.index("seen_ids")] or ()) for c, v in stored.items()}
        for i, (tid, customer) in enumerate(zip(ids, frame["customer_id"], strict=True)):
            if reasons[i] is None and tid in seen.get(customer, ()):
                reasons[i] = DUPLICATE_EARLIER
        keep = np.array([r is None for r in reasons], dtype=bool)
        if not keep.all():
            bad = frame[~keep]
            yield _frame(_dead(bad, [r for r in reasons if r is not None]))
        tx = frame[keep].reset_index(drop=True)
        if tx.empty:
            return
        transactions, accounts_version = self.accounts.lookup(_transactions(tx), now_ms)
        result = compute_features(
            transactions,
            FeatureState(_state_table(stored), TERMINAL_STATE_SCHEMA.empty_table()),
        )
        carried = ("shard_id", "sequence_number", "partition_key", RESCUED_DATA, *_TX_FIELDS)
        features = pa.table(
            {
                **_empty_columns(len(tx), {"row_type", *carried, *OUT_FEATURES}),
                "row_type": pa.array(["f"] * len(tx), pa.string()),
                **{c: _column(tx[c], OUT_SCHEMA.field(c).type) for c in carried},
                **{c: result.features[c] for c in OUT_FEATURES},
                "accounts_version": pa.array([accounts_version] * len(tx), pa.int64()),
            }
        )
        yield _frame(features)
        new = result.state.customers
        yield _frame(self._update(new, tx, stored))

    def _update(
        self, new: pa.Table, tx: pd.DataFrame, stored: dict[str, tuple[Any, ...]]
    ) -> pa.Table:
        """Store each touched customer's new state (with its recent ids); rows for Delta."""
        last = pc.cast(new["last_event_time"], pa.int64()).to_pylist()
        history = [
            None if h is None else pc.cast(h, pa.int64()).to_pylist()
            for h in new["history_times"].to_pylist()
        ]
        by_customer: dict[str, list[tuple[str, int]]] = {}
        for tid, customer, us in zip(
            tx["transaction_id"], tx["customer_id"], tx["event_us"], strict=True
        ):
            by_customer.setdefault(customer, []).append((tid, int(us)))
        out: dict[str, list[Any]] = {c: [] for c in ("customer_id", *STORED_COLUMNS[:-2])}
        rows = new.select(
            [
                "customer_id",
                "balance",
                "n_transactions",
                "locations",
                "history_amounts",
                *DAY_COLUMNS,
            ]
        ).to_pylist()
        for row, last_us, hist_us in zip(rows, last, history, strict=True):
            customer = row["customer_id"]
            old = stored.get(customer)
            pairs = [] if old is None else list(zip(old[-2] or (), old[-1] or (), strict=True))
            pairs += by_customer.get(customer, [])
            horizon = last_us - DUPLICATE_WINDOW_US
            pairs = [(t, u) for t, u in pairs if u > horizon]
            value = (
                row["balance"],
                last_us,
                row["n_transactions"],
                row["locations"] or [],
                hist_us or [],
                row["history_amounts"] or [],
                *(row[c] or [] for c in DAY_COLUMNS),
                [t for t, _ in pairs],
                [u for _, u in pairs],
            )
            self.customers.updateValue((customer,), value)
            for name, v in zip(
                ("customer_id", *STORED_COLUMNS[:-2]), (customer, *value[:-2]), strict=True
            ):
                out[name].append(v)
        n = new.num_rows
        return pa.table(
            {
                **_empty_columns(n, set(out) | {"row_type"}),
                "row_type": pa.array(["s"] * n, pa.string()),
                **{k: pa.array(v, OUT_SCHEMA.field(k).type) for k, v in out.items()},
            }
        )

    def close(self) -> None:
        pass


def _plain(value: Any) -> Any:
    """A pandas/numpy cell as the plain Python value the state API serialises."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if isinstance(value, np.generic):
        return value.item()
    return value


def _column(series: pd.Series, arrow_type: pa.DataType) -> pa.Array:
    """A pandas column as Arrow: missing values (None or NaN) as nulls, integers exact."""
    values: list[Any]
    if pa.types.is_integer(arrow_type):
        values = [None if pd.isna(v) else int(v) for v in series]
    elif pa.types.is_floating(arrow_type):
        values = [None if pd.isna(v) else float(v) for v in series]
    else:
        values = [
            None if v is None or (isinstance(v, float) and np.isnan(v)) else v for v in series
        ]
    return pa.array(values, arrow_type)


def _dead(frame: pd.DataFrame, reasons: list[str]) -> pa.Table:
    n = len(frame)
    lineage = ("shard_id", "sequence_number", "data")
    return pa.table(
        {
            **_empty_columns(n, {"row_type", "reason", "arrival_us", *lineage}),
            "row_type": pa.array(["d"] * n, pa.string()),
            "reason": pa.array(reasons, pa.string()),
            "arrival_us": _column(frame["arrival_us"], pa.int64()),
            **{c: _column(frame[c], OUT_SCHEMA.field(c).type) for c in lineage},
        }
    )


def _transactions(tx: pd.DataFrame) -> pa.Table:
    """Processor rows as TRANSACTION_SCHEMA, in their (arrival) order."""
    columns = {
        c: _column(tx[c], pa.string())
        for c in ("transaction_id", "customer_id", "terminal_id", "kind", "channel", "location")
    }
    columns["event_time"] = _column(tx["event_us"], pa.int64()).cast(TIMESTAMP)
    columns["amount"] = _column(tx["amount"], pa.float64())
    return pa.table({c: columns[c] for c in TRANSACTION_SCHEMA.names}).cast(TRANSACTION_SCHEMA)


def _state_table(stored: dict[str, tuple[Any, ...]]) -> pa.Table:
    """Stored customers as CUSTOMER_STATE_SCHEMA (what `compute_features` takes)."""
    values = list(stored.values())

    def col(name: str) -> list[Any]:
        i = STORED_COLUMNS.index(name)
        return [v[i] for v in values]

    return pa.table(
        {
            "customer_id": pa.array(list(stored), pa.string()),
            "balance": pa.array(col("balance"), pa.float64()),
            "last_event_time": pa.array(col("last_us"), pa.int64()).cast(TIMESTAMP),
            "n_transactions": pa.array(col("n_transactions"), pa.int64()),
            "locations": pa.array(col("locations"), pa.list_(pa.string())),
            "history_times": pa.array(col("history_us"), pa.list_(pa.int64())).cast(
                pa.list_(TIMESTAMP)
            ),
            "history_amounts": pa.array(col("history_amounts"), pa.list_(pa.float64())),
            **{c: pa.array(col(c), pa.list_(pa.int64())) for c in DAY_COLUMNS},
        },
        schema=CUSTOMER_STATE_SCHEMA,
    )
