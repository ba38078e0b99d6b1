"""Bench parts for the file source and the DMS change-data apply (imported by bench/run.py)."""

from __future__ import annotations

import csv
import io
import json
import time
from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from models.accounts import ACCOUNT_SCHEMA, simulate_accounts
from models.registry import LoadedModel
from models.schema import TRANSACTION_SCHEMA, to_payload
from models.simulate import simulate
from streamguard.cdc import apply_changes
from streamguard.dms import DmsSource, write_dms_output
from streamguard.files import FILES_SHARD, FileSource
from streamguard.lake import Lake
from streamguard.pipeline import scoring_job_name, scoring_runner

HINTS = "amount double, channel string, location string"


def _write(folder: Path, table: pa.Table, fmt: str, files: int) -> int:
    """`table` as `files` files of one format; returns their bytes."""
    folder.mkdir(parents=True)
    step = -(-table.num_rows // files)
    size = 0
    for i in range(files):
        part = table.slice(i * step, step)
        path = folder / f"part-{i:05d}.{'jsonl' if fmt == 'json' else fmt}"
        if fmt == "parquet":
            pq.write_table(part, path)
        else:
            rows = [json.loads(to_payload(r)) for r in part.to_pylist()]
            if fmt == "json":
                path.write_bytes(b"".join(json.dumps(r).encode() + b"\n" for r in rows))
            else:
                out = io.StringIO()
                writer = csv.DictWriter(out, fieldnames=TRANSACTION_SCHEMA.names)
                writer.writeheader()
                writer.writerows(rows)
                path.write_text(out.getvalue())
        size += path.stat().st_size
    return size


def bench_files(
    transactions: pa.Table, model: LoadedModel, batch: int, work: Path, files: int = 20
) -> dict:
    """Per format: the file source alone (list, log, read) and end to end through the runner."""
    table = transactions.select(TRANSACTION_SCHEMA.names)
    out: dict = {"rows": table.num_rows, "files": files}
    for fmt in ("json", "csv", "parquet"):
        folder = work / f"files-{fmt}"
        size = _write(folder / "in", table, fmt, files)
        source = FileSource(folder / "in", Lake(folder / "lake-alone"), schema_hints=HINTS)
        started = time.perf_counter()
        after, n = None, 0
        while got := source.read(FILES_SHARD, after, None, batch):
            n, after = n + len(got), got[-1].sequence_number
        alone = time.perf_counter() - started
        lake = Lake(folder / "lake-runner")
        source = FileSource(folder / "in", lake, schema_hints=HINTS)
        runner = scoring_runner(
            lake,
            source,
            None,
            max_batch_records=batch,
            model=model,
            job=scoring_job_name("files", source.source),
        )
        started = time.perf_counter()
        scored = runner.run().n_records
        end_to_end = time.perf_counter() - started
        out[fmt] = {
            "megabytes": size / 1e6,
            "source_rows_per_s": n / alone,
            "source_files_per_s": files / alone,
            "runner_rows_per_s": scored / end_to_end,
        }
    return out


def bench_cdc(work: Path, days: int = 30, customers: int = 5_000) -> dict:
    """DMS changes applied per second, SCD1 and SCD2, one batch per simulated day of files."""
    accounts = simulate_accounts(simulate(days=days, customers=customers, seed=7), seed=7)
    total = accounts.full_load.num_rows + accounts.changes.num_rows
    folder = work / "dms"
    files = write_dms_output(
        folder,
        accounts.full_load,
        accounts.changes,
        schema="bank",
        table="accounts",
        format="parquet",
        full_load_time=accounts.snapshot_time,
        cdc_file_interval=timedelta(hours=6),
    )
    out: dict = {"changes": total, "files": len(files)}
    for scd in (1, 2):
        started = time.perf_counter()
        report = apply_changes(
            Lake(work / f"cdc-lake-{scd}"),
            DmsSource(str(folder), "bank", "accounts", format="parquet"),
            "accounts",
            keys=["account_id"],
            sequence_by="updated_at",
            stored_as_scd_type=scd,
            schema_hints=ACCOUNT_SCHEMA,
            max_files_per_batch=4,  # a simulated day of 6-hour change files
        )
        seconds = time.perf_counter() - started
        out[f"scd{scd}"] = {"batches": len(report.batches), "changes_per_s": total / seconds}
    return out
