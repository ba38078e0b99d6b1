"""The micro-batch runner on real Delta tables: dead letters, exactly once, crash and rerun.

Crash and rerun, the killed process and compaction run on a local lake and, for a few of the
crash points, on a lake in S3 (a local moto server; `where`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fraud_streams import BAD_RECORDS, troubled_stream
from sklearn.dummy import DummyClassifier

from models.features import FEATURE_COLUMNS
from models.job import (
    ALERTS,
    CUSTOMER_STATE,
    FEATURES,
    SCORES,
    SHADOW_SCORES,
    TERMINAL_STATE,
    TRANSACTIONS,
)
from models.registry import MODEL_NAME, LoadedModel
from models.schema import to_payload
from streamguard.checkpoint import BatchPlan
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.lake import Lake
from streamguard.pipeline import scoring_runner
from streamguard.runner import CrashError, MicroBatchRunner
from streamguard.sources import SEQ_DIGITS, MemorySource


def stream_of(transactions: pa.Table, with_bad: bool = True) -> tuple[MemorySource, int]:
    rows = transactions.to_pylist()
    if with_bad:
        payloads, keys = troubled_stream(rows)
    else:
        payloads, keys = troubled_stream(rows, (), replay_of=None)
    return MemorySource.split(payloads, keys, n_shards=2), len(payloads)


def table_snapshot(lake: Lake, name: str, key: str) -> list[dict]:
    drop = {
        "batch_id",
        "ingested_at",
        "scored_at",
        "created_at",
        "updated_at",
        "recorded_at",
        "arrival_time",
    }
    table = lake.read(name)
    table = table.select([c for c in table.column_names if c not in drop])
    return sorted(table.to_pylist(), key=lambda r: r[key])


def test_runner_scores_each_record_once_and_dead_letters_the_rest(
    tmp_path: Path, small_sim, tiny_model: LoadedModel
) -> None:
    source, n_records = stream_of(small_sim.transactions)
    lake = Lake(tmp_path / "lake")
    runner = scoring_runner(lake, source, None, max_batch_records=400, model=tiny_model)
    report = runner.run()
    n_tx = small_sim.transactions.num_rows
    assert report.n_records == n_records
    assert len(report.batches) > 3
    assert lake.count(TRANSACTIONS) == n_tx
    assert lake.count(FEATURES) == n_tx and lake.count(SCORES) == n_tx
    dead = lake.read(DEAD_LETTER_TABLE)
    assert dead.num_rows == len(BAD_RECORDS) + 1
    reasons = dead["reason"].to_pylist()
    for payload, reason in BAD_RECORDS:
        assert any(reason in r for r in reasons), reason
        assert payload in dead["payload"].to_pylist()
    assert any("duplicate transaction_id" in r for r in reasons)
    ids = lake.read(SCORES, columns=["transaction_id"])["transaction_id"]
    assert len(pc.unique(ids)) == n_tx
    scores = lake.read(SCORES)["score"]
    assert pc.min(scores).as_py() >= 0 and pc.max(scores).as_py() <= 1
    assert set(lake.read(SCORES)["model_version"].to_pylist()) == {tiny_model.version}
    customers = lake.read(CUSTOMER_STATE)
    assert customers.num_rows == len(pc.unique(small_sim.transactions["customer_id"]))
    # State holds what the stream says: balances equal credits minus debits per customer.
    tx = small_sim.transactions.to_pandas()
    signed = tx["amount"].where(tx["kind"] == "credit", -tx["amount"])
    expected = signed.groupby(tx["customer_id"]).sum()
    got = customers.to_pandas().set_index("customer_id")["balance"]
    assert (got.sort_index() - expected.sort_index()).abs().max() < 1e-6
    # Nothing new: a second run plans no batch and writes nothing.
    again = runner.run()
    assert again.batches == [] and lake.count(SCORES) == n_tx


class CrashingRunner(MicroBatchRunner):
    """Dies right after writing `table` in batch `batch`, like a killed process would."""

    def __init__(self, *args, table: str, batch: int, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.crash_table, self.crash_batch = table, batch

    def after_write(self, plan: BatchPlan, table: str) -> None:
        if plan.batch_id == self.crash_batch and table == self.crash_table:
            raise CrashError(f"crash after {table}")


CRASH_POINTS = [
    DEAD_LETTER_TABLE,
    TRANSACTIONS,
    FEATURES,
    SCORES,
    ALERTS,
    SHADOW_SCORES,
    CUSTOMER_STATE,
    TERMINAL_STATE,
    "commit",
]
# On S3 the points that leave a batch half written in each kind of table, and the one after it.
S3_CRASH_POINTS = [TRANSACTIONS, SCORES, TERMINAL_STATE, "commit"]


@pytest.fixture(scope="module")
def always_fraud() -> LoadedModel:
    """A challenger scoring every transaction 1.0: if it ever drove alerts, all would alert."""
    x = pd.DataFrame(np.zeros((2, len(FEATURE_COLUMNS))), columns=FEATURE_COLUMNS)
    model = DummyClassifier(strategy="constant", constant=1).fit(x, [0, 1])
    return LoadedModel(model=model, name=MODEL_NAME, version="always")


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, small_sim, tiny_model, always_fraud):  # type: ignore[no-untyped-def]
    lake = Lake(tmp_path_factory.mktemp("clean") / "lake")
    source, _ = stream_of(small_sim.transactions)
    scoring_runner(
        lake, source, None, max_batch_records=400, model=tiny_model, challenger=always_fraud
    ).run()
    return lake


def test_a_batch_of_only_bad_records_is_dead_lettered_and_the_stream_goes_on(
    tmp_path: Path, small_sim, tiny_model: LoadedModel
) -> None:
    good = [to_payload(r) for r in small_sim.transactions.slice(0, 5).to_pylist()]
    bad = [payload for payload, _ in BAD_RECORDS]
    # Batch 0 all bad (before any transaction exists), batch 1 good, batch 2 all bad again
    # (now against a non-empty transactions table).
    source = MemorySource({"shard-000": [*bad, *good, *bad]})
    lake = Lake(tmp_path / "lake")
    runner = scoring_runner(lake, source, None, max_batch_records=len(bad), model=tiny_model)
    first = runner.run(until={"shard-000": str(len(bad)).zfill(SEQ_DIGITS)})
    assert len(first.batches) == 1 and lake.count(DEAD_LETTER_TABLE) == len(bad)
    assert lake.count(SCORES) == 0
    runner.run()
    assert lake.count(SCORES) == len(good)
    assert lake.count(DEAD_LETTER_TABLE) == 2 * len(bad)
    assert lake.count(TRANSACTIONS) == len(good)


@pytest.mark.parametrize(
    ("crash_after", "where"),
    [(point, "local") for point in CRASH_POINTS] + [(point, "s3") for point in S3_CRASH_POINTS],
)
def test_crash_at_any_point_then_rerun_gives_no_duplicate_and_no_gap(
    lake_at: Callable[[str], str],
    small_sim,
    tiny_model: LoadedModel,
    always_fraud: LoadedModel,
    clean_run: Lake,
    crash_after: str,
    where: str,
) -> None:
    source, _ = stream_of(small_sim.transactions)
    lake = Lake(lake_at(where))
    template = scoring_runner(
        lake, source, None, max_batch_records=400, model=tiny_model, challenger=always_fraud
    )
    crashing = CrashingRunner(
        source,
        template.processor,
        lake,
        template.job,
        max_batch_records=400,
        table=crash_after,
        batch=2,
    )
    with pytest.raises(CrashError):
        crashing.run()
    assert crashing.checkpoints.committed_through() == (2 if crash_after == "commit" else 1)
    fresh = scoring_runner(
        lake, source, None, max_batch_records=400, model=tiny_model, challenger=always_fraud
    )
    report = fresh.run()
    assert report.batches[0].replayed is (crash_after != "commit")
    keys = {
        TRANSACTIONS: "transaction_id",
        FEATURES: "transaction_id",
        SCORES: "transaction_id",
        ALERTS: "transaction_id",
        SHADOW_SCORES: "transaction_id",
        CUSTOMER_STATE: "customer_id",
        TERMINAL_STATE: "terminal_id",
        DEAD_LETTER_TABLE: "sequence_number",
    }
    for name, key in keys.items():
        assert table_snapshot(lake, name, key) == table_snapshot(clean_run, name, key), name


def test_until_bounds_stop_the_run_and_the_next_run_continues(
    tmp_path: Path, small_sim, tiny_model: LoadedModel
) -> None:
    source, n_records = stream_of(small_sim.transactions, with_bad=False)
    lake = Lake(tmp_path / "lake")
    runner = scoring_runner(lake, source, None, max_batch_records=10_000, model=tiny_model)
    shards = source.shards()
    until = {
        shards[0]: source.read(shards[0], None, None, 10**9)[99].sequence_number,
        shards[1]: "",
    }
    first = runner.run(until=until)
    assert first.n_records == 100
    assert first.positions == {shards[0]: until[shards[0]], shards[1]: None}
    rest = runner.run()
    assert first.n_records + rest.n_records == n_records
    assert lake.count(SCORES) == n_records


def test_shadow_scores_every_transaction_and_never_alerts(
    tmp_path: Path,
    small_sim,
    tiny_model: LoadedModel,
    always_fraud: LoadedModel,
    clean_run: Lake,
) -> None:
    n_tx = small_sim.transactions.num_rows
    # With a challenger (clean_run): one shadow score per scored transaction, by the challenger.
    shadow = clean_run.read(SHADOW_SCORES)
    assert shadow.num_rows == n_tx
    assert sorted(shadow["transaction_id"].to_pylist()) == sorted(
        clean_run.read(SCORES)["transaction_id"].to_pylist()
    )
    assert set(shadow["model_version"].to_pylist()) == {always_fraud.version}
    assert pc.min(shadow["score"]).as_py() == 1.0
    assert set(shadow.column_names) == {
        "transaction_id", "event_time", "customer_id", "score", "model_name", "model_version",
        "batch_id", "scored_at",
    }  # fmt: skip
    # Without one: no shadow rows, and scores and alerts exactly as with the challenger.
    source, _ = stream_of(small_sim.transactions)
    lake = Lake(tmp_path / "lake")
    scoring_runner(lake, source, None, max_batch_records=400, model=tiny_model).run()
    assert lake.count(SHADOW_SCORES) == 0
    for name in (SCORES, ALERTS):
        assert table_snapshot(lake, name, "transaction_id") == table_snapshot(
            clean_run, name, "transaction_id"
        ), name
    assert 0 < clean_run.count(ALERTS) < n_tx  # the always-fraud challenger alerted on nothing


KILLED_RUNNER = """
import os, pickle, signal, sys
from streamguard.lake import Lake
from streamguard.pipeline import scoring_runner
from streamguard.runner import MicroBatchRunner
from streamguard.sources import MemorySource

