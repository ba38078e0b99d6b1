"""Continuous mode on real brokers and a real Dagster instance: records scored as they arrive,
exactly once, stopped between batches, killed with -9 and restarted with nothing lost or doubled.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import new_topic
from fraud_streams import BAD_RECORDS, troubled_stream
from test_alerts import read_topic

from assets.continuous import (
    JOB_NAME,
    MODE_TAG,
    STREAM_TAG,
    continuous_kinesis_sensor,
    continuous_scoring_job,
    stream_tags,
)
from assets.resources import (
    FilesResource,
    HomeResource,
    KafkaResource,
    KinesisResource,
    MlflowResource,
    SparkResource,
)
from assets.sensors import kinesis_transactions_sensor
from models.job import ALERTS, SCORES, TERMINAL_STATE, TRANSACTIONS, FraudScoringJob
from models.promotion import move_champion
from models.registry import MODEL_NAME, LoadedModel, mlflow_client
from models.schema import DUPLICATE_EARLIER
from models.simulate import Simulation
from streamguard.alerts import KafkaAlertSink
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.config import Home
from streamguard.continuous import ContinuousReport, ContinuousSettings, StopRequest, run_continuous
from streamguard.kafka import KafkaSource, produce_records
from streamguard.kinesis import put_records, transaction_records
from streamguard.kinesis_tail import KinesisTailSource
from streamguard.lake import Lake
from streamguard.pipeline import scoring_job_name, scoring_runner
from streamguard.runner import BatchReport, ConcurrentWriterError
from streamguard.sources import MemorySource

REPO = Path(__file__).resolve().parent.parent
FAST = ContinuousSettings(idle_wait_s=0.02, compact_every_s=0.5, compact_min_files=4)


def wait_for(
    what: str, done: Callable[[], bool], timeout: float = 60.0, every: float = 0.1
) -> None:
    """Poll `done` until true; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not done():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def scored(lake: Lake) -> int:
    return lake.count(SCORES) if lake.exists(SCORES) else 0


def versions(lake: Lake) -> dict[str, int | None]:
    return {name: lake.version(name) for name in lake.names()}


def committed(lake: Lake, job: str) -> bool:
    """Whether the job's last planned batch is committed (nothing of it is left to write)."""
    plan = lake.transaction_version(CHECKPOINT_TABLE, f"{job}:plan")
    return plan is not None and lake.transaction_version(CHECKPOINT_TABLE, f"{job}:commit") == plan


def new_operations(lake: Lake, since: dict[str, int | None]) -> set[str]:
    """The kinds of the commits made to the lake's tables after the versions `since`."""
    kinds = set()
    for name in lake.names():
        table = lake.table(name)
        assert table is not None
        start = since.get(name)
        for entry in table.history():
            if start is None or entry["version"] > start:
                kinds.add(f"{entry['operation']}")
    return kinds


def ids(lake: Lake, table: str) -> list[str]:
    return sorted(lake.read(table, columns=["transaction_id"])["transaction_id"].to_pylist())


@pytest.fixture(scope="module")
def alert_all(tiny_model: LoadedModel) -> LoadedModel:
    """The tiny model alerting at 0: every transaction alerts (many alerts to publish)."""
    return LoadedModel(tiny_model.model, tiny_model.name, "0", tags={"alert_threshold": "0.0"})


