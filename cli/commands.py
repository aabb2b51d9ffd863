"""The fleet commands: scheduler, sink, purge, status, check, export (seed: cli/seed.py).

Exit codes: 0 done; 1 done but not OK (a seed line refused, ``check`` found drift) or Redis
unreachable or answering an error; 2 bad input (a setting, an argument, a file that cannot be
read or written, a Redis that refuses the password or the database).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import IO, Any, TypeVar

import msgspec
from redis.exceptions import RedisError

from crawlfleet.common.cluster import check_unsharded
from crawlfleet.common.connections import (
    open_redis,
    redis_problem,
    wait_for_redis,
)
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import read_status

T = TypeVar("T")


class UsageError(Exception):
    """Bad input to a command (a file that cannot be read or written, a bad argument): one
    line on stderr and exit 2."""


@contextlib.asynccontextmanager
async def one_redis(settings: Settings) -> AsyncIterator[Any]:
    """The one Redis of a command run without a shard list, closed after; one that holds a
    shard of a sharded crawl is refused in one line (``check_unsharded``)."""
    redis = open_redis(settings.redis_url)
    try:
        await check_unsharded(redis, Keys(settings.namespace), settings.redis_where)
        yield redis
    finally:
        await redis.aclose()


def run_on_redis(settings: Settings, go: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(go())``, with any Redis error turned into one line naming where
    (:class:`RedisProblem`; exit 1 unreachable, 2 refused) instead of a traceback."""
    try:
        return asyncio.run(go())
    except RedisError as exc:
        raise redis_problem(exc, settings.redis_url) from None


