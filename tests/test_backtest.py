"""The backtest protocol: metric functions on hand-computed cases, leakage, model, CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import roc_auc_score

from models.accounts import account_history, simulate_accounts
from models.backtest import (
    LITERATURE_FEATURES,
    BacktestResult,
    backtest,
    backtest_data,
    card_precision_at_k,
    known_compromised,
    literature_matrix,
    make_literature_baseline,
    normalize_labels,
    recall_at_daily_budget,
    scenario_recall,
)
from models.features import DELAYED_FEATURES, FEATURE_COLUMNS, replay
from models.label_delay import estimate_label_delay, reporting_delays
from models.schema import TIMESTAMP, parse_records
from models.simulate import Simulation, simulate, write_simulation
from models.training import CANDIDATES, feature_matrix, make_default_model, score

CLI = str(Path(sys.executable).parent / "streamguard")
CHANNEL_FEATURES = [c for c in FEATURE_COLUMNS if c.startswith("channel_")]
METRICS = ("roc_auc", "average_precision", "card_precision_at_k", "recall_at_budget")
JSON_KEYS = {
    *METRICS,
    "feature_delay_days",
    "k",
    "n_train",
    "n_test",
    "model",
    "baseline",
    "literature_baseline",
    "all_customers",
    "scenario_recall",
    "periods",
    "card_precision_at_k_ceiling",
}


SIM_SEED = 5


def _t(day: int, hour: int = 12) -> datetime:
    return datetime(2026, 1, day, hour, tzinfo=UTC)


# --------------------------------------------------------------------------- metrics


def _card_rows() -> pd.DataFrame:
    """Two days of card-level cases: max score per day, ties at the cut, a reported customer.

    Day 1: A (scores .9 legit, .2 fraud -> card .9, frauded), B .8 legit, C .7 fraud, D .1 legit.
    Day 2: A .95 fraud; E, F, G tied at .5 (E and G fraud); nobody else.
    """
    rows = [
        ("A", _t(1, 9), 0.9, 0),
        ("A", _t(1, 10), 0.2, 1),
        ("B", _t(1), 0.8, 0),
        ("C", _t(1), 0.7, 1),
        ("D", _t(1), 0.1, 0),
        ("A", _t(2), 0.95, 1),
        ("E", _t(2), 0.5, 1),
        ("F", _t(2), 0.5, 0),
        ("G", _t(2), 0.5, 1),
    ]
    return pd.DataFrame(rows, columns=["customer_id", "event_time", "score", "label"])


def test_card_precision_at_k_by_hand() -> None:
    rows = _card_rows()
    # Day 1 top 2: A (frauded), B -> 1/2. Day 2: A, then 1 slot among E, F, G (2 of 3 frauded)
    # -> (1 + 2/3) / 2. Mean of the days: (1/2 + 5/6) / 2.
    assert card_precision_at_k(rows, k=2) == pytest.approx((0.5 + 5 / 6) / 2)
    # Fewer candidates than k: precision over the cards there are (2/4 and 3/4).
    assert card_precision_at_k(rows, k=10) == pytest.approx((0.5 + 0.75) / 2)


def test_card_precision_at_k_leaves_out_reported_customers() -> None:
    rows = _card_rows()
    reported = pd.DataFrame(
        {
            "customer_id": ["B", "A"],
            # B before day 1; A during day 1: still ranked on day 1, blocked from day 2.
            "reported_at": [_t(1, 0) - timedelta(hours=1), _t(1, 15)],
        }
    )
    # Day 1 without B: A, C -> 1. Day 2 without A: 2 slots among E, F, G -> 2 * 2/3 / 2.
    assert card_precision_at_k(rows, 2, reported) == pytest.approx((1.0 + 2 / 3) / 2)
    # A report about somebody not in the data changes nothing.
    other = pd.DataFrame({"customer_id": ["Z"], "reported_at": [_t(1, 0)]})
    assert card_precision_at_k(rows, 2, other) == card_precision_at_k(rows, 2)


def test_card_precision_at_k_does_not_depend_on_row_order() -> None:
    rows = _card_rows()
    shuffled = rows.sample(frac=1.0, random_state=1).reset_index(drop=True)
    assert card_precision_at_k(shuffled, 1) == pytest.approx(card_precision_at_k(rows, 1))
    # k = 1 by hand: day 1 A -> 1; day 2 A -> 1.
    assert card_precision_at_k(rows, 1) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="k must be"):
        card_precision_at_k(rows, 0)


def _tx_rows() -> pd.DataFrame:
    rows = [
        (_t(1), 0.9, 1, "a"),
        (_t(1), 0.8, 0, None),
        (_t(1), 0.7, 1, "b"),
        (_t(1), 0.6, 1, "b"),
        (_t(2), 0.5, 1, "a"),
        (_t(2), 0.5, 0, None),
        (_t(2), 0.1, 1, "b"),
    ]
    frame = pd.DataFrame(rows, columns=["event_time", "score", "label", "fraud_scenario"])
    return frame.assign(customer_id="C")


def test_recall_at_daily_budget_by_hand() -> None:
    rows = _tx_rows()
    # 5 frauds. Budget 1: day 1 catches .9; day 2 half of the .5 tie -> 1.5 / 5.
    assert recall_at_daily_budget(rows, 1) == pytest.approx(1.5 / 5)
    # Budget 2: .9 (and .8 legit); both .5 -> 2 / 5.
    assert recall_at_daily_budget(rows, 2) == pytest.approx(2 / 5)
    # Budget 3: .9, .7 on day 1; .5 and .1 on day 2 -> 4 / 5.
    assert recall_at_daily_budget(rows, 3) == pytest.approx(4 / 5)
    assert math.isnan(recall_at_daily_budget(rows.assign(label=0), 3))


def test_scenario_recall_by_hand() -> None:
    rows = _tx_rows()
    assert scenario_recall(rows, 2) == pytest.approx({"a": 1.0, "b": 0.0})
    assert scenario_recall(rows, 1) == pytest.approx({"a": 0.75, "b": 0.0})
    assert scenario_recall(rows, 3) == pytest.approx({"a": 1.0, "b": 2 / 3})


# --------------------------------------------------------------------------- data and leakage


@pytest.fixture(scope="module")
def sim() -> Simulation:
    return simulate(days=35, customers=300, seed=SIM_SEED)


@pytest.fixture(scope="module")
def train_start(sim: Simulation) -> date:
    first: datetime = sim.transactions["event_time"][0].as_py()
    return first.date() + timedelta(days=14)


def test_a_label_reported_after_the_test_cannot_change_training(
    sim: Simulation, train_start: date
) -> None:
    base = backtest_data(sim.transactions, sim.labels, train_start)
    periods = base.periods
    legit = base.train.loc[base.train["label"] == 0]
    # Legitimate training transactions (one per terminal, so terminal features would move),
    # now reported as fraud, but only after the end of the test period.
    victims = legit.drop_duplicates("terminal_id").head(20)["transaction_id"]
    late = pa.table(
        {
            "transaction_id": pa.array(victims, pa.string()),
            "is_fraud": pa.array(np.ones(len(victims), bool)),
            "reported_at": pa.array([periods.test_end + timedelta(hours=1)] * len(victims)).cast(
                TIMESTAMP
            ),
            "fraud_scenario": pa.array(["late"] * len(victims), pa.string()),
        }
    )
    more = pa.concat_tables([sim.labels, late.cast(sim.labels.schema)])
    after = backtest_data(sim.transactions, more, train_start)
    pd.testing.assert_frame_equal(after.train, base.train)
    features = ["transaction_id", *FEATURE_COLUMNS]
    pd.testing.assert_frame_equal(after.test[features], base.test[features])

    # The same labels reported just before the test period do count: the check has teeth.
    early = late.set_column(
        2, "reported_at", pa.array([periods.test_start] * len(victims)).cast(TIMESTAMP)
    )
    known = backtest_data(
        sim.transactions, pa.concat_tables([sim.labels, early.cast(sim.labels.schema)]), train_start
    )
    assert int(known.train["label"].sum()) == int(base.train["label"].sum()) + len(victims)


def test_the_features_use_the_label_delay_training_would_estimate_at_the_test_start(
    sim: Simulation, train_start: date
) -> None:
    data = backtest_data(sim.transactions, sim.labels, train_start)
    start = data.periods.test_start
    before = sim.transactions.filter(pc.less(sim.transactions["event_time"], start.to_pydatetime()))
    estimate = estimate_label_delay(
        reporting_delays(
            before.select(["transaction_id", "event_time"]).to_pandas(),
            sim.labels.to_pandas(),
            start,
        )
    )
    assert data.feature_delay_days == estimate.days
    assert data.feature_delay_note == f"estimated: {estimate.describe()}"
    other = (estimate.days + 5) % 15
    given = backtest_data(sim.transactions, sim.labels, train_start, feature_delay_days=other)
    assert (given.feature_delay_days, given.feature_delay_note) == (other, f"given: {other} days")
    # The delayed windows are the replay's at that D, and differ from the estimate's.
    needed = sim.transactions.filter(
        pc.less(sim.transactions["event_time"], data.periods.test_end.to_pydatetime())
    )
    at_other = replay(needed, sim.labels, label_delay_days=other).features.to_pandas()
    expected = at_other.set_index("transaction_id").loc[given.train["transaction_id"]]
    np.testing.assert_allclose(
        given.train[DELAYED_FEATURES].to_numpy(),
        expected[DELAYED_FEATURES].to_numpy(),
        equal_nan=True,
    )
    assert not np.allclose(
        given.train[DELAYED_FEATURES].to_numpy(),
        data.train[DELAYED_FEATURES].to_numpy(),
        equal_nan=True,
    )


def test_labels_without_report_times_count_as_reported_after_the_delay(sim: Simulation) -> None:
    bare = sim.labels.select(["transaction_id", "is_fraud"])
    labels = normalize_labels(sim.transactions, bare, delay_days=3)
    times = sim.transactions.select(["transaction_id", "event_time"]).to_pandas()
    merged = labels.merge(times, on="transaction_id")
    assert len(labels) == sim.labels.num_rows and labels["reported_imputed"].all()
    assert (merged["reported_at"] - merged["event_time"] == pd.Timedelta(days=3)).all()

    # The label may also be a column of the transactions themselves.
    flags = pc.is_in(sim.transactions["transaction_id"], value_set=sim.labels["transaction_id"])
    inline = sim.transactions.append_column("is_fraud", flags)
    from_column = normalize_labels(inline, None)
    assert int(from_column["is_fraud"].sum()) == sim.labels.num_rows
    with pytest.raises(ValueError, match="is_fraud"):
        normalize_labels(sim.transactions, None)


def test_known_compromised_by_hand() -> None:
    when = pd.Timestamp(_t(10, 0))
    labels = pd.DataFrame(
        {
            "customer_id": ["A", "A", "B", "C", "D", None],
            "is_fraud": [True, True, True, False, True, True],
            "reported_at": [_t(9), _t(12), _t(10, 0), _t(1), _t(10, 1), _t(1)],
        }
    )
    # A (reported before), B (reported exactly then); not C (not a fraud), D (reported later).
    assert sorted(known_compromised(labels, when)) == ["A", "B"]


def test_the_test_set_leaves_out_customers_known_compromised_at_its_start(
    sim: Simulation, train_start: date
) -> None:
    data = backtest_data(sim.transactions, sim.labels, train_start)
    assert data.test_all is not None
    reported = data.labels.loc[data.labels["is_fraud"]]
    first = reported.groupby("customer_id")["reported_at"].min()
    known = set(first[first <= data.periods.test_start].index)
    everyone = set(data.test_all["customer_id"])
    assert known & everyone  # the simulation has such customers in the test week
    assert set(data.test["customer_id"]) == everyone - known
    # Nothing else changes: the rows kept are the whole period's rows of the others.
    kept = data.test_all.loc[~data.test_all["customer_id"].isin(known)].reset_index(drop=True)
    pd.testing.assert_frame_equal(data.test, kept)
    # Those customers carry a good share of the week's frauds (blocked-card retries among them).
    assert data.test_all["label"].sum() > data.test["label"].sum()


def test_literature_matrix_is_its_15_columns_with_nan_as_zero() -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.random((6, len(LITERATURE_FEATURES))), columns=LITERATURE_FEATURES)
    frame.loc[2, "mean_amount_30d"] = np.nan
    frame["card_blocked"] = 1.0  # a project feature the literature does not have
    matrix = literature_matrix(frame)
    assert list(matrix.columns) == list(LITERATURE_FEATURES) and len(LITERATURE_FEATURES) == 15
    assert matrix.loc[2, "mean_amount_30d"] == 0.0
    assert matrix.drop(index=2).equals(frame[list(LITERATURE_FEATURES)].drop(index=2))
    with pytest.raises(ValueError, match="terminal_risk_7d_delayed"):
        literature_matrix(frame.drop(columns=["terminal_risk_7d_delayed"]))


def test_literature_baseline_learns_from_its_features_only() -> None:
    """Scaled logistic regression on the 15 columns: a signal in one of them is learnt, a signal
    in a project feature it does not take is not."""
    rng = np.random.default_rng(1)
    n = 4000
    frame = pd.DataFrame(
        rng.normal(size=(n, len(LITERATURE_FEATURES))), columns=LITERATURE_FEATURES
    )
    frame["amount"] = rng.lognormal(3, 1, n)
    frame["card_blocked"] = (rng.random(n) < 0.05).astype(np.float64)
    train, test = frame.iloc[: n // 2], frame.iloc[n // 2 :]

    def fitted(label: pd.Series) -> np.ndarray:
        model = make_literature_baseline().fit(literature_matrix(train), label.iloc[: n // 2])
        assert list(model.feature_names_in_) == list(LITERATURE_FEATURES)
        # Standard scaling: the fitted means are the training columns' (NaN counted as 0).
        np.testing.assert_allclose(
            model.named_steps["scale"].mean_, literature_matrix(train).mean()
        )
        return np.asarray(model.predict_proba(literature_matrix(test))[:, 1])

    risky = (frame["terminal_risk_7d_delayed"] > 1.5).astype(int)
    assert roc_auc_score(risky.iloc[n // 2 :], fitted(risky)) > 0.95
    blocked = frame["card_blocked"].astype(int)
    assert roc_auc_score(blocked.iloc[n // 2 :], fitted(blocked)) < 0.65


def test_periods_outside_the_data_are_refused(sim: Simulation, train_start: date) -> None:
    for start in (train_start - timedelta(days=30), train_start + timedelta(days=30)):
        with pytest.raises(ValueError, match="the data covers"):
            backtest_data(sim.transactions, sim.labels, start)


# --------------------------------------------------------------------------- the backtest


@pytest.fixture(scope="module")
def result(sim: Simulation, train_start: date) -> BacktestResult:
    return backtest(sim.transactions, sim.labels, train_start, k=50)


def test_backtest_reports_both_models(result: BacktestResult, train_start: date) -> None:
    out = json.loads(result.to_json())
    assert set(out) >= JSON_KEYS
    assert out["k"] == 50 and out["n_train"] > 0 and out["n_test"] > 0
    assert out["periods"]["train_start"].startswith(train_start.isoformat())
    assert out["periods"]["test_start"].startswith((train_start + timedelta(14)).isoformat())
    for block in (out, out["model"], out["baseline"], out["literature_baseline"]):
        for name in METRICS:
            assert 0.0 <= block[name] <= 1.0, (name, block[name])
        assert block["scenario_recall"]
        assert all(0.0 <= v <= 1.0 for v in block["scenario_recall"].values())
    assert out["model"]["name"] == "blend"
    estimator = "LogitBlend(HistGradientBoostingClassifier, LogisticRegression)"
    assert out["model"]["estimator"] == estimator
    assert out["baseline"]["name"] == "LogisticRegression"
    assert out["literature_baseline"]["features"] == list(LITERATURE_FEATURES)
    assert out["card_precision_at_k"] <= out["card_precision_at_k_ceiling"] + 1e-12
    # A useful ranking, not a coin: far above the fraud rate on average precision.
    assert out["average_precision"] > 2 * out["n_test_fraud"] / out["n_test"]

    preds = result.predictions
    assert len(preds) == result.n_test
    assert set(preds["label"].unique()) <= {0, 1} and preds["score"].between(0, 1).all()
    assert preds["literature_score"].between(0, 1).all()
    assert result.predictions_table().num_rows == len(preds)
    times = pd.to_datetime(preds["event_time"], utc=True)
    assert times.min() >= result.periods.test_start and times.max() < result.periods.test_end
    pngs = result.plots()
    assert set(pngs) == {"pr_curve.png", "score_distribution.png"}
    assert all(png.startswith(b"\x89PNG\r\n\x1a\n") for png in pngs.values())


def test_optional_fields_absent_leave_features_null_and_still_train_and_score(
    sim: Simulation, train_start: date
) -> None:
    # A dataset with no channel and no location at all (both optional in the contract).
    bare = sim.transactions.drop_columns(["channel", "location"])
    data = backtest_data(bare, sim.labels, train_start)
    unknown = ["location_seen_before", *CHANNEL_FEATURES]
    assert data.train[unknown].isna().all().all() and data.test[unknown].isna().all().all()
    assert (data.test["n_locations_seen"] == 0).all()  # a count: no location ever seen
    assert data.test[["amount", "balance_before", "count_1d"]].notna().all().all()
    result = backtest(bare, sim.labels, train_start, k=50)
    for block in (result.model, result.baseline):
        assert 0.5 < block["roc_auc"] <= 1.0 and 0.0 < block["average_precision"] <= 1.0
    assert result.predictions["score"].between(0, 1).all()
    # A model fitted without those fields scores rows that have them, and the other way round.
    full = backtest_data(sim.transactions, sim.labels, train_start)
    bare_model = make_default_model().fit(feature_matrix(data.train), data.train["label"])
    assert np.isfinite(score(bare_model, full.test)).all()
    full_model = make_default_model().fit(feature_matrix(full.train), full.train["label"])
    assert np.isfinite(score(full_model, data.test)).all()


def test_backtest_of_a_named_candidate(sim: Simulation, train_start: date) -> None:
    # The logistic-regression candidate is the baseline's model: same rows, same scores.
    lr = backtest(sim.transactions, sim.labels, train_start, k=50, candidate="logistic_regression")
    assert lr.model["name"] == "logistic_regression"
    np.testing.assert_allclose(lr.predictions["score"], lr.predictions["baseline_score"])
    assert lr.model["average_precision"] == pytest.approx(lr.baseline["average_precision"])
    with pytest.raises(ValueError, match="unknown model"):
        backtest(sim.transactions, sim.labels, train_start, candidate="xgboost")


# --------------------------------------------------------------------------- the CLI


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=120)


def test_cli_backtest_end_to_end(sim: Simulation, train_start: date, tmp_path: Path) -> None:
    tx_path, labels_path = write_simulation(sim, tmp_path / "data")
    accounts = tmp_path / "data" / "accounts_history.parquet"
    pq.write_table(account_history(simulate_accounts(sim, seed=SIM_SEED)), accounts)
    metrics, preds = tmp_path / "out" / "metrics.json", tmp_path / "out" / "preds.parquet"
    done = _run(
        "backtest", "--transactions", str(tx_path), "--labels", str(labels_path),
        "--train-start", train_start.isoformat(), "--train-days", "7", "--delay-days", "7",
        "--test-days", "7", "--k", "50", "--output", str(metrics), "--predictions", str(preds),
        "--accounts", str(accounts),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(metrics.read_text())
    assert set(out) >= JSON_KEYS and out["n_test"] > 0
    assert pq.read_table(preds).num_rows == out["n_test"]
    assert out["hard_rules"]["blocked_card_frauds"] > 0


def test_cli_backtest_reads_csv_with_inline_labels(
    sim: Simulation, train_start: date, tmp_path: Path
) -> None:
    flags = pc.is_in(sim.transactions["transaction_id"], value_set=sim.labels["transaction_id"])
    csv_path = tmp_path / "transactions.csv"
    pacsv.write_csv(sim.transactions.append_column("is_fraud", flags), csv_path)
    metrics = tmp_path / "metrics.json"
    done = _run(
        "backtest", "--transactions", str(csv_path), "--train-start", train_start.isoformat(),
        "--output", str(metrics), "--model", "random_forest",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = json.loads(metrics.read_text())
    # One label per transaction (is_fraud true or false), none with a report time.
    assert out["labels_imputed"] == sim.transactions.num_rows and out["n_test"] > 0
    assert out["scenario_recall"] == {}  # no scenarios without a labels table
    assert out["model"]["name"] == "random_forest"
    assert out["model"]["estimator"] == "RandomForestClassifier"


def test_cli_backtest_help_names_every_model() -> None:
    done = _run("backtest", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert all(name in text for name in CANDIDATES), text


def test_cli_backtest_errors_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.parquet"
    done = _run(
        "backtest", "--transactions", str(missing), "--train-start", "2026-01-15",
        "--output", str(tmp_path / "m.json"),
    )  # fmt: skip
    assert done.returncode == 1
    assert done.stderr == f"streamguard backtest: error: no such file: {missing}\n"


def test_cli_replay_pushes_in_event_time_order(
    kinesis_server: str, kinesis: object, stream_name: str, tmp_path: Path
) -> None:
    from streamguard.kinesis import list_shards, read_shard

    data = simulate(days=2, customers=10, seed=11).transactions.slice(0, 40)
    shuffled = data.take(np.random.default_rng(0).permutation(data.num_rows))
    path = tmp_path / "shuffled.parquet"
    pq.write_table(shuffled, path)
    done = _run(
        "replay", str(path), "--stream", stream_name, "--rate", "25", "--endpoint", kinesis_server
    )
    assert done.returncode == 0, done.stderr
    seen = 0
    for shard in list_shards(kinesis, stream_name):  # type: ignore[arg-type]
        records = read_shard(kinesis, stream_name, shard.shard_id, None)  # type: ignore[arg-type]
        times = parse_records([r.data for r in records]).valid["event_time"].to_pylist()
        assert times == sorted(times)
        seen += len(times)
    assert seen == data.num_rows


def test_with_the_banks_accounts_the_hard_rules_are_reported(
    sim: Simulation, train_start: date, result: BacktestResult
) -> None:
    """The account history makes the features see blocked cards; the report says what the hard
    rules caught: in the simulation only fraudsters pay with a blocked card."""
    history = account_history(simulate_accounts(sim, seed=SIM_SEED))
    with_accounts = backtest(sim.transactions, sim.labels, train_start, k=50, accounts=history)
    assert result.hard_rules is None and "hard_rules" not in result.to_dict()
    rules = with_accounts.to_dict()["hard_rules"]
    blocked = rules["blocked_card"]
    assert blocked["hits"] > 0 and blocked["fraud_hits"] == blocked["hits"]
    assert rules["blocked_card_frauds"] > 0 and rules["blocked_card_recall"] == 1.0
    # Reported over the whole test period: the cards the bank blocked belong to the customers
    # the protocol's test set leaves out.
    assert with_accounts.all_customers is not None
    assert rules["frauds"] == with_accounts.all_customers["n_test_fraud"]
    assert rules["blocked_card_frauds"] <= rules["frauds_caught"] <= rules["frauds"]
    # The same rows, other features: the model saw the bank's facts.
    assert with_accounts.n_test == result.n_test
    assert not np.array_equal(with_accounts.predictions["score"], result.predictions["score"])
