"""``crawlfleet scheduler`` over several shards (``CRAWLFLEET_REDIS_URLS``).

Each shard has its own lock: a process leads the first shard whose lock is free (trying them
from an offset its id picks, so that N schedulers started together spread over N shards) and
stands by for all of them otherwise, so N + 1 schedulers lead N shards and keep one standby.
The frontier gauges it serves are summed over every shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from redis.exceptions import ResponseError

from crawlfleet.common import metrics
from crawlfleet.common.cluster import Cluster, cluster_status
from crawlfleet.common.connections import REDIS_UNAVAILABLE, as_text
from crawlfleet.common.logs import get_logger
from crawlfleet.common.settings import Settings

from .service import REDIS_ERRORS, STANDBY_POLL, Scheduler, sleep_or_stop

log = get_logger("crawlfleet.scheduler")


async def run_sharded(settings: Settings, cluster: Cluster, quick: Cluster,
                      stop: asyncio.Event) -> None:
    """``crawlfleet scheduler`` over several shards: lead one shard whose lock is free, stand
    by for every shard otherwise. ``cluster`` holds the shards' own clients (retrying through a
    restart), ``quick`` the fail-fast ones that outbox links go through."""
    schedulers = [Scheduler(settings, shard.redis, shard=shard.index, cluster=quick)
                  for shard in cluster.shards]
    # Schedulers started together try the shards from different places.
    start = sum(settings.worker_id.encode()) % len(schedulers)
    order = schedulers[start:] + schedulers[:start]
    backoff: dict[int, float] = {}
    standby_logged = False
    async with metrics.serve_metrics(settings.metrics_port, role="scheduler",
                                     healthy=lambda: not stop.is_set()) as serving:
        exporter = (asyncio.create_task(_export_cluster(quick, stop)) if serving else None)
        while not stop.is_set():
            for scheduler in order:
                if stop.is_set():
                    break
                if time.monotonic() < backoff.get(scheduler.shard, 0.0):
                    continue
                try:
                    # A look through the fail-fast client first: a shard that is down costs
                    # no 30 s of retries, and one led by another scheduler no script call.
                    holder = await quick.shards[scheduler.shard].redis.get(
                        scheduler.keys.scheduler_lock)
                    if holder is not None and as_text(holder) != scheduler.instance:
                        continue
                    if await scheduler.attempt(stop):
                        standby_logged = False
                except REDIS_ERRORS as exc:
                    event = ("redis_unavailable" if isinstance(exc, REDIS_UNAVAILABLE)
                             else "redis_error")
                    log.warning(event, error=str(exc), shard=scheduler.shard + 1)
                    backoff[scheduler.shard] = time.monotonic() + 2.0
            if not standby_logged and not stop.is_set():
                log.info("scheduler_standby", shards=len(schedulers),
                         detail="every shard has a leader")
                standby_logged = True
            await sleep_or_stop(stop, STANDBY_POLL)
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
