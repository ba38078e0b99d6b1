"""A Kinesis streaming source for Spark, written with the Python Data Source API.

Spark cannot fetch the Kinesis connector jar here, so the source is Python on top of the project's
boto3 helpers. An offset is a JSON object of per-shard sequence numbers: the last record already
included (null: nothing read yet, start at TRIM_HORIZON). Every micro-batch is an exact
`(after, until]` range per shard that Spark writes to its offset log before running the batch, so
a batch replayed after a crash reads the same records, and a restarted query resumes where the
checkpoint says.

    register_kinesis_source(spark)
    frame = (
        spark.readStream.format("kinesis")
        .option("streamName", "transactions")
        .option("endpointUrl", "http://127.0.0.1:4567")  # optional
        .option("maxRecordsPerShard", "1000")  # per micro-batch
        .option("region", "eu-west-1")  # optional: else AWS_REGION / AWS_DEFAULT_REGION
        .option("startingPosition", "TRIM_HORIZON")  # or LATEST, or {shard: sequence number}
        .option("endingPosition", '{"shardId-000000000000": "4959..."}')  # optional, see below
        .load()
    )

`endingPosition` bounds a `trigger(availableNow=True)` run to exact per-shard ends (inclusive;
a shard not named is read to its end, a null or empty value leaves it for a later run): the
Dagster sensor's batch bounds, so a sensor-launched Spark run scores the same range an in-process
run would, and the next range is the next run's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.datasource import (
    DataSource,
    DataSourceStreamReader,
    InputPartition,
)
from pyspark.sql.streaming.datasource import (
    ReadAllAvailable,
    ReadLimit,
    ReadMaxRows,
    SupportsTriggerAvailableNow,
)
from pyspark.sql.types import StructType

from streamguard.kinesis import ShardInfo, StreamRecord, kinesis_client, list_shards, read_shard

if TYPE_CHECKING:
    from mypy_boto3_kinesis import KinesisClient
else:
    KinesisClient = Any

FORMAT = "kinesis"
SCHEMA = (
    "shard_id string, sequence_number string, partition_key string, data binary, "
    "arrival_time timestamp"
)
ARROW_SCHEMA = pa.schema(
    [
        ("shard_id", pa.string()),
        ("sequence_number", pa.string()),
        ("partition_key", pa.string()),
        ("data", pa.binary()),
        ("arrival_time", pa.timestamp("us", tz="UTC")),
    ]
)
DEFAULT_MAX_RECORDS_PER_SHARD = 10_000
READ_CHUNK = 10_000  # records held in memory at once, driver and executors alike
TRIM_HORIZON = "TRIM_HORIZON"
LATEST = "LATEST"

# shard id -> sequence number of the last record included (None: nothing read yet)
Offset = dict[str, str | None]


@dataclass(frozen=True)
class KinesisOptions:
    """The source's options, validated once on the driver."""

    stream: str
    endpoint_url: str | None = None
    region: str | None = None
    max_records_per_shard: int = DEFAULT_MAX_RECORDS_PER_SHARD
    starting_position: str = TRIM_HORIZON
    # availableNow stops here: {shard id: last sequence number to include}; a shard not named is
    # read to its end, a null or empty value leaves the shard for a later run.
    ending_position: Offset | None = None

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> KinesisOptions:
        """From `.option(...)` values (Spark hands them over case-insensitively)."""
        stream = options.get("streamName")
        if not stream:
            raise ValueError("the kinesis source needs option streamName")
        raw_max = options.get("maxRecordsPerShard") or str(DEFAULT_MAX_RECORDS_PER_SHARD)
        try:
            max_records = int(raw_max)
        except ValueError:
            raise ValueError(f"maxRecordsPerShard must be an integer, got {raw_max!r}") from None
        if max_records < 1:
            raise ValueError(f"maxRecordsPerShard must be at least 1, got {max_records}")
        position = (options.get("startingPosition") or TRIM_HORIZON).strip()
        if position.upper() in (TRIM_HORIZON, LATEST):
            position = position.upper()
        else:
            parse_positions(position)  # fail at load(), not at the first batch
        ending = options.get("endingPosition")
        return cls(
            stream=stream,
            endpoint_url=options.get("endpointUrl") or None,
            region=options.get("region") or None,
            max_records_per_shard=max_records,
            starting_position=position,
            ending_position=parse_positions(ending, "endingPosition") if ending else None,
        )


