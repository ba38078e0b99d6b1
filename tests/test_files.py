"""Files landing in a folder, scored by the real runner into a real Delta lake, exactly once.

Discovery between runs, crash and rerun, files overwritten in place, the four schema modes,
`_rescued_data`, the three formats, rate limits and malformed lines (see `streamguard.files`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_cli import run as run_cli
from test_runner import CRASH_POINTS, CrashingRunner, table_snapshot

from models import schema
from models.job import ALERTS, CUSTOMER_STATE, FEATURES, SCORES, TERMINAL_STATE, TRANSACTIONS
from models.registry import LoadedModel
from models.schema import TRANSACTION_SCHEMA, to_payload
from models.simulate import Simulation
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.config import Home
from streamguard.files import (
    FILE_LOG,
    FILES_SHARD,
    FileChangedError,
    FileSource,
    sequence_number,
)
from streamguard.lake import Lake
from streamguard.pipeline import scoring_job_name, scoring_runner
from streamguard.runner import CrashError, RunReport
from streamguard.schema_evolution import (
    RESCUED_DATA,
    SCHEMA_TABLE,
    SchemaEvolved,
    SchemaMode,
    UnknownColumns,
    change_schema,
    schema_history,
)

BASE_TIME = 1_767_225_600  # modification times are set, so discovery order is known


def land(path: Path, data: bytes, at: int) -> Path:
    """Write a file as producers must: whole, under a hidden name, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hidden = path.parent / f".{path.name}.tmp"
    hidden.write_bytes(data)
    os.utime(hidden, (BASE_TIME + at, BASE_TIME + at))
    hidden.rename(path)
    return path


