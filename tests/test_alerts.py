"""Scoring from a real Kafka topic with alerts published back, exactly once across kill -9.

A scoring process reads the topic (`KafkaSource`) and publishes alerts through the transactional
`KafkaAlertSink`; it is SIGKILLed at a point of batch 1, then a fresh process reruns. The lake
must equal an uninterrupted run's, and the alerts topic, read as consumers read it
(read_committed), must hold every alert of the lake exactly once.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition
from conftest import new_topic
from fraud_streams import troubled_stream
from test_runner import table_snapshot

from models.job import ALERTS, FEATURES, SCORES, TERMINAL_STATE, TRANSACTIONS
from models.registry import LoadedModel
from models.simulate import Simulation
from streamguard.alerts import KafkaAlertSink
from streamguard.commit import DEAD_LETTER_TABLE
from streamguard.kafka import KafkaSource, produce_records
from streamguard.lake import Lake
from streamguard.pipeline import scoring_job_name, scoring_runner

N_TX = 1_500
BATCH = 400


def read_topic(config: Any, topic: str) -> list[dict[str, Any]]:
    """Every committed message of the topic, as a read_committed consumer sees them."""
    consumer = Consumer(
        {
            **config,
            "group.id": "test-reader",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        done: set[int] = set()
        out: list[dict[str, Any]] = []
        while len(done) < len(parts):
            message = consumer.poll(5.0)
            assert message is not None, "the topic did not reach its end"
            if message.error():
                assert message.error().code() == KafkaError._PARTITION_EOF
                done.add(message.partition())
                continue
            body = json.loads(message.value())
            body["_key"] = message.key().decode()
            out.append(body)
        return out
    finally:
        consumer.close()


@pytest.fixture
def produced(kafka_config: Any, request: pytest.FixtureRequest, small_sim: Simulation) -> str:
    """A 3-partition topic holding the simulation's records, bad ones and a replay among them."""
    topic = new_topic(kafka_config, request, partitions=3)
    payloads, keys = troubled_stream(small_sim.transactions.slice(0, N_TX).to_pylist())
    assert produce_records(kafka_config, topic, zip(payloads, keys, strict=True)) == len(payloads)
    return topic


def _score(lake: Lake, config: Any, topic: str, alerts: str, model: LoadedModel) -> None:
    job = scoring_job_name("kafka", topic)
    sink = KafkaAlertSink(config, alerts, job=job)
    with KafkaSource(config, topic) as source:
        scoring_runner(
            lake, source, None, max_batch_records=BATCH, model=model, job=job, sinks=[sink]
        ).run()
    sink.close()


def _assert_published_once(config: Any, alerts_topic: str, lake: Lake) -> list[dict[str, Any]]:
    published = read_topic(config, alerts_topic)
    ids = [m["alert_id"] for m in published]
    assert len(ids) == len(set(ids)), "an alert was published twice"
    rows = lake.read(ALERTS).to_pylist()
    assert sorted(ids) == sorted(r["transaction_id"] for r in rows), "alerts lost or invented"
    by_id = {r["transaction_id"]: r for r in rows}
    for message in published:
        row = by_id[message["alert_id"]]
        assert message["_key"] == row["customer_id"]  # keyed by customer: ordered per customer
        assert message["reason"] == row["reason"] and message["score"] == row["score"]
        assert message["model_version"] == row["model_version"]
    return published


@pytest.fixture(scope="module")
def always_alert(tiny_model: LoadedModel) -> LoadedModel:
    """The tiny model with a threshold of 0: every transaction alerts (many alerts to publish)."""
    return LoadedModel(tiny_model.model, tiny_model.name, "0", tags={"alert_threshold": "0.0"})


def test_a_kafka_topic_is_scored_and_every_alert_published_once(
    tmp_path: Path, kafka_config: Any, produced: str, request: pytest.FixtureRequest,
    always_alert: LoadedModel,
) -> None:  # fmt: skip
    alerts_topic = new_topic(kafka_config, request, partitions=2)
    lake = Lake(tmp_path / "lake")
    _score(lake, kafka_config, produced, alerts_topic, always_alert)
    assert lake.count(TRANSACTIONS) == N_TX  # the replayed record is dead-lettered
    assert lake.count(DEAD_LETTER_TABLE) == 5
    lineage = lake.read(TRANSACTIONS, columns=["shard_id", "partition_key", "customer_id"])
    shards = set(lineage["shard_id"].to_pylist())
    assert shards == {f"{produced}:{p}" for p in range(3)}  # topic:partition lineage
    assert lineage["partition_key"].equals(lineage["customer_id"])  # the record key, kept
    published = _assert_published_once(kafka_config, alerts_topic, lake)
    assert len(published) == N_TX
    # A second run finds nothing new and publishes nothing.
    _score(lake, kafka_config, produced, alerts_topic, always_alert)
    assert len(read_topic(kafka_config, alerts_topic)) == N_TX


