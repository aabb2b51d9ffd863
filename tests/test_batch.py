"""A batch sorts faults by side: the crawler's Redis trouble hands the batch back, a bug of ours
fails the URL (every crawl ends), and neither is ever recorded as the site's fault."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import Limits
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import HostBatch, decode_result
from crawlfleet.common.resultlog import results_by_fp
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import read_status
from crawlfleet.scheduler.service import Scheduler
from crawlfleet.workers.batch import CRAWLER_FAULT_BACKOFF, BatchRun
from crawlfleet.workers.links import LinkFilter

URLS = [f"http://a.test/{i}" for i in range(3)]


class FailingRobots:
    """robots.txt's cache, answering with the given exception (its Redis read failing)."""

    def __init__(self, exc: Exception) -> None:
        self.exc = exc

    async def policy(self, url: str, **_: Any) -> Any:
        raise self.exc


@pytest.fixture
async def claimed() -> AsyncIterator[dict[str, Any]]:
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", namespace="t")
    redis = open_redis(settings.redis_url)
    keys = Keys(settings.namespace)
    scheduler = Scheduler(settings, redis)
    await scheduler.open_crawl()
    scheduler.allowed_hosts.add("a.test")
    admissions, _, _ = await scheduler.admissions([(0, URLS)])
    await scheduler.frontier.admit(scheduler.crawl_id, admissions, scheduler.limits)
    await scheduler.frontier.dispatch(scheduler.crawl_id, batch_size=10, max_waiting=10)
    batch_id = (await redis.hget(keys.lease_batch, "a.test")).decode()
    batch = HostBatch(batch_id=batch_id, host="a.test", crawl=scheduler.crawl_id)
    claim = await scheduler.frontier.claim(batch, lease_seconds=60, job_id=batch_id)
    async with aiohttp.ClientSession() as session:
        yield {"settings": settings, "redis": redis, "keys": keys, "batch": batch,
               "claim": claim, "frontier": scheduler.frontier, "session": session}
    await redis.aclose()


def run_for(env: dict[str, Any], robots: Any) -> BatchRun:
    ctx = {"settings": env["settings"], "session": env["session"],
           "semaphore": asyncio.Semaphore(4), "frontier": env["frontier"], "robots": robots,
           "redis": env["redis"], "keys": env["keys"], "job_id": env["batch"].batch_id,
           "links": LinkFilter(env["settings"]), "turns": set()}
    return BatchRun(ctx, env["batch"], env["claim"])


@pytest.mark.parametrize("exc", [RedisConnectionError("Connection refused"),
                                 ResponseError("BUSY Redis is busy running a script"),
                                 ResponseError("OOM command not allowed")])
async def test_a_redis_fault_hands_the_batch_back(claimed: dict[str, Any],
                                                  exc: Exception) -> None:
    before = time.time()
    await run_for(claimed, FailingRobots(exc)).run()
    s = await read_status(claimed["redis"], claimed["keys"])
    assert (s["queued"], s["in_flight"], s["pages"], s["failed"]) == (3, 0, 0, 0)
    assert await claimed["redis"].xlen(claimed["keys"].results) == 0
    # The host rests before it is tried again, on Redis's clock.
    ready_at = await claimed["redis"].zscore(claimed["keys"].ready, "a.test")
    assert ready_at >= before + CRAWLER_FAULT_BACKOFF - 0.5


async def test_a_bug_of_ours_fails_the_urls_so_the_crawl_ends(claimed: dict[str, Any]) -> None:
    await run_for(claimed, FailingRobots(ValueError("a bug"))).run()
    s = await read_status(claimed["redis"], claimed["keys"])
    assert (s["queued"], s["in_flight"], s["failed"]) == (0, 0, 3)
    stored = await results_by_fp(claimed["redis"], claimed["keys"])
    results = [decode_result(r) for r in stored.values()]
    assert {r.error for r in results} == {"crawler_error"}
    assert sorted(r.url for r in results) == URLS


