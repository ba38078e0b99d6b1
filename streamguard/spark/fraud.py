"""The fraud scoring job on Spark Structured Streaming, with the same feature function.

One query (`trigger(availableNow=True)`, one checkpoint folder) over raw stream records (the
Kinesis source, or JSON-lines files for tests and backfills). Each micro-batch is one
`foreachBatch` call that does what `FraudScoringJob.process` does for the in-process runner, with
the same code at every step:

1. Parse and validate with `models.schema.parse_records`, drop duplicate transaction ids with the
   job's own `drop_duplicates`; rejected records go to `dead_letters`.
2. Features with `models.features.compute_features`, distributed: the valid transactions are
   cogrouped with the stored state, `groupBy("customer_id")` for the customer part and
   `groupBy("terminal_id")` for the terminal part, and each group runs `compute_features` with
   the *other* state empty. That gives exactly that part: every customer feature (balance,
   locations, spend/velocity windows, time since previous) reads only the customer's own rows
   and state, every terminal feature (transaction counts, known-fraud rates) only the terminal's
   rows, its state and the known frauds at that terminal, and the event attributes (amount,
   channel, hour) only the row. `compute_features` accumulates sums key by key, so every
   value, and so every score, is bit-identical to the in-process runner's (the parity test
   holds them equal exactly).
   The groups use `applyInArrow`, the Arrow form of `applyInPandas` (same grouped-map operator):
   the state's list<timestamp> columns then reach `compute_features` exactly as the in-process
   runner gives them, with no pandas round trip.
3. The two parts are joined on `transaction_id`; `FraudScoringJob.assemble` scores the batch on
   the driver (model, rules, alert decision, shadow scores) and makes every output table.
4. `streamguard.commit.write_batch`, the commit path every executor shares, writes them with the
   Delta app transaction `(f"spark:{query_id}", batch_id)`, state last; a batch Spark replays
   after a crash skips the tables that hold it, so each table gets it exactly once.

State lives in the same Delta `customer_state` / `terminal_state` tables as in-process, read at
the start of the batch and upserted at its end, rather than in Spark's state store
(`transformWithStateInPandas`) because: the features need two key spaces in one batch (a
stateful operator has one grouping key, so it would take two chained operators and a re-join);
reading the state the in-process runner writes gives exact parity and lets either engine take
over from the other; and the state is recoverable from Delta by construction (time travel,
inspection, backfills), not locked in a checkpoint. A state-store version would add per-key TTL
(expiring idle customers for free) and no Delta round trip per batch (state co-located with the
executors, no driver read and MERGE), at the cost of the above.

The context a batch runs with (`models.job.ScoringContext`: model versions, the `labels` table
version, the alert threshold) is recorded whole in the `spark_batches` table before any output,
as the runner records it in its checkpoint, so a replay scores, sees labels and alerts exactly as
the first attempt did.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from models.features import (
    CUSTOMER_STATE_SCHEMA,
    FEATURE_SCHEMA,
    KEY_COLUMNS,
    KNOWN_FRAUD_SCHEMA,
    LABEL_DELAY_DAYS,
    TERMINAL_FEATURES,
    TERMINAL_STATE_SCHEMA,
    FeatureResult,
    FeatureState,
    compute_features,
    feature_input,
    with_feature_version,
)
from models.job import (
    ALERTS,
    OUTPUTS,
    FraudScoringJob,
    ScoringContext,
    feature_inputs,
    load_state,
    prepare,
)
from models.registry import CHAMPION, MODEL_NAME, LoadedModel
from models.schema import FEATURE_INPUT_SCHEMA, TIMESTAMP
from streamguard.commit import (
    AlertSink,
    batch_written,
    next_batch_id,
    publish_batch,
    rejected_records,
    write_batch,
)
from streamguard.lake import Lake
from streamguard.pipeline import SCORING_JOB, ensure_tables
from streamguard.spark.customer_state import CUSTOMER_SIDE_FEATURES
from streamguard.spark.kinesis_source import register_kinesis_source

SPARK_BATCHES = "spark_batches"
SPARK_BATCH_SCHEMA = pa.schema(
    [
        pa.field("app_id", pa.string(), nullable=False),
        pa.field("batch_id", pa.int64(), nullable=False),
        pa.field("job", pa.string()),
        pa.field("n_records", pa.int64()),
        # The batch's whole context (`ScoringContext.to_json`), as the runner's checkpoint has it.
        pa.field("context", pa.string()),
        pa.field("planned_at", TIMESTAMP),
        # batch_id is the lake's batch id, recorded for Spark's batch id (`lake_batch_id`).
        pa.field("spark_batch_id", pa.int64(), nullable=False),
    ]
)
# The records a micro-batch hands to foreachBatch (the Kinesis source's columns).
RECORD_COLUMNS = ("shard_id", "sequence_number", "partition_key", "data", "arrival_time")


def _part_schema(features: list[str], state: pa.Schema) -> pa.Schema:
    """Rows of one part: feature rows (kind 'f') and new-state rows (kind 's') in one table."""
    return pa.schema(
        [
            pa.field("kind", pa.string()),
            pa.field("_seq", pa.int64()),
            pa.field("transaction_id", pa.string()),
            *[pa.field(c, pa.float64()) for c in features],
            *[f.with_nullable(True) for f in state],
        ]
    )


_CUSTOMER_PART = _part_schema(CUSTOMER_SIDE_FEATURES, CUSTOMER_STATE_SCHEMA)
_TERMINAL_PART = _part_schema(TERMINAL_FEATURES, TERMINAL_STATE_SCHEMA)


def _ddl(schema: pa.Schema) -> str:
    spark_types = {
        pa.string(): "string",
        pa.int64(): "bigint",
        pa.float64(): "double",
        TIMESTAMP: "timestamp",
        pa.list_(pa.string()): "array<string>",
        pa.list_(TIMESTAMP): "array<timestamp>",
        pa.list_(pa.float64()): "array<double>",
        pa.list_(pa.int64()): "array<bigint>",
    }
    return ", ".join(f"{f.name} {spark_types[f.type]}" for f in schema)


# The feature function's input (transactions and their account as of each event), in arrival order.
_TX_DDL = "_seq bigint, " + _ddl(FEATURE_INPUT_SCHEMA)
_TSTATE_DDL = _ddl(TERMINAL_STATE_SCHEMA)
_CSTATE_DDL = _ddl(CUSTOMER_STATE_SCHEMA)


def _part(
    key_features: list[str],
    out_schema: pa.Schema,
    customers: bool,
    frauds: pa.Table | None,
    label_delay_days: int,
    transactions: pa.Table,
    state: pa.Table,
) -> pa.Table:
    """One group: `compute_features` on its rows with the other key space's state empty."""
    if transactions.num_rows == 0:
        return out_schema.empty_table()
    transactions = transactions.sort_by("_seq")  # arrival order breaks event-time ties
    tx = transactions.select(FEATURE_INPUT_SCHEMA.names).cast(FEATURE_INPUT_SCHEMA)
    if customers:
        given = FeatureState(
            state.select(CUSTOMER_STATE_SCHEMA.names).cast(CUSTOMER_STATE_SCHEMA),
            TERMINAL_STATE_SCHEMA.empty_table(),
        )
    else:
        given = FeatureState(
            CUSTOMER_STATE_SCHEMA.empty_table(),
            state.select(TERMINAL_STATE_SCHEMA.names).cast(TERMINAL_STATE_SCHEMA),
        )
    result = compute_features(tx, given, frauds, label_delay_days)
    n = tx.num_rows
    feats = result.features.select(["transaction_id", *key_features])
    feats = feats.append_column("_seq", transactions["_seq"]).append_column(
        "kind", pa.array(["f"] * n, pa.string())
    )
    new_state = result.state.customers if customers else result.state.terminals
    new_state = new_state.append_column("kind", pa.array(["s"] * new_state.num_rows, pa.string()))
    both = pa.concat_tables([feats, new_state], promote_options="default")
    return both.select(out_schema.names).cast(out_schema)


