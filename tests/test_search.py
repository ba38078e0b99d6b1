"""The hyperparameter search: time-ordered early stopping, speed as a gate, Platt calibration,
the search logged to MLflow, and the calibrated model through the registry."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from conftest import logged_selection, sim_challenger
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import average_precision_score, log_loss
from test_registry import CUTOFF, DELAY, synthetic

from models.features import FEATURE_COLUMNS, KEY_COLUMNS
from models.registry import load_model, log_and_register, mlflow_client
from models.simulate import Simulation
from models.training import (
    MIN_PLATT_SLOPE,
    TINY_SEARCH,
    LogitBlend,
    PlattCalibrated,
    SearchSpace,
    Selection,
    calibrate,
    feature_matrix,
    fit,
    make_candidate,
    platt_fit,
    rank,
    score,
    select_model,
    time_split,
    train,
    training_frame,
)
from streamguard.pipeline import SEARCH_ENV, search_space

# Two boosting settings x two weightings x two families: 8 configurations from 4 boosting fits.
SMALL = SearchSpace(
    learning_rates=(0.2,), max_depths=(None, 3), min_samples_leafs=(40,), max_iter=80, limit=2
)


@pytest.fixture(scope="module")
def parts() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(fit part, validation period, holdout), in time order."""
    features, labels = synthetic()
    train_part, holdout = time_split(training_frame(features, labels, CUTOFF, DELAY))
    fit_part, validation = time_split(train_part)
    return fit_part, validation, holdout


@pytest.fixture(scope="module")
def searched(parts: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]) -> Selection:
    fit_part, validation, _ = parts
    return select_model(fit_part, validation, configs=SMALL, throughput_rows=2_000)


def _boosting(model: object) -> HistGradientBoostingClassifier:
    final = model.steps[-1][1]  # type: ignore[attr-defined]
    if isinstance(final, LogitBlend):
        final = final.boosting_.steps[-1][1]
    assert isinstance(final, HistGradientBoostingClassifier)
    return final


def test_search_ranks_every_configuration_early_stopped_on_the_validation_period(
    searched: Selection, parts: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]
) -> None:
    _, validation, _ = parts
    assert SMALL.size == len(searched.ranking) == 8
    assert len({r.name for r in searched.ranking}) == 8
    values = [r.metrics["average_precision"] for r in searched.ranking]
    assert values == sorted(values, reverse=True)  # no minimum rate: all selectable
    assert all(r.selectable and r.rows_per_second > 0 for r in searched.ranking)
    x_val = feature_matrix(validation)
    for result in searched.ranking:
        assert result.config is not None and result.model is not None
        hgb = _boosting(result.model)
        assert hgb.learning_rate == 0.2 and hgb.class_weight == result.class_weight
        assert result.n_iter == hgb.n_iter_ <= 80
        # Early stopping scored the later validation period, not a random 10% of the fit rows:
        # its recorded losses are the staged log loss on exactly those rows.
        member = result.model.steps[-1][1]
        boosting = member.boosting_ if isinstance(member, LogitBlend) else result.model
        staged = [
            log_loss(validation["label"], p[:, 1], labels=[0, 1])
            for p in hgb.staged_predict_proba(boosting[:-1].transform(x_val))
        ]
        np.testing.assert_allclose(-hgb.validation_score_[1:], staged, rtol=1e-6)
    assert any(r.n_iter is not None and r.n_iter < 80 for r in searched.ranking)
    # Each boosting setting is fitted once: the blend holds the very model ranked alone.
    by_name = {r.name: r for r in searched.ranking}
    for result in searched.ranking:
        if result.candidate == "blend":
            alone = by_name[result.name.replace("blend/", "hist_gradient_boosting/", 1)]
            assert result.model is not None
            assert result.model.named_steps["model"].boosting_ is alone.model