@contextlib.contextmanager
def output_file(path: str) -> Iterator[IO[bytes]]:
    """Where results go: '-' is stdout. A file is written beside its final name and renamed
    over it only when everything is written, so a command that fails (Redis down, Ctrl-C)
    leaves the previous file as it was; a path that cannot be written fails at once, naming
    the file and the reason. A path that exists and is not a regular file (a pipe,
    /dev/stdout) is written in place."""
    if path == "-":
        yield sys.stdout.buffer
        return
    target = Path(path)
    in_place = target.exists() and not target.is_file()
    try:
        if in_place:
            handle = open(target, "wb")  # noqa: SIM115 - closed below
        elif target.exists() and not os.access(target, os.W_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        if not in_place:
            handle = open(temporary, "wb")  # noqa: SIM115 - closed below, renamed on success
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
    if in_place:
        with handle:
            yield handle
        return
    try:
        with handle:
            yield handle
        if target.exists():
            shutil.copymode(target, temporary)
        os.replace(temporary, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def sharded(settings: Settings) -> bool:
    return len(settings.shard_urls) > 1


def stop_on_signals() -> asyncio.Event:
    """An event SIGTERM and SIGINT set (in the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_cluster_role(settings: Settings, role: str,
                     work: Callable[[Any, asyncio.Event], Awaitable[None]]) -> int:
    """``run_role`` over every shard: ``work(cluster, stop)``; each shard's outage is the
    role's to ride out (nothing waits for all shards before starting)."""
    from crawlfleet.common.cluster import Cluster

    configure_logging(settings.log_format, settings.log_level, role=role)

    async def go() -> None:
        stop = stop_on_signals()
        cluster = Cluster.open(settings)
        try:
            await work(cluster, stop)
        finally:
            await cluster.aclose()

    asyncio.run(go())
    return 0


def run_role(settings: Settings, role: str,
             work: Callable[[Any, asyncio.Event], Awaitable[None]]) -> int:
    """A long-running fleet role until SIGTERM/SIGINT. Started before its Redis, it waits for
    it (redis_unavailable, with backoff); a Redis that refuses us (a wrong password) ends the
    process with one line instead."""
    configure_logging(settings.log_format, settings.log_level, role=role)

    async def go() -> None:
        stop = stop_on_signals()
        redis = open_redis(settings.redis_url)
        try:
            if await wait_for_redis(redis, settings.redis_url, stop=stop, role=role):
                await check_unsharded(redis, Keys(settings.namespace), settings.redis_where)
                await work(redis, stop)
        finally:
            await redis.aclose()

    run_on_redis(settings, go)
    return 0


def scheduler(settings: Settings) -> int:
    from crawlfleet.scheduler.service import Scheduler
    from crawlfleet.scheduler.sharded import run_sharded

    if sharded(settings):
        from crawlfleet.common.cluster import Cluster

        async def lead_shards(cluster: Any, stop: asyncio.Event) -> None:
            quick = Cluster.open(settings, quick=True)
            try:
                await run_sharded(settings, cluster, quick, stop)
            finally:
                await quick.aclose()

        return run_cluster_role(settings, "scheduler", lead_shards)
    return run_role(settings, "scheduler",
                    lambda redis, stop: Scheduler(settings, redis).run(stop))


def sink(settings: Settings) -> int:
    """``crawlfleet sink``: drain the results log into CRAWLFLEET_OUTPUT until SIGTERM."""
    from crawlfleet.common.sink import Sink
    from crawlfleet.common.storage import open_store

    if not settings.output:
        raise UsageError("CRAWLFLEET_OUTPUT is not set: a sink needs somewhere to write "
                         "(a directory or s3://bucket/prefix)")
    store = open_store(settings.output)
    if sharded(settings):
        async def drain_shards(cluster: Any, stop: asyncio.Event) -> None:
            await asyncio.gather(*(Sink(settings, shard.redis, store).run(stop)
                                   for shard in cluster.shards))

        return run_cluster_role(settings, "sink", drain_shards)
    return run_role(settings, "sink", lambda redis, stop: Sink(settings, redis, store).run(stop))


def purge(settings: Settings, *, yes: bool) -> int:
    """``crawlfleet purge``: delete every key of the namespace (asks first unless ``yes``).
    The output's files are the crawl's product and stay."""
    from .crawl import _delete_namespace

    keys = Keys(settings.namespace)
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("refusing to purge without a terminal to ask on: pass --yes")
        answer = input(f"delete every key of namespace {settings.namespace!r} at "
                       f"{settings.redis_where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return 1

    async def go() -> int:
        redis = open_redis(settings.redis_url)
        try:
            before = await _count_keys(redis, keys)
            await _delete_namespace(redis, keys)
            return before
        finally:
            await redis.aclose()

    if sharded(settings):

        async def purge_shards(cluster: Any) -> int:
            total = 0
            for shard in cluster.shards:
                total += await _count_keys(shard.redis, keys)
                await _delete_namespace(shard.redis, keys)
            return total

        count = _purge_cluster(settings, purge_shards)
    else:
        count = run_on_redis(settings, go)
    print(f"purged namespace {settings.namespace!r}: {count} key(s) deleted", file=sys.stderr)
    return 0


def _purge_cluster(settings: Settings, go: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Purge every shard, the shard records included: no shard check first, so that a
    namespace whose shard list changed can still be cleared."""
    from crawlfleet.common.cluster import Cluster

    async def main() -> int:
        cluster = Cluster.open(settings)
        try:
            return await go(cluster)
        finally:
            await cluster.aclose()

    try:
        return asyncio.run(main())
    except RedisError as exc:
        raise redis_problem(exc, settings.redis_where) from None


async def _count_keys(redis: Any, keys: Keys) -> int:
    count = 0
    for pattern in keys.purge_patterns:
        async for _ in redis.scan_iter(match=pattern, count=1000):
            count += 1
    return count


def status(settings: Settings, *, as_json: bool) -> int:
    async def go() -> dict[str, Any]:
        async with one_redis(settings) as redis:
            return await read_status(redis, Keys(settings.namespace))

    if sharded(settings):
        from crawlfleet.common.cluster import cluster_status

        from .shards import run_on_cluster

        current = run_on_cluster(settings, cluster_status)
    else:
        current = run_on_redis(settings, go)
    if as_json:
        print(msgspec.json.encode(current).decode())
    else:
        print(format_status(current))
    return 0


def check(settings: Settings, *, as_json: bool) -> int:
    """``crawlfleet check``: count the structures, compare them with the counters; 1 if they
    disagree. A running crawl moves while it is counted: check a finished or stopped crawl."""
    from crawlfleet.common import check as consistency
    from crawlfleet.common.resultlog import output_store

    async def go() -> tuple[consistency.Snapshot, list[consistency.Problem]]:
        async with one_redis(settings) as redis:
            keys = Keys(settings.namespace)
            store = await output_store(redis, keys, settings.output)
            return await consistency.check(redis, keys, store)

    if sharded(settings):
        from .shards import check_sharded, format_check, run_on_cluster

        reports = run_on_cluster(settings, lambda c: check_sharded(c, settings.output))
        print(format_check(reports, as_json))
        return 1 if any(problems for _, problems in reports) else 0
    snapshot, problems = run_on_redis(settings, go)
    if as_json:
        print(msgspec.json.encode(consistency.report(snapshot, problems)).decode())
    else:
        print(consistency.format_report(snapshot, problems))
    return 1 if problems else 0


def format_status(s: dict[str, Any]) -> str:
    rows = [
        ("finished", "yes" if s["finished"] else "no"),
        *([("state lost", "yes: the frontier's state vanished from Redis mid-crawl "
                          "(restart without persistence, or a flush); results are incomplete")]
          if s["state_lost"] else []),
        ("seen", s["seen"]),
        ("pages", s["pages"]),
        ("failed", s["failed"]),
        ("skipped", s["skipped"]),
        ("queued", s["queued"]),
        ("in flight", f"{s['in_flight']} (hosts leased: {s['hosts_leased']})"),
        ("retries", f"{s['retries']} (dead-lettered: {s['dead']})"),
        ("quarantined", f"{s['quarantined']} URL entries, {s['quarantine_entries']} entries "
                        "in all (crawlfleet check; the scheduler logs each)"),
        ("pages/s", f"{s['pages_per_s_10s']} (last 10 s), {s['pages_per_s']} (last minute)"),
        ("links discarded", f"scope {s['discarded_scope']}, invalid {s['discarded_invalid']}, "
                            f"over max pages {s['discarded_max_pages']}, over host budget "
                            f"{s['discarded_host_budget']}, query variants "
                            f"{s['discarded_query_variants']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def export(settings: Settings, out_path: str | None, *, fmt: str = "jsonl",
           failed: bool = False, dead: bool = False) -> int:
    from .export import write_results

    async def go(out: IO[bytes]) -> int:
        async with one_redis(settings) as redis:
            return await write_results(redis, Keys(settings.namespace), out,
                                       output=settings.output, fmt=fmt, failed=failed,
                                       dead=dead)

    with output_file(out_path or "-") as handle:
        if sharded(settings):
            from .shards import export_sharded, run_on_cluster

            count = run_on_cluster(settings, lambda cluster: export_sharded(
                cluster, handle, output=settings.output, fmt=fmt, failed=failed, dead=dead))
        else:
            count = run_on_redis(settings, lambda: go(handle))
    print(f"exported {count} result(s)", file=sys.stderr)
    return 0
