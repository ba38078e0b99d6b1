"""Files landing in a folder (or an `s3://` prefix) as a runner source, exactly once.

What Databricks Auto Loader gives, on the runner's own guarantees. The runner plans every batch
as a sequence range in the lake before writing anything and replays an unfinished batch by
reading the same range again; this source only has to make "the same range" mean the same
records forever:

- Each file found is appended to the lake's `_file_log` table (path, size, modification time,
  format) with a discovery index, in (modification time, path) order, before any record of it
  is returned, so before any is planned. Indices never change, so a range is stable.
- A record's sequence number is `file index` and `row` (line number for JSON lines and CSV, row
  number for Parquet), 10 zero-padded digits each: string order is numeric order, and a dead
  letter's `sequence_number` says the line (its `shard_id` is the file's path).
- One shard (`files`): a batch is read from its position on, file after file; a listing only
  logs files not in the log, so a known file is never read again. A file overwritten in place
  (same path, other size or modification time) is logged as ignored, or, with
  `allow_overwrites`, as a new file with a new index. Files must be written whole (write to a
  name starting with `.` or `_`, which are never listed, then rename): a logged file that has
  changed when its rows are read stops the read (`FileChangedError`) rather than give a replay
  other records.
- When a file's rows are first read, its row count is logged too (before the plan): a later
  read skips a file it finished without opening it, and `file_batches` says exactly which
  planned batch read which file.

Each record's data is the JSON payload the job parses: a JSON line as it is (a malformed one
reaches the parser and is dead-lettered with its file and line), or rewritten when the schema
(`streamguard.schema_evolution`: inferred, hinted, versioned in the lake, four modes) moved a
value into `_rescued_data`; a CSV or Parquet row serialised with the schema's types.
"""

from __future__ import annotations

import bisect
import csv
import io
import json
import logging
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path, PurePosixPath
from typing import Any, Literal, cast

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from models.protocols import BatchContext
from streamguard.checkpoint import CHECKPOINT_SCHEMA, CHECKPOINT_TABLE, Checkpoints
from streamguard.kinesis import StreamRecord
from streamguard.lake import Lake
from streamguard.schema_evolution import (
    RESCUED_DATA,
    SCHEMA_MODES,
    ColumnType,
    Conformer,
    Inference,
    SchemaMode,
    SchemaStore,
    SchemaVersion,
    describe,
    dumps,
    json_value,
    parse_hints,
    stop_on_new_columns,
    with_hints,
)

log = logging.getLogger(__name__)

FileFormat = Literal["json", "csv", "parquet"]

FILES_SHARD = "files"  # the runner's one shard of a file source
FILE_LOG = "_file_log"
ROW_DIGITS = 10  # a sequence number is file index and row, this many digits each
_ROWS_PER_FILE = 10**ROW_DIGITS
_MICROSECOND = timedelta(microseconds=1)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

FILE_LOG_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),  # the folder or prefix (`source_id`)
        # discovered | overwritten (read again as a new file) | ignored (overwritten, not read)
        # | counted (its rows were read: how many, and the last row number)
        pa.field("event", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("size", pa.int64()),
        pa.field("modification_time", pa.timestamp("us", tz="UTC")),
        pa.field("file_index", pa.int64()),  # the discovery index; null when ignored
        pa.field("format", pa.string()),
        pa.field("rows", pa.int64()),
        pa.field("last_row", pa.int64()),
        pa.field("log_write", pa.int64(), nullable=False),  # also the app transaction version
        pa.field("at", pa.timestamp("us", tz="UTC")),
    ]
)

