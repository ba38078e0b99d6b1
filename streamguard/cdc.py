"""Change data capture applied to Delta: DMS files become a current table (SCD 1) or its history
(SCD 2), each file exactly once.

The options are named as in Databricks' `APPLY CHANGES` / `AUTO CDC`, so a data team reads them
as they know them: `keys`, `sequence_by`, `apply_as_deletes`, `stored_as_scd_type`,
`except_column_list`. The DMS `Op` column is never copied to the target.

**Order.** A batch is the new files in DMS order (full load by hexadecimal counter, then change
files by time). Each change has a position: its file's order, then its line. A change is newer
than another when its `sequence_by` value is greater, or equal with a later position (without
`sequence_by`: the DMS timestamp column if configured, else the position alone). Within a batch
only the newest change per key counts (SCD 1); SCD 2 keeps each distinct sequence value.

**Never back in time.** SCD 1 MERGEs with conditions: delete on a delete, update only when the
change is newer than the stored row (the target keeps the sequence column and `_cdc_position`),
insert when absent. Deleted keys leave a tombstone (`_cdc_tombstones_<target>`), so a change older
than the delete, arriving later, does not bring the row back. SCD 2 rebuilds the affected tail of
each key's history (`valid_from`, `valid_to`, `is_current`) from the stored versions plus the new
changes, so a late change lands between the versions it belongs between.

**Exactly once.** Like the scoring batches (`streamguard.commit`): a batch is planned before
anything is written (its files go to `_cdc_files` with a lake batch id), every table is written
with the Delta application transaction `(cdc:<target>, batch_id)`, and `_cdc_batches` marks it
applied. After a crash, the planned batch is applied again from the same files, and only the
tables still missing it are written. A file recorded in `_cdc_files` is never applied again.

**Schema.** As the file source's (`streamguard.schema_evolution`, Auto Loader's semantics):
inferred from the first files (Parquet's own types; CSV values, as that module infers them),
`schema_hints` fixing chosen columns, and stored with a version for every change under the
name `cdc:<target>`. A new source column then follows `schema_mode`: `addNewColumns` (the batch
stops with a message and the evolved schema is stored; the next run adds the column),
`rescue` (never fails: new columns and wrong-typed values go to `_rescued_data` as JSON with the
file), `failOnNewColumns` (stops until `schema_evolution.change_schema` adds it by hand),
`none` (ignored).

**Dead letters.** A change with a bad `Op`, a missing or unreadable key or sequence value, or
(outside `rescue`) a value of the wrong type, goes to `cdc_dead_letters` with its file and line;
the rest of the file applies.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import CommitProperties, Transaction, write_deltalake

from models.schema import TIMESTAMP
from streamguard.commit import AfterWrite, next_batch_id
from streamguard.dms import OP_COLUMN, DmsFile, DmsRows, DmsSource
from streamguard.lake import Lake
from streamguard.schema_evolution import (
    FILE_PATH_KEY,
    RESCUED_DATA,
    SCHEMA_MODES,
    ColumnType,
    Inference,
    SchemaMode,
    SchemaStore,
    SchemaVersion,
    arrow_type,
    parse_hints,
    stop_on_new_columns,
    with_hints,
)

log = logging.getLogger(__name__)

ScdType = Literal[1, 2]

FILES_TABLE = "_cdc_files"
BATCHES_TABLE = "_cdc_batches"
DEAD_LETTERS_TABLE = "cdc_dead_letters"
POSITION = "_cdc_position"
VALID_FROM, VALID_TO, IS_CURRENT = "valid_from", "valid_to", "is_current"
_DELETE, _REMOVE, _SEQ = "_cdc_delete", "_cdc_remove", "_cdc_seq"  # working columns, never stored
OPS = ("I", "U", "D")
# The schema module's column types as the Arrow types a target stores (JSON kept as text).
ARROW_TYPES: dict[ColumnType, pa.DataType] = {
    "string": pa.string(),
    "long": pa.int64(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
    "timestamp": TIMESTAMP,
    "json": pa.string(),
}
INFER_ROWS = 1_000  # rows of each CSV file the first schema is inferred from

FILES_SCHEMA = pa.schema(
    [
        pa.field("target", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("order_key", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("modified", TIMESTAMP),
        pa.field("rows", pa.int64()),
        pa.field("planned_at", TIMESTAMP),
    ]
)
BATCHES_SCHEMA = pa.schema(
    [
        pa.field("target", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("files", pa.int64()),
        pa.field("changes", pa.int64()),
        pa.field("dead_letters", pa.int64()),
        pa.field("inserted", pa.int64()),
        pa.field("updated", pa.int64()),
        pa.field("deleted", pa.int64()),
        pa.field("target_version", pa.int64()),
        pa.field("schema_version", pa.int64()),
        pa.field("committed_at", TIMESTAMP),
    ]
)
DEAD_LETTERS_SCHEMA = pa.schema(
    [
        pa.field("target", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("file", pa.string(), nullable=False),
        pa.field("line", pa.int64()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("payload", pa.string()),  # the row as read, as JSON
        pa.field("recorded_at", TIMESTAMP),
    ]
)


@dataclass(frozen=True)
class BatchReport:
    """What one batch of files did to the target (zero counts for tables written before a
    crash: their rows are in the table, their metrics went with the crashed attempt)."""

    batch_id: int
    files: tuple[str, ...]
    changes: int
    dead_letters: int
    inserted: int
    updated: int
    deleted: int
    resumed: bool


@dataclass(frozen=True)
class CdcReport:
    """Every batch one `apply_changes` call applied, and the target's Delta version after."""

    target: str
    batches: tuple[BatchReport, ...]
    version: int | None

    @property
    def files(self) -> int:
        return sum(len(b.files) for b in self.batches)

    def total(
        self, what: Literal["changes", "dead_letters", "inserted", "updated", "deleted"]
    ) -> int:
        return sum(int(getattr(b, what)) for b in self.batches)


