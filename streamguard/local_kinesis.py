"""A local Kinesis-compatible server (kinesalite) for development, demos and tests.

One server per state directory: `server.json` there names the running server, so every process
(CLI, Dagster daemon, tests) that asks for it shares one instead of starting another. Streams
are kept in LevelDB under the same directory, so they survive a restart of the server.
"""

from __future__ import annotations

import http.client
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

from streamguard.config import Home
from streamguard.local_server import HOST, LocalServer, LocalServerError

LAUNCHER = Path(__file__).with_name("kinesalite_launcher.js")

NOT_INSTALLED = "kinesalite is not installed: run `npm install` in the repo root (make does this)"
NO_NODE = "node is not installed: install Node.js 18+ to run the local Kinesis server"

# A liveness probe needs an Authorization header of the right shape; kinesalite checks no
# signature, so this one is a fixed placeholder (no credentials involved).
_PROBE_AUTH = (
    "AWS4-HMAC-SHA256 Credential=streamguard-local/20000101/us-east-1/kinesis/aws4_request, "
    "SignedHeaders=host;x-amz-date, Signature=0"
)


class LocalKinesisError(LocalServerError):
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


class LocalKinesis(LocalServer):
    """Start, find, or stop the kinesalite server that belongs to `state_dir`.

    `port` None picks a free loopback port. `persist` keeps streams in LevelDB under
    `state_dir/data` (in memory otherwise: faster reads, gone when the server stops).
    """

    label = "local Kinesis"
    error_type = LocalKinesisError
    address_key = "endpoint"  # the name in server.json since before LocalServer

    def __init__(self, state_dir: Path, port: int | None = None, *, persist: bool = True) -> None:
        super().__init__(state_dir, port)
        self.persist = persist
        self._node_modules: Path | None = None

    @property
    def endpoint(self) -> str:
        """The URL of this state dir's server (`http://127.0.0.1:PORT`)."""
        return self.address

    def address_for(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    def port_of(self, address: str) -> int:
        return int(urlsplit(address).port or 0)

    def answers(self, address: str) -> bool:
        return answers(address)

    def prepare(self) -> list[str]:
        node = shutil.which("node")
        if node is None:
            raise LocalKinesisError(NO_NODE)
        self._node_modules = find_node_modules(Path.cwd(), Path(__file__).resolve().parent)
        if self._node_modules is None:
            raise LocalKinesisError(NOT_INSTALLED)
        return [node, str(LAUNCHER)]

    def arguments(self, port: int) -> list[str]:
        if not self.persist:
            return [str(port)]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return [str(port), str(self.data_dir)]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["NODE_PATH"] = os.pathsep.join(
            p for p in (str(self._node_modules or ""), os.environ.get("NODE_PATH", "")) if p
        )
        return env

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        # This process's own line: another server on the port would answer the probe too.
        return self.log_has(
            log_start, f"listening on {self.address_for(port)} (pid {pid})".encode()
        )

    def is_ours(self, pid: int) -> bool:
        return self.cmdline_has(pid, LAUNCHER.name)

    def explain_exit(self, tail: str) -> str | None:
        missing = "Cannot find module 'kinesalite'" in tail or NOT_INSTALLED in tail
        return NOT_INSTALLED if missing else None


def ensure_local_kinesis(home: Home) -> str:
    """The endpoint of the local server under `home.kinesis`, started if it is not running."""
    home.kinesis.mkdir(parents=True, exist_ok=True)
    return LocalKinesis(home.kinesis).start()
