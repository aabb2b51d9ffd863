"""The sharded frontier when one shard misbehaves or is misnamed (embedded backend, plus a closed
loopback port for a shard that is down): each test failed before its fix."""

from __future__ import annotations

import asyncio
import types
import uuid
from typing import Any

import pytest
from redis.exceptions import AuthenticationError, ConnectionError, OutOfMemoryError

from crawlfleet.common import connections
from crawlfleet.common.cluster import (
    Cluster,
    deliver,
    forward_outbox,
    links_message,
)
from crawlfleet.common.connections import RedisProblem
from crawlfleet.common.frontier import ADMIT_CHUNK, Admission, ProgressOutcome
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import decode_entry
from crawlfleet.common.settings import Settings
from crawlfleet.common.shards import owner

from .conftest import free_port
from .test_cluster import links_for, shard_settings


async def queued_fps(redis: Any, keys: Keys) -> set[str]:
    """The fps of every entry in every host queue of one shard: the structure, not a counter."""
    fps: set[str] = set()
    async for key in redis.scan_iter(match=keys.host_pattern):
        if key.endswith(b":q"):
            fps |= {decode_entry(raw).fp for raw in await redis.lrange(key, 0, -1)}
    return fps


def failing(exc: Exception) -> Any:
    async def call(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return call


class Refusing:
    """A shard's client whose every command and script raises ``exc``."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    def register_script(self, source: str) -> Any:
        return failing(self.exc)

    def __getattr__(self, name: str) -> Any:
        return failing(self.exc)


# 1 ---------------------------------------------------------------------------------------
def test_links_for_a_shard_out_of_memory_are_parked_not_raised_into_the_home_batch() -> None:
    """A shard that answers OOM (or READONLY, BUSY ...) cannot take links now: they wait in the
    home shard's outbox, as for a shard that is down. Before, deliver() raised, and the home
    shard's turn could not store its pages (its final call re-raised, the pages failed as
    worker_lost after their lease expired three times)."""
    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind()
        home = cluster.shards[0]
        sick = cluster.shards[1]
        sick.frontier = type(sick.frontier)(  # type: ignore[arg-type]
            Refusing(OutOfMemoryError("command not allowed when used memory > 'maxmemory'")),
            cluster.keys)
        sick.crawl_id = "known"
        found = links_for(2, 3)
        try:
            parked = await deliver(cluster, {1: found[1]}, home.redis, ADMIT_CHUNK)
            assert parked == 3
            assert await home.redis.xlen(cluster.keys.outbox) == 1
        finally:
            await cluster.aclose()

    asyncio.run(go())


# 2 ---------------------------------------------------------------------------------------
def test_one_unreachable_shard_does_not_hold_back_outbox_links_for_the_others() -> None:
    """Outbox entry 1 is for shard 2 (still down), entry 2 for shard 3 (back up): shard 3's
    links are forwarded and shard 2's wait. Before, forward_outbox stopped at the first
    failure, so shard 3 idled until shard 2 returned."""
    cluster = Cluster.open(shard_settings(3))

    async def go() -> None:
        await cluster.bind()
        home = cluster.shards[0]
        await cluster.crawl_id(home)
        found = links_for(3, 4)
        await home.redis.xadd(cluster.keys.outbox, {"m": links_message(found[1])})
        await home.redis.xadd(cluster.keys.outbox, {"m": links_message(found[2])})
        down = cluster.shards[1]
        down.frontier = type(down.frontier)(  # type: ignore[arg-type]
            Refusing(ConnectionError("Connection refused")), cluster.keys)
        down.crawl_id = ""
        assert await forward_outbox(cluster, 0, home.frontier) == 4
        up = await queued_fps(cluster.shards[2].redis, cluster.keys)
        left = await home.redis.xlen(cluster.keys.outbox)
        await cluster.aclose()
        assert up == {a.fp for a in found[2]}, "shard 3's links wait behind shard 2's outage"
        assert left == 1  # shard 2's entry, for when it is back

    asyncio.run(go())


# 3 ---------------------------------------------------------------------------------------
def test_links_found_during_an_overflow_admit_never_land_on_the_home_shard() -> None:
    """_send() routes foreign links away, then _admit_overflow() admits chunks on the home
    shard. A page that finishes during one of those awaits appends links for other shards'
    hosts: each chunk is routed again, so none lands on the home shard. Before, they did, and
    their hosts got state on a shard that does not own them (dedup split, pages fetched
    twice)."""
    from crawlfleet.workers.batch import BatchRun

    settings = shard_settings(2)
    cluster = Cluster.open(settings)
    found = links_for(2, 2 * ADMIT_CHUNK, tag="x")
    late = links_for(2, ADMIT_CHUNK, tag="late")
    home_hosts_admitted: list[str] = []

    class HomeFrontier:
        redis = cluster.shards[0].redis
        calls = 0

        async def admit(self, crawl: str, chunk: list[Admission], limits: Any) -> int:
            home_hosts_admitted.extend(a.host for a in chunk)
            HomeFrontier.calls += 1
            if HomeFrontier.calls == 1:  # a page finishes meanwhile, with mixed links
                run.admissions += [a for pair in zip(late[1], late[0], strict=True) for a in pair]
            await asyncio.sleep(0)
            return len(chunk)

        async def progress(self, batch: Any, p: Any, limits: Any) -> ProgressOutcome:
            home_hosts_admitted.extend(a.host for a in p.admissions)
            return ProgressOutcome(True, 0, 0, 0, [])

    run = BatchRun.__new__(BatchRun)
    run.cluster = cluster
    run.shard = 0
    run.frontier = HomeFrontier()  # type: ignore[assignment]
    run.batch = types.SimpleNamespace(crawl="c")  # type: ignore[assignment]
    run.limits = cluster.shards[0].limits
    run.admissions = list(found[0]) + list(found[1])
    run.pending = []
    run.scope_refused = run.invalid_links = 0
    run.calls = 0
    run.log = types.SimpleNamespace(warning=lambda *a, **k: None)  # type: ignore[assignment]

    async def go() -> None:
        await cluster.bind()
        try:
            await run._send(marks=[], want=0, yield_to_others=False)
        finally:
            await cluster.aclose()

    asyncio.run(go())
    foreign = [h for h in home_hosts_admitted if owner(h, 2) != 0]
    assert foreign == [], f"{len(foreign)} links of shard 2's hosts admitted on shard 1"
    assert len(home_hosts_admitted) == len(found[0]) + len(late[0])  # every home link, once


# 4 ---------------------------------------------------------------------------------------
def test_a_one_url_process_refuses_a_shard_of_a_sharded_crawl(
        capsys: pytest.CaptureFixture[str]) -> None:
    """A list shortened to one URL (or CRAWLFLEET_REDIS_URL pointed at one shard) stops with
    one line. Before, it was never checked against the shard record: `seed` put a host owned
    by shard 1 onto shard 2's events, and a plain scheduler and worker ran there too."""
    from crawlfleet.cli.seed import seed

    settings = shard_settings(2)
    cluster = Cluster.open(settings)
    asyncio.run(cluster.bind())
    url = next(f"http://s{n}.test/" for n in range(100) if owner(f"s{n}.test", 2) == 0)
    one = Settings(redis_url=settings.shard_urls[1])
    with pytest.raises(RedisProblem, match=r"holds shard 2 of 2 .* CRAWLFLEET_REDIS_URLS"):
        seed(one, [url], None)
    events = asyncio.run(connections.open_redis(settings.shard_urls[1]).xlen(cluster.keys.events))
    assert events == 0


