"""A worker's polls of arq's queue slow down while they find nothing and speed up again when a
job comes (workers/worker.py, CrawlWorker), without ever letting its health check lapse."""

from __future__ import annotations

import asyncio
import time
import uuid

from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings
from crawlfleet.workers.worker import make_worker

from .test_frontier import redis_url  # noqa: F401 (the fixture, both backends)


def test_empty_polls_slow_down_to_the_max_and_a_job_ending_wakes_the_worker() -> None:
    """At the default settings: 50 ms, doubling, to 0.5 s at most; then one of the worker's
    own jobs ending (here one whose data is gone: arq records it as expired, and the slot is
    free all the same) ends the slowed-down wait, and the next poll comes at 50 ms."""
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}")
    assert (settings.poll_delay, settings.poll_max_delay) == (0.05, 0.5)
    worker = make_worker(settings, handle_signals=False)

    async def go() -> None:
        intervals = []
        for _ in range(6):  # 1.75 s of waiting in all
            await worker._poll_iteration()
            intervals.append(worker._interval)
        assert intervals == [0.05, 0.1, 0.2, 0.4, 0.5, 0.5]
        assert worker._wake is not None
        worker._wake.set()  # the next poll clears it as its wait begins
        waiting = asyncio.create_task(worker._poll_iteration())
        while worker._wake.is_set():  # its read of the queue, then the wait
            assert not waiting.done()
            await asyncio.sleep(0.001)
        await worker.run_job("gone", 0)
        assert worker._interval == 0.0  # the next poll comes at poll_delay
        await asyncio.wait_for(waiting, 0.4)  # woken, not at the end of its 0.5 s
        await worker.pool.aclose()

    asyncio.run(go())


def test_the_max_delay_cannot_be_below_the_delay() -> None:
    try:
        Settings(poll_delay=0.5, poll_max_delay=0.1)
    except ValueError as exc:
        assert "CRAWLFLEET_POLL_MAX_DELAY must be at least CRAWLFLEET_POLL_DELAY" in str(exc)
    else:
        raise AssertionError("a max below the delay was accepted")


def test_the_schedulers_word_that_it_queued_jobs_wakes_a_slowed_worker() -> None:
    """dispatch.lua publishes on Keys.arq_wake when it queues jobs; a worker listening there
    ends its slowed-down wait at once and polls at the fast pace again."""
    from crawlfleet.common.frontier import Admission, Frontier, Limits
    from crawlfleet.common.keys import Keys

    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", poll_delay=0.01,
                        poll_max_delay=10.0)
    worker = make_worker(settings, handle_signals=False)
    keys = Keys(settings.namespace)

    async def go() -> None:
        loop = asyncio.get_running_loop()
        listener = asyncio.create_task(worker._listen_for_work())
        for _ in range(8):  # ~2.5 s of empty polls would follow: the next one waits 2.56 s
            worker._interval = max(2 * worker._interval, 0.01)
        started = loop.time()
        waiting = asyncio.create_task(worker._poll_iteration())
        while worker._interval < 2.5:
            assert not waiting.done() and loop.time() - started < 1.0
            await asyncio.sleep(0.001)
        frontier = Frontier(worker.pool, keys)
        crawl = (await frontier.open_crawl()).id
        await frontier.admit(crawl, [Admission.of("http://a.test/", "a.test", 0)], Limits())
        assert await frontier.dispatch(crawl, batch_size=5, max_waiting=5) == 1
        await asyncio.wait_for(waiting, 1.0)  # woken, not after 2.56 s
        assert loop.time() - started < 2.5
        listener.cancel()
        await asyncio.gather(listener, return_exceptions=True)
        await worker.pool.aclose()

    asyncio.run(go())


