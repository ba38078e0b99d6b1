"""The promotion gate and the moves of the `champion` alias, on the MLflow registry.

A trained version is registered (`models.registry`) with its holdout (`log_holdout`), evaluated
against the champion on it (`evaluate_challenger`, recorded as tags and a run) and made the
`challenger` (`register_challenger`). One function, `decide_promotion`, decides whether a version
may replace the champion; `promote_if_better` acts on that decision. The Dagster check and
promotion asset, `streamguard train` and the benchmarks all go through them, so there is one
rule for what "better" means and which evaluation counts. `move_champion` and `rollback` are the
alias moves themselves (also the operator's manual override, with no gate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from models.features import (
    DELAYED_FEATURES,
    FEATURE_COLUMNS,
    FEATURE_VERSION,
    KEY_COLUMNS,
    features_at_version,
)
from models.registry import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_METRIC,
    MODEL_NAME,
    NoChampionError,
    PromotionMetric,
    alias_version,
    load_model,
    mlflow_client,
    resolve_version,
    utc_now,
)
from models.training import evaluate

__all__ = [
    "HOLDOUT_ARTIFACT",
    "PREVIOUS_CHAMPION",
    "ChampionChange",
    "ChampionKind",
    "Evaluation",
    "PromotionDecision",
    "decide_promotion",
    "evaluate_challenger",
    "load_holdout",
    "log_holdout",
    "move_champion",
    "promote_if_better",
    "recorded_evaluation",
    "register_challenger",
    "rollback",
]

# Tag (on the registered model, and on each version when it is promoted) naming the champion it
# replaced: what `rollback` goes back to.
PREVIOUS_CHAMPION = "previous_champion"
HOLDOUT_ARTIFACT = "holdout/holdout.parquet"
# Why `champion` moved: the first version, a gated promotion, an operator's choice, a rollback.
ChampionKind = Literal["first", "promotion", "manual", "rollback"]


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

    kind: ChampionKind
    version: str  # the champion after
    previous: str | None  # the champion before
    reason: str
    at: str
    changed: bool = True  # False: `version` already was the champion


def _value(metrics: dict[str, float], metric: str) -> float:
    """`metric` of `models.training.evaluate`'s result (ValueError naming the known ones)."""
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
    # With the delay-dependent features at the champion's version when it had another D
    # (`models.features.at_version`), so the gate compares the two on the same rows.
    other_versions = [
        c for c in holdout.columns if c.partition("@")[0] in DELAYED_FEATURES and "@" in c
    ]
    keep = [c for c in [*KEY_COLUMNS, *FEATURE_COLUMNS, "label"] if c in holdout.columns]
    keep += other_versions
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

    The holdout is the challenger's (labelled rows later than it trained on). A champion whose
    features differ only in the label delay D is scored on the same rows with its own delayed
    windows, when the holdout holds them (`models.features.at_version`, written by training when
    D moved). A champion built on another FEATURE_VERSION cannot score today's features, so any
    challenger beats it. With
    `record`, the decision is kept as version tags on both versions, `promotion.*` on the
    challenger (decision "approved" or "rejected") and `evaluation.last_*` on the champion, and
    as an MLflow run with both metrics; "approved" becomes "promoted" when `champion` moves.
    It measures; whether the version is promoted now is `decide_promotion`'s call.
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
        champion_rows: pd.DataFrame | None = holdout
        note = ""
        if champion_features != candidate_features:
            champion_rows = features_at_version(holdout, champion_features or FEATURE_VERSION)
            note = f" ({CHAMPION} on the same rows at its feature version {champion_features})"
        if champion_rows is None:
            better = True
            reason = (
                f"{CHAMPION} uses feature version {champion_features}, not {candidate_features}"
            )
        else:
            champion_value = _value(
                evaluate(load_model(tracking_uri, name, before).model, champion_rows), metric
            )
            if math.isnan(candidate_value):
                better, reason = False, f"{metric} undefined on the holdout (one class only)"
            elif math.isnan(champion_value) or candidate_value > champion_value:
                better = True
                reason = f"{metric} {candidate_value:.4f} > {champion_value:.4f}{note}"
            else:
                better = False
                reason = f"{metric} {candidate_value:.4f} <= {champion_value:.4f}{note}"
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
        evaluated_at=utc_now(),
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
    """A float tag back as a float ("" or absent: None)."""
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
    kind: ChampionKind,
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
    at = utc_now()
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
    only when `decide_promotion` approves it (`promote_if_better`, or the Dagster gate).
    """
    if alias_version(tracking_uri, name, CHAMPION) is None:
        move_champion(tracking_uri, name, version, "first", f"no {CHAMPION} yet", evaluation)
        return CHAMPION
    client = mlflow_client(tracking_uri)
    client.set_registered_model_alias(name, CHALLENGER, str(version))
    client.set_model_version_tag(name, str(version), "challenger.since", utc_now())
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


@dataclass(frozen=True)
class PromotionDecision:
    """The gate's verdict on one version, and the move of `champion` it led to (if any)."""

    version: str
    approved: bool  # may replace the champion: strictly better against the current one
    reason: str
    champion_version_before: str | None  # the champion it was judged against
    evaluation: Evaluation | None = None  # the evidence; None: none against this champion
    change: ChampionChange | None = None  # set by `promote_if_better` when approved

    @property
    def promoted(self) -> bool:
        """Whether `champion` moved to the version."""
        return self.change is not None and self.change.changed

    @property
    def metric(self) -> str:
        """The holdout metric the versions were compared on."""
        return self.evaluation.metric if self.evaluation is not None else DEFAULT_METRIC

    @property
    def candidate_metric(self) -> float:
        """The version's value of `metric` on its holdout (NaN without an evaluation)."""
        return self.evaluation.challenger_value if self.evaluation is not None else math.nan

    @property
    def champion_metric(self) -> float | None:
        """The champion's value on the same rows (None: no champion, or none comparable)."""
        return self.evaluation.champion_value if self.evaluation is not None else None


