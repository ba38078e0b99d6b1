"""The fraud scoring job on Spark with the customer state in Spark's state store (TTL).

The second mode of the Spark job (`run_fraud_on_spark` keeps all state in Delta and stays the
default). Same input (a streaming frame of RECORD_COLUMNS), same feature function, same tables,
same schemas; what differs is where the per-customer state lives between micro-batches:

    raw records --mapInArrow(parse_records)--> parsed rows (executors)
      --groupBy(customer key).transformWithStateInPandas(CustomerProcessor)--> (state store)
          customer part of compute_features + new customer state rows + rejected records
      --foreachBatch--> (driver) terminal part of compute_features against Delta terminal state
          and the known frauds, join, FraudScoringJob.score / shadow_score, Delta writes

Records the parser rejects pass through the operator under the group key `""` (never a customer
id) untouched, so the one query output carries them to `dead_letters`; the source is read once.

Why `transformWithStateInPandas` rather than `applyInPandasWithState`: TTL per state entry is
built in (applyInPandasWithState only has a per-group timeout that the processor must handle and
that fires only in a batch touching the key or a no-data batch); a `MapState` keyed by customer
lets a group be a bucket of customers while each customer keeps its own entry and expiry
(applyInPandasWithState has one state value per group); `initialState` exists (the legacy API
has none in Python, so a lost checkpoint could not start from Delta); and it is the successor
API. The pandas form, because `compute_features` is vectorised over the group. Costs: each state
call is a round trip to the JVM (one get and one update per customer and batch), RocksDB is
required (the session factory sets it), and a processing-time operator asks for a batch at every
trigger even without data, which would keep `availableNow` from ever ending: no-data micro-batches
are off in the session while this query runs (TTL is then applied when a batch runs).

Which state is where, and why:

- **Customer state: the state store** (RocksDB, in the query's checkpoint), one `MapState` entry
  per customer (`customer_id` -> the CUSTOMER_STATE_SCHEMA row, times as int64 microseconds, plus
  the ids of its transactions within the 30-day history window for duplicate detection), with a
  processing-time TTL (`customer_ttl`, default 90 days). `handleInputRows` runs
  `models.features.compute_features` on the group's transactions with that state and the
  terminal state empty, which yields exactly the customer part of every feature (the feature
  function accumulates key by key, see `streamguard.spark.fraud`). The grouping key is the
  customer, or with `buckets` a hash bucket of customers (one `compute_features` call per bucket
  instead of per customer: its fixed cost of a few ms dominates small groups); the map is keyed by
  customer either way, so TTL, recovery and results are per customer.
- **Terminal state: Delta**, as in the Delta mode. Terminal features need the known-fraud labels,
  which live in Delta and change between batches (read at the version recorded in the batch plan),
  and a second key space would need a second stateful operator: chaining two transformWithState
  operators needs event-time watermarks propagated between them, and one stateful operator per
  query is the robust choice. The terminal part runs on the driver (one `compute_features` call
  over the batch with the customer state empty), where the batch is scored anyway.
- **Delta stays the recovery point**: every batch upserts the new customer rows to the Delta
  `customer_state` table (same schema as in-process). A fresh checkpoint (lost, or deliberately
  reset to change `buckets`) starts from `initialState` = Delta `customer_state` (rows updated
  within the TTL) with the recent transaction ids from Delta `transactions`, read through
  `DeltaTable.file_uris()` (the snapshot's files, never a folder glob) at the last version this
  query did not write (so a replayed first batch sees the state from before it).

Exactly once: the state store is versioned with the batch; Spark replays an uncommitted batch
against the previous version (and with the batch's recorded processing time, so the TTL decides the
same), and every table is written with a Delta app transaction `(f"spark-store:{query id}",
batch_id)`, `terminal_state` last, so a replay writes only the tables still missing the batch.
Batch ids in the tables are the lake's (`lake_batch_id`: the next of the lake's numbering,
recorded in `spark_store_batches` with the Spark batch id and the batch's context): after a lost
checkpoint the new query continues the lake's numbering instead of restarting at 0, so "earlier
batch" reads (duplicates, known frauds) stay right.

TTL semantics: an entry not updated for `customer_ttl` of processing time (batch timestamps) is
gone: the customer's next transaction is judged as a first one (no balance, no locations, no
history, no known ids). The Delta row stays (the lake keeps history); a recovery loads only rows
updated within the TTL, so it expires the same customers. `customer_ttl=None`: never expires.

Duplicates: a repeated transaction id of the same customer (a producer retry, the usual case) is
rejected inside the processor before it touches the state (within the batch, or against the ids
kept for the last 30 days of the customer's event time), with the in-process runner's reasons. The
driver then applies the runner's own check (`drop_duplicates`: across customers within the batch,
and against Delta `transactions` for earlier batches), so no transaction id is ever scored twice;
a duplicate only that check catches (the same id on another customer, or a replay of a record
older than the kept window) is dead-lettered but has already updated its customer's state.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.window import Window

from models.accounts import ACCOUNTS_HISTORY
from models.features import (
    CUSTOMER_STATE_SCHEMA,
    FEATURE_SCHEMA,
    TERMINAL_FEATURES,
    FeatureState,
    compute_features,
    with_feature_version,
)
from models.job import (
    ALERTS,
    CUSTOMER_STATE,
    OUTPUTS,
    TRANSACTIONS,
    FraudScoringJob,
    batch_known_frauds,
    drop_duplicates,
    load_terminal_state,
    with_lineage,
)
from models.registry import CHAMPION, MODEL_NAME, LoadedModel
from models.schema import RESCUED_DATA, TIMESTAMP, TRANSACTION_SCHEMA
from streamguard.commit import (
    AlertSink,
    batch_written,
    dead_letter_table,
    publish_batch,
    write_batch,
)
from streamguard.lake import Lake
from streamguard.pipeline import SCORING_JOB, ensure_tables
from streamguard.spark.customer_state import (
    CUSTOMER_SIDE_FEATURES,
    DAY_COLUMNS,
    DUPLICATE_WINDOW_US,
    OUT_COLUMNS,
    OUT_DDL,
    PARSED_COLUMNS,
    PARSED_FIELDS,
    REJECTED_KEY,
    STORED_DDL,
    CustomerProcessor,
    arrival_order,
    parse_partition,
)
from streamguard.spark.fraud import (
    SPARK_BATCH_SCHEMA,
    BatchTiming,
    SparkFraudReport,
    lake_batch_id,
    plan_batch,
    run_available_now,
)

DEFAULT_CUSTOMER_TTL = timedelta(days=90)
NO_DATA_BATCHES = "spark.sql.streaming.noDataMicroBatches.enabled"
SPARK_STORE_BATCHES = "spark_store_batches"
# The same record as the Delta mode's `spark_batches` (lake batch id, Spark batch id, context).
SPARK_STORE_BATCH_SCHEMA = SPARK_BATCH_SCHEMA


# ----------------------------------------------------------------------------- driver


def _times(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.cast(values, pa.int64()).cast(TIMESTAMP)


def _one_chunk(table: pa.Table) -> pa.Table:
    """Every column as one chunk, also when empty (a column of no chunks filters as nulls)."""
    if table.num_rows == 0:
        return table.schema.empty_table()
    return table.combine_chunks()


def _customer_state(rows: pa.Table) -> pa.Table:
    """The processor's 's' rows as CUSTOMER_STATE_SCHEMA (the Delta table's state columns)."""
    return pa.table(
        {
            "customer_id": rows["customer_id"],
            "balance": rows["balance"],
            "last_event_time": _times(rows["last_us"]),
            "n_transactions": rows["n_transactions"],
            "locations": rows["locations"],
            "history_times": pc.cast(rows["history_us"], pa.list_(pa.int64())).cast(
                pa.list_(TIMESTAMP)
            ),
            "history_amounts": rows["history_amounts"],
            **{c: rows[c] for c in ("days", "day_counts", "day_cents")},
        }
    ).cast(CUSTOMER_STATE_SCHEMA)


@dataclass
class _StoreContext:
    lake: Lake
    job: FraudScoringJob
    job_name: str
    report: SparkFraudReport
    sinks: list[AlertSink]


def _dead_letters(rows: pa.Table, job_name: str, batch_id: int, now: datetime) -> pa.Table:
    order = arrival_order(rows["shard_id"].to_pylist(), rows["sequence_number"].to_pylist())
    rows = rows.take(pa.array(order, pa.int64()))
    return dead_letter_table(
        job_name,
        batch_id,
        shard_ids=rows["shard_id"],
        sequence_numbers=rows["sequence_number"],
        payloads=rows["data"],
        reasons=rows["reason"],
        arrival_times=_times(rows["arrival_us"]),
        recorded_at=now,
    )


def _process_store_batch(
    batch: DataFrame, spark_batch_id: int, app_id: str, ctx: _StoreContext
) -> None:
    """One micro-batch: the processor's rows + the terminal part, scored and written once."""
    started = time.perf_counter()
    lake, job = ctx.lake, ctx.job
    # Always run the operator: it commits the state-store version of this batch.
    rows = batch.select(*OUT_COLUMNS).toArrow()
    kind = rows["row_type"]
    feats = rows.filter(pc.equal(kind, "f"))
    dead = rows.filter(pc.equal(kind, "d"))
    n_records = feats.num_rows + dead.num_rows
    batch_id = lake_batch_id(lake, SPARK_STORE_BATCHES, app_id, spark_batch_id)
    timing = BatchTiming(batch_id, n_records)
    ctx.report.batches.append(timing)
    t = time.perf_counter()
    timing.features_s = t - started  # parse + the customer part, inside the operator
    if n_records == 0 or batch_written(lake, app_id, batch_id, OUTPUTS):
        if ctx.sinks and batch_written(lake, app_id, batch_id, OUTPUTS):
            publish_batch(ctx.sinks, app_id, batch_id, lake)  # a crash came before publishing
        timing.skipped = True
        timing.total_s = time.perf_counter() - started
        return
    # The executors looked the accounts up at the batch's processing time: record that version.
    read = pc.unique(pc.drop_null(feats["accounts_version"])).to_pylist()
    if len(read) > 1:
        raise RuntimeError(f"the executors read accounts_history versions {read} in one batch")
    context = plan_batch(
        lake,
        SPARK_STORE_BATCHES,
        job,
        app_id=app_id,
        job_name=ctx.job_name,
        batch_id=batch_id,
        spark_batch_id=spark_batch_id,
        n_records=n_records,
        accounts_version=read[0] if read else None,
    )
    now = datetime.now(UTC)
    order = arrival_order(feats["shard_id"].to_pylist(), feats["sequence_number"].to_pylist())
    feats = feats.take(pa.array(order, pa.int64()))
    valid = pa.table(
        {
            **{c: feats[c] for c in TRANSACTION_SCHEMA.names if c != "event_time"},
            "event_time": _times(feats["event_us"]),
        }
    )
    valid = _one_chunk(valid.select(TRANSACTION_SCHEMA.names).cast(TRANSACTION_SCHEMA))
    valid = valid.append_column("record_index", pa.array(np.arange(feats.num_rows), pa.int64()))
    valid, dupes = drop_duplicates(valid, lake, batch_id)  # across customers, earlier batches
    kept = valid["record_index"].combine_chunks()
    valid = valid.drop_columns(["record_index"])
    if dupes:
        index = pa.array([i for i, _ in dupes], pa.int64())
        caught = feats.take(index).set_column(
            OUT_COLUMNS.index("reason"), "reason", pa.array([r for _, r in dupes], pa.string())
        )
        dead = pa.concat_tables([dead, caught])
    feats = feats.take(kept)
    transactions = with_lineage(
        valid,
        batch_id,
        feats["shard_id"],
        feats["sequence_number"],
        now,
        partition_keys=feats["partition_key"],
        rescued=feats[RESCUED_DATA],
    )
    terminals = load_terminal_state(lake, valid)
    known = batch_known_frauds(lake, valid, batch_id, context.labels_version)
    t2 = time.perf_counter()
    timing.prepare_s = t2 - t
    delay = job.feature_delay_days(context)  # the planned champion's label delay D
    terminal = compute_features(
        valid, FeatureState(CUSTOMER_STATE_SCHEMA.empty_table(), terminals), known.frauds, delay
    )
    parts = {c: valid[c] for c in ("transaction_id", "event_time", "customer_id", "terminal_id")}
    parts |= {c: feats[c] for c in CUSTOMER_SIDE_FEATURES}
    parts |= {c: terminal.features[c] for c in TERMINAL_FEATURES}
    features = pa.table({c: parts[c] for c in FEATURE_SCHEMA.names}).cast(FEATURE_SCHEMA)
    features = with_feature_version(features, delay)
    t3 = time.perf_counter()
    timing.features_s += t3 - t2
    states = _customer_state(rows.filter(pc.equal(kind, "s")))
    new_state = FeatureState(states, terminal.state.terminals)
    tables = job.assemble(features, new_state, transactions, context, batch_id, now, known)
    t4 = time.perf_counter()
    timing.score_s = t4 - t3
    letters = _dead_letters(dead, ctx.job_name, batch_id, now)
    written = write_batch(lake, app_id, batch_id, letters, tables, OUTPUTS)
    publish_batch(ctx.sinks, app_id, batch_id, lake)
    for name, count in written.items():
        ctx.report.rows_written[name] = ctx.report.rows_written.get(name, 0) + count
    timing.write_s = time.perf_counter() - t4
    timing.valid, timing.rejected = valid.num_rows, letters.num_rows
    timing.alerts = tables[ALERTS].num_rows
    timing.total_s = time.perf_counter() - started


