"""Weather window averages: a Structured Streaming job from JSON files to Delta tables.

One query, one checkpoint: text lines -> parse and validate (Spark 4 VARIANT expressions that
apply `models.weather`'s contract) -> per station, tumbling 1-minute and sliding 5-minute/1-minute
event-time windows under a watermark, in append mode (a window is written once, when final).
The two aggregations, the dead letters and a per-minute tally of valid readings are unioned into
one stream so a micro-batch is one `foreachBatch` call; it splits the batch into Delta tables
through delta-rs, each append keyed by the Delta app transaction (query id, batch id), so a batch
Spark replays after a crash writes nothing twice.

Late rows are counted, not lost silently. Spark drops a row from a window aggregation when its
window already closed: window end <= the watermark of the *previous* batch (Spark >= 3.4 keeps
late-event filtering one batch behind eviction). Spark's own `numRowsDroppedByWatermark` counts
groups after partial aggregation, not rows, so the job counts rows itself: the tally branch
carries every valid reading's 1-minute window, and the watermark each batch ran with is read
from Spark's offset log. The count is per row of the 1-minute windows; a late row may still
reach the wider sliding windows that were open.

Fields beyond the contract are not lost (`schema_mode`, Auto Loader's modes, on
`streamguard.schema_evolution`). The feed's schema is stored in `_file_schemas` (source
`weather:<folder>`), version 1 being the contract. A valid reading whose JSON object has keys the
contract lacks is tagged `rescue` in the stream; `foreachBatch` holds it to the stored schema
with the same `Conformer` the fraud file source uses:

- `rescue` (the default): new fields go into `_rescued_data` (JSON, with `_file_path`), kept in
  `weather_readings_rescued`, one row per reading; the windows are not affected and nothing stops.
- `addNewColumns`: the first batch with a new field stores a schema version with it and stops
  before writing anything; the next run replays that batch and goes on, the added fields' values
  kept in `weather_readings_rescued.added_columns` (a wrong-typed value of one: `_rescued_data`).
- `failOnNewColumns`: the batch stops until `change_schema` adds the field by hand.
- `none`: new fields are left out (logged once).

A contract field of the wrong type stays a dead letter (`wrong_type:<field>`, raw line kept): a
reading without a usable temperature cannot be averaged, and rescuing it would leave the window
silently short of a reading.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from models.weather import (
    FIELDS,
    NUMBER_FIELDS,
    RANGES,
    STRING_FIELDS,
    TIMESTAMP,
    TIMESTAMP_PATTERN,
    WINDOW_SCHEMA,
)
from streamguard.lake import Lake
from streamguard.schema_evolution import (
    RESCUED_DATA,
    SCHEMA_MODES,
    ColumnType,
    Conformer,
    SchemaChangeError,
    SchemaMode,
    SchemaStore,
    json_value,
    stop_on_new_columns,
)

WINDOWS_1M = "weather_windows_1m"
WINDOWS_5M = "weather_windows_5m"
DEAD_LETTERS = "weather_dead_letters"
BATCHES = "weather_batches"
RESCUED = "weather_readings_rescued"
TABLES: tuple[str, ...] = (WINDOWS_1M, WINDOWS_5M, DEAD_LETTERS, BATCHES, RESCUED)
# The contract as the feed's schema version 1 (`models.weather` holds the rules themselves).
CONTRACT_COLUMNS: dict[str, ColumnType] = {
    "station_id": "string",
    "region": "string",
    "event_time": "timestamp",
    "temperature_c": "double",
    "humidity_pct": "double",
    "wind_speed_ms": "double",
}
DEFAULT_SCHEMA_MODE: SchemaMode = "rescue"

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("raw", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("source_file", pa.string()),
        pa.field("batch_id", pa.int64()),
    ]
)
BATCH_SCHEMA = pa.schema(
    [
        pa.field("app_id", pa.string()),
        pa.field("batch_id", pa.int64()),
        pa.field("rows_in", pa.int64()),
        pa.field("readings", pa.int64()),
        pa.field("dead_letters", pa.int64()),
        pa.field("late_rows_dropped", pa.int64()),
        pa.field("windows_1m", pa.int64()),
        pa.field("windows_5m", pa.int64()),
        pa.field("late_watermark", TIMESTAMP),
        pa.field("processed_at", TIMESTAMP),
    ]
)
RESCUED_SCHEMA = pa.schema(
    [
        pa.field("reading_id", pa.string()),  # sha256 of file and line text, 32 hex digits
        pa.field("station_id", pa.string()),
        pa.field("region", pa.string()),
        pa.field("event_time", TIMESTAMP),
        pa.field("source_file", pa.string()),
        pa.field(RESCUED_DATA, pa.string()),  # JSON: fields the schema lacks or wrong-typed ones
        pa.field("added_columns", pa.string()),  # JSON: fields the schema added to the contract
        pa.field("schema_version", pa.int64()),
        pa.field("batch_id", pa.int64()),
    ]
)
_KIND_1M, _KIND_5M, _KIND_DEAD, _KIND_TALLY = "1m", "5m", "dead", "tally"
_KIND_RESCUE = "rescue"
_NUMBER_TYPE = r"^(TINYINT|SMALLINT|INT|BIGINT|FLOAT|DOUBLE|DECIMAL.*)$"


@dataclass
class WeatherReport:
    """What one run did: rows in, rows written per table, lateness, time."""

    app_id: str
    batches: list[int] = field(default_factory=list)
    rows_in: int = 0
    readings: int = 0
    dead_letters: int = 0
    late_rows_dropped: int = 0
    rescued: int = 0  # readings with a field beyond the contract kept in RESCUED
    schema_mode: str = DEFAULT_SCHEMA_MODE
    rows_written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLES, 0))
    batches_skipped: int = 0  # replayed batches the lake already held
    watermark: datetime | None = None
    max_event_time: datetime | None = None
    watermark_delay: str = ""
    duration_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "app_id": self.app_id,
            "batches": len(self.batches),
            "rows_in": self.rows_in,
            "readings": self.readings,
            "dead_letters": self.dead_letters,
            "late_rows_dropped": self.late_rows_dropped,
            "rescued": self.rescued,
            "schema_mode": self.schema_mode,
            "rows_written": dict(self.rows_written),
            "batches_skipped": self.batches_skipped,
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "max_event_time": self.max_event_time.isoformat() if self.max_event_time else None,
            "watermark_delay": self.watermark_delay,
            "duration_s": round(self.duration_s, 3),
        }


def parse_lines(lines: DataFrame) -> DataFrame:
    """`value` text lines -> `raw`, typed columns and `reason` (null when the reading is valid).

    The same checks in the same order as `models.weather.parse_reading`: VARIANT keeps the JSON
    type of each field, so a number sent as a string is told apart from a number.
    """
    v = F.expr("try_parse_json(value)")
    with_v = lines.withColumn("_v", v)

    def jtype(name: str) -> Column:
        return F.expr(f"schema_of_variant(variant_get(_v, '$.{name}'))")

    checks: list[tuple[Column, str]] = [
        (
            F.col("_v").isNull() | ~F.expr("schema_of_variant(_v)").startswith("OBJECT"),
            "invalid_json",
        )
    ]
    checks += [(jtype(f).isNull() | (jtype(f) == "VOID"), f"missing:{f}") for f in FIELDS]
    checks += [(jtype(f) != "STRING", f"wrong_type:{f}") for f in STRING_FIELDS]
    checks += [(~jtype(f).rlike(_NUMBER_TYPE), f"wrong_type:{f}") for f in NUMBER_FIELDS]
    typed = {f: F.expr(f"try_variant_get(_v, '$.{f}', 'string')") for f in STRING_FIELDS}
    typed |= {f: F.expr(f"try_variant_get(_v, '$.{f}', 'double')") for f in NUMBER_FIELDS}
    event_time = typed["event_time"].try_cast("timestamp")
    checks.append(
        (~typed["event_time"].rlike(TIMESTAMP_PATTERN) | event_time.isNull(), "bad_timestamp")
    )
    checks += [
        (~typed[f].between(low, high), f"out_of_range:{f}") for f, (low, high) in RANGES.items()
    ]
    # The first failing check names the reason; `when` without `otherwise` is null when it passes.
    reason = F.coalesce(*(F.when(cond, F.lit(text)) for cond, text in checks))
    return with_v.select(
        *(c for c in lines.columns if c != "value"),  # carried through (e.g. the source file)
        F.col("value").alias("raw"),
        *(typed[f].alias(f) for f in FIELDS if f != "event_time"),
        event_time.alias("event_time"),
        reason.alias("reason"),
    )


def _windows(valid: DataFrame, kind: str, duration: str, slide: str | None) -> DataFrame:
    window = F.window("event_time", duration, slide) if slide else F.window("event_time", duration)
    agg = valid.groupBy("station_id", "region", window.alias("w")).agg(
        F.count(F.lit(1)).alias("n"),
        F.avg("temperature_c").alias("temperature_c_avg"),
        F.min("temperature_c").alias("temperature_c_min"),
        F.max("temperature_c").alias("temperature_c_max"),
        F.avg("humidity_pct").alias("humidity_pct_avg"),
        F.avg("wind_speed_ms").alias("wind_speed_ms_avg"),
        F.max("wind_speed_ms").alias("wind_speed_ms_max"),
    )
    return agg.select(
        F.lit(kind).alias("kind"),
        "station_id",
        "region",
        F.col("w.start").alias("window_start"),
        F.col("w.end").alias("window_end"),
        *(c for c in WINDOW_SCHEMA.names[4:]),
        F.lit(None).cast("string").alias("raw"),
        F.lit(None).cast("string").alias("reason"),
        F.lit(None).cast("string").alias("source_file"),
    )


def _offset_watermark_ms(checkpoint: Path, batch_id: int) -> int:
    """The event-time watermark batch `batch_id` ran with, as Spark recorded it (0 before any).

    Spark's offset log `offsets/<id>` is a version line, then the batch metadata JSON holding
    `batchWatermarkMs`; it is written before the batch runs, and survives restarts.
    """
    if batch_id < 0:
        return 0
    lines = (checkpoint / "offsets" / str(batch_id)).read_text().splitlines()
    return int(json.loads(lines[1]).get("batchWatermarkMs", 0))


def _ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _progress_time(progress: dict[str, Any], key: str) -> datetime | None:
    value = (progress.get("eventTime") or {}).get(key)
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _as(table: pa.Table, schema: pa.Schema) -> pa.Table:
    return table.select(schema.names).cast(schema)


def run_weather_windows(
    spark: SparkSession,
    input_dir: Path,
    lake: Lake,
    checkpoint: Path,
    watermark: str = "10 minutes",
    max_files_per_trigger: int = 10,
    schema_mode: SchemaMode = DEFAULT_SCHEMA_MODE,
) -> WeatherReport:
    """Process every file not yet seen (`availableNow`), then stop; return what happened.

    The checkpoint remembers files and open windows, so running again picks up only new files,
    and a rerun over the same files writes nothing twice. A new field under `addNewColumns` or
    `failOnNewColumns` raises `SchemaEvolved` / `UnknownColumns` with nothing of that batch
    written (see the module doc).
    """
    if schema_mode not in SCHEMA_MODES:
        raise ValueError(f"unknown schema mode {schema_mode!r} (one of {', '.join(SCHEMA_MODES)})")
    started = time.monotonic()
    input_dir, checkpoint = Path(input_dir), Path(checkpoint)
    input_dir.mkdir(parents=True, exist_ok=True)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    for name, schema in (
        (WINDOWS_1M, WINDOW_SCHEMA),
        (WINDOWS_5M, WINDOW_SCHEMA),
        (DEAD_LETTERS, DEAD_LETTER_SCHEMA),
        (BATCHES, BATCH_SCHEMA),
        (RESCUED, RESCUED_SCHEMA),
    ):
        lake.ensure(name, schema)
    schemas = SchemaStore(lake, schema_source(input_dir))
    if schemas.current() is None:
        schemas.write(CONTRACT_COLUMNS, "the weather reading contract (models.weather)")

    lines = (
        spark.readStream.format("text")
        .option("maxFilesPerTrigger", max_files_per_trigger)
        .option("pathGlobFilter", "*.jsonl")
        .load(str(input_dir))
    )
    stream = tagged_stream(lines, watermark)

    query_id: dict[str, str] = {}
    started_event = threading.Event()
    report = WeatherReport(app_id="", watermark_delay=watermark, schema_mode=schema_mode)
    failures: list[BaseException] = []

    def write_batch(batch: DataFrame, batch_id: int) -> None:
        try:
            if not started_event.wait(timeout=120):
                raise RuntimeError("query id never became known")
            _write_batch(
                batch, batch_id, query_id["app_id"], lake, checkpoint, report, schemas, schema_mode
            )
        except BaseException as exc:  # surfaced by the query as well; kept for a clear message
            failures.append(exc)
            raise

    query = (
        stream.writeStream.queryName(f"weather_windows_{checkpoint.name}")
        .foreachBatch(write_batch)
        .outputMode("append")
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    # The query id is stable across restarts from the same checkpoint, and new if the checkpoint
    # is deleted (so a fresh start is not mistaken for a replay of old batch ids).
    query_id["app_id"] = report.app_id = f"streamguard.weather/{query.id}"
    started_event.set()
    try:
        query.awaitTermination()
    except Exception:
        schema_stops = [f for f in failures if isinstance(f, SchemaChangeError)]
        if schema_stops:  # Spark wraps it; the caller gets the error itself, message intact
            raise schema_stops[0] from None
        raise
    finally:
        if query.isActive:
            query.stop()
    progress = query.recentProgress  # a trailing no-data batch reports a watermark but no max
    if progress:
        report.watermark = _progress_time(progress[-1], "watermark")
        maxima = [m for p in progress if (m := _progress_time(p, "max")) is not None]
        report.max_event_time = max(maxima, default=None)
    report.duration_s = time.monotonic() - started
    return report


def schema_source(input_dir: Path) -> str:
    """The feed's key in `_file_schemas`: one schema per folder of readings."""
    return f"weather:{Path(input_dir).resolve().as_posix()}"


