"""``crawlfleet status --watch``: the health parser, the view, the loop, and the pages/s windows.

No terminal and no waiting: the view renders to a StringIO, the loop runs with a zero interval,
a fake clock and a stop condition, against the embedded backend or a scripted read.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from io import StringIO
from typing import Any

import pytest
from redis.exceptions import AuthenticationError
from redis.exceptions import ConnectionError as RedisConnectionError
from rich.console import Console

from crawlfleet.cli.watch import (
    Frame,
    Health,
    Snapshot,
    WorkerHealth,
    WorkerWatch,
    health_pattern,
    parse_health,
    plain_line,
    snapshot_reader,
    watch_loop,
    watch_view,
)
from crawlfleet.common.connections import RedisProblem, open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.stats import COUNTERS, DISCARDS, read_status, recent_rate

ARQ_VALUE = "Dec-02 05:40:01 j_complete=3 j_failed=0 j_retried=0 j_ongoing=1 queued=0"
T = 1_700_000_000.0
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def status(**values: Any) -> dict[str, Any]:
    """A status dict as read_status returns it, every figure 0 unless given."""
    s: dict[str, Any] = {name: 0 for name in (*COUNTERS, *DISCARDS)}
    s.update(crawl="c1", state_lost=False, state_lost_at=None, quarantine_entries=0,
             hosts_leased=0, batches_waiting=0, events_unread=0, leases_expired=0,
             batches_unclaimed=0, retries=0, dead=0, results_in_redis=0, pages_per_s=0.0,
             pages_per_s_10s=0.0, finished=False, finished_at=None, read_at=T)
    s.update(values)
    return s


def worker(name: str, value: str = ARQ_VALUE, ttl: float | None = 9.4) -> WorkerHealth:
    return WorkerHealth(name, parse_health(value), ttl)


def render(frame: Frame, **kwargs: Any) -> str:
    console = Console(file=StringIO(), force_terminal=True, width=100)
    console.print(watch_view(frame, **kwargs))
    out = console.file.getvalue()  # type: ignore[attr-defined]
    return ANSI.sub("", str(out))


def local(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


# The health-check value.

def test_parse_health_reads_arqs_value() -> None:
    assert parse_health(ARQ_VALUE.encode()) == Health(
        stamp="Dec-02 05:40:01", complete=3, failed=0, retried=0, ongoing=1, queued=0)
    assert parse_health(ARQ_VALUE).readable


@pytest.mark.parametrize("value", [b"", b"\xff\xfe\x00", "hello world", "j_complete",
                                   "=3 j_ongoing= x=1"])
def test_parse_health_of_garbage_reads_nothing(value: bytes | str) -> None:
    health = parse_health(value)
    assert not health.readable and health.stamp is None


def test_parse_health_leaves_missing_or_bad_fields_none() -> None:
    health = parse_health("Dec-02 05:40:01 j_complete=7 j_ongoing=two something=else")
    assert health == Health(stamp="Dec-02 05:40:01", complete=7)
    assert health.readable
    assert parse_health("j_ongoing=2 queued=5") == Health(ongoing=2, queued=5)


def test_health_pattern_escapes_the_namespaces_glob_characters() -> None:
    assert health_pattern(Keys("crawl")) == "crawl:arq:queue:health-check:*"
    assert health_pattern(Keys("a*b?[c]")) == r"a\*b\?\[c\]:arq:queue:health-check:*"


# The view.

def test_view_shows_the_figures_and_the_workers() -> None:
    s = status(seen=1234, pages=1000, failed=10, skipped=4, queued=200, in_flight=18,
               quarantined=2, pages_per_s=11.02, pages_per_s_10s=12.34, retries=5, dead=1,
               hosts_leased=4, batches_waiting=3, results_in_redis=17, discarded_scope=6,
               events_unread=8, crawl="crawl-42")
    workers = [worker("host-a-123"), worker("host-b-7", "j_complete=40 j_ongoing=2", None),
               worker("host-c-9", "garbage", 3.0)]
    out = render(Frame(T, s, workers, T), where="redis://r:6379/0", namespace="ns")
    for text in ("ns", "redis://r:6379/0", "crawl-42", "running",
                 "1,234 seen · 1,000 pages · 10 failed · 4 skipped",
                 "200 queued · 18 in flight · 2 quarantined",
                 "12.3 (last 10 s) · 11.0 (last minute)",
                 "5 · 1 dead-lettered", "4 leased · 3 batches waiting", "8 events unread",
                 "17 in Redis, not yet drained", "out of scope 6",
                 "workers: 3 alive · batches: 3 running, 43 done"):
        assert text in out, text
    rows = {line.split()[1]: line.split()[2:] for line in out.splitlines()
            if line.split()[1:2] and line.split()[1].startswith("host-")}
    assert rows["host-a-123"] == ["1", "3", "0", "9", "s", "│"]
    assert rows["host-b-7"] == ["2", "40", "?", "no", "expiry", "│"]
    assert rows["host-c-9"] == ["?", "?", "?", "3", "s", "│"]
    assert "unreachable" not in out and "state lost" not in out


def test_view_cuts_a_long_worker_list_and_says_when_there_is_none() -> None:
    many = [worker(f"w{i:02d}") for i in range(7)]
    out = render(Frame(T, status(), many, T), max_workers=5)
    assert "w04" in out and "w05" not in out and "… and 2 more" in out
    out = render(Frame(T, status(crawl=None), [], T))
    assert "workers: none alive" in out
    assert "none yet: nothing seeded" in out and "not started" in out


def test_view_shows_when_the_crawl_finished_on_redis_clock() -> None:
    finished_at = T - 12
    out = render(Frame(T, status(finished=True, finished_at=finished_at), [], T))
    assert f"finished at {local(finished_at)} (12 s ago)" in out
    # The watcher's clock is 100 s behind Redis's, and 3 s went by since the read.
    skewed = status(finished=True, finished_at=finished_at, read_at=T)
    out = render(Frame(T - 97, skewed, [], T - 100))
    assert "(15 s ago)" in out
    later = status(finished=True, finished_at=finished_at, read_at=T + 3600)
    out = render(Frame(T + 3600, later, [], T + 3600))
    assert "(1h00m12s ago)" in out


def test_view_warns_when_the_state_was_lost() -> None:
    s = status(state_lost=True, state_lost_at=T - 5, finished_at=None)
    out = render(Frame(T, s, [], T))
    assert "state lost: results incomplete" in out
    assert f"state lost at {local(T - 5)}" in out and "results are incomplete" in out
    assert "finished at" not in out


def test_view_says_redis_is_unreachable_and_keeps_the_last_figures() -> None:
    problem = "Redis is unreachable at redis://:***@r:6379/0: Connection refused"
    out = render(Frame(T + 7, status(pages=99), [worker("w1")], T, problem))
    assert "Redis is unreachable at redis://:***@r:6379/0: Connection refused" in out
    assert "trying again every 1 s" in out and "7 s ago" in out
    assert "99 pages" in out and "w1" in out
    out = render(Frame(T, None, (), None, problem))
    assert "Redis is unreachable" in out and "no status read yet" in out


def test_plain_line_has_the_figures_or_the_problem() -> None:
    s = status(pages=5, seen=9, pages_per_s_10s=1.5, finished=True, finished_at=T)
    line = plain_line(Frame(T, s, [worker("w1")], T))
    assert "\n" not in line and " status: " in line
    for pair in ("crawl=c1", "seen=9", "pages=5", "pages_per_s_10s=1.5", "pages_per_s=0.0",
                 "workers=1", "batches_running=1", "finished=yes",
                 f"finished_at={datetime.fromtimestamp(T).astimezone().isoformat()}"):
        assert pair in line.split(), pair
    problem = "Redis is unreachable at redis://r/0: down"
    assert plain_line(Frame(T, s, (), T, problem)).endswith(f"status: {problem}")
    assert "state_lost=yes" in plain_line(Frame(T, status(state_lost=True), (), T)).split()


# The loop.

@pytest.fixture
def embedded() -> Iterator[str]:
    yield f"embedded://watch-{uuid.uuid4().hex}"


class FakeClock:
    def __init__(self) -> None:
        self.now = T

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


async def test_loop_reads_the_status_and_the_workers_health_keys(embedded: str) -> None:
    redis = open_redis(embedded)
    keys = Keys("wt")
    await redis.hset(keys.stats, mapping={"seen": 7, "pages": 5, "queued": 2})
    await redis.hset(keys.crawl, mapping={"id": "crawl-7"})
    await redis.psetex(keys.arq_health_check("host-1"), 11_000, ARQ_VALUE.encode())
    await redis.psetex(keys.arq_health_check("host-2"), 11_000, b"j_ongoing=4 j_complete=9")
    # Not this namespace's workers, nor arq's shared default key.
    await redis.psetex(Keys("other").arq_health_check("elsewhere"), 11_000, b"j_ongoing=1")
    await redis.set(keys.arq_queue + ":health-check", b"j_ongoing=1")
    frames: list[Frame] = []
    await watch_loop(snapshot_reader(redis, keys), frames.append, redis_url=embedded,
                     clock=FakeClock(), interval=0, until=lambda f: len(frames) == 3)
    assert [f.now for f in frames] == [T + 1, T + 2, T + 3]
    last = frames[-1]
    assert last.problem is None and last.read_at == T + 3
    assert last.status is not None
    assert (last.status["crawl"], last.status["pages"], last.status["queued"]) == ("crawl-7", 5, 2)
    assert [w.worker_id for w in last.workers] == ["host-1", "host-2"]
    assert last.workers[0].health.ongoing == 1 and last.workers[0].health.complete == 3
    assert last.workers[1].health == Health(ongoing=4, complete=9)
    assert all(w.ttl_s is not None and 0 < w.ttl_s <= 11 for w in last.workers)
    assert "host-2" in render(last)

    await redis.aclose()


async def test_workers_are_looked_for_now_and_then_and_read_every_time(embedded: str) -> None:
    redis = open_redis(embedded)
    keys = Keys("wr")
    await redis.psetex(keys.arq_health_check("w1"), 11_000, b"j_ongoing=1 j_complete=1")
    await redis.psetex(keys.arq_health_check("w2"), 11_000, b"j_ongoing=0 j_complete=0")
    monotonic = [0.0]
    workers = WorkerWatch(keys, rescan_s=10, clock=lambda: monotonic[0])
    assert [w.worker_id for w in await workers.read(redis)] == ["w1", "w2"]
    # Read again without a SCAN: new values show, a new worker not yet, a gone one at once.
    await redis.psetex(keys.arq_health_check("w1"), 11_000, b"j_ongoing=2 j_complete=5")
    await redis.delete(keys.arq_health_check("w2"))  # its key expired: the worker is gone
    await redis.psetex(keys.arq_health_check("w3"), 11_000, b"j_ongoing=0 j_complete=0")
    seen = await workers.read(redis)
    assert [(w.worker_id, w.health.complete) for w in seen] == [("w1", 5)]
    monotonic[0] = 10.0  # time to look again
    assert [w.worker_id for w in await workers.read(redis)] == ["w1", "w3"]
    await redis.aclose()


class ScriptedRead:
    """A read that answers from a script: a status dict, or an exception to raise."""

    def __init__(self, *script: dict[str, Any] | BaseException) -> None:
        self.script = list(script)

    async def __call__(self) -> Snapshot:
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return step, [worker("w1")]


async def test_loop_shows_redis_unreachable_keeps_trying_and_recovers() -> None:
    url = "redis://:hunter2@r.example:6379/0"
    read = ScriptedRead(status(pages=1), RedisConnectionError("Connection refused"),
                        AuthenticationError("WRONGPASS invalid password"), status(pages=3))
    frames: list[Frame] = []
    await watch_loop(read, frames.append, redis_url=url, clock=FakeClock(), interval=0,
                     until=lambda f: len(frames) == 4)
    assert [f.problem is None for f in frames] == [True, False, False, True]
    assert frames[1].problem == ("Redis is unreachable at redis://:***@r.example:6379/0: "
                                 "Connection refused")
    assert frames[2].problem is not None and "refused the credentials" in frames[2].problem
    assert all("hunter2" not in (f.problem or "") for f in frames)
    # The last figures stay, with when they were read.
    assert frames[1].status == frames[0].status and frames[1].read_at == T + 1
    assert frames[1].workers == frames[0].workers
    assert frames[3].status is not None and frames[3].status["pages"] == 3


async def test_loop_against_a_redis_that_is_not_there() -> None:
    with socket.socket() as s:  # a free port, nobody listening: never the shared 6379
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"redis://:hunter2@127.0.0.1:{port}/0"
    redis = open_redis(url)
    frames: list[Frame] = []
    await watch_loop(snapshot_reader(redis, Keys("x")), frames.append, redis_url=url,
                     interval=0, until=lambda f: len(frames) == 2)
    for frame in frames:
        assert frame.status is None and frame.problem is not None
        assert frame.problem.startswith(f"Redis is unreachable at redis://:***@127.0.0.1:{port}")
        assert "hunter2" not in frame.problem
        assert "Redis is unreachable" in render(frame)
    await redis.aclose()


async def test_a_refusal_before_any_read_succeeded_ends_the_watch() -> None:
    read = ScriptedRead(AuthenticationError("WRONGPASS invalid password"))
    with pytest.raises(RedisProblem) as caught:
        await watch_loop(read, lambda f: None, redis_url="redis://:pw@r:6379/0", interval=0)
    assert caught.value.exit_code == 2 and "pw@" not in str(caught.value)


async def test_a_read_that_does_not_answer_is_shown_and_stop_does_not_wait_for_it() -> None:
    import asyncio

    async def hangs() -> Snapshot:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    frames: list[Frame] = []
    await watch_loop(hangs, frames.append, redis_url="redis://r/0", interval=0, read_timeout=0,
                     until=lambda f: True)
    assert frames[0].problem == "Redis is unreachable at redis://r/0: no answer within 0 s"

    stop = asyncio.Event()

    async def stopped_while_reading() -> Snapshot:
        stop.set()  # Ctrl-C while Redis hangs
        return await hangs()

    await watch_loop(stopped_while_reading, frames.append, redis_url="redis://r/0",
                     stop=stop)  # the default 3 s read timeout: returning at all is the test
    assert len(frames) == 1


# pages/s over the last 10 s and the last minute.

def test_recent_rate_counts_whole_seconds_before_now() -> None:
    rate = {int(T) - s: 10 for s in range(1, 61)}  # 10 a second for the minute before T
    rate[int(T)] = 1000  # the second in progress: partly counted, left out
    assert recent_rate(rate, T + 0.5, 10) == 10.0
    assert recent_rate(rate, T + 0.5, 60) == 10.0
    assert recent_rate(rate, T + 30.5, 60) == (30 * 10 + 1000) / 60


def test_recent_rate_of_a_young_crawl_divides_by_its_age() -> None:
    started = T - 20  # admitted 20 s before the current second began
    rate = {int(T) - s: 6 for s in range(1, 21)}
    rate[int(T) - 30] = 500  # before the admission (a stale field): not this crawl's
    assert recent_rate(rate, T + 0.5, 60, started_at=started) == 6.0
    assert recent_rate(rate, T + 0.5, 10, started_at=started) == 6.0
    assert recent_rate({}, started + 0.1, 10, started_at=started) == 0.0  # its first second
    assert recent_rate(rate, T + 0.5, 60, started_at=T - 20.5) == 120 / 20.5
    without_age = dict(rate)
    del without_age[int(T) - 30]
    assert recent_rate(without_age, T + 0.5, 60) == 2.0  # divided by the window: a third


async def test_read_status_computes_both_windows_from_the_rate_hash(embedded: str) -> None:
    redis = open_redis(embedded)
    keys = Keys("rt")
    now = T + 0.25
    # 5 a second in the last 10 s, 1 a second in the 50 before, and stray old or odd fields.
    rate: dict[str, int | str] = {str(int(T) - s): 5 if s <= 10 else 1 for s in range(1, 61)}
    rate.update({str(int(T) - 500): "999", str(int(T)): "77", "junk": "3"})
    await redis.hset(keys.rate, mapping=rate)
    s = await read_status(redis, keys, now=now)
    assert s["pages_per_s_10s"] == 5.0
    assert s["pages_per_s"] == round((10 * 5 + 50 * 1) / 60, 2)
    assert s["read_at"] == now
    # A crawl admitted 20 s ago: the minute figure is over those 20 s.
    await redis.hset(keys.crawl, mapping={"id": "c", "admitted_at": str(T - 20)})
    s = await read_status(redis, keys, now=now)
    assert s["pages_per_s"] == round((10 * 5 + 10 * 1) / 20, 2)
    assert s["pages_per_s_10s"] == 5.0
    # Without ``now``: Redis's own clock.
    before = time.time()
    s = await read_status(redis, keys)
    assert before - 5 < s["read_at"] < time.time() + 5
    await redis.aclose()
