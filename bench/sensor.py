"""Sensor-mode latency (issue 11): produce-to-scored time of single events on an idle stream,
through the real Dagster daemon, split into its parts.

For each event: its produce time -> the sensor tick that saw it -> the run submitted -> the run
launched (dequeued) -> the run worker's process up -> the code location loaded in it (RUN_START)
-> its batch committed to the `scores` Delta table. Every time comes from where it is recorded
(the tick and run events in Dagster's storage, the commit in the Delta log), so the bench adds no
polling delay of its own. Events are spaced by a random idle gap, so each one meets the sensor's
loop at another phase.

    .venv/bin/python bench/sensor.py --events 20                  # the platform's defaults
    .venv/bin/python bench/sensor.py --interval 10 --no-code-server --no-wait   # as before #11

Merges `sensor_p50_s`, `sensor_p99_s` and a `sensor` dict into bench/results/latest.json (read,
update, write: the keys other benches wrote stay). Not a test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import RESULTS, percentile, train_champion  # noqa: E402
from bench.common import merge_results as merge_into_results  # noqa: E402
from models.schema import to_payload  # noqa: E402
from streamguard.config import Home  # noqa: E402
from streamguard.demo import REPO_ROOT, _bin, dagster_env, process_group  # noqa: E402
from streamguard.kinesis import ensure_stream, kinesis_client, put_records  # noqa: E402
from streamguard.lake import Lake  # noqa: E402
from streamguard.local_kinesis import LocalKinesis  # noqa: E402
from streamguard.pipeline import load_labels  # noqa: E402

SENSOR = "kinesis_transactions_sensor"
STREAM = "latency"
CODE_SERVER_WORKSPACE = ROOT / "platform" / "workspace-code-server.yaml"
# The parts of one event's latency, in order; each is the time from the previous mark.
PARTS = (
    ("sensor_wait_s", "tick_start"),  # produced -> the tick that saw it began (0: one was looking)
    ("tick_s", "run_created"),  # the tick (from the record's landing) until its run was queued
    ("queue_s", "run_starting"),  # queued -> dequeued and handed to the run launcher
    ("process_start_s", "process_started"),  # launcher -> the run worker's process is up
    ("code_load_s", "run_start"),  # the run worker loads the code location (imports)
    ("first_batch_s", "scored"),  # the run: resources, model, read, score, write `scores`
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _event(i: int) -> dict[str, Any]:
    return {
        "transaction_id": f"bench-sensor-{i}-{time.time_ns()}",
        "event_time": datetime.now(UTC),
        "customer_id": f"C-bench-{i % 7}",
        "terminal_id": "T-bench",
        "amount": 120.0 + i,
        "kind": "debit",
        "channel": "pos",
        "location": "L0001",
    }


class DeltaCommits:
    """The `scores` table's commits, read from its Delta log: a commit's time is when it landed."""

    def __init__(self, table: Path) -> None:
        self.log = table / "_delta_log"
        self.seen = self._latest()

    def _latest(self) -> int:
        if not self.log.exists():
            return -1
        versions = [int(p.stem) for p in self.log.glob("*.json") if p.stem.isdigit()]
        return max(versions, default=-1)

    def next_data_commit(self, timeout: float) -> float | None:
        """Wait for the next commit that adds rows; its commit timestamp (epoch seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            path = self.log / f"{self.seen + 1:020d}.json"
            if path.exists():
                self.seen += 1
                actions = [json.loads(line) for line in path.read_text().splitlines() if line]
                info: dict[str, Any] = next(
                    (a["commitInfo"] for a in actions if "commitInfo" in a), {}
                )
                if any("add" in a for a in actions):
                    return float(info.get("timestamp", time.time() * 1000)) / 1000
                continue
            time.sleep(0.05)
        return None


def _run_marks(instance: Any, run_id: str) -> dict[str, float]:
    """When the run was created, dequeued, its process started, and RUN_START (epoch seconds)."""
    from dagster import DagsterEventType, RunsFilter

    (record,) = instance.get_run_records(filters=RunsFilter(run_ids=[run_id]))
    marks = {"run_created": record.create_timestamp.timestamp()}
    for entry in instance.all_logs(run_id):
        event = entry.dagster_event
        if event is None:
            continue
        kind = event.event_type
        if kind == DagsterEventType.RUN_STARTING:
            marks.setdefault("run_starting", entry.timestamp)
        elif kind == DagsterEventType.RUN_DEQUEUED:
            marks.setdefault("run_dequeued", entry.timestamp)
        elif kind == DagsterEventType.ENGINE_EVENT and (entry.message or "").startswith(
            "Started process for run"
        ):
            marks.setdefault("process_started", entry.timestamp)
        elif kind == DagsterEventType.RUN_START:
            marks.setdefault("run_start", entry.timestamp)
        elif kind == DagsterEventType.STEP_START:
            marks.setdefault("step_start", entry.timestamp)
        elif kind in (DagsterEventType.RUN_SUCCESS, DagsterEventType.RUN_FAILURE):
            marks.setdefault("run_end", entry.timestamp)
    marks.setdefault("run_starting", marks.get("run_dequeued", marks["run_created"]))
    return marks


def _tick_of(instance: Any, run_id: str) -> Any:
    """The sensor tick that requested `run_id`."""
    from dagster._core.scheduler.instigation import InstigatorType

    for state in instance.all_instigator_state(instigator_type=InstigatorType.SENSOR):
        if state.instigator_name != SENSOR:
            continue
        for tick in instance.get_ticks(state.instigator_origin_id, state.selector_id, limit=200):
            if run_id in tick.run_ids:
                return tick
    return None


def _latest_run(instance: Any, after: float) -> Any:
    from dagster import RunsFilter

    records = instance.get_run_records(
        filters=RunsFilter(tags={"dagster/sensor_name": SENSOR}), limit=1
    )
    if records and records[0].create_timestamp.timestamp() >= after:
        return records[0].dagster_run
    return None


def _wait_run_done(instance: Any, after: float, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = _latest_run(instance, after)
        if run is not None and run.is_finished:
            return run
        time.sleep(0.25)
    raise TimeoutError("the scoring run did not finish")


def _champion_home(home: Home) -> None:
    """A small simulation's labels loaded and a champion registered: what a scoring run needs."""
    sim = train_champion(home, days=12, customers=80, seed=3)
    load_labels(Lake(home.lake), sim.labels)


@contextmanager
def _platform(
    home: Home, endpoint: str, env_overrides: dict[str, str], code_server: bool
) -> Iterator[Any]:
    """The daemon (and, with `code_server`, a long-lived code server it and the runs share);
    yields the Dagster instance, opened here first so its SQLite storage exists before any
    Dagster process starts (processes creating a fresh schedule database at the same moment can
    leave it with two Alembic heads, and then no code server loads)."""
    from dagster import DagsterInstance

    env = dagster_env(home, endpoint) | {"STREAMGUARD_STREAM": STREAM} | env_overrides
    workspace = REPO_ROOT / "workspace.yaml"
    with ExitStack() as stack:
        instance = stack.enter_context(DagsterInstance.from_config(str(home.dagster)))
        if code_server:
            port = _free_port()
            env |= {"STREAMGUARD_CODE_SERVER_HOST": "127.0.0.1"}
            env |= {"STREAMGUARD_CODE_SERVER_PORT": str(port)}
            args = [_bin("dagster"), "code-server", "start", "-m", "assets.definitions",
                    "--location-name", "streamguard", "-h", "127.0.0.1",
                    "-p", str(port)]  # fmt: skip
            stack.enter_context(process_group(args, env, home.dagster / "code-server.log"))
            _wait_for_code_server(port, env)
            workspace = CODE_SERVER_WORKSPACE
        args = [_bin("dagster-daemon"), "run", "-w", str(workspace)]
        stack.enter_context(process_group(args, env, home.dagster / "daemon.log"))
        yield instance


def _wait_for_code_server(port: int, env: dict[str, str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(
            [_bin("dagster"), "api", "grpc-health-check", "-p", str(port)],
            env=env, capture_output=True, timeout=60,
        )  # fmt: skip
        if done.returncode == 0:
            return
        time.sleep(1)
    raise TimeoutError(f"the code server on port {port} did not come up")


def measure_event(
    i: int, client: Any, instance: Any, commits: DeltaCommits, timeout: float
) -> dict[str, float]:
    """Produce one event; return its marks and parts once its run has finished."""
    produced = time.time()
    put_records(client, STREAM, [(to_payload(_event(i)), f"C-bench-{i % 7}")])
    scored = commits.next_data_commit(timeout)
    if scored is None:
        raise TimeoutError(f"event {i} was not scored within {timeout:.0f} s")
    run = _wait_run_done(instance, produced, timeout)
    marks = {"produced": produced, **_run_marks(instance, run.run_id), "scored": scored}
    tick = _tick_of(instance, run.run_id)
    marks["tick_start"] = tick.timestamp if tick is not None else marks["run_created"]
    out = {"total_s": scored - produced, "run_id": run.run_id, "run_status": run.status.value}
    # A tick that was already looking when the record landed saw it inside that tick: no wait.
    marks["tick_start"] = max(marks["tick_start"], produced)
    previous = "produced"
    for part, mark in PARTS:
        out[part] = marks[mark] - marks[previous]
        previous = mark
    out["scored_to_run_end_s"] = marks.get("run_end", scored) - scored
    out["run_start_to_step_start_s"] = (
        marks.get("step_start", marks["run_start"]) - marks["run_start"]
    )
    return out


IMPORT_PROFILE = """
import time
t0 = time.perf_counter()
import dagster
t1 = time.perf_counter()
import streamguard.pipeline, models.registry
t2 = time.perf_counter()
import assets.definitions
assets.definitions.defs().get_repository_def().get_job("score_transactions_job")
t3 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2)
"""


def import_profile(runs: int = 3) -> dict[str, float]:
    """What a run worker's code-location load is made of, in fresh interpreters (median):
    dagster itself, the scoring stack a run needs anyway (streamguard.pipeline and
    models.registry: MLflow, skops, scikit-learn, SciPy, pandas, Delta), and the rest of the
    code location (every other area's imports and building the definitions)."""
    samples = []
    for _ in range(runs):
        done = subprocess.run(
            [sys.executable, "-c", IMPORT_PROFILE], cwd=ROOT, capture_output=True, text=True,
            check=True,
        )  # fmt: skip
        samples.append([float(x) for x in done.stdout.split()])
    columns = list(zip(*samples, strict=True))
    names = ("dagster_s", "scoring_stack_s", "rest_of_code_location_s")
    return {name: percentile(list(values), 50) for name, values in zip(names, columns, strict=True)}


def summarise(events: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p99 of the totals, and the p50 and max of each part."""
    totals = [e["total_s"] for e in events]
    parts = {
        part: {
            "p50": percentile([e[part] for e in events], 50),
            "max": max(e[part] for e in events),
        }
        for part, _ in (*PARTS, ("run_start_to_step_start_s", ""), ("scored_to_run_end_s", ""))
    }
    return {
        "events": len(events),
        "p50_s": percentile(totals, 50),
        "p90_s": percentile(totals, 90),
        "p99_s": percentile(totals, 99),
        "max_s": max(totals),
        "parts": parts,
    }


def bench_sensor(
    work: Path,
    *,
    events: int = 20,
    gap_s: float = 4.0,
    interval_s: float | None = None,
    wait_s: float | None = None,
    code_server: bool = True,
    timeout: float = 180,
    seed: int = 11,
) -> dict[str, Any]:
    """Start Kinesis and the daemon, score one warm-up event, then time `events` single events.

    `interval_s`, `wait_s`: the sensor's STREAMGUARD_SENSOR_INTERVAL_S and
    STREAMGUARD_SENSOR_WAIT_S (None: the platform's defaults); `code_server`: the daemon and the
    runs use one long-lived code server (platform/workspace-code-server.yaml) instead of the
    daemon's own, which it restarts every minute.
    """
    load_before = os.getloadavg()
    home = Home(work / "home").ensure()
    _champion_home(home)
    overrides = {}
    if interval_s is not None:
        overrides["STREAMGUARD_SENSOR_INTERVAL_S"] = str(interval_s)
    if wait_s is not None:
        overrides["STREAMGUARD_SENSOR_WAIT_S"] = str(wait_s)
    rng = random.Random(seed)
    measured: list[dict[str, Any]] = []
    with LocalKinesis(work / "kinesis", persist=False) as server:
        endpoint = server.start()
        client = kinesis_client(endpoint)
        ensure_stream(client, STREAM, shards=2)
        with _platform(home, endpoint, overrides, code_server) as instance:
            commits = DeltaCommits(Lake(home.lake).path("scores"))
            warm = measure_event(0, client, instance, commits, timeout=300)
            print(f"warm-up event: {warm['total_s']:.1f} s", flush=True)
            for i in range(1, events + 1):
                time.sleep(rng.uniform(0.5, 0.5 + gap_s))
                event = measure_event(i, client, instance, commits, timeout)
                measured.append(event)
                print(
                    f"event {i:2d}: {event['total_s']:5.1f} s  "
                    + " ".join(f"{p[:-2]} {event[p]:.2f}" for p, _ in PARTS),
                    flush=True,
                )
    summary = summarise(measured)
    return {
        **summary,
        "imports": import_profile(),
        "sensor_interval_s": "default" if interval_s is None else interval_s,
        "sensor_wait_s": "default" if wait_s is None else wait_s,
        "code_server": code_server,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_before": load_before,
        "load_average": os.getloadavg(),
        "per_event": measured,
    }


def print_summary(result: dict[str, Any]) -> None:
    """The percentiles and the per-part breakdown, as the README shows them."""
    print(
        f"\nsensor mode, {result['events']} single events on an idle stream: "
        f"p50 {result['p50_s']:.1f} s, p90 {result['p90_s']:.1f} s, p99 {result['p99_s']:.1f} s"
    )
    print(f"{'part':26} {'p50':>7} {'max':>7}")
    for part, values in result["parts"].items():
        print(f"{part:26} {values['p50']:7.2f} {values['max']:7.2f}")
    imports = result.get("imports", {})
    print("a run worker's imports: " + ", ".join(f"{k} {v:.2f}" for k, v in imports.items()))


def merge_results(result: dict[str, Any], path: Path = RESULTS) -> None:
    """Read, update, write: other benches' keys (continuous_p50_ms, ...) are kept."""
    merge_into_results(
        {"sensor_p50_s": result["p50_s"], "sensor_p99_s": result["p99_s"], "sensor": result},
        path,
        drop=("sensor_event_to_alert_s",),  # the one-event measure these replaced
    )


def main() -> int:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20)
    parser.add_argument("--gap", type=float, default=4.0, help="most idle seconds between events")
    parser.add_argument("--interval", type=float, default=None, help="sensor minimum interval")
    parser.add_argument("--wait", type=float, default=None, help="sensor's wait for records")
    parser.add_argument("--no-code-server", dest="code_server", action="store_false")
    parser.add_argument("--out", default=str(RESULTS), help="results JSON to merge into")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        result = bench_sensor(
            Path(tmp),
            events=args.events,
            gap_s=args.gap,
            interval_s=args.interval,
            wait_s=args.wait,
            code_server=args.code_server,
        )
    print_summary(result)
    if not args.no_write:
        merge_results(result, Path(args.out))
        print(f"merged into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
