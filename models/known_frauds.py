"""Frauds already reported, kept incrementally: what the terminal risk features count.

A terminal's known-fraud rate needs, for each reported fraud, its terminal and event time (from
`transactions`) and when it was reported (from `labels`). Joining every label with every past
transaction each batch costs more every day the lake runs. Instead `known_frauds` keeps the
joined rows, and each batch adds only what is new since the batches before it:

- **Labels that arrived since** (the label files no batch has folded in yet: `known_label_files`
  records the files each batch folded) with their transaction's terminal and event time, kept
  if the transaction was scored by an earlier batch inside the last `LOOKBACK_SECONDS` before
  the batch (the only ones any later window can still reach).
- **The batch's own transactions that already have a label** (labels that arrived before their
  transaction was scored, as in a replay of history): labels reported at or after the batch's
  first event, joined with the batch.

Where a new label's transaction is comes, off the scoring path, from the label loader
(`locate_labels`, called by `streamguard.pipeline.load_labels`): it looks the labels it writes
up in `transactions` at that table's current version V and stores, with each label, the
transaction's `terminal_id` and `event_time` (null when not there at V) and V itself
(`transactions_version`, -1 when the table did not exist). A batch then reads `transactions`
only for what V could not answer:

- a label found at V needs no read: its transaction was committed by then, so by a batch
  planned before the label was loaded, hence before any batch whose planned labels version
  holds it (a batch takes its id and plans its labels version before it writes anything, and
  ids go up: a lower id still in flight planned before a higher one committed). So it is an
  earlier batch, as the read's `batch_id <` filter asks; only the event-time reach is applied;
- a label not found at V is looked for only in the data files added to `transactions` after V
  (the live files of the current version not in V's: appends, and compactions that may have
  moved rows appended after V), with the same filters as a full read;
- a label stored without V (by older code, or written to `labels` by another writer) takes
  the full read of the last `LOOKBACK_SECONDS` (`transactions` is partitioned by event date,
  so only those days are read), as does everything when V's file list cannot be read (its log
  cleaned up).

The location is a fact about the transaction id, not the verdict (`transactions` is only
appended to and compacted): a label another writer MERGEs anew keeps a location still true.

So a batch's read of `transactions` no longer grows with the lake: it is none at all for
labels loaded after their transactions (the common case), and the few files committed since
the load for labels loaded ahead of them (or between a batch's plan and its commit).

New rows are written with the batch (exactly once, like every output) and read back by
terminal and time: a batch reads the frauds of its terminals whose event is inside the longest
window and that were reported by its last event, so the work per batch depends on the batch,
not on the lake's age. The label-delay guarantee is the feature function's (a fraud counts for
an event only once reported by the event's time), unchanged.

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
# What the label loader stores with each label beside the label contract (LABEL_SCHEMA, which
# label files, the CLI and training keep): where its transaction is (see the module doc).
NOT_THERE = -1  # `transactions_version` when `transactions` did not exist at the lookup
LABEL_LOCATION_SCHEMA = pa.schema(
    [
        pa.field("terminal_id", pa.string()),  # null: not in `transactions` at the version
        pa.field("event_time", TIMESTAMP),
        pa.field("transactions_version", pa.int64()),  # null: never looked up (older writers)
    ]
)
LABELS_TABLE_SCHEMA = pa.schema([*LABEL_SCHEMA, *LABEL_LOCATION_SCHEMA])
_LOCATED = ["transaction_id", "reported_at", *LABEL_LOCATION_SCHEMA.names]


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
    on it keeping the rows (and partitions) with event time after t. Labels the loader located
    are kept by `event_time > t` alone: what `since` keeps (its partition filter only prunes).
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
    added = _fraud_labels(lake, labels_version, files=new_files, columns=_LOCATED)
    parts = []
    if added.num_rows:
        # Found by the loader: committed before it looked, so by an earlier batch (module doc).
        found = added.filter(pc.is_valid(added["event_time"]))
        parts.append(found.filter(pc.greater(found["event_time"], reach)))
        missing = added.filter(pc.is_null(added["event_time"]))
        versions = missing["transactions_version"]
        # Not found at V: only in the files added since (the earliest V's serves them all: a
        # label not found at its V is in no file of it); never looked up: anywhere, as before.
        after = None if versions.null_count else pc.min(versions).as_py()
        files, version = _files_after(lake, transactions, after) if missing.num_rows else ([], None)
        if files != []:
            earlier = lake.read(
                transactions,
                columns=["transaction_id", "terminal_id", "event_time"],
                filter=since(reach)
                & pc.field("transaction_id").isin(missing["transaction_id"])
                & (pc.field("batch_id") < batch_id),
                version=version,
                schema=transactions_schema,
                files=files,
            )
            labels = missing.select(["transaction_id", "reported_at"])
            parts.append(earlier.join(labels, "transaction_id", join_type="inner"))
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


def locate_labels(
    lake: LakeReader, labels: pa.Table, transactions: str, transactions_schema: pa.Schema
) -> pa.Table:
    """`labels` (LABEL_SCHEMA) with where their transactions are (LABELS_TABLE_SCHEMA).

    For the label loader: it pays the lookup by id in `transactions` once per label, off the
    scoring path, so the batches folding the labels need not (see the module doc). An id held
    by more than one row (a repeat on another event date) is left unlocated: the batches then
    read for it as before.
    """
    labels = labels.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)
    n = labels.num_rows
    version = lake.version(transactions)
    if version is None or n == 0:
        at = pa.array(np.full(n, NOT_THERE), pa.int64())
        return pa.Table.from_arrays(
            [*labels.columns, pa.nulls(n, pa.string()), pa.nulls(n, TIMESTAMP), at],
            schema=LABELS_TABLE_SCHEMA,
        )
    rows = lake.read(
        transactions,
        columns=["transaction_id", "terminal_id", "event_time"],
        filter=pc.field("transaction_id").isin(labels["transaction_id"].combine_chunks()),
        version=version,
        schema=transactions_schema,
    )
    counts = pc.value_counts(rows["transaction_id"].combine_chunks())
    twice = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    once = rows.filter(pc.invert(pc.is_in(rows["transaction_id"], value_set=twice)))
    where = pc.index_in(labels["transaction_id"], value_set=once["transaction_id"].combine_chunks())
    ambiguous = pc.is_in(labels["transaction_id"], value_set=twice)
    at = pc.if_else(ambiguous, pa.scalar(None, pa.int64()), pa.scalar(version, pa.int64()))
    return pa.Table.from_arrays(
        [
            *labels.columns,
            pc.take(once["terminal_id"], where),
            pc.take(once["event_time"], where),
            at,
        ],
        schema=LABELS_TABLE_SCHEMA,
    )


def _files_after(
    lake: LakeReader, name: str, version: int | None
) -> tuple[list[str] | None, int | None]:
    """(files, at): the data files of `name`'s current version `at` that were not in
    `version`'s: all a row committed after `version` can be in now (an append's file, or a
    compaction's that took it in). (None, None): read the whole table (no version, or its file
    list is gone with a cleaned-up log)."""
    if version is None:
        return None, None
    at = lake.version(name)
    if at is None:
        return [], None
    if version < 0:
        return None, at
    try:
        before = set(lake.files(name, version=version))
    except Exception:  # the version cannot be loaded (log cleaned up): the whole table it is
        return None, None
    # Listed and read at one version: a compaction between the two would move rows out of sight.
    return [f for f in lake.files(name, version=at) if f not in before], at


def _schema() -> pa.Schema:
    return pa.schema([KNOWN_FRAUDS_TABLE_SCHEMA.field(c) for c in _JOINED])


def _fraud_labels(
    lake: LakeReader,
    version: int,
    files: list[str] | None = None,
    filter: pc.Expression | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Fraud labels (`columns`: transaction_id, reported_at unless said) at `version`: in
    `files`, or matching `filter`. Columns a labels table written before them lacks: null."""
    columns = columns or ["transaction_id", "reported_at"]
    if files is not None and not files:
        return pa.schema([LABELS_TABLE_SCHEMA.field(c) for c in columns]).empty_table()
    fraud = pc.field("is_fraud") == True  # noqa: E712
    return lake.read(
        LABELS,
        columns=columns,
        filter=fraud if filter is None else fraud & filter,
        version=version,
        schema=LABELS_TABLE_SCHEMA,
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