async def test_links_found_while_an_overflow_chunk_is_admitted_are_kept(
    claimed: dict[str, Any],
) -> None:
    """Pages that finish while a chunk of links is being admitted append their own links: none
    of them may be dropped (the worker's link cache would never send them again)."""
    from crawlfleet.common.frontier import ADMIT_CHUNK, Admission

    run = run_for(claimed, FailingRobots(RuntimeError("unused")))
    links = [Admission.of(f"http://a.test/l{i}", "a.test", 1) for i in range(ADMIT_CHUNK * 3)]
    run.admissions = links[:ADMIT_CHUNK * 2 + 10]
    late = links[ADMIT_CHUNK * 2 + 10:]
    sent: list[Admission] = []
    real_admit = run.frontier.admit

    async def admit(crawl: str, chunk: list[Admission], limits: Any, **kw: Any) -> int:
        if late:  # a page finishes during the first call
            run.admissions.extend(late)
            late.clear()
        sent.extend(chunk)
        return await real_admit(crawl, chunk, limits, **kw)

    run.frontier.admit = admit  # type: ignore[method-assign]
    await run._admit_overflow()
    assert len(run.admissions) <= ADMIT_CHUNK
    assert sorted(a.fp for a in sent + run.admissions) == sorted(a.fp for a in links)


async def test_a_refill_comes_marked_so_its_first_urls_start_without_another_call(
    claimed: dict[str, Any],
) -> None:
    """One call marks the lease's unmarked URLs and, in the room its marks leave, the first
    URLs of its refill: the worker starts those next with no call between (before, each refill
    cost a second call to mark it, about half of a busy host's calls)."""
    from crawlfleet.common.frontier import Admission

    redis, keys = claimed["redis"], claimed["keys"]
    more = [Admission.of(f"http://a.test/more{i}", "a.test", 1) for i in range(10)]
    assert await claimed["frontier"].admit(claimed["batch"].crawl, more, Limits()) == 10
    run = run_for(claimed, FailingRobots(RuntimeError("unused")))
    first = [u.fp for u in run.todo]
    run.origins.add("http://a.test")  # its robots.txt is known: the refill needs no fetch
    outcome = await run._call()
    assert outcome.lease_held and len(outcome.refill) == 10
    expected = set(first) | {u.fp for u in outcome.refill[:run.mark_ahead - len(first)]}
    assert len(expected) == run.mark_ahead
    assert run.marked == expected
    fetching = {m.decode() for m in await redis.smembers(keys.host_fetching("a.test"))}
    assert fetching == expected
    # What the driver starts next is marked, in order: no call stands before it.
    assert all(u.fp in run.marked for u in list(run.todo)[:run.mark_ahead])
    assert run._next_marks() == []  # the window is full until fetches start


async def test_a_turn_is_short_of_slots_only_when_its_hosts_want_more_than_the_slots(
    claimed: dict[str, Any],
) -> None:
    """progress.lua's flag 2: every fetch slot taken, the process's hosts wanting more than
    CRAWLFLEET_MAX_IN_FLIGHT (64 at 2 a host: 33 hosts), and the turn a second old; hosts
    that the slots serve at their full concurrency stay."""
    run = run_for(claimed, None)
    assert (run.settings.max_in_flight, run.concurrency) == (64, 2)
    run.turn_started -= 2.0
    for _ in range(4):  # this test's worker has 4 slots (run_for)
        await run.global_slots.acquire()
    run.turns = {object() for _ in range(33)}
    assert run._short_of_slots()
    run.turns = {object() for _ in range(32)}  # 32 x 2 = 64
    assert not run._short_of_slots()
    run.turns = {object() for _ in range(33)}
    run.turn_started = time.monotonic()  # a new turn keeps its host for a second
    assert not run._short_of_slots()
    run.turn_started -= 2.0
    run.global_slots.release()  # a slot free: nobody waits
    assert not run._short_of_slots()
