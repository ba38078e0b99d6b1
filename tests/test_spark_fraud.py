"""The fraud job on Spark against the in-process runner: same input, same batches, same tables.

The in-process runner scores a stream (valid transactions, bad records, a replayed duplicate);
each of its batches is written as one JSON-lines file in its arrival order, and the Spark query
reads one file per trigger, so both engines see the same records in the same micro-batches.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fraud_streams import (
    BAD_RECORDS,
    assert_same_tables,
    in_process_reference,
    load_bank,
    sorted_table,
    troubled_stream,
)
from pyspark.sql import SparkSession

from models.accounts import AccountChanges
from models.features import (
    FEATURE_COLUMNS,
    LABEL_DELAY_DAYS,
    FeatureState,
    compute_features,
    known_frauds,
)
from models.job import (
    ALERTS,
    CUSTOMER_STATE,
    FEATURES,
    SCORES,
    TERMINAL_STATE,
    ScoringContext,
)
from models.registry import FEATURE_VERSION_TAG, LoadedModel
from models.simulate import Simulation
from models.training import score
from streamguard.commit import DEAD_LETTER_TABLE, next_batch_id
from streamguard.lake import Lake
from streamguard.pipeline import load_labels
from streamguard.spark.fraud import (
    SPARK_BATCHES,
    SparkFraudReport,
    jsonl_source,
    run_fraud_on_spark,
    spark_features,
)

pytestmark = pytest.mark.spark

N_TX = 1_500
BATCH_RECORDS = 300


@dataclass
class Runs:
    local: Lake
    spark: Lake
    local_seconds: float
    report: SparkFraudReport
    n_records: int
    input_dir: Path
    checkpoint: Path


BAD = [payload for payload, _ in BAD_RECORDS]


def _payloads(sim: Simulation) -> tuple[list[bytes], list[str]]:
    """Simulated records, bad ones among them, and a replay of an earlier transaction id."""
    return troubled_stream(sim.transactions.slice(0, N_TX).to_pylist(), BAD)


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    spark: SparkSession,
    small_sim: Simulation,
    small_bank: AccountChanges,
    tiny_model: LoadedModel,
) -> Runs:
    root = tmp_path_factory.mktemp("spark_fraud")
    payloads, keys = _payloads(small_sim)
    started = time.perf_counter()
    local, input_dir, _ = in_process_reference(
        root, payloads, keys, small_sim.labels, tiny_model, BATCH_RECORDS, small_bank
    )
    local_seconds = time.perf_counter() - started  # (batch files included)
    checkpoint = root / "checkpoint"
    lake = Lake(root / "spark")
    load_labels(lake, small_sim.labels)
    load_bank(lake, small_bank, root / "dms")
    report = run_fraud_on_spark(
        spark, lambda s: jsonl_source(s, input_dir, 1), lake, checkpoint, model=tiny_model
    )
    return Runs(local, lake, local_seconds, report, len(payloads), input_dir, checkpoint)


def test_spark_job_matches_the_in_process_runner(runs: Runs, tiny_model: LoadedModel) -> None:
    local, lake, report = runs.local, runs.spark, runs.report
    n_batches = len(list(runs.input_dir.glob("*.jsonl")))
    assert n_batches > 3
    # The lake's numbering, after the accounts' CDC batch; the tables below carry the same ids.
    ids = [b.batch_id for b in report.batches]
    assert ids == list(range(ids[0], ids[0] + n_batches))
    assert report.n_records == runs.n_records
    assert report.app_id.startswith("spark:")
    stamps = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}
    # The feature vectors, the scores, the alerts: identical per transaction and batch.
    assert_same_tables(
        sorted_table(local, FEATURES, "transaction_id"),
        sorted_table(lake, FEATURES, "transaction_id"),
    )
    # Scores: the same model on bit-identical vectors gives bit-identical scores (the feature
    # function accumulates per key, so grouping by key on executors changes no rounding).
    local_scores = sorted_table(local, SCORES, "transaction_id", stamps | {"score"})
    spark_scores = sorted_table(lake, SCORES, "transaction_id", stamps | {"score"})
    assert_same_tables(local_scores, spark_scores)  # ids, rules, alerts, versions, batch ids
    a = sorted_table(local, SCORES, "transaction_id")["score"].to_numpy()
    b = sorted_table(lake, SCORES, "transaction_id")["score"].to_numpy()
    assert np.array_equal(a, b), f"{int((a != b).sum())} of {len(a)} scores differ"
    spark_features = sorted_table(lake, FEATURES, "transaction_id").to_pandas()
    rescored = score(tiny_model.model, spark_features)  # the Spark scores are the model's
    # All rows at once here, a batch at a time in the jobs: the logistic-regression member's
    # BLAS dot products may round in the last bit differently for another number of rows.
    np.testing.assert_allclose(rescored, b, rtol=1e-12, atol=0)
    keep = [
        "transaction_id",
        "customer_id",
        "terminal_id",
        "event_time",
        "amount",
        "score",
        "reason",
    ]
    assert (
        local.read(ALERTS, columns=keep)
        .sort_by("transaction_id")
        .equals(lake.read(ALERTS, columns=keep).sort_by("transaction_id"))
    )
    # Labels reported before the events were used, identically.
    rates = lake.read(FEATURES, columns=["terminal_fraud_rate_30d"])["terminal_fraud_rate_30d"]
    assert pc.max(rates).as_py() > 0
    assert lake.read(SCORES).num_rows == N_TX
    # State after the last batch: identical.
    assert_same_tables(
        sorted_table(local, CUSTOMER_STATE, "customer_id", stamps),
        sorted_table(lake, CUSTOMER_STATE, "customer_id", stamps),
    )
    assert_same_tables(
        sorted_table(local, TERMINAL_STATE, "terminal_id", stamps),
        sorted_table(lake, TERMINAL_STATE, "terminal_id", stamps),
    )
    # Dead letters: the same payloads, in the same batches, for the same reasons.
    cols = ["batch_id", "payload", "reason"]
    dead_local = local.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    dead_spark = lake.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    assert dead_spark.num_rows == len(BAD) + 1
    assert dead_local.equals(dead_spark)
    assert any("duplicate transaction_id" in r for r in dead_spark["reason"].to_pylist())
    # Each batch's context is recorded before its outputs (labels version included).
    audit = lake.read(SPARK_BATCHES)
    first = min(audit["batch_id"].to_pylist())
    assert sorted(audit["batch_id"].to_pylist()) == list(range(first, first + n_batches))
    contexts = [ScoringContext.from_json(t) for t in audit["context"].to_pylist()]
    assert {c.labels_version for c in contexts} == {lake.version("labels")}

    n = report.n_records
    spark_s = sum(b.total_s for b in report.batches)
    print(
        f"\nin-process: {n / runs.local_seconds:,.0f} rec/s ({runs.local_seconds:.2f}s); "
        f"spark: {n / report.duration_s:,.0f} rec/s end to end ({report.duration_s:.2f}s), "
        f"{n / spark_s:,.0f} rec/s inside foreachBatch"
        + "; ".join(
            f"#{b.batch_id} collect {b.collect_s:.2f} prepare {b.prepare_s:.2f} "
            f"features {b.features_s:.2f} score {b.score_s:.2f} write {b.write_s:.2f}"
            for b in report.batches
        )
    )


def test_rerun_without_new_files_writes_nothing(
    runs: Runs, spark: SparkSession, tiny_model: LoadedModel
) -> None:
    names = [FEATURES, SCORES, CUSTOMER_STATE, TERMINAL_STATE, DEAD_LETTER_TABLE, SPARK_BATCHES]
    before = {name: runs.spark.version(name) for name in names}
    again = run_fraud_on_spark(
        spark,
        lambda s: jsonl_source(s, runs.input_dir, 1),
        runs.spark,
        runs.checkpoint,
        model=tiny_model,
    )
    assert again.app_id == runs.report.app_id  # the same query, resumed from its checkpoint
    assert again.batches == [] and again.rows_written == {}
    assert {name: runs.spark.version(name) for name in names} == before


def test_lost_checkpoint_replays_are_dead_lettered_not_scored_twice(
    runs: Runs,
    spark: SparkSession,
    small_sim: Simulation,
    small_bank: AccountChanges,
    tiny_model: LoadedModel,
    tmp_path: Path,
) -> None:
    """A new checkpoint re-reads the input from its start; the lake's batch ids go on.

    The first files are scored, the checkpoint is lost, and the new query reads every file (the
    file source, like Kinesis from TRIM_HORIZON, starts over). Its batch ids continue after the
    lake's, so every replayed transaction is "already processed in an earlier batch" and only the
    new files are scored: each transaction once, with the in-process runner's features.
    """
    files = sorted(runs.input_dir.glob("*.jsonl"))
    k = 2
    first = tmp_path / "first"
    first.mkdir()
    for path in files[:k]:
        shutil.copy2(path, first / path.name)
    lake = Lake(tmp_path / "lake")
    load_labels(lake, small_sim.labels)
    load_bank(lake, small_bank, tmp_path / "dms")
    base = next_batch_id(lake)  # the lake's numbering, after the accounts' CDC batch
    checkpoint = tmp_path / "checkpoint"

    def run(folder: Path) -> SparkFraudReport:
        return run_fraud_on_spark(
            spark, lambda s: jsonl_source(s, folder, 1), lake, checkpoint, model=tiny_model
        )

    before = run(first)
    assert [b.batch_id for b in before.batches] == list(range(base, base + k))
    shutil.rmtree(checkpoint)
    after = run(runs.input_dir)
    assert after.app_id != before.app_id
    assert [b.batch_id for b in after.batches] == list(range(base + k, base + k + len(files)))
    ids = lake.read(SCORES, columns=["transaction_id"])["transaction_id"]
    assert len(ids) == len(pc.unique(ids)) == runs.local.count(SCORES)
    features = ["transaction_id", *FEATURE_COLUMNS]
    assert_same_tables(
        runs.local.read(FEATURES, columns=features).sort_by("transaction_id"),
        lake.read(FEATURES, columns=features).sort_by("transaction_id"),
    )

    def earlier(table: pa.Table) -> int:
        reasons = table["reason"]
        return int(pc.sum(pc.match_substring(reasons, "in an earlier batch")).as_py() or 0)

    # Every transaction of the first files once more, plus the repeats in-process also caught.
    local_later = runs.local.read(DEAD_LETTER_TABLE, filter=pc.field("batch_id") >= k)
    replayed = lake.read(DEAD_LETTER_TABLE, filter=pc.field("batch_id") >= k)
    assert earlier(replayed) == sum(b.valid for b in before.batches) + earlier(local_later)


@pytest.mark.parametrize(
    ("buckets", "delay"), [(None, LABEL_DELAY_DAYS), (4, LABEL_DELAY_DAYS), (4, 0)]
)
def test_spark_features_equal_compute_features(
    spark: SparkSession, small_sim: Simulation, buckets: int | None, delay: int
) -> None:
    """Per key or per hash bucket of keys, at any label delay D: the same features and,
    exactly, the same state."""
    tx = small_sim.transactions.slice(0, N_TX)
    state = compute_features(tx.slice(0, 700), FeatureState.empty()).state
    frauds = known_frauds(small_sim.transactions, small_sim.labels)
    want = compute_features(tx.slice(700), state, frauds, delay)
    got = spark_features(spark, tx.slice(700), state, frauds, buckets, delay)
    assert_same_tables(want.features, got.features)  # same rows, same order
    assert got.state.customers.sort_by("customer_id").equals(
        want.state.customers.sort_by("customer_id")
    )
    assert got.state.terminals.sort_by("terminal_id").equals(
        want.state.terminals.sort_by("terminal_id")
    )


def test_a_champion_of_another_label_delay_scores_the_same_on_spark(
    tmp_path: Path,
    spark: SparkSession,
    small_sim: Simulation,
    small_bank: AccountChanges,
    tiny_model: LoadedModel,
) -> None:
    """A champion trained at D = 0: Spark computes the delayed windows with its D, as the runner
    does, and marks them with its version (else scoring would refuse them)."""
    model = LoadedModel(tiny_model.model, tiny_model.name, "d0", tags={FEATURE_VERSION_TAG: "4.d0"})
    payloads, keys = _payloads(small_sim)
    local, input_dir, _ = in_process_reference(
        tmp_path, payloads, keys, small_sim.labels, model, BATCH_RECORDS, small_bank
    )
    lake = Lake(tmp_path / "spark")
    load_labels(lake, small_sim.labels)
    load_bank(lake, small_bank, tmp_path / "dms-spark")
    run_fraud_on_spark(
        spark, lambda s: jsonl_source(s, input_dir, 1), lake, tmp_path / "checkpoint", model=model
    )
    features = sorted_table(lake, FEATURES, "transaction_id")
    assert set(features["feature_version"].to_pylist()) == {"4.d0"}
    assert_same_tables(sorted_table(local, FEATURES, "transaction_id"), features)
    a = sorted_table(local, SCORES, "transaction_id")["score"].to_numpy()
    b = sorted_table(lake, SCORES, "transaction_id")["score"].to_numpy()
    assert np.array_equal(a, b)
