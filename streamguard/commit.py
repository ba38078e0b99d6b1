"""The one commit path every executor takes: dead letters, then the outputs in order, exactly once.

In-process runner, Spark with state in Delta, Spark with the state store (and every source behind
them) plan a batch, process it their own way, then hand the rows here. Each table is written with
the Delta application transaction `(app_id, batch_id)`, so a batch replayed after a crash at any
point writes only the tables still missing it; state tables come last in `outputs` (written at
once when marked `last_together`), so a replay reads the state from before the batch. Marking the
batch committed is the caller's (a runner's checkpoint, Spark's offset log).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
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

    Returns the rows written per table; a table that already held the batch is left out, and so
    is one the batch has no row for. An empty write would add nothing but a Delta commit (each
    costs milliseconds, most batches have no dead letter, alert or new label), and a replay
    computes the same empty rows again; the last output (or group, below) is written even when
    empty, so its application transaction still says the whole batch is written
    (`batch_written`).

    The dead letters and the appends that lead `outputs` (up to the first keyed output) are
    written at once, one thread per table: they are separate tables and commits, none is read
    by the batch's own processing (earlier batches' rows only), so a crash amid them leaves some
    written and the replay writes the rest, as it would after a crash between two of them in
    turn. `after_write` is called for each, in order, once they are all written. The keyed
    outputs (upserts) and what follows them are written one after the other, except the
    outputs marked `last_together` that end `outputs` (the state tables): written at once after
    all the others, one thread each, each one handled as the last output is (written even when
    empty); together their application transactions say the whole batch is written
    (`batch_written`). A crash amid them leaves some holding the batch; the replay writes only
    the others (each one's rows come from its own stored state, which has not moved, whatever
    the others' did).
    """
    written: dict[str, int] = {}
    specs = [TableOutput(DEAD_LETTER_TABLE, dead_letters.schema), *outputs]
    data = {DEAD_LETTER_TABLE: dead_letters} | {
        o.name: tables[o.name].cast(o.schema) for o in outputs
    }
    final = {o.name for o in _final_outputs(outputs)}  # written even when empty
    tail = len(specs) - len(final) if outputs and outputs[-1].last_together else len(specs)
    leading = 1
    while leading < min(tail, len(specs) - 1) and specs[leading].key is None:
        leading += 1
    # The keyed outputs are written one by one after the whole leading group, so every table
    # before the last keyed one already holding the batch (a replay after a crash) was written
    # then, or had no row and was left out. A replay must not write those now: its rows come from
    # state tables the first attempt may already have advanced (a crash after `customer_state`),
    # not from the state the batch was first computed on. (Inside the leading group, written in
    # parallel, a later table may hold the batch while an earlier one does not: no state had
    # moved then, so the replay writes what is missing there; inside the last group likewise,
    # each of its tables on its own holding.)
    held = {i for i in range(leading, len(specs)) if _holds(lake, specs[i].name, app_id, batch_id)}
    done_before = max(held, default=-1)

    def write(spec: TableOutput) -> bool:
        rows = data[spec.name]
        i = specs.index(spec)
        if rows.num_rows == 0 and spec.name not in final:
            return False  # nothing to add (see above)
        if (i in held) if i >= tail else (i <= done_before):
            return False  # written by an earlier attempt, or empty then (see above)
        if spec.key is None:
            return lake.append(spec.name, rows, app_id, batch_id, spec.partition_by)
        return lake.upsert(spec.name, rows, spec.key, app_id, batch_id, spec.latest_by)

    def write_group(group: Sequence[TableOutput]) -> None:
        """Write `group` at once (one thread per table that has something to write)."""
        todo = [s for s in group if data[s.name].num_rows or s.name in final]
        if len(todo) > 1:
            futures = [_writers().submit(write, spec) for spec in todo]
            done = {
                spec.name: f.exception() or f.result()
                for spec, f in zip(todo, futures, strict=True)
            }
            for outcome in done.values():
                if isinstance(outcome, BaseException):
                    raise outcome
        else:
            done = {spec.name: write(spec) for spec in todo}
        for spec in group:
            if done.get(spec.name):
                written[spec.name] = data[spec.name].num_rows
            if after_write is not None:
                after_write(spec.name)

    write_group(specs[:leading])
    for spec in specs[leading:tail]:
        if write(spec):
            written[spec.name] = data[spec.name].num_rows
        if after_write is not None:
            after_write(spec.name)
    write_group(specs[tail:])
    return written


def _final_outputs(outputs: Sequence[TableOutput]) -> list[TableOutput]:
    """The outputs whose application transactions together say a batch is written: the
    `last_together` group that ends `outputs`, else the last output alone."""
    tail = len(outputs)
    while tail > 0 and outputs[tail - 1].last_together:
        tail -= 1
    if any(o.last_together for o in outputs[:tail]):
        raise ValueError("the outputs marked last_together must end the outputs")
    return list(outputs[tail:]) or list(outputs[-1:])


def _holds(lake: Lake, name: str, app_id: str, batch_id: int) -> bool:
    """Whether the table already holds batch `batch_id` of `app_id`."""
    version = lake.transaction_version(name, app_id)
    return version is not None and version >= batch_id


_WRITERS: ThreadPoolExecutor | None = None


def _writers() -> ThreadPoolExecutor:
    """The threads `write_batch` writes independent tables on (delta-rs releases the GIL)."""
    global _WRITERS
    if _WRITERS is None:
        _WRITERS = ThreadPoolExecutor(max_workers=6, thread_name_prefix="delta-write")
    return _WRITERS


def batch_written(lake: Lake, app_id: str, batch_id: int, outputs: Sequence[TableOutput]) -> bool:
    """Whether the batch's last output (each of the `last_together` group that ends `outputs`)
    already holds it: then every table does (written in order)."""
    return all(_holds(lake, o.name, app_id, batch_id) for o in _final_outputs(outputs))


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
