"""The sensors that turn new stream records into micro-batch scoring runs: one per stream.

Both keep a JSON cursor of the last position per shard (Kinesis shard, Kafka `topic:partition`)
that a run was requested for, and ask for exactly the range past it. The run key comes from the
bounds, so a re-evaluated tick launches nothing twice. While a continuous scoring run holds the
lake's scoring slot (assets/continuous.py) they request nothing and keep their cursor: the run
they would launch could only queue behind it.
"""

import hashlib
import json
from collections.abc import Callable, Mapping

import dagster as dg

from assets.continuous import holder_of_the_scoring_slot
from assets.resources import FilesResource, HomeResource, KafkaResource, KinesisResource
from assets.scoring import ScoringConfig, scoring_job
from streamguard.kinesis import latest_positions, list_shards

SENSOR_INTERVAL_SECONDS = 10

Positions = dict[str, str | None]


def batch_run_key(
    stream: str, start: Mapping[str, str | None], end: Mapping[str, str | None]
) -> str:
    """The same bounds always give the same key, so a re-evaluated tick launches nothing twice."""
    bounds = json.dumps({"stream": stream, "from": start, "to": end}, sort_keys=True)
    return f"{stream}-{hashlib.sha256(bounds.encode()).hexdigest()[:20]}"


def next_range(
    context: dg.SensorEvaluationContext,
    *,
    source: str,
    stream: str,
    shards: list[str],
    latest: Callable[[Positions], Positions],
    executor: str,
) -> dg.RunRequest | dg.SkipReason:
    """One run request for what is new past the cursor on `shards`, or why there is none."""
    cursor: Positions = json.loads(context.cursor) if context.cursor else {}
    start = {shard: cursor.get(shard) for shard in shards}
    end = latest(start)
    new = {shard: seq for shard, seq in end.items() if seq is not None and seq != start.get(shard)}
    if not new:
        return dg.SkipReason(
            f"No new records on {len(shards)} shard(s) of {source} {stream} past the cursor."
        )
    context.update_cursor(json.dumps({**cursor, **end}, sort_keys=True))
    until = {shard: seq or "" for shard, seq in end.items()}
    config = ScoringConfig(source=source, until=until, executor=executor)
    return dg.RunRequest(
        run_key=batch_run_key(stream if source == "kinesis" else f"{source}:{stream}", start, end),
        run_config=dg.RunConfig(ops={"score_transactions": config}),
        tags={
            "streamguard/source": source,
            "streamguard/stream": stream,
            "streamguard/executor": executor,
            "streamguard/shards_with_new": str(len(new)),
        },
    )


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

    The run's executor comes from the resource (`KinesisResource.executor`).
    """
    held = holder_of_the_scoring_slot(context)
    if held:
        return dg.SkipReason(held)
    client = kinesis.client()
    stream = kinesis.stream_name
    return next_range(
        context,
        source="kinesis",
        stream=stream,
        shards=[s.shard_id for s in list_shards(client, stream)],
        latest=lambda start: latest_positions(client, stream, start, kinesis.max_records_per_shard),
        executor=kinesis.executor_name,
    )


@dg.sensor(
    name="kafka_transactions_sensor",
    job=scoring_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Checks every partition of the Kafka topic past the cursor; one run per range.",
)
def kafka_transactions_sensor(
    context: dg.SensorEvaluationContext, kafka: KafkaResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON of the last offset per `topic:partition` that a run was requested for.

    Skips with a reason when no Kafka cluster is configured (STREAMGUARD_KAFKA_BOOTSTRAP, or an
    Event Hubs connection string), so a Kinesis-only deployment shows why it is idle.
    """
    if not kafka.enabled:
        return dg.SkipReason(
            "No Kafka cluster configured: set STREAMGUARD_KAFKA_BOOTSTRAP "
            "(or STREAMGUARD_EVENT_HUBS_CONNECTION_STRING) to score a Kafka topic."
        )
    held = holder_of_the_scoring_slot(context)
    if held:
        return dg.SkipReason(held)
    from streamguard.kafka import KafkaSource

    with KafkaSource(kafka.config(), kafka.topic) as source:
        return next_range(
            context,
            source="kafka",
            stream=kafka.topic,
            shards=source.shards(),
            latest=lambda start: source.latest_positions(start, kafka.max_records_per_partition),
            executor=kafka.executor_name,
        )


@dg.sensor(
    name="transaction_files_sensor",
    job=scoring_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a scoring run when new transaction files land in the folder.",
)
def transaction_files_sensor(
    context: dg.SensorEvaluationContext, files: FilesResource, home: HomeResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON {path: [size, modification time]} of the files a run was requested for.

    The run itself decides which files are new from the lake's file log, so a file the sensor
    saw twice (a re-evaluated tick) is still scored once.
    """
    if not files.enabled:
        return dg.SkipReason("No transaction folder configured: set STREAMGUARD_FILES_DIR.")
    held = holder_of_the_scoring_slot(context)
    if held:
        return dg.SkipReason(held)
    source = files.source(home.lake())
    current = {
        path: [size, int(mtime.timestamp() * 1_000_000)]
        for path, size, mtime, _ in source.list_files()
    }
    seen: dict[str, list[int]] = json.loads(context.cursor) if context.cursor else {}
    new = {path: stamp for path, stamp in current.items() if seen.get(path) != stamp}
    if not new:
        return dg.SkipReason(f"No new files in {files.folder} ({len(current)} already seen).")
    context.update_cursor(json.dumps(current, sort_keys=True))
    digest = hashlib.sha256(json.dumps(new, sort_keys=True).encode()).hexdigest()[:20]
    config = ScoringConfig(source="files", executor=files.executor)
    return dg.RunRequest(
        run_key=f"files-{digest}",
        run_config=dg.RunConfig(ops={"score_transactions": config}),
        tags={
            "streamguard/source": "files",
            "streamguard/stream": files.folder,
            "streamguard/new_files": str(len(new)),
        },
    )


defs = dg.Definitions(
    sensors=[kinesis_transactions_sensor, kafka_transactions_sensor, transaction_files_sensor]
)
