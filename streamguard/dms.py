"""What AWS DMS writes to S3, read and written: full-load files, then change files, CSV or Parquet.

DMS puts each table under `<BucketFolder>/<schema>/<table>/`: full-load files named by a
hexadecimal counter (`LOAD00000009.csv`, `LOAD0000000A.csv`, ..., `LOAD00000010.csv`), then change
(CDC) files named by time (`20260301-1134010000.csv`). Change rows start with `Op` (`I`, `U`,
`D`); full-load rows carry it only with `IncludeOpForFullLoad`, and change files lack it with
`CdcInsertsOnly`. With `TimestampColumnName` a string column `yyyy-MM-dd HH:mm:ss.SSSSSS` follows
(commit time for changes, transfer time for the full load). CSV files have a header only with
`AddColumnName`; without one, the table's columns must be given.

This module knows the files and their order only; applying them to Delta is `streamguard.cdc`.
Folders are read through `pyarrow.fs`, so `s3://bucket/prefix` works as a local folder does.
"""

from __future__ import annotations

import csv
import io
import itertools
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from pyarrow import fs

DmsFormat = Literal["csv", "parquet"]
OP_COLUMN = "Op"
# How DMS writes a moment: in the timestamp column, and in CSV files for datetime columns.
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"  # Arrow's %S carries the microseconds
_LOAD = re.compile(r"^LOAD([0-9A-Fa-f]+)$")
_CDC = re.compile(r"^(\d{8}-\d{6,})$")
_EXTENSIONS = {"csv": (".csv", ".csv.gz"), "parquet": (".parquet",)}


@dataclass(frozen=True)
class DmsFile:
    """One file DMS wrote for a table, with the key that puts it in DMS's order."""

    path: str  # in the source's filesystem (no scheme)
    kind: Literal["load", "cdc"]
    order_key: str  # full-load files first by counter, then change files by time
    size: int
    modified_ns: int | None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


def order_key(name: str) -> tuple[Literal["load", "cdc"], str] | None:
    """The file's kind and sort key, from its name; None for a file DMS did not name.

    The full-load counter is hexadecimal (`LOAD00000009` < `LOAD0000000A` < `LOAD00000010`): it
    is compared as a number, not as text, and every full-load file sorts before any change file.
    """
    stem = name.split(".", 1)[0]
    load = _LOAD.match(stem)
    if load:
        return "load", f"0{int(load.group(1), 16):016x}"
    if _CDC.match(stem):
        return "cdc", f"1{stem}"
    return None


@dataclass(frozen=True)
class DmsRows:
    """One file's rows as read: every column as DMS wrote it (CSV: strings), plus line numbers."""

    file: DmsFile
    table: pa.Table
    lines: pa.Array  # int64: CSV physical line (header = 1); Parquet row number from 1
    invalid: list[tuple[int | None, str, str]] = field(default_factory=list)  # (line, text, why)


