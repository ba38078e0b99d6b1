"""The micro-batch scoring job: Kinesis or Kafka -> features -> model + rules -> Delta tables."""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import dagster as dg
from pydantic import Field, field_validator

from assets.resources import (
    IN_PROCESS,
    SPARK_STATE_STORE,
    FilesResource,
    HomeResource,
    KafkaResource,
    KinesisResource,
    MlflowResource,
    SparkResource,
    check_executor,
)
from models.job import (
    ALERTS,
    CUSTOMER_STATE,
    FEATURES,
    SCORES,
    SHADOW_SCORES,
    TERMINAL_STATE,
    TRANSACTIONS,
)
from streamguard.commit import DEAD_LETTER_TABLE, AlertSink
from streamguard.pipeline import scoring_job_name, scoring_runner
from streamguard.sources import KinesisSource, Source

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

GROUP = "fraud_stream"
TABLES = {
    TRANSACTIONS: "Every valid transaction read from the stream, with shard and sequence number.",
    FEATURES: "The exact feature vector each score used, with the model version.",
    SCORES: "Model score, rules fired and alert decision per transaction.",
    ALERTS: "Transactions flagged as suspicious, with the reason.",
    SHADOW_SCORES: "The challenger model's score of the same transactions (never alerted on).",
    CUSTOMER_STATE: "Per-customer state: balance, places seen, recent history.",
    TERMINAL_STATE: "Per-terminal state: recent transaction times.",
    DEAD_LETTER_TABLE: "Records that broke the contract: raw payload and the reason.",
}


SOURCES = ("kinesis", "kafka", "files")


class ScoringConfig(dg.Config):
    source: str = Field(
        default="kinesis",
        description="Which stream this run reads: kinesis (the Kinesis resource's stream), "
        "kafka (the Kafka resource's topic) or files (the files resource's folder). Each has its "
        "own checkpoint",
    )
    until: dict[str, str] = Field(
        default_factory=dict,
        description="Inclusive end sequence number per shard (set by the sensor); "
        "shards not named are read to their end, an empty value skips the shard",
    )
    max_batch_records: int = Field(
        default=50_000,
        description="Most records in one micro-batch (one Delta commit per table); "
        "on Spark, most records per shard in one micro-batch",
    )
    executor: str = Field(
        IN_PROCESS,
        description="Where the job runs: in_process (the micro-batch runner, reading up to "
        "`until`), spark (`run_fraud_on_spark` over the Kinesis source, state in Delta, checkpoint "
        "under $STREAMGUARD_HOME/checkpoints/fraud_spark/<stream>, availableNow up to `until`) or "
        "spark_state_store (`run_fraud_on_spark_state_store`: customer state in Spark's state "
        "store with a TTL, checkpoint under .../fraud_spark_store/<stream>). "
        "One stream must keep one executor: their "
        "checkpoints differ, so switching re-reads records the other one already scored, and "
        "those duplicates are dead-lettered as already processed",
    )

    @field_validator("executor")
    @classmethod
    def _known_executor(cls, value: str) -> str:
        return check_executor(value)

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        if value not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {value!r}")
        return value


@dataclass
class _Outcome:
    """What one run did, whichever executor ran it."""

    rows: dict[str, int]
    batches: int
    records: int
    versions: list[str] = field(default_factory=list)
    detail: str = ""


@contextmanager
def alert_sinks(kafka: KafkaResource, job: str) -> Iterator[list[AlertSink]]:
    """Alerts go to the Kafka alerts topic whenever a cluster is configured (any source); the
    producer is closed when the run ends."""
    if not (kafka.enabled and kafka.alerts_topic):
        yield []
        return
    from streamguard.alerts import KafkaAlertSink

    sink = KafkaAlertSink(kafka.config(), kafka.alerts_topic, job=job)
    try:
        yield [sink]
    finally:
        sink.close()


def _run_in_process(
    home: HomeResource,
    kinesis: KinesisResource,
    kafka: KafkaResource,
    files: FilesResource,
    mlflow: MlflowResource,
    config: ScoringConfig,
) -> _Outcome:
    lake = home.lake()
    source: Source
    if config.source == "files":
        source = files.source(lake)
        job = scoring_job_name("files", source.source)
    elif config.source == "kafka":
        from streamguard.kafka import KafkaSource

        source = KafkaSource(kafka.config(), kafka.topic)
        job = scoring_job_name("kafka", kafka.topic)
    else:
        source = KinesisSource(kinesis.client(), kinesis.stream_name)
        job = scoring_job_name("kinesis", kinesis.stream_name)
    with alert_sinks(kafka, job) as sinks:
        runner = scoring_runner(
            lake,
            source,
            mlflow.uri(home.home()),
            max_batch_records=config.max_batch_records,
            model_name=mlflow.model_name,
            alias=mlflow.alias,
            job=job,
            sinks=sinks,
        )
        try:
            report = runner.run(until=config.until or None)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()
    versions = sorted({str(b.stats.get("model_version", "")) for b in report.batches} - {""})
    return _Outcome(
        rows={name: report.rows(name) for name in TABLES},
        batches=len(report.batches),
        records=report.n_records,
        versions=versions,
        detail=f"{job}: positions {report.positions}",
    )


