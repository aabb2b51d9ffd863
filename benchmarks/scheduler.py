"""The frontier alone, no HTTP: backlog scaling, one scheduler for twenty workers, the seen set.

Usage::

    .venv/bin/python benchmarks/scheduler.py [--small] [--repeat 3] [--worker-rate PAGES_PER_S]
                                             [--write-docs [docs/benchmarks.md]]

Everything runs against ONE private ``redis-server`` started here on a free loopback port
(never the machine's 6379), through ``crawlfleet.common.frontier.Frontier``, i.e. the Lua
commands in ``common/commands/``. No HTTP, no test web: results and links are synthetic.

(a) backlog scaling
    The frontier is filled with 10,000 URLs over 1,000 hosts (10 a host), then with 1,000,000
    over 100,000 hosts (pipelined ``admit`` calls of ``ADMIT_CHUNK`` URLs), and the same steps
    are timed on each: ``dispatch`` (batch size 20, at most 32 batches waiting, as the
    scheduler's defaults), a worker's ``claim`` and its ``progress`` calls (the first marks 8
    URLs, the next reports them with their links and marks the rest, the final one reports the
    rest and releases the host; 5 new and 20 already-seen links a page), and ``expire`` with no
    expired lease (32 leases held) and with expired ones (claimed with a lease that is over at
    once). Each rate is Redis round trips and Lua time as a client sees them; the ratio
    large/small says how the frontier scales with its backlog (target >= 0.8). Each step's
    rate is the median of ``--repeat`` runs (default 3), small and large taking turns, so that
    the machine's drift spreads over both: one run of a step is a fraction of a second. For
    claim + progress it also splits the time inside Redis by what ran (INFO commandstats: each
    command its scripts called, and the Lua interpreter's own share), so that what grows with
    the backlog shows by name.
(b) one scheduler for twenty workers
    A real ``crawlfleet scheduler`` process drives a synthetic crawl: hosts start from their
    root, every page has 5 new and 20 already-seen links, a per-host budget ends each host at
    ``pages per host``, and synthetic workers in this process (32 job slots, polling arq's
    queue every 10 ms) run each host's turn the way ``workers/batch.py`` does: claim, then
    progress calls of 8 pages that report, mark, admit and refill. Workers admit the links
    themselves, so the scheduler's work per page is its dispatch, expire and finish calls per
    host turn and its idle loop. Its CPU (``/proc``, ns) per page gives how many workers one
    scheduler core feeds at a worker's page rate: ``--worker-rate``, or by default the rate of
    one busy worker core measured by ``benchmarks/throughput.py --write-docs`` (1000 / the
    'many' fleet of 1's worker CPU-ms per page, from docs/benchmarks.json); target >= 20.
(c) the seen set over 1,000,000 URLs
    1,000,000 random 64-bit fingerprints go straight into the seen buckets, split exactly as
    lib.lua splits them (``Keys.seen_slot`` with ``seen_digits(1_000_000)`` digits), by
    pipelined SADDs. Reported: bytes per URL from INFO memory used_memory (after minus before)
    and from the sum of MEMORY USAGE over the buckets, the bucket count, the largest bucket and
    how many buckets are not intsets (OBJECT ENCODING); target <= 12 B per URL.

``--small`` runs a quick version (2,000 / 20,000 URLs in (a), 100 hosts in (b), 50,000
fingerprints in (c)). ``--write-docs`` puts the figures into their own section of
docs/benchmarks.md (``benchmarks/throughput.py --write-docs`` keeps that section).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from crawlfleet.common.frontier import (
    ADMIT_CHUNK,
    PAGE,
    Admission,
    Frontier,
    Limits,
    Progress,
    StoredResult,
)
from crawlfleet.common.keys import Keys, seen_digits
from crawlfleet.common.messages import HostBatch, PageResult, QueuedURL, batch_from_job, encode

# The sibling script lends its processes, Redis, CPU meter and docs helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import docs_section
from benchmarks import throughput as tp

BATCH_SIZE = 20  # the scheduler's default CRAWLFLEET_BATCH_SIZE
MAX_WAITING = 32  # its default CRAWLFLEET_DISPATCH_AHEAD
MARK_AHEAD = 8  # workers/batch.py MIN_MARK_AHEAD: pages per progress call
LEASE_SIZE = 20  # what a worker asks its lease to hold (batch size, per-host concurrency 2)
NEW_LINKS, DUP_LINKS = 5, 20  # links of a synthetic page
SLOTS = 32  # synthetic worker job slots in (b): two workers' worth
POLL_S = 0.01  # (b) synthetic workers poll arq's queue this often
TARGET_SCALING = 0.8
TARGET_WORKERS = 20
TARGET_SEEN_BYTES = tp.TARGET_SEEN_BYTES
FIGURES = tp.DOCS.with_suffix(".json")


def url_of(host: int, n: int) -> tuple[str, str]:
    name = f"h{host}.bench"
    return f"http://{name}/p/{n}", name


def page_result(entry: QueuedURL) -> bytes:
    return encode(PageResult(
        url=entry.url, final_url=None, status=200, content_type="text/html", depth=entry.depth,
        title="a synthetic page", links=NEW_LINKS + DUP_LINKS, bytes=5000, elapsed_ms=20.0,
        fetched_at=time.time(), error=None, worker="benchmark"))


class Frontiers:
    """One namespace on the private Redis, and its open crawl."""

    def __init__(self, client: Redis, namespace: str) -> None:
        self.client: Any = client
        self.keys = Keys(namespace)
        self.frontier = Frontier(client, self.keys)
        self.crawl = ""
        self.digits = 3

    async def open(self, expected_urls: int) -> None:
        marker = await self.frontier.open_crawl(expected_urls=expected_urls)
        self.crawl, self.digits = marker.id, marker.seen_digits

    async def admit_all(self, admissions: Sequence[Admission], limits: Limits) -> int:
        """Pipelined admit calls of ADMIT_CHUNK URLs, 20 calls a round trip."""
        admitted = 0
        step = ADMIT_CHUNK * 20
        for start in range(0, len(admissions), step):
            async with self.client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + step, len(admissions)), ADMIT_CHUNK):
                    await self.frontier.admit_in(pipe, self.crawl,
                                                 admissions[i:i + ADMIT_CHUNK], limits)
                admitted += self.frontier.answers(await pipe.execute())
        return admitted

    async def waiting_batches(self) -> list[tuple[str, HostBatch]]:
        """The batches dispatch put in arq's queue (job id, batch), as a worker reads them."""
        out = []
        for raw_id in await self.client.zrange(self.keys.arq_queue, 0, -1):
            job_id = raw_id.decode()
            job = await self.client.get(self.keys.arq_job(job_id))
            if job is not None:
                out.append((job_id, batch_from_job(json.loads(job)["a"][0])))
        return out


