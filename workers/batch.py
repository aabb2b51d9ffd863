"""One host's turn: pacing, robots.txt, fetches, retries, progress calls, the lease.

This is the work of one arq job (``workers/worker.py`` wires it into arq). Fetching is
``workers/fetch.py``, parsing ``workers/parse.py``, a fetch's result ``workers/results.py``,
link filtering ``workers/links.py``, what happens to each URL ``workers/page.py``; every
change to the frontier goes through ``common/frontier.py``.

The work is continuous: one ``progress.lua`` call every few pages reports what is done (with
the links it found), marks the next fetches as in flight, and refills the lease from the host
queue, so a host is crawled at its limit with no gap while its queue has URLs and its turn lasts
(``CRAWLFLEET_HOST_TURN_SECONDS``; after ``CRAWLFLEET_HOST_TURN_PAGES`` it gives way to other
ready hosts).

Faults are sorted by side. A page's own trouble (a timeout, a 404, a hostile body) is that
page's result. The crawler's trouble (Redis answering BUSY, OOM, READONLY, LOADING, or not at
all; a bug) never becomes a page result: the turn stops fetching, hands its unfinished URLs back
to the host queue with a backoff, and ends with a final call whatever raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from typing import Any

import aiohttp
from redis.exceptions import RedisError

from crawlfleet.common.cluster import Cluster, deliver
from crawlfleet.common.connections import retry_while_unavailable
from crawlfleet.common.frontier import (
    ADMIT_CHUNK,
    Admission,
    Claim,
    Frontier,
    Limits,
    Progress,
    ProgressOutcome,
    StateLost,
    StoredResult,
)
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.messages import HostBatch, QueuedURL
from crawlfleet.common.settings import Settings

from .fetch import CrawlerFault
from .links import LinkFilter
from .pacing import Pacer
from .page import PACING_MARGIN, PageWork
from .robots import RobotsCache
from .warc import WarcWriter

REPORT_EVERY_S = 2.0  # finished pages wait at most this long for a progress call
# A turn is this old before its host may go to an idle worker (Keys.hungry): a host changes
# workers at most this often, however the load swings.
HANDOVER_AFTER_S = 1.0
CRAWLER_FAULT_BACKOFF = 5.0  # seconds a host waits after its turn met a crawler-side fault
MIN_MARK_AHEAD = 8  # fetches marked in flight per call at least: fewer calls for slow hosts
FINAL_REPORT_PATIENCE = 60.0

log = get_logger("crawlfleet.worker")


def lease_size(settings: Settings) -> int:
    """URLs a host's lease holds at most: the batch size, and at least two rounds of the host's
    concurrency so that refills never starve it."""
    return max(settings.batch_size, 2 * settings.per_host_concurrency)


def spare_slots(max_in_flight: int, per_host_concurrency: int, turns: int) -> int:
    """Fetch slots that ``turns`` hosts leave over when each fetches at the per-host
    concurrency; below 0 they want more than the process has, and wait for each other."""
    return max_in_flight - turns * per_host_concurrency


class BatchRun(PageWork):
    """One host's turn. The worker holding a host's lease is the only one talking to that host,
    so the limits kept here (concurrency, delay between request starts) are the host's limits
    for the whole fleet. The delay carries over to the host's next turn through the ready time
    the final call sets.
    """

    def __init__(self, ctx: dict[str, Any], batch: HostBatch, claim: Claim) -> None:
        self.settings: Settings = ctx["settings"]
        self.session: aiohttp.ClientSession = ctx["session"]
        self.global_slots: asyncio.Semaphore = ctx["semaphore"]
        self.turns: set[BatchRun] = ctx["turns"]  # the process's running turns, all shards
        self.frontier: Frontier = ctx["frontier"]
        self.robots: RobotsCache = ctx["robots"]
        self.links: LinkFilter = ctx["links"]
        self.keys: Keys = ctx["keys"]
        self.warc: WarcWriter | None = ctx.get("warc")  # CRAWLFLEET_WARC
        self.limits: Limits = ctx.get("limits") or Limits(
            self.settings.max_pages, self.settings.max_pages_per_host,
            self.settings.max_query_variants)
        # With several shards: where links for other shards' hosts go (common/cluster.py).
        self.cluster: Cluster | None = ctx.get("cluster")
        self.shard: int = ctx.get("shard", 0)
        self.batch = batch
        self.seen_digits = claim.seen_digits
        self.todo: deque[QueuedURL] = deque(claim.urls)
        self.marked: set[str] = set()  # fps marked in flight and not started yet
        self.started_urls = 0
        self.log = log.bind(worker_id=self.settings.worker_id, job_id=ctx.get("job_id"),
                            host=batch.host, batch_id=batch.batch_id)
        self.concurrency = self.settings.per_host_concurrency
        self.lease_size = lease_size(self.settings)
        self.mark_ahead = max(self.concurrency, MIN_MARK_AHEAD)
        self.pending: list[StoredResult] = []
        self.admissions: list[Admission] = []
        self.scope_refused = self.invalid_links = 0
        self.pages = self.failed = self.skipped = self.retried = 0
        self.calls = 0
        self.turn_started = self.last_call = time.monotonic()
        self.call_lock = asyncio.Lock()
        self.origins: set[str] = set()
        # Seconds between request starts to this host (robots.txt may raise it).
        self.delay = self.settings.crawl_delay
        self.pacer = Pacer(self.delay * PACING_MARGIN)
        # When set, no new fetch starts: the lease is lost, the host keeps failing, its
        # robots.txt is unavailable, or the crawler met a fault. Unstarted URLs go back.
        self.halted: str | None = None
        # When set, the lease is not refilled: what it holds is fetched, then the turn ends
        # (a transient failure: the host's next turn waits for its backoff; or the host was
        # handed over to an idle worker).
        self.turn_over: str | None = None
        self.running: set[asyncio.Task[None]] = set()
        self.call_task: asyncio.Task[ProgressOutcome] | None = None  # a call in the background
        self.backoff_until = 0.0  # time.monotonic() before which the host must rest
        self.transient_failures = 0
        self.state_lost = False

    async def run(self) -> dict[str, Any]:
        self.turns.add(self)
        try:
            return await self._run()
        finally:
            self.turns.discard(self)

    async def _run(self) -> dict[str, Any]:
        renew = asyncio.create_task(self._renew_lease())
        try:
            try:
                await self._prepare_robots(self.todo)
                await self._drive()
            except Exception as exc:  # robots.txt's cache read, or anything else of ours
                if not self._crawler_fault(exc):
                    for entry in self.todo:
                        self._fail_internal(entry)
                    self.todo.clear()
        except asyncio.CancelledError:
            # Shutdown: store what is done and hand the rest back to the host queue now,
            # instead of leaving it to wait for the lease to expire.
            outcome = await asyncio.shield(self._final_flush())
            self.log.warning("batch_interrupted", pages=self.pages, failed=self.failed,
                             handed_back=outcome.handed_back if outcome else None)
            raise
        finally:
            renew.cancel()
        outcome = await self._final_flush()
        elapsed = round((time.monotonic() - self.turn_started) * 1000, 1)
        self.log.info("batch_done", urls=self.started_urls, pages=self.pages,
                      failed=self.failed, skipped=self.skipped, retried=self.retried,
                      handed_back=outcome.handed_back if outcome else None, halted=self.halted,
                      delay=self.delay, elapsed_ms=elapsed, calls=self.calls,
                      lease_held=outcome.lease_held if outcome else None)
        return {"pages": self.pages, "failed": self.failed, "skipped": self.skipped}

    # -- the turn ---------------------------------------------------------------------
    def _may_refill(self) -> bool:
        return (self.halted is None and self.turn_over is None
                and time.monotonic() - self.turn_started < self.settings.host_turn_seconds)

    async def _drive(self) -> None:
        """Start fetches while slots are free, call progress.lua when marks, a refill or a
        report are due, until the lease is empty and the turn gives no more.

        A call goes out in the background while a quarter of the marks is left, so the
        fetches already marked go on during its round trip instead of waiting for it."""
        in_flight = self.running
        try:
            while True:
                self._reap_call()
                while not self.halted and self.todo and len(in_flight) < self.concurrency:
                    if self.todo[0].fp not in self.marked:
                        await self._call_now()  # marks the next fetches (reports, refills)
                        continue
                    entry = self.todo.popleft()
                    self.marked.discard(entry.fp)
                    self.started_urls += 1
                    in_flight.add(asyncio.create_task(self._crawl_one(entry)))
                if not in_flight:
                    if self.call_task is not None:
                        await self._call_now()
                        continue
                    if self.halted or not self._may_refill():
                        return
                    await self._call()  # our pages' links are in our queue now: refill
                    if not self.todo:
                        return
                    continue
                if self.call_task is None and not self.halted and (
                    (len(self.marked) <= self.mark_ahead // 4
                     and len(self.todo) > len(self.marked))
                    or (self.pending and (
                        time.monotonic() - self.last_call >= REPORT_EVERY_S
                        # little left to start, and its links may refill it
                        or (len(self.todo) <= self.mark_ahead // 4 and self._may_refill())))
                ):
                    self.call_task = asyncio.create_task(self._call())
                waits: set[asyncio.Task[Any]] = set(in_flight)
                if self.call_task is not None:
                    waits.add(self.call_task)
                done, _ = await asyncio.wait(waits, timeout=REPORT_EVERY_S,
                                             return_when=asyncio.FIRST_COMPLETED)
                in_flight -= done
        finally:
            if self.call_task is not None:
                call, self.call_task = self.call_task, None
                # Its buffers come back on a failure: the final call sends them.
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await call
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.gather(*in_flight, return_exceptions=True)

    def _short_of_slots(self) -> bool:
        """Every fetch slot of this worker is taken by hosts that together want more than it
        has (they wait for each other), and this turn has lasted HANDOVER_AFTER_S: a worker
        with nothing to do may have the host. A host that fills the slots alone stays: another
        worker would fetch it no faster, and the two would pass it back and forth."""
        return (self.global_slots.locked()
                and spare_slots(self.settings.max_in_flight, self.concurrency,
                                len(self.turns)) < 0
                and time.monotonic() - self.turn_started >= HANDOVER_AFTER_S)

    def _reap_call(self) -> None:
        """A background call that has ended: its error, if any, is the turn's."""
        if self.call_task is not None and self.call_task.done():
            task, self.call_task = self.call_task, None
            task.result()

    async def _call_now(self) -> None:
        """The call in flight, or a new one: the driver needs its answer before going on."""
        if self.call_task is not None:
            task, self.call_task = self.call_task, None
            await task
        else:
            await self._call()

    async def _call(self) -> ProgressOutcome:
        """One progress.lua call: what is done, the next marks, links, and a refill."""
        async with self.call_lock:
            marks = [] if self.halted else self._next_marks()
            want = 0
            if self._may_refill():
                # After this call the lease holds the unstarted URLs and the running ones.
                want = max(0, self.lease_size - len(self.todo) - len(self.running))
            # The refill comes after every entry of todo: its first ones are the next to be
            # marked when todo's unmarked ones fit in this call's marks.
            mark_refill = 0
            if len(marks) == len(self.todo) - len(self.marked):
                mark_refill = max(0, min(want, self.mark_ahead - len(self.marked) - len(marks)))
            self.last_call = time.monotonic()
            outcome = await self._send(
                marks=marks, want=want, mark_refill=mark_refill,
                yield_to_others=self.pages + self.failed >= self.settings.host_turn_pages,
                short_of_slots=self._short_of_slots())
            if not outcome.lease_held:
                self.halt("lease_lost")
                return outcome
            if outcome.handed_over:
                self.turn_over = self.turn_over or "handed_over"
            self.marked.update(marks)
            if outcome.refill:
                self.marked.update(e.fp for e in outcome.refill[:mark_refill])
                self.todo.extend(outcome.refill)
                await self._prepare_robots(outcome.refill)
            return outcome

    async def _send(self, **call: Any) -> ProgressOutcome:
        """Send what is buffered (results, links) with ``call``'s other Progress fields; on a
        failure it stays buffered for the next (final) call. Holds ``call_lock``'s caller."""
        # Pages finishing during these awaits add links; the last check and the taking of
        # the buffer below have no await between them, so no foreign link slips into this
        # shard's call.
        await self._deliver_foreign()
        await self._admit_overflow()
        while self._foreign_waiting():
            await self._deliver_foreign()
            await self._admit_overflow()
        results, self.pending = self.pending, []
        admissions, self.admissions = self.admissions, []
        refused, invalid = self.scope_refused, self.invalid_links
        self.scope_refused = self.invalid_links = 0
        p = Progress(results=results, admissions=admissions, discarded_scope=refused,
                     discarded_invalid=invalid, **call)
        try:
            outcome = await self.frontier.progress(self.batch, p, self.limits)
        except BaseException:
            self._unsent(results, admissions, refused, invalid)
            raise
        self.calls += 1
        return outcome

    def foreign_host(self, host: str) -> bool:
        return self.cluster is not None and self.cluster.owner(host).index != self.shard

    def _foreign_waiting(self) -> bool:
        return self.cluster is not None and any(self.foreign_host(a.host)
                                                for a in self.admissions)

    async def _deliver_foreign(self) -> None:
        """Links for other shards' hosts are admitted there (or parked in this shard's outbox)
        before this shard's call stores the pages they came from: a kill in between re-fetches
        those pages, and their links come again as duplicates."""
        if self.cluster is None or not self.admissions:
            return
        admissions, self.admissions = self.admissions, []
        try:
            self.admissions = await self._route(admissions) + self.admissions
        except BaseException:
            self.admissions = admissions + self.admissions
            raise

    async def _route(self, admissions: list[Admission]) -> list[Admission]:
        """Deliver the links of ``admissions`` that belong to other shards; the rest back."""
        if self.cluster is None:
            return admissions
        mine, others = self.cluster.split(admissions, self.shard)
        if others:
            parked = await deliver(self.cluster, others, self.frontier.redis, ADMIT_CHUNK)
            if parked:
                self.log.warning("links_parked", links=parked,
                                 detail="their shard is unreachable: this shard's scheduler "
                                        "forwards them from its outbox once it is back")
        return mine

    async def _admit_overflow(self) -> None:
        """Links past ADMIT_CHUNK go first, in admit.lua calls of ADMIT_CHUNK each, so that no
        script holds Redis for more than a few milliseconds (a 5,000-link page). Admitting
        before the page's result is stored is safe: if the result never lands, the page is
        fetched again and its links are duplicates. A chunk is routed again first: links for
        other shards' hosts may have come in during the last chunk's call."""
        while len(self.admissions) > ADMIT_CHUNK:
            # Taken off before the await: pages finishing meanwhile append their own links.
            chunk, self.admissions = self.admissions[:ADMIT_CHUNK], self.admissions[ADMIT_CHUNK:]
            try:
                mine = await self._route(chunk)
                if mine:
                    await self.frontier.admit(self.batch.crawl, mine, self.limits)
            except BaseException:
                self.admissions = chunk + self.admissions
                raise

    def _next_marks(self) -> list[str]:
        room = self.mark_ahead - len(self.marked)
        marks = []
        for entry in self.todo:
            if room <= 0:
                break
            if entry.fp not in self.marked:
                marks.append(entry.fp)
                room -= 1
        return marks

    def _unsent(self, results: list[StoredResult], admissions: list[Admission], refused: int,
                invalid: int) -> None:
        """A call that failed: keep its results and links for the next (final) call."""
        self.pending = results + self.pending
        self.admissions = admissions + self.admissions
        self.scope_refused += refused
        self.invalid_links += invalid

    # -- faults -----------------------------------------------------------------------
    def halt(self, reason: str, *, rest_s: float = 0.0) -> None:
        if self.halted is None:
            self.log.warning("batch_halted", reason=reason, rest_s=round(rest_s, 2) or None)
        self.halted = self.halted or reason
        self.backoff_until = max(self.backoff_until, time.monotonic() + rest_s)

    def _crawler_fault(self, exc: BaseException) -> bool:
        """Ours, not the site's. Redis trouble (or a worker shutting down): stop the turn, its
        unfinished URLs go back to the queue (True). Anything else is a bug that would recur
        on every try, so the caller records the URL as failed (False): every crawl ends."""
        if isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
        if isinstance(exc, CrawlerFault) and exc.__cause__ is not None:
            exc = exc.__cause__
        if isinstance(exc, StateLost):
            self.state_lost = True
            self.halt("state_lost")
            return True
        redis = isinstance(exc, RedisError)
        self.log.error("batch_fault", error=f"{type(exc).__name__}: {exc}", redis=redis,
                       exc_info=not redis)
        if redis or self.session.closed:
            self.halt("redis_error" if redis else "shutting_down", rest_s=CRAWLER_FAULT_BACKOFF)
            return True
        return False

    # -- one URL ----------------------------------------------------------------------
    # -- the end ----------------------------------------------------------------------
    async def final_call(self) -> ProgressOutcome:
        """Report what is left; hand the unfinished URLs back and release the lease."""
        async with self.call_lock:
            # The host's next turn may start one delay after this turn's last request, and
            # not before any backoff: as seconds from now, so Redis's clock decides when.
            last = self.pacer.last_sent
            wait_s = max(last + self.pacer.spacing - time.time() if last else 0.0,
                         self.backoff_until - time.monotonic(), 0.0)
            return await self._send(final=True, wait_s=wait_s)

    async def _final_flush(self) -> ProgressOutcome | None:
        """The last call, with the lease's release and the hand-back: retried through Redis
        outages and errors (BUSY, OOM ...) for a while; if Redis stays away, the lease expires
        and the scheduler brings the URLs back."""
        if self.state_lost:
            self.log.error("state_lost", detail="the crawl's state in Redis is gone; "
                                                "this batch's work cannot be stored")
            return None
        try:
            return await retry_while_unavailable(self.final_call,
                                                 give_up_after=FINAL_REPORT_PATIENCE)
        except StateLost:
            self.state_lost = True
            self.log.error("state_lost", detail="the crawl's state in Redis is gone")
        except RedisError as exc:
            self.log.error("batch_report_failed", error=str(exc),
                           detail="left to the lease's expiry")
        # Its links never reached Redis: whoever fetches these pages again must send them.
        self.links.forget(self.admissions)
        return None

    async def _renew_lease(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self.frontier.renew(self.batch,
                                                 lease_seconds=self.settings.lease_seconds)
            except StateLost:
                self.state_lost = True
                self.halt("state_lost")
                return
            except RedisError as exc:  # try again at the next interval
                self.log.warning("lease_renew_failed", error=str(exc))
                continue
            if not held:
                # Someone else owns the host now; stop fetching, report what we have.
                self.halt("lease_lost")
                return

