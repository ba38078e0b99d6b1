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
