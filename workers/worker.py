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
from arq import func
from arq.worker import Worker

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

from .fetch import Fetched, GuardedResolver, fetch
from .parse import BodyError, ParsedPage, is_html, parse_page, sniff_html
from .store import FAILED, PAGE, ReportOutcome, Store, StoredResult

JOB_FUNCTION = "fetch_batch"
FLUSH_EVERY_S = 1.0  # report finished pages at least this often, so a kill loses little

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
    run = BatchRun(ctx, batch)
    if not await run.store.claim(batch, lease_until=time.time() + settings.lease_seconds):
        run.log.warning("batch_stale", reason="lease no longer held")
        return {"stale": True}
    return await run.run()


class BatchRun:
    """One host batch in progress: fetches, buffered results, lease renewal."""

    def __init__(self, ctx: dict[str, Any], batch: HostBatch) -> None:
        self.settings: Settings = ctx["settings"]
        self.session: aiohttp.ClientSession = ctx["session"]
        self.global_slots: asyncio.Semaphore = ctx["semaphore"]
        self.store: Store = ctx["store"]
        self.batch = batch
        self.log = log.bind(worker_id=self.settings.worker_id, job_id=ctx.get("job_id"),
                            host=batch.host, batch_id=batch.batch_id)
        self.host_slots = asyncio.Semaphore(self.settings.per_host_concurrency)
        self.pending: list[StoredResult] = []
        self.links: dict[int, set[str]] = defaultdict(set)
        self.pages = self.failed = 0
        self.last_flush = time.monotonic()
        self.flush_lock = asyncio.Lock()
        self.lease_lost = False

    async def run(self) -> dict[str, Any]:
        started = time.monotonic()
        renew = asyncio.create_task(self._renew_lease())
        try:
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
                      failed=self.failed, elapsed_ms=elapsed, lease_held=outcome.lease_held)
        return {"pages": self.pages, "failed": self.failed}

    async def _crawl_one(self, entry: QueuedURL) -> None:
        if self.lease_lost:
            return
        async with self.host_slots, self.global_slots:
            fetched = await fetch(
                self.session, entry.url, max_body_bytes=self.settings.max_body_bytes,
                allow_private=self.settings.allow_private,
                deadline=self.settings.request_timeout,
            )
        result, links = build_result(entry, fetched, self.settings)
        if links:
            self.links[entry.depth + 1].update(links)
        outcome = PAGE if result.error is None else FAILED
        if outcome == PAGE:
            self.pages += 1
        else:
            self.failed += 1
        self.pending.append(StoredResult(entry.fp, outcome, encode(result)))
        self.log.info("page", url=entry.url, status=result.status, error=result.error,
                      elapsed_ms=result.elapsed_ms, bytes=result.bytes, links=result.links,
                      depth=entry.depth)
        if time.monotonic() - self.last_flush >= FLUSH_EVERY_S:
            await self.flush(final=False)

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
                failed=sum(r.outcome == FAILED for r in results), final=final,
            )
            outcome = await self.store.report(self.batch, results, discovered, now=now,
                                              next_ready=now)
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
                self.lease_lost = True
                self.log.warning("lease_lost")
                return


def build_result(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> tuple[PageResult, list[str]]:
    """Turn a fetch into a page result and the links to follow from it (pure)."""
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
        links = parsed.links
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
    return result, links


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


class CrawlWorker(Worker):
    """arq's worker, riding out Redis outages: a failed poll waits and polls again instead of
    ending the process (and, under Kubernetes, starting a crash loop)."""

    _backoff = 0.1

    async def _poll_iteration(self) -> None:
        try:
            await super()._poll_iteration()
        except REDIS_UNAVAILABLE as exc:
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
