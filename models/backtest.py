"""The standard fraud backtest: train on a week, wait for its labels, test on the next week.

A holdout split inside the training data (as `models.training.train` does for promotion) says
little about how the model does in production, where it scores transactions days after the last
label it learned from and an analyst can only look at so many cards a day. This module replays
the protocol of the fraud-detection literature (Le Borgne et al., "Reproducible machine learning
for credit card fraud detection", ch. 5): features replayed point in time from the first day of
data, a training week labelled with what was reported by the start of the test week, a delay
period the model never sees, and a test week measured with ranking metrics and with the metrics
of an alert budget (card precision@k, recall at a daily budget), for the default model and two
logistic-regression baselines trained on the same rows: the literature's own (its 15 features,
`LITERATURE_FEATURES`), the floor a new model must clear, and one on the project's features.

As in the literature, the test period leaves out the customers already known to be compromised
when it starts (a fraud of theirs reported by then): their card is blocked, and finding them
again would inflate every metric. The metrics of the whole test period are kept beside
(`BacktestResult.all_customers`). Ground truth in the test week is every label eventually given
(hindsight): the point of the backtest is how good the scores were, not what was known when they
were made.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from models.features import replay
from models.label_delay import estimate_label_delay, reporting_delays
from models.rules import HARD_RULES, AlertPolicy, rule_hits
from models.schema import LABEL_SCHEMA, TIMESTAMP, TRANSACTION_SCHEMA
from models.training import (
    BASELINE_CLASS_WEIGHT,
    CANDIDATES,
    DEFAULT_CANDIDATE,
    RANDOM_STATE,
    feature_matrix,
    make_baseline,
    make_candidate,
    openmp_limit,
    score,
)

__all__ = [
    "BASELINE_CLASS_WEIGHT",
    "LITERATURE_FEATURES",
    "PREDICTION_SCHEMA",
    "BacktestData",
    "BacktestResult",
    "Periods",
    "backtest",
    "backtest_data",
    "card_precision_at_k",
    "known_compromised",
    "literature_matrix",
    "make_baseline",
    "make_literature_baseline",
    "normalize_labels",
    "pr_curve_png",
    "read_dataset",
    "recall_at_daily_budget",
    "scenario_recall",
    "score_distribution_png",
]

_DAY = pd.Timedelta(days=1)
# One row per test transaction: both models' scores and the ground truth.
PREDICTION_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("score", pa.float64(), nullable=False),
        pa.field("baseline_score", pa.float64(), nullable=False),
        pa.field("literature_score", pa.float64(), nullable=False),
        pa.field("label", pa.int64(), nullable=False),
        pa.field("fraud_scenario", pa.string()),
    ]
)


# --------------------------------------------------------------------------- metrics


def _days(times: pd.Series) -> pd.Series:
    """The UTC calendar day of each time (naive times are taken to be UTC)."""
    return pd.to_datetime(times, utc=True).dt.floor("D")


def _budget_shares(day: pd.Series, scores: pd.Series, budget: int) -> np.ndarray:
    """Per row, how much of it is alerted when each day's `budget` highest scores are.

    Rows tied at the cut share the slots left equally (the expected outcome of a random
    tie-break), so a metric never depends on the order rows happen to be in. NaN scores are never
    alerted.
    """
    if budget < 1:
        raise ValueError(f"the daily budget must be >= 1, got {budget}")
    frame = pd.DataFrame({"day": day.to_numpy(), "score": scores.to_numpy(dtype=np.float64)})
    tied = frame.groupby(["day", "score"]).size().rename("tied").reset_index()
    tied = tied.sort_values(["day", "score"], ascending=[True, False], kind="stable")
    above = tied.groupby("day")["tied"].cumsum() - tied["tied"]
    slots = np.clip(budget - above.to_numpy(), 0, tied["tied"].to_numpy())
    tied["share"] = slots / tied["tied"].to_numpy()
    shares = frame.merge(tied[["day", "score", "share"]], on=["day", "score"], how="left")
    return shares["share"].fillna(0.0).to_numpy(dtype=np.float64)


def card_precision_at_k(
    predictions: pd.DataFrame, k: int, reported: pd.DataFrame | None = None
) -> float:
    """Mean daily share of frauded cards among the k cards an analyst would check each day.

    Analysts investigate cards (customers), not transactions, and a fixed number a day, so this
    is the metric of the alert queue. Per UTC day, customers are ranked by their highest score of
    the day; a customer counts as a hit if any of their transactions that day is fraudulent.
    Customers with a fraud already reported before the day (`reported`: customer_id,
    reported_at) are left out of that day's ranking: their card is blocked, finding them again
    is worth nothing. Precision is over the cards alerted, min(k, candidates); ties at the cut
    count pro rata. NaN when no day has a candidate.

    `predictions` has customer_id, event_time, score and label (1/True = fraud).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    frame = pd.DataFrame(
        {
            "day": _days(predictions["event_time"]).to_numpy(),
            "customer_id": predictions["customer_id"].to_numpy(),
            "score": predictions["score"].to_numpy(dtype=np.float64),
            "fraud": predictions["label"].to_numpy().astype(np.float64),
        }
    )
    cards = frame.groupby(["day", "customer_id"], as_index=False).agg(
        score=("score", "max"), fraud=("fraud", "max")
    )
    if reported is not None and len(reported):
        first = pd.to_datetime(reported["reported_at"], utc=True).groupby(
            reported["customer_id"].to_numpy()
        )
        known_since = cards["customer_id"].map(first.min())
        cards = cards.loc[~(known_since < cards["day"]).to_numpy()]
    if cards.empty:
        return math.nan
    share = _budget_shares(cards["day"], cards["score"], k)
    daily = (
        pd.DataFrame(
            {
                "day": cards["day"].to_numpy(),
                "hit": share * cards["fraud"].to_numpy(),
                "alerted": share,
            }
        )
        .groupby("day")[["hit", "alerted"]]
        .sum()
    )
    return float((daily["hit"] / daily["alerted"]).mean())