def tagged_stream(lines: DataFrame, watermark: str) -> DataFrame:
    """The whole query as one stream of rows tagged by `kind`: the table each row is for."""
    parsed = parse_lines(lines.select("value", F.col("_metadata.file_path").alias("_file")))
    valid = parsed.where(F.col("reason").isNull()).withWatermark("event_time", watermark)
    windows_1m = _windows(valid, _KIND_1M, "1 minute", None)
    windows_5m = _windows(valid, _KIND_5M, "5 minutes", "1 minute")
    nulls = {c: F.lit(None).cast(t) for c, t in _WINDOW_SPARK_TYPES.items()}
    dead = parsed.where(F.col("reason").isNotNull()).select(
        F.lit(_KIND_DEAD).alias("kind"),
        *(nulls[c].alias(c) for c in WINDOW_SCHEMA.names),
        "raw",
        "reason",
        F.col("_file").alias("source_file"),
    )
    # One row per valid reading: its 1-minute window, to count late rows exactly per batch.
    tally = valid.select(
        F.lit(_KIND_TALLY).alias("kind"),
        *(
            (F.window("event_time", "1 minute").end if c == "window_end" else nulls[c]).alias(c)
            for c in WINDOW_SCHEMA.names
        ),
        *(F.lit(None).cast("string").alias(c) for c in ("raw", "reason", "source_file")),
    )
    # Valid readings with keys beyond the contract (new fields, or fields an earlier schema
    # version added): held to the stored schema on the driver. The event time rides in
    # `window_start`. Usually none, so the driver sees few rows.
    extra = F.array_except(F.expr("json_object_keys(raw)"), F.array(*map(F.lit, FIELDS)))
    carried = {"station_id": F.col("station_id"), "region": F.col("region")}
    carried["window_start"] = F.col("event_time")
    rescue = valid.where(F.size(extra) > 0).select(
        F.lit(_KIND_RESCUE).alias("kind"),
        *(carried.get(c, nulls[c]).alias(c) for c in WINDOW_SCHEMA.names),
        "raw",
        F.lit(None).cast("string").alias("reason"),
        F.col("_file").alias("source_file"),
    )
    return (
        windows_1m.unionByName(windows_5m).unionByName(dead).unionByName(tally).unionByName(rescue)
    )


