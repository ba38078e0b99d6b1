"""What the latency benches (bench/sensor.py, bench/continuous.py) share: their percentile, the
champion they score with, and the read-update-write of the shared results file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

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
