"""The contract between a domain job and the engine that runs it (in-process runner, Spark).

Defined here, on the domain side, because the layers run one way: the engine imports the domain,
never the reverse. A job reads through a `LakeReader` and returns `Processed` rows per table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import pyarrow as pa


class LakeReader(Protocol):
    def read(
        self,
        name: str,
        columns: Any = None,
        filter: Any = None,
        version: Any = None,
        schema: Any = None,
    ) -> pa.Table: ...

    def version(self, name: str) -> int | None: ...


class RecordLike(Protocol):
    """One stream record as the engine read it."""

    @property
    def shard_id(self) -> str: ...
    @property
    def sequence_number(self) -> str: ...
    @property
    def data(self) -> bytes: ...


@dataclass(frozen=True)
class TableOutput:
    name: str
    schema: pa.Schema
    key: tuple[str, ...] | None = None  # None: append; else upsert on these columns


@dataclass
class Processed:
    """What a job made of one batch: rows per output table, and the records it rejected."""

    tables: dict[str, pa.Table]
    rejected: list[tuple[int, str]]  # (index into the batch's records, reason)
    stats: dict[str, Any] = field(default_factory=dict)
