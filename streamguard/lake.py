"""The Delta lake layer (delta-rs): appends and upserts made idempotent by app transactions.

Every write of a micro-batch carries a Delta application transaction `(app_id, batch_id)`. A batch
replayed after a crash skips the tables that already hold it, so a rerun adds no duplicate and
misses no row, without any state outside the tables themselves.

Open tables are kept, one handle per table, and are never trusted blindly: every use first looks
for the log file of the version after the handle's (one `stat`; Delta versions are consecutive,
and a commit is the atomic creation of that file), and only then reads the new commits. A commit
made by any other writer is therefore seen by the next read or write, as with opening the table
anew, at the cost of a file lookup instead of a log refresh (which lists the whole `_delta_log`).

The lake is a local folder or an object-store URI (`s3://bucket/prefix`). On an object store
the same log files are looked up and read through delta-rs's own storage layer (one
configuration, from the same `AWS_*` variables delta-rs reads), and commits are conditional
puts; what needs a local folder (`path`, `root`) says so instead of guessing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
from deltalake import (
    ColumnProperties,
    CommitProperties,
    DeltaTable,
    PostCommitHookProperties,
    Transaction,
    WriterProperties,
    write_deltalake,
)
from deltalake.exceptions import CommitFailedError, TableNotFoundError
from deltalake.fs import DeltaStorageHandler

from streamguard.key_index import BYTES_PER_KEY, KeyIndex, key_hashes

# Delta's default distance between log checkpoints (`delta.checkpointInterval`).
CHECKPOINT_INTERVAL = 100
# The table property naming the columns whose statistics Delta keeps per file.
STATS_COLUMNS = "delta.dataSkippingStatsColumns"
# How appends encode their Parquet files: Snappy (delta-rs's default codec) without dictionary
# encoding. A micro-batch's columns are mostly unique ids and continuous values, where the
# dictionary is built, outgrows its page limit and is thrown away: it was half of the encoding
# time (features 50k rows x 47 columns: 0.11 s -> 0.05 s, transactions 0.07 s -> 0.035 s) for
# files 0-12 % smaller. Column statistics (file skipping, `max_value`) are unchanged. Snappy is
# named: WriterProperties without a codec writes uncompressed files.
APPEND_WRITER_PROPERTIES = WriterProperties(
    compression="SNAPPY",
    default_column_properties=ColumnProperties(dictionary_enabled=False),
)

# How a table kept in memory (`Lake.keep_in_memory`) is written whole: LZ4 without dictionary
# encoding. The customer state at issue 11's size (100k customers, 31 day sums each; 76 MiB in
# memory), on busy cores: 0.20-0.31 s per write against 0.40 s with delta-rs's defaults (Snappy,
# dictionaries) and 0.45-0.74 s for a MERGE of 40k changed rows; files 26 MiB instead of 15.
STATE_WRITER_PROPERTIES = WriterProperties(
    compression="LZ4_RAW",
    default_column_properties=ColumnProperties(dictionary_enabled=False),
)
# A table kept in memory is written whole when a batch changes at least this share of its rows
# (1 / OVERWRITE_SHARE), else MERGEd (which rewrites only the files holding the changed keys:
# a continuous worker's small batches against a large state).
OVERWRITE_SHARE = 10
# The most a table kept in memory may take (MiB) unless STREAMGUARD_STATE_MEMORY_MB says;
# a larger one is read and MERGEd from its files as any other.
DEFAULT_STATE_MEMORY_MB = 2048
# Memory bytes per byte of Parquet a state table takes, at most (measured: 2.9 for the LZ4 files
# written whole, 5 for the Snappy files with dictionaries a MERGE writes).
MEMORY_PER_FILE_BYTE = 5
# Table properties of a keyed table written merge-on-read (`Lake.upsert` with `latest_by`): its
# key column, and the column whose largest value names a key's current row (the batch id).
LATEST_KEY = "streamguard.latestBy.key"
LATEST_ORDER = "streamguard.latestBy.order"
# A merge-on-read table kept in memory is written whole (folded to one row per key) when its
# files would otherwise hold more than this many rows per key; until then an upsert appends
# the changed rows only. At issue 11's size (40 % of 100k customers changed per batch) two
# batches append and the third writes whole; a continuous worker's batch of 165 rows against
# 100k customers appends 165 rows (a MERGE rewrote the 27 MiB file: ~1 s) and folds every
# ~600 batches.
FOLD_ROWS_PER_KEY = 2
# The most the key indexes of one table may take (MiB; `Lake.files_holding`) unless
# STREAMGUARD_KEY_INDEX_MB says: 12 bytes a key, so 1 GiB holds ~89M keys (a day at ~1,000 tx/s).
DEFAULT_KEY_INDEX_MB = 1024
# How many lookups of a partition read its files before the key index takes it over: a process
# that scores one batch and exits (a sensor-launched run) would hash all of a partition's keys
# to answer a single lookup, where reading them with the filter costs a fifth of that (1M ids
# on a date: read 0.12 s, indexed 0.5-0.6 s; each lookup after that ~2 ms).
KEY_INDEX_AFTER_LOOKUPS = 1

log = logging.getLogger(__name__)


def state_memory_bytes() -> int:
    """The per-table memory budget of `Lake.keep_in_memory` (read when asked)."""
    return int(
        float(os.environ.get("STREAMGUARD_STATE_MEMORY_MB", DEFAULT_STATE_MEMORY_MB)) * 2**20
    )


def key_index_bytes() -> int:
    """The memory budget of one table's key indexes (read when asked)."""
    return int(float(os.environ.get("STREAMGUARD_KEY_INDEX_MB", DEFAULT_KEY_INDEX_MB)) * 2**20)


def _partition_value(value: object) -> str | None:
    """A partition value as the Delta log writes it (dates as ISO text; None for null)."""
    return None if value is None else str(value)


class RemoteLakeError(ValueError):
    """Something that needs the lake as a local folder was asked of a lake in an object store."""


def is_remote(location: str | Path) -> bool:
    """Whether a lake location is an object-store URI (`s3://...`) rather than a local folder."""
    scheme = urlsplit(str(location)).scheme
    return len(scheme) > 1 and scheme != "file"  # one letter: a Windows drive


