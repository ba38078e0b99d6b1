"""Weather readings: the contract, a seeded stream simulator and the reference window averages.

Pure domain logic (no Spark, no lake). The Spark job in `streamguard.spark.weather` applies the
same contract with Spark expressions; `parse_reading` here is the readable definition of it and
`window_averages` the hand-checkable truth that tests hold the streaming results to.

Validation order (the first failing check gives the reason, in both implementations):
`invalid_json` (not JSON or not an object), `missing:<field>` (absent or null), `wrong_type:<field>`
(a string field that is not a JSON string, a number field that is not a JSON number),
`bad_timestamp` (event_time not ISO-8601 with a zone), `out_of_range:<field>`.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")
REGIONS: tuple[str, ...] = ("north", "south", "east", "west")
STRING_FIELDS: tuple[str, ...] = ("station_id", "region", "event_time")
NUMBER_FIELDS: tuple[str, ...] = ("temperature_c", "humidity_pct", "wind_speed_ms")
FIELDS: tuple[str, ...] = STRING_FIELDS + NUMBER_FIELDS
# Physically plausible bounds (inclusive): a reading outside them is a broken sensor, not weather.
RANGES: dict[str, tuple[float, float]] = {
    "temperature_c": (-90.0, 60.0),
    "humidity_pct": (0.0, 100.0),
    "wind_speed_ms": (0.0, 120.0),
}
# ISO-8601 with seconds and an explicit zone; Java and Python read this regex the same way.
TIMESTAMP_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2})$"
_TIMESTAMP_RE = re.compile(TIMESTAMP_PATTERN)

READING_SCHEMA = pa.schema(
    [
        pa.field("station_id", pa.string(), nullable=False),
        pa.field("region", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("temperature_c", pa.float64(), nullable=False),
        pa.field("humidity_pct", pa.float64(), nullable=False),
        pa.field("wind_speed_ms", pa.float64(), nullable=False),
    ]
)
WINDOW_SCHEMA = pa.schema(
    [
        pa.field("station_id", pa.string()),
        pa.field("region", pa.string()),
        pa.field("window_start", TIMESTAMP),
        pa.field("window_end", TIMESTAMP),
        pa.field("n", pa.int64()),
        pa.field("temperature_c_avg", pa.float64()),
        pa.field("temperature_c_min", pa.float64()),
        pa.field("temperature_c_max", pa.float64()),
        pa.field("humidity_pct_avg", pa.float64()),
        pa.field("wind_speed_ms_avg", pa.float64()),
        pa.field("wind_speed_ms_max", pa.float64()),
    ]
)
WINDOW_KEY: tuple[str, ...] = ("station_id", "window_start", "window_end")
DEFAULT_START = datetime(2024, 3, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Reading:
    station_id: str
    region: str
    event_time: datetime
    temperature_c: float
    humidity_pct: float
    wind_speed_ms: float


def _no_constants(name: str) -> Any:
    raise ValueError(f"non-finite JSON constant {name}")  # NaN/Infinity are not JSON


def parse_reading(raw: bytes | str) -> Reading | str:
    """One raw line -> a `Reading`, or the reason it breaks the contract (see the module doc)."""
    try:
        value = json.loads(raw, parse_constant=_no_constants)
    except ValueError:
        return "invalid_json"
    if not isinstance(value, dict):
        return "invalid_json"
    for field in FIELDS:
        if value.get(field) is None:
            return f"missing:{field}"
    for field in STRING_FIELDS:
        if not isinstance(value[field], str):
            return f"wrong_type:{field}"
    for field in NUMBER_FIELDS:
        if isinstance(value[field], bool) or not isinstance(value[field], int | float):
            return f"wrong_type:{field}"
    if not _TIMESTAMP_RE.match(value["event_time"]):
        return "bad_timestamp"
    try:
        event_time = datetime.fromisoformat(value["event_time"]).astimezone(UTC)
    except ValueError:
        return "bad_timestamp"
    for field, (low, high) in RANGES.items():
        if not low <= float(value[field]) <= high:
            return f"out_of_range:{field}"
    return Reading(
        station_id=value["station_id"],
        region=value["region"],
        event_time=event_time,
        temperature_c=float(value["temperature_c"]),
        humidity_pct=float(value["humidity_pct"]),
        wind_speed_ms=float(value["wind_speed_ms"]),
    )


def parse_readings(payloads: Sequence[bytes | str]) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Valid readings as a frame (READING_SCHEMA columns) and (raw, reason) for the rest."""
    rows: list[Reading] = []
    rejected: list[tuple[str, str]] = []
    for raw in payloads:
        parsed = parse_reading(raw)
        if isinstance(parsed, Reading):
            rows.append(parsed)
        else:
            text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
            rejected.append((text, parsed))
    frame = pd.DataFrame([r.__dict__ for r in rows], columns=list(READING_SCHEMA.names))
    frame["event_time"] = pd.to_datetime(frame["event_time"], utc=True)
    return frame, rejected