def test_a_kafka_topic_is_scored_as_it_arrives_each_alert_published_once(
    tmp_path: Path,
    kafka_config: Any,
    request: pytest.FixtureRequest,
    small_sim: Simulation,
    alert_all: LoadedModel,
) -> None:
    topic = new_topic(kafka_config, request)
    alerts_topic = new_topic(kafka_config, request, partitions=1)
    rows = small_sim.transactions.slice(0, 600).to_pylist()
    first = troubled_stream(rows[:300], (), replay_of=None)
    payloads, keys = troubled_stream(rows[300:], replay_of=None)  # four bad records among them
    # ... and a repeat of a transaction the first wave brought, scored by then.
    second = ([*payloads, first[0][0]], [*keys, first[1][0]])
    job = scoring_job_name("kafka", topic)
    lake = Lake(tmp_path / "lake")
    sink = KafkaAlertSink(kafka_config, alerts_topic, job=job)
    stop, done = StopRequest(), []
    with KafkaSource(kafka_config, topic) as source:
        runner = scoring_runner(lake, source, None, max_batch_records=200, model=alert_all,
                                job=job, sinks=[sink])  # fmt: skip
        worker = threading.Thread(target=lambda: done.append(run_continuous(runner, stop, FAST)))
        worker.start()
        try:
            produce_records(kafka_config, topic, zip(*first, strict=True))
            wait_for("the first 300 transactions", lambda: scored(lake) == 300)
            produce_records(kafka_config, topic, zip(*second, strict=True))
            wait_for("all 600", lambda: scored(lake) == 600)
            wait_for("the last batch's commit", lambda: committed(lake, job))
            # Idle: polls go on and add no commit to the lake (compaction may go on: its
            # commits are the only ones).
            before = versions(lake)
            time.sleep(0.5)
            assert worker.is_alive()
            assert new_operations(lake, before) <= {"OPTIMIZE"}
        finally:
            stop.set("test done")
            worker.join(10)
        sink.close()
    assert not worker.is_alive(), "the worker did not stop on request"
    report: ContinuousReport = done[0]
    assert report.stop_reason == "test done" and report.idle_polls > 5
    assert report.records == 605 and report.batches >= 2  # two waves at least
    produced = sorted(r["transaction_id"] for r in rows)
    assert ids(lake, TRANSACTIONS) == produced and ids(lake, SCORES) == produced
    reasons = lake.read(DEAD_LETTER_TABLE, columns=["reason"])["reason"].to_pylist()
    assert len(reasons) == 5 and reasons.count(DUPLICATE_EARLIER) == 1, reasons
    for _, reason in BAD_RECORDS:
        assert sum(reason in r for r in reasons) == 1, (reason, reasons)
    # It compacted its small files between batches, and every row above survived that.
    assert report.compactions >= 1 and "OPTIMIZE" in new_operations(lake, {})
    # Every alert of the lake on the alerts topic exactly once (read_committed).
    published = sorted(m["alert_id"] for m in read_topic(kafka_config, alerts_topic))
    assert published == ids(lake, ALERTS) == produced


@pytest.mark.parametrize("other_lake", ["same lake object", "its own lake object"])
def test_a_second_writer_of_the_same_stream_is_stopped_before_it_writes(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel, other_lake: str
) -> None:
    """Also when the other writer is another process's view of the lake: the worker's open
    tables must see its commits (the kept `_checkpoints` handle included)."""
    records = list(transaction_records(small_sim.transactions.slice(0, 400)))
    source = MemorySource.split([r[0] for r in records], [r[1] for r in records], n_shards=2)
    lake = Lake(tmp_path / "lake")
    theirs = lake if other_lake == "same lake object" else Lake(tmp_path / "lake")
    worker = scoring_runner(lake, source, None, max_batch_records=100, model=tiny_model)
    other = scoring_runner(theirs, source, None, max_batch_records=100, model=tiny_model)
    assert worker.recover() is None and worker.step() is not None
    assert other.run(max_batches=1).n_records == 100  # another process moved the job on
    before = versions(lake)
    with pytest.raises(ConcurrentWriterError, match="another process is scoring"):
        worker.step()
    assert versions(lake) == before
    assert lake.count(SCORES) == 200 and len(set(ids(lake, SCORES))) == 200


@pytest.fixture
def scoring_home(tmp_path: Path, champion_home: Home) -> Home:
    """A fresh STREAMGUARD_HOME whose MLflow store holds the session's champion (a copy)."""
    home = Home(tmp_path / "home")
    shutil.copytree(champion_home.mlflow, home.mlflow)
    return home


