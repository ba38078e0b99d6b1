"""Bench part: the ceiling of the in-memory runner, stage by stage (imported by bench/run.py).

Each stage runs alone over the same transactions, in the same batches, then the whole runner
does; a stage's share is its seconds over the runner's for the same records. The stages:
JSON parsing (`parse_records`, and the record-by-record reference `parse_each`), the feature
function, the model (from a pandas DataFrame, as the job scores today, and from Arrow through a
numpy matrix), and the Delta writes of a batch's output tables. What the stages leave of the
runner's time is everything else it does (lake reads for duplicates, state and labels, rules,
table assembly, the exactly-once checks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from models.features import FeatureResult, FeatureState, compute_features
from models.job import OUTPUTS, FraudScoringJob, ScoringContext, with_lineage
from models.known_frauds import KnownFrauds
from models.registry import LoadedModel
from models.schema import RESCUED_DATA, ParseResult, parse_each, parse_records
from models.training import arrow_feature_matrix, score
from streamguard.kinesis import transaction_records
from streamguard.lake import APPEND_WRITER_PROPERTIES, Lake
from streamguard.pipeline import scoring_runner
from streamguard.sources import MemorySource

T = TypeVar("T")

# name in the results -> what the printed row says; in the order they are printed.
STAGES: dict[str, str] = {
    "parse": "JSON parse (parse_records)",
    "parse_each": "JSON parse, record by record",
    "features": "feature function (compute_features)",
    "to_pandas": "features Arrow -> pandas",
    "predict_pandas": "predict, pandas DataFrame",
    "arrow_matrix": "float64 matrix from Arrow (the job's)",
    "predict_arrow": "predict, numpy from Arrow (the job's)",
    "delta_append": "Delta append (write_deltalake)",
    "delta_merge": "Delta MERGE of the state tables",
}
# What the runner does today, one stage each (parse_each, to_pandas and predict_pandas are the
# alternatives measured next to them: the job scored from pandas before).
RUNNER_STAGES = (
    "parse",
    "features",
    "arrow_matrix",
    "predict_arrow",
    "delta_append",
    "delta_merge",
)


def _timed(seconds: dict[str, float], stage: str, fn: Callable[[], T]) -> T:
    started = time.perf_counter()
    out = fn()
    seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - started
    return out


def bench_ceiling(
    transactions: pa.Table, model: LoadedModel, batch: int, work: Path, n: int
) -> dict[str, Any]:
    """Every stage alone, then the in-memory runner, on the first `n` transactions."""
    records = list(transaction_records(transactions.slice(0, n)))
    payloads, keys = [r[0] for r in records], [r[1] for r in records]
    n = len(payloads)
    spans = [(offset, min(batch, n - offset)) for offset in range(0, n, batch)]
    seconds: dict[str, float] = {}

    parsed: list[ParseResult] = []
    for offset, size in spans:
        part = payloads[offset : offset + size]
        parsed.append(_timed(seconds, "parse", partial(parse_records, part)))
        _timed(seconds, "parse_each", partial(parse_each, part))

    state = FeatureState.empty()
    results: list[FeatureResult] = []
    for result in parsed:
        valid = result.valid.drop_columns(["record_index", RESCUED_DATA])
        out = _timed(seconds, "features", partial(compute_features, valid, state))
        state = state.updated(out.state)
        results.append(out)

    difference = 0.0
    for out in results:
        features = out.features
        frame = _timed(seconds, "to_pandas", features.to_pandas)
        a = _timed(seconds, "predict_pandas", partial(score, model.model, frame))
        _timed(seconds, "arrow_matrix", partial(arrow_feature_matrix, features))
        b = _timed(seconds, "predict_arrow", partial(score, model.model, features))
        difference = max(difference, float(np.max(np.abs(a - b), initial=0.0)))

    writes = _bench_writes(keys, spans, parsed, results, model, work, seconds)

    source = MemorySource.split(payloads, keys, n_shards=2)
    runner = scoring_runner(
        Lake(work / "ceiling-runner"), source, None, max_batch_records=batch, model=model
    )
    started = time.perf_counter()
    report = runner.run()
    runner_s = time.perf_counter() - started
    assert report.n_records == n, (report.n_records, n)

    stages = {
        name: {
            "seconds": seconds[name],
            "tx_per_s": n / seconds[name],
            "per_batch_seconds": seconds[name] / len(spans),
            "share_of_runner": seconds[name] / runner_s,
        }
        for name in STAGES
    }
    accounted = sum(seconds[name] for name in RUNNER_STAGES)
    return {
        "records": n,
        "batch_records": batch,
        "batches": len(spans),
        "runner_seconds": runner_s,
        "runner_tx_per_s": n / runner_s,
        "runner_batches": len(report.batches),
        "runner_per_batch_seconds": runner_s / max(1, len(report.batches)),
        "stages": stages,
        # Of the runner's time, what the stages it runs today do not account for.
        "runner_other_share": max(0.0, 1.0 - accounted / runner_s),
        # Those stages alone, back to back: the runner's ceiling with nothing else to do.
        "stages_tx_per_s": n / accounted,
        "delta_seconds_per_table": writes,
        "predict_max_abs_difference": difference,  # pandas vs Arrow scores: 0.0, bit-identical
        "parse_speedup_vs_record_by_record": seconds["parse_each"] / seconds["parse"],
    }


def _bench_writes(
    keys: list[str],
    spans: list[tuple[int, int]],
    parsed: list[ParseResult],
    results: list[FeatureResult],
    model: LoadedModel,
    work: Path,
    seconds: dict[str, float],
) -> dict[str, float]:
    """The batch's output tables, made by the job as the runner makes them, written to Delta.

    Appends go straight to `write_deltalake` (as `Lake.append` writes, its Parquet settings
    included, without its exactly-once check); the state tables are MERGEd by key with
    `Lake.upsert`, as the commit path does.
    """
    job = FraudScoringJob(None, model=model, shadow=False)
    context = ScoringContext(model_name=model.name, model_version=model.version)
    lake = Lake(work / "ceiling-delta")
    per_table: dict[str, float] = {}
    for batch_id, ((offset, _), result, out) in enumerate(zip(spans, parsed, results, strict=True)):
        now = datetime.now(UTC)
        valid = result.valid
        index = valid["record_index"].to_numpy() + offset
        rows = with_lineage(
            valid.drop_columns(["record_index", RESCUED_DATA]),
            batch_id,
            pa.array(["shard-000"] * valid.num_rows, pa.string()),
            pa.array([str(i + 1) for i in index], pa.string()),
            now,
            partition_keys=pa.array([keys[i] for i in index], pa.string()),
            rescued=valid[RESCUED_DATA],
        )
        tables = job.assemble(
            out.features, out.state, rows, context, batch_id, now, KnownFrauds.empty()
        )
        for spec in OUTPUTS:
            data = tables[spec.name].cast(spec.schema)
            started = time.perf_counter()
            if spec.key is None:
                lake.path(spec.name).mkdir(parents=True, exist_ok=True)
                write_deltalake(
                    lake.uri(spec.name),
                    data,
                    mode="append",
                    schema_mode="merge",
                    writer_properties=APPEND_WRITER_PROPERTIES,
                )
                stage = "delta_append"
            else:
                lake.upsert(spec.name, data, spec.key)
                stage = "delta_merge"
            took = time.perf_counter() - started
            seconds[stage] = seconds.get(stage, 0.0) + took
            per_table[spec.name] = per_table.get(spec.name, 0.0) + took
    return per_table


def ceiling_rows(ceiling: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(measure, tx/s, share of a runner batch) rows for the printed table."""
    rows = [
        (
            f"runner, in memory ({ceiling['records']:,} tx)",
            f"{ceiling['runner_tx_per_s']:,.0f} tx/s",
            "1.00",
        )
    ]
    for name, label in STAGES.items():
        stage = ceiling["stages"][name]
        rows.append(
            (f"  {label}", f"{stage['tx_per_s']:,.0f} tx/s", f"{stage['share_of_runner']:.3f}")
        )
    rows.append(("  the rest of the runner", "-", f"{ceiling['runner_other_share']:.3f}"))
    rows.append(
        (
            "the runner's stages alone, back to back",
            f"{ceiling['stages_tx_per_s']:,.0f} tx/s",
            f"{1 - ceiling['runner_other_share']:.3f}",
        )
    )
    return rows


def print_ceiling(ceiling: dict[str, Any]) -> None:
    print(
        f"\nceiling of the in-memory runner ({ceiling['records']:,} transactions, "
        f"{ceiling['batches']} batches of {ceiling['batch_records']:,}; "
        f"runner {ceiling['runner_per_batch_seconds']:.2f} s per batch)"
    )
    print(f"{'stage':44} {'value':>16} {'share of runner':>16}")
    for name, value, share in ceiling_rows(ceiling):
        print(f"{name:44} {value:>16} {share:>16}")
    per_table = ", ".join(f"{k} {v:.2f} s" for k, v in ceiling["delta_seconds_per_table"].items())
    print(f"Delta writes per table (all batches): {per_table}")
    print(f"predict pandas vs Arrow, max |difference|: {ceiling['predict_max_abs_difference']}")
