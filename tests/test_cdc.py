"""AWS DMS change data applied to real Delta tables: order, deletes, exactly once, SCD 2 history,
schema modes, dead letters, both file formats; the accounts simulation, its Dagster assets and
sensor, and `streamguard generate cdc`."""

from __future__ import annotations

import json
import shutil
import textwrap
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from assets import cdc
from assets.cdc import (
    ACCOUNTS,
    ACCOUNTS_HISTORY,
    accounts,
    accounts_history,
    accounts_job,
    dms_files_sensor,
)
from assets.resources import HomeResource
from models.accounts import (
    ACCOUNT_SCHEMA,
    BLOCKED,
    CARD_STATUSES,
    STATUSES,
    AccountChanges,
    account_history,
    accounts_as_of,
    simulate_accounts,
)
from models.simulate import simulate
from streamguard.cdc import (
    BATCHES_TABLE,
    DEAD_LETTERS_TABLE,
    FILES_TABLE,
    ScdType,
    apply_changes,
    schema_source,
)
from streamguard.cli import main
from streamguard.dms import DmsFormat, DmsSource, order_key, write_dms_output
from streamguard.lake import Lake
from streamguard.schema_evolution import (
    RESCUED_DATA,
    SchemaChangeError,
    SchemaMode,
    change_schema,
    schema_history,
)

TS = pa.timestamp("us", tz="UTC")
HINTS = {"id": "long", "amount": "double", "ts": "timestamp"}
HEADER = "Op,id,name,amount,ts"


def put(root: Path, name: str, text: str) -> Path:
    """A DMS file of the test table `bank.t`, written as given."""
    folder = root / "bank" / "t"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text).strip() + "\n")
    return path


def changes(root: Path, name: str, *lines: str) -> Path:
    """A change file of `bank.t` with the header and these lines."""
    return put(root, name, "\n".join([HEADER, *lines]))


def load(root: Path) -> None:
    put(
        root,
        "LOAD00000001.csv",
        """
        id,name,amount,ts
        1,ann,10.0,2026-03-01 10:00:00.000000
        2,bob,20.0,2026-03-01 10:00:00.000000
        3,cy,30.0,2026-03-01 10:00:00.000000
        """,
    )


def apply(lake: Lake, root: Path, target: str = "t", **options: Any) -> Any:
    source = DmsSource(str(root), "bank", "t")
    options.setdefault("sequence_by", "ts")
    return apply_changes(lake, source, target, keys=["id"], schema_hints=HINTS, **options)


def rows(lake: Lake, name: str = "t", columns: tuple[str, ...] = ("id", "name", "amount")) -> list:
    table = lake.read(name)
    ordered = table.sort_by(
        [(c, "ascending") for c in ("id", "valid_from") if c in table.schema.names]
    )
    return [tuple(r[c] for c in columns) for r in ordered.to_pylist()]


def test_full_load_then_inserts_updates_and_deletes(tmp_path: Path, lake_root: str) -> None:
    lake, root = Lake(lake_root), tmp_path / "dms"
    load(root)
    first = apply(lake, root)
    assert rows(lake) == [(1, "ann", 10.0), (2, "bob", 20.0), (3, "cy", 30.0)]
    assert first.files == 1 and first.total("inserted") == 3
    changes(
        root,
        "20260301-1100000000.csv",
        "I,4,dee,40.0,2026-03-01 10:30:00.000000",
        "U,2,bob,25.0,2026-03-01 10:31:00.000000",
        "D,3,cy,30.0,2026-03-01 10:32:00.000000",
        "U,1,ann,11.0,2026-03-01 10:33:00.000000",
        "U,1,ann,12.0,2026-03-01 10:34:00.000000",
    )
    second = apply(lake, root)
    assert rows(lake) == [(1, "ann", 12.0), (2, "bob", 25.0), (4, "dee", 40.0)]
    batch = second.batches[0]
    assert (batch.changes, batch.inserted, batch.updated, batch.deleted) == (5, 1, 2, 1)
    assert "Op" not in lake.read("t").column_names