def _frame(spark: SparkSession, table: pa.Table, ddl: str) -> DataFrame:
    """A local Arrow table as a DataFrame (pyspark cannot convert a table with no chunks)."""
    if table.num_rows == 0:
        return spark.createDataFrame([], schema=ddl)
    return spark.createDataFrame(table.combine_chunks(), schema=ddl)


def _group(frame: DataFrame, key: str, buckets: int | None) -> Column:
    if buckets is None:
        return frame[key]
    return F.pmod(F.xxhash64(frame[key]), F.lit(buckets)).alias("_bucket")


def spark_features(
    spark: SparkSession,
    transactions: pa.Table,
    state: FeatureState,
    known_frauds: pa.Table | None = None,
    buckets: int | None = None,
    label_delay_days: int = LABEL_DELAY_DAYS,
) -> FeatureResult:
    """`compute_features`, distributed by customer and by terminal; same result, same order.

    `buckets`: group by a hash bucket of the key instead of the key itself. Each group is still
    whole keys, so the result is the same (the per-key independence above), but there are
    `buckets` calls of `compute_features` per part instead of one per key: its fixed cost per
    call (a few ms) dominates when groups are one customer's few transactions.
    One Spark job: both cogroups are unioned and collected at once, then the two feature parts
    are joined on `transaction_id` on the driver (which scores and writes the batch anyway).
    """
    if transactions.num_rows == 0:
        return compute_features(transactions, state, known_frauds, label_delay_days)
    tx = feature_input(transactions)
    tx = tx.add_column(0, "_seq", pa.array(np.arange(tx.num_rows), pa.int64()))
    tx_df = _frame(spark, tx, _TX_DDL)
    c_df = _frame(spark, state.customers.cast(CUSTOMER_STATE_SCHEMA), _CSTATE_DDL)
    t_df = _frame(spark, state.terminals.cast(TERMINAL_STATE_SCHEMA), _TSTATE_DDL)
    frauds = None if known_frauds is None else known_frauds.cast(KNOWN_FRAUD_SCHEMA)
    customer_part = (
        tx_df.groupBy(_group(tx_df, "customer_id", buckets))
        .cogroup(c_df.groupBy(_group(c_df, "customer_id", buckets)))
        .applyInArrow(
            partial(_part, CUSTOMER_SIDE_FEATURES, _CUSTOMER_PART, True, None, label_delay_days),
            _ddl(_CUSTOMER_PART),
        )
        .withColumn("kind", F.concat(F.lit("c"), "kind"))
    )
    terminal_part = (
        tx_df.groupBy(_group(tx_df, "terminal_id", buckets))
        .cogroup(t_df.groupBy(_group(t_df, "terminal_id", buckets)))
        .applyInArrow(
            partial(_part, TERMINAL_FEATURES, _TERMINAL_PART, False, frauds, label_delay_days),
            _ddl(_TERMINAL_PART),
        )
        .withColumn("kind", F.concat(F.lit("t"), "kind"))
    )
    rows = customer_part.unionByName(terminal_part, allowMissingColumns=True).toArrow()
    kind = rows["kind"]

    def of(k: str) -> pa.Table:
        return rows.filter(pc.equal(kind, k))

    base = tx.select(["_seq", *KEY_COLUMNS])
    joined = (
        base.join(of("cf").select(["transaction_id", *CUSTOMER_SIDE_FEATURES]), "transaction_id")
        .join(of("tf").select(["transaction_id", *TERMINAL_FEATURES]), "transaction_id")
        .sort_by("_seq")
    )
    if joined.num_rows != tx.num_rows:
        raise RuntimeError(f"feature parts joined to {joined.num_rows} of {tx.num_rows} rows")
    features = joined.select(FEATURE_SCHEMA.names).cast(FEATURE_SCHEMA)
    new_state = FeatureState(
        of("cs").select(CUSTOMER_STATE_SCHEMA.names).cast(CUSTOMER_STATE_SCHEMA),
        of("ts").select(TERMINAL_STATE_SCHEMA.names).cast(TERMINAL_STATE_SCHEMA),
    )
    return FeatureResult(features, new_state)


