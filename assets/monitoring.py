"""Drift monitoring and retrain triggers: is today's traffic still what the champion learned from?

`fraud_drift` compares the last days of the feature log (and their scores) with the rows inside
the champion's training window, as PSI per key feature (`models.drift`). Its check warns at a
significant shift; the sensor asks for a retrain when enough new fraud labels arrived or when the
latest drift measurement crosses the threshold.
"""

import base64
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import dagster as dg
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from mlflow.exceptions import MlflowException
from pydantic import Field

from assets.model import retrain_job
from assets.resources import HomeResource, MlflowResource
from models.drift import KEY_FEATURES, SIGNIFICANT, drift_report, psi_plot_png
from models.job import FEATURES, FEATURES_TABLE_SCHEMA, LABELS, SCORES, SCORES_TABLE_SCHEMA
from models.registry import mlflow_client
from models.schema import LABEL_SCHEMA, TIMESTAMP
from streamguard.lake import Lake

GROUP = "fraud_monitoring"
DRIFT_ASSET = "fraud_drift"
DRIFT_BELOW_THRESHOLD = "drift_psi_below_threshold"
# PSI at or above which drift is significant: the check warns and the sensor asks for a retrain.
DRIFT_PSI_THRESHOLD = SIGNIFICANT
# New fraud labels (since the last retrain request) worth a retrain: fewer barely move the model.
MIN_NEW_LABELS = 50
RETRAIN_SENSOR_INTERVAL_SECONDS = 300
MAX_PSI_KEY = "max_psi"


class DriftConfig(dg.Config):
    window_days: int = Field(
        default=7,
        description="Days of the feature log (up to its last event) that make the current window; "
        "also the size of the fallback training window when the champion has no window tags",
    )


@dataclass(frozen=True)
class Window:
    start: pd.Timestamp
    end: pd.Timestamp
    source: str

    def text(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M} .. {self.end:%Y-%m-%d %H:%M} UTC"


def champion_window(tracking_uri: str, name: str, alias: str) -> Window | None:
    """The champion's training window from its version tags; None if no champion or no tags.

    Other MLflow errors (an unreachable server) propagate: comparing with a made-up window
    instead would report drift against the wrong baseline without saying so.
    """
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and not Path(url2pathname(parsed.path[1:])).is_file():
        return None  # no store yet: opening it would create (and migrate) an empty database
    try:
        version = mlflow_client(tracking_uri).get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise
    start, end = version.tags.get("train_start"), version.tags.get("train_end")
    if not start or not end:
        return None
    return Window(
        _utc(start), _utc(end), f"{name} v{version.version} ({alias}) train_start/train_end tags"
    )


def _utc(moment: Any) -> pd.Timestamp:
    ts = pd.Timestamp(moment)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _between(start: pd.Timestamp, end: pd.Timestamp, *, open_start: bool = False) -> pc.Expression:
    lo = pa.scalar(start.to_pydatetime(), TIMESTAMP)
    hi = pa.scalar(end.to_pydatetime(), TIMESTAMP)
    field = pc.field("event_time")
    return ((field > lo) if open_start else (field >= lo)) & (field <= hi)


def _window_frame(lake: Lake, where: pc.Expression) -> pd.DataFrame:
    """Key features of the logged rows in the window, with their score (NaN if not scored)."""
    features = lake.read(
        FEATURES,
        columns=["transaction_id", "event_time", *KEY_FEATURES],
        filter=where,
        schema=FEATURES_TABLE_SCHEMA,
    ).to_pandas()
    scores = lake.read(
        SCORES, columns=["transaction_id", "score"], filter=where, schema=SCORES_TABLE_SCHEMA
    ).to_pandas()
    scores = scores.drop_duplicates("transaction_id", keep="last")
    return features.merge(scores, on="transaction_id", how="left")


def _markdown_table(report: pd.DataFrame) -> str:
    lines = ["| column | PSI | level | median train | median current |", "|---|---:|---|---:|---:|"]
    for row in report.sort_values("psi", ascending=False, na_position="last").itertuples():
        lines.append(
            f"| {row.column} | {row.psi:.4f} | {row.level} | "
            f"{row.expected_median:.4g} | {row.actual_median:.4g} |"
        )
    return "\n".join(lines)


