"""One host batch in progress: pacing, robots.txt, fetches, retries, reports, the lease.

This is the work of one arq job (``workers/worker.py`` wires it into arq). Fetching is
``workers/fetch.py``, parsing ``workers/parse.py``; every change to the frontier goes through
``common/frontier.py``.

Faults are sorted by side. A page's own trouble (a timeout, a 404, a hostile body) is that
page's result. The crawler's trouble (Redis answering BUSY, OOM, READONLY, LOADING, or not at
all; a bug) never becomes a page result: the batch stops fetching, hands its unfinished URLs back
to the host queue with a backoff, and ends with a report whatever raised.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from typing import Any

import aiohttp
import msgspec
from redis.exceptions import RedisError

from crawlfleet.common.connections import retry_while_unavailable
from crawlfleet.common.frontier import (
    ALIAS,
    DEAD,
    FAILED,
    PAGE,
    RETRY,
    SKIPPED,
    Frontier,
    ReportOutcome,
    StateLost,
    StoredResult,
)
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

from .fetch import CrawlerFault, Fetched, fetch
from .pacing import Pacer
from .parse import BodyError, ParsedPage, is_html, parse_page, parse_page_async, sniff_html
from .retry import backoff_delay, is_retryable, parse_retry_after
from .robots import DISALLOW_ALL, RobotsCache, origin_of
from .robots import FAILED as ROBOTS_FAILED

FLUSH_EVERY_S = 1.0  # report finished pages at least this often, so a kill loses little
TRANSIENT_FAILURES_TO_HALT = 3  # in one batch: the host is failing, back it off as a whole
# A request's start is taken when its headers are sent (see pacing.py); 10% more on top covers
# what is left between that and the server's own view (its event loop, the network).
PACING_MARGIN = 1.1
LINKS_PER_EVENT = 5000  # links in one event on the stream, so no message is huge
CRAWLER_FAULT_BACKOFF = 5.0  # seconds a host waits after its batch met a crawler-side fault

log = get_logger("crawlfleet.worker")


class BatchRun:
    """One host batch in progress: pacing, robots.txt, fetches, retries, reports, the lease.

    The worker holding a host's lease is the only one talking to that host, so the limits kept
    here (concurrency, delay between request starts) are the host's limits for the whole fleet.
    The delay carries over to the host's next batch through the ready time its report sets.
    """

    def __init__(self, ctx: dict[str, Any], batch: HostBatch, urls: list[QueuedURL]) -> None:
        self.settings: Settings = ctx["settings"]
        self.session: aiohttp.ClientSession = ctx["session"]
        self.global_slots: asyncio.Semaphore = ctx["semaphore"]
        self.frontier: Frontier = ctx["frontier"]
        self.robots: RobotsCache = ctx["robots"]
        self.redis: Any = ctx["redis"]
        self.keys: Keys = ctx["keys"]
        self.batch = batch
        self.urls = urls
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
        # When set, no new fetch starts: the lease is lost, the host keeps failing, its
        # robots.txt is unavailable, or the crawler met a fault. Unstarted URLs go back.
        self.halted: str | None = None
        self.backoff_until = 0.0  # time.monotonic() before which the host must rest
        self.transient_failures = 0
        self.state_lost = False

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        renew = asyncio.create_task(self._renew_lease())
        try:
            try:
                await self._prepare_robots()
                async with asyncio.TaskGroup() as tasks:
                    for entry in self.urls:
                        tasks.create_task(self._crawl_one(entry))
            except Exception as exc:  # robots.txt's cache read, or anything else of ours
                if not self._crawler_fault(exc):
                    for entry in self.urls:
                        self._fail_internal(entry)
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
        elapsed = round((time.monotonic() - started) * 1000, 1)
        self.log.info("batch_done", urls=len(self.urls), pages=self.pages,
                      failed=self.failed, skipped=self.skipped, retried=self.retried,
                      handed_back=outcome.handed_back if outcome else None, halted=self.halted,
                      delay=self.delay, elapsed_ms=elapsed,
                      lease_held=outcome.lease_held if outcome else None)
        return {"pages": self.pages, "failed": self.failed, "skipped": self.skipped}

    def halt(self, reason: str, *, rest_s: float = 0.0) -> None:
        if self.halted is None:
            self.log.warning("batch_halted", reason=reason, rest_s=round(rest_s, 2) or None)
        self.halted = self.halted or reason
        self.backoff_until = max(self.backoff_until, time.monotonic() + rest_s)

    def _crawler_fault(self, exc: BaseException) -> bool:
        """Ours, not the site's. Redis trouble (or a worker shutting down): stop the batch, its
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

    async def _prepare_robots(self) -> None:
        """robots.txt of each origin in the batch (one, almost always) before any page."""
        origins = {origin_of(entry.url): entry.url for entry in self.urls}
        for url in origins.values():
            async with self.host_slots, self.global_slots:
                policy = await self.robots.policy(url, pace=self.pacer.turn)
            if policy.state == DISALLOW_ALL:
                # 5xx or a timeout: nothing may be fetched until it is tried again.
                self.halt("robots_unavailable",
                          rest_s=max(0.0, policy.expires_at - time.time()))
            elif policy.state != ROBOTS_FAILED and policy.crawl_delay:
                self.delay = max(self.delay,
                                 min(policy.crawl_delay, self.settings.max_crawl_delay))
                # robots.txt itself was a request: the first page waits the new delay after it.
                self.pacer.set_spacing(self.delay * PACING_MARGIN)

    async def _crawl_one(self, entry: QueuedURL) -> None:
        try:
            await self._fetch_one(entry)
        except Exception as exc:  # the crawler's fault: handed back, or failed if a bug
            if not self._crawler_fault(exc):
                self._fail_internal(entry)

    def _fail_internal(self, entry: QueuedURL) -> None:
        if not any(r.fp == entry.fp for r in self.pending):
            self._store(entry, FAILED, skipped_result(entry, "crawler_error", self.settings))

    async def _fetch_one(self, entry: QueuedURL) -> None:
        if self.halted:
            return
        policy = await self.robots.policy(entry.url)
        if policy.state == ROBOTS_FAILED:
            # robots.txt cannot be fetched at all (no such name, refused, blocked address):
            # neither can the page, so it fails now with that reason instead of waiting.
            self._store(entry, FAILED, skipped_result(entry, policy.failure or "robots_failed",
                                                     self.settings))
            return
        if not policy.allows(entry.url):
            self._store(entry, SKIPPED, skipped_result(entry, "robots", self.settings))
            return
        async with self.host_slots, self.global_slots:
            if self.halted:
                return
            if not await self.frontier.mark_fetching(self.batch, entry.fp):
                self.halt("lease_lost")
                return
            fetched = await fetch(
                self.session, entry.url, max_body_bytes=self.settings.max_body_bytes,
                max_redirects=self.settings.max_redirects,
                allow_private=self.settings.allow_private,
                deadline=self.settings.fetch_timeout, may_follow=self._may_follow,
                pace=self.pacer.turn,
            )
        if is_retryable(fetched.error) and self._retry_later(entry, fetched):
            return  # back in the host queue; the result waits for the last try
        parsed = await parse_fetched(entry, fetched, self.settings)
        result, links, aliases = build_result(entry, fetched, self.settings, parsed)
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
        self.backoff_until = max(self.backoff_until, time.monotonic() + wait)
        retry_later = entry.retries < self.settings.max_retries
        if retry_later:
            retry = msgspec.structs.replace(entry, retries=entry.retries + 1)
            self.pending.append(StoredResult(entry.fp, RETRY, encode(retry)))
            self.retried += 1
            self.log.info("retry_scheduled", url=entry.url, error=fetched.error,
                          status=fetched.status, retries=entry.retries + 1,
                          in_s=round(wait, 2))
        if self.transient_failures >= TRANSIENT_FAILURES_TO_HALT:
            self.halt("host_failing", rest_s=wait)
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

    def _events(self, links: dict[int, set[str]], results: list[StoredResult],
                final: bool) -> list[bytes]:
        """The links for the scheduler, a few thousand an event. A final report always sends
        one: it wakes the scheduler to dispatch the host's next batch at once."""
        groups = [(depth, sorted(urls)) for depth, urls in links.items()]
        chunks: list[list[LinkGroup]] = [[]]
        size = 0
        for depth, urls in groups:
            for i in range(0, len(urls), LINKS_PER_EVENT):
                part = urls[i:i + LINKS_PER_EVENT]
                if size + len(part) > LINKS_PER_EVENT and chunks[-1]:
                    chunks.append([])
                    size = 0
                chunks[-1].append(LinkGroup(depth, part))
                size += len(part)
        if not chunks[-1] and not final:
            return []
        pages = sum(r.outcome == PAGE for r in results)
        failed = sum(r.outcome in (FAILED, DEAD) for r in results)
        return [encode(Discovered(batch_id=self.batch.batch_id, host=self.batch.host,
                                  worker=self.settings.worker_id, groups=chunk,
                                  pages=pages if i == 0 else 0, failed=failed if i == 0 else 0,
                                  final=final and i == len(chunks) - 1))
                for i, chunk in enumerate(chunks)]

    async def flush(self, *, final: bool) -> ReportOutcome:
        """Report buffered results and their links; the final report releases the lease."""
        async with self.flush_lock:
            results, self.pending = self.pending, []
            links, self.links = self.links, defaultdict(set)
            self.last_flush = time.monotonic()
            if not results and not final:
                return ReportOutcome(True, 0, 0, 0)
            # The host's next batch may start one delay after this batch's last request, and
            # not before any backoff: as seconds from now, so Redis's clock decides when.
            last = self.pacer.last_sent
            wait_s = max(last + self.pacer.spacing - time.time() if last else 0.0,
                         self.backoff_until - time.monotonic(), 0.0)
            try:
                outcome = await self.frontier.report(
                    self.batch, results, self._events(links, results, final), final=final,
                    wait_s=wait_s)
            except BaseException:
                # Not stored: keep them for the next (final) report.
                self.pending = results + self.pending
                for depth, urls in links.items():
                    self.links[depth] |= urls
                raise
            if outcome.duplicates:
                self.log.info("duplicate_results_dropped", count=outcome.duplicates)
            return outcome

    async def _final_flush(self) -> ReportOutcome | None:
        """The last report, with the lease's release and the hand-back: retried through
        Redis outages and errors (BUSY, OOM ...) for a while; if Redis stays away, the lease
        expires and the scheduler brings the URLs back."""
        if self.state_lost:
            self.log.error("state_lost", detail="the crawl's state in Redis is gone; "
                                                "this batch's work cannot be stored")
            return None
        try:
            return await retry_while_unavailable(lambda: self.flush(final=True),
                                                 give_up_after=FINAL_REPORT_PATIENCE)
        except StateLost:
            self.state_lost = True
            self.log.error("state_lost", detail="the crawl's state in Redis is gone")
        except RedisError as exc:
            self.log.error("batch_report_failed", error=str(exc),
                           detail="left to the lease's expiry")
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