# ----------------------------------------------------------------------------- sources


def jsonl_source(spark: SparkSession, input_dir: Path, max_files_per_trigger: int = 1) -> DataFrame:
    """JSON-lines files as stream records: one file's lines in file order, blank lines skipped.

    `wholetext` reads a file as one row so `posexplode` numbers its lines exactly: the line number
    is the sequence number (the file path is the "shard"), which fixes the arrival order.
    """
    lines = (
        spark.readStream.format("text")
        .option("wholetext", True)
        .option("maxFilesPerTrigger", max_files_per_trigger)
        .option("pathGlobFilter", "*.jsonl")
        .load(str(input_dir))
    )
    exploded = lines.select(
        F.col("_metadata.file_path").alias("shard_id"),
        F.col("_metadata.file_modification_time").alias("arrival_time"),
        F.posexplode(F.split("value", "\n")).alias("pos", "line"),
    )
    return exploded.where(F.trim("line") != "").select(
        "shard_id",
        F.lpad((F.col("pos") + 1).cast("string"), 20, "0").alias("sequence_number"),
        F.lit(None).cast("string").alias("partition_key"),  # lines of a file have no key
        F.col("line").cast("binary").alias("data"),
        F.col("arrival_time").cast("timestamp").alias("arrival_time"),
    )


