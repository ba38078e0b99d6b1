"""The Python Data Source for Kafka, on real local Spark against the real local broker (noida-db).

The run's one Spark session and one broker (conftest). Queries write through foreachBatch into
Python dicts keyed by batch id, so a replayed batch replaces what it wrote (like an idempotent
sink) and the tests can compare a replay with the original. The last test runs the fraud job on
Spark from a topic and compares every table with the in-process runner over the same topic.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from fraud_streams import BAD_RECORDS, assert_same_tables, sorted_table, troubled_stream
from pyspark.errors import StreamingQueryException
from pyspark.sql import SparkSession
from pyspark.sql.streaming.datasource import ReadMaxRows
from test_spark_kinesis import (
    Row,
    _assert_ordered_per_shard,
    _payloads,
    collecting_sink,
)

from models.job import ALERTS, CUSTOMER_STATE, FEATURES, SCORES, TERMINAL_STATE, TRANSACTIONS
from models.registry import LoadedModel
from models.schema import to_payload
from models.simulate import Simulation
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.kafka import (
    ClientConfig,
    KafkaRetentionGap,
    KafkaSource,
    add_partitions,
    latest_positions,
    produce_records,
    sequence_number,
)
from streamguard.lake import Lake
from streamguard.pipeline import load_labels, scoring_runner
from streamguard.spark.fraud import run_fraud_on_spark
from streamguard.spark.kafka_source import (
    FORMAT,
    KafkaSourceOptions,
    KafkaStreamReader,
    kafka_records,
    register_kafka_source,
)
from streamguard.spark.kinesis_source import ShardRange

pytestmark = pytest.mark.spark


@pytest.fixture(scope="module")
def spark(spark: SparkSession) -> SparkSession:
    """The shared session, with the Kafka source registered (twice: registration is idempotent)."""
    register_kafka_source(spark)
    register_kafka_source(spark)
    return spark


@dataclass
class Stream:
    """A fresh 2-partition topic (conftest's `topic`) and one checkpoint of a query over it."""

    spark: SparkSession
    config: ClientConfig
    bootstrap: str
    topic: str
    checkpoint: Path

    def shard(self, partition: int) -> str:
        return f"{self.topic}:{partition}"

    def produce(self, first: int, n: int, tag: str = "r") -> list[str]:
        """n JSON payloads numbered from `first`, keyed over 13 keys: every partition gets some."""
        payloads = [json.dumps({"tag": tag, "i": i}) for i in range(first, first + n)]
        keyed = ((p.encode(), f"k{i % 13}") for i, p in enumerate(payloads))
        produce_records(self.config, self.topic, keyed)
        return payloads

    def run(
        self,
        max_per_partition: int | None = None,
        crash_at: int | None = None,
        ending: dict[str, str | None] | None = None,
        after_batch: Callable[[int], object] = lambda _: None,
    ) -> tuple[dict[int, list[Row]], dict[int, list[Row]]]:
        """One availableNow run: ({batch id: rows}, {batch id: rows of a batch that crashed})."""
        done: dict[int, list[Row]] = {}
        crashed: dict[int, list[Row]] = {}
        sink = collecting_sink(done, crashed, crash_at, after_batch)

        reader = self.spark.readStream.format(FORMAT).option("bootstrap", self.bootstrap)
        reader = reader.option("topic", self.topic)
        if max_per_partition is not None:
            reader = reader.option("maxRecordsPerPartition", str(max_per_partition))
        if ending is not None:
            reader = reader.option("endingOffsets", json.dumps(ending))
        query = (
            reader.load()
            .writeStream.foreachBatch(sink)
            .option("checkpointLocation", str(self.checkpoint))
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


@pytest.fixture
def stream(
    spark: SparkSession,
    kafka_config: ClientConfig,
    kafka_bootstrap: str,
    topic: str,
    tmp_path: Path,
) -> Stream:
    return Stream(spark, kafka_config, kafka_bootstrap, topic, tmp_path / "checkpoint")


# --------------------------------------------------------------------------- options


def test_options_are_validated_when_loaded_and_credentials_stay_out_of_them(
    monkeypatch: pytest.MonkeyPatch, spark: SparkSession
) -> None:
    base = {"bootstrap": "127.0.0.1:9092", "topic": "payments"}
    parsed = KafkaSourceOptions.parse(
        {**base, "endingOffsets": '{"payments:0": "12", "payments:1": "", "payments:2": null}'}
    )
    assert parsed.ending_offsets == {
        "payments:0": sequence_number(12),
        "payments:1": "",
        "payments:2": None,
    }
    assert parsed.starting_offsets == "earliest" and parsed.max_records_per_partition == 10_000
    assert (
        KafkaSourceOptions.parse({**base, "startingOffsets": "LATEST"}).starting_offsets == "latest"
    )
    bad = {
        "needs options bootstrap and topic": {"topic": "payments"},
        "maxRecordsPerPartition must be at least 1": {**base, "maxRecordsPerPartition": "0"},
        "endingOffsets must be a JSON object": {**base, "endingOffsets": "[1]"},
        "startingOffsets must be earliest, latest or": {**base, "startingOffsets": "now"},
        "'other:0' is not a partition of topic 'payments'": {
            **base,
            "endingOffsets": '{"other:0": "1"}',
        },
        "must be digits": {**base, "endingOffsets": '{"payments:0": "-1"}'},
        "must not hold the credential 'sasl.password'": {
            **base,
            "clientConfig": '{"sasl.password": "hunter2"}',
        },
        "use option bootstrap": {**base, "clientConfig": '{"bootstrap.servers": "x:1"}'},
    }
    for message, given in bad.items():
        with pytest.raises(ValueError, match=message):
            KafkaSourceOptions.parse(given)

    # Credentials come from the environment of the process that builds the client.
    options = KafkaSourceOptions.parse(
        {
            **base,
            "clientConfig": json.dumps(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "SCRAM-SHA-512",
                    "sasl.username": "scorer",
                }
            ),
            "secretsFromEnv": '{"sasl.password": "SG_TEST_KAFKA_PASSWORD"}',
        }
    )
    monkeypatch.delenv("SG_TEST_KAFKA_PASSWORD", raising=False)
    with pytest.raises(ValueError, match="SG_TEST_KAFKA_PASSWORD, which is not set"):
        options.config()
    monkeypatch.setenv("SG_TEST_KAFKA_PASSWORD", "s3cr3t")
    config = options.config()
    assert config["sasl.password"] == "s3cr3t" and config["sasl.username"] == "scorer"
    assert config["bootstrap.servers"] == "127.0.0.1:9092"
    assert "s3cr3t" not in repr(config) and "s3cr3t" not in repr(options)
    msk = KafkaSourceOptions.parse({**base, "mskIamRegion": "eu-west-1"}).config()
    assert msk["sasl.mechanism"] == "OAUTHBEARER" and callable(msk["oauth_cb"])
    callback: dict[str, Any] = {"oauth_cb": print}  # a callable cannot be an option
    with pytest.raises(ValueError, match="JSON values only"):
        kafka_records(spark, "127.0.0.1:9092", "payments", client_config=callback)
    with pytest.raises(ValueError, match="must not hold the credential"):
        kafka_records(spark, "127.0.0.1:9092", "payments", client_config={"sasl.password": "x"})


# --------------------------------------------------------------------------- offsets


def test_reads_everything_once_then_only_new_records_after_restart(
    stream: Stream,
) -> None:
    first = stream.produce(0, 300)
    run1, _ = stream.run()
    assert Counter(_payloads(run1)) == Counter(first)  # all, no duplicate
    assert len(run1) == 1  # under maxRecordsPerPartition: one batch
    rows = [r for rows in run1.values() for r in rows]
    assert {r[0] for r in rows} == {stream.shard(0), stream.shard(1)}
    assert {r[2] for r in rows} == {f"k{i}" for i in range(13)}
    _assert_ordered_per_shard(run1)

    more = stream.produce(300, 40)
    run2, _ = stream.run()
    assert Counter(_payloads(run2)) == Counter(more)
    assert min(run2) > max(run1)  # batch ids continue: the checkpoint was resumed
    _assert_ordered_per_shard(run1 | run2)

    run3, _ = stream.run()
    assert _payloads(run3) == []


def test_crash_mid_stream_replays_the_same_range_then_resumes(
    stream: Stream,
) -> None:
    sent = stream.produce(0, 60)
    run1, crashed = stream.run(8, crash_at=1)
    assert list(run1) == [0] and list(crashed) == [1]
    for rows in (*run1.values(), *crashed.values()):
        assert max(Counter(r[0] for r in rows).values()) == 8  # maxRecordsPerPartition held

    run2, _ = stream.run(8)
    assert sorted(run2[1]) == sorted(crashed[1])  # the planned batch, read again exactly
    everything = run1 | run2
    assert len(everything) >= 4  # 60 records over 2 partitions at <= 8 per partition and batch
    assert Counter(_payloads(everything)) == Counter(sent)
    _assert_ordered_per_shard(everything)


def test_partitions_added_mid_stream_are_read_from_their_start(
    stream: Stream,
) -> None:
    first = stream.produce(0, 100)
    late: list[str] = []

    def grow(batch_id: int) -> None:  # while the first run is between batches
        if batch_id == 0:
            assert add_partitions(stream.config, stream.topic, 4) == 4
            late.extend(stream.produce(100, 200, tag="late"))

    run1, _ = stream.run(20, after_batch=grow)
    assert len(run1) >= 3 and late
    assert Counter(_payloads(run1)) == Counter(first)  # availableNow: its end was fixed first
    run2, _ = stream.run(20)
    assert Counter(_payloads(run2)) == Counter(late)
    with KafkaSource(stream.config, stream.topic) as source:
        for partition in (2, 3):
            offsets = sorted(
                int(r[1]) for rows in run2.values() for r in rows if r[0] == stream.shard(partition)
            )
            high = source.watermarks(partition)[1]
            assert offsets == list(range(high)) and high > 0  # every record, from offset 0
    _assert_ordered_per_shard(run1 | run2)


def _read(reader: KafkaStreamReader, start: dict[str, Any], end: dict[str, Any]) -> list[bytes]:
    """One batch's records, read the way executors do."""
    parts = reader.partitions(start, end)
    assert all(isinstance(p, ShardRange) for p in parts)
    return [d for p in parts for b in reader.read(p) for d in b["data"].to_pylist()]


def _drain(
    reader: KafkaStreamReader, start: dict[str, Any], cap: int
) -> tuple[list[list[bytes]], dict[str, Any]]:
    """Drive the reader the way Spark does, without Spark: (records per batch, last offset)."""
    batches: list[list[bytes]] = []
    for _ in range(100):
        end = reader.latestOffset(start, ReadMaxRows(cap))
        if end == start:
            return batches, end
        batches.append(_read(reader, start, end))
        assert batches[-1], "a batch always holds records"
        start = end
    raise AssertionError("the reader never caught up")


def test_reader_takes_in_new_partitions_between_batches_without_empty_batches(
    stream: Stream,
) -> None:
    reader = KafkaStreamReader(KafkaSourceOptions(stream.bootstrap, stream.topic))
    start = reader.initialOffset()
    assert start == {stream.shard(0): None, stream.shard(1): None}
    assert reader.latestOffset(start, ReadMaxRows(5)) == start  # nothing yet: no batch
    sent = [p.encode() for p in stream.produce(0, 30)]
    end = reader.latestOffset(start, ReadMaxRows(5))
    first = _read(reader, start, end)
    assert len(first) == 10  # 5 per partition
    assert add_partitions(stream.config, stream.topic, 3) == 3  # empty for now
    rest, end = _drain(reader, end, 5)
    assert Counter(first + [d for rows in rest for d in rows]) == Counter(sent)
    assert stream.shard(2) not in end  # an empty new partition makes no (empty) batch

    later = [p.encode() for p in stream.produce(30, 60)]
    batches, last = _drain(reader, end, 1_000)
    assert len(batches) == 1 and Counter(batches[0]) == Counter(later)
    new = [
        p
        for p in reader.partitions(end, last)
        if isinstance(p, ShardRange) and p.shard_id.endswith(":2")
    ]
    assert new == [ShardRange(stream.shard(2), None, last[stream.shard(2)])]  # from its start
    reader.stop()


def test_starting_offsets_and_what_the_reader_refuses_to_skip(stream: Stream) -> None:
    stream.produce(0, 40)
    with KafkaSource(stream.config, stream.topic) as source:
        ends = {stream.shard(p): sequence_number(source.watermarks(p)[1] - 1) for p in (0, 1)}

    def reader(**options: str) -> KafkaStreamReader:
        given = {"bootstrap": stream.bootstrap, "topic": stream.topic, **options}
        return KafkaStreamReader(KafkaSourceOptions.parse(given))

    assert reader(startingOffsets="latest").initialOffset() == ends
    given = json.dumps({stream.shard(0): "3"})
    start = reader(startingOffsets=given).initialOffset()
    assert start == {stream.shard(0): sequence_number(3), stream.shard(1): None}
    first = reader().latestOffset(start, ReadMaxRows(100))
    assert first == ends
    assert len(_read(reader(), start, first)) == 40 - 4  # after offset 3, and all of partition 1

    # Offsets removed (as retention does) before they were read: an error naming the gap.
    admin = AdminClient(dict(stream.config))
    for future in admin.delete_records([TopicPartition(stream.topic, 0, 6)]).values():
        future.result(10)
    with pytest.raises(KafkaRetentionGap, match=r"offsets 4\.\.5 were removed"):
        reader().latestOffset(start, ReadMaxRows(100))
    # A position past the partition's end (the topic deleted and created again?): an error.
    past = {**ends, stream.shard(1): sequence_number(10_000)}
    with pytest.raises(RuntimeError, match="before the position 10000"):
        reader().latestOffset(past, ReadMaxRows(100))


def test_ending_offsets_bound_an_available_now_run_to_the_sensor_range(
    stream: Stream,
) -> None:
    sent = stream.produce(0, 160)  # keys k0..k12: at least 40 per partition
    bounds = latest_positions(
        stream.config, stream.topic, {}, 25
    )  # what a sensor would plan: 25 each
    assert all(bound == sequence_number(24) for bound in bounds.values()), bounds
    later = stream.produce(160, 50)  # arrives before the run starts
    run1, _ = stream.run(10, ending=bounds)
    got = [r for rows in run1.values() for r in rows]
    assert sorted((r[0], int(r[1])) for r in got) == [
        (shard, offset) for shard in sorted(bounds) for offset in range(25)
    ]  # exactly the range, inclusive of its ends, in batches of at most 10 per partition
    assert len(run1) == 3
    # The next range is the next run's; a partition given "" waits for a later run.
    shards = sorted(bounds)
    run2, _ = stream.run(ending={shards[0]: ""})
    assert {r[0] for rows in run2.values() for r in rows} == {shards[1]}
    run3, _ = stream.run()
    assert {r[0] for rows in run3.values() for r in rows} == {shards[0]}
    assert Counter(_payloads(run1 | run2 | run3)) == Counter(sent + later)
    _assert_ordered_per_shard(run1 | run2 | run3)


def _transaction(
    config: ClientConfig, topic: str, name: str, records: list[tuple[bytes, str]]
) -> Producer:
    """A transactional producer with `records` (value, key) in an open transaction, on the
    broker: the caller commits or aborts it."""
    producer = Producer({**config, "transactional.id": f"{name}-{topic}"})
    producer.init_transactions(10)
    producer.begin_transaction()
    for value, key in records:
        producer.produce(topic, value=value, key=key)
    assert producer.flush(10) == 0
    return producer


def test_aborted_and_open_transactions_are_never_returned(stream: Stream) -> None:
    def tagged(tag: str, n: int) -> list[tuple[bytes, str]]:
        return [(json.dumps({"tag": tag, "i": i}).encode(), f"k{i % 13}") for i in range(n)]

    def sent(records: list[tuple[bytes, str]]) -> list[str]:
        return [value.decode() for value, _ in records]

    config, topic = stream.config, stream.topic
    _transaction(config, topic, "c1", tagged("c1", 20)).commit_transaction(10)
    _transaction(config, topic, "ab", tagged("aborted", 30)).abort_transaction(10)
    committed = sent(tagged("c1", 20)) + stream.produce(0, 10, tag="c2")  # after the aborted
    run1, _ = stream.run(7)
    assert Counter(_payloads(run1)) == Counter(committed)

    producer = _transaction(config, topic, "open", tagged("open", 6))
    held = stream.produce(10, 10, tag="held")  # behind the open transaction
    started = time.monotonic()
    run2, _ = stream.run(7)
    assert time.monotonic() - started < 30  # the run ends: it does not wait for the transaction
    assert not any('"open"' in p for p in _payloads(run2))
    producer.commit_transaction(10)
    run3, _ = stream.run(7)
    assert Counter(_payloads(run2 | run3)) == Counter(sent(tagged("open", 6)) + held)
    assert not any('"aborted"' in p for p in _payloads(run1 | run2 | run3))
    _assert_ordered_per_shard(run1 | run2 | run3)


# --------------------------------------------------------------------------- the fraud job

N_TX = 1_200
BATCH_RECORDS = 300  # the runner's cap per batch: 150 per partition, Spark's cap per partition
STAMPS = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}


