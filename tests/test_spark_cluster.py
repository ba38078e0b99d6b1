"""The Spark jobs on a real standalone cluster, against the in-process runner and the reference.

`streamguard spark-cluster start` starts a master and one worker (2 cores) under the test's
STREAMGUARD_HOME. The jobs then run in a separate driver process: this file run as a script,
with `STREAMGUARD_SPARK_MASTER` set to the cluster's URL and the project's session factory. A JVM
hosts one SparkContext, and the test run's shared local session (`spark` in conftest) may already
own this process's; a driver of its own is also what a deployment has. The driver runs the fraud
job in both modes (Delta state, state store) and the weather job, one file per trigger; the
tables it writes must equal the in-process runner's (fraud: bit for bit, batch ids and dead
letters included) and the reference window averages (weather). Then `status` and `stop`, and
no process of the cluster may be left.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fraud_streams import (
    BAD_RECORDS,
    assert_same_outputs,
    in_process_reference,
    load_bank,
    troubled_stream,
)

from models.accounts import AccountChanges
from models.job import SCORES
from models.registry import LoadedModel
from models.simulate import Simulation
from models.weather import (
    WINDOW_KEY,
    parse_readings,
    simulate_weather,
    window_averages,
    write_weather_files,
)
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.config import Home
from streamguard.lake import Lake
from streamguard.pipeline import load_labels
from streamguard.spark.cluster import SparkCluster, cluster_dir, master_json

pytestmark = pytest.mark.spark

CLI = str(Path(sys.executable).parent / "streamguard")
N_TX = 600
BATCH_RECORDS = 250  # 125 per shard of 2: the runner makes 3 batches of these records
BUCKETS = 4
STAMPS = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}
MODES = ("delta", "store")
APP_NAME = "streamguard-cluster-test"


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "STREAMGUARD_HOME": str(home)}
    return subprocess.run(
        [CLI, "spark-cluster", *args], capture_output=True, text=True, env=env, timeout=300
    )


@dataclass
class Cluster:
    home: Path
    url: str

    @property
    def state_dir(self) -> Path:
        return cluster_dir(Home(self.home))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A master and one worker started by the CLI; stopped at the end whatever happened."""
    home = tmp_path_factory.mktemp("cluster_home")
    started = _cli(home, "start", "--workers", "1", "--cores", "2", "--memory", "1g")
    try:
        assert started.returncode == 0, started.stderr
        url = started.stdout.split()[0]
        assert url.startswith("spark://127.0.0.1:")
        yield Cluster(home, url)
    finally:
        SparkCluster(cluster_dir(Home(home))).stop()


@dataclass
class Runs:
    local: Lake
    lakes: dict[str, Lake]
    n_batches: int
    n_records: int
    weather_lines: list[bytes]
    report: dict[str, Any]