def recall_at_daily_budget(predictions: pd.DataFrame, budget: int) -> float:
    """Share of fraudulent transactions caught when each day only `budget` alerts are raised.

    The counterpart of card precision: what the same fixed daily capacity misses. Frauds are
    pooled over all days (a day with more fraud weighs more). Ties at the cut count pro rata;
    NaN when there is no fraud.
    """
    fraud = predictions["label"].to_numpy().astype(bool)
    if not fraud.any():
        return math.nan
    share = _budget_shares(_days(predictions["event_time"]), predictions["score"], budget)
    return float(share[fraud].sum() / fraud.sum())


def scenario_recall(predictions: pd.DataFrame, budget: int) -> dict[str, float]:
    """`recall_at_daily_budget` per fraud scenario: which kinds of fraud the budget misses.

    A fraud row is one with a `fraud_scenario` (and label 1 when a `label` column is present);
    the budget is spent over all rows of the day, legitimate ones included.
    """
    scenario = predictions["fraud_scenario"]
    fraud = scenario.notna().to_numpy()
    if "label" in predictions.columns:
        fraud = fraud & predictions["label"].to_numpy().astype(bool)
    share = _budget_shares(_days(predictions["event_time"]), predictions["score"], budget)
    recall = pd.Series(share[fraud]).groupby(scenario.to_numpy()[fraud]).mean()
    return {str(name): float(value) for name, value in recall.sort_index().items()}


# --------------------------------------------------------------------------- data