def records(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Transactions as the JSON objects a payload holds."""
    return [json.loads(to_payload(r)) for r in rows]


def jsonl(objects: Sequence[dict[str, Any] | bytes]) -> bytes:
    lines = [o if isinstance(o, bytes) else json.dumps(o).encode() for o in objects]
    return b"\n".join(lines) + b"\n"


def csv_bytes(objects: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> bytes:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(columns or TRANSACTION_SCHEMA.names))
    writer.writeheader()
    writer.writerows(objects)
    return out.getvalue().encode()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def job_of(source: FileSource) -> str:
    return scoring_job_name("files", source.source)


def score(
    lake: Lake, source: FileSource, model: LoadedModel, batch: int = 400, **kwargs: Any
) -> RunReport:
    runner = scoring_runner(
        lake, source, None, max_batch_records=batch, model=model, job=job_of(source)
    )
    return runner.run(**kwargs)


def payloads_of(source: FileSource, path: Path) -> list[dict[str, Any]]:
    """What the job got from one file: its records' payloads, read again from the start."""
    got = source.read(FILES_SHARD, None, None, 1 << 30)
    return [json.loads(r.data) for r in got if r.shard_id == str(path)]


def file_log(lake: Lake) -> list[dict[str, Any]]:
    rows = lake.read(FILE_LOG).drop_columns(["at"]).to_pylist()
    return sorted(rows, key=lambda r: (r["log_write"], r["event"], r["file_index"] or -1))


# --------------------------------------------------------------------------- discovery


def test_new_files_between_runs_are_picked_up_and_old_ones_never_read_again(
    tmp_path: Path,
    small_sim: Simulation,
    tiny_model: LoadedModel,
    monkeypatch: pytest.MonkeyPatch,
    lake_root: str,
) -> None:
    """On a local lake and on S3: the file log and checkpoints are Delta tables like the rest."""
    rows = records(small_sim.transactions.slice(0, 400).to_pylist())
    folder, lake = tmp_path / "in", Lake(lake_root)
    first = [land(folder / f"a{i}.jsonl", jsonl(rows[i * 100 : (i + 1) * 100]), i) for i in (0, 1)]
    opened: list[str] = []
    read_file = FileSource._open

    def counting(self: FileSource, entry: Any) -> bytes:
        opened.append(entry.path)
        return read_file(self, entry)

    monkeypatch.setattr(FileSource, "_open", counting)
    report = score(lake, FileSource(folder, lake), tiny_model, batch=150)
    assert report.n_records == 200 and lake.count(SCORES) == 200
    assert len(report.batches) == 2  # the second batch spans both files

    later = [land(folder / f"b{i}.jsonl", jsonl(rows[i * 100 : (i + 1) * 100]), i) for i in (2, 3)]
    land(folder / "_SUCCESS", b"", 4)  # markers and hidden files are not data
    land(folder / "notes.txt", b"not a data file", 4)
    opened.clear()
    source = FileSource(folder, lake)  # a new process: everything it knows is in the lake
    report = score(lake, source, tiny_model, batch=150)
    assert report.n_records == 200 and lake.count(SCORES) == 400
    assert set(opened) == {str(p) for p in later}  # finished files are not even opened
    assert score(lake, source, tiny_model).batches == []

    reads = source.file_batches(job_of(source)).to_pylist()
    # Batches of 150 over files of 100: each file is read by the batches its rows fell in.
    assert [(r["batch_id"], r["file_index"]) for r in reads] == [
        (0, 0), (0, 1), (1, 1), (2, 2), (2, 3), (3, 3),
    ]  # fmt: skip
    assert reads[0]["path"] == str(first[0]) and reads[-1]["path"] == str(later[1])
    assert all(r["committed"] for r in reads)
    logged = [(f.index, f.path) for f in source.logged_files()]
    assert logged == list(enumerate(str(p) for p in [*first, *later]))
    ids = lake.read(TRANSACTIONS, columns=["transaction_id"])["transaction_id"].to_pylist()
    assert sorted(ids) == sorted(r["transaction_id"] for r in rows)


# --------------------------------------------------------------------------- crash and rerun


@pytest.fixture(scope="module")
def landed(tmp_path_factory: pytest.TempPathFactory, small_sim: Simulation) -> Path:
    """Five files of transactions with bad lines among them (one CSV), never changed."""
    folder = tmp_path_factory.mktemp("landed")
    rows = records(small_sim.transactions.slice(0, 1200).to_pylist())
    for i in range(4):
        part: list[dict[str, Any] | bytes] = list(rows[i * 250 : (i + 1) * 250])
        part.insert(7, b"{not json")
        land(folder / f"part-{i}.jsonl", jsonl(part), i)
    land(folder / "part-4.csv", csv_bytes(rows[1000:]), 4)
    return folder


TABLE_KEYS = {
    TRANSACTIONS: "transaction_id",
    FEATURES: "transaction_id",
    SCORES: "transaction_id",
    ALERTS: "transaction_id",
    CUSTOMER_STATE: "customer_id",
    TERMINAL_STATE: "terminal_id",
    DEAD_LETTER_TABLE: "sequence_number",
}


@pytest.fixture(scope="module")
def clean_files_run(
    tmp_path_factory: pytest.TempPathFactory, landed: Path, tiny_model: LoadedModel
) -> Lake:
    lake = Lake(tmp_path_factory.mktemp("clean-files") / "lake")
    score(lake, FileSource(landed, lake, schema_hints="amount double"), tiny_model)
    return lake


def assert_same_lake(lake: Lake, clean: Lake) -> None:
    for name, key in TABLE_KEYS.items():
        assert table_snapshot(lake, name, key) == table_snapshot(clean, name, key), name
    assert file_log(lake) == file_log(clean)
    schemas = [lake.read(SCHEMA_TABLE).drop_columns(["at"]) for lake in (lake, clean)]
    assert schemas[0].equals(schemas[1])


@pytest.mark.parametrize("crash_after", [DEAD_LETTER_TABLE, SCORES, CUSTOMER_STATE, "commit"])
def test_a_crash_mid_batch_then_rerun_equals_a_clean_run(
    tmp_path: Path,
    landed: Path,
    tiny_model: LoadedModel,
    clean_files_run: Lake,
    crash_after: str,
) -> None:
    assert crash_after in CRASH_POINTS
    lake = Lake(tmp_path / "lake")
    source = FileSource(landed, lake, schema_hints="amount double")
    template = scoring_runner(
        lake, source, None, max_batch_records=400, model=tiny_model, job=job_of(source)
    )
    crashing = CrashingRunner(
        source,
        template.processor,
        lake,
        template.job,
        max_batch_records=400,
        table=crash_after,
        batch=2,  # its 400 records span files 1 and 2
    )
    with pytest.raises(CrashError):
        crashing.run()
    # A new process: a new source, knowing only what the lake holds.
    fresh = FileSource(landed, lake, schema_hints="amount double")
    report = score(lake, fresh, tiny_model)
    assert report.batches[0].replayed is (crash_after != "commit")
    assert_same_lake(lake, clean_files_run)
    reads = fresh.file_batches(job_of(fresh)).to_pylist()
    assert sorted({r["file_index"] for r in reads}) == [0, 1, 2, 3, 4]


def test_files_logged_but_never_planned_are_read_by_the_next_run_once(
    tmp_path: Path, landed: Path, tiny_model: LoadedModel, clean_files_run: Lake
) -> None:
    lake = Lake(tmp_path / "lake")
    # A process that listed and read a batch, then died before the runner planned it.
    dead = FileSource(landed, lake, schema_hints="amount double")
    assert len(dead.read(FILES_SHARD, None, None, 400)) == 400
    assert len(dead.logged_files()) == 5
    score(lake, FileSource(landed, lake, schema_hints="amount double"), tiny_model)
    assert_same_lake(lake, clean_files_run)


# --------------------------------------------------------------------------- overwrites


def test_a_file_overwritten_in_place_is_ignored_by_default_and_read_again_when_allowed(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    rows = records(small_sim.transactions.slice(0, 30).to_pylist())
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    path = land(folder / "a.jsonl", jsonl(rows[:20]), 0)
    assert score(lake, FileSource(folder, lake), tiny_model).n_records == 20

    land(path, jsonl(rows[20:]), 5)  # same path, new content
    assert score(lake, FileSource(folder, lake), tiny_model).batches == []
    events = [(r["event"], r["path"], r["file_index"]) for r in file_log(lake)]
    assert events[-1] == ("ignored", str(path), None)
    assert score(lake, FileSource(folder, lake), tiny_model).batches == []
    assert file_log(lake)[-1]["event"] == "ignored"  # said once, not at every listing

    source = FileSource(folder, lake, allow_overwrites=True)
    assert score(lake, source, tiny_model).n_records == 10
    assert lake.count(SCORES) == 30
    assert [(f.index, f.path) for f in source.logged_files()] == [(0, str(path)), (1, str(path))]
    assert [r["event"] for r in file_log(lake) if r["event"] != "counted"][-1] == "overwritten"

    # Same size, only a new modification time: overwritten too.
    os.utime(path, (BASE_TIME + 9, BASE_TIME + 9))
    assert score(lake, source, tiny_model).n_records == 10  # read again as file 2: repeats
    assert lake.count(SCORES) == 30 and lake.count(DEAD_LETTER_TABLE) == 10


def test_a_file_changed_after_it_was_logged_stops_the_read_rather_than_read_other_rows(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    rows = records(small_sim.transactions.slice(0, 10).to_pylist())
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    path = land(folder / "a.jsonl", jsonl(rows), 0)
    FileSource(folder, lake).discover()
    land(path, jsonl(rows[:5]), 3)  # rewritten before any of it was read
    with pytest.raises(FileChangedError, match="changed since it was logged"):
        score(lake, FileSource(folder, lake), tiny_model)
    assert lake.count(SCORES) == 0


# --------------------------------------------------------------------------- schema


def two_files(folder: Path, sim: Simulation) -> tuple[Path, Path, list[dict[str, Any]]]:
    """a.jsonl: 40 transactions; b.jsonl: 10 with a new `merchant` column, then one whose
    amount is a string (a wrong type)."""
    rows = records(sim.transactions.slice(0, 51).to_pylist())
    a = land(folder / "a.jsonl", jsonl(rows[:40]), 0)
    newer = [{**r, "merchant": f"m{i}"} for i, r in enumerate(rows[40:50])]
    wrong = {**rows[50], "amount": "12.5"}
    return a, land(folder / "b.jsonl", jsonl([*newer, wrong]), 1), rows


@pytest.mark.parametrize("mode", ["addNewColumns", "rescue", "failOnNewColumns", "none"])
def test_schema_modes_with_a_new_column_and_a_wrong_typed_value(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel, mode: SchemaMode
) -> None:
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    _, b, rows = two_files(folder, small_sim)
    b_data = b.read_bytes()
    b.unlink()  # first only a.jsonl: the schema is inferred from it
    source = FileSource(folder, lake, schema_mode=mode, schema_hints={"amount": "double"})
    assert score(lake, source, tiny_model).n_records == 40
    (first,) = schema_history(lake, source.source)
    assert first.types["amount"] == "double" and "merchant" not in first.types
    land(b, b_data, 1)

    if mode in ("addNewColumns", "failOnNewColumns"):
        error = SchemaEvolved if mode == "addNewColumns" else UnknownColumns
        with pytest.raises(error, match=f"{b} row 1: .*merchant string"):
            score(lake, source, tiny_model)
        assert lake.count(SCORES) == 40  # nothing of the batch that met it was planned
        if mode == "failOnNewColumns":
            with pytest.raises(UnknownColumns, match="change_schema"):
                score(lake, FileSource(folder, lake, schema_mode=mode), tiny_model)
            assert len(schema_history(lake, source.source)) == 1
            change_schema(lake, source.source, add={"merchant": "string"})
    report = score(lake, FileSource(folder, lake, schema_mode=mode), tiny_model)
    assert report.n_records == 11 and lake.count(SCORES) == 50
    # What was rescued from a valid record is kept with it in `transactions` (canonical JSON).
    assert schema.RESCUED_DATA == RESCUED_DATA  # the parser keeps what the source writes
    kept = lake.read(TRANSACTIONS, columns=["transaction_id", "shard_id", RESCUED_DATA])
    by_id = {r["transaction_id"]: r for r in kept.to_pylist()}
    assert len(by_id) == 50
    for i, row in enumerate(rows[:50]):
        got_row = by_id[row["transaction_id"]]
        if mode == "rescue" and i >= 40:
            want = {"merchant": f"m{i - 40}", "_file_path": str(b)}
            assert got_row[RESCUED_DATA] == json.dumps(want, sort_keys=True, separators=(",", ":"))
            assert got_row["shard_id"] == str(b)
        else:
            assert got_row[RESCUED_DATA] is None

    history = schema_history(lake, source.source)
    evolves = mode in ("addNewColumns", "failOnNewColumns")
    assert len(history) == (2 if evolves else 1)
    assert ("merchant" in history[-1].types) is evolves
    got = payloads_of(FileSource(folder, lake, schema_mode=mode), b)
    for i, payload in enumerate(got[:10]):
        assert payload["transaction_id"] == rows[40 + i]["transaction_id"]
        if evolves:
            assert payload["merchant"] == f"m{i}" and "_rescued_data" not in payload
        elif mode == "rescue":
            assert "merchant" not in payload
            assert payload["_rescued_data"] == {"merchant": f"m{i}", "_file_path": str(b)}
        else:
            assert "merchant" not in payload and "_rescued_data" not in payload
    # In every mode the wrong-typed amount is rescued, and the record dead-lettered with it.
    rescued = {"amount": "12.5", "_file_path": str(b)}
    assert got[10]["_rescued_data"] == rescued and "amount" not in got[10]
    (dead,) = lake.read(DEAD_LETTER_TABLE).to_pylist()
    assert json.loads(dead["payload"])["_rescued_data"] == rescued
    assert "missing required field(s): amount" in dead["reason"]
    assert dead["shard_id"] == str(b) and dead["sequence_number"] == sequence_number(1, 11)


def test_rescued_data_in_csv_and_parquet_names_the_value_and_the_file(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    table = small_sim.transactions.slice(0, 20).select(TRANSACTION_SCHEMA.names)
    rows = records(table.to_pylist())
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    text = land(folder / "a.csv", csv_bytes([*rows[:9], {**rows[9], "amount": "abc"}]), 0)
    good = land(folder / "b.parquet", parquet_bytes(table.slice(10, 5)), 1)
    as_text = table.slice(15, 5).set_column(
        4, "amount", pa.array(["1.5", None, "x", "2", "3"], pa.string())
    )
    typed = land(folder / "c.parquet", parquet_bytes(as_text), 2)
    source = FileSource(folder, lake, schema_mode="rescue", schema_hints="amount double")
    report = score(lake, source, tiny_model)
    assert report.n_records == 20
    dead = {r["sequence_number"]: r for r in lake.read(DEAD_LETTER_TABLE).to_pylist()}
    from_csv = json.loads(dead[sequence_number(0, 11)]["payload"])  # line 11: header + 10
    assert from_csv["_rescued_data"] == {"amount": "abc", "_file_path": str(text)}
    assert from_csv["transaction_id"] == rows[9]["transaction_id"] and "amount" not in from_csv
    # A Parquet column of another type: each value rescued (strings stay strings).
    by_row = {
        position: json.loads(dead[sequence_number(2, position)]["payload"])
        for position in (1, 3, 4, 5)
    }
    assert [p["_rescued_data"]["amount"] for p in by_row.values()] == ["1.5", "x", "2", "3"]
    assert all(p["_rescued_data"]["_file_path"] == str(typed) for p in by_row.values())
    assert sequence_number(2, 2) in dead  # the null amount: missing, nothing to rescue
    assert len(dead) == 6 and lake.count(SCORES) == 14
    assert all("_rescued_data" not in p for p in payloads_of(source, good))


# --------------------------------------------------------------------------- formats


def test_csv_json_lines_and_parquet_give_the_same_scored_rows(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    table = small_sim.transactions.slice(0, 900).select(TRANSACTION_SCHEMA.names)
    halves = [table.slice(0, 450), table.slice(450)]
    writers = {
        "json": lambda t: jsonl(records(t.to_pylist())),
        "csv": lambda t: csv_bytes(records(t.to_pylist())),
        "parquet": parquet_bytes,
    }
    lakes = {}
    for fmt, write in writers.items():
        folder, lake = tmp_path / fmt / "in", Lake(tmp_path / fmt / "lake")
        for i, half in enumerate(halves):
            land(folder / f"part-{i}.{'jsonl' if fmt == 'json' else fmt}", write(half), i)
        report = score(lake, FileSource(folder, lake), tiny_model, batch=300)
        assert report.n_records == 900 and len(report.batches) == 3
        lakes[fmt] = lake
    assert lakes["json"].count(SCORES) == 900
    for name, key in TABLE_KEYS.items():
        if name == DEAD_LETTER_TABLE:
            continue
        snapshots = [table_snapshot(lake, name, key) for lake in lakes.values()]
        for rows in snapshots:
            for row in rows:  # which file and row a transaction came from differs, of course
                row.pop("shard_id", None), row.pop("sequence_number", None)
        assert snapshots[0] == snapshots[1] == snapshots[2], name
    types = {
        fmt: schema_history(lake, str(tmp_path / fmt / "in"))[0].types
        for fmt, lake in lakes.items()
    }
    assert (
        types["json"]["amount"] == types["csv"]["amount"] == types["parquet"]["amount"] == "double"
    )
    assert types["parquet"]["event_time"] == "timestamp" and types["csv"]["event_time"] == "string"


def test_a_malformed_line_is_dead_lettered_with_its_file_and_line(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    rows = records(small_sim.transactions.slice(0, 6).to_pylist())
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    lines = [
        json.dumps(rows[0]).encode(),
        b"",
        b"{not json",
        json.dumps(rows[1]).encode(),
        b"[1, 2]",
    ]
    a = land(folder / "a.jsonl", b"\r\n".join(lines) + b"\r\n", 0)
    broken = csv_bytes(rows[2:4]) + b"T9,2026-01-01T00:00:00Z,C1,T1,5.0,debit,pos,home,extra\n"
    b = land(folder / "b.csv", broken + csv_bytes(rows[4:6]).split(b"\n", 1)[1], 1)
    source = FileSource(folder, lake)
    assert score(lake, source, tiny_model).n_records == 9
    assert lake.count(SCORES) == 6
    dead = sorted(lake.read(DEAD_LETTER_TABLE).to_pylist(), key=lambda r: r["sequence_number"])
    assert [(r["shard_id"], r["sequence_number"]) for r in dead] == [
        (str(a), sequence_number(0, 3)),
        (str(a), sequence_number(0, 5)),
        (str(b), sequence_number(1, 4)),
    ]
    assert [source.locate(r["sequence_number"]) for r in dead] == [
        (str(a), 3),
        (str(a), 5),
        (str(b), 4),
    ]
    assert dead[0]["payload"] == b"{not json" and "not valid JSON" in dead[0]["reason"]
    assert dead[1]["payload"] == b"[1, 2]" and "not an object" in dead[1]["reason"]
    assert dead[2]["payload"].endswith(b",extra")


# --------------------------------------------------------------------------- rate limits


@pytest.mark.parametrize("limit", ["files", "bytes", "records"])
def test_rate_limits_bound_each_batch(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel, limit: str
) -> None:
    rows = records(small_sim.transactions.slice(0, 30).to_pylist())
    folder, lake = tmp_path / "in", Lake(tmp_path / "lake")
    paths = [land(folder / f"f{i}.jsonl", jsonl(rows[i * 5 : (i + 1) * 5]), i) for i in range(6)]
    sizes = [p.stat().st_size for p in paths]
    options: dict[str, Any] = {
        "files": {"max_files_per_batch": 2},
        "bytes": {"max_bytes_per_batch": 2 * max(sizes) + min(sizes) // 2},
        "records": {},
    }[limit]
    source = FileSource(folder, lake, **options)
    report = score(lake, source, tiny_model, batch=7 if limit == "records" else 1000)
    assert report.n_records == 30 and lake.count(SCORES) == 30
    per_batch: dict[int, list[int]] = {}
    for r in source.file_batches(job_of(source)).to_pylist():
        per_batch.setdefault(r["batch_id"], []).append(r["file_index"])
    if limit == "records":
        assert [b.n_records for b in report.batches] == [7, 7, 7, 7, 2]
        assert list(per_batch.values()) == [[0, 1], [1, 2], [2, 3, 4], [4, 5], [5]]
    else:
        assert list(per_batch.values()) == [[0, 1], [2, 3], [4, 5]]


def test_a_uri_root_is_read_through_a_pyarrow_filesystem(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    """What `s3://bucket/prefix` takes (paths without a leading slash, the URI kept in the
    lake), on pyarrow's in-memory filesystem instead of S3."""
    memory = pafs._MockFileSystem()
    rows = records(small_sim.transactions.slice(0, 20).to_pylist())
    for i in range(2):
        memory.create_dir(f"bucket/in/day={i}")
        with memory.open_output_stream(f"bucket/in/day={i}/part.jsonl") as out:
            out.write(jsonl(rows[i * 10 : (i + 1) * 10]))
    lake = Lake(tmp_path / "lake")
    source = FileSource("mock://bucket/in", lake, filesystem=memory)
    assert score(lake, source, tiny_model).n_records == 20
    lineage = set(lake.read(TRANSACTIONS, columns=["shard_id"])["shard_id"].to_pylist())
    assert lineage == {f"mock://bucket/in/day={i}/part.jsonl" for i in range(2)}
    assert score(lake, source, tiny_model).batches == []


# --------------------------------------------------------------------------- command line


def test_score_files_from_the_command_line(
    tmp_path: Path, small_sim: Simulation, champion_home: Home
) -> None:
    home = Home(tmp_path / "home")
    shutil.copytree(champion_home.mlflow, home.mlflow)
    rows = records(small_sim.transactions.slice(0, 50).to_pylist())
    folder = tmp_path / "in"
    land(folder / "a.csv", csv_bytes(rows), 0)
    done = run_cli("score", "--files", str(folder), "--schema-hints", "amount double",
                   home=home.root)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1 batch(es), 50 records")
    assert Lake(home.lake).count(SCORES) == 50
    again = run_cli("score", "--files", str(folder), home=home.root)
    assert again.returncode == 0 and again.stdout.startswith("0 batch(es), 0 records")
    for args in (["--files", "x", "--stream", "s"], ["--schema-mode", "rescue"]):
        bad = run_cli("score", *args, home=home.root)
        assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
        assert "error:" in bad.stderr and bad.stdout == ""
