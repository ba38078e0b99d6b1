"""The transaction and label contracts, and the parser that holds every stream record to them.

A record that breaks the contract is returned with its reason instead of raising, so one bad
record never stops a batch: the runtime writes it to the dead-letter table.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pajson

KINDS = ("debit", "credit")
CHANNELS = ("atm", "pos", "online", "wire")

TIMESTAMP = pa.timestamp("us", tz="UTC")


def float64_values(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A numeric column as float64 numpy values, a null as NaN (as `to_pandas` makes it): the
    one conversion the model's matrix and the rules both read Arrow batches through."""
    if column.type != pa.float64():
        column = pc.cast(column, pa.float64())
    return np.asarray(column.to_numpy(zero_copy_only=False), dtype=np.float64)


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
# What a file source could not fit to its schema (unknown columns, wrong-typed values): a JSON
# object in the payload under this key (the name `streamguard.schema_evolution.RESCUED_DATA`
# gives it; models never import streamguard). Kept, as canonical JSON text, in the parsed rows.
RESCUED_DATA = "_rescued_data"
REQUIRED_FIELDS = ("transaction_id", "event_time", "customer_id", "terminal_id", "amount", "kind")
OPTIONAL_FIELDS = ("channel", "location")

# Why a record is rejected as a repeat: a transaction id is scored once (every engine says it so).
DUPLICATE_IN_BATCH = "duplicate transaction_id within the batch"
DUPLICATE_EARLIER = "duplicate transaction_id: already processed in an earlier batch"

# The bank's account as of a transaction's time (from the `accounts_history` CDC table): joined
# onto the transactions before the feature function, null where no account is known. Every
# engine passes these columns through with the transaction's own.
ACCOUNT_OPEN, ACCOUNT_FROZEN, ACCOUNT_CLOSED = "open", "frozen", "closed"
ACCOUNT_STATUSES = (ACCOUNT_OPEN, ACCOUNT_FROZEN, ACCOUNT_CLOSED)
CARD_ACTIVE, CARD_BLOCKED = "active", "blocked"
CARD_STATUSES = (CARD_ACTIVE, CARD_BLOCKED)
ACCOUNT_AS_OF_SCHEMA = pa.schema(
    [
        pa.field("account_balance", pa.float64()),  # the ledger balance of that version
        pa.field("account_updated_at", TIMESTAMP),  # when that version was committed
        pa.field("account_status", pa.string()),  # one of ACCOUNT_STATUSES
        pa.field("card_status", pa.string()),  # one of CARD_STATUSES
    ]
)
# What the feature function reads per transaction.
FEATURE_INPUT_SCHEMA = pa.schema([*TRANSACTION_SCHEMA, *ACCOUNT_AS_OF_SCHEMA])

LABELS = "labels"  # the lake table of LABEL_SCHEMA
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
    # TRANSACTION_SCHEMA, plus `_rescued_data` (string: the payload's rescued object as canonical
    # JSON, null where it has none) and `record_index` (int64) into the input, last.
    valid: pa.Table
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
    try:
        value = float(amount)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"amount must be a finite number > 0, got {str(amount)[:40]}")
    out["amount"] = value
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
    out[RESCUED_DATA] = _rescued(record)
    return out


def _rescued(record: dict[str, Any]) -> str | None:
    """The record's rescued data as canonical JSON text; None where it has none (or null)."""
    value = record.get(RESCUED_DATA)
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{RESCUED_DATA} must be a JSON object, got a JSON {type(value).__name__}")
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except ValueError:
        raise ValueError(
            f"{RESCUED_DATA} holds a number JSON cannot represent (NaN/Infinity)"
        ) from None


