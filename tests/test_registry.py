"""The fraud model in a real MLflow SQLite store: log, register, promote, load by alias."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import skops.io
from mlflow.models import Model

from models.features import FEATURE_COLUMNS, FEATURE_VERSION, KEY_COLUMNS
from models.promotion import PromotionDecision, promote_if_better
from models.registry import (
    CHAMPION,
    MODEL_NAME,
    SKOPS_TRUSTED_TYPES,
    NoChampionError,
    load_model,
    log_and_register,
    mlflow_client,
    pip_requirements,
    resolve_version,
)
from models.training import TrainResult, score, time_split, train, training_frame

T0 = pd.Timestamp("2026-01-01", tz="UTC")
CUTOFF = T0 + pd.Timedelta(days=45)
DELAY = pd.Timedelta(days=7)
WEAK = {"max_iter": 1, "max_leaf_nodes": 2, "early_stopping": False}
WEAKER_THAN_GOOD = {"max_iter": 2, "max_leaf_nodes": 3, "early_stopping": False}


def synthetic(n: int = 6000, days: int = 40, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Feature rows with a learnable but noisy fraud signal and NaNs, and their fraud labels."""
    rng = np.random.default_rng(seed)
    times = (T0 + pd.to_timedelta(np.sort(rng.uniform(0, days * 86_400, n)), unit="s")).as_unit(
        "us"
    )
    fraud = rng.random(n) < 0.05
    # Noise for every feature from its own stream, so a new feature column leaves the signal
    # columns' draws (and which model is weaker) unchanged.
    noise = np.random.default_rng([seed, 1])
    cols = {c: noise.normal(size=n) for c in FEATURE_COLUMNS}
    cols["amount"] = rng.lognormal(np.where(fraud, 4.3, 3.5), 1.0)
    cols["balance_before"] = rng.uniform(np.where(fraud, 50, 100), np.where(fraud, 2000, 5000))
    cols["amount_balance_ratio"] = cols["amount"] / cols["balance_before"]
    cols["location_seen_before"] = (rng.random(n) > np.where(fraud, 0.35, 0.1)).astype(float)
    cols["location_seen_before"][rng.random(n) < 0.2] = np.nan
    cols["terminal_fraud_rate_7d"] = rng.beta(1, np.where(fraud, 25, 60))
    cols["count_1h"] = rng.poisson(np.where(fraud, 1.0, 0.4)).astype(float)
    features = pd.DataFrame(
        {
            "transaction_id": [f"tx{i:06d}" for i in range(n)],
            "event_time": times,
            "customer_id": [f"C{i % 300:04d}" for i in range(n)],
            "terminal_id": [f"T{i % 97:03d}" for i in range(n)],
            **{c: cols[c].astype(np.float64) for c in FEATURE_COLUMNS},
        }
    )
    labels = pd.DataFrame(
        {
            "transaction_id": features["transaction_id"][fraud].to_numpy(),
            "is_fraud": True,
            "reported_at": (times[fraud] + pd.Timedelta(days=3)).as_unit("us"),
            "fraud_scenario": "synthetic",
        }
    )
    return features, labels


@dataclass
class Scenario:
    """One store, driven through: weak model (first), good model (better), weaker (worse)."""

    uri: str
    artifacts: Path
    cwd: Path
    holdout: pd.DataFrame
    good: TrainResult
    versions: list[str] = field(default_factory=list)
    decisions: list[PromotionDecision] = field(default_factory=list)
    champion_after: list[str] = field(default_factory=list)
    log_seconds: list[float] = field(default_factory=list)


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenario]:
    home = tmp_path_factory.mktemp("home")
    cwd = tmp_path_factory.mktemp("cwd")
    features, labels = synthetic()
    weak = train(features, labels, CUTOFF, DELAY, params=WEAK)
    good = train(features, labels, CUTOFF, DELAY)
    weaker = train(features, labels, CUTOFF, DELAY, params=WEAKER_THAN_GOOD)
    _, holdout = time_split(training_frame(features, labels, CUTOFF, DELAY))
    uri = f"sqlite:///{home}/mlflow/mlflow.db"
    s = Scenario(uri, home / "mlflow" / "artifacts", cwd, holdout, good)
    with pytest.MonkeyPatch.context() as mp:
        # Nothing may depend on, or leave behind, MLflow's process-global tracking settings.
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.delenv("MLFLOW_REGISTRY_URI", raising=False)
        mp.chdir(cwd)
        started = time.perf_counter()
        mlflow_client(uri).search_experiments()  # creates the SQLite schema
        print(f"\nnew SQLite tracking store: {time.perf_counter() - started:.2f}s")
        for result in (weak, good, weaker):
            started = time.perf_counter()
            version = log_and_register(result, uri, s.artifacts)
            s.log_seconds.append(time.perf_counter() - started)
            s.versions.append(version)
            s.decisions.append(promote_if_better(uri, MODEL_NAME, version, holdout))
            s.champion_after.append(resolve_version(uri, MODEL_NAME, CHAMPION))
        print(f"log_and_register: {', '.join(f'{t:.2f}s' for t in s.log_seconds)}")
        yield s