@pytest.fixture(scope="module")
def runs(
    cluster: Cluster,
    tmp_path_factory: pytest.TempPathFactory,
    small_sim: Simulation,
    small_bank: AccountChanges,
    tiny_model: LoadedModel,
) -> Runs:
    """The in-process reference, then one driver on the cluster running the three jobs."""
    root = tmp_path_factory.mktemp("spark_cluster")
    bad = [payload for payload, _ in BAD_RECORDS]
    payloads, keys = troubled_stream(small_sim.transactions.slice(0, N_TX).to_pylist(), bad)
    local, input_dir, n_batches = in_process_reference(
        root, payloads, keys, small_sim.labels, tiny_model, BATCH_RECORDS, small_bank
    )
    lakes = {mode: Lake(root / f"cluster-{mode}") for mode in MODES}
    for lake in lakes.values():
        load_labels(lake, small_sim.labels)
        load_bank(lake, small_bank, root / "dms")
    # No reading later than the watermark (10 min): every valid one must land in its windows.
    weather_lines = simulate_weather(
        stations=3, hours=1, seed=5, late_fraction=0.0, malformed_fraction=0.05
    )
    write_weather_files(weather_lines, root / "weather-in", files=3)
    (root / "model.pkl").write_bytes(pickle.dumps(tiny_model))
    spec = {
        "input": str(input_dir),
        "model": str(root / "model.pkl"),
        "lakes": {mode: str(lake.root) for mode, lake in lakes.items()},
        "checkpoints": str(root / "checkpoints"),
        "weather_in": str(root / "weather-in"),
        "weather_lake": str(root / "cluster-weather"),
        "report": str(root / "report.json"),
    }
    (root / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "STREAMGUARD_SPARK_MASTER": cluster.url}
    done = subprocess.run(
        [sys.executable, __file__, str(root / "spec.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    executor_logs = sorted(cluster.state_dir.glob("worker-*/work/app-*/*/stderr"))
    tail = executor_logs[-1].read_text()[-3000:] if executor_logs else "no executor log"
    assert done.returncode == 0, f"{done.stderr[-4000:]}\n--- executor stderr:\n{tail}"
    report = json.loads(Path(spec["report"]).read_text())
    return Runs(local, lakes, n_batches, len(payloads), weather_lines, report)


def test_the_jobs_ran_on_the_cluster_executors(cluster: Cluster, runs: Runs) -> None:
    report = runs.report
    assert report["master"] == cluster.url  # from STREAMGUARD_SPARK_MASTER, via the factory
    state = master_json(SparkCluster(cluster.state_dir).status().ui_url or "")
    assert state is not None and state["aliveworkers"] == 1 and state["cores"] == 2
    (app,) = [a for a in state["completedapps"] if a["id"] == report["app_id"]]
    assert app["name"] == APP_NAME and app["cores"] == 2
    # The executor ran in the worker's work dir (its logs are there), not in the driver.
    executor = cluster.state_dir / "worker-1" / "work" / report["app_id"]
    assert (executor / "0" / "stderr").is_file()
    print(
        "\ncluster driver: session "
        f"{report['session_s']:.1f}s, "
        + ", ".join(f"{mode} {report[mode]['duration_s']:.1f}s" for mode in (*MODES, "weather"))
        + f" (batches inside foreachBatch: {report['delta']['batch_s']}, "
        f"{report['store']['batch_s']})"
    )


@pytest.mark.parametrize("mode", MODES)
def test_fraud_job_on_the_cluster_matches_the_in_process_runner(runs: Runs, mode: str) -> None:
    """Both modes: every output table equal to the in-process runner's, batch ids included."""
    got, want = runs.lakes[mode], runs.local
    batches = runs.report[mode]["batches"]
    assert len(batches) == runs.n_batches >= 3
    assert batches == list(range(batches[0], batches[0] + runs.n_batches))
    assert runs.report[mode]["n_records"] == runs.n_records
    assert_same_outputs(want, got, STAMPS)
    assert got.count(SCORES) == N_TX
    cols = ["batch_id", "payload", "reason"]
    dead_want = want.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    dead_got = got.read(DEAD_LETTER_TABLE, columns=cols).sort_by([("payload", "ascending")])
    assert dead_got.num_rows == len(BAD_RECORDS) + 1  # the bad records and the replay
    assert dead_want.equals(dead_got)


def test_weather_job_on_the_cluster_matches_the_reference(runs: Runs) -> None:
    from streamguard.spark.weather import DEAD_LETTERS, WINDOWS_1M, WINDOWS_5M, read_table

    weather = runs.report["weather"]
    lake = Lake(Path(runs.report["weather_lake"]))
    readings, rejected = parse_readings(runs.weather_lines)
    assert weather["batches"] >= 3 and weather["rows_in"] == len(runs.weather_lines)
    assert weather["late_rows_dropped"] == 0 and weather["readings"] == len(readings)
    watermark = pd.Timestamp(weather["watermark"])
    for name, window, slide in (
        (WINDOWS_1M, timedelta(minutes=1), None),
        (WINDOWS_5M, timedelta(minutes=5), timedelta(minutes=1)),
    ):
        want = window_averages(readings, window, slide)
        want = want[want["window_end"] <= watermark].reset_index(drop=True)
        got = read_table(lake, name).to_pandas()
        got = got.sort_values(list(WINDOW_KEY)).reset_index(drop=True)
        assert len(got) > 0
        pd.testing.assert_frame_equal(got, want, check_dtype=False, check_exact=False)
    dead = read_table(lake, DEAD_LETTERS).to_pandas()
    assert sorted(zip(dead["raw"], dead["reason"], strict=True)) == sorted(rejected)


def _cluster_processes(state_dir: Path) -> list[int]:
    """Processes working under the cluster's folder: daemons, executors, Python workers."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cwd = Path(os.readlink(entry / "cwd"))
            zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and cwd.is_relative_to(state_dir):
            found.append(int(entry.name))
    return found


def test_status_then_stop_leaves_nothing_running(cluster: Cluster, runs: Runs) -> None:
    """Last: the CLI finds the recorded cluster, and a stop ends every process of it."""
    assert _cluster_processes(cluster.state_dir)  # master and worker at least
    status = _cli(cluster.home, "status")
    assert status.returncode == 0 and status.stdout.split()[0] == cluster.url
    assert "1 worker" in status.stdout
    stopped = _cli(cluster.home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert _cluster_processes(cluster.state_dir) == []
    status = _cli(cluster.home, "status")
    assert status.returncode == 1 and status.stdout.strip() == "not running"


# --------------------------------------------------------------------------- the driver


def run_driver(spec: dict[str, Any]) -> dict[str, Any]:
    """The three jobs on the cluster named by STREAMGUARD_SPARK_MASTER; what they reported."""
    import time

    from streamguard.spark.fraud import jsonl_source, run_fraud_on_spark
    from streamguard.spark.fraud_state import run_fraud_on_spark_state_store
    from streamguard.spark.session import spark_session
    from streamguard.spark.weather import run_weather_windows

    started = time.perf_counter()
    spark = spark_session(APP_NAME)  # the master comes from the environment
    out: dict[str, Any] = {
        "master": spark.sparkContext.master,
        "app_id": spark.sparkContext.applicationId,
        "session_s": time.perf_counter() - started,
        "weather_lake": spec["weather_lake"],
    }
    model = pickle.loads(Path(spec["model"]).read_bytes())
    checkpoints = Path(spec["checkpoints"])
    try:
        for mode, run in (("delta", run_fraud_on_spark), ("store", run_fraud_on_spark_state_store)):
            report = run(
                spark,
                lambda s: jsonl_source(s, Path(spec["input"]), 1),
                Lake(Path(spec["lakes"][mode])),
                checkpoints / mode,
                model=model,
                buckets=BUCKETS,
            )
            out[mode] = {
                "batches": [b.batch_id for b in report.batches],
                "n_records": report.n_records,
                "duration_s": report.duration_s,
                "batch_s": [round(b.total_s, 2) for b in report.batches],
            }
        weather = run_weather_windows(
            spark,
            Path(spec["weather_in"]),
            Lake(Path(spec["weather_lake"])),
            checkpoints / "weather",
            watermark="10 minutes",
            max_files_per_trigger=1,
        )
        out["weather"] = weather.as_dict()
    finally:
        spark.stop()
    return out


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["report"]).write_text(json.dumps(run_driver(spec), default=str))
