"""Dagster resources: where the lake is, which streams, which MLflow store, which Spark.

The resource classes hold typed settings and never read the environment themselves: which values
come from where is decided per deployment (`deployment_resources`), with `dagster.EnvVar`, so
secrets stay out of the run config, the UI and the logs.
"""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import dagster as dg
from pydantic import Field

from streamguard.config import DEFAULT_HOME, Home
from streamguard.kafka import KAFKA_ENV
from streamguard.lake import Lake

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

    from streamguard.files import FileSource
    from streamguard.kafka import ClientConfig, KafkaSettings

Executor = Literal["in_process", "spark", "spark_state_store"]
IN_PROCESS, SPARK, SPARK_STATE_STORE = get_args(Executor)
EXECUTORS: tuple[str, ...] = get_args(Executor)
Deployment = Literal["local", "production"]
DEPLOYMENTS: tuple[str, ...] = get_args(Deployment)


def check_executor(value: str) -> str:
    """The executor name, or a ValueError naming the allowed ones."""
    if value not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {value!r}")
    return value


class HomeResource(dg.ConfigurableResource):
    """The platform's state root: the lake, MLflow's local store, checkpoints, data files."""

    root: str = Field(default=DEFAULT_HOME, description="State folder (STREAMGUARD_HOME)")
    lake_uri: str | None = Field(
        default=None,
        description="The lake in an object store, s3://bucket/prefix (STREAMGUARD_LAKE_URI); "
        "unset: the folder lake/ under root",
    )
    mlflow_artifacts_uri: str | None = Field(
        default=None,
        description="MLflow artifact root for new experiments, e.g. s3://bucket/mlflow "
        "(STREAMGUARD_MLFLOW_ARTIFACTS_URI); unset: mlflow/artifacts under root",
    )

    def home(self) -> Home:
        root = Path(self.root).resolve()
        return Home(root, self.lake_uri or None, self.mlflow_artifacts_uri or None).ensure()

    def lake(self) -> Lake:
        return Lake(self.home().lake_uri)


class KinesisResource(dg.ConfigurableResource):
    """A Kinesis stream. The endpoint is configuration, so the same code runs on AWS."""

    stream: str = Field(default="transactions", description="Kinesis stream to read")
    endpoint_url: str | None = Field(
        default=None,
        description="Kinesis endpoint; unset: AWS_ENDPOINT_URL_KINESIS or AWS itself",
    )
    region_name: str | None = Field(default=None, description="AWS region (default us-east-1)")
    max_records_per_shard: int = Field(
        default=25_000, description="Most records per shard that one sensor-triggered run takes"
    )
    executor: str = Field(
        default=IN_PROCESS,
        description="Executor of the runs the sensor requests (in_process | spark | "
        "spark_state_store). Keep one executor per stream",
    )

    @property
    def stream_name(self) -> str:
        return self.stream

    @property
    def executor_name(self) -> str:
        """The executor for this stream's runs, validated."""
        return check_executor(self.executor)

    def client(self) -> Any:
        from streamguard.kinesis import kinesis_client

        return kinesis_client(self.endpoint_url, self.region_name)


class KafkaResource(dg.ConfigurableResource):
    """A Kafka cluster (self-managed, Amazon MSK, Confluent Cloud, Azure Event Hubs): the topic
    the transactions arrive on and the topic alerts are published to.

    Unconfigured (no bootstrap and no Event Hubs connection string) means no Kafka: the Kafka
    sensor skips and alerts are not published. Credentials come from the environment through
    `dagster.EnvVar` (see `deployment_resources`), never from run config.
    """

    bootstrap: str = Field(default="", description="Bootstrap servers, host:port[,host:port]")
    topic: str = Field(default="transactions", description="Topic the transactions arrive on")
    security: str = Field(
        default="plain",
        description="plain | scram | msk_iam | event_hubs | confluent_cloud",
    )
    username: str | None = Field(default=None, description="SASL/SCRAM user name")
    password: str | None = Field(default=None, description="SASL/SCRAM password (secret)")
    scram_mechanism: str = Field(default="SCRAM-SHA-512", description="SCRAM-SHA-512 | -256")
    region: str | None = Field(default=None, description="AWS region, for MSK IAM")
    connection_string: str | None = Field(
        default=None, description="Azure Event Hubs namespace connection string (secret)"
    )
    api_key: str | None = Field(default=None, description="Confluent Cloud API key")
    api_secret: str | None = Field(default=None, description="Confluent Cloud API secret")
    alerts_topic: str = Field(
        default="fraud-alerts", description="Where every alert is published; empty: nowhere"
    )
    max_records_per_partition: int = Field(
        default=25_000, description="Most records per partition one sensor-triggered run takes"
    )
    executor: str = Field(
        default=IN_PROCESS, description="Executor of this topic's runs (in_process | spark | ...)"
    )

    @property
    def enabled(self) -> bool:
        return bool(self.bootstrap or self.connection_string)

    @property
    def executor_name(self) -> str:
        return check_executor(self.executor)

    def settings(self) -> "KafkaSettings":
        from streamguard.kafka import KafkaSettings

        return KafkaSettings(
            bootstrap=self.bootstrap,
            security=self.security,  # type: ignore[arg-type]  # validated by KafkaSettings
            username=self.username,
            password=self.password,
            scram_mechanism=self.scram_mechanism,  # type: ignore[arg-type]
            region=self.region,
            connection_string=self.connection_string,
            api_key=self.api_key,
            api_secret=self.api_secret,
        )

    def config(self) -> "ClientConfig":
        """The librdkafka client config (its repr masks the secrets)."""
        from streamguard.kafka import client_config

        return client_config(self.settings())


