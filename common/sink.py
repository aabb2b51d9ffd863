"""The sink: results out of Redis into the output, exactly once (``crawlfleet sink``; the
embedded ``crawl`` runs one in its own process).

One step: take a claim on a range of the results log (``sink_take.lua``), write the range as
one part (``Store.put``: atomic and durable when it returns), then mark it done
(``sink_done.lua``), which trims it from Redis. A sink killed between the write and the done
leaves its claim behind; after ``hold`` seconds another sink (or this one, restarted) takes the
same range over and writes the same part under the same name, so the output holds each result
once whatever instant the kill came at. Any number of sinks may run.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from .connections import is_transient, redact_url
from .frontier import Frontier, SinkClaim, StateLost
from .keys import Keys
from .logs import get_logger
from .metrics import SINK_PARTS, SINK_RESULTS, serve_metrics
from .resultlog import current_crawl, part_name
from .settings import Settings
from .storage import StorageError, Store

PART_MAX_BYTES = 16 * 1024 * 1024  # a part is one object, written in one call
IDLE_POLL_S = 0.5
log = get_logger("crawlfleet.sink")


def encode_part(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


class Sink:
    def __init__(self, settings: Settings, redis: Any, store: Store, *,
                 owner: str | None = None,
                 on_lines: Callable[[bytes], None] | None = None) -> None:
        self.settings = settings
        self.redis = redis
        self.store = store
        self.keys = Keys(settings.namespace)
        self.frontier = Frontier(redis, self.keys)
        self.owner = owner or f"{socket.gethostname()}-{os.getpid()}-sink"
        self.crawl_id = ""
        self.on_lines = on_lines  # sees each result written (the crawl's progress tally)
        self.parts = 0
        self.results = 0

    async def _crawl(self) -> str:
        """The current crawl's id ('' while no crawl has opened), and the output recorded for
        ``export`` and ``check`` to find."""
        self.crawl_id = await current_crawl(self.redis, self.keys)
        if self.crawl_id:
            await self.redis.set(self.keys.output, self.settings.output or self.store.where)
        return self.crawl_id

    async def step(self, *, eager: bool = False) -> float | None:
        """Write one part if one is due: None when one was written, else the seconds worth
        waiting. ``eager`` writes whatever is in the log now (the end of a crawl)."""
        crawl = self.crawl_id or await self._crawl()
        if not crawl:
            return IDLE_POLL_S
        s = self.settings
        try:
            taken = await self.frontier.sink_take(
                crawl, self.owner, max_results=s.output_part_results, max_bytes=PART_MAX_BYTES,
                min_results=1 if eager else s.output_part_results,
                max_age_s=0.0 if eager else s.output_part_seconds, hold_s=s.lease_seconds)
        except StateLost:
            self.crawl_id = ""  # a new crawl in this namespace: its own parts folder
            return IDLE_POLL_S
        if taken is None:
            return IDLE_POLL_S
        if isinstance(taken, float):
            return min(max(taken, 0.05), IDLE_POLL_S * 4)
        await self._write(crawl, taken)
        return None

    async def _write(self, crawl: str, claim: SinkClaim) -> None:
        name = part_name(self.keys.namespace, crawl, claim.first, claim.last)
        data = encode_part(claim.lines)
        started = time.monotonic()
        await self.store.put(name, data)
        trimmed = await self.frontier.sink_done(crawl, claim)
        self.parts += 1
        self.results += len(claim.lines)
        SINK_PARTS.inc()
        SINK_RESULTS.inc(len(claim.lines))
        if self.on_lines is not None:
            for line in claim.lines:
                self.on_lines(line)
        log.info("part_written", part=name, results=len(claim.lines), bytes=len(data),
                 ms=round((time.monotonic() - started) * 1000, 1),
                 trimmed=trimmed if trimmed is not None else "done_already")

    async def drain(self) -> int:
        """Write out everything in the log now; the results written."""
        before = self.results
        while await self.step(eager=True) is None:
            pass
        return self.results - before

    async def run(self, stop: asyncio.Event) -> None:
        """Write parts until ``stop``; Redis or storage trouble waits with a backoff and
        never loses a result (the claim stays in Redis until its part is written)."""
        async with serve_metrics(self.settings.metrics_port, role="sink",
                                 healthy=lambda: not stop.is_set()):
            await self._run(stop)

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        log.info("sink_started", output=redact_url(self.store.where), owner=self.owner)
        while not stop.is_set():
            try:
                wait = await self.step()
                backoff = 0.1
            except StorageError as exc:
                log.error("sink_write_failed", error=str(exc), retry_in=backoff)
                wait, backoff = backoff, min(backoff * 2, 10.0)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("redis_unavailable", error=redact_url(str(exc)), retry_in=backoff)
                wait, backoff = backoff, min(backoff * 2, 5.0)
            if wait:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
        log.info("sink_stopped", parts=self.parts, results=self.results)