def test_a_running_worker_scores_with_the_new_champion_once_the_alias_moves(
    tmp_path: Path, small_sim: Simulation, scoring_home: Home
) -> None:
    """The worker asks the registry again only when it may have changed, and keeps the loaded
    model meanwhile; a move of `champion` is seen by the very next batch."""
    uri = scoring_home.mlflow_tracking_uri
    database = scoring_home.mlflow / "mlflow.db"
    past = time.time() - 60
    os.utime(database, (past, past))  # a registry last written a minute ago
    records = list(transaction_records(small_sim.transactions.slice(0, 400)))
    source = MemorySource.split([r[0] for r in records], [r[1] for r in records], n_shards=2)
    lake = Lake(tmp_path / "lake")
    runner = scoring_runner(lake, source, uri, max_batch_records=100)
    job = runner.processor
    assert isinstance(job, FraudScoringJob)
    first = [runner.step(), runner.step()]
    assert job.alias_lookups == 1  # the second plan trusted the unchanged store

    client = mlflow_client(uri)
    champion = client.get_model_version(MODEL_NAME, "1")
    second = client.create_model_version(MODEL_NAME, champion.source, champion.run_id).version
    move_champion(uri, MODEL_NAME, str(second), "promotion", "a test moves the alias")
    after = runner.step()
    assert after is not None and job.alias_lookups == 2

    scored = lake.read(SCORES, columns=["batch_id", "model_version"])
    by_batch = dict(
        zip(scored["batch_id"].to_pylist(), scored["model_version"].to_pylist(), strict=True)
    )
    assert [by_batch[b.batch_id] for b in first if b is not None] == ["1", "1"]
    assert by_batch[after.batch_id] == str(second)
    assert set(job._models) == {str(second)}  # the old champion's model is let go


N_TX = 1_500


