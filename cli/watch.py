"""``crawlfleet status --watch``: the crawl's status and its live workers, refreshed every second.

On a terminal: a rich live view on stdout, redrawn each REFRESH_S; Ctrl-C (or SIGTERM) ends it
with exit 0 and leaves the last frame on screen. Anywhere else (a pipe, a log): one plain
``status:`` line per refresh.

The workers are read from their own health-check keys (``Keys.arq_health_check``), which arq
rewrites every CRAWLFLEET_HEALTH_CHECK_INTERVAL with an expiry just past it: a key that exists
is a worker alive, one that expired is a worker gone. A new worker shows within RESCAN_S
(``WorkerWatch``).

A Redis that stops answering mid-watch is shown in the view ("Redis is unreachable at ..."),
with the last figures read, and tried again each refresh; only a Redis that refuses us before
any read succeeded (a wrong password: waiting cures nothing) ends the watch, with exit 2.

The pieces are kept apart for tests: ``parse_health`` and ``watch_view``/``plain_line`` are
pure, ``watch_loop`` takes the read, the drawing, the clock and a stop condition.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from redis.asyncio import Redis
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from crawlfleet.common.cluster import Cluster, cluster_status
from crawlfleet.common.connections import as_text, is_refused, open_redis, redis_problem
from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import read_status

from . import progress

REFRESH_S = 1.0
RESCAN_S = 10.0  # how often the workers' health keys are looked for (see WorkerWatch)
SCAN_COUNT = 10_000  # keys a SCAN call walks: fewer round trips over a big keyspace
# A read that takes longer is shown as Redis not answering; redis-py's own retries of a dropped
# connection would otherwise freeze the view for ~30 s without a word.
READ_TIMEOUT_S = 3.0
# Rows the view needs besides the workers' table: the table is cut to what fits the terminal.
_OTHER_ROWS = 20
_MIN_WORKERS_SHOWN = 3

# arq's record_health: f"{datetime.now():%b-%d %H:%M:%S} j_complete=.. j_failed=.. ...".
_HEALTH_FIELDS = {"j_complete": "complete", "j_failed": "failed", "j_retried": "retried",
                  "j_ongoing": "ongoing", "queued": "queued"}
_HEALTH_STAMP = re.compile(r"^\s*(\S+ \d{1,2}:\d{2}:\d{2})(?=\s|$)")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")


@dataclass(frozen=True, slots=True)
class Health:
    """What a worker's health-check value says; a field missing or unreadable is None. The
    counts are arq's, in jobs: one job is one host batch."""

    stamp: str | None = None  # the worker's local time, 'Dec-02 05:40:01' (no year, no zone)
    complete: int | None = None
    failed: int | None = None
    retried: int | None = None
    ongoing: int | None = None
    queued: int | None = None  # arq's queue length as that worker last saw it

    @property
    def readable(self) -> bool:
        return any(v is not None for v in (self.complete, self.failed, self.retried,
                                           self.ongoing, self.queued))


@dataclass(frozen=True, slots=True)
class WorkerHealth:
    worker_id: str
    health: Health
    ttl_s: float | None  # what its key has left; None: the key has no expiry (not arq's)


def parse_health(value: bytes | str) -> Health:
    """arq's health-check value, field by field: a field that is missing or not a number is
    None, and garbage gives a Health with nothing readable, never an error."""
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    counts: dict[str, int | None] = {}
    for token in text.split():
        name, sep, number = token.partition("=")
        if sep and name in _HEALTH_FIELDS:
            try:
                counts[_HEALTH_FIELDS[name]] = int(number)
            except ValueError:
                counts[_HEALTH_FIELDS[name]] = None
    stamp = _HEALTH_STAMP.match(text)
    return Health(stamp.group(1) if stamp else None, counts.get("complete"),
                  counts.get("failed"), counts.get("retried"), counts.get("ongoing"),
                  counts.get("queued"))


def health_pattern(keys: Keys) -> str:
    """SCAN pattern of every worker's health key; the namespace's own glob characters (it may
    hold ``*``, ``?``, ``[``) are escaped so they match only themselves."""
    prefix = keys.arq_health_check("")
    return _GLOB_SPECIAL.sub(r"\\\1", prefix) + "*"


async def find_workers(redis: Redis, keys: Keys) -> list[str]:
    """The health keys there are now, by SCAN, sorted."""
    found = {as_text(k) async for k in redis.scan_iter(match=health_pattern(keys),
                                                       count=SCAN_COUNT)}
    return sorted(found)


