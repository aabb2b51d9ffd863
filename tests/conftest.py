"""Shared fixtures: a private redis-server, the test web, and crawlfleet processes.

Integration tests use the real parts: a redis-server started here on a free loopback port (never
the machine's shared 6379), the test web as a subprocess, and the real ``crawlfleet`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

CRAWLFLEET = str(Path(sys.executable).with_name("crawlfleet"))
T = TypeVar("T")


def wait_for(check: Callable[[], T | None], *, timeout: float, what: str, every: float = 0.05) -> T:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    workdir: Path
    aof: bool
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.workdir), "--daemonize", "no", "--loglevel", "warning"]
        if self.aof:
            args += ["--appendonly", "yes", "--appendfsync", "always"]
        else:
            args += ["--appendonly", "no"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            self.process.wait(timeout=10)
        self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis"), aof=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Private servers for tests that stop and restart Redis."""
    started: list[RedisServer] = []

    def make(*, aof: bool = True) -> RedisServer:
        server = RedisServer(free_port(), tmp_path / f"redis-{len(started)}", aof=aof)
        server.workdir.mkdir()
        server.start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop(signal.SIGKILL)


@dataclass
class WebUnderTest:
    info: dict[str, Any]
    process: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.info["http_port"])

    @property
    def dns(self) -> str:
        return str(self.info["dns"])

    @property
    def seeds(self) -> list[str]:
        return list(self.info["seeds"])

    def reachable(self, *extra: str) -> list[str]:
        out = subprocess.run(
            [CRAWLFLEET, "testweb", *self.args, "--print-reachable", "--port", str(self.port),
             *extra], check=True, capture_output=True, text=True,
        ).stdout
        return sorted(line for line in out.splitlines() if line)

    def stats(self) -> dict[str, Any]:
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{self.port}/__testweb__/stats", timeout=5) as response:
            return dict(json.loads(response.read()))


def start_testweb(*args: str) -> WebUnderTest:
    process = subprocess.Popen(
        [CRAWLFLEET, "testweb", "--port", "0", "--dns-port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        process.kill()
        pytest.fail("the test web did not start")
    return WebUnderTest(json.loads(line), process, list(args))


@pytest.fixture
def testweb_factory() -> Iterator[Callable[..., WebUnderTest]]:
    started: list[WebUnderTest] = []

    def make(*args: str) -> WebUnderTest:
        web = start_testweb(*args)
        started.append(web)
        return web

    yield make
    for web in started:
        web.process.terminate()
        web.process.wait(timeout=10)


@pytest.fixture
def testweb(testweb_factory: Callable[..., WebUnderTest]) -> WebUnderTest:
    return testweb_factory("--hosts", "4", "--pages", "40")


@dataclass
class Fleet:
    """crawlfleet processes sharing one environment (Redis, namespace, DNS)."""

    env: dict[str, str]
    logdir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, *args: str, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 - the process owns it
        process = subprocess.Popen([CRAWLFLEET, *args], env={**self.env, **env},
                                   stdout=log, stderr=log)
        self.processes[name] = process
        return process

    def start(self, *seeds: str, workers: int = 1) -> list[str]:
        """A scheduler and ``workers`` worker processes (worker-0 ...), then the seeds."""
        self.spawn("scheduler", "scheduler")
        names = [f"worker-{i}" for i in range(workers)]
        for name in names:
            self.spawn(name, "worker", CRAWLFLEET_WORKER_ID=name)
        if seeds:
            self.run("seed", *seeds)
        return names

    def run(self, *args: str, check: bool = True, stdin: str | None = None,
            **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CRAWLFLEET, *args], env={**self.env, **env}, input=stdin,
                              capture_output=True, text=True, check=check, timeout=60)

    def status(self) -> dict[str, Any]:
        return dict(json.loads(self.run("status", "--json").stdout))

    def wait_finished(self, timeout: float = 90) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise AssertionError(f"{name} exited with {process.returncode}: "
                                         f"{self.log(name)[-2000:]}")
            status = self.status()
            assert_accounted(status)
            return status if status["finished"] else None

        status: dict[str, Any] = wait_for(check, timeout=timeout, what="the crawl to finish",
                                          every=0.2)
        self.check()
        return status

    def check(self) -> dict[str, Any]:
        """``crawlfleet check``: the real structures agree with the counters."""
        done = self.run("check", "--json", check=False)
        assert done.stdout, f"check printed nothing: {done.stderr[-3000:]}"
        report = dict(json.loads(done.stdout))
        assert done.returncode == 0 and report["ok"], f"check failed: {done.stdout[-3000:]}"
        return report

    def export(self) -> list[dict[str, Any]]:
        out = self.logdir / "export.jsonl"
        self.run("export", "--out", str(out))
        return [json.loads(line) for line in out.read_text().splitlines()]

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Stop a process and forget it (``spawn`` with the same name starts a new one)."""
        process = self.processes.pop(name)
        if process.poll() is None:
            process.send_signal(sig)
        return process.wait(timeout=timeout)

    def stop_all(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


def assert_accounted(status: dict[str, Any]) -> None:
    parts = ("pages", "failed", "skipped", "queued", "in_flight", "quarantined")
    assert status["seen"] == sum(status[k] for k in parts), f"URLs unaccounted for: {status}"


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(redis_url: str, web: WebUnderTest, **env: str) -> Fleet:
        base = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
        base.update({
            "CRAWLFLEET_REDIS_URL": redis_url,
            "CRAWLFLEET_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
            "CRAWLFLEET_DNS_NAMESERVERS": web.dns,
            "CRAWLFLEET_ALLOW_PRIVATE": "1",  # the test web lives on loopback
            "CRAWLFLEET_LOG_FORMAT": "json",
            # The test web is ours; politeness tests set their own delay.
            "CRAWLFLEET_CRAWL_DELAY": "0",
            **env,
        })
        logdir = tmp_path / f"fleet{len(fleets)}"
        logdir.mkdir()
        fleet = Fleet(base, logdir)
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        fleet.stop_all()
