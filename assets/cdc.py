"""The bank's accounts from AWS DMS change files: current rows, their history, a folder sensor."""

import hashlib
import json
from dataclasses import replace
from typing import cast

import dagster as dg
from pydantic import Field

from assets.resources import HomeResource
from models.accounts import ACCOUNT_KEY, ACCOUNT_SCHEMA, ACCOUNTS, ACCOUNTS_HISTORY
from streamguard.cdc import CdcReport, ScdType, apply_changes
from streamguard.dms import DmsFile, DmsFormat, DmsSource
from streamguard.schema_evolution import SCHEMA_MODES, SchemaMode

GROUP = "accounts"
# The targets: `models.accounts` names them (the scoring job reads `accounts_history`).
SEQUENCE_BY = "updated_at"  # the source's own commit time: safer than DMS's transfer time
SENSOR_INTERVAL_SECONDS = 30
FORMATS: tuple[DmsFormat, ...] = ("csv", "parquet")


class DmsConfig(dg.Config):
    dms_dir: str | None = Field(
        default=None,
        description="The DMS endpoint's BucketFolder (a folder or s3:// prefix); unset: "
        "$STREAMGUARD_HOME/data/dms",
    )
    db_schema: str = Field(default="bank", description="Source schema: the folder under dms_dir")
    table: str = Field(default="accounts", description="Source table: the folder under db_schema")
    file_format: str = Field(default="csv", description="DMS DataFormat: csv or parquet")
    timestamp_column: str | None = Field(
        default=None, description="The endpoint's TimestampColumnName, when it sets one"
    )
    schema_mode: str = Field(
        default="addNewColumns",
        description="What a new source column does: addNewColumns | rescue | failOnNewColumns | "
        "none",
    )
    max_files_per_batch: int | None = Field(
        default=None, description="Most DMS files applied in one batch (unset: no limit)"
    )


def dms_dir(home: HomeResource, configured: str | None = None) -> str:
    return configured or str(home.home().data / "dms")


def dms_source(home: HomeResource, config: DmsConfig) -> DmsSource:
    """The DMS table folder the config names, its settings checked."""
    if config.file_format not in FORMATS:
        raise ValueError(f"file_format must be csv or parquet, got {config.file_format!r}")
    return DmsSource(
        dms_dir(home, config.dms_dir),
        config.db_schema,
        config.table,
        format=cast(DmsFormat, config.file_format),
        timestamp_column=config.timestamp_column,
    )


def _apply(
    context: dg.AssetExecutionContext,
    home: HomeResource,
    config: DmsConfig,
    target: str,
    scd_type: ScdType,
) -> dg.MaterializeResult:
    if config.schema_mode not in SCHEMA_MODES:
        raise ValueError(f"schema_mode must be one of {', '.join(SCHEMA_MODES)}")
    lake = home.lake()
    report: CdcReport = apply_changes(
        lake,
        dms_source(home, config),
        target,
        keys=[ACCOUNT_KEY],
        sequence_by=SEQUENCE_BY,
        stored_as_scd_type=scd_type,
        schema_mode=cast(SchemaMode, config.schema_mode),
        schema_hints=ACCOUNT_SCHEMA,
        max_files_per_batch=config.max_files_per_batch,
    )
    context.log.info(
        f"{target}: {report.files} file(s) in {len(report.batches)} batch(es), "
        f"{report.total('changes'):,} changes, {report.total('dead_letters')} dead letter(s)"
    )
    return dg.MaterializeResult(
        metadata={
            "files_applied": dg.MetadataValue.int(report.files),
            "batches": dg.MetadataValue.int(len(report.batches)),
            "changes": dg.MetadataValue.int(report.total("changes")),
            "rows_inserted": dg.MetadataValue.int(report.total("inserted")),
            "rows_updated": dg.MetadataValue.int(report.total("updated")),
            "rows_deleted": dg.MetadataValue.int(report.total("deleted")),
            "dead_letters": dg.MetadataValue.int(report.total("dead_letters")),
            "rows_total": dg.MetadataValue.int(lake.count(target)),
            "delta_version": dg.MetadataValue.int(report.version or 0),
            "path": dg.MetadataValue.path(lake.uri(target)),
        }
    )


