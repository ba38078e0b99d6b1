"""Transaction files from Dagster: the folder sensor launches runs; each file is scored once."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from conftest import scoring_job

from assets.resources import (
    FilesResource,
    HomeResource,
)
from assets.sensors import transaction_files_sensor
from models.schema import to_payload
from models.simulate import Simulation
from streamguard.config import Home
from streamguard.lake import Lake


def _write(folder: Path, name: str, rows: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}"  # written under a hidden name, then renamed: never read half
    tmp.write_bytes(b"\n".join(to_payload(r) for r in rows) + b"\n")
    tmp.rename(folder / name)


def _tick(cursor: str | None, files: FilesResource, home: Path) -> tuple[object, str | None]:
    context = dg.build_sensor_context(
        cursor=cursor, resources={"files": files, "home": HomeResource(root=str(home))}
    )
    return transaction_files_sensor(context), context.cursor


def test_files_sensor_skips_without_a_folder(tmp_path: Path) -> None:
    result, _ = _tick(None, FilesResource(), tmp_path / "home")
    assert isinstance(result, dg.SkipReason)
    assert "STREAMGUARD_FILES_DIR" in (result.skip_message or "")


def test_files_sensor_runs_score_each_file_once(
    tmp_path: Path, small_sim: Simulation, champion_home: Home
) -> None:
    folder, home = tmp_path / "landing", tmp_path / "home"
    rows = small_sim.transactions.slice(0, 500).to_pylist()
    _write(folder, "part-000.jsonl", rows[:300])
    _write(folder, "part-001.jsonl", rows[300:400])
    files = FilesResource(folder=str(folder))
    job = scoring_job(home, champion_home.mlflow_tracking_uri, files=files)
    lake = Lake(home / "lake")
    with dg.instance_for_test() as instance:
        request, cursor = _tick(None, files, home)
        assert isinstance(request, dg.RunRequest)
        assert request.run_config["ops"]["score_transactions"]["config"]["source"] == "files"
        again, _ = _tick(None, files, home)
        assert again.run_key == request.run_key  # type: ignore[attr-defined]
        assert job.execute_in_process(run_config=request.run_config, instance=instance).success
        assert lake.count("transactions") == 400 and lake.count("scores") == 400
        idle, _ = _tick(cursor, files, home)
        assert isinstance(idle, dg.SkipReason)

        _write(folder, "part-002.jsonl", rows[400:])
        later, cursor = _tick(cursor, files, home)
        assert isinstance(later, dg.RunRequest) and later.run_key != request.run_key
        assert job.execute_in_process(run_config=later.run_config, instance=instance).success
        # The repeated request (a re-evaluated tick) scores nothing twice.
        assert job.execute_in_process(run_config=later.run_config, instance=instance).success
    assert lake.count("transactions") == 500 and lake.count("scores") == 500
    shards = set(lake.read("transactions", columns=["shard_id"])["shard_id"].to_pylist())
    assert shards == {str(p) for p in folder.glob("*.jsonl")}  # each row names its file
