"""Kafka access against a real local broker (noida-db): config builders, produce, exact-range
reads with read_committed, new partitions, retention gaps, group offsets, the broker itself."""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from conftest import new_topic
from test_kinesis import make_transactions

import streamguard.local_kafka as local_kafka_module
import streamguard.local_server as local_server
from streamguard.config import Home
from streamguard.kafka import (
    EVENT_HUBS_TUNING,
    ClientConfig,
    KafkaProduceError,
    KafkaRecord,
    KafkaRetentionGap,
    KafkaSettings,
    KafkaSource,
    add_partitions,
    client_config,
    ensure_topic,
    latest_positions,
    partition_count,
    produce_records,
    produce_transactions,
    sequence_number,
)
from streamguard.kinesis import StreamRecord, transaction_records
from streamguard.local_kafka import LocalKafka, LocalKafkaError, answers
from streamguard.sources import Source

SECRET = "s3cr3t-value-that-must-not-leak"
EH_CONNECTION = (
    "Endpoint=sb://payments-ns.servicebus.windows.net/;"
    f"SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={SECRET}"
)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def config(kafka_config: ClientConfig) -> ClientConfig:
    return kafka_config


@pytest.fixture
def source(config: ClientConfig, topic: str) -> Iterator[KafkaSource]:
    with KafkaSource(config, topic) as src:
        yield src


def read_all(source: KafkaSource) -> dict[str, list[StreamRecord]]:
    return {shard: source.read(shard, None, None, 1_000_000) for shard in source.shards()}


def offsets(records: list[StreamRecord]) -> list[int]:
    return [int(r.sequence_number) for r in records]


# --------------------------------------------------------------------------- config builders


def sasl_ssl(bootstrap: str, mechanism: str, username: str, password: str) -> dict[str, str]:
    """The exact config expected for a SASL_SSL mechanism with a username and password."""
    return {
        "bootstrap.servers": bootstrap,
        "client.id": "streamguard",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": mechanism,
        "sasl.username": username,
        "sasl.password": password,
    }


def test_plain_config() -> None:
    config = client_config(KafkaSettings("127.0.0.1:9092"))
    assert config == {
        "bootstrap.servers": "127.0.0.1:9092",
        "client.id": "streamguard",
        "security.protocol": "PLAINTEXT",
    }


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-512", "SCRAM-SHA-256"])
def test_scram_config(mechanism: str) -> None:
    settings = KafkaSettings(
        "b-1.msk.example:9096",
        security="scram",
        username="scorer",
        password=SECRET,
        scram_mechanism=mechanism,  # type: ignore[arg-type]
    )
    config = client_config(settings)
    assert config == sasl_ssl("b-1.msk.example:9096", mechanism, "scorer", SECRET)
    for shown in (repr(settings), str(settings), repr(config), str(config), f"{config}"):
        assert SECRET not in shown
    assert "password='***'" in repr(settings) and "'sasl.password': '***'" in repr(config)
    assert "username='scorer'" in repr(settings)


def test_msk_iam_config() -> None:
    config = client_config(
        KafkaSettings("b-1.msk.example:9098", security="msk_iam", region="eu-west-1")
    )
    assert callable(config.pop("oauth_cb"))
    assert config == {
        "bootstrap.servers": "b-1.msk.example:9098",
        "client.id": "streamguard",
        "security.protocol": "SASL_SSL",
        "sasl.mechanism": "OAUTHBEARER",
    }


