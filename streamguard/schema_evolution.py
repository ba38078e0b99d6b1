"""Schemas of semi-structured sources, stored in the lake with a version for every change.

What Auto Loader gives a file stream (`cloudFiles.schemaLocation`, `schemaHints`,
`schemaEvolutionMode`, `_rescued_data`), with no fraud logic, so any source of JSON-like records
(files today; DMS change files and weather readings next) holds its records to one schema:

- The schema is inferred from the first data and stored in the `_file_schemas` Delta table, one
  row per version, keyed by the source; hints fix the type of chosen columns.
- A record is conformed to it: a value of the wrong type moves into the rescued-data object
  (with the file it came from) instead of being dropped or failing the batch; a column the
  schema lacks is handled by the mode:

  | mode | a new column |
  | --- | --- |
  | `addNewColumns` | the schema gets a version with it and the read stops; the next run goes on |
  | `rescue` | goes into the rescued-data object; the schema never changes, nothing fails |
  | `failOnNewColumns` | the read stops until the schema is changed by hand (`change_schema`) |
  | `none` | is left out of the record (logged once per column) |
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from decimal import Decimal
from typing import Any, Literal, NoReturn, cast, get_args

import pyarrow as pa
import pyarrow.compute as pc

from streamguard.lake import Lake

log = logging.getLogger(__name__)

ColumnType = Literal["string", "long", "double", "boolean", "timestamp", "json"]
SchemaMode = Literal["addNewColumns", "rescue", "failOnNewColumns", "none"]
COLUMN_TYPES: tuple[ColumnType, ...] = get_args(ColumnType)
SCHEMA_MODES: tuple[SchemaMode, ...] = get_args(SchemaMode)

RESCUED_DATA = "_rescued_data"
FILE_PATH_KEY = "_file_path"  # in the rescued object: where the values came from (as Databricks)

SCHEMA_TABLE = "_file_schemas"
SCHEMA_TABLE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("columns", pa.string(), nullable=False),  # JSON: [{"name": .., "type": ..}]
        pa.field("reason", pa.string()),
        pa.field("at", pa.timestamp("us", tz="UTC")),
    ]
)

# Spark/DDL spellings a hint may use, to the type they mean.
_ALIASES: dict[str, ColumnType] = {
    "string": "string",
    "str": "string",
    "long": "long",
    "bigint": "long",
    "int": "long",
    "integer": "long",
    "double": "double",
    "float": "double",
    "decimal": "double",
    "boolean": "boolean",
    "bool": "boolean",
    "timestamp": "timestamp",
    "json": "json",
    "variant": "json",
}


@dataclass(frozen=True)
class SchemaVersion:
    """One stored version of a source's schema: ordered columns and why it changed."""

    source: str
    version: int
    columns: tuple[tuple[str, ColumnType], ...]
    reason: str = ""

    @property
    def types(self) -> dict[str, ColumnType]:
        return dict(self.columns)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.columns]


class SchemaChangeError(RuntimeError):
    """Data has columns its schema lacks; nothing of the read that met them was returned."""

    def __init__(self, message: str, new_columns: Mapping[str, ColumnType], where: str) -> None:
        super().__init__(message)
        self.new_columns = dict(new_columns)
        self.where = where


class SchemaEvolved(SchemaChangeError):
    """`addNewColumns`: the schema has a new version with the new columns; run again."""


class UnknownColumns(SchemaChangeError):
    """`failOnNewColumns`: the schema must be changed by hand (`change_schema`) first."""


# --------------------------------------------------------------------------- types


def column_type(name: str) -> ColumnType:
    """A type name as a hint writes it (`bigint`, `double`, `timestamp`, ...)."""
    kind = _ALIASES.get(name.strip().lower())
    if kind is None:
        raise ValueError(f"unknown column type {name!r} (one of {', '.join(COLUMN_TYPES)})")
    return kind


def parse_hints(hints: Mapping[str, str] | str | None) -> dict[str, ColumnType]:
    """Hints as Auto Loader takes them (`"amount double, event_time timestamp"`) or a mapping."""
    if hints is None:
        return {}
    if isinstance(hints, str):
        pairs: list[tuple[str, str]] = []
        for part in hints.split(","):
            if not part.strip():
                continue
            words = part.split()
            if len(words) != 2:
                raise ValueError(f"schema hint {part.strip()!r} is not 'column type'")
            pairs.append((words[0], words[1]))
        return {name: column_type(kind) for name, kind in pairs}
    return {name: column_type(kind) for name, kind in hints.items()}