def test_out_of_order_and_replayed_changes_never_move_a_row_back(tmp_path: Path) -> None:
    lake, root = Lake(tmp_path / "lake"), tmp_path / "dms"
    load(root)
    changes(root, "20260301-1100000000.csv", "U,1,ann,50.0,2026-03-01 10:50:00.000000")
    apply(lake, root)
    # Arrives later, committed earlier: an update older than the row, a delete older than it.
    changes(
        root,
        "20260301-1200000000.csv",
        "U,1,ann,20.0,2026-03-01 10:20:00.000000",
        "D,2,bob,20.0,2026-03-01 09:00:00.000000",
        "I,4,dee,2.0,2026-03-01 11:10:00.000000",
        "I,4,dee,1.0,2026-03-01 11:05:00.000000",
        "U,3,cy,31.0,2026-03-01 11:00:00.000000",
        "U,3,cy,32.0,2026-03-01 11:00:00.000000",
    )
    apply(lake, root)
    # id 4: the sequence beats row order; id 3: equal sequence, the later row wins.
    assert rows(lake) == [(1, "ann", 50.0), (2, "bob", 20.0), (3, "cy", 32.0), (4, "dee", 2.0)]
    # The same old changes in a later file again: still nothing moves back.
    shutil.copy(root / "bank/t/20260301-1200000000.csv", root / "bank/t/20260301-1300000000.csv")
    apply(lake, root)
    assert rows(lake) == [(1, "ann", 50.0), (2, "bob", 20.0), (3, "cy", 32.0), (4, "dee", 2.0)]


def test_delete_then_reinsert_and_a_late_update_stays_deleted(
    tmp_path: Path, lake_root: str
) -> None:
    lake, root = Lake(lake_root), tmp_path / "dms"
    load(root)
    changes(
        root,
        "20260301-1100000000.csv",
        "D,1,ann,10.0,2026-03-01 11:00:00.000000",
        "D,2,bob,20.0,2026-03-01 11:00:00.000000",
        "D,3,cy,30.0,2026-03-01 11:00:00.000000",
        "I,3,cy,33.0,2026-03-01 11:01:00.000000",
    )
    apply(lake, root)
    assert rows(lake) == [(3, "cy", 33.0)]  # deleted and re-inserted within one batch
    changes(
        root,
        "20260301-1200000000.csv",
        "I,1,ann,100.0,2026-03-01 12:00:00.000000",
        "U,2,bob,21.0,2026-03-01 10:30:00.000000",
    )
    apply(lake, root)
    # 1 re-inserted after its delete; 2's update was committed before its delete: the tombstone
    # keeps it from coming back.
    assert rows(lake) == [(1, "ann", 100.0), (3, "cy", 33.0)]


def test_the_same_file_is_applied_once(tmp_path: Path, lake_root: str) -> None:
    lake, root = Lake(lake_root), tmp_path / "dms"
    load(root)
    changes(root, "20260301-1100000000.csv", "U,1,ann,11.0,2026-03-01 11:00:00.000000")
    apply(lake, root)
    version, before = lake.version("t"), rows(lake)
    again = apply(lake, root)
    assert again.batches == () and lake.version("t") == version and rows(lake) == before
    paths = lake.read(FILES_TABLE)["path"].to_pylist()
    assert len(paths) == len(set(paths)) == 2


class Crash(RuntimeError):
    pass


def crash_after(table: str, nth: int) -> Callable[[str], None]:
    seen: Counter[str] = Counter()

    def hook(name: str) -> None:
        seen[name] += 1
        if name == table and seen[name] == nth:
            raise Crash(f"after {name} #{nth}")

    return hook


def crash_case(root: Path) -> None:
    load(root)
    changes(
        root,
        "20260301-1100000000.csv",
        "U,1,ann,11.0,2026-03-01 11:00:00.000000",
        "D,2,bob,20.0,2026-03-01 11:00:00.000000",
        "X,9,bad,0.0,2026-03-01 11:00:00.000000",
    )
    changes(
        root,
        "20260301-1200000000.csv",
        "I,2,bob,22.0,2026-03-01 12:00:00.000000",
        "U,3,cy,33.0,2026-03-01 12:00:00.000000",
        "D,1,ann,11.0,2026-03-01 12:00:00.000000",
        "U,1,ann,10.5,2026-03-01 10:30:00.000000",
    )
    changes(root, "20260301-1300000000.csv", "U,3,cy,34.0,2026-03-01 13:00:00.000000")