def test_event_hubs_config() -> None:
    settings = KafkaSettings(security="event_hubs", connection_string=EH_CONNECTION)
    config = client_config(settings)
    namespace = "payments-ns.servicebus.windows.net:9093"
    assert config == {
        **sasl_ssl(namespace, "PLAIN", "$ConnectionString", EH_CONNECTION),
        **EVENT_HUBS_TUNING,
    }
    assert EVENT_HUBS_TUNING["connections.max.idle.ms"] < 240_000  # Azure drops idle at 240 s
    for shown in (repr(settings), str(settings), repr(config)):
        assert SECRET not in shown and "RootManageSharedAccessKey" not in shown
    # An explicit bootstrap wins (private endpoints, other clouds).
    china = "ns.servicebus.chinacloudapi.cn:9093"
    other = KafkaSettings(china, security="event_hubs", connection_string=EH_CONNECTION)
    assert client_config(other)["bootstrap.servers"] == china
    with pytest.raises(ValueError, match="Endpoint=sb://") as bad:
        KafkaSettings(security="event_hubs", connection_string=f"SharedAccessKey={SECRET}")
    assert SECRET not in str(bad.value)


def test_confluent_cloud_config() -> None:
    settings = KafkaSettings(
        "pkc-123.eu-west-1.aws.confluent.cloud:9092",
        security="confluent_cloud",
        api_key="ABCDKEY",
        api_secret=SECRET,
    )
    config = client_config(settings)
    assert config == sasl_ssl(
        "pkc-123.eu-west-1.aws.confluent.cloud:9092", "PLAIN", "ABCDKEY", SECRET
    )
    assert SECRET not in repr(settings) and SECRET not in repr(config)
    assert "api_secret='***'" in repr(settings)


@pytest.mark.parametrize(
    ("kwargs", "missing"),
    [
        ({"security": "plain"}, "bootstrap"),
        ({"bootstrap": "b:9096", "security": "scram", "username": "u"}, "password"),
        ({"bootstrap": "b:9098", "security": "msk_iam"}, "region"),
        ({"security": "event_hubs"}, "connection_string"),
        ({"bootstrap": "b:9092", "security": "confluent_cloud", "api_key": "k"}, "api_secret"),
        ({"bootstrap": "b:9092", "security": "kerberos"}, "security must be one of"),
    ],
)
def test_settings_say_what_is_missing(kwargs: dict[str, str], missing: str) -> None:
    with pytest.raises(ValueError, match=missing):
        KafkaSettings(**kwargs)  # type: ignore[arg-type]