def merge_types(a: ColumnType | None, b: ColumnType | None) -> ColumnType | None:
    """The type holding both (None: only nulls seen); integers widen to doubles, else string."""
    if a is None or a == b:
        return b
    if b is None:
        return a
    if {a, b} == {"long", "double"}:
        return "double"
    return "json" if "json" in (a, b) else "string"


def json_type(value: Any) -> ColumnType | None:
    """The type a JSON value infers as."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "long"
    if isinstance(value, float):
        return "double"
    if isinstance(value, str):
        return "string"
    return "json"


# Numbers as CSV text: no leading zeros (an id like "007" stays a string).
_LONG = re.compile(r"[+-]?(0|[1-9][0-9]*)")
_DOUBLE = re.compile(r"[+-]?(0|[1-9][0-9]*)?(\.[0-9]+)?([eE][+-]?[0-9]+)?")


def text_type(text: str) -> ColumnType | None:
    """The type a CSV field infers as (empty: null)."""
    if text == "":
        return None
    if _LONG.fullmatch(text):
        return "long"
    if any(c.isdigit() for c in text) and _DOUBLE.fullmatch(text):
        return "double"
    if text.lower() in ("true", "false"):
        return "boolean"
    return "string"


def arrow_type(kind: pa.DataType) -> ColumnType:
    """The type an Arrow (Parquet) column infers as."""
    if pa.types.is_boolean(kind):
        return "boolean"
    if pa.types.is_integer(kind):
        return "long"
    if pa.types.is_floating(kind) or pa.types.is_decimal(kind):
        return "double"
    if pa.types.is_timestamp(kind):
        return "timestamp"
    if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return "string"
    if pa.types.is_date(kind) or pa.types.is_time(kind) or pa.types.is_binary(kind):
        return "string"
    return "json"


def _is_timestamp(value: Any) -> bool:
    """An ISO-8601 string with a zone or offset (what every timestamp in a payload must be)."""
    if not isinstance(value, str):
        return False
    try:
        return datetime.fromisoformat(value).tzinfo is not None
    except ValueError:
        return False


# Whether a JSON value (not null) holds to a type.
_JSON_OK: dict[ColumnType, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "double": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "timestamp": _is_timestamp,
    "json": lambda v: True,
}


def _text_value(text: str, kind: ColumnType) -> tuple[bool, Any]:
    """A CSV field (not empty) as a value of `kind`: (whether it is one, the value)."""
    if kind in ("string", "json"):
        return True, text
    if kind == "long":
        return (True, int(text)) if _LONG.fullmatch(text) else (False, text)
    if kind == "double":
        if _LONG.fullmatch(text) or (any(c.isdigit() for c in text) and _DOUBLE.fullmatch(text)):
            return True, float(text)
        return False, text
    if kind == "boolean":
        lowered = text.lower()
        return (True, lowered == "true") if lowered in ("true", "false") else (False, text)
    return _is_timestamp(text), text


def json_value(value: Any) -> Any:
    """A Python value from Arrow as JSON would carry it (timestamps as ISO-8601, `Z` for UTC)."""
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            return value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        return value.isoformat()
    if isinstance(value, date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_value(v) for v in value]
    return value


_ENCODER = json.JSONEncoder(separators=(",", ":"), default=json_value)


def dumps(record: Mapping[str, Any]) -> bytes:
    """A record as one compact JSON line (the payload a parser reads)."""
    return _ENCODER.encode(record).encode()


# --------------------------------------------------------------------------- inference


class Inference:
    """Column types gathered from records, in order of first appearance."""

    def __init__(self) -> None:
        self.types: dict[str, ColumnType | None] = {}

    def add(self, name: str, kind: ColumnType | None) -> None:
        self.types[name] = merge_types(self.types.get(name), kind)

    def add_json(self, record: Mapping[str, Any]) -> None:
        for name, value in record.items():
            self.add(name, json_type(value))

    def add_text(self, record: Mapping[str, str]) -> None:
        for name, text in record.items():
            self.add(name, text_type(text))

    def add_arrow(self, schema: pa.Schema) -> None:
        for field in schema:
            self.add(field.name, arrow_type(field.type))

    def columns(self) -> dict[str, ColumnType]:
        """The types; a column seen only as null is a string (as Spark infers it)."""
        return {name: kind or "string" for name, kind in self.types.items()}


def with_hints(
    columns: Mapping[str, ColumnType], hints: Mapping[str, ColumnType]
) -> dict[str, ColumnType]:
    """Hinted columns take the hint's type; hinted columns the data lacks are added."""
    return {**columns, **hints}


