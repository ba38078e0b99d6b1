"""`make demo`: the whole platform, headless, on local components.

Local Kinesis (and with `source="kafka"` a local Kafka broker, whose topic then carries the
transactions and gets the alerts back), a generated history, a trained champion, then the real
Dagster daemon evaluating the sensors and launching scoring runs until the stream is drained.
Dagster is driven through its own command line, the way an operator would, so this module never
imports the Dagster layer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.progress import ProgressLine

if TYPE_CHECKING:
    from models.simulate import Simulation

STREAM = "transactions"
ALERTS_TOPIC = "fraud-alerts"
SCORING_JOB_NAME = "score_transactions_job"
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The Dagster instance of `make dev`/`make demo`: storage in SQLite under DAGSTER_HOME.
SQLITE_INSTANCE = REPO_ROOT / "platform" / "dagster.yaml"
#: The same instance with its storage on PostgreSQL (DAGSTER_PG_URL): a shared deployment's.
POSTGRES_INSTANCE = REPO_ROOT / "platform" / "dagster-postgres.yaml"


def _bin(name: str) -> str:
    """A console script of the running interpreter's environment (the venv), else PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def dagster_env(
    home: Home,
    endpoint: str | None,
    kafka_bootstrap: str | None = None,
    *,
    instance: Path = SQLITE_INSTANCE,
) -> dict[str, str]:
    """Environment for Dagster processes: the same home, its own DAGSTER_HOME with `instance` as
    its dagster.yaml (`POSTGRES_INSTANCE` also needs DAGSTER_PG_URL in the environment)."""
    home.ensure()
    shutil.copyfile(instance, home.dagster / "dagster.yaml")
    env = dict(os.environ)
    env.update(
        {
            "STREAMGUARD_HOME": str(home.root),
            "DAGSTER_HOME": str(home.dagster),
            "PYSPARK_PYTHON": sys.executable,
        }
    )
    if endpoint:
        env["AWS_ENDPOINT_URL_KINESIS"] = endpoint
    if kafka_bootstrap:
        env["STREAMGUARD_KAFKA_BOOTSTRAP"] = kafka_bootstrap
        env["STREAMGUARD_KAFKA_TOPIC"] = STREAM
        env["STREAMGUARD_ALERTS_TOPIC"] = ALERTS_TOPIC
    return env


