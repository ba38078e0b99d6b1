"""Point-in-time training data, a time-based holdout, and the fraud model itself.

Labels arrive days after the fact (a chargeback, a customer's call), so everything here is framed
around a cut-off, the "now" of the data: a label only exists if it was reported by then, and only
transactions old enough for their labels to have arrived are trained on. Otherwise the model
would learn "no label yet" as "legitimate" for the newest frauds.

`make_default_model` is the default model (gradient boosting and logistic regression averaged in
log-odds, `LogitBlend`); `CANDIDATES` adds each of them alone and a random forest, and
`select_model` ranks every (candidate, class weighting) on a time-later validation split.
`choose_threshold` turns validation scores into an alert threshold (F1 or a daily budget).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.ensemble import HistGradientBoostingClassifier, RandomForestClassifier
from sklearn.impute import SimpleImputer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.validation import check_is_fitted
from threadpoolctl import ThreadpoolController, threadpool_limits

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

# Why these defaults (of the gradient boosting, alone or in the default LogitBlend):
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


# The default model family (a key of CANDIDATES): see make_default_model and LogitBlend.
DEFAULT_CANDIDATE = "blend"


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


class FillEmptyColumns(TransformerMixin, BaseEstimator):
    """Columns with no value at all when fitted (NaN everywhere) are set to 0, then and later.

    A dataset without an optional field (no channel, no location) has its features NaN in every
    row; HistGradientBoosting refuses to bin a column with no value ("window shape cannot be
    larger than input array shape"). The model learns nothing from such a column either way, so
    a constant keeps the column order (and the MLflow signature) without changing any split.
    """

    def fit(self, x: Any, y: Any = None) -> FillEmptyColumns:
        self.empty_ = np.isnan(np.asarray(x, dtype=np.float64)).all(axis=0)
        return self

    def transform(self, x: Any) -> Any:
        check_is_fitted(self, "empty_")
        if not self.empty_.any():
            return x
        if isinstance(x, pd.DataFrame):
            out = x.copy()
            out.iloc[:, np.flatnonzero(self.empty_)] = 0.0
            return out
        values = np.array(x, dtype=np.float64)
        values[:, self.empty_] = 0.0
        return values


def make_pipeline(params: dict[str, Any] | None = None) -> Pipeline:
    """Gradient boosting on FEATURE_COLUMNS: `DEFAULT_PARAMS` updated with `params`.

    A Pipeline, so that preprocessing (today only `FillEmptyColumns`) or a different estimator
    can change without changing how models are trained, logged or loaded.
    """
    merged = {**DEFAULT_PARAMS, **(params or {})}
    if merged.get("early_stopping") and merged.get("scoring") not in (None, "loss"):
        raise ValueError(
            "early stopping with scoring="
            f"{merged['scoring']!r} cannot be saved with skops; use scoring='loss'"
        )
    return Pipeline(
        [("empty", FillEmptyColumns()), ("model", HistGradientBoostingClassifier(**merged))]
    )


def _finite(x: Any) -> Any:
    """±inf to NaN, so the imputer treats an unbounded ratio like a missing one."""
    values = np.asarray(x, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.nan)


# The logistic regression (baseline and blend member) is unweighted by default, like the
# gradient boosting: both fit the same log loss, so scores stay probabilities.
BASELINE_CLASS_WEIGHT: str | None = None


def make_baseline(params: dict[str, Any] | None = None) -> Pipeline:
    """Logistic regression on standardised features: the floor the default model must clear.

    NaN (the features' "unknown": no history yet, no location) is imputed with the median, and a
    missing-indicator column per feature keeps "unknown" visible to a linear model, which
    HistGradientBoosting gets for free. `params` go to the LogisticRegression.
    """
    estimator = {"class_weight": BASELINE_CLASS_WEIGHT, "max_iter": 2000, "C": 1.0}
    return Pipeline(
        [
            ("finite", FunctionTransformer(_finite)),
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("scale", StandardScaler()),
            ("model", LogisticRegression(**{**estimator, **(params or {})})),
        ]
    )


_EPS = 1e-9


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1.0 - _EPS)
    return np.asarray(np.log(p) - np.log1p(-p))


class LogitBlend(ClassifierMixin, BaseEstimator):
    """Gradient boosting and logistic regression fitted on the same rows, log-odds averaged.

    Why two models: trees are flat beyond the range they were trained on, a linear model keeps
    going. A terminal compromised harder than anything in the training week (known-fraud rate
    0.48 where training saw less), or a card-testing burst denser than any before, gets the tree
    model's score for the largest value it saw, but a higher one from the logistic regression;
    the trees in turn catch the interactions a linear model cannot (a large withdrawal *and* a
    low balance). Averaging log-odds (not probabilities) lets one confident member lift a row
    whose other member is unsure, and the result is still a probability-like score in (0, 1).
    Measured in the README's backtest (3 seeds x 3 windows): better average precision than
    either member alone in most windows, and than the baseline in all.

    `class_weight` is applied to both members' final estimators.
    """

    def __init__(
        self,
        boosting: Pipeline | None = None,
        linear: Pipeline | None = None,
        class_weight: str | None = None,
    ) -> None:
        self.boosting = boosting
        self.linear = linear
        self.class_weight = class_weight

    def fit(self, x: Any, y: Any) -> LogitBlend:
        members = [
            clone(self.boosting) if self.boosting is not None else make_pipeline(),
            clone(self.linear) if self.linear is not None else make_baseline(),
        ]
        for member in members:
            member.set_params(model__class_weight=self.class_weight)
            member.fit(x, y)
        self.boosting_, self.linear_ = members
        self.classes_ = self.boosting_.classes_
        return self

    def predict_proba(self, x: Any) -> np.ndarray:
        check_is_fitted(self, "classes_")
        logits = (
            _logit(self.boosting_.predict_proba(x)[:, 1])
            + _logit(self.linear_.predict_proba(x)[:, 1])
        ) / 2.0
        positive = 1.0 / (1.0 + np.exp(-logits))
        return np.column_stack([1.0 - positive, positive])

    def predict(self, x: Any) -> np.ndarray:
        return np.asarray(self.classes_[(self.predict_proba(x)[:, 1] >= 0.5).astype(int)])


def make_default_model(params: dict[str, Any] | None = None) -> Pipeline:
    """The default fraud model: `LogitBlend` of `make_pipeline(params)` and `make_baseline()`.

    `params` go to the gradient boosting (as for `make_pipeline`), except `class_weight`, which
    applies to both members.
    """
    params = dict(params or {})
    weight = params.pop("class_weight", None)
    blend = LogitBlend(make_pipeline(params), make_baseline(), class_weight=weight)
    return Pipeline([("model", blend)])


@cache
def _threadpools() -> ThreadpoolController:
    return ThreadpoolController()


def openmp_limit() -> Any:
    """A context in which scikit-learn's OpenMP loops use `OPENMP_THREADS` threads."""
    return _threadpools().limit(limits=OPENMP_THREADS, user_api="openmp")


def feature_matrix(features: pd.DataFrame) -> pd.DataFrame:
    """FEATURE_COLUMNS as float64, in training order: what the model is fitted and scored on."""
    return features[FEATURE_COLUMNS].astype(np.float64)


def arrow_feature_matrix(features: pa.Table) -> np.ndarray:
    """FEATURE_COLUMNS of an Arrow table as a float64 (rows, features) matrix; nulls are NaN.

    Built column by column from Arrow, no pandas round trip. Column-major (Fortran order), as
    `np.asarray(feature_matrix(frame))` is: the logistic regression's BLAS products can differ
    in the last bit between C and Fortran layouts, so the layout is what keeps the scores of
    the two paths bit-identical.
    """
    missing = [c for c in FEATURE_COLUMNS if c not in features.column_names]
    if missing:
        raise ValueError(f"features lack column(s): {', '.join(missing)}")
    out = np.empty((features.num_rows, len(FEATURE_COLUMNS)), dtype=np.float64, order="F")
    for j, name in enumerate(FEATURE_COLUMNS):
        column = features[name]
        if column.type != pa.float64():
            column = pc.cast(column, pa.float64())
        out[:, j] = column.to_numpy()  # a null becomes NaN, as in pandas
    return out


def _fitted_estimators(model: Any) -> Iterator[Any]:
    """`model` and every fitted estimator inside it (pipeline steps, `LogitBlend` members)."""
    todo = [model]
    while todo:
        estimator = todo.pop()
        yield estimator
        if isinstance(estimator, Pipeline):
            todo.extend(step for _, step in estimator.steps if hasattr(step, "__dict__"))
        elif isinstance(estimator, LogitBlend):
            fitted = vars(estimator)
            todo.extend(fitted[a] for a in ("boosting_", "linear_") if a in fitted)


def _check_feature_names(model: Any) -> None:
    """The check scikit-learn makes on a DataFrame, made once for a bare matrix.

    A model fitted on other columns (another feature version) must fail as it does on the
    pandas path, not score a matrix whose columns mean something else.
    """
    for estimator in _fitted_estimators(model):
        names = vars(estimator).get("feature_names_in_")  # vars: Pipeline's is a property
        if names is not None and list(names) != FEATURE_COLUMNS:
            differ = sorted(set(names) ^ set(FEATURE_COLUMNS))
            raise ValueError(
                f"{type(estimator).__name__} was fitted on other feature columns than "
                "FEATURE_COLUMNS (another feature version?): "
                + (f"{differ[:10]} differ" if differ else "the same ones in another order")
            )


def score(model: Any, features: pd.DataFrame | pa.Table) -> np.ndarray:
    """Fraud score per row in [0, 1]: predict_proba[:, 1] on FEATURE_COLUMNS.

    `features` is a pandas DataFrame or an Arrow table. An Arrow table is scored from a float64
    matrix built straight from its columns (`arrow_feature_matrix`), skipping the conversion of
    the whole table to pandas; the scores are bit-identical to the DataFrame's. The model is
    predicted once per call: a `LogitBlend` evaluates each member once.
    """
    if len(features) == 0:
        return np.zeros(0, dtype=np.float64)
    if isinstance(features, pa.Table):
        matrix = arrow_feature_matrix(features)
        _check_feature_names(model)
        with openmp_limit(), warnings.catch_warnings():
            # Names were checked above; without this, every fitted step warns on a bare matrix.
            warnings.filterwarnings(
                "ignore", "X does not have valid feature names", category=UserWarning
            )
            proba = model.predict_proba(matrix)
    else:
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
    candidate: str = DEFAULT_CANDIDATE  # the model family (a key of CANDIDATES)
    # Extra registry tags for the version (alert threshold, selection run, ...); strings only.
    tags: dict[str, str] = field(default_factory=dict)


def train(
    features: pd.DataFrame,
    labels: pd.DataFrame,
    cutoff: pd.Timestamp,
    label_delay: pd.Timedelta = DEFAULT_LABEL_DELAY,
    params: dict[str, Any] | None = None,
    holdout_fraction: float = 0.25,
    candidate: str = DEFAULT_CANDIDATE,
) -> TrainResult:
    """Fit on the earlier part of the labelled window, measure on the later part.

    The model is NOT refitted on train + holdout: the registered model is exactly the one the
    holdout metrics describe, and `promotion.promote_if_better` compares it with the champion on
    that same holdout, which a refitted model would have seen (it would always win). The newest
    labelled rows are not lost, only deferred: the next scheduled retrain trains on them.

    `candidate` names the model family (a key of `CANDIDATES`, e.g. the winner of `select_model`);
    `params` go to its final estimator (class_weight included).
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
    model = make_candidate(candidate, params)
    fit(model, train_part)
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
        candidate=candidate,
    )


# --------------------------------------------------------------------------- model selection

RF_PARAMS: dict[str, Any] = {
    # Modest for 2 shared cores: 60 trees of depth <= 12, one thread, fit ~54k rows (60 days of
    # 1,000 customers, selection split) in ~8 s; with 100 trees the 6-fit selection took ~30 s.
    "n_estimators": 60,
    "max_depth": 12,
    "min_samples_leaf": 5,
    "max_features": "sqrt",
    "n_jobs": 1,
    "random_state": RANDOM_STATE,
}


def make_random_forest(params: dict[str, Any] | None = None) -> Pipeline:
    """Median imputation (+ missing indicators, so "unknown" stays visible) and a random forest."""
    return Pipeline(
        [
            (
                "impute",
                SimpleImputer(strategy="median", add_indicator=True, keep_empty_features=True),
            ),
            ("model", RandomForestClassifier(**{**RF_PARAMS, **(params or {})})),
        ]
    )


# The model families `select_model` compares; each takes the final estimator's parameters.
CANDIDATES: dict[str, Callable[[dict[str, Any] | None], Pipeline]] = {
    DEFAULT_CANDIDATE: make_default_model,
    "hist_gradient_boosting": make_pipeline,
    "logistic_regression": make_baseline,
    "random_forest": make_random_forest,
}
# Class imbalance, compared deliberately for every candidate: unweighted (scores stay
# probabilities, see DEFAULT_PARAMS) vs "balanced" (each class weighs the same in the loss).
CLASS_WEIGHTS: tuple[str | None, ...] = (None, "balanced")


def make_candidate(name: str, params: dict[str, Any] | None = None) -> Pipeline:
    """An unfitted pipeline of the candidate family `name` (a key of CANDIDATES)."""
    if name not in CANDIDATES:
        raise ValueError(f"unknown candidate {name!r}; one of {', '.join(CANDIDATES)}")
    return CANDIDATES[name](params)


def fit(model: Pipeline, frame: pd.DataFrame) -> Pipeline:
    """Fit on FEATURE_COLUMNS -> label with one OpenMP and one BLAS thread (see OPENMP_THREADS)."""
    with openmp_limit(), threadpool_limits(limits=1, user_api="blas"):
        model.fit(feature_matrix(frame), frame["label"].to_numpy())
    return model


@dataclass
class CandidateResult:
    """One (candidate, class weighting) fitted on the earlier part and measured on the later."""

    candidate: str
    class_weight: str | None
    metrics: dict[str, float]  # on the validation split
    params: dict[str, Any]  # the final estimator's full parameters
    fit_seconds: float
    model: Pipeline | None = None

    @property
    def name(self) -> str:
        return f"{self.candidate}/{self.class_weight or 'unweighted'}"


@dataclass
class Selection:
    """Every (candidate, weighting) ranked by `metric` on the validation split, best first."""

    metric: str
    ranking: list[CandidateResult]
    n_train: int
    n_validation: int
    train_end: pd.Timestamp | None
    validation_start: pd.Timestamp | None
    validation_end: pd.Timestamp | None
    seconds: float = 0.0

    @property
    def winner(self) -> CandidateResult:
        return self.ranking[0]


def select_model(
    train_frame: pd.DataFrame,
    validation_frame: pd.DataFrame,
    metric: str = "average_precision",
    candidates: tuple[str, ...] | None = None,
    class_weights: tuple[str | None, ...] = CLASS_WEIGHTS,
) -> Selection:
    """Fit every (candidate, class weighting) on `train_frame`, rank them on `validation_frame`.

    Both are labelled frames (`training_frame` rows); the validation rows must all be later than
    the training rows (a time split such as `time_split`, never a random one: that would let a
    model see the future of a fraud wave it is measured on), else ValueError. No subsampling:
    the 6 fits of the single families took 3.5 s single-threaded on 14 labelled days of 1,000
    customers (18k rows) and 20 s on 53 days (72k rows); the blend adds one of each. A NaN metric
    (a class missing in validation) ranks last; ties keep the CANDIDATES order.
    """
    if len(train_frame) == 0 or train_frame["label"].nunique() < 2:
        raise ValueError("the selection's training split needs both fraud and legitimate labels")
    if len(validation_frame) == 0:
        raise ValueError("the selection's validation split is empty")
    train_end = _utc(_utc_series(train_frame["event_time"]).max())
    validation_start = _utc(_utc_series(validation_frame["event_time"]).min())
    if validation_start < train_end:
        raise ValueError(
            f"validation starts at {validation_start} before training ends at {train_end}: "
            "select on a time split (validation later than training)"
        )
    started = time.perf_counter()
    results: list[CandidateResult] = []
    for name in candidates or tuple(CANDIDATES):
        for weight in class_weights:
            t0 = time.perf_counter()
            model = fit(make_candidate(name, {"class_weight": weight}), train_frame)
            seconds = time.perf_counter() - t0
            results.append(
                CandidateResult(
                    candidate=name,
                    class_weight=weight,
                    metrics=evaluate(model, validation_frame),
                    params=model.named_steps["model"].get_params(),
                    fit_seconds=seconds,
                    model=model,
                )
            )

    def key(result: CandidateResult) -> float:
        value = result.metrics.get(metric, math.nan)
        return -value if value == value else math.inf

    ranking = sorted(results, key=key)  # stable: ties keep the order above
    return Selection(
        metric=metric,
        ranking=ranking,
        n_train=len(train_frame),
        n_validation=len(validation_frame),
        train_end=train_end,
        validation_start=validation_start,
        validation_end=_utc(_utc_series(validation_frame["event_time"]).max()),
        seconds=time.perf_counter() - started,
    )


# --------------------------------------------------------------------------- alert threshold

# None: the F1-optimal threshold on validation. A fixed budget (alerts/day) only makes sense
# relative to the traffic: 100/day is 6 % of the demo's 1,700 transactions a day.
DEFAULT_DAILY_BUDGET: int | None = None


def choose_threshold(
    scores: Any, labels: Any, event_times: Any, daily_budget: int | None = DEFAULT_DAILY_BUDGET
) -> float:
    """The score threshold (alert when score >= threshold) chosen on a validation period.

    With a `daily_budget`: the lowest threshold at which the period's scores would have raised at
    most `daily_budget` alerts per day on average, i.e. at most budget x days alerts in all, where
    days counts the UTC calendar days from the first to the last event (inclusive). It is the
    smallest validation score above the (budget x days + 1)-th highest, so tied scores never push
    the count over the budget; if every row fits in the budget, the lowest score. Labels are not
    used (the budget is analyst capacity, not a quality target).

    With `daily_budget=None`: the threshold maximising F1 on the validation labels (the score of
    the best point of the precision-recall curve); ValueError without both classes.

    Always in [0, 1]; NaN scores are ignored.
    """
    p = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if len(p) != len(y):
        raise ValueError(f"{len(p)} scores for {len(y)} labels")
    keep = ~np.isnan(p)
    p, y = p[keep], y[keep]
    if len(p) == 0:
        raise ValueError("no scores to choose a threshold from")
    if daily_budget is None:
        if not 0 < int(y.sum()) < len(y):
            raise ValueError("maximising F1 needs both fraud and legitimate labels")
        precision, recall, thresholds = precision_recall_curve(y, p)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(
                precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0
            )[:-1]
        return float(np.clip(thresholds[int(np.argmax(f1))], 0.0, 1.0))
    if daily_budget < 0:
        raise ValueError(f"daily_budget must be >= 0 or None, got {daily_budget}")
    times = pd.DatetimeIndex(_utc_series(pd.Series(np.asarray(event_times)[keep])))
    days = (times.max().normalize() - times.min().normalize()).days + 1
    allowed = int(daily_budget) * days
    ordered = np.sort(p)[::-1]
    if allowed >= len(ordered):
        return float(np.clip(ordered[-1], 0.0, 1.0))
    cut = ordered[allowed]  # the highest score that must not alert
    above = ordered[ordered > cut]
    threshold = above.min() if len(above) else np.nextafter(cut, np.inf)
    return float(np.clip(threshold, 0.0, 1.0))
