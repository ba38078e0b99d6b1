"""A Kinesis stream read at its tip, for one long-running worker (continuous mode).

`KinesisSource` answers every read exactly and to the current end of the shard: a new shard
iterator, then GetRecords until a page comes back empty: two calls or more per shard per poll,
made while the worker waits. `KinesisTailSource` instead keeps one reader thread per shard that
polls the shard from where it last stopped (GetRecords on the iterator the last page returned,
never a new iterator unless the position moves) and buffers what it gets, so the worker's next
batch is already in memory when the last one commits: reading overlaps scoring and writing. The
shards are polled side by side (one slow call does not hold up the others' records), and a
worker with nothing to do waits on `wait_for_records`, which returns as soon as a reader has
buffered a record it was not given yet, instead of sleeping a fixed pause.

The exactly-once contract is unchanged: a read with no upper bound (the runner planning its next
batch) returns the buffered records right after `after`, and the runner records their exact
range in the plan as always; a bounded read (replaying a planned batch after a crash) is
`KinesisSource`'s exact one. A read from a position the buffer does not hold (a restart, a
replay that moved the position) starts the shard's buffer over from there.

Poll pace: each shard is asked at most once per `poll_interval_s`. AWS allows 5 GetRecords calls
per second per shard, shared by every consumer of the stream: keep 0.2 s or more there (records
then wait up to that long in the stream); a local server takes far less.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import ClientError

from streamguard.kinesis import MAX_GET_RECORDS, StreamRecord
from streamguard.sources import KinesisSource

log = logging.getLogger(__name__)

DEFAULT_POLL_INTERVAL_S = 0.2  # AWS: 5 GetRecords per second per shard, for every consumer
SHARDS_TTL_S = 10.0  # how long the list of shards is trusted (resharding is seen this late)
MAX_BUFFERED = 50_000  # records held ahead per shard; the reader waits beyond this
# Errors after which a shard is simply read again from its position at the next poll.
RETRY_LATER = frozenset({"ExpiredIteratorException", "ProvisionedThroughputExceededException"})


@dataclass
class _Shard:
    """One shard's read-ahead: the records after `base`, and where GetRecords goes on."""

    base: str | None
    buffer: list[StreamRecord] = field(default_factory=list)
    iterator: str | None = None  # None: get one after `end` before the next call
    closed: bool = False  # the shard is closed and was read to its end
    # The last record the runner was given (`base` when none): records after it are new.
    given: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.given = self.base

    @property
    def has_new(self) -> bool:
        """Whether the buffer holds a record past the last one the runner was given."""
        return self.end != self.given

    @property
    def end(self) -> str | None:
        return self.buffer[-1].sequence_number if self.buffer else self.base

    def align(self, after: str | None) -> None:
        """Make the buffer start right after `after`: drop what the runner has taken since, or
        start over from `after` when the buffer does not hold it."""
        if after == self.base:
            return
        for index, record in enumerate(self.buffer):
            if record.sequence_number == after:
                del self.buffer[: index + 1]
                self.base = after
                return
        self.base, self.buffer, self.iterator, self.closed = after, [], None, False
        self.given = after


