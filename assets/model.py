"""Fraud labels and the fraud model: training a challenger, the gated promotion to champion,
rollback, and the retrain schedule.

The gate is Dagster's: `fraud_model` registers the challenger, the blocking check
`challenger_beats_champion` (assets/checks.py) compares it with the champion, and
`fraud_model_champion`, downstream of `fraud_model`, moves the alias; a failed blocking check
stops it from running.
"""

import json
import math
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

from assets.resources import HomeResource, MlflowResource
from models.accounts import ACCOUNTS_HISTORY
from models.job import FEATURES
from models.promotion import Evaluation, promote_if_better, rollback
from models.registry import CHALLENGER, CHAMPION, DEFAULT_METRIC, PromotionMetric, alias_version
from streamguard.pipeline import (
    MIN_FEATURE_LOG_ROWS,
    load_labels,
    read_labels,
    train_challenger,
)

GROUP = "fraud_model"


def evaluation_metadata(evaluation: Evaluation | None) -> dict[str, Any]:
    """Both metrics and the verdict, as Dagster metadata (no NaN: "-" when undefined)."""
    if evaluation is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in evaluation.metadata().items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            out[key] = "-"
        else:
            out[key] = value
    return out


class LabelsConfig(dg.Config):
    path: str = Field(
        default="",
        description="Labels Parquet (transaction_id, is_fraud, reported_at[, fraud_scenario]); "
        "default: $STREAMGUARD_HOME/data/labels.parquet",
    )


@dg.asset(group_name=GROUP, description="Fraud labels as reported (chargebacks, confirmed cases).")
def fraud_labels(config: LabelsConfig, home: HomeResource) -> dg.MaterializeResult:
    """Upsert the labels file into the Delta `labels` table."""
    place = home.home()
    path = Path(config.path) if config.path else place.data / "labels.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"no labels file at {path} (run `streamguard generate`)")
    labels = read_labels(path)
    lake = home.lake()
    load_labels(lake, labels)
    return dg.MaterializeResult(
        metadata={
            "rows_loaded": labels.num_rows,
            "rows_total": lake.count("labels"),
            "source": dg.MetadataValue.path(str(path)),
        }
    )


class TrainingConfig(dg.Config):
    history_path: str = Field(
        default="",
        description="Transactions Parquet to replay through the feature function when the "
        "feature log is too small; default: $STREAMGUARD_HOME/data/transactions.parquet",
    )
    train_days: int = Field(
        default=0, description="Train on the first N days only (0: all data up to now)"
    )
    label_delay_days: int = Field(
        default=7, description="Days a label needs to arrive; newer transactions are not trained on"
    )
    use_feature_log: bool = Field(
        default=True,
        description="Prefer the Delta feature log (features as scored) when large enough",
    )
    metric: PromotionMetric = Field(
        default=DEFAULT_METRIC,
        description="Holdout metric the challenger must strictly improve on to become champion",
    )
    model_params_json: str = Field(
        default="",
        description='Estimator parameter overrides as JSON, e.g. {"learning_rate": 0.05}',
    )


