"""Fraud labels and the fraud model: training, registration, promotion, and the retrain schedule."""

from pathlib import Path

import dagster as dg
from pydantic import Field

from assets.resources import HomeResource
from models.job import FEATURES
from streamguard.pipeline import (
    MIN_FEATURE_LOG_ROWS,
    load_labels,
    read_labels,
    train_and_promote,
)

GROUP = "fraud_model"


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


@dg.asset(
    group_name=GROUP,
    deps=[fraud_labels],
    description="The registered scikit-learn fraud model; `champion` moves only when it is better.",
)
def fraud_model(config: TrainingConfig, home: HomeResource) -> dg.MaterializeResult:
    """Train on point-in-time features, register in MLflow, promote on a time-based holdout."""
    place = home.home()
    history = (
        Path(config.history_path) if config.history_path else place.data / "transactions.parquet"
    )
    use_log = config.use_feature_log and home.lake().count(FEATURES) >= MIN_FEATURE_LOG_ROWS
    outcome = train_and_promote(
        place,
        history=None if use_log else history,
        train_days=config.train_days or None,
        label_delay_days=config.label_delay_days,
    )
    metadata: dict[str, dg.RawMetadataValue] = {
        "model_version": outcome.version,
        "promoted": outcome.promoted,
        "champion_before": outcome.champion_before or "-",
        "n_train": outcome.n_train,
        "n_holdout": outcome.n_holdout,
        "cutoff": outcome.cutoff.isoformat(),
        "source": outcome.source,
    }
    metadata.update({k: float(v) for k, v in outcome.metrics.items()})
    return dg.MaterializeResult(metadata=metadata)


retrain_job = dg.define_asset_job(
    "retrain_fraud_model_job",
    selection=dg.AssetSelection.assets(fraud_labels, fraud_model),
    description="Reload labels and retrain the fraud model.",
)

retrain_fraud_model = dg.ScheduleDefinition(
    name="retrain_fraud_model",
    job=retrain_job,
    cron_schedule="0 3 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily retrain on the feature log with the labels reported so far.",
)

defs = dg.Definitions(
    assets=[fraud_labels, fraud_model], jobs=[retrain_job], schedules=[retrain_fraud_model]
)
