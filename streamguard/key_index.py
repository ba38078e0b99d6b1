"""Which data files of a partition may hold given keys: 64-bit hashes of one column, per file.

A keyed lookup in a partition (is this transaction id already on this event date?) read the
partition's column every time: its cost grew with the rows on the date, so a live stream, whose
batches all land on today's partition, would slow down through the day (measured: 3 ms at 10k
rows on the date, 15 ms at 100k, 136 ms at 1M). Here each data file's values are read and hashed
once, when the file first matters, and kept as sorted runs of (hash, file): a lookup costs a
binary search per run, whatever the partition holds. A hit names the files to read for the exact
answer (hashes can collide, and the caller may need more than the key, such as the batch that
wrote it); a miss is certain.

Runs are merged as a binary counter merges its digits (a new file's run is merged with the last
run while that one is at most twice its size), so a partition of n keys written in batches of b
has at most log2(n / b) + 1 runs, and each key is merged about log2(n / b) times. Files removed
from the table (compaction) are forgotten at once and their entries dropped at the next merge.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# Bytes one key takes in the index: its 64-bit hash and the 32-bit number of its file.
BYTES_PER_KEY = 12


def key_hashes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """64-bit hashes of the values (nulls dropped): pandas' SipHash with its fixed key, so the
    same value hashes the same in every process and release of the index."""
    values = pc.drop_null(values)
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks() if values.num_chunks else pa.array([], values.type)
    if len(values) == 0:
        return np.empty(0, np.uint64)
    hashed: np.ndarray = pd.util.hash_array(
        np.asarray(values.to_numpy(zero_copy_only=False), dtype=object), categorize=False
    )
    return hashed


@dataclass
class _Run:
    hashes: np.ndarray  # uint64, ascending
    owners: np.ndarray  # int32: the file each hash came from (an index into KeyIndex.paths)


def _run(hashes: np.ndarray, owners: np.ndarray, *, merging: bool = False) -> _Run:
    # Sorted runs being merged: timsort ("stable") finds them and merges in linear time; new
    # hashes: quicksort (1M hashes: 0.12 s, timsort 0.19 s; two sorted halves: timsort 0.01 s).
    order = np.argsort(hashes, kind="stable" if merging else "quicksort")
    return _Run(hashes[order], owners[order])


@dataclass
class KeyIndex:
    """The hashed keys of the data files of the partitions held, by file.

    Entries are owned by numbers: a number names a file, or, once a compaction has rewritten
    files without changing their rows (`moved`), the group of files that now hold them (the
    old numbers are redirected to the group's): a compaction is followed without reading the
    new files, whose keys the index already holds.
    """

    paths: dict[int, list[str]] = field(default_factory=dict)  # number -> its files in the table
    live: dict[str, int] = field(default_factory=dict)  # path -> number, files in the table
    partition_of: dict[int, Hashable] = field(default_factory=dict)  # number -> partition
    sizes: dict[int, int] = field(default_factory=dict)  # number -> keys read (read ones only)
    redirect: dict[int, int] = field(default_factory=dict)  # moved number -> its group's
    runs: dict[Hashable, list[_Run]] = field(default_factory=dict)  # held partition -> runs
    unread: dict[Hashable, list[str]] = field(default_factory=dict)  # held: added, not read
    dead: dict[Hashable, set[int]] = field(default_factory=dict)  # no file left, still in runs
    recent: dict[Hashable, None] = field(default_factory=dict)  # held, least recently used first
    asked: dict[Hashable, int] = field(default_factory=dict)  # lookups before holding, by partition
    _next: int = 0

    @property
    def nbytes(self) -> int:
        """Memory the held keys take (those of removed files until their runs are merged)."""
        keys = sum(len(r.hashes) for runs in self.runs.values() for r in runs)
        return keys * BYTES_PER_KEY

    def holds(self, partition: Hashable) -> bool:
        return partition in self.runs

    def hold(self, partition: Hashable, paths: Sequence[str]) -> None:
        """Start holding a partition whose data files are `paths` (read at the next `add`)."""
        self.runs[partition], self.unread[partition], self.dead[partition] = [], [], set()
        for path in paths:
            self.added(path, partition)

    def drop(self, partition: Hashable) -> None:
        """Stop holding a partition (holding it again reads its files again)."""
        for number in [n for n, p in self.partition_of.items() if p == partition]:
            self._forget(number)
        self.redirect = {n: g for n, g in self.redirect.items() if self.resolve(g) in self.paths}
        for held in (self.runs, self.unread, self.dead, self.recent):
            held.pop(partition, None)

    def used(self, partitions: Sequence[Hashable]) -> None:
        """These partitions were just asked about (the last to be dropped for memory)."""
        for partition in partitions:
            self.recent.pop(partition, None)
            if partition in self.runs:
                self.recent[partition] = None

    def least_used(self) -> Hashable | None:
        return next(iter(self.recent), None)

    def resolve(self, number: int) -> int:
        """The number that owns a moved number's keys now."""
        seen = []
        while number in self.redirect:
            seen.append(number)
            number = self.redirect[number]
        for moved in seen[:-1]:
            self.redirect[moved] = number  # shorten the chain for next time
        return number

    def _new(self, paths: list[str], partition: Hashable) -> int:
        number = self._next
        self._next += 1
        self.paths[number], self.partition_of[number] = paths, partition
        for path in paths:
            self.live[path] = number
        return number

    def _forget(self, number: int) -> None:
        for path in self.paths.pop(number, []):
            if self.live.get(path) == number:
                del self.live[path]
        self.partition_of.pop(number, None)
        self.sizes.pop(number, None)

    def added(self, path: str, partition: Hashable) -> None:
        """A data file was added to the table: noted if its partition is held."""
        if partition not in self.runs or path in self.live:
            return
        self._new([path], partition)
        self.unread[partition].append(path)

    def removed(self, path: str) -> None:
        """A data file was removed from the table (its rows with it)."""
        number = self.live.pop(path, None)
        if number is None:
            return
        partition = self.partition_of[number]
        self.paths[number].remove(path)
        if number not in self.sizes:  # not read yet (a file of its own)
            self.unread[partition].remove(path)
            self._forget(number)
        elif not self.paths[number]:
            self.dead[partition].add(number)  # in a run: dropped when that run is merged

    def moved(self, removed: Sequence[str], added: Sequence[tuple[str, Hashable]]) -> None:
        """One commit rewrote files without changing their rows (a compaction: `dataChange`
        false): per partition, the keys of the `removed` files are in the `added` ones now.
        Nothing is read again, unless some rows were not read yet (then as a removal and
        additions)."""
        gone: dict[Hashable, list[str]] = {}
        for path in removed:
            if path in self.live:
                gone.setdefault(self.partition_of[self.live[path]], []).append(path)
        new: dict[Hashable, list[str]] = {}
        for path, partition in added:
            new.setdefault(partition, []).append(path)
        for partition, paths in gone.items():
            numbers = {self.live[p] for p in paths}
            moving = new.pop(partition, [])
            if not moving or any(n not in self.sizes for n in numbers):
                for path in paths:
                    self.removed(path)
                for path in moving:
                    self.added(path, partition)
                continue
            left = [p for n in numbers for p in self.paths[n] if p not in set(paths)]
            group = self._new([*left, *moving], partition)
            self.sizes[group] = sum(self.sizes.pop(n) for n in numbers)
            for number in numbers:
                self.redirect[number] = group
                del self.paths[number], self.partition_of[number]
        for partition, paths in new.items():
            for path in paths:
                self.added(path, partition)

    def unread_files(self) -> dict[Hashable, list[str]]:
        return {p: list(paths) for p, paths in self.unread.items() if paths}

    def add(
        self, partition: Hashable, paths: Sequence[str], hashes: np.ndarray, files: np.ndarray
    ) -> None:
        """The hashes read from unread files of a held partition: `hashes[i]` came from
        `paths[files[i]]`."""
        numbers = np.array([self.live[p] for p in paths], np.int32)
        counts = np.bincount(files.astype(np.int64), minlength=len(paths))
        for number, count in zip(numbers.tolist(), counts.tolist(), strict=True):
            self.sizes[number] = int(count)
        read = set(paths)
        self.unread[partition] = [p for p in self.unread[partition] if p not in read]
        runs = self.runs[partition]
        runs.append(_run(hashes.astype(np.uint64, copy=False), numbers[files]))
        while len(runs) > 1 and len(runs[-2].hashes) <= 2 * len(runs[-1].hashes):
            last, before = runs.pop(), runs.pop()
            runs.append(self._merged(partition, [before, last]))
        dead = self.dead[partition]
        if dead and 2 * sum(self.sizes[n] for n in dead) > sum(len(r.hashes) for r in runs):
            runs[:] = [self._merged(partition, runs)]  # mostly removed files: keep the living
            for number in dead:
                self._forget(number)
            dead.clear()

    def _merged(self, partition: Hashable, runs: list[_Run]) -> _Run:
        hashes = np.concatenate([r.hashes for r in runs])
        owners = np.concatenate([r.owners for r in runs])
        dead = self.dead[partition]
        if dead:
            gone = dead | {n for n in self.redirect if self.resolve(n) in dead}
            keep = ~np.isin(owners, np.fromiter(gone, np.int32, len(gone)))
            hashes, owners = hashes[keep], owners[keep]
        return _run(hashes, owners, merging=True)

    def files_holding(self, partition: Hashable, hashes: np.ndarray) -> set[str]:
        """The held partition's files (read ones) that have any of `hashes`."""
        found: set[int] = set()
        for run in self.runs[partition]:
            low = np.searchsorted(run.hashes, hashes, side="left")
            high = np.searchsorted(run.hashes, hashes, side="right")
            hit = high > low
            if not hit.any():
                continue
            for start, stop in zip(low[hit].tolist(), high[hit].tolist(), strict=True):
                found.update(run.owners[start:stop].tolist())
        dead, paths = self.dead[partition], set()
        for number in {self.resolve(n) for n in found}:
            if number not in dead:
                paths.update(self.paths.get(number, []))
        return paths