_WINDOW_SPARK_TYPES = {
    "station_id": "string",
    "region": "string",
    "window_start": "timestamp",
    "window_end": "timestamp",
    "n": "bigint",
    "temperature_c_avg": "double",
    "temperature_c_min": "double",
    "temperature_c_max": "double",
    "humidity_pct_avg": "double",
    "wind_speed_ms_avg": "double",
    "wind_speed_ms_max": "double",
}


def _write_batch(
    batch: DataFrame,
    batch_id: int,
    app_id: str,
    lake: Lake,
    checkpoint: Path,
    report: WeatherReport,
    schemas: SchemaStore,
    schema_mode: SchemaMode,
) -> None:
    """Split one micro-batch into the tables; every append is once per (app_id, batch_id)."""
    batch.persist()
    try:
        rows = batch.where(F.col("kind") != _KIND_TALLY).toArrow()
        tally = batch.where(F.col("kind") == _KIND_TALLY).groupBy("window_end").count().toArrow()
    finally:
        batch.unpersist()
    late_ms = _offset_watermark_ms(checkpoint, batch_id - 1)
    late_at = pa.scalar(_ms_to_datetime(late_ms), TIMESTAMP)
    readings = int(pc.sum(tally["count"]).as_py() or 0)
    late_mask = pc.less_equal(tally["window_end"].cast(TIMESTAMP), late_at)
    late = int(pc.sum(pc.if_else(late_mask, tally["count"], 0)).as_py() or 0)
    kind = rows["kind"]
    parts = {
        WINDOWS_1M: _as(rows.filter(pc.equal(kind, _KIND_1M)), WINDOW_SCHEMA),
        WINDOWS_5M: _as(rows.filter(pc.equal(kind, _KIND_5M)), WINDOW_SCHEMA),
    }
    # Before any write: a new field may stop the batch (nothing of it written, Spark replays it).
    rescue = rows.filter(pc.equal(kind, _KIND_RESCUE))
    parts[RESCUED] = _rescued(rescue, batch_id, schemas, schema_mode)
    dead = rows.filter(pc.equal(kind, _KIND_DEAD))
    dead = dead.append_column("batch_id", pa.array([batch_id] * dead.num_rows, pa.int64()))
    parts[DEAD_LETTERS] = _as(dead, DEAD_LETTER_SCHEMA)
    parts[BATCHES] = pa.Table.from_pylist(
        [
            {
                "app_id": app_id,
                "batch_id": batch_id,
                "rows_in": readings + dead.num_rows,
                "readings": readings,
                "dead_letters": dead.num_rows,
                "late_rows_dropped": late,
                "windows_1m": parts[WINDOWS_1M].num_rows,
                "windows_5m": parts[WINDOWS_5M].num_rows,
                "late_watermark": _ms_to_datetime(late_ms),
                "processed_at": datetime.now(UTC),
            }
        ],
        schema=BATCH_SCHEMA,
    )
    wrote_any = False
    for name, part in parts.items():
        # Empty parts are skipped except the audit row, which marks the batch as done.
        if (part.num_rows or name == BATCHES) and lake.append(name, part, app_id, batch_id):
            report.rows_written[name] += part.num_rows
            wrote_any = True
    report.batches.append(batch_id)
    report.rows_in += readings + dead.num_rows
    report.readings += readings
    report.dead_letters += dead.num_rows
    report.late_rows_dropped += late
    report.rescued += parts[RESCUED].num_rows
    if not wrote_any:
        report.batches_skipped += 1


