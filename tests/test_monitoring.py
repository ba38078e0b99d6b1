"""Drift monitor and retrain sensor on real Delta tables, a real MLflow store and Dagster."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from assets import monitoring, resources
from assets.definitions import AREAS
from assets.monitoring import (
    DRIFT_BELOW_THRESHOLD,
    DRIFT_PSI_THRESHOLD,
    MIN_NEW_LABELS,
    drift_psi_below_threshold,
    fraud_drift,
    retrain_on_new_labels_or_drift,
)
from assets.resources import HomeResource, MlflowResource
from models.features import LABEL_DELAY_DAYS, TERMINAL_WINDOWS, replay
from models.job import FEATURES, FEATURES_TABLE_SCHEMA, LABELS, SCORES, SCORES_TABLE_SCHEMA
from models.registry import LoadedModel
from models.schema import LABEL_SCHEMA, TIMESTAMP
from models.simulate import Simulation, simulate
from models.training import score
from streamguard.config import Home
from streamguard.lake import Lake

WINDOW_DAYS = 7
# Days until every feature window is full: the longest delayed terminal window ends
# LABEL_DELAY_DAYS before the event's day and reaches 30 days further back.
WARM_UP_DAYS = max(TERMINAL_WINDOWS.values()) + LABEL_DELAY_DAYS + 1


@pytest.fixture(scope="module")
def three_weeks() -> Simulation:
    """Three weeks of log after the warm-up days (which the log leaves out)."""
    return simulate(days=WARM_UP_DAYS + 21, customers=100, seed=7)


def _write_log(
    lake: Lake,
    sim: Simulation,
    model: LoadedModel,
    amount_factor: float,
    warm_up_days: int = WARM_UP_DAYS,
) -> None:
    """The feature log and scores as the scoring job writes them; last week's amounts scaled."""
    tx = sim.transactions
    last = pc.max(tx["event_time"]).as_py()
    late = pc.greater(tx["event_time"], pa.scalar(last - timedelta(days=WINDOW_DAYS), TIMESTAMP))
    amount = pc.if_else(late, pc.multiply(tx["amount"], amount_factor), tx["amount"])
    tx = tx.set_column(tx.schema.get_field_index("amount"), "amount", amount)
    features = replay(tx, sim.labels).features
    # A log from a platform running for a while already: every window (and the scores that use
    # them) is warm in its first week, so an unchanged stream does not look like drift.
    start = pc.min(tx["event_time"]).as_py() + timedelta(days=warm_up_days)
    features = features.filter(
        pc.greater_equal(features["event_time"], pa.scalar(start, TIMESTAMP))
    )
    n = features.num_rows
    const = {"model_name": model.name, "model_version": model.version}
    log = features
    for name, value in {"feature_version": "1", **const}.items():
        log = log.append_column(name, pa.array([value] * n, pa.string()))
    log = log.append_column("batch_id", pa.array(np.zeros(n, np.int64)))
    lake.append(FEATURES, log.cast(FEATURES_TABLE_SCHEMA), "test", 0)
    p = score(model.model, features.to_pandas())
    scores = {
        **{c: features[c] for c in ("transaction_id", "customer_id", "terminal_id", "event_time")},
        "score": pa.array(p),
        "rules": pa.array([""] * n),
        "alert": pa.array(p >= 0.5),
        **{k: pa.array([v] * n) for k, v in const.items()},
        "batch_id": pa.array(np.zeros(n, np.int64)),
        "scored_at": pa.array([datetime.now(UTC)] * n, TIMESTAMP),
    }
    lake.append(SCORES, pa.table(scores, schema=SCORES_TABLE_SCHEMA), "test", 0)


def _materialize(home: Path, tracking_uri: str) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [fraud_drift, drift_psi_below_threshold],
        resources={
            "home": HomeResource(root=str(home)),
            "mlflow": MlflowResource(tracking_uri=tracking_uri),
        },
        run_config=dg.RunConfig(ops={"fraud_drift": monitoring.DriftConfig(window_days=7)}),
    )


