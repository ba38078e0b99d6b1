"""The `streamguard` command line: generate data, run local brokers, produce, score, train, demo."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from streamguard.config import ACCOUNT_HISTORY_FILE, Home

if TYPE_CHECKING:
    import pyarrow as pa

    from streamguard.commit import AlertSink
    from streamguard.kafka import ClientConfig
    from streamguard.local_server import LocalServer
    from streamguard.runner import MicroBatchRunner
    from streamguard.sources import Source

Handler = Callable[[argparse.Namespace], int]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


class UsageError(ValueError):
    """Arguments that parse one by one but not together: reported as a parse error (exit 2)."""


@dataclass(frozen=True)
class Arg:
    """One `add_argument` call, declared with the command that takes it."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """An argument of a command: `add_argument`'s parameters, as they are."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    arguments: tuple[Arg, ...]
    run: Handler


COMMANDS: dict[str, Command] = {}


def command(name: str, summary: str, *arguments: Arg) -> Callable[[Handler], Handler]:
    """Declare the decorated handler as `streamguard NAME`, taking `arguments`:

        @command("rollback", "move the champion alias back ...", arg("--to", help=...), MODEL)
        def _cmd_rollback(args: argparse.Namespace) -> int: ...

    `build_parser` makes the subcommands in the order they are declared. A handler returns the
    exit code. It raises `UsageError` for arguments that parse but do not go together (exit 2,
    one line, as argparse's own errors), any other exception for a failure (exit 1, one line;
    `--verbose` logs the traceback).
    """

    def register(run: Handler) -> Handler:
        if name in COMMANDS:
            raise ValueError(f"command {name!r} is declared twice")
        COMMANDS[name] = Command(name, summary, arguments, run)
        return run

    return register


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a date YYYY-MM-DD, got {value!r}") from None


# --------------------------------------------------------------------------- shared arguments

ENDPOINT = arg(
    "--endpoint", default=None, help="Kinesis endpoint (default: AWS_ENDPOINT_URL_KINESIS)"
)
KAFKA = arg(
    "--kafka",
    metavar="BOOTSTRAP",
    default=None,
    help="Kafka bootstrap servers: a Kafka topic instead of a Kinesis stream (plain; other "
    "security from STREAMGUARD_KAFKA_SECURITY and its variables)",
)
SERVER_ACTION = arg("action", choices=["start", "stop", "status"])
SERVER_PORT = arg("--port", type=_positive, default=None, help="port (default: a free one)")

# The options of every command that writes into a stream: a Kinesis stream by default, a Kafka
# topic with --kafka. Defaults of None say whether an option was given (see `_target`).
STREAM_TARGET = (
    arg("--stream", default=None, help="stream name (created if missing)"),
    arg("--shards", type=_positive, default=None, help="shards if created (default 2)"),
    arg("--rate", type=int, default=0, help="records per second (default: as fast as possible)"),
    ENDPOINT,
    KAFKA,
    arg("--topic", default=None, help="Kafka topic (created if missing), with --kafka"),
    arg("--partitions", type=_positive, default=None, help="partitions if created (default 2)"),
)
DEFAULT_SHARDS = 2

# Per kind of target: what it is (for messages), and the options that belong to it alone, the
# one that names the stream or topic first. Naming one with the other kind is a usage error.
TARGETS = {
    "kinesis": ("a Kinesis stream, not with --kafka", ("--stream", "--shards", "--endpoint")),
    "kafka": (
        "a Kafka topic, with --kafka BOOTSTRAP",
        ("--topic", "--partitions", "--alerts-topic"),
    ),
}

# Kafka settings besides the bootstrap come from the environment, under the names the Dagster
# deployment reads them from (`assets.resources.SETTINGS`): secrets stay off the command line.


def _option(args: argparse.Namespace, flag: str) -> Any:
    return getattr(args, flag.lstrip("-").replace("-", "_"), None)


def _target(args: argparse.Namespace) -> str:
    """Which target the options name: "kafka" with --kafka, else "kinesis"; a UsageError when
    they mix the two or lack the stream or topic."""
    kind, other = ("kafka", "kinesis") if args.kafka is not None else ("kinesis", "kafka")
    what, options = TARGETS[other]
    mixed = [flag for flag in options if _option(args, flag) is not None]
    if mixed:
        raise UsageError(f"{mixed[0]} is for {what}")
    name = TARGETS[kind][1][0]
    if not _option(args, name):
        raise UsageError(f"the following arguments are required: {name}")
    return kind


