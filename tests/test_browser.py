"""The UIs as a person sees them: the real `dagster dev` (webserver and daemon) and the MLflow UI,
driven by headless Chromium (Debian's `chromium`, through Playwright from PyPI).

One Dagster and one MLflow server for the module, on a home set up the way an operator does it:
the labels, the first champion and a backtest materialized through Dagster's command line, then
300 transactions on a fresh Kinesis stream, which the daemon's sensor turns into a scoring run.
Pages are checked with Playwright's auto-waiting assertions (no sleeps). Screenshots go to the
module's tmp folder, or to the folder in STREAMGUARD_SCREENSHOTS (the README's come from
`STREAMGUARD_SCREENSHOTS=docs/screenshots`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import (
    BrowserContext,
    FloatRect,
    Locator,
    Page,
    ViewportSize,
    expect,
    sync_playwright,
)

from models.registry import CHAMPION, MODEL_NAME
from models.simulate import Simulation, write_simulation
from streamguard.config import Home
from streamguard.demo import SCORING_JOB_NAME, dagster_env, process_group
from streamguard.kinesis import delete_stream, ensure_stream, kinesis_client, produce_transactions

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium")
SENSOR = "kinesis_transactions_sensor"
LOCATION = "streamguard"
N_RECORDS = 300
# Daemon start to the run's success: ~25 s on an idle machine, minutes on 2 busy cores.
RUN_TIMEOUT_S = 300
SERVER_TIMEOUT_S = 180
UI_TIMEOUT_MS = 60_000
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
# Every asset node of a group at full detail: Dagster draws only the nodes inside the viewport,
# and below a zoom of 0.6 only their names (no checks row).
GRAPH_VIEWPORT: ViewportSize = {"width": 1600, "height": 2400}
# An asset node of the lineage graph. Dagster's UI has no test ids on it: its CSS-module class
# (hashed suffix) is the stable handle, and the node's name is in its `data-tooltip`.
ASSET_NODE = '[class*="AssetNode_assetNodeBox"]'
BACKTEST_CONFIG = {
    "ops": {
        "fraud_model": {"config": {"label_delay_days": 0}},
        # The small simulation has 12 days: train 4, skip 1, test 4.
        "fraud_backtest": {
            "config": {
                "train_start": "2026-01-03",
                "train_days": 4,
                "delay_days": 1,
                "test_days": 4,
                "k": 10,
            }
        },
    },
    "execution": {"config": {"in_process": {}}},
}

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Servers:
    """Where the module's servers answer, and what they were given to show."""

    dagster: str
    mlflow: str
    run_id: str
    shots: Path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else f"(no {log.name})"


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Until the server answers 200 (it exiting first fails with its log)."""
    deadline = time.monotonic() + SERVER_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, f"{url}: the server exited\n{_tail(log)}"
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {SERVER_TIMEOUT_S} s\n{_tail(log)}")


def _materialize(env: dict[str, str], log: Path) -> None:
    """Labels, the first champion (registered in MLflow) and a backtest, as an operator would:
    through Dagster's CLI, so the materializations are in the instance the UI shows."""
    with log.open("ab") as out:
        done = subprocess.run(
            [str(BIN / "dagster"), "asset", "materialize", "-m", "assets.definitions",
             "--select", "fraud_labels,fraud_model,fraud_backtest",
             "--config-json", json.dumps(BACKTEST_CONFIG)],
            env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, _tail(log)


def _scoring_run(home: Home, dev: subprocess.Popen[bytes], log: Path) -> str:
    """The id of the scoring run the sensor launched, once it finished successfully."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home.dagster)) as instance:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            runs = instance.get_runs(dg.RunsFilter(job_name=SCORING_JOB_NAME))
            if runs and runs[0].is_finished:
                run = runs[0]
                assert run.is_success, f"scoring run {run.status}\n{_tail(log)}"
                assert run.tags.get("dagster/sensor_name") == SENSOR
                return run.run_id
            assert dev.poll() is None, f"dagster dev exited\n{_tail(log)}"
            time.sleep(1)
    raise AssertionError(f"no finished scoring run after {RUN_TIMEOUT_S} s\n{_tail(log)}")


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, kinesis_server: str, small_sim: Simulation
) -> Iterator[Servers]:
    """`dagster dev` and `mlflow server` on one home, after the sensor's scoring run succeeded."""
    root = tmp_path_factory.mktemp("browser")
    home = Home(root / "home").ensure()
    write_simulation(small_sim, home.data)
    client = kinesis_client(kinesis_server)
    stream = f"browser-{uuid.uuid4().hex[:8]}"
    ensure_stream(client, stream, shards=2)
    env = dagster_env(home, kinesis_server)
    env["STREAMGUARD_STREAM"] = stream
    _materialize(env, root / "materialize.log")
    produce_transactions(client, stream, small_sim.transactions.slice(0, N_RECORDS),
                         progress=False)  # fmt: skip
    dagster_url = f"http://127.0.0.1:{_free_port()}"
    mlflow_port = _free_port()
    dev_log, mlflow_log = root / "dagster-dev.log", root / "mlflow.log"
    shots = Path(os.environ.get("STREAMGUARD_SCREENSHOTS") or root / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    dagster_args = [str(BIN / "dagster"), "dev", "-w", str(REPO / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", dagster_url.rsplit(":", 1)[1]]  # fmt: skip
    mlflow_args = [str(BIN / "mlflow"), "server", "--backend-store-uri", home.mlflow_tracking_uri,
                   "--default-artifact-root", str(home.mlflow_artifacts),
                   "--artifacts-destination", str(home.mlflow_artifacts),
                   "--host", "127.0.0.1", "--port", str(mlflow_port),
                   "--workers", "1"]  # fmt: skip
    with ExitStack() as stack:
        stack.callback(delete_stream, client, stream)
        dev = stack.enter_context(process_group(dagster_args, env, dev_log))
        mlflow_env = dict(env, MLFLOW_DISABLE_TELEMETRY="true")
        mlflow = stack.enter_context(process_group(mlflow_args, mlflow_env, mlflow_log))
        _wait_http(f"{dagster_url}/server_info", dev, dev_log)
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, mlflow_log)
        run_id = _scoring_run(home, dev, dev_log)
        yield Servers(dagster_url, f"http://127.0.0.1:{mlflow_port}", run_id, shots)


@pytest.fixture(scope="module")
def browser_context() -> Iterator[BrowserContext]:
    """One headless Chromium (the system's) for the module; one context, so the pages share
    what the UIs keep in local storage."""
    assert CHROMIUM, "no chromium on PATH: `make system` installs it (apt-get install chromium)"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        context = browser.new_context(viewport=VIEWPORT)
        context.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)
        yield context
        context.close()
        browser.close()


@pytest.fixture
def page(browser_context: BrowserContext) -> Iterator[Page]:
    """A fresh tab; Dagster's one-time "Join the Dagster community" dialog is skipped whenever
    it covers the page."""
    tab = browser_context.new_page()
    community = tab.get_by_role("dialog").filter(has_text="Join the Dagster community")
    tab.add_locator_handler(
        community, lambda dialog: dialog.get_by_role("button", name="Skip").click()
    )
    yield tab
    tab.close()


def _shoot(target: Page | Locator, path: Path, clip: FloatRect | None = None) -> None:
    """A screenshot of a page (or a region of it) or of one element, with animations finished
    (a dialog mid-fade is a grey blur)."""
    if isinstance(target, Page):
        target.screenshot(path=path, animations="disabled", clip=clip)
    else:
        target.screenshot(path=path, animations="disabled")


def _asset_layout() -> tuple[dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """From the code location itself: assets per group, checks per asset, descriptions."""
    from assets.definitions import defs

    graph = defs().get_repository_def().asset_graph
    groups: dict[str, list[str]] = defaultdict(list)
    descriptions: dict[str, str] = {}
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        groups[node.group_name].append(key.to_user_string())
        descriptions[key.to_user_string()] = node.description or ""
    checks: dict[str, list[str]] = defaultdict(list)
    for check in graph.asset_check_keys:
        checks[check.asset_key.to_user_string()].append(check.name)
    return dict(groups), dict(checks), descriptions


def test_asset_graph_shows_every_asset_and_its_checks(servers: Servers, page: Page) -> None:
    groups, checks, descriptions = _asset_layout()
    assert sum(len(names) for names in groups.values()) > 20 and checks
    assert all(descriptions.values()), [k for k, v in descriptions.items() if not v]
    page.set_viewport_size(GRAPH_VIEWPORT)
    for group, names in sorted(groups.items()):
        page.goto(f"{servers.dagster}/locations/{LOCATION}/asset-groups/{group}")
        nodes = page.locator(ASSET_NODE)
        for name in names:
            node = nodes.filter(has=page.locator(f'[data-tooltip="{name}"]'))
            expect(node).to_be_visible()
            n = len(checks.get(name, []))
            # "Asset checks  2 / 2 Passed" (evaluated or not: "0 / 1"), or a dash for none.
            shown = rf"Asset checks\s*\d+ / {n}\b" if n else "Asset checks\\s*\u2013"  # en dash
            expect(node).to_contain_text(re.compile(shown))
        # Nothing the code location does not define (graph nodes of other groups are links).
        expect(nodes).to_have_count(len(names))
        if group == "fraud_model":  # the README's picture: the model's lineage, checks shown
            expect(nodes.filter(has_text="Loading")).to_have_count(0)
            boxes = [box for box in (n.bounding_box() for n in nodes.all()) if box]
            left = min(b["x"] for b in boxes) - 60
            top = min(b["y"] for b in boxes) - 40
            right = max(b["x"] + b["width"] for b in boxes) + 60
            bottom = max(b["y"] + b["height"] for b in boxes) + 40
            region: FloatRect = {"x": left, "y": top, "width": right - left,
                                 "height": bottom - top}  # fmt: skip
            _shoot(page, servers.shots / "dagster-asset-graph.png", region)
    page.set_viewport_size(VIEWPORT)
    # Each check by name on its asset's Checks tab.
    for asset, names in sorted(checks.items()):
        page.goto(f"{servers.dagster}/assets/{asset}?view=checks")
        expect(page.get_by_text(f"Checks ({len(names)})")).to_be_visible()
        for name in names:
            expect(page.get_by_text(name, exact=True).filter(visible=True).first).to_be_visible()


def test_kinesis_sensor_is_running_and_its_ticks_show(servers: Servers, page: Page) -> None:
    from assets.definitions import defs

    sensor = defs().get_repository_def().get_sensor_def(SENSOR)
    page.goto(f"{servers.dagster}/locations/{LOCATION}/sensors/{SENSOR}")
    expect(page.get_by_text(sensor.description or "-", exact=True)).to_be_visible()
    expect(page.get_by_role("checkbox")).to_be_checked()  # the "Running" switch
    expect(page.get_by_text("score_transactions_job").first).to_be_visible()  # its target
    # Every tick (mostly "0 runs requested": the stream is drained), newest first.
    ticks = page.get_by_role("row").filter(has_text=re.compile(r"\d+ runs? requested"))
    expect(ticks.first).to_be_visible()
    # The tick that launched the scoring run, through the status filter as a person would.
    page.get_by_text("All ticks", exact=True).click()
    page.get_by_role("menuitem", name="Requested").click()
    launched = page.get_by_role("row").filter(has_text="1 run requested")
    expect(launched).to_have_count(1)
    expect(launched).to_contain_text(servers.run_id[:8])
    page.keyboard.press("Escape")  # close the filter's menu
    expect(page.get_by_role("menuitem")).to_have_count(0)
    _shoot(page, servers.shots / "dagster-sensor.png")


def test_scoring_run_page_shows_success_and_its_metadata(servers: Servers, page: Page) -> None:
    page.goto(f"{servers.dagster}/runs/{servers.run_id}")
    expect(page.get_by_text("Success", exact=True).first).to_be_visible()
    expect(page.get_by_text(SENSOR).first).to_be_attached()  # "Launched by"
    expect(page.get_by_text("8 assets", exact=True)).to_be_visible()
    expect(page.get_by_text("3 checks", exact=True)).to_be_visible()
    page.get_by_placeholder("Filter…").fill("Materialized value scores.")
    event = page.get_by_text("Materialized value scores.")
    expect(event).to_be_visible()
    metadata = page.locator("tr")
    expect(metadata.filter(has_text="rows_written").first).to_contain_text(str(N_RECORDS))
    expect(metadata.filter(has_text="records_read").first).to_contain_text(str(N_RECORDS))
    expect(metadata.filter(has_text="model_versions").first).to_contain_text("1")
    event.scroll_into_view_if_needed()
    _shoot(page, servers.shots / "dagster-scoring-run.png")


def test_backtest_plots_and_comparison_render(servers: Servers, page: Page) -> None:
    # The latest materialization's metadata (Events tab): the three models' metrics as one small
    # table, a row per metric and a column per model, rounded; not only twelve long floats.
    page.goto(f"{servers.dagster}/assets/fraud_backtest?view=events")
    comparison = page.locator("tr").filter(has_text="comparison").filter(has_text="metric").last
    expect(comparison.locator("th")).to_have_text(["metric", "model", "literature", "baseline"])
    precision = comparison.locator("tr").filter(has_text="average_precision")
    rounded = re.compile(r"average_precision(\s+[01](\.\d{1,3})?\b){3}")
    expect(precision).to_contain_text(rounded, use_inner_text=True)
    _shoot(comparison, servers.shots / "dagster-backtest-metrics.png")
    page.goto(f"{servers.dagster}/assets/fraud_backtest")
    for plot in ("pr_curve", "score_distribution"):
        page.locator("tr").filter(has_text=plot).get_by_text("[Show Markdown]").click()
        dialog = page.get_by_role("dialog")
        image = dialog.locator('img[src^="data:image/png;base64,"]')
        expect(image).to_be_visible()
        expect(image).to_have_js_property("complete", True)
        size = image.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        box = image.bounding_box()
        assert size[0] > 100 and size[1] > 100, size  # decoded, not a broken-image icon
        assert box is not None and box["width"] > 100 and box["height"] > 100, box
        if plot == "pr_curve":
            _shoot(page, servers.shots / "dagster-backtest-plot.png")
        dialog.get_by_role("button", name="Close").click()
        expect(dialog).to_have_count(0)


def test_mlflow_ui_shows_the_champion(servers: Servers, page: Page) -> None:
    page.goto(f"{servers.mlflow}/#/models/{MODEL_NAME}")
    expect(page.get_by_role("heading", name=MODEL_NAME)).to_be_visible()
    version = page.get_by_role("row").filter(has_text="Version 1")
    expect(version).to_contain_text(CHAMPION)
    assistant = page.get_by_role("button", name="Close", exact=True)  # MLflow's chat side panel
    if assistant.count():
        assistant.click()
    page.get_by_text("Versions", exact=True).evaluate("e => e.scrollIntoView({block: 'start'})")
    top: FloatRect = {"x": 0, "y": 0, "width": VIEWPORT["width"], "height": 360}
    _shoot(page, servers.shots / "mlflow-model.png", top)  # the versions' table head
