"""The Python Data Source for Kinesis, on real local Spark against a real local kinesalite.

One Spark session for the module. Queries write through foreachBatch into Python dicts keyed by
batch id, so a replayed batch replaces what it wrote (like an idempotent sink) and the tests can
compare a replay with the original.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from pyspark.errors import StreamingQueryException
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql.streaming.datasource import ReadMaxRows

from streamguard.kinesis import ensure_stream, latest_positions, list_shards, put_records
from streamguard.spark.kinesis_source import (
    KinesisOptions,
    KinesisStreamReader,
    ShardRange,
    register_kinesis_source,
    with_text,
)

pytestmark = pytest.mark.spark

Row = tuple[str, str, str, str]  # shard_id, sequence_number, partition_key, payload text


@pytest.fixture(scope="module")
def spark(spark: SparkSession) -> SparkSession:
    """The shared session, with the Kinesis source registered."""
    register_kinesis_source(spark)
    return spark


def _produce(client: Any, stream: str, first: int, n: int) -> list[str]:
    """n JSON payloads numbered from `first`, keyed over 13 keys so both shards get some."""
    payloads = [json.dumps({"i": i, "amount": i * 1.5}) for i in range(first, first + n)]
    put_records(client, stream, ((p.encode(), f"k{i % 13}") for i, p in enumerate(payloads)))
    return payloads


class _CrashError(RuntimeError):
    pass


def _run(
    spark: SparkSession,
    endpoint: str,
    stream: str,
    checkpoint: Path,
    max_per_shard: int | None = None,
    crash_at: int | None = None,
    ending: dict[str, str | None] | None = None,
) -> tuple[dict[int, list[Row]], dict[int, list[Row]]]:
    """One availableNow run: ({batch id: rows}, {batch id: rows seen by a batch that crashed})."""
    done: dict[int, list[Row]] = {}
    crashed: dict[int, list[Row]] = {}
    sink = collecting_sink(done, crashed, crash_at)

    reader = spark.readStream.format("kinesis").option("streamName", stream)
    reader = reader.option("endpointUrl", endpoint)
    if max_per_shard is not None:
        reader = reader.option("maxRecordsPerShard", str(max_per_shard))
    if ending is not None:
        reader = reader.option("endingPosition", json.dumps(ending))
    query = (
        reader.load()
        .writeStream.foreachBatch(sink)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    try:
        query.awaitTermination(120)
    except StreamingQueryException:
        if crash_at is None:
            raise
    finally:
        query.stop()
    return done, crashed


def collecting_sink(
    done: dict[int, list[Row]],
    crashed: dict[int, list[Row]],
    crash_at: int | None,
    after_batch: Callable[[int], object] = lambda _: None,
) -> Callable[[DataFrame, int], None]:
    """A foreachBatch function keeping each batch's rows; batch `crash_at` raises instead."""

    def sink(frame: DataFrame, batch_id: int) -> None:
        rows = [
            (r.shard_id, r.sequence_number, r.partition_key, r.payload)
            for r in with_text(frame).drop("data").collect()
        ]
        if batch_id == crash_at:
            crashed[batch_id] = rows
            raise _CrashError(f"crash in batch {batch_id}")
        done[batch_id] = rows
        after_batch(batch_id)

    return sink


def _payloads(batches: dict[int, list[Row]]) -> list[str]:
    return [row[3] for rows in batches.values() for row in rows]


def _assert_ordered_per_shard(batches: dict[int, list[Row]]) -> None:
    """Within every shard, sequence numbers only grow, batch after batch."""
    last: dict[str, int] = {}
    for batch_id in sorted(batches):
        for shard, seq in sorted((r[0], int(r[1])) for r in batches[batch_id]):
            assert seq > last.get(shard, -1), f"{shard}: {seq} not after {last.get(shard)}"
            last[shard] = seq