@dg.asset(
    name=ACCOUNTS,
    group_name=GROUP,
    description="The bank's accounts as they are now (SCD type 1), from the DMS change files.",
)
def accounts(
    context: dg.AssetExecutionContext, config: DmsConfig, home: HomeResource
) -> dg.MaterializeResult:
    """Apply new DMS files to the current accounts: the authoritative balance and statuses."""
    return _apply(context, home, config, ACCOUNTS, 1)


@dg.asset(
    name=ACCOUNTS_HISTORY,
    group_name=GROUP,
    description="Every version of every account (SCD type 2: valid_from, valid_to, is_current).",
)
def accounts_history(
    context: dg.AssetExecutionContext, config: DmsConfig, home: HomeResource
) -> dg.MaterializeResult:
    """Apply new DMS files to the accounts history, so any past moment can be looked up."""
    return _apply(context, home, config, ACCOUNTS_HISTORY, 2)


# One process, one asset after the other: each target has one writer at a time, and the two
# take their lake batch ids one after the other.
accounts_job = dg.define_asset_job(
    "accounts_cdc_job",
    selection=dg.AssetSelection.assets(accounts, accounts_history),
    description="Apply the new DMS files of the accounts table to its current rows and history.",
    tags={"streamguard/job": "accounts_cdc"},
    executor_def=dg.in_process_executor,
)
UNFINISHED = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]


def dms_files(source: DmsSource) -> list[DmsFile]:
    """The table's DMS files in either format, in DMS order."""
    found = [f for fmt in FORMATS for f in replace(source, format=fmt).list_files()]
    return sorted(found, key=lambda f: (f.order_key, f.path))


@dg.sensor(
    name="dms_files_sensor",
    job=accounts_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    description="Requests an accounts CDC run when DMS writes new files for the accounts table.",
)
def dms_files_sensor(
    context: dg.SensorEvaluationContext, home: HomeResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON {"last": order key of the newest file seen, "files": how many were seen}.

    DMS names files in apply order, so the newest key is enough; a file landing late with an
    older name still raises the count. The runs themselves skip files already applied. No run
    is requested while one is unfinished: a target takes one writer at a time.
    """
    source = dms_source(home, DmsConfig())
    running = dg.RunsFilter(job_name=accounts_job.name, statuses=UNFINISHED)
    if context.instance.get_run_records(filters=running, limit=1):
        return dg.SkipReason("An accounts CDC run is not finished yet: new files wait for it.")
    seen = json.loads(context.cursor) if context.cursor else {}
    last, count = str(seen.get("last", "")), int(seen.get("files", 0))
    files = dms_files(source)
    new = [f for f in files if f.order_key > last]
    if not new and len(files) > count:
        new = files  # a late file: which one is not known from the cursor, the run knows
    if not new:
        return dg.SkipReason(
            f"No new DMS files under {source.location()[1]} ({len(files)} already seen)."
        )
    context.update_cursor(json.dumps({"last": files[-1].order_key, "files": len(files)}))
    names = json.dumps([f.path for f in new])
    parquet = all(f.name.endswith(".parquet") for f in new)
    config = DmsConfig(file_format="parquet" if parquet else "csv")
    return dg.RunRequest(
        run_key=f"dms-{hashlib.sha256(names.encode()).hexdigest()[:20]}",
        run_config=dg.RunConfig(ops={ACCOUNTS: config, ACCOUNTS_HISTORY: config}),
        tags={"streamguard/new_files": str(len(new))},
    )


defs = dg.Definitions(
    assets=[accounts, accounts_history], jobs=[accounts_job], sensors=[dms_files_sensor]
)
