"""The one SparkSession factory: local-friendly defaults, environment read only when called."""

from __future__ import annotations

import os
import sys
from urllib.parse import urlsplit

from pyspark.sql import SparkSession

ROCKSDB_PROVIDER = "org.apache.spark.sql.execution.streaming.state.RocksDBStateStoreProvider"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


def on_loopback(master: str) -> bool:
    """Whether the driver can stay on loopback: local mode, or a standalone master on this
    machine (`streamguard spark-cluster`), whose executors reach the driver on 127.0.0.1."""
    if master.startswith("local"):
        return True
    return master.startswith("spark://") and urlsplit(master).hostname in LOOPBACK_HOSTS


def spark_session(app_name: str = "streamguard", master: str | None = None) -> SparkSession:
    """Get or create the process's SparkSession.

    Master: the argument, else `STREAMGUARD_SPARK_MASTER`, else `local[*]`. Workers run this
    interpreter (the system python lacks pyarrow); the driver binds to loopback when its master
    is local or a standalone cluster on loopback (`on_loopback`); state lives in RocksDB (needed
    by `transformWithStateInPandas`, off the JVM heap). No UI (no port clashes between
    concurrent sessions), few shuffle partitions (tiny local batches), UTC everywhere.
    A session that already exists is returned as is: static settings cannot change after start.
    """
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    resolved = master or os.environ.get("STREAMGUARD_SPARK_MASTER") or "local[*]"
    builder = SparkSession.builder.appName(app_name).master(resolved)
    if on_loopback(resolved):
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
