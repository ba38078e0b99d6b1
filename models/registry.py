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

from models.features import FEATURE_COLUMNS, FEATURE_VERSION, KEY_COLUMNS
from models.training import (
    Selection,
    TrainResult,
    evaluate,
    feature_matrix,
    openmp_limit,
    score,
)

__all__ = [
    "ALERT_DAILY_BUDGET_TAG",
    "ALERT_THRESHOLD_TAG",
    "CANDIDATE_TRUSTED_TYPES",
    "CHALLENGER",
    "CHAMPION",
    "DEFAULT_METRIC",
    "EXPERIMENT",
    "MODEL_NAME",
    "PIP_PACKAGES",
    "PREVIOUS_CHAMPION",
    "SKOPS_TRUSTED_TYPES",
    "ChampionChange",
    "Evaluation",
    "LoadedModel",
    "NoChampionError",
    "PromotionDecision",
    "alert_threshold",
    "alias_version",
    "evaluate_challenger",
    "load_holdout",
    "load_model",
    "log_and_register",
    "log_holdout",
    "log_selection",
    "mlflow_client",
    "move_champion",
    "pip_requirements",
    "promote_if_better",
    "recorded_evaluation",
    "register_challenger",
    "resolve_version",
    "rollback",
    "score",
]

MODEL_NAME = "fraud_model"
CHAMPION = "champion"
CHALLENGER = "challenger"
EXPERIMENT = "fraud"
DEFAULT_METRIC = "average_precision"
# Tag (on the registered model, and on each version when it is promoted) naming the champion it
# replaced: what `rollback` goes back to.
PREVIOUS_CHAMPION = "previous_champion"
HOLDOUT_ARTIFACT = "holdout/holdout.parquet"

# What skops.io.get_untrusted_types reports for the fitted default model (models.training
# .make_default_model: the LogitBlend class, the boosting's tree predictor and its step setting
# columns without any value to 0 (FillEmptyColumns), the logistic
# regression's ±inf-to-NaN function and its imputer's numpy dtypes; scikit-learn 1.9, skops 0.16;
# checked by tests/test_registry.py): everything else in it is a type skops trusts by default.
SKOPS_TRUSTED_TYPES: list[str] = [
    "models.training.FillEmptyColumns",
    "models.training.LogitBlend",
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
    model: Any  # the fitted scikit-learn Pipeline
    name: str
    version: str
    tags: dict[str, str] = dataclasses.field(default_factory=dict, compare=False)  # version's

    @property
    def alert_threshold(self) -> float | None:
        """The alert threshold stored with the version, None when it has none."""
        return _threshold(self.tags)


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


def log_selection(
    selection: Selection,
    tracking_uri: str,
    artifact_root: Path,
    experiment: str = EXPERIMENT,
    name: str = MODEL_NAME,
) -> str:
    """Log a model selection: one parent run, one child run per (candidate, class weighting).

    Children carry the candidate's parameters and validation metrics and the tag
    `mlflow.parentRunId`; the parent the ranking, the winner and the validation window. Returns
    the parent run id (recorded on the version trained from the winner).
    """
    client = mlflow_client(tracking_uri)
    experiment_id = _experiment_id(client, experiment, Path(artifact_root))
    winner = selection.winner
    parent = client.create_run(
        experiment_id,
        run_name=f"select-{pd.Timestamp(selection.validation_end or _now()):%Y%m%dT%H%M}",
        tags={"model_name": name, "feature_version": FEATURE_VERSION, "kind": "model_selection"},
    )
    parent_id = str(parent.info.run_id)
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    try:
        for rank, result in enumerate(selection.ranking, start=1):
            child = client.create_run(
                experiment_id,
                run_name=result.name.replace("/", "-"),
                tags={
                    "mlflow.parentRunId": parent_id,
                    "model_name": name,
                    "candidate": result.candidate,
                    "class_weight": str(result.class_weight),
                    "rank": str(rank),
                },
            )
            child_id = str(child.info.run_id)
            metrics = {
                **{
                    f"validation_{k}": float(v)
                    for k, v in result.metrics.items()
                    if math.isfinite(float(v))
                },
                "fit_seconds": result.fit_seconds,
            }
            client.log_batch(
                child_id,
                metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items()],
                params=[
                    Param(k, str(v)[:6000])
                    for k, v in {
                        "candidate": result.candidate,
                        "class_weight": str(result.class_weight),
                        **result.params,
                    }.items()
                ],
            )
            client.set_terminated(child_id, "FINISHED")
        ranking = [
            {"candidate": r.candidate, "class_weight": r.class_weight, **r.metrics}
            for r in selection.ranking
        ]
        client.log_batch(
            parent_id,
            metrics=[
                Metric(f"winner_validation_{selection.metric}", v, now_ms, 0)
                for v in [float(winner.metrics.get(selection.metric, math.nan))]
                if math.isfinite(v)
            ]
            + [Metric("selection_seconds", selection.seconds, now_ms, 0)],
            params=[
                Param(k, v)
                for k, v in {
                    "metric": selection.metric,
                    "n_candidates": str(len(selection.ranking)),
                    "n_train": str(selection.n_train),
                    "n_validation": str(selection.n_validation),
                    "train_end": _iso(selection.train_end),
                    "validation_start": _iso(selection.validation_start),
                    "validation_end": _iso(selection.validation_end),
                }.items()
            ],
            tags=[
                RunTag("winner", winner.candidate),
                RunTag("winner_class_weight", str(winner.class_weight)),
                RunTag("ranking", json.dumps(ranking, default=str)[:5000]),
            ],
        )
    except BaseException:
        client.set_terminated(parent_id, "FAILED")
        raise
    client.set_terminated(parent_id, "FINISHED")
    return parent_id


