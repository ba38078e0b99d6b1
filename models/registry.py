"""The fraud model in MLflow: the client, logging and registering a version, loading it to score.

Every function takes the tracking URI explicitly and talks to MLflow through its own
`MlflowClient`; nothing reads or sets MLflow's process-global tracking URI (which MLflow also
writes to the MLFLOW_TRACKING_URI environment variable). That matters because parts of MLflow
still resolve `models:/` URIs through a default client: `create_model_version` with a
`models:/<model_id>` source and `download_artifacts("models:/name/1")` both look in the global
store (see the TODO in mlflow's model-registry SQLAlchemy store), so this module registers with the
logged model's artifact location and downloads from the version's storage location instead.

Models are saved with skops, and loaded with the trusted-type list defined here, in code, rather
than the list stored in the artifact (which whoever wrote the artifact controls).

The rest of the model's life in MLflow has its own module: the promotion gate and the moves of
the `champion` alias (`models.promotion`), model selection runs (`models.selection_log`) and
backtest runs (`models.backtest_log`).
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import skops.io
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts
from mlflow.entities import LoggedModelOutput, Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature, infer_signature
from mlflow.sklearn import save_model
from mlflow.types.schema import ColSpec, Schema
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from models.features import FEATURE_COLUMNS, FEATURE_VERSION, feature_version, label_delay_of
from models.training import TrainResult, feature_matrix, openmp_limit

__all__ = [
    "ALERT_DAILY_BUDGET_TAG",
    "ALERT_THRESHOLD_TAG",
    "CANDIDATE_TRUSTED_TYPES",
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_METRIC",
    "EXPERIMENT",
    "FEATURE_DELAY_TAG",
    "FEATURE_VERSION_TAG",
    "MODEL_NAME",
    "PIP_PACKAGES",
    "SKOPS_TRUSTED_TYPES",
    "LoadedModel",
    "NoChampionError",
    "PromotionMetric",
    "StoreStamp",
    "alert_threshold",
    "alias_version",
    "artifact_location",
    "ensure_experiment",
    "iso_time",
    "load_model",
    "log_and_register",
    "mlflow_client",
    "pip_requirements",
    "resolve_version",
    "store_stamp",
    "utc_now",
]

MODEL_NAME = "fraud_model"
CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "fraud"
# The holdout metrics a challenger can be compared with the champion on (keys of
# `models.training.evaluate` that rank models; the others count rows).
PromotionMetric = Literal["average_precision", "roc_auc"]
DEFAULT_METRIC: PromotionMetric = "average_precision"

# What skops.io.get_untrusted_types reports for the fitted default model (models.training
# .make_default_model wrapped in its Platt calibration, PlattCalibrated: the LogitBlend class,
# the boosting's tree predictor and its step setting
# columns without any value to 0 (FillEmptyColumns), the logistic
# regression's ±inf-to-NaN function and its imputer's numpy dtypes; scikit-learn 1.9, skops 0.16;
# checked by tests/test_registry.py): everything else in it is a type skops trusts by default.
SKOPS_TRUSTED_TYPES: list[str] = [
    "models.training.FillEmptyColumns",
    "models.training.LogitBlend",
    "models.training.PlattCalibrated",
    "models.training._finite",
    "numpy.dtype",
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
]
# What the other candidate families of models.training.CANDIDATES add (random forest: the tree
# structure). Saved and loaded models may use SKOPS_TRUSTED_TYPES + these.
CANDIDATE_TRUSTED_TYPES: list[str] = [
    "sklearn.tree._tree.Tree",
]
_TRUSTED = [*SKOPS_TRUSTED_TYPES, *CANDIDATE_TRUSTED_TYPES]
# The version tag naming the features a model was trained on (`models.features.feature_version`),
# and the label delay D they were computed with, and where D came from (`models.label_delay`).
FEATURE_VERSION_TAG = "feature_version"
FEATURE_DELAY_TAG = "feature_label_delay_days"
# Version tags of the alert policy chosen on the validation period (training.choose_threshold).
ALERT_THRESHOLD_TAG = "alert_threshold"
ALERT_DAILY_BUDGET_TAG = "alert_daily_budget"
# Given explicitly: otherwise MLflow infers requirements by loading the model in a subprocess,
# which costs ~6-8 s per logged model.
PIP_PACKAGES: tuple[str, ...] = ("scikit-learn", "skops", "pandas", "numpy")


class NoChampionError(LookupError):
    """The registered model has no version behind the requested alias (nothing to score with)."""


@dataclass(frozen=True)
class LoadedModel:
    """A registered version loaded for scoring, with the version's tags (its alert threshold)."""

    model: Any  # the fitted scikit-learn Pipeline
    name: str
    version: str
    tags: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)  # version's

    @property
    def alert_threshold(self) -> float | None:
        """The alert threshold stored with the version, None when it has none."""
        return _threshold(self.tags)

    @property
    def feature_version(self) -> str:
        """The feature version it was trained on (tag `feature_version`); it scores only those.

        A model given without tags (benchmarks, tests) is taken to be on the default version.
        """
        return self.tags.get(FEATURE_VERSION_TAG) or FEATURE_VERSION

    @property
    def feature_delay_days(self) -> int:
        """The label delay D its features need (`models.features.label_delay_of`): the scorer
        computes them with it. Raises FeatureVersionError for a version this code cannot make."""
        return label_delay_of(self.feature_version)


