"""Lake upkeep: compact the small files micro-batches leave behind."""

import dagster as dg
from pydantic import Field

from assets.resources import HomeResource
from models.job import OUTPUTS
from streamguard.checkpoint import CHECKPOINT_TABLE
from streamguard.commit import DEAD_LETTER_TABLE

TABLES = [o.name for o in OUTPUTS] + [DEAD_LETTER_TABLE, CHECKPOINT_TABLE]


class CompactConfig(dg.Config):
    vacuum_hours: int = Field(
        default=168, description="Delete files removed longer ago than this (time travel limit)"
    )


@dg.op(description="Compact every table of the scoring job and vacuum old files.")
def compact_lake(context: dg.OpExecutionContext, config: CompactConfig, home: HomeResource) -> None:
    lake = home.lake()
    for name in TABLES:
        metrics = lake.compact(name, vacuum_hours=config.vacuum_hours)
        context.log.info(f"{name}: {metrics}")


@dg.job(description="Compact the Delta tables of the scoring job.")
def compact_lake_job() -> None:
    compact_lake()


compact_lake_schedule = dg.ScheduleDefinition(
    name="compact_lake_daily",
    job=compact_lake_job,
    cron_schedule="30 2 * * *",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Nightly compaction, before the 03:00 retrain.",
)

defs = dg.Definitions(jobs=[compact_lake_job], schedules=[compact_lake_schedule])