def test_cli_worker_killed_mid_stream_and_restarted_loses_nothing_and_doubles_nothing(
    tmp_path: Path, kinesis_server: str, kinesis: Any, stream_name: str, champion_home: Home,
    scoring_home: Home,
) -> None:  # fmt: skip
    table = pq.read_table(champion_home.data / "transactions.parquet").slice(0, N_TX)
    records = list(transaction_records(table))
    lake = Lake(scoring_home.lake)
    job = scoring_job_name("kinesis", stream_name)
    env = dict(os.environ, STREAMGUARD_HOME=str(scoring_home.root))
    command = [sys.executable, "-m", "streamguard.cli", "score", "--continuous",
               "--stream", stream_name, "--endpoint", kinesis_server, "--poll-interval", "0.05",
               "--max-batch", "300"]  # fmt: skip
    workers: list[subprocess.Popen[str]] = []

    def start_worker(log: str) -> subprocess.Popen[str]:
        with open(tmp_path / log, "w") as out:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, text=True, start_new_session=True,
                stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        workers.append(process)
        return process

    def produce(chunk: list[tuple[bytes, str]]) -> None:
        for start in range(0, len(chunk), 50):  # ~500 records/s, in 50-record puts
            put_records(kinesis, stream_name, chunk[start : start + 50])
            time.sleep(0.1)

    try:
        first = start_worker("first.log")
        produce(records[:500])
        wait_for("the first worker's first batches", lambda: scored(lake) >= 100)
        producer = threading.Thread(target=produce, args=(records[500:],))
        producer.start()
        wait_for("more batches", lambda: scored(lake) >= 600)
        # Mid-stream (records still arriving), and as a batch is planned but not committed.
        wait_for("a batch in flight", lambda: not committed(lake, job), every=0.002)
        os.killpg(first.pid, signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        assert scored(lake) < N_TX
        in_flight = not committed(lake, job)
        second = start_worker("second.log")
        producer.join(60)
        wait_for("every record scored", lambda: scored(lake) >= N_TX, timeout=90)
        time.sleep(0.3)  # a record scored twice would show now
        os.killpg(second.pid, signal.SIGTERM)  # the stop request: honoured between batches
        assert second.wait(30) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        for process in workers:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
    out = (tmp_path / "second.log").read_text()
    assert "stopped (SIGTERM)" in out, out[-3000:]
    # The batch the kill interrupted was replayed over its planned range, then it went on.
    assert (" 1 replayed" in out) is in_flight, out[-3000:]
    produced = sorted(table["transaction_id"].to_pylist())
    assert ids(lake, TRANSACTIONS) == produced, "a transaction lost or scored twice"
    assert ids(lake, SCORES) == produced
    assert lake.count(DEAD_LETTER_TABLE) == 0  # no record read twice (a repeat is dead-lettered)
    # The checkpoint: every planned batch committed once, covering exactly what was produced.
    checkpoints = lake.read(CHECKPOINT_TABLE, filter=pc.field("job") == job)
    plans = checkpoints.filter(pc.equal(checkpoints["kind"], "plan"))
    commits = checkpoints.filter(pc.equal(checkpoints["kind"], "commit"))
    assert sorted(commits["batch_id"].to_pylist()) == sorted(set(plans["batch_id"].to_pylist()))
    assert pc.sum(commits["n_records"]).as_py() == N_TX


# A worker process (run_continuous on the local Kinesis server, as the CLI runs it) that
# SIGKILLs itself at one point of the deferred commit marks (`Checkpoints.defer_commits`): no
# `finally`, no flush on the way out, as a real kill.
KILLED_WORKER = """
import os, pickle, signal, sys
from streamguard.checkpoint import Checkpoints
from streamguard.continuous import ContinuousSettings, StopRequest, run_continuous
from streamguard.kinesis import kinesis_client
from streamguard.kinesis_tail import KinesisTailSource
from streamguard.lake import Lake
from streamguard.pipeline import scoring_runner

job = pickle.loads(open(sys.argv[1], "rb").read())
point, batch = job["point"], job["batch"]
stop = StopRequest()

def kill():
    os.kill(os.getpid(), signal.SIGKILL)

class Killing(Checkpoints):
    def write_plan(self, plan):
        if point == "before the mark with the next plan" and plan.batch_id == batch + 1:
            kill()
        super().write_plan(plan)
        if point == "after the mark with the next plan" and plan.batch_id == batch + 1:
            kill()

    def flush(self):
        if self._pending is not None and point == ("stop" if stop.is_set() else "idle"):
            kill()
        return super().flush()

source = KinesisTailSource(kinesis_client(job["endpoint"]), job["stream"], poll_interval_s=0.05)
runner = scoring_runner(Lake(job["lake"]), source, None, max_batch_records=job["max_batch"],
                        model=job["model"], job=job["job"])
runner.checkpoints = Killing(runner.lake, runner.job, runner.processor.load_context)

def after_write(plan, table):
    if point == "after the batch" and plan.batch_id == batch and table == "commit":
        kill()

def on_batch(report):
    if point == "stop" and report.batch_id == batch:
        stop.set("asked to stop")

runner.after_write = after_write
run_continuous(runner, stop, ContinuousSettings(idle_wait_s=0.02, compact_every_s=0.5,
               compact_min_files=4), on_batch=on_batch)
"""
# Where the worker dies, and whether the batch it leaves unmarked is already wholly written
# (then its replay writes nothing). The batch is the third one; "idle" is the first idle flush
# with a mark to write.
DEFERRED_MARK_CRASHES = {
    "after the batch": True,  # its outputs written, its mark only noted
    "before the mark with the next plan": True,  # the next batch read and planned, not written
    "after the mark with the next plan": False,  # one Delta commit; the next batch not written
    "idle": True,  # the stream went quiet: the mark about to go out alone
    "stop": True,  # stopping: the mark about to go out alone
}


@pytest.mark.parametrize("point", list(DEFERRED_MARK_CRASHES))
def test_a_worker_killed_around_a_deferred_commit_mark_then_restarted_scores_each_once(
    tmp_path: Path, kinesis_server: str, kinesis: Any, stream_name: str, small_sim: Simulation,
    tiny_model: LoadedModel, point: str,
) -> None:  # fmt: skip
    """A batch's commit mark goes out with the next batch's plan, or alone when the stream is
    idle or the worker stops: a kill at each of those points, then a restart, leaves every
    produced transaction scored exactly once and every plan committed once."""
    n_tx, batch = 600, 2
    table = small_sim.transactions.slice(0, n_tx)
    put_records(kinesis, stream_name, list(transaction_records(table)))
    lake = Lake(tmp_path / "lake")
    job = scoring_job_name("kinesis", stream_name)
    spec = {"point": point, "batch": batch, "endpoint": kinesis_server, "stream": stream_name,
            "lake": lake.location, "max_batch": 100, "model": tiny_model, "job": job}  # fmt: skip
    (tmp_path / "job.pkl").write_bytes(pickle.dumps(spec))
    (tmp_path / "worker.py").write_text(KILLED_WORKER)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "worker.py"), str(tmp_path / "job.pkl")],
        cwd=REPO, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]

    # The point was reached: the last plan's mark is not in the lake.
    planned = lake.transaction_version(CHECKPOINT_TABLE, f"{job}:plan")
    marked = lake.transaction_version(CHECKPOINT_TABLE, f"{job}:commit")
    assert planned is not None and marked == planned - 1, (planned, marked)
    written = lake.transaction_version(TERMINAL_STATE, job)  # the batch's last output
    if DEFERRED_MARK_CRASHES[point]:
        assert written == planned  # the unmarked batch is whole
    else:
        assert planned == batch + 1 and written == batch
        # ... and its plan went out in the one Delta commit that marked the batch before it.
        log = lake.path(CHECKPOINT_TABLE) / "_delta_log"
        version = lake.version(CHECKPOINT_TABLE)
        actions = [
            json.loads(line) for line in (log / f"{version:020d}.json").read_text().splitlines()
        ]
        txns = {a["txn"]["appId"]: a["txn"]["version"] for a in actions if "txn" in a}
        assert txns == {f"{job}:commit": batch, f"{job}:plan": batch + 1}
    if point in ("after the batch", "before the mark with the next plan", "stop"):
        assert planned == batch
    assert scored(lake) < n_tx or point == "idle"

    # Restart: the unmarked batch is replayed over its range (writing nothing when it is
    # whole), then the rest is scored.
    batches: list[BatchReport] = []
    stop = StopRequest()
    source = KinesisTailSource(kinesis, stream_name, poll_interval_s=0.05)
    runner = scoring_runner(lake, source, None, max_batch_records=100, model=tiny_model, job=job)
    worker = threading.Thread(
        target=lambda: run_continuous(runner, stop, FAST, on_batch=batches.append)
    )
    worker.start()
    try:
        wait_for("every transaction scored", lambda: scored(lake) >= n_tx)
        time.sleep(0.3)  # a record scored twice would show now
    finally:
        stop.set("test done")
        worker.join(30)
        source.close()
    assert not worker.is_alive()
    assert batches[0].replayed and batches[0].batch_id == planned
    assert (batches[0].rows_written == {}) is DEFERRED_MARK_CRASHES[point], batches[0]
    assert not any(b.replayed for b in batches[1:])

    produced = sorted(table["transaction_id"].to_pylist())
    assert ids(lake, TRANSACTIONS) == produced, "a transaction lost or scored twice"
    assert ids(lake, SCORES) == produced
    assert lake.count(DEAD_LETTER_TABLE) == 0  # no record read twice
    # Every plan marked committed once (the last one by the stop), covering what was produced.
    checkpoints = lake.read(CHECKPOINT_TABLE, filter=pc.field("job") == job)
    plans = checkpoints.filter(pc.equal(checkpoints["kind"], "plan"))
    commits = checkpoints.filter(pc.equal(checkpoints["kind"], "commit"))
    assert sorted(commits["batch_id"].to_pylist()) == sorted(set(plans["batch_id"].to_pylist()))
    assert pc.sum(commits["n_records"]).as_py() == n_tx
    assert committed(lake, job)


