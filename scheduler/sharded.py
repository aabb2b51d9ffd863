"""``crawlfleet scheduler`` over several shards (``CRAWLFLEET_REDIS_URLS``).

Each shard has its own lock. A process leads the first shard whose lock is free (trying them
from an offset its id picks, so that N schedulers started together spread over N shards) and
stands by for the others. A shard whose lock stays free (fewer schedulers than shards, or
leaders lost and no standby left) is taken by a scheduler that leads already, after a wait that
grows with the shards it leads, so that an idle standby takes it first: a lone scheduler leads
them all, and no crawl waits for a second process. A standby says so on every shard
(``Keys.scheduler_standby``, a short expiry); a scheduler that leads several shards and sees
one hands its latest shard back, so schedulers started minutes apart still spread, one a shard,
and N + 1 of them lead N shards and keep one standing by. The frontier gauges it serves are
summed over every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.exceptions import ResponseError

from crawlfleet.common import metrics
from crawlfleet.common.cluster import Cluster, cluster_status
from crawlfleet.common.connections import (
    REDIS_UNAVAILABLE,
    as_text,
    is_refused,
    redis_problem,
)
from crawlfleet.common.logs import get_logger
from crawlfleet.common.settings import Settings

from .service import REDIS_ERRORS, STANDBY_POLL, Scheduler, beside, sleep_or_stop

log = get_logger("crawlfleet.scheduler")

# Seconds a shard's lock must have been seen free, per shard this scheduler leads already,
# before it takes that shard too: a standby (which leads none) polls every STANDBY_POLL and
# takes it long before.
TAKE_ANOTHER_AFTER = 1.0
SHARD_BACKOFF = 2.0  # seconds before a shard that failed is tried again
STANDBY_TTL_MS = 3000  # a standby's word on each shard lasts this long unless it says it again
# After handing a shard back, a leader waits this long before handing back another: the
# standby that took it stops saying it stands by, and its word expires, meanwhile.
HAND_BACK_EVERY = 2 * STANDBY_TTL_MS / 1000


def may_take(leading: int, free_for: float) -> bool:
    """Whether a scheduler that leads ``leading`` shards takes one whose lock has been free for
    ``free_for`` seconds: at once when it leads none, later the more it leads."""
    return leading == 0 or free_for >= TAKE_ANOTHER_AFTER * leading


class ShardLeader:
    """One scheduler process over every shard: the shards it leads, each in its own task with
    its own stop, and what it has seen of the others' locks."""

    def __init__(self, settings: Settings, cluster: Cluster, quick: Cluster,
                 stop: asyncio.Event) -> None:
        self.cluster, self.quick, self.stop = cluster, quick, stop
        self.keys = cluster.keys
        self.instance = settings.worker_id
        schedulers = [Scheduler(settings, shard.redis, shard=shard.index, cluster=quick)
                      for shard in cluster.shards]
        self.schedulers = schedulers
        # Schedulers started together try the shards from different places.
        start = sum(settings.worker_id.encode()) % len(schedulers)
        self.order = schedulers[start:] + schedulers[:start]
        self.leading: dict[int, tuple[asyncio.Task[None], asyncio.Event]] = {}
        self.free_since: dict[int, float] = {}
        self.backoff: dict[int, float] = {}
        self.handed_back_at = 0.0

    def refused(self, exc: BaseException, index: int) -> None:
        """A wrong password waits for nothing: one line, exit 2."""
        if is_refused(exc):
            raise redis_problem(exc, self.cluster.shards[index].url) from None

    async def lead(self, scheduler: Scheduler, shard_stop: asyncio.Event) -> None:
        try:
            await scheduler.attempt(shard_stop)
        except REDIS_ERRORS as exc:
            self.refused(exc, scheduler.shard)
            event = ("redis_unavailable" if isinstance(exc, REDIS_UNAVAILABLE)
                     else "redis_error")
            log.warning(event, error=str(exc), shard=scheduler.shard + 1)
            self.backoff[scheduler.shard] = time.monotonic() + SHARD_BACKOFF

    def reap(self) -> None:
        for index, (task, _) in list(self.leading.items()):
            if task.done():
                del self.leading[index]
                task.result()  # anything but a Redis error ends the process

    async def look(self, scheduler: Scheduler) -> None:
        """Take ``scheduler``'s shard if its lock is free and this process may take it."""
        index = scheduler.shard
        now = time.monotonic()
        if index in self.leading or now < self.backoff.get(index, 0.0):
            return
        try:
            # A look through the fail-fast client first: a shard that is down costs no 30 s of
            # retries, and one led by another no script call.
            holder = await self.quick.shards[index].redis.get(self.keys.scheduler_lock)
        except REDIS_ERRORS as exc:
            self.refused(exc, index)
            log.warning("redis_unavailable", error=str(exc), shard=index + 1)
            self.backoff[index] = now + SHARD_BACKOFF
            self.free_since.pop(index, None)
            return
        if holder is not None and as_text(holder) != self.instance:
            self.free_since.pop(index, None)
            return
        if not may_take(len(self.leading), now - self.free_since.setdefault(index, now)):
            return
        self.free_since.pop(index, None)
        shard_stop = asyncio.Event()
        self.leading[index] = (asyncio.create_task(self.lead(scheduler, shard_stop)), shard_stop)
        await asyncio.sleep(0)  # let it take the lock before the next look

    async def say_standby(self) -> None:
        """On every shard that answers: this process leads nothing and would take a shard."""
        for shard in self.quick.shards:
            try:
                await shard.redis.set(self.keys.scheduler_standby, self.instance,
                                      px=STANDBY_TTL_MS)
            except REDIS_ERRORS as exc:
                self.refused(exc, shard.index)

    async def hand_back(self) -> None:
        """Leading several shards while another scheduler stands by: give the latest back."""
        if len(self.leading) < 2 or time.monotonic() - self.handed_back_at < HAND_BACK_EVERY:
            return
        index = next(reversed(self.leading))
        try:
            waiting = await self.quick.shards[index].redis.get(self.keys.scheduler_standby)
        except REDIS_ERRORS as exc:
            self.refused(exc, index)
            return
        if waiting is None or as_text(waiting) == self.instance:
            return
        task, shard_stop = self.leading.pop(index)
        shard_stop.set()
        with contextlib.suppress(Exception):
            await task
        with contextlib.suppress(*REDIS_UNAVAILABLE, ResponseError):
            await self.schedulers[index].frontier.release_lock(self.instance)
        self.handed_back_at = time.monotonic()
        self.free_since[index] = self.handed_back_at  # ours again only if nobody takes it
        log.info("scheduler_handed_back", shard=index + 1, standby=as_text(waiting),
                 leading=sorted(i + 1 for i in self.leading))

    async def run(self) -> None:
        standby_logged = False
        while not self.stop.is_set():
            self.reap()
            for scheduler in self.order:
                if self.stop.is_set():
                    break
                await self.look(scheduler)
            if self.leading:
                standby_logged = False
                await self.hand_back()
            else:
                await self.say_standby()
                if not standby_logged:
                    log.info("scheduler_standby", shards=len(self.schedulers),
                             detail="no shard to lead: each has a leader, or cannot be reached")
                    standby_logged = True
            await sleep_or_stop(self.stop, STANDBY_POLL)

    async def close(self) -> None:
        for task, shard_stop in self.leading.values():
            shard_stop.set()  # a leader sees it and returns
            if not self.stop.is_set():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for scheduler in self.schedulers:
            with contextlib.suppress(*REDIS_UNAVAILABLE, ResponseError):
                await scheduler.frontier.release_lock(scheduler.instance)


