"""The fraud backtest as a configurable asset: train a period, skip the label delay, test."""

import base64
from datetime import timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.compute as pc
from pydantic import Field

from assets.resources import HomeResource, MlflowResource
from models.backtest import backtest, read_dataset
from models.backtest_log import log_backtest
from streamguard.config import ACCOUNT_HISTORY_FILE
from streamguard.pipeline import lake_accounts, read_accounts

GROUP = "fraud_model"


class BacktestConfig(dg.Config):
    transactions_path: str = Field(
        default="", description="Transactions Parquet/CSV; default $STREAMGUARD_HOME/data/..."
    )
    labels_path: str = Field(
        default="", description="Labels Parquet/CSV; default $STREAMGUARD_HOME/data/labels.parquet"
    )
    accounts_path: str = Field(
        default="",
        description="The bank's account history (Parquet or Delta); default "
        "$STREAMGUARD_HOME/data/accounts_history.parquet if there, else the lake's "
        "accounts_history, else none",
    )
    train_start: str = Field(
        default="", description="YYYY-MM-DD; default: 30 days after the first transaction"
    )
    train_days: int = Field(default=7, description="Days trained on")
    delay_days: int = Field(default=7, description="Days skipped so the training labels arrive")
    test_days: int = Field(default=7, description="Days tested on")
    k: int = Field(default=100, description="Cards an analyst reviews a day (card precision@k)")


METRICS = ("roc_auc", "average_precision", "card_precision_at_k", "recall_at_budget")
#: The columns of the comparison table: the summary's key and its short heading.
COMPARED = (("model", "model"), ("literature_baseline", "literature"), ("baseline", "baseline"))


def comparison_table(summary: dict[str, Any]) -> dg.MetadataValue:
    """The three models' metrics side by side, rounded, one row per metric: the asset page shows
    a table a person compares at a glance (the exact values stay in their own metadata entries,
    which Dagster plots across materializations)."""
    records = []
    for key in METRICS:
        row: dict[str, str | float | None] = {"metric": key}
        for prefix, heading in COMPARED:
            value = (summary.get(prefix) or {}).get(key)
            row[heading] = None if value is None else round(float(value), 3)
        records.append(dg.TableRecord(row))
    columns = [dg.TableColumn("metric", "string")]
    columns += [dg.TableColumn(heading, "float") for _, heading in COMPARED]
    return dg.MetadataValue.table(records, schema=dg.TableSchema(columns=columns))


def _image(png: bytes, title: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(
        f"![{title}](data:image/png;base64,{base64.b64encode(png).decode()})"
    )


@dg.asset(
    group_name=GROUP,
    description=(
        "Backtest of the default model against the literature's logistic-regression baseline."
    ),
)
def fraud_backtest(
    config: BacktestConfig, home: HomeResource, mlflow: MlflowResource
) -> dg.MaterializeResult:
    """Replay history, train, skip the delay, test; metrics and plots to MLflow and here."""
    place = home.home()
    tx_path = Path(config.transactions_path or place.data / "transactions.parquet")
    labels_path = Path(config.labels_path or place.data / "labels.parquet")
    transactions = read_dataset(tx_path)
    accounts_file = Path(config.accounts_path or place.data / ACCOUNT_HISTORY_FILE)
    if config.accounts_path or accounts_file.exists():
        accounts = read_accounts(accounts_file)
    else:
        accounts = lake_accounts(home.lake())
    start = (
        config.train_start
        or (pc.min(transactions["event_time"]).as_py() + timedelta(days=30)).date().isoformat()
    )
    result = backtest(
        transactions,
        read_dataset(labels_path),
        start,
        train_days=config.train_days,
        delay_days=config.delay_days,
        test_days=config.test_days,
        k=config.k,
        accounts=accounts,
    )
    run_id = log_backtest(result, mlflow.uri(place), place.mlflow_artifact_root)
    summary = result.to_dict()
    metadata: dict[str, dg.RawMetadataValue] = {
        "train_start": start,
        "n_train": result.n_train,
        "n_test": result.n_test,
        "mlflow_run_id": run_id,
    }
    if result.hard_rules is not None:
        metadata["hard_rule_frauds_caught"] = int(result.hard_rules["frauds_caught"])
        metadata["blocked_card_frauds"] = int(result.hard_rules["blocked_card_frauds"])
    metadata["comparison"] = comparison_table(summary)
    for prefix in ("model", "literature_baseline", "baseline"):
        for key in METRICS:
            value = summary[prefix].get(key)
            if value is not None:
                metadata[f"{prefix}_{key}"] = float(value)
    for name, png in result.plots().items():
        metadata[name.removesuffix(".png")] = _image(png, name)
    return dg.MaterializeResult(metadata=metadata)


defs = dg.Definitions(assets=[fraud_backtest])
