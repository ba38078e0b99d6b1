"""A Kafka streaming source for Spark, written with the Python Data Source API.

Spark cannot fetch its Kafka connector jar here, so the source is Python on top of the project's
`streamguard.kafka.KafkaSource` (confluent-kafka, `read_committed`), the reader the in-process
runner uses: on the driver to plan micro-batches, on the executors to read them. It follows
`kinesis_source` and shares its pieces: an offset is a JSON object of per-partition offsets,
`{"topic:partition": last offset included (20-digit zero-padded) or null: nothing read yet}`.
Every micro-batch is an exact `(after, until]` offset range per partition that Spark writes to its
offset log before running the batch, so a batch replayed after a crash reads the same records,
and a restarted query resumes where its checkpoint says.

    register_kafka_source(spark)
    frame = (
        spark.readStream.format("streamguard-kafka")
        .option("bootstrap", "b-1.msk.example:9096")
        .option("topic", "transactions")
        .option("maxRecordsPerPartition", "10000")  # records per partition and micro-batch
        .option("startingOffsets", "earliest")  # or latest, or {"topic:partition": offset}
        .option("endingOffsets", '{"transactions:0": "00000000000000004711"}')  # optional
        .option("clientConfig", '{"security.protocol": "SASL_SSL", '
                '"sasl.mechanism": "SCRAM-SHA-512", "sasl.username": "scorer"}')
        .option("secretsFromEnv", '{"sasl.password": "STREAMGUARD_KAFKA_PASSWORD"}')
        .load()
    )

Columns: those of the Kinesis source (`shard_id` = "topic:partition", `sequence_number` = the
offset, `partition_key` = the record key, `data`, `arrival_time` = the record timestamp).
Records of aborted or still open transactions are never returned (`read_committed`; an open
transaction holds back later records until it ends). Partitions added to the topic are read
from their start.

`endingOffsets` bounds a `trigger(availableNow=True)` run to exact per-partition ends (inclusive;
a partition not named is read to its end, a null or "" value leaves it for a later run): the
Dagster sensor's batch bounds, so a sensor-launched Spark run scores the same range as an
in-process run would, and what arrives meanwhile is the next range's.

Credentials never go into options: Spark shows options in query plans, logs and its UI.
`clientConfig` therefore refuses credential keys; `secretsFromEnv` maps librdkafka keys to
environment variables that every process building a client (the driver and each executor)
reads, so set them in the executors' environment too (a secret store, a pod's env, or
`spark.executorEnv.<VAR>`, which Spark redacts when the name matches `spark.redaction.regex`).
`mskIamRegion` makes it Amazon MSK with IAM: each process signs its own tokens
(`aws-msk-iam-sasl-signer-python`) from its AWS credential chain.
Azure Event Hubs: `clientConfig` `{"security.protocol": "SASL_SSL", "sasl.mechanism": "PLAIN",
"sasl.username": "$ConnectionString"}` with `sasl.password` from the variable holding the
connection string; Confluent Cloud the same with the API key as username.

After each micro-batch Spark calls `commit`, which commits the consumer group's offsets
(`groupId`, default `streamguard-<topic>`, the runner's) so that lag tools show progress; like
the runner's, they are never read back as the position, and a refused commit is only logged.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyspark.sql import SparkSession
from pyspark.sql.datasource import DataSource, DataSourceStreamReader, InputPartition
from pyspark.sql.streaming.datasource import ReadLimit, ReadMaxRows, SupportsTriggerAvailableNow
from pyspark.sql.types import StructType

from streamguard.kafka import (
    KAFKA_ENV,
    SECRET_KEYS,
    ClientConfig,
    KafkaRetentionGap,
    KafkaSettings,
    KafkaSource,
    client_config,
    msk_iam_token_callback,
    sequence_number,
)
from streamguard.spark.kinesis_source import (
    READ_CHUNK,
    SCHEMA,
    Offset,
    ShardRange,
    bounded_offsets,
    parse_positions,
    records_batch,
    register_source,
)

if TYPE_CHECKING:
    import pyarrow as pa
    from pyspark.sql import DataFrame

FORMAT = "streamguard-kafka"  # Spark's own connector has the short name "kafka"
EARLIEST = "earliest"
LATEST = "latest"
DEFAULT_MAX_RECORDS_PER_PARTITION = 10_000
TAIL_WINDOW = 64  # offsets read back from a partition's end to find its last record (grows)

JsonScalar = str | int | float | bool


@dataclass(frozen=True)
class KafkaSourceOptions:
    """The source's options, validated once on the driver; executors get them pickled."""

    bootstrap: str
    topic: str
    client_config: Mapping[str, JsonScalar] = field(default_factory=dict)
    secrets_from_env: Mapping[str, str] = field(default_factory=dict)  # librdkafka key -> VAR
    msk_iam_region: str | None = None
    group_id: str | None = None  # None: KafkaSource's default, streamguard-<topic>
    max_records_per_partition: int = DEFAULT_MAX_RECORDS_PER_PARTITION
    # earliest, latest, or {"topic:partition": last offset already processed or null}
    starting_offsets: str | Offset = EARLIEST
    # availableNow stops here: {"topic:partition": last offset to include}; a partition not
    # named is read to its end, a null or "" value leaves it for a later run.
    ending_offsets: Offset | None = None

    @classmethod
    def parse(cls, options: Mapping[str, str]) -> KafkaSourceOptions:
        """From `.option(...)` values (Spark hands them over case-insensitively)."""
        bootstrap, topic = options.get("bootstrap"), options.get("topic")
        if not bootstrap or not topic:
            raise ValueError(f"the {FORMAT} source needs options bootstrap and topic")
        raw_max = options.get("maxRecordsPerPartition") or str(DEFAULT_MAX_RECORDS_PER_PARTITION)
        try:
            max_records = int(raw_max)
        except ValueError:
            raise ValueError(
                f"maxRecordsPerPartition must be an integer, got {raw_max!r}"
            ) from None
        if max_records < 1:
            raise ValueError(f"maxRecordsPerPartition must be at least 1, got {max_records}")
        starting: str | Offset = (options.get("startingOffsets") or EARLIEST).strip()
        if str(starting).lower() in (EARLIEST, LATEST):
            starting = str(starting).lower()
        else:
            starting = _offsets(str(starting), "startingOffsets", topic)
        ending = options.get("endingOffsets")
        return cls(
            bootstrap=bootstrap,
            topic=topic,
            client_config=_client_settings(options.get("clientConfig")),
            secrets_from_env=_secret_variables(options.get("secretsFromEnv")),
            msk_iam_region=options.get("mskIamRegion") or None,
            group_id=options.get("groupId") or None,
            max_records_per_partition=max_records,
            starting_offsets=starting,
            ending_offsets=_offsets(ending, "endingOffsets", topic) if ending else None,
        )

    def config(self) -> ClientConfig:
        """The librdkafka config, built in the process that uses it: secrets come from this
        process's environment, and the MSK IAM token callback (not picklable) is made here."""
        config = client_config(KafkaSettings(self.bootstrap))
        config.update(self.client_config)
        for key, variable in sorted(self.secrets_from_env.items()):
            value = os.environ.get(variable)
            if not value:
                raise ValueError(
                    f"Kafka client setting {key} comes from environment variable {variable}, "
                    f"which is not set on host {socket.gethostname()} (set it on the driver "
                    "and every executor)"
                )
            config[key] = value
        if self.msk_iam_region:
            config["security.protocol"] = "SASL_SSL"
            config["sasl.mechanism"] = "OAUTHBEARER"
            config["oauth_cb"] = msk_iam_token_callback(self.msk_iam_region)
        return config

    def open(self) -> KafkaSource:
        """A reader of the topic (one consumer; close it, or use it as a context manager)."""
        return KafkaSource(self.config(), self.topic, self.group_id)


