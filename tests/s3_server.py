"""An S3-compatible server of the tests' own: moto's server mode on a free loopback port.

Registered for every test module by `pytest_plugins` in conftest. `s3_server` starts one server
per session (real HTTP, so subprocesses reach it too); `s3_bucket` makes a fresh bucket per test,
so tests never see each other's objects. Credentials are throwaway values set in the
environment, as a deployment sets real ones; `s3_env` is what a subprocess needs.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.deploy import free_port

ACCESS_KEY = "bitplan-test-access-key"
SECRET_KEY = "bitplan-test-secret-0123456789"
REGION = "us-east-1"


@dataclass(frozen=True)
class Bucket:
    """A bucket on the test server, and everything a process needs to use it."""

    endpoint: str
    name: str
    prefix: str = "artifacts"

    @property
    def url(self) -> str:
        return f"s3://{self.name}/{self.prefix}"

    def env(self) -> dict[str, str]:
        """The variables that point a `bitplan` process at this bucket."""
        return {
            "BITPLAN_STORE_URL": self.url,
            "BITPLAN_S3_ENDPOINT_URL": self.endpoint,
            **credentials(),
        }

    def client(self) -> Any:
        """A plain boto3 client, for looking at the bucket from outside bitplan."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def keys(self) -> list[str]:
        listing = self.client().list_objects_v2(Bucket=self.name)
        return sorted(item["Key"] for item in listing.get("Contents", []))


def credentials() -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        # Nothing from the machine's own AWS configuration may leak into a test.
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of moto's S3 server, running in a thread of the test process."""
    server_module = pytest.importorskip("moto.server", reason="moto[server] is not installed")
    port = free_port()
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A new, empty bucket; this process's AWS variables point at the test server."""
    for name, value in credentials().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    bucket = Bucket(s3_server, f"bitplan-{secrets.token_hex(6)}")
    bucket.client().create_bucket(Bucket=bucket.name)
    return bucket
