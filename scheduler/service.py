"""The scheduler process: reads events, grows the frontier, hands out host batches as arq jobs.

One loop, all state in Redis: events (seeds, workers' link reports) are read with a consumer
group and acknowledged inside the same Lua script that admits their URLs, so a scheduler killed
at any instant loses nothing (its pending events are read again by whoever leads next).

Several schedulers may run: one holds a lock with a short expiry and works; the others wait and
take over within ``LOCK_TTL`` seconds of its death. A Redis outage pauses the loop (with
backoff) instead of ending the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import msgspec
from arq.connections import ArqRedis

from crawlfleet.common.connections import REDIS_UNAVAILABLE, as_text, is_embedded
from crawlfleet.common.keys import CONSUMER_GROUP, Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.messages import (
    FETCH_BATCH_JOB,
    VERSION,
    Discovered,
    HostBatch,
    MessageVersionError,
    QueuedURL,
    Seeds,
    decode_event,
    encode,
)
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import URLError, canonicalize, fingerprint, host_key

from .frontier import Admission, Frontier
from .scope import ScopeRules, out_of_scope, query_variant_key

CONSUMER = "scheduler"  # one name for every leader, so a new one reads the old one's pending
READ_COUNT = 256
LOCK_TTL = 5.0
STANDBY_POLL = 0.5
HOUSEKEEPING_INTERVAL = 0.5
PROGRESS_INTERVAL = 5.0

log = get_logger("crawlfleet.scheduler")


# Take the lock if it is free, or keep it if it is ours; 0 when another scheduler holds it.
# Renewing with it is safe: a lock that expired and was not taken has no other leader.
_ACQUIRE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
return 0
"""
_RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Scheduler:
    def __init__(self, settings: Settings, redis: ArqRedis) -> None:
        self.settings = settings
        # redis-py types asyncio commands as `Awaitable[T] | T`; this client is asyncio only.
        self.redis: Any = redis
        self.keys = Keys(settings.namespace)
        self.frontier = Frontier(redis, self.keys)
        self.allowed_hosts: set[str] = set()
        self.rules = ScopeRules.from_settings(settings)
        # fakeredis does not block on XREADGROUP; the embedded backend polls instead.
        self._blocking = not is_embedded(settings.redis_url)
        self.instance = settings.worker_id
        self._acquire_lock = redis.register_script(_ACQUIRE_LOCK)
        self._release_lock = redis.register_script(_RELEASE_LOCK)

    async def run(self, stop: asyncio.Event) -> None:
        """Lead when the lock is free, stand by otherwise, until ``stop`` is set."""
        backoff = 0.1
        standby_logged = False
        while not stop.is_set():
            try:
                if await self.acquire_lock():
                    standby_logged = False
                    await self.lead(stop)
                elif not standby_logged:
                    log.info("scheduler_standby", leader=as_text(
                        await self.redis.get(self.keys.scheduler_lock) or b"?"))
                    standby_logged = True
                backoff = 0.1
            except REDIS_UNAVAILABLE as exc:
                log.warning("redis_unavailable", error=str(exc), retry_in=backoff)
                backoff = min(backoff * 2, 5.0)
                await _sleep_or_stop(stop, backoff)
                continue
            await _sleep_or_stop(stop, STANDBY_POLL)
        # If Redis is down, the lock expires by itself.
        with contextlib.suppress(*REDIS_UNAVAILABLE):
            await self._release_lock(keys=[self.keys.scheduler_lock], args=[self.instance])
        log.info("scheduler_stopped")

    async def acquire_lock(self) -> bool:
        return bool(await self._acquire_lock(keys=[self.keys.scheduler_lock],
                                             args=[self.instance, int(LOCK_TTL * 1000)]))

    async def lead(self, stop: asyncio.Event) -> None:
        """Work while the lock stays ours."""
        await self.frontier.ensure_group()
        self.allowed_hosts = {as_text(h) for h in await self.redis.smembers(self.keys.scope_hosts)}
        log.info("scheduler_leading", instance=self.instance, namespace=self.settings.namespace,
                 scope_hosts=len(self.allowed_hosts))
        # Events a leader read but had not acknowledged when it stopped come first.
        while await self.read_events(pending=True):
            pass
        next_housekeeping = next_progress = 0.0
        while not stop.is_set():
            read = await self.read_events(block_ms=50 if self._blocking else None)
            dispatched = await self.dispatch()
            now = time.time()
            if now >= next_housekeeping:
                if not await self.acquire_lock():
                    log.warning("scheduler_lock_lost", instance=self.instance)
                    return
                await self.housekeeping(now)
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
            if now >= next_progress:
                await self.log_progress()
                next_progress = now + PROGRESS_INTERVAL
            if not read and not dispatched and not self._blocking:
                await asyncio.sleep(0.005)

    async def read_events(self, *, block_ms: int | None = None, pending: bool = False) -> int:
        """Read and ingest one slice of events; returns how many were read."""
        response = await self.redis.xreadgroup(
            CONSUMER_GROUP, CONSUMER, {self.keys.events: "0" if pending else ">"},
            count=READ_COUNT, block=block_ms,
        )
        messages = response[0][1] if response else []
        if not messages:
            return 0
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, fields in messages:
                await self._ingest_event(pipe, as_text(message_id), fields, now)
            await pipe.execute()
        return len(messages)

    async def _ingest_event(
        self, pipe: Any, message_id: str, fields: dict[Any, Any], now: float
    ) -> None:
        try:
            event = decode_event(fields.get(b"m") or fields.get("m") or b"")
        except (msgspec.DecodeError, msgspec.ValidationError, MessageVersionError) as exc:
            # Acknowledge it all the same: a message nobody can read must not block the stream.
            log.error("event_unreadable", message_id=message_id, error=str(exc))
            await self.frontier.ingest_in(pipe, [], now=now, max_pages=None,
                                          message_id=message_id, discarded_invalid=1)
            return
        if isinstance(event, Seeds):
            groups = [(0, event.urls)]
            seed_hosts = set()
            for url in event.urls:
                try:
                    seed_hosts.add(host_key(canonicalize(url)))
                except URLError:
                    continue
            new_hosts = seed_hosts - self.allowed_hosts
            if new_hosts:
                self.allowed_hosts |= new_hosts
                pipe.sadd(self.keys.scope_hosts, *sorted(new_hosts))
        else:
            assert isinstance(event, Discovered)
            groups = [(g.depth, g.urls) for g in event.groups]
        admissions, discarded_scope, discarded_invalid = self.admissions(groups)
        await self.frontier.ingest_in(
            pipe, admissions, now=now, max_pages=self.settings.max_pages, message_id=message_id,
            discarded_scope=discarded_scope, discarded_invalid=discarded_invalid,
            max_pages_per_host=self.settings.max_pages_per_host,
            max_query_variants=self.settings.max_query_variants,
        )

    def admissions(self, groups: list[tuple[int, list[str]]]) -> tuple[list[Admission], int, int]:
        """Canonicalise and scope-check links: (admissions, refused by scope, invalid)."""
        admissions: list[Admission] = []
        scope_refused = invalid = 0
        batch_seen: set[str] = set()
        for depth, urls in groups:
            for url in urls:
                try:
                    canonical = canonicalize(url, sort_query=self.settings.sort_query)
                except URLError:
                    invalid += 1
                    continue
                host = host_key(canonical)
                if out_of_scope(canonical, host, depth, allowed_hosts=self.allowed_hosts,
                                rules=self.rules):
                    scope_refused += 1
                    continue
                fp = fingerprint(canonical)
                if fp in batch_seen:
                    continue
                batch_seen.add(fp)
                entry = encode(QueuedURL(VERSION, fp, canonical, depth))
                variant = query_variant_key(canonical)
                admissions.append(Admission(fp, host, entry,
                                            fingerprint(variant) if variant else ""))
        return admissions, scope_refused, invalid

    async def dispatch(self) -> int:
        """Lease ready hosts while fewer than ``dispatch_ahead`` batches wait for a worker."""
        now = time.time()
        batches = await self.frontier.dispatch(
            now=now, lease_seconds=self.settings.lease_seconds,
            batch_size=self.settings.batch_size, max_waiting=self.settings.dispatch_ahead,
        )
        for batch in batches:
            job = HostBatch(batch_id=batch.batch_id, host=batch.host, urls=batch.urls,
                            dispatched_at=now)
            # If this process dies before the job is written, the lease expires and the URLs
            # go back to their host queue: the lease, not arq, is the source of truth.
            await self.redis.enqueue_job(
                FETCH_BATCH_JOB, msgspec.to_builtins(job), _job_id=batch.batch_id,
                _queue_name=self.keys.arq_queue,
            )
        return len(batches)

    async def housekeeping(self, now: float) -> None:
        hosts, urls, lost = await self.frontier.expire_leases(
            now=now, max_losses=self.settings.max_worker_losses
        )
        if hosts:
            log.warning("leases_expired", hosts=hosts, urls=urls, given_up=lost)
        await self.frontier.check_finished(now=now)
        old = [b for b in await self.redis.hkeys(self.keys.rate) if int(b) < now - 120]
        if old:
            await self.redis.hdel(self.keys.rate, *old)

    async def log_progress(self) -> None:
        from crawlfleet.common.stats import read_status

        status = await read_status(self.redis, self.keys)
        fields = ("seen", "pages", "failed", "skipped", "queued", "in_flight", "pages_per_s",
                  "finished")
        log.info("progress", **{k: status[k] for k in fields})



async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
