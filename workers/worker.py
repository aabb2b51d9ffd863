"""The arq worker: one job fetches one host batch and reports back.

Per process: ONE ``aiohttp.ClientSession`` over a pooled ``TCPConnector`` whose resolver is aiodns
pointed at ``CRAWLFLEET_DNS_NAMESERVERS``, and ONE ``asyncio.Semaphore`` bounding fetches in flight
across all jobs. Per job: at most ``CRAWLFLEET_PER_HOST_CONCURRENCY`` fetches at once, which, with
one batch per host at a time, is the limit for the whole fleet.

``crawlfleet worker`` runs this. ``arq crawlfleet.workers.worker.WorkerSettings`` runs the same
job as arq's plain Worker: arq's plain-text logs, and no waiting out a missing Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
from arq import func
from arq.worker import Worker
from redis.exceptions import RedisError

from crawlfleet.common.addresses import allowed_port_numbers, parse_networks, proxy_host_of
from crawlfleet.common.cluster import Cluster, bind_shard, check_unsharded
from crawlfleet.common.connections import (
    REDIS_UNAVAILABLE,
    as_text,
    is_refused,
    is_transient,
    listen_for_wakes,
    open_redis,
    redact_url,
    redis_problem,
    retry_while_unavailable,
    wait_for_redis,
)
from crawlfleet.common.frontier import Frontier, StateLost
from crawlfleet.common.heap import tune_for_crawling
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging, get_logger
from crawlfleet.common.messages import (
    FETCH_BATCH_JOB,
    batch_from_job,
    job_deserializer,
    job_serializer,
)
from crawlfleet.common.metrics import serve_metrics
from crawlfleet.common.settings import Settings, SettingsError

from .batch import BatchRun, lease_size, spare_slots
from .fetch import HostCookieJar
from .guard import GuardedResolver, SessionGuard, guard_session
from .links import LinkFilter
from .pacing import PacedRequest
from .robots import RobotsCache
from .warc import open_warc

log = get_logger("crawlfleet.worker")


@contextlib.asynccontextmanager
async def worker_session(settings: Settings) -> AsyncIterator[aiohttp.ClientSession]:
    """The worker's one session and its aiodns resolver, both closed on the way out: aiohttp
    does not close a resolver it was handed, and one left open calls back into a closed loop.

    The SSRF guard is the resolver (every name the connector resolves) plus the session's
    ``SessionGuard`` (IP literals, ports, and through a proxy each target's name)."""
    proxy_host = proxy_host_of(settings.proxy) if settings.proxy else None
    resolver = GuardedResolver(
        allow_private=settings.allow_private,
        allow_networks=parse_networks(settings.allow_networks),
        # The proxy is the operator's own choice, private address or not; the targets behind
        # it are checked by the session's guard instead.
        exempt_hosts=(proxy_host,) if proxy_host else (),
        nameservers=list(settings.dns_nameservers),
    )
    session = _build_session(settings, resolver)
    try:
        yield session
    finally:
        await session.close()
        await resolver.close()


def _build_session(settings: Settings, resolver: GuardedResolver) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=settings.max_in_flight,
        limit_per_host=settings.per_host_concurrency,
        ttl_dns_cache=settings.dns_cache_ttl,
        resolver=resolver,
        enable_cleanup_closed=True,
    )
    # No total: the session's timer would run while a request waits for its host's turn (a
    # crawl delay can be 30 s). fetch()'s deadline bounds the whole fetch without pacing waits.
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=settings.connect_timeout,
        sock_read=settings.read_timeout,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        headers={"User-Agent": settings.user_agent},
        cookie_jar=HostCookieJar(),  # per host: set by one page, sent to that host only
        # Every request, robots.txt included, through CRAWLFLEET_PROXY. Its credentials stay in
        # the URL: aiohttp turns them into Proxy-Authorization (on the request, or on CONNECT
        # for https), and they appear in no error message. trust_env stays off, so HTTP_PROXY
        # and friends are ignored.
        proxy=settings.proxy,
        # Explicit, so that a later aiohttp cannot loosen them (a 1 MB header is 'protocol').
        max_line_size=settings.max_header_bytes,
        max_field_size=settings.max_header_bytes,
        raise_for_status=False,
        request_class=PacedRequest,  # pacing's turn ends when a request is on the wire
    )
    guard_session(session, SessionGuard(
        resolver,
        allowed_ports=allowed_port_numbers(settings.allowed_ports),
        via_proxy=settings.proxy is not None,
        cache_ttl=settings.dns_cache_ttl,
    ))
    return session


