"""Micro-batch plans and commits, kept in a Delta table next to the data they describe.

A batch is planned (its exact per-shard sequence range and the context it runs with, such as the
model version) before any output is written, and marked committed after the last output. A batch
that was planned but not committed is replayed with the same range and context. Plan and commit
rows carry Delta application transactions, so writing either twice is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc

from models.protocols import BatchContext
from streamguard.lake import Lake

CHECKPOINT_TABLE = "_checkpoints"
CHECKPOINT_SCHEMA = pa.schema(
    [
        pa.field("job", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # plan | commit
        pa.field("shard_id", pa.string()),
        pa.field("after_seq", pa.string()),  # exclusive start; null = from the shard's start
        pa.field("end_seq", pa.string()),  # inclusive end; null = no record in this batch
        pa.field("n_records", pa.int64()),
        pa.field("context", pa.string()),  # JSON
        pa.field("at", pa.timestamp("us", tz="UTC")),
    ]
)


@dataclass(frozen=True)
class ShardRange:
    after: str | None  # exclusive
    end: str | None  # inclusive; None when the batch took nothing from this shard
    n_records: int

    @property
    def position(self) -> str | None:
        """Where the next batch starts on this shard."""
        return self.end if self.end is not None else self.after


@dataclass(frozen=True)
class BatchPlan:
    job: str
    batch_id: int
    ranges: dict[str, ShardRange]
    context: BatchContext

    @property
    def n_records(self) -> int:
        return sum(r.n_records for r in self.ranges.values())

    def positions(self) -> dict[str, str | None]:
        return {shard: r.position for shard, r in self.ranges.items()}


class Checkpoints:
    """Plans and commits of one job in the lake's `_checkpoints` table.

    The plan's context is stored whole (its `to_json`) and read back with `load_context`.
    """

    def __init__(self, lake: Lake, job: str, load_context: Callable[[str], BatchContext]) -> None:
        self.lake = lake
        self.job = job
        self.load_context = load_context
        self.app_plan = f"{job}:plan"
        self.app_commit = f"{job}:commit"

    def last_plan(self) -> BatchPlan | None:
        """The last planned batch: its id from the Delta log, its rows from the few files whose
        statistics hold that id (the table gains files every batch; this read does not grow)."""
        last = self.lake.transaction_version(CHECKPOINT_TABLE, self.app_plan)
        if last is None:
            return None
        filt = (
            (pc.field("job") == self.job)
            & (pc.field("kind") == "plan")
            & (pc.field("batch_id") == last)
        )
        files = self.lake.files_covering(CHECKPOINT_TABLE, "batch_id", last)
        mine = self.lake.read(CHECKPOINT_TABLE, filter=filt, files=files).to_pylist()
        if not mine:
            return None
        ranges = {
            r["shard_id"]: ShardRange(r["after_seq"], r["end_seq"], r["n_records"]) for r in mine
        }
        return BatchPlan(self.job, int(last), ranges, self.load_context(mine[0]["context"]))

    def committed_through(self) -> int:
        """The last committed batch id (-1 when none)."""
        version = self.lake.transaction_version(CHECKPOINT_TABLE, self.app_commit)
        return -1 if version is None else int(version)

    def is_committed(self, plan: BatchPlan) -> bool:
        return self.committed_through() >= plan.batch_id

    def positions(self) -> dict[str, str | None]:
        """Per-shard position after the last planned batch (the next batch starts there)."""
        plan = self.last_plan()
        return {} if plan is None else plan.positions()

    def write_plan(self, plan: BatchPlan) -> None:
        now = datetime.now(UTC)
        rows = [
            {
                "job": self.job,
                "batch_id": plan.batch_id,
                "kind": "plan",
                "shard_id": shard,
                "after_seq": r.after,
                "end_seq": r.end,
                "n_records": r.n_records,
                "context": plan.context.to_json(),
                "at": now,
            }
            for shard, r in sorted(plan.ranges.items())
        ]
        table = pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA)
        self.lake.append(CHECKPOINT_TABLE, table, self.app_plan, plan.batch_id)

    def commit(self, plan: BatchPlan) -> None:
        row = {
            "job": self.job,
            "batch_id": plan.batch_id,
            "kind": "commit",
            "n_records": plan.n_records,
            "context": plan.context.to_json(),
            "at": datetime.now(UTC),
        }
        table = pa.Table.from_pylist([row], schema=CHECKPOINT_SCHEMA)
        self.lake.append(CHECKPOINT_TABLE, table, self.app_commit, plan.batch_id)
