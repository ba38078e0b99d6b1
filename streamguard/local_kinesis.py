"""A local Kinesis-compatible server (kinesalite) for development, demos and tests.

One server per state directory: `server.json` there names the running server, so every process
(CLI, Dagster daemon, tests) that asks for it shares one instead of starting another. Streams
are kept in LevelDB under the same directory, so they survive a restart of the server.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from streamguard.config import Home

log = logging.getLogger(__name__)

LAUNCHER = Path(__file__).with_name("kinesalite_launcher.js")
HOST = "127.0.0.1"
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0

NOT_INSTALLED = "kinesalite is not installed: run `npm install` in the repo root (make does this)"
NO_NODE = "node is not installed: install Node.js 18+ to run the local Kinesis server"

# A liveness probe needs an Authorization header of the right shape; kinesalite checks no
# signature, so this one is a fixed placeholder (no credentials involved).
_PROBE_AUTH = (
    "AWS4-HMAC-SHA256 Credential=streamguard-local/20000101/us-east-1/kinesis/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=0"
)


class LocalKinesisError(RuntimeError):
    """The local server could not be started (one line, saying what to do)."""


def find_node_modules(*starts: Path) -> Path | None:
    """The first `node_modules` holding kinesalite, walking up from each start directory."""
    for start in starts:
        for directory in (start, *start.parents):
            candidate = directory / "node_modules"
            if (candidate / "kinesalite" / "package.json").is_file():
                return candidate
    return None


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether a Kinesis API at `endpoint` answers ListStreams."""
    parts = urlsplit(endpoint)
    if not parts.hostname or not parts.port:
        return False
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(
            "POST",
            "/",
            body=b"{}",
            headers={
                "Content-Type": "application/x-amz-json-1.1",
                "X-Amz-Target": "Kinesis_20131202.ListStreams",
                "X-Amz-Date": datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ"),
                "Authorization": _PROBE_AUTH,
            },
        )
        response = conn.getresponse()
        body = response.read()
        return response.status == 200 and b"StreamNames" in body
    except (OSError, http.client.HTTPException):
        return False
    finally:
        conn.close()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as node does
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): trust kill(0)
    return stat.rpartition(")")[2].split()[0] != "Z"


def _is_launcher(pid: int) -> bool:
    """Guard against a recycled pid: is it really our launcher? (unknowable without /proc)"""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return sys.platform != "linux" and _alive(pid)
    except OSError:
        return False
    return LAUNCHER.name.encode() in cmdline


