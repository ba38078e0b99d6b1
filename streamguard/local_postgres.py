"""A local PostgreSQL server for tests and development: Dagster's (and MLflow's) production store.

One server per state directory, as the other local servers (`LocalServer`): the cluster lives in
`state_dir/data` (made by `initdb` on first start), `server.json` names the running postmaster,
and it listens on a loopback port only, with no Unix socket. Clients connect as `streamguard` with
trust authentication: only processes on this machine reach it, as with the local Kinesis server.
URLs are `postgresql+psycopg2://`: SQLAlchemy 2.1 picks psycopg 3 for a bare `postgresql://`, on
which dagster-postgres fails (`NOTIFY run_events, $1`).

PostgreSQL refuses to run as root (`initdb: error: cannot be run as root`). Run as root, as on
the machines this project is built on, both `initdb` and `postgres` are started in a new user
namespace (`unshare --user`): there the process is `nobody`, so PostgreSQL runs, while the kernel
still checks files as root's, so the cluster can live anywhere root can write (a pytest `tmp_path`
under a 0700 folder included) and stays root's on disk. Where user namespaces are not allowed (a
container's seccomp profile), the server runs as the `postgres` system user through `runuser`
instead; that user then must be able to reach `state_dir`.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import psycopg2

from streamguard.local_server import HOST, LocalServer, LocalServerError

__all__ = ["USER", "LocalPostgres", "LocalPostgresError", "RootMode", "local_postgres"]

#: The superuser `initdb` creates; clients connect as it, without a password (loopback, trust).
USER = "streamguard"
#: How root runs the server: "auto" tries a user namespace, then the `postgres` user.
RootMode = Literal["auto", "user-namespace", "runuser"]
SYSTEM_USER = "postgres"  # the Debian package's system user, for `runuser`

NOT_INSTALLED = (
    "PostgreSQL's server programs (initdb, postgres) are not installed: "
    "install Debian's postgresql-15 (`apt-get install postgresql-15`), or put their bin folder "
    "on PATH"
)
ROOT_REFUSED = (
    "PostgreSQL refuses to run as root, and neither a user namespace (`unshare --user`) nor "
    f"the {SYSTEM_USER!r} user (`runuser`) is available here: run as a non-root user"
)


class LocalPostgresError(LocalServerError):
    """The local server could not be started (one line, saying what to do)."""


def find_program(name: str) -> str | None:
    """A PostgreSQL server program: on PATH, else in the newest Debian `/usr/lib/postgresql/N`
    (Debian keeps initdb and postgres off PATH)."""
    found = shutil.which(name)
    if found:
        return found
    versions = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    return max(versions, key=lambda p: int(Path(p).parts[-3]), default=None)


def answers(address: str, timeout: float = 1.0) -> bool:
    """Whether a PostgreSQL server at `address` accepts our user and runs a query."""
    parts = urlsplit(address)
    try:
        conn = psycopg2.connect(
            host=parts.hostname, port=parts.port, user=parts.username or USER,
            dbname="postgres", connect_timeout=max(1, round(timeout)),
        )  # fmt: skip
    except psycopg2.Error:
        return False
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            return cur.fetchone() == (1,)
    except psycopg2.Error:
        return False
    finally:
        conn.close()


def _user_namespaces_work(unshare: str) -> bool:
    try:
        done = subprocess.run([unshare, "--user", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def _chown_tree(path: Path, uid: int, gid: int) -> None:
    """Give the cluster to the user that will run the server (if another one made it)."""
    if not path.exists() or path.stat().st_uid == uid:
        return
    for root, dirs, files in os.walk(path):
        for name in (root, *(os.path.join(root, n) for n in (*dirs, *files))):
            os.chown(name, uid, gid, follow_symlinks=False)


class LocalPostgres(LocalServer):
    """Start, find, or stop the PostgreSQL server that belongs to `state_dir`.

    `port` None picks a free loopback port. `durable=False` turns off fsync (and the commit
    waits for it): for tests, whose cluster is thrown away, it saves a disk flush per commit; a
    crash of the machine may then corrupt the cluster. `root` says how root runs it (see the
    module docstring); it is ignored for any other user.
    """

    label = "local PostgreSQL"
    address_key = "url"
    error_type = LocalPostgresError
    start_timeout_s = 30.0
    stop_timeout_s = 15.0  # a fast shutdown writes a checkpoint first
    stop_signal = signal.SIGINT  # fast shutdown: SIGTERM would wait for clients to disconnect

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        *,
        durable: bool = True,
        root: RootMode = "auto",
    ) -> None:
        super().__init__(state_dir, port)
        self.durable = durable
        self.root_mode: RootMode = root
        self._postgres: str | None = None

    @property
    def server_url(self) -> str:
        """`postgresql+psycopg2://streamguard@127.0.0.1:PORT`: the server, without a database."""
        return self.address

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of `database` on this server (Dagster's `postgres_url`, MLflow's
        tracking URI)."""
        return f"{self.address}/{database}"

    def create_database(self, name: str) -> str:
        """Create `name` unless it exists; its URL. Dagster and MLflow create their tables, not
        the database."""
        parts = urlsplit(self.address)
        conn = psycopg2.connect(
            host=parts.hostname, port=parts.port, user=USER, dbname="postgres", connect_timeout=5
        )
        try:
            conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute("select 1 from pg_database where datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'create database "{name.replace(chr(34), chr(34) * 2)}"')
        finally:
            conn.close()
        return self.url(name)

    # -- LocalServer -----------------------------------------------------------------------

    def address_for(self, port: int) -> str:
        return f"postgresql+psycopg2://{USER}@{HOST}:{port}"

    def port_of(self, address: str) -> int:
        return int(urlsplit(address).port or 0)

    def answers(self, address: str) -> bool:
        return answers(address)

    def prepare(self) -> list[str]:
        initdb, postgres = find_program("initdb"), find_program("postgres")
        if initdb is None or postgres is None:
            raise LocalPostgresError(NOT_INSTALLED)
        self._postgres = postgres
        prefix = self._run_as()
        if not (self.data_dir / "PG_VERSION").is_file():
            self._initdb(prefix, initdb)
        return [*prefix, postgres]

    def arguments(self, port: int) -> list[str]:
        args = ["-D", str(self.data_dir), "-p", str(port), "-h", HOST, "-k", ""]  # no socket
        if not self.durable:
            args += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                     "-c", "full_page_writes=off"]  # fmt: skip
        return args

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        # Lines of this launch: another server on the port would answer the probe too (ours
        # then exits: "could not bind").
        listening = f'listening on IPv4 address "{HOST}", port {port}'.encode()
        return self.log_has(log_start, listening) and self.log_has(
            log_start, b"database system is ready to accept connections"
        )

    def is_ours(self, pid: int) -> bool:
        return self.cmdline_has(pid, "postgres", str(self.data_dir))

    def explain_exit(self, tail: str) -> str | None:
        if "cannot be run as root" in tail or "execution of PostgreSQL by a user with" in tail:
            return ROOT_REFUSED
        return None

    # -- root ------------------------------------------------------------------------------

    def _run_as(self) -> list[str]:
        """The prefix that runs initdb and postgres as a user PostgreSQL accepts, and the cluster
        owned by that user."""
        if os.geteuid() != 0:
            return []
        unshare = shutil.which("unshare")
        if self.root_mode in ("auto", "user-namespace"):
            if unshare and _user_namespaces_work(unshare):
                _chown_tree(self.data_dir, 0, 0)
                return [unshare, "--user"]
            if self.root_mode == "user-namespace":
                raise LocalPostgresError(
                    "user namespaces are not available here (`unshare --user true` failed)"
                )
        runuser = shutil.which("runuser")
        try:
            account = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            account = None
        if runuser is None or account is None:
            raise LocalPostgresError(ROOT_REFUSED)
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        _chown_tree(self.data_dir, account.pw_uid, account.pw_gid)
        prefix = [runuser, "-u", SYSTEM_USER, "--"]
        probe = subprocess.run([*prefix, "test", "-w", str(self.data_dir)], capture_output=True)
        if probe.returncode != 0:
            raise LocalPostgresError(
                f"the {SYSTEM_USER!r} user, which runs PostgreSQL for root here, cannot reach "
                f"{self.data_dir}: use a state folder every user can traverse"
            )
        return prefix

    def _initdb(self, prefix: list[str], initdb: str) -> None:
        with self.log_file.open("ab") as log_handle:
            done = subprocess.run(
                [*prefix, initdb, "-D", str(self.data_dir), "-U", USER, "--auth=trust",
                 "--encoding=UTF8", "--locale=C", *([] if self.durable else ["--no-sync"])],
                stdin=subprocess.DEVNULL, stdout=log_handle, stderr=subprocess.STDOUT,
                cwd=self.state_dir, env=self.environment(),
            )  # fmt: skip
        if done.returncode != 0:
            tail = self.log_file.read_text(errors="replace").strip().splitlines()[-3:]
            known = self.explain_exit(" | ".join(tail))
            raise LocalPostgresError(
                known
                or f"initdb failed ({done.returncode}): {' | '.join(tail)} (log: {self.log_file})"
            )


@contextlib.contextmanager
def local_postgres(
    state_dir: Path,
    database: str = "dagster",
    *,
    port: int | None = None,
    durable: bool = True,
) -> Iterator[str]:
    """A server for the block with `database` created; yields its `postgresql+psycopg2://` URL
    (what `DAGSTER_PG_URL` or `MLFLOW_TRACKING_URI` take). Stopped after the block if this call
    started it."""
    with LocalPostgres(state_dir, port=port, durable=durable) as server:
        yield server.create_database(database)