@contextmanager
def process_group(
    args: list[str], env: dict[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Run a process in its own session and stop its whole group on exit.

    Dagster started in the background of a non-interactive shell ignores SIGINT/SIGTERM unless
    it leads its own process group; stopping the group also stops its code servers.
    """
    with log.open("ab") as out:
        proc = subprocess.Popen(
            args,
            env=env,
            cwd=REPO_ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield proc
        finally:
            stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    """SIGTERM the whole group, wait for every member (not just the leader), then SIGKILL."""
    deadline = time.monotonic() + grace
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader so it does not linger as a zombie
        if not _group_alive(proc.pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group is still alive (zombies, already dead, do not count)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def train_champion(home: Home, env: dict[str, str], train_days: int) -> None:
    """Materialize the labels, the bank's accounts (from the DMS files) and the model through
    Dagster, so the runs show in its UI; the model trains on features that saw the accounts."""
    config = {
        "ops": {"fraud_model": {"config": {"train_days": train_days}}},
        "execution": {"config": {"in_process": {}}},
    }
    log = home.dagster / "materialize.log"
    with log.open("ab") as out:
        done = subprocess.run(
            [_bin("dagster"), "asset", "materialize", "-m", "assets.definitions",
             "--select", "fraud_labels,accounts,accounts_history,fraud_model",
             "--config-json", json.dumps(config)],
            env=env, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"training the first champion failed: see {log}")


@dataclass
class DemoSummary:
    transactions: int = 0
    produced: int = 0
    source: str = "kinesis"
    alerts_published: int | None = None  # on the Kafka alerts topic (Kafka demo)
    scored: int = 0
    dead_letters: int = 0
    alerts: int = 0
    frauds: int = 0
    true_alerts: int = 0
    oot_precision: float = float("nan")
    oot_recall: float = float("nan")
    runs: dict[str, int] = field(default_factory=dict)
    model_version: str = ""
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)

    @property
    def precision(self) -> float:
        return self.true_alerts / self.alerts if self.alerts else float("nan")

    @property
    def recall(self) -> float:
        return self.true_alerts / self.frauds if self.frauds else float("nan")

    @property
    def ok(self) -> bool:
        published = self.alerts_published in (None, self.alerts)
        return not self.problems and published and self.scored + self.dead_letters == self.produced

    def render(self) -> str:
        runs = ", ".join(f"{k.lower()} {v}" for k, v in sorted(self.runs.items())) or "none"
        lines = [
            "streamguard demo summary",
            f"  transactions generated   {self.transactions:,}",
            f"  produced to {self.source.capitalize():<13}{self.produced:,}",
            f"  scored                   {self.scored:,}",
            f"  dead letters             {self.dead_letters:,}",
            f"  alerts                   {self.alerts:,}",
            *(
                []
                if self.alerts_published is None
                else [
                    f"  alerts published         {self.alerts_published:,} (topic {ALERTS_TOPIC})"
                ]
            ),
            f"  frauds among scored      {self.frauds:,}",
            f"  alert precision          {self.precision:.3f}",
            f"  alert recall             {self.recall:.3f}",
            f"  after training window    precision {self.oot_precision:.3f}, "
            f"recall {self.oot_recall:.3f}",
            f"  champion model version   {self.model_version}",
            f"  scoring runs launched    {sum(self.runs.values())} ({runs})",
            f"  wall time                {self.seconds:.1f}s",
        ]
        lines += [f"  PROBLEM: {p}" for p in self.problems]
        return "\n".join(lines)


def _reset(home: Home) -> None:
    """A demo starts from a clean lake, registry and run history (the stream is new too)."""
    if home.lake_location or home.artifacts_location:
        # It would clear the local folders and leave the object store as it was.
        raise ValueError(
            "the demo resets and reads its state under STREAMGUARD_HOME: unset "
            "STREAMGUARD_LAKE_URI and STREAMGUARD_MLFLOW_ARTIFACTS_URI to run it"
        )
    for path in (home.lake, home.mlflow, home.dagster, home.data, home.kafka):
        shutil.rmtree(path, ignore_errors=True)
    home.ensure()


def _step(message: str) -> None:
    print(f"[demo] {message}", flush=True)


@dataclass
class Platform:
    """What `local_platform` started: the Dagster environment and the producer's target."""

    env: dict[str, str]
    kinesis: Any  # a boto3 Kinesis client
    kafka: dict[str, Any] | None  # the librdkafka config when the demo runs on Kafka

    def produce(self, transactions: pa.Table, progress: bool = True) -> int:
        """Put transactions on the demo's stream: the Kafka topic, else the Kinesis stream."""
        if self.kafka is not None:
            from streamguard.kafka import produce_transactions as to_kafka

            return to_kafka(self.kafka, STREAM, transactions)
        from streamguard.kinesis import produce_transactions as to_kinesis

        return to_kinesis(self.kinesis, STREAM, transactions, progress=progress)


@contextmanager
def local_platform(
    home: Home, days: int, customers: int, seed: int, source: str = "kinesis"
) -> Iterator[tuple[Platform, Simulation]]:
    """Clean state, local Kinesis with a fresh stream (and with `source="kafka"` a local Kafka
    broker with the topic), generated data; the servers stop on exit."""
    from models.accounts import simulate_accounts
    from models.simulate import simulate, write_simulation
    from streamguard.dms import write_dms_output
    from streamguard.kinesis import delete_stream, ensure_stream, kinesis_client
    from streamguard.local_kinesis import LocalKinesis

    if source not in ("kinesis", "kafka"):
        raise ValueError(f"source must be kinesis or kafka, got {source!r}")
    _reset(home)
    server = LocalKinesis(home.kinesis)
    endpoint = server.start()
    _step(f"local Kinesis at {endpoint}")
    with contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        client = kinesis_client(endpoint)
        delete_stream(client, STREAM)
        ensure_stream(client, STREAM, shards=2)
        kafka: dict[str, Any] | None = None
        bootstrap = None
        if source == "kafka":
            from streamguard.kafka import KafkaSettings, client_config, ensure_topic
            from streamguard.local_kafka import local_kafka

            bootstrap = stack.enter_context(local_kafka(home.kafka))
            kafka = client_config(KafkaSettings(bootstrap))
            ensure_topic(kafka, STREAM, 2)
            _step(f"local Kafka at {bootstrap}, topic {STREAM!r}")
        sim = simulate(days=days, customers=customers, seed=seed)
        write_simulation(sim, home.data)
        _step(f"generated {sim.transactions.num_rows:,} transactions over {days} days")
        bank = simulate_accounts(sim, seed=seed)
        write_dms_output(
            home.data / "dms", bank.full_load, bank.changes, schema="bank", table="accounts",
            format="csv", full_load_time=bank.snapshot_time,
        )  # fmt: skip
        _step(f"the bank's accounts as DMS output: {bank.changes.num_rows:,} changes")
        yield Platform(dagster_env(home, endpoint, bootstrap), client, kafka), sim


def run_demo(
    home: Home,
    days: int = 60,
    customers: int = 1000,
    seed: int = 7,
    train_days: int = 21,
    timeout: float = 900,
    source: str = "kinesis",
) -> DemoSummary:
    from dagster import DagsterInstance, DagsterRunStatus, RunsFilter

    started = time.perf_counter()
    summary = DemoSummary(source=source)
    with local_platform(home, days, customers, seed, source) as (platform, sim):
        env = platform.env
        summary.transactions = sim.transactions.num_rows
        summary.produced = platform.produce(sim.transactions)
        _step(f"produced {summary.produced:,} records to {source} {STREAM!r}")

        _step(f"training on the first {train_days} days and registering the champion")
        train_champion(home, env, train_days)

        _step("starting the Dagster daemon; the sensor launches scoring runs")
        os.environ["DAGSTER_HOME"] = env["DAGSTER_HOME"]
        lake = Lake(home.lake)
        log = home.dagster / "daemon.log"
        with process_group(
            [_bin("dagster-daemon"), "run", "-w", str(REPO_ROOT / "workspace.yaml")], env, log
        ) as daemon:
            instance = DagsterInstance.get()
            deadline = time.monotonic() + timeout
            progress = ProgressLine("[demo] processed", summary.produced)
            while True:
                done = lake.count("transactions") + lake.count("dead_letters")
                active = instance.get_runs_count(
                    RunsFilter(
                        job_name=SCORING_JOB_NAME,
                        statuses=[
                            DagsterRunStatus.QUEUED,
                            DagsterRunStatus.NOT_STARTED,
                            DagsterRunStatus.STARTING,
                            DagsterRunStatus.STARTED,
                        ],
                    )
                )
                failed = instance.get_runs_count(
                    RunsFilter(job_name=SCORING_JOB_NAME, statuses=[DagsterRunStatus.FAILURE])
                )
                progress.update(done)
                if done >= summary.produced and active == 0:
                    break
                if failed:
                    summary.problems.append(f"{failed} scoring run(s) failed: see the Dagster UI")
                    break
                if daemon.poll() is not None:
                    summary.problems.append(f"the Dagster daemon exited: see {log}")
                    break
                if time.monotonic() > deadline:
                    summary.problems.append(f"stream not drained after {timeout:.0f}s")
                    break
                time.sleep(2)
            progress.close()
            for status in DagsterRunStatus:
                count = instance.get_runs_count(
                    RunsFilter(job_name=SCORING_JOB_NAME, statuses=[status])
                )
                if count:
                    summary.runs[status.value] = count
        _summarise(summary, lake, sim.transactions, train_days)
        if platform.kafka is not None:
            summary.alerts_published = count_committed(platform.kafka, ALERTS_TOPIC)
    summary.seconds = time.perf_counter() - started
    return summary


def count_committed(config: dict[str, Any], topic: str) -> int:
    """Messages on a topic as a read_committed consumer (case management) sees them."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            **config,
            "group.id": "streamguard-demo-count",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if meta is None or meta.error is not None:
            return 0
        consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
        ended: set[int] = set()
        count = 0
        deadline = time.monotonic() + 60
        while len(ended) < len(meta.partitions) and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                ended.add(int(message.partition() or 0))
            elif error is None:
                count += 1
        return count
    finally:
        consumer.close()


def _summarise(summary: DemoSummary, lake: Lake, transactions: pa.Table, train_days: int) -> None:
    scores = lake.read("scores", columns=["transaction_id", "event_time", "alert", "model_version"])
    labels = lake.read("labels", columns=["transaction_id", "is_fraud"])
    fraud_ids = labels.filter(pc.equal(labels["is_fraud"], True))["transaction_id"]
    is_fraud = pc.is_in(scores["transaction_id"], value_set=fraud_ids.combine_chunks())
    alert = scores["alert"]
    summary.scored = scores.num_rows
    summary.dead_letters = lake.count("dead_letters")
    summary.alerts = int(pc.sum(alert).as_py() or 0)
    summary.frauds = int(pc.sum(is_fraud).as_py() or 0)
    summary.true_alerts = int(pc.sum(pc.and_(alert, is_fraud)).as_py() or 0)
    versions = pc.unique(scores["model_version"]).to_pylist() if scores.num_rows else []
    summary.model_version = ", ".join(sorted(str(v) for v in versions))
    if scores.num_rows:
        cutoff = pc.min(transactions["event_time"]).as_py() + timedelta(days=train_days)
        oot = pc.greater_equal(scores["event_time"], cutoff)
        a, f = pc.and_(alert, oot), pc.and_(is_fraud, oot)
        hits = int(pc.sum(pc.and_(a, f)).as_py() or 0)
        n_a, n_f = int(pc.sum(a).as_py() or 0), int(pc.sum(f).as_py() or 0)
        summary.oot_precision = hits / n_a if n_a else float("nan")
        summary.oot_recall = hits / n_f if n_f else float("nan")


def run_dev(
    home: Home,
    rate: int = 200,
    days: int = 60,
    customers: int = 1000,
    seed: int = 7,
    train_days: int = 21,
    port: int = 3000,
) -> None:
    """`make dev`: local Kinesis + `dagster dev` + a producer trickling transactions.

    Starts from a clean state like the demo; Ctrl-C stops every process it started.
    """
    try:
        with local_platform(home, days, customers, seed) as (platform, sim):
            env = platform.env
            _step("training the first champion")
            train_champion(home, env, train_days)
            log = home.dagster / "dagster-dev.log"
            args = [_bin("dagster"), "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
            with process_group(args, env, log) as dev:
                _step(
                    f"Dagster UI on http://127.0.0.1:{port} (log: {log}); Ctrl-C stops everything"
                )
                sent = 0
                table = sim.transactions
                produced = ProgressLine("[dev] produced", table.num_rows)
                for offset in range(0, table.num_rows, rate):
                    tick = time.monotonic()
                    sent += platform.produce(table.slice(offset, rate), progress=False)
                    produced.update(sent)
                    if dev.poll() is not None:
                        raise RuntimeError(f"dagster dev exited: see {log}")
                    time.sleep(max(0.0, 1.0 - (time.monotonic() - tick)))
                produced.close()
                _step("all transactions produced; Ctrl-C to stop")
                while dev.poll() is None:
                    time.sleep(1)
    except KeyboardInterrupt:
        print()
        _step("stopped")