@dg.asset(
    name=DRIFT_ASSET,
    group_name=GROUP,
    deps=[FEATURES, SCORES],
    description="PSI of key features and of the score: last days of the feature log vs the "
    "champion's training window.",
)
def fraud_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    home: HomeResource,
    mlflow: MlflowResource,
) -> dg.MaterializeResult:
    """Measure drift; the PSI per column is numeric metadata, so the UI plots it over time."""
    if config.window_days < 1:
        raise dg.Failure(f"window_days must be >= 1, got {config.window_days}")
    lake = home.lake()
    times = lake.read(FEATURES, columns=["event_time"], schema=FEATURES_TABLE_SCHEMA)["event_time"]
    if len(times) == 0:
        raise dg.Failure("the feature log is empty: nothing to measure drift on yet")
    first, last = _utc(pc.min(times).as_py()), _utc(pc.max(times).as_py())
    span = pd.Timedelta(days=config.window_days)
    current = Window(last - span, last, f"last {config.window_days} day(s) of the feature log")
    fallback = Window(
        first,
        first + span,
        f"first {config.window_days} day(s) of the feature log (fallback: {{why}})",
    )

    training = champion_window(mlflow.uri(home.home()), mlflow.model_name, mlflow.alias)
    if training is None:
        why = f"no {mlflow.alias} of {mlflow.model_name} with training-window tags"
    else:
        train_frame = _window_frame(lake, _between(training.start, training.end))
        why = f"no logged rows in the {mlflow.alias}'s window {training.text()}"
    if training is None or len(train_frame) == 0:
        training = Window(fallback.start, fallback.end, fallback.source.format(why=why))
        train_frame = _window_frame(
            lake, _between(training.start, training.end - pd.Timedelta(microseconds=1))
        )
        context.log.warning(f"training window: {training.source}")
    current_frame = _window_frame(lake, _between(current.start, current.end, open_start=True))

    scored = train_frame["score"].notna().any() and current_frame["score"].notna().any()
    report = drift_report(train_frame, current_frame, KEY_FEATURES, "score" if scored else None)
    psi = report.set_index("column")["psi"]
    worst = psi.idxmax() if psi.notna().any() else "-"
    max_psi = float(psi.max()) if psi.notna().any() else math.nan
    png = base64.b64encode(psi_plot_png(report)).decode("ascii")
    metadata: dict[str, dg.RawMetadataValue] = {
        MAX_PSI_KEY: dg.MetadataValue.float(max_psi),
        "max_psi_column": str(worst),
        "threshold": DRIFT_PSI_THRESHOLD,
        "columns_significant": int((report["psi"] >= DRIFT_PSI_THRESHOLD).sum()),
        "current_window": current.text(),
        "current_rows": len(current_frame),
        "training_window": training.text(),
        "training_window_source": training.source,
        "training_rows": len(train_frame),
        # Embedded in markdown so the UI shows the chart itself (a path is only text there).
        "drift_plot": dg.MetadataValue.md(f"![PSI per column](data:image/png;base64,{png})"),
        "report": dg.MetadataValue.md(_markdown_table(report)),
    }
    metadata.update({f"psi_{c}": dg.MetadataValue.float(float(v)) for c, v in psi.items()})
    return dg.MaterializeResult(metadata=metadata)


def latest_max_psi(instance: dg.DagsterInstance) -> float | None:
    """Max PSI of the latest `fraud_drift` materialization; None when never measured."""
    event = instance.get_latest_materialization_event(dg.AssetKey(DRIFT_ASSET))
    materialization = None if event is None else event.asset_materialization
    if materialization is None or MAX_PSI_KEY not in materialization.metadata:
        return None
    value = materialization.metadata[MAX_PSI_KEY].value
    return float(value) if isinstance(value, int | float) else None


@dg.asset_check(
    asset=fraud_drift,
    name=DRIFT_BELOW_THRESHOLD,
    description=f"Warns when a key feature or the score has PSI >= {DRIFT_PSI_THRESHOLD}.",
)
def drift_psi_below_threshold(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """Reads the latest measurement instead of measuring again: one number, one source."""
    max_psi = latest_max_psi(context.instance)
    if max_psi is None or math.isnan(max_psi):
        return dg.AssetCheckResult(
            passed=False,
            severity=dg.AssetCheckSeverity.WARN,
            description="no drift measurement with a max PSI (materialize fraud_drift)",
        )
    return dg.AssetCheckResult(
        passed=max_psi < DRIFT_PSI_THRESHOLD,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"max_psi": max_psi, "threshold": DRIFT_PSI_THRESHOLD},
    )