def test_record_keys_and_headers_are_kept_in_the_lineage(
    tmp_path: Path, kafka_config: Any, request: pytest.FixtureRequest, small_sim: Simulation,
    tiny_model: LoadedModel,
) -> None:  # fmt: skip
    topic = new_topic(kafka_config, request, partitions=1)
    rows = small_sim.transactions.slice(0, 3).to_pylist()
    producer = Producer(kafka_config)
    for i, (payload, key) in enumerate(
        zip(*troubled_stream(rows, (), replay_of=None), strict=True)
    ):
        headers = [("trace-id", f"t{i}".encode()), ("source", b"core-banking")] if i else None
        producer.produce(topic, key=key.encode(), value=payload, headers=headers)
    assert producer.flush(30) == 0
    lake = Lake(tmp_path / "lake")
    with KafkaSource(kafka_config, topic) as source:
        scoring_runner(lake, source, None, model=tiny_model, job="k").run()
    got = lake.read(TRANSACTIONS, columns=["sequence_number", "partition_key", "headers"])
    got = sorted(got.to_pylist(), key=lambda r: r["sequence_number"])
    assert [r["partition_key"] for r in got] == [r["customer_id"] for r in rows]
    assert got[0]["headers"] is None
    assert json.loads(got[2]["headers"]) == [["trace-id", "t2"], ["source", "core-banking"]]


KILLED = """
import os, signal, sys
from streamguard.alerts import KafkaAlertSink
from streamguard.kafka import KafkaSettings, KafkaSource, client_config
from streamguard.lake import Lake
from streamguard.pipeline import scoring_job_name
from streamguard.runner import MicroBatchRunner
from models.job import FraudScoringJob
from models.registry import LoadedModel
import pickle

bootstrap, topic, alerts, lake_dir, model_file, point = sys.argv[1:]
config = client_config(KafkaSettings(bootstrap))
model = pickle.loads(open(model_file, "rb").read())
job = scoring_job_name("kafka", topic)

def die():
    os.kill(os.getpid(), signal.SIGKILL)

class Sink(KafkaAlertSink):
    def before_commit(self, producer):
        if point == "mid_transaction" and self.batch == 1:
            producer.flush(30)  # the alerts are on the broker, the transaction still open
            die()
    def publish(self, job, batch_id, rows):
        self.batch = batch_id
        return super().publish(job, batch_id, rows)

class Killed(MicroBatchRunner):
    def after_write(self, plan, table):
        if plan.batch_id == 1 and table == point:
            die()

with KafkaSource(config, topic) as source:
    Killed(source, FraudScoringJob(None, model=model), Lake(lake_dir), job,
           max_batch_records=int(os.environ["BATCH"]), sinks=[Sink(config, alerts, job=job)]).run()
"""


@pytest.mark.parametrize("point", [ALERTS, "mid_transaction", "publish", "commit"])
def test_kill_9_at_any_point_then_rerun_publishes_every_alert_exactly_once(
    tmp_path: Path, kafka_config: Any, kafka_bootstrap: str, produced: str,
    request: pytest.FixtureRequest, always_alert: LoadedModel, point: str,
) -> None:  # fmt: skip
    """Killed after the alerts table (not yet published), inside the Kafka transaction, after
    the Kafka commit (checkpoint not yet committed), after the checkpoint commit."""
    import pickle

    clean = Lake(tmp_path / "clean")
    clean_topic = new_topic(kafka_config, request, partitions=2)
    _score(clean, kafka_config, produced, clean_topic, always_alert)

    alerts_topic = new_topic(kafka_config, request, partitions=2)
    lake_dir = tmp_path / "lake"
    model_file = tmp_path / "model.pkl"
    model_file.write_bytes(pickle.dumps(always_alert))
    script = tmp_path / "killed.py"
    script.write_text(textwrap.dedent(KILLED))
    args = [kafka_bootstrap, produced, alerts_topic, str(lake_dir), str(model_file), point]
    done = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True, text=True, timeout=300, env={**_env(), "BATCH": str(BATCH)},
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    lake = Lake(lake_dir)
    assert lake.count(SCORES) > 0  # it died with batch 1 (partly) done

    _score(lake, kafka_config, produced, alerts_topic, always_alert)  # the rerun
    for name, key in [
        (TRANSACTIONS, "transaction_id"),
        (FEATURES, "transaction_id"),
        (SCORES, "transaction_id"),
        (ALERTS, "transaction_id"),
        (TERMINAL_STATE, "terminal_id"),
        (DEAD_LETTER_TABLE, "payload"),
    ]:
        assert table_snapshot(lake, name, key) == table_snapshot(clean, name, key), name
    published = _assert_published_once(kafka_config, alerts_topic, lake)
    clean_published = read_topic(kafka_config, clean_topic)
    strip = lambda ms: sorted(json.dumps(m, sort_keys=True) for m in ms)  # noqa: E731
    assert strip(published) == strip(clean_published)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
