"""The lake and MLflow's artifacts on S3: a real S3 API (moto_server) on loopback.

delta-rs commits a table version by creating its log file only if it does not exist (a PUT with
`If-None-Match: *`, S3's conditional write), which is what makes two writers safe without a lock
service; moto refuses a second such PUT with 412, as S3 does. The scoring path, checked here on
S3 against the same input scored into a local folder, writes every table there; crash and replay,
compaction and the Lake's own log following run on S3 too, as parameters of the tests that check
them on a local folder (tests/test_runner.py, tests/test_lake.py).
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pyarrow as pa
import pytest
from botocore.exceptions import ClientError
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError
from test_runner import stream_of, table_snapshot

from models.job import ALERTS, CUSTOMER_STATE, FEATURES, LABELS, SCORES, TERMINAL_STATE
from models.registry import CHAMPION, MODEL_NAME, LoadedModel, load_model, mlflow_client
from models.simulate import Simulation
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.config import Home
from streamguard.lake import Lake, RemoteLakeError
from streamguard.pipeline import scoring_runner, train_on_simulation

ROWS = pa.schema([pa.field("key", pa.string()), pa.field("batch_id", pa.int64())])


def s3_client(endpoint: str) -> Any:
    factory: Any = boto3.client  # its overloads want a literal service name
    return factory("s3", endpoint_url=endpoint)  # credentials and region: the test's environment


def keys_under(endpoint: str, uri: str) -> list[str]:
    """Every object key under an `s3://bucket/prefix` URI, as the S3 API lists them."""
    parts = urlsplit(uri)
    pages = s3_client(endpoint).get_paginator("list_objects_v2")
    found = pages.paginate(Bucket=parts.netloc, Prefix=parts.path.lstrip("/") + "/")
    return [item["Key"] for page in found for item in page.get("Contents", [])]


def moto_api(endpoint: str, action: str) -> str:
    with urllib.request.urlopen(f"{endpoint}/moto-api/recorder/{action}", timeout=10) as reply:
        return str(reply.read().decode())


def test_delta_commits_on_s3_are_conditional_puts(s3_prefix: str, s3_endpoint: str) -> None:
    lake = Lake(s3_prefix)
    moto_api(s3_endpoint, "reset-recording")
    moto_api(s3_endpoint, "start-recording")
    try:
        for batch in range(2):
            rows = pa.table({"key": [f"k{batch}"], "batch_id": [batch]}, schema=ROWS)
            assert lake.append("events", rows, "job", batch)
    finally:
        moto_api(s3_endpoint, "stop-recording")
    requests = [
        json.loads(line) for line in moto_api(s3_endpoint, "download-recording").split("\n") if line
    ]
    puts = [r for r in requests if r["method"] == "PUT"]
    commits = [r for r in puts if "/events/_delta_log/" in r["url"] and r["url"].endswith(".json")]
    assert [urlsplit(r["url"]).path.rsplit("/", 1)[1] for r in commits] == [
        "00000000000000000000.json",
        "00000000000000000001.json",
    ]
    for commit in commits:  # created only if absent: the commit's mutual exclusion
        headers = {k.lower(): v for k, v in commit["headers"].items()}
        assert headers.get("if-none-match") == "*", commit["headers"]
    # The server holds the condition as S3 does: a version already committed is not replaced.
    key = urlsplit(commits[0]["url"]).path.lstrip("/").split("/", 1)
    with pytest.raises(ClientError, match="PreconditionFailed"):
        s3_client(s3_endpoint).put_object(Bucket=key[0], Key=key[1], Body=b"{}", IfNoneMatch="*")
    assert lake.count("events") == 2 and Lake(s3_prefix).version("events") == 1


def test_a_writer_behind_on_s3_commits_after_the_other_or_not_at_all(s3_prefix: str) -> None:
    uri = f"{s3_prefix}/events"
    rows = pa.table({"key": ["a"], "batch_id": [0]}, schema=ROWS)
    write_deltalake(uri, rows, mode="append")
    behind = DeltaTable(uri)
    write_deltalake(uri, rows, mode="append")  # another writer takes version 1
    with pytest.raises(CommitFailedError):
        no_retry = CommitProperties(max_commit_retries=0)
        write_deltalake(behind, rows, mode="append", commit_properties=no_retry)
    write_deltalake(behind, rows, mode="append")  # retried: it becomes version 2
    table = DeltaTable(uri)
    assert table.version() == 2 and table.to_pyarrow_table().num_rows == 3


def test_the_scoring_path_writes_every_table_to_s3_as_to_a_folder(
    s3_prefix: str,
    s3_endpoint: str,
    tmp_path: Path,
    small_sim: Simulation,
    tiny_model: LoadedModel,
) -> None:
    seconds = {}
    lakes = {"local": Lake(tmp_path / "lake"), "s3": Lake(f"{s3_prefix}/lake")}
    for where, lake in lakes.items():
        source, _ = stream_of(small_sim.transactions)
        started = time.perf_counter()
        report = scoring_runner(lake, source, None, max_batch_records=400, model=tiny_model).run()
        seconds[where] = time.perf_counter() - started
        assert len(report.batches) > 3
    local, s3 = lakes["local"], lakes["s3"]
    print(f"runner seconds: local {seconds['local']:.2f}, s3 {seconds['s3']:.2f}")
    assert s3.names() == local.names()
    assert {SCORES, FEATURES, CUSTOMER_STATE, CHECKPOINT_TABLE, DEAD_LETTER_TABLE} <= set(
        s3.names()
    )
    stored = keys_under(s3_endpoint, s3.location)
    for name in s3.names():
        assert any(
            k.startswith(f"{urlsplit(s3.uri(name)).path.lstrip('/')}/_delta_log/") for k in stored
        )
    keys = {SCORES: "transaction_id", ALERTS: "transaction_id", FEATURES: "transaction_id",
            CUSTOMER_STATE: "customer_id", TERMINAL_STATE: "terminal_id",
            DEAD_LETTER_TABLE: "sequence_number"}  # fmt: skip
    for name, key in keys.items():
        assert table_snapshot(s3, name, key) == table_snapshot(local, name, key), name
    assert s3.count(SCORES) == small_sim.transactions.num_rows
    # Nothing landed in a local folder named after the URI.
    assert not Path("s3:").exists() and not (tmp_path / "s3:").exists()


def test_a_lake_on_s3_refuses_what_needs_a_local_folder(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    lake = Lake("s3://bucket/prefix/")
    assert lake.remote and lake.location == "s3://bucket/prefix" and lake.name == "prefix"
    assert lake.uri(SCORES) == f"s3://bucket/prefix/{SCORES}"
    with pytest.raises(RemoteLakeError, match="s3://bucket/prefix"):
        lake.path(SCORES)
    with pytest.raises(RemoteLakeError, match="Spark"):
        lake.require_local("Spark")
    local = Lake(tmp_path / "lake")
    assert not local.remote and local.uri(SCORES) == str(tmp_path / "lake" / SCORES)
    # Where the environment puts the lake and MLflow's artifacts.
    monkeypatch.setenv("STREAMGUARD_HOME", str(tmp_path))
    monkeypatch.delenv("STREAMGUARD_LAKE_URI", raising=False)
    monkeypatch.delenv("STREAMGUARD_MLFLOW_ARTIFACTS_URI", raising=False)
    home = Home.from_env()
    assert home.lake_uri == str(tmp_path / "lake")
    assert home.mlflow_artifact_root == tmp_path / "mlflow" / "artifacts"
    monkeypatch.setenv("STREAMGUARD_LAKE_URI", "s3://bucket/lake")
    monkeypatch.setenv("STREAMGUARD_MLFLOW_ARTIFACTS_URI", "s3://bucket/mlflow")
    home = Home.from_env()
    assert home.lake_uri == "s3://bucket/lake"
    assert home.mlflow_artifact_root == "s3://bucket/mlflow"


def test_a_model_trained_on_an_s3_lake_keeps_its_artifacts_in_s3_and_loads_by_alias(
    s3_prefix: str,
    s3_endpoint: str,
    tmp_path: Path,
    small_sim: Simulation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("STREAMGUARD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("STREAMGUARD_LAKE_URI", f"{s3_prefix}/lake")
    monkeypatch.setenv("STREAMGUARD_MLFLOW_ARTIFACTS_URI", f"{s3_prefix}/mlflow")
    home = Home.from_env().ensure()
    outcome = train_on_simulation(home, small_sim)
    assert outcome.promoted and outcome.alias == CHAMPION
    assert Lake(home.lake_uri).count(LABELS) == small_sim.labels.num_rows  # labels: in the S3 lake
    uri = home.mlflow_tracking_uri
    source = mlflow_client(uri).get_model_version_download_uri(MODEL_NAME, outcome.version)
    assert source.startswith(f"{s3_prefix}/mlflow/"), source
    stored = keys_under(s3_endpoint, source)
    assert any(k.endswith("/MLmodel") for k in stored), stored
    assert any(k.endswith(".skops") for k in stored), stored
    assert not list(home.mlflow_artifacts.rglob("MLmodel"))  # nothing of it on the local disk

    loaded = load_model(uri, MODEL_NAME, CHAMPION)  # downloaded from S3, read with skops
    assert loaded.version == outcome.version
    assert loaded.tags["model_id"] and hasattr(loaded.model, "predict_proba")
