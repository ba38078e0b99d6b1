"""The state-store mode of the Spark fraud job against the in-process runner.

The in-process runner scores a stream (valid transactions, some of them out of event-time order
within their batch, bad records, a duplicate within a batch and a replayed one from an earlier
batch; labels reported days after the fraud). Each of its batches becomes one JSON-lines file in
its arrival order; the Spark query reads one file per trigger, so both engines see the same
records in the same micro-batches. Then: a lost checkpoint recovered from Delta, and the TTL.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from deltalake import write_deltalake
from fraud_streams import (
    BAD_RECORDS,
    assert_same_outputs,
    in_process_reference,
    load_bank,
    troubled_stream,
)
from pyspark.sql import DataFrame, SparkSession

from models.accounts import AccountChanges
from models.job import CUSTOMER_STATE, FEATURES, TERMINAL_STATE
from models.registry import FEATURE_VERSION_TAG, LoadedModel
from models.simulate import Simulation
from streamguard.commit import DEAD_LETTER_TABLE, next_batch_id
from streamguard.lake import Lake
from streamguard.pipeline import load_labels
from streamguard.spark import fraud_state
from streamguard.spark.fraud import SparkFraudReport, jsonl_source
from streamguard.spark.fraud_state import SPARK_STORE_BATCHES, run_fraud_on_spark_state_store

pytestmark = pytest.mark.spark

N_TX = 1_200
BATCH_RECORDS = 300
BUCKETS = 4
STAMPS = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}


BAD = [payload for payload, _ in BAD_RECORDS[:2]]


def _payloads(sim: Simulation) -> tuple[list[bytes], list[str]]:
    """Simulated records with late arrivals, bad records and duplicates, and their shard keys."""
    rows = sim.transactions.slice(0, N_TX).to_pylist()
    # Out of order: every 7th record of a customer swaps with that customer's next one, so a
    # later event arrives first (in the same batch mostly, sometimes in the next one).
    by_customer: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_customer.setdefault(r["customer_id"], []).append(i)
    for positions in by_customer.values():
        for j in range(0, len(positions) - 1, 7):
            a, b = positions[j], positions[j + 1]
            rows[a], rows[b] = rows[b], rows[a]
    return troubled_stream(rows, BAD, retry_at=40)


@pytest.fixture(scope="module")
def delayed_model(tiny_model: LoadedModel) -> LoadedModel:
    """The model as a champion trained at label delay D = 0, not the default 7: both engines
    must compute the delayed terminal windows with the champion's D."""
    return LoadedModel(tiny_model.model, tiny_model.name, "d0", tags={FEATURE_VERSION_TAG: "4.d0"})


@dataclass
class Runs:
    root: Path
    local: Lake
    store: Lake
    report: SparkFraudReport
    input_dir: Path
    n_batches: int
    n_records: int


@pytest.fixture(scope="module")
def runs(
    tmp_path_factory: pytest.TempPathFactory,
    spark: SparkSession,
    small_sim: Simulation,
    small_bank: AccountChanges,
    delayed_model: LoadedModel,
) -> Runs:
    root = tmp_path_factory.mktemp("spark_fraud_state")
    payloads, keys = _payloads(small_sim)
    local, input_dir, n_batches = in_process_reference(
        root, payloads, keys, small_sim.labels, delayed_model, BATCH_RECORDS, small_bank
    )
    store = Lake(root / "store")
    load_labels(store, small_sim.labels)
    load_bank(store, small_bank, root / "dms")
    report = run_fraud_on_spark_state_store(
        spark,
        lambda s: jsonl_source(s, input_dir, 1),
        store,
        root / "checkpoint",
        model=delayed_model,
        buckets=BUCKETS,
    )
    return Runs(root, local, store, report, input_dir, n_batches, len(payloads))


def _assert_same_lake(want: Lake, got: Lake) -> None:
    """Every output table equal to the in-process runner's (row for row, batch ids included)."""
    assert_same_outputs(want, got, STAMPS)
    cols = ["batch_id", "payload", "reason"]
    dead_want = want.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    dead_got = got.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    assert dead_want.equals(dead_got)


