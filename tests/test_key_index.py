"""The lake's key index (`Lake.files_holding`) against the files themselves, on real Delta tables.

Whatever happens to the table (appends by this lake and another writer, compaction, a partition
asked about late), the files it names for some keys must be exactly the files that hold them;
a miss must be certain; a partition too big for the budget must say so instead of guessing.
The `transactions` duplicate check built on it keeps catching repeats either way.
"""

from __future__ import annotations

import datetime as dt
import math
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from streamguard.key_index import KeyIndex, key_hashes
from streamguard.lake import Lake

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("batch_id", pa.int64()),
        pa.field("day", pa.date32()),
    ]
)
DAYS = [dt.date(2026, 12, 1), dt.date(2026, 12, 2), dt.date(2026, 12, 3)]


def rows(ids: list[str], batch_id: int, day: dt.date | None) -> pa.Table:
    return pa.table(
        {"id": ids, "batch_id": [batch_id] * len(ids), "day": [day] * len(ids)}, schema=SCHEMA
    )


def indexing(lake: Lake) -> Lake:
    """The lake, indexing a partition from its first lookup (not its second)."""
    lake.key_index_after_lookups = 0
    return lake


def holding(lake: Lake, ids: list[str], days: list[dt.date | None]) -> list[str] | None:
    return lake.files_holding("events", "id", pa.array(ids, pa.string()), "day", days)


def truth(lake: Lake, ids: list[str], days: list[dt.date | None]) -> list[str]:
    """The files that really hold the ids on these days, read file by file."""
    found = []
    for path in lake.files("events"):
        read = lake.read("events", columns=["id", "day"], files=[path])
        on_days = pc.is_in(read["day"], pa.array([d for d in days if d], pa.date32()))
        if None in days:
            on_days = pc.or_(on_days, pc.is_null(read["day"]))
        if pc.any(pc.and_(on_days, pc.is_in(read["id"], pa.array(ids)))).as_py():
            found.append(path)
    return sorted(found)


class ReadCountingLake(Lake):
    """A lake that records the data files its key indexes read."""

    def __init__(self, root: str) -> None:
        super().__init__(root)
        self.read_for_keys: list[str] = []

    def _key_hashes(self, name: str, column: str, paths: Sequence[str]) -> tuple[Any, Any]:
        self.read_for_keys.extend(paths)
        return super()._key_hashes(name, column, paths)


def test_the_files_named_for_keys_are_those_that_hold_them_through_appends_and_compaction(
    lake_root: str,
) -> None:
    mine, other = indexing(ReadCountingLake(lake_root)), Lake(lake_root)
    pick = random.Random(11)
    written: list[tuple[str, dt.date | None]] = []
    batch = 0

    def append(lake: Lake, n: int) -> None:
        nonlocal batch
        day = pick.choice([*DAYS, None])
        ids = [f"tx-{batch}-{i}" for i in range(n)]
        assert lake.append("events", rows(ids, batch, day), "job", batch, partition_by=["day"])
        written.extend((i, day) for i in ids)
        batch += 1

    def check() -> None:
        for days in ([DAYS[0]], [DAYS[1], None], DAYS, [dt.date(2025, 1, 1)]):
            asked = [i for i, _ in pick.sample(written, 12)] + ["never-written"]
            assert holding(mine, asked, days) == truth(mine, asked, days), (days, asked)
        assert holding(mine, ["never-written"], DAYS) == []

    for step in range(24):
        append(mine if step % 3 else other, pick.choice([1, 5, 40]))
        if step % 6 == 5:
            check()  # the index follows this lake's and the other writer's commits
    before = set(mine.files("events"))
    assert mine.compact("events")["files_removed"] > 0
    check()  # the compacted files are named, the removed ones never again
    compacted = set(mine.files("events")) - before
    assert compacted and not compacted & set(mine.read_for_keys)  # followed, not read again
    for _ in range(5):
        append(other, 30)
    check()
    # A file named is readable through `read(files=...)` and holds the key.
    key, day = written[-1]
    named = holding(mine, [key], [day])
    assert named and mine.read("events", columns=["id"], files=named)["id"].to_pylist().count(key)
    # By default a partition is read at its first lookup (a one-batch process would hash it all
    # for one answer) and indexed from the second.
    fresh = Lake(lake_root)
    assert holding(fresh, [key], [day]) is None
    assert holding(fresh, [key], [day]) == named


