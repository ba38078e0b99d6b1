"""`streamguard demo` end to end: local Kinesis, training, the real Dagster daemon and sensor."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = str(Path(sys.executable).parent / "streamguard")


def summary_value(text: str, label: str) -> int:
    match = re.search(rf"{label}\s+([\d,]+)", text)
    assert match, f"{label!r} not in summary:\n{text}"
    return int(match.group(1).replace(",", ""))


@pytest.mark.slow
def test_demo_drains_the_stream_through_sensor_runs_twice_in_a_row(tmp_path: Path) -> None:
    env = dict(os.environ, STREAMGUARD_HOME=str(tmp_path / "home"))
    args = [CLI, "demo", "--days", "16", "--customers", "120", "--train-days", "10",
            "--timeout", "400"]  # fmt: skip
    outputs = []
    for _ in range(2):  # the second run must work on the state the first one left
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        outputs.append(done.stdout)
    for out in outputs:
        produced = summary_value(out, "produced to Kinesis")
        scored = summary_value(out, "scored")
        dead = summary_value(out, "dead letters")
        assert produced > 1000 and scored + dead == produced and dead == 0
        assert summary_value(out, "scoring runs launched") >= 1
        assert "PROBLEM" not in out
    assert summary_value(outputs[0], "scored") == summary_value(outputs[1], "scored")
    assert not list((tmp_path / "home" / "kinesis").glob("server.json"))  # server stopped


@pytest.mark.slow
def test_demo_on_kafka_scores_the_topic_and_publishes_every_alert(tmp_path: Path) -> None:
    env = dict(os.environ, STREAMGUARD_HOME=str(tmp_path / "home"))
    args = [CLI, "demo", "--source", "kafka", "--days", "16", "--customers", "120",
            "--train-days", "10", "--timeout", "400"]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    produced = summary_value(out, "produced to Kafka")
    assert produced > 1000 and summary_value(out, "scored") == produced
    alerts = summary_value(out, "alerts")
    assert alerts > 0 and summary_value(out, "alerts published") == alerts
    assert "PROBLEM" not in out
    assert not list((tmp_path / "home" / "kafka").glob("server.json"))  # broker stopped


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ignore_interrupts() -> None:
    # What a background job of a non-interactive shell gets: SIGINT ignored.
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.mark.slow
def test_dev_serves_the_ui_and_ctrl_c_stops_every_process_it_started(tmp_path: Path) -> None:
    import signal
    import time
    import urllib.request

    port = _free_port()
    home = tmp_path / "home"
    env = dict(os.environ, STREAMGUARD_HOME=str(home))
    args = [CLI, "dev", "--days", "24", "--customers", "100", "--train-days", "16", "--rate", "100",
            "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True, preexec_fn=_ignore_interrupts,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as r:
                    assert b"dagster_webserver_version" in r.read()
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
                time.sleep(2)
        else:
            raise AssertionError("the Dagster UI never answered")
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert b"stopped" in out
    left = subprocess.run(["pgrep", "-f", str(home)], capture_output=True, text=True).stdout
    left += subprocess.run(["pgrep", "-f", f"-p {port}"], capture_output=True, text=True).stdout
    pids = left.split()
    described = subprocess.run(["ps", "-o", "pid,stat,cmd", "-p", ",".join(pids) or "0"],
                               capture_output=True, text=True).stdout  # fmt: skip
    alive = [line for line in described.splitlines()[1:] if " Z" not in line]
    assert not alive, f"processes left running: {described}"
