"""A local Kafka-protocol broker (noida-db, from its PyPI wheel) for development, demos and tests.

The wheel ships one native binary that speaks several protocols; only its Kafka service is
started (`start --only kafka`), bound to 127.0.0.1, in the foreground as our child in its own
session, with its data under `STREAMGUARD_HOME/kafka/data`. It keeps topics and committed group
offsets across a restart: it saves its whole state as one JSON file, also on SIGTERM (a few
seconds for a few hundred thousand records), so a stop waits for that before it kills.

Like any local broker here, it checks no SASL credentials: the managed-service settings of
`streamguard.kafka` are tested as configuration only.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import stat
import struct
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from streamguard.config import Home
from streamguard.local_server import HOST, LocalServer, LocalServerError, ServerStatus

__all__ = [
    "LocalKafka",
    "LocalKafkaError",
    "ServerStatus",
    "answers",
    "local_kafka",
    "start",
    "status",
    "stop",
]

BINARY = "noida-db"
NOT_INSTALLED = "noida-db is not installed: `pip install noida-db` (the project depends on it)"

# The binary is linked against a newer glibc symbol version than Debian 12 has, only as a weak
# reference, so the loader warns on every start and the broker works. Kept out of error messages.
GLIBC_WARNING = re.compile(r"^.*weak version `GLIBC_[0-9.]+' not found.*$\n?", re.MULTILINE)

# ApiVersions v0 (api key 18), correlation id 0x5347 ("SG"), client id "streamguard-probe".
_PROBE_CORRELATION = 0x5347
_PROBE_CLIENT = b"streamguard-probe"
_PROBE = struct.pack(">hhih", 18, 0, _PROBE_CORRELATION, len(_PROBE_CLIENT)) + _PROBE_CLIENT


class LocalKafkaError(LocalServerError):
    """The local broker could not be started (one line, saying what to do)."""


def answers(bootstrap: str, timeout: float = 1.0) -> bool:
    """Whether a Kafka broker at `host:port` answers an ApiVersions request without error.

    A raw request on a socket: milliseconds, and no client library threads to start and stop.
    """
    host, _, port = bootstrap.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout) as sock:
            sock.sendall(struct.pack(">i", len(_PROBE)) + _PROBE)
            header = _recv_exact(sock, 10)  # size, correlation id, error code
    except (OSError, ValueError):
        return False
    if header is None:
        return False
    _, correlation, error = struct.unpack(">iih", header)
    return correlation == _PROBE_CORRELATION and error == 0


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def _binary() -> Path:
    """The broker binary inside the noida-db wheel (run directly: its Python wrapper would stand
    between our signals and the broker)."""
    try:
        path = Path(str(resources.files("noida_db").joinpath(BINARY)))
    except ModuleNotFoundError:
        raise LocalKafkaError(NOT_INSTALLED) from None
    if not path.is_file():
        raise LocalKafkaError(NOT_INSTALLED)
    if not os.access(path, os.X_OK):  # as the wheel's own wrapper does before running it
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class KafkaProtocolServer(LocalServer):
    """A local Kafka-protocol broker: its address is a bootstrap string `127.0.0.1:PORT`, and it
    is up when it answers a Kafka ApiVersions request."""

    @property
    def bootstrap(self) -> str:
        """The bootstrap servers string of this state dir's broker."""
        return self.address

    def address_for(self, port: int) -> str:
        return f"{HOST}:{port}"

    def answers(self, address: str) -> bool:
        return answers(address, timeout=0.5)


class LocalKafka(KafkaProtocolServer):
    """Start, find, or stop the noida-db Kafka broker that belongs to `state_dir`.

    `port` None picks a free loopback port. The address is a bootstrap string `127.0.0.1:PORT`.
    """

    label = "local Kafka"
    error_type = LocalKafkaError
    start_timeout_s = 20.0
    stop_timeout_s = 60.0  # it writes its whole state as JSON on SIGTERM

    def prepare(self) -> list[str]:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [str(_binary())]

    def arguments(self, port: int) -> list[str]:
        return [
            "start",
            "--only",
            "kafka",
            "--kafka-port",
            str(port),
            "--host",
            HOST,
            "--data-dir",
            str(self.data_dir),
        ]

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        # It prints "  kafka          127.0.0.1:PORT" once listening, and exits when the port
        # is taken, so the line is this process's own.
        return self.log_has(log_start, f" {HOST}:{port}\n".encode())

    def is_ours(self, pid: int) -> bool:
        return self.cmdline_has(pid, BINARY, str(self.data_dir))

    def clean_tail(self, tail: str) -> str:
        parts = [p for p in tail.split(" | ") if p and not GLIBC_WARNING.search(p)]
        return " | ".join(parts)

    def explain_exit(self, tail: str) -> str | None:
        match = re.search(r"port (\d+) is already in use", tail)
        return f"port {match.group(1)} on {HOST} is already in use" if match else None


# --------------------------------------------------------------------------- CLI-level verbs


def start(home: Home | None = None, port: int | None = None) -> str:
    """Start (or reuse) the broker under `STREAMGUARD_HOME/kafka`; returns its bootstrap string."""
    return LocalKafka((home or Home.from_env()).kafka, port=port).start()


def stop(home: Home | None = None) -> None:
    """Stop the broker under `STREAMGUARD_HOME/kafka`, whoever started it; its data stays."""
    LocalKafka((home or Home.from_env()).kafka).stop()


def status(home: Home | None = None) -> ServerStatus:
    """Whether the broker under `STREAMGUARD_HOME/kafka` runs, and its bootstrap string."""
    return LocalKafka((home or Home.from_env()).kafka).status()


@contextlib.contextmanager
def local_kafka(state_dir: Path, port: int | None = None) -> Iterator[str]:
    """A broker for the block (a free loopback port by default), stopped after it: the shape of
    a pytest fixture (`with local_kafka(tmp_path / "kafka") as bootstrap: yield bootstrap`)."""
    with LocalKafka(state_dir, port=port) as server:
        yield server.bootstrap
