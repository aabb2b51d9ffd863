"""The leading scheduler sleeps between passes and is woken by the scripts (Keys.scheduler_wake)
or by its own next-due time, on a real redis-server (the embedded backend polls instead).

Every test sets the housekeeping and progress timers to an hour: whatever the leader does
within the test's deadline, a wake or the next ready host's time made it do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crawlfleet.cli.seed import enqueue_seeds
from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import Admission, Frontier, Limits, Progress
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import HostBatch
from crawlfleet.common.settings import Settings
from crawlfleet.scheduler import service
from crawlfleet.scheduler.service import Scheduler

from .test_frontier import Claimed, admissions_of, jobs, results_for

DEADLINE_S = 5.0  # far below the hour every timer is set to


async def until(check: Any, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE_S}s waiting for {what}")
        await asyncio.sleep(0.01)


class Leading:
    """A scheduler leading in the background, and the frontier a worker would use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = open_redis(settings.redis_url)
        self.keys = Keys(settings.namespace)
        self.scheduler = Scheduler(settings, self.redis)
        self.frontier = Frontier(self.redis, self.keys)
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self, hosts: set[str], *, flush: bool = True) -> None:
        if flush:
            await self.redis.flushdb()
        await self.redis.sadd(self.keys.scope_hosts, *sorted(hosts))
        self.task = asyncio.create_task(self.scheduler.lead(self.stop))
        await self.asleep()

    async def asleep(self) -> None:
        async def sleeping() -> bool:
            return self.scheduler.sleeping

        await until(sleeping, "the leader asleep")

    async def leased(self, host: str) -> bool:
        return bool(await self.redis.hexists(self.keys.lease_batch, host))

    async def batch(self, host: str) -> HostBatch:
        return next(b for b in await jobs({"redis": self.redis, "keys": self.keys})
                    if b.host == host)

    async def close(self) -> None:
        self.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, timeout=10)
        await self.redis.flushdb()
        await self.redis.aclose()


@pytest.fixture
async def leading(redis_server: Any, monkeypatch: pytest.MonkeyPatch
                  ) -> AsyncIterator[Any]:
    monkeypatch.setattr(service, "HOUSEKEEPING_INTERVAL", 3600.0)
    monkeypatch.setattr(service, "PROGRESS_INTERVAL", 3600.0)
    made: list[Leading] = []

    async def make(**settings: Any) -> Leading:
        s = Settings(redis_url=f"redis://127.0.0.1:{redis_server.port}/4", namespace="w",
                     **settings)
        lead = Leading(s)
        made.append(lead)
        return lead

    yield make
    for lead in made:
        await lead.close()


async def test_new_seeds_wake_the_leader(leading: Any) -> None:
    lead = await leading()
    await lead.start({"a.test"})
    passes = lead.scheduler.passes
    await enqueue_seeds(lead.redis, lead.keys, ["http://a.test/"])
    await until(lambda: lead.leased("a.test"), "the seed's host leased")
    assert lead.scheduler.passes > passes


async def test_a_leader_whose_hosts_are_all_leased_sleeps_until_its_next_pass(
    leading: Any,
) -> None:
    """Nothing is due while the only host is leased: the leader does not poll (it looked 20
    times a second before), it sleeps until housekeeping, an hour away here."""
    lead = await leading()
    await lead.start({"a.test"})
    await enqueue_seeds(lead.redis, lead.keys, ["http://a.test/1", "http://a.test/2"])
    await until(lambda: lead.leased("a.test"), "the seed's host leased")
    await lead.asleep()
    assert lead.scheduler.sleep_s > 60


async def test_a_workers_links_that_make_a_host_ready_wake_the_leader(leading: Any) -> None:
    lead = await leading()
    await lead.start({"a.test", "b.test"})
    await enqueue_seeds(lead.redis, lead.keys, ["http://a.test/"])
    await until(lambda: lead.leased("a.test"), "the seed's host leased")
    await lead.asleep()
    batch = await lead.batch("a.test")
    claim = await lead.frontier.claim(batch, lease_seconds=60, job_id=batch.batch_id)
    assert claim is not None
    # The worker holding a.test finds a link to b.test, which nobody holds: b.test is ready.
    outcome = await lead.frontier.progress(
        batch, Progress(admissions=admissions_of(["http://b.test/x"])), Limits())
    assert outcome.admitted == 1
    await until(lambda: lead.leased("b.test"), "b.test leased")


async def test_a_final_report_wakes_the_leader_which_sees_the_crawl_end(leading: Any) -> None:
    lead = await leading()
    await lead.start({"a.test"})
    await enqueue_seeds(lead.redis, lead.keys, ["http://a.test/"])
    await until(lambda: lead.leased("a.test"), "the seed's host leased")
    batch = await lead.batch("a.test")
    claim = await lead.frontier.claim(batch, lease_seconds=60, job_id=batch.batch_id)
    assert claim is not None
    await lead.asleep()
    results = results_for(Claimed(batch, claim.urls))
    outcome = await lead.frontier.progress(batch, Progress(results=results, final=True),
                                           Limits())
    assert outcome.stored == 1

    async def finished() -> bool:
        return bool(await lead.redis.hexists(lead.keys.stats, "finished_at"))

    await until(finished, "finished_at, set by the woken leader")


