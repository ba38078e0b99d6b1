"""The `streamguard` command line as a user runs it (the installed console script)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

CLI = str(Path(sys.executable).parent / "streamguard")
SUBCOMMANDS = [
    "generate", "produce", "kinesis", "score", "train", "rollback", "promote", "demo", "dev",
    "backtest", "replay",
]  # fmt: skip


def run(*args: str, home: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if home is not None:
        env["STREAMGUARD_HOME"] = str(home)
    return subprocess.run([CLI, *args], capture_output=True, text=True, env=env, timeout=120)


def test_help_lists_every_subcommand() -> None:
    done = run("--help")
    assert done.returncode == 0
    for name in SUBCOMMANDS:
        assert name in done.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name: str) -> None:
    done = run(name, "--help")
    assert done.returncode == 0 and "usage: streamguard" in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--days", "0", "--out", "x"],
        ["generate", "--days", "ten", "--out", "x"],
        ["generate"],
        ["kinesis", "restart"],
        ["nonsense"],
    ],
)
def test_bad_arguments_exit_non_zero_with_one_line(args: list[str]) -> None:
    done = run(*args)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0]


def test_runtime_error_is_one_line(tmp_path: Path) -> None:
    done = run("produce", str(tmp_path / "missing.parquet"), "--stream", "s", home=tmp_path)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        f"streamguard produce: error: no such file: {tmp_path / 'missing.parquet'}"
    ]


def test_generate_writes_reproducible_files(tmp_path: Path) -> None:
    for out in ("a", "b"):
        done = run("generate", "--days", "5", "--customers", "40", "--seed", "11",
                   "--out", str(tmp_path / out))  # fmt: skip
        assert done.returncode == 0, done.stderr
    a = pq.read_table(tmp_path / "a" / "transactions.parquet")
    b = pq.read_table(tmp_path / "b" / "transactions.parquet")
    assert a.num_rows > 100 and a.equals(b)
    labels = pq.read_table(tmp_path / "a" / "labels.parquet")
    assert "fraud_scenario" in labels.column_names


def test_kinesis_start_status_stop(tmp_path: Path) -> None:
    started = run("kinesis", "start", home=tmp_path)
    assert started.returncode == 0 and started.stdout.startswith("http://127.0.0.1:")
    try:
        status = run("kinesis", "status", home=tmp_path)
        assert status.returncode == 0 and status.stdout.strip() == started.stdout.strip()
    finally:
        stopped = run("kinesis", "stop", home=tmp_path)
    assert stopped.returncode == 0
    assert run("kinesis", "status", home=tmp_path).returncode == 1


def test_generate_weather_writes_jsonl_files(tmp_path: Path) -> None:
    done = run("generate", "weather", "--stations", "3", "--hours", "1", "--files", "2",
               "--out", str(tmp_path))  # fmt: skip
    assert done.returncode == 0, done.stderr
    files = sorted(tmp_path.glob("*.jsonl"))
    assert len(files) == 2
    lines = sum(len(f.read_bytes().splitlines()) for f in files)
    assert lines == 3 * 60  # one reading a minute per station
