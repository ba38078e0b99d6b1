"""Sensor-mode latency settings (issue 11): the stream sensors' interval and wait, the instance's
queue and sensor threads, the in-process scoring job, and the long-lived code server workspace."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from assets.definitions import defs
from assets.resources import KinesisResource
from assets.sensors import (
    DEFAULT_INTERVAL_S,
    DEFAULT_WAIT_S,
    INTERVAL_ENV,
    NO_WAIT,
    WAIT_ENV,
    SensorSettings,
    kinesis_sensor,
    next_range,
)
from streamguard.demo import SQLITE_INSTANCE, process_group
from streamguard.kinesis import latest_positions, put_records

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CODE_SERVER_WORKSPACE = REPO / "platform" / "workspace-code-server.yaml"
STREAM_SENSORS = ("kinesis_transactions_sensor", "kafka_transactions_sensor",
                  "transaction_files_sensor")  # fmt: skip


def test_sensor_settings_come_from_the_environment_and_are_checked() -> None:
    assert SensorSettings.from_env({}) == SensorSettings(DEFAULT_INTERVAL_S, DEFAULT_WAIT_S)
    assert SensorSettings.from_env({INTERVAL_ENV: "3", WAIT_ENV: "0"}) == SensorSettings(3, 0.0)
    assert SensorSettings.from_env({INTERVAL_ENV: " ", WAIT_ENV: ""}) == SensorSettings()
    for bad in ({INTERVAL_ENV: "0"}, {INTERVAL_ENV: "1.5"}, {WAIT_ENV: "-1"}, {WAIT_ENV: "90"},
                {WAIT_ENV: "soon"}):  # fmt: skip
        with pytest.raises(ValueError, match="sensor settings"):
            SensorSettings.from_env(bad)


def test_code_location_builds_the_stream_sensors_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    repo = defs().get_repository_def()
    for name in STREAM_SENSORS:
        assert repo.get_sensor_def(name).minimum_interval_seconds == DEFAULT_INTERVAL_S
    monkeypatch.setenv(INTERVAL_ENV, "7")
    monkeypatch.setenv(WAIT_ENV, "2.5")
    loaded = defs()
    dg.Definitions.validate_loadable(loaded)
    repo = loaded.get_repository_def()
    for name in STREAM_SENSORS:
        assert repo.get_sensor_def(name).minimum_interval_seconds == 7
    assert "looks for 2.5 s" in (repo.get_sensor_def(STREAM_SENSORS[0]).description or "")
    monkeypatch.setenv(INTERVAL_ENV, "-2")
    with pytest.raises(ValueError, match=INTERVAL_ENV):
        defs()


def test_scoring_job_runs_its_steps_in_the_run_worker() -> None:
    job = defs().get_repository_def().get_job("score_transactions_job")
    assert job.executor_def.name == dg.in_process_executor.name


def _tick(sensor: dg.SensorDefinition, resource: KinesisResource, cursor: str | None) -> Any:
    context = dg.build_sensor_context(cursor=cursor, resources={"kinesis": resource})
    return sensor(context), context


def test_idle_tick_waits_for_records_then_skips_with_the_reason(
    kinesis_server: str, kinesis: Any, stream_name: str
) -> None:
    resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    waiting = kinesis_sensor(SensorSettings(interval_s=1, wait_s=0.6, poll_s=0.2))
    skip, context = _tick(waiting, resource, None)
    assert isinstance(skip, dg.SkipReason)
    assert "No new records on 2 shard(s)" in (skip.skip_message or "")
    assert "looked for 0.6 s" in (skip.skip_message or "")
    assert context.cursor is None
    no_wait, _ = _tick(kinesis_sensor(NO_WAIT), resource, None)
    assert isinstance(no_wait, dg.SkipReason) and "looked for" not in (no_wait.skip_message or "")


def test_a_record_landing_while_a_tick_waits_is_requested_by_that_tick(
    kinesis_server: str, kinesis: Any, stream_name: str
) -> None:
    resource = KinesisResource(stream=stream_name, endpoint_url=kinesis_server)
    put_records(kinesis, stream_name, [(b'{"n": 0}', "k0")])
    first, context = _tick(kinesis_sensor(NO_WAIT), resource, None)
    assert isinstance(first, dg.RunRequest)
    cursor = context.cursor
    # Without a wait the idle stream is skipped; a waiting tick sees the record put meanwhile.
    assert isinstance(_tick(kinesis_sensor(NO_WAIT), resource, cursor)[0], dg.SkipReason)
    looking = threading.Event()

    def put_when_looking() -> None:
        looking.wait(60)
        put_records(kinesis, stream_name, [(b'{"n": 1}', "k1")])

    producer = threading.Thread(target=put_when_looking)
    producer.start()
    reads: list[dict[str, str | None]] = []

    def latest(start: dict[str, str | None]) -> dict[str, str | None]:
        positions = latest_positions(kinesis, stream_name, start, 100)
        reads.append(positions)
        looking.set()  # the first read is done: the record lands while the tick waits
        return positions

    before = json.loads(cursor)
    tick_context = dg.build_sensor_context(cursor=cursor)
    request = next_range(
        tick_context, source="kinesis", stream=stream_name, shards=list(before),
        latest=latest, executor="in_process", settings=SensorSettings(1, wait_s=30, poll_s=0.1),
    )  # fmt: skip
    producer.join()
    assert reads[0] == before and len(reads) > 1  # nothing at first; found by a later read
    assert isinstance(request, dg.RunRequest)
    moved = json.loads(tick_context.cursor or "{}")
    assert sum(moved[s] != before[s] for s in before) == 1


def test_instance_launches_queued_runs_every_second_and_evaluates_sensors_in_threads(
    tmp_path: Path,
) -> None:
    (tmp_path / "dagster.yaml").write_text(SQLITE_INSTANCE.read_text())
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        coordinator = instance.run_coordinator
        assert isinstance(coordinator, dg.QueuedRunCoordinator)
        assert coordinator.dequeue_interval_seconds == 1
        sensors = instance.get_settings("sensors")
        assert sensors["use_threads"] is True and sensors["num_workers"] >= 3
        retention = instance.get_settings("retention")
        assert retention["sensor"]["purge_after_days"]["skipped"] == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _validate(workspace: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "dagster"), "definitions", "validate", "-w", str(workspace)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


def test_code_server_workspace_loads_the_location_from_a_running_code_server(
    tmp_path: Path,
) -> None:
    port = _free_port()
    (tmp_path / "dagster.yaml").write_text(SQLITE_INSTANCE.read_text())
    env = dict(os.environ, DAGSTER_HOME=str(tmp_path), STREAMGUARD_HOME=str(tmp_path / "home"),
               STREAMGUARD_CODE_SERVER_HOST="127.0.0.1",
               STREAMGUARD_CODE_SERVER_PORT=str(port))  # fmt: skip
    # Nothing serves that port yet: the workspace names the environment's server, not its own.
    assert _validate(CODE_SERVER_WORKSPACE, env).returncode != 0
    args = [str(BIN / "dagster"), "code-server", "start", "-m", "assets.definitions",
            "--location-name", "streamguard", "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    with process_group(args, env, tmp_path / "code-server.log") as server:
        for _ in range(180):
            health = subprocess.run(
                [str(BIN / "dagster"), "api", "grpc-health-check", "-p", str(port)],
                env=env, capture_output=True, timeout=60,
            )  # fmt: skip
            if health.returncode == 0:
                break
            assert server.poll() is None, (tmp_path / "code-server.log").read_text()[-2000:]
        done = _validate(CODE_SERVER_WORKSPACE, env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "streamguard" in done.stdout + done.stderr
