"""The one SparkSession factory: local-friendly defaults, environment read only when called."""

from __future__ import annotations

import os
import sys

from pyspark.sql import SparkSession

ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"


def spark_session(app_name: str = "streamguard", master: str | None = None) -> SparkSession:
    """Get or create the process's SparkSession.

    Master: the argument, else `STREAMGUARD_SPARK_MASTER`, else `local[*]`. Workers run this
    interpreter (the system python lacks pyarrow); a local driver binds to loopback; state lives
    in RocksDB (needed by `transformWithStateInPandas`, off the JVM heap). No UI (no port clashes
    between concurrent sessions), few shuffle partitions (tiny local batches), UTC everywhere.
    A session that already exists is returned as is: static settings cannot change after start.
    """
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    resolved = master or os.environ.get("STREAMGUARD_SPARK_MASTER") or "local[*]"
    builder = SparkSession.builder.appName(app_name).master(resolved)
    if resolved.startswith("local"):
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
    spark = (
        builder.config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "4")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.sql.streaming.stateStore.providerClass", ROCKSDB_PROVIDER)
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("WARN")
    return spark
