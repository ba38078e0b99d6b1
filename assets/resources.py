"""Dagster resources: where the lake is, which stream, which MLflow store. Read lazily."""

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field

from streamguard.config import Home
from streamguard.lake import Lake

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

IN_PROCESS, SPARK, SPARK_STATE_STORE = "in_process", "spark", "spark_state_store"
EXECUTORS = (IN_PROCESS, SPARK, SPARK_STATE_STORE)


def check_executor(value: str) -> str:
    """The executor name, or a ValueError naming the allowed ones."""
    if value not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {value!r}")
    return value


class HomeResource(dg.ConfigurableResource):
    """The platform's local state root (STREAMGUARD_HOME when unset)."""

    root: str | None = Field(
        default=None, description="State folder; defaults to $STREAMGUARD_HOME or .streamguard"
    )

    def home(self) -> Home:
        home = Home(Path(self.root).resolve()) if self.root else Home.from_env()
        return home.ensure()

    def lake(self) -> Lake:
        return Lake(self.home().lake)


class KinesisResource(dg.ConfigurableResource):
    """A Kinesis stream. The endpoint is configuration, so the same code runs on AWS."""

    stream: str | None = Field(
        default=None,
        description="Kinesis stream to read; unset: $STREAMGUARD_STREAM or transactions",
    )
    endpoint_url: str | None = Field(
        default=None,
        description="Kinesis endpoint; unset uses AWS_ENDPOINT_URL_KINESIS or AWS itself",
    )
    region_name: str | None = Field(default=None, description="AWS region (default us-east-1)")
    max_records_per_shard: int = Field(
        default=25_000, description="Most records per shard that one sensor-triggered run takes"
    )
    executor: str | None = Field(
        default=None,
        description="Executor of the runs the sensor requests (in_process | spark); "
        "unset: $STREAMGUARD_EXECUTOR or in_process. Keep one executor per stream",
    )

    @property
    def stream_name(self) -> str:
        return self.stream or os.environ.get("STREAMGUARD_STREAM", "transactions")

    @property
    def executor_name(self) -> str:
        """The executor for this stream's runs, validated (the environment read only here)."""
        return check_executor(self.executor or os.environ.get("STREAMGUARD_EXECUTOR") or IN_PROCESS)

    def client(self) -> Any:
        from streamguard.kinesis import kinesis_client

        return kinesis_client(self.endpoint_url, self.region_name)


class MlflowResource(dg.ConfigurableResource):
    """The MLflow tracking store and registry holding `fraud_model`."""

    tracking_uri: str | None = Field(
        default=None, description="MLflow tracking URI; defaults to SQLite under STREAMGUARD_HOME"
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


defs = dg.Definitions(
    resources={
        "home": HomeResource(),
        "kinesis": KinesisResource(),
        "mlflow": MlflowResource(),
        "spark": SparkResource(),
    }
)