# --------------------------------------------------------------------------------------------
# (a) backlog scaling
# --------------------------------------------------------------------------------------------


@dataclass
class Scaling:
    urls: int
    hosts: int
    fill_s: float = 0.0
    dispatch_s: float = 0.0
    batches: int = 0
    dispatched_urls: int = 0
    work_s: float = 0.0  # claim + progress
    pages: int = 0
    calls: int = 0
    idle_expire_s: float = 0.0
    idle_expires: int = 0
    expire_s: float = 0.0
    expired: int = 0
    requeued: int = 0
    backlog_after: int = 0
    # The same steps' time inside Redis (INFO commandstats: EVALSHA usec), in seconds.
    lua: dict[str, float] = field(default_factory=dict)
    # claim + progress: the commands its scripts ran, name -> usec (commandstats).
    inner: dict[str, int] = field(default_factory=dict)

    def inner_us_per_page(self) -> dict[str, float]:
        """µs per page inside claim + progress: each command its scripts ran, and 'Lua
        itself' (EVALSHA time less those commands: the interpreter, arguments, replies)."""
        if not self.pages:
            return {}
        out = {name: usec / self.pages for name, usec in self.inner.items()}
        out[LUA_ITSELF] = self.lua.get("claim + progress", 0.0) * 1e6 / self.pages - sum(
            out.values())
        return out

    def counts(self) -> dict[str, tuple[str, float, float]]:
        """step -> (unit, units, client seconds)."""
        return {
            "fill (admit)": ("URLs", self.urls, self.fill_s),
            "dispatch": ("batches", self.batches, self.dispatch_s),
            "claim + progress": ("pages", self.pages, self.work_s),
            "expire, none expired": ("calls", self.idle_expires, self.idle_expire_s),
            "expire, expired leases": ("leases", self.expired, self.expire_s),
        }

    def rates(self, *, inside_redis: bool = False) -> dict[str, float]:
        out = {}
        for step, (_, units, seconds) in self.counts().items():
            spent = self.lua.get(step, 0.0) if inside_redis else seconds
            out[step] = units / spent if spent > 0 else 0.0
        return out