def read_dataset(path: Path | str) -> pa.Table:
    """A Parquet or CSV file as an Arrow table; CSV columns of the known contracts get their types.

    CSV is what people export by hand, so its columns are parsed to the types of
    TRANSACTION_SCHEMA / LABEL_SCHEMA (timestamps ISO-8601 with zone) and empty strings are null.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix.lower() in (".csv", ".txt") or path.name.lower().endswith(".csv.gz"):
        types = {f.name: f.type for f in (*TRANSACTION_SCHEMA, *LABEL_SCHEMA)}
        try:
            return pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(column_types=types, strings_can_be_null=True),
            )
        except pa.ArrowInvalid as exc:
            raise ValueError(f"{path}: {str(exc).splitlines()[0]}") from None
    return pq.read_table(path)


def _transactions(table: pa.Table) -> pa.Table:
    """The table held to TRANSACTION_SCHEMA (absent optional columns null), sorted by time."""
    missing = [
        f.name for f in TRANSACTION_SCHEMA if not f.nullable and f.name not in table.schema.names
    ]
    if missing:
        raise ValueError(f"transactions lack required column(s) {', '.join(missing)}")
    for f in TRANSACTION_SCHEMA:
        if f.name not in table.schema.names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, f.type))
    table = table.select(TRANSACTION_SCHEMA.names).cast(TRANSACTION_SCHEMA)
    return table.sort_by([("event_time", "ascending")])


def normalize_labels(
    transactions: pa.Table, labels: pa.Table | None, delay_days: float = 7
) -> pd.DataFrame:
    """Labels as transaction_id, is_fraud, reported_at, fraud_scenario, reported_imputed.

    Accepts LABEL_SCHEMA, a bare (transaction_id, is_fraud) table, or no table and an `is_fraud`
    column inside `transactions`. A label without `reported_at` counts as reported `delay_days`
    after its transaction: the usual assumption when only the final fraud flag is kept.
    Labels of transactions not in `transactions` are dropped.
    """
    source = labels if labels is not None else transactions
    if "is_fraud" not in source.schema.names or "transaction_id" not in source.schema.names:
        where = "the labels" if labels is not None else "the transactions (no labels given)"
        raise ValueError(f"{where} need transaction_id and is_fraud columns")
    wanted = ("transaction_id", "is_fraud", "reported_at", "fraud_scenario")
    frame = source.select([c for c in wanted if c in source.schema.names]).to_pandas()
    frame = frame.loc[frame["is_fraud"].notna()]
    if "reported_at" not in frame.columns:
        frame["reported_at"] = pd.Series(pd.NaT, index=frame.index, dtype="datetime64[us, UTC]")
    if "fraud_scenario" not in frame.columns:
        frame["fraud_scenario"] = None
    keys = pa.schema([("transaction_id", pa.string()), ("event_time", TIMESTAMP)])
    times = transactions.select(keys.names).cast(keys).to_pandas()
    frame = frame.merge(times, on="transaction_id", how="inner")
    reported = pd.to_datetime(frame["reported_at"], utc=True)
    imputed = reported.isna()
    delay = pd.Timedelta(days=delay_days)
    frame["reported_at"] = reported.where(
        ~imputed, pd.to_datetime(frame["event_time"], utc=True) + delay
    )
    frame["reported_imputed"] = imputed.to_numpy()
    frame["is_fraud"] = frame["is_fraud"].astype(bool)
    frame["fraud_scenario"] = frame["fraud_scenario"].where(frame["is_fraud"], None)
    columns = ["transaction_id", "is_fraud", "reported_at", "fraud_scenario", "reported_imputed"]
    return frame[columns].reset_index(drop=True)


def _latest(labels: pd.DataFrame, cutoff: pd.Timestamp | None = None) -> pd.DataFrame:
    """One row per transaction: the latest label reported by `cutoff` (None: ever)."""
    known = labels if cutoff is None else labels.loc[labels["reported_at"] <= cutoff]
    return known.sort_values("reported_at", kind="stable").drop_duplicates(
        "transaction_id", keep="last"
    )


def _label_table(labels: pd.DataFrame) -> pa.Table:
    """What `models.features.replay` takes: fraud labels with the time they were reported."""
    return pa.table(
        {
            "transaction_id": pa.array(labels["transaction_id"], pa.string()),
            "is_fraud": pa.array(labels["is_fraud"], pa.bool_()),
            "reported_at": pa.array(labels["reported_at"]).cast(TIMESTAMP),
        }
    )


@dataclass(frozen=True)
class Periods:
    """The protocol's boundaries (UTC midnights, each period [start, end)) and the data's span."""

    data_start: pd.Timestamp  # first day of the data: features are replayed from here
    data_end: pd.Timestamp  # the last transaction's time
    train_start: pd.Timestamp
    train_end: pd.Timestamp
    test_start: pd.Timestamp  # also the label cut-off of the training rows
    test_end: pd.Timestamp

    @classmethod
    def of(
        cls,
        data: tuple[pd.Timestamp, pd.Timestamp],
        train_start: date | datetime | str,
        days: tuple[int, int, int],
    ) -> Periods:
        """Periods of (train, delay, test) days from `train_start`, for data spanning `data`."""
        train, delay, test = days
        start = pd.Timestamp(train_start)
        start = start.tz_localize("UTC") if start.tzinfo is None else start.tz_convert("UTC")
        start = start.floor("D")
        train_end = start + train * _DAY
        test_start = train_end + delay * _DAY
        return cls(
            data[0].floor("D"), data[1], start, train_end, test_start, test_start + test * _DAY
        )

    def to_dict(self) -> dict[str, str]:
        return {name: str(value.isoformat()) for name, value in self.__dict__.items()}


@dataclass(frozen=True)
class BacktestData:
    """Point-in-time feature rows of both periods, with their labels."""

    periods: Periods
    train: pd.DataFrame  # KEY_COLUMNS + FEATURE_COLUMNS + label (as known at test_start)
    # ... + label (ground truth) + fraud_scenario: the test period without the customers known
    # to be compromised when it starts (the protocol's test set)
    test: pd.DataFrame
    labels: pd.DataFrame  # normalize_labels(...), with customer_id
    # The whole test period, those customers included (None: same as `test`).
    test_all: pd.DataFrame | None = None
    # The label delay D of the features' delayed terminal windows, and where it came from.
    feature_delay_days: int = 7
    feature_delay_note: str = ""


def backtest_data(
    transactions: pa.Table,
    labels: pa.Table | None,
    train_start: date | datetime | str,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    accounts: pa.Table | None = None,
    feature_delay_days: int | None = None,
) -> BacktestData:
    """The training and test rows of the protocol, without fitting anything.

    The features' delayed terminal windows use `feature_delay_days`, by default D estimated as
    training does (`models.label_delay`) from the labels reported by the start of the test
    period: the model and the literature's baseline see the delay a deployment would use.

    Features are replayed from the first transaction, so windows up to 30 days are warm at
    `train_start` when the data starts at least 30 days before it. Replay only lets a label
    count once reported; training labels are those reported by the start of the test period;
    test labels are the ground truth. The test rows leave out the customers with a fraud reported
    by the start of the test period (`known_compromised`); `test_all` keeps them. `accounts`: the
    bank's account history (SCD 2 versions, `models.accounts.HISTORY_COLUMNS`), looked up as of
    each transaction as in production.
    """
    if train_days < 1 or test_days < 1 or delay_days < 0:
        raise ValueError(
            f"need train_days >= 1, test_days >= 1, delay_days >= 0; got {train_days}, "
            f"{test_days}, {delay_days}"
        )
    table = _transactions(transactions)
    if table.num_rows == 0:
        raise ValueError("no transactions")
    label_rows = normalize_labels(transactions, labels, delay_days)
    span = (
        pd.Timestamp(table["event_time"][0].as_py()),
        pd.Timestamp(table["event_time"][-1].as_py()),
    )
    periods = Periods.of(span, train_start, (train_days, delay_days, test_days))
    if periods.train_start < periods.data_start or periods.test_start > periods.data_end:
        raise ValueError(
            f"the data covers {periods.data_start:%Y-%m-%d} to {periods.data_end:%Y-%m-%d}; "
            "the backtest "
            f"needs {periods.train_start:%Y-%m-%d} to {periods.test_end - _DAY:%Y-%m-%d}"
        )
    needed = table.filter(pc.less(table["event_time"], periods.test_end.to_pydatetime()))
    if feature_delay_days is None:
        estimate = estimate_label_delay(
            reporting_delays(
                needed.select(["transaction_id", "event_time"]).to_pandas(),
                label_rows,
                periods.test_start,
            )
        )
        feature_delay_days, delay_note = estimate.days, f"estimated: {estimate.describe()}"
    else:
        delay_note = f"given: {feature_delay_days} days"
    features = replay(
        needed, _label_table(label_rows), accounts=accounts, label_delay_days=feature_delay_days
    ).features.to_pandas()
    times = pd.to_datetime(features["event_time"], utc=True)
    in_train = ((times >= periods.train_start) & (times < periods.train_end)).to_numpy()
    in_test = ((times >= periods.test_start) & (times < periods.test_end)).to_numpy()

    known = _latest(label_rows, periods.test_start)
    train = features.loc[in_train].reset_index(drop=True)
    fraud_ids = known.loc[known["is_fraud"], "transaction_id"]
    train["label"] = train["transaction_id"].isin(fraud_ids).astype(np.int64)

    truth = _latest(label_rows).set_index("transaction_id")
    test = features.loc[in_test].reset_index(drop=True)
    is_fraud = test["transaction_id"].map(truth["is_fraud"]).astype("boolean").fillna(False)
    test["label"] = is_fraud.astype(np.int64).to_numpy()
    test["fraud_scenario"] = (
        test["transaction_id"].map(truth["fraud_scenario"]).where(is_fraud.to_numpy(), None)
    )
    customers = table.select(["transaction_id", "customer_id"]).to_pandas()
    label_rows = label_rows.merge(customers, on="transaction_id", how="left")
    known_customers = known_compromised(label_rows, periods.test_start)
    unknown = ~test["customer_id"].isin(known_customers).to_numpy()
    return BacktestData(
        periods,
        train,
        test.loc[unknown].reset_index(drop=True),
        label_rows,
        test_all=test,
        feature_delay_days=feature_delay_days,
        feature_delay_note=delay_note,
    )


def known_compromised(labels: pd.DataFrame, when: pd.Timestamp) -> pd.Index:
    """Customers with a fraud reported by `when`: known compromised, their card blocked.

    The literature's test set leaves their transactions out (a bank that knows has already acted,
    so scoring them high again is no detection). `labels`: customer_id, is_fraud, reported_at
    (`BacktestData.labels`).
    """
    reported = pd.to_datetime(labels["reported_at"], utc=True)
    known = labels["is_fraud"].to_numpy(dtype=bool) & (reported <= when).to_numpy()
    return pd.Index(labels.loc[known, "customer_id"].dropna().unique())


# --------------------------------------------------------------------------- models

# The literature's baseline features (Le Borgne et al., ch. 3.4): the amount, weekend and night,
# the customer's count and mean amount over 1, 7 and 30 days, and the terminal's count and fraud
# risk over 1, 7 and 30 days ending a label delay before the transaction.
LITERATURE_FEATURES: tuple[str, ...] = (
    "amount",
    "is_weekend",
    "is_night",
    "count_1d",
    "mean_amount_1d",
    "count_7d",
    "mean_amount_7d",
    "count_30d",
    "mean_amount_30d",
    "terminal_tx_count_1d_delayed",
    "terminal_tx_count_7d_delayed",
    "terminal_tx_count_30d_delayed",
    "terminal_risk_1d_delayed",
    "terminal_risk_7d_delayed",
    "terminal_risk_30d_delayed",
)


def literature_matrix(features: pd.DataFrame) -> pd.DataFrame:
    """LITERATURE_FEATURES as float64, NaN as 0: the literature's inputs, which are never null.

    Its features are 0 where ours are unknown (no earlier debit, so no mean; no earlier traffic
    at the terminal, so no risk), so 0 is what its baseline was designed around.
    """
    missing = [c for c in LITERATURE_FEATURES if c not in features.columns]
    if missing:
        raise ValueError(f"features lack the literature's column(s): {', '.join(missing)}")
    return features[list(LITERATURE_FEATURES)].astype(np.float64).fillna(0.0)


def make_literature_baseline() -> Pipeline:
    """The literature's baseline: standard scaling and a logistic regression, as its handbook fits
    it (scikit-learn defaults, C = 1, no class weights), on `literature_matrix`.

    The reference a published result is measured against: a model that cannot beat it on these
    15 features' kinds of fraud has learnt nothing the literature did not already have.
    """
    return Pipeline(
        [
            ("scale", StandardScaler()),
            ("model", LogisticRegression(C=1.0, max_iter=1000, random_state=RANDOM_STATE)),
        ]
    )


def _fit_literature(model: Pipeline, frame: pd.DataFrame) -> Pipeline:
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(literature_matrix(frame), frame["label"].to_numpy())
    return model


def _score_literature(model: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    with threadpool_limits(limits=1, user_api="blas"):
        return np.asarray(model.predict_proba(literature_matrix(frame))[:, 1], dtype=np.float64)


def _describe(model: Pipeline) -> str:
    """The pipeline's estimator in words, e.g. "LogitBlend(HistGradientBoostingClassifier, ...)"."""
    final = model.named_steps["model"]
    members = [
        getattr(final, name).named_steps["model"]
        for name in ("boosting_", "linear_")
        if hasattr(final, name)
    ]
    inner = ", ".join(type(m).__name__ for m in members)
    return f"{type(final).__name__}({inner})" if inner else type(final).__name__


