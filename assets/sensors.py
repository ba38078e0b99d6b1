"""The sensor that turns new Kinesis records into micro-batch scoring runs."""

import hashlib
import json

import dagster as dg

from assets.resources import KinesisResource
from assets.scoring import ScoringConfig, scoring_job
from streamguard.kinesis import latest_positions, list_shards

SENSOR_INTERVAL_SECONDS = 10


def batch_run_key(stream: str, start: dict[str, str | None], end: dict[str, str | None]) -> str:
    """The same bounds always give the same key, so a re-evaluated tick launches nothing twice."""
    bounds = json.dumps({"stream": stream, "from": start, "to": end}, sort_keys=True)
    return f"{stream}-{hashlib.sha256(bounds.encode()).hexdigest()[:20]}"


@dg.sensor(
    name="kinesis_transactions_sensor",
    job=scoring_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Checks every shard for records past the cursor; one scoring run per new range.",
)
def kinesis_transactions_sensor(
    context: dg.SensorEvaluationContext, kinesis: KinesisResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON of the last sequence number per shard that a run was requested for.

    The run's executor comes from the resource (`KinesisResource.executor`, else
    $STREAMGUARD_EXECUTOR, else in_process). A Spark run reads to the end of the stream, so a
    later request may find its range already scored and write nothing.
    """
    cursor: dict[str, str | None] = json.loads(context.cursor) if context.cursor else {}
    client = kinesis.client()
    shards = [s.shard_id for s in list_shards(client, kinesis.stream_name)]
    start = {shard: cursor.get(shard) for shard in shards}
    end = latest_positions(client, kinesis.stream_name, start, kinesis.max_records_per_shard)
    new = {shard: seq for shard, seq in end.items() if seq is not None and seq != start[shard]}
    if not new:
        return dg.SkipReason(
            f"No new records on {len(shards)} shard(s) of {kinesis.stream_name} past the cursor."
        )
    context.update_cursor(json.dumps({**cursor, **end}, sort_keys=True))
    until = {shard: seq or "" for shard, seq in end.items()}
    executor = kinesis.executor_name
    config = ScoringConfig(until=until, executor=executor)
    return dg.RunRequest(
        run_key=batch_run_key(kinesis.stream_name, start, end),
        run_config=dg.RunConfig(ops={"score_transactions": config}),
        tags={
            "streamguard/stream": kinesis.stream_name,
            "streamguard/executor": executor,
            "streamguard/shards_with_new": str(len(new)),
        },
    )


defs = dg.Definitions(sensors=[kinesis_transactions_sensor])
