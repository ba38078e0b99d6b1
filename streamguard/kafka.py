"""Kafka access for the producer, the sensor and the scoring runs (confluent-kafka / librdkafka).

The same code talks to a self-managed cluster, Amazon MSK (SCRAM or IAM), Azure Event Hubs
(its Kafka endpoint), Confluent Cloud, or the local noida-db broker: `KafkaSettings` is the only
difference. Reads are by exact offset range per partition, with `read_committed`, so a batch
read again after a crash returns the same records, which is what makes the downstream writes
exactly-once. Consumer-group offsets are committed only so that lag tools see progress; they
are never read back as the position (the lake's checkpoints are).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Self, cast

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from streamguard.kinesis import StreamRecord, transaction_records

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
LIBRDKAFKA_LOG = logging.getLogger(f"{__name__}.librdkafka")

Security = Literal["plain", "scram", "msk_iam", "event_hubs", "confluent_cloud"]
ScramMechanism = Literal["SCRAM-SHA-512", "SCRAM-SHA-256"]

SEQ_DIGITS = 20  # offsets as zero-padded strings: string order == numeric order
EVENT_HUBS_PORT = 9093
EVENT_HUBS_USERNAME = "$ConnectionString"
MASK = "***"

# librdkafka keys whose values are credentials: masked wherever a config is shown.
SECRET_KEYS = frozenset(
    {
        "sasl.password",
        "sasl.oauthbearer.client.secret",
        "sasl.oauthbearer.config",
        "ssl.key.password",
        "ssl.key.pem",
        "ssl.keystore.password",
    }
)

# Azure closes connections idle for 240 s: stay under it (Microsoft's recommended client config).
EVENT_HUBS_TUNING: dict[str, Any] = {
    "socket.keepalive.enable": True,
    "metadata.max.age.ms": 180_000,
    "connections.max.idle.ms": 180_000,
    "request.timeout.ms": 60_000,
}

# What every KafkaSource consumer is, whatever the cluster: committed data only, positions
# chosen by us (never by the group or a reset policy), and an error, not a silent jump, when
# an offset is gone.
SOURCE_CONSUMER: dict[str, Any] = {
    "isolation.level": "read_committed",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "error",
    "enable.partition.eof": True,  # how a read learns that only markers were left
    # A read never waits for new data, but a fetch at a partition's end waits this long on
    # brokers that honour it (Apache Kafka, MSK, tansu: ~1 s per partition switch at the
    # default 500 ms, measured on tansu); the runner reads up to a known end, so keep it short.
    "fetch.wait.max.ms": 10,
}

# Exactly one copy per record, in order per key, on every cluster that has idempotence.
PRODUCER: dict[str, Any] = {
    "enable.idempotence": True,
    "acks": "all",
    "linger.ms": 5,
    "delivery.report.only.error": True,  # success is counted, not called back per record
}

READ_CHUNK = 10_000  # messages per consume() call
READ_WAIT_S = 0.05  # one blocking wait for the next fetch, then the position is checked again
ADMIN_TIMEOUT_S = 30.0

# Consumer events librdkafka recovers from on its own (a read waits, up to its timeout).
TRANSIENT_ERRORS = frozenset(
    {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._TIMED_OUT}
)


# --------------------------------------------------------------------------- settings


class ClientConfig(dict[str, Any]):
    """A librdkafka config (a plain dict to the client) whose repr masks the credentials."""

    def __repr__(self) -> str:
        shown = {k: (MASK if k in SECRET_KEYS and v else v) for k, v in self.items()}
        return f"ClientConfig({shown!r})"

    __str__ = __repr__


@dataclass(frozen=True, repr=False)
class KafkaSettings:
    """Where the cluster is and how to authenticate; `client_config` turns it into librdkafka's.

    Per `security`:
    - `plain`: `bootstrap` only (self-managed without auth, the local broker);
    - `scram`: `bootstrap`, `username`, `password`, `scram_mechanism` (MSK SCRAM: SHA-512);
    - `msk_iam`: `bootstrap` (port 9098), `region`; AWS credentials from the usual chain;
    - `event_hubs`: `connection_string` of the namespace (`bootstrap` defaults to its host:9093);
    - `confluent_cloud`: `bootstrap`, `api_key`, `api_secret`.
    The secrets (`password`, `connection_string`, `api_secret`) never appear in repr or str.
    """

    bootstrap: str = ""
    security: Security = "plain"
    username: str | None = None
    password: str | None = None
    scram_mechanism: ScramMechanism = "SCRAM-SHA-512"
    region: str | None = None
    connection_string: str | None = None
    api_key: str | None = None
    api_secret: str | None = None
    client_id: str = "streamguard"

    SECRETS: ClassVar[frozenset[str]] = frozenset({"password", "connection_string", "api_secret"})
    REQUIRED: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "plain": ("bootstrap",),
        "scram": ("bootstrap", "username", "password"),
        "msk_iam": ("bootstrap", "region"),
        "event_hubs": ("connection_string",),
        "confluent_cloud": ("bootstrap", "api_key", "api_secret"),
    }

    def __post_init__(self) -> None:
        if self.security not in self.REQUIRED:
            raise ValueError(
                f"security must be one of {', '.join(self.REQUIRED)}, got {self.security!r}"
            )
        if self.scram_mechanism not in ("SCRAM-SHA-512", "SCRAM-SHA-256"):
            raise ValueError("scram_mechanism must be SCRAM-SHA-512 or SCRAM-SHA-256")
        missing = [name for name in self.REQUIRED[self.security] if not getattr(self, name)]
        if missing:
            raise ValueError(f"Kafka security {self.security!r} needs {', '.join(missing)}")
        if self.security == "event_hubs":
            event_hubs_bootstrap(self.connection_string or "")  # fails early, without echoing it

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={MASK!r}"
            if f.name in self.SECRETS and getattr(self, f.name)
            else f"{f.name}={getattr(self, f.name)!r}"
            for f in fields(self)
        )
        return f"KafkaSettings({shown})"

    __str__ = __repr__


# Where each security setting comes from in the environment: the CLI, the Dagster deployment
# (`assets.resources.SETTINGS`) and the Spark source read the same names, so one set of variables
# configures a cluster everywhere, and secrets stay off command lines and run config.
KAFKA_ENV: dict[str, str] = {
    "security": "STREAMGUARD_KAFKA_SECURITY",
    "username": "STREAMGUARD_KAFKA_USERNAME",
    "password": "STREAMGUARD_KAFKA_PASSWORD",
    "scram_mechanism": "STREAMGUARD_KAFKA_SCRAM_MECHANISM",
    "region": "AWS_REGION",
    "connection_string": "STREAMGUARD_EVENT_HUBS_CONNECTION_STRING",
    "api_key": "STREAMGUARD_KAFKA_API_KEY",
    "api_secret": "STREAMGUARD_KAFKA_API_SECRET",
}


def settings_from_env(bootstrap: str, environ: Mapping[str, str] | None = None) -> KafkaSettings:
    """`KafkaSettings` for `bootstrap` with the security settings of the environment (plain when
    none), read when called. An incomplete setting names the variables, never their values."""
    env = os.environ if environ is None else environ
    given: dict[str, Any] = {field: env[var] for field, var in KAFKA_ENV.items() if env.get(var)}
    try:
        return KafkaSettings(bootstrap=bootstrap, **given)
    except ValueError as exc:  # its messages name fields, never their values
        named = [var for field, var in KAFKA_ENV.items() if field in str(exc)]
        raise ValueError(f"{exc} (from {', '.join(named)})" if named else str(exc)) from None


def event_hubs_bootstrap(connection_string: str) -> str:
    """`<namespace>.servicebus.windows.net:9093` from a namespace connection string."""
    match = re.search(r"(?:^|;)\s*Endpoint\s*=\s*sb://([^/;\s]+)", connection_string, re.I)
    if match is None:
        raise ValueError(
            "the Event Hubs connection string has no `Endpoint=sb://<namespace>...` part "
            "(copy the namespace's connection string from its Shared access policies)"
        )
    return f"{match.group(1)}:{EVENT_HUBS_PORT}"


def msk_iam_token_callback(region: str) -> Callable[[str], tuple[str, float]]:
    """librdkafka's `oauth_cb` for MSK IAM: a SigV4-signed token from the default AWS credential
    chain, and its expiry in seconds since the epoch (librdkafka refreshes it before then)."""

    def oauth_cb(_config: str) -> tuple[str, float]:
        from aws_msk_iam_sasl_signer import MSKAuthTokenProvider

        token, expiry_ms = MSKAuthTokenProvider.generate_auth_token(region)
        return str(token), int(expiry_ms) / 1000.0

    return oauth_cb


def client_config(settings: KafkaSettings) -> ClientConfig:
    """The librdkafka config for a producer, consumer or admin client of this cluster."""
    config = ClientConfig(
        {"bootstrap.servers": settings.bootstrap, "client.id": settings.client_id}
    )
    match settings.security:
        case "plain":
            config["security.protocol"] = "PLAINTEXT"
        case "scram":
            config.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": settings.scram_mechanism,
                    "sasl.username": settings.username,
                    "sasl.password": settings.password,
                }
            )
        case "msk_iam":
            config.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "OAUTHBEARER",
                    "oauth_cb": msk_iam_token_callback(settings.region or ""),
                }
            )
        case "event_hubs":
            connection = settings.connection_string or ""
            config.update(
                {
                    "bootstrap.servers": settings.bootstrap or event_hubs_bootstrap(connection),
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "PLAIN",
                    "sasl.username": EVENT_HUBS_USERNAME,
                    "sasl.password": connection,
                    **EVENT_HUBS_TUNING,
                }
            )
        case "confluent_cloud":
            config.update(
                {
                    "security.protocol": "SASL_SSL",
                    "sasl.mechanism": "PLAIN",
                    "sasl.username": settings.api_key,
                    "sasl.password": settings.api_secret,
                }
            )
    return config


def _with(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A client's config: the cluster's, this client's settings, and librdkafka's own log lines
    sent to Python logging (`streamguard.kafka.librdkafka`) instead of stderr."""
    return {"logger": LIBRDKAFKA_LOG, **config, **overrides}


