"""streamguard benchmark: runner throughput in memory and through local Kinesis, and the
produce-to-scored latency of sensor-triggered runs under the real Dagster daemon
(bench/sensor.py: p50/p99 over single events on an idle stream, split into its parts).

Run with `make bench`. Prints a table and writes bench/results/latest.json. Not a test: numbers
depend on the machine, so they are reported side by side from one run, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform  # the standard-library module (the repo's platform/ is config only)
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ceiling import bench_ceiling, print_ceiling  # noqa: E402
from bench.common import merge_results  # noqa: E402
from bench.sensor import bench_sensor, print_summary  # noqa: E402
from bench.sources import bench_cdc, bench_files  # noqa: E402
from bench.spark_scoring import bench_scoring  # noqa: E402
from models.features import FeatureState, compute_features, replay  # noqa: E402
from models.registry import LoadedModel  # noqa: E402
from models.simulate import simulate  # noqa: E402
from models.training import TrainResult, train  # noqa: E402
from streamguard.kinesis import (  # noqa: E402
    ensure_stream,
    kinesis_client,
    produce_transactions,
    transaction_records,
)
from streamguard.lake import Lake  # noqa: E402
from streamguard.local_kinesis import LocalKinesis  # noqa: E402
from streamguard.pipeline import scoring_runner  # noqa: E402
from streamguard.sources import KinesisSource, MemorySource  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_model(
    sim_tx: pa.Table, labels: pa.Table, days: int = 10
) -> tuple[LoadedModel, TrainResult]:
    start = pc.min(sim_tx["event_time"]).as_py()
    history = sim_tx.filter(pc.less(sim_tx["event_time"], start + timedelta(days=days)))
    features = replay(history, labels).features.to_pandas()
    cutoff = pd.Timestamp(start + timedelta(days=days))
    result = train(features, labels.to_pandas(), cutoff, pd.Timedelta(days=2))
    return LoadedModel(model=result.model, name="fraud_model", version="bench"), result


def bench_memory(sim_tx: pa.Table, model: LoadedModel, batch: int, work: Path) -> dict:
    records = list(transaction_records(sim_tx))
    source = MemorySource.split([r[0] for r in records], [r[1] for r in records], n_shards=2)
    out: dict = {"records": len(records), "batch_records": batch}

    started = time.perf_counter()
    state = FeatureState.empty()
    for offset in range(0, sim_tx.num_rows, batch):
        result = compute_features(sim_tx.slice(offset, batch), state)
        state = state.updated(result.state)
    out["features_only_tx_per_s"] = sim_tx.num_rows / (time.perf_counter() - started)

    runner = scoring_runner(
        Lake(work / "lake-memory"), source, None, max_batch_records=batch, model=model
    )
    started = time.perf_counter()
    report = runner.run()
    seconds = time.perf_counter() - started
    out.update(
        runner_seconds=seconds,
        runner_tx_per_s=report.n_records / seconds,
        batches=len(report.batches),
        per_batch_seconds=seconds / max(1, len(report.batches)),
    )
    return out


def bench_kinesis(sim_tx: pa.Table, model: LoadedModel, batch: int, work: Path, n: int) -> dict:
    subset = sim_tx.slice(0, n)
    with LocalKinesis(work / "kinesis", persist=False) as server:
        client = kinesis_client(server.start())
        ensure_stream(client, "bench", shards=2)
        started = time.perf_counter()
        produce_transactions(client, "bench", subset, progress=False)
        produce_s = time.perf_counter() - started
        runner = scoring_runner(
            Lake(work / "lake-kinesis"),
            KinesisSource(client, "bench"),
            None,
            max_batch_records=batch,
            model=model,
        )
        started = time.perf_counter()
        report = runner.run()
        seconds = time.perf_counter() - started
    return {
        "records": n,
        "produce_tx_per_s": n / produce_s,
        "kinesis_tx_per_s": report.n_records / seconds,
        "kinesis_seconds": seconds,
    }


def bench_kafka(sim_tx: pa.Table, model: LoadedModel, batch: int, work: Path, n: int) -> dict:
    """Produce to a local Kafka broker, then score the topic: source + runner end to end, once
    without and once with the alerts published back to Kafka (transactional, per batch)."""
    from streamguard.alerts import KafkaAlertSink
    from streamguard.kafka import KafkaSettings, KafkaSource, client_config, ensure_topic
    from streamguard.kafka import produce_records as produce_to_kafka
    from streamguard.local_kafka import local_kafka

    subset = sim_tx.slice(0, n)
    records = list(transaction_records(subset))
    out: dict = {"records": n}
    with local_kafka(work / "kafka") as bootstrap:
        config = client_config(KafkaSettings(bootstrap))
        ensure_topic(config, "bench", 2)
        started = time.perf_counter()
        produce_to_kafka(config, "bench", records)
        out["produce_tx_per_s"] = n / (time.perf_counter() - started)
        alerts = KafkaAlertSink(config, "bench-alerts", job="bench")
        for name, sinks in (("kafka_tx_per_s", []), ("kafka_with_alerts_tx_per_s", [alerts])):
            with KafkaSource(config, "bench") as source:
                runner = scoring_runner(
                    Lake(work / f"lake-{name}"),
                    source,
                    None,
                    max_batch_records=batch,
                    model=model,
                    sinks=sinks,
                )
                started = time.perf_counter()
                report = runner.run()
                out[name] = report.n_records / (time.perf_counter() - started)
            out["alerts"] = report.rows("alerts")
        alerts.close()  # before the broker stops
    return out


def bench_spark(
    sim_tx: pa.Table, trained: tuple[LoadedModel, TrainResult], batch: int, work: Path, n: int
) -> dict:
    """The Spark executor on the first `n` transactions vs the in-process runner on the same.

    Files of `batch` records each, one per micro-batch, so both engines see the same batches.
    Then the two ways to score on Spark (pandas batch on the driver, `spark_udf`) on the features
    the Spark run wrote.
    """
    model, result = trained
    n = min(n or sim_tx.num_rows, sim_tx.num_rows)
    from streamguard.spark.fraud import jsonl_source, run_fraud_on_spark
    from streamguard.spark.session import spark_session

    subset = sim_tx.slice(0, n)
    records = [r[0] for r in transaction_records(subset)]
    folder = work / "spark-input"
    folder.mkdir()
    for i, offset in enumerate(range(0, len(records), batch)):
        path = folder / f"part-{i:05d}.jsonl"
        path.write_bytes(b"\n".join(records[offset : offset + batch]) + b"\n")
        os.utime(path, ns=(i * 1_000_000_000, i * 1_000_000_000))
    local = MemorySource.split(records, [r[1] for r in transaction_records(subset)], n_shards=1)
    runner = scoring_runner(
        Lake(work / "lake-local-small"), local, None, max_batch_records=batch, model=model
    )
    started = time.perf_counter()
    runner.run()
    local_s = time.perf_counter() - started

    started = time.perf_counter()
    spark = spark_session(master="local[*]")
    session_s = time.perf_counter() - started
    started = time.perf_counter()
    report = run_fraud_on_spark(
        spark, lambda s: jsonl_source(s, folder), Lake(work / "lake-spark"),
        work / "spark-checkpoint", model=model, buckets=8,
    )  # fmt: skip
    spark_s = time.perf_counter() - started
    store = bench_spark_state_store(spark, folder, work, model, n)
    # Scoring compared on the first 100k feature rows (the frame goes to Spark from pandas).
    features = Lake(work / "lake-spark").read("features").slice(0, 100_000).to_pandas()
    scoring = bench_scoring(spark, result, features, work)
    spark.stop()
    batches = len(report.batches)
    return {
        "records": n,
        "in_process_tx_per_s": n / local_s,
        "spark_tx_per_s": n / spark_s,
        "spark_session_start_s": session_s,
        "spark_batches": batches,
        "spark_per_batch_s": spark_s / max(1, batches),
        "spark_median_batch_s": statistics.median(b.total_s for b in report.batches),
        **store,
        "scoring": scoring,
    }


def bench_spark_state_store(
    spark: Any, folder: Path, work: Path, model: LoadedModel, n: int
) -> dict:
    """The state-store mode (customer state in transformWithStateInPandas) on the same files.

    Runs after the Delta-state mode in the same session (a warm JVM), so the median batch time is
    reported too: it leaves the first batch's warm-up out of both.
    """
    from streamguard.spark.fraud import jsonl_source
    from streamguard.spark.fraud_state import run_fraud_on_spark_state_store

    started = time.perf_counter()
    report = run_fraud_on_spark_state_store(
        spark, lambda s: jsonl_source(s, folder), Lake(work / "lake-spark-store"),
        work / "spark-store-checkpoint", model=model, buckets=8,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    batches = len(report.batches)
    return {
        "state_store_tx_per_s": n / seconds,
        "state_store_per_batch_s": seconds / max(1, batches),
        "state_store_median_batch_s": statistics.median(b.total_s for b in report.batches),
        "state_store_operator_s": sum(b.features_s for b in report.batches),
    }


def spark_state_store_rows(spark: dict) -> list[tuple[str, str, str]]:
    """The state-store mode next to the Delta-state mode and in-process; the two ways to score."""
    scoring = spark["scoring"]
    return [
        (
            "Spark, customer state in state store",
            f"{spark['state_store_tx_per_s']:,.0f} tx/s",
            f"{spark['state_store_tx_per_s'] / spark['spark_tx_per_s']:.2f} of Delta-state",
        ),
        (
            "  (vs in-process)",
            f"{spark['state_store_tx_per_s'] / spark['in_process_tx_per_s']:.2f}",
            "-",
        ),
        (
            "Spark median batch: Delta / store",
            f"{spark['spark_median_batch_s']:.2f} s / {spark['state_store_median_batch_s']:.2f} s",
            "-",
        ),
        (
            "score: pandas batch on the driver",
            f"{scoring['driver_rows_per_s']:,.0f} rows/s",
            "1.00",
        ),
        (
            "score: mlflow.pyfunc.spark_udf",
            f"{scoring['spark_udf_rows_per_s']:,.0f} rows/s",
            f"{scoring['spark_udf_rows_per_s'] / scoring['driver_rows_per_s']:.3f}",
        ),
    ]


def main_spark_only(args: argparse.Namespace) -> int:
    """Just the Spark part, on the same generated data as the full run."""
    sim = simulate(days=args.days, customers=args.customers, seed=7)
    trained = train_model(sim.transactions, sim.labels)
    with tempfile.TemporaryDirectory() as tmp:
        spark = bench_spark(
            sim.transactions, trained, args.spark_batch, Path(tmp), args.spark_records
        )
    rows = [
        ("in-process, same input", f"{spark['in_process_tx_per_s']:,.0f} tx/s", "-"),
        (
            "Spark, Delta state",
            f"{spark['spark_tx_per_s']:,.0f} tx/s",
            f"{spark['spark_tx_per_s'] / spark['in_process_tx_per_s']:.2f} of in-process",
        ),
        *spark_state_store_rows(spark),
        ("Spark session start", f"{spark['spark_session_start_s']:.1f} s", "-"),
    ]
    print(
        f"\nSpark vs in-process ({os.cpu_count()} cores, first {spark['records']:,} transactions)"
    )
    for name, value, ratio in rows:
        print(f"{name:36} {value:>28} {ratio:>24}")
    print(json.dumps(spark, indent=2))
    return 0


def main_ceiling_only(args: argparse.Namespace) -> int:
    """Just the ceiling, on the same generated data as the full run; its numbers go into the
    results file under `ceiling`, every other key of it kept."""
    sim = simulate(days=args.days, customers=args.customers, seed=7)
    model, _ = train_model(sim.transactions, sim.labels)
    with tempfile.TemporaryDirectory() as tmp:
        ceiling = bench_ceiling(
            sim.transactions, model, args.batch, Path(tmp), args.ceiling_records
        )
    print_ceiling(ceiling)
    out = Path(args.out)
    stamp = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "cores": os.cpu_count()}
    merge_results({"ceiling": stamp | ceiling}, out)
    print(f"\nwrote the ceiling into {out}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--days", type=int, default=42, help="42 days x 10k customers ~ 1M rows")
    parser.add_argument("--batch", type=int, default=50_000)
    parser.add_argument("--kinesis-records", type=int, default=200_000)
    parser.add_argument(
        "--spark-records",
        type=int,
        default=0,
        help="transactions for the Spark comparison (default 0: the whole input, as in-process)",
    )
    parser.add_argument(
        "--spark-batch", type=int, default=50_000, help="records per micro-batch, both engines"
    )
    parser.add_argument(
        "--ceiling-records",
        type=int,
        default=300_000,
        help="transactions for the ceiling (each stage alone vs the in-memory runner)",
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    parser.add_argument(
        "--sensor-events", type=int, default=20, help="single events timed through the daemon"
    )
    parser.add_argument(
        "--only-sources",
        action="store_true",
        help="only the runner in memory, through Kinesis and through Kafka; prints, no file",
    )
    parser.add_argument(
        "--only-ceiling",
        action="store_true",
        help="only the ceiling (each stage alone vs the runner in memory); sets its key in --out",
    )
    parser.add_argument(
        "--only-spark",
        action="store_true",
        help="only the Spark comparison (Delta state, state store, in-process); prints, no file",
    )
    args = parser.parse_args()
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    if args.only_spark:
        return main_spark_only(args)
    if args.only_ceiling:
        return main_ceiling_only(args)

    results: dict = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "cores": os.cpu_count(),
        "python": _platform.python_version(),
    }
    started = time.perf_counter()
    sim = simulate(days=args.days, customers=args.customers, seed=7)
    results["generate_seconds"] = time.perf_counter() - started
    results["transactions"] = sim.transactions.num_rows
    print(f"generated {sim.transactions.num_rows:,} transactions", flush=True)
    model, train_result = train_model(sim.transactions, sim.labels)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        memory = bench_memory(sim.transactions, model, args.batch, work)
        print(f"in-memory runner: {memory['runner_tx_per_s']:,.0f} tx/s", flush=True)
        if not args.only_sources:
            ceiling = bench_ceiling(sim.transactions, model, args.batch, work, args.ceiling_records)
            print(f"ceiling: runner {ceiling['runner_tx_per_s']:,.0f} tx/s", flush=True)
        kin = bench_kinesis(sim.transactions, model, args.batch, work, args.kinesis_records)
        print(f"kinesis runner: {kin['kinesis_tx_per_s']:,.0f} tx/s", flush=True)
        kafka = bench_kafka(sim.transactions, model, args.batch, work, args.kinesis_records)
        print(f"kafka runner: {kafka['kafka_tx_per_s']:,.0f} tx/s", flush=True)
        files = bench_files(
            sim.transactions.slice(0, args.kinesis_records), model, args.batch, work
        )
        print(f"files runner (json lines): {files['json']['runner_rows_per_s']:,.0f} tx/s")
        cdc = bench_cdc(work)
        print(f"cdc: {cdc['scd1']['changes_per_s']:,.0f} changes/s (SCD1)", flush=True)
        if args.only_sources:
            sources = {"memory": memory, "kinesis": kin, "kafka": kafka, "files": files, "cdc": cdc}
            print(json.dumps(sources, indent=1))
            return 0
        spark = bench_spark(
            sim.transactions, (model, train_result), args.spark_batch, work, args.spark_records
        )
        print(f"spark executor: {spark['spark_tx_per_s']:,.0f} tx/s", flush=True)
        latency = bench_sensor(work / "sensor", events=args.sensor_events)
    results.update(
        runner_tx_per_s=memory["runner_tx_per_s"],
        kinesis_tx_per_s=kin["kinesis_tx_per_s"],
        kafka_tx_per_s=kafka["kafka_tx_per_s"],
        sensor_p50_s=latency["p50_s"],
        sensor_p99_s=latency["p99_s"],
        memory=memory,
        ceiling=ceiling,
        kinesis=kin,
        kafka=kafka,
        files=files,
        cdc=cdc,
        spark=spark,
        sensor=latency,
        peak_rss_mib=peak_rss_mib(),
    )
    rows = [
        ("features only (in memory)", f"{memory['features_only_tx_per_s']:,.0f} tx/s", "1.00"),
        (
            "runner, in-memory source",
            f"{memory['runner_tx_per_s']:,.0f} tx/s",
            f"{memory['runner_tx_per_s'] / memory['features_only_tx_per_s']:.2f}",
        ),
        (
            "runner, local Kinesis",
            f"{kin['kinesis_tx_per_s']:,.0f} tx/s",
            f"{kin['kinesis_tx_per_s'] / memory['features_only_tx_per_s']:.2f}",
        ),
        (
            "runner, local Kafka",
            f"{kafka['kafka_tx_per_s']:,.0f} tx/s",
            f"{kafka['kafka_tx_per_s'] / memory['features_only_tx_per_s']:.2f}",
        ),
        (
            "runner, local Kafka + alerts to Kafka",
            f"{kafka['kafka_with_alerts_tx_per_s']:,.0f} tx/s",
            f"{kafka['kafka_with_alerts_tx_per_s'] / memory['features_only_tx_per_s']:.2f}",
        ),
        (
            f"in-process, first {spark['records']:,} (batches of {args.spark_batch:,})",
            f"{spark['in_process_tx_per_s']:,.0f} tx/s",
            "-",
        ),
        (
            "Spark executor, same input",
            f"{spark['spark_tx_per_s']:,.0f} tx/s",
            f"{spark['spark_tx_per_s'] / spark['in_process_tx_per_s']:.2f} of in-process",
        ),
        ("Spark session start", f"{spark['spark_session_start_s']:.1f} s", "-"),
        ("Spark per micro-batch", f"{spark['spark_per_batch_s']:.2f} s", "-"),
        *spark_state_store_rows(spark),
        ("produce to local Kinesis", f"{kin['produce_tx_per_s']:,.0f} tx/s", "-"),
        ("produce to local Kafka", f"{kafka['produce_tx_per_s']:,.0f} tx/s", "-"),
        *(
            (
                f"file source alone, {fmt} ({files['files']} files)",
                f"{files[fmt]['source_rows_per_s']:,.0f} rows/s",
                "-",
            )
            for fmt in ("json", "csv", "parquet")
        ),
        *(
            (
                f"runner, {fmt} files",
                f"{files[fmt]['runner_rows_per_s']:,.0f} tx/s",
                f"{files[fmt]['runner_rows_per_s'] / memory['features_only_tx_per_s']:.2f}",
            )
            for fmt in ("json", "csv", "parquet")
        ),
        ("DMS changes applied, SCD1", f"{cdc['scd1']['changes_per_s']:,.0f} /s", "-"),
        ("DMS changes applied, SCD2", f"{cdc['scd2']['changes_per_s']:,.0f} /s", "-"),
        ("per micro-batch", f"{memory['per_batch_seconds']:.2f} s / {args.batch:,} records", "-"),
        (
            f"sensor: produce -> scored, {latency['events']} events",
            f"p50 {latency['p50_s']:.1f} s / p99 {latency['p99_s']:.1f} s",
            "-",
        ),
        ("peak RSS", f"{results['peak_rss_mib']:,.0f} MiB", "-"),
    ]
    print(
        f"\nstreamguard bench ({results['cores']} cores, {results['transactions']:,} transactions)"
    )
    print(f"{'measure':34} {'value':>28} {'vs features':>12}")
    for name, value, ratio in rows:
        print(f"{name:34} {value:>28} {ratio:>12}")
    print_ceiling(ceiling)
    print_summary(latency)
    out = Path(args.out)
    # Keys other benches set (continuous_p50_ms, ...) stay; sensor_event_to_alert_s was the
    # one-event measure sensor_p50_s replaced.
    merge_results(results, out, drop=["sensor_event_to_alert_s"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