def test_first_version_is_registered_and_becomes_champion(scenario: Scenario) -> None:
    assert scenario.versions == ["1", "2", "3"]
    first = scenario.decisions[0]
    assert first.promoted and first.champion_version_before is None
    assert first.champion_metric is None
    assert scenario.champion_after[0] == "1"


def test_better_model_is_promoted_and_worse_is_not(scenario: Scenario) -> None:
    _, better, worse = scenario.decisions
    assert better.promoted and better.champion_version_before == "1"
    assert better.champion_metric is not None and better.candidate_metric > better.champion_metric
    assert not worse.promoted and worse.champion_version_before == "2"
    assert worse.champion_metric is not None
    assert worse.candidate_metric <= worse.champion_metric
    assert scenario.champion_after == ["1", "2", "2"]

    client = mlflow_client(scenario.uri)
    tags = {v: client.get_model_version(MODEL_NAME, v).tags for v in scenario.versions}
    assert [tags[v]["promotion.decision"] for v in scenario.versions] == [
        "promoted",
        "promoted",
        "rejected",
    ]
    assert tags["1"]["promotion.replaced_by"] == "2"
    assert tags["3"]["promotion.champion_version_before"] == "2"
    assert float(tags["3"]["promotion.champion_value"]) == worse.champion_metric
    assert tags["2"]["promotion.metric"] == "average_precision"
    assert int(tags["2"]["promotion.holdout_rows"]) == len(scenario.holdout)


def test_promoting_the_champion_again_changes_nothing(scenario: Scenario) -> None:
    decision = promote_if_better(scenario.uri, MODEL_NAME, "2", scenario.holdout)
    assert not decision.promoted and "already" in decision.reason
    assert resolve_version(scenario.uri) == "2"
    tags = mlflow_client(scenario.uri).get_model_version(MODEL_NAME, "2").tags
    assert tags["promotion.decision"] == "promoted"


def test_run_and_version_carry_the_training_metadata(scenario: Scenario) -> None:
    client = mlflow_client(scenario.uri)
    version = client.get_model_version(MODEL_NAME, "2")
    run = client.get_run(version.run_id)
    good = scenario.good
    params = run.data.params
    assert params["feature_version"] == FEATURE_VERSION
    assert pd.Timestamp(params["cutoff"]) == CUTOFF
    assert pd.Timedelta(params["label_delay"]) == DELAY
    assert pd.Timestamp(params["train_start"]) == good.train_start
    assert pd.Timestamp(params["train_end"]) == good.train_end
    assert int(params["n_train"]) == good.n_train and int(params["n_holdout"]) == good.n_holdout
    assert params["boosting__model__random_state"] == "0" and params["class_weight"] == "None"
    metrics = run.data.metrics
    assert metrics["holdout_average_precision"] == pytest.approx(good.metrics["average_precision"])
    assert metrics["holdout_roc_auc"] == pytest.approx(good.metrics["roc_auc"])
    assert json.loads(run.data.tags["feature_columns"]) == FEATURE_COLUMNS
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(scenario.artifacts.resolve().as_uri())

    tags = version.tags
    assert json.loads(tags["feature_columns"]) == FEATURE_COLUMNS
    assert tags["feature_version"] == FEATURE_VERSION
    assert pd.Timestamp(tags["cutoff"]) == CUTOFF
    assert float(tags["holdout_average_precision"]) == good.metrics["average_precision"]
    logged = client.get_logged_model(tags["model_id"])  # the SQL store keeps no version.model_id
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": MODEL_NAME, "version": 2}]

    meta = Model.load(version.source.removeprefix("file://"))
    assert meta.signature is not None
    inputs = meta.signature.inputs.inputs
    assert [c.name for c in inputs] == FEATURE_COLUMNS
    assert not any(c.required for c in inputs)  # NaN is a valid value of every feature
    assert meta.saved_input_example_info is not None
    assert meta.flavors["sklearn"]["serialization_format"] == "skops"


