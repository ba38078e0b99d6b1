"""A Spark standalone cluster on this machine: one master and one or more workers, on loopback.

The scale-out shape of the Spark jobs (`STREAMGUARD_SPARK_MASTER=spark://...`), runnable here
with nothing but the pip `pyspark` package and Java 17. That package has no `sbin/start-master.sh`,
so each daemon is started the way that script would, with `bin/spark-class` in the foreground, as
a `LocalServer`: in its own session (process group), its `server.json` and `server.log` in its own
folder under the cluster's (`STREAMGUARD_HOME/spark-cluster` for the CLI):

    master/     server.json (the `spark://` URL), server.log, ui_port
    worker-1/   server.json, server.log, work/ (executor logs per app), local/ (scratch)

`spark-class` execs the daemon's JVM in place; a worker starts one executor JVM per application,
and each executor its Python workers, all in the worker's process group and working directory, so
a stop signals the group and then waits until no process of it is left. Every port is a free
loopback one (master RPC and web UI, each worker's RPC; workers' UIs on ephemeral ports); the
master's REST submission server is off (it would take the fixed port 6066). A worker is up when
the master's JSON (`http://127.0.0.1:UI/json/`) lists it ALIVE.

Executors run the interpreter that started the cluster (`PYSPARK_PYTHON`; the driver sends its
own too), so they import this project as the driver does. The default worker offers 2 cores and
1 GiB, what one executor with Spark's default `spark.executor.memory` (1g) needs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from streamguard.config import Home
from streamguard.local_server import HOST, LocalServer, LocalServerError, folder_lock

log = logging.getLogger(__name__)

__all__ = [
    "ClusterStatus",
    "SparkCluster",
    "SparkClusterError",
    "SparkMaster",
    "SparkWorker",
    "cluster_dir",
    "master_json",
]

MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
# In each daemon's JVM command line (SPARK_DAEMON_JAVA_OPTS): which cluster folder it belongs to.
STATE_PROPERTY = "streamguard.spark.state"
MEMORY = re.compile(r"[1-9][0-9]*[mMgG]")  # what a worker offers: --memory 512m, 2g
DAEMON_HEAP = "256m"  # master and worker JVMs only; executors get spark.executor.memory


class SparkClusterError(LocalServerError):
    """The local Spark cluster could not be started (one line, saying what to do)."""


def cluster_dir(home: Home) -> Path:
    """Where the CLI's cluster keeps its records and logs, so `status` and `stop` find it."""
    return home.root / "spark-cluster"


def master_json(ui_url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The master's state as its web UI serves it (`/json/`), None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{ui_url}/json/", timeout=timeout) as response:
            data = json.load(response)
    except (OSError, ValueError, urllib.error.URLError):
        return None
    return data if isinstance(data, dict) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _spark_home() -> Path:
    """The pip package's Spark distribution (bin/, jars/): the driver's own version."""
    try:
        import pyspark
    except ModuleNotFoundError:
        raise SparkClusterError(
            "pyspark is not installed: pip install -e '.[spark]' (make setup does)"
        ) from None
    home = Path(pyspark.__file__).parent
    if not (home / "bin" / "spark-class").is_file():
        raise SparkClusterError(f"no bin/spark-class in {home}: reinstall pyspark")
    return home


def _check_java() -> None:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and (Path(java_home) / "bin" / "java").is_file():
        return
    if shutil.which("java") is None:
        raise SparkClusterError("no java on PATH and no JAVA_HOME: Spark 4 needs Java 17 or 21")


def _group_members(pgid: int, under: Path) -> list[int]:
    """Live processes of group `pgid` working under `under` (a daemon, its executors and their
    Python workers); [] without /proc."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z" and cwd.is_relative_to(under):
            members.append(int(entry.name))
    return members


def _end_group(pgid: int, under: Path, timeout_s: float) -> None:
    """Leave no process of the group under `under`: what outlived the daemon (an executor still
    shutting down, or orphaned by a daemon that died) gets SIGTERM, then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + timeout_s
        while (members := _group_members(pgid, under)) and time.monotonic() < deadline:
            for pid in members:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            time.sleep(0.2)
        if not members:
            return
        log.warning("Spark processes %s ignored %s", members, signal.Signals(sig).name)


class _SparkDaemon(LocalServer):
    """What master and worker share: launched by `spark-class`, stopped group and all."""

    error_type = SparkClusterError
    start_timeout_s = 90.0  # a JVM on a loaded 2-core machine; a worker also registers
    stop_timeout_s = 15.0
    main_class = ""

    def prepare(self) -> list[str]:
        _check_java()
        return ["bash", str(_spark_home() / "bin" / "spark-class"), self.main_class]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            SPARK_HOME=str(_spark_home()),  # jars of the driver's own pyspark version
            SPARK_LOCAL_IP=HOST,  # RPC and web UI on loopback only
            SPARK_DAEMON_MEMORY=DAEMON_HEAP,
            SPARK_DAEMON_JAVA_OPTS=f'-D{STATE_PROPERTY}="{self.state_dir}"',
            PYSPARK_PYTHON=sys.executable,
        )
        return env

    def is_ours(self, pid: int) -> bool:
        return self.cmdline_has(pid, self.main_class, f"-D{STATE_PROPERTY}={self.state_dir}")

    def stop(self) -> None:
        """Stop the daemon, then wait until nothing of its process group is left (executors and
        their Python workers included)."""
        pgid = self.pid  # its own group's id (a new session); members are checked by directory
        super().stop()
        if pgid is not None and Path("/proc/self").exists():
            _end_group(pgid, self.state_dir, self.stop_timeout_s)