# --------------------------------------------------------------------------- conforming


class Conformer:
    """Holds records to one schema version under one mode (see the module's table).

    New columns met under `addNewColumns`/`failOnNewColumns` are collected in `new_columns`
    (with their inferred types) for the caller to act on once its unit of data (a file) is read.
    """

    def __init__(
        self, schema: SchemaVersion, mode: SchemaMode, rescued_column: str = RESCUED_DATA
    ) -> None:
        if mode not in SCHEMA_MODES:
            raise ValueError(f"unknown schema mode {mode!r} (one of {', '.join(SCHEMA_MODES)})")
        self.schema = schema
        self.mode = mode
        self.rescued_column = rescued_column
        self._types = schema.types
        self._checks = {name: _JSON_OK[kind] for name, kind in schema.columns}
        self.new_columns = Inference()
        self.first_new: int | None = None  # the row where a new column was first met
        self._ignored: set[str] = set()

    def _unknown(self, name: str, kind: ColumnType | None, row: int) -> bool:
        """Handle a column the schema lacks; True when its value goes to the rescued data."""
        if self.mode in ("addNewColumns", "failOnNewColumns"):
            self.new_columns.add(name, kind)
            if self.first_new is None:
                self.first_new = row
            return False
        if self.mode == "rescue":
            return True
        if name not in self._ignored:  # none: left out, but said (once per conformer)
            self._ignored.add(name)
            log.warning("schema of %s: column %r is not in it; ignored", self.schema.source, name)
        return False

    def conform_json(self, record: dict[str, Any], path: str, row: int) -> dict[str, Any] | None:
        """The record held to the schema, or None when it already holds (keep its bytes)."""
        checks = self._checks
        moved: dict[str, Any] | None = None
        dropped: list[str] | None = None
        for name, value in record.items():
            check = checks.get(name)
            if check is None:
                if name == self.rescued_column:
                    continue  # already rescued upstream: kept as it is
                if self._unknown(name, json_type(value), row):
                    moved = moved or {}
                    moved[name] = value
                dropped = dropped or []
                dropped.append(name)
            elif value is not None and not check(value):
                moved = moved or {}
                moved[name] = value
                dropped = dropped or []
                dropped.append(name)
        if dropped is None:
            return None
        out = {k: v for k, v in record.items() if k not in dropped}
        if moved:
            self._rescue(out, moved, path)
        return out

    def holds_arrow(self, schema: pa.Schema) -> bool:
        """Whether every value of columns of these Arrow types holds to the schema as it is
        (then rows need no check one by one)."""
        for field in schema:
            kind = self._types.get(field.name)
            found = arrow_type(field.type)
            if kind is None or (found == "timestamp" and field.type.tz is None):
                return False  # a new column; or timestamps without a zone, which never hold
            if not (kind in (found, "json") or (found, kind) == ("long", "double")):
                return False
        return True

    def conform_text(self, record: Mapping[str, str], path: str, row: int) -> dict[str, Any]:
        """A CSV row typed by the schema; an empty field is null (left out)."""
        out: dict[str, Any] = {}
        moved: dict[str, Any] = {}
        types = self._types
        for name, text in record.items():
            kind = types.get(name)
            if kind is None:
                if self._unknown(name, text_type(text), row) and text != "":
                    moved[name] = text
                continue
            if text == "":
                continue
            ok, value = _text_value(text, kind)
            if ok:
                out[name] = value
            else:
                moved[name] = text
        if moved:
            self._rescue(out, moved, path)
        return out

    def _rescue(self, out: dict[str, Any], moved: Mapping[str, Any], path: str) -> None:
        earlier = out.get(self.rescued_column)
        base = earlier if isinstance(earlier, dict) else {}
        out[self.rescued_column] = {**base, **moved, FILE_PATH_KEY: path}


# --------------------------------------------------------------------------- storage


