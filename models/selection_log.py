"""Model selection in MLflow: one parent run per selection, one child run per candidate.

Kept apart from registering (`models.registry`): a selection is evidence for how the trained
family was chosen, read by people comparing candidates, and never loaded to score.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.entities import Metric, Param, RunTag

from models.features import FEATURE_VERSION
from models.registry import (
    EXPERIMENT,
    MODEL_NAME,
    ensure_experiment,
    iso_time,
    mlflow_client,
    utc_now,
)
from models.training import Selection

__all__ = ["log_selection"]


def _ranking_json(ranking: list[dict[str, Any]], limit: int = 5000) -> str:
    """The ranking as JSON within a tag's length: the best entries that fit (valid JSON)."""
    for n in range(len(ranking), 0, -1):
        text = json.dumps(ranking[:n], default=str)
        if len(text) <= limit:
            return text
    return "[]"


def log_selection(
    selection: Selection,
    tracking_uri: str,
    artifact_root: Path | str,
    experiment: str = EXPERIMENT,
    name: str = MODEL_NAME,
    feature_version: str = FEATURE_VERSION,
) -> str:
    """Log a model selection (or search): one parent run, one child run per configuration.

    `feature_version`: the version of the features it ranked on (with their label delay).

    Children carry the configuration's parameters, validation metrics (`validation_*`), fit
    seconds, scoring rate (`rows_per_second`), boosting iterations kept by early stopping and
    whether it was fast enough to be selected, and the tag `mlflow.parentRunId`; the parent the
    ranking, the winner, its scoring rate, the minimum rate and the validation window. Returns
    the parent run id (recorded on the version trained from the winner).
    """
    client = mlflow_client(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    winner = selection.winner
    parent = client.create_run(
        experiment_id,
        run_name=f"select-{pd.Timestamp(selection.validation_end or utc_now()):%Y%m%dT%H%M}",
        tags={"model_name": name, "feature_version": feature_version, "kind": "model_selection"},
    )
    parent_id = str(parent.info.run_id)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    try:
        for rank, result in enumerate(selection.ranking, start=1):
            child = client.create_run(
                experiment_id,
                run_name=result.name.replace("/", "-"),
                tags={
                    "mlflow.parentRunId": parent_id,
                    "model_name": name,
                    "candidate": result.candidate,
                    "class_weight": str(result.class_weight),
                    "config": result.name,
                    "rank": str(rank),
                    "selectable": str(result.selectable),
                },
            )
            child_id = str(child.info.run_id)
            metrics = {
                **{
                    f"validation_{k}": float(v)
                    for k, v in result.metrics.items()
                    if math.isfinite(float(v))
                },
                "fit_seconds": result.fit_seconds,
                "rows_per_second": result.rows_per_second,
                **({"n_iter": float(result.n_iter)} if result.n_iter is not None else {}),
            }
            metrics = {k: v for k, v in metrics.items() if math.isfinite(v)}
            client.log_batch(
                child_id,
                metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
                params=[
                    Param(k, str(v)[:6000])
                    for k, v in {
                        "candidate": result.candidate,
                        "class_weight": str(result.class_weight),
                        **result.params,
                        **(dict(result.config.params) if result.config is not None else {}),
                    }.items()
                ],
            )
            client.set_terminated(child_id, "FINISHED")
        ranking = [
            {
                "config": r.name,
                "average_precision": r.metrics.get("average_precision"),
                "roc_auc": r.metrics.get("roc_auc"),
                "rows_per_second": round(r.rows_per_second),
                "selectable": r.selectable,
            }
            for r in selection.ranking
        ]
        client.log_batch(
            parent_id,
            metrics=[
                Metric(f"winner_validation_{selection.metric}", v, now_ms, 0)
                for v in [float(winner.metrics.get(selection.metric, math.nan))]
                if math.isfinite(v)
            ]
            + [
                Metric(k, v, now_ms, 0)
                for k, v in {
                    "selection_seconds": selection.seconds,
                    "winner_rows_per_second": winner.rows_per_second,
                    "min_rows_per_second": selection.min_rows_per_second,
                }.items()
                if math.isfinite(v)
            ],
            params=[
                Param(k, v)
                for k, v in {
                    "metric": selection.metric,
                    "n_candidates": str(len(selection.ranking)),
                    "n_train": str(selection.n_train),
                    "n_validation": str(selection.n_validation),
                    "train_end": iso_time(selection.train_end),
                    "validation_start": iso_time(selection.validation_start),
                    "validation_end": iso_time(selection.validation_end),
                }.items()
            ],
            tags=[
                RunTag("winner", winner.candidate),
                RunTag("winner_class_weight", str(winner.class_weight)),
                RunTag("winner_config", winner.name),
                RunTag("ranking", _ranking_json(ranking)),
            ],
        )
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    return parent_id
