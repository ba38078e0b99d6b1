"""Continuous scoring in Dagster: one long-running run per stream, watched and stopped from the UI.

`continuous_scoring_job` runs `streamguard.continuous.run_continuous` (the micro-batch runner,
batch after batch) until its run is terminated. Dagster terminates a run by marking it CANCELING
and sending SIGINT to the run worker; the op turns both into a stop request that is honoured
between batches, so the batch in hand is committed first, and the run ends CANCELED. A crash
(an exception, or the run worker killed) fails the run; the `dagster/max_retries` tag with
`run_retries` in the instance (platform/dagster.yaml) starts a new run, which replays the last
planned but uncommitted batch before going on. One sensor per source keeps exactly one such run
per stream (stopped by default: continuous mode is opt-in).
"""

from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from assets.resources import HomeResource, KafkaResource, KinesisResource, MlflowResource
from assets.scoring import alert_sinks
from streamguard.continuous import (
    COMPACT_TARGET_BYTES,
    DEFAULT_COMPACT_EVERY_S,
    DEFAULT_COMPACT_MIN_FILES,
    DEFAULT_MAX_BATCH_RECORDS,
    DEFAULT_REPORT_EVERY_S,
    SMALL_FILE_BYTES,
    ContinuousReport,
    ContinuousSettings,
    StopRequest,
    idle_wait_for,
    run_continuous,
    stop_on_signals,
)
from streamguard.kinesis_tail import DEFAULT_POLL_INTERVAL_S, KinesisTailSource

JOB_NAME = "continuous_scoring_job"
OP_NAME = "continuous_scoring"
SOURCE_TAG = "streamguard/source"
# The tag platform/dagster.yaml limits to one run at a time (all scoring runs share the lake's
# customer and terminal state), and which the sensor finds a stream's run by.
STREAM_TAG = "streamguard/stream"
MODE_TAG = "streamguard/mode"
CONTINUOUS = "continuous"
MAX_RETRIES = 3
SENSOR_INTERVAL_SECONDS = 30
# Run statuses in which a run holds (or is about to hold) its stream.
ACTIVE_STATUSES = [
    dg.DagsterRunStatus.QUEUED,
    dg.DagsterRunStatus.NOT_STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.CANCELING,
]
TERMINATED = "terminated from Dagster"


class ContinuousConfig(dg.Config):
    source: str = Field(
        default="kinesis",
        description="Which stream the worker scores: kinesis (the Kinesis resource's stream) or "
        "kafka (the Kafka resource's topic); the same checkpoint as that stream's micro-batch "
        "runs, so the two modes take over from each other",
    )
    max_batch_records: int = Field(
        default=DEFAULT_MAX_BATCH_RECORDS,
        description="Most records in one batch: a batch takes what arrived since the last one, "
        "up to this (a backlog is worked off in batches this big)",
    )
    poll_interval_s: float = Field(
        default=DEFAULT_POLL_INTERVAL_S,
        description="Seconds between reads of each Kinesis shard (0.2 or more on AWS, whose "
        "shards take 5 reads per second, shared by every consumer), or between polls of an "
        "idle Kafka topic",
    )
    compact_every_s: float = Field(
        default=DEFAULT_COMPACT_EVERY_S,
        description="Every this many seconds, on a thread beside the scoring, compact each of the "
        f"worker's append-only tables with at least {DEFAULT_COMPACT_MIN_FILES} small files (under "
        f"{SMALL_FILE_BYTES // 2**20} MiB) into files of up to {COMPACT_TARGET_BYTES // 2**20} "
        "MiB, the one with the most first, and once enough of those gather, the table to its own "
        "target file size (0: never; the nightly compaction job still runs)",
    )
    report_every_s: float = Field(
        default=DEFAULT_REPORT_EVERY_S, description="Seconds between progress lines in the run log"
    )
    check_terminated_every_s: float = Field(
        default=2.0,
        description="Seconds between looks at the run's status, in case termination reaches the "
        "run worker as a status change only (SIGINT is noticed at once)",
    )

    @field_validator("source")
    @classmethod
    def _stream_source(cls, value: str) -> str:
        if value not in ("kinesis", "kafka"):
            raise ValueError(f"source must be kinesis or kafka, got {value!r}")
        return value

    def settings(self) -> ContinuousSettings:
        """The loop's settings for this source."""
        return ContinuousSettings(
            idle_wait_s=idle_wait_for(self.source, self.poll_interval_s),
            compact_every_s=self.compact_every_s,
            report_every_s=self.report_every_s,
            check_every_s=self.check_terminated_every_s,
        )


