"""The Lake's open tables on real Delta tables: kept open, yet never stale.

A `Lake` keeps one handle per table and brings it forward only when the table's log has a newer
version; another writer (here: a second `Lake` on the same folder, as a second process would be)
must still be seen by every read and write, and the lake-wide batch numbering (`next_batch_id`,
kept per file from the commits' log entries) must equal what a freshly opened lake computes.
The tests taking `lake_root` run on a local folder and on S3 (a local moto server).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pytest
from deltalake import DeltaTable
from deltalake.fs import DeltaStorageHandler

from streamguard.commit import next_batch_id
from streamguard.lake import Lake

SCHEMA = pa.schema([pa.field("key", pa.string()), pa.field("batch_id", pa.int64())])


def rows(keys: list[str], batch_id: int) -> pa.Table:
    return pa.table({"key": keys, "batch_id": [batch_id] * len(keys)}, schema=SCHEMA)


def keys(lake: Lake, name: str) -> list[str]:
    return sorted(lake.read(name, columns=["key"])["key"].to_pylist())


def log_files(lake: Lake, name: str, suffix: str) -> list[str]:
    """The names of the table's log files ending in `suffix`, wherever the lake is."""
    store = pafs.PyFileSystem(DeltaStorageHandler(lake.uri(name)))
    found = store.get_file_info(pafs.FileSelector("_delta_log", allow_not_found=True))
    return sorted(f.base_name for f in found if f.base_name.endswith(suffix))


def test_an_open_table_sees_the_commits_of_another_writer(lake_root: str) -> None:
    mine, other = Lake(lake_root), Lake(lake_root)
    assert mine.append("events", rows(["a", "b"], 0), "job", 0)
    assert mine.count("events") == 2  # opened and kept by `mine`
    assert other.append("events", rows(["c"], 1), "job", 1)

    assert mine.count("events") == 3
    assert mine.transaction_version("events", "job") == 1
    assert mine.version("events") == other.version("events")
    # The batch the other writer committed is not written again through the kept handle.
    assert not mine.append("events", rows(["c"], 1), "job", 1)
    assert keys(mine, "events") == ["a", "b", "c"]
    # A write through the kept handle lands after the other writer's commit, keeping its rows.
    assert mine.append("events", rows(["d"], 2), "job", 2)
    assert keys(other, "events") == ["a", "b", "c", "d"]

    assert mine.upsert("state", rows(["a"], 2), ["key"], "job", 2)
    assert other.upsert("state", rows(["a", "b"], 3), ["key"], "job", 3)
    assert not mine.upsert("state", rows(["a", "b"], 3), ["key"], "job", 3)
    assert mine.upsert("state", rows(["c"], 4), ["key"], "job", 4)
    state = Lake(lake_root).read("state").sort_by("key")
    assert state.to_pylist() == [
        {"key": "a", "batch_id": 3},
        {"key": "b", "batch_id": 3},
        {"key": "c", "batch_id": 4},
    ]


def test_a_table_removed_and_made_anew_under_an_open_handle_is_opened_again(
    tmp_path: Path,
) -> None:
    mine = Lake(tmp_path)
    for batch in range(3):
        mine.append("events", rows([f"old{batch}"], batch), "job", batch)
    assert mine.version("events") == 2
    shutil.rmtree(tmp_path / "events")
    assert mine.table("events") is None and not mine.exists("events")
    assert next_batch_id(mine) == 0

    Lake(tmp_path).append("events", rows(["new"], 0), "other", 0)
    assert keys(mine, "events") == ["new"]
    assert mine.version("events") == 0
    assert mine.transaction_version("events", "job") is None
    assert next_batch_id(mine) == 1


def test_the_next_batch_id_follows_appends_merges_compaction_and_deletes(tmp_path: Path) -> None:
    mine, other = Lake(tmp_path), Lake(tmp_path)

    def agree() -> int:
        fresh = next_batch_id(Lake(tmp_path))
        assert next_batch_id(mine) == fresh
        return fresh

    assert agree() == 0
    mine.append("events", rows(["a"], 0), "job", 0)
    assert agree() == 1
    other.append("events", rows(["b"], 1), "job", 1)
    other.upsert("state", rows(["a"], 2), ["key"], "job", 2)
    assert agree() == 3
    mine.upsert("state", rows(["a", "b"], 4), ["key"], "job", 4)  # rewrites batch 2's file
    assert agree() == 5
    for batch in range(5, 9):
        mine.append("events", rows([f"e{batch}"], batch), "job", batch)
    other.compact("events")  # removes every file and adds one holding them all
    assert agree() == 9
    # A delete that removes the file holding the highest id lowers the numbering back.
    table = DeltaTable(str(tmp_path / "events"))
    table.delete("batch_id >= 7")
    assert other.read("events", filter=pc.field("batch_id") >= 7).num_rows == 0
    assert agree() == 7
    mine.ensure("empty", SCHEMA)  # a table without files adds nothing
    assert agree() == 7