def test_msk_iam_token_callback_signs_offline(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Dummy credentials from the environment only: no config files, no instance metadata.
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_ROLE_ARN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIASTREAMGUARDTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")

    config = client_config(KafkaSettings("b:9098", security="msk_iam", region="eu-west-1"))
    before = time.time()
    token, expiry = config["oauth_cb"]("")

    assert isinstance(token, str) and "=" not in token  # base64url, padding stripped
    assert before + 600 < expiry < before + 1200  # seconds since the epoch (15 min), not ms
    url = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    assert parts.netloc == "kafka.eu-west-1.amazonaws.com"
    assert query["Action"] == ["kafka-cluster:Connect"]
    assert query["X-Amz-Credential"][0].startswith("AKIASTREAMGUARDTEST/")
    assert query["X-Amz-Credential"][0].endswith("/eu-west-1/kafka-cluster/aws4_request")
    assert re.fullmatch(r"[0-9a-f]{64}", query["X-Amz-Signature"][0])
    assert SECRET not in url


# --------------------------------------------------------------------------- topics


def test_ensure_topic_and_add_partitions_are_idempotent(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    name = new_topic(config, request, partitions=1)
    assert ensure_topic(config, name, 5) == 1  # an existing topic is used as it is
    assert add_partitions(config, name, 3) == 3
    assert add_partitions(config, name, 2) == 3  # Kafka only adds: a smaller total is a no-op
    assert partition_count(config, name) == 3
    assert partition_count(config, f"absent-{uuid.uuid4().hex}") is None
    with pytest.raises(ValueError, match="does not exist"):
        add_partitions(config, f"absent-{uuid.uuid4().hex}", 2)
    absent = f"absent-{uuid.uuid4().hex}"
    with KafkaSource(config, absent) as src, pytest.raises(ValueError, match="cannot read Kafka"):
        src.shards()  # a reader never creates the topic it reads
    assert partition_count(config, absent) is None
    with pytest.raises(ValueError, match="not a partition of topic"):
        src.read("other:0", None, None, 10)


# --------------------------------------------------------------------------- produce & read


def test_produce_10k_and_read_back_exact_ranges(
    config: ClientConfig, topic: str, source: KafkaSource
) -> None:
    table = make_transactions(10_000, customers=60)
    assert produce_transactions(config, topic, table) == 10_000
    source_protocol: Source = source  # the runner's contract, checked by mypy
    assert source_protocol.shards() == [f"{topic}:0", f"{topic}:1"]

    full = read_all(source)
    assert sum(len(r) for r in full.values()) == 10_000
    assert all(len(r) > 1000 for r in full.values()), "customer keys spread over both partitions"

    # Each partition: offsets 0..n-1 as 20-digit strings, in order; one customer, one partition,
    # in the producer's order; payloads and keys exactly as sent.
    sent = list(transaction_records(table))
    by_key: dict[str, list[bytes]] = {}
    for data, key in sent:
        by_key.setdefault(key, []).append(data)
    seen: dict[str, list[bytes]] = {}
    for shard, records in full.items():
        assert offsets(records) == list(range(len(records)))
        assert all(len(r.sequence_number) == 20 and r.shard_id == shard for r in records)
        assert all(isinstance(r, KafkaRecord) and r.arrival_time.tzinfo for r in records)
        for r in records:
            assert json.loads(r.data)["customer_id"] == r.partition_key
            seen.setdefault(r.partition_key, []).append(r.data)
    assert seen == by_key
    keys_per_shard = [{r.partition_key for r in records} for records in full.values()]
    assert not keys_per_shard[0] & keys_per_shard[1]

    # Exact replays of (after, until], interleaving partitions so the consumer moves each time.
    shards = sorted(full)
    cases = [(None, 0), (None, 99), (0, 1), (10, 2_000), (1_234, 1_235), (500, 3_999), (7, 7)]
    for after, until in cases:
        for shard in shards:
            records = full[shard]
            a = None if after is None else records[after].sequence_number
            u = records[until].sequence_number
            expected = records[(0 if after is None else after + 1) : until + 1]
            assert source.read(shard, a, u, 1_000_000) == expected
            assert source.read(shard, a, u, 1_000_000) == expected  # again, identical
    # until past the end stops at the end (without waiting); max_records caps.
    shard, records = shards[0], full[shards[0]]
    started = time.monotonic()
    assert (
        source.read(shard, records[-3].sequence_number, sequence_number(10**9), 100)
        == (records[-2:])
    )
    assert source.read(shard, records[-1].sequence_number, None, 100) == []
    assert time.monotonic() - started < 2.0
    assert source.read(shard, records[99].sequence_number, None, 250) == records[100:350]
    assert source.read(shard, None, None, 0) == []

    # Sequential batches (the runner's pattern) add up to the whole partition, nothing twice.
    for shard in shards:
        chunks: list[StreamRecord] = []
        after_seq: str | None = None
        while batch := source.read(shard, after_seq, None, 777):
            chunks.extend(batch)
            after_seq = batch[-1].sequence_number
        assert chunks == full[shard]


def test_unparseable_payloads_keys_and_headers_pass_through_unchanged(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    name = new_topic(config, request, partitions=1)
    payloads = [b"not json", b'{"amount": "x"', b"\xff\xfe\x00binary", b""]
    assert produce_records(config, name, ((p, "K1") for p in payloads)) == 4
    producer = Producer(dict(config))
    producer.produce(name, value=b"no key", headers=[("trace", b"t-1"), ("empty", None)])
    producer.produce(name, value=None, key=b"\xff")  # a tombstone with a non-UTF-8 key
    assert producer.flush(10) == 0

    with KafkaSource(config, name) as src:
        records = src.read(f"{name}:0", None, None, 100)
    assert [r.data for r in records] == [*payloads, b"no key", b""]
    assert [r.partition_key for r in records] == ["K1"] * 4 + ["", "\\xff"]
    assert isinstance(records[4], KafkaRecord)
    assert records[4].headers == (("trace", b"t-1"), ("empty", None))
    assert isinstance(records[0], KafkaRecord) and records[0].headers == ()


def test_new_partitions_are_picked_up_from_their_start(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    name = new_topic(config, request, partitions=1)
    produce_records(config, name, ((f"a{i}".encode(), f"k{i}") for i in range(50)))
    with KafkaSource(config, name) as src:
        assert src.shards() == [f"{name}:0"]
        first = src.read(f"{name}:0", None, None, 1000)
        assert len(first) == 50

        assert add_partitions(config, name, 3) == 3
        produce_records(config, name, ((f"b{i}".encode(), f"k{i}") for i in range(300)))
        assert src.shards() == [f"{name}:0", f"{name}:1", f"{name}:2"]  # same source, no restart
        later = {s: src.read(s, None, None, 1000) for s in (f"{name}:1", f"{name}:2")}
        rest = src.read(f"{name}:0", first[-1].sequence_number, None, 1000)
    for records in later.values():
        assert records and offsets(records) == list(range(len(records)))  # from offset 0
        assert all(r.data.startswith(b"b") for r in records)
    assert sum(map(len, later.values())) + len(rest) == 300


def test_read_committed_hides_aborted_and_open_transactions(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    name = new_topic(config, request, partitions=1)
    shard = f"{name}:0"
    producer = Producer({**config, "transactional.id": f"tx-{name}"})
    producer.init_transactions(10)
    for label, count, commit in (("c1", 3, True), ("ab", 4, False), ("c2", 2, True)):
        producer.begin_transaction()
        for i in range(count):
            producer.produce(name, value=f"{label}-{i}".encode(), key=b"k")
        assert producer.flush(10) == 0  # on the broker before the abort (else never sent)
        if commit:
            producer.commit_transaction(10)
        else:
            producer.abort_transaction(10)
    # c1 at 0-2, marker 3, aborted 4-7, marker 8, c2 at 9-10, marker 11.
    with KafkaSource(config, name) as src:
        records = src.read(shard, None, None, 100)
        assert [r.data for r in records] == [b"c1-0", b"c1-1", b"c1-2", b"c2-0", b"c2-1"]
        assert offsets(records) == [0, 1, 2, 9, 10]
        # Ranges are by offset: gaps are fine, and the bounds still hold exactly.
        assert src.read(shard, sequence_number(2), sequence_number(8), 100) == []
        assert src.read(shard, sequence_number(2), sequence_number(9), 100) == [records[3]]
        assert src.read(shard, sequence_number(1), sequence_number(5), 100) == [records[2]]
        assert src.read(shard, sequence_number(10), None, 100) == []
        assert src.latest_positions({shard: sequence_number(10)}, 100) == {
            shard: sequence_number(10)  # only a marker is new: nothing to score
        }

        # An open transaction is not readable yet, and a read does not wait for it.
        other = Producer({**config, "transactional.id": f"open-{name}"})
        other.init_transactions(10)
        other.begin_transaction()
        other.produce(name, value=b"open", key=b"k")
        assert other.flush(10) == 0
        started = time.monotonic()
        assert src.read(shard, sequence_number(10), None, 100) == []
        assert time.monotonic() - started < 2.0
        assert src.latest_positions({shard: sequence_number(10)}, 100)[shard] == (
            sequence_number(10)
        )
        other.commit_transaction(10)
        tail = src.read(shard, sequence_number(10), None, 100)
        assert [r.data for r in tail] == [b"open"]


def test_retention_gap_is_an_error_that_names_it(
    config: ClientConfig, request: pytest.FixtureRequest
) -> None:
    name = new_topic(config, request, partitions=1)
    shard = f"{name}:0"
    produce_records(config, name, ((f"r{i}".encode(), "k") for i in range(10)))
    with KafkaSource(config, name) as src:
        read = src.read(shard, None, sequence_number(3), 100)
        assert offsets(read) == [0, 1, 2, 3]

        # Offsets 0-5 removed (as retention does) while the position is after offset 3.
        admin = AdminClient(dict(config))
        deleted = admin.delete_records([TopicPartition(name, 0, 6)])
        for future in deleted.values():
            future.result(10)
        assert src.watermarks(0)[0] == 6

        for after in (sequence_number(3), sequence_number(1)):
            with pytest.raises(KafkaRetentionGap) as gap:
                src.read(shard, after, None, 100)
            assert gap.value.topic == name and gap.value.partition == 0
            assert gap.value.first_kept == 6
            message = str(gap.value)
            assert repr(name) in message and "partition 0" in message
            assert f"offsets {int(after) + 1}..5" in message
        with pytest.raises(KafkaRetentionGap):
            src.latest_positions({shard: sequence_number(3)}, 100)

        # Right at the gap's end, or from the log start (None), reading goes on.
        assert offsets(src.read(shard, sequence_number(5), None, 100)) == [6, 7, 8, 9]
        assert offsets(src.read(shard, None, None, 100)) == [6, 7, 8, 9]


def test_latest_positions_bound_the_next_batch(
    config: ClientConfig, topic: str, source: KafkaSource
) -> None:
    empty = latest_positions(config, topic, {}, 100)
    assert empty == {f"{topic}:0": None, f"{topic}:1": None}

    produce_records(config, topic, ((f"r{i}".encode(), f"k{i % 7}") for i in range(400)))
    full = read_all(source)
    ends = {shard: records[-1].sequence_number for shard, records in full.items()}
    assert source.latest_positions({}, 10_000) == ends
    capped = source.latest_positions({}, 50)
    assert capped == {shard: sequence_number(49) for shard in full}
    after = {shard: sequence_number(9) for shard in full}
    assert source.latest_positions(after, 50) == {shard: sequence_number(59) for shard in full}
    assert source.latest_positions(ends, 50) == ends  # nothing new
    assert latest_positions(config, topic, {s: "" for s in full}, 10_000) == ends  # "" is None


def test_committed_group_offsets_are_visible_and_never_the_position(
    config: ClientConfig, topic: str
) -> None:
    produce_records(config, topic, ((f"r{i}".encode(), f"k{i}") for i in range(100)))
    group = f"lag-{uuid.uuid4().hex[:8]}"
    with KafkaSource(config, topic, group_id=group) as src:
        shard0, shard1 = src.shards()
        assert src.read(shard0, sequence_number(4), sequence_number(5), 10)
        src.commit_positions({shard0: sequence_number(4), shard1: None})

        admin = AdminClient(dict(config))
        result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
        listed = result[group].result(10).topic_partitions
        committed = {tp.partition: tp.offset for tp in listed if tp.offset >= 0}
        assert committed == {0: 5}  # the next offset to read, Kafka's convention

        # The committed offset is never where a read starts: the caller's position is.
        assert offsets(src.read(shard0, None, sequence_number(1), 10)) == [0, 1]
        src.acknowledge({shard0: sequence_number(8), shard1: ""})  # the runner's hook
        # A refused commit (no such partition) raises from commit_positions; acknowledge,
        # called after the lake commit, only logs it.
        absent = {f"{topic}:9": sequence_number(1)}
        with pytest.raises(KafkaException):
            src.commit_positions(absent)
        src.acknowledge(absent)
    result = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group)])
    listed = result[group].result(10).topic_partitions
    assert {tp.partition: tp.offset for tp in listed if tp.offset >= 0} == {0: 9}


def test_produce_fails_loudly_when_nothing_is_acknowledged() -> None:
    # A real client against a port where nothing listens: bounded, and says what is missing.
    dead = client_config(KafkaSettings(f"127.0.0.1:{local_server._free_port()}"))
    started = time.monotonic()
    with pytest.raises(KafkaProduceError, match="3 record") as caught:
        produce_records(dead, "t", ((b"x", "k") for _ in range(3)), flush_timeout=1.0)
    assert caught.value.delivered == 0 and caught.value.failed == 3
    assert "3 still pending" in str(caught.value)
    # Delivery reports that say "failed" (here: timed out in 0.3 s) stop it the same way.
    with pytest.raises(KafkaProduceError, match=r"first error: .*timed out") as failed:
        produce_records({**dead, "message.timeout.ms": 300}, "t", [(b"x", "k")] * 2)
    assert failed.value.delivered == 0 and failed.value.failed == 2
    assert time.monotonic() - started < 15


# --------------------------------------------------------------------------- the local broker


def test_local_kafka_lifecycle_and_restart_keeps_data(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    home = Home(tmp_path / "home")
    request.addfinalizer(lambda: local_kafka_module.stop(home))  # no broker leaks
    assert not local_kafka_module.status(home).running

    bootstrap = local_kafka_module.start(home)
    state = local_kafka_module.status(home)
    assert state.running and state.address == bootstrap and state.pid
    assert state.state_dir == tmp_path / "home" / "kafka"
    assert local_kafka_module.start(home) == bootstrap  # reused, not a second broker
    assert answers(bootstrap)

    config = client_config(KafkaSettings(bootstrap))
    ensure_topic(config, "kept", 1)
    produce_records(config, "kept", ((f"r{i}".encode(), "k") for i in range(20)))
    with KafkaSource(config, "kept", group_id="g") as src:
        src.commit_positions({"kept:0": sequence_number(11)})

    local_kafka_module.stop(home)
    assert not answers(bootstrap) and not local_kafka_module.status(home).running
    assert not local_server._alive(state.pid)
    local_kafka_module.stop(home)  # not running: no error

    # Topic data and group offsets survive a restart (same data dir, any port).
    again = local_kafka_module.start(home)
    config = client_config(KafkaSettings(again))
    with KafkaSource(config, "kept") as src:
        assert [r.data for r in src.read("kept:0", None, None, 100)] == [
            f"r{i}".encode() for i in range(20)
        ]
    admin = AdminClient(dict(config))
    listed = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions("g")])
    assert [tp.offset for tp in listed["g"].result(10).topic_partitions] == [12]


def test_local_kafka_port_in_use_is_one_clear_line(
    tmp_path: Path, kafka_bootstrap: str, request: pytest.FixtureRequest
) -> None:
    request.addfinalizer(LocalKafka(tmp_path / "b").stop)
    taken = int(kafka_bootstrap.rpartition(":")[2])
    with pytest.raises(LocalKafkaError, match=f"port {taken} .* already in use") as caught:
        LocalKafka(tmp_path / "b", port=taken).start()
    assert "\n" not in str(caught.value) and "GLIBC" not in str(caught.value)
    assert not (tmp_path / "b" / "server.json").exists()

    # The broker's own refusal (a port taken between our check and its bind) reads the same,
    # without the loader's harmless glibc warning that precedes it in the log.
    server = LocalKafka(tmp_path / "c", port=taken)
    server.state_dir.mkdir(parents=True)
    server.log_file.write_text(
        "noida-db: /lib/x86_64-linux-gnu/libc.so.6: weak version `GLIBC_2.39' not found\n"
        f"error: kafka: port {taken} is already in use\n"
    )
    tail = server.clean_tail(local_server._log_tail(server.log_file))
    assert "GLIBC" not in tail and server.explain_exit(tail) == (
        f"port {taken} on 127.0.0.1 is already in use"
    )
