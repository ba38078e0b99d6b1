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
import pyarrow as pa
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
from streamguard.schema_evolution import (
    RESCUED_DATA,
    SchemaEvolved,
    SchemaMode,
    UnknownColumns,
    schema_history,
)
from streamguard.spark.weather import (
    BATCHES,
    CONTRACT_COLUMNS,
    DEAD_LETTERS,
    RESCUED,
    WINDOWS_1M,
    WINDOWS_5M,
    WeatherReport,
    read_table,
    run_weather_windows,
    schema_source,
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


def _run(
    spark: SparkSession,
    lake: Lake,
    input_dir: Path,
    checkpoint: Path,
    schema_mode: SchemaMode = "rescue",
) -> WeatherReport:
    return run_weather_windows(
        spark,
        input_dir,
        lake,
        checkpoint,
        watermark="10 minutes",
        max_files_per_trigger=1,
        schema_mode=schema_mode,
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


# --------------------------------------------------------------------------- schema modes


def _with(line: bytes, **fields: object) -> bytes:
    """A reading with fields added or replaced (a newer sensor, or a broken one)."""
    return json.dumps({**json.loads(line), **fields}).encode()


PRESSURE = _with(_reading("s1", "10:00:10", 10.0), pressure_hpa=1013.2)
PRESSURE_AND_FIRMWARE = _with(_reading("s2", "10:00:20", 20.0), pressure_hpa=998, firmware="v2")
# A new field on a reading that breaks the contract: a dead letter, its raw line kept whole.
PRESSURE_WRONG_HUMIDITY = _with(
    _reading("s1", "10:00:30", 11.0), pressure_hpa=1000, humidity_pct="70"
)
SCHEMA_FILES: list[list[bytes]] = [
    [PRESSURE, _reading("s1", "10:00:40", 12.0), PRESSURE_AND_FIRMWARE, PRESSURE_WRONG_HUMIDITY],
    [_reading("s1", "10:30:00", 15.0), _reading("s2", "10:30:00", 25.0)],
]


def _schema_files(root: Path, files: list[list[bytes]]) -> tuple[Lake, Path, Path, list[Path]]:
    """A lake, a folder with `files` (one file each, in order), a checkpoint path, the files."""
    input_dir, lake, checkpoint = root / "in", Lake(root / "lake"), root / "checkpoint"
    written = [write_weather_files(lines, input_dir, files=1)[0] for lines in files]
    return lake, input_dir, checkpoint, written


def _rescued(lake: Lake) -> pd.DataFrame:
    frame = read_table(lake, RESCUED).to_pandas()
    return frame.sort_values(["station_id", "event_time"]).reset_index(drop=True)


def test_a_new_field_is_rescued_with_its_file_exactly_once(
    spark: SparkSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake, input_dir, checkpoint, written = _schema_files(tmp_path, SCHEMA_FILES)
    # A crash after batch 0's rescued rows reached Delta, before its audit row and Spark's commit.
    append = lake.append

    def crash_once(name: str, data: pa.Table, app_id: str, version: int) -> bool:
        if name == BATCHES and version == 0 and lake.count(RESCUED) and not crashed:
            crashed.append(version)
            raise RuntimeError("crash between Delta commits")
        return append(name, data, app_id, version)

    crashed: list[int] = []
    monkeypatch.setattr(lake, "append", crash_once)
    with pytest.raises(Exception, match="crash between Delta commits"):
        _run(spark, lake, input_dir, checkpoint)
    assert crashed == [0] and lake.count(RESCUED) == 2 and lake.count(BATCHES) == 0
    version = lake.version(RESCUED)

    report = _run(spark, lake, input_dir, checkpoint)  # rescue is the default
    assert report.batches[:2] == [0, 1] and report.schema_mode == "rescue"
    assert lake.version(RESCUED) == version and lake.count(BATCHES) >= 2  # batch 0: rest only
    rescued = _rescued(lake)
    assert list(rescued["station_id"]) == ["s1", "s2"]
    assert list(rescued["event_time"]) == [
        pd.Timestamp("2024-03-01T10:00:10Z"),
        pd.Timestamp("2024-03-01T10:00:20Z"),
    ]
    file_paths = list(rescued["source_file"])
    assert all(path.endswith(f"/{written[0].name}") for path in file_paths)
    assert [json.loads(x) for x in rescued[RESCUED_DATA]] == [
        {"pressure_hpa": 1013.2, "_file_path": file_paths[0]},
        {"pressure_hpa": 998, "firmware": "v2", "_file_path": file_paths[1]},
    ]
    assert rescued["added_columns"].isna().all() and set(rescued["schema_version"]) == {1}
    assert rescued["reading_id"].is_unique and set(rescued["batch_id"]) == {0}
    # The rescued readings still count in their windows; the schema never changed.
    one_minute = _table(lake, WINDOWS_1M).set_index(["station_id", "window_start"])
    assert one_minute.loc[("s1", pd.Timestamp("2024-03-01T10:00:00Z")), "n"] == 2
    assert one_minute.loc[("s2", pd.Timestamp("2024-03-01T10:00:00Z")), "n"] == 1
    assert [v.columns for v in schema_history(lake, schema_source(input_dir))] == [
        tuple(CONTRACT_COLUMNS.items())
    ]
    # A wrong-typed contract field is dead-lettered (raw line whole, new field and all).
    dead = read_table(lake, DEAD_LETTERS).to_pandas()
    assert list(zip(dead["raw"], dead["reason"], strict=True)) == [
        (PRESSURE_WRONG_HUMIDITY.decode(), "wrong_type:humidity_pct")
    ]

    again = _run(spark, lake, input_dir, checkpoint)  # a rerun writes nothing
    assert again.batches == [] and again.rescued == 0
    assert lake.version(RESCUED) == version and _rescued(lake).equals(rescued)


def test_add_new_columns_stops_once_then_keeps_the_new_field(
    spark: SparkSession, tmp_path: Path
) -> None:
    files = [
        [PRESSURE, _reading("s1", "10:00:40", 12.0)],
        [
            _with(_reading("s2", "10:01:00", 20.0), pressure_hpa="high"),
            _reading("s1", "10:30:00", 15.0),
        ],
    ]
    lake, input_dir, checkpoint, written = _schema_files(tmp_path, files)
    with pytest.raises(
        SchemaEvolved, match=rf"{written[0].name} .*pressure_hpa double.* version 2"
    ):
        _run(spark, lake, input_dir, checkpoint, "addNewColumns")
    assert all(lake.count(name) == 0 for name in (WINDOWS_1M, DEAD_LETTERS, BATCHES, RESCUED))
    history = schema_history(lake, schema_source(input_dir))
    assert [v.version for v in history] == [1, 2]
    assert history[-1].types == {**CONTRACT_COLUMNS, "pressure_hpa": "double"}

    report = _run(spark, lake, input_dir, checkpoint, "addNewColumns")  # replays batch 0, goes on
    assert report.batches[:2] == [0, 1] and report.rows_in == 4 and report.dead_letters == 0
    rescued = _rescued(lake)
    assert [json.loads(x) if isinstance(x, str) else None for x in rescued["added_columns"]] == [
        {"pressure_hpa": 1013.2},
        None,
    ]
    # An added column's wrong-typed value is rescued (the reading itself holds to the contract).
    assert json.loads(rescued[RESCUED_DATA][1]) == {
        "pressure_hpa": "high",
        "_file_path": rescued["source_file"][1],
    }
    assert rescued[RESCUED_DATA].isna().tolist() == [True, False]
    assert list(rescued["schema_version"]) == [2, 2]


def test_fail_on_new_columns_stops_until_the_schema_is_changed(
    spark: SparkSession, tmp_path: Path
) -> None:
    lake, input_dir, checkpoint, _ = _schema_files(tmp_path, SCHEMA_FILES[:1])
    with pytest.raises(UnknownColumns, match=r"firmware string.*change_schema"):
        _run(spark, lake, input_dir, checkpoint, "failOnNewColumns")
    assert lake.count(WINDOWS_1M) == lake.count(RESCUED) == 0
    assert len(schema_history(lake, schema_source(input_dir))) == 1