def _client(args: argparse.Namespace) -> Any:
    from streamguard.kinesis import kinesis_client

    return kinesis_client(args.endpoint)


def _kafka_config(bootstrap: str) -> ClientConfig:
    """The client config for `bootstrap`, with the security settings of the environment (plain
    when none); read here, when a command needs them, never at import."""
    from streamguard.kafka import client_config, settings_from_env

    return client_config(settings_from_env(bootstrap))


# --------------------------------------------------------------------------- commands


@command(
    "generate",
    "write a seeded synthetic dataset: transactions + labels (default), weather, or the bank's "
    "accounts as AWS DMS output (cdc)",
    arg(
        "dataset",
        nargs="?",
        choices=["transactions", "weather", "cdc"],
        default="transactions",
        help="what to generate (default transactions)",
    ),
    arg("--stations", type=_positive, default=20, help="weather stations (default 20)"),
    arg("--hours", type=_positive, default=6, help="weather hours (default 6)"),
    arg("--files", type=_positive, default=4, help="weather files (default 4)"),
    arg("--days", type=_positive, default=60, help="simulated days (default 60)"),
    arg("--customers", type=_positive, default=1000, help="customers (default 1000)"),
    arg("--terminals", type=_positive, default=None, help="terminals (default customers/5)"),
    arg("--seed", type=int, default=7, help="random seed (default 7)"),
    arg("--out", required=True, help="output folder"),
    arg("--format", choices=["csv", "parquet"], default="csv", help="cdc: DMS DataFormat"),
    arg("--include-op-for-full-load", action="store_true", help="cdc: Op on full-load rows"),
    arg("--timestamp-column", default=None, help="cdc: DMS TimestampColumnName (default none)"),
    arg("--cdc-inserts-only", action="store_true", help="cdc: DMS CdcInsertsOnly"),
    arg("--cdc-file-hours", type=_positive, default=6, help="cdc: hours per change file"),
)
def _cmd_generate(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from models.accounts import account_history, simulate_accounts
    from models.simulate import simulate, write_simulation

    started = time.perf_counter()
    if args.dataset == "cdc":
        return _generate_cdc(args)
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
    # The bank's account history over the same period (what the DMS files of `generate cdc`
    # become once applied as SCD 2): backtests look the accounts up in it.
    history = account_history(simulate_accounts(sim, seed=args.seed))
    history_path = Path(args.out) / ACCOUNT_HISTORY_FILE
    pq.write_table(history, history_path)
    print(
        f"wrote {sim.transactions.num_rows:,} transactions to {tx_path}, "
        f"{sim.labels.num_rows:,} labels to {labels_path} and {history.num_rows:,} account "
        f"versions to {history_path} in {time.perf_counter() - started:.1f}s"
    )
    return 0


def _generate_cdc(args: argparse.Namespace) -> int:
    """The simulated customers' accounts as DMS writes them: OUT/bank/accounts/LOAD..., then
    change files by time."""
    from datetime import timedelta

    from models.accounts import simulate_accounts
    from models.simulate import simulate
    from streamguard.dms import write_dms_output

    sim = simulate(
        days=args.days, customers=args.customers, seed=args.seed, terminals=args.terminals
    )
    accounts = simulate_accounts(sim, seed=args.seed)
    files = write_dms_output(
        args.out,
        accounts.full_load,
        accounts.changes,
        schema="bank",
        table="accounts",
        format=args.format,
        include_op_for_full_load=args.include_op_for_full_load,
        timestamp_column=args.timestamp_column,
        cdc_inserts_only=args.cdc_inserts_only,
        full_load_time=accounts.snapshot_time,
        cdc_file_interval=timedelta(hours=args.cdc_file_hours),
    )
    print(
        f"wrote {accounts.full_load.num_rows:,} accounts and {accounts.changes.num_rows:,} "
        f"changes as {len(files)} DMS {args.format} file(s) in {Path(args.out) / 'bank/accounts'}"
    )
    return 0


Send = Callable[["pa.Table", bool], int]


def _writer(kind: str, args: argparse.Namespace) -> tuple[str, Send]:
    """The stream or topic `produce` writes to, created if missing: its name for messages, and
    a sender of (rows, whether to show a progress bar) returning how many were acknowledged."""
    if kind == "kafka":
        from streamguard import kafka

        config, topic = _kafka_config(args.kafka), args.topic
        kafka.ensure_topic(config, topic, args.partitions or DEFAULT_SHARDS)
        return f"topic {topic}", lambda rows, _bar: kafka.produce_transactions(config, topic, rows)

    from streamguard.kinesis import ensure_stream, produce_transactions

    client, stream = _client(args), args.stream
    ensure_stream(client, stream, shards=args.shards or DEFAULT_SHARDS)
    return stream, lambda rows, bar: produce_transactions(client, stream, rows, progress=bar)


@command(
    "produce",
    "put a transactions Parquet file into a Kinesis stream or Kafka topic",
    arg("path", help="transactions.parquet"),
    *STREAM_TARGET,
)
def _cmd_produce(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from streamguard.progress import ProgressLine

    kind = _target(args)
    path = Path(args.path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    table = pq.read_table(path)
    name, send = _writer(kind, args)
    started = time.perf_counter()
    if args.rate:
        sent = 0
        step = max(1, args.rate)
        progress = ProgressLine("produced", table.num_rows)
        for offset in range(0, table.num_rows, step):
            tick = time.perf_counter()
            sent += send(table.slice(offset, step), False)
            progress.update(sent)
            if offset + step < table.num_rows:
                time.sleep(max(0.0, 1.0 - (time.perf_counter() - tick)))
        progress.close()
    else:
        sent = send(table, True)
    seconds = time.perf_counter() - started
    print(f"produced {sent:,} records to {name} in {seconds:.1f}s ({sent / seconds:,.0f}/s)")
    return 0


# One handler for both local servers (`args.command` says which); declared kinesis first.
@command("kafka", "start or stop the local Kafka-protocol broker", SERVER_ACTION, SERVER_PORT)
@command("kinesis", "start or stop the local Kinesis-compatible server", SERVER_ACTION, SERVER_PORT)
def _cmd_local_server(args: argparse.Namespace) -> int:
    """`start` prints the address, `stop` stops it, `status` prints the address or exits 1."""
    home = Home.from_env().ensure()
    server: LocalServer
    if args.command == "kafka":
        from streamguard.local_kafka import LocalKafka

        server = LocalKafka(home.kafka, port=args.port)
    else:
        from streamguard.local_kinesis import LocalKinesis

        server = LocalKinesis(home.kinesis, port=args.port)
    if args.action == "start":
        print(server.start())
    elif args.action == "stop":
        server.stop()
        print("stopped")
    else:
        state = server.status()
        print(state.address if state.running else "not running")
        return 0 if state.running else 1
    return 0


# `score --files DIR`: files landing in a folder or prefix, instead of a stream or topic.
FILES_SOURCE = (
    arg(
        "--files",
        metavar="DIR",
        default=None,
        help="score the JSON lines, CSV and Parquet files landing in DIR (or an s3:// prefix) "
        "instead of a stream; each file once",
    ),
    arg(
        "--schema-mode",
        choices=["addNewColumns", "rescue", "failOnNewColumns", "none"],
        default=None,
        help="with --files: what a new column does (default addNewColumns)",
    ),
    arg("--schema-hints", default=None, help='with --files: column types, e.g. "amount double"'),
)
STREAM_ONLY = ("--stream", "--endpoint", "--kafka", "--topic", "--alerts-topic")


def _score_files(args: argparse.Namespace) -> int:
    """The scoring runner over `streamguard.files.FileSource`, its own checkpoint per folder."""
    from streamguard.files import FileSource
    from streamguard.lake import Lake
    from streamguard.pipeline import scoring_job_name, scoring_runner

    if args.files is None:
        given = "--schema-mode" if args.schema_mode is not None else "--schema-hints"
        raise UsageError(f"{given} is for files, with --files DIR")
    mixed = [flag for flag in STREAM_ONLY if _option(args, flag) is not None]
    if mixed:
        raise UsageError(f"{mixed[0]} is for a stream or topic, not with --files")
    home = Home.from_env().ensure()
    lake = Lake(home.lake_uri)
    source = FileSource(
        args.files,
        lake,
        schema_mode=args.schema_mode or "addNewColumns",
        schema_hints=args.schema_hints,
    )
    job = scoring_job_name("files", source.source)
    runner = scoring_runner(
        lake, source, home.mlflow_tracking_uri, max_batch_records=args.max_batch, job=job
    )
    report = runner.run()
    print(
        f"{len(report.batches)} batch(es), {report.n_records:,} records, "
        f"{report.rows('alerts'):,} alerts; {len(source.logged_files())} file(s) logged in "
        f"{source.source}; positions {report.positions}"
    )
    return 0


@command(
    "score",
    "score a stream from its checkpoint to its end, in process",
    arg("--stream", default=None, help="stream name"),
    arg("--max-batch", type=_positive, default=50_000, help="records per micro-batch"),
    ENDPOINT,
    KAFKA,
    arg("--topic", default=None, help="Kafka topic to score, with --kafka"),
    arg(
        "--alerts-topic",
        default=None,
        help="Kafka topic every alert is published to, with --kafka (default fraud-alerts; "
        "empty: none)",
    ),
    *FILES_SOURCE,
    arg(
        "--continuous",
        action="store_true",
        help="keep scoring as records arrive, in small batches, until Ctrl-C or SIGTERM (stops "
        "after the batch in hand; a second signal stops at once)",
    ),
    arg(
        "--poll-interval",
        type=float,
        default=None,
        help="with --continuous: seconds between reads of each Kinesis shard, or between polls "
        "of an idle Kafka topic (default 0.2; AWS allows 5 reads per second per shard)",
    ),
)
def _cmd_score(args: argparse.Namespace) -> int:
    from streamguard.continuous import idle_wait_for
    from streamguard.kinesis_tail import DEFAULT_POLL_INTERVAL_S
    from streamguard.lake import Lake
    from streamguard.pipeline import scoring_job_name, scoring_runner

    if args.poll_interval is not None and not args.continuous:
        raise UsageError("--poll-interval is for --continuous")
    poll = DEFAULT_POLL_INTERVAL_S if args.poll_interval is None else args.poll_interval
    if args.files is not None or args.schema_mode is not None or args.schema_hints is not None:
        if args.continuous:
            raise UsageError("--continuous is for a stream or topic, not with --files")
        return _score_files(args)
    kind = _target(args)
    home = Home.from_env().ensure()
    source: Source
    sinks: list[AlertSink] = []
    with contextlib.ExitStack() as stack:
        if kind == "kafka":
            from streamguard.alerts import DEFAULT_ALERTS_TOPIC, KafkaAlertSink
            from streamguard.kafka import KafkaSource

            config = _kafka_config(args.kafka)
            job = scoring_job_name(kind, args.topic)
            source = stack.enter_context(KafkaSource(config, args.topic))
            alerts = DEFAULT_ALERTS_TOPIC if args.alerts_topic is None else args.alerts_topic
            if alerts:
                sink = KafkaAlertSink(config, alerts, job=job)
                stack.callback(sink.close)
                sinks.append(sink)
        elif args.continuous:
            from streamguard.kinesis_tail import KinesisTailSource

            job = scoring_job_name(kind, args.stream)
            tail = KinesisTailSource(_client(args), args.stream, poll_interval_s=poll)
            stack.callback(tail.close)
            source = tail
        else:
            from streamguard.sources import KinesisSource

            job = scoring_job_name(kind, args.stream)
            source = KinesisSource(_client(args), args.stream)
        runner = scoring_runner(
            Lake(home.lake_uri),
            source,
            home.mlflow_tracking_uri,
            max_batch_records=args.max_batch,
            job=job,
            sinks=sinks,
        )
        if args.continuous:
            what = f"Kafka topic {args.topic}" if kind == "kafka" else f"stream {args.stream}"
            return _score_continuously(runner, what, idle_wait_for(kind, poll))
        report = runner.run()
    print(
        f"{len(report.batches)} batch(es), {report.n_records:,} records, "
        f"{report.rows('alerts'):,} alerts; positions {report.positions}"
    )
    return 0


def _score_continuously(runner: MicroBatchRunner, what: str, idle_wait_s: float) -> int:
    """`score --continuous`: the runner batch after batch until Ctrl-C or SIGTERM, which stop it
    between batches (exit 0); a second signal interrupts the batch (exit 130, replayed next)."""
    from streamguard.continuous import (
        ContinuousSettings,
        StopRequest,
        run_continuous,
        stop_on_signals,
    )

    settings = ContinuousSettings(idle_wait_s=idle_wait_s)
    stop = StopRequest()
    print(f"scoring {what} continuously (checkpoint {runner.job}); Ctrl-C to stop", flush=True)
    with stop_on_signals(stop):
        report = run_continuous(
            runner, stop, settings, on_report=lambda r: print(r.summary(), flush=True)
        )
    print(f"stopped ({report.stop_reason}): {report.summary()}; positions {report.positions}")
    return 0


@command(
    "train",
    "train a model, register it and promote it if it is better",
    arg(
        "--history", default=None, help="transactions Parquet to replay (default: the feature log)"
    ),
    arg("--labels", default=None, help="labels Parquet to load first"),
    arg("--train-days", type=_positive, default=None, help="days of history to train on"),
    arg("--label-delay-days", type=int, default=7, help="days labels need to arrive (default 7)"),
)
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


MODEL = arg("--model", default="fraud_model", help="registered model name")


@command(
    "rollback",
    "move the champion alias back to the previous champion (or --to)",
    arg("--to", default=None, help="version to restore (default: the previous one)"),
    MODEL,
)
def _cmd_rollback(args: argparse.Namespace) -> int:
    from models.promotion import rollback

    home = Home.from_env().ensure()
    _print_change(rollback(home.mlflow_tracking_uri, args.model, args.to or ""))
    return 0


@command(
    "promote",
    "make a registered version the champion by hand",
    arg("--version", required=True, help="version number to promote"),
    arg("--reason", default=None, help="why (recorded with the change)"),
    MODEL,
)
def _cmd_promote(args: argparse.Namespace) -> int:
    from models.promotion import move_champion

    home = Home.from_env().ensure()
    reason = args.reason or "manual promotion"
    uri = home.mlflow_tracking_uri
    _print_change(move_champion(uri, args.model, args.version, "manual", reason))
    return 0


DAYS = arg("--days", type=_positive, default=60, help="simulated days (default 60)")
CUSTOMERS = arg("--customers", type=_positive, default=1000, help="customers (default 1000)")
TRAIN_DAYS = arg(
    "--train-days", type=_positive, default=21, help="days of history to train on (default 21)"
)


@command(
    "demo",
    "the whole platform end to end on local components",
    DAYS,
    CUSTOMERS,
    arg("--seed", type=int, default=7, help="random seed (default 7)"),
    TRAIN_DAYS,
    arg("--timeout", type=_positive, default=900, help="seconds to wait for the stream to drain"),
    arg(
        "--source",
        choices=["kinesis", "kafka"],
        default="kinesis",
        help="where the transactions arrive: local Kinesis or the local Kafka broker, which also "
        "gets the alerts (default kinesis)",
    ),
)
def _cmd_demo(args: argparse.Namespace) -> int:
    from streamguard.demo import run_demo

    summary = run_demo(
        Home.from_env(),
        days=args.days,
        customers=args.customers,
        seed=args.seed,
        train_days=args.train_days,
        timeout=args.timeout,
        source=args.source,
    )
    print(summary.render())
    return 0 if summary.ok else 1


@command(
    "dev",
    "local Kinesis + Dagster UI + a producer trickling transactions",
    arg("--rate", type=_positive, default=200, help="records per second (default 200)"),
    DAYS,
    CUSTOMERS,
    arg("--port", type=_positive, default=3000, help="Dagster UI port (default 3000)"),
    TRAIN_DAYS,
)
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


@command(
    "backtest",
    "train a week, skip the label delay, test the next week; model vs a baseline",
    arg("--transactions", required=True, help="transactions Parquet or CSV (may hold is_fraud)"),
    arg("--labels", default=None, help="labels Parquet or CSV (default: is_fraud in transactions)"),
    arg("--train-start", type=_date, required=True, help="first training day, YYYY-MM-DD (UTC)"),
    arg("--train-days", type=_positive, default=7, help="days (default 7)"),
    arg(
        "--delay-days",
        type=int,
        default=7,
        help="days between training and test; also the report delay of labels without one "
        "(default 7)",
    ),
    arg("--test-days", type=_positive, default=7, help="days (default 7)"),
    arg(
        "--feature-delay",
        type=int,
        default=None,
        help="label delay D of the delayed terminal windows, 0..14 (default: estimated from the "
        "labels reported by the test start, as training does)",
    ),
    arg("--k", type=_positive, default=100, help="cards checked a day (default 100)"),
    arg("--budget", type=_positive, default=None, help="transaction alerts a day (default: k)"),
    arg(
        "--model",
        default=None,
        help="model family tested against the baseline: blend (the default model), "
        "hist_gradient_boosting, logistic_regression or random_forest",
    ),
    arg("--output", required=True, help="metrics JSON file"),
    arg("--predictions", default=None, help="test scores as Parquet (optional)"),
    arg(
        "--accounts",
        default=None,
        help="the bank's account history (SCD 2 versions): Parquet, e.g. the "
        f"{ACCOUNT_HISTORY_FILE} `generate` writes, or a Delta table such as the lake's "
        "accounts_history (optional)",
    ),
)
def _cmd_backtest(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    from models.backtest import backtest, read_dataset
    from streamguard.pipeline import read_accounts

    started = time.perf_counter()
    transactions = read_dataset(args.transactions)
    labels = read_dataset(args.labels) if args.labels else None
    accounts = read_accounts(Path(args.accounts)) if args.accounts else None
    result = backtest(
        transactions,
        labels,
        args.train_start,
        accounts=accounts,
        train_days=args.train_days,
        delay_days=args.delay_days,
        test_days=args.test_days,
        feature_delay_days=args.feature_delay,
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
            f"  {name:<10} AP {shown[0]}  CP@{result.k} {shown[1]}  "
            f"recall@{result.budget}/day {shown[2]}"
        )

    print(
        f"backtest: {result.n_train:,} training rows ({result.n_train_fraud} fraud), "
        f"{result.n_test:,} test rows ({result.n_test_fraud} fraud; customers known "
        f"compromised left out: {(result.all_customers or {}).get('known_compromised', 0)}) in "
        f"{time.perf_counter() - started:.1f}s; feature delay D {result.feature_delay_note}\n"
        f"{line('model', metrics['model'])}\n"
        f"{line('literature', metrics['literature_baseline'])}\n"
        f"{line('baseline', metrics['baseline'])}\n"
        f"metrics written to {output}"
    )
    return 0


@command(
    "replay",
    "push a dataset into a Kinesis stream or Kafka topic in event-time order, optionally paced",
    arg("dataset", help="transactions Parquet or CSV"),
    *STREAM_TARGET,
)
def _cmd_replay(args: argparse.Namespace) -> int:
    import tempfile

    import pyarrow.parquet as pq

    from models.backtest import read_dataset
    from models.schema import TRANSACTION_SCHEMA

    _target(args)  # a usage error before the dataset is read
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
        return _cmd_produce(argparse.Namespace(**{**vars(args), "path": str(ordered)}))


@command(
    "spark-cluster",
    "start or stop a local Spark standalone cluster (a master and workers on loopback)",
    SERVER_ACTION,
    arg("--workers", type=_positive, default=1, help="workers to start (default 1)"),
    arg("--cores", type=_positive, default=2, help="cores each worker offers (default 2)"),
    arg("--memory", default="1g", help="memory each worker offers executors (default 1g)"),
)
def _cmd_spark_cluster(args: argparse.Namespace) -> int:
    """`start` prints the `spark://` URL (for STREAMGUARD_SPARK_MASTER), `stop` stops master and
    workers, `status` prints the URL and its live workers or exits 1. Recorded under
    STREAMGUARD_HOME/spark-cluster, so any later command finds it."""
    from streamguard.spark.cluster import SparkCluster, cluster_dir

    cluster = SparkCluster(
        cluster_dir(Home.from_env()), workers=args.workers, cores=args.cores, memory=args.memory
    )
    if args.action == "start":
        print(cluster.start())
    elif args.action == "stop":
        cluster.stop()
        print("stopped")
    else:
        state = cluster.status()
        if not state.running:
            print("not running")
            return 1
        plural = "" if state.workers == 1 else "s"
        print(
            f"{state.url} ({state.workers} worker{plural}, {state.cores} cores, UI {state.ui_url})"
        )
    return 0


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The parser of every declared command, in the order of their declarations."""
    parser = _Parser(prog="streamguard", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for cmd in COMMANDS.values():
        command_parser = sub.add_parser(cmd.name, help=cmd.summary)
        for argument in cmd.arguments:
            command_parser.add_argument(*argument.flags, **argument.options)
        command_parser.set_defaults(func=cmd.run, usage_error=command_parser.error)
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
    except UsageError as exc:
        usage_error: Callable[[str], NoReturn] = args.usage_error
        usage_error(str(exc))  # one line, exit 2
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