def window_averages(
    readings: pd.DataFrame, window: timedelta, slide: timedelta | None = None
) -> pd.DataFrame:
    """Reference event-time windows per station, aligned to the epoch like Spark's `window()`.

    Every reading falls in `window / slide` windows (one when tumbling). Columns: WINDOW_SCHEMA.
    """
    slide = slide or window
    if window % slide:
        raise ValueError("window must be a multiple of slide")
    columns = list(WINDOW_SCHEMA.names)
    if readings.empty:
        return pd.DataFrame(columns=columns)
    times = pd.to_datetime(readings["event_time"], utc=True)
    step, span = pd.Timedelta(slide), pd.Timedelta(window)
    last_start = times.dt.floor(step)
    parts = []
    for k in range(window // slide):
        part = readings.assign(window_start=last_start - k * step)
        parts.append(part)
    expanded = pd.concat(parts, ignore_index=True)
    expanded["window_end"] = expanded["window_start"] + span
    grouped = expanded.groupby(["station_id", "region", "window_start", "window_end"])
    out = grouped.agg(
        n=("temperature_c", "size"),
        temperature_c_avg=("temperature_c", "mean"),
        temperature_c_min=("temperature_c", "min"),
        temperature_c_max=("temperature_c", "max"),
        humidity_pct_avg=("humidity_pct", "mean"),
        wind_speed_ms_avg=("wind_speed_ms", "mean"),
        wind_speed_ms_max=("wind_speed_ms", "max"),
    ).reset_index()
    out["n"] = out["n"].astype("int64")
    return out[columns].sort_values(list(WINDOW_KEY)).reset_index(drop=True)


def _iso(ts: datetime) -> str:
    return ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def simulate_weather(
    stations: int,
    hours: float,
    seed: int,
    late_fraction: float = 0.03,
    malformed_fraction: float = 0.01,
    start: datetime = DEFAULT_START,
    interval_s: float = 60.0,
) -> list[bytes]:
    """Station readings as JSON lines in arrival order, with the flaws a real feed has.

    Each station reports about every `interval_s` (jittered), so readings interleave out of
    order; `late_fraction` of them arrive 2-30 minutes late (some beyond a 10-minute watermark);
    `malformed_fraction` of the lines are broken (bad JSON, missing field, wrong type, humidity
    out of range). One `default_rng(seed)` drawn in a fixed order: same arguments, same bytes.
    """
    rng = np.random.default_rng(seed)
    per_station = max(1, int(hours * 3600 / interval_s))
    offsets = rng.normal(0.0, 4.0, stations)  # station climate
    events: list[tuple[float, dict[str, Any]]] = []
    t0 = start.timestamp()
    for s in range(stations):
        jitter = rng.uniform(0, interval_s, per_station)
        times = t0 + np.arange(per_station) * interval_s + jitter
        hour_of_day = ((times - t0) / 3600 + start.hour) % 24
        temps = 12 + offsets[s] + 6 * np.sin((hour_of_day - 9) / 24 * 2 * math.pi)
        temps = temps + rng.normal(0, 0.6, per_station)
        humidity = np.clip(70 - 2.0 * (temps - 12) + rng.normal(0, 5, per_station), 5, 100)
        wind = rng.gamma(2.0, 2.2, per_station)
        delays = rng.exponential(8.0, per_station)  # seconds in transit
        late = rng.random(per_station) < late_fraction
        delays[late] = rng.uniform(120, 1800, int(late.sum()))
        for i in range(per_station):
            record = {
                "station_id": f"st-{s:03d}",
                "region": REGIONS[s % len(REGIONS)],
                "event_time": _iso(datetime.fromtimestamp(float(times[i]), UTC)),
                "temperature_c": round(float(temps[i]), 2),
                "humidity_pct": round(float(humidity[i]), 1),
                "wind_speed_ms": round(float(wind[i]), 2),
            }
            events.append((float(times[i] + delays[i]), record))
    events.sort(key=lambda e: e[0])
    out: list[bytes] = []
    broken = rng.random(len(events)) < malformed_fraction
    kinds = rng.integers(0, 4, len(events))
    for (_, record), bad, kind in zip(events, broken, kinds, strict=True):
        if bad:
            out.append(_break(record, int(kind)))
        else:
            out.append(json.dumps(record, separators=(",", ":")).encode())
    return out


def _break(record: dict[str, Any], kind: int) -> bytes:
    """One of four realistic breakages of a good record."""
    if kind == 0:  # truncated in transit
        return json.dumps(record).encode()[:-7]
    if kind == 1:  # a field the sensor did not send
        return json.dumps({k: v for k, v in record.items() if k != "temperature_c"}).encode()
    if kind == 2:  # a number sent as text
        return json.dumps({**record, "wind_speed_ms": str(record["wind_speed_ms"])}).encode()
    return json.dumps({**record, "humidity_pct": 130.5}).encode()  # a broken hygrometer


def write_weather_files(
    payloads: Sequence[bytes], out_dir: Path, files: int = 4, prefix: str = "readings"
) -> list[Path]:
    """Split the arrival order into `files` newline-delimited JSON files, written atomically.

    Each file is written under a hidden name and renamed, so a file source or sensor never sees a
    half-written file. Modification times strictly increase (1 ms apart, after any file already
    there), since file sources order new files by modification time. Numbering continues after
    existing files with the same prefix, so a later call adds files and overwrites none.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*.jsonl"))
    newest = max((p.stat().st_mtime_ns for p in out_dir.glob("*.jsonl")), default=0)
    base_ns = max(time.time_ns(), newest + 1_000_000)
    chunks = np.array_split(np.arange(len(payloads)), max(1, files))
    written: list[Path] = []
    for i, chunk in enumerate(chunks):
        path = out_dir / f"{prefix}-{len(existing) + i:05d}.jsonl"
        tmp = out_dir / f".{path.name}.tmp"
        tmp.write_bytes(b"".join(payloads[j] + b"\n" for j in chunk))
        mtime = base_ns + i * 1_000_000
        os.utime(tmp, ns=(mtime, mtime))
        tmp.rename(path)
        written.append(path)
    return written