def state(lake: Lake, name: str) -> dict[str, Any]:
    table = lake.read(name).drop_columns(["_cdc_position"])
    order = [(c, "ascending") for c in ("id", "valid_from") if c in table.column_names]
    return {
        "rows": table.sort_by(order).to_pylist(),
        "dead": sorted(lake.read(DEAD_LETTERS_TABLE).select(["file", "line"]).to_pylist(), key=str),
        "files": sorted(lake.read(FILES_TABLE)["path"].to_pylist()),
        "batches": lake.read(BATCHES_TABLE).num_rows,
    }


# Every table a batch writes, in order (SCD 2 keeps deletes in its history: no tombstones).
WRITES: dict[int, list[str]] = {
    1: [FILES_TABLE, DEAD_LETTERS_TABLE, "_cdc_tombstones_t", "t", BATCHES_TABLE],
    2: [FILES_TABLE, DEAD_LETTERS_TABLE, "t", BATCHES_TABLE],
}


@pytest.mark.parametrize(("scd", "table"), [(s, t) for s, ts in WRITES.items() for t in ts])
def test_a_crash_mid_apply_then_rerun_equals_a_clean_run(
    tmp_path: Path, scd: ScdType, table: str
) -> None:
    root = tmp_path / "dms"
    crash_case(root)
    clean = Lake(tmp_path / "clean")
    apply(clean, root, stored_as_scd_type=scd, max_files_per_batch=2)
    for nth in (1, 2):  # in the first batch (the full load and a change file), then the second
        lake = Lake(tmp_path / f"crashed{nth}")
        with pytest.raises(Crash):
            apply(lake, root, stored_as_scd_type=scd, max_files_per_batch=2,
                  after_write=crash_after(table, nth))  # fmt: skip
        rerun = apply(lake, root, stored_as_scd_type=scd, max_files_per_batch=2)
        if table != BATCHES_TABLE:  # after that write the batch is committed: nothing to resume
            assert rerun.batches[0].resumed
        assert state(lake, "t") == state(clean, "t")


def test_scd2_history_is_exact_on_a_hand_computed_case(tmp_path: Path) -> None:
    root = tmp_path / "dms"
    put(root, "LOAD00000001.csv", "id,name,amount,ts\n1,a,1.0,2026-03-01 10:00:00.000000")
    changes(
        root,
        "20260301-1100000000.csv",
        "U,1,b,2.0,2026-03-01 10:30:00.000000",
        "I,2,x,1.0,2026-03-01 10:10:00.000000",
    )
    changes(
        root,
        "20260301-1200000000.csv",
        "U,1,c,3.0,2026-03-01 10:20:00.000000",
        "D,2,x,1.0,2026-03-01 10:40:00.000000",
        "U,1,d,4.0,2026-03-01 10:50:00.000000",
    )
    changes(
        root,
        "20260301-1300000000.csv",
        "I,2,y,5.0,2026-03-01 11:00:00.000000",
        "U,1,c,3.0,2026-03-01 10:20:00.000000",
    )

    def at(hh_mm: str) -> datetime:
        return datetime.fromisoformat(f"2026-03-01T{hh_mm}:00+00:00")

    expected = [
        (1, "a", at("10:00"), at("10:20"), False),  # c arrived late, between a and b
        (1, "c", at("10:20"), at("10:30"), False),
        (1, "b", at("10:30"), at("10:50"), False),
        (1, "d", at("10:50"), None, True),
        (2, "x", at("10:10"), at("10:40"), False),  # closed by the delete
        (2, "y", at("11:00"), None, True),  # re-inserted
    ]
    columns = ("id", "name", "valid_from", "valid_to", "is_current")
    for per_file in (1, None):  # a batch per file (late data meets stored history), one batch
        lake = Lake(tmp_path / f"lake{per_file}")
        apply(lake, root, target="h", stored_as_scd_type=2, max_files_per_batch=per_file)
        assert rows(lake, "h", columns) == expected


