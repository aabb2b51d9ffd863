"""``crawlfleet worker`` over several shards (``CRAWLFLEET_REDIS_URLS``): one arq worker per
shard in the process, each polling its shard's queue and claiming there, all sharing one
session, one set of fetch slots and one link filter (workers/worker.py's ``open_shared``).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal

from crawlfleet.common.cluster import Cluster
from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.settings import Settings

from .worker import POLL_FAILURES, CrawlWorker, open_shared, worker_options

log = get_logger("crawlfleet.worker")


async def run_sharded_workers(settings: Settings) -> None:
    """One arq worker per shard (each polls its shard's queue and claims there), sharing the
    process's session, fetch slots and link filter; links for other shards' hosts go through
    fail-fast clients (``Cluster.open(quick=True)``). A shard that is down pauses its own
    arq worker only. SIGTERM stops all of them, each with the usual grace."""
    urls = settings.shard_urls
    quick = Cluster.open(settings, quick=True)
    resources = contextlib.AsyncExitStack()
    workers: list[CrawlWorker] = []
    shared = await open_shared(settings, resources,
                               lambda: any(w.allow_pick_jobs for w in workers))
    # A host's batch holds a job slot: the slots are split, so the process holds no more
    # hosts than one unsharded worker would (one a shard at least).
    per_shard = max(1, settings.jobs_per_worker // len(urls))
    for index, url in enumerate(urls):
        options = worker_options(settings)
        options["max_jobs"] = per_shard
        options["ctx"] = {**options["ctx"], **shared, "cluster": quick, "shard": index}
        worker = CrawlWorker(**options, handle_signals=False, redis_pool=open_redis(
            url, queue_name=Keys(settings.namespace).arq_queue))
        worker.redis_url = url
        workers.append(worker)
    loop = asyncio.get_running_loop()

    def stop_all(sig: signal.Signals) -> None:
        for w in workers:
            w.handle_sig_wait_for_completion(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_all, sig)
    tasks = []
    for worker in workers:
        worker.main_task = loop.create_task(worker.main())
        tasks.append(worker.main_task)
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:  # a shard that refuses us (a password, a shard record) ends all
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in workers:
            with contextlib.suppress(*POLL_FAILURES):
                await worker.close()
        await resources.aclose()
        await quick.aclose()
        log.info("worker_stopped", worker_id=settings.worker_id)