# --------------------------------------------------------------------------- topics


def _admin(config: Mapping[str, Any]) -> AdminClient:
    # A metadata request may create the topic it asks about (librdkafka's default for this
    # client type, and brokers' auto.create.topics.enable): never, when asking if it exists.
    return AdminClient(_with(config, {"allow.auto.create.topics": False}))


def _partition_count(admin: AdminClient, topic: str, timeout: float = 10.0) -> int | None:
    metadata = admin.list_topics(topic, timeout=timeout)
    meta = metadata.topics.get(topic)
    if meta is None:
        return None
    if meta.error is not None:
        if meta.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            raise KafkaException(meta.error)
        return None
    return len(meta.partitions)


def partition_count(config: Mapping[str, Any], topic: str, timeout: float = 10.0) -> int | None:
    """The topic's number of partitions, or None if it does not exist."""
    return _partition_count(_admin(config), topic, timeout)


def _wait_partitions(admin: AdminClient, topic: str, at_least: int, timeout: float) -> int:
    """Poll metadata until the topic shows `at_least` partitions (brokers apply it async)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        count = _partition_count(admin, topic)
        if count is not None and count >= at_least:
            return count
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"topic {topic!r} shows {count or 0} partition(s), not {at_least}, "
                f"after {timeout:.0f}s"
            )
        time.sleep(delay)
        delay = min(1.0, delay * 2)


def ensure_topic(
    config: Mapping[str, Any],
    topic: str,
    partitions: int = 2,
    replication_factor: int = -1,
    timeout: float = ADMIN_TIMEOUT_S,
) -> int:
    """Create the topic if it is missing; returns its partition count (idempotent).

    An existing topic is used as it is, whatever its partition count. `replication_factor` -1
    is the cluster's default (MSK and Confluent Cloud want 3; the local broker has one node).
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    admin = _admin(config)
    existing = _partition_count(admin, topic)
    if existing is not None:
        return existing
    future = admin.create_topics(
        [NewTopic(topic, num_partitions=partitions, replication_factor=replication_factor)],
        operation_timeout=timeout,
    )[topic]
    try:
        future.result(timeout)
        log.info("created Kafka topic %s with %d partition(s)", topic, partitions)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:  # created concurrently: fine
            raise
    return _wait_partitions(admin, topic, 1, timeout)


