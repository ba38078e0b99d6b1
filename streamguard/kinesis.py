"""Kinesis access for the producer, the sensor and the scoring runs.

The same code talks to AWS or to a local Kinesis-compatible server (kinesalite): the endpoint is
configuration only. Reads are by exact sequence-number range, so a batch read again after a crash
returns the same records, which is what makes the downstream writes exactly-once.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import botocore.utils
import pyarrow as pa
import pyarrow.compute as pc
from botocore.exceptions import ClientError

from models.schema import TRANSACTION_SCHEMA, to_payload

if TYPE_CHECKING:
    from mypy_boto3_kinesis import KinesisClient
    from mypy_boto3_kinesis.type_defs import PutRecordsRequestEntryTypeDef as Entry
else:
    KinesisClient = Any
    Entry = dict

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"

# Kinesis service limits (PutRecords / GetRecords).
MAX_BATCH_RECORDS = 500
MAX_BATCH_BYTES = 5 * 1024 * 1024  # a whole PutRecords request, partition keys included
MAX_RECORD_BYTES = 1024 * 1024  # one record, data plus partition key
MAX_PARTITION_KEY_CHARS = 256
MAX_GET_RECORDS = 10_000

# Error codes that mean "too fast, try again later" rather than "wrong request".
THROTTLING_CODES = frozenset(
    {"ProvisionedThroughputExceededException", "LimitExceededException", "ThrottlingException"}
)

BACKOFF_BASE_S = 0.1
BACKOFF_CAP_S = 5.0
READ_MAX_ATTEMPTS = 10
EMPTY_READ_PAUSE_S = 0.2  # AWS allows 5 GetRecords per shard per second

# Placeholder keys for a local server, which accepts any signature. Deliberately not shaped like
# real AWS keys, so they can never be mistaken for (or leak as) one.
_LOCAL_KEY_ID = "streamguard-local"
_LOCAL_SECRET = "streamguard-local-not-a-secret"


# --------------------------------------------------------------------------- client


def _configured_endpoint(endpoint_url: str | None) -> str | None:
    """The endpoint boto3 will use (argument, else the service or global env override)."""
    if endpoint_url:
        return endpoint_url
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return None
    return os.environ.get("AWS_ENDPOINT_URL_KINESIS") or os.environ.get("AWS_ENDPOINT_URL")


def is_loopback(endpoint_url: str | None) -> bool:
    """True for http(s)://localhost... or a loopback IP: a local server, never AWS."""
    if not endpoint_url:
        return False
    host = urlsplit(endpoint_url).hostname or ""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _has_credentials() -> bool:
    """Whether any AWS credentials are configured, without asking the EC2/ECS metadata services.

    Those two providers would only time out on a developer machine, and a local endpoint never
    needs them.
    """
    import botocore.session

    session = botocore.session.get_session()
    try:
        resolver = session.get_component("credential_provider")
        for name in ("container-role", "iam-role"):
            resolver.remove(name)  # a no-op when the provider is absent
        return resolver.load_credentials() is not None
    except Exception:  # any trouble reading config: let boto3 decide as usual
        return True


def kinesis_client(endpoint_url: str | None = None, region: str | None = None) -> KinesisClient:
    """A boto3 Kinesis client for AWS or, given a local endpoint, for kinesalite.

    Endpoint: the argument, else boto3's own `AWS_ENDPOINT_URL_KINESIS` / `AWS_ENDPOINT_URL`.
    Region: the argument, else `AWS_REGION` / `AWS_DEFAULT_REGION`, else us-east-1. A loopback
    endpoint with no credentials configured gets placeholder ones (a local server accepts any).
    """
    import boto3
    import botocore.session

    region = (
        region
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or DEFAULT_REGION
    )
    kwargs: dict[str, Any] = {"region_name": region}
    if endpoint_url:
        kwargs["endpoint_url"] = endpoint_url
    if is_loopback(_configured_endpoint(endpoint_url)) and not _has_credentials():
        kwargs["aws_access_key_id"] = _LOCAL_KEY_ID
        kwargs["aws_secret_access_key"] = _LOCAL_SECRET
    with _SESSION_LOCK:  # creating clients from one session is not thread-safe
        global _SESSION
        if _SESSION is None:
            core = botocore.session.get_session()
            # Every record's ApproximateArrivalTimestamp goes through the timestamp parser:
            # botocore's default (dateutil, local time zone) took about half of a read's time.
            factory = core.get_component("response_parser_factory")
            factory.set_parser_defaults(timestamp_parser=_parse_timestamp)
            _SESSION = boto3.session.Session(botocore_session=core)
        client: KinesisClient = _SESSION.client("kinesis", **kwargs)
    return client


_SESSION: Any = None  # the boto3 session Kinesis clients come from (made on first use)
_SESSION_LOCK = threading.Lock()


