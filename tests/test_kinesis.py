"""Kinesis access against a real local kinesalite: produce, exact-range reads, retries, server."""

from __future__ import annotations

import json
import os
import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from botocore.exceptions import ClientError

import streamguard.local_kinesis as local_kinesis
import streamguard.local_server as local_server
from models.schema import TRANSACTION_SCHEMA, to_payload
from streamguard.kinesis import (
    MAX_BATCH_BYTES,
    PutRecordsError,
    StreamRecord,
    delete_stream,
    ensure_stream,
    is_loopback,
    kinesis_client,
    latest_positions,
    list_shards,
    produce_transactions,
    put_records,
    read_shard,
)
from streamguard.local_kinesis import NOT_INSTALLED, LocalKinesis, LocalKinesisError, answers


def make_transactions(n: int, customers: int = 40, seed: int = 3) -> pa.Table:
    """A small table shaped like the generator's output, deliberately not in time order."""
    rng = random.Random(seed)
    start = datetime(2024, 3, 1, tzinfo=UTC)
    rows: dict[str, list[Any]] = {
        "transaction_id": [f"tx-{i:06d}" for i in range(n)],
        # whole seconds over a short span: plenty of equal times to exercise the stable sort
        "event_time": [start + timedelta(seconds=rng.randint(0, n // 4)) for _ in range(n)],
        "customer_id": [f"C{rng.randrange(customers):04d}" for _ in range(n)],
        "terminal_id": [f"T{rng.randrange(100):03d}" for _ in range(n)],
        "amount": [round(rng.uniform(0.5, 900.0), 2) for _ in range(n)],
        "kind": [rng.choice(["debit", "credit"]) for _ in range(n)],
        "channel": [rng.choice(["atm", "pos", "online", "wire", None]) for _ in range(n)],
        "location": [rng.choice(["Lyon", "Oslo", None]) for _ in range(n)],
    }
    return pa.Table.from_pydict(rows, schema=TRANSACTION_SCHEMA)


def read_all(client: Any, stream: str) -> dict[str, list[StreamRecord]]:
    return {
        s.shard_id: read_shard(client, stream, s.shard_id, None, None, 100_000)
        for s in list_shards(client, stream)
    }


def put_numbered(client: Any, stream: str, n: int, keys: int = 5) -> int:
    return put_records(client, stream, ((f"rec-{i}".encode(), f"key-{i % keys}") for i in range(n)))


def busiest_shard(client: Any, stream: str) -> list[StreamRecord]:
    return max(read_all(client, stream).values(), key=len)


# --------------------------------------------------------------------------- produce & read


def test_produce_transactions_reads_back_everything_in_customer_order(
    kinesis: Any, stream_name: str
) -> None:
    table = make_transactions(3000)
    assert produce_transactions(kinesis, stream_name, table, progress=False) == 3000

    shards = read_all(kinesis, stream_name)
    assert len(shards) == 2
    assert all(shards.values()), "customer keys should spread over both shards"
    records = [r for rs in shards.values() for r in rs]
    assert len(records) == 3000

    # Content: exactly the payloads of the table, each once.
    expected = sorted(to_payload(row) for row in table.to_pylist())
    assert sorted(r.data for r in records) == expected

    # Keys: partition key is the customer, and a customer lives in exactly one shard.
    shard_of: dict[str, set[str]] = defaultdict(set)
    for record in records:
        assert record.partition_key == json.loads(record.data)["customer_id"]
        shard_of[record.partition_key].add(record.shard_id)
        assert record.arrival_time.tzinfo is not None
    assert all(len(s) == 1 for s in shard_of.values())

    # Order: per customer, the stream order is the table's stable event_time order.
    order = sorted(range(table.num_rows), key=lambda i: table["event_time"][i].as_py())
    want: dict[str, list[str]] = defaultdict(list)
    for i in order:
        want[table["customer_id"][i].as_py()].append(table["transaction_id"][i].as_py())
    got: dict[str, list[str]] = defaultdict(list)
    for rs in shards.values():
        seqs = [int(r.sequence_number) for r in rs]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        for r in rs:
            got[r.partition_key].append(json.loads(r.data)["transaction_id"])
    assert got == want


def test_read_shard_bounds_are_exact_and_deterministic(kinesis: Any, stream_name: str) -> None:
    put_numbered(kinesis, stream_name, 400)
    full = busiest_shard(kinesis, stream_name)
    shard = full[0].shard_id
    seqs = [r.sequence_number for r in full]
    assert len(seqs) > 50

    def read(after: str | None, until: str | None, n: int = 10_000) -> list[str]:
        return [r.sequence_number for r in read_shard(kinesis, stream_name, shard, after, until, n)]

    for a, u in [(None, 9), (9, 30), (30, len(seqs) - 1), (0, 1), (5, 5)]:
        after = None if a is None else seqs[a]
        want = seqs[(0 if a is None else a + 1) : u + 1]
        assert read(after, seqs[u]) == want
        assert read(after, seqs[u]) == want  # the same range again: the same records
    # `until` between two sequence numbers, and before `after`.
    assert read(seqs[10], str(int(seqs[20]) + 1)) == seqs[11:21]
    assert read(seqs[20], seqs[10]) == []
    # Open-ended, and the max_records cut.
    assert read(seqs[-6], None) == seqs[-5:]
    assert read(None, None, 7) == seqs[:7]
    assert read(seqs[3], seqs[40], 5) == seqs[4:9]
    # Paging with max_records walks the whole shard exactly once.
    paged: list[str] = []
    after = None
    while page := read(after, seqs[-1], 17):
        paged += page
        after = page[-1]
    assert paged == seqs


def test_empty_reads(kinesis: Any, stream_name: str) -> None:
    shards = [s.shard_id for s in list_shards(kinesis, stream_name)]
    assert len(shards) == 2
    for shard in shards:
        assert read_shard(kinesis, stream_name, shard, None) == []
    assert latest_positions(kinesis, stream_name, {}, 100) == dict.fromkeys(shards)

    put_numbered(kinesis, stream_name, 30)
    for records in read_all(kinesis, stream_name).values():
        if records:
            last = records[-1]
            assert read_shard(kinesis, stream_name, last.shard_id, last.sequence_number) == []
    assert read_shard(kinesis, stream_name, shards[0], None, max_records=0) == []


def test_latest_positions(kinesis: Any, stream_name: str) -> None:
    put_numbered(kinesis, stream_name, 200, keys=20)
    shards = read_all(kinesis, stream_name)
    assert all(len(rs) > 10 for rs in shards.values())
    last = {shard: rs[-1].sequence_number for shard, rs in shards.items()}

    assert latest_positions(kinesis, stream_name, {}, 10_000) == last
    assert latest_positions(kinesis, stream_name, last, 10_000) == last  # nothing new
    assert latest_positions(kinesis, stream_name, {}, 5) == {
        shard: rs[4].sequence_number for shard, rs in shards.items()
    }
    first, second = sorted(shards)
    start = {first: shards[first][9].sequence_number}
    assert latest_positions(kinesis, stream_name, start, 3) == {
        first: shards[first][12].sequence_number,
        second: shards[second][2].sequence_number,
    }


# --------------------------------------------------------------------------- writing


class ThrottlingKinesis:
    """A real kinesalite client that answers PutRecords the way a throttled AWS stream does.

    Call `fail_whole` times: the whole call raises ProvisionedThroughputExceededException.
    Then, while `fail_entries` calls remain: only every other entry is really written; the rest
    come back with a per-entry ErrorCode and FailedRecordCount, as AWS reports a partial failure.
    Everything else is forwarded unchanged.
    """

    def __init__(self, client: Any, fail_whole: int = 0, fail_entries: int = 1) -> None:
        self._client = client
        self.fail_whole = fail_whole
        self.fail_entries = fail_entries
        self.calls: list[list[tuple[bytes, str]]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> dict[str, Any]:
        self.calls.append([(r["Data"], r["PartitionKey"]) for r in Records])
        if self.fail_whole > 0:
            self.fail_whole -= 1
            raise ClientError(
                {
                    "Error": {
                        "Code": "ProvisionedThroughputExceededException",
                        "Message": "Rate exceeded for shard shardId-000000000000.",
                    }
                },
                "PutRecords",
            )
        if self.fail_entries <= 0:
            return dict(self._client.put_records(StreamName=StreamName, Records=Records))
        self.fail_entries -= 1
        sent = Records[::2]
        written = iter(self._client.put_records(StreamName=StreamName, Records=sent)["Records"])
        results: list[dict[str, Any]] = []
        for i in range(len(Records)):
            if i % 2 == 0:
                results.append(next(written))
            else:
                results.append(
                    {
                        "ErrorCode": "ProvisionedThroughputExceededException",
                        "ErrorMessage": "Rate exceeded for shard shardId-000000000001 in stream.",
                    }
                )
        failed = len(Records) - len(sent)
        return {"FailedRecordCount": failed, "Records": results}


def test_put_records_retries_only_failed_entries(kinesis: Any, stream_name: str) -> None:
    flaky: Any = ThrottlingKinesis(kinesis, fail_whole=1, fail_entries=2)
    records = [(f"rec-{i:04d}".encode(), f"key-{i % 3}") for i in range(1200)]
    progress: list[int] = []

    assert put_records(flaky, stream_name, records, on_progress=progress.append) == 1200
    assert sum(progress) == 1200

    # Batch 1: the whole call is throttled; then half its entries fail; then half of those
    # fail again; then the last quarter lands. Batches 2 and 3 go straight through.
    assert [len(c) for c in flaky.calls] == [500, 500, 250, 125, 500, 200]
    assert flaky.calls[2] == records[1:500:2]  # only the failed entries, in their order
    assert flaky.calls[3] == records[3:500:4]
    stored = [r for rs in read_all(kinesis, stream_name).values() for r in rs]
    assert sorted((r.data, r.partition_key) for r in stored) == sorted(records)  # once each


def test_put_records_gives_up_after_max_attempts(kinesis: Any, stream_name: str) -> None:
    flaky: Any = ThrottlingKinesis(kinesis, fail_entries=100)
    with pytest.raises(PutRecordsError, match="after 3 attempts") as caught:
        put_records(flaky, stream_name, [(b"x", f"k{i}") for i in range(8)], max_attempts=3)
    # 8 -> 4 written, 4 -> 2 written, 2 -> 1 written: one left.
    assert (caught.value.written, caught.value.failed) == (7, 1)
    assert sum(len(rs) for rs in read_all(kinesis, stream_name).values()) == 7


class RecordingKinesis:
    """Forwards to the real client, remembering the size of every PutRecords request."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.batches: list[tuple[int, int]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def put_records(self, StreamName: str, Records: list[dict[str, Any]]) -> Any:
        size = sum(len(r["Data"]) + len(r["PartitionKey"]) for r in Records)
        self.batches.append((len(Records), size))
        return self._client.put_records(StreamName=StreamName, Records=Records)


def test_put_records_batches_by_count_and_bytes(kinesis: Any, stream_name: str) -> None:
    recording: Any = RecordingKinesis(kinesis)
    big = [(bytes(600 * 1024), f"k{i}") for i in range(10)]
    assert put_records(recording, stream_name, big) == 10
    assert [n for n, _ in recording.batches] == [8, 2]
    assert all(size <= MAX_BATCH_BYTES for _, size in recording.batches)

    recording.batches.clear()
    assert put_records(recording, stream_name, [(b"s", "k")] * 25, batch_size=10) == 25
    assert [n for n, _ in recording.batches] == [10, 10, 5]


def test_put_records_rejects_bad_records(kinesis: Any, stream_name: str) -> None:
    with pytest.raises(ValueError, match="1 MiB"):
        put_records(kinesis, stream_name, [(bytes(1024 * 1024), "k")])
    with pytest.raises(ValueError, match="partition key"):
        put_records(kinesis, stream_name, [(b"x", "")])
    with pytest.raises(ValueError, match="batch_size"):
        put_records(kinesis, stream_name, [(b"x", "k")], batch_size=501)


# --------------------------------------------------------------------------- streams & client


def test_ensure_and_delete_stream_are_idempotent(kinesis: Any) -> None:
    name = "idempotent-stream"
    delete_stream(kinesis, name)  # absent: no error
    ensure_stream(kinesis, name, shards=3)
    ensure_stream(kinesis, name, shards=3)
    assert len(list_shards(kinesis, name)) == 3
    delete_stream(kinesis, name)
    delete_stream(kinesis, name)
    assert name not in kinesis.list_streams()["StreamNames"]


def test_kinesis_client_configuration(kinesis_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL_KINESIS", kinesis_server)

    client = kinesis_client()  # endpoint and region from the environment, placeholder keys
    assert client.meta.endpoint_url == kinesis_server
    assert client.meta.region_name == "eu-west-1"
    assert isinstance(client.list_streams()["StreamNames"], list)
    assert kinesis_client(region="ap-south-1").meta.region_name == "ap-south-1"

    assert is_loopback("http://127.0.0.1:4567") and is_loopback("http://localhost:1")
    assert is_loopback("http://[::1]:4567")
    assert not is_loopback("https://kinesis.us-east-1.amazonaws.com")
    assert not is_loopback(None)


# --------------------------------------------------------------------------- local server


def test_local_kinesis_lifecycle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    monkeypatch.chdir(tmp_path)
    state = Path("home") / "kinesis"  # relative, as STREAMGUARD_HOME's default is
    request.addfinalizer(LocalKinesis(state).stop)  # whatever fails below, no server leaks
    first = LocalKinesis(state)
    endpoint = first.start()
    assert endpoint.startswith("http://127.0.0.1:")
    info = json.loads((state / "server.json").read_text())
    pid = info["pid"]
    assert first.running() and answers(endpoint)

    # A second handle (another process, in real life) reuses the same server.
    second = LocalKinesis(state)
    assert second.start() == endpoint
    assert second.pid == pid and second.endpoint == endpoint

    client = kinesis_client(endpoint)
    ensure_stream(client, "kept", shards=1)
    put_numbered(client, "kept", 10)

    second.stop()  # stops it whoever started it
    assert not (state / "server.json").exists()
    assert not local_server._alive(pid)
    assert not answers(endpoint)
    assert not first.running()
    second.stop()  # not running: no error

    # Streams are kept in LevelDB under the state dir: a restart still has them.
    with LocalKinesis(state) as again:
        restarted = kinesis_client(again.endpoint)
        shard = list_shards(restarted, "kept")[0].shard_id
        assert [r.data for r in read_shard(restarted, "kept", shard, None)] == [
            f"rec-{i}".encode() for i in range(10)
        ]
        new_pid = again.pid
        with LocalKinesis(state) as reused:  # a reused server outlives this block
            assert reused.endpoint == again.endpoint
        assert again.running()
    assert new_pid is not None and not local_server._alive(new_pid)
    assert "listening on http://127.0.0.1" in (state / "server.log").read_text()


def test_local_kinesis_port_and_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    request.addfinalizer(LocalKinesis(tmp_path / "b").stop)
    port = local_server._free_port()
    server = LocalKinesis(tmp_path / "a", port=port, persist=False)
    try:
        assert server.start() == f"http://127.0.0.1:{port}"
        with pytest.raises(LocalKinesisError, match="already runs on port"):
            LocalKinesis(tmp_path / "a", port=port + 1).start()
        # The port is taken: a second server there fails with the reason, in one line.
        with pytest.raises(LocalKinesisError, match="already in use") as caught:
            LocalKinesis(tmp_path / "b", port=port, persist=False).start()
        assert "\n" not in str(caught.value)
        assert not (tmp_path / "b" / "server.json").exists()
    finally:
        server.stop()

    assert local_kinesis.find_node_modules(tmp_path) is None
    monkeypatch.setattr(local_kinesis, "find_node_modules", lambda *starts: None)
    with pytest.raises(LocalKinesisError) as missing:
        LocalKinesis(tmp_path / "c").start()
    assert str(missing.value) == NOT_INSTALLED


def test_arrival_times_are_the_instants_botocores_own_parser_gives(
    kinesis: Any, kinesis_server: str, stream_name: str
) -> None:
    """Our clients parse response timestamps without dateutil (a read's largest cost): the same
    instants, as UTC, as a client with botocore's default parser."""
    import boto3

    put_records(kinesis, stream_name, [(b'{"n": %d}' % i, f"k{i}") for i in range(20)])
    plain = boto3.session.Session().client(
        "kinesis",
        endpoint_url=kinesis_server,
        region_name=kinesis.meta.region_name,
        aws_access_key_id="local",
        aws_secret_access_key="local",
    )
    for shard in list_shards(kinesis, stream_name):
        ours = read_shard(kinesis, stream_name, shard.shard_id, None, None, 100)
        theirs = read_shard(plain, stream_name, shard.shard_id, None, None, 100)
        assert [r.sequence_number for r in ours] == [r.sequence_number for r in theirs]
        assert [r.arrival_time for r in ours] == [r.arrival_time for r in theirs]
        assert all(r.arrival_time.utcoffset() == timedelta(0) for r in ours)
    raw = kinesis.describe_stream_summary(StreamName=stream_name)["StreamDescriptionSummary"]
    created = raw["StreamCreationTimestamp"]
    assert created.tzinfo is not None and created.utcoffset() == timedelta(0)
    assert abs((datetime.now(UTC) - created).total_seconds()) < 3600


def test_local_kinesis_outlives_a_client_that_dies_mid_request(tmp_path: Path) -> None:
    """kinesalite rethrew a request's error, so a client killed mid-request (a SIGKILLed worker's
    reader in GetRecords) took the server, and every other test's client, down with it."""
    import socket
    import struct
    from urllib.parse import urlsplit

    with LocalKinesis(tmp_path / "kinesis", persist=False) as server:
        address = urlsplit(server.endpoint)
        for _ in range(3):
            sock = socket.create_connection((address.hostname, address.port))
            sock.sendall(
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-amz-json-1.1\r\n"
                b"X-Amz-Target: Kinesis_20131202.ListStreams\r\nContent-Length: 1000\r\n\r\n{"
            )
            # Reset, not close: the request is cut off half way, as by a killed process.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
        client = kinesis_client(server.endpoint)
        ensure_stream(client, "after", shards=1)
        assert server.running() and answers(server.endpoint)
        assert "a client went away mid-request" in (tmp_path / "kinesis" / "server.log").read_text()