def _run_on_spark(
    home: HomeResource,
    kinesis: KinesisResource,
    kafka: KafkaResource,
    mlflow: MlflowResource,
    spark: SparkResource,
    config: ScoringConfig,
) -> _Outcome:
    from streamguard.spark.fraud import (
        SPARK_BATCHES,
        kinesis_records,
        planned_model_versions,
        run_fraud_on_spark,
    )
    from streamguard.spark.fraud_state import SPARK_STORE_BATCHES, run_fraud_on_spark_state_store

    place, lake = home.home(), home.lake()
    store = config.executor == SPARK_STATE_STORE
    run = run_fraud_on_spark_state_store if store else run_fraud_on_spark
    plans_table = SPARK_STORE_BATCHES if store else SPARK_BATCHES
    until = config.until or None

    def source(session: "SparkSession") -> "DataFrame":
        if config.source == "kafka":
            from streamguard.spark.kafka_source import settings_records

            return settings_records(
                session,
                kafka.settings(),
                kafka.topic,
                max_records_per_partition=config.max_batch_records,
                until=until,
            )
        return kinesis_records(
            session,
            kinesis.stream_name,
            kinesis.endpoint_url,
            config.max_batch_records,
            region=kinesis.region_name,
            until=until,
        )

    # One checkpoint per stream and engine (Kinesis streams keep their original folder name).
    stream = kinesis.stream_name if config.source == "kinesis" else f"kafka-{kafka.topic}"

    with alert_sinks(kafka, "spark_store" if store else "spark") as sinks:
        report = run(
            spark.session(),
            source,
            lake,
            place.checkpoints / ("fraud_spark_store" if store else "fraud_spark") / stream,
            tracking_uri=mlflow.uri(place),
            model_name=mlflow.model_name,
            alias=mlflow.alias,
            sinks=sinks,
        )
    scored = [b.batch_id for b in report.batches if not b.skipped]
    versions = planned_model_versions(lake, plans_table, report.app_id, scored)
    return _Outcome(
        rows={name: report.rows_written.get(name, 0) for name in TABLES},
        batches=len(scored),
        records=report.n_records,
        versions=versions,
        detail=f"{report.app_id} in {report.duration_s:.1f}s",
    )


@dg.multi_asset(
    name="score_transactions",
    specs=[
        dg.AssetSpec(name, description=text, group_name=GROUP, deps=["fraud_model", "fraud_labels"])
        for name, text in TABLES.items()
    ],
)
def score_transactions(
    context: dg.AssetExecutionContext,
    config: ScoringConfig,
    home: HomeResource,
    kinesis: KinesisResource,
    kafka: KafkaResource,
    files: FilesResource,
    mlflow: MlflowResource,
    spark: SparkResource,
) -> Iterator[dg.MaterializeResult]:
    """Score a stream from its checkpoint exactly once, in process or on Spark (config)."""
    if config.executor == IN_PROCESS:
        outcome = _run_in_process(home, kinesis, kafka, files, mlflow, config)
    elif config.source == "files":
        raise dg.Failure("Files are scored in process (executor in_process); Spark: not yet")
    else:
        outcome = _run_on_spark(home, kinesis, kafka, mlflow, spark, config)
    lake = home.lake()
    context.log.info(
        f"{config.executor}: {outcome.batches} batch(es), {outcome.records} records, "
        f"{outcome.detail}"
    )
    for name in TABLES:
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                "rows_written": dg.MetadataValue.int(outcome.rows[name]),
                "rows_total": dg.MetadataValue.int(lake.count(name)),
                "batches": dg.MetadataValue.int(outcome.batches),
                "records_read": dg.MetadataValue.int(outcome.records),
                "delta_version": dg.MetadataValue.int(lake.version(name) or 0),
                "model_versions": dg.MetadataValue.text(", ".join(outcome.versions) or "-"),
                "executor": dg.MetadataValue.text(config.executor),
                "source": dg.MetadataValue.text(config.source),
                "path": dg.MetadataValue.path(lake.uri(name)),
            },
        )


scoring_job = dg.define_asset_job(
    "score_transactions_job",
    selection=dg.AssetSelection.assets(score_transactions),
    description="One sensor-triggered micro-batch run of the fraud scoring job.",
    tags={"streamguard/job": "fraud_scoring"},
    # The asset and its checks run in the run worker itself: the default multiprocess executor
    # starts a process per step, and each loads the whole code location again (seconds a run).
    executor_def=dg.in_process_executor,
)

defs = dg.Definitions(assets=[score_transactions], jobs=[scoring_job])