def _parse_timestamp(value: Any) -> datetime:
    """A timestamp of a Kinesis response as an aware UTC datetime: the same instant as
    botocore's own parser gives, from epoch seconds without its time-zone machinery."""
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC)
    parsed: datetime = botocore.utils.parse_timestamp(value)
    return parsed


# --------------------------------------------------------------------------- helpers


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _backoff(attempt: int) -> float:
    """Seconds to wait before retry `attempt` (1-based): exponential, capped, jittered.

    "Equal jitter": half the step is fixed (so retries really slow down), half random (so
    producers throttled together do not retry together).
    """
    step = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** (attempt - 1))
    return step / 2 + random.uniform(0, step / 2)


def _call(fn: Callable[..., Any], max_attempts: int = READ_MAX_ATTEMPTS, **kwargs: Any) -> Any:
    """Call a Kinesis API, backing off while it is throttled."""
    for attempt in range(1, max_attempts + 1):
        try:
            return fn(**kwargs)
        except ClientError as exc:
            if _error_code(exc) not in THROTTLING_CODES or attempt == max_attempts:
                raise
            time.sleep(_backoff(attempt))
    raise AssertionError("unreachable")


def _stream_status(client: KinesisClient, name: str) -> str | None:
    """The stream's status, or None if it does not exist."""
    try:
        summary = _call(client.describe_stream_summary, StreamName=name)
    except ClientError as exc:
        if _error_code(exc) == "ResourceNotFoundException":
            return None
        raise
    return str(summary["StreamDescriptionSummary"]["StreamStatus"])


def _wait_status(
    client: KinesisClient, name: str, done: Callable[[str | None], bool], timeout: float
) -> str | None:
    """Poll until `done(status)`; fast at first (kinesalite: milliseconds), then every 2 s (AWS)."""
    deadline = time.monotonic() + timeout
    delay = 0.02
    while True:
        status = _stream_status(client, name)
        if done(status):
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"stream {name!r} still {status or 'absent'} after {timeout:.0f}s")
        time.sleep(delay)
        delay = min(2.0, delay * 2)


# --------------------------------------------------------------------------- streams


def ensure_stream(client: KinesisClient, name: str, shards: int = 2, timeout: float = 300) -> None:
    """Create the stream if it is missing and wait until it can be written (idempotent).

    An existing stream is used as it is, whatever its shard count; one being deleted is waited
    out and created again.
    """
    status = _stream_status(client, name)
    if status == "DELETING":
        _wait_status(client, name, lambda s: s is None, timeout)
        status = None
    if status is None:
        try:
            _call(client.create_stream, StreamName=name, ShardCount=shards)
            log.info("created Kinesis stream %s with %d shard(s)", name, shards)
        except ClientError as exc:
            if _error_code(exc) != "ResourceInUseException":  # created concurrently: fine
                raise
    _wait_status(client, name, lambda s: s in ("ACTIVE", "UPDATING"), timeout)


def delete_stream(client: KinesisClient, name: str, timeout: float = 300) -> None:
    """Delete the stream and wait until it is gone; a missing stream is not an error."""
    try:
        _call(client.delete_stream, StreamName=name, EnforceConsumerDeletion=True)
        log.info("deleting Kinesis stream %s", name)
    except ClientError as exc:
        if _error_code(exc) != "ResourceNotFoundException":
            raise
    _wait_status(client, name, lambda s: s is None, timeout)


# --------------------------------------------------------------------------- writing


class PutRecordsError(RuntimeError):
    """Records still rejected after every attempt; `written` of them had landed before."""

    def __init__(self, message: str, written: int, failed: int) -> None:
        super().__init__(message)
        self.written = written
        self.failed = failed