def test_slow_configurations_are_not_selectable(
    searched: Selection, parts: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]
) -> None:
    rates = sorted(r.rows_per_second for r in searched.ranking)
    minimum = rates[len(rates) // 2]  # half the measured configurations are too slow for it
    ranking = rank(list(searched.ranking), "average_precision", minimum)
    flags = [r.selectable for r in ranking]
    assert flags == sorted(flags, reverse=True) and 0 < sum(flags) < len(flags)
    for result in ranking:
        assert result.selectable == (result.rows_per_second >= minimum)
    fast = [r.metrics["average_precision"] for r in ranking if r.selectable]
    assert fast == sorted(fast, reverse=True)
    fit_part, validation, _ = parts
    with pytest.raises(ValueError, match="rows/s"):
        select_model(
            fit_part,
            validation,
            configs=TINY_SEARCH,
            min_rows_per_second=math.inf,
            throughput_rows=500,
        )


def test_platt_fit_recovers_a_known_sigmoid_and_keeps_the_slope_positive() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=200_000)
    y = rng.random(len(z)) < 1 / (1 + np.exp(-(2.0 * z - 3.0)))
    slope, intercept = platt_fit(z, y)
    assert slope == pytest.approx(2.0, abs=0.05) and intercept == pytest.approx(-3.0, abs=0.05)
    # A score ranking the period backwards: the slope stays positive (the map stays increasing)
    # and the intercept alone still matches the fraud rate.
    slope, intercept = platt_fit(-z, y)
    assert slope == MIN_PLATT_SLOPE
    assert np.mean(1 / (1 + np.exp(-(slope * -z + intercept)))) == pytest.approx(y.mean(), 1e-9)
    with pytest.raises(ValueError, match="both"):
        platt_fit(z, np.zeros(len(z)))


def test_calibrated_scores_are_monotone_and_match_the_validation_fraud_rate(
    parts: tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame],
) -> None:
    fit_part, validation, holdout = parts
    # Balanced weights: raw scores far from probabilities, the case calibration is for.
    raw = fit(
        make_candidate("hist_gradient_boosting", {"class_weight": "balanced", "max_iter": 60}),
        fit_part,
    )
    model = calibrate(raw, validation)
    calibrated = model.named_steps["model"]
    assert isinstance(calibrated, PlattCalibrated) and calibrated.slope_ > 0
    rate = validation["label"].mean()
    raw_val, cal_val = score(raw, validation), score(model, validation)
    assert raw_val.mean() > 2 * rate  # uncalibrated, the mean score is not the fraud rate
    assert cal_val.mean() == pytest.approx(rate, rel=1e-6)
    # Monotone in the raw score: ordering by raw score orders the calibrated one.
    order = np.argsort(raw_val, kind="stable")
    assert (np.diff(cal_val[order]) >= 0).all()
    grid = np.linspace(1e-6, 1 - 1e-6, 1001)
    assert (np.diff(calibrated.calibrate(grid)) > 0).all()
    # So the ranking, and the holdout's average precision, are the raw model's.
    y = holdout["label"]
    assert average_precision_score(y, score(model, holdout)) == pytest.approx(
        average_precision_score(y, score(raw, holdout)), abs=1e-12
    )