def _metadata(result: dg.ExecuteInProcessResult) -> dict[str, object]:
    (event,) = result.asset_materializations_for_node("fraud_drift")
    return {k: v.value for k, v in event.metadata.items()}


@pytest.mark.parametrize(("factor", "passes"), [(3.0, False), (1.0, True)])
def test_drift_of_a_shifted_last_week_fails_the_check(
    tmp_path: Path, three_weeks: Simulation, tiny_model: LoadedModel, factor: float, passes: bool
) -> None:
    home = tmp_path / "home"
    _write_log(Lake(home / "lake"), three_weeks, tiny_model, factor)
    result = _materialize(home, f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}")
    assert result.success
    meta = _metadata(result)
    # No champion in this MLflow store: the first week of the log is the baseline.
    assert "fallback" in str(meta["training_window_source"])
    log_start = (datetime(2026, 1, 1) + timedelta(days=WARM_UP_DAYS)).strftime("%Y-%m-%d ")
    assert str(meta["training_window"]).startswith(log_start)  # the log's first week
    assert int(str(meta["training_rows"])) > 0 and int(str(meta["current_rows"])) > 0
    max_psi = float(str(meta["max_psi"]))
    assert max_psi == max(float(str(v)) for k, v in meta.items() if k.startswith("psi_"))
    assert "psi_score" in meta and "psi_amount" in meta
    assert str(meta["drift_plot"]).startswith("![PSI per column](data:image/png;base64,iVBOR")
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == DRIFT_BELOW_THRESHOLD
    assert check.severity == dg.AssetCheckSeverity.WARN
    assert check.passed is passes
    if passes:
        assert max_psi < DRIFT_PSI_THRESHOLD
    else:
        assert float(str(meta["psi_amount"])) > 0.5 and max_psi >= DRIFT_PSI_THRESHOLD


def test_training_window_comes_from_the_champion_tags(
    tmp_path: Path, three_weeks: Simulation, tiny_model: LoadedModel, champion_home: Home
) -> None:
    home = tmp_path / "home"
    # The whole simulation, so the log holds the champion's training days (its first ones).
    _write_log(Lake(home / "lake"), three_weeks, tiny_model, 1.0, warm_up_days=0)
    result = _materialize(home, champion_home.mlflow_tracking_uri)
    meta = _metadata(result)
    assert str(meta["training_window_source"]).startswith("fraud_model v1 (champion)")
    assert "fallback" not in str(meta["training_window_source"])
    assert str(meta["training_window"]).startswith("2026-01-01 ")  # the champion's, not the log's
    # The champion's window holds the simulation's first days, when the 30-day and the delayed
    # terminal windows are still filling: whether that drifts is the data's business; the check
    # must say what the metadata says.
    (check,) = result.get_asset_check_evaluations()
    assert check.passed is (float(str(meta["max_psi"])) < DRIFT_PSI_THRESHOLD)


def test_drift_fails_clearly_on_an_empty_log(tmp_path: Path) -> None:
    with pytest.raises(dg.Failure, match="feature log is empty"):
        _materialize(tmp_path / "home", f"sqlite:///{tmp_path / 'mlflow.db'}")


# --------------------------------------------------------------------------- sensor


def _labels(lake: Lake, start: int, n: int, is_fraud: bool = True) -> None:
    at = datetime(2026, 1, 20, tzinfo=UTC)
    table = pa.table(
        {
            "transaction_id": [f"tx-{i}" for i in range(start, start + n)],
            "is_fraud": [is_fraud] * n,
            "reported_at": pa.array([at] * n, TIMESTAMP),
            "fraud_scenario": pa.nulls(n, pa.string()),
        },
        schema=LABEL_SCHEMA,
    )
    lake.upsert(LABELS, table, ["transaction_id"])


def _tick(
    instance: dg.DagsterInstance, home: Path, cursor: str | None
) -> tuple[dg.RunRequest | dg.SkipReason, str | None]:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"home": HomeResource(root=str(home))}
    )
    result = retrain_on_new_labels_or_drift(context)
    assert isinstance(result, dg.RunRequest | dg.SkipReason)
    return result, context.cursor


