"""The alert threshold: chosen for a daily budget, stored with the version, used by the job."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import sim_challenger
from test_registry import CUTOFF, DELAY, synthetic

from models.job import ALERTS, SCORES, FraudScoringJob, ScoringContext
from models.promotion import load_holdout
from models.registry import (
    ALERT_DAILY_BUDGET_TAG,
    ALERT_THRESHOLD_TAG,
    MODEL_NAME,
    alert_threshold,
    log_and_register,
    mlflow_client,
)
from models.rules import RULES, AlertPolicy, rule_hits
from models.simulate import Simulation, write_simulation
from models.training import CANDIDATES, CLASS_WEIGHTS, choose_threshold, score, train
from streamguard.config import Home
from streamguard.pipeline import train_challenger

DAY0 = pd.Timestamp("2026-03-01", tz="UTC")


def test_budget_threshold_on_a_hand_made_example() -> None:
    # Two calendar days, budget 2 a day: at most 4 alerts in all.
    scores = [0.95, 0.90, 0.80, 0.70, 0.70, 0.60, 0.10, 0.05]
    hours = [1, 5, 9, 13, 30, 34, 38, 42]  # 4 rows on each day
    times = [DAY0 + pd.Timedelta(hours=h) for h in hours]
    labels = [1, 1, 0, 1, 0, 0, 0, 0]
    # The 5th highest is 0.70 (tied with the 4th): alerting at 0.70 would raise 5, so 0.80.
    assert choose_threshold(scores, labels, times, daily_budget=2) == 0.80
    assert sum(s >= 0.80 for s in scores) == 3
    # Budget 3 a day: 6 alerts allowed; the 7th highest is 0.10, so the threshold is 0.60.
    assert choose_threshold(scores, labels, times, daily_budget=3) == 0.60
    # Everything fits in the budget: the lowest score (every row alerts).
    assert choose_threshold(scores, labels, times, daily_budget=100) == 0.05
    # A zero budget: above the highest score, nothing alerts.
    assert choose_threshold(scores, labels, times, daily_budget=0) > 0.95
    # No budget: best F1. At 0.70: tp 3, fp 2, fn 0 -> F1 0.75; at 0.90 F1 is 0.8.
    best = choose_threshold(scores, labels, times, daily_budget=None)
    assert best == 0.90  # tp 2, fp 0, fn 1: precision 1, recall 2/3, F1 0.8
    with pytest.raises(ValueError, match="both"):
        choose_threshold(scores, [0] * 8, times, daily_budget=None)


class _Lake:
    def version(self, name: str) -> int | None:
        return None


def _register(uri: str, root: Path, threshold: float | None) -> str:
    features, labels = synthetic(n=3000)
    result = train(features, labels, CUTOFF, DELAY, params={"max_iter": 30})
    if threshold is not None:
        result.tags[ALERT_THRESHOLD_TAG] = repr(threshold)
        result.tags[ALERT_DAILY_BUDGET_TAG] = "test"
    return log_and_register(result, uri, root)


def _alerts(job: FraudScoringJob, features: pa.Table) -> tuple[ScoringContext, np.ndarray]:
    context = job.plan_context(_Lake())  # type: ignore[arg-type]
    tables = job.score(features, context, 0, datetime.now(UTC))
    alert = tables[SCORES]["alert"].to_numpy(zero_copy_only=False)
    assert tables[ALERTS].num_rows == int(alert.sum())
    return context, alert


def test_the_stored_threshold_decides_which_transactions_alert(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    high = _register(uri, tmp_path / "artifacts", 0.9)
    low = _register(uri, tmp_path / "artifacts", 0.1)
    none = _register(uri, tmp_path / "artifacts", None)
    frame, _ = synthetic(n=2000, seed=1)
    features = pa.Table.from_pandas(frame, preserve_index=False)

    jobs = {v: FraudScoringJob(uri, alias=v) for v in (high, low, none)}
    results = {v: _alerts(job, features) for v, job in jobs.items()}
    assert results[high][0].alert_threshold == 0.9
    assert results[low][0].alert_threshold == 0.1
    assert results[none][0].alert_threshold is None

    model = jobs[high]._model(high).model
    p = score(model, frame)
    fired = rule_hits(frame, AlertPolicy())[list(RULES)].to_numpy().any(axis=1)
    # 0.9: the model alone at 0.9, with a rule at the default 0.2.
    np.testing.assert_array_equal(results[high][1], (p >= 0.9) | (fired & (p >= 0.2)))
    # 0.1: rule_threshold is lowered to 0.1 too, so every score >= 0.1 alerts.
    p_low = score(jobs[low]._model(low).model, frame)
    np.testing.assert_array_equal(results[low][1], p_low >= 0.1)
    # No stored threshold: the policy's default (0.5).
    p_none = score(jobs[none]._model(none).model, frame)
    np.testing.assert_array_equal(results[none][1], (p_none >= 0.5) | (fired & (p_none >= 0.2)))
    # Same features, same model family: the lower threshold alerts on more transactions.
    assert results[low][1].sum() > results[high][1].sum()

    # A replay uses the planned threshold even if the version's tag changed since.
    context = results[high][0]
    mlflow_client(uri).set_model_version_tag(MODEL_NAME, high, ALERT_THRESHOLD_TAG, "0.1")
    replayed = FraudScoringJob(uri, alias=high).score(features, context, 0, datetime.now(UTC))
    np.testing.assert_array_equal(
        replayed[SCORES]["alert"].to_numpy(zero_copy_only=False), results[high][1]
    )


def test_train_challenger_stores_the_threshold_and_the_selection(
    tmp_path: Path, small_sim: Simulation
) -> None:
    home, outcome = sim_challenger(tmp_path / "home", small_sim, select=True, daily_budget=20)
    assert outcome.selection is not None
    assert len(outcome.selection.ranking) == len(CANDIDATES) * len(CLASS_WEIGHTS)
    assert outcome.candidate == outcome.selection.winner.candidate
    client = mlflow_client(home.mlflow_tracking_uri)
    tags = client.get_model_version(MODEL_NAME, outcome.version).tags
    assert float(tags[ALERT_THRESHOLD_TAG]) == outcome.alert_threshold
    assert tags[ALERT_DAILY_BUDGET_TAG] == "20"
    assert tags["selection_winner"] == outcome.selection.winner.name
    assert tags["model_candidate"] == outcome.candidate
    parent = client.get_run(tags["selection_run_id"])
    assert parent.data.tags["winner"] == outcome.candidate
    assert outcome.alert_threshold is not None and 0.0 <= outcome.alert_threshold <= 1.0


def test_train_challenger_without_fraud_in_the_holdout_keeps_no_threshold(
    tmp_path: Path, small_sim: Simulation
) -> None:
    """The first days of a deployment: no fraud reported in the holdout, no daily budget.

    F1 needs both classes, so no threshold can be chosen: the version keeps none (the scoring
    policy's default applies) instead of training failing.
    """
    home = Home(tmp_path / "home").ensure()
    write_simulation(small_sim, home.data)
    labels = pq.read_table(home.data / "labels.parquet")
    start = pc.min(small_sim.transactions["event_time"]).as_py()
    early = labels.filter(pc.less(labels["reported_at"], pa.scalar(start + timedelta(days=5))))
    pq.write_table(early, tmp_path / "early_labels.parquet")
    outcome = train_challenger(
        home,
        history=home.data / "transactions.parquet",
        labels=tmp_path / "early_labels.parquet",
        label_delay_days=0,
        daily_budget=None,
    )
    uri = home.mlflow_tracking_uri
    assert load_holdout(uri, MODEL_NAME, outcome.version)["label"].nunique() == 1
    assert outcome.alert_threshold is None
    tags = mlflow_client(uri).get_model_version(MODEL_NAME, outcome.version).tags
    assert ALERT_THRESHOLD_TAG not in tags and ALERT_DAILY_BUDGET_TAG not in tags
    assert alert_threshold(uri, MODEL_NAME, outcome.version) is None
