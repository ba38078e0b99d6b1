"""The transaction and label contracts, and the parser that holds every stream record to them.

A record that breaks the contract is returned with its reason instead of raising, so one bad
record never stops a batch: the runtime writes it to the dead-letter table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

KINDS = ("debit", "credit")
CHANNELS = ("atm", "pos", "online", "wire")

TIMESTAMP = pa.timestamp("us", tz="UTC")

TRANSACTION_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("event_time", TIMESTAMP, nullable=False),
        pa.field("customer_id", pa.string(), nullable=False),
        pa.field("terminal_id", pa.string(), nullable=False),
        pa.field("amount", pa.float64(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("channel", pa.string(), nullable=True),
        pa.field("location", pa.string(), nullable=True),
    ]
)
REQUIRED_FIELDS = ("transaction_id", "event_time", "customer_id", "terminal_id", "amount", "kind")
OPTIONAL_FIELDS = ("channel", "location")

LABEL_SCHEMA = pa.schema(
    [
        pa.field("transaction_id", pa.string(), nullable=False),
        pa.field("is_fraud", pa.bool_(), nullable=False),
        pa.field("reported_at", TIMESTAMP, nullable=False),
        pa.field("fraud_scenario", pa.string(), nullable=True),
    ]
)


@dataclass(frozen=True)
class Rejected:
    """A record that broke the contract: its position in the input, raw bytes and why."""

    index: int
    payload: bytes
    reason: str


@dataclass(frozen=True)
class ParseResult:
    valid: pa.Table  # TRANSACTION_SCHEMA, plus `record_index` (int64) into the input
    rejected: list[Rejected]


def _parse_time(value: Any) -> datetime:
    if not isinstance(value, str):
        raise ValueError(f"event_time must be an ISO-8601 string, got {type(value).__name__}")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"event_time is not an ISO-8601 timestamp: {value[:40]!r}") from None
    if parsed.tzinfo is None:
        raise ValueError("event_time has no time zone (expected UTC, e.g. '...Z')")
    return parsed.astimezone(UTC)


def _check(record: Any) -> dict[str, Any]:
    """Return the record's typed fields or raise ValueError with the first thing wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"record is a JSON {type(record).__name__}, not an object")
    missing = [f for f in REQUIRED_FIELDS if record.get(f) is None]
    if missing:
        raise ValueError(f"missing required field(s): {', '.join(missing)}")
    out: dict[str, Any] = {}
    for name in ("transaction_id", "customer_id", "terminal_id"):
        value = record[name]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
        out[name] = value
    out["event_time"] = _parse_time(record["event_time"])
    amount = record["amount"]
    if isinstance(amount, bool) or not isinstance(amount, int | float):
        raise ValueError(f"amount must be a number, got {type(amount).__name__}")
    if not math.isfinite(amount) or amount <= 0:
        raise ValueError(f"amount must be a finite number > 0, got {amount}")
    out["amount"] = float(amount)
    kind = record["kind"]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {'|'.join(KINDS)}, got {str(kind)[:20]!r}")
    out["kind"] = kind
    channel = record.get("channel")
    if channel is not None and channel not in CHANNELS:
        raise ValueError(f"channel must be one of {'|'.join(CHANNELS)}, got {str(channel)[:20]!r}")
    out["channel"] = channel
    location = record.get("location")
    if location is not None and (not isinstance(location, str) or not location):
        raise ValueError("location must be a non-empty string when present")
    out["location"] = location
    return out


def parse_records(payloads: Sequence[bytes]) -> ParseResult:
    """Parse JSON payloads into a transaction table; broken records come back with a reason."""
    columns: dict[str, list[Any]] = {name: [] for name in TRANSACTION_SCHEMA.names}
    indices: list[int] = []
    rejected: list[Rejected] = []
    for i, payload in enumerate(payloads):
        try:
            record = json.loads(payload)
        except json.JSONDecodeError as exc:
            rejected.append(Rejected(i, bytes(payload), f"not valid JSON: {exc.msg}"[:200]))
            continue
        except Exception as exc:  # bad encodings etc. must not stop the batch either
            rejected.append(Rejected(i, bytes(payload), f"not valid JSON: {exc}"[:200]))
            continue
        try:
            fields = _check(record)
        except ValueError as exc:
            rejected.append(Rejected(i, bytes(payload), str(exc)))
            continue
        for name, values in columns.items():
            values.append(fields[name])
        indices.append(i)
    arrays = [pa.array(columns[f.name], type=f.type) for f in TRANSACTION_SCHEMA]
    table = pa.Table.from_arrays(arrays, schema=TRANSACTION_SCHEMA)
    table = table.append_column("record_index", pa.array(indices, type=pa.int64()))
    return ParseResult(valid=table, rejected=rejected)


def to_payload(row: dict[str, Any]) -> bytes:
    """Serialise one transaction row for the stream (the inverse of `parse_records`)."""
    out = {}
    for name in TRANSACTION_SCHEMA.names:
        value = row.get(name)
        if value is None:
            continue
        if isinstance(value, datetime):
            value = value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif hasattr(value, "isoformat"):  # pandas Timestamp
            value = value.isoformat().replace("+00:00", "Z")
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()
