"""The README's backtest tables: the default model against the baseline, 3 seeds x 3 windows.

Each seed's 60 days x 1,000 customers (the demo's size) with the bank's account history; each
window is `streamguard backtest` with `--train-start` day 30, 37 (7 training days) or 16 (21),
7 delay days, 7 test days, k = 100. Prints markdown (the tables in the README's Backtest section)
and writes the metrics to bench/results/backtests.json.

    .venv/bin/python bench/backtests.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models.accounts import account_history, simulate_accounts  # noqa: E402
from models.backtest import backtest  # noqa: E402
from models.simulate import simulate  # noqa: E402

SEEDS = (7, 11, 23)
WINDOWS = ((30, 7), (37, 7), (16, 21))  # (train start day, training days)


def _runs(days: int, customers: int) -> list[dict[str, Any]]:
    out = []
    for seed in SEEDS:
        sim = simulate(days=days, customers=customers, seed=seed)
        history = account_history(simulate_accounts(sim, seed=seed))
        first = sim.transactions["event_time"][0].as_py()
        for start_day, train_days in WINDOWS:
            started = time.perf_counter()
            result = backtest(
                sim.transactions,
                sim.labels,
                (first + timedelta(days=start_day)).date(),
                train_days=train_days,
                k=100,
                accounts=history,
            )
            metrics = result.to_dict()
            metrics.update(seed=seed, start_day=start_day, train_days=train_days)
            metrics["seconds"] = round(time.perf_counter() - started, 1)
            out.append(metrics)
            print(
                f"seed {seed} day {start_day} + {train_days}: {metrics['seconds']}s",
                file=sys.stderr,
            )
    return out


def _pair(m: dict[str, Any], key: str, digits: int) -> str:
    a, b = m["model"][key], m["baseline"][key]
    left, right = f"{a:.{digits}f}", f"{b:.{digits}f}"
    return (
        f"**{left}** / {right}"
        if a > b
        else (f"{left} / **{right}**" if b > a else f"{left} / {right}")
    )


def _markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | window (train start + days) | test frauds | AUC model / baseline "
        "| AP model / baseline | CP@100 model / baseline | hard-rule alerts (fraud) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in runs:
        rules = m["hard_rules"]
        hits = sum(rules[r]["hits"] for r in ("blocked_card", "account_not_open"))
        fraud_hits = sum(rules[r]["fraud_hits"] for r in ("blocked_card", "account_not_open"))
        lines.append(
            f"| {m['seed']} | day {m['start_day']} + {m['train_days']} | {m['n_test_fraud']} "
            f"| {_pair(m, 'roc_auc', 3)} | {_pair(m, 'average_precision', 3)} "
            f"| {_pair(m, 'card_precision_at_k', 4)} | {hits} ({fraud_hits}) |"
        )
    ap = [m["model"]["average_precision"] - m["baseline"]["average_precision"] for m in runs]
    lines.append("")
    lines.append(f"Mean AP margin (model - baseline): {sum(ap) / len(ap):+.3f}")
    first = runs[0]
    lines.append("")
    lines.append(f"Scenario recall at 100 alerts/day, seed {first['seed']}, day 30 + 7:")
    frauds = first["scenario_frauds"]
    for name, recall in sorted(first["model"]["scenario_recall"].items()):
        base = first["baseline"]["scenario_recall"].get(name)
        lines.append(f"- {name} ({frauds.get(name, 0)}): {recall:.2f} / {base:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--days", type=int, default=60)
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "backtests.json"))
    args = parser.parse_args()
    runs = _runs(args.days, args.customers)
    Path(args.out).write_text(json.dumps(runs, indent=1) + "\n")
    print(_markdown(runs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