def test_pip_requirements_are_explicit(scenario: Scenario) -> None:
    source = mlflow_client(scenario.uri).get_model_version_download_uri(MODEL_NAME, "1")
    path = Path(source.removeprefix("file://")) / "requirements.txt"
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    # Exactly what we pinned (MLflow adds itself); nothing inferred by loading the model.
    assert set(lines) == {f"mlflow=={mlflow.__version__}", *pip_requirements()}
    assert {ln.split("==")[0] for ln in pip_requirements()} == {
        "scikit-learn",
        "skops",
        "pandas",
        "numpy",
    }
    print(f"\nlog_and_register took {', '.join(f'{t:.2f}s' for t in scenario.log_seconds)}")


def test_load_by_alias_returns_the_champion(scenario: Scenario) -> None:
    started = time.perf_counter()
    loaded = load_model(scenario.uri)
    print(f"\nload_model(champion): {time.perf_counter() - started:.3f}s")
    assert (loaded.name, loaded.version) == (MODEL_NAME, "2")
    p = score(loaded.model, scenario.holdout)
    assert p.shape == (len(scenario.holdout),)
    assert ((p >= 0) & (p <= 1)).all()
    # The round trip through skops is exact.
    assert np.array_equal(p, score(scenario.good.model, scenario.holdout))
    # Scoring takes the feature columns from a wider frame (keys first, as the job passes it).
    wide = scenario.holdout[[*KEY_COLUMNS, *reversed(FEATURE_COLUMNS)]]
    assert np.array_equal(score(loaded.model, wide), p)

    assert load_model(scenario.uri, MODEL_NAME, "1").version == "1"


def test_missing_champion_is_a_clear_error(scenario: Scenario) -> None:
    with pytest.raises(NoChampionError, match="alias 'champion'"):
        load_model(scenario.uri, "no_such_model")
    with pytest.raises(NoChampionError, match="challenger"):
        resolve_version(scenario.uri, MODEL_NAME, "challenger")
    with pytest.raises(LookupError, match="no version 99"):
        load_model(scenario.uri, MODEL_NAME, "99")


def test_champion_on_another_feature_version_is_replaced(scenario: Scenario) -> None:
    name = "fraud_model_feature_change"
    client = mlflow_client(scenario.uri)
    first = log_and_register(scenario.good, scenario.uri, scenario.artifacts, name=name)
    assert promote_if_better(scenario.uri, name, first, scenario.holdout).promoted
    client.set_model_version_tag(name, first, "feature_version", "0")
    second = log_and_register(scenario.good, scenario.uri, scenario.artifacts, name=name)
    decision = promote_if_better(scenario.uri, name, second, scenario.holdout)
    assert decision.promoted and "feature version" in decision.reason
    assert resolve_version(scenario.uri, name) == second


def test_skops_trusted_types_are_exactly_what_the_model_needs(scenario: Scenario) -> None:
    dumped = skops.io.dumps(scenario.good.model)
    assert sorted(skops.io.get_untrusted_types(data=dumped)) == sorted(SKOPS_TRUSTED_TYPES)
    with pytest.raises(skops.io.exceptions.UntrustedTypesFoundException):
        skops.io.loads(dumped, trusted=[])


def test_no_global_mlflow_state_is_used_or_left(scenario: Scenario) -> None:
    assert not any(scenario.cwd.iterdir())  # no ./mlflow.db or ./mlruns from a default client
    assert os.environ.get("MLFLOW_TRACKING_URI") != scenario.uri
    assert mlflow.get_tracking_uri() != scenario.uri
