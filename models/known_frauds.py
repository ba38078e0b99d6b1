"""Frauds already reported, kept incrementally: what the terminal risk features count.

A terminal's known-fraud rate needs, for each reported fraud, its terminal and event time (from
`transactions`) and when it was reported (from `labels`). Joining every label with every past
transaction each batch costs more every day the lake runs. Instead `known_frauds` keeps the
joined rows, and each batch adds only what is new since the batches before it:

- **Labels that arrived since** (the label files no batch has folded in yet: `known_label_files`
  records the files each batch folded) joined with the transactions of the last
  `LOOKBACK_SECONDS` before the batch (the only ones any later window can still reach; the
  `transactions` table is partitioned by event date, so only those days are read).
- **The batch's own transactions that already have a label** (labels that arrived before their
  transaction was scored, as in a replay of history): labels reported at or after the batch's
  first event, joined with the batch.

Both are written with the batch (exactly once, like every output) and read back by terminal and
time: a batch reads the frauds of its terminals whose event is inside the longest window and
that were reported by its last event, so the work per batch depends on the batch, not on the
lake's age. The label-delay guarantee is the feature function's (a fraud counts for an event
only once reported by the event's time), unchanged.

Label files are read at the labels version the batch plan recorded, so a replayed batch folds
the same files and adds the same rows (an upsert by transaction id: a file that repeats rows,
e.g. after a MERGE rewrote it, adds nothing twice). A label whose transaction is older than the
longest window before the batch that folds it is not kept: no later window can count it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.features import KNOWN_FRAUD_SCHEMA, LOOKBACK_SECONDS
from models.protocols import LakeReader
from models.schema import LABEL_SCHEMA, LABELS, TIMESTAMP

KNOWN_FRAUDS = "known_frauds"
KNOWN_LABEL_FILES = "known_label_files"
KNOWN_FRAUDS_TABLE_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        *KNOWN_FRAUD_SCHEMA,
        pa.field("batch_id", pa.int64(), nullable=False),
    ]
)
KNOWN_LABEL_FILES_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # a data file of `labels`
        pa.field("batch_id", pa.int64(), nullable=False),  # the batch that folded it in
    ]
)
_JOINED = ["transaction_id", *KNOWN_FRAUD_SCHEMA.names]


@dataclass(frozen=True)
class KnownFrauds:
    """What one batch knows of reported frauds, and what it adds to the lake."""

    frauds: pa.Table  # KNOWN_FRAUD_SCHEMA: the frauds the batch's terminal features count
    new: pa.Table  # KNOWN_FRAUDS_TABLE_SCHEMA: rows the batch adds to `known_frauds`
    label_files: pa.Table  # KNOWN_LABEL_FILES_SCHEMA: the label files the batch folded in

    @classmethod
    def empty(cls) -> KnownFrauds:
        return cls(
            KNOWN_FRAUD_SCHEMA.empty_table(),
            KNOWN_FRAUDS_TABLE_SCHEMA.empty_table(),
            KNOWN_LABEL_FILES_SCHEMA.empty_table(),
        )


def known_frauds(
    lake: LakeReader,
    valid: pa.Table,
    batch_id: int,
    labels_version: int | None,
    transactions: str,
    transactions_schema: pa.Schema,
    since: Callable[[pa.Scalar], pc.Expression],
) -> KnownFrauds:
    """The batch's known frauds and the rows it adds (see the module doc).

    `transactions`/`transactions_schema`: the scored transactions table; `since(t)`: a filter
    on it keeping the rows (and partitions) with event time after t.
    """
    if labels_version is None or valid.num_rows == 0:
        return KnownFrauds.empty()
    first = pc.min(valid["event_time"])
    last = pc.max(valid["event_time"])
    reach = pa.scalar(first.as_py() - timedelta(seconds=LOOKBACK_SECONDS), TIMESTAMP)
    # Labels that arrived since the files folded by earlier batches.
    folded = lake.read(
        KNOWN_LABEL_FILES,
        columns=["path"],
        filter=pc.field("batch_id") < batch_id,
        schema=KNOWN_LABEL_FILES_SCHEMA,
    )["path"].to_pylist()
    new_files = sorted(set(lake.files(LABELS, version=labels_version)) - set(folded))
    added = _fraud_labels(lake, labels_version, files=new_files)
    parts = []
    if added.num_rows:
        earlier = lake.read(
            transactions,
            columns=["transaction_id", "terminal_id", "event_time"],
            filter=since(reach)
            & pc.field("transaction_id").isin(added["transaction_id"])
            & (pc.field("batch_id") < batch_id),
            schema=transactions_schema,
        )
        parts.append(earlier.join(added, "transaction_id", join_type="inner"))
    # The batch's own transactions whose label came first (reported at or after their event).
    ahead = _fraud_labels(
        lake,
        labels_version,
        filter=(pc.field("reported_at") >= first)
        & pc.field("transaction_id").isin(valid["transaction_id"].combine_chunks()),
    )
    if ahead.num_rows:
        mine = valid.select(["transaction_id", "terminal_id", "event_time"])
        parts.append(mine.join(ahead, "transaction_id", join_type="inner"))
    new = _unique(pa.concat_tables([p.select(_JOINED).cast(_schema()) for p in parts]) if parts
                  else _schema().empty_table())  # fmt: skip
    # What the features count: stored rows of the batch's terminals inside the longest window,
    # reported by its last event, and the new ones.
    stored = lake.read(
        KNOWN_FRAUDS,
        columns=_JOINED,
        filter=pc.field("terminal_id").isin(pc.unique(valid["terminal_id"]))
        & (pc.field("event_time") > reach)
        & (pc.field("reported_at") <= last),
        schema=KNOWN_FRAUDS_TABLE_SCHEMA,
    )
    both = _unique(pa.concat_tables([stored.cast(_schema()), new]))
    n = new.num_rows
    return KnownFrauds(
        frauds=both.select(KNOWN_FRAUD_SCHEMA.names).cast(KNOWN_FRAUD_SCHEMA),
        new=new.append_column("batch_id", pa.array(np.full(n, batch_id), pa.int64())).cast(
            KNOWN_FRAUDS_TABLE_SCHEMA
        ),
        label_files=pa.table(
            {
                "path": pa.array(new_files, pa.string()),
                "batch_id": pa.array(np.full(len(new_files), batch_id), pa.int64()),
            },
            schema=KNOWN_LABEL_FILES_SCHEMA,
        ),
    )


def _schema() -> pa.Schema:
    return pa.schema([KNOWN_FRAUDS_TABLE_SCHEMA.field(c) for c in _JOINED])


def _fraud_labels(
    lake: LakeReader,
    version: int,
    files: list[str] | None = None,
    filter: pc.Expression | None = None,
) -> pa.Table:
    """Fraud labels (transaction_id, reported_at) at `version`: in `files`, or matching `filter`."""
    if files is not None and not files:
        return pa.table(
            {"transaction_id": pa.array([], pa.string()), "reported_at": pa.array([], TIMESTAMP)}
        )
    fraud = pc.field("is_fraud") == True  # noqa: E712
    return lake.read(
        LABELS,
        columns=["transaction_id", "reported_at"],
        filter=fraud if filter is None else fraud & filter,
        version=version,
        schema=LABEL_SCHEMA,
        files=files,
    )


def _unique(table: pa.Table) -> pa.Table:
    """One row per transaction id (the first), in a stable order.

    By Arrow's hashing into codes, not a sort of the ids as Python strings (0.15 -> 0.02 s for
    the 100k known frauds of issue 11's size, every batch)."""
    if table.num_rows == 0:
        return table
    codes = pc.dictionary_encode(table["transaction_id"].combine_chunks()).indices.to_numpy()
    _, first = np.unique(codes, return_index=True)
    return table.take(pa.array(np.sort(first)))