@dataclass(frozen=True)
class DmsSource:
    """Where DMS writes one table, and the endpoint settings that shape its files.

    `root` is the target's BucketFolder: a local folder or `s3://bucket/prefix`. The timestamp
    column, when DMS adds one, is read as a sequence candidate; `columns` are the table's
    columns in order, needed only for CSV written without `AddColumnName` (no header).
    """

    root: str
    schema: str
    table: str
    format: DmsFormat = "csv"
    timestamp_column: str | None = None
    csv_header: bool = True
    columns: tuple[str, ...] | None = None
    csv_delimiter: str = ","

    def __post_init__(self) -> None:
        if self.format not in _EXTENSIONS:
            raise ValueError(f"format must be csv or parquet, got {self.format!r}")
        if self.format == "csv" and not self.csv_header and not self.columns:
            raise ValueError("CSV without a header (AddColumnName=false) needs `columns`")

    def location(self) -> tuple[fs.FileSystem, str]:
        """The filesystem and the table's folder in it."""
        root = self.root
        if "://" not in root:
            root = str(Path(root).resolve())
        filesystem, base = fs.FileSystem.from_uri(root)
        return filesystem, f"{base.rstrip('/')}/{self.schema}/{self.table}"

    def list_files(self) -> list[DmsFile]:
        """The table's DMS files in apply order (hidden and foreign files skipped).

        Change files in date-partitioned sub-folders (`DatePartitionEnabled`) are found too;
        their names alone order them.
        """
        filesystem, folder = self.location()
        selector = fs.FileSelector(folder, recursive=True, allow_not_found=True)
        found: list[DmsFile] = []
        for info in filesystem.get_file_info(selector):
            name = info.base_name
            if info.type != fs.FileType.File or name.startswith((".", "_")):
                continue
            if not name.endswith(_EXTENSIONS[self.format]):
                continue
            keyed = order_key(name)
            if keyed is None:
                continue
            kind, key = keyed
            found.append(DmsFile(info.path, kind, key, int(info.size or 0), info.mtime_ns))
        return sorted(found, key=lambda f: (f.order_key, f.path))

    def file(self, path: str) -> DmsFile:
        """A file of this table named by its path (e.g. one recorded earlier), as it is now."""
        filesystem, _ = self.location()
        info = filesystem.get_file_info(path)
        keyed = order_key(info.base_name)
        if info.type != fs.FileType.File or keyed is None:
            raise FileNotFoundError(f"DMS file {path} is gone or not a DMS file")
        return DmsFile(info.path, keyed[0], keyed[1], int(info.size or 0), info.mtime_ns)

    def read(self, file: DmsFile) -> DmsRows:
        """The file's rows; a CSV line with the wrong number of fields is returned as invalid."""
        filesystem, _ = self.location()
        if self.format == "parquet":
            table = pq.read_table(file.path, filesystem=filesystem)
            lines = pa.array(np.arange(1, table.num_rows + 1), pa.int64())
            return DmsRows(file, table, lines)
        return self._read_csv(filesystem, file)

    def _read_csv(self, filesystem: fs.FileSystem, file: DmsFile) -> DmsRows:
        with filesystem.open_input_stream(file.path) as stream:
            data = stream.read()
        first = next(csv.reader(io.StringIO(data.split(b"\n", 1)[0].decode())), None)
        if first is None:
            empty = pa.table({})
            return DmsRows(file, empty, pa.array([], pa.int64()))
        if self.csv_header:
            names, skip, first_line = first, 1, 2
        else:
            names, skip, first_line = self._headerless_names(file, len(first)), 0, 1
        invalid: list[tuple[int | None, str, str]] = []

        def keep_aside(row: pcsv.InvalidRow) -> str:
            why = f"{row.actual_columns} fields where {row.expected_columns} were expected"
            invalid.append((row.number, row.text, why))
            return "skip"

        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=skip, use_threads=False),
            parse_options=pcsv.ParseOptions(
                delimiter=self.csv_delimiter, invalid_row_handler=keep_aside
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in names},
                strings_can_be_null=True,
                quoted_strings_can_be_null=False,
                null_values=[""],
            ),
        )
        # Line numbers of the rows kept: every line from the first data line, less the invalid
        # ones (one record per line: DMS output has no line breaks inside values).
        skipped = np.array(sorted(n for n, _, _ in invalid if n is not None), dtype=np.int64)
        candidates = np.arange(first_line, first_line + table.num_rows + len(invalid))
        lines = np.setdiff1d(candidates, skipped, assume_unique=True)[: table.num_rows]
        return DmsRows(file, table, pa.array(lines, pa.int64()), invalid)

    def _headerless_names(self, file: DmsFile, fields: int) -> list[str]:
        """Column names of a header-less file: Op when the row has room for it, the DMS
        timestamp column when configured, then the table's columns."""
        columns = list(self.columns or ())
        stamp = [self.timestamp_column] if self.timestamp_column else []
        if fields == len(columns) + len(stamp) + 1:
            return [OP_COLUMN, *stamp, *columns]
        if fields == len(columns) + len(stamp):
            return [*stamp, *columns]
        raise ValueError(
            f"{file.path}: {fields} fields, but the table has {len(columns)} column(s) "
            f"(+ Op{' + ' + stamp[0] if stamp else ''}); is `columns` right?"
        )


def _dms_strings(table: pa.Table) -> pa.Table:
    """Timestamps written as DMS writes them in CSV (UTC, microseconds, no zone)."""
    columns = []
    for column in table.columns:
        if pa.types.is_timestamp(column.type):
            column = pc.strftime(column.cast(pa.timestamp("us", tz="UTC")), TIMESTAMP_FORMAT)
        columns.append(column)
    return pa.table(columns, names=table.column_names)


def _write(table: pa.Table, path: Path, format: DmsFormat, header: bool) -> Path:
    """Write under a hidden name, then rename: a reader never sees half a file."""
    hidden = path.with_name(f".{path.name}.tmp")
    if format == "parquet":
        pq.write_table(table, hidden)
    else:
        options = pcsv.WriteOptions(include_header=header)
        pcsv.write_csv(_dms_strings(table), hidden, write_options=options)
    os.replace(hidden, path)
    return path


