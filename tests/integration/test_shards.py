"""The frontier sharded over three redis-servers: a scheduler per shard, four workers, the
test web's many hosts; then one shard's redis-server restarted mid-crawl (AOF)."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as redis_sync

from crawlfleet.common.keys import Keys
from crawlfleet.common.shards import owner
from crawlfleet.common.snapshot import parse_host_key
from crawlfleet.common.urls import host_key

from ..conftest import Fleet, RedisServer, WebUnderTest, wait_for

pytestmark = pytest.mark.integration


def host_keys_by_shard(servers: list[RedisServer], namespace: str) -> dict[str, set[int]]:
    """Every host that has a per-host key, or a field in a per-host hash or sorted set, and
    the shards where it does."""
    keys = Keys(namespace)
    found: dict[str, set[int]] = {}
    for index, server in enumerate(servers):
        client = redis_sync.Redis.from_url(server.url)
        try:
            for key in client.scan_iter(match=keys.host_pattern, count=1000):
                parsed = parse_host_key(keys, key.decode())
                assert parsed is not None, key
                found.setdefault(parsed[0], set()).add(index)
            for name in (keys.not_before, keys.host_pages, keys.lease_batch):
                for host in client.hkeys(name):
                    found.setdefault(host.decode(), set()).add(index)
            for name in (keys.ready, keys.leases, keys.waiting):
                for host in client.zrange(name, 0, -1):
                    found.setdefault(host.decode(), set()).add(index)
        finally:
            client.close()
    return found


def start_sharded(fleet: Fleet, shards: int, workers: int, schedulers: int = 0) -> None:
    for i in range(schedulers or shards):
        fleet.spawn(f"scheduler-{i}", "scheduler", CRAWLFLEET_WORKER_ID=f"scheduler-{i}")
    for i in range(workers):
        fleet.spawn(f"worker-{i}", "worker", CRAWLFLEET_WORKER_ID=f"worker-{i}")


def leaders(fleet: Fleet, names: list[str]) -> dict[str, list[int]]:
    """scheduler name -> the shards (1-based) it logged leading, in order."""
    led: dict[str, list[int]] = {}
    for name in names:
        for line in fleet.log(name).splitlines():
            if '"scheduler_leading"' in line:
                led.setdefault(name, []).append(json.loads(line)["shard"])
    return led


def assert_reachable_once(fleet: Fleet, web: WebUnderTest) -> list[dict[str, Any]]:
    results = fleet.export()
    urls = [r["url"] for r in results]
    assert not [u for u, n in Counter(urls).items() if n > 1]
    assert sorted(urls) == web.reachable()
    return results


def test_three_shards_crawl_the_reachable_set_once_each_host_on_its_own_shard(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    servers = [redis_factory(aof=False) for _ in range(3)]
    web = testweb_factory("--hosts", "12", "--pages", "15")
    fleet = fleet_factory(servers[0].url, web,
                          CRAWLFLEET_REDIS_URLS=",".join(s.url for s in servers))
    # Four schedulers for three shards: three lead, one stands by for all of them.
    names = [f"scheduler-{i}" for i in range(4)]
    start_sharded(fleet, shards=3, workers=4, schedulers=4)
    led = wait_for(lambda: (found := leaders(fleet, names)) and len(found) == 3 and found,
                   timeout=30, what="three schedulers to lead three shards")
    assert sorted(shard for shards in led.values() for shard in shards) == [1, 2, 3]
    seeded = fleet.run("seed", *web.seeds)
    assert f"enqueued {len(web.seeds)} seed(s)" in seeded.stderr
    # The leader of shard 2 dies: the standby takes that shard over.
    victim = next(name for name, shards in led.items() if shards == [2])
    (standby,) = set(names) - set(led)
    fleet.stop(victim, signal.SIGKILL)
    wait_for(lambda: leaders(fleet, [standby]).get(standby) == [2], timeout=30,
             what="the standby to lead the dead leader's shard")
    status = fleet.wait_finished(timeout=120)
    assert status["shards"] and len(status["shards"]) == 3
    results = assert_reachable_once(fleet, web)
    assert status["pages"] + status["failed"] + status["skipped"] == len(results)

    # Every host's state is on exactly one shard, the one that owns it; each shard has some.
    hosts = {host_key(r["url"]) for r in results}
    placed = host_keys_by_shard(servers, fleet.env["CRAWLFLEET_NAMESPACE"])
    assert placed, "no per-host state found"
    for host, shards in placed.items():
        assert shards == {owner(host, 3)}, (host, shards)
    assert {owner(h, 3) for h in hosts} == {0, 1, 2}
    # Each shard's own results are its own hosts' and its counters add up (check per shard).
    for index, shard_status in enumerate(status["shards"]):
        assert shard_status["seen"] == sum(
            1 for r in results if owner(host_key(r["url"]), 3) == index)
    report = fleet.check()
    assert report["ok"] and len(report["shards"]) == 3

    for name in [*(f"worker-{i}" for i in range(4)), *(n for n in names if n != victim)]:
        assert fleet.stop(name, signal.SIGTERM) == 0, fleet.log(name)[-2000:]


def test_a_shard_restarted_mid_crawl_pauses_its_hosts_only_and_loses_nothing(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    servers = [redis_factory(aof=True) for _ in range(3)]
    web = testweb_factory("--hosts", "12", "--pages", "40", "--latency-ms", "40")
    expected = web.reachable()
    fleet = fleet_factory(servers[0].url, web,
                          CRAWLFLEET_REDIS_URLS=",".join(s.url for s in servers),
                          CRAWLFLEET_PER_HOST_CONCURRENCY="1")
    start_sharded(fleet, shards=3, workers=4)
    fleet.run("seed", *web.seeds)

    def shard_seen(index: int) -> int:
        client = redis_sync.Redis.from_url(servers[index].url)
        try:
            raw = client.hget(Keys(fleet.env["CRAWLFLEET_NAMESPACE"]).stats, "pages")
            return int(raw or 0)
        finally:
            client.close()

    wait_for(lambda: all(shard_seen(i) >= 5 for i in range(3)), timeout=60,
             what="every shard to crawl a few pages")
    down = 1
    servers[down].stop(signal.SIGKILL)
    # The other shards keep crawling while shard 2 is down.
    before = [shard_seen(i) for i in (0, 2)]
    wait_for(lambda: all(shard_seen(i) >= b + 10 for i, b in zip((0, 2), before, strict=True)),
             timeout=60, what="the other shards to go on while one is down")
    # A worker's probe reads its health check on any shard: one shard down fails no worker.
    probe = fleet.run("health", check=False, CRAWLFLEET_WORKER_ID="worker-0")
    assert probe.returncode == 0, probe.stderr
    servers[down].start()  # same port and directory: the AOF brings its frontier back
    status = fleet.wait_finished(timeout=240)
    results = fleet.export()
    urls = [r["url"] for r in results]
    assert not [u for u, n in Counter(urls).items() if n > 1]
    assert sorted(urls) == expected
    assert status["queued"] == status["in_flight"] == 0
    # Links found for the shard while it was down waited in an outbox, were forwarded by
    # their shard's scheduler, and none is left.
    logs = "".join(fleet.log(name) for name in fleet.processes)
    assert '"links_parked"' in logs and '"outbox_forwarded"' in logs
    for server in servers:
        client = redis_sync.Redis.from_url(server.url)
        try:
            assert client.xlen(Keys(fleet.env["CRAWLFLEET_NAMESPACE"]).outbox) == 0
        finally:
            client.close()


def test_sinks_drain_every_shard_into_one_output_and_export_reads_it_back(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    servers = [redis_factory(aof=False) for _ in range(2)]
    web = testweb_factory("--hosts", "6", "--pages", "15")
    out = tmp_path / "output"
    fleet = fleet_factory(servers[0].url, web,
                          CRAWLFLEET_REDIS_URLS=",".join(s.url for s in servers),
                          CRAWLFLEET_OUTPUT=str(out), CRAWLFLEET_OUTPUT_PART_RESULTS="20",
                          CRAWLFLEET_OUTPUT_PART_SECONDS="0.5")
    # One scheduler for two shards: it leads both (the second after a short wait that a
    # standby, had there been one, would have used to take it).
    start_sharded(fleet, shards=2, workers=2, schedulers=1)
    fleet.spawn("sink", "sink")
    fleet.run("seed", *web.seeds)
    fleet.wait_finished(timeout=120)
    wait_for(lambda: fleet.status()["results_in_redis"] == 0, timeout=30,
             what="the sink to drain both shards' results logs")
    # One part series per shard (each shard's crawl id), the reachable set once in all.
    series = {p.parent for p in out.glob("results/*/*/part-*.jsonl")}
    assert len(series) == 2
    assert_reachable_once(fleet, web)
    fleet.check()
    assert sorted(leaders(fleet, ["scheduler-0"])["scheduler-0"]) == [1, 2]
    assert fleet.stop("sink") == 0