def test_a_partition_over_the_budget_is_not_indexed_and_recent_ones_are_kept(
    lake_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    lake = indexing(Lake(lake_root))
    for b, day in enumerate(DAYS):
        ids = [f"{day}-{i}" for i in range(1000)]
        assert lake.append("events", rows(ids, b, day), "job", b, partition_by=["day"])
    # 1,000 keys take 12 kB: a budget of ~25 kB holds two days, not three.
    monkeypatch.setenv("STREAMGUARD_KEY_INDEX_MB", str(25_000 / 2**20))
    assert holding(lake, [f"{DAYS[0]}-5"], [DAYS[0]]) == truth(lake, [f"{DAYS[0]}-5"], [DAYS[0]])
    assert holding(lake, [f"{DAYS[1]}-5"], [DAYS[1]]) == truth(lake, [f"{DAYS[1]}-5"], [DAYS[1]])
    # The third day pushes out the least recently asked (the first), not the one asked for.
    assert holding(lake, [f"{DAYS[2]}-5"], [DAYS[2]]) == truth(lake, [f"{DAYS[2]}-5"], [DAYS[2]])
    index = lake._views["events"].keys[("id", "day")]
    assert not index.holds(str(DAYS[0])) and index.holds(str(DAYS[1]))
    assert index.nbytes <= 25_000
    # Three days at once do not fit: the answer is None (read them), not a partial list.
    assert holding(lake, ["x"], DAYS) is None


def test_runs_stay_few_and_removed_files_leave_the_index() -> None:
    index = KeyIndex()
    index.hold("d", [])
    files = [f"f{i}" for i in range(64)]
    for n, path in enumerate(files):
        index.added(path, "d")
        keys = pa.array([f"{path}-{i}" for i in range(10)])
        index.add("d", [path], key_hashes(keys), np.zeros(10, np.int64))
        assert len(index.runs["d"]) <= math.log2(n + 1) + 1
    assert index.files_holding("d", key_hashes(pa.array(["f7-3", "f63-9", "nope"]))) == {
        "f7",
        "f63",
    }
    for path in files[:40]:
        index.removed(path)
    assert index.files_holding("d", key_hashes(pa.array(["f7-3", "f63-9"]))) == {"f63"}
    index.added("big", "d")  # a compacted file with the removed files' keys
    keys = pa.array([f"{p}-{i}" for p in files[:40] for i in range(10)])
    index.add("d", ["big"], key_hashes(keys), np.zeros(len(keys), np.int64))
    assert index.files_holding("d", key_hashes(pa.array(["f7-3"]))) == {"big"}
    assert index.nbytes == 640 * 12  # the removed files' entries were dropped, not kept
    assert {p for group in index.paths.values() for p in group} == {"big", *files[40:]}


def test_a_compaction_moves_keys_to_the_new_files_without_reading_them() -> None:
    index = KeyIndex()
    index.hold("d", [])
    for path in ("a", "b", "c"):
        index.added(path, "d")
        index.add(
            "d",
            [path],
            key_hashes(pa.array([f"{path}-{i}" for i in range(5)])),
            np.zeros(5, np.int64),
        )
    asked = key_hashes(pa.array(["a-1", "b-2", "c-3"]))
    index.moved(["a", "b"], [("ab", "d")])  # a and b compacted into ab
    assert not index.unread_files()  # nothing to read: the keys are held already
    assert index.files_holding("d", asked) == {"ab", "c"}
    index.moved(["ab", "c"], [("abc1", "d"), ("abc2", "d")])  # and again, into two files
    assert index.files_holding("d", asked) == {"abc1", "abc2"}
    assert index.nbytes == 15 * 12
    index.removed("abc1")  # rows deleted: the group keeps its other file
    assert index.files_holding("d", asked) == {"abc2"}
    index.removed("abc2")
    assert index.files_holding("d", asked) == set()
    # A file not read yet among the compacted ones: the new files are read instead.
    index.added("e", "d")
    index.moved(["e"], [("e2", "d")])
    assert index.unread_files() == {"d": ["e2"]}


@pytest.mark.parametrize(
    ("budget_mb", "after"),
    [("1024", 0), ("1024", 1), ("0", 0)],
    ids=["indexed-at-once", "indexed-from-the-second-lookup", "over-budget"],
)
def test_the_duplicate_check_catches_repeats_of_earlier_batches_not_a_replay_of_its_own(
    lake_root: str, budget_mb: str, after: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from models.job import TRANSACTIONS, drop_duplicates
    from models.schema import DUPLICATE_EARLIER, DUPLICATE_IN_BATCH

    monkeypatch.setenv("STREAMGUARD_KEY_INDEX_MB", budget_mb)
    lake = Lake(lake_root)
    lake.key_index_after_lookups = after
    noon = dt.datetime(2026, 12, 2, 12, tzinfo=dt.UTC)

    def batch(ids: list[str], hours: list[int]) -> pa.Table:
        times = [noon + dt.timedelta(hours=h) for h in hours]
        return pa.table(
            {
                "transaction_id": ids,
                "event_time": pa.array(times, pa.timestamp("us", tz="UTC")),
                "record_index": list(range(len(ids))),
            }
        )

    def write(table: pa.Table, batch_id: int) -> None:
        stored = pa.table(
            {
                "transaction_id": table["transaction_id"],
                "batch_id": pa.array([batch_id] * table.num_rows, pa.int64()),
                "event_date": pc.cast(table["event_time"], pa.date32()),
            }
        )
        assert lake.append(TRANSACTIONS, stored, "job", batch_id, partition_by=["event_date"])

    first = batch([f"t{i}" for i in range(50)], [0] * 25 + [13] * 25)  # two dates
    kept, rejected = drop_duplicates(first, lake, 0)
    assert kept.num_rows == 50 and rejected == []
    write(first, 0)
    # The replay of batch 0 (its rows already written) rejects none of its own rows.
    kept, rejected = drop_duplicates(first, lake, 0)
    assert kept.num_rows == 50 and rejected == []

    second = batch(["t3", "n1", "t30", "n1"], [0, 0, 13, 0])
    kept, rejected = drop_duplicates(second, lake, 1)
    assert kept["transaction_id"].to_pylist() == ["n1"]
    assert sorted(rejected) == [
        (0, DUPLICATE_EARLIER),
        (2, DUPLICATE_EARLIER),
        (3, DUPLICATE_IN_BATCH),
    ]
    # Only the batch's event dates are searched: the same id five days later is not a repeat.
    kept, rejected = drop_duplicates(batch(["t7"], [24 * 5]), lake, 1)
    assert kept.num_rows == 1 and rejected == []
