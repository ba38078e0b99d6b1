"""The `streamguard` command line: generate data, run local Kinesis, produce, score, train, demo."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any, NoReturn

from streamguard.config import Home


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _cmd_generate(args: argparse.Namespace) -> int:
    from models.simulate import simulate, write_simulation

    started = time.perf_counter()
    if args.dataset == "weather":
        from models.weather import simulate_weather, write_weather_files

        payloads = simulate_weather(stations=args.stations, hours=args.hours, seed=args.seed)
        files = write_weather_files(payloads, Path(args.out), files=args.files)
        print(f"wrote {len(payloads):,} weather readings to {len(files)} file(s) in {args.out}")
        return 0
    sim = simulate(
        days=args.days, customers=args.customers, seed=args.seed, terminals=args.terminals
    )
    tx_path, labels_path = write_simulation(sim, Path(args.out))
    print(
        f"wrote {sim.transactions.num_rows:,} transactions to {tx_path} and "
        f"{sim.labels.num_rows:,} labels to {labels_path} in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _client(args: argparse.Namespace) -> Any:
    from streamguard.kinesis import kinesis_client

    return kinesis_client(args.endpoint)


def _cmd_produce(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from streamguard.kinesis import ensure_stream, produce_transactions

    path = Path(args.path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    table = pq.read_table(path)
    client = _client(args)
    ensure_stream(client, args.stream, shards=args.shards)
    started = time.perf_counter()
    if args.rate:
        sent = 0
        step = max(1, args.rate)
        for offset in range(0, table.num_rows, step):
            tick = time.perf_counter()
            sent += produce_transactions(
                client, args.stream, table.slice(offset, step), progress=False
            )
            time.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
            print(f"\rproduced {sent:,}/{table.num_rows:,}", end="", flush=True)
        print()
    else:
        sent = produce_transactions(client, args.stream, table)
    seconds = time.perf_counter() - started
    print(f"produced {sent:,} records to {args.stream} in {seconds:.1f}s ({sent / seconds:,.0f}/s)")
    return 0


def _cmd_kinesis(args: argparse.Namespace) -> int:
    from streamguard.local_kinesis import LocalKinesis

    server = LocalKinesis(Home.from_env().ensure().kinesis, port=args.port)
    if args.action == "start":
        print(server.start())
    elif args.action == "stop":
        server.stop()
        print("stopped")
    else:
        print(server.endpoint if server.running() else "not running")
        return 0 if server.running() else 1
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from streamguard.lake import Lake
    from streamguard.pipeline import scoring_runner
    from streamguard.sources import KinesisSource

    home = Home.from_env().ensure()
    runner = scoring_runner(
        Lake(home.lake),
        KinesisSource(_client(args), args.stream),
        home.mlflow_tracking_uri,
        max_batch_records=args.max_batch,
    )
    report = runner.run()
    print(
        f"{len(report.batches)} batch(es), {report.n_records:,} records, "
        f"{report.rows('alerts'):,} alerts; positions {report.positions}"
    )
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from streamguard.pipeline import train_and_promote

    home = Home.from_env().ensure()
    outcome = train_and_promote(
        home,
        history=Path(args.history) if args.history else None,
        labels=Path(args.labels) if args.labels else None,
        train_days=args.train_days,
        label_delay_days=args.label_delay_days,
    )
    print(outcome.summary())
    return 0


def _print_change(change: Any) -> None:
    if not change.changed:
        print(f"fraud_model version {change.version} already is the champion; nothing changed")
    else:
        print(
            f"fraud_model champion: version {change.previous or '-'} -> {change.version} "
            f"({change.kind}: {change.reason})"
        )


def _cmd_rollback(args: argparse.Namespace) -> int:
    from models.promotion import rollback

    home = Home.from_env().ensure()
    _print_change(rollback(home.mlflow_tracking_uri, args.model, args.to or ""))
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from models.promotion import move_champion

    home = Home.from_env().ensure()
    reason = args.reason or "manual promotion"
    uri = home.mlflow_tracking_uri
    _print_change(move_champion(uri, args.model, args.version, "manual", reason))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamguard.demo import run_demo

    summary = run_demo(
        Home.from_env(),
        days=args.days,
        customers=args.customers,
        seed=args.seed,
        train_days=args.train_days,
        timeout=args.timeout,
    )
    print(summary.render())
    return 0 if summary.ok else 1


def _cmd_dev(args: argparse.Namespace) -> int:
    from streamguard.demo import run_dev

    run_dev(
        Home.from_env(),
        rate=args.rate,
        days=args.days,
        customers=args.customers,
        train_days=args.train_days,
        port=args.port,
    )
    return 0


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {value!r}") from None


def _cmd_backtest(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from models.backtest import backtest, read_dataset

    started = time.perf_counter()
    transactions = read_dataset(args.transactions)
    labels = read_dataset(args.labels) if args.labels else None
    result = backtest(
        transactions,
        labels,
        args.train_start,
        train_days=args.train_days,
        delay_days=args.delay_days,
        test_days=args.test_days,
        k=args.k,
        budget=args.budget,
        **({"candidate": args.model} if args.model else {}),
    )
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(result.to_json() + "\n")
    if args.predictions:
        preds = Path(args.predictions)
        preds.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(result.predictions_table(), preds)
    metrics = result.to_dict()

    def line(name: str, m: dict[str, Any]) -> str:
        values = [m["average_precision"], m["card_precision_at_k"], m["recall_at_budget"]]
        shown = ["n/a" if v is None else f"{v:.3f}" for v in values]
        return (
            f"  {name:<9} AP {shown[0]}  CP@{result.k} {shown[1]}  "
            f"recall@{result.budget}/day {shown[2]}"
        )

    print(
        f"backtest: {result.n_train:,} training rows ({result.n_train_fraud} fraud), "
        f"{result.n_test:,} test rows ({result.n_test_fraud} fraud) in "
        f"{time.perf_counter() - started:.1f}s\n"
        f"{line('model', metrics['model'])}\n{line('baseline', metrics['baseline'])}\n"
        f"metrics written to {output}"
    )
    return 0


def _cmd_replay(args: argparse.Namespace) -> int:
    import tempfile

    import pyarrow.parquet as pq

    from models.backtest import read_dataset
    from models.schema import TRANSACTION_SCHEMA

    table = read_dataset(args.dataset)
    missing = [name for name in TRANSACTION_SCHEMA.names if name not in table.column_names]
    if missing:
        raise ValueError(f"{args.dataset}: no column(s) {', '.join(missing)}")
    # Event-time order over the whole file: `produce` paces slice by slice and only orders
    # within a slice, so the file it reads must already be in order.
    table = table.select(TRANSACTION_SCHEMA.names).sort_by([("event_time", "ascending")])
    with tempfile.TemporaryDirectory(prefix="streamguard-replay-") as tmp:
        ordered = Path(tmp) / "transactions.parquet"
        pq.write_table(table, ordered)
        produce = argparse.Namespace(
            path=str(ordered),
            stream=args.stream,
            shards=args.shards,
            rate=args.rate,
            endpoint=args.endpoint,
        )
        return _cmd_produce(produce)


def _stream_target(parser: argparse.ArgumentParser) -> None:
    """The options of every command that writes into a stream."""
    parser.add_argument("--stream", required=True, help="stream name (created if missing)")
    parser.add_argument("--shards", type=_positive, default=2, help="shards if created (default 2)")
    parser.add_argument(
        "--rate", type=int, default=0, help="records per second (default: as fast as possible)"
    )
    parser.add_argument(
        "--endpoint", default=None, help="Kinesis endpoint (default: AWS_ENDPOINT_URL_KINESIS)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamguard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser(
        "generate",
        help="write a seeded synthetic dataset: transactions + labels (default) or weather",
    )
    gen.add_argument(
        "dataset", nargs="?", choices=["transactions", "weather"], default="transactions",
        help="what to generate (default transactions)",
    )  # fmt: skip
    gen.add_argument("--stations", type=_positive, default=20, help="weather stations (default 20)")
    gen.add_argument("--hours", type=_positive, default=6, help="weather hours (default 6)")
    gen.add_argument("--files", type=_positive, default=4, help="weather files (default 4)")
    gen.add_argument("--days", type=_positive, default=60, help="simulated days (default 60)")
    gen.add_argument("--customers", type=_positive, default=1000, help="customers (default 1000)")
    gen.add_argument(
        "--terminals", type=_positive, default=None, help="terminals (default customers/5)"
    )
    gen.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    gen.add_argument("--out", required=True, help="output folder")
    gen.set_defaults(func=_cmd_generate)

    prod = sub.add_parser("produce", help="put a transactions Parquet file into a Kinesis stream")
    prod.add_argument("path", help="transactions.parquet")
    _stream_target(prod)
    prod.set_defaults(func=_cmd_produce)

    kin = sub.add_parser("kinesis", help="start or stop the local Kinesis-compatible server")
    kin.add_argument("action", choices=["start", "stop", "status"])
    kin.add_argument("--port", type=_positive, default=None, help="port (default: a free one)")
    kin.set_defaults(func=_cmd_kinesis)

    score = sub.add_parser(
        "score", help="score a stream from its checkpoint to its end, in process"
    )
    score.add_argument("--stream", required=True, help="stream name")
    score.add_argument(
        "--max-batch", type=_positive, default=50_000, help="records per micro-batch"
    )
    score.add_argument(
        "--endpoint", default=None, help="Kinesis endpoint (default: AWS_ENDPOINT_URL_KINESIS)"
    )
    score.set_defaults(func=_cmd_score)

    train = sub.add_parser(
        "train", help="train a model, register it and promote it if it is better"
    )
    train.add_argument(
        "--history", default=None, help="transactions Parquet to replay (default: the feature log)"
    )
    train.add_argument("--labels", default=None, help="labels Parquet to load first")
    train.add_argument(
        "--train-days", type=_positive, default=None, help="days of history to train on"
    )
    train.add_argument(
        "--label-delay-days", type=int, default=7, help="days labels need to arrive (default 7)"
    )
    train.set_defaults(func=_cmd_train)

    roll = sub.add_parser(
        "rollback", help="move the champion alias back to the previous champion (or --to)"
    )
    roll.add_argument("--to", default=None, help="version to restore (default: the previous one)")
    roll.add_argument("--model", default="fraud_model", help="registered model name")
    roll.set_defaults(func=_cmd_rollback)

    prom = sub.add_parser("promote", help="make a registered version the champion by hand")
    prom.add_argument("--version", required=True, help="version number to promote")
    prom.add_argument("--reason", default=None, help="why (recorded with the change)")
    prom.add_argument("--model", default="fraud_model", help="registered model name")
    prom.set_defaults(func=_cmd_promote)

    demo = sub.add_parser("demo", help="the whole platform end to end on local components")
    demo.add_argument("--days", type=_positive, default=60, help="simulated days (default 60)")
    demo.add_argument("--customers", type=_positive, default=1000, help="customers (default 1000)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (default 7)")
    demo.add_argument(
        "--train-days", type=_positive, default=21, help="days of history to train on (default 21)"
    )
    demo.add_argument(
        "--timeout", type=_positive, default=900, help="seconds to wait for the stream to drain"
    )
    demo.set_defaults(func=_cmd_demo)

    dev = sub.add_parser(
        "dev", help="local Kinesis + Dagster UI + a producer trickling transactions"
    )
    dev.add_argument("--rate", type=_positive, default=200, help="records per second (default 200)")
    dev.add_argument("--days", type=_positive, default=60, help="simulated days (default 60)")
    dev.add_argument("--customers", type=_positive, default=1000, help="customers (default 1000)")
    dev.add_argument("--port", type=_positive, default=3000, help="Dagster UI port (default 3000)")
    dev.add_argument(
        "--train-days", type=_positive, default=21, help="days of history to train on (default 21)"
    )
    dev.set_defaults(func=_cmd_dev)

    back = sub.add_parser(
        "backtest",
        help="train a week, skip the label delay, test the next week; model vs a baseline",
    )
    back.add_argument(
        "--transactions", required=True, help="transactions Parquet or CSV (may hold is_fraud)"
    )
    back.add_argument(
        "--labels", default=None, help="labels Parquet or CSV (default: is_fraud in transactions)"
    )
    back.add_argument(
        "--train-start", type=_date, required=True, help="first training day, YYYY-MM-DD (UTC)"
    )
    back.add_argument("--train-days", type=_positive, default=7, help="days (default 7)")
    back.add_argument(
        "--delay-days",
        type=int,
        default=7,
        help="days between training and test; also the report delay of labels without one "
        "(default 7)",
    )
    back.add_argument("--test-days", type=_positive, default=7, help="days (default 7)")
    back.add_argument("--k", type=_positive, default=100, help="cards checked a day (default 100)")
    back.add_argument(
        "--budget", type=_positive, default=None, help="transaction alerts a day (default: k)"
    )
    back.add_argument(
        "--model",
        default=None,
        help="model family tested against the baseline: blend (the default model), "
        "hist_gradient_boosting, logistic_regression or random_forest",
    )
    back.add_argument("--output", required=True, help="metrics JSON file")
    back.add_argument("--predictions", default=None, help="test scores as Parquet (optional)")
    back.set_defaults(func=_cmd_backtest)

    rep = sub.add_parser(
        "replay", help="push a dataset into a Kinesis stream in event-time order, optionally paced"
    )
    rep.add_argument("dataset", help="transactions Parquet or CSV")
    _stream_target(rep)
    rep.set_defaults(func=_cmd_replay)
    return parser


def _interrupt_on_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, so every `finally` stops what it started.

    A process started in the background of a non-interactive shell inherits SIGINT as ignored;
    restoring the handler makes the commands that start servers stoppable however they run.
    """

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _interrupt_on_signals()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line for the user; --verbose for the traceback
        if args.verbose:
            logging.exception("failed")
        print(f"streamguard {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