# --------------------------------------------------------------------------- Dagster


def continuous_job(home: Path, tracking_uri: str, kinesis: KinesisResource) -> dg.JobDefinition:
    """The code location's continuous job with test resources (no Kafka)."""
    from assets.definitions import AREAS

    resources = {
        "home": HomeResource(root=str(home)),
        "kinesis": kinesis,
        "kafka": KafkaResource(),
        "files": FilesResource(),
        "mlflow": MlflowResource(tracking_uri=tracking_uri),
        "spark": SparkResource(),
    }
    defs = dg.Definitions.merge(*AREAS, dg.Definitions(resources=resources))
    return defs.resolve_job_def(JOB_NAME)


@pytest.mark.timeout(180)
def test_a_dagster_run_is_terminated_between_batches_and_ends_canceled(
    tmp_path: Path, kinesis_server: str, kinesis: Any, stream_name: str, champion_home: Home,
    small_sim: Simulation,
) -> None:  # fmt: skip
    resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    job = continuous_job(tmp_path / "home", champion_home.mlflow_tracking_uri, resource)
    records = list(transaction_records(small_sim.transactions.slice(0, 400)))
    put_records(kinesis, stream_name, records)
    lake = Lake(tmp_path / "home" / "lake")
    # Termination as Dagster's run launcher does it: the run is marked CANCELING, then the
    # run worker gets SIGINT. The status is looked at only every minute here, so the signal is
    # what stops the run.
    config = {"poll_interval_s": 0.05, "check_terminated_every_s": 60.0}

    def terminate(instance: dg.DagsterInstance) -> None:
        wait_for("the run to score the stream", lambda: scored(lake) == 400, timeout=120)
        (run,) = instance.get_runs(dg.RunsFilter(job_name=JOB_NAME))
        instance.report_run_canceling(run)
        os.kill(os.getpid(), signal.SIGINT)  # only once the op's loop (and handler) is running

    with dg.instance_for_test() as instance:
        terminator = threading.Thread(target=terminate, args=(instance,), daemon=True)
        terminator.start()
        started = time.monotonic()
        result = job.execute_in_process(
            run_config={"ops": {"continuous_scoring": {"config": config}}},
            instance=instance,
            raise_on_error=False,
        )
        terminator.join(5)
        run = instance.get_run_by_id(result.run_id)
        assert run is not None and run.status == dg.DagsterRunStatus.CANCELED
        assert time.monotonic() - started < 120
        logs = [e.message for e in instance.all_logs(result.run_id)]
        assert any("stopped (SIGINT)" in m for m in logs), logs[-10:]
        assert run.tags[STREAM_TAG] == stream_name and run.tags[MODE_TAG] == "continuous"
    assert ids(lake, SCORES) == sorted(r["transaction_id"] for r in small_sim.transactions.slice(
        0, 400).to_pylist())  # fmt: skip