def test_only_the_chosen_columns_keep_statistics_on_new_and_existing_tables(
    tmp_path: Path,
) -> None:
    wide = pa.schema([*SCHEMA, *(pa.field(f"f{i}", pa.float64()) for i in range(40))])

    def wide_rows(batch_id: int) -> pa.Table:
        data = {"key": ["k"], "batch_id": [batch_id]} | {f"f{i}": [1.0] for i in range(40)}
        return pa.table(data, schema=wide)

    def stat_columns(lake: Lake, name: str) -> set[str]:
        table = lake.table(name)
        assert table is not None
        actions = pa.table(table.get_add_actions(flatten=True)).to_pylist()
        last = max(actions, key=lambda a: a["modification_time"])
        return {k[4:] for k, v in last.items() if k.startswith("max.") and v is not None}

    lake = Lake(tmp_path)
    lake.ensure("new", wide, stats_columns=("key", "batch_id"))
    lake.append("new", wide_rows(0), "job", 0)
    assert stat_columns(lake, "new") == {"key", "batch_id"}

    lake.ensure("old", wide)  # a table from before: Delta's default statistics
    lake.append("old", wide_rows(1), "job", 1)
    assert len(stat_columns(lake, "old")) == 32
    version = lake.version("old")
    lake.ensure("old", wide, stats_columns=("batch_id",))
    assert lake.version("old") == (version or 0) + 1  # altered once
    lake.ensure("old", wide, stats_columns=("batch_id",))
    assert lake.version("old") == (version or 0) + 1  # and not again
    lake.append("old", wide_rows(2), "job", 2)
    assert stat_columns(lake, "old") == {"batch_id"}
    assert lake.upsert("old", wide_rows(3), ["key"], "job", 3)
    assert stat_columns(lake, "old") == {"batch_id"}
    assert next_batch_id(lake) == next_batch_id(Lake(tmp_path)) == 4


def test_application_transactions_are_followed_across_writers_and_compaction(
    lake_root: str,
) -> None:
    """The kept log view answers what a freshly opened table answers, however it advanced."""
    mine, other = Lake(lake_root), Lake(lake_root)

    def agree(app_id: str) -> int | None:
        fresh = DeltaTable(mine.uri("events")).transaction_version(app_id)
        assert mine.transaction_version("events", app_id) == fresh
        return fresh

    mine.append("events", rows(["a"], 0), "job", 0)
    assert agree("job") == 0 and agree("other") is None
    other.append("events", rows(["b"], 1), "other", 1)  # an app id `mine` asked about: absent
    other.append("events", rows(["c"], 2), "job", 2)
    assert agree("other") == 1 and agree("job") == 2
    other.compact("events")
    other.upsert("events", rows(["a"], 3), ["key"], "other", 3)
    assert agree("other") == 3 and agree("job") == 2
    assert not mine.append("events", rows(["b"], 1), "other", 1)  # held: skipped
    assert keys(mine, "events") == ["a", "b", "c"]


def test_a_lake_that_defers_log_checkpoints_writes_them_when_asked(lake_root: str) -> None:
    """The continuous worker's commits write no log checkpoint; it takes them between batches."""
    lake = Lake(lake_root)
    lake.auto_checkpoint = False
    for batch in range(102):
        lake.append("events", rows([f"k{batch}"], batch), "job", batch)
    assert not log_files(lake, "events", ".checkpoint.parquet")
    assert lake.checkpoint_due("events") == 101  # version 101, never checkpointed
    lake.checkpoint("events")
    assert log_files(lake, "events", ".checkpoint.parquet") == [
        "00000000000000000101.checkpoint.parquet"
    ]
    assert lake.checkpoint_due("events") == 0
    assert Lake(lake_root).checkpoint_due("events", interval=1) == 0  # read from _last_checkpoint
    lake.upsert("state", rows(["a"], 0), ["key"], "job", 0)
    assert lake.checkpoint_due("state") == 0 and lake.checkpoint_due("missing") == 0
    fresh = Lake(lake_root)  # opens from the checkpoint: same rows and bookkeeping
    assert fresh.count("events") == 102
    assert fresh.transaction_version("events", "job") == 101
    assert next_batch_id(fresh) == 102

    lake.auto_checkpoint = True  # delta-rs's own rule again: a checkpoint at the 100th version
    for batch in range(102, 201):
        lake.append("events", rows([f"k{batch}"], batch), "job", batch)
    assert "00000000000000000199.checkpoint.parquet" in log_files(lake, "events", ".parquet")


