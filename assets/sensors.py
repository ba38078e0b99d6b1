"""The sensors that turn new stream records into micro-batch scoring runs: one per stream.

Both keep a JSON cursor of the last position per shard (Kinesis shard, Kafka `topic:partition`)
that a run was requested for, and ask for exactly the range past it. The run key comes from the
bounds, so a re-evaluated tick launches nothing twice. While a continuous scoring run holds the
lake's scoring slot (assets/continuous.py) they request nothing and keep their cursor: the run
they would launch could only queue behind it.

How soon a record is seen (issue 11): the daemon evaluates sensors in a loop every 5 s at best,
and a sensor no more often than its minimum interval. `SensorSettings` (read from the environment
when the code location loads: `STREAMGUARD_SENSOR_INTERVAL_S`, `STREAMGUARD_SENSOR_WAIT_S`) sets
the stream sensors' minimum interval (default 1 s: every loop) and how long a Kinesis or Kafka
tick that finds nothing new keeps looking (default 4 s, a read every 0.5 s) before it skips: a
record that lands between two loops is then seen within half a second instead of at the next
loop. The instance evaluates sensors in threads (platform/dagster.yaml), so a waiting tick holds
up no other sensor.
"""

import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import dagster as dg

from assets.continuous import holder_of_the_scoring_slot
from assets.resources import FilesResource, HomeResource, KafkaResource, KinesisResource
from assets.scoring import ScoringConfig, scoring_job
from streamguard.kinesis import latest_positions, list_shards

INTERVAL_ENV = "STREAMGUARD_SENSOR_INTERVAL_S"
WAIT_ENV = "STREAMGUARD_SENSOR_WAIT_S"
DEFAULT_INTERVAL_S = 1
DEFAULT_WAIT_S = 4.0
# Between two reads of an idle stream while a tick waits: 2 reads a second per shard, under AWS's
# 5 GetRecords a second per shard (shared by every consumer, the scoring run included).
POLL_S = 0.5
# Well under the daemon's 60 s timeout for one sensor evaluation.
MAX_WAIT_S = 30.0

Positions = dict[str, str | None]


@dataclass(frozen=True)
class SensorSettings:
    """How often the stream sensors tick and how long an idle tick keeps looking for records."""

    interval_s: int = DEFAULT_INTERVAL_S
    wait_s: float = DEFAULT_WAIT_S
    poll_s: float = POLL_S

    def __post_init__(self) -> None:
        if self.interval_s < 1:
            raise ValueError(f"{INTERVAL_ENV} must be a whole number of seconds >= 1")
        if not 0 <= self.wait_s <= MAX_WAIT_S:
            raise ValueError(f"{WAIT_ENV} must be between 0 and {MAX_WAIT_S:g} seconds")
        if self.poll_s <= 0:
            raise ValueError("poll_s must be positive")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> "SensorSettings":
        """The settings the environment names, else the defaults; a bad value fails the load."""
        interval = environ.get(INTERVAL_ENV, "").strip()
        wait = environ.get(WAIT_ENV, "").strip()
        try:
            return cls(
                interval_s=int(interval) if interval else DEFAULT_INTERVAL_S,
                wait_s=float(wait) if wait else DEFAULT_WAIT_S,
            )
        except ValueError as error:
            raise ValueError(f"sensor settings: {error}") from error


NO_WAIT = SensorSettings(wait_s=0.0)


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
    settings: SensorSettings = NO_WAIT,
) -> dg.RunRequest | dg.SkipReason:
    """One run request for what is new past the cursor on `shards`, or why there is none.

    Nothing new: looks again every `settings.poll_s` for up to `settings.wait_s` before skipping,
    so a record that lands between two ticks is requested at once, not at the next tick.
    """
    cursor: Positions = json.loads(context.cursor) if context.cursor else {}
    start = {shard: cursor.get(shard) for shard in shards}
    deadline = time.monotonic() + settings.wait_s
    while True:
        end = latest(start)
        new = {s: seq for s, seq in end.items() if seq is not None and seq != start.get(s)}
        if new or time.monotonic() + settings.poll_s > deadline:
            break
        time.sleep(settings.poll_s)
    if not new:
        waited = f" (looked for {settings.wait_s:g} s)" if settings.wait_s else ""
        return dg.SkipReason(
            f"No new records on {len(shards)} shard(s) of {source} {stream} past the cursor"
            f"{waited}."
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


def kinesis_sensor(settings: SensorSettings) -> dg.SensorDefinition:
    """The Kinesis sensor with `settings`' minimum interval and wait."""

    @dg.sensor(
        name="kinesis_transactions_sensor",
        job=scoring_job,
        minimum_interval_seconds=settings.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Checks every shard for records past the cursor; one scoring run per new "
        f"range (every {settings.interval_s} s at most; an idle tick looks for "
        f"{settings.wait_s:g} s).",
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
            latest=lambda start: latest_positions(
                client, stream, start, kinesis.max_records_per_shard
            ),
            executor=kinesis.executor_name,
            settings=settings,
        )

    return kinesis_transactions_sensor


def kafka_sensor(settings: SensorSettings) -> dg.SensorDefinition:
    """The Kafka sensor with `settings`' minimum interval and wait."""

    @dg.sensor(
        name="kafka_transactions_sensor",
        job=scoring_job,
        minimum_interval_seconds=settings.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Checks every partition of the Kafka topic past the cursor; one run per range.",
    )
    def kafka_transactions_sensor(
        context: dg.SensorEvaluationContext, kafka: KafkaResource
    ) -> dg.RunRequest | dg.SkipReason:
        """Cursor: JSON of the last offset per `topic:partition` that a run was requested for.

        Skips with a reason when no Kafka cluster is configured (STREAMGUARD_KAFKA_BOOTSTRAP,
        or an Event Hubs connection string), so a Kinesis-only deployment shows why it is idle.
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
                latest=lambda start: source.latest_positions(
                    start, kafka.max_records_per_partition
                ),
                executor=kafka.executor_name,
                settings=settings,
            )

    return kafka_transactions_sensor


def files_sensor(settings: SensorSettings) -> dg.SensorDefinition:
    """The transaction files sensor with `settings`' minimum interval (it does not wait)."""

    @dg.sensor(
        name="transaction_files_sensor",
        job=scoring_job,
        minimum_interval_seconds=settings.interval_s,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Requests a scoring run when new transaction files land in the folder.",
    )
    def transaction_files_sensor(
        context: dg.SensorEvaluationContext, files: FilesResource, home: HomeResource
    ) -> dg.RunRequest | dg.SkipReason:
        """Cursor: JSON {path: [size, modification time]} of the files a run was requested for.

        The run itself decides which files are new from the lake's file log, so a file the
        sensor saw twice (a re-evaluated tick) is still scored once.
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

    return transaction_files_sensor


def sensor_defs(settings: SensorSettings) -> dg.Definitions:
    """The three stream sensors built with `settings` (assets/definitions.py: from the
    environment when the code location loads)."""
    return dg.Definitions(
        sensors=[kinesis_sensor(settings), kafka_sensor(settings), files_sensor(settings)]
    )


# Built with the defaults: what a deployment runs when no variable is set (tests call these).
kinesis_transactions_sensor = kinesis_sensor(SensorSettings())
kafka_transactions_sensor = kafka_sensor(SensorSettings())
transaction_files_sensor = files_sensor(SensorSettings())
defs = dg.Definitions(
    sensors=[kinesis_transactions_sensor, kafka_transactions_sensor, transaction_files_sensor]
)