def _fit(model: Pipeline, frame: pd.DataFrame) -> Pipeline:
    with openmp_limit(), threadpool_limits(limits=1, user_api="blas"):
        model.fit(feature_matrix(frame), frame["label"].to_numpy())
    return model


def _score(model: Pipeline, frame: pd.DataFrame) -> np.ndarray:
    with threadpool_limits(limits=1, user_api="blas"):
        return score(model, frame)


def _metrics(
    predictions: pd.DataFrame, k: int, budget: int, reported: pd.DataFrame
) -> dict[str, Any]:
    return {
        **_ranking(predictions, k, reported),
        "recall_at_budget": recall_at_daily_budget(predictions, budget),
        "scenario_recall": scenario_recall(predictions, budget),
    }


@dataclass
class BacktestResult:
    """Metrics of the default model and the baseline on one test period, and their scores."""

    periods: Periods
    k: int
    budget: int
    n_train: int
    n_train_fraud: int
    n_test: int
    n_test_fraud: int
    model: dict[str, Any]  # roc_auc, average_precision, card_precision_at_k, ... and name
    baseline: dict[str, Any]  # the same for the logistic regression on the project's features
    literature_baseline: dict[str, Any]  # ... and on the literature's (LITERATURE_FEATURES)
    scenario_frauds: dict[str, int]  # test frauds per scenario
    # card_precision_at_k of a perfect ranking: with few frauded cards a day it is far below 1
    card_precision_ceiling: float
    labels_imputed: int  # labels whose reported_at was event_time + delay_days
    # transaction_id, customer_id, event_time, score, baseline_score, label, fraud_scenario
    predictions: pd.DataFrame = field(repr=False)
    # With the account history: `hard_rule_report` of the test period (None without it), its
    # customers known compromised included: a blocked card is what the hard rules are about.
    hard_rules: dict[str, Any] | None = None
    # The test period with the customers known compromised at its start: n_test, n_test_fraud,
    # known_compromised (customers left out) and AUC, AP, CP@k of the three scorings.
    all_customers: dict[str, Any] | None = None
    feature_delay_days: int = 7  # D of the delayed terminal windows (`BacktestData`)
    feature_delay_note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The metrics as plain JSON types (NaN as None); the default model's at the top level."""
        out: dict[str, Any] = {
            name: self.model[name]
            for name in (
                "roc_auc",
                "average_precision",
                "card_precision_at_k",
                "recall_at_budget",
                "scenario_recall",
            )
        }
        out.update(
            card_precision_at_k_ceiling=self.card_precision_ceiling,
            k=self.k,
            budget=self.budget,
            n_train=self.n_train,
            n_train_fraud=self.n_train_fraud,
            n_test=self.n_test,
            n_test_fraud=self.n_test_fraud,
            periods=self.periods.to_dict(),
            scenario_frauds=self.scenario_frauds,
            labels_imputed=self.labels_imputed,
            feature_delay_days=self.feature_delay_days,
            feature_delay_note=self.feature_delay_note,
            model=self.model,
            baseline=self.baseline,
            literature_baseline=self.literature_baseline,
        )
        if self.hard_rules is not None:
            out["hard_rules"] = self.hard_rules
        if self.all_customers is not None:
            out["all_customers"] = self.all_customers
        return _json_safe(out)

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def predictions_table(self) -> pa.Table:
        """The test scores as Arrow, with the lake's types (for Parquet or Delta)."""
        return pa.Table.from_pandas(
            self.predictions, schema=PREDICTION_SCHEMA, preserve_index=False
        )

    def plots(self) -> dict[str, bytes]:
        """PNG files by name, for MLflow artifacts or Dagster metadata."""
        y = self.predictions["label"].to_numpy()
        scores = {
            "default model": self.predictions["score"].to_numpy(),
            "literature baseline": self.predictions["literature_score"].to_numpy(),
            "baseline (logistic regression)": self.predictions["baseline_score"].to_numpy(),
        }
        return {
            "pr_curve.png": pr_curve_png(y, scores),
            "score_distribution.png": score_distribution_png(y, scores["default model"]),
        }


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float | np.floating):
        return None if math.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