job = pickle.loads(open(sys.argv[1], "rb").read())
source = MemorySource(job["shards"])
template = scoring_runner(Lake(job["lake"]), source, None, max_batch_records=400,
                          model=job["model"], challenger=job["challenger"])

class Killed(MicroBatchRunner):
    def after_write(self, plan, table):
        if plan.batch_id == 2 and table == job["table"]:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: a real kill

Killed(source, template.processor, template.lake, template.job, max_batch_records=400).run()
"""


@pytest.mark.parametrize(
    ("killed_after", "where"), [(SCORES, "local"), (TERMINAL_STATE, "local"), (SCORES, "s3")]
)
def test_a_killed_process_then_rerun_gives_no_duplicate_and_no_gap(
    tmp_path: Path,
    lake_at: Callable[[str], str],
    small_sim,
    tiny_model: LoadedModel,
    always_fraud: LoadedModel,
    clean_run: Lake,
    killed_after: str,
    where: str,
) -> None:
    import pickle
    import signal
    import subprocess
    import sys

    source, _ = stream_of(small_sim.transactions)
    shards = {s: [r.data for r in source.read(s, None, None, 10**9)] for s in source.shards()}
    lake_dir = lake_at(where)  # the killed process inherits the environment (S3's endpoint)
    job = {"shards": shards, "lake": lake_dir, "model": tiny_model,
           "challenger": always_fraud, "table": killed_after}  # fmt: skip
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(job))
    (tmp_path / "killed.py").write_text(KILLED_RUNNER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "killed.py"), str(tmp_path / "job.pkl")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    lake = Lake(lake_dir)
    assert lake.count(SCORES) > 0  # the killed process had committed data past its checkpoint
    report = scoring_runner(
        lake, MemorySource(shards), None, max_batch_records=400, model=tiny_model,
        challenger=always_fraud,
    ).run()  # fmt: skip
    assert report.batches[0].replayed
    for name, key in [(TRANSACTIONS, "transaction_id"), (SCORES, "transaction_id"),
                      (FEATURES, "transaction_id"), (CUSTOMER_STATE, "customer_id"),
                      (TERMINAL_STATE, "terminal_id")]:  # fmt: skip
        assert table_snapshot(lake, name, key) == table_snapshot(clean_run, name, key), name


def test_compaction_keeps_rows_and_exactly_once_bookkeeping(
    lake_root: str, small_sim, tiny_model: LoadedModel
) -> None:
    source, _ = stream_of(small_sim.transactions)
    lake = Lake(lake_root)
    runner = scoring_runner(lake, source, None, max_batch_records=300, model=tiny_model)
    runner.run()
    before = lake.read(SCORES).sort_by("transaction_id")
    version = lake.transaction_version(SCORES, runner.job)
    files = len(lake.table(SCORES).file_uris())  # type: ignore[union-attr]
    metrics = lake.compact(SCORES, vacuum_hours=0)
    assert files > 2 and metrics["files_removed"] == files and metrics["files_added"] == 1
    assert metrics["vacuumed"] == files
    assert lake.read(SCORES).sort_by("transaction_id").equals(before)
    assert lake.transaction_version(SCORES, runner.job) == version
    # A batch replayed after compaction is still recognised and skipped.
    assert version is not None
    assert not lake.append(SCORES, before.slice(0, 5), runner.job, version)
    assert lake.count(SCORES) == before.num_rows


def test_a_runner_freezes_what_the_process_held_before_it_scored(
    tmp_path: Path, small_sim, tiny_model: LoadedModel
) -> None:
    """The imports, the model and the source outlive every batch: once a runner exists they are
    out of the collector's reach (`gc.freeze`), so full collections walk only what batches made.
    Once per process: later runners freeze nothing more."""
    import gc

    from streamguard import runner

    source, _ = stream_of(small_sim.transactions, with_bad=False)
    scoring_runner(Lake(tmp_path / "lake"), source, None, model=tiny_model)
    assert gc.get_freeze_count() > 0  # the first runner of this process (or an earlier one) froze
    frozen = gc.get_freeze_count()
    assert not runner.freeze_startup_objects()
    scoring_runner(Lake(tmp_path / "lake"), source, None, model=tiny_model)
    assert gc.get_freeze_count() == frozen