# ----------------------------------------------------------------------------- initial state

_INITIAL_DDL = f"gkey string, customer_id string, {STORED_DDL}"


def _checkpoint_app(checkpoint: Path) -> str | None:
    """The app id of the query a checkpoint belongs to (None: a fresh checkpoint)."""
    metadata = checkpoint / "metadata"
    if not metadata.is_file():
        return None
    first = metadata.read_text().splitlines()[0]
    return f"spark-store:{json.loads(first)['id']}"


def _version_before(lake: Lake, name: str, app_id: str | None) -> int | None:
    """The table's latest version holding nothing written by `app_id` (None: no table)."""
    table = lake.table(name)
    if table is None:
        return None
    version = table.version()
    if app_id is None:
        return version
    while version > 0 and (
        DeltaTable(lake.uri(name), version=version).transaction_version(app_id) is not None
    ):
        version -= 1
    return version


def _delta_frame(
    spark: SparkSession, lake: Lake, name: str, version: int | None, ddl: str
) -> DataFrame:
    """A Delta snapshot as a Spark frame: exactly its data files (`file_uris`), no folder glob."""
    uris = [] if version is None else DeltaTable(lake.uri(name), version=version).file_uris()
    if not uris:
        return spark.createDataFrame([], schema=ddl)
    return spark.read.schema(ddl).parquet(*uris)