async def open_shared(settings: Settings, resources: contextlib.AsyncExitStack,
                      taking_jobs: Any) -> dict[str, Any]:
    """What one worker process has once, whatever its shards: the session, the fetch slots,
    the link filter (its scope), the WARC writer, the metrics server."""
    shared: dict[str, Any] = {}
    shared["session"] = await resources.enter_async_context(worker_session(settings))
    shared["semaphore"] = asyncio.Semaphore(settings.max_in_flight)
    shared["turns"] = set()  # the BatchRuns running in the process, all shards (Keys.hungry)
    shared["links"] = LinkFilter(settings)
    shared["warc"] = warc = open_warc(settings)
    if warc is not None:
        # Closed before the session (the stack unwinds backwards), after arq has stopped the
        # jobs: the last file is renamed from .open, and uploaded for an s3:// output.
        resources.push_async_callback(warc.close)
    # /healthz turns 503 once the worker stops taking jobs (SIGTERM's grace); closed first.
    await resources.enter_async_context(serve_metrics(
        settings.metrics_port, role="worker", healthy=taking_jobs))
    log.info("worker_started", worker_id=settings.worker_id, max_in_flight=settings.max_in_flight,
             nameservers=list(settings.dns_nameservers) or "system",
             warc=str(warc.series.directory) if warc is not None else None,
             shards=len(settings.shard_urls))
    return shared


async def startup(ctx: dict[str, Any]) -> None:
    settings: Settings = ctx["settings"]
    # arq's start-up and shut-down are two hooks, so the session's context spans them. With
    # several shards the process opened its shared part already (run_sharded_workers).
    ctx["resources"] = contextlib.AsyncExitStack()
    if "session" not in ctx:
        ctx.update(await open_shared(settings, ctx["resources"], ctx.get("taking_jobs")))
    ctx["keys"] = keys = Keys(settings.namespace)
    cluster: Cluster | None = ctx.get("cluster")
    if cluster is not None:
        shard = cluster.shards[ctx["shard"]]
        await bind_shard(ctx["redis"], keys, shard.index, len(cluster), shard.where)
        ctx["limits"] = shard.limits
    else:
        await check_unsharded(ctx["redis"], keys, settings.redis_where)
    ctx["frontier"] = Frontier(ctx["redis"], keys)
    ctx["robots"] = RobotsCache(ctx["redis"], keys, ctx["session"], settings)
    tune_for_crawling()  # start-up is over: what it made stays, pages' garbage is short-lived


async def shutdown(ctx: dict[str, Any]) -> None:
    resources: contextlib.AsyncExitStack | None = ctx.get("resources")
    if resources is not None:
        await resources.aclose()
    if ctx.get("cluster") is None:
        log.info("worker_stopped", worker_id=ctx["settings"].worker_id)


