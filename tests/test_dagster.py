"""The Dagster layer: definitions load, the sensor's cursor and run keys, a run it launches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from conftest import scoring_job

from assets.checks import DEAD_LETTER_RATE, SCORES_IN_UNIT_INTERVAL, SCORES_UNIQUE_TRANSACTION
from assets.definitions import defs
from assets.resources import (
    KinesisResource,
)
from assets.sensors import kinesis_transactions_sensor
from models.simulate import Simulation
from streamguard.config import Home
from streamguard.kinesis import produce_transactions, put_records
from streamguard.lake import Lake

REPO = Path(__file__).resolve().parent.parent


def test_definitions_hold_the_platform_objects() -> None:
    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    repo = loaded.get_repository_def()
    assert repo.has_sensor_def("kinesis_transactions_sensor")
    assert repo.has_sensor_def("kafka_transactions_sensor")
    assert repo.has_schedule_def("retrain_fraud_model")
    assert {"score_transactions_job", "retrain_fraud_model_job"} <= set(repo.job_names)
    keys = {k.to_user_string() for k in repo.asset_graph.get_all_asset_keys()}
    assert {"transactions", "features", "scores", "alerts", "customer_state", "terminal_state",
            "dead_letters", "fraud_labels", "fraud_model"} <= keys  # fmt: skip
    checks = {k.name for k in repo.asset_graph.asset_check_keys}
    assert {SCORES_UNIQUE_TRANSACTION, SCORES_IN_UNIT_INTERVAL, DEAD_LETTER_RATE} <= checks


def test_dagster_cli_validates_the_workspace(tmp_path: Path) -> None:
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), STREAMGUARD_HOME=str(tmp_path / "home"))
    (tmp_path / "dagster.yaml").write_text((REPO / "platform" / "dagster.yaml").read_text())
    dagster = Path(sys.executable).parent / "dagster"
    done = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def _sensor(cursor: str | None, kinesis_resource: KinesisResource) -> Any:
    context = dg.build_sensor_context(cursor=cursor, resources={"kinesis": kinesis_resource})
    return kinesis_transactions_sensor(context), context


def test_sensor_skips_then_requests_a_run_keyed_by_the_batch_bounds(
    kinesis_server: str, kinesis: Any, stream_name: str
) -> None:
    resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    result, context = _sensor(None, resource)
    assert isinstance(result, dg.SkipReason)
    assert "No new records" in (result.skip_message or "")
    put_records(kinesis, stream_name, [(f'{{"n": {i}}}'.encode(), f"k{i}") for i in range(20)])
    request, context = _sensor(None, resource)
    assert isinstance(request, dg.RunRequest)
    cursor = json.loads(context.cursor)
    assert len(cursor) == 2 and all(cursor.values())  # 20 keys land on both shards
    until = request.run_config["ops"]["score_transactions"]["config"]["until"]
    assert until == cursor
    # The same bounds give the same run key; after the cursor moved, nothing new: skip.
    again, _ = _sensor(None, resource)
    assert again.run_key == request.run_key
    skip, _ = _sensor(context.cursor, resource)
    assert isinstance(skip, dg.SkipReason)
    put_records(kinesis, stream_name, [(b'{"n": 99}', "k1")])
    more, later = _sensor(context.cursor, resource)
    assert isinstance(more, dg.RunRequest) and more.run_key != request.run_key
    moved = json.loads(later.cursor)
    assert sum(moved[s] != cursor[s] for s in cursor) == 1


def test_sensor_triggered_run_scores_the_stream_and_passes_the_checks(
    tmp_path: Path,
    kinesis_server: str,
    kinesis: Any,
    stream_name: str,
    small_sim: Simulation,
    champion_home: Home,
) -> None:
    first_days = small_sim.transactions.slice(0, 600)
    produce_transactions(kinesis, stream_name, first_days, progress=False)
    kinesis_resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    request, _ = _sensor(None, kinesis_resource)
    assert isinstance(request, dg.RunRequest)
    job = scoring_job(
        tmp_path / "home", champion_home.mlflow_tracking_uri, kinesis=kinesis_resource
    )
    with dg.instance_for_test() as instance:
        result = job.execute_in_process(run_config=request.run_config, instance=instance)
    assert result.success
    lake = Lake(tmp_path / "home" / "lake")
    assert lake.count("transactions") == 600 and lake.count("scores") == 600
    assert lake.count("features") == 600
    versions = set(lake.read("scores", columns=["model_version"])["model_version"].to_pylist())
    assert versions == {"1"}
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks[SCORES_UNIQUE_TRANSACTION] and checks[SCORES_IN_UNIT_INTERVAL]
    assert checks[DEAD_LETTER_RATE]
    materialized = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("score_transactions")
    }
    assert materialized["scores"]["rows_written"].value == 600
    alerts = lake.read("alerts")
    assert alerts.num_rows == int(pc.sum(lake.read("scores")["alert"]).as_py())
