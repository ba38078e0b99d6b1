"""Point-in-time training data, a time-based holdout, and the fraud model itself.

Labels arrive days after the fact (a chargeback, a customer's call), so everything here is framed
around a cut-off, the "now" of the data: a label only exists if it was reported by then, and only
transactions old enough for their labels to have arrived are trained on. Otherwise the model
would learn "no label yet" as "legitimate" for the newest frauds.

Hyper-parameter search, backtests and other model families are later work: `make_pipeline` takes
the parameters, `train` the splitting, so those can be layered on without changing callers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, roc_auc_score
from sklearn.pipeline import Pipeline
from threadpoolctl import ThreadpoolController

from models.features import FEATURE_COLUMNS, KEY_COLUMNS

DEFAULT_LABEL_DELAY = pd.Timedelta(days=7)
RANDOM_STATE = 0
# OpenMP threads for fitting and scoring. HistGradientBoosting runs many short parallel regions
# per boosting iteration; when other processes hold the CPUs (Dagster, Kinesis, the scoring
# runner share the machine), a descheduled thread stalls the others at every barrier. Measured on
# 2 CPUs under load: a fit of 0.5 s took 101 s, one of 10 s took 132 s, with 2 threads; with 1
# thread they took 0.5 s and 9-10 s. Idle, 2 threads fitted no faster and scored 100k rows in
# 0.6 s instead of 0.9 s.
OPENMP_THREADS = 1

# Why these defaults:
# - HistGradientBoosting handles the NaN the features use for "unknown" natively (it learns
#   which side of each split missing values go), so there is no imputation step to keep in sync.
# - Class imbalance (fraud is ~0.5-1% of rows) is handled in the metric and the threshold, not in
#   the loss: class_weight=None. Measured on a 60-day, 3,000-customer simulation (holdout 96k
#   rows, 0.47% fraud), "balanced" weights gave the same ranking (AP 0.718 vs 0.735, AUC 0.995 vs
#   0.995) but scores that are no longer probabilities: at the AlertPolicy threshold 0.5 it raised
#   3,070 alerts at precision 0.14 (recall 0.96) against 404 at precision 0.76 (recall 0.68)
#   unweighted. Balanced weights move the score by the training base rate (0.5 means
#   P(fraud) = base rate), which drifts between retrains, so a fixed threshold would change
#   meaning at every retrain. Unweighted, the score is P(fraud) and the thresholds in
#   `models.rules.AlertPolicy` are probabilities. Promotion compares average precision, which
#   weighting does not help. Pass {"class_weight": "balanced"} to trade precision for recall.
# - Early stopping on a 10% validation split with the loss as score (a scorer string such as
#   "average_precision" stores a bound method that skops cannot serialise; RecursionError).
#   Patience 20 and some regularisation: sklearn's defaults (patience 10, none) stopped after 13
#   iterations on that simulation (AP 0.58); these ran ~200 (AP 0.735).
DEFAULT_PARAMS: dict[str, Any] = {
    "learning_rate": 0.1,
    "max_iter": 300,
    "max_leaf_nodes": 31,
    "min_samples_leaf": 40,
    "l2_regularization": 1.0,
    "class_weight": None,
    "early_stopping": True,
    "validation_fraction": 0.1,
    "n_iter_no_change": 20,
    "scoring": "loss",
    "random_state": RANDOM_STATE,
}


def _utc(moment: Any) -> pd.Timestamp:
    """A UTC timestamp; a naive one is taken to be UTC already (as every time in the lake is)."""
    ts = pd.Timestamp(moment)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _utc_series(values: pd.Series) -> pd.Series:
    times = pd.to_datetime(values)
    if getattr(times.dt, "tz", None) is None:
        return times.dt.tz_localize("UTC")
    return times.dt.tz_convert("UTC")


def label_frame(keys: pd.DataFrame, labels: pd.DataFrame, cutoff: pd.Timestamp) -> pd.Series:
    """1 where the transaction was known to be fraud at `cutoff`, else 0; aligned with `keys`.

    Point in time: a label reported after the cut-off does not exist yet. If a transaction has
    several labels (e.g. reported as fraud, later cleared), the latest one reported by the
    cut-off decides.
    """
    cutoff = _utc(cutoff)
    known = labels.loc[
        _utc_series(labels["reported_at"]) <= cutoff, ["transaction_id", "is_fraud", "reported_at"]
    ]
    latest = known.sort_values("reported_at", kind="stable").drop_duplicates(
        "transaction_id", keep="last"
    )
    fraud_ids = latest.loc[latest["is_fraud"].astype(bool), "transaction_id"]
    is_fraud = keys["transaction_id"].isin(fraud_ids).astype(np.int64)
    return is_fraud.rename("label")


def training_frame(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    cutoff: pd.Timestamp,
    label_delay: pd.Timedelta = DEFAULT_LABEL_DELAY,
) -> pd.DataFrame:
    """Feature rows old enough to be labelled (event_time <= cutoff - label_delay), with `label`.

    Sorted by event time, index reset. The delay is the price of honest labels: a week-old
    transaction has had most of its chargeback window, a minute-old one none.
    """
    cutoff = _utc(cutoff)
    if label_delay < pd.Timedelta(0):
        raise ValueError(f"label_delay must be >= 0, got {label_delay}")
    missing = [c for c in [*KEY_COLUMNS, *FEATURE_COLUMNS] if c not in features.columns]
    if missing:
        raise ValueError(f"features lack column(s): {', '.join(missing)}")
    times = _utc_series(features["event_time"])
    frame = features.loc[times <= cutoff - label_delay, [*KEY_COLUMNS, *FEATURE_COLUMNS]]
    frame = frame.sort_values("event_time", kind="stable").reset_index(drop=True)
    frame["label"] = label_frame(frame, labels, cutoff).to_numpy()
    return frame


def time_split(
    frame: pd.DataFrame, holdout_fraction: float = 0.25
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, holdout): the latest ~`holdout_fraction` of rows by event time are held out.

    Never random: a random split lets the model see the future of a fraud wave it is scored on.
    Rows sharing the boundary timestamp all go to the holdout, so no instant is on both sides.
    """
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ordered = frame.sort_values("event_time", kind="stable")
    n = len(ordered)
    if n == 0:
        return ordered, ordered
    n_holdout = max(1, math.ceil(n * holdout_fraction))
    times = ordered["event_time"]
    boundary = times.iloc[n - n_holdout]
    in_holdout = (times >= boundary).to_numpy()
    return ordered.loc[~in_holdout], ordered.loc[in_holdout]


