"""The weather domain without Spark: contract, simulator, reference windows, file sensor."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd

from assets.resources import HomeResource
from assets.weather import region_hourly, weather_files_sensor
from models.weather import (
    Reading,
    parse_reading,
    parse_readings,
    simulate_weather,
    window_averages,
    write_weather_files,
)


def test_simulation_is_deterministic_and_flawed_like_a_real_feed() -> None:
    a = simulate_weather(stations=5, hours=2, seed=11)
    assert a == simulate_weather(stations=5, hours=2, seed=11)
    assert a != simulate_weather(stations=5, hours=2, seed=12)
    assert len(a) == 5 * 120
    readings, rejected = parse_readings(a)
    assert 0.0 < len(rejected) / len(a) < 0.03  # ~1 % malformed
    assert {r.split(":")[0] for _, r in rejected} <= {"invalid_json", "missing", "wrong_type",
                                                      "out_of_range"}  # fmt: skip
    times = readings["event_time"]
    behind = times.cummax() - times
    assert (behind > pd.Timedelta(0)).mean() > 0.1  # out of order
    assert (behind > pd.Timedelta(minutes=2)).sum() > 0  # some minutes late


def test_parse_reading_names_the_first_broken_rule() -> None:
    good = {"station_id": "s", "region": "r", "event_time": "2024-03-01T10:00:00+02:00",
            "temperature_c": 1, "humidity_pct": 50.5, "wind_speed_ms": 0}  # fmt: skip
    parsed = parse_reading(json.dumps(good))
    assert isinstance(parsed, Reading) and parsed.event_time.hour == 8
    cases = {
        "{": "invalid_json",
        "[1]": "invalid_json",
        json.dumps({**good, "region": None}): "missing:region",
        json.dumps({**good, "station_id": 7}): "wrong_type:station_id",
        json.dumps({**good, "wind_speed_ms": True}): "wrong_type:wind_speed_ms",
        json.dumps({**good, "event_time": "2024-03-01 10:00"}): "bad_timestamp",
        json.dumps({**good, "event_time": "2024-02-30T10:00:00Z"}): "bad_timestamp",
        json.dumps({**good, "humidity_pct": 101}): "out_of_range:humidity_pct",
    }
    assert {raw: parse_reading(raw) for raw in cases} == cases


def test_reference_windows_on_a_hand_made_case() -> None:
    times = ["00:10", "00:50", "03:00", "00:00"]
    readings = pd.DataFrame(
        {
            "station_id": ["a", "a", "a", "b"],
            "region": ["n", "n", "n", "s"],
            "event_time": pd.to_datetime([f"2024-03-01T10:{t}Z" for t in times]),
            "temperature_c": [10.0, 20.0, 30.0, 5.0],
            "humidity_pct": [50.0, 60.0, 70.0, 80.0],
            "wind_speed_ms": [1.0, 3.0, 2.0, 4.0],
        }
    )
    tumbling = window_averages(readings, timedelta(minutes=1))
    assert list(tumbling["n"]) == [2, 1, 1]
    assert list(tumbling["temperature_c_avg"]) == [15.0, 30.0, 5.0]
    assert tumbling.loc[0, "wind_speed_ms_max"] == 3.0
    sliding = window_averages(readings, timedelta(minutes=5), timedelta(minutes=1))
    a = sliding[sliding["station_id"] == "a"].set_index("window_start")
    # 10:00:xx is in the windows starting 09:56..10:00; 10:03 in 09:59..10:03.
    assert len(a) == 8
    both = a.loc[pd.Timestamp("2024-03-01T09:59:00Z")]
    assert (both["n"], both["temperature_c_avg"], both["temperature_c_min"]) == (3, 20.0, 10.0)
    assert a.loc[pd.Timestamp("2024-03-01T10:03:00Z"), "n"] == 1
    assert (sliding["window_end"] - sliding["window_start"] == pd.Timedelta(minutes=5)).all()


def test_region_hourly_weights_windows_by_readings() -> None:
    starts = ["10:00", "10:59", "11:00"]
    windows = pd.DataFrame(
        {
            "station_id": ["a", "b", "c"],
            "region": ["n", "n", "s"],
            "window_start": pd.to_datetime([f"2024-03-01T{t}Z" for t in starts]),
            "n": [3, 1, 2],
            "temperature_c_avg": [10.0, 14.0, 0.0],
            "humidity_pct_avg": [50.0, 90.0, 10.0],
            "wind_speed_ms_max": [5.0, 7.0, 1.0],
        }
    )
    out = region_hourly(windows)
    north = out.iloc[0]
    assert (north["readings"], north["stations"], north["temperature_c_avg"]) == (4, 2, 11.0)
    assert (north["humidity_pct_avg"], north["wind_speed_ms_max"]) == (60.0, 7.0)


def test_files_are_written_atomically_in_arrival_order(tmp_path: Path) -> None:
    payloads = [f'{{"i": {i}}}'.encode() for i in range(10)]
    first = write_weather_files(payloads, tmp_path, files=3)
    second = write_weather_files(payloads[:2], tmp_path, files=1)
    assert [p.name for p in first + second] == [f"readings-{i:05d}.jsonl" for i in range(4)]
    lines = [line for p in first for line in p.read_bytes().splitlines()]
    assert lines == payloads
    mtimes = [p.stat().st_mtime_ns for p in first + second]
    assert mtimes == sorted(mtimes) and len(set(mtimes)) == 4
    assert not list(tmp_path.glob(".*"))


def test_sensor_skips_then_requests_a_run_for_new_files(tmp_path: Path) -> None:
    home = HomeResource(root=str(tmp_path))
    folder = tmp_path / "data" / "weather"

    def tick(cursor: str | None) -> tuple[Any, str | None]:
        with dg.build_sensor_context(cursor=cursor, resources={"home": home}) as context:
            return weather_files_sensor(context), context.cursor

    result, _ = tick(None)
    assert isinstance(result, dg.SkipReason) and "No new" in (result.skip_message or "")
    write_weather_files([b"{}"] * 4, folder, files=2)
    result, cursor = tick(None)
    assert isinstance(result, dg.RunRequest) and result.run_key
    assert set(json.loads(cursor or "{}")) == {"readings-00000.jsonl", "readings-00001.jsonl"}
    config = result.run_config["ops"]["weather_window_averages"]["config"]
    assert config["input_dir"] == str(folder)
    again, _ = tick(cursor)
    assert isinstance(again, dg.SkipReason)
    write_weather_files([b"{}"], folder, files=1)
    more, _ = tick(cursor)
    assert isinstance(more, dg.RunRequest) and more.run_key != result.run_key
    assert more.tags["streamguard/new_files"] == "1"


def test_the_asset_lists_every_table_the_job_writes() -> None:
    """The asset repeats the table names (loading it needs no pyspark); they must agree."""
    from assets.weather import TABLES as ASSET_TABLES
    from streamguard.spark.weather import TABLES

    assert list(ASSET_TABLES) == list(TABLES)
    assert "weather_readings_rescued" in TABLES
