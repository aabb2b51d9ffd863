"""The shards of a crawl (common/cluster.py) on the embedded backend: one fakeredis server per
``embedded://NAME``, so each shard is its own Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from redis.exceptions import ConnectionError

from crawlfleet.common.cluster import (
    Cluster,
    ShardMismatch,
    bind_shard,
    deliver,
    forward_outbox,
    shard_limits,
)
from crawlfleet.common.frontier import Admission
from crawlfleet.common.settings import Settings, SettingsError
from crawlfleet.common.shards import owner
from crawlfleet.common.stats import combine_status, read_status
from crawlfleet.common.urls import host_key


def shard_settings(count: int, **extra: Any) -> Settings:
    run = uuid.uuid4().hex[:8]
    return Settings(redis_urls=",".join(f"embedded://{run}-{i}" for i in range(count)),
                    **extra)


def links_for(count: int, per_shard: int, tag: str = "") -> dict[int, list[Admission]]:
    """``per_shard`` admissions for hosts of each of ``count`` shards (``tag`` in their names
    makes another set of hosts)."""
    found: dict[int, list[Admission]] = {i: [] for i in range(count)}
    n = 0
    while any(len(v) < per_shard for v in found.values()):
        url = f"http://host{tag}{n}.test/page"
        n += 1
        index = owner(host_key(url), count)
        if len(found[index]) < per_shard:
            found[index].append(Admission.of(url, host_key(url), 1))
    return found


def test_settings_redis_urls_win_and_one_url_is_the_one_shard_case() -> None:
    many = Settings.from_env({"CRAWLFLEET_REDIS_URLS": "redis://a:1/0, redis://b:2/0",
                              "CRAWLFLEET_REDIS_URL": "redis://c:3/0"})
    assert many.shard_urls == ["redis://a:1/0", "redis://b:2/0"]
    assert many.redis_url == "redis://a:1/0"
    one = Settings.from_env({"CRAWLFLEET_REDIS_URLS": "redis://a:1/0"})
    assert one.shard_urls == ["redis://a:1/0"] and one.redis_urls is None
    with pytest.raises(SettingsError, match="entry 2 is empty"):
        Settings.from_env({"CRAWLFLEET_REDIS_URLS": "redis://a:1/0,,redis://b:2/0"})
    secret = Settings.from_env({"CRAWLFLEET_REDIS_URLS": "redis://:pw1@a:1/0,redis://:pw2@b/0"})
    assert "pw1" not in repr(secret) and "pw2" not in repr(secret)
    assert "pw2" not in secret.redis_where


@pytest.mark.parametrize("total,count", [(10, 3), (1, 4), (0, 2), (1000, 7)])
def test_the_page_budget_is_split_and_sums_to_the_total(total: int, count: int) -> None:
    settings = Settings(max_pages=total, max_pages_per_host=5)
    shares = [shard_limits(settings, i, count) for i in range(count)]
    assert sum(s.max_pages or 0 for s in shares) == total
    assert max(s.max_pages or 0 for s in shares) - min(s.max_pages or 0 for s in shares) <= 1
    assert {s.max_pages_per_host for s in shares} == {5}  # a host's budget is its shard's


def test_a_shard_record_refuses_another_shard_list() -> None:
    settings = shard_settings(2)
    cluster = Cluster.open(settings)

    async def go() -> None:
        await cluster.bind()
        other = cluster.shards[1]
        with pytest.raises(ShardMismatch, match=r"holds shard 2 of 2 .* shard 1 of 3"):
            await bind_shard(other.redis, cluster.keys, 0, 3, other.where)
        # A one-shard list refuses it too, though a one-shard crawl writes no record itself.
        with pytest.raises(ShardMismatch, match=r"holds shard 2 of 2 .* a sharded crawl"):
            await bind_shard(other.redis, cluster.keys, 0, 1, other.where)
        await cluster.bind()  # the right list again: fine
        await cluster.aclose()

    asyncio.run(go())


def test_a_one_shard_crawls_redis_is_not_adopted_as_a_shard() -> None:
    settings = shard_settings(2)
    cluster = Cluster.open(settings)

    async def go() -> None:
        first = cluster.shards[0]
        await first.frontier.open_crawl()  # a crawl marker, as a one-shard crawl leaves
        with pytest.raises(ShardMismatch, match="holds a one-shard crawl"):
            await cluster.bind()
        await cluster.aclose()

    asyncio.run(go())


def test_a_shard_bound_and_opened_between_the_checks_reads_is_not_refused() -> None:
    """Processes start together: a scheduler may write the shard record and open the crawl
    while a worker is between the two reads of bind_shard's check. The worker must not take
    that for a one-shard crawl."""
    settings = shard_settings(2)
    worker, scheduler = Cluster.open(settings), Cluster.open(settings)
    shard = worker.shards[0]

    async def go() -> None:
        real_exists = shard.redis.exists
        reads: list[str] = []

        async def exists(key: str) -> int:
            found = int(await real_exists(key))
            reads.append(key)
            if len(reads) == 1:  # between the reads: the scheduler binds, then opens
                await scheduler.bind_one(scheduler.shards[0])
                await scheduler.shards[0].frontier.open_crawl()
            return found

        shard.redis.exists = exists
        await worker.bind_one(shard)  # no ShardMismatch
        assert reads and await real_exists(worker.keys.crawl)
        await worker.aclose()
        await scheduler.aclose()

    asyncio.run(go())


def test_links_reaching_a_shard_first_leave_its_record_so_its_own_processes_start() -> None:
    """A worker admits links on another shard before any of that shard's processes has bound
    it (they start later, or its state was lost): the crawl marker it opens there comes with
    the shard record, so the shard's scheduler does not take it for a one-shard crawl."""
    settings = shard_settings(2)
    worker = Cluster.open(settings)

    async def go() -> None:
        await worker.bind_one(worker.shards[0])  # its own shard only
        second = links_for(2, 1)[1]
        assert await worker.admit_on(worker.shards[1], second) == 1
        scheduler = Cluster.open(settings)
        await scheduler.bind_one(scheduler.shards[1])  # no ShardMismatch
        record = await scheduler.shards[1].redis.get(scheduler.keys.shard)
        assert record is not None
        await scheduler.aclose()
        await worker.aclose()

    asyncio.run(go())


