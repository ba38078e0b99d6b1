"""The README's backtest table: the default model against the literature's baseline, 3 x 3.

Each seed's 60 days x 1,000 customers (the demo's size) with the bank's account history; each
window is `streamguard backtest` with `--train-start` day 30, 37 (7 training days) or 16 (21),
7 delay days, 7 test days, k = 100, the test set without the customers known compromised at its
start (the literature's protocol), the features' label delay D estimated from the labels
reported by the test start, as training does (column D). Prints markdown (the table in the
README's Backtest section) and writes the metrics to bench/results/backtests.json.

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


def _pair(m: dict[str, Any], key: str, digits: int, other: str = "literature_baseline") -> str:
    a, b = m["model"][key], m[other][key]
    left, right = f"{a:.{digits}f}", f"{b:.{digits}f}"
    return (
        f"**{left}** / {right}"
        if a > b
        else (f"{left} / **{right}**" if b > a else f"{left} / {right}")
    )


def _markdown(runs: list[dict[str, Any]]) -> str:
    lines = [
        "| seed | window (train start + days) | D | test frauds | AUC model / literature "
        "| AP model / literature | CP@100 model / literature | AP project LR "
        "| AP model / literature, all customers | hard-rule alerts (fraud) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for m in runs:
        rules = m["hard_rules"]
        hits = sum(rules[r]["hits"] for r in ("blocked_card", "account_not_open"))
        fraud_hits = sum(rules[r]["fraud_hits"] for r in ("blocked_card", "account_not_open"))
        lines.append(
            f"| {m['seed']} | day {m['start_day']} + {m['train_days']} "
            f"| {m['feature_delay_days']} | {m['n_test_fraud']} "
            f"| {_pair(m, 'roc_auc', 3)} | {_pair(m, 'average_precision', 3)} "
            f"| {_pair(m, 'card_precision_at_k', 4)} "
            f"| {m['baseline']['average_precision']:.3f} "
            f"| {_pair(m['all_customers'], 'average_precision', 3)} | {hits} ({fraud_hits}) |"
        )
    lines.append("")
    lines.extend(_goal(runs))
    first = runs[0]
    lines.append("")
    lines.append(
        f"Scenario recall at 100 alerts/day, seed {first['seed']}, day 30 + 7 (model / literature):"
    )
    frauds = first["scenario_frauds"]
    for name, recall in sorted(first["model"]["scenario_recall"].items()):
        base = first["literature_baseline"]["scenario_recall"].get(name, float("nan"))
        lines.append(f"- {name} ({frauds.get(name, 0)}): {recall:.2f} / {base:.2f}")
    return "\n".join(lines)


def _goal(runs: list[dict[str, Any]]) -> list[str]:
    """Issue 12's goal against the literature's baseline, checked run by run."""

    def margins(key: str) -> list[float]:
        return [m["model"][key] - m["literature_baseline"][key] for m in runs]

    ap, cp, auc = margins("average_precision"), margins("card_precision_at_k"), margins("roc_auc")
    n = len(runs)
    return [
        f"Against the literature's baseline: AP better in {sum(d > 0 for d in ap)}/{n} "
        f"(mean margin {sum(ap) / n:+.3f}, goal >= +0.08), CP@100 better in "
        f"{sum(d > 0 for d in cp)}/{n} (mean {sum(cp) / n:+.4f}), AUC never worse: "
        f"{sum(d >= 0 for d in auc)}/{n} (mean {sum(auc) / n:+.3f}).",
    ]


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