def _placement(lake: Lake) -> list[tuple[int, str, str]]:
    """Which batch every record went to: (batch id, partition, offset), scored or not."""
    columns = ["batch_id", "shard_id", "sequence_number"]
    placed = pa.concat_tables(
        [lake.read(TRANSACTIONS, columns=columns), lake.read(DEAD_LETTER_TABLE, columns=columns)]
    )
    return sorted((r["batch_id"], r["shard_id"], r["sequence_number"]) for r in placed.to_pylist())


def test_fraud_job_on_spark_from_kafka_equals_the_in_process_runner(
    stream: Stream,
    small_sim: Simulation,
    tiny_model: LoadedModel,
    tmp_path: Path,
) -> None:
    """Same topic, same batches, same tables, bit for bit.

    Both engines cut the topic the same way: the runner takes at most `BATCH_RECORDS // 2`
    records per partition and batch, the Spark source at most `maxRecordsPerPartition` of
    them, and both end a batch at a record. So one availableNow run with that cap gives the
    runner's micro-batches (checked below, record by record, before anything else), which the
    features need for bit parity: state and "earlier batch" checks are per batch.
    """
    config, topic = stream.config, stream.topic
    rows = small_sim.transactions.slice(0, N_TX).to_pylist()
    payloads, keys = troubled_stream(rows)  # bad records and a repeated transaction among them
    half = len(payloads) // 2
    produce_records(config, topic, zip(payloads[:half], keys[:half], strict=True))
    phantom = [  # never to be scored: in an aborted transaction
        (to_payload({**r, "transaction_id": f"aborted-{r['transaction_id']}"}), r["customer_id"])
        for r in rows[:60]
    ]
    _transaction(config, topic, "ab", phantom).abort_transaction(10)
    produce_records(config, topic, zip(payloads[half:], keys[half:], strict=True))

    local = Lake(tmp_path / "local")
    load_labels(local, small_sim.labels)
    started = time.perf_counter()
    with KafkaSource(config, topic) as source:
        runner = scoring_runner(
            local, source, None, max_batch_records=BATCH_RECORDS, model=tiny_model
        )
        local_report = runner.run()
    local_s = time.perf_counter() - started
    lake = Lake(tmp_path / "spark")
    load_labels(lake, small_sim.labels)
    report = run_fraud_on_spark(
        stream.spark,
        lambda s: kafka_records(
            s, stream.bootstrap, topic, max_records_per_partition=BATCH_RECORDS // 2
        ),
        lake,
        stream.checkpoint,
        model=tiny_model,
        buckets=4,  # whole keys per group: the same features, fewer calls (test_spark_fraud)
    )

    n_batches = len(local_report.batches)
    assert n_batches > 3
    assert [b.batch_id for b in report.batches] == list(range(n_batches))
    assert report.n_records == local_report.n_records == len(payloads)
    assert _placement(lake) == _placement(local)  # the same micro-batches, record by record
    assert_same_tables(
        sorted_table(local, FEATURES, "transaction_id"),
        sorted_table(lake, FEATURES, "transaction_id"),
    )
    assert_same_tables(  # scores bit for bit, rules, alert flags, versions, batch ids
        sorted_table(local, SCORES, "transaction_id", STAMPS),
        sorted_table(lake, SCORES, "transaction_id", STAMPS),
    )
    assert lake.count(SCORES) == N_TX
    ids = lake.read(SCORES, columns=["transaction_id"])["transaction_id"]
    assert not pc.any(pc.starts_with(ids, "aborted-")).as_py()  # aborted: never read
    assert_same_tables(
        sorted_table(local, ALERTS, "transaction_id", STAMPS),
        sorted_table(lake, ALERTS, "transaction_id", STAMPS),
    )
    assert lake.count(ALERTS) > 0
    for table, key in ((CUSTOMER_STATE, "customer_id"), (TERMINAL_STATE, "terminal_id")):
        assert_same_tables(
            sorted_table(local, table, key, STAMPS), sorted_table(lake, table, key, STAMPS)
        )
    cols = ["batch_id", "shard_id", "sequence_number", "payload", "reason"]
    dead_local = local.read(DEAD_LETTER_TABLE, columns=cols).sort_by(
        [("shard_id", "ascending"), ("sequence_number", "ascending")]
    )
    dead_spark = lake.read(DEAD_LETTER_TABLE, columns=cols).sort_by(
        [("shard_id", "ascending"), ("sequence_number", "ascending")]
    )
    assert dead_spark.num_rows == len(BAD_RECORDS) + 1  # the bad ones and the repeat
    assert dead_local.equals(dead_spark)
    print(
        f"\n{len(payloads)} records in {n_batches} batches: in-process {local_s:.2f}s, "
        f"spark {report.duration_s:.2f}s; "
        + "; ".join(
            f"#{b.batch_id} collect {b.collect_s:.2f} prepare {b.prepare_s:.2f} "
            f"features {b.features_s:.2f} score {b.score_s:.2f} write {b.write_s:.2f}"
            for b in report.batches
        )
    )