@dataclass(frozen=True)
class ChangeFlow:
    """How one DMS table is applied to one Delta table (see `apply_changes`)."""

    target: str
    keys: tuple[str, ...]
    sequence_by: str | None
    apply_as_deletes: str
    stored_as_scd_type: ScdType
    except_column_list: tuple[str, ...]
    schema_mode: SchemaMode
    schema_hints: Mapping[str, ColumnType]

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.target):
            raise ValueError(f"target must be a plain table name, got {self.target!r}")
        if not self.keys:
            raise ValueError("keys: at least one primary-key column")
        if self.stored_as_scd_type not in (1, 2):
            raise ValueError(f"stored_as_scd_type must be 1 or 2, got {self.stored_as_scd_type}")
        if self.schema_mode not in SCHEMA_MODES:
            raise ValueError(f"schema_mode must be one of {', '.join(SCHEMA_MODES)}")
        dropped = {*self.keys, self.sequence_by} & set(self.except_column_list)
        if dropped:
            raise ValueError(f"except_column_list cannot drop the keys or sequence: {dropped}")
        _deletes(self.apply_as_deletes)  # fail early on an expression we cannot read

    @property
    def app_id(self) -> str:
        return f"cdc:{self.target}"

    @property
    def tombstones(self) -> str:
        return f"_cdc_tombstones_{self.target}"

    @property
    def schema_source(self) -> str:
        return schema_source(self.target)


def schema_source(target: str) -> str:
    """The name a target's source schema is stored under (what `change_schema` takes)."""
    return f"cdc:{target}"


def _deletes(expression: str) -> tuple[str, list[str]]:
    """`apply_as_deletes` as (column, values): `Op = 'D'` or `op_type IN ('D', 'X')`."""
    match = re.fullmatch(r"\s*(\w+)\s*(=|(?i:in))\s*(.+?)\s*", expression)
    values = re.findall(r"'((?:[^']|'')*)'", match.group(3)) if match else []
    if not match or not values or (match.group(2) == "=" and len(values) != 1):
        raise ValueError(
            f"apply_as_deletes must read `column = 'value'` or `column IN ('a', 'b')`, "
            f"got {expression!r}"
        )
    return match.group(1), [v.replace("''", "'") for v in values]


def _q(name: str) -> str:
    """A column name quoted for a delta-rs predicate (keeps its case)."""
    return '"' + name.replace('"', '""') + '"'


def _commit(app_id: str, batch_id: int) -> CommitProperties:
    return CommitProperties(app_transactions=[Transaction(app_id=app_id, version=batch_id)])


# --------------------------------------------------------------------------- schema


def _plain(kind: pa.DataType) -> pa.DataType:
    """Strings as plain strings (delta-rs MERGE writes string views)."""
    if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
        return pa.string()
    return kind


def arrow_schema(version: SchemaVersion) -> pa.Schema:
    """A stored schema version as the Arrow schema changes are conformed to."""
    return pa.schema([pa.field(name, ARROW_TYPES[kind]) for name, kind in version.columns])