def test_state_store_job_matches_the_in_process_runner(runs: Runs) -> None:
    """Same features, scores, alerts, dead letters and state, bit for bit, batch by batch."""
    assert runs.n_batches > 3
    base = runs.report.batches[0].batch_id  # the lake's numbering, after the accounts' CDC batch
    assert [b.batch_id for b in runs.report.batches] == list(range(base, base + runs.n_batches))
    assert runs.report.n_records == runs.n_records
    _assert_same_lake(runs.local, runs.store)
    reasons = runs.store.read(DEAD_LETTER_TABLE)["reason"].to_pylist()
    assert len(reasons) == len(BAD) + 2
    assert "duplicate transaction_id within the batch" in reasons
    assert "duplicate transaction_id: already processed in an earlier batch" in reasons
    # Late labels were used as they became known, identically (asserted equal above).
    assert set(runs.store.read(FEATURES)["feature_version"].to_pylist()) == {"4.d0"}
    rates = runs.store.read(FEATURES, columns=["terminal_fraud_rate_30d"])
    assert pc.max(rates["terminal_fraud_rate_30d"]).as_py() > 0
    plans = runs.store.read(SPARK_STORE_BATCHES)
    assert sorted(plans["batch_id"].to_pylist()) == list(range(base, base + runs.n_batches))
    assert plans["batch_id"].to_pylist() == [base + i for i in plans["spark_batch_id"].to_pylist()]


