"""One host batch in progress: pacing, robots.txt, fetches, retries, reports, the lease.

This is the work of one arq job (``workers/worker.py`` wires it into arq). Fetching is
``workers/fetch.py``, parsing ``workers/parse.py``, storing ``workers/store.py``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import aiohttp
import msgspec

from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.messages import (
    Discovered,
    HostBatch,
    LinkGroup,
    PageResult,
    QueuedURL,
    encode,
)
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import fingerprint, host_key

from .fetch import Fetched, fetch
from .pacing import Pacer
from .parse import BodyError, ParsedPage, is_html, parse_page, sniff_html
from .retry import backoff_delay, is_retryable, parse_retry_after
from .robots import DISALLOW_ALL, RobotsCache, origin_of
from .store import ALIAS, DEAD, FAILED, PAGE, RETRY, SKIPPED, ReportOutcome, Store, StoredResult

FLUSH_EVERY_S = 1.0  # report finished pages at least this often, so a kill loses little
TRANSIENT_FAILURES_TO_HALT = 3  # in one batch: the host is failing, back it off as a whole
# A request's start is taken when its headers are sent (see pacing.py); 10% more on top covers
# what is left between that and the server's own view (its event loop, the network).
PACING_MARGIN = 1.1

log = get_logger("crawlfleet.worker")


class BatchRun:
    """One host batch in progress: pacing, robots.txt, fetches, retries, reports, the lease.

    The worker holding a host's lease is the only one talking to that host, so the limits kept
    here (concurrency, delay between request starts) are the host's limits for the whole fleet.
    The delay carries over to the host's next batch through the ready time its report sets.
    """

    def __init__(self, ctx: dict[str, Any], batch: HostBatch) -> None:
        self.settings: Settings = ctx["settings"]
        self.session: aiohttp.ClientSession = ctx["session"]
        self.global_slots: asyncio.Semaphore = ctx["semaphore"]
        self.store: Store = ctx["store"]
        self.robots: RobotsCache = ctx["robots"]
        self.redis: Any = ctx["redis"]
        self.keys: Keys = ctx["keys"]
        self.batch = batch
        self.log = log.bind(worker_id=self.settings.worker_id, job_id=ctx.get("job_id"),
                            host=batch.host, batch_id=batch.batch_id)
        self.host_slots = asyncio.Semaphore(self.settings.per_host_concurrency)
        self.pending: list[StoredResult] = []
        self.links: dict[int, set[str]] = defaultdict(set)
        self.pages = self.failed = self.skipped = self.retried = 0
        self.last_flush = time.monotonic()
        self.flush_lock = asyncio.Lock()
        # Seconds between request starts to this host (robots.txt may raise it).
        self.delay = self.settings.crawl_delay
        self.pacer = Pacer(self.delay * PACING_MARGIN)
        # When set, no new fetch starts: the lease is lost, the host keeps failing, or its
        # robots.txt is unavailable. Unstarted URLs go back to the host queue.
        self.halted: str | None = None
        self.host_not_before = 0.0
        self.transient_failures = 0

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        renew = asyncio.create_task(self._renew_lease())
        try:
            await self._prepare_robots()
            async with asyncio.TaskGroup() as tasks:
                for entry in self.batch.urls:
                    tasks.create_task(self._crawl_one(entry))
        except asyncio.CancelledError:
            # Shutdown: store what is done and hand the rest back to the host queue now,
            # instead of leaving it to wait for the lease to expire.
            outcome = await asyncio.shield(self.flush(final=True))
            self.log.warning("batch_interrupted", pages=self.pages, failed=self.failed,
                             handed_back=outcome.handed_back)
            raise
        finally:
            renew.cancel()
        outcome = await self.flush(final=True)
        elapsed = round((time.monotonic() - started) * 1000, 1)
        self.log.info("batch_done", urls=len(self.batch.urls), pages=self.pages,
                      failed=self.failed, skipped=self.skipped, retried=self.retried,
                      handed_back=outcome.handed_back, halted=self.halted,
                      delay=self.delay, elapsed_ms=elapsed, lease_held=outcome.lease_held)
        return {"pages": self.pages, "failed": self.failed, "skipped": self.skipped}

    def halt(self, reason: str, *, until: float = 0.0) -> None:
        if self.halted is None:
            self.log.warning("batch_halted", reason=reason, resume_at=until or None)
        self.halted = self.halted or reason
        self.host_not_before = max(self.host_not_before, until)

    async def _prepare_robots(self) -> None:
        """robots.txt of each origin in the batch (one, almost always) before any page."""
        origins = {origin_of(entry.url): entry.url for entry in self.batch.urls}
        for url in origins.values():
            async with self.host_slots, self.global_slots:
                policy = await self.robots.policy(url, pace=self.pacer.turn)
            if policy.state == DISALLOW_ALL:
                # 5xx or unreachable: nothing may be fetched until it is tried again.
                self.halt("robots_unavailable", until=policy.expires_at)
            elif policy.crawl_delay:
                self.delay = max(self.delay,
                                 min(policy.crawl_delay, self.settings.max_crawl_delay))
                # robots.txt itself was a request: the first page waits the new delay after it.
                self.pacer.set_spacing(self.delay * PACING_MARGIN)

    async def _crawl_one(self, entry: QueuedURL) -> None:
        if self.halted:
            return
        policy = await self.robots.policy(entry.url)
        if not policy.allows(entry.url):
            self._store(entry, SKIPPED, skipped_result(entry, "robots", self.settings))
            return
        async with self.host_slots, self.global_slots:
            if self.halted:
                return
            fetched = await fetch(
                self.session, entry.url, max_body_bytes=self.settings.max_body_bytes,
                max_redirects=self.settings.max_redirects,
                allow_private=self.settings.allow_private,
                deadline=self.settings.request_timeout, may_follow=self._may_follow,
                pace=self.pacer.turn,
            )
        if is_retryable(fetched.error) and self._retry_later(entry, fetched):
            return  # back in the host queue; the result waits for the last try
        result, links, aliases = build_result(entry, fetched, self.settings)
        if links:
            self.links[entry.depth + 1].update(links)
        if result.error is None:
            outcome = PAGE
        elif is_retryable(result.error):
            outcome = DEAD  # its retries are used up
        else:
            outcome = FAILED
        self._store(entry, outcome, result)
        for alias in aliases:
            self.pending.append(StoredResult(fingerprint(alias.url), ALIAS, encode(alias)))
        self.log.info("page", url=entry.url, status=result.status, error=result.error,
                      elapsed_ms=result.elapsed_ms, bytes=result.bytes, links=result.links,
                      depth=entry.depth, redirects=len(result.redirects) or None)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            await self.flush(final=False)

    def _retry_later(self, entry: QueuedURL, fetched: Fetched) -> bool:
        """A transient failure: back the whole host off, and queue the URL again if it has
        retries left (True). After a few in one batch, stop the batch rather than hammering
        a failing host URL by URL."""
        self.transient_failures += 1
        wait = backoff_delay(
            entry.retries, base=self.settings.retry_base, cap=self.settings.retry_max,
            retry_after=parse_retry_after(fetched.retry_after),
        )
        self.host_not_before = max(self.host_not_before, time.time() + wait)
        retry_later = entry.retries < self.settings.max_retries
        if retry_later:
            retry = QueuedURL(entry.v, entry.fp, entry.url, entry.depth, entry.tries,
                              entry.retries + 1)
            self.pending.append(StoredResult(entry.fp, RETRY, encode(retry)))
            self.retried += 1
            self.log.info("retry_scheduled", url=entry.url, error=fetched.error,
                          status=fetched.status, retries=entry.retries + 1,
                          in_s=round(wait, 2))
        if self.transient_failures >= TRANSIENT_FAILURES_TO_HALT:
            self.halt("host_failing", until=self.host_not_before)
        return retry_later

    def _store(self, entry: QueuedURL, outcome: str, result: PageResult) -> None:
        if outcome == PAGE:
            self.pages += 1
        elif outcome == SKIPPED:
            self.skipped += 1
        else:
            self.failed += 1
        self.pending.append(StoredResult(entry.fp, outcome, encode(result)))

    async def _may_follow(self, target: str) -> bool:
        """Follow a redirect hop only on this host (others get their own lease and limits),
        where robots.txt allows, and to a URL not in the crawl already."""
        if host_key(target) != self.batch.host:
            return False
        if not (await self.robots.policy(target)).allows(target):
            return False
        return not await self.redis.sismember(self.keys.seen, fingerprint(target))

    async def flush(self, *, final: bool) -> ReportOutcome:
        """Report buffered results and their links; the final report releases the lease."""
        async with self.flush_lock:
            results, self.pending = self.pending, []
            links, self.links = self.links, defaultdict(set)
            self.last_flush = time.monotonic()
            if not results and not final:
                return ReportOutcome(True, 0, 0, 0)
            now = time.time()
            discovered = Discovered(
                batch_id=self.batch.batch_id, host=self.batch.host,
                worker=self.settings.worker_id,
                groups=[LinkGroup(depth, sorted(urls)) for depth, urls in links.items()],
                pages=sum(r.outcome == PAGE for r in results),
                failed=sum(r.outcome in (FAILED, DEAD) for r in results), final=final,
            )
            # The host's next batch may start one delay after this batch's last request, and
            # not before any backoff this batch ran into.
            last = self.pacer.last_sent
            next_ready = max(now, last + self.pacer.spacing if last else now,
                             self.host_not_before)
            outcome = await self.store.report(self.batch, results, discovered, now=now,
                                              next_ready=next_ready)
            if outcome.duplicates:
                self.log.info("duplicate_results_dropped", count=outcome.duplicates)
            return outcome

    async def _renew_lease(self) -> None:
        interval = self.settings.lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            held = await self.store.claim(
                self.batch, lease_until=time.time() + self.settings.lease_seconds
            )
            if not held:
                # Someone else owns the host now; stop fetching, report what we have.
                self.halt("lease_lost")
                return


def skipped_result(entry: QueuedURL, reason: str, settings: Settings) -> PageResult:
    return PageResult(url=entry.url, final_url=None, status=None, content_type=None,
                      depth=entry.depth, title=None, links=0, bytes=0, elapsed_ms=0.0,
                      fetched_at=round(time.time(), 3), error=reason, worker=settings.worker_id)


def build_result(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> tuple[PageResult, list[str], list[PageResult]]:
    """Turn a fetch into the page result, the links to follow from it, and results for the
    redirect targets it followed (pure)."""
    parsed: ParsedPage | None = None
    error = fetched.error
    if error is None and fetched.body and (
        is_html(fetched.content_type) or (fetched.content_type is None and sniff_html(fetched.body))
    ):
        try:
            parsed = parse_page(fetched.body, fetched.content_type,
                                fetched.final_url or entry.url, sort_query=settings.sort_query)
        except BodyError as exc:
            error = exc.reason
    links: list[str] = []
    if parsed is not None and not parsed.nofollow:
        links = list(parsed.links)
        if parsed.canonical and parsed.canonical != (fetched.final_url or entry.url):
            links.append(parsed.canonical)  # the page names its preferred URL: crawl that too
    if fetched.redirect_stopped and fetched.redirects:
        links = [fetched.redirects[-1]]  # not followed here; the frontier decides
    if settings.max_depth is not None and entry.depth + 1 > settings.max_depth:
        links = []  # the scheduler would refuse them anyway; don't send them
    result = PageResult(
        url=entry.url,
        final_url=fetched.final_url,
        status=fetched.status,
        content_type=fetched.content_type,
        depth=entry.depth,
        title=parsed.title if parsed else None,
        links=len(parsed.links) if parsed else 0,
        bytes=len(fetched.body),
        elapsed_ms=fetched.elapsed_ms,
        fetched_at=round(time.time(), 3),
        error=error,
        canonical=parsed.canonical if parsed else None,
        noindex=parsed.noindex if parsed else False,
        nofollow=parsed.nofollow if parsed else False,
        encoding=parsed.encoding if parsed else None,
        worker=settings.worker_id,
        redirects=fetched.redirects,
    )
    # The targets on the way got the same content; a failed fetch vouches for none of them.
    followed = fetched.redirects[:-1] if fetched.redirect_stopped else fetched.redirects
    aliases = [] if result.error else [
        msgspec.structs.replace(result, url=url, redirects=[]) for url in followed
    ]
    return result, links, aliases
