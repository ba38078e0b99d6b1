"""The backtest asset: metrics and plots as metadata, and one MLflow run with its artifacts."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from assets.backtest import BacktestConfig, fraud_backtest
from assets.resources import HomeResource, MlflowResource
from models.registry import mlflow_client
from models.simulate import simulate, write_simulation
from streamguard.config import Home


def test_backtest_asset_reports_metrics_plots_and_logs_to_mlflow(tmp_path: Path) -> None:
    home = Home(tmp_path / "home").ensure()
    write_simulation(simulate(days=35, customers=300, seed=5), home.data)
    result = dg.materialize(
        [fraud_backtest],
        resources={"home": HomeResource(root=str(home.root)), "mlflow": MlflowResource()},
        run_config=dg.RunConfig(
            {"fraud_backtest": BacktestConfig(train_start="2026-01-15", train_days=7,
                                              delay_days=3, test_days=7, k=20)}
        ),
    )  # fmt: skip
    assert result.success
    (event,) = result.asset_materializations_for_node("fraud_backtest")
    meta = event.metadata
    assert meta["n_test"].value > 0 and meta["train_start"].value == "2026-01-15"
    for prefix in ("model", "literature_baseline", "baseline"):
        assert 0.0 <= meta[f"{prefix}_average_precision"].value <= 1.0
    assert "data:image/png;base64," in meta["pr_curve"].value
    client = mlflow_client(home.mlflow_tracking_uri)
    run = client.get_run(meta["mlflow_run_id"].value)
    assert run.data.metrics["model.average_precision"] == meta["model_average_precision"].value
    literature = meta["literature_baseline_average_precision"].value
    assert run.data.metrics["literature_baseline.average_precision"] == literature
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "pr_curve.png", "score_distribution.png"} <= names