def add_partitions(
    config: Mapping[str, Any], topic: str, total: int, timeout: float = ADMIN_TIMEOUT_S
) -> int:
    """Grow the topic to `total` partitions (Kafka can only add); returns the count after.

    A topic that already has `total` or more is left alone. New partitions start empty at
    offset 0, and `KafkaSource.shards` lists them on its next call. Keys move: a customer's
    later records may land in a new partition, so per-customer order across the change holds
    only by event time (the scoring orders by event time).
    """
    admin = _admin(config)
    current = _partition_count(admin, topic)
    if current is None:
        raise ValueError(f"topic {topic!r} does not exist")
    if current >= total:
        return current
    future = admin.create_partitions([NewPartitions(topic, total)], operation_timeout=timeout)[
        topic
    ]
    future.result(timeout)
    log.info("grew Kafka topic %s from %d to %d partitions", topic, current, total)
    return _wait_partitions(admin, topic, total, timeout)


# --------------------------------------------------------------------------- writing


class KafkaProduceError(RuntimeError):
    """Records not acknowledged by the cluster; `delivered` of them had been."""

    def __init__(self, message: str, delivered: int, failed: int) -> None:
        super().__init__(message)
        self.delivered = delivered
        self.failed = failed


def produce_records(
    config: Mapping[str, Any],
    topic: str,
    records: Iterable[tuple[bytes, str]],
    flush_timeout: float = 60.0,
) -> int:
    """Write (value, key) records with the idempotent producer; returns how many were acked.

    `acks=all` + idempotence: no record is written twice by a retry, and one key's records keep
    their order (same key, same partition). Stops sending at the first failed delivery and
    raises KafkaProduceError, as it does when records are still unacknowledged after
    `flush_timeout` seconds (an unreachable or refusing cluster never hangs the caller).
    """
    failures: list[KafkaError] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:  # only errors are reported (delivery.report.only.error)
            failures.append(err)

    producer = Producer(_with(config, {**PRODUCER, "on_delivery": on_delivery}))
    sent = 0
    for value, key in records:
        if failures:
            break
        while True:
            try:
                producer.produce(topic, value=value, key=key)
                break
            except BufferError:  # the local queue is full: let deliveries drain it
                producer.poll(0.05)
        sent += 1
        if sent % 10_000 == 0:
            producer.poll(0)
    undelivered = producer.flush(flush_timeout)
    failed = len(failures)
    delivered = sent - failed - undelivered
    if failures or undelivered:
        producer.purge()  # give up on the rest now, not when the producer is collected
        producer.flush(0)
        reason = f"first error: {failures[0]}" if failures else "no error reported yet"
        raise KafkaProduceError(
            f"{failed + undelivered:,} record(s) not acknowledged by topic {topic!r} "
            f"({undelivered:,} still pending after {flush_timeout:.0f}s; {delivered:,} "
            f"delivered; {reason})",
            delivered=delivered,
            failed=failed + undelivered,
        )
    return delivered


