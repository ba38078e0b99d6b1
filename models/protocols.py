"""The contract between a domain job and the engine that runs it (in-process runner, Spark).

Defined here, on the domain side, because the layers run one way: the engine imports the domain,
never the reverse. A job plans a typed context for each batch (stored whole with the batch plan
by every engine, so a replay runs with exactly the same context), reads through a `LakeReader`
and returns `Processed` rows per table.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol, TypeVar

import pyarrow as pa


class LakeReader(Protocol):
    def read(
        self,
        name: str,
        columns: Any = None,
        filter: Any = None,
        version: Any = None,
        schema: Any = None,
        files: Any = None,
    ) -> pa.Table: ...

    def version(self, name: str) -> int | None: ...

    def files(self, name: str, version: int | None = None) -> list[str]: ...

    def files_holding(
        self, name: str, column: str, values: Any, partition: str, partitions: Any
    ) -> list[str] | None: ...


class RecordLike(Protocol):
    """One stream record as the engine read it."""

    @property
    def shard_id(self) -> str: ...
    @property
    def sequence_number(self) -> str: ...
    @property
    def data(self) -> bytes: ...
    @property
    def arrival_time(self) -> datetime | None: ...
    @property
    def partition_key(self) -> str | None: ...


class BatchContext(Protocol):
    """What a batch runs with (model version, lookup versions): recorded whole with its plan."""

    def to_json(self) -> str: ...


C = TypeVar("C", bound=BatchContext)


@dataclass(frozen=True)
class TableOutput:
    name: str
    schema: pa.Schema
    key: tuple[str, ...] | None = None  # None: append; else upsert on these columns
    partition_by: tuple[str, ...] = ()  # the table's partition columns (when created)
    # The columns whose file statistics the Delta log keeps (the ones reads prune on); empty:
    # Delta's default, the first 32. Every commit handles every file's statistics, so a wide
    # table written every few hundred milliseconds pays for each column kept.
    stats_columns: tuple[str, ...] = ()
    # A keyed table bounded by its number of keys (state) that every batch reads and upserts:
    # the runner keeps it whole in memory between batches (`streamguard.lake.Lake.keep_in_memory`).
    in_memory: bool = False
    # Of a keyed table: a column that grows with every batch (the batch id) naming each key's
    # current row. The table is then written merge-on-read: a batch appends its changed rows
    # instead of MERGEing them (which rewrites every file holding a changed key: its cost follows
    # the table, not the batch); readers take each key's latest (`streamguard.lake.Lake.upsert`).
    latest_by: str | None = None
    # Written after every other output, at once with the other outputs marked so (they must end
    # `outputs`), one thread each (`streamguard.commit.write_batch`): state tables whose new rows
    # depend on none of the others' stored rows, since a replay after a crash amid them reads
    # the others as the first attempt left them (possibly already advanced by the batch).
    last_together: bool = False


@dataclass
class Processed:
    """What a job made of one batch: rows per output table, and the records it rejected."""

    tables: dict[str, pa.Table]
    rejected: list[tuple[int, str]]  # (index into the batch's records, reason)
    stats: dict[str, Any] = field(default_factory=dict)


class Processor(Protocol[C]):
    """The domain side of a streaming job (e.g. fraud scoring), free of I/O but reads."""

    @property
    def outputs(self) -> Sequence[TableOutput]:
        """Tables in write order: state last, so a replayed batch reads the state before it."""
        ...

    def plan_context(self, lake: LakeReader) -> C:
        """The context a new batch runs with; the engine records it with the batch plan."""
        ...

    def load_context(self, text: str) -> C:
        """A recorded context (`to_json`) back, for a replayed batch."""
        ...

    def process(
        self, records: Sequence[RecordLike], batch_id: int, context: C, lake: LakeReader
    ) -> Processed: ...
