"""``crawlfleet scheduler`` over several shards (``CRAWLFLEET_REDIS_URLS``).

Each shard has its own lock. A process leads the first shard whose lock is free (trying them
from an offset its id picks, so that N schedulers started together spread over N shards) and
stands by for the others. A shard whose lock stays free (fewer schedulers than shards, or
leaders lost and no standby left) is taken by a scheduler that leads already, after a wait that
grows with the shards it leads, so that an idle standby takes it first: N + 1 schedulers lead N
shards and keep one standby, and a lone scheduler leads them all, so no crawl waits for a
second process. The frontier gauges it serves are summed over every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.exceptions import ResponseError

from crawlfleet.common import metrics
from crawlfleet.common.cluster import Cluster, cluster_status
from crawlfleet.common.connections import REDIS_UNAVAILABLE, as_text, is_refused, redis_problem
from crawlfleet.common.logs import get_logger
from crawlfleet.common.settings import Settings

from .service import REDIS_ERRORS, STANDBY_POLL, Scheduler, sleep_or_stop

log = get_logger("crawlfleet.scheduler")

# Seconds a shard's lock must have been seen free, per shard this scheduler leads already,
# before it takes that shard too: a standby (which leads none) polls every STANDBY_POLL and
# takes it long before.
TAKE_ANOTHER_AFTER = 1.0
SHARD_BACKOFF = 2.0  # seconds before a shard that failed is tried again


def may_take(leading: int, free_for: float) -> bool:
    """Whether a scheduler that leads ``leading`` shards takes one whose lock has been free for
    ``free_for`` seconds: at once when it leads none, later the more it leads."""
    return leading == 0 or free_for >= TAKE_ANOTHER_AFTER * leading


async def run_sharded(settings: Settings, cluster: Cluster, quick: Cluster,
                      stop: asyncio.Event) -> None:
    """``crawlfleet scheduler`` over several shards: lead every shard it may take (``may_take``),
    each in its own task, until ``stop``. ``cluster`` holds the shards' own clients (retrying
    through a restart), ``quick`` the fail-fast ones that outbox links go through. A shard that
    refuses this process (a shard record of another list) ends it with that one line."""
    schedulers = [Scheduler(settings, shard.redis, shard=shard.index, cluster=quick)
                  for shard in cluster.shards]
    # Schedulers started together try the shards from different places.
    start = sum(settings.worker_id.encode()) % len(schedulers)
    order = schedulers[start:] + schedulers[:start]
    leading: dict[int, asyncio.Task[None]] = {}
    free_since: dict[int, float] = {}
    backoff: dict[int, float] = {}
    standby_logged = False

    async def lead(scheduler: Scheduler) -> None:
        try:
            await scheduler.attempt(stop)
        except REDIS_ERRORS as exc:
            if is_refused(exc):  # a wrong password waits for nothing: one line, exit 2
                raise redis_problem(exc, cluster.shards[scheduler.shard].url) from None
            event = ("redis_unavailable" if isinstance(exc, REDIS_UNAVAILABLE)
                     else "redis_error")
            log.warning(event, error=str(exc), shard=scheduler.shard + 1)
            backoff[scheduler.shard] = time.monotonic() + SHARD_BACKOFF

    async with metrics.serve_metrics(settings.metrics_port, role="scheduler",
                                     healthy=lambda: not stop.is_set()) as serving:
        exporter = (asyncio.create_task(_export_cluster(quick, stop)) if serving else None)
        try:
            while not stop.is_set():
                for index, task in list(leading.items()):
                    if task.done():
                        del leading[index]
                        task.result()  # anything but a Redis error ends the process
                for scheduler in order:
                    index = scheduler.shard
                    if stop.is_set() or index in leading:
                        continue
                    now = time.monotonic()
                    if now < backoff.get(index, 0.0):
                        continue
                    try:
                        # A look through the fail-fast client first: a shard that is down
                        # costs no 30 s of retries, and one led by another no script call.
                        holder = await quick.shards[index].redis.get(
                            scheduler.keys.scheduler_lock)
                    except REDIS_ERRORS as exc:
                        if is_refused(exc):
                            raise redis_problem(exc, cluster.shards[index].url) from None
                        log.warning("redis_unavailable", error=str(exc), shard=index + 1)
                        backoff[index] = now + SHARD_BACKOFF
                        free_since.pop(index, None)
                        continue
                    if holder is not None and as_text(holder) != scheduler.instance:
                        free_since.pop(index, None)
                        continue
                    if not may_take(len(leading), now - free_since.setdefault(index, now)):
                        continue
                    free_since.pop(index, None)
                    leading[index] = asyncio.create_task(lead(scheduler))
                    await asyncio.sleep(0)  # let it take the lock before the next look
                if not leading and not standby_logged:
                    log.info("scheduler_standby", shards=len(schedulers),
                             detail="every shard has a leader")
                standby_logged = not leading
                await sleep_or_stop(stop, STANDBY_POLL)
        finally:
            for task in leading.values():
                if stop.is_set():
                    with contextlib.suppress(Exception):
                        await task  # a leader sees stop and returns
                else:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            if exporter is not None:
                exporter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await exporter
    for scheduler in schedulers:
        with contextlib.suppress(*REDIS_UNAVAILABLE, ResponseError):
            await scheduler.frontier.release_lock(scheduler.instance)
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