def stream_tags(source: str, stream: str) -> dict[str, str]:
    """The tags that name a stream's continuous run (the sensor finds runs by them)."""
    return {SOURCE_TAG: source, STREAM_TAG: stream, MODE_TAG: CONTINUOUS}


@dg.op(
    name=OP_NAME,
    description="Scores a stream as records arrive, batch after batch, until the run is "
    "terminated; exactly once, like every scoring run.",
)
def continuous_scoring(
    context: dg.OpExecutionContext,
    config: ContinuousConfig,
    home: HomeResource,
    kinesis: KinesisResource,
    kafka: KafkaResource,
    mlflow: MlflowResource,
) -> None:
    """Never returns on its own: it ends when the run is terminated (CANCELED) or crashes."""
    from streamguard.pipeline import scoring_job_name, scoring_runner

    lake = home.lake()
    source: Any
    if config.source == "kafka":
        from streamguard.kafka import KafkaSource

        if not kafka.enabled:
            raise dg.Failure("source kafka, but no Kafka cluster is configured")
        source, stream = KafkaSource(kafka.config(), kafka.topic), kafka.topic
    elif config.source == "kinesis":
        stream = kinesis.stream_name
        source = KinesisTailSource(kinesis.client(), stream, poll_interval_s=config.poll_interval_s)
    else:  # the config's validator allows no other
        raise dg.Failure(f"source must be kinesis or kafka, got {config.source!r}")
    job = scoring_job_name(config.source, stream)
    # Launched from the launchpad, the run may lack the stream's tags: add them, so the sensor
    # sees this run and starts no second one.
    missing = {
        k: v for k, v in stream_tags(config.source, stream).items() if context.run.tags.get(k) != v
    }
    if missing:
        context.instance.add_run_tags(context.run_id, missing)

    def terminated() -> str | None:
        run = context.instance.get_run_by_id(context.run_id)
        if run is not None and run.status in (
            dg.DagsterRunStatus.CANCELING,
            dg.DagsterRunStatus.CANCELED,
        ):
            return TERMINATED
        return None

    def progress(report: ContinuousReport) -> None:
        context.log.info(report.summary())

    stop = StopRequest()
    try:
        with alert_sinks(kafka, job) as sinks, stop_on_signals(stop):
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
            context.log.info(f"{job}: continuous scoring of {config.source} {stream}")
            report = run_continuous(
                runner,
                stop,
                config.settings(),
                on_report=progress,
                should_stop=terminated,
            )
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()
    context.log.info(f"stopped ({report.stop_reason}): {report.summary()}")
    # A continuous run has no successful end: stopped on request it ends as interrupted, which
    # Dagster records as CANCELED when the run was terminated from the UI, and as a failure
    # (retried) when the worker was stopped by anything else, e.g. its container's SIGTERM.
    raise dg.DagsterExecutionInterruptedError(f"stopped between batches: {report.stop_reason}")


@dg.job(
    name=JOB_NAME,
    description="Long-running, low-latency scoring of one stream (Kinesis or Kafka): polls in "
    "small batches until terminated from the UI. Started and kept running by the "
    "continuous_*_sensor of its source; restarted after a crash by run retries.",
    executor_def=dg.in_process_executor,
    tags={
        MODE_TAG: CONTINUOUS,
        # Holds the lake's scoring slot (see platform/dagster.yaml) even when launched by hand;
        # the sensor's run request sets the stream's name here.
        STREAM_TAG: CONTINUOUS,
        "dagster/max_retries": str(MAX_RETRIES),
    },
)
def continuous_scoring_job() -> None:
    continuous_scoring()


