"""The arq worker: one job fetches one host batch and reports back.

Per process: ONE ``aiohttp.ClientSession`` over a pooled ``TCPConnector`` whose resolver is aiodns
pointed at ``CRAWLFLEET_DNS_NAMESERVERS``, and ONE ``asyncio.Semaphore`` bounding fetches in flight
across all jobs. Per job: at most ``CRAWLFLEET_PER_HOST_CONCURRENCY`` fetches at once, which, with
one batch per host at a time, is the limit for the whole fleet.

``crawlfleet worker`` runs this; so does ``arq crawlfleet.workers.worker.WorkerSettings``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from typing import Any

import aiohttp
import msgspec
from arq import func
from arq.worker import Worker
from redis.exceptions import WatchError

from crawlfleet.common.connections import REDIS_UNAVAILABLE, open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging, get_logger
from crawlfleet.common.messages import (
    Discovered,
    HostBatch,
    LinkGroup,
    PageResult,
    QueuedURL,
    batch_from_job,
    encode,
    job_deserializer,
    job_serializer,
)
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import fingerprint, host_key

from .fetch import Fetched, GuardedResolver, fetch
from .parse import BodyError, ParsedPage, is_html, parse_page, sniff_html
from .retry import backoff_delay, is_retryable, parse_retry_after
from .robots import DISALLOW_ALL, RobotsCache, origin_of
from .store import ALIAS, DEAD, FAILED, PAGE, RETRY, SKIPPED, ReportOutcome, Store, StoredResult

JOB_FUNCTION = "fetch_batch"
FLUSH_EVERY_S = 1.0  # report finished pages at least this often, so a kill loses little
TRANSIENT_FAILURES_TO_HALT = 3  # in one batch: the host is failing, back it off as a whole

log = get_logger("crawlfleet.worker")


def build_session(settings: Settings) -> aiohttp.ClientSession:
    resolver = GuardedResolver(
        allow_private=settings.allow_private, nameservers=list(settings.dns_nameservers)
    )
    connector = aiohttp.TCPConnector(
        limit=settings.max_in_flight,
        limit_per_host=settings.per_host_concurrency,
        ttl_dns_cache=settings.dns_cache_ttl,
        resolver=resolver,
        enable_cleanup_closed=True,
    )
    timeout = aiohttp.ClientTimeout(
        total=settings.request_timeout,
        sock_connect=settings.connect_timeout,
        sock_read=settings.request_timeout,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": settings.user_agent},
        cookie_jar=aiohttp.DummyCookieJar(),  # no cross-page state: every fetch is independent
        raise_for_status=False,
    )


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    ctx["session"] = build_session(settings)
    ctx["semaphore"] = asyncio.Semaphore(settings.max_in_flight)
    ctx["store"] = Store(ctx["redis"], Keys(settings.namespace))
    ctx["robots"] = RobotsCache(ctx["redis"], Keys(settings.namespace), ctx["session"], settings)
    log.info("worker_started", worker_id=settings.worker_id, max_in_flight=settings.max_in_flight,
             nameservers=list(settings.dns_nameservers) or "system")


async def shutdown(ctx: dict[str, Any]) -> None:
    session: aiohttp.ClientSession | None = ctx.get("session")
    if session is not None:
        await session.close()
    log.info("worker_stopped", worker_id=ctx["settings"].worker_id)


async def fetch_batch(ctx: dict[str, Any], payload: dict[str, Any]) -> dict[str, Any]:
    batch = batch_from_job(payload)
    settings: Settings = ctx["settings"]
    # arq keeps a running job in its queue until it ends, so every worker with a free slot
    # re-checks every running job on every poll (WATCH, EXISTS, ZSCORE): a cost that grows with
    # the fleet. The frontier's lease, not arq's retry, brings a lost batch back, so the job
    # can leave arq's queue as soon as it starts.
    await ctx["redis"].zrem(Keys(settings.namespace).arq_queue, ctx["job_id"])
    run = BatchRun(ctx, batch)
    if not await run.store.claim(batch, lease_until=time.time() + settings.lease_seconds):
        run.log.warning("batch_stale", reason="lease no longer held")
        return {"stale": True}
    return await run.run()


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
        self.keys = Keys(self.settings.namespace)
        self.batch = batch
        self.log = log.bind(worker_id=self.settings.worker_id, job_id=ctx.get("job_id"),
                            host=batch.host, batch_id=batch.batch_id)
        self.host_slots = asyncio.Semaphore(self.settings.per_host_concurrency)
        self.pending: list[StoredResult] = []
        self.links: dict[int, set[str]] = defaultdict(set)
        self.pages = self.failed = self.skipped = self.retried = 0
        self.last_flush = time.monotonic()
        self.flush_lock = asyncio.Lock()
        # Politeness state: seconds between request starts, the next allowed start
        # (monotonic), the latest start (wall clock, for the host's next batch).
        self.delay = self.settings.crawl_delay
        self.pace_lock = asyncio.Lock()
        self.next_start = 0.0
        self.last_start = 0.0
        self.last_start_mono = 0.0
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

    async def _pace(self) -> None:
        """Wait for this host's next allowed request start, and claim it."""
        async with self.pace_lock:
            now = time.monotonic()
            if self.next_start > now:
                await asyncio.sleep(self.next_start - now)
                now = time.monotonic()
            self.next_start = now + self.delay
            self.last_start = time.time()
            self.last_start_mono = now

    async def _prepare_robots(self) -> None:
        """robots.txt of each origin in the batch (one, almost always) before any page."""
        origins = {origin_of(entry.url): entry.url for entry in self.batch.urls}
        for url in origins.values():
            async with self.host_slots, self.global_slots:
                policy = await self.robots.policy(url, before_fetch=self._pace)
            if policy.state == DISALLOW_ALL:
                # 5xx or unreachable: nothing may be fetched until it is tried again.
                self.halt("robots_unavailable", until=policy.expires_at)
            elif policy.crawl_delay:
                self.delay = max(self.delay,
                                 min(policy.crawl_delay, self.settings.max_crawl_delay))
                # robots.txt itself was a request: the first page waits the new delay after it.
                if self.last_start_mono:
                    self.next_start = max(self.next_start, self.last_start_mono + self.delay)

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
            await self._pace()
            fetched = await fetch(
                self.session, entry.url, max_body_bytes=self.settings.max_body_bytes,
                max_redirects=self.settings.max_redirects,
                allow_private=self.settings.allow_private,
                deadline=self.settings.request_timeout, may_follow=self._may_follow,
            )
        if is_retryable(fetched.error):
            self._handle_transient(entry, fetched)
            if entry.retries < self.settings.max_retries:
                return  # queued again; the result waits for the last try
        result, links, aliases = build_result(entry, fetched, self.settings)
        if links:
            self.links[entry.depth + 1].update(links)
        outcome = PAGE if result.error is None else FAILED
        if is_retryable(result.error):
            outcome = DEAD  # out of retries
        self._store(entry, outcome, result)
        for alias in aliases:
            self.pending.append(StoredResult(fingerprint(alias.url), ALIAS, encode(alias)))
        self.log.info("page", url=entry.url, status=result.status, error=result.error,
                      elapsed_ms=result.elapsed_ms, bytes=result.bytes, links=result.links,
                      depth=entry.depth, redirects=len(result.redirects) or None)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            await self.flush(final=False)

    def _handle_transient(self, entry: QueuedURL, fetched: Fetched) -> None:
        """Back the whole host off; after a few transient failures in a row, stop the batch
        rather than hammering a failing host URL by URL."""
        self.transient_failures += 1
        wait = backoff_delay(
            entry.retries, base=self.settings.retry_base, cap=self.settings.retry_max,
            retry_after=parse_retry_after(fetched.retry_after),
        )
        self.host_not_before = max(self.host_not_before, time.time() + wait)
        if entry.retries < self.settings.max_retries:
            retry = QueuedURL(entry.v, entry.fp, entry.url, entry.depth, entry.tries,
                              entry.retries + 1)
            self.pending.append(StoredResult(entry.fp, RETRY, encode(retry)))
            self.retried += 1
            self.log.info("retry_scheduled", url=entry.url, error=fetched.error,
                          status=fetched.status, retries=entry.retries + 1,
                          in_s=round(wait, 2))
        if self.transient_failures >= TRANSIENT_FAILURES_TO_HALT:
            self.halt("host_failing", until=self.host_not_before)

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
        await self._pace()  # each hop is a request to this host
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
            next_ready = max(now, self.last_start + self.delay, self.host_not_before)
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


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` keyword arguments for these settings."""
    keys = Keys(settings.namespace)
    job_timeout = settings.batch_size * settings.request_timeout + 60
    return {
        "functions": [
            # max_tries=1: arq must not re-run a batch whose worker vanished; the frontier's
            # lease brings those URLs back instead, and never to two workers at once.
            func(fetch_batch, name=JOB_FUNCTION, max_tries=1, timeout=job_timeout),
        ],
        "on_startup": startup,
        "on_shutdown": shutdown,
        "queue_name": keys.arq_queue,
        "max_jobs": settings.jobs_per_worker,
        "poll_delay": settings.poll_delay,
        "keep_result": 0,
        # SIGTERM: stop taking jobs, let running batches finish for this long, then cancel
        # them, which stores what is done and hands the rest back to the frontier.
        "job_completion_wait": int(settings.shutdown_grace),
        "job_serializer": job_serializer,
        "job_deserializer": job_deserializer,
        "health_check_key": f"{keys.arq_queue}:health-check:{settings.worker_id}",
        "ctx": {"settings": settings},
    }


# redis-py reports a connection lost during WATCH as a WatchError; arq's poll WATCHes.
POLL_FAILURES: tuple[type[Exception], ...] = (*REDIS_UNAVAILABLE, WatchError)


class CrawlWorker(Worker):
    """arq's worker, riding out Redis outages: a failed poll waits and polls again instead of
    ending the process (and, under Kubernetes, starting a crash loop)."""

    _backoff = 0.1

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq 0.28 takes a job slot (semaphore and counter) before its WATCH and does not give
        # it back when Redis drops the connection there, so each outage would cost the worker
        # a slot for good. Start one job at a time and return the slot on that path.
        for job_id in job_ids:
            try:
                await super().start_jobs([job_id])
            except POLL_FAILURES:
                self.job_counter -= 1
                self.sem.release()
                raise

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except POLL_FAILURES as exc:
            log.warning("redis_unavailable", error=str(exc), retry_in=self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)
        else:
            self._backoff = 0.1

    async def close(self) -> None:
        try:
            await super().close()
        except REDIS_UNAVAILABLE as exc:  # the health-check key expires by itself
            log.warning("redis_unavailable_at_shutdown", error=str(exc))


def make_worker(settings: Settings, *, handle_signals: bool = True) -> Worker:
    return CrawlWorker(
        **worker_options(settings),
        redis_pool=open_redis(settings.redis_url, queue_name=Keys(settings.namespace).arq_queue),
        handle_signals=handle_signals,
    )


def run_worker(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level, worker_id=settings.worker_id)
    with contextlib.suppress(asyncio.CancelledError):
        make_worker(settings).run()


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for ``arq crawlfleet.workers.worker.WorkerSettings``, built on first use
    from the environment, so importing this module never fails on a bad variable."""
    if name == "WorkerSettings":
        settings = Settings.from_env()
        options = worker_options(settings)
        options["redis_pool"] = open_redis(
            settings.redis_url, queue_name=Keys(settings.namespace).arq_queue
        )
        return type("WorkerSettings", (), options)
    raise AttributeError(name)