EXTENSIONS: dict[str, FileFormat] = {
    ".json": "json",
    ".jsonl": "json",
    ".ndjson": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


class FileChangedError(RuntimeError):
    """A logged file is not what was logged any more (rewritten or deleted before being read)."""


def sequence_number(file_index: int, row: int) -> str:
    """(file index, row) as one sequence number: zero-padded, so string order is numeric."""
    return f"{file_index:0{ROW_DIGITS}d}{row:0{ROW_DIGITS}d}"


def position(sequence: str) -> tuple[int, int]:
    """A sequence number back to (file index, row)."""
    file_index, row = divmod(int(sequence), _ROWS_PER_FILE)
    return file_index, row


def source_id(root: str | Path) -> str:
    """How a folder or prefix is named in the lake: an absolute path, or the URI itself."""
    text = str(root)
    if "://" in text:
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


@dataclass(frozen=True)
class LoggedFile:
    """A file as the log holds it."""

    index: int
    path: str
    size: int
    modification_time: datetime
    format: FileFormat

    @property
    def mtime_us(self) -> int:
        return _micros(self.modification_time)


def _micros(moment: datetime) -> int:
    """Microseconds since the epoch, exactly (what the log keeps of a modification time)."""
    return (moment - _EPOCH) // _MICROSECOND


@dataclass(frozen=True)
class _Rows:
    """A file's records: row numbers (ascending) and payloads."""

    numbers: list[int]
    payloads: list[bytes]

    @property
    def count(self) -> tuple[int, int]:
        """(records, the last row number; 0 when none): what the log keeps of a file read."""
        return len(self.numbers), self.numbers[-1] if self.numbers else 0


class FileSource:
    """The files under `root` as the runner's `Source` (see the module docstring).

    `format` None takes each file by its extension (others are not listed). Schema: inferred
    from the first `infer_files` files (`infer_rows` records each) with `schema_hints` on top
    (`{"amount": "double"}` or `"amount double, ..."`); `schema_mode` as Auto Loader's
    `schemaEvolutionMode`. Rate limits per batch, on top of the runner's record bound: files
    begun (`max_files_per_batch`), their bytes (`max_bytes_per_batch`; a batch takes one file
    at least). Change a limit after a clean stop only: a batch planned before is replayed with
    the limits in force, and fails loudly if they now give it fewer records.

    `root` may be a URI (`s3://bucket/prefix`: pyarrow's filesystem for it, credentials from
    the AWS chain); `filesystem` gives another pyarrow filesystem for it (an endpoint of one's
    own, or an in-memory one in tests). Paths in the lake keep the URI.

    One writer per source and lake (as one scoring run per stream): the log is read once and
    then kept in memory, read again when the table has a version this source did not write.
    """

    def __init__(
        self,
        root: str | Path,
        lake: Lake,
        format: FileFormat | None = None,
        *,
        schema_mode: SchemaMode = "addNewColumns",
        schema_hints: Mapping[str, str] | str | None = None,
        rescued_data_column: str = RESCUED_DATA,
        max_files_per_batch: int | None = None,
        max_bytes_per_batch: int | None = None,
        allow_overwrites: bool = False,
        infer_files: int = 10,
        infer_rows: int = 10_000,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        for name, value in (
            ("max_files_per_batch", max_files_per_batch),
            ("max_bytes_per_batch", max_bytes_per_batch),
            ("infer_files", infer_files),
            ("infer_rows", infer_rows),
        ):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if schema_mode not in SCHEMA_MODES:
            raise ValueError(f"unknown schema mode {schema_mode!r} ({', '.join(SCHEMA_MODES)})")
        if format is not None and format not in EXTENSIONS.values():
            raise ValueError(f"unknown file format {format!r} (json, csv or parquet)")
        self.source = source_id(root)
        self.lake = lake
        self.format = format
        self.schema_mode = schema_mode
        self.schema_hints = parse_hints(schema_hints)
        self.rescued_data_column = rescued_data_column
        self.max_files_per_batch = max_files_per_batch
        self.max_bytes_per_batch = max_bytes_per_batch
        self.allow_overwrites = allow_overwrites
        self.infer_files = infer_files
        self.infer_rows = infer_rows
        # Paths in the lake keep the URI's scheme; the filesystem is given them without it.
        scheme, _, inside = self.source.rpartition("://")
        self._scheme = f"{scheme}://" if scheme else ""
        if filesystem is not None:
            self._fs, self._base = filesystem, inside
        elif scheme:
            self._fs, self._base = pafs.FileSystem.from_uri(self.source)
        else:
            self._fs, self._base = pafs.LocalFileSystem(), self.source
        self.schemas = SchemaStore(lake, self.source)
        # The log as last read or written: files by index; per path, (size, mtime in µs) of
        # its last version logged for reading and of its last version ignored; row counts by
        # index; the last log write and the Delta version of the table then.
        self._files: list[LoggedFile] = []
        self._stamps: dict[str, tuple[int, int]] = {}
        self._ignored: dict[str, tuple[int, int]] = {}
        self._counts: dict[int, tuple[int, int]] = {}
        self._writes = 0
        self._log_seen: int | None = None
        self._cache: OrderedDict[tuple[int, int], _Rows] = OrderedDict()

    def __repr__(self) -> str:
        return f"FileSource({self.source!r}, format={self.format!r}, mode={self.schema_mode!r})"

    # -- Source

    def shards(self) -> list[str]:
        """One shard: files are read in discovery order, never in parallel streams."""
        return [FILES_SHARD]

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        """Records with after < sequence number ≤ until, in order, within the batch limits.

        Lists the folder first unless `until` lies within files already logged (a replay).
        """
        if shard != FILES_SHARD:
            raise ValueError(f"{self.source} has one shard, {FILES_SHARD!r}, not {shard!r}")
        start_file, start_row = position(after) if after else (0, 0)
        end = position(until) if until else None
        if max_records <= 0 or (end is not None and end <= (start_file, start_row)):
            return []
        self._load_log()
        if end is None or end[0] >= len(self._files):
            self.discover()
        schema = self.schema()
        if schema is None:
            return []
        counted: list[tuple[LoggedFile, _Rows]] = []
        out: list[StreamRecord] = []
        files_taken = bytes_taken = 0
        index = start_file
        while index < len(self._files) and len(out) < max_records:
            if end is not None and index > end[0]:
                break
            entry = self._files[index]
            low = start_row if index == start_file else 0
            count = self._counts.get(index)
            if count is not None and (count[0] == 0 or count[1] <= low):
                index += 1  # finished (or empty): no need to open it
                continue
            if files_taken and self._over_limits(files_taken, bytes_taken + entry.size):
                break
            rows = self._rows(entry, schema)
            if count is None:
                counted.append((entry, rows))
            first = bisect.bisect_right(rows.numbers, low)
            stop = len(rows.numbers)
            if end is not None and index == end[0]:
                stop = bisect.bisect_right(rows.numbers, end[1])
            stop = min(stop, first + max_records - len(out))
            if first < stop:
                files_taken += 1
                bytes_taken += entry.size
                out.extend(
                    StreamRecord(
                        entry.path,
                        sequence_number(index, rows.numbers[k]),
                        "",
                        rows.payloads[k],
                        entry.modification_time,
                    )
                    for k in range(first, stop)
                )
            index += 1
        if counted:
            self._log_counts(counted)
        return out

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        return None  # the lake's plans are the position; nothing outside to tell

    def _over_limits(self, files: int, size: int) -> bool:
        if self.max_files_per_batch is not None and files >= self.max_files_per_batch:
            return True
        return self.max_bytes_per_batch is not None and size > self.max_bytes_per_batch

    # -- the file log

    def _load_log(self) -> None:
        version = self.lake.version(FILE_LOG)
        if version is None or version == self._log_seen:
            return
        table = self.lake.read(
            FILE_LOG, filter=pc.field("source") == self.source, schema=FILE_LOG_SCHEMA
        )
        self._files, self._stamps, self._ignored, self._counts = [], {}, {}, {}
        self._writes = 0
        self._cache.clear()
        for r in sorted(table.to_pylist(), key=lambda r: r["log_write"]):
            self._writes = max(self._writes, r["log_write"])
            if r["event"] == "counted":
                self._counts[r["file_index"]] = (r["rows"], r["last_row"])
                continue
            entry = LoggedFile(
                -1 if r["file_index"] is None else r["file_index"],
                r["path"],
                r["size"],
                r["modification_time"],
                r["format"],
            )
            if r["event"] == "ignored":
                self._ignored[entry.path] = (entry.size, entry.mtime_us)
            else:
                self._stamps[entry.path] = (entry.size, entry.mtime_us)
                self._files.append(entry)
        self._files.sort(key=lambda f: f.index)
        if [f.index for f in self._files] != list(range(len(self._files))):
            raise RuntimeError(f"{FILE_LOG} of {self.source} has gaps in its file indices")
        self._log_seen = version

    def _append_log(self, rows: list[dict[str, Any]]) -> None:
        number = self._writes + 1
        now = datetime.now(UTC)
        for row in rows:
            row.update(source=self.source, log_write=number, at=now)
        table = pa.Table.from_pylist(rows, schema=FILE_LOG_SCHEMA)
        if not self.lake.append(FILE_LOG, table, f"{FILE_LOG}:{self.source}", number):
            raise RuntimeError(
                f"{FILE_LOG} write {number} of {self.source} is already in the lake: another "
                "process is reading the same files into it (one writer per source and lake)"
            )
        self._writes = number
        self._log_seen = self.lake.version(FILE_LOG)

    def _log_counts(self, counted: list[tuple[LoggedFile, _Rows]]) -> None:
        rows = [
            {
                "event": "counted",
                "path": entry.path,
                "file_index": entry.index,
                "rows": got.count[0],
                "last_row": got.count[1],
            }
            for entry, got in counted
        ]
        self._append_log(rows)
        for entry, got in counted:
            self._counts[entry.index] = got.count

    def list_files(self) -> list[tuple[str, int, datetime, FileFormat]]:
        """What is under the root now: (path, size, modification time, format) per data file.

        Names starting with `.` or `_` (at any depth) are not data: files being written,
        `_SUCCESS` markers, checksums.
        """
        selector = pafs.FileSelector(self._base, recursive=True, allow_not_found=True)
        found: list[tuple[str, int, datetime, FileFormat]] = []
        for info in self._fs.get_file_info(selector):
            if info.type != pafs.FileType.File:
                continue
            relative = info.path[len(self._base) :].lstrip("/")
            if any(part.startswith((".", "_")) for part in relative.split("/")):
                continue
            kind = self.format or EXTENSIONS.get(PurePosixPath(info.path).suffix.lower())
            if kind is None:
                continue
            mtime = _EPOCH + timedelta(microseconds=info.mtime_ns // 1000)
            found.append((self._scheme + info.path, int(info.size), mtime, kind))
        return found

    def discover(self) -> list[LoggedFile]:
        """List the root and log the files not in the log yet; the files logged for reading."""
        self._load_log()
        new: list[tuple[str, int, datetime, FileFormat]] = []
        rows: list[dict[str, Any]] = []
        for path, size, mtime, kind in self.list_files():
            known = self._stamps.get(path)
            stamp = (size, _micros(mtime))
            if known is None or (known != stamp and self.allow_overwrites):
                new.append((path, size, mtime, kind))
            elif known != stamp and self._ignored.get(path) != stamp:
                log.warning("%s was overwritten in place; ignored (allow_overwrites)", path)
                rows.append(
                    {"event": "ignored", "path": path, "size": size}
                    | {"modification_time": mtime, "format": kind}
                )
        new.sort(key=lambda f: (f[2], f[0]))
        added: list[LoggedFile] = []
        for path, size, mtime, kind in new:
            entry = LoggedFile(len(self._files) + len(added), path, size, mtime, kind)
            added.append(entry)
            rows.append(
                {
                    "event": "overwritten" if path in self._stamps else "discovered",
                    "path": path,
                    "size": size,
                    "modification_time": mtime,
                    "file_index": entry.index,
                    "format": kind,
                }
            )
        if rows:
            self._append_log(rows)
            for row in rows:
                stamps = self._ignored if row["event"] == "ignored" else self._stamps
                stamps[row["path"]] = (row["size"], _micros(row["modification_time"]))
            self._files.extend(added)
        return added

    def logged_files(self) -> list[LoggedFile]:
        """Every file logged for reading, by discovery index."""
        self._load_log()
        return list(self._files)

    def locate(self, sequence: str) -> tuple[str, int]:
        """(file path, row) of a record's sequence number, e.g. a dead letter's."""
        self._load_log()
        file_index, row = position(sequence)
        return self._files[file_index].path, row

    def file_batches(self, job: str) -> pa.Table:
        """Which planned batch of `job` read which file: one row per (batch, file), in order.

        From the job's plans in `_checkpoints` (the ranges the runner recorded) and the row
        counts in the log; `committed` says whether the batch has been committed yet.
        """
        self._load_log()
        filt = (
            (pc.field("job") == job)
            & (pc.field("kind") == "plan")
            & (pc.field("shard_id") == FILES_SHARD)
        )
        plans = self.lake.read(CHECKPOINT_TABLE, filter=filt, schema=CHECKPOINT_SCHEMA)
        done = Checkpoints(self.lake, job, _no_context).committed_through()
        out: list[dict[str, Any]] = []
        for plan in sorted(plans.to_pylist(), key=lambda r: r["batch_id"]):
            if not plan["n_records"] or plan["end_seq"] is None:
                continue
            first = position(plan["after_seq"]) if plan["after_seq"] else (0, 0)
            last = position(plan["end_seq"])
            for index in range(first[0], last[0] + 1):
                count = self._counts.get(index)
                if count is not None and (
                    count[0] == 0 or (index == first[0] and count[1] <= first[1])
                ):
                    continue
                entry = self._files[index]
                out.append(
                    {
                        "batch_id": plan["batch_id"],
                        "file_index": index,
                        "path": entry.path,
                        "size": entry.size,
                        "modification_time": entry.modification_time,
                        "committed": plan["batch_id"] <= done,
                    }
                )
        return pa.Table.from_pylist(out, schema=FILE_BATCHES_SCHEMA)

    # -- schema

    def schema(self) -> SchemaVersion | None:
        """The schema in force (None before there is any file to infer it from).

        Inferred and stored (version 1) at the first read with files; hints that change it
        store a new version.
        """
        current = self.schemas.current()
        if current is None:
            self._load_log()
            sample = self._files[: self.infer_files]
            if not sample:
                return None
            inferred = Inference()
            for entry in sample:
                self._infer(entry, inferred)
            columns = with_hints(inferred.columns(), self.schema_hints)
            names = ", ".join(PurePosixPath(e.path).name for e in sample)
            return self.schemas.write(columns, f"inferred from {len(sample)} file(s): {names}")
        wanted = with_hints(current.types, self.schema_hints)
        if list(wanted.items()) != list(current.columns):
            return self.schemas.write(wanted, f"schema hints: {describe(self.schema_hints)}")
        return current

    def _infer(self, entry: LoggedFile, inferred: Inference) -> None:
        data = self._open(entry)
        if entry.format == "parquet":
            inferred.add_arrow(pq.read_schema(pa.BufferReader(data)))
            return
        records = _json_records(data) if entry.format == "json" else _csv_records(data)
        n = 0
        for _, _, record in records:
            if record is None:
                continue
            if entry.format == "json":
                inferred.add_json(record)
            else:
                inferred.add_text(record)
            n += 1
            if n >= self.infer_rows:
                break

    # -- reading files

    def _open(self, entry: LoggedFile) -> bytes:
        """The file's bytes, when it still is what the log says."""
        info = self._fs.get_file_info(entry.path[len(self._scheme) :])
        if info.type != pafs.FileType.File:
            raise FileChangedError(
                f"{entry.path} (file {entry.index} of {self.source}) was deleted before all of "
                "it was read; its records cannot be read (or read again)"
            )
        if (int(info.size), info.mtime_ns // 1000) != (entry.size, entry.mtime_us):
            raise FileChangedError(
                f"{entry.path} (file {entry.index} of {self.source}) changed since it was logged "
                f"({entry.size} bytes, modified {entry.modification_time:%Y-%m-%d %H:%M:%S.%f}; "
                f"now {info.size} bytes): files must be written whole, then left alone"
            )
        with self._fs.open_input_stream(entry.path[len(self._scheme) :]) as stream:
            return cast(bytes, stream.read())

    def _rows(self, entry: LoggedFile, schema: SchemaVersion) -> _Rows:
        """The file's records under `schema` (the last few files read are kept)."""
        key = (entry.index, schema.version)
        got = self._cache.get(key)
        if got is not None:
            self._cache.move_to_end(key)
            return got
        got = self._convert(entry, schema)
        self._cache[key] = got
        while len(self._cache) > 2:
            self._cache.popitem(last=False)
        return got

    def _convert(self, entry: LoggedFile, schema: SchemaVersion) -> _Rows:
        conformer = Conformer(schema, self.schema_mode, self.rescued_data_column)
        data = self._open(entry)
        numbers: list[int] = []
        payloads: list[bytes] = []
        path = entry.path
        if entry.format == "json":
            for row, raw, record in _json_records(data):
                out = None if record is None else conformer.conform_json(record, path, row)
                numbers.append(row)
                payloads.append(raw if out is None else dumps(out))
        elif entry.format == "csv":
            for row, raw, text in _csv_records(data):
                numbers.append(row)
                payloads.append(
                    raw if text is None else dumps(conformer.conform_text(text, path, row))
                )
        else:
            table = pq.read_table(pa.BufferReader(data))
            if conformer.holds_arrow(table.schema):
                for row, record in _parquet_records(table):
                    numbers.append(row)
                    payloads.append(dumps(record))
            else:
                for row, record in _parquet_records(table):
                    out = conformer.conform_json(record, path, row)
                    numbers.append(row)
                    payloads.append(dumps(record if out is None else out))
        new = conformer.new_columns.columns()
        if new:
            self._new_columns(schema, new, f"{path} row {conformer.first_new}")
        return _Rows(numbers, payloads)

    def _new_columns(self, schema: SchemaVersion, new: dict[str, ColumnType], where: str) -> None:
        """Stop the read on columns the schema lacks; under addNewColumns, evolve it first."""
        stop_on_new_columns(self.schemas, schema, new, where, mode=self.schema_mode)


def _no_context(text: str) -> BatchContext:
    raise NotImplementedError("file_batches reads plans' ranges, never their context")


FILE_BATCHES_SCHEMA = pa.schema(
    [
        pa.field("batch_id", pa.int64()),
        pa.field("file_index", pa.int64()),
        pa.field("path", pa.string()),
        pa.field("size", pa.int64()),
        pa.field("modification_time", pa.timestamp("us", tz="UTC")),
        pa.field("committed", pa.bool_()),
    ]
)


# --------------------------------------------------------------------------- formats


def _json_records(data: bytes) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    """(line number, line, the object or None when it is not one) per non-blank line."""
    for number, line in enumerate(data.split(b"\n"), start=1):
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        yield number, line, record if isinstance(record, dict) else None


def _csv_records(data: bytes) -> Iterator[tuple[int, bytes, dict[str, str] | None]]:
    """(line where the row starts, its raw text when malformed, header -> field, or None when
    the row has another number of fields than the header) per row after the header."""
    text = data.decode("utf-8-sig", "backslashreplace")
    lines = text.split("\n")
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    done = 0  # lines the reader has consumed
    for fields in reader:
        start, done = done + 1, reader.line_num
        if not fields:
            continue  # a blank line
        if header is None:
            header = [name.strip() or f"_c{i}" for i, name in enumerate(fields)]
            continue
        if len(fields) != len(header):
            raw = "\n".join(line.rstrip("\r") for line in lines[start - 1 : done])
            yield start, raw.encode(), None
            continue
        yield start, b"", dict(zip(header, fields, strict=True))  # raw text only when malformed


def _plain(kind: pa.DataType) -> bool:
    """Arrow values that already are what JSON carries."""
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_integer(kind)
        or pa.types.is_floating(kind)
        or pa.types.is_boolean(kind)
    )


def _parquet_records(table: pa.Table) -> Iterator[tuple[int, dict[str, Any]]]:
    """(row number from 1, the row with JSON values, nulls left out) per row."""
    names = table.column_names
    columns: list[list[Any]] = []
    for field, column in zip(table.schema, table.columns, strict=True):
        values = column.to_pylist()
        if not _plain(field.type):
            values = [None if v is None else json_value(v) for v in values]
        columns.append(values)
    for i in range(table.num_rows):
        yield (
            i + 1,
            {n: col[i] for n, col in zip(names, columns, strict=True) if col[i] is not None},
        )