def make_pipeline(params: dict[str, Any] | None = None) -> Pipeline:
    """The fraud model on FEATURE_COLUMNS: `DEFAULT_PARAMS` updated with `params`.

    A Pipeline (one step today) so preprocessing or a different estimator can be added later
    without changing how models are trained, logged or loaded.
    """
    merged = {**DEFAULT_PARAMS, **(params or {})}
    if merged.get("early_stopping") and merged.get("scoring") not in (None, "loss"):
        raise ValueError(
            "early stopping with scoring="
            f"{merged['scoring']!r} cannot be saved with skops; use scoring='loss'"
        )
    return Pipeline([("model", HistGradientBoostingClassifier(**merged))])


@cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def openmp_limit() -> Any:
    """A context in which scikit-learn's OpenMP loops use `OPENMP_THREADS` threads."""
    return _threadpools().limit(limits=OPENMP_THREADS, user_api="openmp")


def feature_matrix(features: pd.DataFrame) -> pd.DataFrame:
    """FEATURE_COLUMNS as float64, in training order: what the model is fitted and scored on."""
    return features[FEATURE_COLUMNS].astype(np.float64)


def score(model: Any, features: pd.DataFrame) -> np.ndarray:
    """Fraud score per row in [0, 1]: predict_proba[:, 1] on FEATURE_COLUMNS."""
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    with openmp_limit():
        proba = model.predict_proba(feature_matrix(features))
    return np.asarray(proba[:, 1], dtype=np.float64)


