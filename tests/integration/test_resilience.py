"""Nothing lost when any process dies: SIGTERM hand-back, scheduler failover, and the chaos test."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ..conftest import Fleet, RedisServer, WebUnderTest, assert_accounted, wait_for

pytestmark = pytest.mark.integration


def exported_urls(fleet: Fleet) -> list[str]:
    return [r["url"] for r in fleet.export()]


def assert_exactly_reachable(fleet: Fleet, web: WebUnderTest) -> list[str]:
    urls = exported_urls(fleet)
    duplicated = [u for u, n in Counter(urls).items() if n > 1]
    expected = web.reachable()
    missing = sorted(set(expected) - set(urls))
    assert not duplicated, f"{len(duplicated)} duplicated, e.g. {duplicated[:3]}"
    assert not missing, f"{len(missing)} lost, e.g. {missing[:3]}"
    assert sorted(urls) == expected
    return urls


def test_sigterm_hands_back_the_batch_and_exits_cleanly(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    # One slow host (1 s a page) and one URL at a time: the second batch (the root's links)
    # takes over ten seconds, far longer than the 1 s grace plus the status polls before the
    # signal, so SIGTERM always lands mid-batch and leaves URLs to hand back.
    web = testweb_factory("--hosts", "1", "--pages", "12", "--links", "20",
                          "--latency-ms", "1000")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1",
                          CRAWLFLEET_SHUTDOWN_GRACE="1", CRAWLFLEET_LEASE_SECONDS="600")
    fleet.spawn("scheduler", "scheduler")
    fleet.spawn("worker", "worker")
    fleet.run("seed", *web.seeds)
    wait_for(lambda: fleet.status()["pages"] >= 2, timeout=30, what="the first pages")
    assert fleet.status()["in_flight"] > 0

    started = time.monotonic()
    assert fleet.stop("worker", signal.SIGTERM, timeout=15) == 0, fleet.log("worker")[-2000:]
    assert time.monotonic() - started < 10  # grace 1 s, plus a fetch, plus shutdown
    records = [json.loads(line) for line in fleet.log("worker").splitlines()]
    [interrupted] = [r for r in records if r["event"] == "batch_interrupted"]
    assert interrupted["handed_back"] >= 3
    assert records[-1]["event"] == "worker_stopped"  # the session was closed on the way out

    # The unfinished URLs went back at once: the next worker finishes the crawl without
    # waiting for the 600 s lease to expire.
    fleet.spawn("worker-2", "worker", CRAWLFLEET_PER_HOST_CONCURRENCY="8")
    status = fleet.wait_finished()
    assert status["leases_expired"] == 0
    assert_exactly_reachable(fleet, web)


def test_a_standby_scheduler_takes_over(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    web = testweb_factory("--hosts", "3", "--pages", "40", "--latency-ms", "50")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1")
    fleet.spawn("scheduler-a", "scheduler", CRAWLFLEET_WORKER_ID="scheduler-a")
    wait_for(lambda: "scheduler_leading" in fleet.log("scheduler-a"), timeout=15,
             what="scheduler-a to lead")
    fleet.spawn("scheduler-b", "scheduler", CRAWLFLEET_WORKER_ID="scheduler-b")
    wait_for(lambda: "scheduler_standby" in fleet.log("scheduler-b"), timeout=15,
             what="scheduler-b to stand by")
    fleet.spawn("worker", "worker")
    fleet.run("seed", *web.seeds)
    wait_for(lambda: fleet.status()["pages"] >= 10, timeout=30, what="progress")

    fleet.stop("scheduler-a", signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: "scheduler_leading" in fleet.log("scheduler-b"), timeout=15,
             what="scheduler-b to take over")
    assert time.monotonic() - killed < 10
    fleet.wait_finished()
    assert_exactly_reachable(fleet, web)


def test_chaos_kill_anything_lose_nothing(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    """At least 1,000 pages while workers and sinks are SIGKILLed every few seconds, the
    scheduler twice, and Redis restarted once (AOF on): the output must hold the reachable set,
    each URL once, and Redis none of it."""
    redis = redis_factory(aof=True)
    web = testweb_factory("--hosts", "6", "--pages", "160", "--latency-ms", "60")
    expected = web.reachable()
    assert len(expected) >= 1000
    fleet = fleet_factory(
        redis.url, web,
        CRAWLFLEET_LEASE_SECONDS="2",  # a killed worker's hosts come back quickly
        CRAWLFLEET_BATCH_SIZE="5",
        CRAWLFLEET_PER_HOST_CONCURRENCY="1",
        CRAWLFLEET_JOBS_PER_WORKER="4",
        CRAWLFLEET_SHUTDOWN_GRACE="1",
        # Results leave Redis through two sinks, in small parts, so kills land mid-part.
        CRAWLFLEET_OUTPUT=str(tmp_path / "output"),
        CRAWLFLEET_OUTPUT_PART_RESULTS="20",
        CRAWLFLEET_OUTPUT_PART_SECONDS="0.5",
        # MAX_WORKER_LOSSES stays at its default: a loss is charged only to the URLs that
        # were being fetched when the worker died, so random kills fail no page.
    )
    workers = fleet.start(*web.seeds, workers=3)
    sinks = ["sink-0", "sink-1"]
    for name in sinks:
        fleet.spawn(name, "sink")

    rng = random.Random(20261124)
    kills: Counter[str] = Counter()
    # Milestones by progress, so the same disruptions happen however fast the machine is.
    scheduler_kills_at = [0.15, 0.5]
    redis_restart_at = 0.3
    next_worker_kill = time.monotonic() + 2.0
    deadline = time.monotonic() + 240
    status: dict[str, Any] = {}
    while True:
        assert time.monotonic() < deadline, f"chaos crawl did not finish: {status} {kills}"
        try:
            status = fleet.status()
        except subprocess.CalledProcessError:
            time.sleep(0.2)  # Redis is restarting; poll again
            continue
        assert_accounted(status)
        if status["finished"]:
            break
        progress = (status["pages"] + status["failed"]) / len(expected)
        if time.monotonic() >= next_worker_kill:
            role = "sink" if sum(kills[r] for r in ("worker", "sink")) % 2 else "worker"
            victim = rng.choice(sinks if role == "sink" else workers)
            fleet.stop(victim, signal.SIGKILL)
            if role == "sink":
                fleet.spawn(victim, "sink")
            else:
                fleet.spawn(victim, "worker", CRAWLFLEET_WORKER_ID=victim)
            kills[role] += 1
            next_worker_kill = time.monotonic() + rng.uniform(1.5, 3.0)
        if scheduler_kills_at and progress >= scheduler_kills_at[0]:
            scheduler_kills_at.pop(0)
            fleet.stop("scheduler", signal.SIGKILL)
            fleet.spawn("scheduler", "scheduler")
            kills["scheduler"] += 1
        if redis_restart_at is not None and progress >= redis_restart_at:
            redis_restart_at = None
            redis.stop(signal.SIGTERM)
            redis.start()
            kills["redis"] += 1
        for name, process in fleet.processes.items():
            assert process.poll() is None, f"{name} died on its own: {fleet.log(name)[-3000:]}"
        time.sleep(0.2)

    assert kills["worker"] >= 2 and kills["sink"] >= 2, kills
    assert kills["scheduler"] == 2 and kills["redis"] == 1, kills
    wait_for(lambda: fleet.status()["results_in_redis"] == 0, timeout=60,
             what="the sinks to drain the results log")
    fleet.check()
    urls = assert_exactly_reachable(fleet, web)
    summary = {"pages": len(urls), "lost": 0, "duplicated": 0, "worker_kills": kills["worker"],
               "sink_kills": kills["sink"],
               "scheduler_kills": kills["scheduler"], "redis_restarts": kills["redis"],
               "leases_expired": status["leases_expired"]}
    print(f"\nchaos: {json.dumps(summary)}")
