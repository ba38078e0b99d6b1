"""The Kinesis sensor targets the Spark executor: a sensor-triggered run scores on Spark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import pytest
from conftest import scoring_job

from assets.checks import DEAD_LETTER_RATE, SCORES_IN_UNIT_INTERVAL, SCORES_UNIQUE_TRANSACTION
from assets.resources import (
    KinesisResource,
    SparkResource,
    deployment_resources,
)
from assets.scoring import TABLES, ScoringConfig
from assets.sensors import kinesis_transactions_sensor
from models.simulate import Simulation
from streamguard.config import Home
from streamguard.kinesis import produce_transactions
from streamguard.lake import Lake

pytestmark = pytest.mark.spark

LATE = 150  # records produced after the sensor planned its first range
N_RECORDS = 600
SPARK_MASTER = "local[2]"


@pytest.fixture
def spark_resource(spark: Any) -> SparkResource:
    """The resource; its session is the test run's shared one (same master, already started)."""
    return SparkResource(app_name="streamguard-tests", master=SPARK_MASTER)


def test_executor_is_validated_and_comes_from_the_deployment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert ScoringConfig().executor == "in_process"
    assert ScoringConfig(executor="spark").executor == "spark"
    assert ScoringConfig(executor="spark_state_store").executor == "spark_state_store"
    with pytest.raises(pydantic.ValidationError, match="executor must be one of"):
        ScoringConfig(executor="flink")
    assert KinesisResource().executor_name == "in_process"
    assert deployment_resources("local", {})["kinesis"].executor_name == "in_process"  # type: ignore[attr-defined]
    # Set in the environment: an EnvVar, resolved when a run or sensor uses the resource.
    monkeypatch.setenv("STREAMGUARD_EXECUTOR", "spark")
    kinesis = deployment_resources("local")["kinesis"]
    with dg.build_resources({"kinesis": kinesis}) as built:
        assert built.kinesis.executor_name == "spark"
    monkeypatch.setenv("STREAMGUARD_EXECUTOR", "flink")
    with (
        dg.build_resources({"kinesis": kinesis}) as built,
        pytest.raises(ValueError, match="executor must be one of"),
    ):
        _ = built.kinesis.executor_name


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("score_transactions")
    }


@pytest.mark.parametrize("executor", ["spark", "spark_state_store"])
def test_sensor_with_spark_executor_runs_the_job_on_spark_exactly_once(
    executor: str,
    tmp_path: Path,
    kinesis_server: str,
    kinesis: Any,
    stream_name: str,
    small_sim: Simulation,
    champion_home: Home,
    spark_resource: SparkResource,
) -> None:
    produce_transactions(kinesis, stream_name, small_sim.transactions.slice(0, N_RECORDS),
                         progress=False)  # fmt: skip
    resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server, executor=executor)
    context = dg.build_sensor_context(resources={"kinesis": resource})
    request = kinesis_transactions_sensor(context)
    assert isinstance(request, dg.RunRequest)
    assert request.run_config["ops"]["score_transactions"]["config"]["executor"] == executor
    assert request.tags["streamguard/executor"] == executor
    # More records arrive after the sensor planned its range and before the run starts: the
    # Spark run stops at the range's end (`until`), as an in-process run would.
    produce_transactions(kinesis, stream_name, small_sim.transactions.slice(N_RECORDS, LATE),
                         progress=False)  # fmt: skip
    home = tmp_path / "home"
    job = scoring_job(
        home, champion_home.mlflow_tracking_uri, kinesis=resource, spark=spark_resource
    )
    with dg.instance_for_test() as instance:
        first = job.execute_in_process(
            run_config=request.run_config, instance=instance, tags=request.tags
        )
        assert first.success
        lake = Lake(home / "lake")
        assert lake.count("transactions") == N_RECORDS and lake.count("scores") == N_RECORDS
        assert lake.count("features") == N_RECORDS and lake.count("dead_letters") == 0
        versions = set(lake.read("scores", columns=["model_version"])["model_version"].to_pylist())
        assert versions == {"1"}
        folder = {"spark": "fraud_spark", "spark_state_store": "fraud_spark_store"}[executor]
        assert (home / "checkpoints" / folder / stream_name).is_dir()
        checks = {e.check_name: e.passed for e in first.get_asset_check_evaluations()}
        assert checks[SCORES_UNIQUE_TRANSACTION] and checks[SCORES_IN_UNIT_INTERVAL]
        assert checks[DEAD_LETTER_RATE]
        meta = _metadata(first)
        assert meta["scores"]["rows_written"].value == N_RECORDS
        assert meta["scores"]["records_read"].value == N_RECORDS
        assert meta["scores"]["batches"].value >= 1
        assert meta["scores"]["model_versions"].value == "1"
        assert meta["scores"]["executor"].value == executor

        # The late records are the sensor's next range, and the next run's.
        context = dg.build_sensor_context(cursor=context.cursor, resources={"kinesis": resource})
        request2 = kinesis_transactions_sensor(context)
        assert isinstance(request2, dg.RunRequest) and request2.run_key != request.run_key
        second = job.execute_in_process(run_config=request2.run_config, instance=instance)
        assert second.success
        assert _metadata(second)["scores"]["rows_written"].value == LATE
        assert lake.count("scores") == N_RECORDS + LATE

        # Nothing new on the stream: the sensor skips, and a run anyway writes nothing.
        skip = kinesis_transactions_sensor(
            dg.build_sensor_context(cursor=context.cursor, resources={"kinesis": resource})
        )
        assert isinstance(skip, dg.SkipReason)
        versions_before = {name: lake.version(name) for name in TABLES}
        third = job.execute_in_process(run_config=request2.run_config, instance=instance)
        assert third.success
    again = _metadata(third)
    assert all(again[name]["rows_written"].value == 0 for name in TABLES)
    assert again["scores"]["records_read"].value == 0
    assert {name: lake.version(name) for name in TABLES} == versions_before
    assert lake.count("scores") == N_RECORDS + LATE and lake.count("dead_letters") == 0
    assert json.loads(context.cursor)  # the cursor moved past every shard's records
