"""Request starts to one host, at least ``spacing`` seconds apart as the server sees them.

A request's start is taken when its headers are on the wire (the session's request class,
:class:`PacedRequest`), not when the crawler decides to send it: a request that waits for a new
connection, or for a busy event loop, reaches the server late and would crowd the one after it.
So each request takes a turn, and the next turn begins ``spacing`` after the previous request was
really sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar

import aiohttp
from aiohttp.connector import Connection

from crawlfleet.common.metrics import POLITENESS_WAIT


class Turn:
    """One request's turn; ``sent`` or ``done`` ends it (whichever comes first, once)."""

    def __init__(self, pacer: Pacer | None) -> None:
        self._pacer = pacer

    def sent(self) -> None:
        """The request's headers are on the wire."""
        self._finish()

    def done(self) -> None:
        """The request is over (it may have failed before anything was sent)."""
        self._finish()

    def _finish(self) -> None:
        pacer, self._pacer = self._pacer, None
        if pacer is not None:
            pacer.release()


class Pacer:
    def __init__(self, spacing: float) -> None:
        self.spacing = spacing
        self.last_sent = 0.0  # wall clock of the latest start, for the host's next batch
        self._last_sent_mono: float | None = None
        self._lock = asyncio.Lock()

    async def turn(self) -> Turn:
        """Wait for this host's next allowed start and hold it until the request is sent."""
        if self.spacing <= 0:
            self._mark()  # nothing to wait for, but a later, larger spacing counts from here
            POLITENESS_WAIT.observe(0.0)
            return Turn(None)
        asked = time.monotonic()
        await self._lock.acquire()
        # A loop: the spacing may be raised (robots.txt Crawl-delay) while this turn waits.
        while self._last_sent_mono is not None:
            wait = self._last_sent_mono + self.spacing - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        # The lock included: a turn queued behind the host's other requests waited for them.
        POLITENESS_WAIT.observe(time.monotonic() - asked)
        return Turn(self)

    def set_spacing(self, spacing: float) -> None:
        """A new spacing (a Crawl-delay learnt from robots.txt) counts from the last request
        already sent, like any other."""
        self.spacing = spacing

    def release(self) -> None:
        self._mark()
        self._lock.release()

    def _mark(self) -> None:
        self.last_sent = time.time()
        self._last_sent_mono = time.monotonic()


# The turn of the request the current task is sending (fetch() sets it around session.get).
_SENDING: ContextVar[Turn | None] = ContextVar("crawlfleet_sending", default=None)


@contextlib.contextmanager
def sending(turn: Turn | None) -> Iterator[None]:
    """The request this task sends in the block takes ``turn``: it ends when the request is on
    the wire (:class:`PacedRequest`), or at the block's end if it never got there (a refused
    connection, a cancelled wait)."""
    token = _SENDING.set(turn)
    try:
        yield
    finally:
        _SENDING.reset(token)
        if turn is not None:
            turn.done()  # a no-op once sent


class PacedRequest(aiohttp.ClientRequest):
    """The worker session's requests: ``send`` returns once the request's headers are written
    to the connection, which ends the sending task's turn.

    A request class, not an aiohttp TraceConfig: with any trace config installed, aiohttp sends
    every trace event of every request (start, connection, DNS, chunks, end) through awaited
    signals, 8-17 µs of a worker's CPU a request for the one event pacing needs."""

    async def send(self, conn: Connection) -> aiohttp.ClientResponse:
        response = await super().send(conn)
        turn = _SENDING.get()
        if turn is not None:
            turn.sent()
        return response