def test_crash_replay_and_lost_checkpoint_recover_exactly(
    runs: Runs,
    spark: SparkSession,
    small_sim: Simulation,
    small_bank: AccountChanges,
    delayed_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A crash mid-batch is replayed exactly; a lost checkpoint restarts from Delta exactly.

    The first files run with a crash inside the last of them (after `features`, before the state
    tables): the rerun replays that batch against the state store's previous version and writes
    only the missing tables. Then the checkpoint is deleted and a new query scores the remaining
    (new) files from the initial state in Delta. The lake ends equal to the in-process runner's,
    and a rerun with nothing new writes nothing.
    """
    files = sorted(runs.input_dir.glob("*.jsonl"))
    k = 2
    first, rest = runs.root / "recover-first", runs.root / "recover-rest"
    first.mkdir()
    rest.mkdir()
    for i, path in enumerate(files):
        shutil.copy2(path, (first if i < k else rest) / path.name)
    lake = Lake(runs.root / "recover")
    load_labels(lake, small_sim.labels)
    load_bank(lake, small_bank, runs.root / "dms")
    base = next_batch_id(lake)  # the lake's numbering, after the accounts' CDC batch
    checkpoint = runs.root / "recover-checkpoint"

    def run(folder: Path) -> SparkFraudReport:
        return run_fraud_on_spark_state_store(
            spark,
            lambda s: jsonl_source(s, folder, 1),
            lake,
            checkpoint,
            model=delayed_model,
            buckets=BUCKETS,
        )

    upsert = lake.upsert
    crashed: list[int] = []

    def crash_once(
        name: str,
        data: pa.Table,
        keys: Sequence[str],
        app_id: str | None = None,
        version: int = 0,
        latest_by: str | None = None,
    ) -> bool:
        if name == CUSTOMER_STATE and version == base + k - 1 and not crashed:
            crashed.append(version)
            raise RuntimeError("crash between Delta commits")
        return upsert(name, data, keys, app_id, version, latest_by)

    monkeypatch.setattr(lake, "upsert", crash_once)
    with pytest.raises(Exception, match="crash between Delta commits"):
        run(first)
    assert crashed == [base + k - 1]
    (app,) = set(lake.read(SPARK_STORE_BATCHES)["app_id"].to_pylist())
    assert lake.transaction_version(FEATURES, app) == base + k - 1  # written before the crash
    assert lake.transaction_version(CUSTOMER_STATE, app) == base + k - 2
    # The two state tables are written at once: the terminals' went in beside the crash.
    assert lake.transaction_version(TERMINAL_STATE, app) == base + k - 1
    replay = run(first)
    assert replay.app_id == app
    assert [b.batch_id for b in replay.batches] == [base + k - 1]
    assert set(replay.rows_written) == {CUSTOMER_STATE}  # only what was missing

    shutil.rmtree(checkpoint)  # lost: the new query starts from Delta
    # The state tables are merge-on-read (the in-process runner appends changed rows): give the
    # customers superseded rows (older batch ids, wrong balances) that the initial state must
    # pass over for each customer's latest.
    stored = lake.read(CUSTOMER_STATE)
    older = stored.set_column(
        stored.schema.get_field_index("batch_id"), "batch_id", pc.subtract(stored["batch_id"], 1)
    ).set_column(
        stored.schema.get_field_index("balance"), "balance", pc.add(stored["balance"], 1e6)
    )
    write_deltalake(lake.uri(CUSTOMER_STATE), older, mode="append")
    assert lake.read(CUSTOMER_STATE).sort_by("customer_id").equals(stored.sort_by("customer_id"))
    recovered = run(rest)
    assert recovered.app_id != app
    assert [b.batch_id for b in recovered.batches] == list(range(base + k, base + runs.n_batches))
    _assert_same_lake(runs.local, lake)

    versions = {name: lake.version(name) for name in (FEATURES, CUSTOMER_STATE, TERMINAL_STATE)}
    again = run(rest)
    assert again.batches == [] and again.rows_written == {}
    assert {name: lake.version(name) for name in versions} == versions


def _record(tid: str, hour: int) -> bytes:
    return json.dumps(
        {
            "transaction_id": tid,
            "event_time": f"2026-03-01T{hour:02d}:00:00Z",
            "customer_id": "C-idle",
            "terminal_id": "T-1",
            "amount": 20.0,
            "kind": "debit",
            "channel": "pos",
            "location": "Lisbon",
        }
    ).encode()


def test_idle_customer_state_expires_after_the_ttl(
    tmp_path: Path,
    spark: SparkSession,
    tiny_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With a 1 s TTL the customer's second transaction, 2 s later, is judged as a first one.

    Two files, one batch each, 2 s apart (a pause after the first batch: the second batch's
    processing time is taken when it starts); the same with the default TTL keeps the state.
    """
    process = fraud_state._process_store_batch

    def pause_after_first(batch: DataFrame, spark_batch_id: int, *args: Any) -> None:
        process(batch, spark_batch_id, *args)
        if spark_batch_id == 0:
            time.sleep(2)

    monkeypatch.setattr(fraud_state, "_process_store_batch", pause_after_first)
    ttls = {"tiny": timedelta(seconds=1), "default": fraud_state.DEFAULT_CUSTOMER_TTL}
    lakes = {name: Lake(tmp_path / name) for name in ttls}
    for name, ttl in ttls.items():
        folder = tmp_path / f"in-{name}"
        folder.mkdir()
        for i, (tid, hour) in enumerate((("t1", 9), ("t2", 10))):
            path = folder / f"{i}.jsonl"
            path.write_bytes(_record(tid, hour) + b"\n")
            os.utime(path, (time.time() - 100 + i, time.time() - 100 + i))
        run_fraud_on_spark_state_store(
            spark,
            partial(jsonl_source, input_dir=folder, max_files_per_trigger=1),
            lakes[name],
            tmp_path / f"checkpoint-{name}",
            model=tiny_model,
            customer_ttl=ttl,
        )

    def second(name: str) -> dict[str, object]:
        rows = lakes[name].read(FEATURES).to_pylist()
        return next(r for r in rows if r["transaction_id"] == "t2")

    kept, expired = second("default"), second("tiny")
    assert kept["seconds_since_prev"] == 3600.0 and kept["location_seen_before"] == 1.0
    assert kept["n_locations_seen"] == 1.0 and kept["count_1d"] == 1.0
    assert kept["balance_before"] == -20.0
    assert expired["seconds_since_prev"] is None and expired["location_seen_before"] == 0.0
    assert expired["n_locations_seen"] == 0.0 and expired["count_1d"] == 0.0
    assert expired["balance_before"] == 0.0
    states = {n: lakes[n].read(CUSTOMER_STATE).to_pylist()[0] for n in ttls}
    assert states["default"]["n_transactions"] == 2
    assert states["tiny"]["n_transactions"] == 1  # the Delta row restarts with the store's