def evaluate(model: Any, frame: pd.DataFrame) -> dict[str, float]:
    """Ranking metrics on a labelled frame; NaN (not an error) when a class is missing.

    Average precision is the headline metric: with ~1% fraud, ROC AUC stays high for models an
    analyst would find useless, while average precision tracks the quality of the alert queue.
    """
    y = np.asarray(frame["label"], dtype=np.int64)
    n, n_pos = len(y), int(y.sum())
    metrics = {
        "roc_auc": math.nan,
        "average_precision": math.nan,
        "n_rows": float(n),
        "n_positive": float(n_pos),
        "positive_rate": n_pos / n if n else math.nan,
    }
    if 0 < n_pos < n:
        p = score(model, frame)
        metrics["roc_auc"] = float(roc_auc_score(y, p))
        metrics["average_precision"] = float(average_precision_score(y, p))
    return metrics


@dataclass
class TrainResult:
    """A fitted model with what it was trained on and how it did on the later holdout."""

    model: Pipeline
    metrics: dict[str, float]  # on the holdout
    params: dict[str, Any]  # the estimator's full parameters
    n_train: int
    n_holdout: int
    train_start: pd.Timestamp  # first event time trained on
    train_end: pd.Timestamp  # last event time trained on
    cutoff: pd.Timestamp  # the "now" of the labels
    label_delay: pd.Timedelta = DEFAULT_LABEL_DELAY
    holdout_start: pd.Timestamp | None = None
    holdout_end: pd.Timestamp | None = None
    sample: pd.DataFrame | None = None  # a few training rows: MLflow signature and input example


def train(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    cutoff: pd.Timestamp,
    label_delay: pd.Timedelta = DEFAULT_LABEL_DELAY,
    params: dict[str, Any] | None = None,
    holdout_fraction: float = 0.25,
) -> TrainResult:
    """Fit on the earlier part of the labelled window, measure on the later part.

    The model is NOT refitted on train + holdout: the registered model is exactly the one the
    holdout metrics describe, and `registry.promote_if_better` compares it with the champion on
    that same holdout, which a refitted model would have seen (it would always win). The newest
    labelled rows are not lost, only deferred: the next scheduled retrain trains on them.
    """
    cutoff = _utc(cutoff)
    frame = training_frame(features, labels, cutoff, label_delay)
    train_part, holdout = time_split(frame, holdout_fraction)
    if len(train_part) == 0 or train_part["label"].nunique() < 2:
        raise ValueError(
            f"the training split ({len(train_part):,} rows up to "
            f"{cutoff - label_delay:%Y-%m-%d %H:%M}) needs both fraud and legitimate labels, "
            f"has {int(train_part['label'].sum()) if len(train_part) else 0} fraud"
        )
    model = make_pipeline(params)
    with openmp_limit():
        model.fit(feature_matrix(train_part), train_part["label"].to_numpy())
    times = train_part["event_time"]
    return TrainResult(
        model=model,
        metrics=evaluate(model, holdout),
        params=model.named_steps["model"].get_params(),
        n_train=len(train_part),
        n_holdout=len(holdout),
        train_start=_utc(times.iloc[0]),
        train_end=_utc(times.iloc[-1]),
        cutoff=cutoff,
        label_delay=label_delay,
        holdout_start=_utc(holdout["event_time"].iloc[0]) if len(holdout) else None,
        holdout_end=_utc(holdout["event_time"].iloc[-1]) if len(holdout) else None,
        sample=feature_matrix(train_part.sample(n=min(10, len(train_part)), random_state=0)),
    )
