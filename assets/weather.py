"""Weather windows: the Spark streaming job as assets, a per-region summary, a file sensor."""

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import dagster as dg
import pandas as pd
import pyarrow as pa
from deltalake import write_deltalake
from pydantic import Field

from assets.resources import HomeResource, SparkResource
from models.weather import WINDOW_SCHEMA

if TYPE_CHECKING:
    from streamguard.schema_evolution import SchemaMode
GROUP = "weather"
# Table names are repeated here (not imported) so loading the code location needs no pyspark.
WINDOWS_1M, WINDOWS_5M = "weather_windows_1m", "weather_windows_5m"
DEAD_LETTERS, BATCHES = "weather_dead_letters", "weather_batches"
RESCUED = "weather_readings_rescued"
REGION_HOURLY = "weather_region_hourly"
TABLES = {
    WINDOWS_1M: "Per-station averages over tumbling 1-minute event-time windows, once final.",
    WINDOWS_5M: "Per-station averages over sliding 5-minute windows (1-minute slide), once final.",
    DEAD_LETTERS: "Weather lines that broke the contract: raw line, reason, source file.",
    BATCHES: "One audit row per micro-batch: rows in, dead letters, late rows dropped.",
    RESCUED: "Valid readings with fields beyond the contract: `_rescued_data` (JSON with the "
    "file) and the values of columns the schema added; one row per reading.",
}
SENSOR_INTERVAL_SECONDS = 30


class WeatherConfig(dg.Config):
    input_dir: str | None = Field(
        default=None,
        description="Folder of *.jsonl readings; unset: $STREAMGUARD_HOME/data/weather",
    )
    watermark: str = Field(
        default="10 minutes", description="How late a reading may be and still reach its window"
    )
    max_files_per_trigger: int = Field(default=10, description="Most files in one micro-batch")
    schema_mode: str = Field(
        default="rescue",
        description="A field beyond the contract: rescue (kept in _rescued_data, nothing stops), "
        "addNewColumns (schema evolves, the run stops once), failOnNewColumns, none",
    )


def weather_dir(home: HomeResource, input_dir: str | None = None) -> Path:
    return Path(input_dir) if input_dir else home.home().data / "weather"


@dg.multi_asset(
    name="weather_window_averages",
    specs=[dg.AssetSpec(name, description=text, group_name=GROUP) for name, text in TABLES.items()],
)
def weather_window_averages(
    context: dg.AssetExecutionContext,
    config: WeatherConfig,
    home: HomeResource,
    spark: SparkResource,
) -> Iterator[dg.MaterializeResult]:
    """Run the streaming query over every file not yet seen (availableNow), then stop."""
    from streamguard.spark.weather import run_weather_windows

    place, lake = home.home(), home.lake()
    report = run_weather_windows(
        spark.session(),
        weather_dir(home, config.input_dir),
        lake,
        place.checkpoints / "weather_windows",
        watermark=config.watermark,
        max_files_per_trigger=config.max_files_per_trigger,
        schema_mode=cast("SchemaMode", config.schema_mode),
    )
    context.log.info(f"weather run: {json.dumps(report.as_dict())}")
    common = {
        "batches": dg.MetadataValue.int(len(report.batches)),
        "rows_in": dg.MetadataValue.int(report.rows_in),
        "dead_letters": dg.MetadataValue.int(report.dead_letters),
        "late_rows_dropped": dg.MetadataValue.int(report.late_rows_dropped),
        "rescued": dg.MetadataValue.int(report.rescued),
        "schema_mode": dg.MetadataValue.text(report.schema_mode),
        "watermark": dg.MetadataValue.text(str(report.watermark or "-")),
        "watermark_delay": dg.MetadataValue.text(report.watermark_delay),
        "duration_s": dg.MetadataValue.float(round(report.duration_s, 3)),
    }
    for name in TABLES:
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                **common,
                "rows_written": dg.MetadataValue.int(report.rows_written[name]),
                "rows_total": dg.MetadataValue.int(lake.count(name)),
                "delta_version": dg.MetadataValue.int(lake.version(name) or 0),
                "path": dg.MetadataValue.path(lake.uri(name)),
            },
        )