def test_appends_write_snappy_parquet_without_dictionaries_and_keep_statistics(
    tmp_path: Path,
) -> None:
    """Appends skip Parquet dictionary encoding (most of a batch's encoding time, for ids and
    continuous values it ends up discarding) yet stay compressed and keep the statistics that
    file skipping and the batch numbering read."""
    import pyarrow.parquet as pq

    lake = Lake(tmp_path)
    lake.ensure("events", SCHEMA, stats_columns=("key", "batch_id"))
    # Few distinct values: a dictionary writer would encode every column with one.
    assert lake.append("events", rows(["a", "b", "a", "b"] * 500, 7), "job", 7)
    (path,) = lake.files("events")
    metadata = pq.ParquetFile(tmp_path / "events" / path).metadata
    for i in range(metadata.num_columns):
        column = metadata.row_group(0).column(i)
        assert column.compression == "SNAPPY"
        assert not any("DICTIONARY" in e for e in column.encodings), column.encodings
        assert column.statistics is not None and column.statistics.has_min_max
    assert lake.max_value("events", "batch_id", stats_only=True) == 7
    assert keys(lake, "events") == ["a"] * 1000 + ["b"] * 1000


def _operations(lake: Lake, name: str, n: int) -> list[str]:
    """The operations of the table's last `n` commits, newest first."""
    return [str(c["operation"]) for c in DeltaTable(lake.uri(name)).history(n)]


def test_a_table_kept_in_memory_reads_and_upserts_what_its_files_hold(lake_root: str) -> None:
    mine, other = Lake(lake_root), Lake(lake_root)
    mine.keep_in_memory(["state"])
    assert mine.upsert("state", rows(["a", "b"], 0), ["key"], "job", 0)  # creates the table
    assert keys(mine, "state") == ["a", "b"]  # read whole into memory
    assert mine.upsert("state", rows(["b", "c"], 1), ["key"], "job", 1)
    assert _operations(mine, "state", 1) == ["WRITE"]  # replaced in memory, written whole
    expected = [("a", 0), ("b", 1), ("c", 1)]
    fresh = Lake(lake_root).read("state").sort_by("key")
    got = zip(fresh["key"].to_pylist(), fresh["batch_id"].to_pylist(), strict=True)
    assert list(got) == expected
    picked = mine.read("state", columns=["batch_id"], filter=pc.field("key").isin(["b", "c"]))
    assert picked.column_names == ["batch_id"] and picked["batch_id"].to_pylist() == [1, 1]
    assert not mine.upsert("state", rows(["b"], 1), ["key"], "job", 1)  # once per batch

    # Another writer's commit: the next read loads the table again, the next upsert keeps it.
    assert other.upsert("state", rows(["d"], 2), ["key"], "other", 2)
    assert keys(mine, "state") == ["a", "b", "c", "d"]
    assert mine.upsert("state", rows(["a"], 3), ["key"], "job", 3)
    assert _operations(mine, "state", 1) == ["WRITE"]
    # Without a read in between, memory is stale: the upsert MERGEs instead of overwriting.
    assert other.upsert("state", rows(["e"], 4), ["key"], "other", 4)
    assert mine.upsert("state", rows(["c"], 5), ["key"], "job", 5)
    assert _operations(mine, "state", 1) == ["MERGE"]
    # A compaction by the lake keeping the table leaves its memory good (no reload needed).
    mine.compact("state")
    assert keys(mine, "state") == ["a", "b", "c", "d", "e"]
    assert mine.upsert("state", rows(["e", "f"], 6), ["key"], "job", 6)
    final = Lake(lake_root).read("state").sort_by("key")
    assert dict(zip(final["key"].to_pylist(), final["batch_id"].to_pylist(), strict=True)) == {
        "a": 3,
        "b": 1,
        "c": 5,
        "d": 2,
        "e": 6,
        "f": 6,
    }
    assert mine.read("state").sort_by("key").equals(final)
    # A batch changing few of the rows MERGEs (rewrites the files holding them), memory follows.
    many = [f"k{i:02d}" for i in range(40)]
    assert mine.upsert("state", rows(many, 7), ["key"], "job", 7)
    assert mine.upsert("state", rows(["a", "k00"], 8), ["key"], "job", 8)
    assert _operations(mine, "state", 2) == ["MERGE", "WRITE"]
    assert mine.read("state").sort_by("key").equals(Lake(lake_root).read("state").sort_by("key"))
    assert mine.read("state", filter=pc.field("batch_id") == 8)["key"].to_pylist() == ["a", "k00"]