def produce_transactions(
    config: Mapping[str, Any], topic: str, transactions: pa.Table, flush_timeout: float = 60.0
) -> int:
    """Send transactions in event_time order, keyed by customer_id; returns how many were acked.

    The customer key keeps one customer's transactions in one partition, in order, which the
    stateful per-customer features rely on (the same records as the Kinesis producer sends).
    """
    return produce_records(config, topic, transaction_records(transactions), flush_timeout)


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class KafkaRecord(StreamRecord):
    """A StreamRecord (shard "topic:partition", sequence number = offset) with its headers."""

    headers: tuple[tuple[str, bytes | None], ...] = ()


class KafkaRetentionGap(RuntimeError):
    """Offsets past the read position are gone (retention or deleted records) before being
    read: the records there were never scored, and skipping them silently would lose them."""

    def __init__(self, topic: str, partition: int, after: int, first_kept: int) -> None:
        self.topic = topic
        self.partition = partition
        self.after = after  # the last offset read (-1: none)
        self.first_kept = first_kept
        super().__init__(
            f"Kafka topic {topic!r} partition {partition}: offsets {after + 1}..{first_kept - 1} "
            f"were removed (retention or deleted records) before they were read; the position "
            f"is after offset {after} and the oldest kept offset is {first_kept}. Nothing was "
            "skipped: produce those transactions again, or move the checkpoint past the gap "
            "deliberately."
        )