def region_hourly(windows: pd.DataFrame) -> pd.DataFrame:
    """1-minute windows -> per region and hour: readings, stations, weighted means, peak wind."""
    columns = ["region", "hour", "readings", "stations", "temperature_c_avg",
               "humidity_pct_avg", "wind_speed_ms_max"]  # fmt: skip
    if windows.empty:
        return pd.DataFrame(columns=columns)
    frame = windows.assign(
        hour=windows["window_start"].dt.floor("h"),
        t_sum=windows["temperature_c_avg"] * windows["n"],
        h_sum=windows["humidity_pct_avg"] * windows["n"],
    )
    out = (
        frame.groupby(["region", "hour"])
        .agg(
            readings=("n", "sum"),
            stations=("station_id", "nunique"),
            t_sum=("t_sum", "sum"),
            h_sum=("h_sum", "sum"),
            wind_speed_ms_max=("wind_speed_ms_max", "max"),
        )
        .reset_index()
    )
    out["temperature_c_avg"] = out["t_sum"] / out["readings"]
    out["humidity_pct_avg"] = out["h_sum"] / out["readings"]
    return out[columns].sort_values(["region", "hour"]).reset_index(drop=True)


@dg.asset(
    name=REGION_HOURLY,
    deps=[WINDOWS_1M],
    group_name=GROUP,
    description="Per-region hourly weather from the final 1-minute windows (recomputed whole).",
)
def weather_region_hourly(home: HomeResource) -> dg.MaterializeResult:
    """A full recompute from the Delta windows: cheap, and correct whatever arrived late."""
    lake = home.lake()
    windows = lake.read(WINDOWS_1M, schema=WINDOW_SCHEMA).to_pandas()
    summary = region_hourly(windows)
    table = pa.Table.from_pandas(summary, preserve_index=False)
    write_deltalake(lake.uri(REGION_HOURLY), table, mode="overwrite", schema_mode="overwrite")
    return dg.MaterializeResult(
        metadata={
            "rows": dg.MetadataValue.int(len(summary)),
            "regions": dg.MetadataValue.int(int(summary["region"].nunique())),
            "preview": dg.MetadataValue.md(summary.head(12).to_markdown(index=False)),
            "path": dg.MetadataValue.path(lake.uri(REGION_HOURLY)),
        }
    )


weather_job = dg.define_asset_job(
    "weather_windows_job",
    selection=dg.AssetSelection.assets(weather_window_averages, weather_region_hourly),
    description="Process new weather files into final windows, then refresh the hourly summary.",
    tags={"streamguard/job": "weather_windows"},
)


def scan_files(folder: Path) -> dict[str, int]:
    """Visible *.jsonl files and their modification times (ns); hidden temp files are skipped."""
    if not folder.is_dir():
        return {}
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.jsonl") if p.is_file()}


@dg.sensor(
    name="weather_files_sensor",
    job=weather_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    description="Requests a weather run when new or changed *.jsonl files land in the folder.",
)
def weather_files_sensor(
    context: dg.SensorEvaluationContext, home: HomeResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON {file name: mtime ns} of files a run was already requested for."""
    folder = weather_dir(home)
    seen: dict[str, int] = json.loads(context.cursor) if context.cursor else {}
    current = scan_files(folder)
    new = {name: mtime for name, mtime in current.items() if seen.get(name) != mtime}
    if not new:
        return dg.SkipReason(f"No new *.jsonl files in {folder} ({len(current)} already seen).")
    context.update_cursor(json.dumps(current, sort_keys=True))
    digest = hashlib.sha256(json.dumps(new, sort_keys=True).encode()).hexdigest()[:20]
    return dg.RunRequest(
        run_key=f"weather-{digest}",
        run_config=dg.RunConfig(
            ops={"weather_window_averages": WeatherConfig(input_dir=str(folder))}
        ),
        tags={"streamguard/new_files": str(len(new))},
    )


defs = dg.Definitions(
    assets=[weather_window_averages, weather_region_hourly],
    jobs=[weather_job],
    sensors=[weather_files_sensor],
)
