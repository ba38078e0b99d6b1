"""The micro-batch scoring job: Kinesis -> features -> model + rules -> Delta tables."""

from collections.abc import Iterator

import dagster as dg
from pydantic import Field

from assets.resources import HomeResource, KinesisResource, MlflowResource
from models.job import (
    ALERTS,
    CUSTOMER_STATE,
    FEATURES,
    SCORES,
    SHADOW_SCORES,
    TERMINAL_STATE,
    TRANSACTIONS,
)
from streamguard.pipeline import scoring_runner
from streamguard.runner import DEAD_LETTER_TABLE
from streamguard.sources import KinesisSource

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


class ScoringConfig(dg.Config):
    until: dict[str, str] = Field(
        default_factory=dict,
        description="Inclusive end sequence number per shard (set by the sensor); "
        "shards not named are read to their end, an empty value skips the shard",
    )
    max_batch_records: int = Field(
        default=50_000, description="Most records in one micro-batch (one Delta commit per table)"
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
    mlflow: MlflowResource,
) -> Iterator[dg.MaterializeResult]:
    """Score the stream from the checkpoint up to the sensor's bounds, exactly once."""
    place = home.home()
    lake = home.lake()
    source = KinesisSource(kinesis.client(), kinesis.stream_name)
    runner = scoring_runner(
        lake,
        source,
        mlflow.uri(place),
        max_batch_records=config.max_batch_records,
        model_name=mlflow.model_name,
        alias=mlflow.alias,
    )
    report = runner.run(until=config.until or None)
    versions = sorted({str(b.stats.get("model_version", "")) for b in report.batches} - {""})
    context.log.info(
        f"{len(report.batches)} batch(es), {report.n_records} records, positions {report.positions}"
    )
    for name in TABLES:
        yield dg.MaterializeResult(
            asset_key=name,
            metadata={
                "rows_written": dg.MetadataValue.int(report.rows(name)),
                "rows_total": dg.MetadataValue.int(lake.count(name)),
                "batches": dg.MetadataValue.int(len(report.batches)),
                "records_read": dg.MetadataValue.int(report.n_records),
                "delta_version": dg.MetadataValue.int(lake.version(name) or 0),
                "model_versions": dg.MetadataValue.text(", ".join(versions) or "-"),
                "path": dg.MetadataValue.path(str(lake.path(name))),
            },
        )


scoring_job = dg.define_asset_job(
    "score_transactions_job",
    selection=dg.AssetSelection.assets(score_transactions),
    description="One sensor-triggered micro-batch run of the fraud scoring job.",
    tags={"streamguard/job": "fraud_scoring"},
)

defs = dg.Definitions(assets=[score_transactions], jobs=[scoring_job])
