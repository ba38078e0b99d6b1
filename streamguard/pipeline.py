"""Wiring of the fraud job into the runtime: which tables, which runner, where labels come from.

The CLI, the Dagster assets, the demo and the benchmark all start jobs through these functions,
so there is one way to build a scoring runner.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.features import FEATURE_SCHEMA, replay
from models.job import FEATURES, LABELS, OUTPUTS, FraudScoringJob
from models.registry import (
    CHAMPION,
    MODEL_NAME,
    LoadedModel,
    log_and_register,
    promote_if_better,
)
from models.schema import LABEL_SCHEMA, TRANSACTION_SCHEMA
from models.training import time_split, train, training_frame
from streamguard.checkpoint import CHECKPOINT_SCHEMA, CHECKPOINT_TABLE
from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.runner import DEAD_LETTER_SCHEMA, DEAD_LETTER_TABLE, MicroBatchRunner
from streamguard.sources import Source

SCORING_JOB = "fraud_scoring"
MIN_FEATURE_LOG_ROWS = 5_000  # below this, training replays the history file instead


def ensure_tables(lake: Lake) -> None:
    """Create every table of the scoring job empty, so the catalog and readers see them."""
    for output in OUTPUTS:
        lake.ensure(output.name, output.schema)
    lake.ensure(DEAD_LETTER_TABLE, DEAD_LETTER_SCHEMA)
    lake.ensure(CHECKPOINT_TABLE, CHECKPOINT_SCHEMA)
    lake.ensure(LABELS, LABEL_SCHEMA)


def scoring_runner(
    lake: Lake,
    source: Source,
    tracking_uri: str | None,
    max_batch_records: int = 50_000,
    model_name: str = MODEL_NAME,
    alias: str = CHAMPION,
    model: LoadedModel | None = None,
    job: str = SCORING_JOB,
) -> MicroBatchRunner:
    """A runner that scores `source` with the model behind `alias` (or a given loaded model)."""
    ensure_tables(lake)
    processor = FraudScoringJob(tracking_uri, model_name, alias, model=model)
    return MicroBatchRunner(source, processor, lake, job, max_batch_records=max_batch_records)


def read_labels(path: Path) -> pa.Table:
    """Labels from a Parquet file, held to the label contract (clear error when they break it)."""
    table = pq.read_table(path)
    missing = [f.name for f in LABEL_SCHEMA if f.name not in table.column_names and not f.nullable]
    if missing:
        raise ValueError(f"{path}: labels lack required column(s) {', '.join(missing)}")
    if "fraud_scenario" not in table.column_names:
        table = table.append_column("fraud_scenario", pa.nulls(table.num_rows, pa.string()))
    return table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)


def load_labels(lake: Lake, labels: pa.Table) -> int:
    """Upsert labels by transaction id: loading the same file twice changes nothing."""
    lake.ensure(LABELS, LABEL_SCHEMA)
    if labels.num_rows:
        lake.upsert(LABELS, labels.cast(LABEL_SCHEMA), ["transaction_id"])
    return labels.num_rows


@dataclass
class TrainingOutcome:
    version: str
    promoted: bool
    metrics: dict[str, float]
    champion_metric: float | None
    champion_before: str | None
    n_train: int
    n_holdout: int
    cutoff: datetime
    source: str  # "history replay" or "feature log"

    def summary(self) -> str:
        verdict = "promoted to champion" if self.promoted else "kept as a candidate"
        metrics = ", ".join(
            f"{k} {self.metrics[k]:.4f}"
            for k in ("roc_auc", "average_precision")
            if k in self.metrics
        )
        return (
            f"fraud_model version {self.version} ({verdict}); trained on {self.n_train:,} rows "
            f"from the {self.source} up to {self.cutoff:%Y-%m-%d}; "
            f"holdout {self.n_holdout:,} rows: {metrics}"
        )


def training_features(
    lake: Lake,
    history: Path | None,
    train_days: int | None,
    min_log_rows: int = MIN_FEATURE_LOG_ROWS,
) -> tuple[pd.DataFrame, datetime, str]:
    """Point-in-time features to train on, and the cut-off ("now" of the data).

    The feature log holds the features exactly as they were scored; without enough of it, the
    history file is replayed through the same feature function (labels only as then reported).
    """
    labels = lake.read(LABELS, schema=LABEL_SCHEMA)
    if history is None and lake.count(FEATURES) >= min_log_rows:
        features = lake.read(FEATURES, columns=FEATURE_SCHEMA.names)
        end = pc.max(features["event_time"]).as_py()
        if train_days:
            start = pc.min(features["event_time"]).as_py()
            end = min(end, start + timedelta(days=train_days))
            features = features.filter(pc.less(features["event_time"], end))
        return features.to_pandas(), end, "feature log"
    if history is None:
        raise ValueError(
            f"the feature log has {lake.count(FEATURES):,} rows (< {min_log_rows:,}) and no "
            "history file was given to replay"
        )
    if not history.is_file():
        raise FileNotFoundError(f"no such history file: {history}")
    transactions = pq.read_table(history).select(TRANSACTION_SCHEMA.names).cast(TRANSACTION_SCHEMA)
    start = pc.min(transactions["event_time"]).as_py()
    end = pc.max(transactions["event_time"]).as_py()
    if train_days:
        end = min(end, start + timedelta(days=train_days))
        transactions = transactions.filter(pc.less(transactions["event_time"], end))
    known = labels.filter(pc.less_equal(labels["reported_at"], end))
    return replay(transactions, known).features.to_pandas(), end, "history replay"


def train_and_promote(
    home: Home,
    history: Path | None = None,
    labels: Path | None = None,
    train_days: int | None = None,
    label_delay_days: int = 7,
) -> TrainingOutcome:
    """Train on point-in-time features, register the model, move `champion` if it is better."""
    lake = Lake(home.lake)
    if labels is not None:
        load_labels(lake, read_labels(labels))
    features, cutoff, source = training_features(lake, history, train_days)
    label_table = lake.read(LABELS, schema=LABEL_SCHEMA).to_pandas()
    frame = training_frame(
        features, label_table, pd.Timestamp(cutoff), pd.Timedelta(days=label_delay_days)
    )
    if frame["label"].sum() == 0:
        raise ValueError(f"no fraud label reported by {cutoff:%Y-%m-%d} in the training window")
    result = train(features, label_table, pd.Timestamp(cutoff), pd.Timedelta(days=label_delay_days))
    version = log_and_register(result, home.mlflow_tracking_uri, home.mlflow_artifacts)
    _, holdout = time_split(frame)
    decision = promote_if_better(home.mlflow_tracking_uri, MODEL_NAME, version, holdout)
    return TrainingOutcome(
        version=version,
        promoted=decision.promoted,
        metrics={k: float(v) for k, v in result.metrics.items()},
        champion_metric=decision.champion_metric,
        champion_before=decision.champion_version_before,
        n_train=result.n_train,
        n_holdout=result.n_holdout,
        cutoff=cutoff,
        source=source,
    )
