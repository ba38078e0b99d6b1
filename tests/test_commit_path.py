"""The one commit path: every executor records a batch's context whole and replays with it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from fraud_streams import add_account_version

from models.accounts import ACCOUNTS_HISTORY
from models.job import (
    CUSTOMER_STATE,
    LABELS,
    OUTPUTS,
    TERMINAL_STATE,
    TRANSACTIONS,
    TRANSACTIONS_TABLE_SCHEMA,
    FraudScoringJob,
    ScoringContext,
)
from models.protocols import TableOutput
from models.registry import ALERT_THRESHOLD_TAG, LoadedModel
from models.schema import LABEL_SCHEMA, TIMESTAMP, to_payload
from models.simulate import Simulation
from streamguard.checkpoint import BatchPlan, Checkpoints, ShardRange
from streamguard.commit import DEAD_LETTER_SCHEMA, batch_written, write_batch
from streamguard.lake import Lake
from streamguard.pipeline import SCORING_JOB, ensure_tables, scoring_runner
from streamguard.sources import MemorySource
from streamguard.spark.fraud import SPARK_BATCH_SCHEMA, SPARK_BATCHES, plan_batch
from streamguard.spark.fraud_state import SPARK_STORE_BATCHES


def _job(model: LoadedModel, threshold: float) -> FraudScoringJob:
    tagged = LoadedModel(model.model, model.name, "7", tags={ALERT_THRESHOLD_TAG: repr(threshold)})
    return FraudScoringJob(None, model=tagged)


Replay = Callable[[FraudScoringJob], ScoringContext]


def _in_process(lake: Lake, job: FraudScoringJob) -> Replay:
    checkpoints = Checkpoints(lake, SCORING_JOB, job.load_context)
    plan = BatchPlan(SCORING_JOB, 0, {"s": ShardRange(None, "1", 1)}, job.plan_context(lake))
    checkpoints.write_plan(plan)

    def replay(later: FraudScoringJob) -> ScoringContext:
        last = Checkpoints(lake, SCORING_JOB, later.load_context).last_plan()
        assert last is not None and isinstance(last.context, ScoringContext)
        return last.context

    return replay


def _spark(plans: str) -> Callable[[Lake, FraudScoringJob], Replay]:
    def first(lake: Lake, job: FraudScoringJob) -> Replay:
        lake.ensure(plans, SPARK_BATCH_SCHEMA)

        def plan(with_job: FraudScoringJob) -> ScoringContext:
            return plan_batch(
                lake,
                plans,
                with_job,
                app_id="spark:q",
                job_name=SCORING_JOB,
                batch_id=3,
                spark_batch_id=0,
                n_records=5,
            )

        plan(job)
        return plan

    return first


@pytest.mark.parametrize(
    "executor",
    [_in_process, _spark(SPARK_BATCHES), _spark(SPARK_STORE_BATCHES)],
    ids=["in_process", "spark_delta_state", "spark_state_store"],
)
def test_a_replayed_batch_runs_with_the_whole_planned_context(
    tmp_path: Path,
    tiny_model: LoadedModel,
    executor: Callable[[Lake, FraudScoringJob], Replay],
) -> None:
    """Regression: the Spark plan tables kept 4 of the 5 keys, so a replay lost the threshold."""
    lake = Lake(tmp_path / "lake")
    ensure_tables(lake)
    add_account_version(lake, 0)
    first = _job(tiny_model, 0.37)
    planned = first.plan_context(lake)
    assert planned.accounts_version == lake.version(ACCOUNTS_HISTORY)
    replay = executor(lake, first)
    # Between the attempts new labels and account changes arrive and the threshold is retuned.
    label = {"transaction_id": "t1", "is_fraud": True, "reported_at": datetime.now(UTC)}
    lake.append(LABELS, pa.Table.from_pylist([label], LABEL_SCHEMA), "labels", 0)
    add_account_version(lake, 1, card_status="blocked", valid_from=datetime(2026, 1, 2, tzinfo=UTC))
    later = _job(tiny_model, 0.9)
    assert later.plan_context(lake).alert_threshold == 0.9
    again = replay(later)
    assert again == planned
    assert again.alert_threshold == 0.37
    assert again.labels_version is not None and again.labels_version < (lake.version(LABELS) or 0)
    assert again.accounts_version is not None
    assert again.accounts_version < (lake.version(ACCOUNTS_HISTORY) or 0)
    assert later.policy_for(again).threshold == 0.37


def test_a_recorded_context_with_unknown_or_missing_keys_is_refused() -> None:
    ok = ScoringContext("fraud_model", "3", "4", 2, 0.25, accounts_version=5)
    assert ScoringContext.from_json(ok.to_json()) == ok
    # A plan from before shadow scoring and thresholds: replayed without them.
    old = ScoringContext.from_json('{"model_name": "fraud_model", "model_version": "3"}')
    assert old.challenger_version is None and old.alert_threshold is None
    assert old.accounts_version is None
    with pytest.raises(ValueError, match="unknown keys"):
        ScoringContext.from_json('{"model_version": "3", "threshold": 0.1}')
    with pytest.raises(ValueError, match="no model_version"):
        ScoringContext.from_json('{"model_name": "fraud_model"}')


def test_a_lake_from_before_a_new_lineage_column_takes_the_next_batch(tmp_path: Path) -> None:
    """A table written before `_rescued_data`/`headers` existed gets the columns on append."""
    lake = Lake(tmp_path / "lake")
    old = pa.schema([f for f in TRANSACTIONS_TABLE_SCHEMA if f.name not in ("headers",)])
    row = {
        "transaction_id": "t1",
        "event_time": datetime(2026, 1, 1, tzinfo=UTC),
        "customer_id": "C1",
        "terminal_id": "T1",
        "amount": 5.0,
        "kind": "debit",
        "batch_id": 0,
    }
    lake.append(TRANSACTIONS, pa.Table.from_pylist([row], old), "job", 0)
    new = {**row, "transaction_id": "t2", "batch_id": 1, "headers": '[["k", "v"]]'}
    assert lake.append(
        TRANSACTIONS, pa.Table.from_pylist([new], TRANSACTIONS_TABLE_SCHEMA), "job", 1
    )
    got = sorted(lake.read(TRANSACTIONS).to_pylist(), key=lambda r: r["transaction_id"])
    assert [r["headers"] for r in got] == [None, '[["k", "v"]]']


def test_a_terminal_state_from_before_day_counts_keeps_scoring(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    """A lake whose terminal_state kept event lists (feature version 2) takes the day counts:
    the MERGE adds the columns, its older rows read as no days yet."""
    lake = Lake(tmp_path / "lake")
    at = datetime(2025, 12, 31, tzinfo=UTC)
    old = pa.schema(
        [
            ("terminal_id", pa.string()),
            ("last_event_time", TIMESTAMP),
            ("n_transactions", pa.int64()),
            ("history_times", pa.list_(TIMESTAMP)),
            ("batch_id", pa.int64()),
            ("updated_at", TIMESTAMP),
        ]
    )
    terminal = small_sim.transactions["terminal_id"][0].as_py()
    row = {"terminal_id": terminal, "last_event_time": at, "n_transactions": 3,
           "history_times": [at], "batch_id": 0, "updated_at": at}  # fmt: skip
    lake.upsert(TERMINAL_STATE, pa.Table.from_pylist([row], old), ["terminal_id"])
    rows = small_sim.transactions.slice(0, 600).to_pylist()
    source = MemorySource.split([to_payload(r) for r in rows], [r["customer_id"] for r in rows], 1)
    report = scoring_runner(lake, source, None, max_batch_records=200, model=tiny_model).run()
    assert len(report.batches) == 3
    state = {r["terminal_id"]: r for r in lake.read(TERMINAL_STATE).to_pylist()}
    assert {"days", "day_counts", "history_times"} <= set(state[terminal])
    assert state[terminal]["n_transactions"] > 3 and state[terminal]["day_counts"]


def test_columns_an_older_table_lacks_read_as_null_in_the_order_asked(tmp_path: Path) -> None:
    lake = Lake(tmp_path / "lake")
    lake.append("t", pa.table({"a": [1], "c": ["x"]}), "job", 0)
    schema = pa.schema([("a", pa.int64()), ("b", pa.float64()), ("c", pa.string())])
    got = lake.read("t", columns=["a", "b", "c"], schema=schema)
    assert got.column_names == ["a", "b", "c"] and got.to_pylist() == [
        {"a": 1, "b": None, "c": "x"}
    ]
    assert lake.read("t", columns=["c", "a"], schema=schema).column_names == ["c", "a"]


def test_a_replay_writes_what_an_attempt_left_missing_and_not_what_it_left_empty(
    tmp_path: Path,
) -> None:
    """Before a keyed output that holds the batch, a missing table was empty in the attempt (its
    rows now come from advanced state: not written); inside the parallel leading group a missing
    table was only not reached yet (written)."""
    schema = pa.schema([("k", pa.string()), ("batch_id", pa.int64())])
    outputs = [
        TableOutput("first", schema),
        TableOutput("second", schema),
        TableOutput("state_a", schema, key=("k",)),
        TableOutput("state_b", schema, key=("k",)),
    ]
    rows = pa.table({"k": ["x"], "batch_id": [2]}, schema=schema)
    tables = {o.name: rows for o in outputs}
    lake = Lake(tmp_path / "lake")
    none = DEAD_LETTER_SCHEMA.empty_table()
    # Attempt 1 of batch 2 got "second" of the leading group written, not "first": a replay
    # writes "first" and the rest.
    lake.append("second", rows, "job", 2)
    written = write_batch(lake, "job", 2, none, tables, outputs)
    assert set(written) == {"first", "state_a", "state_b"}
    assert lake.count("first") == 1 and lake.count("second") == 1
    # Batch 3: the attempt had no row for "first" and wrote "state_a" before dying; the replay
    # computes a row for "first" (from advanced state) and must leave it out.
    batch3 = {o.name: rows.set_column(1, "batch_id", pa.array([3])) for o in outputs}
    lake.append("second", batch3["second"], "job", 3)
    lake.upsert("state_a", batch3["state_a"], ("k",), "job", 3)
    written = write_batch(lake, "job", 3, none, batch3, outputs)
    assert set(written) == {"state_b"}
    assert lake.count("first") == 1


class _MeetingLake(Lake):
    """Each upsert of a `last_together` table waits for the other's: written one after the
    other, the first would wait in vain (BrokenBarrierError)."""

    def __init__(self, root: Path, names: set[str]) -> None:
        super().__init__(root)
        self.names, self.barrier = names, threading.Barrier(len(names), timeout=10)
        self.threads: set[int] = set()

    def upsert(self, name: str, *args: Any, **kwargs: Any) -> bool:
        if name in self.names:
            self.threads.add(threading.get_ident())
            self.barrier.wait()
        return super().upsert(name, *args, **kwargs)


def test_the_last_together_state_tables_are_written_at_once_and_each_exactly_once(
    tmp_path: Path,
) -> None:
    """The state tables (`last_together`) are upserted at once, after every other output; a
    crash amid them leaves either one holding the batch, and the replay writes only the other;
    the batch counts as written once all of them hold it."""
    schema = pa.schema([("k", pa.string()), ("batch_id", pa.int64())])
    outputs = [
        TableOutput("first", schema),
        TableOutput("keyed", schema, key=("k",)),
        TableOutput("state_a", schema, key=("k",), last_together=True),
        TableOutput("state_b", schema, key=("k",), last_together=True),
    ]
    assert [o.name for o in OUTPUTS if o.last_together] == [CUSTOMER_STATE, TERMINAL_STATE]
    assert all(o.last_together for o in OUTPUTS[-2:])

    def rows(batch: int) -> dict[str, pa.Table]:
        return {o.name: pa.table({"k": ["x"], "batch_id": [batch]}, schema=schema) for o in outputs}

    none = DEAD_LETTER_SCHEMA.empty_table()
    lake = _MeetingLake(tmp_path / "lake", {"state_a", "state_b"})
    order: list[str] = []
    written = write_batch(lake, "job", 1, none, rows(1), outputs, after_write=order.append)
    assert set(written) == {"first", "keyed", "state_a", "state_b"}
    assert len(lake.threads) == 2 and order[-2:] == ["state_a", "state_b"]
    assert batch_written(lake, "job", 1, outputs)
    # A crash after state_b only (its thread was first), then after state_a only: the replay
    # writes the missing one and nothing else; until then the batch is not written.
    plain = Lake(tmp_path / "lake")
    for done, missing in [("state_b", "state_a"), ("state_a", "state_b")]:
        batch = 2 if done == "state_b" else 3
        data = rows(batch)
        plain.append("first", data["first"], "job", batch)
        plain.upsert("keyed", data["keyed"], ("k",), "job", batch)
        plain.upsert(done, data[done], ("k",), "job", batch)
        assert not batch_written(plain, "job", batch, outputs)
        data["first"] = data["keyed"] = data[done] = data[done].set_column(0, "k", pa.array(["y"]))
        assert set(write_batch(plain, "job", batch, none, data, outputs)) == {missing}
        assert batch_written(plain, "job", batch, outputs)
        assert plain.count("first") == batch and plain.read("keyed")["k"].to_pylist() == ["x"]
    # A batch with no row for any output (every record rejected) is still recorded as written:
    # a MERGE of nothing makes no Delta commit, so the state tables get an empty one.
    empty = {o.name: schema.empty_table() for o in outputs}
    versions = {name: plain.version(name) for name in ("state_a", "state_b")}
    kept = {name: plain.read(name) for name in versions}
    write_batch(plain, "job", 4, none, empty, outputs)
    assert batch_written(plain, "job", 4, outputs)
    assert {n: plain.version(n) for n in versions} == {n: v + 1 for n, v in versions.items()}
    assert {n: plain.read(n) for n in versions} == kept  # no row changed
    with pytest.raises(ValueError, match="must end the outputs"):
        batch_written(plain, "job", 3, [outputs[2], outputs[0]])