@dataclass(frozen=True)
class Evaluation:
    """Challenger vs champion on one holdout: the evidence a promotion is decided on."""

    challenger_version: str
    champion_version: str | None  # None: there was no champion to compare with
    metric: str
    challenger_value: float
    champion_value: float | None  # None: no champion, or one on another feature version
    better: bool  # strictly better (or nothing comparable to beat): may become champion
    reason: str
    holdout_rows: int
    holdout_positives: int
    evaluated_at: str
    run_id: str = ""  # the MLflow run recording it ("" when not recorded)

    def metadata(self) -> dict[str, Any]:
        """Flat values for Dagster metadata or logs (None becomes NaN / "")."""
        return {
            "challenger_version": self.challenger_version,
            "champion_version": self.champion_version or "",
            "metric": self.metric,
            f"challenger_{self.metric}": self.challenger_value,
            f"champion_{self.metric}": (
                math.nan if self.champion_value is None else self.champion_value
            ),
            "better": self.better,
            "reason": self.reason,
            "holdout_rows": self.holdout_rows,
            "holdout_positives": self.holdout_positives,
            "evaluated_at": self.evaluated_at,
        }


@dataclass(frozen=True)
class ChampionChange:
    """One move of the `champion` alias, as recorded in the registry."""

    kind: str  # "first", "promotion", "manual", "rollback"
    version: str  # the champion after
    previous: str | None  # the champion before
    reason: str
    at: str
    changed: bool = True  # False: `version` already was the champion


def _now() -> str:
    return datetime.now(UTC).isoformat()


def alias_version(tracking_uri: str, name: str = MODEL_NAME, alias: str = CHAMPION) -> str | None:
    """The version behind `alias`, or None when the alias (or the model) does not exist."""
    try:
        return resolve_version(tracking_uri, name, alias)
    except NoChampionError:
        return None


def _value(metrics: dict[str, float], metric: str) -> float:
    if metric not in metrics:
        raise ValueError(f"unknown metric {metric!r}; one of {', '.join(metrics)}")
    return float(metrics[metric])


def _record_run(
    client: MlflowClient,
    name: str,
    version: str,
    run_name: str,
    params: dict[str, str],
    metrics: dict[str, float],
) -> str:
    """A finished MLflow run holding one lifecycle event, in the experiment of the version's run.

    Runs make the history queryable (search_runs by `event`), where tags only keep the latest.
    """
    source_run = client.get_model_version(name, version).run_id
    if not source_run:
        return ""
    experiment_id = client.get_run(source_run).info.experiment_id
    run = client.create_run(
        experiment_id, run_name=run_name, tags={"model_name": name, "event": run_name.split("-")[0]}
    )
    now_ms = int(datetime.now(UTC).timestamp() * 1000)
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, v, now_ms, 0) for k, v in metrics.items() if not math.isnan(v)],
        params=[Param(k, v) for k, v in params.items()],
    )
    client.set_terminated(run.info.run_id, "FINISHED")
    return str(run.info.run_id)