def _sqlite_file(tracking_uri: str) -> Path | None:
    """The database file of a `sqlite:` store (sqlite:////abs/path.db -> /abs/path.db)."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite" or parsed.path in ("", "/:memory:"):
        return None
    return Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path)


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """A client for this tracking store and its registry (same URI), never the global one."""
    database = _sqlite_file(tracking_uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)  # SQLite creates the file only
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


@dataclass(frozen=True)
class StoreStamp:
    """What a SQLite store's files looked like: any write to the store changes it."""

    files: tuple[tuple[int, int, int], ...]  # (inode, size, mtime_ns) of the db and journals
    newest_ns: int  # the latest modification time among them (ns since the epoch)


def store_stamp(tracking_uri: str) -> StoreStamp | None:
    """A stamp of the store's files, so a long-running scorer can tell (with a few `stat`s)
    that the registry has not changed since it resolved an alias, instead of asking it again.

    None for stores whose changes cannot be seen this way (a server, PostgreSQL). A write in the
    same clock tick as a stamp may leave it equal: trust a stamp only once `newest_ns` is older
    than the filesystem's timestamp granularity.
    """
    database = _sqlite_file(tracking_uri)
    if database is None:
        return None
    files = []
    for path in (database, Path(f"{database}-wal"), Path(f"{database}-journal")):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        files.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return StoreStamp(tuple(files), max((f[2] for f in files), default=0))


