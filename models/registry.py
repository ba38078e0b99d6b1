"""The fraud model in MLflow: log and register a trained model, promote it, load it to score.

Every function takes the tracking URI explicitly and talks to MLflow through its own
`MlflowClient`; nothing reads or sets MLflow's process-global tracking URI (which MLflow also
writes to the MLFLOW_TRACKING_URI environment variable). That matters because parts of MLflow
still resolve `models:/` URIs through a default client: `create_model_version` with a
`models:/<model_id>` source and `download_artifacts("models:/name/1")` both look in the global
store (see the TODO in mlflow's model-registry SQLAlchemy store), so this module registers with the
logged model's artifact location and downloads from the version's storage location instead.

Models are saved with skops, and loaded with the trusted-type list defined here, in code, rather
than the list stored in the artifact (which whoever wrote the artifact controls).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
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

from models.features import FEATURE_COLUMNS, FEATURE_VERSION
from models.training import TrainResult, evaluate, feature_matrix, openmp_limit, score

__all__ = [
    "CHAMPION",
    "EXPERIMENT",
    "MODEL_NAME",
    "PIP_PACKAGES",
    "SKOPS_TRUSTED_TYPES",
    "LoadedModel",
    "NoChampionError",
    "PromotionDecision",
    "load_model",
    "log_and_register",
    "mlflow_client",
    "pip_requirements",
    "promote_if_better",
    "resolve_version",
    "score",
]

MODEL_NAME = "fraud_model"
CHAMPION = "champion"
EXPERIMENT = "fraud"

# What skops.io.get_untrusted_types reports for a fitted Pipeline([HistGradientBoostingClassifier])
# (scikit-learn 1.9, skops 0.16; checked by tests/test_registry.py): everything else in it is a
# type skops trusts by default.
SKOPS_TRUSTED_TYPES: list[str] = [
    "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
]
# Given explicitly: otherwise MLflow infers requirements by loading the model in a subprocess,
# which costs ~6-8 s per logged model.
PIP_PACKAGES: tuple[str, ...] = ("scikit-learn", "skops", "pandas", "numpy")


class NoChampionError(LookupError):
    """The registered model has no version behind the requested alias (nothing to score with)."""


@dataclass(frozen=True)
class LoadedModel:
    model: Any  # the fitted scikit-learn Pipeline
    name: str
    version: str


@dataclass(frozen=True)
class PromotionDecision:
    promoted: bool
    candidate_metric: float
    champion_metric: float | None  # None when there was no champion to compare with
    champion_version_before: str | None
    metric: str = "average_precision"
    reason: str = ""


def mlflow_client(tracking_uri: str) -> MlflowClient:
    """A client for this tracking store and its registry (same URI), never the global one."""
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and parsed.path not in ("", "/:memory:"):
        # sqlite:////abs/path.db -> /abs/path.db; SQLite creates the file, not its directory.
        Path(parsed.path[1:] if parsed.path.startswith("//") else parsed.path).parent.mkdir(
            parents=True, exist_ok=True
        )
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def pip_requirements() -> list[str]:
    """The packages a loaded model needs, pinned to the versions installed here."""
    return [f"{p}=={importlib.metadata.version(p)}" for p in PIP_PACKAGES]


def _experiment_id(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The experiment's id, creating it with its artifacts under `artifact_root` if needed."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        artifact_root.mkdir(parents=True, exist_ok=True)
        try:
            return client.create_experiment(
                name, artifact_location=artifact_root.resolve().as_uri()
            )
        except MlflowException as exc:  # created concurrently
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return str(experiment.experiment_id)


def _iso(moment: Any) -> str:
    return "" if moment is None else pd.Timestamp(moment).isoformat()


def _metadata(result: TrainResult) -> dict[str, str]:
    """What the model was trained on: logged as run params and copied to the version's tags."""
    return {
        "feature_version": FEATURE_VERSION,
        "n_features": str(len(FEATURE_COLUMNS)),
        "cutoff": _iso(result.cutoff),
        "label_delay": str(pd.Timedelta(result.label_delay)),
        "train_start": _iso(result.train_start),
        "train_end": _iso(result.train_end),
        "holdout_start": _iso(result.holdout_start),
        "holdout_end": _iso(result.holdout_end),
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
    artifact_root: Path,
    name: str = MODEL_NAME,
    experiment: str = EXPERIMENT,
) -> str:
    """Log a run (params, holdout metrics, training window) and the model; register a version.

    Returns the new version number. The version is tagged with the same metadata, so the
    registry alone tells what a version was trained on and how it scored.
    """
    client = mlflow_client(tracking_uri)
    experiment_id = _experiment_id(client, experiment, Path(artifact_root))
    metadata = _metadata(result)
    run = client.create_run(
        experiment_id,
        run_name=f"train-{pd.Timestamp(result.cutoff):%Y%m%dT%H%M}",
        tags={"feature_version": FEATURE_VERSION, "model_name": name},
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
            tags={"feature_version": FEATURE_VERSION},
            model_type="sklearn.HistGradientBoostingClassifier",
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
                skops_trusted_types=SKOPS_TRUSTED_TYPES,
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
            },
            description=(
                f"trained on {result.n_train:,} rows up to {_iso(result.train_end)}; holdout "
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
        model = skops.io.load(local / flavor["pickled_model"], trusted=SKOPS_TRUSTED_TYPES)
    return LoadedModel(model=model, name=name, version=version)


def _value(metrics: dict[str, float], metric: str) -> float:
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(metrics)}")
    return float(metrics[metric])


