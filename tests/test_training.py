"""Point-in-time labels, the label delay, the time split, and the model on learnable data."""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline

from models.features import FEATURE_COLUMNS, KEY_COLUMNS
from models.training import (
    DEFAULT_CANDIDATE,
    MIN_CALIBRATION_ROWS,
    LogitBlend,
    PlattCalibrated,
    TrainResult,
    arrow_feature_matrix,
    evaluate,
    feature_matrix,
    fit,
    label_frame,
    make_baseline,
    make_candidate,
    make_default_model,
    make_pipeline,
    score,
    time_split,
    train,
    training_frame,
)

T0 = pd.Timestamp("2026-01-01", tz="UTC")
DAY = pd.Timedelta(days=1)


def synthetic(
    n: int = 6000, days: int = 40, fraud_rate: float = 0.05, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature rows (KEY_COLUMNS + FEATURE_COLUMNS) whose fraud is learnable, and their labels.

    Fraud drains the balance, happens in new places and at terminals with reported fraud; every
    signal overlaps legitimate rows, and some features are NaN (unknown), as in the real stream.
    """
    rng = np.random.default_rng(seed)
    seconds = np.sort(rng.uniform(0, days * 86_400, n))
    times = (T0 + pd.to_timedelta(seconds, unit="s")).as_unit("us")
    fraud = rng.random(n) < fraud_rate
    cols = {c: rng.normal(size=n) for c in FEATURE_COLUMNS}
    cols["amount"] = np.where(fraud, rng.lognormal(4.3, 1.0, n), rng.lognormal(3.5, 1.0, n))
    cols["is_debit"] = (rng.random(n) < np.where(fraud, 0.98, 0.8)).astype(float)
    cols["balance_before"] = np.where(fraud, rng.uniform(50, 2000, n), rng.uniform(100, 5000, n))
    cols["amount_balance_ratio"] = cols["amount"] / np.maximum(cols["balance_before"], 1.0)
    cols["location_seen_before"] = (rng.random(n) > np.where(fraud, 0.35, 0.1)).astype(float)
    cols["terminal_fraud_rate_7d"] = np.clip(
        np.where(fraud, rng.beta(1, 25, n), rng.beta(1, 60, n)), 0, 1
    )
    cols["count_1h"] = rng.poisson(np.where(fraud, 1.0, 0.4)).astype(float)
    for name, share in [("location_seen_before", 0.2), ("seconds_since_prev", 0.1)]:
        cols[name][rng.random(n) < share] = np.nan
    cols["mean_amount_30d"][:50] = np.nan  # first transactions: no history yet
    features = pd.DataFrame(
        {
            "transaction_id": [f"tx{i:06d}" for i in range(n)],
            "event_time": times,
            "customer_id": [f"C{i % 300:04d}" for i in range(n)],
            "terminal_id": [f"T{i % 97:03d}" for i in range(n)],
            **{c: cols[c].astype(np.float64) for c in FEATURE_COLUMNS},
        }
    )
    delay = pd.to_timedelta(rng.uniform(0.1, 6.0, int(fraud.sum())) * 86_400, unit="s")
    labels = pd.DataFrame(
        {
            "transaction_id": features["transaction_id"][fraud].to_numpy(),
            "is_fraud": True,
            "reported_at": (times[fraud] + delay).as_unit("us"),
            "fraud_scenario": "synthetic",
        }
    )
    return features, labels


def labels_of(*rows: tuple[str, bool, pd.Timestamp]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "transaction_id": [r[0] for r in rows],
            "is_fraud": [r[1] for r in rows],
            "reported_at": pd.DatetimeIndex([r[2] for r in rows]).as_unit("us"),
            "fraud_scenario": [None] * len(rows),
        }
    )


def test_label_frame_is_point_in_time() -> None:
    cutoff = T0 + 10 * DAY
    keys = pd.DataFrame(
        {
            "transaction_id": [
                "early",
                "late",
                "at_cutoff",
                "unlabelled",
                "cleared",
                "cleared_late",
            ],
            "event_time": [T0] * 6,
        },
        index=[5, 4, 3, 2, 1, 0],
    )
    labels = labels_of(
        ("early", True, T0 + 2 * DAY),
        ("late", True, cutoff + pd.Timedelta(seconds=1)),  # not known yet at the cut-off
        ("at_cutoff", True, cutoff),  # reported exactly at the cut-off counts
        ("cleared", True, T0 + DAY),
        ("cleared", False, T0 + 3 * DAY),  # the latest label by the cut-off decides
        ("cleared_late", True, T0 + DAY),
        ("cleared_late", False, cutoff + DAY),
        ("someone_else", True, T0),
    )
    y = label_frame(keys, labels, cutoff)
    assert list(y.index) == list(keys.index)
    assert y.dtype == np.int64
    assert y.tolist() == [1, 0, 1, 0, 0, 1]
    # A naive cut-off is read as UTC, like every time in the lake.
    naive = label_frame(keys, labels, pd.Timestamp("2026-01-11"))
    assert naive.tolist() == y.tolist()
    # Later, the late label exists.
    assert label_frame(keys, labels, cutoff + 2 * DAY).tolist() == [1, 1, 1, 0, 0, 0]


def test_training_frame_respects_the_label_delay() -> None:
    features, labels = synthetic(n=2000, days=30)
    cutoff = T0 + 30 * DAY
    frame = training_frame(features, labels, cutoff, pd.Timedelta(days=7))
    assert frame["event_time"].max() <= cutoff - 7 * DAY
    assert frame["event_time"].is_monotonic_increasing
    expected = features["event_time"] <= cutoff - 7 * DAY
    assert len(frame) == int(expected.sum())
    assert list(frame.columns) == [*KEY_COLUMNS, *FEATURE_COLUMNS, "label"]
    assert set(frame["label"].unique()) <= {0, 1}
    known = labels.loc[labels["reported_at"] <= cutoff, "transaction_id"]
    assert frame["label"].sum() == frame["transaction_id"].isin(known).sum()

    shorter = training_frame(features, labels, cutoff, pd.Timedelta(days=1))
    assert len(shorter) > len(frame)
    # The row exactly at cutoff - delay is in, one microsecond later is out.
    edge = features.iloc[[100, 101]].copy()
    edge_cutoff = edge["event_time"].iloc[0] + 7 * DAY
    kept = training_frame(edge, labels, edge_cutoff)
    assert kept["transaction_id"].tolist() == [edge["transaction_id"].iloc[0]]


def test_training_frame_leaks_no_future_label() -> None:
    features, labels = synthetic(n=2000, days=30)
    cutoff = T0 + 20 * DAY
    frame = training_frame(features, labels, cutoff, pd.Timedelta(days=2))
    reported_late = labels.loc[labels["reported_at"] > cutoff, "transaction_id"]
    in_window_late = frame["transaction_id"].isin(reported_late)
    assert in_window_late.any()  # the synthetic delays straddle the cut-off
    assert (frame.loc[in_window_late, "label"] == 0).all()


def test_time_split_is_by_event_time() -> None:
    features, labels = synthetic(n=1000, days=10)
    frame = training_frame(features, labels, T0 + 20 * DAY)
    shuffled = frame.sample(frac=1.0, random_state=1)
    train_part, holdout = time_split(shuffled, holdout_fraction=0.25)
    assert len(train_part) + len(holdout) == len(frame)
    assert train_part["event_time"].max() < holdout["event_time"].min()
    assert len(holdout) == math.ceil(0.25 * len(frame))
    assert train_part["event_time"].is_monotonic_increasing

    ties = pd.DataFrame(
        {"event_time": [T0, T0 + DAY, T0 + DAY, T0 + DAY, T0 + 2 * DAY], "label": [0] * 5}
    )
    tr, ho = time_split(ties, holdout_fraction=0.5)  # boundary instant goes wholly to holdout
    assert len(tr) == 1 and len(ho) == 4
    with pytest.raises(ValueError):
        time_split(frame, holdout_fraction=1.0)


def test_make_pipeline_defaults_and_overrides() -> None:
    model = make_pipeline().named_steps["model"]
    assert model.random_state == 0 and model.class_weight is None
    tuned = make_pipeline({"max_iter": 7, "class_weight": "balanced"}).named_steps["model"]
    assert tuned.max_iter == 7 and tuned.class_weight == "balanced" and tuned.random_state == 0
    with pytest.raises(ValueError, match="skops"):
        make_pipeline({"scoring": "average_precision"})


def test_logit_blend_averages_the_members_log_odds() -> None:
    features, labels = synthetic()
    frame = training_frame(features, labels, T0 + 45 * DAY, pd.Timedelta(days=7))
    blend = fit(make_default_model({"max_iter": 20, "class_weight": "balanced"}), frame)
    inner = blend.named_steps["model"]
    assert isinstance(inner, LogitBlend)
    # class_weight reaches both members; the other params only the boosting.
    assert inner.boosting_.named_steps["model"].max_iter == 20
    for member in (inner.boosting_, inner.linear_):
        assert member.named_steps["model"].class_weight == "balanced"
    x = feature_matrix(frame)
    b = inner.boosting_.predict_proba(x)[:, 1]
    lr = inner.linear_.predict_proba(x)[:, 1]

    def logit(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-9, 1 - 1e-9)
        return np.log(p / (1 - p))

    expected = 1 / (1 + np.exp(-(logit(b) + logit(lr)) / 2))
    got = score(blend, frame)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-12)
    assert ((got >= 0) & (got <= 1)).all()
    # Between the members, row by row (the mean of two log-odds lies between them).
    assert (got >= np.minimum(b, lr) - 1e-12).all() and (got <= np.maximum(b, lr) + 1e-12).all()
    np.testing.assert_array_equal(inner.predict(x), (got >= 0.5).astype(int))
    assert list(inner.classes_) == [0, 1]


def test_train_and_evaluate_on_learnable_data() -> None:
    features, labels = synthetic()
    cutoff = T0 + 45 * DAY
    result = train(features, labels, cutoff, pd.Timedelta(days=7))
    assert isinstance(result, TrainResult)
    frame = training_frame(features, labels, cutoff, pd.Timedelta(days=7))
    assert result.n_train + result.n_holdout == len(frame)
    assert result.train_start == frame["event_time"].iloc[0]
    assert result.holdout_start is not None and result.train_end < result.holdout_start
    assert result.cutoff == cutoff
    assert result.candidate == DEFAULT_CANDIDATE
    assert result.params["boosting__model__random_state"] == 0
    assert result.params["class_weight"] is None
    assert result.sample is not None and list(result.sample.columns) == FEATURE_COLUMNS
    print(f"holdout metrics: {result.metrics}")
    assert result.metrics["roc_auc"] > 0.8
    assert result.metrics["average_precision"] > 0.3
    assert result.metrics["n_rows"] == result.n_holdout
    assert 0 < result.metrics["positive_rate"] < 0.2

    _, holdout = time_split(frame)
    p = score(result.model, holdout)
    assert p.shape == (len(holdout),) and ((p >= 0) & (p <= 1)).all()
    # Deterministic: the same data and parameters give the same model.
    again = train(features, labels, cutoff, pd.Timedelta(days=7))
    assert np.array_equal(score(again.model, holdout), p)


def test_the_default_model_is_calibrated_so_a_score_keeps_its_meaning_across_retrains() -> None:
    """Class weights move a raw score's level by the training base rate; the Platt map (fitted
    out of sample on the split's later quarter) brings both versions back to the fraud rate,
    without changing the ranking (holdout AP/AUC are the unwrapped model's)."""
    features, labels = synthetic()
    cutoff, delay = T0 + 45 * DAY, pd.Timedelta(days=7)
    _, holdout = time_split(training_frame(features, labels, cutoff, delay))
    rate = holdout["label"].mean()
    raw, calibrated = {}, {}
    for weight in (None, "balanced"):
        result = train(features, labels, cutoff, delay, params={"class_weight": weight})
        wrapped = result.model.named_steps["model"]
        assert isinstance(wrapped, PlattCalibrated)
        assert result.tags["calibration"] == "platt"
        assert result.tags["calibration_end"] < result.holdout_start.isoformat()
        assert result.params["calibration_slope"] == wrapped.slope_ > 0
        assert result.params["class_weight"] == weight
        unwrapped = evaluate(wrapped.model, holdout)
        assert result.metrics["average_precision"] == pytest.approx(
            unwrapped["average_precision"], abs=1e-12
        )
        assert result.metrics["roc_auc"] == pytest.approx(unwrapped["roc_auc"], abs=1e-12)
        raw[weight] = score(wrapped.model, holdout).mean()
        calibrated[weight] = score(result.model, holdout).mean()
    print(f"fraud rate {rate:.3f}; mean raw {raw}; mean calibrated {calibrated}")
    assert raw["balanced"] > 3 * raw[None]  # the raw level moved with the weighting
    for weight, mean in calibrated.items():
        assert rate / 1.6 < mean < rate * 1.6, weight
    assert abs(calibrated["balanced"] - calibrated[None]) < 0.5 * rate


@pytest.mark.parametrize("kept", [0, MIN_CALIBRATION_ROWS - 1])
def test_with_too_few_frauds_in_the_calibration_period_the_model_stays_raw(kept: int) -> None:
    features, labels = synthetic(n=3000, days=20)
    cutoff, delay = T0 + 20 * DAY, pd.Timedelta(days=2)
    frame = training_frame(features, labels, cutoff, delay)
    train_part, _ = time_split(frame)
    _, validation = time_split(train_part)
    # Only `kept` frauds reported for the calibration quarter's transactions.
    late = labels["transaction_id"].isin(validation["transaction_id"]) & labels["is_fraud"]
    dropped = labels.index[late][kept:]
    result = train(features, labels.drop(index=dropped), cutoff, delay)
    assert not isinstance(result.model.named_steps["model"], PlattCalibrated)
    assert result.tags["calibration"] == (
        f"skipped: the fit or validation part has {kept} fraud or legitimate rows "
        f"(< {MIN_CALIBRATION_ROWS})"
    )


def test_evaluate_is_robust_to_a_missing_class() -> None:
    features, labels = synthetic(n=3000, days=20)
    result = train(features, labels, T0 + 20 * DAY, pd.Timedelta(days=2))
    frame = training_frame(features, labels, T0 + 20 * DAY, pd.Timedelta(days=2))
    only_legit = frame[frame["label"] == 0]
    metrics = evaluate(result.model, only_legit)
    assert math.isnan(metrics["roc_auc"]) and math.isnan(metrics["average_precision"])
    assert metrics["n_positive"] == 0 and metrics["positive_rate"] == 0
    empty = evaluate(result.model, frame.iloc[:0])
    assert empty["n_rows"] == 0 and math.isnan(empty["positive_rate"])
    assert score(result.model, frame.iloc[:0]).shape == (0,)


def test_train_refuses_a_split_without_fraud() -> None:
    features, labels = synthetic(n=500, days=10)
    with pytest.raises(ValueError, match="both fraud and legitimate"):
        train(features, labels.iloc[:0], T0 + 20 * DAY)


# --------------------------------------------------------------------------- scoring from Arrow


def arrow_features(frame: pd.DataFrame, infinite: bool = True) -> pa.Table:
    """Feature rows as the job holds them: Arrow, several chunks, real nulls next to NaN (and
    ±inf unless not `infinite`: a random forest refuses them), an integer count column."""
    table = pa.Table.from_pandas(frame[[*KEY_COLUMNS, *FEATURE_COLUMNS]], preserve_index=False)
    n = table.num_rows
    rng = np.random.default_rng(5)
    ratio = table["amount_balance_ratio"].to_numpy().copy()
    ratio[rng.random(n) < 0.05] = np.nan  # a NaN value, not a null
    ratio[:3] = [np.inf, -np.inf, np.nan] if infinite else [np.nan] * 3
    table = table.set_column(
        table.schema.get_field_index("amount_balance_ratio"),
        "amount_balance_ratio",
        pa.array(ratio, pa.float64(), from_pandas=False),
    )
    gone = pa.array(rng.random(n) < 0.1)  # nulls in a column that had none
    column = table["balance_before"]
    table = table.set_column(
        table.schema.get_field_index("balance_before"),
        "balance_before",
        pc.if_else(gone, pa.scalar(None, pa.float64()), column),
    )
    table = table.set_column(
        table.schema.get_field_index("count_1h"),
        "count_1h",
        pc.cast(table["count_1h"], pa.int64()),
    )
    assert table["balance_before"].null_count > 0 and table["amount_balance_ratio"].null_count == 0
    third = n // 3
    return pa.concat_tables(
        [table.slice(0, third), table.slice(third, third), table.slice(2 * third)]
    )


def test_arrow_feature_matrix_is_the_pandas_matrix() -> None:
    features, _ = synthetic(n=1000, days=5)
    table = arrow_features(features)
    matrix = arrow_feature_matrix(table)
    expected = np.asarray(feature_matrix(table.to_pandas()))
    assert matrix.dtype == np.float64 and matrix.shape == (1000, len(FEATURE_COLUMNS))
    assert matrix.flags["F_CONTIGUOUS"] and expected.flags["F_CONTIGUOUS"]
    assert matrix.tobytes(order="A") == expected.tobytes(order="A")  # nulls -> NaN, bit for bit
    assert np.isnan(matrix[:, FEATURE_COLUMNS.index("balance_before")]).any()
    with pytest.raises(ValueError, match="lack column"):
        arrow_feature_matrix(table.drop_columns(["hour_of_day"]))


@pytest.mark.parametrize(
    ("candidate", "params", "infinite"),
    [
        (DEFAULT_CANDIDATE, {"max_iter": 30}, True),
        ("hist_gradient_boosting", {"max_iter": 30}, True),
        ("logistic_regression", None, True),
        ("random_forest", {"n_estimators": 8}, False),
    ],
)
def test_score_from_arrow_is_bit_identical_to_pandas(
    candidate: str, params: dict[str, Any] | None, infinite: bool
) -> None:
    features, labels = synthetic(n=4000, days=30)
    frame = training_frame(features, labels, T0 + 35 * DAY, pd.Timedelta(days=2))
    model = fit(make_candidate(candidate, params), frame)
    table = arrow_features(features, infinite)
    from_pandas = score(model, table.to_pandas())  # what the scoring job does today
    from_arrow = score(model, table)
    assert from_arrow.dtype == np.float64 and from_arrow.shape == (table.num_rows,)
    assert from_arrow.tobytes() == from_pandas.tobytes()
    assert score(model, table.slice(0, 0)).shape == (0,)


def test_score_from_arrow_refuses_a_model_fitted_on_other_columns() -> None:
    features, labels = synthetic(n=2000, days=20)
    frame = training_frame(features, labels, T0 + 25 * DAY, pd.Timedelta(days=2))
    renamed = feature_matrix(frame).rename(columns={"amount": "amount_v0"})
    model = make_default_model({"max_iter": 10})
    model.fit(renamed, frame["label"].to_numpy())
    with pytest.raises(ValueError, match="feature names"):  # scikit-learn's own check
        score(model, features)
    with pytest.raises(ValueError, match="other feature columns"):
        score(model, arrow_features(features))


PREDICTS: Counter[str] = Counter()


class CountingBoosting(HistGradientBoostingClassifier):
    """A real gradient boosting that counts its predictions (scikit-learn clones keep the class)."""

    def predict_proba(self, X: Any) -> np.ndarray:
        PREDICTS["boosting"] += 1
        return np.asarray(super().predict_proba(X))


class CountingLogistic(LogisticRegression):
    """A real logistic regression that counts its predictions."""

    def predict_proba(self, X: Any) -> np.ndarray:
        PREDICTS["linear"] += 1
        return np.asarray(super().predict_proba(X))


def test_score_predicts_each_blend_member_once_per_call() -> None:
    features, labels = synthetic(n=2000, days=20)
    frame = training_frame(features, labels, T0 + 25 * DAY, pd.Timedelta(days=2))
    boosting = make_pipeline({"max_iter": 10})
    boosting.steps[-1] = ("model", CountingBoosting(**boosting.named_steps["model"].get_params()))
    linear = make_baseline()
    linear.steps[-1] = ("model", CountingLogistic(**linear.named_steps["model"].get_params()))
    model = fit(Pipeline([("model", LogitBlend(boosting, linear))]), frame)
    blend = model.named_steps["model"]
    assert isinstance(blend.boosting_.named_steps["model"], CountingBoosting)
    assert isinstance(blend.linear_.named_steps["model"], CountingLogistic)
    PREDICTS.clear()
    first = score(model, features)
    assert PREDICTS == {"boosting": 1, "linear": 1}
    second = score(model, arrow_features(features))
    assert PREDICTS == {"boosting": 2, "linear": 2}
    assert first.shape == second.shape == (len(features),)
