"""The in-process micro-batch runner: source -> job -> Delta tables -> checkpoint, exactly once.

For each batch: plan the exact per-shard range and context (model version, lookup versions) and
record the plan; run the processor; write each output table (`streamguard.commit.write_batch`, the
commit path every executor shares) with the Delta application
transaction `(job, batch_id)`; mark the batch committed. After a crash at any point, the last
planned but uncommitted batch is read again over the same range with the same context, and every
table that already holds it is skipped. The processor holds all domain logic; this module none.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from models.protocols import Processor
from streamguard.checkpoint import BatchPlan, Checkpoints, ShardRange
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


class CrashError(RuntimeError):
    """Raised by test subclasses to stop a batch part-way, as a killed process would."""


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
        last = self.checkpoints.last_plan()
        if last is not None and not self.checkpoints.is_committed(last):
            log.warning("replaying uncommitted batch %s of %s", last.batch_id, self.job)
            report.batches.append(self._execute(last, self._read_plan(last), replayed=True))
        while max_batches is None or len(report.batches) < max_batches:
            plan, records = self._next_batch(until or {})
            if plan is None:
                break
            self.checkpoints.write_plan(plan)
            report.batches.append(self._execute(plan, records, replayed=False))
        report.positions = self.checkpoints.positions()
        return report

    def _next_batch(
        self, until: Mapping[str, str | None]
    ) -> tuple[BatchPlan | None, list[StreamRecord]]:
        last = self.checkpoints.last_plan()
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
