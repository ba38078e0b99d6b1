"""Continuous mode: event-to-scored latency at a steady produce rate through a local broker.

A producer process sends simulated transactions at a steady rate (a chunk every 20 ms) to a
local Kinesis server (or Kafka broker) and notes when each was sent; the continuous worker
(`streamguard.continuous.run_continuous`, the champion resolved from MLflow as in a
deployment) scores them. The runner's write hook notes when each batch's `scores` rows landed
in the lake (its `alerts` land one Delta commit later). A transaction's latency is that time
minus its send time; the time to the end of its batch (state tables written and the batch
committed; while batches follow each other, the worker writes a batch's commit mark with the
next batch's plan, `Checkpoints.defer_commits`) is reported next to it.

Not a test: the numbers depend on the machine and on what else runs on it. Run it alone:

    .venv/bin/python bench/continuous.py [--seconds 60] [--rates 1000 10000] [--source kafka]

`bench_continuous(work)` returns the dict it prints (`continuous_p50_ms`, `continuous_p99_ms` at
1,000 tx/s, else the first rate, `continuous_<rate>_p50_ms`/`_p99_ms` per rate, and the details
per rate). `main` merges those two keys and the whole dict (as `continuous`) into
`bench/results/latest.json`, keeping the other benches' keys (`--no-write`: not).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, customer_state, percentile, train_champion  # noqa: E402
from bench.common import merge_results as merge_into_results  # noqa: E402
from models.job import CUSTOMER_STATE, SCORES  # noqa: E402
from models.simulate import simulate  # noqa: E402
from streamguard.checkpoint import BatchPlan  # noqa: E402
from streamguard.config import Home  # noqa: E402
from streamguard.continuous import (  # noqa: E402
    ContinuousSettings,
    StopRequest,
    idle_wait_for,
    run_continuous,
)
from streamguard.lake import Lake  # noqa: E402
from streamguard.pipeline import scoring_job_name, scoring_runner  # noqa: E402
from streamguard.runner import BatchReport  # noqa: E402

CHUNK_S = 0.02  # the producer sends what is due every 20 ms
HEADLINE_RATE = 1_000  # `continuous_p50_ms`/`_p99_ms` are at this rate when it was run
WARMUP_S = 5.0  # records sent in the first seconds are left out (first model load, JIT, caches)
SHARDS = 2
# A local server takes as many reads as it is sent; AWS takes 5 per second per shard (0.2 s).
LOCAL_POLL_INTERVAL_S = 0.05


# --------------------------------------------------------------------------- producer process


def produce_steady(
    source: str, address: str, stream: str, payloads: str, rate: int, seconds: float, out: str
) -> None:
    """Send the records of `payloads` (Parquet: data, key, transaction_id) at `rate` per second
    for `seconds` (or until they run out); write (transaction_id, sent_at) to `out`.

    Each chunk's records are stamped with the time just before the chunk is sent, so the
    latency includes the producer's own call. A chunk goes every CHUNK_S (what became due
    since the last one): sending whatever was due the moment the last call returned made a call
    every few records (about 300 PutRecords a second at 1,000 tx/s, half a core, and as many
    requests for the local server), CPU the worker on the same two cores then lacked (now 50
    calls a second, 15 % of a core).
    """
    table = pq.read_table(payloads)
    data = table["data"].to_pylist()
    keys = table["key"].to_pylist()
    n = min(len(data), int(rate * seconds))
    sent_at = np.zeros(n)
    send = _sender(source, address, stream)
    Path(out).with_suffix(".started").touch()  # the worker's clock starts with the first send
    started = time.time()
    done = 0
    while done < n:
        now = time.time()
        due = min(n, int((now - started) * rate) + 1)
        if due > done:
            sent_at[done:due] = now
            send(list(zip(data[done:due], keys[done:due], strict=True)))
            done = due
        # The next chunk CHUNK_S after this one, or when the next record is due if later.
        pause = max(now + CHUNK_S, started + done / rate) - time.time()
        if pause > 0:
            time.sleep(pause)
    ids = table["transaction_id"].slice(0, n)
    pq.write_table(pa.table({"transaction_id": ids, "sent_at": sent_at}), out)


def _sender(source: str, address: str, stream: str) -> Any:
    if source == "kafka":
        from confluent_kafka import Producer

        from streamguard.kafka import PRODUCER, KafkaSettings, client_config

        producer = Producer({**client_config(KafkaSettings(address)), **PRODUCER})

        def send_kafka(records: list[tuple[bytes, str]]) -> None:
            for value, key in records:
                producer.produce(stream, value=value, key=key)
            producer.flush(30)

        return send_kafka
    from streamguard.kinesis import kinesis_client, put_records

    client = kinesis_client(address)

    def send_kinesis(records: list[tuple[bytes, str]]) -> None:
        put_records(client, stream, records)

    return send_kinesis


# --------------------------------------------------------------------------- one rate


def _payloads(transactions: pa.Table, path: Path) -> int:
    from streamguard.kinesis import transaction_records

    ordered = transactions.sort_by("event_time")  # the order the producer sends them in
    pairs = list(transaction_records(ordered))
    ids = ordered["transaction_id"]
    pq.write_table(
        pa.table(
            {
                "data": pa.array([p for p, _ in pairs], pa.binary()),
                "key": [k for _, k in pairs],
                "transaction_id": ids,
            }
        ),
        path,
    )
    return len(pairs)


def bench_rate(
    home: Home,
    transactions: pa.Table,
    rate: int,
    seconds: float,
    work: Path,
    *,
    source: str = "kinesis",
    address: str,
    settings: ContinuousSettings,
    max_batch_records: int,
    poll_interval_s: float,
    state_customers: int = 0,
) -> dict[str, Any]:
    """One steady-rate run on a fresh stream and lake; latency percentiles and what it took.

    `state_customers`: the lake starts with that many other customers' state (a bank's
    customers are many more than one minute's stream touches): what each state write is
    measured against."""
    stream = f"continuous-{rate}"
    n = min(transactions.num_rows, int(rate * seconds))
    payloads = work / f"payloads-{rate}.parquet"
    _payloads(transactions.slice(0, n), payloads)
    lake = Lake(work / f"lake-{rate}")
    close = None
    if source == "kafka":
        from streamguard.kafka import KafkaSettings, KafkaSource, client_config, ensure_topic

        config = client_config(KafkaSettings(address))
        ensure_topic(config, stream, SHARDS)
        reader: Any = KafkaSource(config, stream)
        close = reader.close
    else:
        from streamguard.kinesis import ensure_stream, kinesis_client
        from streamguard.kinesis_tail import KinesisTailSource

        client = kinesis_client(address)
        ensure_stream(client, stream, shards=SHARDS)
        reader = KinesisTailSource(client, stream, poll_interval_s=poll_interval_s)
        close = reader.close
    runner = scoring_runner(
        lake,
        reader,
        home.mlflow_tracking_uri,
        max_batch_records=max_batch_records,
        job=scoring_job_name(source, stream),
    )
    if state_customers:
        seed = customer_state(np.arange(state_customers), 0, seed=state_customers)
        lake.upsert(CUSTOMER_STATE, seed, ["customer_id"], "bench-seed", 0)
    runner.recover()  # opens the lake's tables and the model before the clock starts
    lake.read(CUSTOMER_STATE, filter=pc.field("customer_id") == "")  # held, as a running worker
    visible: dict[int, float] = {}  # batch id -> when its `scores` rows landed in the lake
    committed: dict[int, float] = {}  # batch id -> when the batch was committed
    sizes: list[int] = []
    batch_s: list[float] = []

    def after_write(plan: BatchPlan, table: str) -> None:
        if table == SCORES:
            visible[plan.batch_id] = time.time()

    runner.after_write = after_write  # type: ignore[method-assign]  # the runner's write hook

    def on_batch(batch: BatchReport) -> None:
        committed[batch.batch_id] = time.time()
        sizes.append(batch.n_records)
        batch_s.append(batch.seconds)

    sent_file = work / f"sent-{rate}.parquet"
    producer = multiprocessing.get_context("spawn").Process(
        target=produce_steady,
        args=(source, address, stream, str(payloads), rate, seconds, str(sent_file)),
    )
    scored = [0]

    def count(batch: BatchReport) -> None:
        on_batch(batch)
        scored[0] += batch.n_records

    deadline = time.monotonic() + seconds + 120

    def should_stop() -> str | None:
        if producer.exitcode not in (None, 0):
            return f"the producer failed (exit code {producer.exitcode})"
        if producer.exitcode is not None and scored[0] >= n:
            return "every record produced was scored"
        if time.monotonic() > deadline:
            return "deadline"
        return None

    load_before = os.getloadavg()
    producer.start()
    while not sent_file.with_suffix(".started").exists() and producer.exitcode is None:
        time.sleep(0.01)  # the producer process imports for a few seconds
    started = time.time()
    report = run_continuous(
        runner,
        StopRequest(),
        replace(settings, check_every_s=0.2),
        on_batch=count,
        should_stop=should_stop,
    )
    wall = time.time() - started
    producer.join(60)
    if close is not None:
        close()
    if producer.exitcode != 0:
        raise RuntimeError(f"the producer failed (exit code {producer.exitcode})")
    sent = pq.read_table(sent_file)
    rows = lake.read("scores", columns=["transaction_id", "batch_id"])
    joined = rows.join(sent, "transaction_id", join_type="inner")
    batches = joined["batch_id"].to_pylist()
    visible_at = np.array([visible.get(b, np.nan) for b in batches])
    commit_at = np.array([committed.get(b, np.nan) for b in batches])
    sent_at = joined["sent_at"].to_numpy()
    latency_ms = (visible_at - sent_at) * 1000
    to_commit_ms = (commit_at - sent_at) * 1000
    warm = sent_at >= sent_at.min() + WARMUP_S if len(sent_at) else np.ones(0, bool)
    steady = latency_ms[warm]
    alerts = lake.read("alerts", columns=["transaction_id"])
    unique = pc.count_distinct(rows["transaction_id"]).as_py()
    return {
        "rate_target": rate,
        "seconds": seconds,
        "produced": sent.num_rows,
        "produce_rate": sent.num_rows / max(1e-9, float(np.ptp(sent["sent_at"].to_numpy()))),
        "scored": rows.num_rows,
        "scored_once": unique == rows.num_rows == sent.num_rows,
        "alerts": alerts.num_rows,
        "wall_s": wall,
        "stop_reason": report.stop_reason,
        "batches": report.batches,
        "records_per_batch_mean": float(np.mean(sizes)) if sizes else 0.0,
        "batch_p50_ms": percentile(np.array(batch_s), 50) * 1000,
        "batch_p99_ms": percentile(np.array(batch_s), 99) * 1000,
        # The slowest batches (their place in the run, ms, records): a tail has a cause.
        "slowest_batches": [
            [int(i), round(batch_s[i] * 1000, 1), sizes[i]] for i in np.argsort(batch_s)[::-1][:5]
        ],
        "compactions": report.compactions,
        "log_checkpoints": report.log_checkpoints,
        "idle_polls": report.idle_polls,
        "p50_ms": percentile(steady, 50),
        "p99_ms": percentile(steady, 99),
        "max_ms": float(np.nanmax(steady)) if len(steady) else float("nan"),
        "all_p99_ms": percentile(latency_ms, 99),
        "to_commit_p50_ms": percentile(to_commit_ms[warm], 50),
        "to_commit_p99_ms": percentile(to_commit_ms[warm], 99),
        "load_avg_1m_before": load_before[0],
        "load_avg_1m_after": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- whole bench


def champion_home(work: Path) -> Home:
    """A state folder whose MLflow store holds a champion trained on a small simulation."""
    home = Home(work / "home").ensure()
    train_champion(home, days=14, customers=300, seed=11)
    return home


def bench_continuous(
    work: Path,
    *,
    rates: Sequence[int] = (1_000, 10_000),
    seconds: float = 60.0,
    source: str = "kinesis",
    poll_interval_s: float = LOCAL_POLL_INTERVAL_S,
    max_batch_records: int = 10_000,
    state_customers: int = 0,
) -> dict[str, Any]:
    """Latency of the continuous worker at each steady rate, each on a fresh stream and lake.

    `poll_interval_s`: how often each shard (Kinesis) or the idle topic (Kafka) is read, as
    `streamguard score --continuous --poll-interval` takes it.
    """
    settings = ContinuousSettings(idle_wait_s=idle_wait_for(source, poll_interval_s))
    home = champion_home(work)
    needed = int(max(rates) * seconds)
    customers = max(1_000, needed // 140)  # ~146 transactions per customer over 60 days
    transactions = simulate(days=60, customers=customers, seed=5).transactions
    out: dict[str, Any] = {
        "source": source,
        "cores": os.cpu_count(),
        "poll_interval_s": poll_interval_s,
        "idle_wait_s": settings.idle_wait_s,
        "max_batch_records": max_batch_records,
        "state_customers": state_customers,
    }
    with _broker(source, work) as address:
        for rate in rates:
            result = bench_rate(
                home,
                transactions,
                rate,
                seconds,
                work,
                source=source,
                address=address,
                settings=settings,
                max_batch_records=max_batch_records,
                poll_interval_s=poll_interval_s,
                state_customers=state_customers,
            )
            out[f"at_{rate}"] = result
            out[f"continuous_{rate}_p50_ms"] = result["p50_ms"]
            out[f"continuous_{rate}_p99_ms"] = result["p99_ms"]
    first = HEADLINE_RATE if HEADLINE_RATE in rates else rates[0]
    out["headline_rate"] = first
    out["continuous_p50_ms"] = out[f"continuous_{first}_p50_ms"]
    out["continuous_p99_ms"] = out[f"continuous_{first}_p99_ms"]
    return out


def merge_results(out: dict[str, Any], path: Path = RESULTS) -> None:
    """Put this run's headline keys and its details (`continuous`) into the shared results file,
    keeping every other key in it (other benches write theirs there too)."""
    merge_into_results(
        {
            "continuous_p50_ms": out["continuous_p50_ms"],
            "continuous_p99_ms": out["continuous_p99_ms"],
            "continuous": out,
        },
        path,
    )


class _broker:
    """The local Kinesis server or Kafka broker for the bench, stopped at the end."""

    def __init__(self, source: str, work: Path) -> None:
        self.source, self.work = source, work
        self._exit: Any = None

    def __enter__(self) -> str:
        if self.source == "kafka":
            from streamguard.local_kafka import local_kafka

            self._exit = local_kafka(self.work / "kafka")
            return str(self._exit.__enter__())
        from streamguard.local_kinesis import LocalKinesis

        server = LocalKinesis(self.work / "kinesis", persist=False)
        self._exit = server
        return server.start()

    def __exit__(self, *exc: object) -> None:
        if self.source == "kafka":
            self._exit.__exit__(*exc)
        else:
            self._exit.stop()


def print_continuous(out: dict[str, Any]) -> None:
    """The bench's table: one line per rate."""
    print(f"continuous mode through local {out['source']} ({out['cores']} cores)")
    print(
        f"  {'rate/s':>7} {'sent/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'commit p99':>10} {'batches':>7} {'rec/batch':>9} {'batch p50':>9} {'batch p99':>9} "
        f"{'once':>5} {'load':>9}"
    )
    for key, r in out.items():
        if not key.startswith("at_"):
            continue
        print(
            f"  {r['rate_target']:>7,} {r['produce_rate']:>7,.0f} {r['p50_ms']:>8.0f} "
            f"{r['p99_ms']:>8.0f} {r['max_ms']:>8.0f} {r['to_commit_p99_ms']:>10.0f} "
            f"{r['batches']:>7,} "
            f"{r['records_per_batch_mean']:>9.0f} {r['batch_p50_ms']:>9.0f} "
            f"{r['batch_p99_ms']:>9.0f} {r['scored_once']!s:>5} "
            f"{r['load_avg_1m_before']:>4.1f}/{r['load_avg_1m_after']:<4.1f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="seconds of steady produce")
    parser.add_argument("--rates", type=int, nargs="+", default=[1_000, 10_000])
    parser.add_argument("--source", choices=["kinesis", "kafka"], default="kinesis")
    parser.add_argument(
        "--poll-interval",
        type=float,
        default=LOCAL_POLL_INTERVAL_S,
        help="seconds between reads of each shard (AWS: 0.2 or more)",
    )
    parser.add_argument("--max-batch", type=int, default=10_000, help="records per batch at most")
    parser.add_argument(
        "--state-customers",
        type=int,
        default=0,
        help="start from this many other customers' state (synthetic, full windows)",
    )
    parser.add_argument("--output", default=None, help="also write the result as JSON here")
    parser.add_argument(
        "--no-write", action="store_true", help=f"do not merge the result into {RESULTS}"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = bench_continuous(
            Path(tmp),
            rates=args.rates,
            seconds=args.seconds,
            source=args.source,
            poll_interval_s=args.poll_interval,
            max_batch_records=args.max_batch,
            state_customers=args.state_customers,
        )
    print_continuous(out)
    print(json.dumps({k: v for k, v in out.items() if not k.startswith("at_")}, indent=1))
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1, default=str))
    if not args.no_write:
        merge_results(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