def backtest(
    transactions: pa.Table,
    labels: pa.Table | None,
    train_start: date | datetime | str,
    train_days: int = 7,
    delay_days: int = 7,
    test_days: int = 7,
    k: int = 100,
    params: dict[str, Any] | None = None,
    budget: int | None = None,
    candidate: str = DEFAULT_CANDIDATE,
    accounts: pa.Table | None = None,
    feature_delay_days: int | None = None,
) -> BacktestResult:
    """Train on [train_start, +train_days), skip delay_days, test on the next test_days.

    The model (`make_candidate(candidate, params)`, the default model unless told otherwise), the
    literature's baseline (`make_literature_baseline()`) and the baseline on the project's
    features (`make_baseline()`) are fitted on the same rows and scored on the same test rows:
    those of the customers not known to be compromised when the test starts (the literature's
    protocol); `all_customers` has the metrics with them. `budget` is the daily number of
    transaction alerts for the recall metrics (default: k).
    With `accounts` (the bank's account history), the features see the account as of each
    transaction and the result reports the hard rules (blocked card, account not open) too.
    """
    if candidate not in CANDIDATES:
        raise ValueError(f"unknown model {candidate!r}; one of {', '.join(CANDIDATES)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    budget = k if budget is None else budget
    data = backtest_data(
        transactions,
        labels,
        train_start,
        train_days,
        delay_days,
        test_days,
        accounts,
        feature_delay_days,
    )
    train, test = data.train, data.test
    n_fraud = int(train["label"].sum())
    if n_fraud == 0 or n_fraud == len(train):
        raise ValueError(
            f"the training period ({len(train):,} rows, {data.periods.train_start:%Y-%m-%d} to "
            f"{data.periods.train_end - _DAY:%Y-%m-%d}) needs both fraud and legitimate labels "
            f"reported by {data.periods.test_start:%Y-%m-%d}; it has {n_fraud} fraud"
        )
    if test.empty:
        raise ValueError(
            "no transactions in the test period (customers known compromised left out)"
        )
    literature_matrix(train)  # the literature's columns, checked before any fitting
    model = _fit(make_candidate(candidate, params), train)
    baseline = _fit(make_baseline(), train)
    literature = _fit_literature(make_literature_baseline(), train)
    test_all = data.test_all if data.test_all is not None else test

    def predict(rows: pd.DataFrame) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "transaction_id": rows["transaction_id"],
                "customer_id": rows["customer_id"],
                "event_time": rows["event_time"],
                "score": _score(model, rows),
                "baseline_score": _score(baseline, rows),
                "literature_score": _score_literature(literature, rows),
                "label": rows["label"],
                "fraud_scenario": rows["fraud_scenario"].astype("string"),
            }
        )

    predictions, every = predict(test), predict(test_all)
    reported = data.labels.loc[data.labels["is_fraud"], ["customer_id", "reported_at"]]
    baseline_predictions = predictions.assign(score=predictions["baseline_score"])
    literature_predictions = predictions.assign(score=predictions["literature_score"])
    counts = predictions["fraud_scenario"].dropna().value_counts().sort_index()
    return BacktestResult(
        periods=data.periods,
        k=k,
        budget=budget,
        n_train=len(train),
        n_train_fraud=n_fraud,
        n_test=len(test),
        n_test_fraud=int(test["label"].sum()),
        model={
            "name": candidate,
            "estimator": _describe(model),
            **_metrics(predictions, k, budget, reported),
        },
        baseline={
            "name": "LogisticRegression",
            "class_weight": BASELINE_CLASS_WEIGHT,
            "preprocessing": "inf as NaN, median imputation + missing indicators, standard scaling",
            **_metrics(baseline_predictions, k, budget, reported),
        },
        literature_baseline={
            "name": "LogisticRegression",
            "features": list(LITERATURE_FEATURES),
            "preprocessing": "NaN as 0, standard scaling",
            **_metrics(literature_predictions, k, budget, reported),
        },
        scenario_frauds={str(name): int(n) for name, n in counts.items()},
        card_precision_ceiling=card_precision_at_k(
            predictions.assign(score=predictions["label"].astype(np.float64)), k, reported
        ),
        labels_imputed=int(data.labels["reported_imputed"].sum()),
        predictions=predictions,
        hard_rules=hard_rule_report(test_all) if accounts is not None else None,
        all_customers={
            "n_test": len(test_all),
            "n_test_fraud": int(test_all["label"].sum()),
            "known_compromised": int(
                test_all["customer_id"].nunique() - test["customer_id"].nunique()
            ),
            **{
                name: _ranking(every.assign(score=every[column]), k, reported)
                for name, column in (
                    ("model", "score"),
                    ("literature_baseline", "literature_score"),
                    ("baseline", "baseline_score"),
                )
            },
        },
        feature_delay_days=data.feature_delay_days,
        feature_delay_note=data.feature_delay_note,
    )


