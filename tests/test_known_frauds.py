"""Known frauds kept incrementally: the same terminal risk as joining every label every batch.

Labels are loaded as a bank would get them, between micro-batches: before each batch, those
reported by its last event. The runner folds each new label file in once and keeps the joined
rows in `known_frauds`; its terminal features must equal a replay of the whole history with all
labels (which only lets a fraud count once reported by the event's time).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.features import LOOKBACK_SECONDS, TERMINAL_FEATURES, replay
from models.job import (
    FEATURES,
    TRANSACTIONS,
    TRANSACTIONS_TABLE_SCHEMA,
    batch_known_frauds,
    with_lineage,
)
from models.known_frauds import (
    KNOWN_FRAUDS,
    KNOWN_LABEL_FILES,
    LABEL_LOCATION_SCHEMA,
    LABELS_TABLE_SCHEMA,
    KnownFrauds,
    _unique,
)
from models.registry import LoadedModel
from models.schema import LABEL_SCHEMA, LABELS, to_payload
from models.simulate import Simulation
from streamguard.lake import Lake
from streamguard.pipeline import ensure_tables, load_labels, scoring_runner
from streamguard.sources import MemorySource

BATCH = 250


def test_labels_loaded_between_batches_give_the_replays_terminal_risk(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    tx, labels = small_sim.transactions, small_sim.labels
    rows = tx.to_pylist()
    source = MemorySource.split([to_payload(r) for r in rows], [r["customer_id"] for r in rows], 1)
    lake = Lake(tmp_path / "lake")
    runner = scoring_runner(lake, source, None, max_batch_records=BATCH, model=tiny_model)
    times = tx["event_time"]
    loads = 0  # loads that brought new labels (each writes one label file)
    loaded: set[str] = set()
    for start in range(0, tx.num_rows, BATCH):
        last = pc.max(times.slice(start, BATCH))
        due = labels.filter(pc.less_equal(labels["reported_at"], last))
        if due.num_rows:
            load_labels(lake, due)  # an upsert: labels loaded before change nothing
            fresh = set(due["transaction_id"].to_pylist()) - loaded
            loads += bool(fresh)
            loaded |= fresh
        report = runner.run(max_batches=1)
        assert len(report.batches) == 1
    assert loads > 3
    # The terminal features equal the replay's (one shard, batches in event-time order).
    got = lake.read(FEATURES).sort_by("transaction_id")
    want = replay(tx, labels).features.sort_by("transaction_id")
    assert got["transaction_id"].equals(want["transaction_id"])
    for name in TERMINAL_FEATURES:
        a = got[name].to_numpy(zero_copy_only=False)
        b = want[name].to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=0, equal_nan=True, err_msg=name)
    assert pc.max(got["terminal_fraud_rate_30d"]).as_py() > 0
    # `known_frauds` holds every fraud reported by the end of a scored transaction, once.
    kept = lake.read(KNOWN_FRAUDS)
    loaded = labels.filter(pc.less_equal(labels["reported_at"], pc.max(times)))
    scored = set(lake.read(TRANSACTIONS, columns=["transaction_id"])["transaction_id"].to_pylist())
    expected = {t for t in loaded["transaction_id"].to_pylist() if t in scored}
    assert kept.num_rows == len(set(kept["transaction_id"].to_pylist())) == len(expected) > 0
    assert set(kept["transaction_id"].to_pylist()) == expected
    # Each label file was folded in by exactly one batch, and every current one was; a label
    # load only appends new labels, so a file is never read twice.
    folded = lake.read(KNOWN_LABEL_FILES)["path"].to_pylist()
    assert len(folded) == len(set(folded)) == loads
    assert set(lake.files("labels")) == set(folded)


def test_a_replayed_batch_adds_the_same_known_frauds(
    tmp_path: Path, small_sim: Simulation, tiny_model: LoadedModel
) -> None:
    """The rows a batch adds depend on its planned labels version, not on labels loaded since."""
    tx, labels = small_sim.transactions, small_sim.labels
    lake = Lake(tmp_path / "lake")
    batch = tx.slice(0, 1_000)
    mine = labels.filter(pc.is_in(labels["transaction_id"], value_set=batch["transaction_id"]))
    load_labels(lake, mine.take(list(range(0, mine.num_rows, 2))))  # every other one first
    planned = lake.version("labels")
    first = batch_known_frauds(lake, batch, 0, planned)
    load_labels(lake, labels)  # more labels arrive before the replay
    again = batch_known_frauds(lake, batch, 0, planned)
    assert first.new.equals(again.new) and first.label_files.equals(again.label_files)
    assert first.new.num_rows > 0
    later = batch_known_frauds(lake, batch, 0, lake.version("labels"))
    assert later.new.num_rows > first.new.num_rows


def test_one_row_per_fraud_the_first_in_order() -> None:
    """Stored and newly joined frauds overlap on a replay: the first row of each id stays."""
    rng = np.random.default_rng(3)
    ids = [f"tx{i}" for i in rng.integers(0, 400, 2_000)]
    table = pa.table({"transaction_id": ids, "row": np.arange(len(ids))})
    chunked = pa.concat_tables([table.slice(0, 700), table.slice(700)])
    first: dict[str, int] = {}
    for row, i in enumerate(ids):
        first.setdefault(i, row)
    expected = sorted(first.values())
    assert _unique(chunked)["row"].to_pylist() == expected
    assert len(expected) < len(ids) / 4


# ------------------------------------------------------------------ labels the loader located

APP = "test-known-frauds"


class OldPathLake(Lake):
    """The lake with the labels' stored locations hidden: every fold reads `transactions` as it
    did before the loader located labels (the reference the located path must equal)."""

    def read(self, name: str, *args: Any, **kwargs: Any) -> pa.Table:
        table = super().read(name, *args, **kwargs)
        if name != LABELS:
            return table
        for field in LABEL_LOCATION_SCHEMA:
            if field.name in table.column_names:
                at = table.column_names.index(field.name)
                table = table.set_column(at, field, pa.nulls(table.num_rows, field.type))
        return table


class CountingLake(Lake):
    """The lake, recording each read of `transactions`: the files it was limited to (None: all
    of the filtered partitions) and the version."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.reads: list[tuple[list[str] | None, int | None]] = []

    def read(self, name: str, *args: Any, **kwargs: Any) -> pa.Table:
        if name == TRANSACTIONS:
            files = kwargs.get("files")
            self.reads.append((None if files is None else list(files), kwargs.get("version")))
        return super().read(name, *args, **kwargs)