class SparkMaster(_SparkDaemon):
    """The standalone master of `state_dir`: its address is the `spark://127.0.0.1:PORT` URL."""

    label = "local Spark master"
    address_key = "url"
    main_class = MASTER_CLASS

    @property
    def url(self) -> str:
        """The `spark://` URL applications connect to."""
        return self.address

    @property
    def ui_port_file(self) -> Path:
        return self.state_dir / "ui_port"

    @property
    def ui_url(self) -> str:
        """The master's web UI (its JSON at `/json/` is how workers are seen)."""
        try:
            port = int(self.ui_port_file.read_text())
        except (OSError, ValueError):
            raise self.error_type(f"no {self.label} recorded in {self.state_dir}") from None
        return f"http://{HOST}:{port}"

    def address_for(self, port: int) -> str:
        return f"spark://{HOST}:{port}"

    def arguments(self, port: int) -> list[str]:
        ui_port = _free_port()
        self.ui_port_file.write_text(f"{ui_port}\n")  # before the launch: `answers` needs it
        return ["--host", HOST, "--port", str(port), "--webui-port", str(ui_port)]

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["SPARK_MASTER_OPTS"] = "-Dspark.master.rest.enabled=false"  # else fixed port 6066
        return env

    def answers(self, address: str) -> bool:
        """Whether the master on record serves `address` and leads (status ALIVE)."""
        try:
            state = master_json(self.ui_url)
        except SparkClusterError:
            return False
        return state is not None and state.get("url") == address and state.get("status") == "ALIVE"

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        return self.log_has(log_start, b"I have been elected leader")

    def alive_workers(self) -> list[dict[str, Any]]:
        """The workers the master lists as ALIVE (empty when it does not answer)."""
        state = master_json(self.ui_url)
        workers = state.get("workers", []) if state else []
        return [w for w in workers if w.get("state") == "ALIVE"]