def shard_id(topic: str, partition: int) -> str:
    """The runner's shard name for a partition: `topic:partition` (':' is not legal in topics)."""
    return f"{topic}:{partition}"


def sequence_number(offset: int) -> str:
    """An offset as a sequence number: zero-padded so string order is numeric order."""
    return str(offset).zfill(SEQ_DIGITS)


class KafkaSource:
    """A Kafka topic as the runner's `Source`: one shard per partition, read by offset range.

    Shards are `topic:partition` (e.g. `payments:0`), so records carry their topic into the
    lineage; sequence numbers are offsets, zero-padded to 20 digits. Partitions added to the
    topic appear in `shards()` and are read from their start. One consumer (`read_committed`,
    no auto commit, no offset reset) is kept open and moved between partitions; a read that
    continues where the previous one stopped keeps its prefetched data.
    """

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str,
        group_id: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        self.topic = topic
        self.group_id = group_id or f"streamguard-{topic}"
        self.timeout = timeout
        self._consumer = Consumer(_with(config, {**SOURCE_CONSUMER, "group.id": self.group_id}))
        # Where the consumer stands, so a read that continues the previous one keeps its
        # prefetched data: (partition, next offset a read may start at), the messages consumed
        # past it but not returned, whether a message was consumed since the last assign (only
        # then is position() this assignment's: right after one it can still be the last one's),
        # and the end offset the consumer last reported reaching (-1: not yet).
        self._cursor: tuple[int, int] | None = None
        self._pending: list[Message] = []
        self._trusted = False
        self._eof = -1

    # -- lifecycle

    def close(self) -> None:
        """Leave the cluster (no group membership to give up: partitions are assigned)."""
        self._consumer.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- Source

    def partitions(self) -> list[int]:
        """The topic's partitions, fresh from the cluster (so added ones appear)."""
        metadata = self._consumer.list_topics(self.topic, timeout=self.timeout)
        meta = metadata.topics.get(self.topic)
        if meta is None or meta.error is not None:
            reason = meta.error if meta is not None else "absent from the metadata"
            raise ValueError(f"cannot read Kafka topic {self.topic!r}: {reason}")
        return sorted(meta.partitions)

    def shards(self) -> list[str]:
        """One shard per partition: `topic:partition`."""
        return [shard_id(self.topic, p) for p in self.partitions()]

    def _partition(self, shard: str) -> int:
        topic, _, partition = shard.rpartition(":")
        if topic != self.topic or not partition.isdigit():
            raise ValueError(f"shard {shard!r} is not a partition of topic {self.topic!r}")
        return int(partition)

    def watermarks(self, partition: int) -> tuple[int, int]:
        """(oldest kept offset, end of committed data): with read_committed the end is the last
        stable offset, so an open transaction's records are not counted as readable."""
        low, high = self._consumer.get_watermark_offsets(
            TopicPartition(self.topic, partition), timeout=self.timeout
        )
        return int(low), int(high)

    def read(
        self, shard: str, after: str | None, until: str | None, max_records: int
    ) -> list[StreamRecord]:
        """The partition's committed records with after < offset ≤ until, in order, at most
        max_records.

        `after` None starts at the oldest kept offset (as Kinesis' TRIM_HORIZON does); `until`
        None reads to the end of committed data as it is now: a read never waits for new
        records. Aborted records and transaction markers take offsets without being records,
        so offsets have gaps; the same (after, until) always gives the same records. Offsets
        after `after` that are already gone raise KafkaRetentionGap.
        """
        if max_records < 0:
            raise ValueError(f"max_records must be >= 0, got {max_records}")
        partition = self._partition(shard)
        after_n = -1 if after is None else int(after)
        until_n = None if until is None else int(until)
        if max_records == 0 or (until_n is not None and until_n <= after_n):
            return []
        low, high = self.watermarks(partition)
        if after is None:
            start = low
        elif low > after_n + 1:
            raise KafkaRetentionGap(self.topic, partition, after_n, low)
        else:
            start = after_n + 1
        end = high if until_n is None else min(until_n + 1, high)  # exclusive
        if start >= end:
            return []
        try:
            return self._consume(shard, partition, start, end, max_records)
        except BaseException:
            self._cursor = None  # position unknown: seek on the next read
            raise

    def _consume(
        self, shard: str, partition: int, start: int, end: int, max_records: int
    ) -> list[StreamRecord]:
        """Messages of [start, end) from the assigned partition, at most max_records.

        It stops at the first message at or past `end` (kept for the next read), or once the
        consumer is past `end` with nothing more to deliver: its position, or its end-of-
        partition event, says so when the last offsets are transaction markers or aborted
        records, which are never delivered.
        """
        consumer = self._consumer
        if self._cursor != (partition, start):
            consumer.assign([TopicPartition(self.topic, partition, start)])
            self._pending, self._trusted, self._eof = [], False, -1
        position = [TopicPartition(self.topic, partition)]
        out: list[StreamRecord] = []
        times: dict[int, datetime] = {}
        next_offset = start  # every message below it has been returned
        batch, self._pending = self._pending, []
        deadline = time.monotonic() + self.timeout
        done = False
        while not done:
            if not batch:
                if self._eof >= end:
                    break  # reached before: nothing readable is left below `end`
                want = min(READ_CHUNK, max_records - len(out), end - next_offset)
                batch = consumer.consume(want, 0)  # what is already fetched
                if not batch:
                    if self._trusted and consumer.position(position)[0].offset >= end:
                        break  # only markers or aborted records were left below `end`
                    if time.monotonic() > deadline:
                        raise TimeoutError(
                            f"Kafka topic {self.topic!r} partition {partition}: no progress "
                            f"at offset {next_offset} (reading to {end}) in {self.timeout:.0f}s"
                        )
                    batch = consumer.consume(1, READ_WAIT_S)  # wait for the next fetch
                    continue
            for index, message in enumerate(batch):
                error = message.error()
                if error is not None:
                    if error.code() != KafkaError._PARTITION_EOF:
                        self._error(error, partition, next_offset)
                        continue
                    self._eof = max(self._eof, cast(int, message.offset()))
                    if self._eof >= end:
                        self._pending, done = batch[index + 1 :], True
                        break
                    continue
                offset = cast(int, message.offset())
                if offset >= end:
                    self._pending, done, self._trusted = batch[index:], True, True
                    break
                next_offset = offset + 1
                stamp = message.timestamp()[1]
                arrival = times.get(stamp)
                if arrival is None:
                    arrival = times[stamp] = datetime.fromtimestamp(max(stamp, 0) / 1000, UTC)
                key = message.key()
                headers = cast(list[tuple[str, bytes | None]] | None, message.headers())
                out.append(
                    KafkaRecord(
                        shard,
                        str(offset).zfill(SEQ_DIGITS),
                        "" if key is None else key.decode("utf-8", "backslashreplace"),
                        message.value() or b"",
                        arrival,
                        tuple(headers) if headers else (),
                    )
                )
                if len(out) >= max_records or next_offset >= end:
                    self._pending, done = batch[index + 1 :], True
                    break
            else:
                batch = []
            if out:
                self._trusted = True
            deadline = time.monotonic() + self.timeout  # progress was made
        self._cursor = (partition, next_offset)
        return out

    def _error(self, error: KafkaError, partition: int, offset: int) -> None:
        """Raise what a read cannot go on from; log what librdkafka retries by itself."""
        if error.code() == KafkaError._AUTO_OFFSET_RESET:  # the offset is no longer there
            low, _ = self.watermarks(partition)
            raise KafkaRetentionGap(self.topic, partition, offset - 1, low)
        if error.fatal() or not (error.retriable() or error.code() in TRANSIENT_ERRORS):
            raise KafkaException(error)
        log.warning("Kafka topic %s partition %d: %s (retrying)", self.topic, partition, error)

    # -- progress for lag tools and sensors

    def commit_positions(self, positions: Mapping[str, str | None]) -> None:
        """Commit the consumer group's offsets to these positions (last offset read per shard;
        Kafka stores the next one), so lag tools show the platform's progress.

        Call it after the lake commit. It is never read back: the lake's checkpoints are the
        position; a lost or stale group offset changes nothing but the lag shown.
        """
        offsets = [
            TopicPartition(self.topic, self._partition(shard), int(position) + 1)
            for shard, position in sorted(positions.items())
            if position is not None and position != ""
        ]
        if not offsets:
            return
        committed = self._consumer.commit(offsets=offsets, asynchronous=False)
        errors = [tp for tp in committed or [] if tp.error is not None]
        if errors:
            raise KafkaException(errors[0].error)

    def acknowledge(self, positions: Mapping[str, str | None]) -> None:
        """The runner's hook after a lake commit: the group offsets follow, best effort.

        A cluster that refuses the commit costs only a stale lag reading, never the batch
        that the lake has already committed, so the failure is logged, not raised.
        """
        try:
            self.commit_positions(positions)
        except KafkaException as exc:
            log.warning("Kafka topic %s: group offsets not committed: %s", self.topic, exc)

    def latest_positions(
        self, after: Mapping[str, str | None], max_records_per_shard: int
    ) -> dict[str, str | None]:
        """Per shard, the bound of the next batch: the end of committed data after
        `after[shard]`, at most max_records_per_shard offsets on; `after[shard]` itself (None if
        absent) when nothing readable is new.

        A sensor turns (after, result) into the exact, replayable bounds of the next run. The
        bound is an offset, and may be a transaction marker's: a read up to it is still exact.
        """
        if max_records_per_shard < 1:
            raise ValueError(f"max_records_per_shard must be >= 1, got {max_records_per_shard}")
        positions: dict[str, str | None] = {}
        for partition in self.partitions():
            shard = shard_id(self.topic, partition)
            start = after.get(shard) or None
            low, high = self.watermarks(partition)
            last_read = low - 1 if start is None else int(start)
            bound = min(high - 1, last_read + max_records_per_shard)
            if bound <= last_read:
                positions[shard] = start
                continue
            # Something readable must be there (not only aborted records or markers); capped
            # short of the end, advance past them anyway so a long aborted run cannot stall.
            readable = self.read(shard, start, sequence_number(bound), 1)
            positions[shard] = sequence_number(bound) if readable or bound < high - 1 else start
        return positions


def latest_positions(
    config: Mapping[str, Any],
    topic: str,
    after: Mapping[str, str | None],
    max_records_per_shard: int,
) -> dict[str, str | None]:
    """`KafkaSource.latest_positions` with a short-lived consumer: what a sensor tick needs."""
    with KafkaSource(config, topic) as source:
        return source.latest_positions(after, max_records_per_shard)