def _log_has(path: Path, offset: int, marker: bytes) -> bool:
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            return marker in handle.read()
    except OSError:
        return False


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class LocalKinesis:
    """Start, find, or stop the kinesalite server that belongs to `state_dir`.

    `port` None picks a free loopback port. `persist` keeps streams in LevelDB under
    `state_dir/data` (in memory otherwise: faster reads, gone when the server stops).
    """

    def __init__(self, state_dir: Path, port: int | None = None, *, persist: bool = True) -> None:
        self.state_dir = Path(state_dir).absolute()  # the server runs with cwd=state_dir
        self.port = port
        self.persist = persist
        self._endpoint: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owned = False

    # -- files -----------------------------------------------------------------------------

    @property
    def server_file(self) -> Path:
        return self.state_dir / "server.json"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "server.log"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    def _read_info(self) -> dict[str, Any] | None:
        try:
            info = json.loads(self.server_file.read_text())
        except (OSError, ValueError):
            return None
        return info if isinstance(info, dict) and "pid" in info and "endpoint" in info else None

    def _write_info(self, info: dict[str, Any]) -> None:
        tmp = self.server_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.server_file)

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """One start/stop at a time per state dir, across processes."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with (self.state_dir / "server.lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- state -----------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The URL of this state dir's server (`http://127.0.0.1:PORT`)."""
        if self._endpoint is None:
            info = self._read_info()
            if info is None:
                raise LocalKinesisError(f"no local Kinesis server recorded in {self.state_dir}")
            self._endpoint = str(info["endpoint"])
        return self._endpoint

    @property
    def pid(self) -> int | None:
        """The server's process id, if one is recorded."""
        info = self._read_info()
        return int(info["pid"]) if info else None

    def running(self) -> bool:
        """Whether the server recorded in `state_dir` is alive and answering."""
        info = self._read_info()
        if info is None or not _alive(int(info["pid"])) or not answers(str(info["endpoint"])):
            return False
        self._endpoint = str(info["endpoint"])
        return True

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server, or reuse the live one recorded in `state_dir`; returns its URL."""
        with self._lock():
            if self.running():
                port = urlsplit(self.endpoint).port
                if self.port is not None and port != self.port:
                    raise LocalKinesisError(
                        f"a local Kinesis server for {self.state_dir} already runs on port {port}"
                        f" (not {self.port}): stop it first"
                    )
                log.info("reusing local Kinesis at %s", self.endpoint)
                return self.endpoint
            self._stop_recorded()  # a stale record, or a server that stopped answering
            node = shutil.which("node")
            if node is None:
                raise LocalKinesisError(NO_NODE)
            node_modules = find_node_modules(Path.cwd(), Path(__file__).resolve().parent)
            if node_modules is None:
                raise LocalKinesisError(NOT_INSTALLED)
            attempts = 1 if self.port is not None else 3  # a picked free port can be taken
            for attempt in range(1, attempts + 1):
                port = self.port if self.port is not None else _free_port()
                try:
                    return self._launch(node, node_modules, port)
                except LocalKinesisError:
                    if attempt == attempts:
                        raise
            raise AssertionError("unreachable")

    def _launch(self, node: str, node_modules: Path, port: int) -> str:
        endpoint = f"http://{HOST}:{port}"
        if not _port_free(port):
            raise LocalKinesisError(f"port {port} on {HOST} is already in use")
        command = [node, str(LAUNCHER), str(port)]
        if self.persist:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            command.append(str(self.data_dir))
        env = dict(os.environ)
        env["NODE_PATH"] = os.pathsep.join(
            p for p in (str(node_modules), os.environ.get("NODE_PATH", "")) if p
        )
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log_handle:
            log_handle.write(
                f"--- {datetime.now(UTC).isoformat()} starting on port {port}\n".encode()
            )
            log_handle.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=env,
                start_new_session=True,  # own process group: stop() kills it whole
            )
        # Ready once *this* process says it listens (another server on the port would answer
        # the probe too) and the API answers.
        ready = f"listening on {endpoint} (pid {process.pid})".encode()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not (_log_has(self.log_file, log_start, ready) and answers(endpoint, timeout=0.5)):
            if process.poll() is not None:
                tail = _log_tail(self.log_file)
                if "Cannot find module 'kinesalite'" in tail or NOT_INSTALLED in tail:
                    raise LocalKinesisError(NOT_INSTALLED)
                raise LocalKinesisError(
                    f"local Kinesis exited with code {process.returncode} on port {port}: "
                    f"{tail or 'no output'} (log: {self.log_file})"
                )
            if time.monotonic() > deadline:
                self._kill(process.pid, process)
                raise LocalKinesisError(
                    f"local Kinesis did not answer on {endpoint} within {START_TIMEOUT_S:.0f}s "
                    f"(log: {self.log_file})"
                )
            time.sleep(0.05)
        self._write_info(
            {
                "pid": process.pid,
                "pgid": process.pid,
                "port": port,
                "endpoint": endpoint,
                "persist": self.persist,
                "started_at": datetime.now(UTC).isoformat(),
                "log": str(self.log_file),
            }
        )
        self._process, self._endpoint, self._owned = process, endpoint, True
        log.info("started local Kinesis at %s (pid %d)", endpoint, process.pid)
        return endpoint

    def stop(self) -> None:
        """Stop this state dir's server (whoever started it) and forget it; safe if not running."""
        with self._lock():
            self._stop_recorded()

    def _stop_recorded(self) -> None:
        info = self._read_info()
        if info is not None:
            pid = int(info["pid"])
            if _alive(pid) and _is_launcher(pid):
                own = self._process if self._process and self._process.pid == pid else None
                self._kill(pid, own)
                log.info("stopped local Kinesis (pid %d)", pid)
        if self._process is not None and self._process.poll() is None:
            self._kill(self._process.pid, self._process)
        self.server_file.unlink(missing_ok=True)
        self._process, self._endpoint, self._owned = None, None, False

    @staticmethod
    def _kill(pid: int, process: subprocess.Popen[bytes] | None) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers, and reap our own child."""
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT_S), (signal.SIGKILL, STOP_TIMEOUT_S)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # its own group (start_new_session): kill it whole
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if process is not None:
                    if process.poll() is not None:
                        return
                elif not _alive(pid):
                    return
                time.sleep(0.02)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> LocalKinesis:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the server only if this instance started it (a reused one keeps running)."""
        if self._owned:
            self.stop()


def ensure_local_kinesis(home: Home) -> str:
    """The endpoint of the local server under `home.kinesis`, started if it is not running."""
    home.kinesis.mkdir(parents=True, exist_ok=True)
    return LocalKinesis(home.kinesis).start()