async def test_a_host_due_later_is_sent_when_due_without_a_wake(leading: Any) -> None:
    lead = await leading()
    size = lead.settings.batch_size
    await lead.start({"a.test"})
    await enqueue_seeds(lead.redis, lead.keys, [f"http://a.test/{i}" for i in range(size + 1)])
    await until(lambda: lead.leased("a.test"), "the seed's host leased")
    batch = await lead.batch("a.test")
    claim = await lead.frontier.claim(batch, lease_seconds=60, job_id=batch.batch_id)
    assert claim is not None and len(claim.urls) == size
    # The turn ends with a URL left in the queue and a rest of 0.4 s: its final report wakes
    # the leader, which finds nothing due yet and sleeps until the host is.
    ended = time.time()
    await lead.frontier.progress(batch, Progress(final=True, wait_s=0.4), Limits())
    await until(lambda: lead.leased("a.test"), "a.test leased again")
    dispatched_at = await lead.redis.zscore(lead.keys.waiting, "a.test")
    assert dispatched_at >= ended + 0.4 - 0.05  # not before its rest (Redis's clock)


async def test_a_claim_that_makes_room_wakes_the_leader(leading: Any) -> None:
    """At the default CRAWLFLEET_DISPATCH_AHEAD, one host more than may wait: the last one
    goes out when a worker claims a batch, and that claim is what wakes the leader."""
    lead = await leading()
    ahead = lead.settings.dispatch_ahead
    hosts = [f"h{i}.test" for i in range(ahead + 1)]
    await lead.start(set(hosts))
    await enqueue_seeds(lead.redis, lead.keys, [f"http://{h}/" for h in hosts])

    async def all_room_taken() -> bool:
        return int(await lead.redis.zcard(lead.keys.waiting)) == ahead

    await until(all_room_taken, f"{ahead} batches waiting (the most allowed)")
    await lead.asleep()
    batches = await jobs({"redis": lead.redis, "keys": lead.keys})
    [other] = set(hosts) - {b.host for b in batches}
    assert not await lead.leased(other)
    first = batches[0]
    assert await lead.frontier.claim(first, lease_seconds=60, job_id=first.batch_id)
    await until(lambda: lead.leased(other), f"{other} leased once a batch was claimed")


async def test_a_host_whose_lease_expired_goes_out_without_a_sleep_between(
    leading: Any, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Housekeeping's expiry pass puts the host back in the ready set: the leader dispatches it
    on the next pass at once, not after sleeping until its next housekeeping pass."""
    lead = await leading()
    await lead.redis.flushdb()
    marker = await lead.frontier.open_crawl()
    await lead.frontier.admit(marker.id, [Admission.of("http://a.test/1", "a.test", 0)],
                              Limits())
    assert await lead.frontier.dispatch(marker.id, batch_size=2, max_waiting=4) == 1
    lost = await lead.batch("a.test")
    assert await lead.frontier.claim(lost, lease_seconds=-1, job_id=lost.batch_id)
    events: list[tuple[str, int]] = []
    scheduler = lead.scheduler
    housekeeping, dispatch_ready = scheduler.housekeeping, scheduler.frontier.dispatch_ready
    wait_for_either = service.wait_for_either

    async def spied_housekeeping(now: float) -> int:
        requeued = await housekeeping(now)
        events.append(("housekeeping", requeued))
        return requeued

    async def spied_dispatch(*a: Any, **k: Any) -> Any:
        done = await dispatch_ready(*a, **k)
        events.append(("dispatch", done.batches))
        return done

    async def spied_wait(*a: Any) -> None:
        events.append(("sleep", 0))
        await wait_for_either(*a)

    monkeypatch.setattr(scheduler, "housekeeping", spied_housekeeping)
    monkeypatch.setattr(scheduler.frontier, "dispatch_ready", spied_dispatch)
    monkeypatch.setattr(service, "wait_for_either", spied_wait)
    await lead.start({"a.test"}, flush=False)  # its first pass expires the lease

    async def leased_again() -> bool:
        batch = await lead.redis.hget(lead.keys.lease_batch, "a.test")
        return batch is not None and batch.decode() != lost.batch_id

    await until(leased_again, "a.test leased to a new batch")
    expiry = events.index(("housekeeping", 1))
    assert events[expiry + 1] == ("dispatch", 1), events


async def test_wakes_between_two_passes_send_one_message(leading: Any) -> None:
    """The scripts' wakes are coalesced: until dispatch.lua (the next pass) clears
    Keys.scheduler_woken, a second host made ready sends no second message."""
    lead = await leading()
    await lead.redis.flushdb()
    marker = await lead.frontier.open_crawl()
    async with lead.redis.pubsub() as pubsub:
        await pubsub.subscribe(lead.keys.scheduler_wake)
        assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"

        async def admit(host: str) -> None:
            assert await lead.frontier.admit(
                marker.id, [Admission.of(f"http://{host}/", host, 0)], Limits()) == 1

        async def messages() -> int:
            count = 0
            while (message := await pubsub.get_message(timeout=0.2)) is not None:
                count += message["type"] == "message"
            return count

        await admit("a.test")
        await admit("b.test")  # a host newly ready too, before any pass
        assert await messages() == 1
        assert await lead.redis.exists(lead.keys.scheduler_woken)
        await lead.frontier.dispatch(marker.id, batch_size=2, max_waiting=4)  # a pass
        assert not await lead.redis.exists(lead.keys.scheduler_woken)
        await admit("c.test")
        assert await messages() == 1
