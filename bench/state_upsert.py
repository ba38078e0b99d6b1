"""Bench: what a batch's state write costs as the customers grow, three designs side by side.

Each micro-batch reads the state of its customers and upserts their new rows into
`customer_state` (one row a customer: balance, places, the last day's debits and 31 day sums).
Three ways of writing it, on the same synthetic state, in one run:

- `merge`: a Delta MERGE, the table read from its files (what the Spark engine does; and every
  upsert did before the state was kept in memory). It rewrites every file holding a changed
  customer: the whole table, as a state table is one file or a few;
- `whole`: the table kept in memory and written whole when a batch changes a tenth of it or more,
  MERGEd otherwise (issue 11's previous design);
- `merge_on_read`: kept in memory, the changed rows appended and each customer's latest row
  read (`Lake.upsert` with `latest_by`), the table written whole once its files hold two rows
  a customer (`FOLD_ROWS_PER_KEY`).

For each number of customers and each batch size (a continuous worker's 165 changed customers,
the runner's 40 % of them), `--repeats` batches of random customers are read and upserted in
turn; the median of the read + upsert is printed, per design, and merged into
bench/results/latest.json (`state_upsert`).

    .venv/bin/python bench/state_upsert.py        # 10k and 100k customers (~3 min)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import customer_state as state
from bench.common import merge_results
from models.job import CUSTOMER_STATE, CUSTOMER_STATE_TABLE_SCHEMA
from streamguard.lake import Lake

DESIGNS = ("merge", "whole", "merge_on_read")


def lake_for(root: Path, design: str, first: pa.Table) -> Lake:
    lake = Lake(root / design)
    if design != "merge":
        lake.keep_in_memory([CUSTOMER_STATE])
    latest = ("customer_id", "batch_id") if design == "merge_on_read" else None
    lake.ensure(CUSTOMER_STATE, CUSTOMER_STATE_TABLE_SCHEMA, latest_by=latest)
    lake.upsert(CUSTOMER_STATE, first, ["customer_id"], "bench", 0, _latest(design))
    return lake


def _latest(design: str) -> str | None:
    return "batch_id" if design == "merge_on_read" else None


def step(lake: Lake, design: str, rows: pa.Table, batch_id: int) -> float:
    """A batch's state step: read its customers' rows, upsert their new ones."""
    start = time.perf_counter()
    got = lake.read(
        CUSTOMER_STATE,
        filter=pc.field("customer_id").isin(rows["customer_id"]),
        schema=CUSTOMER_STATE_TABLE_SCHEMA,
    )
    assert got.num_rows == rows.num_rows  # every customer is there
    lake.upsert(CUSTOMER_STATE, rows, ["customer_id"], "bench", batch_id, _latest(design))
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    results: dict[str, dict[str, float]] = {}
    print(f"{'customers':>9} {'changed':>7} " + " ".join(f"{d:>14}" for d in DESIGNS))
    for customers in args.customers:
        first = state(np.arange(customers), 0, seed=customers)
        for changed in (165, customers * 2 // 5):
            with tempfile.TemporaryDirectory() as work:
                lakes = {d: lake_for(Path(work), d, first) for d in DESIGNS}
                for lake in lakes.values():  # into memory, as a running worker holds it
                    lake.read(CUSTOMER_STATE, filter=pc.field("customer_id") == "none")
                times: dict[str, list[float]] = {d: [] for d in DESIGNS}
                rng = np.random.default_rng(changed)
                for r in range(1, args.repeats + 1):
                    ids = np.sort(rng.choice(customers, changed, replace=False))
                    rows = state(ids, r, seed=r)
                    for design in DESIGNS:  # interleaved: the machine's load hits all alike
                        times[design].append(step(lakes[design], design, rows, r))
                medians = {d: statistics.median(times[d]) * 1e3 for d in DESIGNS}
                # The whole table read back is the same in every design.
                tables = [lakes[d].read(CUSTOMER_STATE).sort_by("customer_id") for d in DESIGNS]
                assert all(t.equals(tables[0]) for t in tables[1:])
            results[f"{customers}_{changed}"] = {f"{d}_ms": m for d, m in medians.items()}
            print(
                f"{customers:>9,} {changed:>7,} "
                + " ".join(f"{medians[d]:>12.1f}ms" for d in DESIGNS)
            )
    merge_results({"state_upsert": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