@pytest.mark.parametrize("mode", ["addNewColumns", "rescue", "failOnNewColumns", "none"])
def test_a_new_source_column_in_each_schema_mode(tmp_path: Path, mode: SchemaMode) -> None:
    lake, root = Lake(tmp_path / "lake"), tmp_path / "dms"
    load(root)
    apply(lake, root, schema_mode=mode)
    change = put(
        root,
        "20260301-1100000000.csv",
        f"""
        {HEADER},email
        U,1,ann,lots,2026-03-01 11:00:00.000000,ann@example.com
        I,4,dee,40.0,2026-03-01 11:00:00.000000,
        """,
    )
    after_load = rows(lake)
    if mode in ("addNewColumns", "failOnNewColumns"):
        with pytest.raises(SchemaChangeError, match="email") as stopped:
            apply(lake, root, schema_mode=mode)
        assert rows(lake) == after_load  # nothing of the batch was applied
        assert stopped.value.where.endswith(change.name)
        if mode == "failOnNewColumns":
            with pytest.raises(SchemaChangeError):  # still stopped: waits for a hand change
                apply(lake, root, schema_mode=mode)
            change_schema(lake, schema_source("t"), add={"email": "string"})
        apply(lake, root, schema_mode=mode)
        table = lake.read("t")
        assert "email" in table.column_names and RESCUED_DATA not in table.column_names
        assert rows(lake) == [*after_load, (4, "dee", 40.0)]  # 1's update was dead-lettered
        dead = lake.read(DEAD_LETTERS_TABLE).to_pylist()
        assert [(d["line"], d["reason"]) for d in dead] == [
            (2, "amount: cannot read 'lots' as double")
        ]
    elif mode == "rescue":
        apply(lake, root, schema_mode=mode)
        table = lake.read("t").sort_by("id")
        by_id = {r["id"]: r for r in table.to_pylist()}
        assert by_id[1]["amount"] is None  # the wrong-typed value is rescued, not lost
        assert json.loads(by_id[1][RESCUED_DATA]) == {
            "amount": "lots",
            "email": "ann@example.com",
            "_file_path": str(change.resolve()),
        }
        assert by_id[4][RESCUED_DATA] is None and by_id[4]["amount"] == 40.0
        assert "email" not in table.column_names
    else:  # none: the new column is ignored
        apply(lake, root, schema_mode=mode)
        table = lake.read("t")
        assert "email" not in table.column_names and RESCUED_DATA not in table.column_names
        assert sorted(table["id"].to_pylist()) == [1, 2, 3, 4]


def test_the_evolved_column_is_filled_after_add_new_columns(tmp_path: Path) -> None:
    lake, root = Lake(tmp_path / "lake"), tmp_path / "dms"
    load(root)
    apply(lake, root)
    put(root, "20260301-1100000000.csv",
        f"{HEADER},email\nU,1,ann,11.0,2026-03-01 11:00:00.000000,ann@example.com")  # fmt: skip
    with pytest.raises(SchemaChangeError, match="run again"):
        apply(lake, root)
    apply(lake, root)
    table = lake.read("t").sort_by("id")
    assert table["email"].to_pylist() == ["ann@example.com", None, None]
    assert [v.version for v in schema_history(lake, schema_source("t"))] == [1, 2]


def test_malformed_rows_go_to_dead_letters_with_file_and_line(
    tmp_path: Path, lake_root: str
) -> None:
    lake, root = Lake(lake_root), tmp_path / "dms"
    load(root)
    bad = changes(
        root,
        "20260301-1100000000.csv",
        "U,1,ann,11.0,2026-03-01 10:40:00.000000",
        "X,2,bob,1.0,2026-03-01 10:41:00.000000",
        "U,,nobody,1.0,2026-03-01 10:42:00.000000",
        "U,3,cy,1.0,yesterday",
        "U,4,dee,lots,2026-03-01 10:44:00.000000",
        "U,5,eve",
        "I,6,fay,6.0,2026-03-01 10:45:00.000000",
    )
    report = apply(lake, root)
    assert rows(lake) == [(1, "ann", 11.0), (2, "bob", 20.0), (3, "cy", 30.0), (6, "fay", 6.0)]
    dead = lake.read(DEAD_LETTERS_TABLE).sort_by("line").to_pylist()
    assert {d["file"] for d in dead} == {str(bad.resolve())}
    assert [(d["line"], d["reason"]) for d in dead] == [
        (3, "bad Op 'X': expected I, U or D"),
        (4, "missing key id"),
        (5, "ts: cannot read 'yesterday' as timestamp[us, tz=UTC]"),
        (6, "amount: cannot read 'lots' as double"),
        (7, "unreadable CSV line: 3 fields where 5 were expected"),
    ]
    assert json.loads(dead[0]["payload"])["Op"] == "X"
    assert report.total("dead_letters") == 5 and report.total("changes") == 3 + 2  # load + file


