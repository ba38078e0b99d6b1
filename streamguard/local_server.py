"""The lifecycle every local development server shares: one server per state directory.

`server.json` in the state directory names the running server, so every process (CLI, Dagster
daemon, tests) that asks for it shares one instead of starting another; a file lock makes start
and stop one at a time across processes. The server runs in its own session (process group), so
a stop reaches all of it even when it was started in the background of a non-interactive shell
(which would otherwise ignore SIGINT). A subclass says how to launch, probe and recognise its
server: `LocalKinesis` (kinesalite) and `LocalKafka` (noida-db) are the two.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

__all__ = ["HOST", "LocalServer", "LocalServerError", "ServerStatus"]

HOST = "127.0.0.1"


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


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


def _reap(pid: int) -> None:
    """Collect a stopped server that another handle in this process started (else a zombie
    stays until the process exits); a no-op for anyone else's child."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


@contextlib.contextmanager
def folder_lock(folder: Path, name: str) -> Iterator[None]:
    """An exclusive lock file in `folder`, held across processes for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / name).open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class LocalServerError(RuntimeError):
    """The local server could not be started (one line, saying what to do)."""


@dataclass(frozen=True)
class ServerStatus:
    """What `status` reports: whether the recorded server answers, and where it lives."""

    running: bool
    address: str | None
    pid: int | None
    state_dir: Path
    log_file: Path


class LocalServer:
    """Start, find, or stop the server that belongs to `state_dir` (`port` None: a free one)."""

    #: Shown in messages and logs ("local Kafka").
    label = "local server"
    #: The key of the address in `server.json` (a subclass may keep an older file's name).
    address_key = "address"
    error_type: type[LocalServerError] = LocalServerError
    start_timeout_s = 15.0
    #: How long the stop signal may take before SIGKILL (a server may save its data first).
    stop_timeout_s = 5.0
    #: The signal that asks the server to stop cleanly (PostgreSQL: SIGINT, its fast shutdown;
    #: its SIGTERM waits for every client to disconnect).
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = Path(state_dir).absolute()  # the server runs with cwd=state_dir
        self.port = port
        self._address: str | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._owned = False

    # -- what a subclass says ---------------------------------------------------------------

    def address_for(self, port: int) -> str:
        """The address clients use for a server on `port`."""
        raise NotImplementedError

    def port_of(self, address: str) -> int:
        """The port in an address made by `address_for`."""
        return int(address.rpartition(":")[2].strip("/"))

    def answers(self, address: str) -> bool:
        """Whether a server of this kind answers at `address` (a cheap protocol-level probe)."""
        raise NotImplementedError

    def prepare(self) -> list[str]:
        """Checks before a launch (raise `error_type` with what to do); the command's prefix."""
        raise NotImplementedError

    def arguments(self, port: int) -> list[str]:
        """The rest of the command line for a server on `port`."""
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        """The server's environment."""
        return dict(os.environ)

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        """Whether *this* process (not another server on the port) says it is serving."""
        raise NotImplementedError

    def is_ours(self, pid: int) -> bool:
        """Guard against a recycled pid: is `pid` really a server of this kind?"""
        raise NotImplementedError

    def explain_exit(self, tail: str) -> str | None:
        """A one-line reason for an early exit, when the log tail says something known."""
        return None

    def clean_tail(self, tail: str) -> str:
        """The log tail as shown in errors (a subclass drops known harmless noise)."""
        return tail

    # -- helpers for those answers ------------------------------------------------------------

    def log_has(self, offset: int, marker: bytes) -> bool:
        """Whether the server log holds `marker` after byte `offset` (what this launch wrote)."""
        try:
            with self.log_file.open("rb") as handle:
                handle.seek(offset)
                return marker in handle.read()
        except OSError:
            return False

    @staticmethod
    def cmdline_has(pid: int, *parts: str) -> bool:
        """Whether process `pid`'s command line holds every part; without /proc (macOS) the
        record is trusted."""
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except FileNotFoundError:
            return not Path("/proc/self").exists()
        except OSError:
            return False
        return all(part.encode() in cmdline for part in parts)

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
        valid = isinstance(info, dict) and "pid" in info and self.address_key in info
        return info if valid else None

    def _write_info(self, info: dict[str, Any]) -> None:
        tmp = self.server_file.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        tmp.replace(self.server_file)

    def _lock(self) -> contextlib.AbstractContextManager[None]:
        """One start/stop at a time per state dir, across processes."""
        return folder_lock(self.state_dir, "server.lock")

    # -- state -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The address of this state dir's server."""
        if self._address is None:
            info = self._read_info()
            if info is None:
                raise self.error_type(f"no {self.label} recorded in {self.state_dir}")
            self._address = str(info[self.address_key])
        return self._address

    @property
    def pid(self) -> int | None:
        """The server's process id, if one is recorded."""
        info = self._read_info()
        return int(info["pid"]) if info else None

    def running(self) -> bool:
        """Whether the server recorded in `state_dir` is alive and answering."""
        info = self._read_info()
        if info is None or not _alive(int(info["pid"])):
            return False
        address = str(info[self.address_key])
        if not self.answers(address):
            return False
        self._address = address
        return True

    def status(self) -> ServerStatus:
        """Whether the recorded server runs, with its address and pid (None when it does not)."""
        up = self.running()
        return ServerStatus(
            running=up,
            address=self._address if up else None,
            pid=self.pid if up else None,
            state_dir=self.state_dir,
            log_file=self.log_file,
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> str:
        """Start the server, or reuse the live one recorded in `state_dir`; returns its address."""
        with self._lock():
            if self.running():
                port = self.port_of(self.address)
                if self.port is not None and port != self.port:
                    raise self.error_type(
                        f"a {self.label} for {self.state_dir} already runs on port {port}"
                        f" (not {self.port}): stop it first"
                    )
                log.info("reusing %s at %s", self.label, self.address)
                return self.address
            self._stop_recorded()  # a stale record, or a server that stopped answering
            prefix = self.prepare()
            attempts = 1 if self.port is not None else 3  # a picked free port can be taken
            for attempt in range(1, attempts + 1):
                port = self.port if self.port is not None else _free_port()
                try:
                    return self._launch(prefix, port)
                except LocalServerError:
                    if attempt == attempts:
                        raise
            raise AssertionError("unreachable")

    def _launch(self, prefix: list[str], port: int) -> str:
        address = self.address_for(port)
        if not _port_free(port):
            raise self.error_type(f"port {port} on {HOST} is already in use")
        log_start = self.log_file.stat().st_size if self.log_file.exists() else 0
        with self.log_file.open("ab") as log_handle:
            log_handle.write(
                f"--- {datetime.now(UTC).isoformat()} starting on port {port}\n".encode()
            )
            log_handle.flush()
            process = subprocess.Popen(
                [*prefix, *self.arguments(port)],
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                env=self.environment(),
                start_new_session=True,  # own session and group: stop() signals it whole
            )
        deadline = time.monotonic() + self.start_timeout_s
        while not (self.is_ready(port, process.pid, log_start) and self.answers(address)):
            if process.poll() is not None:
                tail = self.clean_tail(_log_tail(self.log_file))
                known = self.explain_exit(tail)
                raise self.error_type(
                    known
                    or f"{self.label} exited with code {process.returncode} on port {port}: "
                    f"{tail or 'no output'} (log: {self.log_file})"
                )
            if time.monotonic() > deadline:
                self._kill(process.pid, process)
                raise self.error_type(
                    f"{self.label} did not answer on {address} within "
                    f"{self.start_timeout_s:.0f}s (log: {self.log_file})"
                )
            time.sleep(0.05)
        self._write_info(
            {
                "pid": process.pid,
                "pgid": process.pid,
                "port": port,
                self.address_key: address,
                "started_at": datetime.now(UTC).isoformat(),
                "log": str(self.log_file),
            }
        )
        self._process, self._address, self._owned = process, address, True
        log.info("started %s at %s (pid %d)", self.label, address, process.pid)
        return address

    def stop(self) -> None:
        """Stop this state dir's server (whoever started it) and forget it; safe if not running."""
        with self._lock():
            self._stop_recorded()

    def _stop_recorded(self) -> None:
        info = self._read_info()
        if info is not None:
            pid = int(info["pid"])
            if _alive(pid) and self.is_ours(pid):
                own = self._process if self._process and self._process.pid == pid else None
                self._kill(pid, own)
                log.info("stopped %s (pid %d)", self.label, pid)
        if self._process is not None and self._process.poll() is None:
            self._kill(self._process.pid, self._process)
        self.server_file.unlink(missing_ok=True)
        self._process, self._address, self._owned = None, None, False

    def _kill(self, pid: int, process: subprocess.Popen[bytes] | None) -> None:
        """Signal the process group to stop (`stop_signal`), SIGKILL it if it lingers, and reap
        our own child."""
        for sig in (self.stop_signal, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(pid) == pid:  # its own group (start_new_session): kill it whole
                    os.killpg(pid, sig)
                else:
                    os.kill(pid, sig)
            deadline = time.monotonic() + self.stop_timeout_s
            while time.monotonic() < deadline:
                if process is not None:
                    if process.poll() is not None:
                        return
                elif not _alive(pid):
                    _reap(pid)
                    return
                time.sleep(0.02)
            if sig != signal.SIGKILL:
                log.warning("%s (pid %d) ignored %s: killing it", self.label, pid, sig.name)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> Self:
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