def parse_records(payloads: Sequence[bytes]) -> ParseResult:
    """Parse JSON payloads into a transaction table; broken records come back with a reason.

    Records are parsed in bulk by Arrow's JSON reader and validated with vectorised checks; a
    block the bulk reader refuses is split until the records it refuses are found, and those
    (and any record a check rejects) go through the record-by-record parser, which gives the
    reason. Both paths accept and reject exactly the same records (tests hold them equal).

    A payload's `_rescued_data` object is kept as canonical JSON text (keys sorted, compact) in
    the `_rescued_data` column; only the payloads that can hold that key are decoded for it, so
    payloads without one cost the bulk read nothing more.
    """
    valid_parts: list[pa.Table] = []
    rejected: list[Rejected] = []
    single, bulk, block, block_size = _route(payloads)
    _parse_bulk(payloads, bulk, valid_parts, single, block_size, block)
    if single:
        slow = parse_each([payloads[i] for i in single])
        index = pa.array(single, pa.int64())
        valid_parts.append(
            slow.valid.set_column(
                slow.valid.num_columns - 1,
                "record_index",
                pc.take(index, slow.valid["record_index"]),
            )
        )
        rejected.extend(Rejected(single[r.index], r.payload, r.reason) for r in slow.rejected)
    valid = pa.concat_tables(valid_parts) if valid_parts else _EMPTY_VALID
    order = valid["record_index"].to_numpy()
    if (np.diff(order) > 0).all():  # the common batch: one bulk part, already in input order
        valid = valid.combine_chunks()
    else:
        valid = valid.take(pc.sort_indices(valid["record_index"]))
    rejected.sort(key=lambda r: r.index)
    return ParseResult(valid=valid, rejected=rejected)


# The bulk read: event_time as text, and `_rescued_data` as an object with no fields (every key
# in it ignored), so the reader only says which records have one (and refuses a non-object).
_RAW_SCHEMA = pa.schema(
    [
        *[
            pa.field(f.name, pa.string() if f.type == TIMESTAMP else f.type)
            for f in TRANSACTION_SCHEMA
        ],
        pa.field(RESCUED_DATA, pa.struct([])),
    ]
)
_EMPTY_VALID = (
    TRANSACTION_SCHEMA.empty_table()
    .append_column(RESCUED_DATA, pa.array([], pa.string()))
    .append_column("record_index", pa.array([], pa.int64()))
)


# Whitespace `bytes.strip` removes that can open a line of the joined block (no CR or LF there).
_BLANK_OPENERS = np.frombuffer(b" \t\x0b\x0c", dtype=np.uint8)


def _route(payloads: Sequence[bytes]) -> tuple[list[int], list[int], bytes | None, int]:
    """(alone, bulk, block, block_size): which payloads the bulk reader may read, as one block.

    The bulk reader needs one JSON document per line: a payload holding a CR or LF, or blank
    (the reader skips a blank line, which would shift every row after it), goes alone to the
    record-by-record parser. The common batch has none: checked on the joined block with
    numpy instead of a Python loop, and that block (`block`, else None) is read as it is.
    `block_size` fits the longest payload, so Arrow can cut the block into parallel reads.
    """
    n = len(payloads)
    lengths = np.fromiter(map(len, payloads), dtype=np.int64, count=n)
    block_size = max(1 << 20, int(lengths.max(initial=0)) + 2)
    block = b"\n".join(payloads)
    if n and block.count(b"\n") == n - 1 and b"\r" not in block:
        # Every payload is one line of the block: a blank one is empty or opens with whitespace.
        starts = np.cumsum(lengths + 1) - (lengths + 1)
        opener = np.frombuffer(block, dtype=np.uint8)[starts[lengths > 0]]
        if (lengths > 0).all() and not np.isin(opener, _BLANK_OPENERS).any():
            return [], list(range(n)), block, block_size
    alone: list[int] = []
    bulk: list[int] = []
    for i, payload in enumerate(payloads):
        (alone if b"\n" in payload or b"\r" in payload or not payload.strip() else bulk).append(i)
    return alone, bulk, None, block_size


