"""Scoring on Spark, measured: the champion as a pandas batch on the driver (what the Spark job
does) vs `mlflow.pyfunc.spark_udf` on the executors, on the same feature rows.

Called by bench/run.py with its Spark session; prints nothing, returns numbers for the table.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from models.features import FEATURE_COLUMNS
from models.registry import load_model, log_and_register
from models.training import TrainResult, feature_matrix, score


def bench_scoring(spark: Any, result: TrainResult, features: pd.DataFrame, work: Path) -> dict:
    """Rows per second of both ways of scoring the same rows with the same registered model."""
    import mlflow

    uri = f"sqlite:///{work / 'mlflow-scoring.db'}"
    version = log_and_register(result, uri, work / "mlflow-scoring-artifacts")
    x = feature_matrix(features).reset_index(drop=True)
    n = len(x)

    started = time.perf_counter()
    loaded = load_model(uri, alias_or_version=version)
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    on_driver = score(loaded.model, x)
    driver_s = time.perf_counter() - started

    mlflow.set_tracking_uri(uri)
    started = time.perf_counter()
    udf = mlflow.pyfunc.spark_udf(
        spark,
        f"models:/{loaded.name}/{version}",
        result_type="array<double>",  # predict_proba: [P(legitimate), P(fraud)]
        env_manager="local",
    )
    udf_build_s = time.perf_counter() - started
    frame = spark.createDataFrame(x).cache()
    frame.count()  # the rows are on the executors before the clock starts
    started = time.perf_counter()
    scored = (
        frame.select(udf(*[frame[c] for c in FEATURE_COLUMNS]).getItem(1).alias("score"))
        .toPandas()["score"]
        .to_numpy()
    )
    udf_s = time.perf_counter() - started
    frame.unpersist()
    return {
        "rows": n,
        "driver_rows_per_s": n / driver_s,
        "driver_load_s": load_s,
        "spark_udf_rows_per_s": n / udf_s,
        "spark_udf_build_s": udf_build_s,
        "max_abs_difference": float(np.max(np.abs(scored - on_driver))) if n else 0.0,
    }
