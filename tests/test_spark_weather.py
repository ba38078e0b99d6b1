"""The weather Structured Streaming job on real local Spark, writing real Delta tables.

One Spark session for the module (it takes seconds to start). The hand-made readings are small
enough to check by hand; the reference `models.weather.window_averages` computes the truth.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
from pyspark.sql import SparkSession

from assets.resources import HomeResource, SparkResource
from assets.weather import (
    WeatherConfig,
    weather_region_hourly,
    weather_window_averages,
)
from models.weather import (
    WINDOW_KEY,
    parse_readings,
    simulate_weather,
    window_averages,
    write_weather_files,
)
from streamguard.lake import Lake
from streamguard.spark.weather import (
    BATCHES,
    DEAD_LETTERS,
    WINDOWS_1M,
    WINDOWS_5M,
    WeatherReport,
    read_table,
    run_weather_windows,
)

pytestmark = pytest.mark.spark


def _reading(station: str, time: str, temp: float, hum: float = 60.0, wind: float = 3.0) -> bytes:
    region = {"s1": "north", "s2": "south"}[station]
    record = {
        "station_id": station,
        "region": region,
        "event_time": f"2024-03-01T{time}Z",
        "temperature_c": temp,
        "humidity_pct": hum,
        "wind_speed_ms": wind,
    }
    return json.dumps(record).encode()


BEYOND_WATERMARK = _reading("s1", "09:40:00", 99.0 - 60)  # 40 min behind when it arrives
FILES: list[list[bytes]] = [
    [
        _reading("s1", "10:00:10", 10.0, wind=2.0),
        _reading("s1", "10:00:40", 12.0, wind=6.0),
        _reading("s2", "10:00:20", 20.0),
        _reading("s1", "10:01:30", 11.0),
        b'{"station_id": "s1", "region": "north", "event_time": "2024-03-01T10:0',
        b'{"station_id": "s2", "event_time": "2024-03-01T10:02:00Z", "temperature_c": 1,'
        b' "humidity_pct": 50, "wind_speed_ms": 1}',
        _reading("s1", "10:20:00", 14.0),
    ],
    [
        _reading("s1", "10:30:00", 15.0),
        # 7.5 min behind the newest reading, inside the 10-minute watermark: counted.
        _reading("s2", "10:12:30", 21.0, hum=70.0),
        b'{"station_id": "s2", "region": "south", "event_time": "2024-03-01T10:13:00Z",'
        b' "temperature_c": 3, "humidity_pct": "70", "wind_speed_ms": 1}',
        _reading("s2", "10:13:00", 22.0, hum=130.0),
    ],
    [BEYOND_WATERMARK, _reading("s2", "10:21:00", 23.0), _reading("s1", "10:31:00", 16.0)],
]
NEW_FILE = [_reading("s1", "10:45:00", 17.0), _reading("s2", "10:44:00", 24.0)]


@dataclass
class Run:
    lake: Lake
    input_dir: Path
    checkpoint: Path
    report: WeatherReport


def _run(spark: SparkSession, lake: Lake, input_dir: Path, checkpoint: Path) -> WeatherReport:
    return run_weather_windows(
        spark, input_dir, lake, checkpoint, watermark="10 minutes", max_files_per_trigger=1
    )


@pytest.fixture(scope="module")
def first_run(spark: SparkSession, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("weather")
    input_dir, lake = root / "in", Lake(root / "lake")
    for lines in FILES:  # one file per call: a file per micro-batch, in this order
        write_weather_files(lines, input_dir, files=1)
    report = _run(spark, lake, input_dir, root / "checkpoint")
    return Run(lake, input_dir, root / "checkpoint", report)


def _expected(lines: list[bytes], watermark: pd.Timestamp, slide_minutes: int) -> pd.DataFrame:
    readings, _ = parse_readings([line for line in lines if line != BEYOND_WATERMARK])
    window = timedelta(minutes=5 if slide_minutes else 1)
    slide = timedelta(minutes=slide_minutes) if slide_minutes else None
    ref = window_averages(readings, window, slide)
    return ref[ref["window_end"] <= watermark].reset_index(drop=True)


def _table(lake: Lake, name: str) -> pd.DataFrame:
    frame = read_table(lake, name).to_pandas()
    return frame.sort_values(list(WINDOW_KEY)).reset_index(drop=True)


def _assert_windows(lake: Lake, lines: list[bytes], watermark: pd.Timestamp) -> None:
    for name, slide in ((WINDOWS_1M, 0), (WINDOWS_5M, 1)):
        got, want = _table(lake, name), _expected(lines, watermark, slide)
        assert not got.duplicated(list(WINDOW_KEY)).any(), f"{name}: a window written twice"
        pd.testing.assert_frame_equal(got, want, check_dtype=False, check_exact=False)


def test_windows_equal_the_reference_and_late_rows_are_counted(first_run: Run) -> None:
    report = first_run.report
    assert report.batches == [0, 1, 2] or report.batches[:3] == [0, 1, 2]
    assert report.rows_in == sum(len(f) for f in FILES) == 14
    assert report.dead_letters == 4
    assert report.readings == 10
    assert report.late_rows_dropped == 1  # 09:40 arrived after the watermark passed 10:10
    assert report.watermark is not None
    # Batch 2 evicts with the watermark of batch 1's newest reading (10:30) minus 10 minutes.
    assert report.watermark >= pd.Timestamp("2024-03-01T10:20:00Z")
    _assert_windows(first_run.lake, [x for f in FILES for x in f], pd.Timestamp(report.watermark))
    one_minute = _table(first_run.lake, WINDOWS_1M).set_index(["station_id", "window_start"])
    first = one_minute.loc[("s1", pd.Timestamp("2024-03-01T10:00:00Z"))]
    assert (first["n"], first["temperature_c_avg"], first["wind_speed_ms_max"]) == (2, 11.0, 6.0)
    late_within = one_minute.loc[("s2", pd.Timestamp("2024-03-01T10:12:00Z"))]
    assert late_within["n"] == 1 and late_within["temperature_c_avg"] == 21.0
    audit = read_table(first_run.lake, BATCHES).to_pandas()
    assert audit["late_rows_dropped"].sum() == 1 and audit["rows_in"].sum() == 14
    assert report.rows_written[WINDOWS_1M] == first_run.lake.count(WINDOWS_1M)


def test_dead_letters_hold_raw_line_and_reason(first_run: Run) -> None:
    dead = read_table(first_run.lake, DEAD_LETTERS).to_pandas()
    lines = [x for f in FILES for x in f]
    _, rejected = parse_readings(lines)
    assert sorted(zip(dead["raw"], dead["reason"], strict=True)) == sorted(rejected)
    assert set(dead["reason"]) == {
        "invalid_json",
        "missing:region",
        "wrong_type:humidity_pct",
        "out_of_range:humidity_pct",
    }
    assert all(str(first_run.input_dir) in f for f in dead["source_file"])


def test_rerun_writes_nothing_and_new_files_append_only_new_windows(
    spark: SparkSession, first_run: Run
) -> None:
    lake = first_run.lake
    versions = {name: lake.version(name) for name in (WINDOWS_1M, WINDOWS_5M, DEAD_LETTERS)}
    again = _run(spark, lake, first_run.input_dir, first_run.checkpoint)
    assert again.batches == [] and again.rows_in == 0
    assert sum(again.rows_written.values()) == 0
    assert {name: lake.version(name) for name in versions} == versions
    assert again.app_id == first_run.report.app_id  # the query id survives the restart

    before = lake.count(WINDOWS_1M)
    write_weather_files(NEW_FILE, first_run.input_dir, files=1)
    more = _run(spark, lake, first_run.input_dir, first_run.checkpoint)
    assert more.rows_in == len(NEW_FILE) and more.late_rows_dropped == 0
    assert more.rows_written[WINDOWS_1M] > 0
    assert lake.count(WINDOWS_1M) == before + more.rows_written[WINDOWS_1M]
    assert more.watermark == pd.Timestamp("2024-03-01T10:35:00Z")
    lines = [x for f in FILES for x in f] + NEW_FILE
    _assert_windows(lake, lines, pd.Timestamp(more.watermark))


def test_the_asset_materializes_generated_readings(spark: SparkSession, tmp_path: Path) -> None:
    payloads = simulate_weather(stations=3, hours=1, seed=5, malformed_fraction=0.05)
    home = tmp_path / "home"
    write_weather_files(payloads, home / "data" / "weather", files=2)
    result = dg.materialize(
        [weather_window_averages, weather_region_hourly],
        resources={"home": HomeResource(root=str(home)), "spark": SparkResource(master="local[2]")},
        run_config=dg.RunConfig(ops={"weather_window_averages": WeatherConfig()}),
    )
    assert result.success
    meta = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("weather_window_averages")
    }
    assert meta[DEAD_LETTERS]["rows_written"].value > 0
    assert meta[WINDOWS_1M]["rows_in"].value == len(payloads)
    assert meta[WINDOWS_1M]["late_rows_dropped"].value >= 0
    lake = Lake(home / "lake")
    _, rejected = parse_readings(payloads)
    dead = read_table(lake, DEAD_LETTERS).to_pandas()
    assert Counter(dead["reason"]) == Counter(reason for _, reason in rejected)
    hourly = result.asset_materializations_for_node("weather_region_hourly")[0].metadata
    assert hourly["rows"].value > 0
    assert os.path.isdir(home / "lake" / "weather_region_hourly")
