"""Test helpers shared by the fraud engine suites (in-process runner, both Spark modes).

One stream with every kind of trouble (bad records, repeats), one way to compare tables exactly,
and the in-process runner's batches written as files for a Spark query to read one per trigger.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.accounts import (
    ACCOUNT_KEY,
    ACCOUNT_SCHEMA,
    ACCOUNTS_HISTORY,
    HISTORY_SCHEMA,
    AccountChanges,
)
from models.job import TRANSACTIONS
from models.registry import LoadedModel
from models.schema import to_payload
from streamguard.cdc import apply_changes
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.dms import DmsSource, write_dms_output
from streamguard.lake import Lake
from streamguard.pipeline import load_labels, scoring_runner
from streamguard.sources import MemorySource

# Records that break the contract, and the reason each is dead-lettered with.
BAD_RECORDS: list[tuple[bytes, str]] = [
    (b"{not json", "not valid JSON"),
    (json.dumps({"transaction_id": "x1", "amount": 3}).encode(), "missing required field"),
    (
        json.dumps(
            {
                "transaction_id": "x2",
                "event_time": "2026-01-02T00:00:00Z",
                "customer_id": "C1",
                "terminal_id": "T1",
                "amount": -5,
                "kind": "debit",
            }
        ).encode(),
        "amount must be a finite number > 0",
    ),
    (
        json.dumps(
            {
                "transaction_id": "x3",
                "event_time": "yesterday",
                "customer_id": "C1",
                "terminal_id": "T1",
                "amount": 5,
                "kind": "debit",
            }
        ).encode(),
        "event_time is not an ISO-8601 timestamp",
    ),
]


def troubled_stream(
    rows: Sequence[dict[str, Any]],
    bad: Sequence[bytes] = tuple(p for p, _ in BAD_RECORDS),
    *,
    replay_of: int | None = 10,
    retry_at: int | None = None,
) -> tuple[list[bytes], list[str]]:
    """Payloads and partition keys of `rows` with `bad` records spread evenly among them.

    `replay_of`: that record again at the end (a replay from an earlier batch); `retry_at`: that
    record twice in a row (a producer retry within one batch).
    """
    payloads = [to_payload(r) for r in rows]
    keys = [r["customer_id"] for r in rows]
    for i, record in enumerate(bad):
        at = (i + 1) * len(payloads) // (len(bad) + 1)
        payloads.insert(at, record)
        keys.insert(at, "bad")
    if retry_at is not None:
        payloads.insert(retry_at + 1, payloads[retry_at])
        keys.insert(retry_at + 1, keys[retry_at])
    if replay_of is not None:
        payloads.append(payloads[replay_of])
        keys.append(keys[replay_of])
    return payloads, keys


def assert_same_tables(a: pa.Table, b: pa.Table, tolerance: float = 0.0) -> None:
    """Equal tables; floats bit for bit unless `tolerance` (NaN and null alike)."""
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        x, y = a[name].combine_chunks(), b[name].combine_chunks()
        if pa.types.is_floating(x.type):
            xs = x.to_numpy(zero_copy_only=False)
            ys = y.to_numpy(zero_copy_only=False)
            same = np.isclose(xs, ys, rtol=tolerance, atol=tolerance, equal_nan=True)
            if tolerance == 0.0:
                same = (xs == ys) | (np.isnan(xs) & np.isnan(ys))
            assert same.all(), f"{name}: {int((~same).sum())} values differ"
        else:
            assert x.cast(y.type).equals(y), name


def sorted_table(lake: Lake, name: str, key: str, drop: set[str] | None = None) -> pa.Table:
    """A table without the columns in `drop`, in `key` order (engines write rows in any order)."""
    table = lake.read(name)
    keep = [c for c in table.column_names if c not in (drop or set())]
    return table.select(keep).sort_by([(key, "ascending")])


def batch_files(lake: Lake, source: MemorySource, out: Path) -> int:
    """One file per in-process batch, its records in the order the runner read them."""
    data = {
        (r.shard_id, r.sequence_number): r.data
        for shard in source.shards()
        for r in source.read(shard, None, None, 1 << 30)
    }
    placed = pa.concat_tables(
        [
            lake.read(TRANSACTIONS, columns=["batch_id", "shard_id", "sequence_number"]),
            lake.read(DEAD_LETTER_TABLE, columns=["batch_id", "shard_id", "sequence_number"]),
        ]
    ).to_pylist()
    batches: dict[int, list[tuple[str, int]]] = {}
    for r in placed:
        batches.setdefault(r["batch_id"], []).append((r["shard_id"], int(r["sequence_number"])))
    out.mkdir(parents=True)
    base = time.time() - 1_000
    for batch_id, keys in sorted(batches.items()):
        path = out / f"batch-{batch_id:05d}.jsonl"
        lines = [data[(shard, str(seq).zfill(20))] for shard, seq in sorted(keys)]
        path.write_bytes(b"\n".join(lines) + b"\n")
        os.utime(path, (base + batch_id, base + batch_id))  # the file source orders by mtime
    return len(batches)


def add_account_version(lake: Lake, batch: int, **changes: Any) -> None:
    """Append one `accounts_history` version (customer C1's open account with an active card,
    valid from 2026-01-01, with `changes`) as the CDC apply would, as batch `batch`."""
    row = {
        "customer_id": "C1",
        "balance": 10.0,
        "status": "open",
        "card_status": "active",
        "valid_from": datetime(2026, 1, 1, tzinfo=UTC),
        "valid_to": None,
    } | changes
    lake.append(ACCOUNTS_HISTORY, pa.Table.from_pylist([row], HISTORY_SCHEMA), "cdc", batch)


def load_bank(lake: Lake, bank: AccountChanges, folder: Path) -> None:
    """The bank's accounts as DMS files in `folder`, applied to the lake's `accounts_history`
    (SCD 2) the way the `accounts_history` asset does."""
    if not folder.exists():
        write_dms_output(
            folder, bank.full_load, bank.changes, schema="bank", table="accounts",
            format="csv", full_load_time=bank.snapshot_time,
        )  # fmt: skip
    source = DmsSource(str(folder), "bank", "accounts", format="csv")
    report = apply_changes(
        lake, source, ACCOUNTS_HISTORY, keys=[ACCOUNT_KEY], sequence_by="updated_at",
        stored_as_scd_type=2, schema_hints=ACCOUNT_SCHEMA,
    )  # fmt: skip
    assert report.total("dead_letters") == 0


def in_process_reference(
    root: Path,
    payloads: Sequence[bytes],
    keys: Sequence[str],
    labels: pa.Table,
    model: LoadedModel,
    batch_records: int,
    bank: AccountChanges | None = None,
) -> tuple[Lake, Path, int]:
    """The in-process runner over the records (2 shards), and its batches as files.

    Returns (its lake, the folder of batch files, the number of batches): the reference a Spark
    job fed from that folder, one file per trigger, must reproduce. With `bank`, the lake gets
    the accounts' history first (DMS files under root/dms), so accounts are looked up too.
    """
    source = MemorySource.split(payloads, keys, n_shards=2)
    local = Lake(root / "local")
    load_labels(local, labels)
    if bank is not None:
        load_bank(local, bank, root / "dms")
    scoring_runner(local, source, None, max_batch_records=batch_records, model=model).run()
    input_dir = root / "input"
    return local, input_dir, batch_files(local, source, input_dir)


# Columns every engine stamps with its own clock.
STAMPS = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}
_OUTPUT_KEYS = (
    ("transactions", "transaction_id"),
    ("features", "transaction_id"),
    ("scores", "transaction_id"),
    ("alerts", "transaction_id"),
    ("customer_state", "customer_id"),
    ("terminal_state", "terminal_id"),
)


def assert_same_outputs(want: Lake, got: Lake, stamps: set[str] = STAMPS) -> None:
    """Every scoring output table of `got` equal to `want`'s, row for row, batch ids included
    (the transactions' stream lineage aside: a file path and line vs a shard)."""
    for name, key in _OUTPUT_KEYS:
        a, b = sorted_table(want, name, key, stamps), sorted_table(got, name, key, stamps)
        if name == TRANSACTIONS:
            a = a.drop_columns(["shard_id", "sequence_number", "partition_key"])
            b = b.drop_columns(["shard_id", "sequence_number", "partition_key"])
        assert_same_tables(a, b)