async def read_health(redis: Redis, keys: Keys, names: Sequence[str]) -> list[WorkerHealth]:
    """Each health key's value and what its expiry has left, in one round trip. A key that is
    gone (expired: its worker stopped writing it) is left out."""
    if not names:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.get(name)
            pipe.pttl(name)
        replies = await pipe.execute()
    prefix = keys.arq_health_check("")
    workers = []
    for name, value, pttl in zip(names, replies[::2], replies[1::2], strict=True):
        if value is None or pttl == -2:
            continue
        ttl = None if pttl is None or pttl < 0 else pttl / 1000
        workers.append(WorkerHealth(name[len(prefix):], parse_health(value), ttl))
    return workers


class WorkerWatch:
    """The workers alive, refreshed each time: their keys are found by SCAN at most every
    ``rescan_s`` and read (GET, PTTL) every time. A SCAN walks the whole keyspace, which a big
    crawl makes millions of keys: once a second would cost Redis far more than the status.
    So a new worker shows within ``rescan_s``, one gone as soon as its key expires."""

    def __init__(self, keys: Keys, *, rescan_s: float = RESCAN_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.keys = keys
        self.rescan_s = rescan_s
        self.clock = clock
        self._names: list[str] = []
        self._rescan_at: float | None = None

    async def read(self, redis: Redis) -> list[WorkerHealth]:
        if self._rescan_at is None or self.clock() >= self._rescan_at:
            self._names = await find_workers(redis, self.keys)
            self._rescan_at = self.clock() + self.rescan_s
        workers = await read_health(redis, self.keys, self._names)
        self._names = [self.keys.arq_health_check(w.worker_id) for w in workers]
        return workers


Snapshot = tuple[dict[str, Any], list[WorkerHealth]]


def snapshot_reader(redis: Redis, keys: Keys, workers: WorkerWatch | None = None,
                    ) -> Callable[[], Awaitable[Snapshot]]:
    """What ``watch_loop`` reads: the status (one transaction), then the workers."""
    watch_workers = workers if workers is not None else WorkerWatch(keys)

    async def read() -> Snapshot:
        return await read_status(redis, keys), await watch_workers.read(redis)

    return read


def cluster_reader(cluster: Cluster) -> Callable[[], Awaitable[Snapshot]]:
    """``snapshot_reader`` over shards: the summed status, and the workers as the first shard
    that answers sees them (each worker writes its health check on every shard)."""
    watch_workers = WorkerWatch(cluster.keys)

    async def read() -> Snapshot:
        status = await cluster_status(cluster)
        failure: BaseException | None = None
        for shard in cluster.shards:
            try:
                return status, await watch_workers.read(shard.redis)
            except (RedisError, OSError) as exc:
                failure = exc
        assert failure is not None
        raise failure

    return read


@dataclass(frozen=True, slots=True)
class Frame:
    """One refresh: the latest figures read and, if the latest read failed, why."""

    now: float  # the watcher's clock (unix seconds) when drawn
    status: Mapping[str, Any] | None = None  # None until a read succeeded
    workers: Sequence[WorkerHealth] = ()
    read_at: float | None = None  # the watcher's clock when status was read
    problem: str | None = None  # one line: why the latest read failed


def watch_view(frame: Frame, *, where: str = "", namespace: str = "",
               max_workers: int = 20) -> RenderableType:
    """The live view of ``frame``: the crawl's figures, its workers (the first
    ``max_workers``), and the warnings (state lost, Redis unreachable) in red."""
    s = frame.status
    title = " · ".join(p for p in ("crawlfleet status", namespace, where) if p)
    parts: list[RenderableType] = []
    if s is None:
        parts.append(Text("no status read yet", style="dim"))
    else:
        parts.append(_figures(s, _redis_now(frame)))
        parts.append(_workers(frame.workers, max_workers))
        if s.get("state_lost"):
            lost_at = s.get("state_lost_at")
            when = f" at {_local(lost_at)}" if lost_at else ""
            parts.append(Text(f"state lost{when}: the frontier's state vanished from Redis "
                              "mid-crawl (a restart without persistence, or a flush); the "
                              "results are incomplete", style="bold red"))
    if frame.problem:
        stale = ""
        if s is not None and frame.read_at is not None:
            stale = (f" (figures above as of {_local(frame.read_at, zone=False)}, "
                     f"{_ago(frame.now - frame.read_at)})")
        parts.append(Text(f"{frame.problem}; trying again every {REFRESH_S:g} s{stale}",
                          style="bold red"))
    parts.append(Text(f"{_local(frame.now, zone=False)} · Ctrl-C to quit", style="dim"))
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def _figures(s: Mapping[str, Any], redis_now: float) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("crawl", s.get("crawl") or Text("none yet: nothing seeded in this namespace",
                                                 style="dim"))
    grid.add_row("state", _state(s, redis_now))
    grid.add_row("URLs", f"{s['seen']:,} seen · {s['pages']:,} pages · {s['failed']:,} failed"
                         f" · {s['skipped']:,} skipped")
    grid.add_row("frontier", f"{s['queued']:,} queued · {s['in_flight']:,} in flight"
                             f" · {s['quarantined']:,} quarantined")
    grid.add_row("pages/s", f"{s.get('pages_per_s_10s', 0.0):,.1f} (last 10 s) · "
                            f"{s['pages_per_s']:,.1f} (last minute)")
    grid.add_row("retries", f"{s['retries']:,} · {s['dead']:,} dead-lettered"
                            f" · {s.get('leases_expired', 0):,} leases expired")
    grid.add_row("hosts", f"{s['hosts_leased']:,} leased · {s['batches_waiting']:,} batches "
                          f"waiting for a worker · {s.get('events_unread', 0):,} events unread")
    grid.add_row("results", f"{s.get('results_in_redis', 0):,} in Redis, not yet drained")
    discarded = " · ".join(f"{label} {s.get(key, 0):,}"
                          for key, label in progress.DISCARD_LABELS.items())
    grid.add_row("links discarded", discarded)
    return grid


def _state(s: Mapping[str, Any], redis_now: float) -> Text:
    if s.get("state_lost"):
        return Text("state lost: results incomplete", style="bold red")
    finished_at = s.get("finished_at")
    if s.get("finished") and finished_at:
        return Text(f"finished at {_local(finished_at)} ({_ago(redis_now - finished_at)})",
                    style="green")
    return Text("running") if s.get("crawl") else Text("not started", style="dim")


def _workers(workers: Sequence[WorkerHealth], max_workers: int) -> RenderableType:
    if not workers:
        return Text("workers: none alive (no health key in this namespace)", style="yellow")
    readable = [w.health for w in workers if w.health.readable]
    running = sum(h.ongoing or 0 for h in readable)
    done = sum(h.complete or 0 for h in readable)
    table = Table(title=f"workers: {len(workers):,} alive · batches: {running:,} running, "
                        f"{done:,} done", title_justify="left", title_style="bold",
                  box=None, padding=(0, 2), show_edge=False)
    table.add_column("worker", overflow="fold", max_width=48)
    for name in ("running", "done", "failed", "expires in"):
        table.add_column(name, justify="right", no_wrap=True)
    for w in workers[:max_workers]:
        h = w.health
        ttl = "no expiry" if w.ttl_s is None else f"{w.ttl_s:.0f} s"
        if not h.readable:
            table.add_row(w.worker_id, "?", "?", "?", ttl)
            continue
        table.add_row(w.worker_id, _count(h.ongoing), _count(h.complete), _count(h.failed), ttl)
    if len(workers) > max_workers:
        table.add_row(Text(f"… and {len(workers) - max_workers:,} more", style="dim"))
    return table


def plain_line(frame: Frame) -> str:
    """One line per refresh for a pipe or a log: ``name=value`` pairs, the status's own key
    names, after the watcher's local time."""
    head = f"{_local(frame.now, zone=False)} status:"
    s = frame.status
    if frame.problem:
        return f"{head} {frame.problem}"
    if s is None:
        return f"{head} no status read yet"
    pairs: list[tuple[str, Any]] = [("crawl", s.get("crawl") or "none")]
    pairs += [(k, s.get(k, 0)) for k in ("seen", "pages", "failed", "skipped", "queued",
                                          "in_flight", "quarantined", "pages_per_s_10s",
                                          "pages_per_s", "retries", "dead", "hosts_leased",
                                          "batches_waiting", "results_in_redis")]
    pairs.append(("workers", len(frame.workers)))
    pairs.append(("batches_running", sum(w.health.ongoing or 0 for w in frame.workers)))
    pairs.append(("finished", "yes" if s.get("finished") else "no"))
    if s.get("finished") and s.get("finished_at"):
        finished_at = datetime.fromtimestamp(s["finished_at"]).astimezone()
        pairs.append(("finished_at", finished_at.isoformat(timespec="seconds")))
    if s.get("state_lost"):
        pairs.append(("state_lost", "yes"))
    return f"{head} " + " ".join(f"{k}={v}" for k, v in pairs)


async def watch_loop(read: Callable[[], Awaitable[Snapshot]], show: Callable[[Frame], None], *,
                     redis_url: str, clock: Callable[[], float] = time.time,
                     interval: float = REFRESH_S, read_timeout: float = READ_TIMEOUT_S,
                     stop: asyncio.Event | None = None,
                     until: Callable[[Frame], bool] | None = None) -> None:
    """Read, show, wait ``interval``, again, until ``stop`` is set or ``until(frame)`` says so.
    A failed read is shown (its message names ``redis_url`` redacted) with the last figures,
    and tried again next time. A refusal before any read succeeded raises RedisProblem."""
    stop = stop if stop is not None else asyncio.Event()
    loop = asyncio.get_running_loop()
    frame: Frame | None = None
    next_at = loop.time()
    while not stop.is_set():
        outcome = await _read_or_stop(read, stop, read_timeout)
        if outcome is None:
            return
        now = clock()
        if isinstance(outcome, BaseException):
            if is_refused(outcome) and (frame is None or frame.status is None):
                raise redis_problem(outcome, redis_url) from None
            last = frame if frame is not None else Frame(now)
            frame = Frame(now, last.status, last.workers, last.read_at,
                          str(redis_problem(outcome, redis_url)))
        else:
            status, workers = outcome
            frame = Frame(now, status, workers, now)
        show(frame)
        if until is not None and until(frame):
            return
        # A fixed cadence: a slow read does not push every later refresh back.
        next_at = max(next_at + interval, loop.time())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(next_at - loop.time(), 0.0))


