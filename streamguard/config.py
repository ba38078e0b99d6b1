"""Where local state lives. Everything is read from the environment when asked, never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOME = ".streamguard"
# The bank's account history `streamguard generate` writes next to transactions and labels.
ACCOUNT_HISTORY_FILE = "accounts_history.parquet"


@dataclass(frozen=True)
class Home:
    """The one root of all local state (`STREAMGUARD_HOME`), so a demo or test is one folder.

    The lake and MLflow's artifacts may live elsewhere, in an object store: `lake_location`
    (`STREAMGUARD_LAKE_URI`, e.g. `s3://bucket/prefix`) and `artifacts_location`
    (`STREAMGUARD_MLFLOW_ARTIFACTS_URI`); unset, they are the folders under `root`.
    """

    root: Path
    lake_location: str | None = None
    artifacts_location: str | None = None

    @classmethod
    def from_env(cls) -> Home:
        return cls(
            Path(os.environ.get("STREAMGUARD_HOME", DEFAULT_HOME)).resolve(),
            lake_location=os.environ.get("STREAMGUARD_LAKE_URI") or None,
            artifacts_location=os.environ.get("STREAMGUARD_MLFLOW_ARTIFACTS_URI") or None,
        )

    @property
    def lake(self) -> Path:
        """The local lake folder (the default lake location)."""
        return self.root / "lake"

    @property
    def lake_uri(self) -> str:
        """Where the lake is: `lake_location`, else the local folder `lake`."""
        return self.lake_location or str(self.lake)

    def table(self, name: str) -> Path:
        return self.lake / name

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow"

    @property
    def mlflow_tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow / 'mlflow.db'}"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.mlflow / "artifacts"

    @property
    def mlflow_artifact_root(self) -> Path | str:
        """Where new MLflow experiments keep artifacts: `artifacts_location` (a URI such as
        `s3://bucket/mlflow`), else the local folder `mlflow_artifacts`."""
        return self.artifacts_location or self.mlflow_artifacts

    @property
    def dagster(self) -> Path:
        return self.root / "dagster"

    @property
    def kinesis(self) -> Path:
        return self.root / "kinesis"

    @property
    def kafka(self) -> Path:
        return self.root / "kafka"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def ensure(self) -> Home:
        dirs = (self.lake, self.mlflow_artifacts, self.dagster, self.kinesis, self.kafka, self.data)
        for path in dirs:
            path.mkdir(parents=True, exist_ok=True)
        return self
