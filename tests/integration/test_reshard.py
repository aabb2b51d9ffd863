"""`crawlfleet reshard` end to end: a crawl on two redis-servers moved onto three, checked on
every shard, then crawled again on the three: the same results, and not one request more."""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest
import redis as redis_sync

from crawlfleet.common.keys import Keys
from crawlfleet.common.shards import owner
from crawlfleet.common.urls import host_key

from ..conftest import Fleet, RedisServer, WebUnderTest
from .test_shards import assert_reachable_once, host_keys_by_shard, start_sharded

pytestmark = pytest.mark.integration


def stop_all(fleet: Fleet) -> None:
    for name in sorted(fleet.processes):
        assert fleet.stop(name, signal.SIGTERM) == 0, fleet.log(name)[-2000:]


def robots_hosts(servers: list[RedisServer], namespace: str) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for index, server in enumerate(servers):
        client = redis_sync.Redis.from_url(server.url)
        try:
            for origin in client.hkeys(Keys(namespace).robots):
                found.setdefault(host_key(origin.decode()), set()).add(index)
        finally:
            client.close()
    return found


def test_two_shards_resharded_onto_three_keep_every_result_and_fetch_nothing_again(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    servers = [redis_factory(aof=False) for _ in range(3)]
    web = testweb_factory("--hosts", "12", "--pages", "15")
    two, three = (",".join(s.url for s in servers[:n]) for n in (2, 3))
    fleet = fleet_factory(servers[0].url, web, CRAWLFLEET_REDIS_URLS=two)
    namespace = fleet.env["CRAWLFLEET_NAMESPACE"]
    start_sharded(fleet, shards=2, workers=2)
    fleet.run("seed", *web.seeds)
    fleet.wait_finished(timeout=120)
    first = assert_reachable_once(fleet, web)

    # Refused while the schedulers run; changes nothing.
    busy = fleet.run("reshard", "--to", three, "--yes", check=False)
    assert busy.returncode == 1 and "not quiescent" in busy.stderr, busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1
    stop_all(fleet)
    fetched = web.stats()["total_requests"]

    # No terminal to ask on: refused without --yes. A dry run says what would move.
    asked = fleet.run("reshard", "--to", three, check=False)
    assert asked.returncode == 2 and "pass --yes" in asked.stderr
    dry = fleet.run("reshard", "--to", three, "--dry-run")
    assert dry.stdout.startswith(f"would move namespace {namespace!r}")
    moving = {host_key(r["url"]) for r in first if owner(host_key(r["url"]), 3) == 2}
    assert moving, "no host moves to the third shard"
    assert f": {len(moving)} host(s)" in dry.stdout, dry.stdout
    fleet.check()  # still the two-shard crawl

    done = fleet.run("reshard", "--to", three, "--yes")
    moved = sum(1 for r in first if host_key(r["url"]) in moving)
    assert f"{len(moving)} host(s), {moved} URL(s) moved" in done.stderr, done.stderr
    # Run again: nothing left to move.
    again = fleet.run("reshard", "--to", three, "--yes")
    assert "0 host(s), 0 URL(s) moved" in again.stderr, again.stderr

    fleet.env["CRAWLFLEET_REDIS_URLS"] = three
    report = fleet.check()
    assert report["ok"] and len(report["shards"]) == 3
    placed = host_keys_by_shard(servers, namespace)
    for host, shards in [*placed.items(), *robots_hosts(servers, namespace).items()]:
        assert shards == {owner(host, 3)}, (host, shards)
    assert {owner(h, 3) for h in placed} == {0, 1, 2}
    assert sorted(r["url"] for r in assert_reachable_once(fleet, web)) == sorted(
        r["url"] for r in first)
    # The old list is refused now (the shard records say 3).
    old = fleet.run("status", check=False, CRAWLFLEET_REDIS_URLS=two)
    assert old.returncode == 2 and "shard 1 of 3" in old.stderr, old.stderr

    # The three shards crawl on: the same seeds find everything seen, nothing is fetched.
    start_sharded(fleet, shards=3, workers=2)
    fleet.run("seed", *web.seeds)
    status = fleet.wait_finished(timeout=120)
    assert status["seen"] == len(first)
    assert_reachable_once(fleet, web)
    assert web.stats()["total_requests"] == fetched
    stop_all(fleet)