async def _read_or_stop(read: Callable[[], Awaitable[Snapshot]], stop: asyncio.Event,
                        within_s: float) -> Snapshot | BaseException | None:
    """``read()``'s snapshot or its Redis error (no answer within ``within_s`` is one); None
    if ``stop`` was set first, so Ctrl-C never waits for a Redis that does not answer."""
    reading = asyncio.ensure_future(read())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({reading, stopping}, timeout=within_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
        if not reading.done():
            reading.cancel()
            await asyncio.wait({reading})  # let it close its connection; never raises
    if stop.is_set():
        if reading.done() and not reading.cancelled():
            reading.exception()  # retrieved, so asyncio does not warn of it at exit
        return None
    if reading.cancelled():
        return RedisTimeoutError(f"no answer within {within_s:g} s")
    exc = reading.exception()
    if exc is None:
        return reading.result()
    if isinstance(exc, (RedisError, OSError)):
        return exc
    raise exc  # a bug of ours: a traceback is the right answer


def watch(settings: Settings, *, stream: TextIO | None = None) -> int:
    """``crawlfleet status --watch`` until Ctrl-C or SIGTERM (exit 0)."""
    out = stream if stream is not None else sys.stdout
    keys = Keys(settings.namespace)
    where = settings.redis_where

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        if len(settings.shard_urls) > 1:
            cluster = Cluster.open(settings)
            try:
                await watch_loop(cluster_reader(cluster), show, redis_url=where, stop=stop)
            finally:
                await cluster.aclose()
            return
        redis = open_redis(settings.redis_url)
        try:
            await watch_loop(snapshot_reader(redis, keys), show,
                             redis_url=settings.redis_url, stop=stop)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()

    tty = _is_terminal(out)
    console = Console(file=out) if tty else None
    live: Live | None = None

    def show(frame: Frame) -> None:
        nonlocal live
        if console is None:
            out.write(plain_line(frame) + "\n")
            out.flush()
            return
        fits = max(console.size.height - _OTHER_ROWS, _MIN_WORKERS_SHOWN)
        view = watch_view(frame, where=where, namespace=settings.namespace, max_workers=fits)
        if live is None:
            # No refresh thread: each frame is drawn once, when it is read.
            live = Live(view, console=console, auto_refresh=False, transient=False,
                        redirect_stdout=False, redirect_stderr=False)
            live.start(refresh=True)
        else:
            live.update(view, refresh=True)

    try:
        asyncio.run(go())
    except KeyboardInterrupt:  # before the handlers were in place
        pass
    finally:
        if live is not None:
            live.stop()  # the last frame stays on screen
    return 0


def _redis_now(frame: Frame) -> float:
    """Now on Redis's clock (that of finished_at): the status's read_at moved on by the
    watcher's time since the read, so a skewed watcher still says how long ago."""
    s = frame.status or {}
    read_at = s.get("read_at")
    if read_at is None or frame.read_at is None:
        return frame.now
    return float(read_at) + (frame.now - frame.read_at)


def _count(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _ago(seconds: float) -> str:
    seconds = max(seconds, 0.0)
    return f"{seconds:.0f} s ago" if seconds < 60 else f"{progress.clock(seconds)} ago"


def _local(ts: float, *, zone: bool = True) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S" + (" %Z" if zone else ""), time.localtime(ts))


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") not in ("dumb", "unknown")