def test_the_dms_timestamp_column_sequences_changes(tmp_path: Path) -> None:
    lake, root = Lake(tmp_path / "lake"), tmp_path / "dms"
    put(root, "LOAD00000001.csv", "dms_ts,id,name\n2026-03-01 09:00:00.000000,1,ann")
    put(
        root,
        "20260301-1100000000.csv",
        """
        Op,dms_ts,id,name
        U,2026-03-01 10:00:00.000000,1,late
        U,2026-03-01 09:30:00.000000,1,early
        I,not a time,2,bad
        """,
    )
    source = DmsSource(str(root), "bank", "t", timestamp_column="dms_ts")
    apply_changes(lake, source, "t", keys=["id"], schema_hints={"id": "long"})
    table = lake.read("t")
    assert table.select(["id", "name"]).to_pylist() == [{"id": 1, "name": "late"}]
    assert table.schema.field("dms_ts").type == TS
    assert lake.read(DEAD_LETTERS_TABLE)["line"].to_pylist() == [4]


def test_hex_full_load_files_are_applied_in_counter_order(tmp_path: Path) -> None:
    def key(name: str) -> str:
        kind_and_key = order_key(name)
        assert kind_and_key is not None
        return kind_and_key[1]

    names = ["LOAD00000010.csv", "LOAD0000000A.csv", "LOAD00000009.csv", "LOAD0000F.csv"]
    ordered = ["LOAD00000009.csv", "LOAD0000000A.csv", "LOAD0000F.csv", "LOAD00000010.csv"]
    assert sorted(names, key=key) == ordered  # as numbers: as text, F would sort after 10
    assert key("LOAD00000010.csv") < key("20260301-1134010000.csv")  # full load first
    assert order_key("notes.csv") is None
    lake, root = Lake(tmp_path / "lake"), tmp_path / "dms"
    for n in range(1, 18):  # ..., LOAD00000009, LOAD0000000A, ..., LOAD00000011
        put(root, f"LOAD{n:08X}.csv", f"Op,id,name\nI,1,v{n}")
    source = DmsSource(str(root), "bank", "t")
    listed = [f.name for f in source.list_files()]
    assert listed[8:11] == ["LOAD00000009.csv", "LOAD0000000A.csv", "LOAD0000000B.csv"]
    assert listed[-1] == "LOAD00000011.csv"
    # No sequence column: file order decides, so the 17th file's row is the one kept.
    apply_changes(lake, source, "t", keys=["id"], schema_hints={"id": "long"})
    assert lake.read("t").select(["id", "name"]).to_pylist() == [{"id": 1, "name": "v17"}]


@pytest.fixture(scope="module")
def bank() -> AccountChanges:
    return simulate_accounts(simulate(days=12, customers=80, seed=11), seed=11)


def write_bank(root: Path, bank: AccountChanges, fmt: DmsFormat, **settings: Any) -> DmsSource:
    write_dms_output(
        root, bank.full_load, bank.changes, schema="bank", table="accounts", format=fmt,
        full_load_time=bank.snapshot_time, rows_per_load_file=25,
        cdc_file_interval=timedelta(hours=12), **settings,
    )  # fmt: skip
    columns = tuple(ACCOUNT_SCHEMA.names) if not settings.get("add_column_name", True) else None
    return DmsSource(
        str(root), "bank", "accounts", format=fmt, csv_header=columns is None, columns=columns,
        timestamp_column=settings.get("timestamp_column"),
    )  # fmt: skip