def _ranking(predictions: pd.DataFrame, k: int, reported: pd.DataFrame) -> dict[str, float]:
    """AUC, AP and card precision@k of one scoring: the metrics compared across test sets."""
    y = predictions["label"].to_numpy()
    both = 0 < int(y.sum()) < len(y)
    p = predictions["score"].to_numpy()
    return {
        "roc_auc": float(roc_auc_score(y, p)) if both else math.nan,
        "average_precision": float(average_precision_score(y, p)) if both else math.nan,
        "card_precision_at_k": card_precision_at_k(predictions, k, reported),
    }


def hard_rule_report(test: pd.DataFrame) -> dict[str, Any]:
    """What the hard rules (alert whatever the score) did in the test period: how often each
    fired, how many of those were fraud, and how many of the frauds they caught."""
    hits = rule_hits(test, AlertPolicy())
    label = test["label"].to_numpy().astype(bool)
    scenario = test["fraud_scenario"].to_numpy(dtype=object)
    out: dict[str, Any] = {}
    for rule in HARD_RULES:
        fired = hits[rule].to_numpy()
        n, n_fraud = int(fired.sum()), int((fired & label).sum())
        out[rule] = {"hits": n, "fraud_hits": n_fraud, "precision": n_fraud / n if n else math.nan}
    any_hard = hits[list(HARD_RULES)].to_numpy().any(axis=1)
    blocked = scenario == "blocked_card"
    out["frauds_caught"] = int((any_hard & label).sum())
    out["frauds"] = int(label.sum())
    out["blocked_card_frauds"] = int(blocked.sum())
    out["blocked_card_recall"] = (
        float((any_hard & blocked).sum() / blocked.sum()) if blocked.any() else math.nan
    )
    return out


