"""The scheduler process: admits seeds, hands out host turns as arq jobs, expires leases.

It is not on the per-page path: a worker holding a host admits the links it finds and refills
its lease itself (progress.lua). What is left here is per host turn: dispatch, the expiry pass,
the finish check. Seeds arrive on a stream, read with a consumer group and acknowledged inside
the same Lua script that admits their URLs, so a scheduler killed at any instant loses nothing
(its pending events are read again by whoever leads next). Between passes it sleeps until a
script wakes it (Keys.scheduler_wake: a host newly ready, a lease released, room for a batch,
new seeds), the next ready host is due, or the next housekeeping pass.

Several schedulers may run: one holds a lock with a short expiry and works; the others wait and
take over within ``LOCK_TTL`` seconds of its death. A Redis outage pauses the loop (with
backoff) instead of ending the process.

With several shards (``CRAWLFLEET_REDIS_URLS``) a ``Scheduler`` leads one shard: see
scheduler/sharded.py. The leader of a shard also forwards that shard's outbox (links for other
shards' hosts).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import msgspec
from arq.connections import ArqRedis
from redis.exceptions import ResponseError

from crawlfleet.common import metrics
from crawlfleet.common.addresses import url_port
from crawlfleet.common.cluster import (
    Cluster,
    OutboxCursor,
    bind_shard,
    forward_outbox,
    marker_record,
    shard_limits,
)
from crawlfleet.common.connections import (
    REDIS_UNAVAILABLE,
    as_text,
    is_embedded,
    listen_for_wakes,
)
from crawlfleet.common.frontier import (
    ADMIT_CHUNK,
    Admission,
    Dispatched,
    Frontier,
    Limits,
    StateLost,
)
from crawlfleet.common.keys import CONSUMER_GROUP, Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.messages import MessageVersionError, decode_event
from crawlfleet.common.scope import ScopeRules, refused
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import URLError, canonicalize, fingerprint, host_key

CONSUMER = "scheduler"  # one name for every leader, so a new one reads the old one's pending
READ_COUNT = 256
LOCK_TTL = 5.0
STANDBY_POLL = 0.5
HOUSEKEEPING_INTERVAL = 0.5
MIN_WAIT = 0.002  # a ready host due now that dispatch did not send: no busy loop over it
# A woken scheduler passes at most this often: the wakes of a burst of ended turns and claims
# are served by one pass (at most 50 passes a second; it looked 20 times a second before it
# was woken, and a pass per wake costs more than it saves once turns end by the hundred).
MIN_PASS_INTERVAL = 0.02
# The embedded backend has no pub/sub wake-ups: it looks for work this often, and asks whether
# the crawl finished this often while idle.
EMBEDDED_POLL = 0.005
EMBEDDED_FINISH_CHECK = 0.05
PROGRESS_INTERVAL = 5.0
CANONICALISE_SLICE = 2000  # links canonicalised between two yields to the event loop
QUARANTINE_LOG_BATCH = 100

# ResponseError: BUSY, OOM, READONLY, NOGROUP after a restart, or a script error.
REDIS_ERRORS: tuple[type[Exception], ...] = (*REDIS_UNAVAILABLE, ResponseError)

log = get_logger("crawlfleet.scheduler")


class Scheduler:
    def __init__(self, settings: Settings, redis: ArqRedis, *, shard: int = 0,
                 cluster: Cluster | None = None) -> None:
        """``redis`` is shard ``shard``'s; ``cluster`` (fail-fast clients of every shard) is
        where the outbox's links go, when there are several shards."""
        self.settings = settings
        # redis-py types asyncio commands as `Awaitable[T] | T`; this client is asyncio only.
        self.redis: Any = redis
        self.keys = Keys(settings.namespace)
        self.frontier = Frontier(redis, self.keys)
        self.shard = shard
        self.cluster = cluster
        shards = len(cluster) if cluster is not None else 1
        self.limits = (shard_limits(settings, shard, shards) if shards > 1 else
                       Limits(settings.max_pages, settings.max_pages_per_host,
                              settings.max_query_variants))
        self.crawl_id = ""  # the crawl marker's id, once known
        self.allowed_hosts: set[str] = set()
        self.seed_ports: set[int] = set()  # allowed besides 80 and 443 (CRAWLFLEET_ALLOWED_PORTS)
        self.rules = ScopeRules.from_settings(settings)
        # fakeredis has no pub/sub across processes to wake it: the embedded backend polls.
        self._wakeable = not is_embedded(settings.shard_urls[shard])
        self.instance = settings.worker_id
        self._reread_pending = False
        self.outbox = OutboxCursor()  # where forwarding goes on from, shards left alone
        self._wake = asyncio.Event()  # set by _listen_for_wake: a script said there is work
        # The leading loop's passes, and whether it sleeps now and for how long at most.
        self.passes = 0
        self.sleeping, self.sleep_s = False, 0.0

    async def run(self, stop: asyncio.Event) -> None:
        """Lead when the lock is free, stand by otherwise, until ``stop`` is set. Neither a
        Redis outage nor a script's error ends the process: it waits and tries again.
        With CRAWLFLEET_METRICS_PORT, leader and standbys alike serve the frontier's gauges."""
        port = self.settings.metrics_port
        async with metrics.serve_metrics(port, role="scheduler",
                                         healthy=lambda: not stop.is_set()) as serving:
            exporter = self._export_frontier(stop) if serving else None
            async with beside(exporter):
                await self._run(stop)

    async def _export_frontier(self, stop: asyncio.Event) -> None:
        """The status snapshot behind the frontier-wide gauges, every few seconds. A failed
        read leaves the last one, which stops being served once it is stale."""
        while not stop.is_set():
            try:
                await metrics.refresh_frontier(self.redis, self.keys)
            except Exception as exc:  # Redis trouble, which the main loop handles and logs
                log.debug("metrics_status_failed", error=str(exc))
            await sleep_or_stop(stop, metrics.STATUS_EVERY_S)

    async def attempt(self, stop: asyncio.Event) -> bool:
        """Lead while the lock stays ours; False at once when another scheduler holds it."""
        if not await self.acquire_lock():
            return False
        metrics.LEADING.inc()  # one process may lead several shards
        try:
            await self.lead(stop)
        finally:
            metrics.LEADING.dec()
        return True

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        standby_logged = False
        while not stop.is_set():
            try:
                if await self.attempt(stop):
                    standby_logged = False
                elif not standby_logged:
                    log.info("scheduler_standby", leader=as_text(
                        await self.redis.get(self.keys.scheduler_lock) or b"?"))
                    standby_logged = True
                backoff = 0.1
            except REDIS_ERRORS as exc:
                # None of them may end the scheduler.
                event = ("redis_unavailable" if isinstance(exc, REDIS_UNAVAILABLE)
                         else "redis_error")
                log.warning(event, error=str(exc), retry_in=backoff)
                backoff = min(backoff * 2, 5.0)
                await sleep_or_stop(stop, backoff)
                continue
            await sleep_or_stop(stop, STANDBY_POLL)
        # If Redis is down, the lock expires by itself.
        with contextlib.suppress(*REDIS_UNAVAILABLE, ResponseError):
            await self.frontier.release_lock(self.instance)
        log.info("scheduler_stopped")

    async def acquire_lock(self) -> bool:
        return await self.frontier.acquire_lock(self.instance, int(LOCK_TTL * 1000))

    async def open_crawl(self) -> None:
        """Learn the crawl's id, or notice that Redis lost the frontier's state (the marker is
        gone or another): say so, and carry on with what Redis has now (consumer group
        included) instead of crash-looping."""
        # A shard's marker comes with its record, also when it is opened again after a loss.
        record = marker_record(self.shard, len(self.cluster) if self.cluster is not None else 1)
        marker = await self.frontier.open_crawl(self.crawl_id,
                                                expected_urls=self.settings.expected_urls,
                                                shard=record)
        if marker.state == "lost" and marker.id != self.crawl_id:
            log.error("state_lost", lost_crawl=self.crawl_id, crawl=marker.id,
                      detail="the frontier's state disappeared from Redis (restarted without "
                             "persistence, or flushed); this crawl's results are incomplete")
            self.allowed_hosts = set()
        self.crawl_id = marker.id

    async def lead(self, stop: asyncio.Event) -> None:
        """Work while the lock stays ours."""
        if self.cluster is not None:
            await bind_shard(self.redis, self.keys, self.shard, len(self.cluster),
                             self.cluster.shards[self.shard].where)
        await self.open_crawl()
        self.allowed_hosts |= {as_text(h) for h in await self.redis.smembers(self.keys.scope_hosts)}
        self.seed_ports |= {int(p) for p in await self.redis.smembers(self.keys.scope_ports)}
        log.info("scheduler_leading", instance=self.instance, namespace=self.settings.namespace,
                 crawl=self.crawl_id, scope_hosts=len(self.allowed_hosts),
                 **self._shard_fields())
        # Events a leader read but had not acknowledged when it stopped come first.
        while await self._guarded(self.read_events(pending=True)):
            pass
        async with beside(self._listen_for_wake() if self._wakeable else None):
            await self._lead_loop(stop)

    async def _lead_loop(self, stop: asyncio.Event) -> None:
        """Passes of read, dispatch and (when due) housekeeping. Between passes the scheduler
        sleeps until a script wakes it (Keys.scheduler_wake), the next ready host is due, or
        the next housekeeping pass: a busy crawl whose hosts stay leased costs Redis two
        passes a second, not twenty."""
        next_housekeeping = next_progress = next_poll = 0.0
        seen_finished = False  # by the idle check: no need to ask again until new work comes
        while not stop.is_set():
            self.passes += 1
            began = time.monotonic()
            woken = self._wake.is_set()
            self._wake.clear()  # a wake from here on is for the next pass
            if not self._wakeable and time.time() >= next_poll:
                woken, next_poll = True, time.time() + EMBEDDED_FINISH_CHECK
            if self._reread_pending:  # events refused while the state was lost: again
                self._reread_pending = False
                while await self._guarded(self.read_events(pending=True)):
                    pass
            read = await self._guarded(self.read_events())
            due: Dispatched | None = await self._recovered(self.frontier.dispatch_ready(
                self.crawl_id, batch_size=self.settings.batch_size,
                max_waiting=self.settings.dispatch_ahead))
            dispatched = due.batches if due is not None else 0
            requeued = 0
            now = time.time()
            if now >= next_housekeeping:
                if not await self.acquire_lock():
                    log.warning("scheduler_lock_lost", instance=self.instance)
                    return
                # It checks finished too; hosts it made ready again go out on the next pass.
                requeued = await self._guarded(self.housekeeping(now))
                next_housekeeping = now + HOUSEKEEPING_INTERVAL
                woken = False
            if read or dispatched or requeued:
                seen_finished = False
            elif woken and not seen_finished and due is not None and not due.full \
                    and due.next_due_s is None:
                # A lease released and no host ready or waiting: the crawl may have just ended.
                seen_finished = bool(await self._guarded(
                    self.frontier.check_finished(self.crawl_id)))
            if now >= next_progress:
                await self.log_progress()
                next_progress = now + PROGRESS_INTERVAL
            if read >= READ_COUNT or requeued:
                continue  # more events may wait, or hosts came back: another pass at once
            # (Dispatch sent every host due now that it had room for: the next one's time, or
            # a claim making room, ends the sleep.)
            wait = min(next_housekeeping, next_progress) - time.time()
            if due is not None and due.next_due_s is not None:
                wait = min(wait, max(due.next_due_s, MIN_WAIT))
            if not self._wakeable:
                wait = min(wait, EMBEDDED_POLL)  # no pub/sub wake-ups there
            self.sleeping, self.sleep_s = True, max(wait, 0.0)
            try:
                await wait_for_either(self._wake, stop, self.sleep_s)
                # Wakes that come in a burst (many turns ending at once) make one pass.
                rest = began + MIN_PASS_INTERVAL - time.monotonic()
                if rest > 0:
                    await sleep_or_stop(stop, rest)
            finally:
                self.sleeping = False

    async def _listen_for_wake(self) -> None:
        """Scripts' word that there is work (Keys.scheduler_wake). Without it (the subscription
        lost) the scheduler still passes at every housekeeping interval."""
        await listen_for_wakes(self.redis, self.keys.scheduler_wake, self._wake.set,
                               retry_s=HOUSEKEEPING_INTERVAL, when_subscribed=True)

    async def _guarded(self, step: Any) -> int:
        """A step of the loop that counts something: its count, 0 when it was recovered."""
        return int(await self._recovered(step) or 0)

    async def _recovered(self, step: Any) -> Any:
        """One step of the loop; a lost state (or a stream without its group after a restart)
        is noticed and recovered from here, at once (the step's answer is then None)."""
        try:
            return await step
        except StateLost:
            await self.open_crawl()
            self._reread_pending = True
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            await self.open_crawl()  # recreates the consumer group
        return None

    async def read_events(self, *, pending: bool = False) -> int:
        """Read and admit one slice of events; returns how many were read."""
        response = await self.redis.xreadgroup(
            CONSUMER_GROUP, CONSUMER, {self.keys.events: "0" if pending else ">"},
            count=READ_COUNT,
        )
        messages = response[0][1] if response else []
        if not messages:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for message_id, fields in messages:
                await self._admit_event(pipe, as_text(message_id), fields)
            replies = await pipe.execute()
        self.frontier.answers(replies)
        return len(messages)

    async def _admit_event(self, pipe: Any, message_id: str, fields: dict[Any, Any]) -> None:
        try:
            event = decode_event(fields.get(b"m") or fields.get("m") or b"")
        except (msgspec.DecodeError, msgspec.ValidationError, MessageVersionError) as exc:
            # Into quarantine with the reason, acknowledged: it must not block the stream.
            await self.frontier.admit_in(pipe, self.crawl_id, [], self.limits,
                                         event_id=message_id, ack=True,
                                         quarantine_reason=str(exc)[:200] or "unreadable")
            return
        groups = [(0, event.urls)]
        seed_hosts = set()
        seed_ports = set()
        for url in event.urls:
            try:
                canonical = canonicalize(url)
            except URLError:
                continue
            seed_hosts.add(host_key(canonical))
            port = url_port(canonical)
            if port is not None:
                seed_ports.add(port)
        if seed_ports - self.seed_ports:
            self.seed_ports |= seed_ports
            pipe.sadd(self.keys.scope_ports, *sorted(seed_ports))
        new_hosts = seed_hosts - self.allowed_hosts
        if new_hosts:
            self.allowed_hosts |= new_hosts
            pipe.sadd(self.keys.scope_hosts, *sorted(new_hosts))
        admissions, discarded_scope, discarded_invalid = await self.admissions(groups)
        # In chunks, so that no script runs long enough to stall Redis for everyone; the
        # event is acknowledged with its last chunk (re-admitting a chunk is a no-op).
        chunks = [admissions[i:i + ADMIT_CHUNK]
                  for i in range(0, len(admissions), ADMIT_CHUNK)] or [[]]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            await self.frontier.admit_in(
                pipe, self.crawl_id, chunk, self.limits, event_id=message_id, ack=last,
                discarded_scope=discarded_scope if last else 0,
                discarded_invalid=discarded_invalid if last else 0,
            )

    async def admissions(
        self, groups: list[tuple[int, list[str]]]
    ) -> tuple[list[Admission], int, int]:
        """Canonicalise and scope-check links: (admissions, refused by scope, invalid).
        Yields to the event loop every few thousand links, so a huge page cannot stall it."""
        admissions: list[Admission] = []
        scope_refused = invalid = 0
        batch_seen: set[str] = set()
        done = 0
        for depth, urls in groups:
            for url in urls:
                done += 1
                if done % CANONICALISE_SLICE == 0:
                    await asyncio.sleep(0)
                try:
                    canonical = canonicalize(url, sort_query=self.settings.sort_query)
                except URLError:
                    invalid += 1
                    continue
                host = host_key(canonical)
                if refused(canonical, host, depth, allowed_hosts=self.allowed_hosts,
                           rules=self.rules, allowed_ports=self.settings.allowed_ports,
                           seed_ports=self.seed_ports):
                    scope_refused += 1
                    continue
                fp = fingerprint(canonical)
                if fp in batch_seen:
                    continue
                batch_seen.add(fp)
                admissions.append(Admission.of(canonical, host, depth, fp))
        return admissions, scope_refused, invalid

    async def housekeeping(self, now: float) -> int:
        """The expiry pass, the outbox, the finish check, old rate buckets and the quarantine's
        log. Returns how many hosts it gave back to the ready set (dispatch them now)."""
        await self.open_crawl()
        expired = await self.frontier.expire(
            self.crawl_id, max_losses=self.settings.max_worker_losses,
            claim_timeout=self.settings.lease_seconds,
        )
        metrics.record_given_up(expired.given_up)
        if expired.leases:
            log.warning("leases_expired", hosts=expired.leases, urls=expired.requeued,
                        given_up=expired.given_up)
        if expired.unclaimed:
            log.info("batches_unclaimed", batches=expired.unclaimed,
                     detail="no worker took them within a lease; back in their queues")
        if self.cluster is not None:
            forwarded = await forward_outbox(self.cluster, self.shard, self.frontier,
                                             cursor=self.outbox)
            if forwarded:
                log.info("outbox_forwarded", links=forwarded, **self._shard_fields())
        await self.frontier.check_finished(self.crawl_id)
        old = [b for b in await self.redis.hkeys(self.keys.rate) if int(b) < now - 120]
        if old:
            await self.redis.hdel(self.keys.rate, *old)
        await self.log_quarantine()
        return expired.leases + expired.unclaimed

    async def log_quarantine(self) -> None:
        """Log each quarantined entry once, with where it came from and why."""
        last = as_text(await self.redis.get(self.keys.quarantine_logged) or b"0-0")
        entries = await self.redis.xrange(self.keys.quarantine, min=f"({last}",
                                          count=QUARANTINE_LOG_BATCH)
        for entry_id, fields in entries:
            f = {as_text(k): v for k, v in fields.items()}
            log.error("quarantined", id=as_text(entry_id), source=as_text(f.get("source", b"")),
                      reason=as_text(f.get("reason", b"")),
                      data=bytes(f.get("data", b""))[:200].decode("utf-8", "replace"))
        if entries:
            await self.redis.set(self.keys.quarantine_logged, entries[-1][0])

    async def log_progress(self) -> None:
        from crawlfleet.common.stats import read_status

        status = await read_status(self.redis, self.keys)
        fields = ("seen", "pages", "failed", "skipped", "queued", "in_flight", "pages_per_s",
                  "finished", "quarantined", "state_lost")
        log.info("progress", **{k: status[k] for k in fields}, **self._shard_fields())

    def _shard_fields(self) -> dict[str, int]:
        if self.cluster is None:
            return {}
        return {"shard": self.shard + 1, "shards": len(self.cluster)}


@contextlib.asynccontextmanager
async def beside(work: Coroutine[Any, Any, None] | None) -> AsyncIterator[None]:
    """Run ``work`` (if any) as a task while the block runs; cancel it when the block ends."""
    task = asyncio.create_task(work) if work is not None else None
    try:
        yield
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def wait_for_either(wake: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    """Until ``wake`` or ``stop`` is set, or ``seconds`` have passed."""
    if wake.is_set() or stop.is_set():
        return
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