def _write_transactions(lake: Lake, batch: pa.Table, batch_id: int) -> None:
    n = batch.num_rows
    rows = with_lineage(
        batch,
        batch_id,
        pa.repeat(pa.scalar("s"), n),
        pa.array(map(str, range(n))),
        datetime.now(UTC),
    )
    lake.append(TRANSACTIONS, rows.cast(TRANSACTIONS_TABLE_SCHEMA), APP, batch_id)


def _write_folds(lake: Lake, known: KnownFrauds, batch_id: int) -> None:
    if known.new.num_rows:
        lake.upsert(KNOWN_FRAUDS, known.new, ["transaction_id"], APP, batch_id)
    if known.label_files.num_rows:
        lake.append(KNOWN_LABEL_FILES, known.label_files, APP, batch_id)


def _assert_same(got: KnownFrauds, want: KnownFrauds) -> None:
    order = [(c, "ascending") for c in got.frauds.column_names]
    assert got.frauds.sort_by(order).equals(want.frauds.sort_by(order))
    assert got.new.sort_by("transaction_id").equals(want.new.sort_by("transaction_id"))
    assert got.label_files.sort_by("path").equals(want.label_files.sort_by("path"))


def _labels_of(labels: pa.Table, batch: pa.Table) -> pa.Table:
    return labels.filter(pc.is_in(labels["transaction_id"], value_set=batch["transaction_id"]))