def test_reads_everything_once_then_only_new_records_after_restart(
    spark: SparkSession, kinesis: Any, kinesis_server: str, stream_name: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint"
    first = _produce(kinesis, stream_name, 0, 300)
    run1, _ = _run(spark, kinesis_server, stream_name, checkpoint)
    assert sorted(_payloads(run1)) == sorted(first)
    assert Counter(_payloads(run1)) == Counter(first)  # no duplicate
    rows = [r for rows in run1.values() for r in rows]
    assert {r[0] for r in rows} == {s.shard_id for s in list_shards(kinesis, stream_name)}
    assert {r[2] for r in rows} == {f"k{i}" for i in range(13)}
    _assert_ordered_per_shard(run1)

    more = _produce(kinesis, stream_name, 300, 40)
    run2, _ = _run(spark, kinesis_server, stream_name, checkpoint)
    assert Counter(_payloads(run2)) == Counter(more)
    assert min(run2) > max(run1)  # batch ids continue: the checkpoint was resumed
    _assert_ordered_per_shard(run1 | run2)

    run3, _ = _run(spark, kinesis_server, stream_name, checkpoint)
    assert _payloads(run3) == []


def test_ending_position_bounds_an_available_now_run_to_the_sensor_range(
    spark: SparkSession, kinesis: Any, kinesis_server: str, stream_name: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint"
    first = _produce(kinesis, stream_name, 0, 80)
    bounds = latest_positions(kinesis, stream_name, {}, 10_000)  # what the sensor would plan
    later = _produce(kinesis, stream_name, 80, 50)  # arrives before the run starts
    run1, _ = _run(spark, kinesis_server, stream_name, checkpoint, 16, ending=bounds)
    assert Counter(_payloads(run1)) == Counter(first)  # exactly the range, in several batches
    assert len(run1) > 1
    for rows in run1.values():
        assert all(int(r[1]) <= int(str(bounds[r[0]])) for r in rows)
    # The next range is the next run's; a shard left out with "" waits for a later run.
    shards = sorted(bounds)
    skip: dict[str, str | None] = {shards[0]: ""}
    run2, _ = _run(spark, kinesis_server, stream_name, checkpoint, ending=skip)
    assert {r[0] for rows in run2.values() for r in rows} <= set(shards[1:])
    run3, _ = _run(spark, kinesis_server, stream_name, checkpoint)
    assert Counter(_payloads(run2 | run3)) == Counter(later)
    _assert_ordered_per_shard(run1 | run2 | run3)


def test_ending_position_is_validated_when_loaded() -> None:
    with pytest.raises(ValueError, match="endingPosition must be a JSON object"):
        KinesisOptions.parse({"streamName": "s", "endingPosition": "[1, 2]"})
    parsed = KinesisOptions.parse({"streamName": "s", "endingPosition": '{"a": "12", "b": null}'})
    assert parsed.ending_position == {"a": "12", "b": None}
    assert KinesisOptions.parse({"streamName": "s"}).ending_position is None


def test_crash_mid_stream_replays_the_same_range_then_resumes(
    spark: SparkSession, kinesis: Any, kinesis_server: str, stream_name: str, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "checkpoint"
    sent = _produce(kinesis, stream_name, 0, 60)
    run1, crashed = _run(spark, kinesis_server, stream_name, checkpoint, 8, crash_at=1)
    assert list(run1) == [0] and list(crashed) == [1]
    for rows in (*run1.values(), *crashed.values()):
        assert max(Counter(r[0] for r in rows).values()) <= 8  # maxRecordsPerShard held

    run2, _ = _run(spark, kinesis_server, stream_name, checkpoint, 8)
    assert sorted(run2[1]) == sorted(crashed[1])  # the planned batch, read again exactly
    everything = run1 | run2
    assert len(everything) >= 4  # 60 records over 2 shards at <= 8 per shard and batch
    assert Counter(_payloads(everything)) == Counter(sent)
    _assert_ordered_per_shard(everything)


def _drain(
    reader: KinesisStreamReader,
    start: dict[str, Any],
    cap: int,
    after_first: Callable[[], object] = lambda: None,
) -> tuple[list[list[tuple[str, bytes]]], dict[str, Any]]:
    """Drive the reader the way Spark does, without Spark: (records per batch, last offset)."""
    batches: list[list[tuple[str, bytes]]] = []
    for step in range(100):
        end = reader.latestOffset(start, ReadMaxRows(cap))
        if step == 0:
            after_first()
        if end == start:
            return batches, end
        parts = reader.partitions(start, end)
        assert all(isinstance(p, ShardRange) for p in parts)
        rows: list[tuple[str, bytes]] = []
        for part in parts:
            for batch in reader.read(part):
                assert isinstance(batch, pa.RecordBatch)
                rows += zip(batch["shard_id"].to_pylist(), batch["data"].to_pylist(), strict=True)
        batches.append(rows)
        start = end
    raise AssertionError("the reader never caught up")


def test_resharding_reads_parents_before_children_and_available_now_stops_at_its_target(
    kinesis: Any, kinesis_server: str, stream_name: str
) -> None:
    before = [p.encode() for p in _produce(kinesis, stream_name, 0, 30)]
    parent = list_shards(kinesis, stream_name)[0]
    hash_range = kinesis.list_shards(StreamName=stream_name)["Shards"][0]["HashKeyRange"]
    middle = (int(hash_range["StartingHashKey"]) + int(hash_range["EndingHashKey"])) // 2
    kinesis.split_shard(
        StreamName=stream_name,
        ShardToSplit=parent.shard_id,
        NewStartingHashKey=str(middle),
    )
    ensure_stream(kinesis, stream_name)  # waits for ACTIVE
    after = [p.encode() for p in _produce(kinesis, stream_name, 30, 30)]
    shards = list_shards(kinesis, stream_name)
    children = {s.shard_id for s in shards if s.parent_shard_id == parent.shard_id}
    assert len(children) == 2

    options = KinesisOptions(stream=stream_name, endpoint_url=kinesis_server)
    reader = KinesisStreamReader(options)
    initial = reader.initialOffset()
    assert initial == {s.shard_id: None for s in shards}
    batches, end = _drain(reader, initial, cap=4)
    assert Counter(d for rows in batches for _, d in rows) == Counter(before + after)
    parent_batches = [i for i, rows in enumerate(batches) for s, _ in rows if s == parent.shard_id]
    child_batches = [i for i, rows in enumerate(batches) for s, _ in rows if s in children]
    assert child_batches and max(parent_batches) < min(child_batches)

    # availableNow: the first latestOffset fixes the end; later records wait for the next run.
    again = KinesisStreamReader(options)
    again.prepareForTriggerAvailableNow()
    late = [p.encode() for p in _produce(kinesis, stream_name, 60, 20)]  # > 4 on a shard
    batches, _ = _drain(again, end, 4, lambda: _produce(kinesis, stream_name, 80, 10))
    assert len(batches) >= 2
    assert Counter(d for rows in batches for _, d in rows) == Counter(late)