def _group_key(customer: Column, buckets: int | None) -> Column:
    if buckets is None:
        return customer
    return F.pmod(F.xxhash64(customer), F.lit(buckets)).cast("string")


def initial_state(
    spark: SparkSession,
    lake: Lake,
    checkpoint: Path,
    customer_ttl: timedelta | None,
    buckets: int | None,
) -> DataFrame:
    """The customers to start a fresh checkpoint from: Delta `customer_state` + recent ids.

    Rows updated within the TTL (older ones would have expired from the store); the ids of each
    customer's transactions in the 30-day window, from `transactions`. Both at the last version
    this checkpoint's query did not write, so a replayed first batch starts where the first
    attempt did. Empty once a batch is committed (Spark applies it to the first batch only).
    """
    if any((checkpoint / "commits").glob("[0-9]*")):  # (Spark purges old commit files)
        return spark.createDataFrame([], schema=_INITIAL_DDL)
    app_id = _checkpoint_app(checkpoint)
    state_ddl = (
        "customer_id string, balance double, last_event_time timestamp, n_transactions bigint, "
        "locations array<string>, history_times array<timestamp>, "
        "history_amounts array<double>, days array<bigint>, day_counts array<bigint>, "
        "day_cents array<bigint>, updated_at timestamp, batch_id bigint"
    )
    customers = _delta_frame(
        spark, lake, CUSTOMER_STATE, _version_before(lake, CUSTOMER_STATE, app_id), state_ddl
    )
    # Merge-on-read (`Lake.upsert`): a customer's current row is its latest batch's.
    latest = Window.partitionBy("customer_id").orderBy(F.col("batch_id").desc())
    customers = (
        customers.withColumn("_latest", F.row_number().over(latest))
        .where(F.col("_latest") == 1)
        .drop("_latest")
    )
    if customer_ttl is not None:
        oldest = datetime.now(UTC) - customer_ttl
        customers = customers.where(F.col("updated_at") > F.lit(oldest))
    txs = _delta_frame(
        spark,
        lake,
        TRANSACTIONS,
        _version_before(lake, TRANSACTIONS, app_id),
        "transaction_id string, event_time timestamp, customer_id string",
    )
    last = customers.select("customer_id", F.unix_micros("last_event_time").alias("last_us"))
    recent = (
        txs.select("customer_id", "transaction_id", F.unix_micros("event_time").alias("event_us"))
        .join(last, "customer_id")
        .where(F.col("event_us") > F.col("last_us") - F.lit(DUPLICATE_WINDOW_US))
        .groupBy("customer_id")
        .agg(F.array_sort(F.collect_list(F.struct("event_us", "transaction_id"))).alias("seen"))
    )
    empty_ids = F.array().cast("array<string>")
    empty_us = F.array().cast("array<bigint>")
    return customers.join(recent, "customer_id", "left").select(
        _group_key(F.col("customer_id"), buckets).alias("gkey"),
        "customer_id",
        "balance",
        F.unix_micros("last_event_time").alias("last_us"),
        "n_transactions",
        "locations",
        F.transform("history_times", lambda t: F.unix_micros(t)).alias("history_us"),
        "history_amounts",
        *(F.coalesce(c, F.array().cast("array<bigint>")).alias(c) for c in DAY_COLUMNS),
        F.coalesce(F.transform("seen", lambda s: s["transaction_id"]), empty_ids).alias("seen_ids"),
        F.coalesce(F.transform("seen", lambda s: s["event_us"]), empty_us).alias("seen_us"),
    )


