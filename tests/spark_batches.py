"""Test helper shared by the Spark fraud tests: the in-process runner's batches as files."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from models.job import TRANSACTIONS
from models.registry import LoadedModel
from streamguard.lake import Lake
from streamguard.pipeline import load_labels, scoring_runner
from streamguard.runner import DEAD_LETTER_TABLE
from streamguard.sources import MemorySource


def batch_files(lake: Lake, source: MemorySource, out: Path) -> int:
    """One file per in-process batch, its records in the order the runner read them."""
    data = {
        (r.shard_id, r.sequence_number): r.data
        for shard in source.shards()
        for r in source.read(shard, None, None, 1 << 30)
    }
    placed = pa.concat_tables(
        [
            lake.read(TRANSACTIONS, columns=["batch_id", "shard_id", "sequence_number"]),
            lake.read(DEAD_LETTER_TABLE, columns=["batch_id", "shard_id", "sequence_number"]),
        ]
    ).to_pylist()
    batches: dict[int, list[tuple[str, int]]] = {}
    for r in placed:
        batches.setdefault(r["batch_id"], []).append((r["shard_id"], int(r["sequence_number"])))
    out.mkdir(parents=True)
    base = time.time() - 1_000
    for batch_id, keys in sorted(batches.items()):
        path = out / f"batch-{batch_id:05d}.jsonl"
        lines = [data[(shard, str(seq).zfill(20))] for shard, seq in sorted(keys)]
        path.write_bytes(b"\n".join(lines) + b"\n")
        os.utime(path, (base + batch_id, base + batch_id))  # the file source orders by mtime
    return len(batches)


def in_process_reference(
    root: Path,
    payloads: Sequence[bytes],
    keys: Sequence[str],
    labels: pa.Table,
    model: LoadedModel,
    batch_records: int,
) -> tuple[Lake, Path, int]:
    """The in-process runner over the records (2 shards), and its batches as files.

    Returns (its lake, the folder of batch files, the number of batches): the reference a Spark
    job fed from that folder, one file per trigger, must reproduce.
    """
    source = MemorySource.split(payloads, keys, n_shards=2)
    local = Lake(root / "local")
    load_labels(local, labels)
    scoring_runner(local, source, None, max_batch_records=batch_records, model=model).run()
    input_dir = root / "input"
    return local, input_dir, batch_files(local, source, input_dir)