def test_sensor_requests_a_retrain_after_enough_new_fraud_labels(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "home" / "lake")
    _labels(lake, 0, 200)  # what the champion was trained with
    instance = dg.DagsterInstance.ephemeral()
    first, cursor = _tick(instance, tmp_path / "home", None)
    assert isinstance(first, dg.SkipReason) and "First evaluation" in (first.skip_message or "")
    assert cursor is not None and json.loads(cursor) == {"labels_version": 0, "drift_psi": 0.0}

    skip, cursor = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(skip, dg.SkipReason)
    assert "0 new fraud label(s)" in (skip.skip_message or "")
    assert "drift max PSI not measured" in (skip.skip_message or "")

    few = MIN_NEW_LABELS - 20
    _labels(lake, 200, few)  # version 1
    _labels(lake, 0, 200)  # the same labels again (version 2): nothing new
    _labels(lake, 1_000, 100, is_fraud=False)  # legitimate labels (version 3) do not count
    skip, cursor = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(skip, dg.SkipReason)
    assert f"{few} new fraud label(s) since labels version 0 (now 3" in (skip.skip_message or "")
    assert cursor is not None and json.loads(cursor)["labels_version"] == 0  # still counting

    _labels(lake, 500, 20)  # version 4: 50 in all since the cursor
    request, cursor = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "retrain-labels-v4"
    assert request.tags["streamguard/retrain_reason"] == "labels"
    assert request.tags["streamguard/new_fraud_labels"] == str(MIN_NEW_LABELS)
    assert cursor is not None and json.loads(cursor) == {"labels_version": 4, "drift_psi": 0.0}
    again, _ = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(again, dg.SkipReason) and "0 new fraud label(s)" in (again.skip_message or "")


def test_sensor_requests_a_retrain_once_per_significant_drift(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "home" / "lake")
    _labels(lake, 0, 10)
    instance = dg.DagsterInstance.ephemeral()
    _, cursor = _tick(instance, tmp_path / "home", None)

    def measured(psi: float) -> None:
        instance.report_runless_asset_event(
            dg.AssetMaterialization("fraud_drift", metadata={"max_psi": psi})
        )

    measured(0.12)
    skip, cursor = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(skip, dg.SkipReason) and "PSI 0.1200" in (skip.skip_message or "")
    measured(0.4)
    request, cursor = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(request, dg.RunRequest)
    assert request.run_key == "retrain-labels-v0-psi-0.4000"
    assert request.tags["streamguard/retrain_reason"] == "drift"
    skip, cursor = _tick(instance, tmp_path / "home", cursor)  # same measurement: acted on
    assert isinstance(skip, dg.SkipReason) and "already acted on" in (skip.skip_message or "")
    measured(0.5)
    request, _ = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(request, dg.RunRequest) and request.run_key.endswith("psi-0.5000")


def test_sensor_before_any_labels_table(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    _, cursor = _tick(instance, tmp_path / "home", None)
    assert cursor is not None and json.loads(cursor)["labels_version"] == -1
    lake = Lake(tmp_path / "home" / "lake")
    _labels(lake, 0, MIN_NEW_LABELS)  # the table appears with enough fraud labels
    request, _ = _tick(instance, tmp_path / "home", cursor)
    assert isinstance(request, dg.RunRequest) and request.run_key == "retrain-labels-v0"


def test_monitoring_defs_merge_with_the_code_location() -> None:
    local = dg.Definitions(resources=resources.deployment_resources("local"))
    merged = dg.Definitions.merge(local, *AREAS, monitoring.defs)
    dg.Definitions.validate_loadable(merged)
    repo = merged.get_repository_def()
    assert repo.has_sensor_def("retrain_on_new_labels_or_drift")
    sensor = repo.get_sensor_def("retrain_on_new_labels_or_drift")
    assert sensor.job_name == "retrain_fraud_model_job"
    assert DRIFT_BELOW_THRESHOLD in {k.name for k in repo.asset_graph.asset_check_keys}
    node = repo.asset_graph.get(dg.AssetKey("fraud_drift"))
    assert {k.to_user_string() for k in node.parent_keys} == {"features", "scores"}
    assert node.group_name == "fraud_monitoring"