# ----------------------------------------------------------------------------- the job


def _quiet_missing_key_warnings(spark: SparkSession) -> None:
    """The state server logs a WARN line for every `getValue` of an absent key (a new customer).

    Best effort, in this JVM (the driver, and the executors of a local master); on a cluster set
    the same logger to ERROR in the executors' log4j2 configuration.
    """
    try:
        jvm: Any = spark.sparkContext._jvm
        jvm.org.apache.logging.log4j.core.config.Configurator.setLevel(
            "org.apache.spark.sql.execution.python.streaming.TransformWithStateInPySparkStateServer",
            jvm.org.apache.logging.log4j.Level.ERROR,
        )
    except Exception:  # logging only: never fail the job over it
        pass


def customer_features_stream(
    frame: DataFrame,
    initial: DataFrame | None,
    customer_ttl: timedelta | None = DEFAULT_CUSTOMER_TTL,
    buckets: int | None = None,
    accounts_uri: str | None = None,
) -> DataFrame:
    """Raw records -> the processor's rows: parse on executors, then the stateful operator.

    One stateful operator (`transformWithStateInPandas`, processing-time mode for the TTL).
    `accounts_uri`: the `accounts_history` table the processor looks the accounts up in.
    """
    parsed = frame.select(
        "shard_id",
        "sequence_number",
        "partition_key",
        "data",
        F.unix_micros(F.col("arrival_time").cast("timestamp")).alias("arrival_us"),
    ).mapInArrow(parse_partition, ", ".join(f"{n} {t}" for n, t in PARSED_FIELDS))
    if buckets is not None:
        parsed = parsed.withColumn(
            "gkey",
            F.when(F.col("row_type") == "t", _group_key(F.col("customer_id"), buckets)).otherwise(
                F.lit(REJECTED_KEY)
            ),
        ).select(*PARSED_COLUMNS)
    ttl_ms = None if customer_ttl is None else int(customer_ttl.total_seconds() * 1000)
    return parsed.groupBy("gkey").transformWithStateInPandas(
        statefulProcessor=CustomerProcessor(ttl_ms, accounts_uri),
        outputStructType=OUT_DDL,
        outputMode="Append",
        timeMode="ProcessingTime",
        initialState=None if initial is None else initial.groupBy("gkey"),
    )