def decide_promotion(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    holdout: pd.DataFrame | None = None,
    metric: PromotionMetric | None = None,
    reevaluate: bool = True,
) -> PromotionDecision:
    """Whether `version` may replace the current champion: the one place a promotion is decided.

    The evidence must be an evaluation against the champion as it is now. Given a `holdout`,
    the version is evaluated on it (and the evaluation recorded). Otherwise the evaluation
    recorded on the version is reused when it was made against the current champion (and by
    `metric`, if given). When it was not (none yet, or the champion moved since, e.g. a
    rollback), it is made again on the holdout stored with the version (by `metric`, else the
    recorded one), or, without `reevaluate`, the version is not approved: a step that only acts
    on an earlier approval must not approve anything itself.
    """
    champion = alias_version(tracking_uri, name, CHAMPION)
    recorded = None if holdout is not None else recorded_evaluation(tracking_uri, name, version)
    if (
        recorded is not None
        and recorded.champion_version == champion
        and (metric is None or recorded.metric == metric)
    ):
        evaluation = recorded
    elif not reevaluate:
        reason = f"{name} version {version} has no approval against {CHAMPION} {champion}"
        return PromotionDecision(str(version), False, reason, champion, recorded)
    else:
        if holdout is None:
            holdout = load_holdout(tracking_uri, name, version)
        chosen = metric or (recorded.metric if recorded is not None else DEFAULT_METRIC)
        evaluation = evaluate_challenger(tracking_uri, name, version, holdout, chosen)
    return PromotionDecision(
        version=str(version),
        approved=evaluation.better,
        reason=evaluation.reason,
        champion_version_before=evaluation.champion_version,
        evaluation=evaluation,
    )


def promote_if_better(
    tracking_uri: str,
    name: str,
    version: str,
    holdout: pd.DataFrame | None = None,
    *,
    metric: PromotionMetric | None = None,
    reevaluate: bool = True,
) -> PromotionDecision:
    """Move `champion` to `version` if `decide_promotion` approves it (same arguments).

    For the steps that promote: the Dagster promotion asset (after the blocking check approved,
    with `reevaluate=False`), `streamguard train` and the benchmarks. The returned decision
    carries the move (`change`, `promoted`).
    """
    decision = decide_promotion(
        tracking_uri, name, version, holdout=holdout, metric=metric, reevaluate=reevaluate
    )
    if not decision.approved:
        return decision
    change = move_champion(
        tracking_uri, name, version, "promotion", decision.reason, decision.evaluation
    )
    return dataclasses.replace(decision, change=change)
