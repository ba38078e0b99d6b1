"""streamguard scaling bench: does a micro-batch cost the same on day 40 as on day 1?

Runs the real in-process runner (`scoring_runner`, real Delta tables under a temporary folder)
over a long simulated stream, one micro-batch at a time, and reports:

- per-batch seconds of the first and the last 10 % of the batches and their ratio,
  `scale_growth_ratio` (goal: at most 1.2), and the same ratio over the batches from day
  CUSTOMER_DAYS on, once the customers' windows are full (`scale_growth_ratio_warm`);
- peak memory (RSS) of the process, and its RSS after every batch;
- the size of every table at the end (rows, files, bytes in the current version, bytes on disk)
  and of the two state tables after every simulated day;
- where each batch's time went, part by part, so growth can be pinned on a part;
- a PNG of per-batch seconds over the run (bench/results/scale.png) and the numbers in
  bench/results/scale.json.

    .venv/bin/python bench/scale.py [--transactions N] [--customers N] [--batch 50000]

Defaults are issue 11's sizes: 10M transactions, 100k customers, batches of 50k.

How the stream is made. The simulator's cost grows about with the square of the customers (and
so does its memory), so the customers are simulated in chunks of `--chunk-customers` (10k): one
simulation per chunk with its own seed over the same days, customer and terminal ids made
distinct per chunk, merged by event time and cut to exactly `--transactions`. That happens in a
child process (its memory is not the runner's), which also trains the model, as bench/run.py
does (first 10 days of the first chunk). The runner reads the stream through a one-shard source
that encodes each batch's payloads (`transaction_records`, as bench/run.py) before the batch is
timed, so the timed part is the runner's alone.

What happens between batches (untimed, as other jobs would do it): at each simulated midnight,
the labels reported before it are loaded into the lake (`load_labels`, as the daily label feed)
and every table of the scoring job is compacted (`Lake.compact`, as the nightly
`compact_lake_daily` schedule, 168 h vacuum retention: the run is shorter than that, so files
the compaction and the state MERGEs replace stay on disk; `--vacuum-hours 0` deletes them).
`--labels none` / `--compact none` leave either out.

Where the time goes. The runner reports each batch's total seconds and its counts
(`BatchReport.stats`: valid, known_frauds, ...), not its parts. To attribute the time, the bench
wraps, in this process only, the job's steps (`models.job.prepare`, `drop_duplicates`,
`batch_known_frauds`, `load_state`, `compute_features`, the processor's `score`/`assemble`, ...),
the runner's `write_batch`, `next_batch_id` and checkpoints, and every method of the Lake
object it hands the runner (`read`, `append`, `upsert`, `table`, `max_value`, ...). Times are
exclusive (a step's own time, its lake calls counted apart), so they add up to the batch's wall
time; a lake call is named by the step it ran in and its table, e.g. "duplicate lookup: read
transactions". A step that does not exist (any more) is simply not wrapped: its time shows in the
step that called it. `--no-profile` turns all of it off.

The machine may be shared: each batch also records the load average and this process's CPU
time, and "score + rules" (the model's work, set by the batch alone) serves as a control: its
last/first ratio (`control_ratio`) far above 1 means other work slowed the later batches.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import multiprocessing
import os
import pickle
import platform as _platform  # the standard-library module (the repo's platform/ is config only)
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import merge_results  # noqa: E402
from models.features import CUSTOMER_DAYS  # noqa: E402
from streamguard.kinesis import StreamRecord, transaction_records  # noqa: E402
from streamguard.lake import Lake  # noqa: E402

RESULTS = ROOT / "bench" / "results"
SHARD = "shard-000"
SEQ_DIGITS = 20  # as MemorySource
_US = 1_000_000
_DAY_US = 86_400 * _US
# Read off the simulator at 10k customers (~2.24 transactions per customer-day); only a first
# guess of how many days to simulate, corrected on the first chunk.
_GUESS_TX_PER_CUSTOMER_DAY = 2.0


# --------------------------------------------------------------------------- the stream


def _rename(column: pa.ChunkedArray, chunk: int, width: int) -> pa.ChunkedArray:
    """Id "C000123" of chunk 3 -> "C3000123": the chunk's number after the id's letter."""
    head = pc.utf8_slice_codeunits(column, 0, 1)
    tail = pc.utf8_slice_codeunits(column, 1)
    return pc.binary_join_element_wise(head, pa.scalar(f"{chunk:0{width}d}"), tail, "")


def generate(
    work: str, transactions: int, customers: int, chunk_customers: int, seed: int
) -> dict[str, Any]:
    """Simulate the stream into `work`/stream.parquet (event-time order) and labels.parquet,
    and train the model into model.pkl. Runs in a child process."""
    import pandas as pd

    from models.features import replay
    from models.registry import LoadedModel
    from models.simulate import simulate
    from models.training import train

    out = Path(work)
    started = time.perf_counter()
    sizes = [min(chunk_customers, customers - c) for c in range(0, customers, chunk_customers)]
    width = len(str(len(sizes) - 1))
    days = max(2, math.ceil(transactions / (customers * _GUESS_TX_PER_CUSTOMER_DAY)))
    first = simulate(days=days, customers=sizes[0], seed=seed)
    rate = first.transactions.num_rows / (days * sizes[0])
    if rate * days * customers < transactions * 1.01:  # too few days for the target: redo
        days = math.ceil(transactions * 1.03 / (rate * customers)) + 1
        first = simulate(days=days, customers=sizes[0], seed=seed)
    parts, labels = [], []
    for chunk, size in enumerate(sizes):
        sim = first if chunk == 0 else simulate(days=days, customers=size, seed=seed + chunk)
        tx = sim.transactions
        if len(sizes) > 1:
            for name in ("customer_id", "terminal_id"):
                at = tx.schema.get_field_index(name)
                tx = tx.set_column(at, tx.schema.field(at), _rename(tx[name], chunk, width))
        parts.append(tx)
        labels.append(sim.labels)
        print(f"  simulated chunk {chunk + 1}/{len(sizes)}: {tx.num_rows:,} rows", flush=True)
    simulate_s = time.perf_counter() - started

    # Model: as bench/run.py's train_model, on the first chunk's first 10 days.
    started = time.perf_counter()
    start = pc.min(first.transactions["event_time"]).as_py()
    history = first.transactions.filter(
        pc.less(first.transactions["event_time"], start + timedelta(days=10))
    )
    features = replay(history, first.labels).features.to_pandas()
    result = train(
        features,
        first.labels.to_pandas(),
        pd.Timestamp(start + timedelta(days=10)),
        pd.Timedelta(days=2),
    )
    model = LoadedModel(model=result.model, name="fraud_model", version="bench-scale")
    (out / "model.pkl").write_bytes(pickle.dumps(model))
    train_s = time.perf_counter() - started
    del first, history, features, result

    started = time.perf_counter()
    stream = pa.concat_tables(parts)
    del parts
    stream = stream.take(pc.sort_indices(stream, [("event_time", "ascending")]))
    generated = stream.num_rows
    stream = stream.slice(0, min(transactions, generated))
    pq.write_table(stream, out / "stream.parquet", row_group_size=100_000)
    kept = pc.is_in(pa.concat_tables(labels)["transaction_id"], value_set=stream["transaction_id"])
    label_table = pa.concat_tables(labels).filter(kept)
    label_table = label_table.sort_by([("reported_at", "ascending")])
    pq.write_table(label_table, out / "labels.parquet")
    return {
        "days_simulated": days,
        "chunks": len(sizes),
        "chunk_customers": chunk_customers,
        "generated_rows": generated,
        "transactions": stream.num_rows,
        "labels": label_table.num_rows,
        "first_event": str(pc.min(stream["event_time"]).as_py()),
        "last_event": str(pc.max(stream["event_time"]).as_py()),
        "simulate_s": simulate_s,
        "train_s": train_s,
        "write_s": time.perf_counter() - started,
    }


class StreamFileSource:
    """One shard over a Parquet file of transactions in event-time order (the `Source` protocol).

    Payloads are encoded a batch ahead by `prefetch` (called between batches, untimed); only
    what a replay could still ask for is kept, so memory stays a few batches whatever the size.
    Sequence numbers are as `MemorySource`'s: the record's 1-based position, zero-padded.
    """

    def __init__(self, path: Path, batch: int) -> None:
        self._file = pq.ParquetFile(path)
        self.total = self._file.metadata.num_rows
        self._batches = self._file.iter_batches(batch_size=batch)
        self._base = 0  # position of self._records[0]
        self._records: list[StreamRecord] = []
        self._times = np.zeros(0, dtype=np.int64)  # event time (us) of each buffered record
        self.acknowledged: dict[str, str | None] = {}
        self.encode_s = 0.0

    def shards(self) -> list[str]:
        return [SHARD]

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        start = 0 if after is None else int(after)
        stop = self.total if until is None else min(int(until), self.total)
        end = min(stop, start + max_records)
        self._fill(end)
        if start < self._base:
            raise RuntimeError(f"record {start} was dropped from the buffer (at {self._base})")
        return self._records[start - self._base : end - self._base]

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        self.acknowledged = dict(positions)

    @property
    def position(self) -> int:
        """Records committed so far (where the next batch starts)."""
        return int(self.acknowledged.get(SHARD) or 0)

    def prefetch(self, position: int, n: int) -> None:
        """Encode records up to `position + n`; drop those before the previous batch."""
        self._fill(min(self.total, position + n))
        drop = max(0, position - n - self._base)
        if drop:
            del self._records[:drop]
            self._times = self._times[drop:]
            self._base += drop

    def event_time_us(self, position: int) -> int:
        self._fill(position + 1)
        return int(self._times[position - self._base])

    def _fill(self, end: int) -> None:
        started = time.perf_counter()
        while self._base + len(self._records) < end:
            batch = pa.Table.from_batches([next(self._batches)])
            now = datetime.now(UTC)
            at = self._base + len(self._records)
            self._records.extend(
                StreamRecord(SHARD, str(at + i + 1).zfill(SEQ_DIGITS), key, data, now)
                for i, (data, key) in enumerate(transaction_records(batch))
            )
            times = batch["event_time"].cast(pa.int64()).to_numpy()
            self._times = np.concatenate([self._times, times])
        self.encode_s += time.perf_counter() - started


# --------------------------------------------------------------------------- the profile


class Profiler:
    """Exclusive wall time per step of a batch; steps nest, a lake call is named by its step."""

    def __init__(self) -> None:
        self._stack: list[list[Any]] = []  # [step, lake call or "", started, children's time]
        self.times: dict[str, float] = defaultdict(float)
        self.wrapped: list[str] = []

    def take(self) -> dict[str, float]:
        taken = dict(self.times)
        self.times.clear()
        return taken

    def _timed(self, fn: Callable[..., Any], label: Callable[..., tuple[str, str]]) -> Any:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            step, call = label(*args, **kwargs)
            self._stack.append([step, call, time.perf_counter(), 0.0])
            try:
                return fn(*args, **kwargs)
            finally:
                step, call, started, children = self._stack.pop()
                elapsed = time.perf_counter() - started
                self.times[f"{step}: {call}" if call else step] += elapsed - children
                if self._stack:
                    self._stack[-1][3] += elapsed

        return timed

    def step(self, owner: Any, attribute: str, name: str) -> None:
        """Time `owner.attribute` (a module function or an object's method) as step `name`."""
        fn = getattr(owner, attribute, None)
        if not callable(fn):
            return
        setattr(owner, attribute, self._timed(fn, lambda *a, **k: (name, "")))
        self.wrapped.append(f"{getattr(owner, '__name__', type(owner).__name__)}.{attribute}")

    def lake_calls(self, lake: Lake, methods: Iterable[str]) -> None:
        """Time each of the lake object's `methods`, named by the step it runs in and table."""

        def label(op: str) -> Callable[..., tuple[str, str]]:
            def name(*args: Any, **kwargs: Any) -> tuple[str, str]:
                table = args[0] if args and isinstance(args[0], str) else kwargs.get("name")
                step = self._stack[-1][0] if self._stack else "outside"
                return step, f"{op} {table}" if table else op

            return name

        for op in methods:
            fn = getattr(lake, op, None)
            if callable(fn):
                setattr(lake, op, self._timed(fn, label(op)))
                self.wrapped.append(f"Lake.{op}")


CONTROL_STEP = "score + rules"  # a step whose work depends on the batch only

LAKE_METHODS = (
    "read",
    "count",
    "append",
    "upsert",
    "table",
    "version",
    "max_value",
    "transaction_version",
    "names",
    "exists",
)


def instrument(profiler: Profiler, runner: Any, lake: Lake, source: Any) -> None:
    """Wrap the steps of a batch (see the module doc) for this process's runner."""
    import models.job as job
    import streamguard.runner as runner_module

    profiler.lake_calls(lake, LAKE_METHODS)
    for attribute, name in (
        ("prepare", "parse + prepare"),
        ("drop_duplicates", "duplicate lookup"),
        ("feature_inputs", "feature inputs"),
        ("batch_known_frauds", "known frauds"),
        ("load_accounts", "accounts"),
        ("load_state", "state read"),
        ("load_terminal_state", "state read"),
        ("compute_features", "features"),
    ):
        profiler.step(job, attribute, name)
    processor = runner.processor
    for attribute, name in (
        ("process", "process (rest)"),
        ("plan_context", "plan"),
        ("assemble", "assemble"),
        ("score", CONTROL_STEP),
        ("shadow_score", "shadow score"),
    ):
        profiler.step(processor, attribute, name)
    for attribute, name in (
        ("write_batch", "writes"),
        ("next_batch_id", "plan"),
        ("rejected_records", "dead letters"),
    ):
        profiler.step(runner_module, attribute, name)
    for attribute in ("write_plan", "commit", "last_plan", "is_committed", "positions"):
        profiler.step(runner.checkpoints, attribute, "checkpoints")
    profiler.step(source, "read", "source read")
    profiler.step(runner, "run", "run (rest)")


# --------------------------------------------------------------------------- sizes


def rss_mib() -> float:
    """Resident memory now (Linux /proc; the peak comes from getrusage)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return math.nan
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024


def disk_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def table_size(lake: Lake, name: str, on_disk: bool = True) -> dict[str, int]:
    """Rows, files and bytes of the table's current version (from the Delta log), bytes on disk
    (every file in its folder, the log and files removed but not vacuumed included)."""
    table = lake.table(name)
    if table is None:
        return {}
    actions = pa.table(table.get_add_actions(flatten=True))
    rows = actions["num_records"] if "num_records" in actions.column_names else None
    out = {
        "rows": int(pc.sum(rows).as_py() or 0) if rows is not None else lake.count(name),
        "files": actions.num_rows,
        "bytes": int(pc.sum(actions["size_bytes"]).as_py() or 0) if actions.num_rows else 0,
        "version": table.version(),
    }
    if on_disk:
        out["disk_bytes"] = disk_bytes(lake.path(name))
    return out


# --------------------------------------------------------------------------- the run


def compacted_tables() -> list[str]:
    """What the nightly `compact_lake` job compacts (assets/maintenance.py's TABLES), built from
    the same names without importing Dagster."""
    from models.job import OUTPUTS
    from streamguard.checkpoint import CHECKPOINT_TABLE
    from streamguard.commit import DEAD_LETTER_TABLE

    return [o.name for o in OUTPUTS] + [DEAD_LETTER_TABLE, CHECKPOINT_TABLE]


def run_stream(args: argparse.Namespace, work: Path, model: Any) -> dict[str, Any]:
    from models.job import CUSTOMER_STATE, TERMINAL_STATE
    from streamguard.pipeline import load_labels, scoring_runner

    source = StreamFileSource(work / "stream.parquet", args.batch)
    lake = Lake(work / "lake")
    runner = scoring_runner(lake, source, None, max_batch_records=args.batch, model=model)
    profiler = Profiler()
    if args.profile:
        instrument(profiler, runner, lake, source)
    upkeep = Lake(work / "lake")  # the label feed and compaction: other jobs, own lake object
    labels = pq.read_table(work / "labels.parquet") if args.labels == "daily" else None
    loaded_until = 0  # labels with reported_at before this (us) are in the lake
    tables = compacted_tables()
    log: list[dict[str, Any]] = []
    days: list[dict[str, Any]] = []
    maintenance = {"label_loads": 0, "labels_loaded": 0, "label_load_s": 0.0}
    maintenance |= {"compactions": 0, "compact_s": 0.0, "files_removed": 0}
    day = None
    rss_before = rss_mib()
    total = source.total
    n_batches = math.ceil(total / args.batch)
    started_run = time.perf_counter()
    while source.position < total:
        position = source.position
        source.prefetch(position, args.batch)
        today = source.event_time_us(position) // _DAY_US
        if day is not None and today > day:  # midnight passed: the nightly jobs
            if labels is not None:
                t = time.perf_counter()
                reported = labels["reported_at"].cast(pa.int64())
                midnight = today * _DAY_US
                due = labels.filter(
                    pc.and_(pc.greater_equal(reported, loaded_until), pc.less(reported, midnight))
                )
                load_labels(upkeep, due)
                loaded_until = midnight
                maintenance["label_loads"] += 1
                maintenance["labels_loaded"] += due.num_rows
                maintenance["label_load_s"] += time.perf_counter() - t
            if args.compact == "daily":
                t = time.perf_counter()
                for name in tables:
                    done = upkeep.compact(name, vacuum_hours=args.vacuum_hours)
                    maintenance["files_removed"] += done["files_removed"]
                maintenance["compactions"] += 1
                maintenance["compact_s"] += time.perf_counter() - t
            days.append(
                {
                    "day": int(today - log[0]["day"]) if log else 0,
                    "before_batch": len(log),
                    "lake_rows": position,
                    **{
                        n: table_size(upkeep, n, on_disk=False)
                        for n in (CUSTOMER_STATE, TERMINAL_STATE)
                    },
                }
            )
        profiler.take()  # nothing from between batches
        t, cpu = time.perf_counter(), time.process_time()
        report = runner.run(max_batches=1)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        if not report.batches:
            raise RuntimeError(f"the runner found nothing at {position:,} of {total:,}")
        batch = report.batches[-1]
        parts = profiler.take()
        stats = {k: v for k, v in batch.stats.items() if isinstance(v, int | float)}
        log.append(
            {
                "batch_id": batch.batch_id,
                "records": batch.n_records,
                "rejected": batch.n_rejected,
                "lake_rows_before": position,
                "day": int(today),
                "wall_s": wall,
                "execute_s": batch.seconds,
                "cpu_s": cpu,  # this process's CPU time (all threads) in the batch
                "load_1m": os.getloadavg()[0],  # the machine's, others' work included
                "rss_mib": rss_mib(),
                "stats": stats,
                "parts": parts,
            }
        )
        day = today
        n = len(log)
        if n == 1 or n % max(1, n_batches // 20) == 0 or source.position >= total:
            elapsed = time.perf_counter() - started_run
            print(
                f"  batch {n:,}/{n_batches:,}: {wall:.2f} s, {source.position:,} tx in the "
                f"lake, {elapsed:,.0f} s so far, RSS {log[-1]['rss_mib']:,.0f} MiB",
                flush=True,
            )
    run_s = time.perf_counter() - started_run
    sizes = {name: table_size(lake, name) for name in lake.names()}
    lake_disk = disk_bytes(lake.root)
    return {
        "lake_disk_bytes": lake_disk,
        "log": log,
        "days": days,
        "run_s": run_s,
        "encode_s": source.encode_s,
        "maintenance": maintenance,
        "tables": sizes,
        "rss_before_run_mib": rss_before,
        "wrapped": profiler.wrapped,
    }


# --------------------------------------------------------------------------- the summary


def summarize(log: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """First vs last 10 % of the full batches (the first batch, which pays the warm-up, left
    out), and per part the same, with the growth of each part in seconds per batch."""
    full = [b for b in log if b["records"] == batch] or log
    if len(full) > 2:
        full = [b for b in full if b is not log[0]]
    k = max(1, round(len(full) * 0.10))
    first, last = full[:k], full[-k:]

    def group(batches: list[dict[str, Any]]) -> dict[str, Any]:
        walls = [b["wall_s"] for b in batches]
        return {
            "batches": len(batches),
            "batch_ids": [batches[0]["batch_id"], batches[-1]["batch_id"]],
            "lake_rows_before": [batches[0]["lake_rows_before"], batches[-1]["lake_rows_before"]],
            "mean_s": statistics.fmean(walls),
            "median_s": statistics.median(walls),
            "cpu_mean_s": statistics.fmean(b.get("cpu_s", math.nan) for b in batches),
            "load_1m_mean": statistics.fmean(b.get("load_1m", math.nan) for b in batches),
        }

    a, b = group(first), group(last)
    # The same comparison once the customers' windows are full (the state stops growing): an
    # empty lake's first batches read less state than any batch of a lake in service.
    warm = [e for e in full if e["day"] - log[0]["day"] >= CUSTOMER_DAYS]
    warm_ratio = None
    if len(warm) >= 2 * k:
        warm_ratio = group(warm[-k:])["median_s"] / group(warm[:k])["median_s"]
    keys = sorted({key for entry in log for key in entry["parts"]})

    def mean(batches: list[dict[str, Any]], key: str) -> float:
        return statistics.fmean(e["parts"].get(key, 0.0) for e in batches)

    details = {key: {"first_s": mean(first, key), "last_s": mean(last, key)} for key in keys}
    for value in details.values():
        value["growth_s"] = value["last_s"] - value["first_s"]
    steps: dict[str, dict[str, float]] = {}
    for key, value in details.items():
        step = steps.setdefault(key.split(": ")[0], {"first_s": 0.0, "last_s": 0.0})
        step["first_s"] += value["first_s"]
        step["last_s"] += value["last_s"]
    for value in steps.values():
        value["growth_s"] = value["last_s"] - value["first_s"]
    # The model's work depends on the batch alone: its growth measures the machine, not the lake.
    control = steps.get(CONTROL_STEP)
    return {
        "control_ratio": control["last_s"] / control["first_s"] if control else None,
        "first_10pct": a,
        "last_10pct": b,
        "scale_growth_ratio": b["median_s"] / a["median_s"],
        "scale_growth_ratio_mean": b["mean_s"] / a["mean_s"],
        "scale_growth_ratio_warm": warm_ratio,
        "warm_batches": len(warm),
        "growth_s_per_batch": b["median_s"] - a["median_s"],
        "steps": dict(sorted(steps.items(), key=lambda kv: -kv[1]["last_s"])),
        "details": dict(sorted(details.items(), key=lambda kv: -kv[1]["growth_s"])),
    }


def plot(
    log: list[dict[str, Any]],
    summary: dict[str, Any],
    title: str,
    path: Path,
    midnights: Sequence[int] = (),
) -> None:
    """Per-batch seconds over the run; below, the same split by step (stacked). Dotted lines:
    simulated midnights, where labels were loaded and the lake compacted (between batches)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    x = np.array([b["lake_rows_before"] for b in log]) / 1e6
    wall = np.array([b["wall_s"] for b in log])
    profiled = any(b["parts"] for b in log)
    fig = Figure(figsize=(11, 8 if profiled else 4.5))
    ax = fig.add_subplot(2 if profiled else 1, 1, 1)
    axes = [ax]
    ax.plot(x, wall, marker=".", linewidth=1, label="per-batch seconds (wall)")
    for name, group, colour in (
        ("first", summary["first_10pct"], "tab:green"),
        ("last", summary["last_10pct"], "tab:red"),
    ):
        lo, hi = (v / 1e6 for v in group["lake_rows_before"])
        ax.hlines(group["median_s"], lo, max(hi, lo + 1e-9), colors=colour, linewidth=3)
        ax.annotate(
            f"{name} 10 %: median {group['median_s']:.2f} s",
            (lo, group["median_s"]),
            textcoords="offset points",
            xytext=(0, 8),
            color=colour,
            fontsize="small",
        )
    ax.set(
        ylabel="seconds per batch",
        ylim=(0, max(wall.max() * 1.15, 0.1)),
        title=f"{title}; growth ratio {summary['scale_growth_ratio']:.2f}",
    )
    ax.legend(loc="lower right", fontsize="small")
    if profiled:
        ax.tick_params(labelbottom=False)
        below = fig.add_subplot(2, 1, 2, sharex=ax)
        axes.append(below)
        per_step = {
            step: np.array(
                [sum(v for k, v in b["parts"].items() if k.split(": ")[0] == step) for b in log]
            )
            for step in summary["steps"]
        }
        shown = {k: v for k, v in per_step.items() if v.mean() >= 0.01 * wall.mean()}
        rest = sum((v for k, v in per_step.items() if k not in shown), np.zeros(len(log)))
        labels, stacks = [*shown, "other steps"], [*shown.values(), rest]
        tab20 = colormaps["tab20"]
        colours = [tab20(i % 20) for i in range(len(stacks))]
        below.stackplot(x, stacks, labels=labels, colors=colours, alpha=0.9)
        below.set(ylabel="seconds per batch, by step", ylim=(0, max(wall.max() * 1.15, 0.1)))
        below.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    axes[-1].set(xlabel="transactions already in the lake (millions)")
    for axis in axes:
        for before in midnights:
            if 0 <= before < len(log):
                axis.axvline(x[before], color="grey", linestyle=":", linewidth=0.6)
    fig.savefig(path, format="png", dpi=100, bbox_inches="tight")


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def print_report(results: dict[str, Any]) -> None:
    s = results
    a, b = s["first_10pct"], s["last_10pct"]
    print(
        f"\nstreamguard scaling bench ({s['cores']} cores): {s['transactions']:,} transactions, "
        f"{s['customers']:,} customers, {s['batches']:,} batches of {s['batch']:,}"
    )
    rows = [
        ("run (batches only)", f"{s['run_seconds']:,.1f} s ({s['tx_per_s']:,.0f} tx/s)"),
        ("first batch (warm-up, left out)", f"{s['first_batch_s']:.2f} s"),
        (
            f"first 10 % ({a['batches']} batches)",
            f"median {a['median_s']:.2f} s, mean {a['mean_s']:.2f} s",
        ),
        (
            f"last 10 % ({b['batches']} batches)",
            f"median {b['median_s']:.2f} s, mean {b['mean_s']:.2f} s",
        ),
        (
            "load average, first / last 10 %",
            f"{a['load_1m_mean']:.1f} / {b['load_1m_mean']:.1f} (on {s['cores']} cores; "
            "others' work slows batches)",
        ),
        (
            "CPU s per batch, first / last 10 %",
            f"{a['cpu_mean_s']:.2f} / {b['cpu_mean_s']:.2f} (this process, all threads)",
        ),
        (
            "scale_growth_ratio (goal <= 1.2)",
            f"{s['scale_growth_ratio']:.2f} (means: {s['scale_growth_ratio_mean']:.2f})",
        ),
        (
            f"the same from day {CUSTOMER_DAYS} on (windows full)",
            "n/a (too few batches)"
            if s.get("scale_growth_ratio_warm") is None
            else f"{s['scale_growth_ratio_warm']:.2f} over the last {s['warm_batches']} batches",
        ),
        ("peak RSS", f"{s['peak_rss_mib']:,.0f} MiB"),
        (
            "RSS before run / after",
            f"{s['rss_before_run_mib']:,.0f} / {s['rss_end_mib']:,.0f} MiB",
        ),
        (
            "generation (child process)",
            f"{s['generate_seconds']:,.1f} s, peak {s['generation_peak_rss_mib']:,.0f} MiB",
        ),
        ("payload encoding (untimed)", f"{s['encode_seconds']:,.1f} s"),
    ]
    m = s["maintenance"]
    rows.append(
        (
            "between batches (untimed)",
            f"{m['label_loads']} label loads {m['label_load_s']:.1f} s, "
            f"{m['compactions']} compactions {m['compact_s']:.1f} s",
        )
    )
    for name, value in rows:
        print(f"  {name:34} {value}")

    print(f"\n  {'table':16} {'rows':>12} {'files':>6} {'current':>12} {'on disk':>12}")
    for name, t in s["tables"].items():
        print(
            f"  {name:16} {t.get('rows', 0):>12,} {t.get('files', 0):>6} "
            f"{mib(t.get('bytes', 0)):>12} {mib(t.get('disk_bytes', 0)):>12}"
        )
    print(f"  {'(whole lake)':16} {'':>12} {'':>6} {'':>12} {s['lake_disk_mib']:>8,.1f} MiB")
    if s["state_by_day"]:
        first, last = s["state_by_day"][0], s["state_by_day"][-1]
        for name in ("customer_state", "terminal_state"):
            f, la = first.get(name, {}), last.get(name, {})
            if f and la:
                print(
                    f"  {name} over the run: {f['rows']:,} rows {mib(f['bytes'])} (day "
                    f"{first['day']}) -> {la['rows']:,} rows {mib(la['bytes'])} (day {last['day']})"
                )

    if not s["steps"]:
        return
    print(f"\n  {'step (seconds per batch)':40} {'first 10%':>10} {'last 10%':>10} {'growth':>8}")
    for name, v in s["steps"].items():
        print(f"  {name:40} {v['first_s']:>10.3f} {v['last_s']:>10.3f} {v['growth_s']:>+8.3f}")
    if s.get("control_ratio"):
        print(
            f"  control: '{CONTROL_STEP}' (work set by the batch alone) last/first "
            f"{s['control_ratio']:.2f}; far above 1 means a busy machine, not a growing lake"
        )
    print(f"\n  {'what grew most (step: lake call)':52} {'first':>7} {'last':>7} {'growth':>8}")
    for name, v in list(s["growth_details"].items())[:12]:
        print(f"  {name[:52]:52} {v['first_s']:>7.3f} {v['last_s']:>7.3f} {v['growth_s']:>+8.3f}")


def merge_latest(latest: Path, results: dict) -> None:
    """Put the growth ratio next to the other headline numbers, keeping every key already there."""
    scale = {
        k: results[k]
        for k in (
            "when",
            "transactions",
            "batches",
            "tx_per_s",
            "peak_rss_mib",
            "control_ratio",
            "scale_growth_ratio_warm",
        )
        if k in results
    } | {"customers": results.get("customers"), "details": "bench/results/scale.json"}
    merge_results({"scale_growth_ratio": results["scale_growth_ratio"], "scale": scale}, latest)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--transactions", type=int, default=10_000_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=50_000, help="records per micro-batch")
    parser.add_argument(
        "--chunk-customers",
        type=int,
        default=10_000,
        help="customers per simulation (the simulator grows ~quadratically in customers)",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--labels", choices=("daily", "none"), default="daily")
    parser.add_argument("--compact", choices=("daily", "none"), default="daily")
    parser.add_argument(
        "--vacuum-hours",
        type=int,
        default=168,
        help="vacuum retention of the daily compaction (168: as scheduled; the run lasts less "
        "than that, so nothing is vacuumed and removed files stay on disk: 0 deletes them)",
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="no per-step timing"
    )
    parser.add_argument("--out", default=str(RESULTS / "scale.json"))
    parser.add_argument(
        "--latest",
        default=str(RESULTS / "latest.json"),
        help="merge scale_growth_ratio into this bench summary ('' to leave it alone)",
    )
    parser.add_argument("--png", default=str(RESULTS / "scale.png"))
    parser.add_argument(
        "--work", default=None, help="folder for the stream and the lake (kept); default a temp"
    )
    args = parser.parse_args()
    if args.transactions < args.batch or args.customers < 1 or args.batch < 1:
        parser.error("need --transactions >= --batch >= 1 and --customers >= 1")

    results: dict[str, Any] = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": _platform.python_version(),
        "customers": args.customers,
        "batch": args.batch,
        "labels": args.labels,
        "compact": args.compact,
        "vacuum_hours": args.vacuum_hours,
        "profiled": args.profile,
    }
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="streamguard-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        print(
            f"generating {args.transactions:,} transactions of {args.customers:,} customers "
            f"in {work}",
            flush=True,
        )
        started = time.perf_counter()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            generation = pool.submit(
                generate,
                str(work),
                args.transactions,
                args.customers,
                args.chunk_customers,
                args.seed,
            ).result()
        results["generate_seconds"] = time.perf_counter() - started
        results["generation"] = generation
        results["generation_peak_rss_mib"] = peak_rss_mib(resource.RUSAGE_CHILDREN)
        results["transactions"] = generation["transactions"]
        print(
            f"generated {generation['transactions']:,} transactions over "
            f"{generation['days_simulated']} days, {generation['labels']:,} labels "
            f"({results['generate_seconds']:.0f} s); running batches",
            flush=True,
        )
        model = pickle.loads((work / "model.pkl").read_bytes())
        run = run_stream(args, work, model)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)

    log = run["log"]
    summary = summarize(log, args.batch)
    results.update(
        batches=len(log),
        run_seconds=run["run_s"],
        batch_seconds_total=sum(b["wall_s"] for b in log),
        tx_per_s=results["transactions"] / sum(b["wall_s"] for b in log),
        first_batch_s=log[0]["wall_s"],
        first_10pct=summary["first_10pct"],
        last_10pct=summary["last_10pct"],
        scale_growth_ratio=summary["scale_growth_ratio"],
        scale_growth_ratio_mean=summary["scale_growth_ratio_mean"],
        scale_growth_ratio_warm=summary["scale_growth_ratio_warm"],
        warm_batches=summary["warm_batches"],
        control_ratio=summary["control_ratio"],
        growth_s_per_batch=summary["growth_s_per_batch"],
        peak_rss_mib=peak_rss_mib(),
        rss_before_run_mib=run["rss_before_run_mib"],
        rss_end_mib=log[-1]["rss_mib"],
        encode_seconds=run["encode_s"],
        maintenance=run["maintenance"],
        tables=run["tables"],
        lake_disk_mib=run["lake_disk_bytes"] / 2**20,
        state_by_day=run["days"],
        steps=summary["steps"],
        growth_details=summary["details"],
        wrapped=run["wrapped"],
        batch_log=log,
    )
    out, png = Path(args.out), Path(args.png)
    out.parent.mkdir(parents=True, exist_ok=True)
    png.parent.mkdir(parents=True, exist_ok=True)
    title = (
        f"{results['transactions']:,} transactions, {args.customers:,} customers, "
        f"batches of {args.batch:,}"
    )
    plot(log, summary, title, png, [d["before_batch"] for d in run["days"]])
    results["png"] = str(png.relative_to(ROOT) if png.is_relative_to(ROOT) else png)
    out.write_text(json.dumps(results, indent=1, default=str))
    if args.latest:
        merge_latest(Path(args.latest), results)
    print_report(results)
    print(f"\nwrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
