"""Dagster (and MLflow) on a real PostgreSQL server, as a shared deployment runs them.

The server is Debian's postgresql-15, started by `streamguard.local_postgres` under the test's
tmp path. The real Dagster daemon runs with `platform/dagster-postgres.yaml`; its Kinesis sensor
launches a scoring run that writes the lake, and the runs, the event log and the sensor's ticks
are then read back from PostgreSQL with psycopg2. The champion the run scores with is registered
in an MLflow store on the same server.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
import pytest
import yaml
from dagster import DagsterEventType, DagsterInstance
from dagster_postgres import PostgresRunStorage

from models.features import replay
from models.promotion import register_challenger
from models.registry import CHAMPION, MODEL_NAME, load_model, log_and_register
from models.simulate import Simulation
from models.training import train
from streamguard.config import Home
from streamguard.demo import (
    POSTGRES_INSTANCE,
    SCORING_JOB_NAME,
    SQLITE_INSTANCE,
    dagster_env,
    process_group,
)
from streamguard.kinesis import produce_transactions
from streamguard.lake import Lake
from streamguard.local_postgres import SYSTEM_USER, LocalPostgres, local_postgres

REPO = Path(__file__).resolve().parent.parent
DAEMON = Path(sys.executable).parent / "dagster-daemon"
N_RECORDS = 300
SENSOR = "kinesis_transactions_sensor"
# Daemon start to the run's success: the code server loads, the sensor ticks, the queue launches a
# run worker, and the multiprocess executor starts one more process per step (the scoring step and
# its three checks). Measured on 2 cores busy with other suites: 63 s at load 6, 100-150 s at 10.
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalPostgres]:
    """One server for the module (fsync off: the cluster is thrown away)."""
    with LocalPostgres(tmp_path_factory.mktemp("postgres"), durable=False) as server:
        yield server


@contextlib.contextmanager
def connect(url: str) -> Iterator[Any]:
    """A psycopg2 connection to a `postgresql+psycopg2://` URL, closed after the block."""
    conn = psycopg2.connect(url.replace("postgresql+psycopg2://", "postgresql://", 1))
    try:
        yield conn
    finally:
        conn.close()


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with connect(url) as conn, conn.cursor() as cur:
        cur.execute(sql, args)
        return list(cur.fetchall())


@pytest.fixture(scope="module")
def mlflow_url(
    postgres: LocalPostgres, small_sim: Simulation, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """An MLflow store on the server (database `mlflow`) with a champion: the first version,
    trained on the small simulation and registered the way `fraud_model` registers one."""
    url = postgres.create_database("mlflow")
    features = replay(small_sim.transactions, small_sim.labels).features.to_pandas()
    cutoff = pd.Timestamp(features["event_time"].max())
    result = train(features, small_sim.labels.to_pandas(), cutoff, pd.Timedelta(0))
    artifacts = tmp_path_factory.mktemp("mlflow-artifacts")
    version = log_and_register(result, url, artifacts)
    assert register_challenger(url, MODEL_NAME, version) == CHAMPION  # the first: champion
    return url


def test_postgres_instance_is_the_sqlite_one_with_storage_on_postgres() -> None:
    sqlite = yaml.safe_load(SQLITE_INSTANCE.read_text())
    postgres = yaml.safe_load(POSTGRES_INSTANCE.read_text())
    assert "storage" not in sqlite  # make dev / make demo: SQLite under DAGSTER_HOME
    # The URL comes from the environment when the instance loads, never from the file.
    assert postgres.pop("storage") == {"postgres": {"postgres_url": {"env": "DAGSTER_PG_URL"}}}
    assert postgres == sqlite  # the same queue, limits, monitoring and retries


def test_local_postgres_is_shared_per_folder_and_keeps_its_data(tmp_path: Path) -> None:
    state = tmp_path / "pg"
    with local_postgres(state, "app", durable=False) as url:
        assert url.startswith("postgresql+psycopg2://streamguard@127.0.0.1:")
        assert url.endswith("/app")
        other = LocalPostgres(state)
        assert other.start() + "/app" == url  # a second handle reuses the running server
        with connect(url) as conn, conn.cursor() as cur:
            cur.execute("create table t (n int); insert into t values (7)")
            conn.commit()
        pid = other.pid
    assert pid is not None and not LocalPostgres(state).running()
    assert not (state / "server.json").exists()
    if os.geteuid() == 0:  # the server did not run as root, which PostgreSQL refuses
        assert (state / "data" / "PG_VERSION").stat().st_uid == 0  # user namespace: root's files
    with local_postgres(state, "app", durable=False) as again:  # restarted: the data is there
        assert query(again, "select n from t") == [(7,)]


def test_local_postgres_says_what_to_do_when_it_cannot_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import streamguard.local_postgres as local

    monkeypatch.setattr(local, "find_program", lambda name: None)
    with pytest.raises(local.LocalPostgresError, match="apt-get install postgresql-15"):
        LocalPostgres(tmp_path / "a").start()
    monkeypatch.undo()
    # Root with neither a user namespace nor runuser: PostgreSQL would refuse to run.
    which = local.shutil.which
    monkeypatch.setattr(local.os, "geteuid", lambda: 0)
    monkeypatch.setattr(
        local.shutil, "which", lambda name: None if name in ("unshare", "runuser") else which(name)
    )
    with pytest.raises(local.LocalPostgresError, match="refuses to run as root"):
        LocalPostgres(tmp_path / "b").start()
    assert not (tmp_path / "b" / "server.json").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="how root runs PostgreSQL")
def test_as_root_without_user_namespaces_it_runs_as_the_postgres_user(tmp_path: Path) -> None:
    """The fallback for a root without user namespaces (a container's seccomp profile): the
    `postgres` user through runuser, which must reach the folder (not a 0700 pytest tmp_path)."""
    import pwd
    import shutil
    import tempfile

    try:
        account = pwd.getpwnam(SYSTEM_USER)
    except KeyError:
        pytest.skip(f"no {SYSTEM_USER!r} user")
    hidden = LocalPostgres(tmp_path / "pg", durable=False, root="runuser")
    with pytest.raises(hidden.error_type, match="cannot reach"):
        hidden.start()
    reachable = Path(tempfile.mkdtemp(prefix="streamguard-pg-"))
    try:
        reachable.chmod(0o755)
        with LocalPostgres(reachable, durable=False, root="runuser") as server:
            url = server.create_database("app")
            ((backend,),) = query(url, "select pg_backend_pid()")
            assert Path(f"/proc/{backend}").stat().st_uid == account.pw_uid
        # The same cluster started the default way (a user namespace) is given back to root.
        with local_postgres(reachable, "app", durable=False) as url:
            assert query(url, "select 1") == [(1,)]
        assert (reachable / "data").stat().st_uid == 0
    finally:
        shutil.rmtree(reachable, ignore_errors=True)


def test_mlflow_registry_on_postgres_serves_the_champion(
    mlflow_url: str, small_sim: Simulation
) -> None:
    model = load_model(mlflow_url)  # the champion alias, resolved in PostgreSQL
    assert model.name == MODEL_NAME and model.version == "1"
    assert query(mlflow_url, "select name, version from model_versions") == [(MODEL_NAME, 1)]
    assert query(mlflow_url, "select alias, version from registered_model_aliases") == [
        (CHAMPION, 1)
    ]
    # The training run that logged the version, in the same database.
    trained = "select r.status from runs r join model_versions v on v.run_id = r.run_uuid"
    assert query(mlflow_url, trained) == [("FINISHED",)]


def _scoring_runs(url: str) -> list[tuple[Any, ...]]:
    """The scoring runs' statuses; none before the daemon's instance created the tables."""
    try:
        return query(url, "select status from runs where pipeline_name = %s", SCORING_JOB_NAME)
    except psycopg2.errors.UndefinedTable:
        return []


def _daemon_log(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else "(no daemon log)"


@pytest.mark.slow
def test_daemon_on_postgres_runs_the_sensor_run_and_stores_everything_there(
    tmp_path: Path,
    postgres: LocalPostgres,
    mlflow_url: str,
    kinesis_server: str,
    kinesis: Any,
    stream_name: str,
    small_sim: Simulation,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    dagster_url = postgres.create_database("dagster")
    produce_transactions(kinesis, stream_name, small_sim.transactions.slice(0, N_RECORDS),
                         progress=False)  # fmt: skip
    home = Home(tmp_path / "home")
    env = dagster_env(home, kinesis_server, instance=POSTGRES_INSTANCE)
    env.update(
        DAGSTER_PG_URL=dagster_url,
        MLFLOW_TRACKING_URI=mlflow_url,
        STREAMGUARD_STREAM=stream_name,
    )
    lake = Lake(home.lake)
    log = tmp_path / "daemon.log"
    started = time.monotonic()
    with process_group(
        [str(DAEMON), "run", "-w", str(REPO / "workspace.yaml")], env, log
    ) as daemon:
        status: list[tuple[Any, ...]] = []
        while time.monotonic() - started < RUN_TIMEOUT_S:
            status = _scoring_runs(dagster_url)
            if status and status[0][0] in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            assert daemon.poll() is None, f"the daemon exited:\n{_daemon_log(log)}"
            time.sleep(1)
        assert status == [("SUCCESS",)], f"scoring run: {status}\n{_daemon_log(log)}"

    # The run: launched by the sensor, in PostgreSQL's run storage.
    ((run_id,),) = query(dagster_url, "select run_id from runs")
    tags = dict(query(dagster_url, "select key, value from run_tags where run_id = %s", run_id))
    assert tags["dagster/sensor_name"] == SENSOR and tags["streamguard/stream"] == stream_name
    # Its event log, in PostgreSQL's event-log storage.
    events = dict(
        query(
            dagster_url,
            "select dagster_event_type, count(*) from event_logs where run_id = %s"
            " group by dagster_event_type",
            run_id,
        )
    )
    assert events[DagsterEventType.RUN_START.value] == 1
    assert events[DagsterEventType.RUN_SUCCESS.value] == 1
    assert events[DagsterEventType.ASSET_MATERIALIZATION.value] >= 3
    assert events[DagsterEventType.ASSET_CHECK_EVALUATION.value] == 3
    assets = {key for (key,) in query(dagster_url, "select asset_key from asset_keys")}
    assert {'["transactions"]', '["scores"]', '["alerts"]'} <= assets
    # The sensor's state and ticks, in PostgreSQL's schedule storage.
    ticks = [
        (status, json.loads(body))
        for status, body in query(
            dagster_url, "select status, tick_body from job_ticks where type = 'SENSOR'"
        )
    ]
    launched = [  # TickData, serialized with its storage names (instigator_name: job_name)
        status for status, body in ticks
        if body["job_name"] == SENSOR and run_id in body.get("run_ids", [])
    ]  # fmt: skip
    assert launched == ["SUCCESS"], ticks
    sensors = query(dagster_url, "select status from instigators where instigator_type = 'SENSOR'")
    assert sensors, "the sensors' state (cursor, status) is in PostgreSQL"
    # Nothing went to SQLite under DAGSTER_HOME.
    assert not [p for p in home.dagster.rglob("*.db")]

    # The same storage through Dagster's API, with the instance config as the daemon read it.

    monkeypatch.setenv("DAGSTER_PG_URL", dagster_url)
    with DagsterInstance.from_config(str(home.dagster)) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        run = instance.get_run_by_id(run_id)
        assert run is not None and run.is_success and run.job_name == SCORING_JOB_NAME

    # The run scored the stream into the lake with the champion from MLflow on PostgreSQL.
    assert lake.count("transactions") == N_RECORDS and lake.count("scores") == N_RECORDS
    assert lake.count("dead_letters") == 0
    versions = set(lake.read("scores", columns=["model_version"])["model_version"].to_pylist())
    assert versions == {"1"}