def run_fraud_on_spark_state_store(
    spark: SparkSession,
    source: DataFrame | Callable[[SparkSession], DataFrame],
    lake: Lake,
    checkpoint: Path,
    tracking_uri: str | None = None,
    model: LoadedModel | None = None,
    model_name: str = MODEL_NAME,
    alias: str = CHAMPION,
    challenger: LoadedModel | None = None,
    shadow: bool = True,
    job: str = SCORING_JOB,
    buckets: int | None = None,
    customer_ttl: timedelta | None = DEFAULT_CUSTOMER_TTL,
    sinks: Sequence[AlertSink] = (),
) -> SparkFraudReport:
    """`run_fraud_on_spark` with the customer state in the state store: TTL, no Delta state read.

    Same arguments, same tables (plus `spark_store_batches`). `customer_ttl`: processing time
    after which an idle customer's state expires (None: never). `buckets`: group customers into
    that many hash buckets per batch (one `compute_features` call each); part of the checkpoint's
    state layout, so change it only with a fresh checkpoint (which starts from Delta). No-data
    micro-batches are off in the source's session while the query runs, restored after.
    """
    # Spark reads the Delta snapshots' Parquet files itself: s3:// would need the hadoop-aws jars
    # on its classpath, which this project does not ship. Refused before anything is written.
    lake.require_local("Spark state-store scoring (Spark reads the lake's Parquet files)")
    started = time.monotonic()
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    ensure_tables(lake)
    lake.ensure(SPARK_STORE_BATCHES, SPARK_STORE_BATCH_SCHEMA)
    # A processing-time stateful operator asks for a batch at every trigger even without data
    # (for timers): `availableNow` would then never end. Off while this query runs, then restored
    # (a session of its own would not see the Python data sources registered in this one).
    frame = source(spark) if callable(source) else source
    session = frame.sparkSession
    before = session.conf.get(NO_DATA_BATCHES, None)
    session.conf.set(NO_DATA_BATCHES, "false")
    try:
        _quiet_missing_key_warnings(session)
        scoring = FraudScoringJob(
            tracking_uri, model_name, alias, model=model, challenger=challenger, shadow=shadow
        )
        report = SparkFraudReport(app_id="")
        ctx = _StoreContext(lake, scoring, job, report, list(sinks))
        initial = initial_state(session, lake, checkpoint, customer_ttl, buckets)
        accounts_uri = str(lake.path(ACCOUNTS_HISTORY))
        rows = customer_features_stream(frame, initial, customer_ttl, buckets, accounts_uri)
        report.app_id = run_available_now(
            rows,
            f"fraud_scoring_store_{checkpoint.name}",
            checkpoint,
            "spark-store",
            lambda batch, batch_id, app_id: _process_store_batch(batch, batch_id, app_id, ctx),
        )
    finally:
        if before is None:
            session.conf.unset(NO_DATA_BATCHES)
        else:
            session.conf.set(NO_DATA_BATCHES, before)
    report.duration_s = time.monotonic() - started
    return report
