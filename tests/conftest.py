"""Shared fixtures: one real local Kinesis server (kinesalite), one Kafka broker (noida-db) and
one Spark session per test run.

A local Spark session takes about 6 s to start: every Spark suite shares this one.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.entities import Run

from models.accounts import AccountChanges, simulate_accounts
from models.features import replay
from models.registry import MODEL_NAME, LoadedModel, mlflow_client
from models.selection_log import log_selection
from models.simulate import Simulation, simulate, write_simulation
from models.training import Selection, train
from streamguard.config import Home
from streamguard.kinesis import delete_stream, ensure_stream, kinesis_client
from streamguard.local_kinesis import LocalKinesis
from streamguard.local_moto import LocalMoto, ensure_bucket, s3_environment
from streamguard.pipeline import TrainingOutcome, train_challenger, train_on_simulation


@pytest.fixture(autouse=True)
def _no_dagster_state_storage_leak() -> Iterator[None]:
    """Each test starts and ends with no current Dagster defs-state storage.

    Dagster keeps the storage of the instance last entered in a context variable. An instance
    entered and not exited inside a test leaves it pointing at an instance that is later
    collected, and then every `Definitions(...)` of a later test fails ("Attempted to resolve
    undefined DagsterInstance weakref"), depending on when the garbage collector runs. Resetting
    it around each test keeps the tests independent. (Dagster 1.13 has no public API for it.)
    """
    from dagster._core.storage.defs_state.base import set_defs_state_storage

    with set_defs_state_storage(None):
        yield


@pytest.fixture(scope="session")
def kinesis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The endpoint of a kinesalite on a free loopback port, stopped when the session ends.

    In memory (persist=False): tests need no restart survival, and reads are faster.
    """
    server = LocalKinesis(tmp_path_factory.mktemp("kinesis"), persist=False)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def kinesis(kinesis_server: str) -> Any:
    """A boto3 Kinesis client for the session's server."""
    return kinesis_client(kinesis_server)


@pytest.fixture
def stream_name(kinesis: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh 2-shard stream for this test, deleted afterwards."""
    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", request.node.name)[:80]
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    ensure_stream(kinesis, name, shards=2)
    yield name
    delete_stream(kinesis, name)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real S3 API (moto_server, in memory) on a free loopback port for the test run."""
    with LocalMoto(tmp_path_factory.mktemp("moto-s3")) as server:
        yield server.address


S3_BUCKET = "streamguard-test"


@pytest.fixture
def s3_prefix(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh `s3://bucket/prefix` on the local S3, with this test's environment pointing
    delta-rs, boto3 and MLflow at it (as a deployment's environment would)."""
    for name, value in s3_environment(s3_endpoint).items():
        monkeypatch.setenv(name, value)
    ensure_bucket(s3_endpoint, S3_BUCKET)
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def lake_at(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[str], str]:
    """A fresh lake location by where: "local" (a folder under tmp_path) or "s3" (a prefix on
    the local S3, moto)."""

    def at(where: str) -> str:
        if where == "local":
            return str(tmp_path / "lake")
        assert where == "s3", where
        return f"{request.getfixturevalue('s3_prefix')}/lake"

    return at


@pytest.fixture(params=["local", "s3"])
def lake_root(request: pytest.FixtureRequest, lake_at: Callable[[str], str]) -> str:
    """A fresh lake location: a local folder, then a prefix on the local S3 (moto)."""
    return lake_at(request.param)


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Kafka-protocol broker (noida-db) on a free loopback port for the test run."""
    from streamguard.local_kafka import local_kafka

    with local_kafka(tmp_path_factory.mktemp("kafka")) as bootstrap:
        yield bootstrap


@pytest.fixture
def kafka_config(kafka_bootstrap: str) -> Any:
    """The librdkafka client config for the test broker."""
    from streamguard.kafka import KafkaSettings, client_config

    return client_config(KafkaSettings(kafka_bootstrap))


def new_topic(config: Any, request: pytest.FixtureRequest, partitions: int = 2) -> str:
    """A fresh topic named after the test."""
    from streamguard.kafka import ensure_topic

    base = re.sub(r"[^a-zA-Z0-9_.-]+", "-", request.node.name)[:80]
    name = f"{base}-{uuid.uuid4().hex[:8]}"
    assert ensure_topic(config, name, partitions) == partitions
    return name


@pytest.fixture
def topic(kafka_config: Any, request: pytest.FixtureRequest) -> str:
    """A fresh 2-partition topic for this test."""
    return new_topic(kafka_config, request)


@pytest.fixture(scope="session")
def spark() -> Iterator[Any]:
    """The test run's one local Spark session (2 cores), stopped when the run ends."""
    from streamguard.spark.session import spark_session

    session = spark_session("streamguard-tests", master="local[2]")
    yield session
    session.stop()


def scoring_job(home: Path, tracking_uri: str, **resources: Any) -> Any:
    """The code location's scoring job with test resources: a state folder under the test's
    tmp path, the given MLflow store, no Kafka/files/Spark unless a test names them."""
    import dagster as dg

    from assets.definitions import AREAS
    from assets.resources import (
        FilesResource,
        HomeResource,
        KafkaResource,
        KinesisResource,
        MlflowResource,
        SparkResource,
    )

    given = {
        "home": HomeResource(root=str(home)),
        "kinesis": KinesisResource(),
        "kafka": KafkaResource(),  # no cluster: no alerts topic
        "files": FilesResource(),
        "mlflow": MlflowResource(tracking_uri=tracking_uri),
        "spark": SparkResource(),  # built lazily: only Spark runs start a session
        **resources,
    }
    defs = dg.Definitions.merge(*AREAS, dg.Definitions(resources=given))
    return defs.resolve_job_def("score_transactions_job")


# --------------------------------------------------------------------------- fraud fixtures


@pytest.fixture(scope="session")
def small_sim() -> Simulation:
    """A small seeded simulation: a few hundred transactions a day, every fraud scenario."""
    return simulate(days=12, customers=80, seed=3)


@pytest.fixture(scope="session")
def small_bank(small_sim: Simulation) -> AccountChanges:
    """The small simulation's bank accounts: full load and changes, as DMS would copy them."""
    return simulate_accounts(small_sim, seed=3)


@pytest.fixture(scope="session")
def tiny_model(small_sim: Simulation) -> LoadedModel:
    """A real model fitted on the small simulation's replayed features (no registry)."""
    features = replay(small_sim.transactions, small_sim.labels).features.to_pandas()
    labels = small_sim.labels.to_pandas()
    cutoff = pd.Timestamp(features["event_time"].max())
    result = train(features, labels, cutoff, pd.Timedelta(0))
    return LoadedModel(model=result.model, name=MODEL_NAME, version="test")


@pytest.fixture(scope="session")
def champion_home(tmp_path_factory: pytest.TempPathFactory, small_sim: Simulation) -> Home:
    """A STREAMGUARD_HOME with the simulation's files, labels loaded and a champion registered."""
    home = Home(tmp_path_factory.mktemp("home")).ensure()
    train_on_simulation(home, small_sim)
    return home


# --------------------------------------------------------------------------- training helpers


def sim_challenger(home: Path, sim: Simulation, **options: Any) -> tuple[Home, TrainingOutcome]:
    """A fresh state folder at `home` holding `sim`'s files, and a challenger trained on them
    (labels known at once) with `options` for `train_challenger`."""
    state = Home(home).ensure()
    write_simulation(sim, state.data)
    outcome = train_challenger(
        state,
        history=state.data / "transactions.parquet",
        labels=state.data / "labels.parquet",
        label_delay_days=0,
        **options,
    )
    return state, outcome


def logged_selection(selection: Selection, tmp_path: Path) -> tuple[Run, list[Run]]:
    """`selection` logged to a fresh MLflow store under `tmp_path`: its parent run and the
    child runs under it."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent_id = log_selection(selection, uri, tmp_path / "artifacts")
    client = mlflow_client(uri)
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    return parent, children