def apply_bank(lake: Lake, source: DmsSource, scd: ScdType, target: str = "accounts") -> Any:
    return apply_changes(
        lake, source, target, keys=["account_id"], sequence_by="updated_at",
        stored_as_scd_type=scd, schema_hints=ACCOUNT_SCHEMA,
    )  # fmt: skip


VARIANTS: dict[str, tuple[DmsFormat, dict[str, Any]]] = {
    "csv": ("csv", {}),
    "csv_op_timestamp": ("csv", {"include_op_for_full_load": True, "timestamp_column": "dms_ts"}),
    "csv_no_header": ("csv", {"add_column_name": False, "timestamp_column": "dms_ts"}),
    "parquet": ("parquet", {}),
    "parquet_op_timestamp": (
        "parquet",
        {"include_op_for_full_load": True, "timestamp_column": "dms_ts"},
    ),
}


def test_csv_and_parquet_give_the_same_tables(tmp_path: Path, bank: AccountChanges) -> None:
    expected = accounts_as_of(bank)
    histories = {}
    for name, (fmt, settings) in VARIANTS.items():
        source = write_bank(tmp_path / name, bank, fmt, **settings)
        lake = Lake(tmp_path / f"lake_{name}")
        report = apply_bank(lake, source, 1)
        assert report.total("dead_letters") == 0
        current = lake.read("accounts").select(ACCOUNT_SCHEMA.names).cast(ACCOUNT_SCHEMA)
        assert current.sort_by("account_id").equals(expected), name
        apply_bank(lake, source, 2, "accounts_history")
        history = lake.read("accounts_history")
        keep = [*ACCOUNT_SCHEMA.names, "valid_from", "valid_to", "is_current"]
        histories[name] = history.select(keep).sort_by([("account_id", "ascending"),
                                                        ("valid_from", "ascending")])  # fmt: skip
        now = histories[name].filter(histories[name]["is_current"]).select(ACCOUNT_SCHEMA.names)
        assert now.cast(ACCOUNT_SCHEMA).equals(expected), name
    first = next(iter(histories.values()))
    assert all(h.equals(first) for h in histories.values())
    # The SCD 2 apply of the DMS files is exactly the simulated table's history.
    reference = account_history(bank)
    assert first.select(reference.column_names).cast(reference.schema).equals(reference)
    assert (
        first.num_rows
        == bank.full_load.num_rows
        + bank.changes.filter(pc.not_equal(bank.changes["op"], "D")).num_rows
    )


def test_cdc_inserts_only_files_have_no_op_and_upsert(tmp_path: Path, bank: AccountChanges) -> None:
    source = write_bank(tmp_path / "dms", bank, "csv", cdc_inserts_only=True)
    change_file = next(f for f in source.list_files() if f.kind == "cdc")
    assert "Op" not in source.read(change_file).table.column_names
    lake = Lake(tmp_path / "lake")
    apply_bank(lake, source, 1)
    inserts = bank.changes.filter(pc.equal(bank.changes["op"], "I"))
    expected = accounts_as_of(AccountChanges(bank.full_load, inserts, bank.snapshot_time))
    got = lake.read("accounts").select(ACCOUNT_SCHEMA.names).cast(ACCOUNT_SCHEMA)
    assert got.sort_by("account_id").equals(expected)


def test_simulated_accounts_match_the_simulated_customers(bank: AccountChanges) -> None:
    sim = simulate(days=12, customers=80, seed=11)
    again = simulate_accounts(sim, seed=11)
    assert again.full_load.equals(bank.full_load) and again.changes.equals(bank.changes)
    customers = sorted(set(sim.transactions["customer_id"].to_pylist()))
    assert bank.full_load["customer_id"].to_pylist() == customers
    assert bank.full_load["account_id"].to_pylist() == [f"A{c[1:]}" for c in customers]
    changes = bank.changes
    assert set(changes["status"].to_pylist()) <= set(STATUSES)
    assert set(changes["card_status"].to_pylist()) <= {*CARD_STATUSES, None}
    times = changes["updated_at"].cast(pa.int64()).to_numpy()
    assert (times[1:] >= times[:-1]).all() and set(changes["op"].to_pylist()) == {"I", "U", "D"}
    # Every customer with a reported fraud has their card blocked within the hour after.
    tx = sim.transactions.to_pandas().set_index("transaction_id")
    labels = sim.labels.to_pandas()
    labels["customer_id"] = tx.loc[labels["transaction_id"], "customer_id"].to_numpy()
    first_report = labels.groupby("customer_id")["reported_at"].min()
    end = tx["event_time"].max()  # changes after the simulated period are not simulated
    first_report = first_report[first_report + timedelta(hours=1) < end]
    assert len(first_report) > 0
    blocks = changes.filter(pc.equal(changes["card_status"], BLOCKED)).to_pandas()
    for customer, reported in first_report.items():
        mine = blocks[blocks["customer_id"] == customer]["updated_at"]
        assert ((mine >= reported) & (mine <= reported + timedelta(hours=1))).any(), customer