def test_located_labels_fold_the_same_frauds_as_the_full_read(
    tmp_path: Path, small_sim: Simulation
) -> None:
    """Labels loaded ahead of their transactions (a replay of history), between a batch's plan
    and its commit (the in-flight race: not in `transactions` at the loader's version, found in
    the files added since, compacted or not), after them, and during a crashed batch's replay:
    each batch folds exactly what the full read of `transactions` folds."""
    tx, labels = small_sim.transactions, small_sim.labels
    lake, old = Lake(tmp_path / "lake"), OldPathLake(tmp_path / "lake")
    ensure_tables(lake)
    step = 150
    batches = [tx.slice(s, step) for s in range(0, tx.num_rows, step)]
    load_labels(lake, labels.take(list(range(0, labels.num_rows, 5))))  # ahead: a replay
    for k, batch in enumerate(batches):
        planned = lake.version(LABELS)
        if k % 3 == 1:  # in flight: after the plan, before the batch's rows are in the lake
            load_labels(lake, _labels_of(labels, pa.concat_tables([batches[k - 1], batch])))
        known = batch_known_frauds(lake, batch, k, planned)
        _assert_same(known, batch_known_frauds(old, batch, k, planned))
        _write_transactions(lake, batch, k)
        if k == 8:  # the attempt dies here; labels of its rows arrive; the batch is replayed
            load_labels(lake, _labels_of(labels, batch))
            again = batch_known_frauds(lake, batch, k, planned)
            _assert_same(again, known)
            _assert_same(again, batch_known_frauds(old, batch, k, planned))
        _write_folds(lake, known, k)
        if k == 4:  # rows appended after the loader's version now sit in a compacted file
            assert lake.compact(TRANSACTIONS)["files_removed"] > 1
        last = pc.max(batch["event_time"])
        load_labels(lake, labels.filter(pc.less_equal(labels["reported_at"], last)))
    # Every kind of label was there: located at V, not there at V, and each one then folded by
    # a later batch from the files added after V (no other path can give those rows).
    stored = lake.read(LABELS)
    assert pc.sum(pc.is_valid(stored["event_time"])).as_py() > 20
    unlocated = stored.filter(
        pc.and_(pc.is_null(stored["event_time"]), pc.is_valid(stored["transactions_version"]))
    )
    scored = lake.read(TRANSACTIONS, columns=["transaction_id", "batch_id"])
    folded = (
        lake.read(KNOWN_FRAUDS, columns=["transaction_id", "batch_id"])
        .rename_columns(["transaction_id", "folded_by"])
        .join(scored, "transaction_id")
        .join(unlocated.select(["transaction_id"]), "transaction_id", join_type="inner")
    )
    assert pc.sum(pc.less(folded["batch_id"], folded["folded_by"])).as_py() > 5


def test_a_fold_reads_no_transactions_for_located_labels_and_only_later_files_for_the_rest(
    tmp_path: Path, small_sim: Simulation
) -> None:
    tx, labels = small_sim.transactions, small_sim.labels
    lake, old = CountingLake(tmp_path / "lake"), OldPathLake(tmp_path / "lake")
    ensure_tables(lake)
    batches = [tx.slice(s, 300) for s in range(0, 1_500, 300)]
    for k in (0, 1):
        _write_transactions(lake, batches[k], k)
    load_labels(lake, _labels_of(labels, pa.concat_tables(batches[:3])))  # batch 2: not yet in
    at = lake.version(TRANSACTIONS)
    assert at is not None
    # Batch 2 folds the labels: those of batches 0 and 1 were located, no read of transactions.
    planned = lake.version(LABELS)
    lake.reads.clear()
    known = batch_known_frauds(lake, batches[2], 2, planned)
    assert lake.reads == []
    assert known.new.num_rows > 5
    _assert_same(known, batch_known_frauds(old, batches[2], 2, planned))
    # Nor for a batch whose window reaches only some of those transactions: the rest are not kept.
    shift = pa.scalar(timedelta(seconds=LOOKBACK_SECONDS - 86_400))
    moved = batches[2].set_column(1, "event_time", pc.add(batches[2]["event_time"], shift))
    late = batch_known_frauds(lake, moved, 2, planned)
    assert lake.reads == []
    assert 0 < late.new.num_rows < known.new.num_rows
    _assert_same(late, batch_known_frauds(old, moved, 2, planned))
    # Batch 2's rows land; a batch that folds the same file (none did: nothing written) reads
    # only the files added to `transactions` after the loader's version for batch 2's labels.
    _write_transactions(lake, batches[2], 2)
    _write_transactions(lake, batches[3], 3)
    after = sorted(set(lake.files(TRANSACTIONS)) - set(lake.files(TRANSACTIONS, version=at)))
    assert after and len(after) < len(lake.files(TRANSACTIONS))
    lake.reads.clear()
    known = batch_known_frauds(lake, batches[4], 4, planned)
    assert [(sorted(files or []), v) for files, v in lake.reads] == [
        (after, lake.version(TRANSACTIONS))
    ]
    mine = _labels_of(labels, batches[2])["transaction_id"]
    assert pc.sum(pc.is_in(known.new["transaction_id"], value_set=mine)).as_py() > 0
    _assert_same(known, batch_known_frauds(old, batches[4], 4, planned))