def test_the_sensor_keeps_exactly_one_run_per_stream(tmp_path: Path) -> None:
    with dg.instance_for_test(overrides={"run_retries": {"enabled": True}}) as instance:

        def evaluate(stream: str) -> Any:
            context = dg.build_sensor_context(
                instance=instance, resources={"kinesis": KinesisResource(stream=stream)}
            )
            return continuous_kinesis_sensor(context)

        request = evaluate("payments")
        assert isinstance(request, dg.RunRequest)
        assert request.tags == stream_tags("kinesis", "payments")
        config = request.run_config["ops"]["continuous_scoring"]["config"]
        assert config["source"] == "kinesis"

        run = instance.create_run_for_job(
            continuous_scoring_job, tags={**continuous_scoring_job.tags, **request.tags},
            status=dg.DagsterRunStatus.STARTED,
        )  # fmt: skip
        skip = evaluate("payments")
        assert isinstance(skip, dg.SkipReason)
        assert skip.skip_message == (
            f"Continuous scoring of kinesis payments is already started: run {run.run_id}."
        )
        assert isinstance(evaluate("refunds"), dg.RunRequest)  # one per stream
        # The micro-batch sensors request nothing while it holds the scoring slot (their
        # stream is never read: no Kinesis here).
        micro = kinesis_transactions_sensor(
            dg.build_sensor_context(instance=instance, resources={"kinesis": KinesisResource()})
        )
        assert isinstance(micro, dg.SkipReason)
        assert f"Continuous scoring run {run.run_id} (kinesis payments)" in (
            micro.skip_message or ""
        )

        # It crashes: run retries will start the next run, so the sensor leaves it to them.
        instance.report_run_failed(run)
        failed = instance.get_run_by_id(run.run_id)
        assert failed is not None and failed.tags["dagster/will_retry"] == "true"
        waiting = evaluate("payments")
        assert isinstance(waiting, dg.SkipReason)
        assert "run retries" in (waiting.skip_message or "")
        # Terminated (or out of retries): the sensor starts a new one.
        instance.report_run_canceled(
            instance.create_run_for_job(continuous_scoring_job, tags=request.tags,
                                        status=dg.DagsterRunStatus.STARTED)
        )  # fmt: skip
        assert isinstance(evaluate("payments"), dg.RunRequest)