# --------------------------------------------------------------------------- plots


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


def pr_curve_png(y_true: Any, scores: Mapping[str, Any], title: str = "Test period") -> bytes:
    """Precision-recall curves of one or more scorings as PNG bytes.

    The PR curve, not ROC, because at <1 % fraud the part an analyst lives in (high precision,
    few alerts) is squeezed into ROC's far left. Drawn on a pyplot-free Figure (Agg canvas), so
    it is safe in servers and threads.
    """
    from matplotlib.figure import Figure

    y = np.asarray(y_true).astype(int)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    if 0 < y.sum() < len(y):
        for name, values in scores.items():
            s = np.asarray(values, dtype=np.float64)
            precision, recall, _ = precision_recall_curve(y, s)
            ap = average_precision_score(y, s)
            ax.step(recall, precision, where="post", label=f"{name} (AP {ap:.3f})")
        ax.axhline(y.mean(), color="grey", linestyle=":", label=f"fraud rate {y.mean():.2%}")
        ax.legend(loc="upper right", fontsize="small")
    else:
        ax.text(0.5, 0.5, "needs fraud and legitimate rows", ha="center", va="center")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02), title=title)
    return _png(fig)


def score_distribution_png(y_true: Any, scores: Any, title: str = "Score by class") -> bytes:
    """Histograms of the score of legitimate and fraudulent rows (log counts) as PNG bytes.

    Shows where a threshold would cut and how calibrated the score looks; log scale because
    legitimate rows outnumber fraud a hundred to one.
    """
    from matplotlib.figure import Figure

    y = np.asarray(y_true).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    bins = np.linspace(0.0, 1.0, 51).tolist()
    ax.hist(s[~y], bins=bins, alpha=0.6, label=f"legitimate ({(~y).sum():,})", log=True)
    ax.hist(s[y], bins=bins, alpha=0.6, label=f"fraud ({y.sum():,})", log=True)
    ax.set(xlabel="score", ylabel="transactions (log)", xlim=(0, 1), title=title)
    ax.legend(loc="upper center", fontsize="small")
    return _png(fig)