# 5 ---------------------------------------------------------------------------------------
def test_a_cluster_command_names_the_shard_that_failed() -> None:
    """An error met by a command over the shards names the shard it came from: the one whose
    address the error names, else the first that does not answer a ping. Before, every error
    met after the shard checks was reported as shard 1's."""
    from crawlfleet.cli.shards import failing_shard, run_on_cluster

    port = free_port()
    down = f"redis://127.0.0.1:{port}/0"  # nothing listens there
    settings = Settings(redis_urls=f"embedded://{uuid.uuid4().hex[:8]}-0,{down}")
    with pytest.raises(RedisProblem, match=f"unreachable at {down}"):
        run_on_cluster(settings, lambda cluster: asyncio.sleep(0))

    async def go() -> None:
        cluster = Cluster.open(settings, quick=True)
        try:
            named = ConnectionError(f"Error 111 connecting to 127.0.0.1:{port}. Refused.")
            assert await failing_shard(cluster, named) == down
            silent = OutOfMemoryError("command not allowed when used memory > 'maxmemory'")
            assert await failing_shard(cluster, silent) == down  # the one not answering
        finally:
            await cluster.aclose()

    asyncio.run(go())


# 6 ---------------------------------------------------------------------------------------
def test_the_sharded_scheduler_stops_on_a_wrong_password() -> None:
    """A wrong password on one shard is never waited for: one line naming that shard. Before,
    run_sharded took AuthenticationError (a ConnectionError) for an outage and retried it
    forever."""
    from crawlfleet.scheduler.sharded import run_sharded

    settings = shard_settings(2, worker_id="review-scheduler")
    cluster, quick = Cluster.open(settings), Cluster.open(settings, quick=True)
    quick.shards[1].redis = Refusing(AuthenticationError(
        "invalid username-password pair or user is disabled."))

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_sharded(settings, cluster, quick, stop))
        done, _ = await asyncio.wait({task}, timeout=4)
        stop.set()
        if not done:
            await asyncio.wait_for(task, 10)
        await cluster.aclose()
        assert done, "still retrying"
        problem = task.exception()
        assert isinstance(problem, RedisProblem) and problem.exit_code == 2
        assert settings.shard_urls[1] in str(problem)

    asyncio.run(go())


