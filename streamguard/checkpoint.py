"""Micro-batch plans and commits, kept in a Delta table next to the data they describe.

A batch is planned (its exact per-shard sequence range and the context it runs with, such as the
model version) before any output is written, and marked committed after the last output. A batch
that was planned but not committed is replayed with the same range and context. Plan and commit
rows carry Delta application transactions, so writing either twice is harmless.

A long-running worker may defer the commit (`Checkpoints.defer_commits`): a batch's commit row
is then written in the same Delta commit as the next batch's plan (one commit, both application
transactions), or alone by `flush` when no batch follows. Only the mark's durability moves, not
the order of writes: every output of the batch is written before its commit is asked for, and the
next plan is written after that, so a crash before the mark lands leaves a batch that is the
job's last plan, fully written and not marked: it is replayed over its recorded range, every
table already holds it, and nothing is written twice.
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

    `defer_commits` (off by default; the continuous worker turns it on): `commit` only notes the
    batch, and its row goes out with the next `write_plan` in one Delta commit, or with `flush`
    (see the module doc). A batch noted so counts as committed for this object
    (`committed_through`, `is_committed`), not yet for another reader of the lake.
    """

    def __init__(self, lake: Lake, job: str, load_context: Callable[[str], BatchContext]) -> None:
        self.lake = lake
        self.job = job
        self.load_context = load_context
        self.app_plan = f"{job}:plan"
        self.app_commit = f"{job}:commit"
        self.defer_commits = False
        self._pending: tuple[BatchPlan, datetime] | None = None  # a commit not written yet

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
        """The last committed batch id (-1 when none); a deferred commit counts."""
        version = self.lake.transaction_version(CHECKPOINT_TABLE, self.app_commit)
        done = -1 if version is None else int(version)
        if self._pending is not None:
            done = max(done, self._pending[0].batch_id)
        return done

    def is_committed(self, plan: BatchPlan) -> bool:
        return self.committed_through() >= plan.batch_id

    def positions(self) -> dict[str, str | None]:
        """Per-shard position after the last planned batch (the next batch starts there)."""
        plan = self.last_plan()
        return {} if plan is None else plan.positions()

    def write_plan(self, plan: BatchPlan) -> None:
        """Record the plan; with a deferred commit, in the same Delta commit as that mark."""
        now = datetime.now(UTC)
        rows: list[dict[str, object]] = [
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
        pending = self._pending
        if pending is not None and pending[0].batch_id < plan.batch_id:
            if self._append_with_commit(rows, plan, *pending):
                self._pending = None
                return
            self.flush()  # cannot go in one commit: the mark first, as without deferring
        table = pa.Table.from_pylist(rows, schema=CHECKPOINT_SCHEMA)
        self.lake.append(CHECKPOINT_TABLE, table, self.app_plan, plan.batch_id)

    def commit(self, plan: BatchPlan) -> None:
        """Mark the batch committed (every output written); deferred: noted, written later."""
        at = datetime.now(UTC)
        if self.defer_commits:
            if self._pending is not None and self._pending[0].batch_id != plan.batch_id:
                self.flush()  # never expected: each plan is written before the next commit
            self._pending = (plan, at)
            return
        self._write_commit(plan, at)

    def flush(self) -> bool:
        """Write the deferred commit mark now (idle stream, stopping); whether there was one."""
        pending = self._pending
        if pending is None:
            return False
        self._write_commit(*pending)
        self._pending = None
        return True

    def _commit_row(self, plan: BatchPlan, at: datetime) -> dict[str, object]:
        return {
            "job": self.job,
            "batch_id": plan.batch_id,
            "kind": "commit",
            "n_records": plan.n_records,
            "context": plan.context.to_json(),
            "at": at,
        }

    def _write_commit(self, plan: BatchPlan, at: datetime) -> None:
        table = pa.Table.from_pylist([self._commit_row(plan, at)], schema=CHECKPOINT_SCHEMA)
        self.lake.append(CHECKPOINT_TABLE, table, self.app_commit, plan.batch_id)

    def _append_with_commit(
        self, rows: list[dict[str, object]], plan: BatchPlan, done: BatchPlan, at: datetime
    ) -> bool:
        """Append `done`'s commit row and `plan`'s rows in one Delta commit carrying both
        application transactions; False (nothing written) when either is already there."""
        data = pa.Table.from_pylist([self._commit_row(done, at), *rows], schema=CHECKPOINT_SCHEMA)
        return self.lake.append(
            CHECKPOINT_TABLE,
            data,
            self.app_plan,
            plan.batch_id,
            also=[(self.app_commit, done.batch_id)],
        )