class KinesisTailSource(KinesisSource):
    """`KinesisSource` with a reader thread per shard that keeps its next records in memory."""

    def __init__(
        self,
        client: Any,
        stream: str,
        *,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        shards_ttl_s: float = SHARDS_TTL_S,
        max_buffered: int = MAX_BUFFERED,
    ) -> None:
        super().__init__(client, stream)
        self.poll_interval_s = poll_interval_s
        self.shards_ttl_s = shards_ttl_s
        self.max_buffered = max_buffered
        self._shard_list: list[str] = []
        self._listed_at = -float("inf")
        self._state: dict[str, _Shard] = {}
        self._closing = threading.Event()
        self._readers: dict[str, threading.Thread] = {}
        self._failure: BaseException | None = None
        # Notified whenever a reader buffers records (or fails): `wait_for_records`.
        self._arrived = threading.Condition()

    # -- Source

    def shards(self) -> list[str]:
        if time.monotonic() - self._listed_at >= self.shards_ttl_s:
            self._shard_list = super().shards()
            self._listed_at = time.monotonic()
        return list(self._shard_list)

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        """Bounded: the exact read. Unbounded: what the reader has buffered after `after`
        (possibly nothing yet), never waiting for the stream."""
        if until is not None or max_records <= 0:
            return super().read(shard, after, until, max_records)
        if self._failure is not None:
            failure, self._failure = self._failure, None
            raise RuntimeError(f"reading Kinesis stream {self.stream!r} failed") from failure
        state = self._state.setdefault(shard, _Shard(after))
        self._start(shard, state)
        with state.lock:
            state.align(after)
            got = state.buffer[:max_records]
            state.given = got[-1].sequence_number if got else state.base
            return got

    def wait_for_records(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for a record the runner was not given yet (on any shard
        it reads); whether there is one. Returns at once when there is, or when a reader failed
        (the next read raises)."""
        with self._arrived:
            return self._arrived.wait_for(self._has_new, timeout)

    def _has_new(self) -> bool:
        if self._failure is not None:
            return True
        for state in list(self._state.values()):
            with state.lock:
                if state.has_new:
                    return True
        return False

    def close(self) -> None:
        """Stop the reader threads (the worker is stopping)."""
        self._closing.set()
        for reader in list(self._readers.values()):
            reader.join(10)

    # -- the reader threads

    def _start(self, shard: str, state: _Shard) -> None:
        reader = self._readers.get(shard)
        if reader is None or not reader.is_alive():  # a failed reader starts again on a read
            reader = self._readers[shard] = threading.Thread(
                target=self._read_ahead,
                args=(shard, state),
                name=f"kinesis-tail-{self.stream}-{shard}",
                daemon=True,
            )
            reader.start()

    def _read_ahead(self, shard: str, state: _Shard) -> None:
        """Poll the shard at most once per poll interval, from where the runner stands on it,
        until closed."""
        failures = 0
        while not self._closing.is_set():
            started = time.monotonic()
            try:
                fetch = not state.closed and len(state.buffer) < self.max_buffered
                if fetch and self._fetch(shard, state):
                    with self._arrived:
                        self._arrived.notify_all()
                failures = 0
            except Exception as exc:  # the worker sees it at its next read, then restarts
                failures += 1
                if failures >= 5:
                    self._failure = exc
                    with self._arrived:
                        self._arrived.notify_all()
                    return
                log.warning(
                    "Kinesis stream %s, shard %s: read failed (%s), retrying",
                    self.stream,
                    shard,
                    exc,
                )
            pause = self.poll_interval_s - (time.monotonic() - started)
            if pause > 0:
                self._closing.wait(pause)

    def _fetch(self, shard: str, state: _Shard) -> int:
        """One GetRecords page of the shard into its buffer; how many records it held."""
        with state.lock:
            if state.iterator is None:
                state.iterator = self._iterator(shard, state.end)
            iterator, position = state.iterator, state.end
        try:
            response = self.client.get_records(ShardIterator=iterator, Limit=MAX_GET_RECORDS)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code not in RETRY_LATER:
                raise
            log.info("Kinesis shard %s: %s, read again at the next poll", shard, code)
            with state.lock:
                if state.end == position:
                    state.iterator = None
            return 0
        records = [
            StreamRecord(
                shard_id=shard,
                sequence_number=r["SequenceNumber"],
                partition_key=r["PartitionKey"],
                data=bytes(r["Data"]),
                arrival_time=_utc(r["ApproximateArrivalTimestamp"]),
            )
            for r in response.get("Records", [])
        ]
        with state.lock:
            if state.end != position:  # the runner moved the shard elsewhere meanwhile
                return 0
            state.buffer.extend(records)
            state.iterator = response.get("NextShardIterator")
            state.closed = state.iterator is None
        return len(records)

    def _iterator(self, shard: str, after: str | None) -> str:
        kwargs: dict[str, Any] = {"StreamName": self.stream, "ShardId": shard}
        if after is None:
            kwargs["ShardIteratorType"] = "TRIM_HORIZON"
        else:
            kwargs["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
            kwargs["StartingSequenceNumber"] = after
        return str(self.client.get_shard_iterator(**kwargs)["ShardIterator"])


def _utc(value: Any) -> datetime:
    """An arrival timestamp as `read_shard` gives it (so a replayed batch has the same one)."""
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)