def test_a_schedulers_crawl_reopened_after_a_loss_keeps_the_shard_record() -> None:
    """Its Redis lost everything (restarted without persistence, flushed): the scheduler's next
    pass opens the crawl again, and the shard's record comes back with the marker, so the
    shard's workers starting afterwards are not refused as on a one-shard crawl."""
    from crawlfleet.scheduler.service import Scheduler

    settings = shard_settings(2)
    cluster = Cluster.open(settings)
    shard = cluster.shards[1]

    async def go() -> None:
        scheduler = Scheduler(settings, shard.redis, shard=1, cluster=cluster)
        await cluster.bind_one(shard)
        await scheduler.open_crawl()
        await shard.redis.flushdb()
        await scheduler.open_crawl()  # as housekeeping does on every pass
        assert await shard.redis.get(cluster.keys.shard) == b"1/2"
        await bind_shard(shard.redis, cluster.keys, 1, 2, "worker")  # a worker starts: no error
        await cluster.aclose()

    asyncio.run(go())


def test_links_for_a_shard_whose_record_disagrees_wait_in_the_outbox() -> None:
    """The other shard's Redis holds another shard's record (a wrong shard list there): its
    links are parked, not raised into the delivering worker's turn."""
    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind_one(cluster.shards[0])
        await cluster.shards[1].redis.set(cluster.keys.shard, "0/3")
        second = links_for(2, 3)[1]
        home = cluster.shards[0]
        assert await deliver(cluster, {1: second}, home.redis, chunk=2) == 3
        assert await home.redis.xlen(cluster.keys.outbox) == 2  # chunks of 2
        await cluster.aclose()

    asyncio.run(go())


def test_split_routes_each_admission_to_its_hosts_shard() -> None:
    cluster = Cluster.open(shard_settings(3))
    found = links_for(3, 4)
    mine, others = cluster.split([a for group in found.values() for a in group], home=1)
    assert mine == found[1]
    assert others == {0: found[0], 2: found[2]}


async def refused(*args: Any, **kwargs: Any) -> Any:
    raise ConnectionError("Connection refused")


class Down:
    """A shard's client whose Redis is gone: every command and script is refused."""

    def register_script(self, source: str) -> Any:
        return refused

    def __getattr__(self, name: str) -> Any:
        return refused


