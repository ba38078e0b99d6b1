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
    """The one root of all local state (`STREAMGUARD_HOME`), so a demo or test is one folder."""

    root: Path

    @classmethod
    def from_env(cls) -> Home:
        return cls(Path(os.environ.get("STREAMGUARD_HOME", DEFAULT_HOME)).resolve())

    @property
    def lake(self) -> Path:
        return self.root / "lake"

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
