"""Spark Structured Streaming jobs; Delta I/O goes through delta-rs (no Spark-side jars)."""