def _fraud_ids(lake: Lake, version: int | None) -> set[str]:
    if version is None or version < 0:
        return set()
    labels = lake.read(
        LABELS,
        columns=["transaction_id"],
        filter=pc.field("is_fraud") == True,  # noqa: E712
        version=version,
        schema=LABEL_SCHEMA,
    )
    return set(labels["transaction_id"].to_pylist())


def _new_fraud_labels(lake: Lake, since: int, now: int | None) -> int:
    """Fraud labels in the table now that were not fraud labels at version `since`.

    A set difference, not a row count: labels are upserted, so a re-load or a label changing
    its mind adds no new fraud. If version `since` is no longer readable (log cleaned up), every
    fraud label counts as new: a retrain too many beats one missed.
    """
    current = _fraud_ids(lake, now)
    try:
        before = _fraud_ids(lake, since)
    except Exception:  # delta-rs raises several types for a missing version
        before = set()
    return len(current - before)


@dg.sensor(
    name="retrain_on_new_labels_or_drift",
    job=retrain_job,
    minimum_interval_seconds=RETRAIN_SENSOR_INTERVAL_SECONDS,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description=f"Retrains after >= {MIN_NEW_LABELS} new fraud labels or when the latest "
    f"fraud_drift max PSI reaches {DRIFT_PSI_THRESHOLD}.",
)
def retrain_on_new_labels_or_drift(
    context: dg.SensorEvaluationContext, home: HomeResource
) -> dg.RunRequest | dg.SkipReason:
    """Cursor: JSON {"labels_version": labels table version of the last request, "drift_psi":
    the last max PSI seen}. The first evaluation only sets the cursor: the champion in place was
    trained on the labels already there, so they are not "new"."""
    lake = home.lake()
    version = lake.version(LABELS)
    now = -1 if version is None else version
    psi = latest_max_psi(context.instance)
    psi_seen = 0.0 if psi is None or math.isnan(psi) else round(psi, 6)
    if not context.cursor:
        context.update_cursor(json.dumps({"labels_version": now, "drift_psi": psi_seen}))
        return dg.SkipReason(
            f"First evaluation: cursor set at labels version {now} and PSI {psi_seen:.4f}; "
            "later labels and drift measurements are compared with these."
        )
    cursor = json.loads(context.cursor)
    since = int(cursor.get("labels_version", -1))
    new_frauds = _new_fraud_labels(lake, since, version) if now != since else 0
    drifted = psi_seen >= DRIFT_PSI_THRESHOLD and psi_seen != cursor.get("drift_psi")
    enough = new_frauds >= MIN_NEW_LABELS
    acted = ", already acted on" if psi_seen == cursor.get("drift_psi") else ""
    measured = "not measured" if psi is None else f"{psi_seen:.4f}"
    status = (
        f"{new_frauds} new fraud label(s) since labels version {since} (now {now}, retrain at "
        f">= {MIN_NEW_LABELS}); latest drift max PSI {measured} (retrain at >= "
        f"{DRIFT_PSI_THRESHOLD}{acted})"
    )
    if not (enough or drifted):
        context.update_cursor(json.dumps({"labels_version": since, "drift_psi": psi_seen}))
        return dg.SkipReason(f"No retrain: {status}.")
    context.update_cursor(json.dumps({"labels_version": now, "drift_psi": psi_seen}))
    reasons = [r for r, on in (("labels", enough), ("drift", drifted)) if on]
    run_key = f"retrain-labels-v{now}" + (f"-psi-{psi_seen:.4f}" if drifted else "")
    context.log.info(f"requesting {run_key}: {status}")
    return dg.RunRequest(
        run_key=run_key,
        tags={
            "streamguard/retrain_reason": ",".join(reasons),
            "streamguard/new_fraud_labels": str(new_frauds),
            "streamguard/labels_version": str(now),
            "streamguard/drift_psi": f"{psi_seen:.4f}",
        },
    )


defs = dg.Definitions(
    assets=[fraud_drift],
    asset_checks=[drift_psi_below_threshold],
    sensors=[retrain_on_new_labels_or_drift],
)
