"""The in-process micro-batch runner: source -> job -> Delta tables -> checkpoint, exactly once.

For each batch: plan the exact per-shard range and context (model version, lookup versions) and
record the plan; run the processor; write each output table (`streamguard.commit.write_batch`, the
commit path every executor shares) with the Delta application
transaction `(job, batch_id)`; mark the batch committed. After a crash at any point, the last
planned but uncommitted batch is read again over the same range with the same context, and every
table that already holds it is skipped. The processor holds all domain logic; this module none.

`run` scores until the source (or a bound) is exhausted; a long-running caller (continuous mode,
`streamguard.continuous`) calls `recover` once, then `step` batch after batch: the same batches.
Within a runner the last plan is kept in memory rather than read back from `_checkpoints` before
every batch (which grows with every batch); before each new plan the Delta log's application
transaction of the job's plans is checked against it, so a second writer of the same job is
detected instead of silently sharing batch ids.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from models.protocols import Processor
from streamguard.checkpoint import CHECKPOINT_TABLE, BatchPlan, Checkpoints, ShardRange
from streamguard.commit import (
    AlertSink,
    next_batch_id,
    publish_batch,
    rejected_records,
    write_batch,
)
from streamguard.kinesis import StreamRecord
from streamguard.lake import Lake
from streamguard.sources import Source

log = logging.getLogger(__name__)


@dataclass
class BatchReport:
    batch_id: int
    n_records: int
    n_rejected: int
    rows_written: dict[str, int]
    replayed: bool
    seconds: float
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunReport:
    job: str
    batches: list[BatchReport] = field(default_factory=list)
    positions: dict[str, str | None] = field(default_factory=dict)

    @property
    def n_records(self) -> int:
        return sum(b.n_records for b in self.batches)

    def rows(self, table: str) -> int:
        return sum(b.rows_written.get(table, 0) for b in self.batches)


def freeze_startup_objects() -> bool:
    """Move every object alive now out of the garbage collector's reach, once per process.

    What a scoring process holds before it scores (its imports: pandas, scikit-learn, delta-rs,
    Dagster, MLflow ... about 250k objects; the model; an in-memory source's records) lives as
    long as the process, yet every full collection walked all of it again: 0.2-0.5 s each, every
    two or three batches of 50,000 (10-15 % of the in-memory benchmark's time). Frozen, a full
    collection walks only what the batches made (10-20 ms). `gc.freeze` is a constant-time list
    move; a cycle already garbage at that moment is never freed, a one-time cost. True when this
    call froze (the first in the process).
    """
    global _FROZEN
    if _FROZEN:
        return False
    _FROZEN = True
    gc.freeze()
    return True


_FROZEN = False


class CrashError(RuntimeError):
    """Raised by test subclasses to stop a batch part-way, as a killed process would."""


class ConcurrentWriterError(RuntimeError):
    """Another runner planned a batch of the same job: two writers of one job would interleave
    their batches, so this one stops before writing anything of its next batch."""


class MicroBatchRunner:
    def __init__(
        self,
        source: Source,
        processor: Processor[Any],
        lake: Lake,
        job: str,
        *,
        max_batch_records: int = 50_000,
        sinks: Sequence[AlertSink] = (),
    ) -> None:
        self.source = source
        self.sinks = list(sinks)
        self.processor = processor
        self.lake = lake
        self.job = job
        self.max_batch_records = max_batch_records
        self.checkpoints = Checkpoints(lake, job, processor.load_context)
        lake.keep_in_memory(o.name for o in processor.outputs if o.in_memory)
        self._last: BatchPlan | None = None
        self._last_known = False
        freeze_startup_objects()  # what the process holds by now lives as long as it

    # Hook for crash tests: called after each table write of a batch.
    def after_write(self, plan: BatchPlan, table: str) -> None:
        return None

    def run(
        self, until: Mapping[str, str | None] | None = None, max_batches: int | None = None
    ) -> RunReport:
        """Process batches from the checkpoint until the source (or `until`) is exhausted.

        `until` bounds each shard inclusively (a sensor's view of the stream); a shard mapped to
        None or "" is skipped, a shard not in it is read to its end.
        """
        report = RunReport(self.job)
        self._last_known = False  # another process may have moved the job since the last run
        replayed = self.recover()
        if replayed is not None:
            report.batches.append(replayed)
        while max_batches is None or len(report.batches) < max_batches:
            batch = self.step(until)
            if batch is None:
                break
            report.batches.append(batch)
        report.positions = self.positions()
        return report

    def recover(self) -> BatchReport | None:
        """Replay the last planned but uncommitted batch, if any, over its recorded range and
        context; None when the job's last batch is committed. Call once before `step`."""
        last = self._last_plan()
        if last is None or self.checkpoints.is_committed(last):
            return None
        log.warning("replaying uncommitted batch %s of %s", last.batch_id, self.job)
        return self._execute(last, self._read_plan(last), replayed=True)

    def step(self, until: Mapping[str, str | None] | None = None) -> BatchReport | None:
        """Plan, process and commit the next batch past the last plan.

        None when the source has nothing new: then nothing at all is written, so a caller may
        poll an idle stream as often as it likes without adding commits to the lake.
        """
        plan, records = self._next_batch(until or {})
        if plan is None:
            return None
        self._write_plan(plan)
        return self._execute(plan, records, replayed=False)

    def positions(self) -> dict[str, str | None]:
        """Per-shard position after the last planned batch (where the next batch starts)."""
        last = self._last_plan()
        return {} if last is None else last.positions()

    def _last_plan(self) -> BatchPlan | None:
        """The job's last plan: read from the lake once per run, then the one this runner wrote."""
        if not self._last_known:
            self._last = self.checkpoints.last_plan()
            self._last_known = True
        return self._last

    def _write_plan(self, plan: BatchPlan) -> None:
        """Record the plan, after checking that no other writer planned since our last plan."""
        expected = None if self._last is None else self._last.batch_id
        planned = self.lake.transaction_version(CHECKPOINT_TABLE, self.checkpoints.app_plan)
        if planned != expected:
            self._last_known = False
            raise ConcurrentWriterError(
                f"job {self.job}: the lake's last plan is batch {planned}, this runner's is "
                f"{expected}; another process is scoring the same stream into this lake (run "
                "one writer per stream: one Dagster scoring run, or one CLI process)"
            )
        self.checkpoints.write_plan(plan)
        self._last = plan

    def _next_batch(
        self, until: Mapping[str, str | None]
    ) -> tuple[BatchPlan | None, list[StreamRecord]]:
        last = self._last_plan()
        positions = {} if last is None else last.positions()
        shards = sorted(set(self.source.shards()) | set(positions))
        per_shard = max(1, self.max_batch_records // max(1, len(shards)))
        ranges: dict[str, ShardRange] = {}
        records: list[StreamRecord] = []
        for shard in shards:
            after = positions.get(shard)
            bound = until.get(shard) or None
            if shard in until and bound is None:
                got: list[StreamRecord] = []  # the caller saw nothing on this shard
            elif bound is not None and after is not None and int(bound) <= int(after):
                got = []
            else:
                got = self.source.read(shard, after, bound, per_shard)
            ranges[shard] = ShardRange(after, got[-1].sequence_number if got else None, len(got))
            records.extend(got)
        if not records:
            return None, []
        batch_id = next_batch_id(self.lake)
        context = self.processor.plan_context(self.lake)
        return BatchPlan(self.job, batch_id, ranges, context), records

    def _read_plan(self, plan: BatchPlan) -> list[StreamRecord]:
        records: list[StreamRecord] = []
        for shard, r in sorted(plan.ranges.items()):
            if r.n_records == 0:
                continue
            got = self.source.read(shard, r.after, r.end, r.n_records)
            if len(got) != r.n_records:
                raise RuntimeError(
                    f"cannot replay batch {plan.batch_id} of {self.job}: shard {shard} returned "
                    f"{len(got)} of {r.n_records} records in ({r.after}, {r.end}] "
                    "(trimmed past the stream's retention?)"
                )
            records.extend(got)
        return records

    def _execute(self, plan: BatchPlan, records: list[StreamRecord], replayed: bool) -> BatchReport:
        started = time.perf_counter()
        processed = self.processor.process(records, plan.batch_id, plan.context, self.lake)
        dead = rejected_records(
            self.job, plan.batch_id, records, processed.rejected, datetime.now(UTC)
        )
        written = write_batch(
            self.lake,
            self.job,
            plan.batch_id,
            dead,
            processed.tables,
            self.processor.outputs,
            after_write=lambda table: self.after_write(plan, table),
        )
        if self.sinks:
            publish_batch(self.sinks, self.job, plan.batch_id, self.lake)
            self.after_write(plan, "publish")
        self.checkpoints.commit(plan)
        self.source.acknowledge(plan.positions())
        self.after_write(plan, "commit")
        seconds = time.perf_counter() - started
        log.info(
            "%s batch %s: %s records, %s rejected, %.2fs%s",
            self.job,
            plan.batch_id,
            len(records),
            len(processed.rejected),
            seconds,
            " (replayed)" if replayed else "",
        )
        return BatchReport(
            plan.batch_id,
            len(records),
            len(processed.rejected),
            written,
            replayed,
            seconds,
            processed.stats,
        )