def test_an_upsert_in_memory_never_overwrites_a_commit_it_has_not_seen(lake_root: str) -> None:
    mine, other = Lake(lake_root), Lake(lake_root)
    mine.keep_in_memory(["state"])
    assert mine.upsert("state", rows(["a"], 0), ["key"], "job", 0)
    assert keys(mine, "state") == ["a"]  # memory at version 0
    handle = mine.table("state")
    assert handle is not None
    # Between the memory check and the commit, another writer inserts a row.
    stale = DeltaTable(mine.uri("state"), version=handle.version())
    assert other.upsert("state", rows(["b"], 1), ["key"], "other", 1)
    after = mine._replaced("state", stale, rows(["a"], 2), ["key"])
    assert after is not None and after.num_rows == 1  # computed without the other row
    assert not mine._overwrite("state", stale, after, "job", 2)
    assert keys(Lake(lake_root), "state") == ["a", "b"]  # not overwritten
    assert mine.upsert("state", rows(["a"], 2), ["key"], "job", 2)  # through MERGE
    assert keys(Lake(lake_root), "state") == ["a", "b"]


def test_a_table_over_the_memory_budget_is_read_and_merged_from_its_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STREAMGUARD_STATE_MEMORY_MB", "0")
    lake = Lake(tmp_path)
    lake.keep_in_memory(["state"])
    assert lake.upsert("state", rows(["a", "b"], 0), ["key"], "job", 0)
    assert keys(lake, "state") == ["a", "b"]
    assert lake.upsert("state", rows(["b", "c"], 1), ["key"], "job", 1)
    assert _operations(lake, "state", 1) == ["MERGE"]
    assert keys(lake, "state") == ["a", "b", "c"]


STATE = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("value", pa.int64()),
        pa.field("places", pa.list_(pa.string())),  # a list column, as the state tables have
        pa.field("batch_id", pa.int64()),
    ]
)


def state_rows(values: dict[str, int], batch_id: int) -> pa.Table:
    return pa.table(
        {
            "key": list(values),
            "value": list(values.values()),
            "places": [[k] * (v % 3) for k, v in values.items()],
            "batch_id": [batch_id] * len(values),
        },
        schema=STATE,
    )


def current(lake: Lake, **read: Any) -> dict[str, tuple[int, int]]:
    got = lake.read("state", **read)
    return {
        k: (v, b)
        for k, v, b in zip(
            got["key"].to_pylist(),
            got["value"].to_pylist(),
            got["batch_id"].to_pylist(),
            strict=True,
        )
    }


def rows_in_files(lake: Lake, name: str) -> int:
    table = lake.table(name)
    assert table is not None
    return sum(pa.table(table.get_add_actions(flatten=True))["num_records"].to_pylist())


