"""The label delay D of the delayed terminal windows: estimated at training, carried by the
feature version into the registry, and used (and checked) by the scoring path."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from models.features import (
    DELAYED_FEATURES,
    FEATURE_COLUMNS,
    FEATURE_VERSION,
    LABEL_DELAY_DAYS,
    MAX_LABEL_DELAY_DAYS,
    FeatureState,
    FeatureVersionError,
    check_feature_version,
    compute_features,
    feature_input,
    feature_version,
    feature_version_of,
    features_at_version,
    label_delay_of,
    replay,
    with_feature_version,
)
from models.job import FEATURES, SHADOW_SCORES, FraudScoringJob, ScoringContext
from models.label_delay import (
    MIN_DELAY_LABELS,
    LabelDelayEstimate,
    estimate_label_delay,
    reporting_delays,
)
from models.promotion import load_holdout
from models.registry import (
    FEATURE_DELAY_TAG,
    FEATURE_VERSION_TAG,
    MODEL_NAME,
    LoadedModel,
    load_model,
    mlflow_client,
)
from models.schema import to_payload
from models.simulate import Simulation, simulate, write_simulation
from models.training import evaluate, score
from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.pipeline import (
    DELAY_TOLERANCE_DAYS,
    FEATURE_DELAY_SOURCE_TAG,
    champion_delay,
    load_labels,
    replay_delay,
    scoring_runner,
    train_and_promote,
    train_challenger,
)
from streamguard.sources import MemorySource

T0 = datetime(2026, 3, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def _days(*values: float) -> pd.Series:
    return pd.Series(pd.to_timedelta(values, unit="D"))


# --------------------------------------------------------------------------- the estimator


def test_the_estimate_is_the_quantile_of_the_delays_rounded_up_to_whole_days() -> None:
    # Ten delays 0.5, 1.5, ..., 9.5 days: at least 90% of them are <= 8.5 (the 9th), so the 0.9
    # quantile is 8.5 days and D is 9; the 0.5 quantile is the 5th, 4.5 days: D 5.
    delays = _days(*(i + 0.5 for i in range(10)))
    estimate = estimate_label_delay(delays, 0.9, min_delays=10)
    assert (estimate.days, estimate.quantile_days, estimate.n_delays) == (9, 8.5, 10)
    assert not estimate.fallback
    assert estimate_label_delay(delays, 0.5, min_delays=10).days == 5
    # A whole number of days stays that number: the 0.9 quantile of 1..10 days is 9 days.
    assert estimate_label_delay(_days(*range(1, 11)), 0.9, min_delays=10).days == 9
    # One huge outlier moves an observed-value quantile by one rank at most.
    assert estimate_label_delay(_days(*range(1, 10), 300), 0.9, min_delays=10).days == 9


def test_the_estimate_is_clamped_to_the_delays_the_features_can_shift_by() -> None:
    assert estimate_label_delay(_days(*[20.0] * 40)).days == MAX_LABEL_DELAY_DAYS
    assert estimate_label_delay(_days(*[0.0] * 40)).days == 0
    # 36 of 40 reports within an hour, 4 after 2 days: the 0.9 quantile is the 36th, 1 hour.
    assert estimate_label_delay(_days(*[1 / 24] * 36, *[2.0] * 4)).days == 1


def test_too_few_delays_fall_back_to_the_default_delay() -> None:
    few = _days(*[1.0] * (MIN_DELAY_LABELS - 1))
    estimate = estimate_label_delay(few)
    assert estimate.days == LABEL_DELAY_DAYS and estimate.fallback
    assert f"{MIN_DELAY_LABELS - 1} reporting delay(s)" in estimate.describe()
    assert estimate_label_delay(_days()).days == LABEL_DELAY_DAYS
    assert estimate_label_delay(_days(*[1.0] * MIN_DELAY_LABELS)).days == 1
    with pytest.raises(ValueError, match="quantile"):
        estimate_label_delay(few, 0.0)


def test_reporting_delays_count_only_frauds_old_enough_and_known_at_the_cutoff() -> None:
    cutoff = T0 + 30 * DAY
    transactions = pd.DataFrame(
        {
            "transaction_id": ["old", "twice", "early", "recent", "late", "legit"],
            "event_time": [T0, T0 + DAY, T0 + 2 * DAY, cutoff - 3 * DAY, T0, T0],
        }
    )
    labels = pd.DataFrame(
        {
            "transaction_id": ["old", "twice", "twice", "early", "recent", "late", "legit"],
            "is_fraud": [True, True, True, True, True, True, False],
            "reported_at": [
                T0 + 2 * DAY,  # old: 2 days
                T0 + 6 * DAY,  # twice: its first report (4 days after) counts, not this one
                T0 + 5 * DAY,
                T0 + DAY,  # early: reported before the event (bad data): no delay
                cutoff - DAY,  # recent: not MAX_LABEL_DELAY_DAYS old at the cut-off
                cutoff + DAY,  # late: not reported by the cut-off
                T0 + DAY,  # legit: not a fraud
            ],
        }
    )
    delays = reporting_delays(transactions, labels, pd.Timestamp(cutoff))
    assert sorted(delays / pd.Timedelta(days=1)) == [0.0, 2.0, 4.0]


# --------------------------------------------------------------------------- the version


def test_the_feature_version_carries_the_delay_and_the_default_keeps_the_old_one() -> None:
    assert feature_version() == feature_version(LABEL_DELAY_DAYS) == FEATURE_VERSION == "4"
    assert feature_version(3) == "4.d3"
    for days in range(MAX_LABEL_DELAY_DAYS + 1):
        assert label_delay_of(feature_version(days)) == days
    for other in ("3", "4.d15", "4.d03", "4.d7", "4.dx", "5.d3"):
        with pytest.raises(FeatureVersionError, match="retrain"):
            label_delay_of(other)
    with pytest.raises(ValueError, match="label_delay_days"):
        feature_version(MAX_LABEL_DELAY_DAYS + 1)


def test_features_of_another_version_than_the_model_are_refused() -> None:
    features = pa.table({"x": [1.0]})
    assert feature_version_of(features) == FEATURE_VERSION  # unmarked: the default delay
    marked = with_feature_version(features, 3)
    assert feature_version_of(marked) == "4.d3"
    check_feature_version(marked, "4.d3")
    with pytest.raises(FeatureVersionError, match=r"trained on feature version 4\.d3 .* 4\b"):
        check_feature_version(features, "4.d3")
    with pytest.raises(FeatureVersionError, match=r"fraud_model version 2 .* version 4\.d3"):
        check_feature_version(marked, FEATURE_VERSION, "fraud_model version 2")


def test_the_scorer_refuses_features_computed_with_another_delay(
    small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    model = LoadedModel(tiny_model.model, MODEL_NAME, "5", tags={FEATURE_VERSION_TAG: "4.d3"})
    assert model.feature_delay_days == 3
    job = FraudScoringJob(None, model=model)
    rows = feature_input(small_sim.transactions.slice(0, 50))
    context = ScoringContext(MODEL_NAME, "5")
    at_default = compute_features(rows, FeatureState.empty()).features
    with pytest.raises(FeatureVersionError, match="fraud_model version 5 was trained on"):
        job.score(at_default, context, 0, datetime.now(UTC))
    computed = compute_features(rows, FeatureState.empty(), None, 3).features
    at_three = with_feature_version(computed, 3)
    tables = job.score(at_three, context, 0, datetime.now(UTC))
    assert set(tables[FEATURES]["feature_version"].to_pylist()) == {"4.d3"}
    assert tables[FEATURES].schema.metadata is None  # the lake's rows carry the version column
    # A challenger of another version than the features it is given is not shadow-scored.
    challenger = LoadedModel(tiny_model.model, MODEL_NAME, "6", tags={})
    shadowing = FraudScoringJob(None, model=model, challenger=challenger)
    shadow = shadowing.shadow_score(at_three, ScoringContext(MODEL_NAME, "5", "6"), 0, T0)
    assert shadow.num_rows == 0
    assert shadowing.shadow_score(at_default, ScoringContext(MODEL_NAME, "5", "6"), 0, T0).num_rows


# --------------------------------------------------------------------------- end to end

REPORT_AFTER = pd.Timedelta(hours=36)  # every fraud reported 1.5 days after: D = 2


def test_a_replay_keeps_the_champions_delay_while_the_estimate_stays_close() -> None:
    def estimate(days: int) -> LabelDelayEstimate:
        return LabelDelayEstimate(days, 100, 0.9, days - 0.5)

    fallback = estimate_label_delay(_days(1.0))
    assert fallback.fallback
    # No champion: the estimate, whatever it is.
    assert replay_delay(estimate(9), None)[0] == 9
    assert replay_delay(fallback, None)[0] == LABEL_DELAY_DAYS
    # A champion at D=9: estimates within DELAY_TOLERANCE_DAYS keep 9, farther ones move.
    assert DELAY_TOLERANCE_DAYS == 1
    assert replay_delay(estimate(10), 9) == (
        9,
        "the champion's 9 days, kept: the labels' estimate is 10 days: the 0.9 quantile of "
        "100 reporting delays is 9.50 days",
    )
    assert replay_delay(estimate(8), 9)[0] == 9
    assert replay_delay(estimate(11), 9) == (11, f"estimated: {estimate(11).describe()}")
    assert replay_delay(estimate(3), 9)[0] == 3
    # Too few labels to estimate says nothing against the champion's D.
    assert replay_delay(fallback, 2)[0] == 2


@pytest.fixture(scope="module")
def quick_reports() -> Simulation:
    """A simulation whose frauds are all reported 36 hours after they happened."""
    sim = simulate(days=28, customers=120, seed=5)
    times = sim.transactions.select(["transaction_id", "event_time"]).to_pandas()
    labels = sim.labels.to_pandas().merge(times, on="transaction_id")
    labels["reported_at"] = labels["event_time"] + REPORT_AFTER
    table = pa.Table.from_pandas(labels.drop(columns="event_time"), preserve_index=False)
    return dataclasses.replace(sim, labels=table.cast(sim.labels.schema))


def _delayed(features: pa.Table, column: str) -> np.ndarray:
    ordered = features.sort_by("transaction_id")
    return np.asarray(ordered[column].to_numpy(zero_copy_only=False), dtype=np.float64)


def test_a_model_trained_on_quick_reports_scores_with_its_own_short_delay(
    tmp_path: Path, quick_reports: Simulation
) -> None:
    home = Home(tmp_path / "home").ensure()
    write_simulation(quick_reports, home.data)
    uri = home.mlflow_tracking_uri
    assert champion_delay(uri) is None  # no model yet
    outcome = train_and_promote(
        home,
        history=home.data / "transactions.parquet",
        labels=home.data / "labels.parquet",
        label_delay_days=0,
    )
    assert outcome.feature_version == "4.d2"
    tags = mlflow_client(uri).get_model_version(MODEL_NAME, outcome.version).tags
    assert (tags[FEATURE_VERSION_TAG], tags[FEATURE_DELAY_TAG]) == ("4.d2", "2")
    assert tags[FEATURE_DELAY_SOURCE_TAG].startswith("estimated: 2 days: the 0.9 quantile")
    champion = load_model(uri)
    assert champion.version == outcome.version and champion.feature_delay_days == 2
    assert champion_delay(uri) == 2

    # The scoring path, from an empty state: every transaction through the runner.
    lake = Lake(home.lake)
    transactions = quick_reports.transactions
    payloads = [to_payload(row) for row in transactions.to_pylist()]
    scoring_runner(lake, MemorySource({"s": payloads}), uri, max_batch_records=4_000).run()
    scored = lake.read(FEATURES)
    assert scored.num_rows == transactions.num_rows
    assert set(scored["feature_version"].to_pylist()) == {"4.d2"}
    at_two = replay(transactions, quick_reports.labels, label_delay_days=2).features
    at_seven = replay(transactions, quick_reports.labels).features
    column = "terminal_risk_30d_delayed"
    np.testing.assert_allclose(_delayed(scored, column), _delayed(at_two, column), equal_nan=True)
    stored, default = _delayed(scored, column), _delayed(at_seven, column)
    differ = ~np.isclose(stored, default, equal_nan=True)
    assert differ.sum() > 100  # the frauds of days 3-7 before are known and counted at D=2 only
    assert np.nanmean(stored) > np.nanmean(default)


def test_a_shadow_challenger_of_another_delay_scores_features_computed_with_its_own(
    tmp_path: Path, quick_reports: Simulation, tiny_model: LoadedModel
) -> None:
    """The in-process job computes the challenger's features again, with its delay D."""
    champion = LoadedModel(tiny_model.model, MODEL_NAME, "1", tags={})
    challenger = LoadedModel(tiny_model.model, MODEL_NAME, "2", tags={FEATURE_VERSION_TAG: "4.d2"})
    transactions = quick_reports.transactions
    start = pc.min(transactions["event_time"]).as_py()
    first_days = transactions.filter(
        pc.less(transactions["event_time"], pa.scalar(start + 16 * DAY))
    )
    lake = Lake(tmp_path / "lake")
    load_labels(lake, quick_reports.labels)
    payloads = [to_payload(row) for row in first_days.to_pylist()]
    source = MemorySource({"s": payloads})
    scoring_runner(lake, source, None, model=champion, challenger=challenger).run()
    assert set(lake.read(FEATURES)["feature_version"].to_pylist()) == {FEATURE_VERSION}
    shadow = lake.read(SHADOW_SCORES).sort_by("transaction_id")
    assert shadow.num_rows == first_days.num_rows
    labels = quick_reports.labels
    at_two = replay(first_days, labels, label_delay_days=2).features.sort_by("transaction_id")
    at_seven = replay(first_days, labels).features.sort_by("transaction_id")
    expected = score(tiny_model.model, at_two.select(FEATURE_COLUMNS).to_pandas())
    shadow_scores = shadow["score"].to_numpy()
    np.testing.assert_allclose(shadow_scores, expected)
    with_default = score(tiny_model.model, at_seven.select(FEATURE_COLUMNS).to_pandas())
    assert not np.allclose(shadow_scores, with_default)


