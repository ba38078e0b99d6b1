"""The Dagster layer on Kafka: per-deployment resources, the Kafka sensor, a run it launches.

Real broker (noida-db), real MLflow champion, real Delta lake; a Kinesis stream and a Kafka topic
scored in one deployment, each with its own checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from conftest import new_topic, scoring_job
from test_alerts import read_topic

from assets.resources import (
    KafkaResource,
    KinesisResource,
    SparkResource,
    deployment_resources,
)
from assets.sensors import kafka_transactions_sensor, kinesis_transactions_sensor
from models.simulate import Simulation
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.config import Home
from streamguard.kafka import produce_transactions
from streamguard.kinesis import produce_transactions as produce_to_kinesis
from streamguard.lake import Lake

SECRET = "not-to-be-seen-9f3c"


def test_local_deployment_defaults_and_environment_values_as_env_vars() -> None:
    local = deployment_resources("local", {})
    assert local["home"].root == ".streamguard"  # type: ignore[attr-defined]
    assert local["kafka"].enabled is False  # type: ignore[attr-defined]
    env = {
        "STREAMGUARD_HOME": "/srv/streamguard",
        "STREAMGUARD_KAFKA_BOOTSTRAP": "b-1.msk:9096",
        "STREAMGUARD_KAFKA_SECURITY": "scram",
        "STREAMGUARD_KAFKA_USERNAME": "scorer",
        "STREAMGUARD_KAFKA_PASSWORD": SECRET,
    }
    set_ = deployment_resources("local", env)
    kafka = set_["kafka"]
    # Set variables become EnvVars: resolved when a run uses them, never stored as values.
    assert kafka.password == dg.EnvVar("STREAMGUARD_KAFKA_PASSWORD")  # type: ignore[attr-defined]
    assert SECRET not in repr(set_) and SECRET not in json.dumps(
        {k: str(v) for k, v in set_.items()}
    )
    with pytest.raises(ValueError, match="STREAMGUARD_HOME, MLFLOW_TRACKING_URI"):
        deployment_resources("production", {})
    prod = deployment_resources(
        "production", {"STREAMGUARD_HOME": "/srv", "MLFLOW_TRACKING_URI": "postgresql://db/ml"}
    )
    assert prod["mlflow"].tracking_uri == dg.EnvVar("MLFLOW_TRACKING_URI")  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="deployment must be one of"):
        deployment_resources("staging", {})  # type: ignore[arg-type]


def test_resolved_kafka_resource_builds_the_client_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAMGUARD_KAFKA_BOOTSTRAP", "b-1.msk:9096")
    monkeypatch.setenv("STREAMGUARD_KAFKA_SECURITY", "scram")
    monkeypatch.setenv("STREAMGUARD_KAFKA_USERNAME", "scorer")
    monkeypatch.setenv("STREAMGUARD_KAFKA_PASSWORD", SECRET)
    resources = deployment_resources("local")
    with dg.build_resources({"kafka": resources["kafka"]}) as built:
        config = built.kafka.config()
    assert config["sasl.mechanism"] == "SCRAM-SHA-512" and config["sasl.password"] == SECRET
    assert SECRET not in repr(config)


def _kafka_sensor(cursor: str | None, kafka: KafkaResource) -> tuple[Any, Any]:
    context = dg.build_sensor_context(cursor=cursor, resources={"kafka": kafka})
    return kafka_transactions_sensor(context), context


def test_kafka_sensor_skips_without_a_cluster() -> None:
    result, _ = _kafka_sensor(None, KafkaResource())
    assert isinstance(result, dg.SkipReason)
    assert "STREAMGUARD_KAFKA_BOOTSTRAP" in (result.skip_message or "")


def test_kafka_and_kinesis_in_one_deployment_each_scored_once_with_alerts_published(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_config: Any,
    kinesis_server: str,
    kinesis: Any,
    stream_name: str,
    request: pytest.FixtureRequest,
    small_sim: Simulation,
    champion_home: Home,
) -> None:
    topic = new_topic(kafka_config, request, partitions=3)
    alerts_topic = new_topic(kafka_config, request, partitions=1)
    kafka = KafkaResource(bootstrap=kafka_bootstrap, topic=topic, alerts_topic=alerts_topic)
    kinesis_resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    skip, _ = _kafka_sensor(None, kafka)
    assert isinstance(skip, dg.SkipReason) and "No new records" in (skip.skip_message or "")

    on_kafka = small_sim.transactions.slice(0, 500)
    on_kinesis = small_sim.transactions.slice(500, 300)
    assert produce_transactions(kafka_config, topic, on_kafka) == 500
    produce_to_kinesis(kinesis, stream_name, on_kinesis, progress=False)

    kafka_run, context = _kafka_sensor(None, kafka)
    assert isinstance(kafka_run, dg.RunRequest)
    cursor = json.loads(context.cursor)
    assert set(cursor) == {f"{topic}:{p}" for p in range(3)}  # JSON cursor per partition
    config = kafka_run.run_config["ops"]["score_transactions"]["config"]
    assert config["source"] == "kafka" and config["until"] == cursor
    assert kafka_run.tags["streamguard/source"] == "kafka"
    again, _ = _kafka_sensor(None, kafka)
    assert again.run_key == kafka_run.run_key  # run key from the bounds
    idle, _ = _kafka_sensor(context.cursor, kafka)
    assert isinstance(idle, dg.SkipReason)
    kinesis_context = dg.build_sensor_context(resources={"kinesis": kinesis_resource})
    kinesis_run = kinesis_transactions_sensor(kinesis_context)
    assert isinstance(kinesis_run, dg.RunRequest)

    home = tmp_path / "home"
    job = scoring_job(
        home, champion_home.mlflow_tracking_uri, kinesis=kinesis_resource, kafka=kafka
    )
    with dg.instance_for_test() as instance:
        for run in (kafka_run, kinesis_run, kafka_run):  # the repeated run finds nothing new
            result = job.execute_in_process(run_config=run.run_config, instance=instance)
            assert result.success
    lake = Lake(home / "lake")
    assert lake.count("transactions") == 800 and lake.count("scores") == 800
    shards = set(lake.read("transactions", columns=["shard_id"])["shard_id"].to_pylist())
    assert {f"{topic}:{p}" for p in range(3)} <= shards
    jobs = set(lake.read(CHECKPOINT_TABLE, columns=["job"])["job"].to_pylist())
    assert jobs == {"fraud_scoring", f"fraud_scoring:kafka:{topic}"}  # a checkpoint each
    # One lake numbering: the two streams' batches never share a batch id.
    ids = lake.read("transactions", columns=["batch_id", "shard_id"]).to_pylist()
    by_batch: dict[int, set[bool]] = {}
    for row in ids:
        by_batch.setdefault(row["batch_id"], set()).add(row["shard_id"].startswith(topic))
    assert all(len(kinds) == 1 for kinds in by_batch.values())
    published = read_topic(kafka_config, alerts_topic)
    alerts = lake.read("alerts", columns=["transaction_id"])["transaction_id"].to_pylist()
    assert alerts and sorted(m["alert_id"] for m in published) == sorted(alerts)


@pytest.mark.spark
def test_kafka_sensor_with_spark_executor_scores_exactly_the_planned_range(
    tmp_path: Path,
    kafka_bootstrap: str,
    kafka_config: Any,
    request: pytest.FixtureRequest,
    small_sim: Simulation,
    champion_home: Home,
    spark: Any,
) -> None:
    topic = new_topic(kafka_config, request, partitions=2)
    alerts_topic = new_topic(kafka_config, request, partitions=1)
    kafka = KafkaResource(
        bootstrap=kafka_bootstrap, topic=topic, alerts_topic=alerts_topic, executor="spark"
    )
    produce_transactions(kafka_config, topic, small_sim.transactions.slice(0, 400))
    run, context = _kafka_sensor(None, kafka)
    assert isinstance(run, dg.RunRequest)
    assert run.run_config["ops"]["score_transactions"]["config"]["executor"] == "spark"
    produce_transactions(kafka_config, topic, small_sim.transactions.slice(400, 100))  # late
    home = tmp_path / "home"
    spark_resource = SparkResource(app_name="streamguard-tests", master="local[2]")
    job = scoring_job(home, champion_home.mlflow_tracking_uri, kafka=kafka, spark=spark_resource)
    lake = Lake(home / "lake")
    with dg.instance_for_test() as instance:
        assert job.execute_in_process(run_config=run.run_config, instance=instance).success
        assert lake.count("transactions") == 400  # the planned range, not the late records
        assert (home / "checkpoints" / "fraud_spark" / f"kafka-{topic}").is_dir()
        later, _ = _kafka_sensor(context.cursor, kafka)
        assert isinstance(later, dg.RunRequest)
        assert job.execute_in_process(run_config=later.run_config, instance=instance).success
    assert lake.count("transactions") == 500 and lake.count("scores") == 500
    published = read_topic(kafka_config, alerts_topic)
    alerts = lake.read("alerts", columns=["transaction_id"])["transaction_id"].to_pylist()
    assert sorted(m["alert_id"] for m in published) == sorted(alerts)