def test_links_for_a_down_shard_wait_in_the_outbox_and_are_forwarded_when_it_is_back() -> None:
    settings = shard_settings(3)
    cluster = Cluster.open(settings)

    async def go() -> None:
        await cluster.bind()
        found = links_for(3, 5)
        others = {0: found[0], 2: found[2]}
        home = cluster.shards[1]
        real = cluster.shards[2].redis
        real_frontier = cluster.shards[2].frontier
        cluster.shards[2].redis = Down()
        cluster.shards[2].frontier = type(real_frontier)(Down(), cluster.keys)  # type: ignore[arg-type]
        cluster.shards[2].crawl_id = ""
        parked = await deliver(cluster, others, home.redis, chunk=2)
        assert parked == 5
        assert await home.redis.xlen(cluster.keys.outbox) == 3  # chunks of 2
        shard0 = await read_status(cluster.shards[0].redis, cluster.keys)
        assert shard0["seen"] == shard0["queued"] == 5
        # The home shard is not finished while links wait in its outbox.
        assert not await home.frontier.check_finished(await cluster.crawl_id(home))
        # Still down: nothing forwarded, nothing lost.
        assert await forward_outbox(cluster, 1, home.frontier) == 0
        assert await home.redis.xlen(cluster.keys.outbox) == 3
        cluster.shards[2].redis, cluster.shards[2].frontier = real, real_frontier
        assert await forward_outbox(cluster, 1, home.frontier) == 5
        assert await home.redis.xlen(cluster.keys.outbox) == 0
        shard2 = await read_status(real, cluster.keys)
        assert shard2["seen"] == shard2["queued"] == 5
        # Forwarding the same links again admits nothing (dedup on their own shard).
        await deliver(cluster, {2: found[2]}, home.redis, chunk=250)
        assert (await read_status(real, cluster.keys))["seen"] == 5
        await cluster.aclose()

    asyncio.run(go())


def test_a_malformed_outbox_entry_is_quarantined_and_the_rest_forwarded() -> None:
    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind()
        home = cluster.shards[0]
        await cluster.crawl_id(home)
        await home.redis.xadd(cluster.keys.outbox, {"m": b"{not json"})
        found = links_for(2, 3)
        await home.redis.xadd(cluster.keys.outbox, {"m": b""})
        from crawlfleet.common.cluster import links_message

        await home.redis.xadd(cluster.keys.outbox, {"m": links_message(found[1])})
        assert await forward_outbox(cluster, 0, home.frontier) == 3
        assert await home.redis.xlen(cluster.keys.outbox) == 0
        assert await home.redis.xlen(cluster.keys.quarantine) == 2
        assert (await read_status(cluster.shards[1].redis, cluster.keys))["queued"] == 3
        await cluster.aclose()

    asyncio.run(go())


def test_combined_status_sums_the_shards_and_is_finished_only_when_all_are() -> None:
    base = {"seen": 3, "pages": 2, "failed": 1, "queued": 0, "in_flight": 0,
            "pages_per_s": 1.5, "crawl": "a", "state_lost": False, "state_lost_at": None,
            "read_at": 10.0, "finished": True, "finished_at": 9.0}
    other = dict(base, crawl="b", seen=5, pages=5, failed=0, read_at=11.0, finished_at=9.5)
    both = combine_status([base, other])
    assert (both["seen"], both["pages"], both["failed"]) == (8, 7, 1)
    assert both["pages_per_s"] == 3.0
    assert both["finished"] and both["finished_at"] == 9.5 and both["crawl"] == "a,b"
    assert [s["shard"] for s in both["shards"]] == [1, 2]
    running = combine_status([base, dict(other, finished=False, finished_at=None)])
    assert not running["finished"] and running["finished_at"] is None
    # A shard that never got a URL does not hold the crawl open; one with events unread does.
    empty = dict(base, crawl="c", seen=0, pages=0, failed=0, finished=False, finished_at=None,
                 events_unread=0)
    assert combine_status([base, empty])["finished"]
    assert not combine_status([base, dict(empty, events_unread=1)])["finished"]
    assert not combine_status([empty, empty])["finished"]
    lost = combine_status([base, dict(other, state_lost=True, state_lost_at=4.0)])
    assert lost["state_lost"] and lost["state_lost_at"] == 4.0