@dataclass
class _LogView:
    """What the Lake keeps of one table's log at `version`, brought forward commit by commit.

    `maxima`: per column asked about, the statistics' maximum in each data file (None: no
    statistic); `txns`: per application id asked about, its last transaction version (None:
    none). Both answer from memory what delta-rs answers by going over the whole log. `keys`:
    per (column, partition column) asked about, the hashed keys of the files of the partitions
    asked about (`files_holding`); `too_big`: the partitions found too big to index.
    """

    version: int
    maxima: dict[str, dict[str, int | None]] = field(default_factory=dict)
    txns: dict[str, int | None] = field(default_factory=dict)
    keys: dict[tuple[str, str], KeyIndex] = field(default_factory=dict)
    too_big: set[tuple[str, str, str | None]] = field(default_factory=set)


def _merge_tail(table: pa.Table, key: str) -> pa.Table:
    """`table` with its last chunks made one while the last is at least as long as the one
    before: chunk lengths stay decreasing (a binary counter), so an upsert adds one chunk and
    the table keeps O(log n) of them, each row copied O(log n) times in all. (Copying the whole
    table every 64 upserts stalled a continuous worker's batch for 1-2.5 s at 100k customers.)"""
    lengths = [len(c) for c in table[key].chunks]
    first = len(lengths) - 1
    merged = lengths[-1] if lengths else 0
    while first >= 1 and merged >= lengths[first - 1]:
        first -= 1
        merged += lengths[first]
    if first >= len(lengths) - 1:
        return table
    start = sum(lengths[:first])
    return pa.concat_tables([table.slice(0, start), table.slice(start).combine_chunks()])


# The column naming a kept table's current rows while it is read from memory (`_Held`).
_LIVE = "__streamguard_live"


@dataclass(frozen=True)
class _Held:
    """A table kept in memory (`Lake.keep_in_memory`): its rows, of which the `live` ones are
    current. An upsert appends its rows and marks the ones they replace instead of copying all
    the others (the copy cost the table's size every batch: 46 ms for 165 rows against 100k
    customers); the rows are copied once the replaced ones outnumber the current."""

    table: pa.Table
    live: np.ndarray | None = None  # bool per row; None: every row

    @property
    def num_rows(self) -> int:
        return self.table.num_rows if self.live is None else int(self.live.sum())

    @property
    def column_names(self) -> list[str]:
        return self.table.column_names

    def current(self) -> pa.Table:
        """The current rows (a copy when some are replaced)."""
        return self.table if self.live is None else self.table.filter(pa.array(self.live))

    def dataset(self) -> tuple[ds.Dataset, pc.Expression | None]:
        """A dataset of the rows and the filter keeping the current ones (None: all are)."""
        if self.live is None:
            return ds.dataset(self.table), None
        return ds.dataset(self.table.append_column(_LIVE, pa.array(self.live))), pc.field(_LIVE)

    def upserted(self, rows: pa.Table, key: str) -> _Held:
        """These rows (one per key, the table's columns) replacing those of their keys."""
        n = self.table.num_rows
        replaced = pc.is_in(self.table[key], value_set=rows[key].combine_chunks())
        live = np.ones(n, dtype=bool) if self.live is None else self.live.copy()
        live &= ~np.asarray(replaced.to_numpy(zero_copy_only=False), dtype=bool)
        held = _Held(
            pa.concat_tables([self.table, rows]),
            np.concatenate([live, np.ones(rows.num_rows, dtype=bool)]),
        )
        assert held.live is not None
        replaced_rows = len(held.live) - int(held.live.sum())
        if replaced_rows > held.num_rows:
            return _Held(held.current().combine_chunks())
        return _Held(_merge_tail(held.table, key), held.live)