def log_holdout(tracking_uri: str, name: str, version: str, holdout: pd.DataFrame) -> None:
    """Store the version's holdout with its run, so a later check can re-run the comparison.

    The gate (a Dagster asset check) runs in another step than training; it must compare both
    models on exactly the rows the challenger was measured on, and against whichever version is
    champion when the check runs.
    """
    client = mlflow_client(tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise LookupError(f"{name} version {version} has no run to hold its holdout")
    keep = [c for c in [*KEY_COLUMNS, *FEATURE_COLUMNS, "label"] if c in holdout.columns]
    with tempfile.TemporaryDirectory(prefix="fraud-holdout-") as tmp:
        path = Path(tmp) / Path(HOLDOUT_ARTIFACT).name
        holdout[keep].reset_index(drop=True).to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), str(Path(HOLDOUT_ARTIFACT).parent))


def load_holdout(tracking_uri: str, name: str, version: str) -> pd.DataFrame:
    """The holdout stored by `log_holdout` for this version (LookupError when there is none)."""
    client = mlflow_client(tracking_uri)
    run_id = client.get_model_version(name, version).run_id
    if not run_id:
        raise LookupError(f"{name} version {version} has no run to hold its holdout")
    with tempfile.TemporaryDirectory(prefix="fraud-holdout-") as tmp:
        try:
            local = client.download_artifacts(run_id, HOLDOUT_ARTIFACT, tmp)
        except (OSError, MlflowException):
            raise LookupError(f"{name} version {version} has no stored holdout") from None
        return pd.read_parquet(local)


def evaluate_challenger(
    tracking_uri: str,
    name: str,
    version: str,
    holdout: pd.DataFrame,
    metric: str = DEFAULT_METRIC,
    record: bool = True,
) -> Evaluation:
    """Score `version` and the current champion on the same holdout; better only if strictly so.

    The holdout is the challenger's (labelled rows later than it trained on). A champion built on
    another FEATURE_VERSION cannot score today's features, so any challenger beats it. With
    `record`, the decision is kept as version tags on both versions, `promotion.*` on the
    challenger (decision "approved" or "rejected") and `evaluation.last_*` on the champion, and
    as an MLflow run with both metrics; "approved" becomes "promoted" when `champion` moves.
    """
    client = mlflow_client(tracking_uri)
    candidate_version = client.get_model_version(name, version)
    candidate = load_model(tracking_uri, name, version)
    candidate_value = _value(evaluate(candidate.model, holdout), metric)
    before = alias_version(tracking_uri, name, CHAMPION)
    n_pos = int(np.asarray(holdout["label"]).sum()) if "label" in holdout else 0
    champion_value: float | None = None
    if before == str(version):
        better, reason = False, f"already the {CHAMPION}"
        champion_value = candidate_value
    elif before is None:
        better, reason = True, f"no {CHAMPION} yet"
    else:
        champion_features = client.get_model_version(name, before).tags.get("feature_version")
        candidate_features = candidate_version.tags.get("feature_version", FEATURE_VERSION)
        if champion_features != candidate_features:
            better = True
            reason = (
                f"{CHAMPION} uses feature version {champion_features}, not {candidate_features}"
            )
        else:
            champion_value = _value(
                evaluate(load_model(tracking_uri, name, before).model, holdout), metric
            )
            if math.isnan(candidate_value):
                better, reason = False, f"{metric} undefined on the holdout (one class only)"
            elif math.isnan(champion_value) or candidate_value > champion_value:
                better, reason = True, f"{metric} {candidate_value:.4f} > {champion_value:.4f}"
            else:
                better, reason = False, f"{metric} {candidate_value:.4f} <= {champion_value:.4f}"
    evaluation = Evaluation(
        challenger_version=str(version),
        champion_version=before,
        metric=metric,
        challenger_value=candidate_value,
        champion_value=champion_value,
        better=better,
        reason=reason,
        holdout_rows=len(holdout),
        holdout_positives=n_pos,
        evaluated_at=_now(),
    )
    if not record or before == str(version):  # keep the tags of the decision that made it
        return evaluation
    run_id = _record_run(
        client,
        name,
        str(version),
        f"evaluate-v{version}-vs-v{before or 'none'}",
        {
            "challenger_version": str(version),
            "champion_version": before or "",
            "metric": metric,
            "decision": "approved" if better else "rejected",
            "reason": reason[:500],
            "holdout_rows": str(len(holdout)),
            "holdout_positives": str(n_pos),
            "evaluated_at": evaluation.evaluated_at,
        },
        {
            f"challenger_{metric}": candidate_value,
            f"champion_{metric}": math.nan if champion_value is None else champion_value,
        },
    )
    tags = {
        "promotion.decision": "approved" if better else "rejected",
        "promotion.reason": reason,
        "promotion.metric": metric,
        "promotion.candidate_value": repr(candidate_value),
        "promotion.champion_value": "" if champion_value is None else repr(champion_value),
        "promotion.champion_version_before": before or "",
        "promotion.holdout_rows": str(len(holdout)),
        "promotion.holdout_positives": str(n_pos),
        "promotion.decided_at": evaluation.evaluated_at,
        "promotion.run_id": run_id,
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, str(version), key, value)
    if before is not None:
        for key, value in {
            "evaluation.last_challenger": str(version),
            "evaluation.last_decision": tags["promotion.decision"],
            "evaluation.last_metric": metric,
            "evaluation.last_challenger_value": tags["promotion.candidate_value"],
            "evaluation.last_champion_value": tags["promotion.champion_value"],
            "evaluation.last_at": evaluation.evaluated_at,
            "evaluation.last_run_id": run_id,
        }.items():
            client.set_model_version_tag(name, before, key, value)
    return dataclasses.replace(evaluation, run_id=run_id)