def pip_requirements() -> list[str]:
    """The packages a loaded model needs, pinned to the versions installed here."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in PIP_PACKAGES]


def artifact_location(artifact_root: Path | str) -> str:
    """`artifact_root` as MLflow's artifact location: an object-store URI (`s3://...`) as it is,
    a local folder (made here) as its `file://` URI."""
    if not isinstance(artifact_root, Path):
        scheme = urlparse(artifact_root).scheme
        if len(scheme) > 1 and scheme != "file":  # one letter: a Windows drive
            return artifact_root.rstrip("/")
        artifact_root = Path(
            url2pathname(urlparse(artifact_root).path) if scheme else artifact_root
        )
    artifact_root.mkdir(parents=True, exist_ok=True)
    return artifact_root.resolve().as_uri()


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path | str) -> str:
    """The experiment's id, creating it with its artifacts under `artifact_root` if needed.

    Shared by every module that logs runs (versions, selections, backtests), so each kind of run
    lands in an experiment whose artifacts live where the deployment keeps them: a local folder
    or an object-store URI (`s3://bucket/prefix`, with MLflow's S3 settings). An existing
    experiment keeps the location it was made with.
    """
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_location(artifact_root)
        try:
            return client.create_experiment(name, artifact_location=location)
        except MlflowException as exc:  # created concurrently
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


def iso_time(moment: Any) -> str:
    """A moment as ISO 8601 text for MLflow params and tags ("" for None: params are strings)."""
    return "" if moment is None else pd.Timestamp(moment).isoformat()


def utc_now() -> str:
    """Now, as the ISO 8601 text the lifecycle tags and runs record (when it was decided)."""
    return datetime.now(UTC).isoformat()


def _metadata(result: TrainResult) -> dict[str, str]:
    """What the model was trained on: logged as run params and copied to the version's tags."""
    return {
        FEATURE_VERSION_TAG: feature_version(result.feature_delay_days),
        FEATURE_DELAY_TAG: str(result.feature_delay_days),
        "n_features": str(len(FEATURE_COLUMNS)),
        "cutoff": iso_time(result.cutoff),
        "label_delay": str(pd.Timedelta(result.label_delay)),
        "train_start": iso_time(result.train_start),
        "train_end": iso_time(result.train_end),
        "holdout_start": iso_time(result.holdout_start),
        "holdout_end": iso_time(result.holdout_end),
        "n_train": str(result.n_train),
        "n_holdout": str(result.n_holdout),
    }


def _signature(model: Any, sample: pd.DataFrame) -> ModelSignature:
    """Inferred from a sample, but with every input optional: NaN is a valid value everywhere."""
    with openmp_limit():
        inferred = infer_signature(sample, model.predict_proba(sample))
    assert inferred.inputs is not None
    inputs = Schema(
        [
            ColSpec(spec.type, spec.name, required=False)
            for spec in inferred.inputs.inputs
            if isinstance(spec, ColSpec)
        ]
    )
    return ModelSignature(inputs=inputs, outputs=inferred.outputs)


def _sample(result: TrainResult) -> pd.DataFrame:
    if result.sample is not None and len(result.sample):
        return feature_matrix(result.sample).head(10)
    return pd.DataFrame(np.full((1, len(FEATURE_COLUMNS)), np.nan), columns=FEATURE_COLUMNS)


def log_and_register(
    result: TrainResult,
    tracking_uri: str,
    artifact_root: Path | str,
    name: str = MODEL_NAME,
    experiment: str = EXPERIMENT,
) -> str:
    """Log a run (params, holdout metrics, training window) and the model; register a version.

    Returns the new version number. The version is tagged with the same metadata, so the
    registry alone tells what a version was trained on and how it scored.
    """
    client = mlflow_client(tracking_uri)
    experiment_id = ensure_experiment(client, experiment, artifact_root)
    metadata = _metadata(result)
    run = client.create_run(
        experiment_id,
        run_name=f"train-{pd.Timestamp(result.cutoff):%Y%m%dT%H%M}",
        tags={FEATURE_VERSION_TAG: metadata[FEATURE_VERSION_TAG], "model_name": name},
    )
    run_id = run.info.run_id
    model_id: str | None = None
    try:
        model_params = {k: str(v) for k, v in result.params.items()}
        logged = client.create_logged_model(
            experiment_id,
            name="model",
            source_run_id=run_id,
            params=model_params,
            tags={FEATURE_VERSION_TAG: metadata[FEATURE_VERSION_TAG]},
            model_type=f"sklearn.{type(result.model[-1]).__name__}",
        )
        model_id = logged.model_id
        client.log_outputs(run_id, [LoggedModelOutput(model_id, step=0)])
        now_ms = int(datetime.now(UTC).timestamp() * 1000)
        metrics = {f"holdout_{k}": float(v) for k, v in result.metrics.items()}
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now_ms, 0, model_id=model_id) for k, v in metrics.items()],
            params=[Param(k, v) for k, v in {**model_params, **metadata}.items()],
            tags=[
                RunTag("feature_columns", json.dumps(FEATURE_COLUMNS)),
                RunTag("model_id", model_id),
                RunTag("n_iter", str(getattr(result.model[-1], "n_iter_", ""))),
            ],
        )
        sample = _sample(result)
        with tempfile.TemporaryDirectory(prefix="fraud-model-") as tmp:
            local = Path(tmp) / "model"
            save_model(
                result.model,
                str(local),
                mlflow_model=Model(
                    artifact_path=logged.artifact_location,
                    run_id=run_id,
                    model_uuid=model_id,
                    model_id=model_id,
                ),
                serialization_format="skops",
                skops_trusted_types=_TRUSTED,
                signature=_signature(result.model, sample),
                input_example=sample.head(3),
                pip_requirements=pip_requirements(),
                pyfunc_predict_fn="predict_proba",
            )
            client.log_model_artifacts(model_id, str(local))
        client.finalize_logged_model(model_id, "READY")

        try:
            client.create_registered_model(
                name, description="Fraud score per transaction (P(fraud) from the features)."
            )
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name,
            source=logged.artifact_location,
            run_id=run_id,
            model_id=model_id,
            tags={
                **metadata,
                **{k: repr(v) for k, v in metrics.items()},
                "feature_columns": json.dumps(FEATURE_COLUMNS),
                "run_id": run_id,
                "model_id": model_id,
                "model_candidate": result.candidate,
                **result.tags,
            },
            description=(
                f"trained on {result.n_train:,} rows up to {iso_time(result.train_end)}; holdout "
                f"average_precision {result.metrics.get('average_precision', math.nan):.4f}, "
                f"roc_auc {result.metrics.get('roc_auc', math.nan):.4f}"
            ),
        )
        # What mlflow.register_model records: the logged model's page links to its version.
        client.set_logged_model_tags(
            model_id,
            {MLFLOW_MODEL_VERSIONS: json.dumps([{"name": name, "version": version.version}])},
        )
    except BaseException:
        if model_id is not None:
            client.finalize_logged_model(model_id, "FAILED")
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id, "FINISHED")
    return str(version.version)


