"""``crawlfleet crawl``: seed, schedule, fetch and export in one process, then exit.

With no ``CRAWLFLEET_REDIS_URL`` (and no ``--redis-url``) everything runs on the embedded
in-process backend, so a first crawl needs nothing installed or started. With one, this is the
same fleet as separate ``scheduler`` and ``worker`` processes, only in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from typing import IO, Any

from crawlfleet.common.connections import EMBEDDED_SCHEME, is_embedded, open_redis, redact_url
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging
from crawlfleet.common.settings import Settings, env_name
from crawlfleet.common.stats import read_status
from crawlfleet.scheduler.service import Scheduler
from crawlfleet.workers.worker import make_worker

from .commands import enqueue_seeds, output_file, parse_seed_lines, run_on_redis, write_results

POLL_S = 0.1
PROGRESS_S = 2.0


def crawl(args: argparse.Namespace) -> int:
    embedded = not (args.redis_url or os.environ.get(env_name("redis_url")))
    settings = Settings.from_env(overrides={
        "redis_url": args.redis_url or (f"{EMBEDDED_SCHEME}crawl" if embedded else None),
        "namespace": args.namespace,
        "max_pages": args.max_pages,
        "max_depth": args.max_depth,
        # Per-page log lines would drown the summary; CRAWLFLEET_LOG_LEVEL=info brings them back.
        "log_level": None if os.environ.get(env_name("log_level")) else "warning",
    })
    if args.workers < 1:
        print("crawlfleet crawl: --workers must be at least 1", file=sys.stderr)
        return 2
    seeds, errors = parse_seed_lines(args.urls, sort_query=settings.sort_query, source="argument",
                                     settings=settings)
    for error in errors:
        print(f"crawlfleet crawl: seed {error}", file=sys.stderr)
    if not seeds:
        return 2
    configure_logging(settings.log_format, settings.log_level, role="crawl")
    # The results file is checked before the crawl starts and replaced only when it ends.
    with output_file(args.out) as out:
        summary = run_on_redis(
            settings, lambda: run_crawl(settings, seeds, args.workers, out, fresh=args.fresh))
    print(format_summary(summary, settings, args.workers, args.out), file=sys.stderr)
    return 0 if summary["finished"] else 1


async def run_crawl(
    settings: Settings, seeds: list[str], workers: int, out: IO[bytes], *, fresh: bool = False
) -> dict[str, Any]:
    keys = Keys(settings.namespace)
    redis = open_redis(settings.redis_url)
    try:
        return await _run_crawl(settings, seeds, workers, out, redis, keys, fresh=fresh)
    finally:
        await redis.aclose()


async def _run_crawl(settings: Settings, seeds: list[str], workers: int, out: IO[bytes],
                     redis: Any, keys: Keys, *, fresh: bool) -> dict[str, Any]:
    started = time.monotonic()
    if fresh and not is_embedded(settings.redis_url):
        await _delete_namespace(redis, keys)
    await enqueue_seeds(redis, keys, seeds, expected_urls=settings.expected_urls)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    scheduler_redis = open_redis(settings.redis_url)
    scheduler = asyncio.create_task(Scheduler(settings, scheduler_redis).run(stop))
    fleet = [
        make_worker(settings.replace(worker_id=f"{settings.worker_id}-w{i}"), handle_signals=False)
        for i in range(workers)
    ]
    worker_tasks = [asyncio.create_task(w.async_run()) for w in fleet]
    status: dict[str, Any] = {}
    next_progress = time.monotonic() + PROGRESS_S
    try:
        while not stop.is_set():
            status = await read_status(redis, keys)
            if status["finished"]:
                break
            if scheduler.done():
                scheduler.result()  # the scheduler died: surface why
            if time.monotonic() >= next_progress and sys.stderr.isatty():
                print(f"\r{status['pages'] + status['failed']} fetched, {status['queued']} queued,"
                      f" {status['in_flight']} in flight", end="", file=sys.stderr)
                next_progress = time.monotonic() + PROGRESS_S
            await asyncio.sleep(POLL_S)
    finally:
        stop.set()
        for worker in fleet:
            await worker.close()
        for task in worker_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await scheduler
        await scheduler_redis.aclose()
    if sys.stderr.isatty():
        print(file=sys.stderr)
    status = await read_status(redis, keys)
    status["exported"] = await write_results(redis, keys, out)
    status["elapsed_s"] = round(time.monotonic() - started, 2)
    return status


async def _delete_namespace(redis: Any, keys: Keys) -> None:
    """Unlink every key of the crawl (its namespace and arq's job keys for its batches), a scan
    page at a time (a few keys per host in a big crawl)."""
    for pattern in keys.purge_patterns:
        cursor = 0
        while True:
            cursor, found = await redis.scan(cursor, match=pattern, count=1000)
            if found:
                await redis.unlink(*found)
            if cursor == 0:
                break


def format_summary(s: dict[str, Any], settings: Settings, workers: int, out: str) -> str:
    fetched = s["pages"] + s["failed"]
    rate = fetched / s["elapsed_s"] if s["elapsed_s"] else 0.0
    backend = ("embedded backend" if is_embedded(settings.redis_url)
               else redact_url(settings.redis_url))
    state = "finished" if s["finished"] else "stopped before the end"
    return (
        f"crawl {state}: {s['pages']} pages, {s['failed']} failed, {s['skipped']} skipped "
        f"({s['seen']} URLs seen, {s['discarded_scope']} links out of scope) "
        f"in {s['elapsed_s']:.2f} s, {rate:.1f} pages/s, {workers} worker(s), {backend}\n"
        f"results: {s['exported']} lines in {'stdout' if out == '-' else out}"
    )