def test_a_merge_on_read_table_appends_changed_rows_and_reads_each_keys_latest(
    lake_root: str,
) -> None:
    """Issue 11: a state upsert costs its batch, not the table. The changed rows are appended
    (no file rewritten), and every read through a Lake, this one's or a fresh one's, sees each
    key's latest row only, filters applied to those rows."""
    writer, reader = Lake(lake_root), Lake(lake_root)
    writer.keep_in_memory(["state"])
    writer.ensure("state", STATE, latest_by=("key", "batch_id"))
    expected: dict[str, tuple[int, int]] = {}
    for values, batch in (({"a": 1, "b": 2, "c": 3}, 0), ({"b": 20}, 1), ({"c": 30, "d": 4}, 2)):
        current(writer)  # as the runner reads the batch's state first
        before = set(writer.files("state"))
        assert writer.upsert("state", state_rows(values, batch), ["key"], "job", batch, "batch_id")
        assert before < set(writer.files("state"))  # appended: every earlier file stays
        expected |= {k: (v, batch) for k, v in values.items()}
        assert current(writer) == current(reader) == expected
    assert rows_in_files(writer, "state") == 6  # b and c twice
    assert writer.count("state") == reader.count("state") == 4
    # A filter sees current rows only: b's old row (value 2) passes, its current one does not.
    for lake in (writer, reader):
        assert current(lake, filter=pc.field("value") == 2) == {}
        assert current(lake, filter=pc.field("value") >= 20) == {"b": (20, 1), "c": (30, 2)}
        picked = lake.read("state", columns=["value"], filter=pc.field("key") == "c")
        assert picked.column_names == ["value"] and picked["value"].to_pylist() == [30]
    # Once per batch, as any upsert.
    assert not writer.upsert("state", state_rows({"a": 9}, 2), ["key"], "job", 2, "batch_id")
    assert current(reader)["a"] == (1, 0)

    # Files holding two rows a key: the lake holding the table in memory writes it whole (one
    # row a key again).
    batch3 = {"a": 100, "b": 200, "c": 300, "d": 400}
    assert writer.upsert("state", state_rows(batch3, 3), ["key"], "job", 3, "batch_id")
    expected |= {k: (v, 3) for k, v in batch3.items()}
    assert rows_in_files(writer, "state") == 4
    assert _operations(writer, "state", 1) == ["WRITE"]
    assert current(reader) == current(writer) == expected

    # A lake not holding it in memory MERGEs (it could never fold its appends), on top of
    # superseded rows too; and another lake's compaction folds the table: current rows only,
    # batches still recorded; the writer goes on from there.
    assert writer.upsert("state", state_rows({"e": 5, "a": 6}, 4), ["key"], "job", 4, "batch_id")
    assert rows_in_files(writer, "state") == 6
    assert reader.upsert("state", state_rows({"a": 8, "g": 9}, 5), ["key"], "other", 5, "batch_id")
    assert _operations(reader, "state", 1) == ["MERGE"]
    expected |= {"e": (5, 4), "a": (8, 5), "g": (9, 5)}
    assert current(reader) == current(writer) == expected
    reader.compact("state")
    assert rows_in_files(reader, "state") == 6 == reader.count("state")
    assert reader.transaction_version("state", "job") == 4
    assert writer.upsert("state", state_rows({"a": 7, "f": 6}, 6), ["key"], "job", 6, "batch_id")
    expected |= {"a": (7, 6), "f": (6, 6)}
    assert current(writer) == current(Lake(lake_root)) == expected


def test_a_merge_on_read_upsert_names_each_key_once_by_the_tables_key(tmp_path: Path) -> None:
    lake = Lake(tmp_path)
    lake.ensure("state", STATE, latest_by=("key", "batch_id"))
    twice = pa.concat_tables([state_rows({"a": 1}, 0), state_rows({"a": 2}, 0)])
    with pytest.raises(ValueError, match="twice"):
        lake.upsert("state", twice, ["key"], "job", 0, "batch_id")
    with pytest.raises(ValueError, match="merge-on-read by key 'key'"):
        lake.upsert("state", state_rows({"a": 1}, 0), ["value"], "job", 0, "batch_id")
    assert lake.count("state") == 0


def test_a_table_merged_before_becomes_merge_on_read_in_place(lake_root: str) -> None:
    """A lake written by an older release (MERGEd state, one row a key) is taken over as is."""
    lake = Lake(lake_root)
    assert lake.upsert("state", state_rows({"a": 1, "b": 2}, 0), ["key"], "job", 0)
    assert lake.upsert("state", state_rows({"b": 3}, 1), ["key"], "job", 1)
    assert _operations(lake, "state", 1) == ["MERGE"]
    lake.keep_in_memory(["state"])
    assert current(lake) == {"a": (1, 0), "b": (3, 1)}
    assert lake.upsert("state", state_rows({"b": 4, "c": 5}, 2), ["key"], "job", 2, "batch_id")
    assert _operations(lake, "state", 1) == ["WRITE"]  # appended
    assert current(Lake(lake_root)) == {"a": (1, 0), "b": (4, 2), "c": (5, 2)}


