"""Bad input and a missing or locked Redis, through the real ``crawlfleet`` command: one line
naming what is wrong, a non-zero exit, never a traceback, never a password."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ..conftest import Fleet, RedisServer, WebUnderTest, free_port, wait_for

pytestmark = pytest.mark.integration

PASSWORD = "s3cret-Pa55word-42"


class PasswordRedis(RedisServer):
    """A redis-server with --requirepass: the conftest's PING would get NOAUTH."""

    def start(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `make test`, which installs it")
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--requirepass", PASSWORD,
             "--loglevel", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.ping, timeout=10, what=f"redis-server on port {self.port}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(f"AUTH {PASSWORD}\r\nPING\r\n".encode())
                time.sleep(0.05)
                return b"+PONG" in s.recv(64)
        except OSError:
            return False

    def url_with(self, password: str) -> str:
        return f"redis://:{password}@127.0.0.1:{self.port}/0"


@pytest.fixture
def password_redis(tmp_path: Path) -> Iterator[PasswordRedis]:
    (tmp_path / "redis-pw").mkdir()
    server = PasswordRedis(free_port(), tmp_path / "redis-pw", aof=False)
    server.start()
    yield server
    server.stop(signal.SIGKILL)


def assert_one_line(text: str) -> str:
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


def test_one_shot_commands_say_redis_is_unreachable(
    testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0", testweb)
    for args in (["status"], ["check"], ["export"], ["seed", *testweb.seeds]):
        done = fleet.run(*args, check=False)
        assert done.returncode == 1, (args, done.stderr)
        line = assert_one_line(done.stderr)
        assert "unreachable" in line and "redis://:***@127.0.0.1:" in line, line
        assert PASSWORD not in done.stdout + done.stderr


def test_a_worker_waits_for_redis_then_works(
    testweb: WebUnderTest, fleet_factory: Callable[..., Fleet], tmp_path: Path
) -> None:
    redis = RedisServer(free_port(), tmp_path / "late-redis", aof=False)
    redis.workdir.mkdir()
    fleet = fleet_factory(redis.url, testweb)
    worker = fleet.spawn("worker-0", "worker", CRAWLFLEET_WORKER_ID="worker-0")
    scheduler = fleet.spawn("scheduler", "scheduler")
    try:
        wait_for(lambda: fleet.log("worker-0").count("redis_unavailable") >= 3, timeout=20,
                 what="the worker to log redis_unavailable while it waits")
        assert worker.poll() is None and scheduler.poll() is None, fleet.log("worker-0")
        assert "Traceback" not in fleet.log("worker-0")
        redis.start()
        fleet.run("seed", *testweb.seeds)
        fleet.wait_finished()
        assert sorted(r["url"] for r in fleet.export()) == testweb.reachable()
    finally:
        fleet.stop_all()
        redis.stop(signal.SIGKILL)


def test_no_password_in_any_output_and_a_wrong_one_is_one_line(
    password_redis: PasswordRedis, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet],
    tmp_path: Path,
) -> None:
    fleet = fleet_factory(password_redis.url_with(PASSWORD), testweb,
                          CRAWLFLEET_LOG_LEVEL="debug")
    outputs: list[str] = []
    fleet.start(workers=1)
    seeded = fleet.run("seed", *testweb.seeds)
    outputs += [seeded.stdout, seeded.stderr]
    fleet.wait_finished()
    status = fleet.run("status")
    checked = fleet.run("check")
    export = fleet.run("export", "--out", str(tmp_path / "out.jsonl"))
    crawled = fleet.run("crawl", *testweb.seeds, "--fresh", "--out", str(tmp_path / "c.jsonl"),
                        CRAWLFLEET_NAMESPACE="pwcrawl")
    assert crawled.returncode == 0, crawled.stderr
    assert "redis://:***@127.0.0.1" in crawled.stderr
    fleet.stop("worker-0")
    fleet.stop("scheduler")
    for done in (status, checked, export, crawled):
        outputs += [done.stdout, done.stderr]
    outputs += [path.read_text(errors="replace") for path in fleet.logdir.glob("*.log")]
    assert any('"event": "page"' in text or '"event":"page"' in text for text in outputs)
    assert not [text[:200] for text in outputs if PASSWORD in text]

    wrong = fleet_factory(password_redis.url_with("not-the-password"), testweb)
    for args in (["status"], ["seed", *testweb.seeds], ["export"], ["check"]):
        done = wrong.run(*args, check=False)
        assert done.returncode == 2, (args, done.stderr)
        line = assert_one_line(done.stderr)
        assert "refused the credentials" in line and "not-the-password" not in line, line
    for role in ("worker", "scheduler"):
        process = wrong.spawn(role, role)
        assert process.wait(timeout=30) == 2
        # JSON log lines aside, exactly one line: the error.
        line = assert_one_line("\n".join(x for x in wrong.log(role).splitlines()
                                          if not x.startswith("{")))
        assert "refused the credentials" in line and "not-the-password" not in wrong.log(role)


def test_status_json_still_parses(
    password_redis: PasswordRedis, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(password_redis.url_with(PASSWORD), testweb)
    assert json.loads(fleet.run("status", "--json").stdout)["seen"] == 0