def resolve_version(
    tracking_uri: str, name: str = MODEL_NAME, alias_or_version: str = CHAMPION
) -> str:
    """The version number behind an alias (or a version number, checked to exist)."""
    client = mlflow_client(tracking_uri)
    if str(alias_or_version).isdigit():
        try:
            return str(client.get_model_version(name, str(alias_or_version)).version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                raise LookupError(
                    f"{name!r} has no version {alias_or_version} in {tracking_uri}"
                ) from None
            raise
    try:
        return str(client.get_model_version_by_alias(name, alias_or_version).version)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise NoChampionError(
                f"no version of {name!r} has the alias {alias_or_version!r} in {tracking_uri}: "
                "train and promote a model first (`streamguard train`)"
            ) from None
        raise


@contextmanager
def _local_dir(source: str, tracking_uri: str) -> Iterator[Path]:
    """The version's artifacts on the local disk: in place if they are local, else downloaded."""
    parsed = urlparse(source)
    if parsed.scheme in ("", "file"):
        yield Path(url2pathname(parsed.path))
        return
    with tempfile.TemporaryDirectory(prefix="fraud-model-") as tmp:
        yield Path(download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri))


def load_model(
    tracking_uri: str, name: str = MODEL_NAME, alias_or_version: str = CHAMPION
) -> LoadedModel:
    """Load a registered version (by alias, e.g. "champion", or number) for scoring.

    Raises NoChampionError when the alias is not set. The model file is read with skops and
    `SKOPS_TRUSTED_TYPES`; a file needing any other type is refused.
    """
    version = resolve_version(tracking_uri, name, alias_or_version)
    client = mlflow_client(tracking_uri)
    source = client.get_model_version_download_uri(name, version)
    with _local_dir(source, tracking_uri) as local:
        flavor = Model.load(str(local)).flavors.get("sklearn", {})
        if flavor.get("serialization_format") != "skops":
            raise ValueError(
                f"{name} version {version} is not saved with skops "
                f"({flavor.get('serialization_format')!r}); refusing to unpickle it"
            )
        model = skops.io.load(local / flavor["pickled_model"], trusted=_TRUSTED)
    tags = dict(client.get_model_version(name, version).tags)
    return LoadedModel(model=model, name=name, version=version, tags=tags)


def _threshold(tags: dict[str, str]) -> float | None:
    raw = tags.get(ALERT_THRESHOLD_TAG, "")
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if 0.0 <= value <= 1.0 else None


def alert_threshold(
    tracking_uri: str, name: str = MODEL_NAME, alias_or_version: str = CHAMPION
) -> float | None:
    """The alert threshold stored with a version (tag `alert_threshold`), None when absent."""
    version = resolve_version(tracking_uri, name, alias_or_version)
    return _threshold(dict(mlflow_client(tracking_uri).get_model_version(name, version).tags))


def alias_version(tracking_uri: str, name: str = MODEL_NAME, alias: str = CHAMPION) -> str | None:
    """The version behind `alias`, or None when the alias (or the model) does not exist."""
    try:
        return resolve_version(tracking_uri, name, alias)
    except NoChampionError:
        return None