def test_train_with_a_search_registers_a_calibrated_model_that_loads(tmp_path: Path) -> None:
    features, labels = synthetic(n=4000)
    result = train(features, labels, CUTOFF, DELAY, search=TINY_SEARCH, min_rows_per_second=1.0)
    assert result.selection is not None and len(result.selection.ranking) == TINY_SEARCH.size
    winner = result.selection.winner
    calibrated = result.model.named_steps["model"]
    assert isinstance(calibrated, PlattCalibrated)
    assert result.candidate == winner.candidate
    assert result.params["calibration"] == "platt" and result.rows_per_second > 0
    assert result.tags["selection_winner"] == winner.name
    # The winner refitted on fit part + validation, with the iterations early stopping kept,
    # under the Platt map of the winner as searched (fitted on its validation scores).
    assert result.n_train == result.selection.n_train + result.selection.n_validation
    assert calibrated.model is not winner.model and winner.n_iter is not None
    assert _boosting(calibrated.model).n_iter_ == winner.n_iter
    assert not _boosting(calibrated.model).early_stopping
    assert winner.model is not None
    frame = training_frame(features, labels, CUTOFF, DELAY)
    _, validation = time_split(time_split(frame)[0])
    mapping = calibrate(winner.model, validation).named_steps["model"]
    assert (calibrated.slope_, calibrated.intercept_) == (mapping.slope_, mapping.intercept_)
    # The map was fitted on the validation period: after the searched fit, before the holdout.
    assert result.holdout_start is not None and result.selection.train_end is not None
    assert result.selection.train_end <= pd.Timestamp(result.tags["calibration_start"])
    assert pd.Timestamp(result.tags["calibration_end"]) <= result.holdout_start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = log_and_register(result, uri, tmp_path / "artifacts")
    loaded = load_model(uri, alias_or_version=version)  # the project's skops trust list
    assert isinstance(loaded.model.named_steps["model"], PlattCalibrated)
    table = pa.Table.from_pandas(frame[[*KEY_COLUMNS, *FEATURE_COLUMNS]], preserve_index=False)
    expected = score(result.model, frame)
    assert score(loaded.model, table).tobytes() == expected.tobytes()  # Arrow path: identical
    np.testing.assert_array_equal(score(loaded.model, frame), expected)
    assert loaded.tags["rows_per_second"] == result.tags["rows_per_second"]


def test_search_is_logged_as_a_parent_run_with_a_child_per_configuration(
    tmp_path: Path, searched: Selection
) -> None:
    parent, children = logged_selection(searched, tmp_path)
    assert parent.data.tags["winner_config"] == searched.winner.name
    assert parent.data.metrics["winner_rows_per_second"] == pytest.approx(searched.rows_per_second)
    assert len(children) == SMALL.size
    by_config = {c.data.tags["config"]: c for c in children}
    for result in searched.ranking:
        child = by_config[result.name]
        metrics, params = child.data.metrics, child.data.params
        assert metrics["validation_average_precision"] == pytest.approx(
            result.metrics["average_precision"]
        )
        assert metrics["validation_roc_auc"] == pytest.approx(result.metrics["roc_auc"])
        assert metrics["rows_per_second"] == pytest.approx(result.rows_per_second)
        assert metrics["fit_seconds"] == pytest.approx(result.fit_seconds)
        assert metrics["n_iter"] == result.n_iter
        assert result.config is not None
        assert params["learning_rate"] == "0.2"
        assert params["max_depth"] == str(dict(result.config.params)["max_depth"])


def test_search_space_by_name_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SEARCH_ENV, raising=False)
    assert search_space() is None  # opt-in: off unless asked for
    full = search_space("full")
    assert full is not None and full.size == 48 and len(full.configs()) == 48
    assert search_space("3") == dataclasses.replace(full, limit=3)
    assert search_space("off") is None
    monkeypatch.setenv(SEARCH_ENV, "tiny")
    assert search_space() == TINY_SEARCH and TINY_SEARCH.size == 2
    with pytest.raises(ValueError, match="unknown search"):
        search_space("huge")
    with pytest.raises(ValueError, match="grid applies"):
        SearchSpace(families=("random_forest",)).configs()


def test_train_challenger_registers_the_searched_calibrated_model(
    tmp_path: Path, small_sim: Simulation
) -> None:
    home, outcome = sim_challenger(tmp_path / "home", small_sim, search="tiny")
    assert outcome.selection is not None and len(outcome.selection.ranking) == 2
    assert outcome.rows_per_second is not None and outcome.rows_per_second > 0
    uri = home.mlflow_tracking_uri
    loaded = load_model(uri, alias_or_version=outcome.version)
    assert isinstance(loaded.model.named_steps["model"], PlattCalibrated)
    assert loaded.tags["calibration"] == "platt"
    assert loaded.tags["selection_run_id"] == outcome.selection_run_id
    parent = mlflow_client(uri).get_run(outcome.selection_run_id)
    assert parent.data.tags["winner_config"] == loaded.tags["selection_winner"]
