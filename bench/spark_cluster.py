"""Spark on `local[*]` vs a standalone cluster on this machine, on the same input.

The fraud job in both Spark modes (Delta state, state store) reads the same batch files, one
per micro-batch, once with `local[*]` and once on a master + worker(s) started by
`streamguard.spark.cluster` (the CLI's `spark-cluster start`). Each engine gets a driver process
of its own (a JVM hosts one SparkContext, and each side then pays its own session start); the
in-process runner on the same records is the reference row. The tables both engines write are
compared (features and scores must be equal). Not a test: numbers depend on the machine and its
load, so they are printed side by side from one run, never asserted.

    .venv/bin/python bench/spark_cluster.py [--records 20000 --batch 5000 --workers 1 --cores 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.registry import LoadedModel  # noqa: E402
from streamguard.lake import Lake  # noqa: E402

MODES = ("delta", "store")
STAMPS = {"ingested_at", "scored_at", "created_at", "updated_at", "recorded_at"}


def driver(master: str, input_dir: Path, work: Path, model_file: Path, buckets: int) -> dict:
    """One engine: a session on `master`, then both Spark modes on the batch files."""
    from streamguard.spark.fraud import jsonl_source, run_fraud_on_spark
    from streamguard.spark.fraud_state import run_fraud_on_spark_state_store
    from streamguard.spark.session import spark_session

    model: LoadedModel = pickle.loads(model_file.read_bytes())
    started = time.perf_counter()
    spark = spark_session("streamguard-bench-cluster", master=master)
    out: dict[str, Any] = {
        "master": master,
        "session_s": time.perf_counter() - started,
        "cores": spark.sparkContext.defaultParallelism,
    }
    runs = (("delta", run_fraud_on_spark), ("store", run_fraud_on_spark_state_store))
    for mode, run in runs:
        started = time.perf_counter()
        report = run(
            spark,
            lambda s: jsonl_source(s, input_dir),
            Lake(work / f"lake-{mode}"),
            work / f"checkpoint-{mode}",
            model=model,
            buckets=buckets,
        )
        seconds = time.perf_counter() - started
        out[mode] = {
            "records": report.n_records,
            "seconds": seconds,
            "tx_per_s": report.n_records / seconds,
            "batches": len(report.batches),
            "median_batch_s": statistics.median(b.total_s for b in report.batches),
        }
    spark.stop()
    return out


def _write_batches(records: list[bytes], batch: int, folder: Path) -> int:
    """One file per micro-batch, in order (the file source orders new files by mtime)."""
    folder.mkdir(parents=True)
    n = 0
    for n, offset in enumerate(range(0, len(records), batch), start=1):
        path = folder / f"part-{n:05d}.jsonl"
        path.write_bytes(b"\n".join(records[offset : offset + batch]) + b"\n")
        os.utime(path, ns=(n * 1_000_000_000, n * 1_000_000_000))
    return n


def _same_tables(a: Path, b: Path) -> bool:
    """Whether two lakes hold the same features and scores (time stamps aside), row for row."""
    for name in ("features", "scores"):
        frames = []
        for root in (a, b):
            table = Lake(root).read(name)
            keep = [c for c in table.column_names if c not in STAMPS]
            frames.append(table.select(keep).sort_by("transaction_id").to_pandas())
        if not frames[0].equals(frames[1]):  # NaN equal to NaN, as in the parity tests
            return False
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=2_000)
    parser.add_argument("--days", type=int, default=21)
    parser.add_argument("--records", type=int, default=20_000, help="transactions scored")
    parser.add_argument("--batch", type=int, default=5_000, help="records per micro-batch")
    parser.add_argument("--buckets", type=int, default=8, help="feature groups per batch")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cores", type=int, default=2, help="cores per worker")
    parser.add_argument("--driver", nargs=4, metavar=("MASTER", "INPUT", "WORK", "MODEL"))
    args = parser.parse_args()
    if args.driver:  # the child: one engine, its numbers as JSON on stdout
        master, input_dir, work, model_file = args.driver
        result = driver(master, Path(input_dir), Path(work), Path(model_file), args.buckets)
        print(json.dumps(result))
        return 0

    from bench.run import train_model
    from models.simulate import simulate
    from streamguard.kinesis import transaction_records
    from streamguard.pipeline import scoring_runner
    from streamguard.sources import MemorySource
    from streamguard.spark.cluster import SparkCluster

    sim = simulate(days=args.days, customers=args.customers, seed=7)
    model, _ = train_model(sim.transactions, sim.labels)
    subset = sim.transactions.slice(0, min(args.records, sim.transactions.num_rows))
    pairs = list(transaction_records(subset))
    records = [payload for payload, _ in pairs]
    with tempfile.TemporaryDirectory(prefix="streamguard-bench-cluster-") as tmp:
        work = Path(tmp)
        input_dir = work / "input"
        batches = _write_batches(records, args.batch, input_dir)
        model_file = work / "model.pkl"
        model_file.write_bytes(pickle.dumps(model))

        source = MemorySource.split(records, [key for _, key in pairs], n_shards=1)
        runner = scoring_runner(
            Lake(work / "lake-in-process"), source, None, max_batch_records=args.batch, model=model
        )
        started = time.perf_counter()
        runner.run()
        in_process = len(records) / (time.perf_counter() - started)

        results: dict[str, dict[str, Any]] = {}
        started = time.perf_counter()
        with SparkCluster(work / "cluster", workers=args.workers, cores=args.cores) as cluster:
            cluster_start_s = time.perf_counter() - started
            for name, master in (("local", "local[*]"), ("standalone", cluster.url)):
                out = work / name
                out.mkdir()
                done = subprocess.run(
                    [sys.executable, __file__, "--buckets", str(args.buckets), "--driver",
                     master, str(input_dir), str(out), str(model_file)],
                    capture_output=True, text=True, check=False,
                )  # fmt: skip
                if done.returncode != 0:
                    sys.stderr.write(done.stderr[-4000:])
                    return 1
                results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        same = {
            mode: _same_tables(work / "local" / f"lake-{mode}", work / f"standalone/lake-{mode}")
            for mode in MODES
        }

    local, standalone = results["local"], results["standalone"]
    print(
        f"\nSpark local[*] vs standalone cluster ({os.cpu_count()} cores; {len(records):,} "
        f"transactions in {batches} batches of {args.batch:,}; cluster: {args.workers} worker(s) "
        f"x {args.cores} cores, started in {cluster_start_s:.1f} s)"
    )
    print(f"{'':28} {'local[*]':>14} {'standalone':>14} {'ratio':>7}")
    print(f"{'in-process runner':28} {in_process:>10,.0f} tx/s {'':>14} {'':>7}")
    for mode, label in (("delta", "Spark, Delta state"), ("store", "Spark, state store")):
        a, b = local[mode]["tx_per_s"], standalone[mode]["tx_per_s"]
        print(f"{label:28} {a:>10,.0f} tx/s {b:>10,.0f} tx/s {b / a:>7.2f}")
        a, b = local[mode]["median_batch_s"], standalone[mode]["median_batch_s"]
        print(f"{'  median batch':28} {a:>12.2f} s {b:>12.2f} s {b / a:>7.2f}")
    a, b = local["session_s"], standalone["session_s"]
    print(f"{'session start':28} {a:>12.1f} s {b:>12.1f} s {b / a:>7.2f}")
    print(
        "same features and scores on both engines: "
        + ", ".join(f"{mode} {'yes' if same[mode] else 'NO'}" for mode in MODES)
    )
    print(json.dumps({"in_process_tx_per_s": in_process, **results, "same_tables": same}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
