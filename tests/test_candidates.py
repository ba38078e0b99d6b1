"""Model selection: every (candidate, class weighting) on a time-later split, logged to MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import logged_selection
from test_registry import CUTOFF, DELAY, synthetic

from models.registry import load_model, log_and_register
from models.training import (
    CANDIDATES,
    CLASS_WEIGHTS,
    Selection,
    evaluate,
    score,
    select_model,
    time_split,
    train,
    training_frame,
)


@pytest.fixture(scope="module")
def split() -> tuple[pd.DataFrame, pd.DataFrame]:
    features, labels = synthetic()
    frame = training_frame(features, labels, CUTOFF, DELAY)
    return time_split(frame)


@pytest.fixture(scope="module")
def selection(split: tuple[pd.DataFrame, pd.DataFrame]) -> Selection:
    return select_model(*split)


def test_selection_ranks_every_candidate_on_the_later_split(
    selection: Selection, split: tuple[pd.DataFrame, pd.DataFrame]
) -> None:
    train_part, validation = split
    assert len(selection.ranking) == len(CANDIDATES) * len(CLASS_WEIGHTS) == 8
    assert {(r.candidate, r.class_weight) for r in selection.ranking} == {
        (c, w) for c in CANDIDATES for w in CLASS_WEIGHTS
    }
    values = [r.metrics["average_precision"] for r in selection.ranking]
    assert all(math.isfinite(v) for v in values)
    assert values == sorted(values, reverse=True)
    assert selection.winner is selection.ranking[0]
    assert selection.winner.metrics["average_precision"] == max(values)
    # Measured on the validation rows, all later than every training row.
    assert selection.validation_start is not None and selection.train_end is not None
    assert selection.validation_start >= selection.train_end
    assert selection.n_train == len(train_part) and selection.n_validation == len(validation)
    for result in selection.ranking:
        assert result.model is not None
        assert result.model.named_steps["model"].get_params()["class_weight"] == (
            result.class_weight
        )
        assert evaluate(result.model, validation) == pytest.approx(result.metrics, nan_ok=True)


def test_selection_refuses_a_validation_split_earlier_than_training(
    split: tuple[pd.DataFrame, pd.DataFrame],
) -> None:
    train_part, validation = split
    with pytest.raises(ValueError, match="time split"):
        select_model(validation, train_part)


def test_selection_is_logged_as_a_parent_run_with_a_child_per_candidate(
    tmp_path: Path, selection: Selection
) -> None:
    parent, children = logged_selection(selection, tmp_path)
    assert parent.data.tags["winner"] == selection.winner.candidate
    assert parent.data.params["n_candidates"] == str(len(CANDIDATES) * len(CLASS_WEIGHTS))
    assert parent.info.status == "FINISHED"
    assert len(children) == len(CANDIDATES) * len(CLASS_WEIGHTS)
    by_name = {(c.data.tags["candidate"], c.data.tags["class_weight"]): c for c in children}
    for result in selection.ranking:
        child = by_name[(result.candidate, str(result.class_weight))]
        assert child.data.metrics["validation_average_precision"] == pytest.approx(
            result.metrics["average_precision"]
        )
        assert child.data.params["class_weight"] == str(result.class_weight)
        assert child.info.status == "FINISHED"


@pytest.mark.parametrize("candidate", ["random_forest", "logistic_regression"])
def test_other_candidates_register_and_load_with_skops(tmp_path: Path, candidate: str) -> None:
    features, labels = synthetic(n=3000)
    result = train(features, labels, CUTOFF, DELAY, candidate=candidate)
    result.tags["selection_winner"] = f"{candidate}/unweighted"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    version = log_and_register(result, uri, tmp_path / "artifacts")
    loaded = load_model(uri, alias_or_version=version)
    frame = training_frame(features, labels, CUTOFF, DELAY).head(200)
    np.testing.assert_array_equal(score(loaded.model, frame), score(result.model, frame))
    assert loaded.tags["model_candidate"] == candidate
    assert loaded.tags["selection_winner"] == f"{candidate}/unweighted"