# 7 ---------------------------------------------------------------------------------------
def test_reshard_refuses_one_server_spelled_two_ways_and_loses_nothing() -> None:
    """`reshard` takes a server to be its URL. The same Redis under another spelling (a host
    name and its address, a rotated password) at the same place passed the record check, then
    every URL of it "moved" onto itself (reshard_in added nothing: the fp was seen there;
    reshard_out removed it) and the "dropped" server, the same Redis, was emptied. Now the
    two URLs are found to reach one server and nothing moves."""
    from crawlfleet.cli.commands import UsageError

    from .test_reshard import NS, build, dump, everything, run

    run_id = uuid.uuid4().hex[:8]
    a, b, alias = f"embedded://{run_id}-0", f"embedded://{run_id}-1", f"embedded://{run_id}-a"
    asyncio.run(build([a, b]))
    before = everything(asyncio.run(dump([a, b])))
    connections._embedded_servers[f"{run_id}-a"] = connections._embedded_servers[f"{run_id}-0"]
    with pytest.raises(UsageError, match=f"{a} and {alias} reach the same Redis server"):
        run([a, b], [alias, b])
    assert everything(asyncio.run(dump([a, b]))) == before
    probes = asyncio.run(connections.open_redis(a).exists(Keys(NS).server_probe))
    assert probes == 0  # the probe leaves nothing behind


def test_links_for_a_shard_whose_state_was_lost_record_the_loss_there() -> None:
    """A shard restarted without persistence: the next links for it reopen its crawl, and the
    loss is recorded there (status says state lost) instead of a fresh crawl that looks
    whole."""
    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind()
        target = cluster.shards[1]
        found = links_for(2, 2)
        assert await cluster.admit_on(target, found[1][:1]) == 1
        await target.redis.flushall()  # what a restart without persistence leaves
        assert await cluster.admit_on(target, found[1][1:]) == 1
        lost_at = await target.redis.hget(cluster.keys.crawl, "state_lost_at")
        digits = int(await target.redis.hget(cluster.keys.crawl, "seen_digits"))
        seen = [await target.frontier.is_seen(a.fp, digits) for a in found[1]]
        await cluster.aclose()
        assert lost_at is not None  # the marker records the loss
        assert seen == [False, True]  # the seen set holds what came after it, only

    asyncio.run(go())


def test_a_long_outbox_for_a_down_shard_holds_back_nothing_and_costs_one_try() -> None:
    """More entries for a down shard than a pass looks at, then one for a shard that is up:
    passes with the leader's cursor go on where the last stopped, so the up shard's links
    arrive within a few passes; the down shard is tried once, then left alone for
    OUTBOX_RETRY seconds (a shard that is not there costs no connect timeout each pass)."""
    from crawlfleet.common.cluster import OUTBOX_SCAN, OutboxCursor

    cluster = Cluster.open(shard_settings(3))

    async def go() -> None:
        await cluster.bind()
        home = cluster.shards[0]
        await cluster.crawl_id(home)
        found = links_for(3, 1)
        for _ in range(OUTBOX_SCAN + 30):
            await home.redis.xadd(cluster.keys.outbox, {"m": links_message(found[1])})
        await home.redis.xadd(cluster.keys.outbox, {"m": links_message(found[2])})
        tries = 0

        class Down:
            def register_script(self, source: str) -> Any:
                async def call(*args: Any, **kwargs: Any) -> Any:
                    nonlocal tries
                    tries += 1
                    raise ConnectionError("Connection refused")
                return call

        down = cluster.shards[1]
        down.frontier = type(down.frontier)(Down(), cluster.keys)  # type: ignore[arg-type]
        down.crawl_id = "known"
        cursor = OutboxCursor()
        forwarded = [await forward_outbox(cluster, 0, home.frontier, cursor=cursor)
                     for _ in range(3)]
        up = await queued_fps(cluster.shards[2].redis, cluster.keys)
        left = await home.redis.xlen(cluster.keys.outbox)
        await cluster.aclose()
        assert forwarded == [0, 1, 0] and up == {found[2][0].fp}
        assert tries == 1
        assert left == OUTBOX_SCAN + 30  # the down shard's, every one still there

    asyncio.run(go())