def test_a_kept_tables_memory_survives_commits_that_change_no_row(lake_root: str) -> None:
    """A compaction by another lake (the continuous worker's compactor) rewrites files with the
    same rows: the writer keeps its memory instead of reading the table whole again, yet any
    commit that changes rows makes it read again."""
    writer, other = Lake(lake_root), Lake(lake_root)
    writer.keep_in_memory(["state"])
    writer.ensure("state", STATE, latest_by=("key", "batch_id"))
    for batch in range(4):  # one small file each, a row of each key
        current(writer)  # as the runner reads the batch's state first
        values = {"a": batch, f"k{batch}": batch}
        assert writer.upsert("state", state_rows(values, batch), ["key"], "job", batch, "batch_id")
    assert current(writer)["a"] == (3, 3)
    held = writer._memory["state"]
    table = other.table("state")
    assert table is not None
    table.optimize.compact()  # an OPTIMIZE: the same rows (superseded ones too) in one file
    assert len(other.files("state")) == 1
    assert current(writer)["a"] == (3, 3)
    assert writer._memory["state"][1] is held[1]  # not read again
    assert writer._memory["state"][0] == held[0] + 1
    assert writer.upsert("state", state_rows({"a": 9}, 4), ["key"], "job", 4, "batch_id")
    assert current(Lake(lake_root)) == current(writer)
    assert current(writer)["a"] == (9, 4)
    # Another writer's rows: read again.
    assert other.upsert("state", state_rows({"z": 1}, 5), ["key"], "other", 5, "batch_id")
    assert current(writer)["z"] == (1, 5)


class CompactedMidAppend(Lake):
    """A lake whose every append has another lake's compaction land first: after the writer
    checked its memory, before its commit (what the continuous worker's compactor does now and
    then)."""

    def __init__(self, root: str, other: Lake) -> None:
        super().__init__(root)
        self.other = other

    def append(self, name: str, data: pa.Table, *args: Any, **kwargs: Any) -> bool:
        table = self.other.table(name)
        assert table is not None
        table.optimize.compact()
        return super().append(name, data, *args, **kwargs)


def test_a_compaction_landing_amid_an_upsert_leaves_the_memory_good(lake_root: str) -> None:
    other = Lake(lake_root)
    writer = CompactedMidAppend(lake_root, other)
    writer.keep_in_memory(["state"])
    writer.ensure("state", STATE, latest_by=("key", "batch_id"))
    other.append("state", state_rows({"a": 0, "b": 0}, 0), "seed", 0)
    other.append("state", state_rows({"c": 0}, 0), "seed", 1)  # two files to compact
    for batch in (1, 2):
        current(writer)  # memory checked, as the runner reads before it writes
        before = writer.version("state")
        assert before is not None
        values = {"a": batch, f"n{batch}": batch}
        assert writer.upsert("state", state_rows(values, batch), ["key"], "job", batch, "batch_id")
        assert writer.version("state") == before + 2  # a compaction, then the append
        # Kept at the new version: the next read is from memory, not the files in full.
        assert writer._memory["state"][0] == before + 2
        assert current(writer) == current(Lake(lake_root))
    assert current(writer)["a"] == (2, 2)


def test_a_kept_table_stays_in_few_chunks_through_many_small_upserts(tmp_path: Path) -> None:
    """Each upsert adds its rows as a chunk; the last chunks are merged like a binary counter,
    never the whole table at once, so 200 upserts leave a handful of chunks."""
    lake = Lake(tmp_path)
    lake.keep_in_memory(["state"])
    lake.ensure("state", STATE, latest_by=("key", "batch_id"))
    lake.upsert("state", state_rows({f"k{i}": 0 for i in range(1000)}, 0), ["key"], "job", 0)
    expected = {f"k{i}": (0, 0) for i in range(1000)}
    for batch in range(1, 201):
        current(lake)
        values = {f"k{(batch * 7) % 1000}": batch, f"new{batch}": batch}
        assert lake.upsert("state", state_rows(values, batch), ["key"], "job", batch, "batch_id")
        expected |= {k: (v, batch) for k, v in values.items()}
    held = lake._memory["state"][1].table
    lengths = [len(c) for c in held["key"].chunks]
    assert len(lengths) <= 9 and lengths == sorted(lengths, reverse=True)
    assert current(lake) == current(Lake(tmp_path)) == expected
