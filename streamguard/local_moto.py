"""A local AWS API (moto's `moto_server`, from the `moto[server]` dev extra) on loopback.

It serves S3 for a lake and MLflow artifacts on `s3://` in development and tests (delta-rs
commits there with conditional puts, as on AWS S3), and the services the Terraform drift tests
create. Managed like the other local servers (`streamguard.local_server`): one per state
directory, shared through `server.json`. Its state is in memory: gone when it stops.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import boto3

from streamguard.local_server import HOST, LocalServer, LocalServerError

NOT_INSTALLED = "moto[server] is not installed: run `make setup` (the dev extra)"
# moto accepts any credentials; these name no real account.
LOCAL_REGION = "us-east-1"
LOCAL_KEY = "testing"


class LocalMotoError(LocalServerError):
    """The local moto server could not be started (one line, saying what to do)."""


class LocalMoto(LocalServer):
    """Start, find, or stop the `moto_server` that belongs to `state_dir`.

    `environment`: variables added to the server's own (moto options such as
    MOTO_IAM_LOAD_MANAGED_POLICIES).
    """

    label = "local moto"
    error_type = LocalMotoError

    def __init__(
        self,
        state_dir: Path,
        port: int | None = None,
        *,
        environment: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(state_dir, port)
        self.extra_environment = dict(environment or {})

    def address_for(self, port: int) -> str:
        return f"http://{HOST}:{port}"

    def answers(self, address: str) -> bool:
        try:
            with urllib.request.urlopen(f"{address}/moto-api/", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def prepare(self) -> list[str]:
        executable = Path(sys.executable).with_name("moto_server")
        if not executable.exists():
            raise LocalMotoError(NOT_INSTALLED)
        return [str(executable)]

    def arguments(self, port: int) -> list[str]:
        return ["-H", HOST, "-p", str(port)]

    def environment(self) -> dict[str, str]:
        return {**os.environ, **self.extra_environment}

    def is_ready(self, port: int, pid: int, log_start: int) -> bool:
        return self.log_has(log_start, f"Running on {self.address_for(port)}".encode())

    def is_ours(self, pid: int) -> bool:
        return self.cmdline_has(pid, "moto_server")


def s3_environment(endpoint: str) -> dict[str, str]:
    """The variables that point delta-rs, boto3 and MLflow at an S3-compatible `endpoint` on
    plain HTTP (the local server): what a deployment on another S3-compatible store sets too,
    with its own credentials instead of these placeholders."""
    return {
        "AWS_ENDPOINT_URL": endpoint,  # delta-rs (object_store), boto3
        "MLFLOW_S3_ENDPOINT_URL": endpoint,  # MLflow's artifact client
        "AWS_ALLOW_HTTP": "true",  # delta-rs refuses plain HTTP otherwise
        "AWS_REGION": LOCAL_REGION,
        "AWS_DEFAULT_REGION": LOCAL_REGION,
        "AWS_ACCESS_KEY_ID": LOCAL_KEY,
        "AWS_SECRET_ACCESS_KEY": LOCAL_KEY,
    }


def ensure_bucket(endpoint: str, bucket: str) -> None:
    """Create `bucket` on the S3 API at `endpoint` unless it exists (buckets are not made by
    delta-rs or MLflow)."""
    factory: Any = boto3.client  # its overloads want a literal service name
    s3 = factory(
        "s3",
        endpoint_url=endpoint,
        region_name=LOCAL_REGION,
        aws_access_key_id=LOCAL_KEY,
        aws_secret_access_key=LOCAL_KEY,
    )
    names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
    if bucket not in names:
        s3.create_bucket(Bucket=bucket)
