"""Wiring of the fraud job into the runtime: which tables, which runner, where labels come from.

The CLI, the Dagster assets, the demo and the benchmark all start jobs through these functions,
so there is one way to build a scoring runner.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable, write_deltalake

from models.accounts import ACCOUNTS_HISTORY, HISTORY_COLUMNS
from models.backtest import read_dataset
from models.features import (
    DELAYED_FEATURES,
    FEATURE_SCHEMA,
    FEATURE_VERSION,
    FeatureVersionError,
    at_version,
    feature_version,
    label_delay_of,
    replay,
)
from models.job import (
    FEATURES,
    LABELS,
    OUTPUTS,
    TRANSACTIONS,
    TRANSACTIONS_TABLE_SCHEMA,
    FraudScoringJob,
)
from models.known_frauds import locate_labels
from models.label_delay import LabelDelayEstimate, estimate_label_delay, reporting_delays
from models.promotion import (
    Evaluation,
    evaluate_challenger,
    log_holdout,
    promote_if_better,
    register_challenger,
)
from models.registry import (
    ALERT_DAILY_BUDGET_TAG,
    ALERT_THRESHOLD_TAG,
    CHALLENGER,
    CHAMPION,
    DEFAULT_METRIC,
    FEATURE_VERSION_TAG,
    MODEL_NAME,
    LoadedModel,
    PromotionMetric,
    alias_version,
    log_and_register,
    mlflow_client,
)
from models.schema import LABEL_SCHEMA, TRANSACTION_SCHEMA
from models.selection_log import log_selection
from models.simulate import Simulation, write_simulation
from models.training import (
    DEFAULT_CANDIDATE,
    DEFAULT_DAILY_BUDGET,
    DEFAULT_SEARCH,
    TINY_SEARCH,
    SearchSpace,
    Selection,
    choose_threshold,
    score,
    select_model,
    time_split,
    train,
    training_frame,
)
from streamguard.checkpoint import CHECKPOINT_SCHEMA, CHECKPOINT_TABLE
from streamguard.commit import DEAD_LETTER_SCHEMA, DEAD_LETTER_TABLE, AlertSink
from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.runner import MicroBatchRunner
from streamguard.sources import Source

SCORING_JOB = "fraud_scoring"
# The version tag saying where the model's label delay D came from (estimate or feature log).
FEATURE_DELAY_SOURCE_TAG = "feature_label_delay_source"
MIN_FEATURE_LOG_ROWS = 5_000  # below this, training replays the history file instead


def scoring_job_name(source: str, stream: str) -> str:
    """The checkpoint key of one stream's scoring: each stream has its own, in the same lake.

    The Kinesis stream keeps the original name, so existing checkpoints go on.
    """
    return SCORING_JOB if source == "kinesis" else f"{SCORING_JOB}:{source}:{stream}"


def ensure_tables(lake: Lake) -> None:
    """Create every table of the scoring job empty, so the catalog and readers see them."""
    for output in OUTPUTS:
        latest = None
        if output.key is not None and output.latest_by is not None:
            latest = (output.key[0], output.latest_by)
        lake.ensure(output.name, output.schema, output.partition_by, output.stats_columns, latest)
    lake.ensure(DEAD_LETTER_TABLE, DEAD_LETTER_SCHEMA)
    lake.ensure(CHECKPOINT_TABLE, CHECKPOINT_SCHEMA)
    lake.ensure(LABELS, LABEL_SCHEMA)


def scoring_runner(
    lake: Lake,
    source: Source,
    tracking_uri: str | None,
    *,
    max_batch_records: int = 50_000,
    model_name: str = MODEL_NAME,
    alias: str = CHAMPION,
    model: LoadedModel | None = None,
    job: str = SCORING_JOB,
    challenger: LoadedModel | None = None,
    shadow: bool = True,
    sinks: Sequence[AlertSink] = (),
) -> MicroBatchRunner:
    """A runner that scores `source` with the model behind `alias` (or a given loaded model).

    With `shadow`, the `challenger` (the given model, else the registry's alias) is also scored
    into `shadow_scores`. `sinks` get each batch's alerts once it is in the lake (e.g. Kafka).
    """
    ensure_tables(lake)
    processor = FraudScoringJob(
        tracking_uri, model_name, alias, model=model, challenger=challenger, shadow=shadow
    )
    return MicroBatchRunner(
        source, processor, lake, job, max_batch_records=max_batch_records, sinks=sinks
    )


def read_labels(path: Path) -> pa.Table:
    """Labels from a Parquet file, held to the label contract (clear error when they break it)."""
    table = pq.read_table(path)
    missing = [f.name for f in LABEL_SCHEMA if f.name not in table.column_names and not f.nullable]
    if missing:
        raise ValueError(f"{path}: labels lack required column(s) {', '.join(missing)}")
    if "fraud_scenario" not in table.column_names:
        table = table.append_column("fraud_scenario", pa.nulls(table.num_rows, pa.string()))
    return table.select(LABEL_SCHEMA.names).cast(LABEL_SCHEMA)


def load_labels(lake: Lake, labels: pa.Table) -> int:
    """Add labels by transaction id: loading the same file twice changes nothing.

    New transaction ids are appended (the scoring batches fold each new label file into
    `known_frauds` once); only a label that changed (another verdict or report time) is
    upserted, which rewrites the files holding it. The rows written carry where their
    transaction is in `transactions` now (`models.known_frauds.locate_labels`): the lookup by id
    is paid here, once per label, instead of by the scoring batch that folds the file in.
    """
    lake.ensure(LABELS, LABEL_SCHEMA)
    labels = labels.cast(LABEL_SCHEMA)
    if labels.num_rows == 0:
        return 0
    stored = lake.read(
        LABELS,
        columns=["transaction_id", "is_fraud", "reported_at"],
        filter=pc.field("transaction_id").isin(labels["transaction_id"]),
    )
    known = pc.is_in(labels["transaction_id"], value_set=stored["transaction_id"].combine_chunks())
    new = labels.filter(pc.invert(known))
    changed = _changed(labels.filter(known), stored)
    if new.num_rows == 0 and changed.num_rows == 0:
        return labels.num_rows
    # One lookup for both; a label table written before these columns gains them (older rows
    # read back null: their batches read `transactions` as before).
    located = locate_labels(
        lake,
        pa.concat_tables([new, changed.cast(LABEL_SCHEMA)]),
        TRANSACTIONS,
        TRANSACTIONS_TABLE_SCHEMA,
    )
    if new.num_rows:
        write_deltalake(
            lake.uri(LABELS), located.slice(0, new.num_rows), mode="append", schema_mode="merge"
        )
    if changed.num_rows:
        lake.upsert(LABELS, located.slice(new.num_rows), ["transaction_id"])
    return labels.num_rows


def _changed(labels: pa.Table, stored: pa.Table) -> pa.Table:
    """The labels whose row differs from the stored one of the same transaction id."""
    if labels.num_rows == 0:
        return labels
    verdict = ["transaction_id", "is_fraud", "reported_at"]
    same = labels.join(stored.select(verdict), verdict, join_type="left semi")
    return labels.join(same.select(["transaction_id"]), "transaction_id", join_type="left anti")


@dataclass
class TrainingOutcome:
    """What a training run registered and how it compared, for the CLI, assets and tests."""

    version: str
    promoted: bool  # the version is champion now
    metrics: dict[str, float]
    champion_metric: float | None
    champion_before: str | None
    n_train: int
    n_holdout: int
    cutoff: datetime
    source: str  # "history replay" or "feature log"
    alias: str = CHAMPION  # what the version got when registered: champion (first) or challenger
    evaluation: Evaluation | None = None
    # Stored with the version; the job alerts at it. None: none could be chosen (F1 on a holdout
    # with one class), the scoring policy's default applies.
    alert_threshold: float | None = None
    candidate: str = DEFAULT_CANDIDATE
    selection: Selection | None = None  # the search's (or select=True's) ranked configurations
    selection_run_id: str = ""
    rows_per_second: float | None = None  # the searched model's measured scoring rate
    # The features it was trained on and will score: their version and label delay D.
    feature_version: str = FEATURE_VERSION

    def summary(self) -> str:
        """One line for the user: the version, where it stands, what it was trained on."""
        verdict = "promoted to champion" if self.promoted else f"kept as the {self.alias}"
        metrics = ", ".join(
            f"{k} {self.metrics[k]:.4f}"
            for k in ("roc_auc", "average_precision")
            if k in self.metrics
        )
        return (
            f"fraud_model version {self.version} ({verdict}); trained on {self.n_train:,} rows "
            f"from the {self.source} up to {self.cutoff:%Y-%m-%d}; "
            f"holdout {self.n_holdout:,} rows: {metrics}"
        )


def read_accounts(path: Path) -> pa.Table:
    """The bank's account history (SCD 2 versions): a Delta table folder or a Parquet/CSV file."""
    if (path / "_delta_log").is_dir():
        return DeltaTable(str(path)).to_pyarrow_table(columns=HISTORY_COLUMNS)
    return read_dataset(path).select(HISTORY_COLUMNS)


def lake_accounts(lake: Lake) -> pa.Table | None:
    """The lake's `accounts_history` (the versions the as-of lookup reads), None if absent."""
    if not lake.exists(ACCOUNTS_HISTORY):
        return None
    return lake.read(ACCOUNTS_HISTORY, columns=HISTORY_COLUMNS)


REPLAY = "history replay"  # `TrainingFeatures.source` of features replayed from a history file


@dataclass(frozen=True)
class TrainingFeatures:
    """Point-in-time features to train on, the cut-off ("now" of the data), where they came from,
    and the label delay D their delayed terminal windows were computed with."""

    features: pd.DataFrame
    cutoff: datetime
    source: str  # "history replay" or "feature log"
    label_delay_days: int
    # Where D came from: the labels' estimate (`models.label_delay`), or the feature log's version.
    label_delay_note: str


def _log_version(features: pa.Table) -> str:
    """The feature version of the log's newest row: the champion's, which the log goes on with."""
    versions = pc.fill_null(features["feature_version"], FEATURE_VERSION)
    newest = pc.index(features["event_time"], pc.max(features["event_time"])).as_py()
    return str(versions[newest].as_py())


# A replay keeps the champion's D while the labels' estimate stays this close to it: a D that
# moves between neighbouring days from one retrain to the next would change the feature version
# each time, and a champion on another version is replaced without a metric comparison.
DELAY_TOLERANCE_DAYS = 1


def replay_delay(estimate: LabelDelayEstimate, champion_delay: int | None) -> tuple[int, str]:
    """The D a history replay computes with, and why: the estimate, or the champion's D when the
    estimate is within DELAY_TOLERANCE_DAYS of it (or is only the too-few-labels fallback)."""
    if champion_delay is not None and (
        estimate.fallback or abs(estimate.days - champion_delay) <= DELAY_TOLERANCE_DAYS
    ):
        return champion_delay, (
            f"the champion's {champion_delay} days, kept: the labels' estimate is "
            f"{estimate.describe()}"
        )
    return estimate.days, f"estimated: {estimate.describe()}"


def champion_delay(tracking_uri: str, name: str = MODEL_NAME) -> int | None:
    """The champion's label delay D, None without a champion or when this code cannot compute
    its features (another FEATURE_VERSION: the next champion starts afresh)."""
    version = alias_version(tracking_uri, name, CHAMPION)
    if version is None:
        return None
    tags = mlflow_client(tracking_uri).get_model_version(name, version).tags
    try:
        return label_delay_of(tags.get(FEATURE_VERSION_TAG) or FEATURE_VERSION)
    except FeatureVersionError:
        return None


def training_features(
    lake: Lake,
    history: Path | None,
    train_days: int | None,
    min_log_rows: int = MIN_FEATURE_LOG_ROWS,
    champion_delay: int | None = None,
    label_delay_days: int | None = None,
) -> TrainingFeatures:
    """Point-in-time features to train on, with the cut-off and the label delay D they use.

    The feature log holds the features exactly as they were scored; without enough of it, the
    history file is replayed through the same feature function (labels only as then reported).
    A replay estimates D from the labels reported by the cut-off (`estimate_label_delay`) and
    computes the delayed windows with it. The log's rows were computed with the scoring
    champion's D and cannot be recomputed: training on it keeps the D of its newest rows (and
    only the rows of that version); a replay is how D changes. `label_delay_days` makes a replay
    compute with that D whatever the estimate (the champion's, to compare it on the same rows).
    """
    labels = lake.read(LABELS, schema=LABEL_SCHEMA)
    if history is None and lake.count(FEATURES) >= min_log_rows:
        features = lake.read(FEATURES, columns=[*FEATURE_SCHEMA.names, "feature_version"])
        end = pc.max(features["event_time"]).as_py()
        if train_days:
            start = pc.min(features["event_time"]).as_py()
            end = min(end, start + timedelta(days=train_days))
            features = features.filter(pc.less(features["event_time"], end))
        version = _log_version(features)
        delay = label_delay_of(version)
        if label_delay_days is not None and label_delay_days != delay:
            raise ValueError(
                f"the feature log's rows are at D = {delay}; only a history replay computes "
                f"D = {label_delay_days}"
            )
        versions = pc.fill_null(features["feature_version"], FEATURE_VERSION)
        features = features.filter(pc.equal(versions, version)).select(FEATURE_SCHEMA.names)
        estimate = estimate_label_delay(
            reporting_delays(
                features.select(["transaction_id", "event_time"]).to_pandas(),
                labels.to_pandas(),
                pd.Timestamp(end),
            )
        )
        note = f"feature log at version {version}; the labels' estimate: {estimate.describe()}"
        return TrainingFeatures(features.to_pandas(), end, "feature log", delay, note)
    if history is None:
        raise ValueError(
            f"the feature log has {lake.count(FEATURES):,} rows (< {min_log_rows:,}) and no "
            "history file was given to replay"
        )
    if not history.is_file():
        raise FileNotFoundError(f"no such history file: {history}")
    transactions = pq.read_table(history).select(TRANSACTION_SCHEMA.names).cast(TRANSACTION_SCHEMA)
    start = pc.min(transactions["event_time"]).as_py()
    end = pc.max(transactions["event_time"]).as_py()
    if train_days:
        end = min(end, start + timedelta(days=train_days))
        transactions = transactions.filter(pc.less(transactions["event_time"], end))
    known = labels.filter(pc.less_equal(labels["reported_at"], end))
    estimate = estimate_label_delay(
        reporting_delays(
            transactions.select(["transaction_id", "event_time"]).to_pandas(),
            known.to_pandas(),
            pd.Timestamp(end),
        )
    )
    delay, note = replay_delay(estimate, champion_delay)
    if label_delay_days is not None:
        delay, note = label_delay_days, f"given: {label_delay_days} days"
    accounts = lake_accounts(lake)
    features = replay(
        transactions, known, accounts=accounts, label_delay_days=delay
    ).features.to_pandas()
    return TrainingFeatures(features, end, REPLAY, delay, note)


def _with_features_at(holdout: pd.DataFrame, other: TrainingFeatures) -> pd.DataFrame:
    """`holdout` with `other`'s delay-dependent features of its rows, named by their version
    (`models.features.at_version`), in the holdout's row order."""
    version = feature_version(other.label_delay_days)
    columns = other.features[["transaction_id", *DELAYED_FEATURES]].rename(
        columns={c: at_version(c, version) for c in DELAYED_FEATURES}
    )
    return holdout.merge(columns, on="transaction_id", how="left", validate="one_to_one")


# The environment variable naming the search training runs (see `search_space`).
SEARCH_ENV = "STREAMGUARD_SEARCH"
SEARCHES: dict[str, SearchSpace | None] = {"full": DEFAULT_SEARCH, "tiny": TINY_SEARCH, "off": None}


def search_space(name: str | None = None) -> SearchSpace | None:
    """The hyperparameter search training runs, by name: `name`, else $STREAMGUARD_SEARCH, else
    "off" (None: the default model, calibrated as every model is); "full" (`DEFAULT_SEARCH`), "tiny"
    (`TINY_SEARCH`, for tests), or a number N: the first N boosting settings of the full grid.

    Off by default: on the demo data the searched, calibrated and refitted winner scored a lower
    holdout AP than the default blend (0.156 vs 0.296; about 40 validation frauds rank the grid),
    so it is opt-in until its selection beats the default on data of a useful size."""
    chosen = (name if name is not None else os.environ.get(SEARCH_ENV, "")).strip() or "off"
    if chosen.isdigit():
        return dataclasses.replace(DEFAULT_SEARCH, limit=max(1, int(chosen)))
    if chosen not in SEARCHES:
        raise ValueError(f"unknown search {chosen!r}; one of {', '.join(SEARCHES)} or a number")
    return SEARCHES[chosen]


def train_challenger(
    home: Home,
    *,
    history: Path | None = None,
    labels: Path | None = None,
    train_days: int | None = None,
    label_delay_days: int = 7,
    metric: PromotionMetric = DEFAULT_METRIC,
    tracking_uri: str | None = None,
    model_name: str = MODEL_NAME,
    params: dict[str, Any] | None = None,
    select: bool = False,
    daily_budget: int | None = DEFAULT_DAILY_BUDGET,
    search: SearchSpace | str | None = None,
) -> TrainingOutcome:
    """Train on point-in-time features and register the version as `challenger`.

    With a search the model is searched and calibrated (`models.training.train` with `search`, a
    `SearchSpace` or a name for `search_space`; None: $STREAMGUARD_SEARCH, else no search):
    every configuration is fitted on the earlier part of the training split, early-stopped and
    ranked on the later part (a parent MLflow run with a child per configuration), the best one
    scoring fast enough is Platt-calibrated on that same later part and registered, so the
    threshold means the same probability across retrains. Explicit `params`, `select` or
    search "off" train one fixed configuration instead, calibrated the same way (`train`).

    With `select`, the model family and class weighting are chosen first (`select_model`): every
    candidate is fitted on the earlier 75% of the training split and ranked by `metric` on the
    later 25%, logged as a parent MLflow run with a child per candidate; the winner is then
    trained like the default model (on the whole training split, measured on the holdout, which
    the selection never saw, so the promotion comparison stays fair). `params` then only apply
    when the winner is the default family. Off by default (8 fits instead of 1).

    Either way the alert threshold for `daily_budget` alerts/day on the holdout period
    (`choose_threshold`; None: best F1) is stored with the version (tags `alert_threshold`,
    `alert_daily_budget`); the scoring job alerts at it. Best F1 needs both classes in the
    holdout: without fraud reported there yet (a new deployment), the version keeps no threshold
    and the scoring policy's default applies.

    The first version of the model becomes `champion` directly (nothing to compare with). The
    holdout is stored with the version and the evaluation against the champion is recorded, but
    `champion` does not move: that is the gate's job (`models.promotion.decide_promotion`, through
    `train_and_promote`, or the Dagster check and the `fraud_model_champion` asset).
    """
    uri = tracking_uri or home.mlflow_tracking_uri
    lake = Lake(home.lake_uri)
    if labels is not None:
        load_labels(lake, read_labels(labels))
    # `label_delay_days` is the training cut-off's delay (rows newer than cutoff - it are not
    # trained on); the features' own label delay D comes with them (`training_features`).
    champion_d = champion_delay(uri, model_name)
    prepared = training_features(lake, history, train_days, champion_delay=champion_d)
    features, cutoff, source = prepared.features, prepared.cutoff, prepared.source
    features_version = feature_version(prepared.label_delay_days)
    label_table = lake.read(LABELS, schema=LABEL_SCHEMA).to_pandas()
    frame = training_frame(
        features, label_table, pd.Timestamp(cutoff), pd.Timedelta(days=label_delay_days)
    )
    if frame["label"].sum() == 0:
        raise ValueError(f"no fraud label reported by {cutoff:%Y-%m-%d} in the training window")
    train_part, holdout = time_split(frame)
    if prepared.source == REPLAY and champion_d not in (None, prepared.label_delay_days):
        # The champion computes its delayed windows with another D: keep them for the holdout's
        # rows too, so the gate compares the two models on the same rows (`evaluate_challenger`).
        # (The feature log holds one D; training on it keeps the comparison by feature version.)
        at_champion = training_features(lake, history, train_days, label_delay_days=champion_d)
        holdout = _with_features_at(holdout, at_champion)
    selection: Selection | None = None
    selection_run_id = ""
    candidate = DEFAULT_CANDIDATE
    if select:
        fit_part, validation = time_split(train_part)
        selection = select_model(fit_part, validation, metric)
        candidate = selection.winner.candidate
        winner_params = {"class_weight": selection.winner.class_weight}
        params = (
            {**(params or {}), **winner_params}
            if candidate in (DEFAULT_CANDIDATE, "hist_gradient_boosting")  # take HGB params
            else winner_params
        )
    space = search if isinstance(search, SearchSpace) else search_space(search)
    searched = space is not None and not select and params is None
    result = train(
        features,
        label_table,
        pd.Timestamp(cutoff),
        pd.Timedelta(days=label_delay_days),
        params=params,
        candidate=candidate,
        search=space if searched else None,
        metric=metric,
        feature_delay_days=prepared.label_delay_days,
    )
    result.tags[FEATURE_DELAY_SOURCE_TAG] = prepared.label_delay_note[:5000]
    if result.selection is not None:
        selection, candidate = result.selection, result.candidate
    if selection is not None:  # the family selection's or the search's: one parent run
        selection_run_id = log_selection(
            selection,
            uri,
            home.mlflow_artifact_root,
            name=model_name,
            feature_version=features_version,
        )
    labels_seen = holdout["label"].nunique() if len(holdout) else 0
    threshold: float | None = None
    if daily_budget is not None or labels_seen == 2:
        # F1 needs both classes; without them the version keeps the policy's default threshold.
        threshold = choose_threshold(
            score(result.model, holdout), holdout["label"], holdout["event_time"], daily_budget
        )
        result.tags[ALERT_THRESHOLD_TAG] = repr(threshold)
        result.tags[ALERT_DAILY_BUDGET_TAG] = "f1" if daily_budget is None else str(daily_budget)
    if selection is not None:
        result.tags["selection_run_id"] = selection_run_id
        result.tags["selection_winner"] = selection.winner.name
    version = log_and_register(result, uri, home.mlflow_artifact_root, name=model_name)
    log_holdout(uri, model_name, version, holdout)
    # Evaluated before it gets an alias, so the first version is compared with "no champion".
    evaluation = evaluate_challenger(uri, model_name, version, holdout, metric)
    alias = register_challenger(uri, model_name, version, evaluation)
    return TrainingOutcome(
        version=version,
        promoted=alias == CHAMPION,
        metrics={k: float(v) for k, v in result.metrics.items()},
        champion_metric=evaluation.champion_value,
        champion_before=evaluation.champion_version,
        n_train=result.n_train,
        n_holdout=result.n_holdout,
        cutoff=cutoff,
        source=source,
        alias=alias,
        evaluation=evaluation,
        alert_threshold=threshold,
        candidate=candidate,
        selection=selection,
        selection_run_id=selection_run_id,
        rows_per_second=None if result.selection is None else result.rows_per_second,
        feature_version=features_version,
    )


def train_and_promote(
    home: Home,
    *,
    history: Path | None = None,
    labels: Path | None = None,
    train_days: int | None = None,
    label_delay_days: int = 7,
    metric: PromotionMetric = DEFAULT_METRIC,
    select: bool = False,
    search: SearchSpace | str | None = None,
) -> TrainingOutcome:
    """Train a challenger and, in the same process, promote it if it beat the champion.

    The one-step path (`streamguard train`, tests): the challenger goes through the same
    decision (`promote_if_better`) as the Dagster gate, on the evaluation recorded at training.
    """
    outcome = train_challenger(
        home,
        history=history,
        labels=labels,
        train_days=train_days,
        label_delay_days=label_delay_days,
        metric=metric,
        select=select,
        search=search,
    )
    if outcome.alias == CHALLENGER:  # the first version already is the champion
        uri = home.mlflow_tracking_uri
        if promote_if_better(uri, MODEL_NAME, outcome.version, metric=metric).promoted:
            outcome.promoted, outcome.alias = True, CHAMPION
    return outcome


def train_on_simulation(home: Home, sim: Simulation) -> TrainingOutcome:
    """Write `sim`'s files into `home`'s data folder and train (and promote) on them with every
    label known at once: the first champion of a demo, a benchmark or a test."""
    write_simulation(sim, home.data)
    return train_and_promote(
        home,
        history=home.data / "transactions.parquet",
        labels=home.data / "labels.parquet",
        label_delay_days=0,
    )