class FilesResource(dg.ConfigurableResource):
    """A folder (or `s3://` prefix) where transaction files land: JSON lines, CSV, Parquet.

    Unconfigured (no folder) means no file source: its sensor skips with the reason.
    """

    folder: str = Field(default="", description="Folder or s3:// prefix of transaction files")
    format: str | None = Field(default=None, description="json | csv | parquet; unset: by name")
    schema_mode: str = Field(
        default="addNewColumns",
        description="What a new column does: addNewColumns | rescue | failOnNewColumns | none",
    )
    schema_hints: str | None = Field(
        default="amount double, channel string, location string",
        description='Column types the inference must not guess, e.g. "amount double"',
    )
    max_files_per_batch: int | None = Field(default=None, description="Most files a batch begins")
    executor: str = Field(default=IN_PROCESS, description="in_process (Spark: not for files yet)")

    @property
    def enabled(self) -> bool:
        return bool(self.folder)

    def source(self, lake: Lake) -> "FileSource":
        """The runner's source over the folder; its file log and schema live in `lake`."""
        from streamguard.files import FileSource

        return FileSource(
            self.folder,
            lake,
            self.format,  # type: ignore[arg-type]  # validated by FileSource
            schema_mode=self.schema_mode,  # type: ignore[arg-type]
            schema_hints=self.schema_hints,
            max_files_per_batch=self.max_files_per_batch,
        )


class MlflowResource(dg.ConfigurableResource):
    """The MLflow tracking store and registry holding `fraud_model`."""

    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; unset: SQLite under the state folder"
    )
    model_name: str = Field(default="fraud_model", description="Registered model name")
    alias: str = Field(default="champion", description="Alias the scoring runs load")

    def uri(self, home: Home) -> str:
        return self.tracking_uri or home.mlflow_tracking_uri


class SparkResource(dg.ConfigurableResource):
    """A SparkSession, built on first use (so loading definitions never starts a JVM)."""

    master: str | None = Field(
        default=None, description="Spark master; unset: $STREAMGUARD_SPARK_MASTER or local[*]"
    )
    app_name: str = Field(default="streamguard", description="Spark application name")

    def session(self) -> "SparkSession":
        from streamguard.spark.session import spark_session

        return spark_session(self.app_name, self.master)


# Where each setting comes from: resource -> field -> (environment variable, local default).
# A secret is only ever passed as an EnvVar, so its value never lands in the run config.
SETTINGS: dict[str, dict[str, tuple[str, Any]]] = {
    "home": {
        "root": ("STREAMGUARD_HOME", DEFAULT_HOME),
        "lake_uri": ("STREAMGUARD_LAKE_URI", None),
        "mlflow_artifacts_uri": ("STREAMGUARD_MLFLOW_ARTIFACTS_URI", None),
    },
    "kinesis": {
        "stream": ("STREAMGUARD_STREAM", "transactions"),
        "endpoint_url": ("AWS_ENDPOINT_URL_KINESIS", None),
        "region_name": ("AWS_REGION", None),
        "executor": ("STREAMGUARD_EXECUTOR", IN_PROCESS),
    },
    "kafka": {
        "bootstrap": ("STREAMGUARD_KAFKA_BOOTSTRAP", ""),
        "topic": ("STREAMGUARD_KAFKA_TOPIC", "transactions"),
        # Security settings: the names every entry point reads (streamguard.kafka.KAFKA_ENV).
        **{field: (variable, None) for field, variable in KAFKA_ENV.items()},
        "alerts_topic": ("STREAMGUARD_ALERTS_TOPIC", "fraud-alerts"),
        "executor": ("STREAMGUARD_KAFKA_EXECUTOR", IN_PROCESS),
    },
    "files": {
        "folder": ("STREAMGUARD_FILES_DIR", ""),
        "format": ("STREAMGUARD_FILES_FORMAT", None),
        "schema_mode": ("STREAMGUARD_FILES_SCHEMA_MODE", "addNewColumns"),
        "schema_hints": ("STREAMGUARD_FILES_SCHEMA_HINTS", None),
    },
    "mlflow": {"tracking_uri": ("MLFLOW_TRACKING_URI", None)},
    "spark": {"master": ("STREAMGUARD_SPARK_MASTER", None)},
}
# Production has no local defaults for these: it fails at load, naming what is missing.
REQUIRED_IN_PRODUCTION = ("STREAMGUARD_HOME", "MLFLOW_TRACKING_URI")
RESOURCES: dict[str, type[dg.ConfigurableResource]] = {
    "home": HomeResource,
    "kinesis": KinesisResource,
    "kafka": KafkaResource,
    "files": FilesResource,
    "mlflow": MlflowResource,
    "spark": SparkResource,
}


def deployment_resources(
    deployment: Deployment, environ: dict[str, str] | None = None
) -> dict[str, dg.ConfigurableResource]:
    """The resources of a deployment: each setting an `EnvVar` when its variable is set
    (resolved by Dagster when a run uses it), else the local default.

    `production` takes no local default for the state folder and the MLflow store (a shared
    deployment must say where they are); it fails here, at load, naming the missing variables.
    """
    if deployment not in DEPLOYMENTS:
        raise ValueError(f"deployment must be one of {', '.join(DEPLOYMENTS)}, got {deployment!r}")
    env = os.environ if environ is None else environ
    if deployment == "production":
        missing = [name for name in REQUIRED_IN_PRODUCTION if not env.get(name)]
        if missing:
            raise ValueError(f"the production deployment needs {', '.join(missing)} set")
    built: dict[str, dg.ConfigurableResource] = {}
    for key, fields in SETTINGS.items():
        values = {
            field: dg.EnvVar(variable) if env.get(variable) else default
            for field, (variable, default) in fields.items()
        }
        built[key] = RESOURCES[key](**{k: v for k, v in values.items() if v is not None})
    return built