def promote_if_better(
    tracking_uri: str,
    name: str,
    version: str,
    holdout: pd.DataFrame,
    metric: str = "average_precision",
    alias: str = CHAMPION,
) -> PromotionDecision:
    """Move `alias` to `version` if there is no champion or the candidate is strictly better.

    Both models are scored on the same holdout (labelled rows later than the candidate trained
    on). A champion built on another FEATURE_VERSION cannot score today's features and is
    replaced. The decision is recorded as tags on the candidate version.
    """
    client = mlflow_client(tracking_uri)
    candidate_version = client.get_model_version(name, version)
    candidate = load_model(tracking_uri, name, version)
    candidate_value = _value(evaluate(candidate.model, holdout), metric)
    try:
        before: str | None = resolve_version(tracking_uri, name, alias)
    except NoChampionError:
        before = None

    champion_value: float | None = None
    if before == str(version):  # nothing to decide; keep the tags of the decision that made it
        return PromotionDecision(
            False, candidate_value, candidate_value, before, metric, f"already the {alias}"
        )
    if before is None:
        promoted, reason = True, f"no {alias} yet"
    else:
        champion_features = client.get_model_version(name, before).tags.get("feature_version")
        candidate_features = candidate_version.tags.get("feature_version", FEATURE_VERSION)
        if champion_features != candidate_features:
            promoted = True
            reason = f"{alias} uses feature version {champion_features}, not {candidate_features}"
        else:
            champion = load_model(tracking_uri, name, before)
            champion_value = _value(evaluate(champion.model, holdout), metric)
            if math.isnan(candidate_value):
                promoted, reason = False, f"{metric} undefined on the holdout (one class only)"
            elif math.isnan(champion_value) or candidate_value > champion_value:
                promoted, reason = True, f"{metric} {candidate_value:.4f} > {champion_value:.4f}"
            else:
                promoted, reason = False, f"{metric} {candidate_value:.4f} <= {champion_value:.4f}"

    n_pos = int(np.asarray(holdout["label"]).sum()) if "label" in holdout else 0
    tags = {
        "promotion.decision": "promoted" if promoted else "rejected",
        "promotion.reason": reason,
        "promotion.metric": metric,
        "promotion.candidate_value": repr(candidate_value),
        "promotion.champion_value": "" if champion_value is None else repr(champion_value),
        "promotion.champion_version_before": before or "",
        "promotion.holdout_rows": str(len(holdout)),
        "promotion.holdout_positives": str(n_pos),
        "promotion.decided_at": datetime.now(UTC).isoformat(),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if promoted:
        client.set_registered_model_alias(name, alias, str(version))
        if before is not None:
            client.set_model_version_tag(name, before, "promotion.replaced_by", str(version))
    return PromotionDecision(
        promoted=promoted,
        candidate_metric=candidate_value,
        champion_metric=champion_value,
        champion_version_before=before,
        metric=metric,
        reason=reason,
    )