def _json_object(text: str | None, option: str) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise ValueError(f"{option} must be a JSON object, got {text[:80]!r}")
    return value


def _client_settings(text: str | None) -> dict[str, JsonScalar]:
    """clientConfig: non-secret librdkafka settings (a credential here would be shown in plans)."""
    settings = _json_object(text, "clientConfig")
    for key, value in settings.items():
        if key in SECRET_KEYS or "secret" in key or "password" in key:
            raise ValueError(
                f"clientConfig must not hold the credential {key!r}: options are shown in query "
                "plans and logs; name an environment variable for it in secretsFromEnv"
            )
        if key == "bootstrap.servers":
            raise ValueError("clientConfig must not set bootstrap.servers: use option bootstrap")
        if isinstance(value, dict | list) or value is None:
            raise ValueError(f"clientConfig {key!r} must be a string, number or boolean")
    return settings


def _secret_variables(text: str | None) -> dict[str, str]:
    """secretsFromEnv: {librdkafka key: environment variable name}."""
    variables = _json_object(text, "secretsFromEnv")
    if not all(isinstance(v, str) and v for v in variables.values()):
        raise ValueError("secretsFromEnv must map librdkafka keys to environment variable names")
    return variables


def _offsets(text: str, option: str, topic: str) -> Offset:
    """startingOffsets / endingOffsets as JSON: {"topic:partition": offset, "" or null}, every
    key a partition of `topic`, offsets normalised to 20-digit sequence numbers."""
    allowed = "earliest, latest or " if option == "startingOffsets" else ""
    try:
        given = parse_positions(text, option)
    except ValueError:
        raise ValueError(
            f'{option} must be {allowed}a JSON object of {{"{topic}:<partition>": offset string, '
            f'"" or null}}, got {text[:80]!r}'
        ) from None
    normalised: Offset = {}
    for shard, value in given.items():
        name, _, partition = shard.rpartition(":")
        if name != topic or not partition.isdigit():
            raise ValueError(f"{option}: {shard!r} is not a partition of topic {topic!r}")
        if value and not value.isdigit():
            raise ValueError(f"{option}: the offset of {shard} must be digits, got {value!r}")
        normalised[shard] = sequence_number(int(value)) if value else value
    return normalised