def test_an_idle_worker_keeps_its_health_check_key_when_polls_slow_past_a_second(
    redis_url: str,  # noqa: F811 (the fixture)
) -> None:
    """arq writes the health-check key from the poll loop, with an expiry of its interval
    + 1 s; `crawlfleet health` (the pod's probe) reads "no key" as a dead worker. Polls
    slowed to CRAWLFLEET_POLL_MAX_DELAY > 1 s leave an idle, healthy worker without its key
    for up to POLL_MAX_DELAY - 1 s of every health interval."""
    settings = Settings(redis_url=redis_url, namespace=f"hc{uuid.uuid4().hex[:6]}",
                        poll_delay=0.05, poll_max_delay=3.0, health_check_interval=1.0)
    worker = make_worker(settings, handle_signals=False)
    key = Keys(settings.namespace).arq_health_check(settings.worker_id)

    async def go() -> list[float]:
        worker._interval = 3.0  # as after a few empty polls (0.05, 0.1 ... 3)

        async def polls() -> None:
            while True:
                await worker._poll_iteration()

        loop = asyncio.create_task(polls())
        missing = []
        started = time.monotonic()
        await asyncio.sleep(0.2)  # the first poll writes the key
        while time.monotonic() - started < 3.5:
            if not await worker.pool.exists(key):
                missing.append(round(time.monotonic() - started, 1))
            await asyncio.sleep(0.1)
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)
        await worker.pool.aclose()
        return missing

    assert asyncio.run(go()) == []


def test_an_empty_poll_asks_for_as_many_hosts_as_the_free_fetch_slots_serve() -> None:
    """Keys.hungry: at the defaults (64 slots, 2 a host, 32 jobs) no worker can hold more hosts
    than its slots serve, so none asks. Where one can (64 jobs), an idle worker asks for 32
    hosts; with its slots nearly all taken, none; a worker shutting down asks for none."""
    from crawlfleet.workers.worker import wanted_hosts

    # (free slots, max in flight, per host, hosts held by the process, free job slots)
    assert wanted_hosts(64, 64, 2, 0, 32) == 32
    assert wanted_hosts(64, 64, 4, 0, 32) == 16
    assert wanted_hosts(7, 64, 4, 0, 32) == 1 and wanted_hosts(3, 64, 4, 0, 32) == 0
    assert wanted_hosts(64, 64, 2, 29, 3) == 3 and wanted_hosts(64, 64, 2, 32, 0) == 0
    # Busy with 20 hosts of 4 on 64 slots: a moment with 10 slots free wants nothing.
    assert wanted_hosts(10, 64, 4, 20, 12) == 0
    assert wanted_hosts(40, 64, 4, 10, 22) == 6
    # Two shards' workers in one process: the other shard's hosts count too.
    assert wanted_hosts(24, 64, 4, 10, 16) == 6 and wanted_hosts(24, 64, 4, 16, 16) == 0
    # At the defaults (32 hosts x 2 on 64 slots) no worker is ever short of slots: nobody asks.
    defaults = Settings(redis_url=f"embedded://{uuid.uuid4().hex}")
    idle = make_worker(defaults, handle_signals=False)

    async def at_defaults() -> None:
        idle.ctx["semaphore"] = asyncio.Semaphore(defaults.max_in_flight)
        idle.ctx["turns"] = set()
        for _ in range(2):
            await idle._poll_iteration()
        assert not await idle.pool.exists(Keys(defaults.namespace).hungry)
        await idle.pool.aclose()

    asyncio.run(at_defaults())
    # 64 hosts at 2 on 64 slots: a worker's hosts may want more than its slots.
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", jobs_per_worker=64)
    worker = make_worker(settings, handle_signals=False)
    hungry = Keys(settings.namespace).hungry

    async def go() -> None:
        slots = worker.ctx["semaphore"] = asyncio.Semaphore(settings.max_in_flight)
        turns = worker.ctx["turns"] = set()
        await worker._poll_iteration()  # finds nothing: asks
        assert int(await worker.pool.get(hungry)) == 32
        assert 0 < await worker.pool.pttl(hungry) <= 1500  # 3 x CRAWLFLEET_POLL_MAX_DELAY
        for _ in range(settings.max_in_flight - 1):  # one slot left: not a host's worth
            await slots.acquire()
        await worker.pool.delete(hungry)
        await worker._poll_iteration()
        assert not await worker.pool.exists(hungry)
        for _ in range(settings.max_in_flight - 1):
            slots.release()
        turns.update(object() for _ in range(31))  # another shard's worker's 31 turns
        await worker._poll_iteration()
        assert int(await worker.pool.get(hungry)) == 1
        await worker.pool.delete(hungry)
        worker.allow_pick_jobs = False  # as after SIGTERM
        await worker._poll_iteration()
        assert not await worker.pool.exists(hungry)
        await worker.pool.aclose()

    asyncio.run(go())