async def run_sharded(settings: Settings, cluster: Cluster, quick: Cluster,
                      stop: asyncio.Event) -> None:
    """``crawlfleet scheduler`` over several shards (``ShardLeader``) until ``stop``.
    ``cluster`` holds the shards' own clients (retrying through a restart), ``quick`` the
    fail-fast ones that outbox links go through. A shard that refuses this process (a shard
    record of another list, a wrong password) ends it with that one line."""
    leader = ShardLeader(settings, cluster, quick, stop)
    async with metrics.serve_metrics(settings.metrics_port, role="scheduler",
                                     healthy=lambda: not stop.is_set()) as serving:
        exporter = _export_cluster(quick, stop) if serving else None
        async with beside(exporter):
            try:
                await leader.run()
            finally:
                await leader.close()
    log.info("scheduler_stopped")


async def _export_cluster(cluster: Cluster, stop: asyncio.Event) -> None:
    """The frontier-wide gauges summed over every shard (what an autoscaler reads), every few
    seconds; a shard that cannot be read leaves the last figures, which go stale."""
    while not stop.is_set():
        try:
            status = await cluster_status(cluster)
            metrics.FRONTIER.update(status, status["hosts_ready"])
        except Exception as exc:  # a shard down: its own loop logs it
            log.debug("metrics_status_failed", error=str(exc))
        await sleep_or_stop(stop, metrics.STATUS_EVERY_S)