def kinesis_records(
    spark: SparkSession,
    stream: str,
    endpoint_url: str | None = None,
    max_records_per_shard: int = 10_000,
    region: str | None = None,
    until: Mapping[str, str | None] | None = None,
) -> DataFrame:
    """The Kinesis stream as stream records (the project's Python Kinesis source).

    `until`: inclusive per-shard ends for an availableNow run (the sensor's batch bounds;
    shards not named are read to their end, an empty value skips the shard).
    """
    register_kinesis_source(spark)
    reader = (
        spark.readStream.format("kinesis")
        .option("streamName", stream)
        .option("maxRecordsPerShard", str(max_records_per_shard))
    )
    if endpoint_url:
        reader = reader.option("endpointUrl", endpoint_url)
    if region:
        reader = reader.option("region", region)
    if until:
        reader = reader.option("endingPosition", json.dumps(dict(until)))
    return reader.load().select(*RECORD_COLUMNS)


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _Record:
    shard_id: str
    sequence_number: str
    partition_key: str | None
    data: bytes
    arrival_time: datetime | None


@dataclass
class BatchTiming:
    """Where one micro-batch's time went (seconds)."""

    batch_id: int
    records: int
    valid: int = 0
    rejected: int = 0
    alerts: int = 0
    skipped: bool = False
    collect_s: float = 0.0  # Spark: read the source, records to the driver
    prepare_s: float = 0.0  # parse, dedupe, plan, state and labels reads
    features_s: float = 0.0  # Spark: the two cogroups
    score_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0


@dataclass
class SparkFraudReport:
    app_id: str
    batches: list[BatchTiming] = field(default_factory=list)
    rows_written: dict[str, int] = field(default_factory=dict)
    duration_s: float = 0.0

    @property
    def n_records(self) -> int:
        return sum(b.records for b in self.batches)


def _sort_key(record: _Record) -> tuple[str, int]:
    try:
        return record.shard_id, int(record.sequence_number)
    except ValueError:
        return record.shard_id, 0


