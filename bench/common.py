"""What the benches share: the latency benches' percentile (bench/sensor.py, bench/continuous.py),
the champion they score with, a synthetic customer state (bench/state_upsert.py,
bench/continuous.py) and the read-update-write of the shared results file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.job import CUSTOMER_STATE_TABLE_SCHEMA
from models.simulate import Simulation, simulate
from streamguard.config import Home
from streamguard.pipeline import train_on_simulation

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "latest.json"


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN when there are no values; with 20
    values p99 is near the max."""
    return float(np.percentile(values, q)) if len(values) else float("nan")


def train_champion(home: Home, *, days: int, customers: int, seed: int) -> Simulation:
    """Write a small simulation into `home`'s data folder and register a champion trained on it
    (labels known at once); returns the simulation."""
    sim = simulate(days=days, customers=customers, seed=seed)
    train_on_simulation(home, sim)
    return sim


def merge_results(
    updates: Mapping[str, Any], path: Path = RESULTS, drop: Iterable[str] = ()
) -> None:
    """Read, update, write the shared results file: `updates` set, `drop` removed, every other key
    (other benches write theirs there too) kept. Written to a side file and renamed, so a reader
    never sees half a file."""
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for key in drop:
        results.pop(key, None)
    results.update(updates)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(results, indent=2, default=str) + "\n")
    partial.replace(path)


DAY_US = 86_400 * 1_000_000
START_US = 1_767_225_600 * 1_000_000  # 2026-01-01


def _lists(rng: np.random.Generator, n: int, mean: int, values: np.ndarray) -> pa.ListArray:
    lengths = rng.poisson(mean, n)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values[: offsets[-1]]))


def customer_state(ids: np.ndarray, batch_id: int, seed: int) -> pa.Table:
    """Synthetic full-window `customer_state` rows for customers `C<id>`, the issue-size shape:
    ~6 places, ~3 debits of the last day, ~25 days with debits of the last 31."""
    rng = np.random.default_rng(seed)
    n = len(ids)
    big = n * 40
    days = (START_US // DAY_US + rng.integers(0, 31, big)).astype(np.int64)
    columns = {
        "customer_id": pa.array([f"C{i:08d}" for i in ids]),
        "balance": pa.array(rng.normal(2_000, 500, n)),
        "last_event_time": pa.array(START_US + rng.integers(0, 31 * DAY_US, n)),
        "n_transactions": pa.array(rng.integers(1, 200, n)),
        "locations": _lists(rng, n, 6, np.array([f"city-{i % 500}" for i in range(big)])),
        "history_times": _lists(rng, n, 3, START_US + rng.integers(0, DAY_US, big)),
        "history_amounts": _lists(rng, n, 3, rng.gamma(2.0, 40.0, big)),
        "days": _lists(rng, n, 25, days),
        "day_counts": _lists(rng, n, 25, rng.integers(1, 5, big)),
        "day_cents": _lists(rng, n, 25, rng.integers(100, 50_000, big)),
        "batch_id": pa.array(np.full(n, batch_id)),
        "updated_at": pa.array(np.full(n, START_US)),
    }
    schema = CUSTOMER_STATE_TABLE_SCHEMA
    return pa.table({f.name: columns[f.name].cast(f.type) for f in schema}, schema=schema)
