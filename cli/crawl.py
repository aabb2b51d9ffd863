"""``crawlfleet crawl``: seed, schedule, fetch and write the results in one process, then exit.

With no ``CRAWLFLEET_REDIS_URL`` (and no ``--redis-url``) everything runs on the embedded
in-process backend, so a first crawl needs nothing installed or started. With one, this is the
same fleet as separate ``scheduler`` and ``worker`` processes, only in one process.

Where results go: with ``CRAWLFLEET_OUTPUT`` set, a sink in this process writes them there as
parts and drains Redis; otherwise they are appended to ``--out`` as they come (cli/outfile.py).
Ctrl-C stops the crawl cleanly and the same command continues it: a real Redis keeps the
crawl, and on the embedded backend its state is saved to a state file (cli/state.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from crawlfleet.common.cluster import check_unsharded
from crawlfleet.common.connections import EMBEDDED_SCHEME, is_embedded, open_redis, redact_url
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging
from crawlfleet.common.settings import Settings, env_name
from crawlfleet.common.sink import Sink
from crawlfleet.common.stats import read_status
from crawlfleet.common.storage import open_store
from crawlfleet.scheduler.service import Scheduler
from crawlfleet.workers.worker import make_worker

from . import state
from .commands import UsageError, run_on_redis
from .outfile import ResultsFile, file_key
from .progress import ProgressDisplay, summary_table
from .seed import enqueue_seeds, parse_seed_lines
from .tally import Tally

POLL_S = 0.2
WRITE_EVERY_S = 1.0
DEFAULT_OUT = "results.jsonl"


def crawl(args: argparse.Namespace) -> int:
    embedded = not (args.redis_url or os.environ.get(env_name("redis_url"))
                    or os.environ.get(env_name("redis_urls")))
    settings = Settings.from_env(overrides={
        "redis_url": args.redis_url or (f"{EMBEDDED_SCHEME}crawl" if embedded else None),
        "namespace": args.namespace,
        "max_pages": args.max_pages,
        "max_depth": args.max_depth,
        # Per-page log lines would drown the display; CRAWLFLEET_LOG_LEVEL=info brings them back.
        "log_level": None if os.environ.get(env_name("log_level")) else "warning",
    })
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if len(settings.shard_urls) > 1:
        raise UsageError(f"crawl runs a crawl on one Redis; with {env_name('redis_urls')} run "
                         "the fleet: `crawlfleet scheduler` per shard, `crawlfleet worker`, "
                         "`crawlfleet seed`")
    if settings.output and args.out:
        raise UsageError(f"--out and {env_name('output')} both say where results go: with an "
                         "output set, `crawlfleet export` reads them back")
    out = None if settings.output else (args.out or DEFAULT_OUT)
    seeds, errors = parse_seed_lines(args.urls, sort_query=settings.sort_query, source="argument",
                                     settings=settings)
    for error in errors:
        print(f"crawlfleet crawl: seed {error}", file=sys.stderr)
    if not seeds:
        return 2
    configure_logging(settings.log_format, settings.log_level, role="crawl")
    state_file = state_path(settings, out) if embedded else None
    tally = Tally()
    summary = run_on_redis(settings, lambda: run_crawl(
        settings, seeds, args.workers, out, fresh=args.fresh, overwrite=args.overwrite,
        state_file=state_file, tally=tally, display=True))
    print(summary_table(summary, tally, where=summary["where"]), file=sys.stderr)
    print(format_summary(summary, settings, args.workers, summary["where"]), file=sys.stderr)
    if summary["stopped"]:
        print("stopped before the end: run the same command again to continue"
              + (f" (state saved in {state_file})" if state_file else ""), file=sys.stderr)
    return 0 if summary["finished"] else 1


def state_path(settings: Settings, out: str | None) -> Path:
    """Where an embedded crawl keeps its state between runs: in a local output folder, else
    beside ``--out`` (in the current folder when results go to stdout or a bucket)."""
    if settings.output and "://" not in settings.output:
        return Path(settings.output) / f"{settings.namespace}.crawl-state"
    if out and out != "-":
        return Path(f"{out}.crawl-state")
    return Path(f"{settings.namespace}.crawl-state")


async def run_crawl(
    settings: Settings, seeds: list[str], workers: int, out: str | None, *,
    fresh: bool = False, overwrite: bool = False, state_file: Path | None = None,
    tally: Tally | None = None, display: bool = False,
) -> dict[str, Any]:
    keys = Keys(settings.namespace)
    redis = open_redis(settings.redis_url)
    try:
        await check_unsharded(redis, keys, settings.redis_where)
        return await _run_crawl(settings, seeds, workers, out, redis, keys, fresh=fresh,
                                overwrite=overwrite, state_file=state_file,
                                tally=tally or Tally(), display=display)
    finally:
        await redis.aclose()


async def _open(settings: Settings, redis: Any, keys: Keys, out: str | None, *, fresh: bool,
                overwrite: bool, state_file: Path | None) -> bool:
    """Start over, or load the embedded backend's saved state; whether ``--out`` may be
    replaced (``--fresh`` replaces the file this crawl wrote before)."""
    if fresh:
        # This crawl's own --out file is its to replace when it starts over.
        overwrite = overwrite or bool(
            out is not None and await redis.hexists(keys.out_files, file_key(out)))
        await _delete_namespace(redis, keys)
        if state_file is not None:
            state.remove(state_file)
    elif state_file is not None and state.exists(state_file):
        try:
            await state.load(redis, state_file, keys)
        except state.StateFileError as exc:
            raise UsageError(str(exc)) from None
    return overwrite


async def _run_crawl(settings: Settings, seeds: list[str], workers: int, out: str | None,
                     redis: Any, keys: Keys, *, fresh: bool, overwrite: bool,
                     state_file: Path | None, tally: Tally, display: bool) -> dict[str, Any]:
    started = time.monotonic()
    overwrite = await _open(settings, redis, keys, out, fresh=fresh, overwrite=overwrite,
                            state_file=state_file)
    results: ResultsFile | None = None
    sink: Sink | None = None
    if out is not None:
        results = ResultsFile(redis, keys, out, on_line=tally.add_raw)
        await results.open(overwrite=overwrite)
        where = "stdout" if out == "-" else out
    else:
        assert settings.output is not None
        store = open_store(settings.output)
        sink = Sink(settings, redis, store, owner=f"{settings.worker_id}-sink",
                    on_lines=tally.add_raw)
        where = store.where
    await enqueue_seeds(redis, keys, seeds, expected_urls=settings.expected_urls)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        # The first Ctrl-C stops cleanly; a second one, while that takes time, ends at once.
        if stop.is_set():
            loop.remove_signal_handler(sig)
            signal.raise_signal(sig)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    scheduler_redis = open_redis(settings.redis_url)
    scheduler = asyncio.create_task(Scheduler(settings, scheduler_redis).run(stop))
    fleet = [
        make_worker(settings.replace(worker_id=f"{settings.worker_id}-w{i}"), handle_signals=False)
        for i in range(workers)
    ]
    worker_tasks = [asyncio.create_task(w.async_run()) for w in fleet]
    sink_stop = asyncio.Event()
    sink_task = asyncio.create_task(sink.run(sink_stop)) if sink else None
    status: dict[str, Any] = {}
    view = ProgressDisplay(sys.stderr) if display else None
    next_write = 0.0
    try:
        with view or contextlib.nullcontext():
            while not stop.is_set():
                status = await read_status(redis, keys)
                if results is not None and time.monotonic() >= next_write:
                    await results.pump()
                    next_write = time.monotonic() + WRITE_EVERY_S
                if view is not None:
                    view.update(status, tally, time.monotonic() - started)
                if status["finished"]:
                    break
                if scheduler.done():
                    scheduler.result()  # the scheduler died: surface why
                if sink_task is not None and sink_task.done():
                    sink_task.result()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_S)
    finally:
        stopped = stop.is_set()
        stop.set()
        for worker in fleet:
            await worker.close()
        for task in worker_tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await scheduler
        await scheduler_redis.aclose()
        sink_stop.set()
        if sink_task is not None:
            await sink_task
    # What the workers stored on their way out is written too, before the state is kept.
    if results is not None:
        await results.pump()
        results.close()
    if sink is not None:
        await sink.drain()
    status = await read_status(redis, keys)
    if state_file is not None:
        if status["finished"]:
            state.remove(state_file)
        else:
            await state.save(redis, state_file)
    status["stopped"] = stopped and not status["finished"]
    status["exported"] = (results.written + results.resumed_at if results is not None
                          else sink.results if sink is not None else 0)
    status["where"] = where
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
    state_word = "finished" if s["finished"] else "stopped before the end"
    return (
        f"crawl {state_word}: {s['pages']} pages, {s['failed']} failed, {s['skipped']} skipped "
        f"({s['seen']} URLs seen, {s['discarded_scope']} links out of scope) "
        f"in {s['elapsed_s']:.2f} s, {rate:.1f} pages/s, {workers} worker(s), {backend}\n"
        f"results: {s['exported']} lines in {out}"
    )