def _rescued(rows: pa.Table, batch_id: int, schemas: SchemaStore, mode: SchemaMode) -> pa.Table:
    """Readings with keys beyond the contract, held to the stored schema by `Conformer`.

    Under `addNewColumns`/`failOnNewColumns` a key the schema lacks stops the batch
    (`stop_on_new_columns`); otherwise one row per reading that kept something: its rescued
    values and the values of columns the schema added to the contract.
    """
    schema = schemas.current()
    assert schema is not None  # written before the query starts
    conformer = Conformer(schema, mode)
    added = [name for name in schema.names if name not in CONTRACT_COLUMNS]
    out: list[dict[str, Any]] = []
    first_new: str | None = None
    columns = ["raw", "source_file", "station_id", "region", "window_start"]
    for number, row in enumerate(rows.select(columns).to_pylist()):
        record = json.loads(row["raw"])
        held = conformer.conform_json(record, row["source_file"], number)
        if conformer.new_columns.types and first_new is None:
            first_new = f"{row['source_file']} (reading {record.get('station_id')!s} at "
            first_new += f"{record.get('event_time')!s})"
        held = record if held is None else held
        rescued = held.get(RESCUED_DATA)
        kept = {name: held[name] for name in added if held.get(name) is not None}
        if rescued is None and not kept:
            continue
        digest = hashlib.sha256(f"{row['source_file']}\n{row['raw']}".encode()).hexdigest()
        out.append(
            {
                "reading_id": digest[:32],
                "station_id": row["station_id"],
                "region": row["region"],
                "event_time": row["window_start"],
                "source_file": row["source_file"],
                RESCUED_DATA: _json(rescued) if rescued is not None else None,
                "added_columns": _json(kept) if kept else None,
                "schema_version": schema.version,
                "batch_id": batch_id,
            }
        )
    new = conformer.new_columns.columns()
    if new:
        stop_on_new_columns(schemas, schema, new, first_new or "a weather batch", mode=mode)
    return pa.Table.from_pylist(out, schema=RESCUED_SCHEMA)


def _json(value: Any) -> str:
    return json.dumps(json_value(value), separators=(",", ":"))


def read_table(lake: Lake, name: str, columns: Iterable[str] | None = None) -> pa.Table:
    """A job table as Arrow (empty with its schema before the first run)."""
    schema = {WINDOWS_1M: WINDOW_SCHEMA, WINDOWS_5M: WINDOW_SCHEMA}.get(name)
    schema = schema or {DEAD_LETTERS: DEAD_LETTER_SCHEMA, BATCHES: BATCH_SCHEMA}.get(name)
    schema = schema or {RESCUED: RESCUED_SCHEMA}[name]
    return lake.read(name, columns=list(columns) if columns else None, schema=schema)