LUA_ITSELF = "Lua itself"
# What a timed block sends itself: the scripts, the Timer's own reads, a script's reload.
NOT_INNER = ("cmdstat_evalsha", "cmdstat_info", "cmdstat_script|load")


def lua_seconds(stats: dict[str, Any]) -> float:
    """Seconds Redis has spent in EVALSHA since the last CONFIG RESETSTAT."""
    return int(stats.get("cmdstat_evalsha", {}).get("usec", 0)) / 1e6


class Timer:
    """Client-side and inside-Redis time of the calls made under ``timed(step)``."""

    def __init__(self, client: Any, scaling: Scaling) -> None:
        self.client, self.scaling = client, scaling

    @contextlib.asynccontextmanager
    async def timed(self, step: str) -> AsyncIterator[None]:
        before = await self.client.info("commandstats")
        t = time.perf_counter()
        yield
        elapsed = time.perf_counter() - t
        after = await self.client.info("commandstats")
        lua = lua_seconds(after) - lua_seconds(before)
        self.scaling.lua[step] = self.scaling.lua.get(step, 0.0) + lua
        s = self.scaling
        if step == "claim + progress":
            for name, stat in after.items():
                if name in NOT_INNER:
                    continue
                usec = stat["usec"] - before.get(name, {"usec": 0})["usec"]
                if usec:
                    name = name.removeprefix("cmdstat_")
                    s.inner[name] = s.inner.get(name, 0) + usec
        if step == "fill (admit)":
            s.fill_s += elapsed
        elif step == "dispatch":
            s.dispatch_s += elapsed
        elif step == "claim + progress":
            s.work_s += elapsed
        elif step == "expire, none expired":
            s.idle_expire_s += elapsed
        else:
            s.expire_s += elapsed


class SyntheticLinks:
    """5 new links (on the page's host) and 20 already seen ones (anywhere) per page."""

    def __init__(self, hosts: int, per_host: int, seed: int = 7) -> None:
        self.rng = random.Random(seed)
        self.hosts, self.per_host = hosts, per_host
        self.fresh = 0

    def of(self, entry: QueuedURL, host: str) -> list[Admission]:
        links = []
        for _ in range(NEW_LINKS):
            self.fresh += 1
            links.append(Admission.of(f"http://{host}/new/{self.fresh}", host, entry.depth + 1))
        for _ in range(DUP_LINKS):
            url, name = url_of(self.rng.randrange(self.hosts), self.rng.randrange(self.per_host))
            links.append(Admission.of(url, name, entry.depth + 1))
        return links


async def one_turn(f: Frontiers, job_id: str, batch: HostBatch, links: SyntheticLinks,
                   limits: Limits, timer: Timer) -> None:
    """claim, mark 8, report 8 + mark the rest, report the rest (final): only the Redis calls
    are timed, the synthetic results and links are made before each."""
    scaling = timer.scaling
    async with timer.timed("claim + progress"):
        claim = await f.frontier.claim(batch, lease_seconds=60.0, job_id=job_id)
    if claim is None:
        raise tp.BenchError(f"claim of {job_id} was stale")
    urls = claim.urls
    groups = [urls[:MARK_AHEAD], urls[MARK_AHEAD:]]
    steps = [Progress(marks=[e.fp for e in groups[0]])]
    for i, group in enumerate(groups):
        results = [StoredResult(e.fp, PAGE, page_result(e)) for e in group]
        admissions = [a for e in group for a in links.of(e, batch.host)]
        last = i == len(groups) - 1
        marks = [] if last else [e.fp for e in groups[i + 1]]
        steps.append(Progress(results=results, marks=marks, admissions=admissions, final=last))
    for step in steps:
        async with timer.timed("claim + progress"):
            await f.frontier.progress(batch, step, limits)
        scaling.calls += 1
    scaling.pages += len(urls)
    await f.client.delete(f.keys.arq_job(job_id))  # as arq does when a job ends