def parse_positions(text: str, option: str = "startingPosition") -> Offset:
    """A JSON object {shard id: sequence number or null}: startingPosition, endingPosition or
    an offset."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and (v is None or isinstance(v, str)) for k, v in value.items()
    ):
        allowed = "TRIM_HORIZON, LATEST or " if option == "startingPosition" else ""
        raise ValueError(
            f"{option} must be {allowed}a JSON object of "
            f"{{shard id: sequence number or null}}, got {text[:80]!r}"
        )
    return dict(value)


def _seq(value: str) -> int:
    """Kinesis sequence numbers are decimal strings of up to 128 bits: compare them as ints."""
    return int(value)


def bounded_offsets(start: Mapping[str, str | None], end: Offset, ending: Offset) -> Offset:
    """`end` (the stream's end) cut at `ending` per shard, never before `start`."""
    target: Offset = {}
    for sid, last in end.items():
        if sid not in ending:
            target[sid] = last
            continue
        stop, after = ending[sid], start.get(sid)
        if not stop or last is None or (after is not None and _seq(stop) <= _seq(after)):
            target[sid] = after
        else:
            target[sid] = stop if _seq(stop) < _seq(last) else last
    return target


@dataclass(frozen=True)
class ShardRange(InputPartition):
    """One shard's records with after < sequence number <= until: one Spark task."""

    shard_id: str
    after: str | None
    until: str


def _scan(
    client: KinesisClient,
    stream: str,
    shard_id: str,
    after: str | None,
    until: str | None,
    cap: int | None,
) -> tuple[str | None, int]:
    """(last sequence number, count) of up to `cap` records past `after` (None: no cap).

    Reads in chunks and keeps only the last position, so finding the end of a long shard needs
    no memory.
    """
    last, count = after, 0
    while cap is None or count < cap:
        want = READ_CHUNK if cap is None else min(READ_CHUNK, cap - count)
        records = read_shard(client, stream, shard_id, last, until, want)
        if records:
            last, count = records[-1].sequence_number, count + len(records)
        if len(records) < want or (until is not None and last == until):
            break  # caught up, at `until`, or at a closed shard's end
    return last, count


def _ordered(shards: Sequence[ShardInfo]) -> list[ShardInfo]:
    """Parents before children (shard ids grow with creation, but do not rely on it alone)."""
    return sorted(shards, key=lambda s: s.shard_id)


def records_batch(records: Sequence[StreamRecord]) -> pa.RecordBatch:
    """Stream records as one Arrow batch of the sources' SCHEMA (Kinesis and Kafka alike)."""
    return pa.RecordBatch.from_arrays(
        [
            pa.array([r.shard_id for r in records], pa.string()),
            pa.array([r.sequence_number for r in records], pa.string()),
            pa.array([r.partition_key for r in records], pa.string()),
            pa.array([r.data for r in records], pa.binary()),
            pa.array([r.arrival_time for r in records], pa.timestamp("us", tz="UTC")),
        ],
        schema=ARROW_SCHEMA,
    )


@dataclass(frozen=True)
class _Step:
    end: Offset
    done: set[str]  # closed shards with nothing left
    most_read: int  # the most records read from one shard (unbounded steps only)
    child_with_parent: bool  # a child admitted while its parent had records in this step


class KinesisStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Plans exact per-shard ranges on the driver; executors read them with `read_shard`.

    Resharding: a shard listed for the first time joins the offset at TRIM_HORIZON, but only
    once its parent is read to its end (closed and nothing left), so a partition key's records
    from the parent are in an earlier micro-batch than those from the child. Only the
    `ParentShardId` is known to the helpers; after a merge the adjacent parent is not waited for.
    Throttling is retried by the helpers' backoff.
    """

    def __init__(self, options: KinesisOptions) -> None:
        self.options = options
        self._client: KinesisClient | None = None
        self._target: Offset | None = None  # the availableNow end, once known
        self._target_pending = False
        self._target_done: set[str] = set()  # closed shards whose target is their very end

    def __getstate__(self) -> dict[str, Any]:
        """Executors get the options only: a boto3 client does not pickle."""
        state = self.__dict__.copy()
        state["_client"] = None
        return state

    @property
    def client(self) -> KinesisClient:
        if self._client is None:
            self._client = kinesis_client(self.options.endpoint_url, self.options.region)
        return self._client

    # ------------------------------------------------------------------ driver

    def initialOffset(self) -> dict[str, Any]:
        """Where a new query starts (a restarted one starts at its checkpoint instead)."""
        shards = _ordered(list_shards(self.client, self.options.stream))
        position = self.options.starting_position
        if position == TRIM_HORIZON:
            return {s.shard_id: None for s in shards}
        if position == LATEST:
            stream = self.options.stream
            return {
                s.shard_id: _scan(self.client, stream, s.shard_id, None, None, None)[0]
                for s in shards
            }
        given = parse_positions(position)
        return {s.shard_id: given.get(s.shard_id) for s in shards}

    def getDefaultReadLimit(self) -> ReadLimit:
        """maxRecordsPerShard, carried as ReadMaxRows; its rows are per shard, not in total."""
        return ReadMaxRows(self.options.max_records_per_shard)

    def prepareForTriggerAvailableNow(self) -> None:
        """Fix the end of an availableNow run at the first `latestOffset`, which knows the start."""
        self._target_pending = True

    def latestOffset(self, start: dict[str, Any], limit: ReadLimit) -> dict[str, Any]:
        """The next batch's end: each shard read past `start`, at most the limit per shard.

        Under availableNow the first call reads every shard to its end once to fix the target;
        later batches never go past it, so the run ends even while producers keep writing.
        """
        cap = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        if isinstance(limit, ReadAllAvailable):
            cap = None
        if self._target_pending:
            self._target_pending = False
            step = self._advance(start, None, None)
            self._target, self._target_done = step.end, step.done
            ending = self.options.ending_position
            if ending is not None:
                self._target = bounded_offsets(start, step.end, ending)
                self._target_done = {s for s in step.done if self._target[s] == step.end[s]}
            elif cap is None or (step.most_read <= cap and not step.child_with_parent):
                return dict(step.end)  # the first batch is the whole run: no second read
        return dict(self._advance(start, cap, self._target).end)

    def _advance(
        self, start: Mapping[str, str | None], cap: int | None, bound: Offset | None
    ) -> _Step:
        """The end offset of one step from `start`, and what was seen on the way.

        With no cap and no bound (fixing an availableNow target) a closed parent read to its end
        lets its children in at once; otherwise a child waits until its parent had nothing left
        before this step, so the two never share a micro-batch.
        """
        stream = self.options.stream
        fixing_target = cap is None and bound is None
        shards = _ordered(list_shards(self.client, stream))
        listed = {s.shard_id for s in shards}
        end: Offset = {k: v for k, v in start.items() if k not in listed}  # expired: kept
        done: set[str] = set()  # closed and nothing left (before this step, unless fixing)
        counts: dict[str, int] = {}
        child_with_parent = False
        for shard in shards:
            sid, parent = shard.shard_id, shard.parent_shard_id
            if bound is not None and sid not in bound:
                if sid in start:
                    end[sid] = start[sid]
                continue  # not part of the availableNow target
            if parent is not None and parent in listed and parent not in done:
                if sid in start:
                    end[sid] = start[sid]
                continue  # the parent still has records: the child waits
            if parent is not None and counts.get(parent, 0) > 0:
                child_with_parent = True
            after = start.get(sid)
            if bound is not None:
                until = bound[sid]
                if until is None or until == after:
                    end[sid] = after  # nothing left up to the target
                    if sid in self._target_done:
                        done.add(sid)
                    continue
                end[sid] = _scan(self.client, stream, sid, after, until, cap)[0]
                continue
            last, count = _scan(self.client, stream, sid, after, None, cap)
            end[sid], counts[sid] = last, count
            closed = shard.ending_sequence_number is not None
            if closed and (count == 0 or fixing_target):
                done.add(sid)
        most = max(counts.values(), default=0)
        return _Step(dict(sorted(end.items())), done, most, child_with_parent)

    def partitions(self, start: dict[str, Any], end: dict[str, Any]) -> Sequence[InputPartition]:
        """One task per shard that moved between the two offsets."""
        return [
            ShardRange(sid, start.get(sid), until)
            for sid, until in sorted(end.items())
            if until is not None and until != start.get(sid)
        ]

    def commit(self, end: dict[str, Any]) -> None:
        """Nothing to do: Spark's checkpoint holds the offsets, Kinesis needs no ack."""

    def stop(self) -> None:
        self._client = None

    # ------------------------------------------------------------------ executors

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        """The range's records in order, in Arrow batches of at most READ_CHUNK rows."""
        assert isinstance(partition, ShardRange)
        client = kinesis_client(self.options.endpoint_url, self.options.region)
        after = partition.after
        while after != partition.until:
            records = read_shard(
                client, self.options.stream, partition.shard_id, after, partition.until, READ_CHUNK
            )
            if not records:
                raise RuntimeError(
                    f"shard {partition.shard_id} of {self.options.stream!r} ended at {after} "
                    f"before {partition.until}: records past retention or a different stream"
                )
            yield records_batch(records)
            after = records[-1].sequence_number


class KinesisDataSource(DataSource):
    """`spark.readStream.format("kinesis")`: options in the module docstring."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return KinesisStreamReader(KinesisOptions.parse(self.options))


def register_source(spark: SparkSession, source: type[DataSource]) -> None:
    """Make a Python data source's format available in this session.

    Idempotent: a session derived from one that registered it (`newSession`) may refuse a second
    registration as DATA_SOURCE_ALREADY_EXISTS; the source is then there already.
    """
    from pyspark.errors import AnalysisException

    try:
        spark.dataSource.register(source)
    except AnalysisException as exc:
        if exc.getCondition() != "DATA_SOURCE_ALREADY_EXISTS":
            raise


def register_kinesis_source(spark: SparkSession) -> None:
    """Make `format("kinesis")` available in this session (idempotent)."""
    register_source(spark, KinesisDataSource)


def with_text(frame: DataFrame, column: str = "data", as_: str = "payload") -> DataFrame:
    """Add the binary payload as UTF-8 text, the input `from_json` needs."""
    return frame.withColumn(as_, F.col(column).cast("string"))