def test_a_challenger_of_another_delay_is_compared_with_the_champion_on_the_same_rows(
    tmp_path: Path, quick_reports: Simulation
) -> None:
    """The labels say D = 2; a champion at D = 7 is scored on the challenger's holdout rows with
    its own delayed windows (replayed at 7 and stored with the holdout), not waved through."""
    home = Home(tmp_path / "home").ensure()
    write_simulation(quick_reports, home.data)
    uri, history = home.mlflow_tracking_uri, home.data / "transactions.parquet"
    first = train_and_promote(home, history=history, labels=home.data / "labels.parquet",
                              label_delay_days=0)  # fmt: skip
    # That champion now counts as one computed at the default D = 7 (5 days from the estimate).
    client = mlflow_client(uri)
    client.set_model_version_tag(MODEL_NAME, first.version, FEATURE_VERSION_TAG, FEATURE_VERSION)
    assert champion_delay(uri) == LABEL_DELAY_DAYS
    outcome = train_challenger(home, history=history, label_delay_days=0)
    assert outcome.feature_version == "4.d2"
    evaluation = outcome.evaluation
    assert evaluation.champion_version == first.version
    assert evaluation.champion_value is not None
    assert f"at its feature version {FEATURE_VERSION}" in evaluation.reason

    holdout = load_holdout(uri, MODEL_NAME, outcome.version)
    at_seven = features_at_version(holdout, FEATURE_VERSION)
    assert at_seven is not None and len(at_seven) == len(holdout) == outcome.n_holdout
    # The stored columns are the replay's at D = 7 for those rows, and not the D = 2 ones.
    replayed = replay(quick_reports.transactions, quick_reports.labels).features.to_pandas()
    expected = replayed.set_index("transaction_id").loc[holdout["transaction_id"], DELAYED_FEATURES]
    np.testing.assert_allclose(
        at_seven[DELAYED_FEATURES].to_numpy(), expected.to_numpy(), equal_nan=True
    )
    moved = ~np.isclose(holdout[DELAYED_FEATURES], at_seven[DELAYED_FEATURES], equal_nan=True)
    assert moved.sum() > 50
    champion = load_model(uri, MODEL_NAME, first.version).model
    assert evaluation.champion_value == evaluate(champion, at_seven)["average_precision"]
    assert evaluation.champion_value != evaluate(champion, holdout)["average_precision"]