def _float(text: str | None) -> float | None:
    return None if not text else float(text)


def recorded_evaluation(tracking_uri: str, name: str, version: str) -> Evaluation | None:
    """The last evaluation recorded on `version` by `evaluate_challenger`, or None."""
    tags = mlflow_client(tracking_uri).get_model_version(name, str(version)).tags
    decision = tags.get("promotion.decision")
    if decision is None or "promotion.candidate_value" not in tags:
        return None
    return Evaluation(
        challenger_version=str(version),
        champion_version=tags.get("promotion.champion_version_before") or None,
        metric=tags.get("promotion.metric", DEFAULT_METRIC),
        challenger_value=float(tags["promotion.candidate_value"]),
        champion_value=_float(tags.get("promotion.champion_value")),
        better=decision in ("approved", "promoted"),
        reason=tags.get("promotion.reason", ""),
        holdout_rows=int(tags.get("promotion.holdout_rows") or 0),
        holdout_positives=int(tags.get("promotion.holdout_positives") or 0),
        evaluated_at=tags.get("promotion.decided_at", ""),
        run_id=tags.get("promotion.run_id", ""),
    )


def move_champion(
    tracking_uri: str,
    name: str,
    version: str,
    kind: str,
    reason: str,
    evaluation: Evaluation | None = None,
) -> ChampionChange:
    """Point `champion` at `version`, remembering the champion it replaces.

    Every move is recorded: tags on both versions, the registered model's `previous_champion`
    and `last_champion_change` (JSON), and an MLflow run. `previous_champion` is also set on the
    new champion version itself (except by a rollback, which must not overwrite the history
    it walks back along), so repeated rollbacks go further back. A version that becomes champion
    stops being the challenger.
    """
    client = mlflow_client(tracking_uri)
    version = resolve_version(tracking_uri, name, str(version))  # exists, else LookupError
    before = alias_version(tracking_uri, name, CHAMPION)
    at = _now()
    if before == version:
        return ChampionChange(kind, version, before, f"already the {CHAMPION}", at, changed=False)
    client.set_registered_model_alias(name, CHAMPION, version)
    if alias_version(tracking_uri, name, CHALLENGER) == version:
        client.delete_registered_model_alias(name, CHALLENGER)
    change = ChampionChange(kind, version, before, reason, at)
    client.set_registered_model_tag(name, PREVIOUS_CHAMPION, before or "")
    client.set_registered_model_tag(
        name, "last_champion_change", json.dumps(dataclasses.asdict(change))
    )
    tags = {"champion.kind": kind, "champion.since": at, "champion.reason": reason}
    if kind != "rollback":
        tags[PREVIOUS_CHAMPION] = before or ""
    if evaluation is not None and evaluation.challenger_version == version:
        tags["promotion.decision"] = "promoted"
        tags["promotion.promoted_at"] = at
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if before is not None:
        client.set_model_version_tag(name, before, "promotion.replaced_by", version)
        client.set_model_version_tag(name, before, "champion.replaced_at", at)
        client.set_model_version_tag(name, before, "champion.replaced_by_kind", kind)
    metrics: dict[str, float] = {}
    if evaluation is not None:
        metrics[f"challenger_{evaluation.metric}"] = evaluation.challenger_value
        if evaluation.champion_value is not None:
            metrics[f"champion_{evaluation.metric}"] = evaluation.champion_value
    _record_run(
        client,
        name,
        version,
        f"{kind}-v{before or 'none'}-to-v{version}",
        {
            "kind": kind,
            "version": version,
            "previous_champion": before or "",
            "reason": reason[:500],
            "at": at,
        },
        metrics,
    )
    return change