def lake_batch_id(lake: Lake, plans: str, app_id: str, spark_batch_id: int) -> int:
    """The lake's batch id of a Spark micro-batch: the one recorded with its plan (a replay),
    else the next of the lake's numbering (`next_batch_id`).

    Spark's own batch ids restart at 0 with a new checkpoint and know nothing of other jobs
    writing the lake; the lake's ids go on across both, so "earlier batch" reads (duplicate ids,
    known frauds) and a batch's rows mean the same whichever engine or stream wrote them.
    """
    done = lake.read(
        plans,
        columns=["batch_id"],
        filter=(pc.field("app_id") == app_id) & (pc.field("spark_batch_id") == spark_batch_id),
        schema=SPARK_BATCH_SCHEMA,
    )
    if done.num_rows:
        return int(done["batch_id"][0].as_py())
    return next_batch_id(lake)


def plan_batch(
    lake: Lake,
    plans: str,
    job: FraudScoringJob,
    *,
    app_id: str,
    job_name: str,
    batch_id: int,
    spark_batch_id: int,
    n_records: int,
    accounts_version: int | Literal["plan"] | None = "plan",
) -> ScoringContext:
    """The batch's context: recorded whole in `plans` on the first attempt, read on replays.

    `accounts_version`: the version an engine already read (the state-store executors), instead
    of the one the plan would pick.
    """
    filt = (pc.field("app_id") == app_id) & (pc.field("batch_id") == batch_id)
    done = lake.read(plans, columns=["context"], filter=filt, schema=SPARK_BATCH_SCHEMA)
    if done.num_rows:
        return job.load_context(done["context"][0].as_py())
    context = job.plan_context(lake)
    if accounts_version != "plan":
        context = dataclasses.replace(context, accounts_version=accounts_version)
    row = {
        "app_id": app_id,
        "batch_id": batch_id,
        "job": job_name,
        "n_records": n_records,
        "context": context.to_json(),
        "planned_at": datetime.now(UTC),
        "spark_batch_id": spark_batch_id,
    }
    lake.append(plans, pa.Table.from_pylist([row], SPARK_BATCH_SCHEMA), app_id, batch_id)
    return context


def planned_model_versions(lake: Lake, plans: str, app_id: str, batch_ids: list[int]) -> list[str]:
    """The champion versions a Spark query's batches were planned with (run metadata)."""
    if not batch_ids:
        return []
    rows = lake.read(
        plans,
        columns=["context"],
        filter=(pc.field("app_id") == app_id) & pc.field("batch_id").isin(batch_ids),
        schema=SPARK_BATCH_SCHEMA,
    )
    return sorted({ScoringContext.from_json(t).model_version for t in rows["context"].to_pylist()})


@dataclass
class _BatchContext:
    spark: SparkSession
    lake: Lake
    job: FraudScoringJob
    job_name: str
    report: SparkFraudReport
    buckets: int | None
    sinks: list[AlertSink] = field(default_factory=list)  # alerts published once each


