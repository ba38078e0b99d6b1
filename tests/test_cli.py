"""The `streamguard` command line as a user runs it (the installed console script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from test_alerts import read_topic

from models.job import ALERTS, SCORES, TRANSACTIONS
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.config import Home
from streamguard.kafka import partition_count
from streamguard.lake import Lake
from streamguard.local_kafka import answers as kafka_answers

CLI = str(Path(sys.executable).parent / "streamguard")
SUBCOMMANDS = [
    "generate", "produce", "kinesis", "kafka", "score", "train", "rollback", "promote", "demo",
    "dev", "backtest", "replay",
]  # fmt: skip
# No broker listens there: a usage error must come before any connection.
NOWHERE = "127.0.0.1:9"


def run(
    *args: str, home: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environ = {**os.environ, **(env or {})}
    if home is not None:
        environ["STREAMGUARD_HOME"] = str(home)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=environ, timeout=180)


def test_help_lists_every_subcommand() -> None:
    done = run("--help")
    assert done.returncode == 0
    for name in SUBCOMMANDS:
        assert name in done.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str) -> None:
    done = run(name, "--help")
    assert done.returncode == 0 and "usage: streamguard" in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--days", "0", "--out", "x"],
        ["generate", "--days", "ten", "--out", "x"],
        ["generate"],
        ["kinesis", "restart"],
        ["kafka", "restart"],
        ["nonsense"],
        # Kinesis and Kafka targets do not mix, and each needs its stream or topic.
        ["produce", "t.parquet", "--kafka", NOWHERE, "--topic", "t", "--endpoint", "http://x"],
        ["score", "--kafka", NOWHERE, "--topic", "t", "--endpoint", "http://x"],
        ["score", "--kafka", NOWHERE, "--topic", "t", "--stream", "s"],
        ["replay", "t.parquet", "--kafka", NOWHERE, "--topic", "t", "--shards", "3"],
        ["produce", "t.parquet"],
        ["score", "--kafka", NOWHERE],
        ["score", "--stream", "s", "--alerts-topic", "a"],
        ["produce", "t.parquet", "--stream", "s", "--partitions", "3"],
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0]
    assert done.stdout == ""


def test_runtime_error_is_one_line(tmp_path: Path) -> None:
    done = run("produce", str(tmp_path / "missing.parquet"), "--stream", "s", home=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"streamguard produce: error: no such file: {tmp_path / 'missing.parquet'}"
    ]


def test_generate_writes_reproducible_files(tmp_path: Path) -> None:
    for out in ("a", "b"):
        done = run("generate", "--days", "5", "--customers", "40", "--seed", "11",
                   "--out", str(tmp_path / out))  # fmt: skip
        assert done.returncode == 0, done.stderr
    a = pq.read_table(tmp_path / "a" / "transactions.parquet")
    b = pq.read_table(tmp_path / "b" / "transactions.parquet")
    assert a.num_rows > 100 and a.equals(b)
    labels = pq.read_table(tmp_path / "a" / "labels.parquet")
    assert "fraud_scenario" in labels.column_names
    # The bank's account history over the same customers, as the backtest reads it.
    history = pq.read_table(tmp_path / "a" / "accounts_history.parquet")
    assert pq.read_table(tmp_path / "b" / "accounts_history.parquet").equals(history)
    assert set(history["customer_id"].to_pylist()) == set(a["customer_id"].to_pylist())
    assert {"valid_from", "valid_to", "card_status", "balance"} <= set(history.column_names)


def test_kinesis_start_status_stop(tmp_path: Path) -> None:
    started = run("kinesis", "start", home=tmp_path)
    assert started.returncode == 0 and started.stdout.startswith("http://127.0.0.1:")
    try:
        status = run("kinesis", "status", home=tmp_path)
        assert status.returncode == 0 and status.stdout.strip() == started.stdout.strip()
    finally:
        stopped = run("kinesis", "stop", home=tmp_path)
    assert stopped.returncode == 0
    assert run("kinesis", "status", home=tmp_path).returncode == 1


def test_generate_weather_writes_jsonl_files(tmp_path: Path) -> None:
    done = run("generate", "weather", "--stations", "3", "--hours", "1", "--files", "2",
               "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2
    lines = sum(len(f.read_bytes().splitlines()) for f in files)
    assert lines == 3 * 60  # one reading a minute per station


# --------------------------------------------------------------------------- Kafka


def test_kafka_start_status_stop(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    request.addfinalizer(lambda: run("kafka", "stop", home=tmp_path))  # no broker leaks
    assert run("kafka", "status", home=tmp_path).returncode == 1
    started = run("kafka", "start", home=tmp_path)
    assert started.returncode == 0, started.stderr
    bootstrap = started.stdout.strip()
    assert bootstrap.startswith("127.0.0.1:") and kafka_answers(bootstrap)
    assert (tmp_path / "kafka" / "server.json").is_file()  # under STREAMGUARD_HOME/kafka
    again = run("kafka", "start", home=tmp_path)  # the running broker is reused
    assert again.returncode == 0 and again.stdout.strip() == bootstrap
    status = run("kafka", "status", home=tmp_path)
    assert status.returncode == 0 and status.stdout.strip() == bootstrap
    stopped = run("kafka", "stop", home=tmp_path)
    assert stopped.returncode == 0 and stopped.stdout.strip() == "stopped"
    assert not kafka_answers(bootstrap)
    status = run("kafka", "status", home=tmp_path)
    assert status.returncode == 1 and status.stdout.strip() == "not running"


def test_kafka_settings_come_from_the_environment_and_secrets_are_never_shown(
    tmp_path: Path,
) -> None:
    data = tmp_path / "t.parquet"
    pq.write_table(pa.table({"transaction_id": ["t1"]}), data)
    secret = f"s3cret-{uuid.uuid4().hex}"
    done = run(
        "produce", str(data), "--kafka", NOWHERE, "--topic", "t",
        env={"STREAMGUARD_KAFKA_SECURITY": "scram", "STREAMGUARD_KAFKA_PASSWORD": secret},
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "streamguard produce: error: Kafka security 'scram' needs username "
        "(from STREAMGUARD_KAFKA_SECURITY, STREAMGUARD_KAFKA_USERNAME)"
    ]
    assert secret not in done.stdout + done.stderr


N_TX = 1_500


@pytest.fixture
def scoring_home(tmp_path: Path, champion_home: Home) -> Home:
    """A fresh STREAMGUARD_HOME whose MLflow store holds the session's champion (a copy)."""
    home = Home(tmp_path / "home")
    shutil.copytree(champion_home.mlflow, home.mlflow)
    return home