FINAL_REPORT_PATIENCE = 60.0


def skipped_result(entry: QueuedURL, reason: str, settings: Settings) -> PageResult:
    return PageResult(url=entry.url, final_url=None, status=None, content_type=None,
                      depth=entry.depth, title=None, links=0, bytes=0, elapsed_ms=0.0,
                      fetched_at=round(time.time(), 3), error=reason, worker=settings.worker_id)


def wants_parsing(fetched: Fetched) -> bool:
    return fetched.error is None and bool(fetched.body) and (
        is_html(fetched.content_type)
        or (fetched.content_type is None and sniff_html(fetched.body))
    )


def _parse_args(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> tuple[tuple[bytes, str | None, str], dict[str, Any]]:
    return ((fetched.body, fetched.content_type, fetched.final_url or entry.url),
            {"sort_query": settings.sort_query, "max_links": settings.max_links_per_page})


async def parse_fetched(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> ParsedPage | str | None:
    """The parsed page (off the event loop when it is large), the body's error class, or None
    when there is nothing to parse."""
    if not wants_parsing(fetched):
        return None
    try:
        args, kwargs = _parse_args(entry, fetched, settings)
        return await parse_page_async(*args, **kwargs)
    except BodyError as exc:
        return exc.reason


_UNPARSED: Any = object()


def build_result(
    entry: QueuedURL, fetched: Fetched, settings: Settings,
    parsed_page: ParsedPage | str | None = _UNPARSED,
) -> tuple[PageResult, list[str], list[PageResult]]:
    """Turn a fetch (and its parsed page, from ``parse_fetched``; parsed here when not given)
    into the page result, the links to follow from it, and results for the redirect targets
    it followed (pure)."""
    if parsed_page is _UNPARSED:
        parsed_page = None
        if wants_parsing(fetched):
            try:
                args, kwargs = _parse_args(entry, fetched, settings)
                parsed_page = parse_page(*args, **kwargs)
            except BodyError as exc:
                parsed_page = exc.reason
    error = fetched.error
    parsed: ParsedPage | None = None
    if isinstance(parsed_page, str):
        error = parsed_page
    else:
        parsed = parsed_page
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
        links=parsed.links_found if parsed else 0,
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
