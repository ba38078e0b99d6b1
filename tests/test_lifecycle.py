"""Champion/challenger on a real MLflow SQLite store: the evaluation gate, rollback, shadow scores.

Registry level first (functions and the CLI), then the Dagster gate: `fraud_model` registers a
challenger, the blocking check `challenger_beats_champion` compares it with the champion, and
`fraud_model_champion` only runs (moves the alias) when the check passed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import pytest
from test_registry import CUTOFF, DELAY, WEAK, WEAKER_THAN_GOOD, synthetic

from assets.checks import CHALLENGER_BEATS_CHAMPION, challenger_beats_champion
from assets.definitions import defs
from assets.model import (
    fraud_labels,
    fraud_model,
    fraud_model_champion,
    rollback_fraud_model_job,
)
from assets.resources import HomeResource, MlflowResource
from models.job import SCORES, SHADOW_SCORES
from models.promotion import (
    PREVIOUS_CHAMPION,
    Evaluation,
    evaluate_challenger,
    load_holdout,
    log_holdout,
    move_champion,
    register_challenger,
    rollback,
)
from models.registry import (
    CHALLENGER,
    CHAMPION,
    MODEL_NAME,
    alias_version,
    log_and_register,
    mlflow_client,
)
from models.schema import to_payload
from models.simulate import Simulation, write_simulation
from models.training import time_split, train, training_frame
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.pipeline import scoring_runner
from streamguard.sources import MemorySource

CLI = str(Path(sys.executable).parent / "streamguard")


@dataclass
class Lifecycle:
    home: Home
    uri: str
    holdout: pd.DataFrame
    evaluations: list[Evaluation] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)
    champion_after: list[str | None] = field(default_factory=list)
    challenger_after: list[str | None] = field(default_factory=list)


def _train_and_challenge(s: Lifecycle, params: dict[str, Any] | None) -> str:
    """What `train_challenger` does, on the synthetic frame: register, evaluate, alias."""
    features, labels = synthetic()
    result = train(features, labels, CUTOFF, DELAY, params=params)
    version = log_and_register(result, s.uri, s.home.mlflow_artifacts)
    log_holdout(s.uri, MODEL_NAME, version, s.holdout)
    evaluation = evaluate_challenger(s.uri, MODEL_NAME, version, s.holdout)
    s.evaluations.append(evaluation)
    s.aliases.append(register_challenger(s.uri, MODEL_NAME, version, evaluation))
    if evaluation.better and s.aliases[-1] == CHALLENGER:  # the gate, in process
        move_champion(s.uri, MODEL_NAME, version, "promotion", evaluation.reason, evaluation)
    s.champion_after.append(alias_version(s.uri, MODEL_NAME, CHAMPION))
    s.challenger_after.append(alias_version(s.uri, MODEL_NAME, CHALLENGER))
    return version


@pytest.fixture(scope="module")
def lifecycle(tmp_path_factory: pytest.TempPathFactory) -> Lifecycle:
    """medium (first: champion), weak (worse: stays challenger), good (better: promoted)."""
    home = Home(tmp_path_factory.mktemp("home")).ensure()
    features, labels = synthetic()
    _, holdout = time_split(training_frame(features, labels, CUTOFF, DELAY))
    s = Lifecycle(home, home.mlflow_tracking_uri, holdout)
    for params in (WEAKER_THAN_GOOD, WEAK, None):
        _train_and_challenge(s, params)
    return s


def test_first_model_is_champion_and_a_worse_one_stays_challenger(lifecycle: Lifecycle) -> None:
    s = lifecycle
    assert s.aliases[:2] == [CHAMPION, CHALLENGER]
    assert s.champion_after[:2] == ["1", "1"] and s.challenger_after[:2] == [None, "2"]
    worse = s.evaluations[1]
    assert not worse.better and worse.champion_version == "1"
    assert worse.champion_value is not None and worse.challenger_value <= worse.champion_value
    client = mlflow_client(s.uri)
    v1 = client.get_model_version(MODEL_NAME, "1").tags
    assert v1["promotion.decision"] == "promoted" and v1["champion.kind"] == "first"
    # The rejection is recorded on both versions and as a run with both metrics and the time.
    v2 = client.get_model_version(MODEL_NAME, "2").tags
    assert v2["promotion.decision"] == "rejected"
    assert v2["promotion.champion_version_before"] == "1"
    assert float(v2["promotion.champion_value"]) == worse.champion_value
    assert float(v2["promotion.candidate_value"]) == worse.challenger_value
    assert v2["promotion.decided_at"]
    run = client.get_run(v2["promotion.run_id"])
    assert run.data.params["decision"] == "rejected" and run.data.tags["event"] == "evaluate"
    assert run.data.metrics["challenger_average_precision"] == worse.challenger_value
    assert run.data.metrics["champion_average_precision"] == worse.champion_value
    assert run.info.start_time > 0


def test_better_challenger_is_promoted_and_the_previous_champion_recorded(
    lifecycle: Lifecycle,
) -> None:
    s = lifecycle
    better = s.evaluations[2]
    assert better.better and better.champion_version == "1"
    assert better.champion_value is not None and better.challenger_value > better.champion_value
    assert s.champion_after[2] == "3" and s.challenger_after[2] is None  # no longer a challenger
    client = mlflow_client(s.uri)
    v3 = client.get_model_version(MODEL_NAME, "3").tags
    assert v3["promotion.decision"] == "promoted" and v3[PREVIOUS_CHAMPION] == "1"
    assert client.get_registered_model(MODEL_NAME).tags[PREVIOUS_CHAMPION] == "1"
    v1 = client.get_model_version(MODEL_NAME, "1").tags
    assert v1["promotion.replaced_by"] == "3" and v1["evaluation.last_challenger"] == "3"
    assert len(load_holdout(s.uri, MODEL_NAME, "3")) == len(s.holdout)


def _cli(home: Home, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, STREAMGUARD_HOME=str(home.root))
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def test_rollback_restores_the_previous_champion_function_and_cli(lifecycle: Lifecycle) -> None:
    s = lifecycle
    change = rollback(s.uri)
    assert (change.previous, change.version, change.kind) == ("3", "1", "rollback")
    assert alias_version(s.uri) == "1"
    client = mlflow_client(s.uri)
    assert client.get_model_version(MODEL_NAME, "3").tags["champion.replaced_by_kind"] == "rollback"
    assert (
        json.loads(client.get_registered_model(MODEL_NAME).tags["last_champion_change"])["kind"]
        == "rollback"
    )

    promoted = _cli(s.home, "promote", "--version", "3", "--reason", "test")
    assert promoted.returncode == 0, promoted.stderr
    assert "1 -> 3" in promoted.stdout and alias_version(s.uri) == "3"
    assert client.get_model_version(MODEL_NAME, "3").tags["champion.kind"] == "manual"
    rolled = _cli(s.home, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert "3 -> 1" in rolled.stdout and alias_version(s.uri) == "1"
    # Version 1 was the first champion: there is nothing before it.
    again = _cli(s.home, "rollback")
    assert again.returncode == 1 and "no previous_champion" in again.stderr
    assert alias_version(s.uri) == "1"


# --------------------------------------------------------------------------- Dagster gate


def _materialize(home: Home, params: dict[str, Any] | None) -> dg.ExecuteInProcessResult:
    config = {"label_delay_days": 0, "model_params_json": json.dumps(params) if params else ""}
    return dg.materialize(
        [fraud_labels, fraud_model, fraud_model_champion, challenger_beats_champion],
        resources={"home": HomeResource(root=str(home.root)), "mlflow": MlflowResource()},
        run_config={"ops": {"fraud_model": {"config": config}}},
        raise_on_error=False,
    )


def _ran(result: dg.ExecuteInProcessResult) -> set[str]:
    return {
        m.asset_key.to_user_string()
        for m in result.get_asset_materialization_events()
        and [
            e.event_specific_data.materialization  # type: ignore[union-attr]
            for e in result.get_asset_materialization_events()
        ]
    }


def test_definitions_hold_the_gate_and_the_rollback_job() -> None:
    repo = defs().get_repository_def()
    assert {"retrain_fraud_model_job", "rollback_fraud_model_job"} <= set(repo.job_names)
    assert CHALLENGER_BEATS_CHAMPION in {k.name for k in repo.asset_graph.asset_check_keys}
    retrain = repo.get_job("retrain_fraud_model_job")
    assert CHALLENGER_BEATS_CHAMPION in {
        k.name for k in retrain.asset_layer.asset_graph.asset_check_keys
    }


def test_blocking_check_gates_the_promotion_and_shadow_scores_follow(
    tmp_path: Path, small_sim: Simulation
) -> None:
    home = Home(tmp_path / "home").ensure()
    write_simulation(small_sim, home.data)
    uri = home.mlflow_tracking_uri

    first = _materialize(home, WEAK)  # the first model: champion at once, nothing to gate
    assert first.success
    assert alias_version(uri) == "1" and alias_version(uri, MODEL_NAME, CHALLENGER) is None

    better = _materialize(home, None)
    checks = {e.check_name: e for e in better.get_asset_check_evaluations()}
    assert checks[CHALLENGER_BEATS_CHAMPION].passed
    meta = checks[CHALLENGER_BEATS_CHAMPION].metadata
    assert meta["challenger_version"].value == "2" and meta["champion_version"].value == "1"
    assert meta["challenger_average_precision"].value > meta["champion_average_precision"].value
    assert "fraud_model_champion" in _ran(better)
    assert alias_version(uri) == "2" and alias_version(uri, MODEL_NAME, CHALLENGER) is None

    worse = _materialize(home, WEAK)
    checks = {e.check_name: e for e in worse.get_asset_check_evaluations()}
    assert not checks[CHALLENGER_BEATS_CHAMPION].passed
    meta = checks[CHALLENGER_BEATS_CHAMPION].metadata
    assert meta["challenger_average_precision"].value <= meta["champion_average_precision"].value
    assert "fraud_model" in _ran(worse) and "fraud_model_champion" not in _ran(worse)
    assert alias_version(uri) == "2" and alias_version(uri, MODEL_NAME, CHALLENGER) == "3"
    tags = mlflow_client(uri).get_model_version(MODEL_NAME, "3").tags
    assert tags["promotion.decision"] == "rejected"

    # Shadow scoring: champion 2 scores and alerts, challenger 3 is scored on the same rows.
    rows = small_sim.transactions.slice(0, 500).to_pylist()
    source = MemorySource.split([to_payload(r) for r in rows], [r["customer_id"] for r in rows], 2)
    lake = Lake(tmp_path / "score-lake")
    scoring_runner(lake, source, uri, max_batch_records=200).run()
    assert set(lake.read(SCORES)["model_version"].to_pylist()) == {"2"}
    shadow = lake.read(SHADOW_SCORES)
    assert shadow.num_rows == lake.count(SCORES) == 500
    assert set(shadow["model_version"].to_pylist()) == {"3"}
    contexts = [json.loads(c) for c in lake.read(CHECKPOINT_TABLE)["context"].to_pylist()]
    assert {(c["model_version"], c["challenger_version"]) for c in contexts} == {("2", "3")}

    # Rollback job: back to the previous champion (1), by default and by explicit version.
    job = dg.Definitions(
        jobs=[rollback_fraud_model_job],
        resources={"home": HomeResource(root=str(home.root)), "mlflow": MlflowResource()},
    ).resolve_job_def("rollback_fraud_model_job")
    assert job.execute_in_process().success
    assert alias_version(uri) == "1"
    to_two = {"ops": {"rollback_fraud_model": {"config": {"to_version": "2"}}}}
    assert job.execute_in_process(run_config=to_two).success
    assert alias_version(uri) == "2"