def active_run(instance: dg.DagsterInstance, tags: dict[str, str]) -> dg.RunRecord | None:
    """The continuous run holding these tags' stream, if any (queued, starting, started or
    canceling)."""
    records = instance.get_run_records(
        dg.RunsFilter(job_name=JOB_NAME, tags=tags, statuses=ACTIVE_STATUSES), limit=1
    )
    return records[0] if records else None


def keep_one_running(
    context: dg.SensorEvaluationContext, source: str, stream: str
) -> dg.RunRequest | dg.SkipReason:
    """A run request when no continuous run of the stream is active, else why not."""
    tags = stream_tags(source, stream)
    running = active_run(context.instance, tags)
    if running is not None:
        run = running.dagster_run
        return dg.SkipReason(
            f"Continuous scoring of {source} {stream} is already {run.status.value.lower()}: "
            f"run {run.run_id}."
        )
    last = context.instance.get_run_records(dg.RunsFilter(job_name=JOB_NAME, tags=tags), limit=1)
    if last:
        run = last[0].dagster_run
        will_retry = run.tags.get("dagster/will_retry") == "true"
        if (
            run.status == dg.DagsterRunStatus.FAILURE
            and will_retry
            and "dagster/auto_retry_run_id" not in run.tags
        ):
            return dg.SkipReason(
                f"Run {run.run_id} of {source} {stream} failed; Dagster's run retries start "
                "the next one."
            )
    return dg.RunRequest(
        run_config=dg.RunConfig(ops={OP_NAME: ContinuousConfig(source=source)}), tags=tags
    )


@dg.sensor(
    name="continuous_kinesis_sensor",
    job=continuous_scoring_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Keeps exactly one continuous scoring run of the Kinesis stream running. Off by "
    "default; to stop continuous scoring, stop this sensor, then terminate the run.",
)
def continuous_kinesis_sensor(
    context: dg.SensorEvaluationContext, kinesis: KinesisResource
) -> dg.RunRequest | dg.SkipReason:
    """Requests a run when none of the stream's is active; never a second one."""
    return keep_one_running(context, "kinesis", kinesis.stream_name)


@dg.sensor(
    name="continuous_kafka_sensor",
    job=continuous_scoring_job,
    minimum_interval_seconds=SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="Keeps exactly one continuous scoring run of the Kafka topic running. Off by "
    "default; to stop continuous scoring, stop this sensor, then terminate the run.",
)
def continuous_kafka_sensor(
    context: dg.SensorEvaluationContext, kafka: KafkaResource
) -> dg.RunRequest | dg.SkipReason:
    """Like the Kinesis one, for the Kafka resource's topic; skips when none is configured."""
    if not kafka.enabled:
        return dg.SkipReason(
            "No Kafka cluster configured: set STREAMGUARD_KAFKA_BOOTSTRAP to score a topic."
        )
    return keep_one_running(context, "kafka", kafka.topic)


def holder_of_the_scoring_slot(context: dg.SensorEvaluationContext) -> str | None:
    """Why a micro-batch sensor should request nothing now: a continuous run is active, and it
    holds the lake's one scoring slot until it stops (runs requested meanwhile would only queue
    behind it). None when there is none, or no instance to ask (a sensor built in a test)."""
    try:
        instance = context.instance
    except dg.DagsterInvariantViolationError:
        return None
    running = active_run(instance, {MODE_TAG: CONTINUOUS})
    if running is None:
        return None
    run = running.dagster_run
    return (
        f"Continuous scoring run {run.run_id} ({run.tags.get(SOURCE_TAG, '?')} "
        f"{run.tags.get(STREAM_TAG, '?')}) holds the lake's scoring slot; micro-batch runs "
        "resume from the checkpoint when it stops."
    )


defs = dg.Definitions(
    jobs=[continuous_scoring_job], sensors=[continuous_kinesis_sensor, continuous_kafka_sensor]
)
