"""Bench: the duplicate lookup as one event date's partition of `transactions` fills.

A live stream's batches all land on today's partition of `transactions`, so a lookup that reads
the partition's ids grows through the day. This grows one date to `--rows` (files of
`--file-rows`, as a stream's batches write them) and, at each tenfold size, times the job's own
`drop_duplicates` for a small batch (a continuous worker's) and a large one (the runner's), side
by side: through the lake's key index (`Lake.files_holding`) and reading the date's files (what
the lookup did before, and still does for a date over STREAMGUARD_KEY_INDEX_MB). Before each
timing one more file is appended, and every `--compact-every` files the table is compacted (as
the continuous worker's compactor and the nightly job do), so the index's cost of following
the table is counted.

    .venv/bin/python bench/lookup.py            # to 1M rows on the date (~1 min)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import merge_results
from models.job import TRANSACTIONS, drop_duplicates
from streamguard.lake import Lake

NOON = datetime(2026, 12, 3, 12, tzinfo=UTC)


def batch(prefix: str, n: int) -> pa.Table:
    """`n` new transaction ids on the one date, as `drop_duplicates` takes them."""
    times = [NOON + timedelta(milliseconds=i) for i in range(n)]
    return pa.table(
        {
            "transaction_id": [f"{prefix}-{i:09d}" for i in range(n)],
            "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
            "record_index": list(range(n)),
        }
    )


def stored(table: pa.Table, batch_id: int) -> pa.Table:
    return pa.table(
        {
            "transaction_id": table["transaction_id"],
            "batch_id": pa.array([batch_id] * table.num_rows, pa.int64()),
            "event_date": pc.cast(table["event_time"], pa.date32()),
        }
    )


def timed(lake: Lake, valid: pa.Table, batch_id: int, budget_mb: str) -> float:
    os.environ["STREAMGUARD_KEY_INDEX_MB"] = budget_mb
    start = time.perf_counter()
    kept, rejected = drop_duplicates(valid, lake, batch_id)
    seconds = time.perf_counter() - start
    assert kept.num_rows == valid.num_rows and not rejected  # all new ids
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows on the date at the end")
    parser.add_argument("--file-rows", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--compact-every", type=int, default=4, help="files; 0: never")
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as work:
        # Two lakes on the same folder: one looks up through the index, one reads the files.
        indexed, reading = Lake(work), Lake(work)
        batch_id, rows, size = 0, 0, 10_000

        def append(table: pa.Table) -> None:
            nonlocal batch_id, rows
            indexed.append(TRANSACTIONS, table, "bench", batch_id, partition_by=["event_date"])
            batch_id, rows = batch_id + 1, rows + table.num_rows
            if args.compact_every and batch_id % args.compact_every == 0:
                indexed.compact(TRANSACTIONS)

        print(f"{'rows on date':>12} {'batch':>6} {'files read':>11} {'index':>9} {'ratio':>6}")
        while size <= args.rows:
            while rows < size:
                append(stored(batch(f"b{batch_id}", args.file_rows), batch_id))
            for n in (200, 50_000):
                old, new_ = [], []
                for r in range(args.repeats):
                    # One more small file, as the stream's next batch: followed by the index.
                    more = stored(batch(f"b{batch_id}", 200), batch_id)
                    indexed.append(
                        TRANSACTIONS, more, "bench", batch_id, partition_by=["event_date"]
                    )
                    batch_id, rows = batch_id + 1, rows + 200
                    asked = batch(f"q{size}-{n}-{r}", n)
                    old.append(timed(reading, asked, batch_id, "0"))
                    new_.append(timed(indexed, asked, batch_id, "1024"))
                a, b = statistics.median(old), statistics.median(new_)
                results[f"{size}_{n}"] = {"files_read_ms": a * 1e3, "index_ms": b * 1e3}
                print(f"{size:>12,} {n:>6,} {a * 1e3:>9.1f}ms {b * 1e3:>7.1f}ms {a / b:>6.1f}")
            size *= 10
        index = indexed._views[TRANSACTIONS].keys[("transaction_id", "event_date")]
        print(f"index memory at {rows:,} rows: {index.nbytes / 2**20:.1f} MiB")
    merge_results({"duplicate_lookup": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