async def measure_scaling(client: Any, urls: int, hosts: int, pages: int) -> Scaling:
    await client.flushdb()
    f = Frontiers(client, f"scale{uuid.uuid4().hex[:8]}")
    await f.open(1_000_000)
    limits = Limits()
    per_host = urls // hosts
    scaling = Scaling(urls, hosts)
    timer = Timer(client, scaling)
    await client.config_resetstat()
    admissions = [Admission.of(*url_of(i // per_host, i % per_host), 0) for i in range(urls)]
    async with timer.timed("fill (admit)"):
        admitted = await f.admit_all(admissions, limits)
    del admissions
    if admitted != urls:
        raise tp.BenchError(f"filling the frontier admitted {admitted} of {urls} URLs")
    links = SyntheticLinks(hosts, per_host)
    while scaling.pages < pages:
        async with timer.timed("dispatch"):
            n = await f.frontier.dispatch(f.crawl, batch_size=BATCH_SIZE,
                                          max_waiting=MAX_WAITING)
        scaling.batches += n
        if n == 0:
            raise tp.BenchError("dispatch found no ready host")
        for job_id, batch in await f.waiting_batches():
            before = scaling.pages
            await one_turn(f, job_id, batch, links, limits, timer)
            scaling.dispatched_urls += scaling.pages - before
    # expire with no expired lease: 32 leases held, none over.
    held = await f.frontier.dispatch(f.crawl, batch_size=BATCH_SIZE, max_waiting=MAX_WAITING)
    for job_id, batch in await f.waiting_batches():
        await f.frontier.claim(batch, lease_seconds=600, job_id=job_id)
    calls = 200 if pages <= 1000 else 1000
    async with timer.timed("expire, none expired"):
        for _ in range(calls):
            e = await f.frontier.expire(f.crawl, max_losses=3, claim_timeout=60.0)
            if e.leases or e.unclaimed:
                raise tp.BenchError(f"expire found {e} with {held} leases held, none over")
    scaling.idle_expires = calls
    # expire with expired leases: batches claimed with a lease that is over at once.
    rounds = 3 if pages <= 1000 else 10
    for _ in range(rounds):
        await f.frontier.dispatch(f.crawl, batch_size=BATCH_SIZE, max_waiting=MAX_WAITING * 2)
        for job_id, batch in await f.waiting_batches():
            await f.frontier.claim(batch, lease_seconds=-1.0, job_id=job_id)
    while True:
        async with timer.timed("expire, expired leases"):
            e = await f.frontier.expire(f.crawl, max_losses=3, claim_timeout=60.0)
        if not e.leases:
            break
        scaling.expired += e.leases
        scaling.requeued += e.requeued
    scaling.backlog_after = int(await f.client.hget(f.keys.stats, "queued") or 0)
    return scaling


# --------------------------------------------------------------------------------------------
# (b) one scheduler for twenty workers
# --------------------------------------------------------------------------------------------


@dataclass
class SchedulerRun:
    hosts: int
    pages_per_host: int
    pages: int = 0
    turns: int = 0
    calls: int = 0
    elapsed_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    leases_expired: int = 0

    def ms_per_page(self, name: str) -> float:
        return 1000 * self.cpu.get(name, 0.0) / self.pages if self.pages else 0.0


class TurnLinks:
    """Links of a page in (b): 5 new on its host, 20 known URLs of its host."""

    def __init__(self) -> None:
        self.known: dict[str, list[str]] = {}
        self.fresh = 0
        self.rng = random.Random(11)

    def of(self, entry: QueuedURL, host: str) -> list[Admission]:
        known = self.known.setdefault(host, [])
        known.append(entry.url)
        links = []
        for _ in range(NEW_LINKS):
            self.fresh += 1
            links.append(Admission.of(f"http://{host}/n/{self.fresh}", host, entry.depth + 1))
        for _ in range(DUP_LINKS):
            links.append(Admission.of(self.rng.choice(known), host, entry.depth + 1))
        return links


async def worker_turn(f: Frontiers, job_id: str, batch: HostBatch, links: TurnLinks,
                      limits: Limits, run: SchedulerRun) -> None:
    """One host's turn as workers/batch.py runs it, fetches taking no time."""
    claim = await f.frontier.claim(batch, lease_seconds=60.0, job_id=job_id)
    if claim is None:
        return
    todo = deque(claim.urls)
    marked = list(todo)[:MARK_AHEAD]
    outcome = await f.frontier.progress(batch, Progress(marks=[e.fp for e in marked]), limits)
    run.calls += 1
    while marked:
        for _ in marked:
            todo.popleft()
        results = [StoredResult(e.fp, PAGE, page_result(e)) for e in marked]
        admissions = [a for e in marked for a in links.of(e, batch.host)]
        run.pages += len(marked)
        nxt = list(todo)[:MARK_AHEAD]
        want = max(0, LEASE_SIZE - len(todo))
        outcome = await f.frontier.progress(batch, Progress(
            results=results, admissions=admissions, marks=[e.fp for e in nxt], want=want),
            limits)
        run.calls += 1
        if not outcome.lease_held:
            raise tp.BenchError(f"lease of {batch.host} lost")
        todo.extend(outcome.refill)
        marked = list(todo)[:MARK_AHEAD]
        if len(marked) > len(nxt):  # refilled URLs need their marks too
            extra = marked[len(nxt):]
            await f.frontier.progress(batch, Progress(marks=[e.fp for e in extra]), limits)
            run.calls += 1
    await f.frontier.progress(batch, Progress(final=True), limits)
    run.calls += 1
    run.turns += 1
    await f.client.delete(f.keys.arq_job(job_id))


async def synthetic_workers(f: Frontiers, run: SchedulerRun, limits: Limits,
                            deadline: float) -> None:
    """Job slots fed from arq's queue until every page of the crawl is done."""
    links = TurnLinks()
    running: set[asyncio.Task[None]] = set()
    taken: set[str] = set()
    goal = run.hosts * run.pages_per_host
    while run.pages < goal or running:
        if time.monotonic() > deadline:
            raise tp.BenchError(f"(b) did not finish: {run.pages} of {goal} pages")
        for task in [t for t in running if t.done()]:
            running.discard(task)
            task.result()  # a failed turn fails the benchmark
        free = SLOTS - len(running)
        started = 0
        if free > 0 and run.pages < goal:
            ids = await f.client.zrange(f.keys.arq_queue, 0, free + len(taken) - 1)
            for raw_id in ids:
                job_id = raw_id.decode()
                if job_id in taken or len(running) >= SLOTS:
                    continue
                job = await f.client.get(f.keys.arq_job(job_id))
                if job is None:
                    continue
                taken.add(job_id)
                batch = batch_from_job(json.loads(job)["a"][0])
                running.add(asyncio.create_task(worker_turn(f, job_id, batch, links, limits,
                                                            run)))
                started += 1
        if not started:
            await asyncio.sleep(POLL_S)
        taken &= {raw.decode() for raw in await f.client.zrange(f.keys.arq_queue, 0, -1)}


async def wait_leading(client: Any, keys: Keys, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + tp.STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise tp.BenchError(f"crawlfleet scheduler exited with {proc.returncode}")
        if await tp.scheduler_leads(client, keys):
            return
        await asyncio.sleep(0.05)
    raise tp.BenchError("crawlfleet scheduler did not start leading")


async def measure_scheduler(procs: tp.Processes, server: tp.RedisServer, workdir: Path,
                            hosts: int, pages_per_host: int) -> SchedulerRun:
    client: Any = Redis.from_url(server.url)
    try:
        await client.flushdb()
        namespace = f"sched{uuid.uuid4().hex[:8]}"
        f = Frontiers(client, namespace)
        await f.open(hosts * pages_per_host)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
        env |= {"CRAWLFLEET_REDIS_URL": server.url, "CRAWLFLEET_NAMESPACE": namespace,
                "CRAWLFLEET_LOG_LEVEL": "warning", "CRAWLFLEET_LOG_FORMAT": "json",
                "CRAWLFLEET_MAX_PAGES_PER_HOST": str(pages_per_host),
                "CRAWLFLEET_EXPECTED_URLS": str(hosts * pages_per_host)}
        with (workdir / "scheduler.log").open("wb") as log:
            proc = procs.start([tp.CRAWLFLEET, "scheduler"], env=env, stdout=log, stderr=log)
        await wait_leading(client, f.keys, proc)
        limits = Limits(max_pages_per_host=pages_per_host)
        run = SchedulerRun(hosts, pages_per_host)
        meter = tp.CpuMeter({"scheduler": [proc.pid], "redis-server": [server.proc.pid]})
        meter.start()
        started = time.monotonic()
        roots = [Admission.of(f"http://h{i}.bench/", f"h{i}.bench", 0) for i in range(hosts)]
        await f.admit_all(roots, limits)
        await synthetic_workers(f, run, limits, started + tp.CRAWL_TIMEOUT_S)
        run.elapsed_s = time.monotonic() - started
        cpu, _ = meter.stop()
        run.cpu = {"scheduler": cpu["scheduler"], "redis-server": cpu["redis-server"],
                   "synthetic workers (this process)": cpu[tp.CpuMeter.SELF]}
        run.leases_expired = int(await client.hget(f.keys.stats, "leases_expired") or 0)
        if procs.stop(proc) not in (0, None):
            raise tp.BenchError(f"crawlfleet scheduler exited with {proc.returncode}; see "
                                f"{workdir / 'scheduler.log'}")
        return run
    finally:
        await client.aclose()


def worker_rates(override: float | None) -> list[tuple[str, float]]:
    """(what, pages/s) of one worker: --worker-rate, else throughput.py's figures."""
    if override:
        return [("--worker-rate", override)]
    rates = []
    try:
        figures = json.loads(FIGURES.read_text())
        row = figures["shapes"]["many"]["rows"][f"{tp.FLEET_PREFIX}1"]
        cpu_ms = float(row["cpu_ms_per_page"]["workers"])
        rates.append((f"one busy worker core: 1000 / {cpu_ms:.2f} worker CPU-ms per page "
                      f"('many', fleet of 1, {FIGURES.name} of {figures['date']})",
                      1000 / cpu_ms))
        rates.append((f"the 'many' fleet of 1's measured rate ({FIGURES.name})",
                      float(row["pages_per_s"])))
    except (OSError, ValueError, KeyError, ZeroDivisionError):
        rates.append(("ASSUMED, not measured: a worker at the 1.2 CPU-ms/page target "
                      f"(no {FIGURES} yet: run benchmarks/throughput.py --write-docs)",
                      1000 / 1.2))
    return rates


# --------------------------------------------------------------------------------------------
# (c) the seen set
# --------------------------------------------------------------------------------------------


@dataclass
class SeenSet:
    urls: int
    digits: int
    used_memory_bytes: int = 0
    usage_bytes: int = 0
    buckets: int = 0
    largest: int = 0
    not_intset: int = 0
    encodings: dict[str, int] = field(default_factory=dict)
    load_s: float = 0.0


async def measure_seen(client: Any, urls: int) -> SeenSet:
    await client.flushdb()
    keys = Keys(f"seen{uuid.uuid4().hex[:8]}")
    digits = seen_digits(urls)
    result = SeenSet(urls, digits)
    rng = random.Random(3)
    buckets: dict[str, list[int]] = {}
    for _ in range(urls):
        key, member = keys.seen_slot(f"{rng.getrandbits(64):016x}", digits)
        buckets.setdefault(key, []).append(member)
    before = int((await client.info("memory"))["used_memory"])
    t = time.perf_counter()
    items = list(buckets.items())
    for start in range(0, len(items), 256):
        async with client.pipeline(transaction=False) as pipe:
            for key, members in items[start:start + 256]:
                pipe.sadd(key, *members)
            await pipe.execute()
    result.load_s = time.perf_counter() - t
    result.used_memory_bytes = int((await client.info("memory"))["used_memory"]) - before
    encodings: dict[str, int] = {}
    for start in range(0, len(items), 512):
        async with client.pipeline(transaction=False) as pipe:
            for key, _ in items[start:start + 512]:
                pipe.memory_usage(key, samples=0)
                pipe.scard(key)
                pipe.object("encoding", key)
            replies = await pipe.execute()
        for usage, size, encoding in zip(replies[::3], replies[1::3], replies[2::3],
                                          strict=True):
            result.usage_bytes += int(usage or 0)
            result.largest = max(result.largest, int(size))
            name = encoding.decode() if isinstance(encoding, bytes) else str(encoding)
            encodings[name] = encodings.get(name, 0) + 1
    result.buckets = len(items)
    result.encodings = encodings
    result.not_intset = sum(n for name, n in encodings.items() if name != "intset")
    await client.flushdb()
    return result


# --------------------------------------------------------------------------------------------
# Report, docs, main
# --------------------------------------------------------------------------------------------


@dataclass
class Results:
    # (a): the runs of each backlog size (their counts of batches, pages... are the same in all)
    small_runs: list[Scaling] = field(default_factory=list)
    large_runs: list[Scaling] = field(default_factory=list)
    scheduler: SchedulerRun | None = None
    rates: list[tuple[str, float]] = field(default_factory=list)
    seen: SeenSet | None = None


def met(ok: bool) -> str:
    return "met" if ok else "NOT MET"


def median_rates(runs: list[Scaling], *, inside_redis: bool = False) -> dict[str, float]:
    """Each step's median rate over the runs."""
    per_run = [run.rates(inside_redis=inside_redis) for run in runs]
    return {step: statistics.median(rates[step] for rates in per_run) for step in per_run[0]}


def report_lines(r: Results) -> list[str]:
    lines = []
    if r.small_runs and r.large_runs:
        s, big = r.small_runs[0], r.large_runs[0]
        lines.append(f"(a) backlog scaling: {s.urls:,} URLs / {s.hosts:,} hosts vs "
                     f"{big.urls:,} / {big.hosts:,} (target: large/small >= "
                     f"{TARGET_SCALING:g}); medians of {len(r.small_runs)} runs of each")
        lines.append(f"  {'per second':<34}{'as the client sees it':^36}"
                     f"{'inside Redis (EVALSHA time)':^36}")
        lines.append(f"  {'':<34}" + f"{'small':>11}{'large':>11}{'large/small':>14}" * 2)
        client = (median_rates(r.small_runs), median_rates(r.large_runs))
        inside = (median_rates(r.small_runs, inside_redis=True),
                  median_rates(r.large_runs, inside_redis=True))
        for step, (unit, _, _) in s.counts().items():
            cells = []
            for small_rates, large_rates in (client, inside):
                ratio = large_rates[step] / small_rates[step] if small_rates[step] else 0.0
                cells.append(f"{small_rates[step]:>11,.0f}{large_rates[step]:>11,.0f}"
                             f"{ratio:>14.2f}")
            ratio = inside[1][step] / inside[0][step] if inside[0][step] else 0.0
            judged = "" if step.startswith("fill") else f"  {met(ratio >= TARGET_SCALING)}"
            lines.append(f"  {step + ', ' + unit:<34}{''.join(cells)}{judged}")
        lines.append("  (judged inside Redis: the client's figures add a round trip each, "
                     "the same at any backlog)")
        lines += inner_lines(r.small_runs, r.large_runs)
        for x in (s, big):
            lines.append(
                f"  {x.urls:>9,} URLs: {x.batches} batches of {x.dispatched_urls / x.batches:.1f}"
                f" URLs, {x.pages} pages in {x.calls} progress calls "
                f"({x.pages / x.calls:.1f} pages a call), {x.expired} expired leases "
                f"({x.requeued} URLs requeued); {x.backlog_after:,} URLs queued at the end")
    if r.scheduler:
        b = r.scheduler
        sched_ms = b.ms_per_page("scheduler")
        lines.append(f"(b) one scheduler: {b.hosts} hosts x {b.pages_per_host} pages, "
                     f"{b.pages} pages in {b.turns} host turns in {b.elapsed_s:.1f} s "
                     f"({b.pages / b.elapsed_s:,.0f} pages/s, {b.calls} progress calls, "
                     f"{b.leases_expired} leases expired)")
        lines.append("  CPU ms per page: " + ", ".join(
            f"{name} {b.ms_per_page(name):.4f}" for name in b.cpu))
        pages_per_core = 1000 / sched_ms if sched_ms else float("inf")
        lines.append(f"  one scheduler core handles {pages_per_core:,.0f} pages/s; workers it "
                     f"feeds (target >= {TARGET_WORKERS}):")
        for i, (what, rate) in enumerate(r.rates):
            workers = pages_per_core / rate
            judged = f"  {met(workers >= TARGET_WORKERS)}" if i == 0 else ""
            lines.append(f"    {workers:7.1f} workers at {rate:,.0f} pages/s: {what}{judged}")
    if r.seen:
        c = r.seen
        per_url = c.usage_bytes / c.urls
        lines.append(f"(c) seen set: {c.urls:,} random fingerprints, {c.digits} hex digits per "
                     f"bucket key ({c.buckets:,} buckets, largest {c.largest} members, "
                     f"{c.not_intset} not intset; encodings {c.encodings}; loaded in "
                     f"{c.load_s:.1f} s)")
        lines.append(f"  used_memory: {c.used_memory_bytes / c.urls:.2f} B per URL; MEMORY "
                     f"USAGE of the buckets: {per_url:.2f} B per URL (target <= "
                     f"{TARGET_SEEN_BYTES:g}: {met(per_url <= TARGET_SEEN_BYTES)})")
    return lines


def inner_lines(small: list[Scaling], large: list[Scaling], top: int = 6) -> list[str]:
    """Where claim + progress's time inside Redis goes at each size: what grows with the
    backlog. Medians over the runs of µs per page."""
    def medians(runs: list[Scaling]) -> dict[str, float]:
        per_run = [run.inner_us_per_page() for run in runs]
        names = {name for figures in per_run for name in figures}
        return {n: statistics.median(f.get(n, 0.0) for f in per_run) for n in names}

    lo, hi = medians(small), medians(large)
    if not lo or not hi:
        return []
    total_lo, total_hi = sum(lo.values()), sum(hi.values())
    lines = [f"  claim + progress inside Redis, µs per page: {total_lo:.1f} small, "
             f"{total_hi:.1f} large; by what ran (INFO commandstats; most added first):"]
    names = sorted(hi, key=lambda n: hi[n] - lo.get(n, 0.0), reverse=True)
    shown = names[:top] if LUA_ITSELF in names[:top] else [*names[:top - 1], LUA_ITSELF]
    for name in shown:
        a, b = lo.get(name, 0.0), hi[name]
        lines.append(f"    {name:<14}{a:>8.1f}{b:>8.1f}  ({b - a:+.1f})")
    rest = [n for n in names if n not in shown]
    a, b = sum(lo.get(n, 0.0) for n in rest), sum(hi[n] for n in rest)
    lines.append(f"    {'the others':<14}{a:>8.1f}{b:>8.1f}  ({b - a:+.1f})")
    return lines


def write_docs(path: Path, lines: list[str], argv: list[str]) -> None:
    block = "\n".join([
        tp.SCHEDULER_BEGIN,
        "## The frontier alone: `benchmarks/scheduler.py`",
        "",
        "Written by `benchmarks/scheduler.py --write-docs` (measured, not typed in).",
        "",
        f"* date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"* command: `{shlex.join(['python', 'benchmarks/scheduler.py', *argv])}`",
        *(f"* {fact}" for fact in tp.machine_facts()),
        "",
        "```",
        *lines,
        "```",
        tp.SCHEDULER_END,
    ])
    docs_section.replace(path, tp.SCHEDULER_BEGIN, tp.SCHEDULER_END, block,
                         new_file_head="# Benchmarks\n\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="The frontier alone (no HTTP): backlog scaling, "
                                "scheduler CPU per page, the seen set. See the docstring.")
    p.add_argument("--small", action="store_true", help="a quick version")
    p.add_argument("--repeat", type=int, default=3,
                   help="(a) runs of each backlog size, taking turns (default 3)")
    p.add_argument("--worker-rate", type=float, default=None, metavar="PAGES_PER_S",
                   help="a worker's page rate for (b) (default: from docs/benchmarks.json)")
    p.add_argument("--pages-per-host", type=int, default=None,
                   help="(b) pages per host (default 50; --small 20)")
    p.add_argument("--write-docs", nargs="?", const=str(tp.DOCS), default=None, metavar="PATH",
                   help=f"write the figures into their section of PATH (default {tp.DOCS})")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary log folder")
    return p


async def measure_all(args: argparse.Namespace, procs: tp.Processes, server: tp.RedisServer,
                      workdir: Path) -> Results:
    small = args.small
    results = Results()
    client: Any = Redis.from_url(server.url)
    try:
        sizes = ((2_000, 200), (20_000, 2_000)) if small else ((10_000, 1_000),
                                                              (1_000_000, 100_000))
        pages = 500 if small else 3_000
        runs: list[list[Scaling]] = [[], []]
        for i in range(1, args.repeat + 1):
            for size, (urls, hosts) in enumerate(sizes):
                print(f"(a) run {i}: filling the frontier with {urls:,} URLs over {hosts:,} "
                      "hosts ...", file=sys.stderr, flush=True)
                runs[size].append(await measure_scaling(client, urls, hosts, pages))
        results.small_runs, results.large_runs = runs
        print("(c) the seen set ...", file=sys.stderr, flush=True)
        results.seen = await measure_seen(client, 50_000 if small else 1_000_000)
    finally:
        await client.aclose()
    hosts = 100 if small else 1_000
    per_host = args.pages_per_host or (20 if small else 50)
    print(f"(b) crawlfleet scheduler and synthetic workers: {hosts} hosts x {per_host} pages"
          " ...", file=sys.stderr, flush=True)
    results.scheduler = await measure_scheduler(procs, server, workdir, hosts, per_host)
    results.rates = worker_rates(args.worker_rate)
    return results


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat must be at least 1")
    began = time.monotonic()
    with tp.benchmark_processes() as procs, tp.workspace(args.keep_logs) as workdir:
        try:
            server = tp.start_redis(procs, workdir)
            results = asyncio.run(measure_all(args, procs, server, workdir))
        finally:
            procs.stop_all()
    lines = report_lines(results)
    lines += tp.machine_facts()[:1]
    lines.append(f"load average now: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(lines))
    if args.write_docs:
        write_docs(Path(args.write_docs), lines, argv)
        print(f"wrote its section of {args.write_docs}")
    print(f"(benchmark wall time {time.monotonic() - began:.0f} s; one run of each part)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
