"""Alerts published where people act on them (a Kafka topic), exactly once across crashes.

The commit path (`streamguard.commit.publish_batch`) calls a sink after a batch's Delta tables are
written and before the batch is marked committed. A crash anywhere replays the batch, so a sink
sees a batch again and must then publish nothing new. `KafkaAlertSink` does it with a
transactional producer:

- each batch is one Kafka transaction holding its alerts (topic `fraud-alerts`, keyed by
  `customer_id`, JSON) and a progress record `{job, batch_id}` on a one-partition progress topic;
- before publishing batch N the sink reads the last committed progress record: if it is >= N the
  batch is already out (the crash came after the Kafka commit), and nothing is sent;
- a transaction left open by a killed process is aborted when the next process with the same
  `transactional.id` starts (`init_transactions` fences it), so read_committed consumers never
  see its alerts, and the replay publishes them once.

Consumers must read with `isolation.level=read_committed` (the default in most Kafka clients is
read_uncommitted: they would see aborted alerts of a killed attempt too). Every message carries
the deterministic `alert_id` (the transaction id) as a header for consumers that cannot.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import pyarrow as pa
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from streamguard.kafka import ensure_topic

DEFAULT_ALERTS_TOPIC = "fraud-alerts"
PUBLISH_TIMEOUT_S = 60.0
_SCAN_BACK = 64  # progress records looked at per step when finding the last committed one


def alert_message(row: Mapping[str, Any]) -> bytes:
    """One alert as the JSON downstream tools read: no field that changes on a replay."""
    event_time = row.get("event_time")
    body = {
        "alert_id": row["transaction_id"],
        "transaction_id": row["transaction_id"],
        "customer_id": row.get("customer_id"),
        "terminal_id": row.get("terminal_id"),
        "event_time": event_time.isoformat() if isinstance(event_time, datetime) else event_time,
        "amount": row.get("amount"),
        "score": row.get("score"),
        "reason": row.get("reason"),
        "model_version": row.get("model_version"),
        "batch_id": row.get("batch_id"),
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def _safe(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9._-]+", "-", name)


class KafkaAlertSink:
    """Alerts to a Kafka topic in one transaction per batch (see the module doc)."""

    table = "alerts"

    def __init__(
        self,
        config: Mapping[str, Any],
        topic: str = DEFAULT_ALERTS_TOPIC,
        *,
        partitions: int = 3,
        job: str = "fraud_scoring",
    ) -> None:
        self.config = dict(config)
        self.topic = topic
        self.progress_topic = f"_streamguard.{_safe(topic)}.{_safe(job)}.progress"
        ensure_topic(self.config, topic, partitions)
        ensure_topic(self.config, self.progress_topic, 1)
        self.transactional_id = f"streamguard-alerts-{_safe(topic)}-{_safe(job)}"
        self._producer: Producer | None = None

    def _ready(self) -> Producer:
        if self._producer is None:
            producer = Producer(
                {
                    **self.config,
                    "transactional.id": self.transactional_id,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                }
            )
            producer.init_transactions(PUBLISH_TIMEOUT_S)  # aborts a killed attempt's leftovers
            self._producer = producer
        return self._producer

    def last_published(self, job: str) -> int:
        """The last batch id of `job` whose alerts are committed on the topic (-1: none)."""
        consumer = Consumer(
            {
                **self.config,
                "group.id": f"{self.transactional_id}-progress-reader",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
                "auto.offset.reset": "earliest",
                "enable.partition.eof": True,
            }
        )
        try:
            part = TopicPartition(self.progress_topic, 0)
            low, high = consumer.get_watermark_offsets(part, timeout=PUBLISH_TIMEOUT_S)
            end, last = high, -1
            while end > low and last < 0:
                start = max(low, end - _SCAN_BACK)
                last = self._scan(consumer, start, end, job)
                end = start
            return last
        finally:
            consumer.close()

    def _scan(self, consumer: Consumer, start: int, end: int, job: str) -> int:
        """The highest batch id of `job` among the committed progress records in [start, end)."""
        consumer.assign([TopicPartition(self.progress_topic, 0, start)])
        best = -1
        deadline = time.monotonic() + PUBLISH_TIMEOUT_S
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    return best
                raise KafkaException(error)
            offset = message.offset()
            if offset is not None and offset >= end:
                return best
            body = json.loads(message.value() or b"{}")
            if body.get("job") == job:
                best = max(best, int(body["batch_id"]))
        raise TimeoutError(
            f"reading {self.progress_topic} did not reach its end in {PUBLISH_TIMEOUT_S:.0f}s "
            "(an open transaction of another producer holds the read_committed end back?)"
        )

    def publish(self, job: str, batch_id: int, alerts: pa.Table) -> int:
        producer = self._ready()  # first: fences and aborts a killed attempt's transaction
        if self.last_published(job) >= batch_id:
            return 0
        producer.begin_transaction()
        try:
            rows = alerts.to_pylist()
            for row in rows:
                producer.produce(
                    self.topic,
                    key=str(row.get("customer_id") or "").encode(),
                    value=alert_message(row),
                    headers={"alert_id": str(row["transaction_id"]), "batch_id": str(batch_id)},
                )
            progress = {"job": job, "batch_id": batch_id, "alerts": len(rows)}
            producer.produce(self.progress_topic, key=job.encode(), value=json.dumps(progress))
            self.before_commit(producer)
            producer.commit_transaction(PUBLISH_TIMEOUT_S)
        except BaseException:
            try:
                producer.abort_transaction(PUBLISH_TIMEOUT_S)
            finally:
                self._producer = None  # a fresh producer fences whatever is left
            raise
        return len(rows)

    def before_commit(self, producer: Producer) -> None:
        """Hook for crash tests: the batch's transaction is open and filled, not committed."""
        return None

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(PUBLISH_TIMEOUT_S)
            self._producer = None
