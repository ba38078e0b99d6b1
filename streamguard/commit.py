"""The one commit path every executor takes: dead letters, then the outputs in order, exactly once.

In-process runner, Spark with state in Delta, Spark with the state store (and every source behind
them) plan a batch, process it their own way, then hand the rows here. Each table is written with
the Delta application transaction `(app_id, batch_id)`, so a batch replayed after a crash at any
point writes only the tables still missing it; state tables come last in `outputs`, so a replay
reads the state from before the batch. Marking the batch committed is the caller's (a runner's
checkpoint, Spark's offset log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.protocols import RecordLike, TableOutput
from models.schema import TIMESTAMP
from streamguard.lake import Lake

DEAD_LETTER_TABLE = "dead_letters"
DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("job", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("shard_id", pa.string()),
        pa.field("sequence_number", pa.string()),
        pa.field("payload", pa.binary()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("arrival_time", TIMESTAMP),
        pa.field("recorded_at", TIMESTAMP),
    ]
)

# Called after each table write (and after the commit) with the table's name: crash tests.
AfterWrite = Callable[[str], None]


class AlertSink(Protocol):
    """Somewhere a batch's rows of one table go after the lake has them (e.g. alerts to Kafka).

    Called again with the same batch after a crash: it must then publish nothing new.
    """

    table: str

    def publish(self, job: str, batch_id: int, rows: pa.Table) -> int:
        """Publish the batch's rows once; the number sent now (0 when already published)."""
        ...


def dead_letter_table(
    job: str,
    batch_id: int,
    *,
    shard_ids: Any,
    sequence_numbers: Any,
    payloads: Any,
    reasons: Any,
    arrival_times: Any,
    recorded_at: datetime,
) -> pa.Table:
    """Rejected records with the raw payload and the reason, in the dead-letter schema."""
    n = len(reasons)
    return pa.table(
        {
            "job": pa.array([job] * n, pa.string()),
            "batch_id": pa.array(np.full(n, batch_id), pa.int64()),
            "shard_id": shard_ids,
            "sequence_number": sequence_numbers,
            "payload": payloads,
            "reason": reasons,
            "arrival_time": arrival_times,
            "recorded_at": pa.array([recorded_at] * n, TIMESTAMP),
        }
    ).cast(DEAD_LETTER_SCHEMA)


def rejected_records(
    job: str,
    batch_id: int,
    records: Sequence[RecordLike],
    rejected: Sequence[tuple[int, str]],
    recorded_at: datetime,
) -> pa.Table:
    """Dead letters for `(index into records, reason)` pairs, in arrival order."""
    chosen = sorted(rejected)
    picked = [records[i] for i, _ in chosen]
    return dead_letter_table(
        job,
        batch_id,
        shard_ids=pa.array([r.shard_id for r in picked], pa.string()),
        sequence_numbers=pa.array([r.sequence_number for r in picked], pa.string()),
        payloads=pa.array([r.data for r in picked], pa.binary()),
        reasons=pa.array([reason for _, reason in chosen], pa.string()),
        arrival_times=pa.array([r.arrival_time for r in picked], TIMESTAMP),
        recorded_at=recorded_at,
    )


def write_batch(
    lake: Lake,
    app_id: str,
    batch_id: int,
    dead_letters: pa.Table,
    tables: Mapping[str, pa.Table],
    outputs: Sequence[TableOutput],
    after_write: AfterWrite | None = None,
) -> dict[str, int]:
    """Write one batch's dead letters and outputs (in `outputs` order), each at most once.

    Returns the rows written per table; a table that already held the batch is left out.
    """
    written: dict[str, int] = {}
    if lake.append(DEAD_LETTER_TABLE, dead_letters, app_id, batch_id):
        written[DEAD_LETTER_TABLE] = dead_letters.num_rows
    if after_write is not None:
        after_write(DEAD_LETTER_TABLE)
    for spec in outputs:
        data = tables[spec.name].cast(spec.schema)
        if spec.key is None:
            done = lake.append(spec.name, data, app_id, batch_id, spec.partition_by)
        else:
            done = lake.upsert(spec.name, data, spec.key, app_id, batch_id)
        if done:
            written[spec.name] = data.num_rows
        if after_write is not None:
            after_write(spec.name)
    return written


def batch_written(lake: Lake, app_id: str, batch_id: int, outputs: Sequence[TableOutput]) -> bool:
    """Whether the batch's last output already holds it: every table does (written in order)."""
    last = lake.transaction_version(outputs[-1].name, app_id)
    return last is not None and last >= batch_id


def next_batch_id(lake: Lake) -> int:
    """One past the highest batch id in the lake: the lake's one batch numbering.

    Every job and engine writing to the same lake takes its batch ids from here, so a batch id
    names one batch of one job: "rows of earlier batches" and "this batch's rows" mean the same
    to all of them, whichever stream or engine wrote them. Every plan table records a batch's id
    before anything else is written, so the Delta log's file statistics of the lake's tables
    (no data read) always hold the highest one.
    """
    highest = [lake.max_value(name, "batch_id", stats_only=True) for name in lake.names()]
    return max((h for h in highest if h is not None), default=-1) + 1


def publish_batch(sinks: Sequence[AlertSink], app_id: str, batch_id: int, lake: Lake) -> int:
    """Hand the batch's rows to each sink after the lake has them, before the batch commits.

    The rows are read back from the lake, never taken from the attempt at hand: a replayed
    batch whose tables an earlier attempt wrote must publish what the lake holds.
    """
    sent = 0
    for sink in sinks:
        rows = lake.read(sink.table, filter=pc.field("batch_id") == batch_id)
        sent += sink.publish(app_id, batch_id, rows)
    return sent