async def fetch_batch(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One arq job: claim the batch (its URLs come from the lease), then run it."""
    settings: Settings = ctx["settings"]
    frontier: Frontier = ctx["frontier"]
    job_id: str = ctx["job_id"]
    try:
        if len(args) != 1 or kwargs:
            raise ValueError(f"expected one argument, got {len(args)} and {sorted(kwargs)}")
        batch = batch_from_job(args[0])
    except (ValueError, TypeError, msgspec.ValidationError) as exc:
        # Set aside with the reason; its batch, if it had one, comes back through expire.lua
        # when nobody claims it.
        reason = str(exc)[:300]
        log.error("job_unreadable", job_id=job_id, error=reason)
        data = job_serializer({"args": args, "kwargs": kwargs})
        await retry_while_unavailable(lambda: frontier.quarantine(
            ctx["keys"].arq_job(job_id), reason, data, withdraw_job=job_id))
        return {"quarantined": True}
    bound = log.bind(worker_id=settings.worker_id, job_id=job_id, host=batch.host,
                     batch_id=batch.batch_id)
    # arq keeps a running job in its queue until it ends, so every worker with a free slot
    # would re-check every running job on every poll: the claim takes the job out of arq's
    # queue in the same round trip (the frontier's lease, not arq's retry, brings a lost
    # batch back). The lease's clock starts here, not at dispatch.
    try:
        claim = await retry_while_unavailable(lambda: frontier.claim(
            batch, lease_seconds=settings.lease_seconds, job_id=job_id))
    except StateLost:
        bound.error("state_lost", detail="the crawl's state in Redis is gone; batch dropped")
        return {"state_lost": True}
    if claim is None:
        bound.warning("batch_stale", reason="lease no longer held")
        return {"stale": True}
    links: LinkFilter = ctx["links"]
    if claim.scope_size != links.scope_size:
        # New seeds since the last claim: the worker filters links with the seeds' hosts.
        keys: Keys = ctx["keys"]
        redis: Any = ctx["redis"]
        hosts, ports = await retry_while_unavailable(lambda: asyncio.gather(
            redis.smembers(keys.scope_hosts), redis.smembers(keys.scope_ports)))
        links.set_scope({as_text(h) for h in hosts}, {int(p) for p in ports},
                        claim.scope_size)
    return await BatchRun(ctx, batch, claim).run()


def wanted_hosts(free_slots: int, max_in_flight: int, per_host_concurrency: int,
                 hosts_held: int, free_jobs: int) -> int:
    """How many more hosts a worker process can fetch at their full concurrency: the fetch
    slots that are free now and that the hosts it holds (all shards) could not take at
    theirs, in whole hosts, at most its free job slots. A worker busy with as many hosts as
    its slots serve wants none, even when a moment leaves a few slots free (otherwise two busy
    workers would pass hosts back and forth)."""
    per_host = max(per_host_concurrency, 1)
    spare = min(free_slots, spare_slots(max_in_flight, per_host, hosts_held))
    return max(0, min(spare // per_host, free_jobs))


def worker_options(settings: Settings) -> dict[str, Any]:
    """The arq ``Worker`` keyword arguments for these settings."""
    keys = Keys(settings.namespace)
    # A turn refills for host_turn_seconds, then drains its lease; pacing waits (up to
    # max_crawl_delay a request) are outside each fetch's own timeout.
    job_timeout = int(settings.host_turn_seconds + lease_size(settings) * (
        settings.fetch_timeout + settings.max_crawl_delay) + 60)
    return {
        "functions": [
            # max_tries=1: arq must not re-run a batch whose worker vanished; the frontier's
            # lease brings those URLs back instead, and never to two workers at once.
            func(fetch_batch, name=FETCH_BATCH_JOB, max_tries=1, timeout=job_timeout),
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
        # One key per worker, written often: `crawlfleet health` (the pod's probe) reads it.
        "health_check_key": keys.arq_health_check(settings.worker_id),
        "health_check_interval": max(1, round(settings.health_check_interval)),
        "ctx": {"settings": settings},
    }


# Any Redis error in arq's poll: an outage, BUSY, OOM, READONLY, a WatchError (redis-py's word
# for a connection lost during WATCH), even a key of the wrong type. None ends the worker.
POLL_FAILURES: tuple[type[Exception], ...] = (*REDIS_UNAVAILABLE, RedisError)


class CrawlWorker(Worker):
    """arq's worker, riding out Redis outages: a failed poll waits and polls again instead of
    ending the process (and, under Kubernetes, starting a crash loop). Its polls slow down
    while they find nothing, from CRAWLFLEET_POLL_DELAY up to CRAWLFLEET_POLL_MAX_DELAY, and
    are back at the fast pace at once when the scheduler queues jobs (dispatch.lua publishes
    on ``Keys.arq_wake``), when one comes, or when one of its own ends: an idle fleet costs
    Redis a fraction of what it did, and a job is taken as soon as before."""

    _backoff = 0.1
    redis_url = ""  # for messages only, always shown through redact_url()
    _polls_found = 0  # polls whose read of the queue returned job ids
    _interval = 0.0  # seconds between polls now; 0: every poll_delay
    _wake: asyncio.Event | None = None
    _listener: asyncio.Task[None] | None = None

    async def main(self) -> None:
        # arq's main() first pings Redis (log_redis_info) and ends the process if it is not
        # there, long before _poll_iteration could ride the outage out. Wait for it first, as
        # the scheduler does; meanwhile no health check is written, so the worker shows as not
        # ready. A Redis that refuses us (a wrong password) raises RedisProblem instead.
        self.ctx["taking_jobs"] = lambda: self.allow_pick_jobs  # for /healthz
        while True:
            await wait_for_redis(self.pool, self.redis_url, role="worker")
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen_for_work())
            try:
                await super().main()
                return
            except POLL_FAILURES as exc:
                # Lost again between the ping and the start-up hook: wait again. Once the hook
                # has run, the poll loop rides outages out itself, so this is something else.
                if "resources" in self.ctx or not is_transient(exc):
                    if is_refused(exc):
                        raise redis_problem(exc, self.redis_url) from None
                    raise

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        if job_ids:
            self._polls_found += 1
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

    def _work_may_be_there(self) -> None:
        """Poll at the fast pace again, from now (and end a slowed-down wait)."""
        self._interval = 0.0
        if self._wake is not None:
            self._wake.set()

    async def run_job(self, job_id: str, score: int) -> None:
        try:
            await super().run_job(job_id, score)
        finally:
            self._work_may_be_there()  # a slot is free, and its host's next turn may come

    async def _listen_for_work(self) -> None:
        """The scheduler's word that it queued jobs (Keys.arq_wake). Without it (Redis away,
        the subscription lost) the polls still come, at most CRAWLFLEET_POLL_MAX_DELAY apart."""
        settings: Settings = self.ctx["settings"]
        await listen_for_wakes(self.pool, Keys(settings.namespace).arq_wake,
                               self._work_may_be_there, retry_s=settings.poll_max_delay)

    async def _poll_iteration(self) -> None:
        found = self._polls_found
        try:
            await super()._poll_iteration()
            if self._polls_found == found:
                await self._ask_for_hosts()
        except POLL_FAILURES as exc:
            event = "redis_unavailable" if is_transient(exc) else "redis_error"
            log.warning(event, error=redact_url(str(exc)), retry_in=self._backoff)
            await asyncio.sleep(self._backoff)
            self._backoff = min(self._backoff * 2, 5.0)
            return
        self._backoff = 0.1
        if self._polls_found != found or self.job_counter >= self.max_jobs:
            self._interval = 0.0  # work came, or the slots are full (no poll reads then)
            return
        settings: Settings = self.ctx["settings"]
        self._interval = min(max(2 * self._interval, self.poll_delay_s),
                             settings.poll_max_delay)
        if self._interval > self.poll_delay_s:
            # arq's loop waits poll_delay less this iteration's time: waiting here sets the
            # pace. A job of ours ending wakes it. Never past the health check's next write
            # (arq writes it from this loop, to expire one second after it is due): an idle
            # worker must not look dead to its probe.
            health_due = self._last_health_check + self.health_check_interval - time.time()
            wait = min(self._interval, max(health_due, 0.0))
            wake = self._wake = self._wake or asyncio.Event()
            wake.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(wake.wait(), wait)

    async def _ask_for_hosts(self) -> None:
        """After a poll that found no job: say how many more hosts this worker would fetch at
        their full concurrency (Keys.hungry), so that a worker whose hosts wait for its fetch
        slots hands one over at its next refill (progress.lua). At the end of a crawl, one
        worker may still hold many hosts while another has none."""
        settings: Settings = self.ctx["settings"]
        if spare_slots(settings.max_in_flight, settings.per_host_concurrency,
                       settings.jobs_per_worker) >= 0:
            return  # a worker's hosts never want more slots than it has (the defaults): no one
            # is ever short of them, and an idle fleet sends nothing more
        slots, turns = self.ctx.get("semaphore"), self.ctx.get("turns")
        if slots is None or turns is None or not self.allow_pick_jobs or slots.locked():
            return
        # asyncio.Semaphore has no public count of its free slots.
        hosts = wanted_hosts(slots._value, settings.max_in_flight, settings.per_host_concurrency,
                             len(turns), self.max_jobs - self.job_counter)
        if hosts > 0:
            ttl_ms = round(1000 * max(1.0, 3 * settings.poll_max_delay))
            await self.pool.set(Keys(settings.namespace).hungry, hosts, px=ttl_ms)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError, *POLL_FAILURES):
                await self._listener
            self._listener = None
        try:
            await super().close()
        except POLL_FAILURES as exc:  # the health-check key expires by itself
            log.warning("redis_unavailable_at_shutdown", error=redact_url(str(exc)))
            # arq stops at the failed DELETE: the start-up's resources (the session and its
            # resolver) and the pool must still be closed.
            if "resources" in self.ctx and self.on_shutdown:
                with contextlib.suppress(*POLL_FAILURES):
                    await self.on_shutdown(self.ctx)
            if self._pool is not None:
                with contextlib.suppress(*POLL_FAILURES):
                    await self._pool.aclose(close_connection_pool=True)
                self._pool = None


def make_worker(settings: Settings, *, handle_signals: bool = True) -> Worker:
    worker = CrawlWorker(
        **worker_options(settings),
        redis_pool=open_redis(settings.redis_url, queue_name=Keys(settings.namespace).arq_queue),
        handle_signals=handle_signals,
    )
    worker.redis_url = settings.redis_url
    return worker


def run_worker(settings: Settings) -> None:
    """Run a worker until SIGTERM/SIGINT. A Redis that is not there yet is waited for; one
    that refuses us raises :class:`RedisProblem` (the CLI prints it on one line)."""
    configure_logging(settings.log_format, settings.log_level, worker_id=settings.worker_id)
    if len(settings.shard_urls) > 1:
        from .sharded import run_sharded_workers

        asyncio.run(run_sharded_workers(settings))
        return
    with contextlib.suppress(asyncio.CancelledError):
        make_worker(settings).run()


def __getattr__(name: str) -> Any:
    """``WorkerSettings`` for ``arq crawlfleet.workers.worker.WorkerSettings``, built on first use
    from the environment, so importing this module never fails on a bad variable (a bad one
    ends ``arq`` with the one-line message, exit 2, instead of a traceback)."""
    if name == "WorkerSettings":
        try:
            settings = Settings.from_env()
        except SettingsError as exc:
            print(f"crawlfleet worker: {exc}", file=sys.stderr)
            raise SystemExit(2) from None
        options = worker_options(settings)
        options["redis_pool"] = open_redis(
            settings.redis_url, queue_name=Keys(settings.namespace).arq_queue
        )
        return type("WorkerSettings", (), options)
    raise AttributeError(name)
