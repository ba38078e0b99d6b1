"""The Delta lake layer (delta-rs): appends and upserts made idempotent by app transactions.

Every write of a micro-batch carries a Delta application transaction `(app_id, batch_id)`. A batch
replayed after a crash skips the tables that already hold it, so a rerun adds no duplicate and
misses no row, without any state outside the tables themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError


class Lake:
    """Delta tables under one folder, one sub-folder per table."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._open: dict[str, DeltaTable] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def uri(self, name: str) -> str:
        return str(self.path(name))

    def table(self, name: str, version: int | None = None) -> DeltaTable | None:
        """The table at `version`, or its latest version (kept open, refreshed incrementally)."""
        try:
            if version is not None:
                return DeltaTable(self.uri(name), version=version)
            table = self._open.get(name)
            if table is None:
                table = self._open[name] = DeltaTable(self.uri(name))
            else:
                table.update_incremental()
            return table
        except TableNotFoundError:
            return None

    def exists(self, name: str) -> bool:
        return (self.path(name) / "_delta_log").is_dir()

    def ensure(self, name: str, schema: pa.Schema, partition_by: Sequence[str] = ()) -> None:
        """Create the table empty if it does not exist, so readers and the catalog see it early.

        `partition_by` applies to a table created here; an existing table keeps its layout.
        """
        if not self.exists(name):
            self.path(name).mkdir(parents=True, exist_ok=True)
            write_deltalake(
                self.uri(name),
                schema.empty_table(),
                mode="append",
                partition_by=list(partition_by) or None,
            )

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
                raise FileNotFoundError(f"Delta table {name!r} does not exist under {self.root}")
            empty = schema.empty_table()
            return empty.select(list(columns)) if columns else empty
        dataset = _dataset(table)
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
        try:
            read = dataset.to_table(columns=cols, filter=filter)
        except pa.ArrowNotImplementedError:
            # Files written by delta-rs MERGE store string_view columns; pyarrow cannot prune
            # them by statistics against a plain-string filter. Filter after reading instead.
            whole = dataset.to_table().filter(filter)
            read = whole.select(cols) if cols else whole
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
        table = self.table(name)
        if table is None:
            return 0
        return int(_dataset(table).count_rows())

    def names(self) -> list[str]:
        """The Delta tables under the lake's folder."""
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
        actions = pa.table(table.get_add_actions(flatten=True))
        if actions.num_rows == 0:
            return None
        stat = f"max.{column}"
        if stat in actions.column_names and actions[stat].null_count == 0:
            return int(pc.max(actions[stat]).as_py())
        if stats_only or column not in table.schema().to_arrow().names:
            return None
        values = _dataset(table).to_table(columns=[column])[column]
        top = pc.max(values).as_py() if len(values) else None
        return None if top is None else int(top)

    def transaction_version(self, name: str, app_id: str) -> int | None:
        """The last batch `app_id` committed to this table, from the Delta log itself."""
        table = self.table(name)
        return None if table is None else table.transaction_version(app_id)

    def _commit(self, app_id: str, version: int) -> CommitProperties:
        return CommitProperties(app_transactions=[Transaction(app_id=app_id, version=version)])

    def append(
        self,
        name: str,
        data: pa.Table,
        app_id: str,
        version: int,
        partition_by: Sequence[str] = (),
    ) -> bool:
        """Append once per (app_id, version): False when this batch is already in the table.

        `partition_by` applies when this append creates the table.
        """
        done = self.transaction_version(name, app_id)
        if done is not None and done >= version:
            return False
        creates = not self.exists(name)
        self.path(name).mkdir(parents=True, exist_ok=True)
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
            commit_properties=self._commit(app_id, version),
        )
        return True

    def upsert(
        self,
        name: str,
        data: pa.Table,
        keys: Sequence[str],
        app_id: str | None = None,
        version: int = 0,
    ) -> bool:
        """MERGE rows by key: replace matched rows, insert the rest.

        With `app_id`, once per (app_id, version); without, the key alone makes it idempotent.
        """
        if app_id is not None:
            done = self.transaction_version(name, app_id)
            if done is not None and done >= version:
                return False
        table = self.table(name)
        if table is None:
            self.path(name).mkdir(parents=True, exist_ok=True)
            write_deltalake(
                self.uri(name),
                data,
                mode="append",
                commit_properties=None if app_id is None else self._commit(app_id, version),
            )
            return True
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
            )
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute()
        )
        return True

    def compact(self, name: str, vacuum_hours: int | None = None) -> dict[str, int]:
        """Rewrite the many small files micro-batches leave into few large ones.

        Compaction is a new commit that keeps the rows and the application transactions, so
        exactly-once bookkeeping survives it. With `vacuum_hours`, files removed longer ago than
        that are deleted (time travel before then is given up).
        """
        table = self.table(name)
        if table is None:
            return {"files_removed": 0, "files_added": 0, "vacuumed": 0}
        metrics = table.optimize.compact()
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


def _dataset(table: DeltaTable) -> ds.Dataset:
    dataset: ds.Dataset = table.to_pyarrow_dataset()
    return dataset
