"""An S3-compatible bucket on loopback: moto's server mode as a subprocess, like redis-server.

Fixtures for any test file (pytest finds fixtures imported into a test module)::

    from ..moto_server import moto_server_fixture, s3_output_fixture  # noqa: F401

    def test_something(s3_output: str) -> None:  # "s3://t-1a2b3c4d5e/crawl", bucket made
        ...

pytest looks fixtures up among the test module's names, so import every fixture the test
needs, directly or not (``s3_output`` uses ``moto_server``). Each fixture function is called
``<fixture>_fixture`` so that the import does not clash with the test's argument (ruff F811).

``s3_output`` points this process's AWS_* variables at the session's server (monkeypatched,
so child processes started afterwards from ``os.environ`` inherit them); ``s3_environ(url)``
gives the same variables for an explicit subprocess environment. ``moto_factory`` starts private
servers, e.g. one whose requests must be signed (``MotoServer.require_auth``).
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.request import ProxyHandler, Request, build_opener

import pytest

from .conftest import free_port, wait_for

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret-do-not-log"
# The server is on loopback: never reach it through an HTTP(S)_PROXY from the environment.
LOOPBACK = "127.0.0.1,localhost"
_direct = build_opener(ProxyHandler({}))


@dataclass
class MotoServer:
    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log, stderr=log)
        try:
            wait_for(self.up, timeout=30, what=f"moto server on port {self.port}")
        except BaseException:
            self.stop()  # no orphan when it never came up
            raise

    def up(self) -> bool:
        if self.process is None or self.process.poll() is not None:
            raise AssertionError(f"moto server exited: {self.log.read_text()[-2000:]}")
        try:
            with _direct.open(f"{self.endpoint}/moto-api/data.json", timeout=1):
                return True
        except HTTPError:
            return True  # it answers
        except (URLError, OSError):
            return False

    def require_auth(self, free_requests: float = 0) -> None:
        """From now on (after ``free_requests`` more) requests must be signed with a key that
        exists in the server's IAM, and are checked against its policies (moto's
        INITIAL_NO_AUTH_ACTION_COUNT); ``float("inf")`` turns that off again."""
        # Not urllib's default form content type: Flask would parse the body away as a form.
        request = Request(f"{self.endpoint}/moto-api/reset-auth", data=str(free_requests).encode(),
                          headers={"Content-Type": "text/plain"}, method="POST")
        with _direct.open(request, timeout=5):
            pass

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None


def s3_environ(endpoint: str) -> dict[str, str]:
    """AWS variables for a process that should use the moto server at ``endpoint``."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": "us-east-1",
            "NO_PROXY": LOOPBACK, "no_proxy": LOOPBACK}


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client of the server's, for a test to arrange or inspect a bucket (after
    ``use_s3``, whose NO_PROXY keeps it off any proxy)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY)


def make_bucket(endpoint: str, name: str | None = None) -> str:
    bucket = name or f"t-{uuid.uuid4().hex[:10]}"
    s3_client(endpoint).create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(name="moto_factory")
def moto_factory_fixture(
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], MotoServer]]:
    started: list[MotoServer] = []

    def make() -> MotoServer:
        server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture(name="moto_server", scope="session")
def moto_server_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    server.start()
    yield server
    server.stop()


def use_s3(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, endpoint: str) -> None:
    """Point boto3 in this process at ``endpoint`` and nothing else: no ~/.aws files, no
    profile, no other endpoint variable."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION",
                 "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name, value in s3_environ(endpoint).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(name="s3_output")
def s3_output_fixture(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch,
                      tmp_path: Path) -> str:
    """``s3://<fresh bucket>/crawl`` on the session's moto server, AWS_* variables set."""
    use_s3(monkeypatch, tmp_path, moto_server.endpoint)
    return f"s3://{make_bucket(moto_server.endpoint)}/crawl"


def s3_objects(output: str, endpoint: str) -> dict[str, Any]:
    """Every object under an ``s3://bucket/prefix`` output: key -> its listing entry (Size,
    ETag, LastModified)."""
    bucket, _, prefix = output.removeprefix("s3://").partition("/")
    s3 = s3_client(endpoint)
    found: dict[str, Any] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", ()):
            found[obj["Key"]] = obj
    return found