def cdc_file_name(moment: datetime) -> str:
    """The stem DMS gives a change file written at `moment`: `YYYYMMDD-HHMMSS` + 1/10,000 s."""
    moment = moment.astimezone(UTC)
    return f"{moment:%Y%m%d-%H%M%S}{moment.microsecond // 100:04d}"


def write_dms_output(
    out_dir: str | Path,
    full_load: pa.Table,
    changes: pa.Table,
    *,
    schema: str,
    table: str,
    format: DmsFormat = "csv",
    include_op_for_full_load: bool = False,
    timestamp_column: str | None = None,
    cdc_inserts_only: bool = False,
    add_column_name: bool = True,
    commit_time: str = "updated_at",
    op_column: str = "op",
    full_load_time: datetime | None = None,
    rows_per_load_file: int = 100_000,
    cdc_file_interval: timedelta = timedelta(hours=6),
) -> list[Path]:
    """Write a table's full load and changes as DMS would, in apply order; the files written.

    `changes` holds the operation in `op_column` and the commit time in `commit_time`; a change
    goes to the file of the interval its commit falls in, named after the interval's end (DMS
    writes a file per `CdcMaxBatchInterval`). The full load is split every `rows_per_load_file`
    rows. The endpoint settings are DMS's: `IncludeOpForFullLoad`, `TimestampColumnName`,
    `CdcInsertsOnly` (only inserts are written, without `Op` unless `IncludeOpForFullLoad`),
    `AddColumnName` (CSV header).
    """
    if rows_per_load_file < 1 or cdc_file_interval <= timedelta(0):
        raise ValueError("rows_per_load_file and cdc_file_interval must be positive")
    folder = Path(out_dir) / schema / table
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".csv" if format == "csv" else ".parquet"
    data_columns = [c for c in changes.column_names if c != op_column]
    load = full_load.select(data_columns)
    stamp_type = pa.timestamp("us", tz="UTC")
    when = full_load_time or datetime.now(UTC)

    def with_meta(rows: pa.Table, ops: pa.Array | None, stamps: pa.Array) -> pa.Table:
        front: dict[str, pa.Array] = {}
        if ops is not None:
            front[OP_COLUMN] = ops
        if timestamp_column:
            front[timestamp_column] = pc.strftime(stamps.cast(stamp_type), TIMESTAMP_FORMAT)
        meta = pa.table(front) if front else None
        if meta is None:
            return rows
        return pa.table(
            [*meta.columns, *rows.columns], names=[*meta.column_names, *rows.column_names]
        )

    written: list[Path] = []
    for number, start in enumerate(range(0, load.num_rows, rows_per_load_file), 1):
        part = load.slice(start, rows_per_load_file)
        ops = pa.array(["I"] * part.num_rows, pa.string()) if include_op_for_full_load else None
        stamps = pa.array([when] * part.num_rows, stamp_type)
        path = folder / f"LOAD{number:08X}{ext}"
        written.append(_write(with_meta(part, ops, stamps), path, format, add_column_name))

    if cdc_inserts_only:
        changes = changes.filter(pc.equal(changes[op_column], "I"))
    if changes.num_rows == 0:
        return written
    commits = changes[commit_time].cast(stamp_type).cast(pa.int64()).to_numpy()
    if np.any(np.diff(commits) < 0):
        raise ValueError(f"changes must be in commit order ({commit_time} ascending)")
    step = int(cdc_file_interval / timedelta(microseconds=1))
    origin = int(commits.min()) // step * step
    slot = (commits - origin) // step
    starts = np.flatnonzero(np.diff(slot, prepend=slot[0] - 1) != 0)
    bounds = [*starts.tolist(), len(slot)]
    for lo, hi in itertools.pairwise(bounds):
        part = changes.slice(lo, hi - lo)
        keep_op = not cdc_inserts_only or include_op_for_full_load
        ops = part[op_column].combine_chunks() if keep_op else None
        stamps = part[commit_time].combine_chunks()
        closes = origin + (int(slot[lo]) + 1) * step
        end = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=closes)
        path = folder / f"{cdc_file_name(end)}{ext}"
        written.append(
            _write(with_meta(part.select(data_columns), ops, stamps), path, format, add_column_name)
        )
    return written
