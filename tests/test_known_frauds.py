"""Known frauds kept incrementally: the same terminal risk as joining every label every batch.

Labels are loaded as a bank would get them, between micro-batches: before each batch, those
reported by its last event. The runner folds each new label file in once and keeps the joined
rows in `known_frauds`; its terminal features must equal a replay of the whole history with all
labels (which only lets a fraud count once reported by the event's time).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.features import TERMINAL_FEATURES, replay
from models.job import FEATURES, TRANSACTIONS, batch_known_frauds
from models.known_frauds import KNOWN_FRAUDS, KNOWN_LABEL_FILES, _unique
from models.registry import LoadedModel
from models.schema import to_payload
from models.simulate import Simulation
from streamguard.lake import Lake
from streamguard.pipeline import load_labels, scoring_runner
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