def test_produce_and_score_a_kafka_topic_with_alerts_published(
    tmp_path: Path, kafka_bootstrap: str, kafka_config: Any, champion_home: Home,
    scoring_home: Home,
) -> None:  # fmt: skip
    data = tmp_path / "transactions.parquet"
    transactions = pq.read_table(champion_home.data / "transactions.parquet").slice(0, N_TX)
    pq.write_table(transactions, data)
    topic, alerts = f"cli-tx-{uuid.uuid4().hex[:8]}", f"cli-alerts-{uuid.uuid4().hex[:8]}"
    kafka = ["--kafka", kafka_bootstrap, "--topic", topic]

    produced = run("produce", str(data), *kafka, "--partitions", "3", "--rate", "1000",
                   home=scoring_home.root)  # fmt: skip
    assert produced.returncode == 0, produced.stderr
    lines = produced.stdout.strip().splitlines()
    # Not a terminal: the paced progress prints a line per step, not a redraw per record.
    assert lines[:-1] == ["produced 1,000/1,500", "produced 1,500/1,500"]
    assert lines[-1].startswith(f"produced 1,500 records to topic {topic} in ")
    assert partition_count(kafka_config, topic) == 3

    scored = run("score", *kafka, "--alerts-topic", alerts, "--max-batch", "500",
                 home=scoring_home.root)  # fmt: skip
    assert scored.returncode == 0, scored.stderr
    lake = Lake(scoring_home.lake)
    assert lake.count(TRANSACTIONS) == N_TX and lake.count(SCORES) == N_TX
    lineage = lake.read(TRANSACTIONS, columns=["shard_id", "transaction_id"])
    assert set(lineage["shard_id"].to_pylist()) == {f"{topic}:{p}" for p in range(3)}
    assert sorted(lineage["transaction_id"].to_pylist()) == sorted(
        transactions["transaction_id"].to_pylist()
    )
    jobs = pc.unique(lake.read(CHECKPOINT_TABLE, columns=["job"])["job"]).to_pylist()
    assert jobs == [f"fraud_scoring:kafka:{topic}"]  # the job name the Dagster layer uses

    # Every alert of the lake is on the alerts topic once, keyed by customer, as a
    # read_committed consumer sees it.
    rows = {r["transaction_id"]: r for r in lake.read(ALERTS).to_pylist()}
    assert rows, "the champion raised no alert: nothing to check"
    published = read_topic(kafka_config, alerts)
    assert sorted(m["alert_id"] for m in published) == sorted(rows)
    for message in published:
        row = rows[message["alert_id"]]
        assert message["_key"] == row["customer_id"] and message["score"] == row["score"]
    assert f"{len(rows):,} alerts" in scored.stdout

    # Scoring again finds nothing new and publishes nothing.
    again = run("score", *kafka, "--alerts-topic", alerts, home=scoring_home.root)
    assert again.returncode == 0 and again.stdout.startswith("0 batch(es), 0 records")
    assert lake.count(TRANSACTIONS) == N_TX
    assert len(read_topic(kafka_config, alerts)) == len(rows)