def _inferred(
    flow: ChangeFlow, source: DmsSource, rows: Sequence[DmsRows], names: Sequence[str]
) -> dict[str, ColumnType]:
    """Types of `names` from the files (the first INFER_ROWS rows of each CSV), then hints."""
    inferred = Inference()
    for part in rows:
        if source.format == "parquet":
            inferred.add_arrow(part.table.schema)
            continue
        for record in part.table.slice(0, INFER_ROWS).to_pylist():
            inferred.add_text({k: "" if v is None else v for k, v in record.items()})
    hints = dict(flow.schema_hints)
    if source.timestamp_column:
        hints.setdefault(source.timestamp_column, "timestamp")
    typed = with_hints(inferred.columns(), hints)
    return {name: typed[name] for name in names}


def _source_schema(
    lake: Lake, flow: ChangeFlow, source: DmsSource, rows: Sequence[DmsRows]
) -> SchemaVersion:
    """The schema version this batch is applied with, after `schema_mode` had its say.

    Raises SchemaEvolved or UnknownColumns (before anything of the batch is written) when the
    mode stops the batch.
    """
    seen: dict[str, str] = {}
    for part in rows:
        for name in part.table.column_names:
            if name != OP_COLUMN and name not in flow.except_column_list:
                seen.setdefault(name, part.file.path)
    store = SchemaStore(lake, flow.schema_source)
    current = store.current()
    if current is None:
        missing = [c for c in (*flow.keys, flow.sequence_by) if c and c not in seen]
        if missing:
            raise ValueError(
                f"{flow.target}: {', '.join(missing)} not among the source columns {list(seen)}"
            )
        names = ", ".join(PurePosixPath(p).name for p in dict.fromkeys(seen.values()))
        return store.write(_inferred(flow, source, rows, list(seen)), f"inferred from {names}")
    new = [name for name in seen if name not in current.types]
    if new and flow.schema_mode == "none":
        log.warning("%s: column(s) %s not in its schema: ignored", flow.target, ", ".join(new))
    if not new or flow.schema_mode in ("rescue", "none"):
        return current
    added, where = _inferred(flow, source, rows, new), seen[new[0]]
    stop_on_new_columns(store, current, added, where, mode=flow.schema_mode)


# --------------------------------------------------------------------------- reading changes


