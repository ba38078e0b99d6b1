"""Backtests in MLflow: one run per backtest, with both models' metrics, its periods and plots.

A backtest is not a registered version: it answers "how would this model family have done on
a later period", so it is logged to its own experiment and never promoted or loaded.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from models.backtest import BacktestResult
from models.registry import ensure_experiment, mlflow_client

__all__ = ["log_backtest"]


def log_backtest(
    result: BacktestResult,
    tracking_uri: str,
    artifact_root: Path | str,
    experiment: str = "fraud-backtest",
) -> str:
    """Log a backtest (metrics of the model and both baselines, periods, plots) as one run.

    Returns the MLflow run id, so the caller (the backtest asset) can link its metadata to it.
    """
    client = mlflow_client(tracking_uri)
    run = client.create_run(ensure_experiment(client, experiment, artifact_root))
    run_id = str(run.info.run_id)
    summary = result.to_dict()
    for prefix in ("model", "literature_baseline", "baseline"):
        for key, value in summary[prefix].items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                client.log_metric(run_id, f"{prefix}.{key}", float(value))
    for key in ("k", "budget", "n_train", "n_test", "n_train_fraud", "n_test_fraud"):
        if key in summary:
            client.log_param(run_id, key, summary[key])
    for key, value in summary.get("periods", {}).items():
        client.log_param(run_id, f"period.{key}", value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "metrics.json").write_text(result.to_json())
        for name, png in result.plots().items():
            (folder / (name if name.endswith(".png") else f"{name}.png")).write_bytes(png)
        client.log_artifacts(run_id, str(folder))
    client.set_terminated(run_id)
    return run_id