def _batches(records: Iterable[tuple[bytes, str]], batch_size: int) -> Iterator[list[Entry]]:
    """PutRecords entries in input order, ≤ batch_size records and ≤ 5 MiB per batch."""
    batch: list[Entry] = []
    size = 0
    for index, (data, key) in enumerate(records):
        if not isinstance(key, str) or not 1 <= len(key) <= MAX_PARTITION_KEY_CHARS:
            raise ValueError(
                f"record {index}: partition key must be a string of 1-"
                f"{MAX_PARTITION_KEY_CHARS} characters, got {str(key)[:40]!r}"
            )
        n = len(data) + len(key.encode())
        if n > MAX_RECORD_BYTES:
            raise ValueError(f"record {index}: {n:,} bytes is over the 1 MiB Kinesis limit")
        if batch and (len(batch) >= batch_size or size + n > MAX_BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append({"Data": data, "PartitionKey": key})
        size += n
    if batch:
        yield batch


def _put_batch(
    client: KinesisClient,
    stream: str,
    batch: list[Entry],
    max_attempts: int,
    on_progress: Callable[[int], None] | None,
    written_before: int,
) -> int:
    """Write one batch, re-sending only the entries Kinesis rejected, in their original order."""
    pending = batch
    last_error = ""
    for attempt in range(1, max_attempts + 1):
        try:
            response = client.put_records(StreamName=stream, Records=pending)
        except ClientError as exc:
            code = _error_code(exc)
            if code not in THROTTLING_CODES:
                raise
            last_error = f"{code}: {exc.response.get('Error', {}).get('Message', '')}"
        else:
            results = response["Records"]
            if len(results) != len(pending):
                raise RuntimeError(
                    f"PutRecords answered {len(results)} results for {len(pending)} records"
                )
            errors = [r for r in results if r.get("ErrorCode")]
            failed = [e for e, r in zip(pending, results, strict=True) if r.get("ErrorCode")]
            if errors:
                last_error = f"{errors[0]['ErrorCode']}: {errors[0].get('ErrorMessage', '')}"
            landed = len(pending) - len(failed)
            if landed and on_progress is not None:
                on_progress(landed)
            if not failed:
                return len(batch)
            pending = failed
        if attempt < max_attempts:
            time.sleep(_backoff(attempt))
    written = written_before + len(batch) - len(pending)
    raise PutRecordsError(
        f"{len(pending)} record(s) still rejected by stream {stream!r} after {max_attempts} "
        f"attempts ({written:,} written so far); last error {last_error}",
        written=written,
        failed=len(pending),
    )


def put_records(
    client: KinesisClient,
    stream: str,
    records: Iterable[tuple[bytes, str]],
    batch_size: int = MAX_BATCH_RECORDS,
    max_attempts: int = 8,
    on_progress: Callable[[int], None] | None = None,
) -> int:
    """Write (data, partition_key) records with PutRecords; returns how many were written.

    Batches hold ≤ `batch_size` (≤ 500) records and ≤ 5 MiB. Only the entries Kinesis rejects
    (FailedRecordCount / per-entry ErrorCode) are sent again, with exponential backoff and
    jitter; a call rejected as a whole for throughput is retried too. After `max_attempts` it
    raises PutRecordsError. `records` is consumed lazily, one batch at a time.

    Ordering: a batch is finished (retries included) before the next is sent, and retried
    entries keep their relative order, so a partition key's order holds across batches. Within
    one request Kinesis itself does not guarantee it: if an entry fails while a later entry with
    the same key succeeds, the retried one lands after it. Readers that need strict per-key order
    must order by event time (the scoring does).
    """
    if not 1 <= batch_size <= MAX_BATCH_RECORDS:
        raise ValueError(f"batch_size must be 1-{MAX_BATCH_RECORDS}, got {batch_size}")
    if max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
    written = 0
    for batch in _batches(records, batch_size):
        written += _put_batch(client, stream, batch, max_attempts, on_progress, written)
    return written


def transaction_records(transactions: pa.Table) -> Iterator[tuple[bytes, str]]:
    """(payload, customer_id) per transaction in event_time order (stable for equal times)."""
    missing = [n for n in ("event_time", "customer_id") if n not in transactions.column_names]
    if missing:
        raise ValueError(f"transactions table has no column(s) {', '.join(missing)}")
    names = [n for n in TRANSACTION_SCHEMA.names if n in transactions.column_names]
    table = transactions.select(names)
    if table.num_rows > 1:
        table = table.take(pc.sort_indices(table, sort_keys=[("event_time", "ascending")]))
    # One conversion per column, not per row (50k rows: 0.17 s vs 0.31 s for Table.to_pylist());
    # to_payload itself costs ~0.4 s more, small next to PutRecords (~5 s on kinesalite).
    columns = [table.column(n).to_pylist() for n in names]
    keys = columns[names.index("customer_id")]
    for values, key in zip(zip(*columns, strict=True), keys, strict=True):
        yield to_payload(dict(zip(names, values, strict=True))), key


def produce_transactions(
    client: KinesisClient,
    stream: str,
    transactions: pa.Table,
    batch_size: int = MAX_BATCH_RECORDS,
    progress: bool = True,
) -> int:
    """Send transactions in event_time order, keyed by customer_id; returns how many were sent.

    The customer key keeps one customer's transactions in one shard, in order, which the
    stateful per-customer features rely on.
    """
    from tqdm import tqdm

    with tqdm(
        total=transactions.num_rows, unit="rec", desc=f"put {stream}", disable=not progress
    ) as bar:
        return put_records(
            client,
            stream,
            transaction_records(transactions),
            batch_size=batch_size,
            on_progress=bar.update,
        )


# --------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardInfo:
    shard_id: str
    parent_shard_id: str | None
    starting_sequence_number: str
    ending_sequence_number: str | None  # None: the shard is open


@dataclass(frozen=True)
class StreamRecord:
    shard_id: str
    sequence_number: str
    partition_key: str
    data: bytes
    arrival_time: datetime


def list_shards(client: KinesisClient, stream: str) -> list[ShardInfo]:
    """Every shard of the stream (open and closed), following ListShards pagination."""
    shards: list[ShardInfo] = []
    kwargs: dict[str, Any] = {"StreamName": stream}
    while True:
        response = _call(client.list_shards, **kwargs)
        for shard in response.get("Shards", []):
            seq = shard["SequenceNumberRange"]
            shards.append(
                ShardInfo(
                    shard_id=shard["ShardId"],
                    parent_shard_id=shard.get("ParentShardId"),
                    starting_sequence_number=seq["StartingSequenceNumber"],
                    ending_sequence_number=seq.get("EndingSequenceNumber"),
                )
            )
        token = response.get("NextToken")
        if not token:
            return shards
        kwargs = {"NextToken": token}  # ListShards refuses StreamName together with NextToken


def _shard_iterator(client: KinesisClient, stream: str, shard_id: str, after: str | None) -> str:
    kwargs: dict[str, Any] = {"StreamName": stream, "ShardId": shard_id}
    if after is None:
        kwargs["ShardIteratorType"] = "TRIM_HORIZON"
    else:
        kwargs["ShardIteratorType"] = "AFTER_SEQUENCE_NUMBER"
        kwargs["StartingSequenceNumber"] = after
    return str(_call(client.get_shard_iterator, **kwargs)["ShardIterator"])


def _arrival(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)
    return datetime.fromtimestamp(float(value), UTC)


def read_shard(
    client: KinesisClient,
    stream: str,
    shard_id: str,
    after: str | None,
    until: str | None = None,
    max_records: int = 10_000,
) -> list[StreamRecord]:
    """The shard's records with after < sequence number ≤ until, in order, at most max_records.

    `after` None starts at the oldest record (TRIM_HORIZON); `until` None reads to the current
    end. It stops at max_records, at the first record past `until` (not returned), at a record
    equal to `until`, or when the shard is caught up (no records and MillisBehindLatest 0, or a
    closed shard's last iterator). So the same (after, until) always gives the same records, as
    long as retention has not dropped them: that is what makes a batch replayable.
    """
    if max_records < 0:
        raise ValueError(f"max_records must be >= 0, got {max_records}")
    after_n = int(after) if after is not None else -1
    until_n = int(until) if until is not None else None
    if max_records == 0 or (until_n is not None and until_n <= after_n):
        return []
    out: list[StreamRecord] = []
    last = after
    iterator: str | None = _shard_iterator(client, stream, shard_id, last)
    throttled = 0
    while iterator is not None:
        try:
            response = client.get_records(
                ShardIterator=iterator, Limit=min(MAX_GET_RECORDS, max_records - len(out))
            )
        except ClientError as exc:
            code = _error_code(exc)
            if code == "ExpiredIteratorException":
                iterator = _shard_iterator(client, stream, shard_id, last)
                continue
            if code not in THROTTLING_CODES:
                raise
            throttled += 1
            if throttled >= READ_MAX_ATTEMPTS:
                raise
            time.sleep(_backoff(throttled))
            continue
        throttled = 0
        records = response.get("Records", [])
        for record in records:
            seq = record["SequenceNumber"]
            seq_n = int(seq)
            if seq_n <= after_n:  # never expected; guards the exclusive lower bound
                continue
            if until_n is not None and seq_n > until_n:
                return out
            out.append(
                StreamRecord(
                    shard_id=shard_id,
                    sequence_number=seq,
                    partition_key=record["PartitionKey"],
                    data=bytes(record["Data"]),
                    arrival_time=_arrival(record["ApproximateArrivalTimestamp"]),
                )
            )
            last = seq
            if len(out) >= max_records or (until_n is not None and seq_n == until_n):
                return out
        iterator = response.get("NextShardIterator")
        if not records:
            if response.get("MillisBehindLatest", 0) == 0:
                break
            time.sleep(EMPTY_READ_PAUSE_S)  # AWS can answer empty pages behind the tip
    return out


def latest_positions(
    client: KinesisClient,
    stream: str,
    after: Mapping[str, str | None],
    max_records_per_shard: int,
) -> dict[str, str | None]:
    """Per shard, the last sequence number available after `after[shard]`, reading at most
    max_records_per_shard records; `after[shard]` itself (None if absent) when nothing is new.

    A sensor turns (after, result) into the exact, replayable bounds of the next batch.
    """
    positions: dict[str, str | None] = {}
    for shard in list_shards(client, stream):
        start = after.get(shard.shard_id)
        records = read_shard(client, stream, shard.shard_id, start, None, max_records_per_shard)
        positions[shard.shard_id] = records[-1].sequence_number if records else start
    return positions