class KafkaStreamReader(DataSourceStreamReader, SupportsTriggerAvailableNow):
    """Plans exact per-partition ranges on the driver; executors read them with `KafkaSource`.

    A batch ends at a record (never at a transaction marker or an aborted record), so a batch
    holds at least one record and counts records as the in-process runner does: with the same
    per-partition cap, both cut a topic into the same batches.
    """

    def __init__(self, options: KafkaSourceOptions) -> None:
        self.options = options
        self._source: KafkaSource | None = None
        self._target: Offset | None = None  # the availableNow end, once known
        self._target_pending = False

    def __getstate__(self) -> dict[str, Any]:
        """Executors get the options only: a consumer does not pickle."""
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    @property
    def source(self) -> KafkaSource:
        if self._source is None:
            self._source = self.options.open()
        return self._source

    # ------------------------------------------------------------------ driver

    def initialOffset(self) -> dict[str, Any]:
        """Where a new query starts (a restarted one starts at its checkpoint instead)."""
        shards = self.source.shards()
        start = self.options.starting_offsets
        if start == EARLIEST:
            return {s: None for s in shards}
        if start == LATEST:
            return {s: self._end(s) for s in shards}
        assert isinstance(start, dict)
        return {s: start.get(s) or None for s in shards}

    def _end(self, shard: str) -> str | None:
        """The partition's end of committed data, as the last offset included."""
        _, high = self.source.watermarks(_partition(shard))
        return sequence_number(high - 1) if high > 0 else None

    def getDefaultReadLimit(self) -> ReadLimit:
        """maxRecordsPerPartition, carried as ReadMaxRows; its rows are per partition."""
        return ReadMaxRows(self.options.max_records_per_partition)

    def prepareForTriggerAvailableNow(self) -> None:
        """Fix the end of an availableNow run at the first `latestOffset`, which knows the start."""
        self._target_pending = True

    def latestOffset(self, start: dict[str, Any], limit: ReadLimit) -> dict[str, Any]:
        """The next batch's end: each partition's records past `start`, at most the limit.

        Under availableNow the first call finds every partition's last committed record (or
        the `endingOffsets` bound) once, as the run's target; later batches never go past it,
        so the run ends even while producers keep writing.
        """
        cap = limit.max_rows if isinstance(limit, ReadMaxRows) else None
        if self._target_pending:
            self._target_pending = False
            ends, widest = self._advance(start, None, None)
            ending = self.options.ending_offsets
            if ending is not None:  # may end at a marker: the step below ends at a record
                self._target = bounded_offsets(start, ends, ending)
            else:
                self._target = ends
                if cap is None or widest <= cap:
                    return dict(ends)  # the first batch is the whole run: no second look
        return self._advance(start, cap, self._target)[0]

    def _advance(
        self, start: Mapping[str, str | None], cap: int | None, bound: Offset | None
    ) -> tuple[Offset, int]:
        """(the end offset of one step from `start`, the most offsets a partition moved).

        A partition listed for the first time joins at its start, once it has a record; one
        listed after an availableNow target was fixed waits for the next run.
        """
        listed = self.source.shards()
        end: Offset = {k: v for k, v in start.items() if k not in listed}
        widest = 0
        for sid in listed:
            after = start.get(sid)
            until: str | None = None
            if bound is not None:
                until = bound.get(sid)
                if until is None or (after is not None and int(until) <= int(after)):
                    if sid in start:
                        end[sid] = after  # not in the target, or nothing left up to it
                    continue
            last, span = self._last(sid, after, until, cap)
            if sid in start or last is not None:
                end[sid] = last
            widest = max(widest, span)
        return dict(sorted(end.items())), widest

    def _last(
        self, shard: str, after: str | None, until: str | None, cap: int | None
    ) -> tuple[str | None, int]:
        """(offset of the last record in (after, until], at most `cap` records on; the offsets
        that range spans). Finding it reads records only from the range's tail, unless the cap
        cuts the range: then the first `cap` records are read (and counted) in chunks."""
        partition = _partition(shard)
        low, high = self.source.watermarks(partition)
        after_n = low - 1 if after is None else int(after)
        if after is not None and low > after_n + 1:
            raise KafkaRetentionGap(self.options.topic, partition, after_n, low)
        if high - 1 < after_n:
            raise RuntimeError(
                f"Kafka topic {self.options.topic!r} partition {partition} ends at offset "
                f"{high - 1}, before the position {after_n}: was the topic deleted and created "
                "again, or startingOffsets past its end? Use a new checkpoint deliberately."
            )
        top = high - 1 if until is None else min(int(until), high - 1)
        span = top - after_n
        if span <= 0:
            return after, 0
        if cap is not None and span > cap:
            return self._scan(shard, after, sequence_number(top), cap), span
        window = TAIL_WINDOW
        while True:
            lo = max(after_n, top - window)
            since = after if lo == after_n else sequence_number(lo)
            records = self.source.read(shard, since, sequence_number(top), top - lo)
            if records:
                return records[-1].sequence_number, span
            if lo == after_n:
                return after, span  # only transaction markers or aborted records
            window *= 8

    def _scan(self, shard: str, after: str | None, until: str, cap: int) -> str | None:
        """The offset of the `cap`-th record after `after` (or of the last one up to `until`)."""
        last, count = after, 0
        while count < cap:
            want = min(READ_CHUNK, cap - count)
            records = self.source.read(shard, last, until, want)
            if records:
                last, count = records[-1].sequence_number, count + len(records)
            if len(records) < want:
                break
        return last

    def partitions(self, start: dict[str, Any], end: dict[str, Any]) -> Sequence[InputPartition]:
        """One task per partition that moved between the two offsets."""
        return [
            ShardRange(sid, start.get(sid), until)
            for sid, until in sorted(end.items())
            if until is not None and until != start.get(sid)
        ]

    def commit(self, end: dict[str, Any]) -> None:
        """The batch is done: move the consumer group's offsets there for lag tools (best
        effort, never read back; Spark's checkpoint is the position)."""
        self.source.acknowledge(end)

    def stop(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    # ------------------------------------------------------------------ executors

    def read(self, partition: InputPartition) -> Iterator[pa.RecordBatch]:
        """The range's records in order, in Arrow batches of at most READ_CHUNK rows."""
        assert isinstance(partition, ShardRange)
        shard, after, until = partition.shard_id, partition.after, partition.until
        with self.options.open() as source:
            while after is None or int(after) < int(until):
                records = source.read(shard, after, until, READ_CHUNK)
                if records:
                    yield records_batch(records)
                    after = records[-1].sequence_number
                    continue
                # Nothing readable left: the offsets up to `until` are transaction markers or
                # aborted records, unless the partition no longer reaches `until` at all.
                _, high = source.watermarks(_partition(shard))
                if high - 1 < int(until):
                    raise RuntimeError(
                        f"Kafka {shard} ends at offset {high - 1}, before the planned "
                        f"{int(until)}: not the cluster or topic the batch was planned on"
                    )
                return


def _partition(shard: str) -> int:
    return int(shard.rpartition(":")[2])


class KafkaDataSource(DataSource):
    """`spark.readStream.format("streamguard-kafka")`: options in the module docstring."""

    @classmethod
    def name(cls) -> str:
        return FORMAT

    def schema(self) -> str:
        return SCHEMA

    def streamReader(self, schema: StructType) -> DataSourceStreamReader:
        return KafkaStreamReader(KafkaSourceOptions.parse(self.options))


def register_kafka_source(spark: SparkSession) -> None:
    """Make `format("streamguard-kafka")` available in this session (idempotent)."""
    register_source(spark, KafkaDataSource)


def kafka_records(
    spark: SparkSession,
    bootstrap: str,
    topic: str,
    *,
    client_config: Mapping[str, JsonScalar] | None = None,
    max_records_per_partition: int = DEFAULT_MAX_RECORDS_PER_PARTITION,
    until: Mapping[str, str | None] | None = None,
    secrets_from_env: Mapping[str, str] | None = None,
    msk_iam_region: str | None = None,
    group_id: str | None = None,
) -> DataFrame:
    """The Kafka topic as stream records (`RECORD_COLUMNS`), the fraud job's Spark input.

    `until`: inclusive per-partition ends for an availableNow run (the sensor's batch bounds;
    partitions not named are read to their end, an empty value skips the partition).
    `client_config`: non-secret librdkafka settings; credentials go in `secrets_from_env`
    ({librdkafka key: environment variable}), read on the driver and every executor.
    """
    from streamguard.spark.fraud import RECORD_COLUMNS  # not at import: executors load us

    options = {
        "bootstrap": bootstrap,
        "topic": topic,
        "maxRecordsPerPartition": str(max_records_per_partition),
    }
    if client_config:
        try:
            options["clientConfig"] = json.dumps(dict(client_config))
        except TypeError:
            raise ValueError(
                "client_config must hold JSON values only (no callbacks: for MSK IAM pass "
                "msk_iam_region)"
            ) from None
    if secrets_from_env:
        options["secretsFromEnv"] = json.dumps(dict(secrets_from_env))
    if msk_iam_region:
        options["mskIamRegion"] = msk_iam_region
    if group_id:
        options["groupId"] = group_id
    if until:
        options["endingOffsets"] = json.dumps(dict(until))
    KafkaSourceOptions.parse(options)  # a mistake fails here, not in a Python worker
    register_kafka_source(spark)
    frame = spark.readStream.format(FORMAT).options(**options).load()
    return frame.select(*RECORD_COLUMNS)


# Which environment variable holds `sasl.password` in each security mode (`KAFKA_ENV` names).
_PASSWORD_FIELD = {
    "scram": "password",
    "event_hubs": "connection_string",
    "confluent_cloud": "api_secret",
}


def settings_records(
    spark: SparkSession,
    settings: KafkaSettings,
    topic: str,
    *,
    max_records_per_partition: int = DEFAULT_MAX_RECORDS_PER_PARTITION,
    until: Mapping[str, str | None] | None = None,
) -> DataFrame:
    """`kafka_records` for a cluster described by `KafkaSettings` (the CLI's and Dagster's):
    non-secret settings as options, the password named by its variable (`KAFKA_ENV`), MSK IAM
    by region, so the same variables configure the driver and the executors."""
    config = client_config(settings)
    plain = {
        key: value
        for key, value in config.items()
        if key not in SECRET_KEYS and key not in ("bootstrap.servers", "oauth_cb")
    }
    secrets = {}
    if settings.security in _PASSWORD_FIELD:
        secrets["sasl.password"] = KAFKA_ENV[_PASSWORD_FIELD[settings.security]]
    return kafka_records(
        spark,
        str(config["bootstrap.servers"]),
        topic,
        client_config=plain,
        max_records_per_partition=max_records_per_partition,
        until=until,
        secrets_from_env=secrets or None,
        msk_iam_region=settings.region if settings.security == "msk_iam" else None,
    )