def _process_batch(batch: DataFrame, spark_batch_id: int, app_id: str, ctx: _BatchContext) -> None:
    """One micro-batch: the runner's plan, parse and writes, with the features on Spark."""
    started = time.perf_counter()
    lake, job = ctx.lake, ctx.job
    batch_id = lake_batch_id(lake, SPARK_BATCHES, app_id, spark_batch_id)
    raw = batch.select(*RECORD_COLUMNS).toArrow().to_pylist()
    records = sorted((_Record(**r) for r in raw), key=_sort_key)
    timing = BatchTiming(batch_id, len(records))
    ctx.report.batches.append(timing)
    t = time.perf_counter()
    timing.collect_s = t - started
    if not records or batch_written(lake, app_id, batch_id, OUTPUTS):
        if ctx.sinks and batch_written(lake, app_id, batch_id, OUTPUTS):
            publish_batch(ctx.sinks, app_id, batch_id, lake)  # a crash came before publishing
        timing.skipped = True
        timing.total_s = time.perf_counter() - started
        return
    context = plan_batch(
        lake,
        SPARK_BATCHES,
        job,
        app_id=app_id,
        job_name=ctx.job_name,
        batch_id=batch_id,
        spark_batch_id=spark_batch_id,
        n_records=len(records),
    )
    now = datetime.now(UTC)
    valid, transactions, rejected = prepare(records, batch_id, lake, now)
    state = load_state(lake, valid)
    valid, known = feature_inputs(lake, valid, batch_id, context)
    t2 = time.perf_counter()
    timing.prepare_s = t2 - t
    delay = job.feature_delay_days(context)  # the planned champion's label delay D
    result = spark_features(ctx.spark, valid, state, known.frauds, ctx.buckets, delay)
    t3 = time.perf_counter()
    timing.features_s = t3 - t2
    features = with_feature_version(result.features, delay)
    tables = job.assemble(features, result.state, transactions, context, batch_id, now, known)
    t4 = time.perf_counter()
    timing.score_s = t4 - t3
    dead = rejected_records(ctx.job_name, batch_id, records, rejected, now)
    written = write_batch(lake, app_id, batch_id, dead, tables, OUTPUTS)
    publish_batch(ctx.sinks, app_id, batch_id, lake)
    for name, rows in written.items():
        ctx.report.rows_written[name] = ctx.report.rows_written.get(name, 0) + rows
    timing.write_s = time.perf_counter() - t4
    timing.valid, timing.rejected = valid.num_rows, len(rejected)
    timing.alerts = tables[ALERTS].num_rows
    timing.total_s = time.perf_counter() - started


def run_available_now(
    frame: DataFrame,
    name: str,
    checkpoint: Path,
    prefix: str,
    process: Callable[[DataFrame, int, str], None],
) -> str:
    """Run `frame` to the end of its input (`availableNow`) through `process(batch, id, app)`.

    The app id `f"{prefix}:{query id}"` keys the Delta app transactions: stable across restarts
    from the same checkpoint, new when the checkpoint is deleted. Returned once the query ends.
    """
    app: dict[str, str] = {}
    known = threading.Event()

    def each_batch(batch: DataFrame, batch_id: int) -> None:
        if not known.wait(timeout=120):
            raise RuntimeError("the query id never became known")
        process(batch, batch_id, app["id"])

    query = (
        frame.writeStream.queryName(name)
        .foreachBatch(each_batch)
        .option("checkpointLocation", str(checkpoint))
        .trigger(availableNow=True)
        .start()
    )
    app["id"] = f"{prefix}:{query.id}"
    known.set()
    try:
        query.awaitTermination()
    finally:
        if query.isActive:
            query.stop()
    return app["id"]


def run_fraud_on_spark(
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
    sinks: Sequence[AlertSink] = (),
) -> SparkFraudReport:
    """Score every record not yet seen (`availableNow`), then stop; return what happened.

    `source` is a streaming frame of RECORD_COLUMNS (`kinesis_records`, `jsonl_source`) or a
    function building one. The checkpoint remembers the offsets, so a rerun picks up only new
    records, and a batch Spark replays writes nothing twice (app id `spark:<query id>`).
    `buckets`: see `spark_features` (None: one group per customer and per terminal).
    `sinks` get each batch's alerts once the lake has them, exactly once (e.g. Kafka).
    """
    started = time.monotonic()
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    ensure_tables(lake)
    lake.ensure(SPARK_BATCHES, SPARK_BATCH_SCHEMA)
    frame = source(spark) if callable(source) else source
    scoring = FraudScoringJob(
        tracking_uri, model_name, alias, model=model, challenger=challenger, shadow=shadow
    )
    report = SparkFraudReport(app_id="")
    ctx = _BatchContext(spark, lake, scoring, job, report, buckets, list(sinks))
    report.app_id = run_available_now(
        frame,
        f"fraud_scoring_{checkpoint.name}",
        checkpoint,
        "spark",
        lambda batch, batch_id, app_id: _process_batch(batch, batch_id, app_id, ctx),
    )
    report.duration_s = time.monotonic() - started
    return report