class SchemaStore:
    """The versions of one source's schema in the lake's `_file_schemas` table.

    Read back whenever the table has a new Delta version, so a change made by hand
    (`change_schema`) reaches a running source at its next read.
    """

    def __init__(self, lake: Lake, source: str) -> None:
        self.lake = lake
        self.source = source
        self._seen: int | None = None  # Delta version of the table last read
        self._history: list[SchemaVersion] = []

    def history(self) -> list[SchemaVersion]:
        version = self.lake.version(SCHEMA_TABLE)
        if version is not None and version != self._seen:
            rows = self.lake.read(
                SCHEMA_TABLE, filter=pc.field("source") == self.source, schema=SCHEMA_TABLE_SCHEMA
            ).to_pylist()
            self._history = sorted((_version_of(r) for r in rows), key=lambda s: s.version)
            self._seen = version
        return list(self._history)

    def current(self) -> SchemaVersion | None:
        history = self.history()
        return history[-1] if history else None

    def write(self, columns: Mapping[str, ColumnType], reason: str) -> SchemaVersion:
        """Store `columns` as the next version (once: the version is the app transaction)."""
        for name, kind in columns.items():
            if kind not in COLUMN_TYPES:
                raise ValueError(f"column {name!r}: unknown type {kind!r}")
        current = self.current()
        number = 1 if current is None else current.version + 1
        row = {
            "source": self.source,
            "version": number,
            "columns": json.dumps([{"name": n, "type": t} for n, t in columns.items()]),
            "reason": reason,
            "at": datetime.now(UTC),
        }
        table = pa.Table.from_pylist([row], schema=SCHEMA_TABLE_SCHEMA)
        if not self.lake.append(SCHEMA_TABLE, table, f"{SCHEMA_TABLE}:{self.source}", number):
            raise RuntimeError(
                f"version {number} of the schema of {self.source} is already stored: another "
                "process changed it meanwhile; run again to read it"
            )
        log.info("schema of %s is now version %d: %s", self.source, number, reason)
        stored = SchemaVersion(self.source, number, tuple(columns.items()), reason)
        self._history.append(stored)
        self._seen = self.lake.version(SCHEMA_TABLE)
        return stored


def _version_of(row: Mapping[str, Any]) -> SchemaVersion:
    columns = tuple((c["name"], cast(ColumnType, c["type"])) for c in json.loads(row["columns"]))
    return SchemaVersion(row["source"], int(row["version"]), columns, row["reason"] or "")


def schema_history(lake: Lake, source: str) -> list[SchemaVersion]:
    """Every stored version of a source's schema, oldest first."""
    return SchemaStore(lake, source).history()


def change_schema(
    lake: Lake,
    source: str,
    *,
    add: Mapping[str, str] | None = None,
    retype: Mapping[str, str] | None = None,
    drop: Iterable[str] = (),
    reason: str = "changed by hand",
) -> SchemaVersion:
    """Change a source's schema by hand: the way on after `failOnNewColumns` stopped a read.

    New columns go last; a schema change takes effect at the next read (change it after a
    clean stop: a batch planned before is replayed with the schema as it is then).
    """
    store = SchemaStore(lake, source)
    current = store.current()
    if current is None:
        raise ValueError(f"no schema stored for source {source!r} in {lake.location}")
    columns = current.types
    for name, kind in (add or {}).items():
        if name in columns:
            raise ValueError(f"column {name!r} already is in the schema of {source!r}")
        columns[name] = column_type(kind)
    for name, kind in (retype or {}).items():
        if name not in columns:
            raise ValueError(f"column {name!r} is not in the schema of {source!r}")
        columns[name] = column_type(kind)
    for name in drop:
        if columns.pop(name, None) is None:
            raise ValueError(f"column {name!r} is not in the schema of {source!r}")
    return store.write(columns, reason)


def stop_on_new_columns(
    store: SchemaStore,
    current: SchemaVersion,
    added: Mapping[str, ColumnType],
    where: str,
    *,
    mode: SchemaMode,
) -> NoReturn:
    """Stop a batch at columns its schema lacks, as Auto Loader does: under `addNewColumns`
    store the evolved schema first (the next run goes on with it); under `failOnNewColumns`
    say the exact call that changes it by hand."""
    new = dict(added)
    if mode == "addNewColumns":
        evolved = store.write(
            {**current.types, **new}, f"added {describe(new)}, first seen in {where}"
        )
        raise SchemaEvolved(
            f"{where}: new column(s) {describe(new)}; the schema of {store.source} is now "
            f"version {evolved.version} (addNewColumns): run again to go on with it",
            new,
            where,
        )
    raise UnknownColumns(
        f"{where}: column(s) {describe(new)} not in the schema of {store.source} (version "
        f"{current.version}, failOnNewColumns); change it by hand, then run again: "
        f"streamguard.schema_evolution.change_schema(Lake({store.lake.location!r}), "
        f"{store.source!r}, add={new!r})",
        new,
        where,
    )


def describe(columns: Mapping[str, ColumnType] | Sequence[tuple[str, ColumnType]]) -> str:
    """`name type, name type`: how messages (and hints) write columns."""
    pairs = columns.items() if isinstance(columns, Mapping) else columns
    return ", ".join(f"{name} {kind}" for name, kind in pairs)