def test_check_reports_a_host_whose_state_is_on_a_shard_that_does_not_own_it() -> None:
    from crawlfleet.cli.shards import check_sharded

    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind()
        for shard in cluster.shards:
            await cluster.crawl_id(shard)
        found = links_for(2, 1)
        stray = found[1][0].host  # owned by shard 2, pacing left on shard 1
        await cluster.shards[0].redis.hset(cluster.keys.not_before, stray, "1.0")
        robots_host = found[0][0].host  # owned by shard 1, its robots.txt cached on shard 2
        await cluster.shards[1].redis.hset(cluster.keys.robots, f"http://{robots_host}", "{}")
        reports = await check_sharded(cluster, None)
        kinds = [[(p.kind, p.examples) for p in problems] for _, problems in reports]
        assert ("foreign_host", (stray,)) in kinds[0]
        assert ("foreign_host", (robots_host,)) in kinds[1]
        await cluster.aclose()

    asyncio.run(go())


def test_the_watch_reads_the_summed_status_of_every_shard() -> None:
    from crawlfleet.cli.watch import cluster_reader

    cluster = Cluster.open(shard_settings(2))

    async def go() -> None:
        await cluster.bind()
        found = links_for(2, 3)
        for index, group in found.items():
            await cluster.admit_on(cluster.shards[index], group)
        status, workers = await cluster_reader(cluster)()
        assert status["queued"] == status["seen"] == 6
        assert [s["queued"] for s in status["shards"]] == [3, 3]
        assert list(workers) == []
        await cluster.aclose()

    asyncio.run(go())


def test_a_scheduler_takes_a_free_shard_at_once_only_while_it_leads_none() -> None:
    from crawlfleet.scheduler.sharded import TAKE_ANOTHER_AFTER, may_take

    assert may_take(0, 0.0)
    assert not may_take(1, TAKE_ANOTHER_AFTER * 0.9)
    assert may_take(1, TAKE_ANOTHER_AFTER)
    assert not may_take(2, TAKE_ANOTHER_AFTER * 1.5)  # a standby that leads less comes first
    assert may_take(2, TAKE_ANOTHER_AFTER * 2)


def test_a_lone_scheduler_leads_every_shard_and_releases_them_on_stop() -> None:
    from crawlfleet.scheduler.sharded import run_sharded

    settings = shard_settings(3, worker_id="lone-scheduler")
    cluster, quick = Cluster.open(settings), Cluster.open(settings, quick=True)

    async def holders() -> list[bytes | None]:
        return [await s.redis.get(cluster.keys.scheduler_lock) for s in cluster.shards]

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(run_sharded(settings, cluster, quick, stop))
        deadline = asyncio.get_running_loop().time() + 20
        while await holders() != [b"lone-scheduler"] * 3:
            assert not task.done(), task
            assert asyncio.get_running_loop().time() < deadline, await holders()
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.wait_for(task, 10)
        assert await holders() == [None] * 3
        await cluster.aclose()
        await quick.aclose()

    asyncio.run(go())


def test_a_scheduler_started_a_few_seconds_later_still_leads_a_shard() -> None:
    """A first scheduler alone takes every shard (may_take); a second one started later says it
    stands by, and the first hands its latest shard back to it: N + 1 schedulers started
    minutes apart still lead one shard each. Before, the second stood by for good."""
    from crawlfleet.common.cluster import Cluster
    from crawlfleet.scheduler.sharded import run_sharded

    run = uuid.uuid4().hex[:8]
    urls = ",".join(f"embedded://{run}-{i}" for i in range(3))
    first, second = (Settings(redis_urls=urls, worker_id=w) for w in ("sched-a", "sched-b"))
    clusters = [(Cluster.open(s), Cluster.open(s, quick=True)) for s in (first, second)]
    keys = clusters[0][0].keys

    async def holders() -> list[bytes | None]:
        return [await s.redis.get(keys.scheduler_lock) for s in clusters[0][0].shards]

    async def go() -> list[bytes | None]:
        stops = [asyncio.Event(), asyncio.Event()]
        a = asyncio.create_task(run_sharded(first, *clusters[0], stops[0]))
        deadline = time.monotonic() + 10
        while await holders() != [b"sched-a"] * 3:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        b = asyncio.create_task(run_sharded(second, *clusters[1], stops[1]))
        deadline = time.monotonic() + 10
        while b"sched-b" not in (held := await holders()):
            assert time.monotonic() < deadline, held
            assert not a.done() and not b.done()
            await asyncio.sleep(0.1)
        for stop in stops:
            stop.set()
        await asyncio.gather(a, b)
        for cluster, quick in clusters:
            await cluster.aclose()
            await quick.aclose()
        return held

    held = asyncio.run(go())
    assert sorted(held) == [b"sched-a", b"sched-a", b"sched-b"]  # one handed back, no more