def test_labels_written_without_locations_are_folded_as_before(
    tmp_path: Path, small_sim: Simulation
) -> None:
    """A labels table written before the locations existed (or by another writer) still folds:
    its rows read back null and take the full read of `transactions`."""
    tx, labels = small_sim.transactions, small_sim.labels
    lake = CountingLake(tmp_path / "lake")
    ensure_tables(lake)
    batches = [tx.slice(s, 300) for s in range(0, 900, 300)]
    _write_transactions(lake, batches[0], 0)
    _write_transactions(lake, batches[1], 1)
    lake.append(LABELS, _labels_of(labels, batches[0]), APP, 0)  # the label contract only
    load_labels(lake, _labels_of(labels, batches[1]))  # located, into the same table
    stored = lake.read(LABELS, schema=LABELS_TABLE_SCHEMA)
    assert stored.schema.names == LABELS_TABLE_SCHEMA.names
    assert pc.sum(pc.is_null(stored["transactions_version"])).as_py() > 0
    lake.reads.clear()
    planned = lake.version(LABELS)
    known = batch_known_frauds(lake, batches[2], 2, planned)
    assert [files for files, _ in lake.reads] == [None]
    _assert_same(known, batch_known_frauds(OldPathLake(lake.root), batches[2], 2, planned))
    both = _labels_of(labels, pa.concat_tables(batches[:2]))
    assert set(known.new["transaction_id"].to_pylist()) == set(both["transaction_id"].to_pylist())


def test_labels_of_repeated_ids_and_labels_merged_by_other_writers_fold_as_before(
    tmp_path: Path, small_sim: Simulation
) -> None:
    """An id `transactions` holds twice (a repeat on another event date) is left unlocated, so
    the fold reads for it as before; a located label another writer MERGEs anew (contract
    columns only) keeps its location, still true of its transaction."""
    tx, labels = small_sim.transactions, small_sim.labels
    lake = CountingLake(tmp_path / "lake")
    ensure_tables(lake)
    batches = [tx.slice(s, 300) for s in range(0, 900, 300)]
    mine = _labels_of(labels, batches[0])
    twice = mine["transaction_id"][0].as_py()
    repeat = batches[0].filter(pc.equal(batches[0]["transaction_id"], twice))
    one_day = pa.scalar(timedelta(days=1))
    repeat = repeat.set_column(1, "event_time", pc.add(repeat["event_time"], one_day))
    _write_transactions(lake, batches[0], 0)
    _write_transactions(lake, pa.concat_tables([batches[1], repeat.cast(batches[1].schema)]), 1)
    load_labels(lake, _labels_of(labels, pa.concat_tables(batches[:2])))
    stored = lake.read(LABELS)
    row = stored.filter(pc.equal(stored["transaction_id"], twice))
    assert row["transactions_version"].null_count == 1 and row["event_time"].null_count == 1
    assert pc.sum(pc.is_valid(stored["event_time"])).as_py() > 5
    # Another writer re-reports a located label with the label contract's columns only.
    other = mine.filter(pc.not_equal(mine["transaction_id"], twice)).slice(0, 1)
    moved = pc.add(other["reported_at"], pa.scalar(timedelta(hours=1)))
    rewritten = other.set_column(2, "reported_at", moved).cast(LABEL_SCHEMA)
    lake.upsert(LABELS, rewritten, ["transaction_id"])
    again = lake.read(LABELS)
    kept = again.filter(pc.equal(again["transaction_id"], other["transaction_id"][0]))
    assert kept["event_time"].null_count == 0 and kept["reported_at"].equals(
        pa.chunked_array([moved])
    )
    lake.reads.clear()
    planned = lake.version(LABELS)
    known = batch_known_frauds(lake, batches[2], 2, planned)
    assert [files for files, _ in lake.reads] == [None]  # the repeated id: the full read
    old = batch_known_frauds(OldPathLake(lake.root), batches[2], 2, planned)
    others = pc.not_equal(known.new["transaction_id"], twice)
    assert (
        known.new.filter(others)
        .sort_by("transaction_id")
        .equals(
            old.new.filter(pc.not_equal(old.new["transaction_id"], twice)).sort_by("transaction_id")
        )
    )
    assert twice in known.new["transaction_id"].to_pylist()
    assert known.label_files.sort_by("path").equals(old.label_files.sort_by("path"))
