"""One URL of a host's turn: robots.txt, the fetch, a retry, the WARC records, the result.

The turn itself (``workers/batch.py``) decides when fetches start and when progress calls go
out; this is what happens to each URL in between, as methods the turn inherits.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import msgspec

from crawlfleet.common import metrics
from crawlfleet.common.frontier import (
    ALIAS,
    DEAD,
    FAILED,
    PAGE,
    RETRY,
    SKIPPED,
    Admission,
    Frontier,
    StoredResult,
)
from crawlfleet.common.messages import HostBatch, PageResult, QueuedURL, encode
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import fingerprint, host_key

from .fetch import Fetched, fetch
from .links import LinkFilter
from .pacing import Pacer
from .parse import ParsedPage
from .results import build_result, parse_fetched, skipped_result
from .retry import backoff_delay, is_retryable, parse_retry_after
from .robots import DISALLOW_ALL, RobotsCache, origin_of
from .robots import FAILED as ROBOTS_FAILED
from .warc import Exchange, PageCapture, WarcRef, WarcWriter

TRANSIENT_FAILURES_TO_HALT = 3  # in one turn: the host is failing, back it off as a whole
# A request's start is taken when its headers are sent (see pacing.py); 10% more on top covers
# what is left between that and the server's own view (its event loop, the network).
PACING_MARGIN = 1.1


class PageWork:
    """The per-URL half of ``BatchRun``: the state it reads and writes is the turn's."""

    settings: Settings
    session: aiohttp.ClientSession
    global_slots: asyncio.Semaphore
    frontier: Frontier
    robots: RobotsCache
    links: LinkFilter
    warc: WarcWriter | None
    batch: HostBatch
    seen_digits: int
    log: Any
    pacer: Pacer
    delay: float
    origins: set[str]
    pending: list[StoredResult]
    admissions: list[Admission]
    scope_refused: int
    invalid_links: int
    pages: int
    failed: int
    skipped: int
    retried: int
    halted: str | None
    turn_over: str | None
    backoff_until: float
    transient_failures: int

    def halt(self, reason: str, *, rest_s: float = 0.0) -> None:
        raise NotImplementedError  # the turn's (batch.py)

    def foreign_host(self, host: str) -> bool:
        """Is ``host`` owned by another shard than this turn's? (batch.py; never unsharded)"""
        return False

    def _crawler_fault(self, exc: BaseException) -> bool:
        raise NotImplementedError  # the turn's (batch.py)

    async def _prepare_robots(self, entries: Any) -> None:
        """robots.txt of each new origin (one, almost always) before any of its pages."""
        origins = {}
        for entry in entries:
            origin = origin_of(entry.url)
            if origin not in self.origins:
                origins[origin] = entry.url
        for origin, url in origins.items():
            self.origins.add(origin)
            async with self.global_slots:
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
            return  # not started after all: the final call hands it back
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
        exchanges: list[Exchange] | None = None if self.warc is None else []
        async with self.global_slots:
            if self.halted:
                return
            with metrics.FETCH_IN_FLIGHT:
                fetched = await fetch(
                    self.session, entry.url, max_body_bytes=self.settings.max_body_bytes,
                    max_redirects=self.settings.max_redirects,
                    allow_private=self.settings.allow_private,
                    deadline=self.settings.fetch_timeout, may_follow=self._may_follow,
                    pace=self.pacer.turn, capture=exchanges,
                )
        metrics.record_fetch(fetched.elapsed_ms, len(fetched.body))
        if is_retryable(fetched.error) and self._retry_later(entry, fetched):
            if exchanges:  # archived like any response; the result waits for the last try
                await self._archive(entry, fetched, exchanges, None)
            return  # back in the host queue
        parsed = await parse_fetched(entry, fetched, self.settings)
        warc = await self._archive(entry, fetched, exchanges, parsed) if exchanges else None
        result, links, aliases = build_result(entry, fetched, self.settings, parsed, warc)
        if links:
            admissions, refused, invalid = self.links.filter(links, entry.depth + 1)
            self.admissions += admissions
            self.scope_refused += refused
            self.invalid_links += invalid
        if result.error is None:
            outcome = PAGE
        elif is_retryable(result.error):
            outcome = DEAD  # its retries are used up
        else:
            outcome = FAILED
        self._store(entry, outcome, result)
        for alias in aliases:
            if self.foreign_host(host_key(alias.url)):
                # A redirect to another shard's host: that shard's seen set decides, so the
                # target goes there as a link (fetched there unless it is known already).
                admissions, refused, invalid = self.links.filter([alias.url], entry.depth)
                self.admissions += admissions
                continue
            self.pending.append(StoredResult(fingerprint(alias.url), ALIAS, encode(alias)))
            metrics.record_result(PAGE, alias)  # a page unless another got it first (rare)
        self.log.info("page", url=entry.url, status=result.status, error=result.error,
                      elapsed_ms=result.elapsed_ms, bytes=result.bytes, links=result.links,
                      depth=entry.depth, redirects=len(result.redirects) or None)

    async def _archive(self, entry: QueuedURL, fetched: Fetched, exchanges: list[Exchange],
                       parsed: ParsedPage | str | None) -> WarcRef | None:
        """The fetch's WARC records, written before its result can leave the worker."""
        assert self.warc is not None
        outlinks = parsed.links_found if isinstance(parsed, ParsedPage) else 0
        return await self.warc.write(PageCapture(
            entry.url, entry.depth, exchanges, fetched.elapsed_ms, outlinks, fetched.redirects))

    def _retry_later(self, entry: QueuedURL, fetched: Fetched) -> bool:
        """A transient failure: back the whole host off, and queue the URL again if it has
        retries left (True). After a few in one turn, stop rather than hammering a failing
        host URL by URL."""
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
            metrics.RETRIES.inc()
            self.log.info("retry_scheduled", url=entry.url, error=fetched.error,
                          status=fetched.status, retries=entry.retries + 1,
                          in_s=round(wait, 2))
        # A backoff is for the host as a whole: no refill, so its next turn waits for it.
        self.turn_over = self.turn_over or "backoff"
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
        metrics.record_result(outcome, result)

    async def _may_follow(self, target: str) -> bool:
        """Follow a redirect hop only on this host (others get their own lease and limits),
        where robots.txt allows, and to a URL not in the crawl already."""
        if host_key(target) != self.batch.host:
            return False
        if not (await self.robots.policy(target)).allows(target):
            return False
        return not await self.frontier.is_seen(fingerprint(target), self.seen_digits)