def register_challenger(
    tracking_uri: str, name: str, version: str, evaluation: Evaluation | None = None
) -> str:
    """Make a new version the `challenger`, or the `champion` if there is none yet.

    Returns the alias it got. The challenger is shadow-scored by the runner and becomes champion
    only through an evaluation (`evaluate_challenger`) and `move_champion`.
    """
    if alias_version(tracking_uri, name, CHAMPION) is None:
        move_champion(tracking_uri, name, version, "first", f"no {CHAMPION} yet", evaluation)
        return CHAMPION
    client = mlflow_client(tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), "challenger.since", _now())
    return CHALLENGER


def rollback(tracking_uri: str, name: str = MODEL_NAME, to_version: str = "") -> ChampionChange:
    """Move `champion` back to the champion it replaced (or to `to_version`).

    "Previous" is the `previous_champion` tag of the current champion version, so a second
    rollback goes one step further back rather than toggling between two versions.
    """
    current = alias_version(tracking_uri, name, CHAMPION)
    if current is None:
        raise NoChampionError(f"{name!r} has no {CHAMPION} in {tracking_uri}: nothing to roll back")
    target = to_version
    if not target:
        tags = mlflow_client(tracking_uri).get_model_version(name, current).tags
        target = tags.get(PREVIOUS_CHAMPION, "")
        if not target:
            raise LookupError(
                f"{name} version {current} has no {PREVIOUS_CHAMPION}: nothing to roll back to"
            )
    reason = f"rollback from version {current}"
    return move_champion(tracking_uri, name, target, "rollback", reason)


def promote_if_better(
    tracking_uri: str,
    name: str,
    version: str,
    holdout: pd.DataFrame,
    metric: str = DEFAULT_METRIC,
    alias: str = CHAMPION,
) -> PromotionDecision:
    """Evaluate `version` against the champion and move `champion` to it if strictly better.

    The one-step gate for callers without a separate check (benchmarks, `streamguard train`):
    the same `evaluate_challenger` and `move_champion` the Dagster gate uses.
    """
    if alias != CHAMPION:
        raise ValueError(f"only the {CHAMPION!r} alias is promoted, got {alias!r}")
    evaluation = evaluate_challenger(tracking_uri, name, version, holdout, metric)
    if evaluation.better:
        move_champion(tracking_uri, name, version, "promotion", evaluation.reason, evaluation)
    return PromotionDecision(
        promoted=evaluation.better,
        candidate_metric=evaluation.challenger_value,
        champion_metric=evaluation.champion_value,
        champion_version_before=evaluation.champion_version,
        metric=metric,
        reason=evaluation.reason,
    )


def log_backtest(
    result: Any, tracking_uri: str, artifact_root: Path, experiment: str = "fraud-backtest"
) -> str:
    """Log a backtest (metrics of model and baseline, periods, plots, predictions) as one run.

    `result` is a `models.backtest.BacktestResult`; kept untyped here so the registry does not
    import the backtest module. Returns the MLflow run id.
    """
    client = mlflow_client(tracking_uri)
    run = client.create_run(_experiment_id(client, experiment, artifact_root))
    run_id = str(run.info.run_id)
    summary = result.to_dict()
    for prefix, block in (("model", summary["model"]), ("baseline", summary["baseline"])):
        for key, value in block.items():
            if (
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and math.isfinite(value)
            ):
                client.log_metric(run_id, f"{prefix}.{key}", float(value))
    for key in ("k", "budget", "n_train", "n_test", "n_train_fraud", "n_test_fraud"):
        if key in summary:
            client.log_param(run_id, key, summary[key])
    for key, value in summary.get("periods", {}).items():
        client.log_param(run_id, f"period.{key}", value)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "metrics.json").write_text(result.to_json())
        for name, png in result.plots().items():
            (folder / (name if name.endswith(".png") else f"{name}.png")).write_bytes(png)
        client.log_artifacts(run_id, str(folder))
    client.set_terminated(run_id)
    return run_id
