"""Where micro-batches come from: a sharded, ordered, replayable log of records.

The runner needs exactly two things of a source: its shards, and the records of a shard in an
exact sequence range (so a batch can be read again, identically, after a crash).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from streamguard.kinesis import StreamRecord, list_shards, read_shard


class Source(Protocol):
    def shards(self) -> list[str]: ...

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]: ...

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        """Told where the lake's committed progress is (e.g. Kafka group offsets for lag
        tools); never read back as the position: the lake is the source of truth."""
        ...


class KinesisSource:
    """A Kinesis stream (local server or AWS; the client decides which)."""

    def __init__(self, client: Any, stream: str) -> None:
        self.client = client
        self.stream = stream

    def shards(self) -> list[str]:
        return [s.shard_id for s in list_shards(self.client, self.stream)]

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        return read_shard(self.client, self.stream, shard, after, until, max_records)

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        return None  # Kinesis keeps no consumer position of ours


SEQ_DIGITS = 20


class MemorySource:
    """An in-memory log with Kinesis-like sequence numbers: replays, benchmarks, tests."""

    def __init__(self, shards: Mapping[str, Sequence[bytes]]) -> None:
        self.acknowledged: dict[str, str | None] = {}  # the last committed positions
        now = datetime.now(UTC)
        self._records = {
            shard: [
                StreamRecord(shard, str(i + 1).zfill(SEQ_DIGITS), "", bytes(data), now)
                for i, data in enumerate(payloads)
            ]
            for shard, payloads in shards.items()
        }

    @classmethod
    def split(cls, payloads: Sequence[bytes], keys: Sequence[str], n_shards: int) -> MemorySource:
        """Spread payloads over shards by key, as Kinesis does with partition keys."""
        shards: dict[str, list[bytes]] = {f"shard-{i:03d}": [] for i in range(n_shards)}
        names = list(shards)
        for data, key in zip(payloads, keys, strict=True):
            shards[names[hash_key(key) % n_shards]].append(data)
        return cls(shards)

    def shards(self) -> list[str]:
        return list(self._records)

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        records = self._records[shard]
        start = 0 if after is None else int(after)
        stop = len(records) if until is None else min(int(until), len(records))
        return records[start : min(stop, start + max_records)]

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        self.acknowledged = dict(positions)


def hash_key(key: str) -> int:
    """A stable (process-independent) hash of a partition key."""
    value = 0
    for ch in key.encode():
        value = (value * 31 + ch) & 0xFFFFFFFF
    return value