def test_accounts_assets_materialize_and_the_sensor_requests_runs(
    tmp_path: Path, bank: AccountChanges
) -> None:
    home = HomeResource(root=str(tmp_path / "home"))
    dms = home.home().data / "dms"
    # A context-managed instance: build_sensor_context registers its state storage in a
    # context variable, which must be reset when the instance goes away.
    with dg.instance_for_test() as instance:

        def tick(cursor: str | None) -> Any:
            resources = {"home": home}
            context = dg.build_sensor_context(cursor=cursor, resources=resources, instance=instance)
            return context, dms_files_sensor(context)

        _, skipped = tick(None)
        assert isinstance(skipped, dg.SkipReason)

        write_bank(dms, bank, "parquet")
        context, request = tick(None)
        assert isinstance(request, dg.RunRequest) and request.run_key
        config = request.run_config["ops"][ACCOUNTS]["config"]
        assert config["file_format"] == "parquet"
        _, again = tick(context.cursor)
        assert isinstance(again, dg.SkipReason)

        result = dg.materialize(
            [accounts, accounts_history], resources={"home": home}, run_config=request.run_config
        )
        assert result.success
        meta = {
            node: result.asset_materializations_for_node(node)[0].metadata
            for node in (ACCOUNTS, ACCOUNTS_HISTORY)
        }
        current, history = meta[ACCOUNTS], meta[ACCOUNTS_HISTORY]
        assert current["rows_total"].value == accounts_as_of(bank).num_rows
        assert current["files_applied"].value == len(list(dms.glob("bank/accounts/*.parquet")))
        # One batch into an empty lake: the latest row per account inserted, deleted ones never.
        assert current["rows_inserted"].value == current["rows_total"].value
        assert current["dead_letters"].value == 0
        assert history["rows_inserted"].value == history["rows_total"].value
        assert isinstance(history["delta_version"].value, int)

        # A new change file: a new run key; nothing new: skipped again.
        last = sorted(dms.glob("bank/accounts/2*.parquet"))[-1]
        shutil.copy(last, last.with_name("29991231-2359590000.parquet"))
        _, later = tick(context.cursor)
        assert isinstance(later, dg.RunRequest) and later.run_key != request.run_key
        # While a run of the job is unfinished, no other is requested (one writer per target).
        job = dg.Definitions.merge(
            cdc.defs, dg.Definitions(resources={"home": home})
        ).resolve_job_def(accounts_job.name)
        instance.create_run_for_job(job, run_config=later.run_config)
        _, waiting = tick(context.cursor)
        assert isinstance(waiting, dg.SkipReason) and "not finished" in str(waiting.skip_message)


def test_generate_cdc_writes_dms_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dms"
    code = main(["generate", "cdc", "--out", str(out), "--days", "3", "--customers", "30",
                 "--format", "parquet", "--include-op-for-full-load", "--timestamp-column",
                 "dms_ts"])  # fmt: skip
    assert code == 0 and "DMS parquet file(s)" in capsys.readouterr().out
    source = DmsSource(str(out), "bank", "accounts", format="parquet", timestamp_column="dms_ts")
    files = source.list_files()
    assert files[0].name == "LOAD00000001.parquet" and files[-1].kind == "cdc"
    assert source.read(files[0]).table.column_names[:2] == ["Op", "dms_ts"]