class Lake:
    """Delta tables under one folder or object-store prefix, one sub-folder per table."""

    def __init__(self, root: Path | str) -> None:
        self.remote = is_remote(root)
        # The lake's place as given: a URI (no trailing slash), or a local folder's path.
        self.location = str(root).rstrip("/") if self.remote else str(Path(root))
        self._root = None if self.remote else Path(root)
        self._store: pafs.FileSystem | None = None  # the object store, paths under location
        # False: commits never write a log checkpoint themselves (delta-rs writes one every 100th
        # version, within that commit, for every table in the same batch at once); the owner of
        # the lake takes them between batches instead (`checkpoint_due`, `checkpoint`).
        self.auto_checkpoint = True
        self._open: dict[str, DeltaTable] = {}
        self._views: dict[str, _LogView] = {}
        self._datasets: dict[str, tuple[int, ds.Dataset]] = {}
        self._checkpointed: dict[str, int] = {}  # last log checkpoint version seen per table
        self._kept: set[str] = set()  # tables to keep whole in memory (`keep_in_memory`)
        self._memory: dict[str, tuple[int, _Held]] = {}  # their content, by the version
        self._too_big: set[str] = set()  # kept tables found over the memory budget
        # One per table: its log view is followed and its key indexes used by one thread at a
        # time (a batch's appends run on threads, one table each).
        self._view_locks: dict[str, threading.RLock] = {}
        self.key_index_after_lookups = KEY_INDEX_AFTER_LOOKUPS  # see the constant

    def keep_in_memory(self, names: Iterable[str]) -> None:
        """Keep these (keyed, bounded) tables whole in memory between batches.

        A state table is read and upserted by every batch; from its files that costs more as its
        rows fill (a MERGE rewrites the files of every key it touches: at issue 11's size, 40 % of
        the customers' each batch). Kept in memory, a read is a filter of the table in hand, and
        an upsert replaces the rows there and, when it changes at least 1 / OVERWRITE_SHARE of
        them, writes the table whole (else MERGEs as before). The content is trusted only at the
        version it was read or written at: any other commit (another writer, a compaction
        elsewhere) makes the next read load it again, and an upsert whose commit would not be
        the very next version goes through MERGE.
        """
        self._kept.update(names)

    def _in_memory(self, name: str, version: int | None) -> _Held | None:
        """The whole table at its latest version, from memory or read now (None: not kept,
        another version asked, no table, or over the budget)."""
        if name not in self._kept or name in self._too_big:
            return None
        table = self.table(name)
        if table is None or (version is not None and version != table.version()):
            return None
        kept = self._fresh_memory(name, table)
        if kept is not None:
            return kept[1]
        # Judged by its files first (never read a table too big to hold), then by what it took.
        on_disk = sum(pa.table(table.get_add_actions(flatten=True))["size_bytes"].to_pylist())
        whole = None
        if on_disk * MEMORY_PER_FILE_BYTE <= state_memory_bytes():
            whole = self._dataset(name, table).to_table()
            latest = latest_by_of(table)
            if latest is not None and set(latest) <= set(whole.column_names):
                whole = latest_rows(whole, *latest)
        if whole is None or whole.nbytes > state_memory_bytes():
            log.warning(
                "%s (%d MiB of files) is over STREAMGUARD_STATE_MEMORY_MB: read from its files",
                name,
                on_disk // 2**20,
            )
            self._too_big.add(name)
            self._memory.pop(name, None)
            return None
        held = _Held(whole.combine_chunks())  # one chunk per file otherwise (`_merge_tail`)
        self._memory[name] = (table.version(), held)
        return held

    def _fresh_memory(self, name: str, table: DeltaTable) -> tuple[int, _Held] | None:
        """The memory of a kept table if it holds `table`'s version: kept at that version, or
        at an earlier one whose later commits changed no row (a compaction by another lake, the
        continuous worker's compactor: reading the table whole again would cost its size)."""
        kept = self._memory.get(name)
        if kept is None or kept[0] > table.version():
            return None
        if kept[0] < table.version():
            if not self._rows_unchanged(name, kept[0], table.version()):
                return None
            kept = self._memory[name] = (table.version(), kept[1])
        return kept

    def _rows_unchanged(
        self, name: str, since: int, until: int, ours: tuple[str, int] | None = None
    ) -> bool:
        """Whether the commits after `since` up to `until` changed no row: they only rewrote
        files (`dataChange` false) or recorded application transactions. With `ours` (an
        application transaction), the one commit recording it is ours and not judged."""
        for v in range(since + 1, until + 1):
            try:
                lines = self._read_text(self._log_file(name, v)).splitlines()
            except OSError:
                return False
            actions = [json.loads(line) for line in lines if line.strip()]
            if ours is not None and any(
                (a.get("txn") or {}).get("appId") == ours[0]
                and (a.get("txn") or {}).get("version") == ours[1]
                for a in actions
            ):
                ours = None  # only one commit is ours
                continue
            for action in actions:
                if "metaData" in action or "protocol" in action:
                    return False
                for kind in ("add", "remove"):
                    if kind in action and action[kind].get("dataChange", True) is not False:
                        return False
        return ours is None  # (ours not found among them: not ours to judge)

    @property
    def root(self) -> Path:
        """The lake's local folder (RemoteLakeError for a lake in an object store)."""
        return self.require_local("Lake.root")

    def require_local(self, what: str) -> Path:
        """The local folder, for `what` needs one; a clear error on an object-store lake."""
        if self._root is None:
            raise RemoteLakeError(
                f"{what} needs the lake in a local folder, and this lake is at {self.location}"
            )
        return self._root

    @property
    def name(self) -> str:
        """The last part of the lake's location (for thread names and messages)."""
        return self.location.rsplit("/", 1)[-1] if self.remote else Path(self.location).name

    def path(self, name: str) -> Path:
        return self.root / name

    def uri(self, name: str) -> str:
        return f"{self.location}/{name}" if self.remote else str(self.path(name))

    def create_dir(self, name: str) -> None:
        """Make the table's folder (a local lake; an object store has no folders to make)."""
        if not self.remote:
            self.path(name).mkdir(parents=True, exist_ok=True)

    def _objects(self) -> pafs.FileSystem:
        """The object store under the lake's location, through delta-rs's storage layer."""
        if self._store is None:
            self._store = pafs.PyFileSystem(DeltaStorageHandler(self.location))
        return self._store

    def _log_file(self, name: str, version: int) -> str:
        if self.remote:
            return f"{name}/_delta_log/{version:020d}.json"
        return os.path.join(self.root, name, "_delta_log", f"{version:020d}.json")

    def _file_exists(self, path: str) -> bool:
        """Whether a file (as `_log_file` names it) exists: one `stat`, or one HEAD request."""
        if not self.remote:
            return os.path.exists(path)
        return bool(self._objects().get_file_info(path).type == pafs.FileType.File)

    def _read_text(self, path: str) -> str:
        """A small file's text (as `_log_file` names it); OSError when it cannot be read."""
        if not self.remote:
            with open(path, encoding="utf-8") as file:
                return file.read()
        with self._objects().open_input_stream(path) as stream:
            return bytes(stream.read()).decode("utf-8")

    def table(self, name: str, version: int | None = None) -> DeltaTable | None:
        """The table at `version`, or its latest version (kept open; see the module doc)."""
        try:
            if version is not None:
                latest = self.table(name)
                if latest is not None and latest.version() == version:
                    return latest  # what the open table already is: no log to read again
                return DeltaTable(self.uri(name), version=version)
            table = self._open.get(name)
            if table is None:
                table = self._open[name] = DeltaTable(self.uri(name))
                return table
            current = table.version()
            if self._file_exists(self._log_file(name, current + 1)):
                table.update_incremental()  # someone (this lake or another writer) committed
            elif not self._file_exists(self._log_file(name, current)):
                # The table was removed (and perhaps made anew) under the open handle.
                self._forget(name)
                return self.table(name)
            return table
        except TableNotFoundError:
            self._forget(name)
            return None

    def _forget(self, name: str) -> None:
        """Drop all that is kept of a table (it was removed, perhaps made anew)."""
        self._open.pop(name, None)
        self._views.pop(name, None)
        self._datasets.pop(name, None)
        self._checkpointed.pop(name, None)

    def _dataset(self, name: str, table: DeltaTable) -> ds.Dataset:
        """The Arrow dataset of `table`; of the open version, made once per version (making one
        lists every data file, and most batches read tables that did not change)."""
        if self._open.get(name) is not table:
            return _arrow_dataset(table)
        kept = self._datasets.get(name)
        if kept is None or kept[0] != table.version():
            kept = self._datasets[name] = (table.version(), _arrow_dataset(table))
        return kept[1]

    def exists(self, name: str) -> bool:
        if self.remote:
            log = self._objects().get_file_info(f"{name}/_delta_log")
            return bool(log.type == pafs.FileType.Directory)
        return (self.path(name) / "_delta_log").is_dir()

    def ensure(
        self,
        name: str,
        schema: pa.Schema,
        partition_by: Sequence[str] = (),
        stats_columns: Sequence[str] = (),
        latest_by: tuple[str, str] | None = None,
    ) -> None:
        """Create the table empty if it does not exist, so readers and the catalog see it early.

        `partition_by` applies to a table created here; an existing table keeps its layout.
        `stats_columns`: the only columns whose statistics the log keeps (files written from now
        on; an existing table is altered once): each commit handles every file's statistics.
        `latest_by`: (key, order) of a table written merge-on-read (see `upsert`).
        """
        config = {STATS_COLUMNS: ",".join(stats_columns)} if stats_columns else {}
        if latest_by is not None:
            # delta-rs refuses properties of its own names at creation: set by altering after.
            config |= {LATEST_KEY: latest_by[0], LATEST_ORDER: latest_by[1]}
        if not self.exists(name):
            self.create_dir(name)
            write_deltalake(
                self.uri(name),
                schema.empty_table(),
                mode="append",
                partition_by=list(partition_by) or None,
                configuration={k: v for k, v in config.items() if k.startswith("delta.")} or None,
            )
            if latest_by is None:
                return
        table = self.table(name)
        if (
            config
            and table is not None
            and table.metadata().configuration
            != {
                **table.metadata().configuration,
                **config,
            }
        ):
            table.alter.set_table_properties(config, raise_if_not_exists=False)

    def version(self, name: str) -> int | None:
        table = self.table(name)
        return None if table is None else table.version()

    def read(
        self,
        name: str,
        columns: Sequence[str] | None = None,
        filter: pc.Expression | None = None,
        version: int | None = None,
        schema: pa.Schema | None = None,
        files: Sequence[str] | None = None,
    ) -> pa.Table:
        """Read a table (or `schema`'s empty table when it does not exist yet).

        `files`: only these of the version's data files (paths as `files` lists them). With
        `schema`, requested columns a table written by an older release lacks come back null.
        """
        table = self.table(name, version=version)
        if table is None:
            if schema is None:
                raise FileNotFoundError(
                    f"Delta table {name!r} does not exist under {self.location}"
                )
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns else empty
        whole = None if files is not None else self._in_memory(name, version)
        if whole is None:
            dataset = self._dataset(name, table)
        else:
            dataset, live = whole.dataset()
            if live is not None:  # only the current rows, and never the marking column
                filter = live if filter is None else filter & live
                columns = list(columns) if columns else whole.column_names
        missing: list[str] = []
        requested = list(columns) if columns else None
        if columns and schema is not None:
            missing = [c for c in columns if c not in dataset.schema.names and c in schema.names]
            columns = [c for c in columns if c not in missing]
        if files is not None:
            wanted = set(files)
            dataset = ds.FileSystemDataset(
                [f for f in dataset.get_fragments() if f.path in wanted],
                dataset.schema,
                dataset.format,
                dataset.filesystem,
            )
        cols = list(columns) if columns else None
        latest = None if whole is not None else latest_by_of(table)
        if latest is not None and set(latest) <= set(dataset.schema.names):
            read = _latest_read(dataset, latest, cols, filter)
            return self._with_missing(read, missing, schema, requested)
        try:
            read = dataset.to_table(columns=cols, filter=filter)
        except pa.ArrowNotImplementedError:
            # Files written by delta-rs MERGE store string_view columns; pyarrow cannot prune
            # them by statistics against a plain-string filter. Filter after reading instead.
            whole = dataset.to_table().filter(filter)
            read = whole.select(cols) if cols else whole
        return self._with_missing(read, missing, schema, requested)

    @staticmethod
    def _with_missing(
        read: pa.Table, missing: list[str], schema: pa.Schema | None, requested: list[str] | None
    ) -> pa.Table:
        """`read` with the requested columns its table lacks as nulls, in the requested order."""
        if not missing:
            return read
        assert schema is not None and requested is not None
        for name in missing:
            field = schema.field(name)
            read = read.append_column(field, pa.nulls(read.num_rows, field.type))
        return read.select(requested)

    def files(self, name: str, version: int | None = None) -> list[str]:
        """The data files of the table's version (paths relative to the table), [] if none."""
        table = self.table(name, version=version)
        if table is None:
            return []
        return [str(p) for p in pa.table(table.get_add_actions(flatten=True))["path"].to_pylist()]

    def files_covering(self, name: str, column: str, value: int) -> list[str]:
        """The data files whose statistics say `column` may equal `value` (files without
        statistics included): a point read that opens a few files, however many there are."""
        table = self.table(name)
        if table is None:
            return []
        actions = pa.table(table.get_add_actions(flatten=True))
        paths = actions["path"].to_pylist()
        low, high = f"min.{column}", f"max.{column}"
        if low not in actions.column_names or high not in actions.column_names:
            return [str(p) for p in paths]
        lows, highs = actions[low].to_pylist(), actions[high].to_pylist()
        return [
            str(p)
            for p, lo, hi in zip(paths, lows, highs, strict=True)
            if lo is None or hi is None or lo <= value <= hi
        ]

    def count(self, name: str) -> int:
        """Rows of the table (of a merge-on-read table: its keys)."""
        table = self.table(name)
        if table is None:
            return 0
        latest = latest_by_of(table)
        dataset = self._dataset(name, table)
        if latest is not None and latest[0] in dataset.schema.names:
            keys = dataset.to_table(columns=[latest[0]])[latest[0]]
            return int(pc.count_distinct(keys).as_py()) if len(keys) else 0
        return int(dataset.count_rows())

    def names(self) -> list[str]:
        """The Delta tables under the lake's folder."""
        if self.remote:
            found = self._objects().get_file_info(pafs.FileSelector("", allow_not_found=True))
            folders = [f.base_name for f in found if f.type == pafs.FileType.Directory]
            return sorted(f for f in folders if self.exists(f))
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "_delta_log").is_dir())

    def max_value(self, name: str, column: str, *, stats_only: bool = False) -> int | None:
        """The largest value of an integer column (None: no table, no rows, or no such column).

        From the files' statistics in the Delta log when every file has them (no data read);
        else from the column itself, unless `stats_only`.
        """
        table = self.table(name)
        if table is None:
            return None
        maxima = self._column_maxima(name, column, table)
        if not maxima:
            return None
        if None not in maxima.values():
            return int(max(v for v in maxima.values() if v is not None))
        if stats_only or column not in table.schema().to_arrow().names:
            return None
        values = self._dataset(name, table).to_table(columns=[column])[column]
        top = pc.max(values).as_py() if len(values) else None
        return None if top is None else int(top)

    def _view(self, name: str, table: DeltaTable) -> _LogView:
        """The table's log view at the open version: the commits since the last look are read
        from their log files (a few small JSON files); started afresh when one cannot be read."""
        version = table.version()
        with self._view_lock(name):
            view = self._views.get(name)
            if (
                view is None
                or view.version > version  # the table was made anew
                or (view.version < version and not self._follow(name, view, version))
            ):
                view = self._views[name] = _LogView(version)
            return view

    def _view_lock(self, name: str) -> threading.RLock:
        return self._view_locks.setdefault(name, threading.RLock())

    def _follow(self, name: str, view: _LogView, version: int) -> bool:
        """Apply the commits after `view.version` up to `version` to `view`; False (and `view`
        unusable) when a commit's log file cannot be read."""
        for v in range(view.version + 1, version + 1):
            try:
                lines = self._read_text(self._log_file(name, v)).splitlines()
                # Files rewritten with the same rows (`dataChange` false: a compaction).
                moved_out: list[str] = []
                moved_in: list[tuple[str, dict[str, object]]] = []
                for line in lines:
                    action = json.loads(line) if line.strip() else {}
                    if "add" in action:
                        add = action["add"]
                        stats = json.loads(add.get("stats") or "null") or {}
                        top = stats.get("maxValues") or {}
                        path = unquote(add["path"])
                        for column, files in view.maxima.items():
                            value = top.get(column)
                            files[path] = None if value is None else int(value)
                        partitions = add.get("partitionValues") or {}
                        if add.get("dataChange", True) is False:
                            moved_in.append((path, partitions))
                            continue
                        for (_, part), index in view.keys.items():
                            index.added(path, _partition_value(partitions.get(part)))
                    elif "remove" in action:
                        path = unquote(action["remove"]["path"])
                        for files in view.maxima.values():
                            files.pop(path, None)
                        if action["remove"].get("dataChange", True) is False:
                            moved_out.append(path)
                            continue
                        for index in view.keys.values():
                            index.removed(path)
                    elif "txn" in action:
                        txn = action["txn"]
                        view.txns[str(txn["appId"])] = int(txn["version"])
                for (_, part), index in view.keys.items():
                    index.moved(
                        moved_out,
                        [(path, _partition_value(pv.get(part))) for path, pv in moved_in],
                    )
            except (OSError, ValueError, KeyError, TypeError):
                return False
            view.version = v
        return True

    def _column_maxima(self, name: str, column: str, table: DeltaTable) -> dict[str, int | None]:
        """Per data file of the open version, the file statistics' maximum of `column`: read
        whole once, then kept by `_view`, so asking every batch does not grow with the files."""
        view = self._view(name, table)
        if column not in view.maxima:
            actions = pa.table(table.get_add_actions(flatten=True))
            paths = [unquote(str(p)) for p in actions["path"].to_pylist()]
            stat = f"max.{column}"
            values = actions[stat].to_pylist() if stat in actions.column_names else []
            view.maxima[column] = dict(zip(paths, values or [None] * len(paths), strict=True))
        return view.maxima[column]

    def files_holding(
        self,
        name: str,
        column: str,
        values: pa.Array | pa.ChunkedArray,
        partition: str,
        partitions: Iterable[object],
    ) -> list[str] | None:
        """The data files of the table's `partitions` (values of its `partition` column; None
        names the files without one) that may hold any of `values` in `column`, as `files`
        lists them; None when they are to be read instead: too big to index, or not asked
        about before (`key_index_after_lookups`).

        A keyed lookup in a partition then costs the same however many rows the partition
        holds: each file's keys are read and hashed once, when the file first matters, and
        followed with the log (see `streamguard.key_index`). A file named may not hold the keys
        after all (hashes collide): read it for the exact answer. The indexes of a table take
        at most STREAMGUARD_KEY_INDEX_MB; the partitions asked about least recently go first.
        """
        table = self.table(name)
        if table is None:
            return []
        with self._view_lock(name):  # the view is followed by writer threads too
            view = self._view(name, table)
            index = view.keys.setdefault((column, partition), KeyIndex())
            wanted = list(dict.fromkeys(_partition_value(p) for p in partitions))
            if any((column, partition, p) in view.too_big for p in wanted):
                return None
            new = [p for p in wanted if not index.holds(p)]
            early = [p for p in new if index.asked.get(p, 0) < self.key_index_after_lookups]
            for p in early:
                index.asked[p] = index.asked.get(p, 0) + 1
            if early:
                return None  # read this time; indexed once asked about again
            if new:
                actions = pa.table(table.get_add_actions(flatten=True))
                paths = [unquote(str(p)) for p in actions["path"].to_pylist()]
                on = f"partition.{partition}"
                values_of = actions[on].to_pylist() if on in actions.column_names else []
                parts = [_partition_value(v) for v in values_of] or [None] * len(paths)
                rows = (
                    actions["num_records"].to_pylist()
                    if "num_records" in actions.column_names
                    else []
                )
                for p in new:
                    mine = [i for i, q in enumerate(parts) if q == p]
                    if rows and sum(rows[i] or 0 for i in mine) * BYTES_PER_KEY > key_index_bytes():
                        view.too_big.add((column, partition, p))
                        return None
                    index.hold(p, [paths[i] for i in mine])
            for held, unread in index.unread_files().items():
                hashes, files = self._key_hashes(name, column, unread)
                index.add(held, unread, hashes, files)
            index.used(wanted)
            while index.nbytes > key_index_bytes():
                oldest = index.least_used()
                if oldest is None or oldest in wanted:
                    for p in wanted:
                        view.too_big.add((column, partition, p))
                        index.drop(p)
                    return None
                index.drop(oldest)
            hashes = key_hashes(values)
            return sorted({path for p in wanted for path in index.files_holding(p, hashes)})

    def _key_hashes(
        self, name: str, column: str, paths: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """The hashed values of `column` in these data files, and the position in `paths` of
        the file each came from."""
        if self.remote:
            store, full = self._objects(), [f"{name}/{p}" for p in paths]
        else:
            store, full = pafs.LocalFileSystem(), [os.path.join(self.root, name, p) for p in paths]
        read = ds.dataset(full, format="parquet", filesystem=store).to_table(
            columns=[column, "__filename"]
        )
        read = read.filter(pc.is_valid(read[column]))
        position = {f: i for i, f in enumerate(full)}
        names = pc.dictionary_encode(read["__filename"]).combine_chunks()
        of_name = np.array([position[str(f)] for f in names.dictionary.to_pylist()], np.int64)
        files = (
            of_name[names.indices.to_numpy(zero_copy_only=False)]
            if len(names)
            else np.empty(0, np.int64)
        )
        return key_hashes(read[column]), files

    def transaction_version(self, name: str, app_id: str) -> int | None:
        """The last batch `app_id` committed to this table, from the Delta log itself (asked of
        delta-rs once per app id, which reads the whole log; then followed commit by commit)."""
        table = self.table(name)
        if table is None:
            return None
        view = self._view(name, table)
        if app_id not in view.txns:
            view.txns[app_id] = table.transaction_version(app_id)
        return view.txns[app_id]

    def _hooks(self) -> PostCommitHookProperties | None:
        if self.auto_checkpoint:
            return None  # delta-rs's defaults
        return PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False)

    def checkpoint_due(self, name: str, interval: int = CHECKPOINT_INTERVAL) -> int:
        """How many versions the table is past its last log checkpoint by, when that is at
        least `interval` (0 otherwise: not due, or no table)."""
        table = self.table(name)
        if table is None:
            return 0
        last = self._checkpointed.get(name)
        if last is None:
            last_checkpoint = f"{name}/_delta_log/_last_checkpoint"
            if not self.remote:
                last_checkpoint = os.path.join(self.root, name, "_delta_log", "_last_checkpoint")
            try:
                last = int(json.loads(self._read_text(last_checkpoint))["version"])
            except (OSError, ValueError, KeyError, TypeError):
                last = 0
            self._checkpointed[name] = last
        behind = table.version() - last
        return behind if behind >= interval else 0

    def checkpoint(self, name: str) -> None:
        """Write the table's log checkpoint at its current version (so opening it reads one
        Parquet file and the commits since, not every commit), then drop expired log files."""
        table = self.table(name)
        if table is not None:
            table.create_checkpoint()
            table.cleanup_metadata()
            self._checkpointed[name] = table.version()

    def _commit(self, app_id: str, version: int) -> CommitProperties:
        return CommitProperties(app_transactions=[Transaction(app_id=app_id, version=version)])

    def append(
        self,
        name: str,
        data: pa.Table,
        app_id: str,
        version: int,
        partition_by: Sequence[str] = (),
        also: Sequence[tuple[str, int]] = (),
    ) -> bool:
        """Append once per (app_id, version): False when this batch is already in the table.

        `partition_by` applies when this append creates the table. `also`: more (app_id,
        version) application transactions recorded by the same commit (a deferred commit mark
        going out with the next plan); nothing is written when any of them is already done.
        """
        marks = [(app_id, version), *also]
        for mark, at in marks:
            done = self.transaction_version(name, mark)
            if done is not None and done >= at:
                return False
        creates = not self.exists(name)
        self.create_dir(name)
        # The open table when there is one (just refreshed by `transaction_version`): writing
        # to its URI would load the whole log again, on every append.
        write_deltalake(
            self.uri(name) if creates else (self._open.get(name) or self.uri(name)),
            data,
            mode="append",
            partition_by=(list(partition_by) or None) if creates else None,
            # Columns a newer release adds to a table (nullable lineage, say) join the table's
            # schema instead of failing the append on a lake written before them.
            schema_mode="merge",
            writer_properties=APPEND_WRITER_PROPERTIES,
            commit_properties=CommitProperties(
                app_transactions=[Transaction(app_id=a, version=v) for a, v in marks]
            ),
            post_commithook_properties=self._hooks(),
        )
        return True

    def upsert(
        self,
        name: str,
        data: pa.Table,
        keys: Sequence[str],
        app_id: str | None = None,
        version: int = 0,
        latest_by: str | None = None,
    ) -> bool:
        """MERGE rows by key: replace matched rows, insert the rest.

        With `app_id`, once per (app_id, version); without, the key alone makes it idempotent.

        `latest_by` (a column that grows with every upsert, the batch id): merge-on-read. A
        MERGE rewrites every file holding a changed key, so its cost follows the table, not the
        batch (a continuous worker's 165 rows against 100k customers: ~1 s). Instead the rows
        are appended, and a key's current row is the one with the largest `latest_by`; the
        table's properties say so (LATEST_KEY, LATEST_ORDER), and every read and count through
        a Lake chooses those rows. A table kept in memory is written whole (one row per key
        again) once its files would hold more than FOLD_ROWS_PER_KEY rows a key; `compact`
        folds any other.
        """
        if app_id is not None:
            done = self.transaction_version(name, app_id)
            if done is not None and done >= version:
                return False
        table = self.table(name)
        if table is None:
            self.create_dir(name)
            write_deltalake(
                self.uri(name),
                data,
                mode="append",
                commit_properties=None if app_id is None else self._commit(app_id, version),
            )
            created = self.table(name)
            if latest_by is not None and created is not None:
                self._mark_latest_by(name, created, keys, latest_by)
            return True
        if latest_by is not None:
            table = self._mark_latest_by(name, table, keys, latest_by)
        kept = self._fresh_memory(name, table)
        if data.num_rows == 0 and app_id is not None:
            # A MERGE of nothing makes no commit at all; an empty append records the batch
            # (`batch_written` relies on it for a batch whose every record was rejected).
            before = table.version()
            self.append(name, data, app_id, version)
            now = self.version(name)
            if kept is not None and kept[0] == before and now == before + 1:
                self._memory[name] = (before + 1, kept[1])  # the same rows
            return True
        after = self._replaced(name, table, data, keys)
        latest = latest_by_of(table)
        if latest is not None:
            _check_latest(name, data, keys, latest)
            if after is not None:
                return self._append_latest(name, table, data, app_id, version, after)
            # Not in memory (not kept, or over the budget): MERGEd, as it would never be folded
            # (its reads, which choose each key's latest row, are whole reads anyway).
        if (
            after is not None
            and kept is not None
            and data.num_rows * OVERWRITE_SHARE >= kept[1].num_rows
        ):
            if self._overwrite(name, table, after, app_id, version):
                return True
            after = None  # someone committed since: MERGE, and load the table again later
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in keys)
        (
            table.merge(
                source=data,
                predicate=predicate,
                source_alias="s",
                target_alias="t",
                # Columns a newer release adds to a state table join its schema (older rows
                # null), as appends do.
                merge_schema=True,
                commit_properties=None if app_id is None else self._commit(app_id, version),
                post_commithook_properties=self._hooks(),
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
        self._remember(name, kept, after)
        return True

    def _mark_latest_by(
        self, name: str, table: DeltaTable, keys: Sequence[str], order: str
    ) -> DeltaTable:
        """Make an existing table merge-on-read (it holds one row per key, as MERGEs left it)."""
        if latest_by_of(table) is not None:
            return table
        before = table.version()
        table.alter.set_table_properties(
            {LATEST_KEY: keys[0], LATEST_ORDER: order}, raise_if_not_exists=False
        )
        kept = self._memory.get(name)
        now = self.table(name)
        assert now is not None
        if kept is not None and kept[0] == before and now.version() == before + 1:
            self._memory[name] = (before + 1, kept[1])  # the same rows
        return now

    def _append_latest(
        self,
        name: str,
        table: DeltaTable,
        data: pa.Table,
        app_id: str | None,
        version: int,
        after: _Held,
    ) -> bool:
        """Upsert into a merge-on-read table held in memory: append the rows, or write the table
        whole when its files would hold more than FOLD_ROWS_PER_KEY rows a key (`upsert`)."""
        kept = self._memory.get(name)
        in_files = sum(pa.table(table.get_add_actions(flatten=True))["num_records"].to_pylist())
        fold = in_files + data.num_rows > FOLD_ROWS_PER_KEY * after.num_rows
        if fold and self._overwrite(name, table, after, app_id, version):
            return True
        if app_id is None:
            write_deltalake(
                self._open.get(name) or self.uri(name),
                data,
                mode="append",
                schema_mode="merge",
                writer_properties=APPEND_WRITER_PROPERTIES,
                post_commithook_properties=self._hooks(),
            )
            self._remember(name, kept, after)
        elif self.append(name, data, app_id, version):
            self._remember(name, kept, after, (app_id, version))
        return True

    def _replaced(
        self, name: str, table: DeltaTable, data: pa.Table, keys: Sequence[str]
    ) -> _Held | None:
        """A table kept in memory after upserting `data` there; None when memory cannot say.

        Only when the memory holds the table's latest version, one key names the rows, `data`
        has the table's columns (a new column goes through MERGE's schema merge) and no key
        twice.
        """
        kept = self._fresh_memory(name, table)
        if kept is None or len(keys) != 1:
            return None
        whole, key = kept[1], keys[0]
        if set(data.column_names) != set(whole.column_names):
            return None
        if pc.count_distinct(data[key]).as_py() != data.num_rows:
            return None
        return whole.upserted(data.select(whole.column_names).cast(whole.table.schema), key)

    def _overwrite(
        self, name: str, table: DeltaTable, after: _Held, app_id: str | None, version: int
    ) -> bool:
        """Write a table kept in memory whole, as the very next version or not at all.

        No retry: a commit by anyone else in between would be overwritten (an overwrite rebased
        on a concurrent insert keeps the inserted file, but our rows were computed without it),
        so then the memory is dropped and False says to MERGE instead.
        """
        kept = self._memory.get(name)
        if table.metadata().partition_columns:
            return False
        transactions = [] if app_id is None else [Transaction(app_id=app_id, version=version)]
        rows = after.current()
        try:
            write_deltalake(
                table,
                rows,
                mode="overwrite",
                writer_properties=STATE_WRITER_PROPERTIES,
                commit_properties=CommitProperties(
                    max_commit_retries=0, app_transactions=transactions
                ),
                post_commithook_properties=self._hooks(),
            )
        except CommitFailedError:
            self._memory.pop(name, None)
            return False
        self._remember(name, kept, _Held(rows))
        return True

    def _remember(
        self,
        name: str,
        kept: tuple[int, _Held] | None,
        after: _Held | None,
        ours: tuple[str, int] | None = None,
    ) -> None:
        """Keep `after` as the table's content if our write was the very next version, or, for
        a write recorded as application transaction `ours`, if every other commit since `kept`
        changed no row (a compaction that landed while we wrote: without this the continuous
        worker read its state whole again after 1 batch in 10, ~1 s at 100k customers)."""
        written = self.table(name)
        if kept is not None and after is not None and written is not None:
            at = written.version()
            if at == kept[0] + 1 or (
                ours is not None and at > kept[0] and self._rows_unchanged(name, kept[0], at, ours)
            ):
                self._memory[name] = (at, after)
                return
        self._memory.pop(name, None)

    def compact(self, name: str, vacuum_hours: int | None = None) -> dict[str, int]:
        """Rewrite the many small files micro-batches leave into few large ones.

        Compaction is a new commit that keeps the rows and the application transactions, so
        exactly-once bookkeeping survives it. With `vacuum_hours`, files removed longer ago than
        that are deleted (time travel before then is given up).
        """
        table = self.table(name)
        if table is None:
            return {"files_removed": 0, "files_added": 0, "vacuumed": 0}
        before = table.version()
        latest = latest_by_of(table)
        if latest is not None and not table.metadata().partition_columns:
            metrics = self._fold(name, table, latest)
        else:
            metrics = table.optimize.compact(post_commithook_properties=self._hooks())
        kept = self._memory.get(name)
        compacted = self.table(name)
        now = None if compacted is None else compacted.version()
        if kept is not None and kept[0] == before and now == before + 1:
            self._memory[name] = (now, kept[1])  # only our compaction since: the same rows
        vacuumed = 0
        if vacuum_hours is not None:
            vacuumed = len(
                table.vacuum(
                    retention_hours=vacuum_hours, dry_run=False, enforce_retention_duration=False
                )
            )
        return {
            "files_removed": int(metrics.get("numFilesRemoved", 0)),
            "files_added": int(metrics.get("numFilesAdded", 0)),
            "vacuumed": vacuumed,
        }

    def _fold(self, name: str, table: DeltaTable, latest: tuple[str, str]) -> dict[str, int]:
        """Compact a merge-on-read table: its current rows only, written whole as the very next
        version (none when another commit came first: the next compaction folds)."""
        rows = self._dataset(name, table).to_table()
        current = latest_rows(rows, *latest) if set(latest) <= set(rows.column_names) else rows
        if current.num_rows == rows.num_rows:  # nothing superseded: an ordinary compaction
            return dict(table.optimize.compact(post_commithook_properties=self._hooks()))
        files = len(table.file_uris())
        try:
            write_deltalake(
                table,
                current,
                mode="overwrite",
                writer_properties=STATE_WRITER_PROPERTIES,
                commit_properties=CommitProperties(max_commit_retries=0),
                post_commithook_properties=self._hooks(),
            )
        except CommitFailedError:
            return {"numFilesRemoved": 0, "numFilesAdded": 0}
        folded = self.table(name)
        return {
            "numFilesRemoved": files,
            "numFilesAdded": 0 if folded is None else len(folded.file_uris()),
        }


def _arrow_dataset(table: DeltaTable) -> ds.Dataset:
    dataset: ds.Dataset = table.to_pyarrow_dataset()
    return dataset


def latest_by_of(table: DeltaTable) -> tuple[str, str] | None:
    """(key, order) of a merge-on-read table (`Lake.upsert`'s `latest_by`), else None."""
    config = table.metadata().configuration
    key, order = config.get(LATEST_KEY), config.get(LATEST_ORDER)
    return (key, order) if key and order else None


def latest_rows(rows: pa.Table, key: str, order: str) -> pa.Table:
    """One row per key: the one with the largest `order` (of equal ones, the last), in the
    order the rows came. What a merge-on-read table holds (`Lake.upsert`)."""
    n = rows.num_rows
    if n == 0:
        return rows
    codes = pc.dictionary_encode(rows[key].combine_chunks()).indices.to_numpy(zero_copy_only=False)
    ranks = pc.fill_null(rows[order], np.iinfo(np.int64).min).to_numpy()
    by_key = np.lexsort((np.arange(n), ranks, codes))  # key, then order, then position
    sorted_codes = codes[by_key]
    last = np.ones(n, dtype=bool)
    last[:-1] = sorted_codes[1:] != sorted_codes[:-1]
    if last.all():
        return rows
    return rows.take(pa.array(np.sort(by_key[last])))


def _check_latest(name: str, data: pa.Table, keys: Sequence[str], latest: tuple[str, str]) -> None:
    """An upsert into a merge-on-read table names each key once, by the table's key, and
    carries the column ordering its rows."""
    key, order = latest
    if list(keys) != [key] or order not in data.column_names:
        raise ValueError(
            f"{name} is merge-on-read by key {key!r} and order {order!r}: upserted by "
            f"{list(keys)} with columns {data.column_names}"
        )
    if pc.count_distinct(data[key]).as_py() != data.num_rows:
        raise ValueError(f"an upsert into {name} names a {key} twice: which row is current?")


def _latest_read(
    dataset: ds.Dataset,
    latest: tuple[str, str],
    columns: list[str] | None,
    filter: pc.Expression | None,
) -> pa.Table:
    """Read a merge-on-read table: the rows passing `filter` that are their key's current row.

    A superseded row may pass a filter its current row fails (or the other way round), so the
    filter cannot simply be pushed down: the current (key, order) pairs come from the two
    columns, the candidates from the filtered read, and a candidate stays if it is current.
    """
    key, order = latest
    current = latest_rows(dataset.to_table(columns=[key, order]), key, order)
    wanted = None if columns is None else list(dict.fromkeys([*columns, key, order]))
    try:
        candidates = dataset.to_table(columns=wanted, filter=filter)
    except pa.ArrowNotImplementedError:  # string_view columns of MERGE-written files (`read`)
        whole = dataset.to_table()
        candidates = whole.filter(filter) if filter is not None else whole
        candidates = candidates.select(wanted) if wanted else candidates
    if candidates.num_rows and current.num_rows < dataset.count_rows():
        # By Arrow's hashing of the keys of both into one set of codes (a join cannot carry the
        # list columns of a state table).
        n = candidates.num_rows
        both = pa.chunked_array([*candidates[key].chunks, *current[key].chunks])
        codes = pc.dictionary_encode(both.combine_chunks()).indices.to_numpy(zero_copy_only=False)
        lowest = np.iinfo(np.int64).min
        best = np.full(int(codes.max()) + 1, lowest, dtype=np.int64)
        best[codes[n:]] = pc.fill_null(current[order], lowest).to_numpy()
        mine = pc.fill_null(candidates[order], lowest).to_numpy()
        candidates = latest_rows(candidates.filter(pa.array(mine == best[codes[:n]])), key, order)
    return candidates.select(columns) if columns else candidates
