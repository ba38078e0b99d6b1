"""PSI on hand-computed cases, the drift report's shape, and the plot."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from models.drift import (
    EPSILON,
    KEY_FEATURES,
    REPORT_COLUMNS,
    drift_level,
    drift_report,
    population_stability_index,
    psi_plot_png,
)
from models.features import FEATURE_COLUMNS


def test_identical_samples_have_zero_psi() -> None:
    x = np.random.default_rng(0).lognormal(3, 1, 5_000)
    assert population_stability_index(x, x) == 0.0
    assert population_stability_index(x, x.copy()[::-1]) == 0.0


def test_two_valued_shift_matches_the_hand_computed_value() -> None:
    # Quantile cuts of the expected sample are {0, 0.5, 1}: one bin holds the 0s, one the 1s.
    # Shares 0.5/0.5 -> 0.25/0.75: (0.25-0.5) ln(0.5) + (0.75-0.5) ln(1.5) = 0.25 ln 3.
    expected = np.array([0.0] * 50 + [1.0] * 50)
    actual = np.array([0.0] * 25 + [1.0] * 75)
    assert population_stability_index(expected, actual) == pytest.approx(0.25 * math.log(3))


def test_shift_past_the_training_range_fills_the_outer_bin_and_floors_empty_ones() -> None:
    expected = np.arange(100.0)  # ten bins of ten values, cuts at 9.9, 19.8, ... 89.1
    actual = expected + 50  # 50..149: bins 5-8 keep 10 %, the open last bin gets 60 %
    want = 5 * (EPSILON - 0.1) * math.log(EPSILON / 0.1) + (0.6 - 0.1) * math.log(0.6 / 0.1)
    assert population_stability_index(expected, actual) == pytest.approx(want)
    assert want > 4  # far beyond "significant"


def test_missing_values_are_a_bin_of_their_own() -> None:
    expected = np.arange(100.0)
    actual = np.concatenate([expected, np.full(100, np.nan)])  # same values, half now unknown
    want = 10 * (0.05 - 0.1) * math.log(0.05 / 0.1) + (0.5 - EPSILON) * math.log(0.5 / EPSILON)
    assert population_stability_index(expected, actual) == pytest.approx(want)
    # NaN shares alike on both sides: no drift.
    assert population_stability_index(actual, actual.copy()) == 0.0
    # All-NaN expected: one bin for values, one for NaN.
    assert population_stability_index(np.full(4, np.nan), np.array([1.0, np.nan])) == (
        pytest.approx((0.5 - EPSILON) * math.log(0.5 / EPSILON) + (0.5 - 1) * math.log(0.5))
    )


def test_empty_sample_gives_nan_and_bad_bins_raise() -> None:
    assert math.isnan(population_stability_index(np.zeros(0), np.ones(3)))
    assert math.isnan(population_stability_index(np.ones(3), np.zeros(0)))
    with pytest.raises(ValueError, match="bins"):
        population_stability_index(np.ones(3), np.ones(3), bins=0)


def test_levels_follow_the_usual_thresholds() -> None:
    assert [drift_level(v) for v in (0.0, 0.099, 0.1, 0.249, 0.25, math.nan)] == [
        "stable", "stable", "moderate", "moderate", "significant", "unknown",
    ]  # fmt: skip


def test_drift_report_has_a_row_per_feature_and_one_for_the_score() -> None:
    rng = np.random.default_rng(1)
    train = pd.DataFrame(
        {"amount": rng.lognormal(3, 1, 2_000), "hour_of_day": rng.integers(0, 24, 2_000)}
    )
    train["score"] = rng.beta(1, 50, 2_000)
    current = train.assign(amount=train["amount"] * 3)
    report = drift_report(train, current, ["amount", "hour_of_day"])
    assert list(report.columns) == REPORT_COLUMNS
    assert report["column"].tolist() == ["amount", "hour_of_day", "score"]
    assert report["kind"].tolist() == ["feature", "feature", "score"]
    psi = report.set_index("column")["psi"]
    assert psi["amount"] > 1 and psi["hour_of_day"] == 0 and psi["score"] == 0
    assert report.set_index("column").loc["amount", "level"] == "significant"
    assert report["expected_rows"].eq(2_000).all()
    assert drift_report(train, current, ["amount"], score_col=None)["column"].tolist() == ["amount"]
    with pytest.raises(ValueError, match="channel_atm"):
        drift_report(train, current, ["amount", "channel_atm"])


def test_key_features_are_model_features() -> None:
    assert set(KEY_FEATURES) <= set(FEATURE_COLUMNS)


def test_psi_plot_is_a_png() -> None:
    report = pd.DataFrame(
        {
            "column": ["amount", "hour_of_day", "score"],
            "kind": ["feature", "feature", "score"],
            "psi": [0.6, 0.02, math.nan],
            "level": ["significant", "stable", "unknown"],
        }
    )
    png = psi_plot_png(report)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1_000