@dg.asset(
    group_name=GROUP,
    # The account history too: a history replay looks each transaction's account up in it.
    deps=[fraud_labels, dg.AssetKey(ACCOUNTS_HISTORY)],
    description="The newest registered fraud model: the `challenger` (the first one: `champion`).",
)
def fraud_model(
    config: TrainingConfig, home: HomeResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Train on point-in-time features, register in MLflow as the challenger, store its holdout."""
    place = home.home()
    history = (
        Path(config.history_path) if config.history_path else place.data / "transactions.parquet"
    )
    use_log = config.use_feature_log and home.lake().count(FEATURES) >= MIN_FEATURE_LOG_ROWS
    params: dict[str, Any] | None = (
        json.loads(config.model_params_json) if config.model_params_json else None
    )
    outcome = train_challenger(
        place,
        history=None if use_log else history,
        train_days=config.train_days or None,
        label_delay_days=config.label_delay_days,
        metric=config.metric,
        tracking_uri=mlflow.uri(place),
        model_name=mlflow.model_name,
        params=params,
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "model_version": outcome.version,
        "alias": outcome.alias,
        "champion_before": outcome.champion_before or "-",
        "n_train": outcome.n_train,
        "n_holdout": outcome.n_holdout,
        "cutoff": outcome.cutoff.isoformat(),
        "source": outcome.source,
        "feature_version": outcome.feature_version,  # with the label delay D it estimated
    }
    metadata.update({k: float(v) for k, v in outcome.metrics.items() if not math.isnan(v)})
    evaluated = evaluation_metadata(outcome.evaluation)
    metadata.update({f"evaluation/{k}": v for k, v in evaluated.items()})
    return dg.MaterializeResult(metadata=metadata)


@dg.asset(
    group_name=GROUP,
    deps=[fraud_model],
    description="The `champion` alias: moved to the challenger once the blocking check "
    "`challenger_beats_champion` on `fraud_model` has passed.",
)
def fraud_model_champion(home: HomeResource, mlflow: MlflowResource) -> dg.MaterializeResult:
    """Promote the challenger that passed the gate; nothing to do when there is none.

    Runs only when the blocking check passed (Dagster skips it otherwise). It promotes on the
    evaluation the check recorded, without evaluating again (`reevaluate=False`), and refuses if
    that was not an approval against the current champion (the champion moved in between, e.g.
    a rollback).
    """
    uri, name = mlflow.uri(home.home()), mlflow.model_name
    challenger = alias_version(uri, name, CHALLENGER)
    champion = alias_version(uri, name, CHAMPION)
    if challenger is None:
        return dg.MaterializeResult(
            metadata={
                "champion_version": champion or "-",
                "changed": False,
                "reason": "no challenger",
            }
        )
    decision = promote_if_better(uri, name, challenger, reevaluate=False)
    change = decision.change
    if change is None:  # not approved
        raise dg.Failure(
            description=f"challenger {challenger} has no approval against champion {champion}",
            metadata=evaluation_metadata(decision.evaluation),
        )
    return dg.MaterializeResult(
        metadata={
            "champion_version": change.version,
            "previous_champion": change.previous or "-",
            "changed": change.changed,
            "changed_at": change.at,
            **evaluation_metadata(decision.evaluation),
        }
    )


class RollbackConfig(dg.Config):
    to_version: str = Field(
        default="", description="Version to make champion again; empty: the previous champion"
    )


@dg.op(description="Move `champion` back to the previous champion (or to `to_version`).")
def rollback_fraud_model(
    context: dg.OpExecutionContext,
    config: RollbackConfig,
    home: HomeResource,
    mlflow: MlflowResource,
) -> None:
    """Undo a bad promotion without retraining; the scoring runs pick it up at the next batch."""
    change = rollback(mlflow.uri(home.home()), mlflow.model_name, config.to_version)
    context.log.info(f"champion {change.previous} -> {change.version} ({change.reason})")


@dg.job(description="Roll `champion` back (config `to_version`; default: the previous one).")
def rollback_fraud_model_job() -> None:
    """The rollback op as a job, so it can be launched from the UI or the CLI with config."""
    rollback_fraud_model()


retrain_job = dg.define_asset_job(
    "retrain_fraud_model_job",
    selection=dg.AssetSelection.assets(fraud_labels, fraud_model, fraud_model_champion),
    description="Reload labels, train a challenger, promote it if it passes the gate.",
)

retrain_fraud_model = dg.ScheduleDefinition(
    name="retrain_fraud_model",
    job=retrain_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily retrain on the feature log with the labels reported so far.",
)

defs = dg.Definitions(
    assets=[fraud_labels, fraud_model, fraud_model_champion],
    jobs=[retrain_job, rollback_fraud_model_job],
    schedules=[retrain_fraud_model],
)