def _parse_bulk(
    payloads: Sequence[bytes],
    indices: list[int],
    out: list[pa.Table],
    single: list[int],
    block_size: int,
    block: bytes | None = None,
) -> None:
    """Parse `indices` in one Arrow read; halve the block while Arrow refuses it.

    `block`: the payloads of `indices` already joined by newlines, when the caller has them.
    """
    if not indices:
        return
    if len(indices) == 1:
        single.append(indices[0])
        return
    if block is None:
        block = b"\n".join(payloads[i] for i in indices)
    try:
        raw = pajson.read_json(
            io.BytesIO(block),
            # Blocks of ~1 MiB, parsed on Arrow's threads (one block of the whole batch took
            # twice as long on 2 cores); rows come back in input order either way.
            read_options=pajson.ReadOptions(block_size=block_size),
            parse_options=pajson.ParseOptions(
                explicit_schema=_RAW_SCHEMA, unexpected_field_behavior="ignore"
            ),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        raw = None
    if raw is None or raw.num_rows != len(indices):
        half = len(indices) // 2
        _parse_bulk(payloads, indices[:half], out, single, block_size)
        _parse_bulk(payloads, indices[half:], out, single, block_size)
        return
    times = _bulk_times(raw["event_time"])
    ok = _bulk_valid(raw, times)
    rescued, fine = _bulk_rescued(payloads, indices, raw[RESCUED_DATA])
    if fine is not None:
        ok = pc.and_(ok, fine)
    positions = pa.array(indices, pa.int64())
    good = (
        raw.drop_columns([RESCUED_DATA])
        .set_column(1, "event_time", times)
        .append_column(RESCUED_DATA, rescued)
        .append_column("record_index", positions)
    )
    good = good.filter(ok)
    out.append(good.cast(_EMPTY_VALID.schema))
    single.extend(positions.filter(pc.invert(ok)).to_pylist())


def _bulk_rescued(
    payloads: Sequence[bytes], indices: list[int], present: pa.ChunkedArray
) -> tuple[pa.Array, pa.Array | None]:
    """A block's `_rescued_data` column as text, and False where a record's cannot be kept.

    `present` is the bulk read's field-less object: valid where a record has one. The common
    block has none (a column of nulls); otherwise only those payloads are decoded again.
    """
    n = len(indices)
    if present.null_count == n:
        return pa.nulls(n, pa.string()), None
    texts: list[str | None] = [None] * n
    fine = np.ones(n, dtype=bool)
    for j in np.flatnonzero(pc.is_valid(present).to_numpy(zero_copy_only=False)):
        try:
            texts[j] = _rescued(json.loads(payloads[indices[j]]))
        except Exception:  # the record-by-record parser gives the reason
            fine[j] = False
    return pa.array(texts, pa.string()), pa.array(fine)


def _bulk_times(values: pa.ChunkedArray) -> pa.Array:
    """ISO-8601 strings with a zone to UTC timestamps; null where a string is not one."""
    try:
        return pc.cast(values, TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        parsed: list[datetime | None] = []
        for text in values.to_pylist():
            try:
                parsed.append(_parse_time(text))
            except ValueError:
                parsed.append(None)
        return pa.array(parsed, TIMESTAMP)


def _bulk_valid(raw: pa.Table, times: pa.Array) -> pa.Array:
    """The checks of `_check`, vectorised: True where a record holds to the contract."""
    ok = pc.is_valid(times)
    for name in ("transaction_id", "customer_id", "terminal_id"):
        ok = pc.and_kleene(ok, pc.greater(pc.utf8_length(raw[name]), 0))
    amount = raw["amount"]
    ok = pc.and_kleene(ok, pc.and_(pc.is_finite(amount), pc.greater(amount, 0)))
    ok = pc.and_kleene(ok, pc.is_in(raw["kind"], value_set=pa.array(KINDS)))
    channel = raw["channel"]
    ok = pc.and_kleene(
        ok, pc.or_kleene(pc.is_null(channel), pc.is_in(channel, value_set=pa.array(CHANNELS)))
    )
    location = raw["location"]
    ok = pc.and_kleene(
        ok, pc.or_kleene(pc.is_null(location), pc.greater(pc.utf8_length(location), 0))
    )
    return pc.fill_null(ok, False)


def parse_each(payloads: Sequence[bytes]) -> ParseResult:
    """The record-by-record parser: the reference for what is valid, and the reasons why not."""
    columns: dict[str, list[Any]] = {name: [] for name in (*TRANSACTION_SCHEMA.names, RESCUED_DATA)}
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
    table = table.append_column(RESCUED_DATA, pa.array(columns[RESCUED_DATA], pa.string()))
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