def _cast_one(values: pa.Array | pa.ChunkedArray, kind: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """Cast as a whole; strings to timestamps read as UTC when they carry no zone."""
    if pa.types.is_timestamp(kind) and pa.types.is_string(values.type):
        try:
            return values.cast(pa.timestamp(kind.unit)).cast(kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return values.cast(kind)
    return values.cast(kind)


def _cast_checked(
    values: pa.Array | pa.ChunkedArray, kind: pa.DataType
) -> tuple[pa.Array | pa.ChunkedArray, np.ndarray]:
    """`values` as `kind`, with the rows that could not be read (null there) marked.

    The whole column is cast at once; only when that fails is each distinct value tried, so the
    cost of a bad value is paid by the files that have one.
    """
    if values.type == kind:
        return values, np.zeros(len(values), dtype=bool)
    try:
        return _cast_one(values, kind), np.zeros(len(values), dtype=bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        pass
    bad_values = []
    for value in pc.unique(pc.drop_null(values)):
        try:
            _cast_one(pa.array([value.as_py()], values.type), kind)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            bad_values.append(value.as_py())
    bad = pc.fill_null(pc.is_in(values, pa.array(bad_values, values.type)), False)
    cleaned = pc.if_else(bad, pa.scalar(None, values.type), values)
    return _cast_one(cleaned, kind), _np_bool(bad)


def _np_bool(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow column (no nulls) as numpy."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    return np.asarray(values.to_numpy(zero_copy_only=False), dtype=bool)


def _as_text(value: object) -> object:
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


@dataclass
class _Conformed:
    changes: pa.Table
    dead_letters: pa.Table


def _conform(
    flow: ChangeFlow, part: DmsRows, schema: pa.Schema, batch_id: int, now: datetime
) -> _Conformed:
    """One file's rows in the table's schema, with their position and delete flag; the rows
    that cannot be applied as dead letters."""
    table, n, path = part.table, part.table.num_rows, part.file.path
    reasons: dict[int, str] = {}  # row -> the first reason it cannot be applied

    def reject(mask: np.ndarray, why: Callable[[int], str]) -> None:
        for i in np.flatnonzero(mask).tolist():
            reasons.setdefault(i, why(i))

    def unreadable(name: str, raw: pa.ChunkedArray, kind: pa.DataType) -> Callable[[int], str]:
        return lambda i: f"{name}: cannot read {raw[i].as_py()!r} as {kind}"

    def fixed(message: str) -> Callable[[int], str]:
        return lambda i: message

    if OP_COLUMN in table.column_names:
        op = table[OP_COLUMN]
        valid = _np_bool(pc.fill_null(pc.is_in(op, pa.array(OPS)), False))
        reject(~valid, lambda i: f"bad Op {op[i].as_py()!r}: expected I, U or D")
    columns: dict[str, pa.ChunkedArray | pa.Array] = {}
    rescued: dict[str, tuple[pa.ChunkedArray, np.ndarray]] = {}
    strict = {*flow.keys, flow.sequence_by}
    for spec in schema:
        if spec.name not in table.column_names:
            columns[spec.name] = pa.nulls(n, spec.type)
            continue
        raw = table[spec.name]
        values, bad = _cast_checked(raw, spec.type)
        columns[spec.name] = values
        if not bad.any():
            continue
        if flow.schema_mode == "rescue" and spec.name not in strict:
            rescued[spec.name] = (raw, bad)
        else:
            reject(bad, unreadable(spec.name, raw, spec.type))
    required = [(key, "key") for key in flow.keys]
    required += [(flow.sequence_by, "sequence value")] if flow.sequence_by else []
    for name, what in required:
        reject(_np_bool(pc.is_null(columns[name])), fixed(f"missing {what} {name}"))
    if flow.schema_mode == "rescue":
        for name in table.column_names:
            if (
                name != OP_COLUMN
                and name not in schema.names
                and name not in flow.except_column_list
            ):
                present = _np_bool(pc.is_valid(table[name]))
                rescued[name] = (table[name], present)
        columns[RESCUED_DATA] = _rescued_json(rescued, n, path)

    delete_column, delete_values = _deletes(flow.apply_as_deletes)
    if delete_column in table.column_names:
        deletes = pc.fill_null(pc.is_in(table[delete_column], pa.array(delete_values)), False)
    else:
        deletes = pa.array(np.zeros(n, dtype=bool))
    lines = part.lines
    position = pc.binary_join_element_wise(
        pa.array([part.file.order_key] * n, pa.string()),
        pc.utf8_lpad(lines.cast(pa.string()), 12, "0"),
        ":",
    )
    changes = pa.table({**columns, POSITION: position, _DELETE: deletes})
    good = np.ones(n, dtype=bool)
    good[list(reasons)] = False
    bad_rows = np.array(sorted(reasons), dtype=np.int64)
    payloads = [
        json.dumps({k: _as_text(v) for k, v in row.items()})
        for row in table.take(bad_rows).to_pylist()
    ]
    dead = pa.table(
        {
            "target": [flow.target] * len(bad_rows),
            "batch_id": [batch_id] * len(bad_rows),
            "file": [path] * len(bad_rows),
            "line": lines.take(pa.array(bad_rows, pa.int64())),
            "reason": [reasons[i] for i in bad_rows.tolist()],
            "payload": payloads,
            "recorded_at": [now] * len(bad_rows),
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
    invalid = pa.table(
        {
            "target": [flow.target] * len(part.invalid),
            "batch_id": [batch_id] * len(part.invalid),
            "file": [path] * len(part.invalid),
            "line": [line for line, _, _ in part.invalid],
            "reason": [f"unreadable CSV line: {why}" for _, _, why in part.invalid],
            "payload": [json.dumps(text) for _, text, _ in part.invalid],
            "recorded_at": [now] * len(part.invalid),
        },
        schema=DEAD_LETTERS_SCHEMA,
    )
    return _Conformed(
        changes.filter(pa.array(good)), pa.concat_tables([invalid, dead]).sort_by("line")
    )


def _rescued_json(
    rescued: Mapping[str, tuple[pa.ChunkedArray, np.ndarray]], n: int, path: str
) -> pa.Array:
    """`_rescued_data`: per row, the values nothing else could hold, as JSON with the file."""
    out: list[str | None] = [None] * n
    if not rescued:
        return pa.array(out, pa.string())
    any_row = np.zeros(n, dtype=bool)
    for _, mask in rescued.values():
        any_row |= mask
    picked = {name: values.to_pylist() for name, (values, _) in rescued.items()}
    for i in np.flatnonzero(any_row):
        entry = {name: _as_text(picked[name][i]) for name, (_, mask) in rescued.items() if mask[i]}
        out[i] = json.dumps({**entry, FILE_PATH_KEY: path})
    return pa.array(out, pa.string())


# --------------------------------------------------------------------------- apply


def _latest(table: pa.Table, by: Sequence[str], order: Sequence[str]) -> pa.Table:
    """The last row of each `by` group, rows ordered by `order` (then as they come)."""
    ranked = table.sort_by([(c, "ascending") for c in (*by, *order)])
    ranked = ranked.append_column("_rank", pa.array(np.arange(ranked.num_rows), pa.int64()))
    last = ranked.group_by(list(by), use_threads=False).aggregate([("_rank", "max")])
    return ranked.take(last["_rank_max"].combine_chunks().sort()).drop_columns(["_rank"])


def _newer(left: pa.Table, right_seq: str | None, right_pos: str, seq: str | None) -> pa.Array:
    """Whether each row of `left` is newer than or as new as the (seq, position) beside it."""
    pos_ok = pc.greater_equal(left[POSITION], left[right_pos])
    if seq is None or right_seq is None:
        return pc.fill_null(pos_ok, True)
    later = pc.greater(left[seq], left[right_seq])
    same = pc.equal(left[seq], left[right_seq])
    return pc.fill_null(pc.or_(later, pc.and_(same, pos_ok)), True)


def _rows_for_keys(
    lake: Lake,
    name: str,
    keys_of: pa.Table,
    keys: Sequence[str],
    extra: pc.Expression | None = None,
) -> pa.Table:
    """Stored rows of `name` whose key is among `keys_of`'s (and that match `extra`)."""
    wanted = pc.field(keys[0]).isin(pc.unique(keys_of[keys[0]]))
    rows = lake.read(name, filter=wanted if extra is None else wanted & extra)
    rows = rows.cast(pa.schema([f.with_type(_plain(f.type)) for f in rows.schema]))
    if len(keys) > 1:
        distinct = keys_of.select(list(keys)).group_by(list(keys)).aggregate([])
        rows = rows.join(distinct, list(keys), join_type="left semi")
    return rows


def _fill(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with exactly `schema`'s columns: a column added to the source since it was
    written reads as nulls."""
    n = table.num_rows
    return pa.table(
        {
            f.name: table[f.name].cast(f.type)
            if f.name in table.column_names
            else pa.nulls(n, f.type)
            for f in schema
        },
        schema=schema,
    )


def _merge(
    lake: Lake,
    name: str,
    source: pa.Table,
    *,
    on: Sequence[str],
    flow: ChangeFlow,
    batch_id: int,
    flag: str | None,
    newer: str | None,
    create: bool,
) -> dict[str, int] | None:
    """MERGE `source` into `name` once per batch: rows flagged `flag` delete their match, the
    others update it (when `newer` holds) or are inserted. None when the table already had it."""
    done = lake.transaction_version(name, flow.app_id)
    if done is not None and done > batch_id:
        raise RuntimeError(
            f"{name} already holds batch {done} of {flow.app_id}, planned after this batch "
            f"({batch_id}): another process applies changes to {flow.target} at the same time; "
            "run one at a time (this batch's files are planned again by the next run)"
        )
    if done == batch_id:
        return None
    columns = [c for c in source.column_names if c != flag]
    table = lake.table(name)
    if table is None:
        rows = source if flag is None else source.filter(pc.invert(source[flag]))
        if rows.num_rows == 0 and not create:
            return {}
        lake.create_dir(name)
        commit = _commit(flow.app_id, batch_id)
        write_deltalake(lake.uri(name), rows.select(columns), commit_properties=commit)
        return {"num_target_rows_inserted": rows.num_rows}
    if source.num_rows == 0:
        return {}
    updates = {c: f"s.{_q(c)}" for c in columns}
    keep = f"NOT s.{_q(flag)}" if flag else None
    merger = table.merge(
        source=source,
        predicate=" AND ".join(f"t.{_q(k)} = s.{_q(k)}" for k in on),
        source_alias="s",
        target_alias="t",
        merge_schema=True,
        commit_properties=_commit(flow.app_id, batch_id),
    )
    if flag:
        merger = merger.when_matched_delete(" AND ".join(filter(None, [f"s.{_q(flag)}", newer])))
    update_when = " AND ".join(filter(None, [keep, newer])) or None
    merger = merger.when_matched_update(updates, predicate=update_when)
    metrics: dict[str, int] = merger.when_not_matched_insert(updates, predicate=keep).execute()
    return metrics


def _newer_sql(seq: str | None) -> str:
    """The MERGE condition "the change is at least as new as the stored row"."""
    pos = f"s.{_q(POSITION)} >= t.{_q(POSITION)}"
    if seq is None:
        return f"({pos})"
    s, t = f"s.{_q(seq)}", f"t.{_q(seq)}"
    return f"({t} IS NULL OR {s} > {t} OR ({s} = {t} AND {pos}))"


Hook = Callable[[str], None]


def _apply_scd1(
    lake: Lake, flow: ChangeFlow, changes: pa.Table, batch_id: int, hook: Hook
) -> dict[str, int] | None:
    """The newest change per key MERGEd into the current table, never back in time."""
    seq = flow.sequence_by
    order = [c for c in (seq, POSITION) if c]
    latest = _latest(changes, flow.keys, order)
    if lake.exists(flow.tombstones) and latest.num_rows:
        known = _rows_for_keys(lake, flow.tombstones, latest, flow.keys)
        renamed = known.rename_columns([*flow.keys, *(f"_t{c}" for c in order)])
        joined = latest.join(renamed, list(flow.keys), join_type="left outer")
        fresh = _newer(joined, f"_t{seq}" if seq else None, f"_t{POSITION}", seq)
        latest = joined.filter(pc.or_(joined[_DELETE], fresh)).select(latest.column_names)
    deletes = latest.filter(latest[_DELETE]).select([*flow.keys, *order])
    newer = _newer_sql(seq)
    _merge(lake, flow.tombstones, deletes, on=flow.keys, flow=flow, batch_id=batch_id,
           flag=None, newer=newer, create=False)  # fmt: skip
    hook(flow.tombstones)
    metrics = _merge(lake, flow.target, latest, on=flow.keys, flow=flow, batch_id=batch_id,
                     flag=_DELETE, newer=newer, create=True)  # fmt: skip
    hook(flow.target)
    return metrics


def _distinct(a: pa.ChunkedArray, b: pa.ChunkedArray) -> pa.Array:
    """Elementwise "differs", a null equal only to a null."""
    nulls_differ = pc.xor(pc.is_null(a), pc.is_null(b))
    return pc.or_(nulls_differ, pc.fill_null(pc.not_equal(a, b), False))


def _history(events: pa.Table, keys: Sequence[str], columns: Sequence[str]) -> pa.Table:
    """Versions from change events sorted by key then sequence: each upsert is valid from its
    sequence until the key's next event (an update or a delete); the last open one is current."""
    n = events.num_rows
    same_key = np.ones(max(n - 1, 0), dtype=bool)
    for key in keys:
        column = events[key]
        same_key &= pc.fill_null(pc.equal(column[1:], column[:-1]), False).to_numpy(
            zero_copy_only=False
        )
    seqs = events[_SEQ].combine_chunks()
    following = pa.concat_arrays([seqs.slice(1), pa.nulls(1, seqs.type)]).slice(0, n)
    valid_to = pc.if_else(pa.array(np.append(same_key, False)[:n]), following, None)
    versions = events.append_column(VALID_TO, valid_to)
    versions = versions.filter(pc.invert(versions[_DELETE]))
    return pa.table(
        {
            **{c: versions[c] for c in columns},
            VALID_FROM: versions[_SEQ],
            VALID_TO: versions[VALID_TO],
            IS_CURRENT: pc.is_null(versions[VALID_TO]),
            POSITION: versions[POSITION],
        }
    )


def _apply_scd2(
    lake: Lake, flow: ChangeFlow, changes: pa.Table, batch_id: int, hook: Hook
) -> dict[str, int] | None:
    """Rebuild the affected tail of each changed key's history and MERGE the differences."""
    keys, seq = list(flow.keys), flow.sequence_by or POSITION
    columns = [c for c in changes.column_names if c not in (POSITION, _DELETE)]
    changes = changes.append_column(_SEQ, changes[seq])
    changes = _latest(changes, [*keys, _SEQ], [POSITION])
    stored = None
    if lake.exists(flow.target) and changes.num_rows:
        start = pc.min(changes[_SEQ])
        tail = pc.field(VALID_TO).is_null() | (pc.field(VALID_TO) >= start)
        stored = _rows_for_keys(lake, flow.target, changes, keys, tail)
    events = changes.select([*columns, POSITION, _DELETE, _SEQ])
    if stored is not None and stored.num_rows:
        kinds = events.schema
        stored = _fill(
            stored,
            pa.schema(
                [
                    *(kinds.field(c) for c in columns),
                    pa.field(VALID_FROM, kinds.field(_SEQ).type),
                    pa.field(VALID_TO, kinds.field(_SEQ).type),
                    pa.field(IS_CURRENT, pa.bool_()),
                    pa.field(POSITION, pa.string()),
                ]
            ),
        )
        upserts = (
            stored.select([*columns, POSITION])
            .append_column(_DELETE, pa.array(np.zeros(stored.num_rows, dtype=bool)))
            .append_column(_SEQ, stored[VALID_FROM])
        )
        # A closed version no other version starts at was closed by a delete: replay it too.
        starts = stored.select([*keys, VALID_FROM]).rename_columns([*keys, VALID_TO])
        closed = stored.filter(pc.is_valid(stored[VALID_TO])).select([*keys, VALID_TO])
        deleted = closed.join(starts, [*keys, VALID_TO], join_type="left anti")
        n = deleted.num_rows
        tombstones = pa.table(
            {
                **{c: deleted[c] if c in keys else pa.nulls(n, events.schema.field(c).type)
                   for c in columns},
                POSITION: deleted[VALID_TO] if seq == POSITION else pa.array([""] * n, pa.string()),
                _DELETE: pa.array(np.ones(n, dtype=bool)),
                _SEQ: deleted[VALID_TO],
            }
        )  # fmt: skip
        events = pa.concat_tables(
            [upserts.cast(events.schema), tombstones.cast(events.schema), events]
        )
        events = _latest(events, [*keys, _SEQ], [POSITION])
    events = events.sort_by([(c, "ascending") for c in (*keys, _SEQ)])
    rebuilt = _history(events, keys, columns)
    source = rebuilt.append_column(_REMOVE, pa.array(np.zeros(rebuilt.num_rows, dtype=bool)))
    if stored is not None and stored.num_rows:
        on = [*keys, VALID_FROM]
        before = (
            stored.select([*on, VALID_TO, POSITION])
            .rename_columns([*on, "_old_to", "_old_pos"])
            .append_column("_old", pa.array(np.ones(stored.num_rows, dtype=bool)))
        )
        joined = source.join(before, on, join_type="left outer")
        changed = pc.or_(
            pc.is_null(joined["_old"]),
            pc.or_(
                _distinct(joined[VALID_TO], joined["_old_to"]),
                _distinct(joined[POSITION], joined["_old_pos"]),
            ),
        )
        source = joined.filter(changed).select(source.column_names)
        gone = stored.join(rebuilt.select(on), on, join_type="left anti")
        gone = gone.append_column(_REMOVE, pa.array(np.ones(gone.num_rows, dtype=bool)))
        source = pa.concat_tables([source, gone.select(source.column_names).cast(source.schema)])
    metrics = _merge(lake, flow.target, source, on=[*keys, VALID_FROM], flow=flow,
                     batch_id=batch_id, flag=_REMOVE, newer=None, create=True)  # fmt: skip
    hook(flow.target)
    return metrics


def _micros(ns: int | None) -> int | None:
    return None if ns is None else ns // 1000


Batch = tuple[int | None, list[DmsFile]]  # (the planned batch id to resume, or None; files)


def _plan(lake: Lake, source: DmsSource, flow: ChangeFlow, max_files: int | None) -> list[Batch]:
    """The batches to apply now: first the one a crash left planned but not applied, then the
    new files. Read once per call: files landing meanwhile wait for the next call, and no
    batch pays for rereading the bookkeeping.

    A planned batch older than the last applied one can only be left by a concurrent writer
    (`_merge` stops it): its files are planned again, as new.
    """
    planned = lake.read(FILES_TABLE, filter=pc.field("target") == flow.target, schema=FILES_SCHEMA)
    applied = lake.read(
        BATCHES_TABLE, columns=["batch_id"], filter=pc.field("target") == flow.target,
        schema=BATCHES_SCHEMA,
    )["batch_id"]  # fmt: skip
    last_applied = pc.max(applied).as_py() if len(applied) else -1
    unapplied = pc.invert(pc.is_in(planned["batch_id"], applied))
    batches: list[Batch] = []
    resume = planned.filter(pc.and_(unapplied, pc.greater(planned["batch_id"], last_applied)))
    if resume.num_rows:
        last = int(pc.max(resume["batch_id"]).as_py())
        rows = resume.filter(pc.equal(resume["batch_id"], last)).sort_by("order_key")
        batches.append((last, [source.file(p) for p in rows["path"].to_pylist()]))
    taken = planned.filter(pc.invert(unapplied))["path"].to_pylist()
    done = {*taken, *(f.path for _, files in batches for f in files)}
    new = [f for f in source.list_files() if f.path not in done]
    size = max_files or max(len(new), 1)
    batches += [(None, new[i : i + size]) for i in range(0, len(new), size)]
    return batches


def _apply_batch(
    lake: Lake,
    source: DmsSource,
    flow: ChangeFlow,
    batch: Batch,
    after_write: AfterWrite | None,
) -> BatchReport:
    """Apply one batch of files: plan it, dead letters, the target (tombstones first), commit."""
    planned_id, files = batch
    resumed = planned_id is not None
    batch_id = next_batch_id(lake) if planned_id is None else planned_id
    hook: Hook = after_write or (lambda name: None)
    rows = [source.read(f) for f in files]
    version = _source_schema(lake, flow, source, rows)
    schema = arrow_schema(version)
    now = datetime.now(UTC)
    parts = [_conform(flow, part, schema, batch_id, now) for part in rows]
    changes = pa.concat_tables([p.changes for p in parts], promote_options="permissive")
    dead = pa.concat_tables([p.dead_letters for p in parts])
    plan_rows = pa.table(
        {
            "target": [flow.target] * len(files),
            "batch_id": [batch_id] * len(files),
            "path": [f.path for f in files],
            "order_key": [f.order_key for f in files],
            "size": [f.size for f in files],
            "modified": pa.array([_micros(f.modified_ns) for f in files], pa.int64()).cast(
                TIMESTAMP
            ),
            "rows": [r.table.num_rows for r in rows],
            "planned_at": [now] * len(files),
        },
        schema=FILES_SCHEMA,
    )
    lake.append(FILES_TABLE, plan_rows, flow.app_id, batch_id)
    hook(FILES_TABLE)
    if dead.num_rows:
        lake.append(DEAD_LETTERS_TABLE, dead, flow.app_id, batch_id)
    hook(DEAD_LETTERS_TABLE)
    apply = _apply_scd1 if flow.stored_as_scd_type == 1 else _apply_scd2
    metrics = apply(lake, flow, changes, batch_id, hook) or {}
    report = BatchReport(
        batch_id=batch_id,
        files=tuple(f.path for f in files),
        changes=changes.num_rows,
        dead_letters=dead.num_rows,
        inserted=int(metrics.get("num_target_rows_inserted", 0)),
        updated=int(metrics.get("num_target_rows_updated", 0)),
        deleted=int(metrics.get("num_target_rows_deleted", 0)),
        resumed=resumed,
    )
    commit = {
        "target": [flow.target],
        "batch_id": [batch_id],
        "files": [len(files)],
        "changes": [report.changes],
        "dead_letters": [report.dead_letters],
        "inserted": [report.inserted],
        "updated": [report.updated],
        "deleted": [report.deleted],
        "target_version": [lake.version(flow.target)],
        "schema_version": [version.version],
        "committed_at": [datetime.now(UTC)],
    }
    lake.append(BATCHES_TABLE, pa.table(commit, schema=BATCHES_SCHEMA), flow.app_id, batch_id)
    hook(BATCHES_TABLE)
    return report


def apply_changes(
    lake: Lake,
    source: DmsSource,
    target: str,
    *,
    keys: Sequence[str],
    sequence_by: str | None = None,
    apply_as_deletes: str = "Op = 'D'",
    stored_as_scd_type: ScdType = 1,
    except_column_list: Sequence[str] = (),
    schema_mode: SchemaMode = "addNewColumns",
    schema_hints: Mapping[str, str] | str | pa.Schema | None = None,
    max_files_per_batch: int | None = None,
    after_write: AfterWrite | None = None,
) -> CdcReport:
    """Apply every DMS file of `source` not applied yet to the Delta table `target`, in batches.

    `keys` identify a row; `sequence_by` orders changes to a key (default: the source's DMS
    timestamp column, else file and line order); `apply_as_deletes` says which changes are
    deletes; `stored_as_scd_type` 1 keeps current rows, 2 their history. `schema_hints` fix
    column types (`"amount double, ts timestamp"`, a mapping, or an Arrow schema). At most
    `max_files_per_batch` files go in one batch. `after_write(table)` runs after each table
    write (crash tests). Raises `schema_evolution.SchemaChangeError` when `schema_mode` stops a
    batch; the batches before it stay applied.
    """
    hints = (
        {field.name: arrow_type(field.type) for field in schema_hints}
        if isinstance(schema_hints, pa.Schema)
        else parse_hints(schema_hints)
    )
    flow = ChangeFlow(
        target=target,
        keys=tuple(keys),
        sequence_by=sequence_by or source.timestamp_column,
        apply_as_deletes=apply_as_deletes,
        stored_as_scd_type=stored_as_scd_type,
        except_column_list=tuple(except_column_list),
        schema_mode=schema_mode,
        schema_hints=hints,
    )
    batches = [
        _apply_batch(lake, source, flow, batch, after_write)
        for batch in _plan(lake, source, flow, max_files_per_batch)
    ]
    return CdcReport(target=target, batches=tuple(batches), version=lake.version(target))