class SparkWorker(_SparkDaemon):
    """A worker of `master` whose files live in `state_dir`: address `127.0.0.1:PORT`, up once the
    master lists it ALIVE. It offers `cores` and `memory` to executors."""

    label = "local Spark worker"
    main_class = WORKER_CLASS

    def __init__(
        self,
        state_dir: Path,
        master: SparkMaster,
        cores: int = 2,
        memory: str = "1g",
        port: int | None = None,
    ) -> None:
        super().__init__(state_dir, port)
        self.master = master
        self.cores = cores
        self.memory = memory

    @property
    def work_dir(self) -> Path:
        """Executors' working directories and logs, one folder per application."""
        return self.state_dir / "work"

    def address_for(self, port: int) -> str:
        return f"{HOST}:{port}"

    def arguments(self, port: int) -> list[str]:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        return [
            "--host", HOST, "--port", str(port), "--webui-port", "0",
            "--cores", str(self.cores), "--memory", self.memory,
            "--work-dir", str(self.work_dir), self.master.url,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = super().environment()
        env["SPARK_LOCAL_DIRS"] = str(self.state_dir / "local")  # executors' scratch space
        return env

    def answers(self, address: str) -> bool:
        """Whether the master lists a worker at `address` as ALIVE."""
        host, _, port = address.rpartition(":")
        try:
            alive = self.master.alive_workers()
        except SparkClusterError:
            return False
        return any(w.get("host") == host and str(w.get("port")) == port for w in alive)

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        return self.log_has(log_start, b"Successfully registered with master")


@dataclass(frozen=True)
class ClusterStatus:
    """What `status` reports: the master's URL and UI and its live workers (None: not running)."""

    running: bool
    url: str | None
    ui_url: str | None
    workers: int
    cores: int
    state_dir: Path


class SparkCluster:
    """Start, find or stop the master and workers recorded in `state_dir`.

    `start` reuses a live master and registered workers, replaces stale ones, and returns the
    `spark://` URL once `workers` workers are ALIVE on the master; `stop` stops every worker
    recorded there and then the master. As a context manager it stops the cluster on exit unless
    its master was already running.
    """

    def __init__(
        self, state_dir: Path, workers: int = 1, cores: int = 2, memory: str = "1g"
    ) -> None:
        if workers < 1 or cores < 1:
            raise ValueError("a cluster needs at least one worker with at least one core")
        if not MEMORY.fullmatch(memory):
            raise ValueError(f"worker memory must look like 512m or 2g, got {memory!r}")
        self.state_dir = Path(state_dir).absolute()
        self.workers = workers
        self.cores = cores
        self.memory = memory
        self.master = SparkMaster(self.state_dir / "master")
        self._started = False

    def worker(self, index: int) -> SparkWorker:
        """The handle of worker `index` (from 1)."""
        return SparkWorker(self.state_dir / f"worker-{index}", self.master, self.cores, self.memory)

    def _recorded_workers(self) -> list[SparkWorker]:
        indices = sorted(
            int(path.name.removeprefix("worker-"))
            for path in self.state_dir.glob("worker-*")
            if path.name.removeprefix("worker-").isdigit()
        )
        return [self.worker(i) for i in indices]

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        """One cluster start/stop at a time per folder, across processes."""
        return folder_lock(self.state_dir, "cluster.lock")

    @property
    def url(self) -> str:
        """The `spark://` URL of the recorded master."""
        return self.master.url

    def start(self) -> str:
        """Start (or reuse) the master and the workers; the URL once all workers are ALIVE.

        When a daemon fails to start, whatever this call started is stopped again.
        """
        with self._lock():
            started = time.monotonic()
            reused = self.master.running()
            try:
                url = self._start_all()
            except BaseException:
                if not reused:
                    self._stop_all()
                raise
            self._started = not reused
            log.info(
                "Spark cluster at %s: %d worker(s) in %.1fs",
                url,
                self.workers,
                time.monotonic() - started,
            )
            return url

    def _start_all(self) -> str:
        url = self.master.start()
        for extra in self._recorded_workers()[self.workers :]:
            extra.stop()  # a cluster started before with more workers
        for index in range(1, self.workers + 1):
            self.worker(index).start()
        deadline = time.monotonic() + SparkWorker.start_timeout_s
        while len(self.master.alive_workers()) < self.workers:
            if time.monotonic() > deadline:
                raise SparkClusterError(
                    f"the master at {url} lists fewer than {self.workers} live workers "
                    f"(logs: {self.state_dir}/*/server.log)"
                )
            time.sleep(0.2)
        return url

    def stop(self) -> None:
        """Stop every recorded worker, then the master; safe when nothing runs."""
        with self._lock():
            self._stop_all()

    def _stop_all(self) -> None:
        for worker in self._recorded_workers():
            worker.stop()
        self.master.stop()
        self.master.ui_port_file.unlink(missing_ok=True)
        self._started = False

    def status(self) -> ClusterStatus:
        """Whether the recorded master answers, and how many workers (and cores) it has."""
        if not self.master.running():
            return ClusterStatus(False, None, None, 0, 0, self.state_dir)
        alive = self.master.alive_workers()
        cores = sum(int(w.get("cores", 0)) for w in alive)
        return ClusterStatus(
            True, self.master.url, self.master.ui_url, len(alive), cores, self.state_dir
        )

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the cluster if this handle started its master (a reused one keeps running)."""
        if self._started:
            self.stop()
