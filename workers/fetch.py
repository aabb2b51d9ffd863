"""Fetching one URL: bounded in time and bytes, redirects followed by hand, failures classified.

Every way a fetch can go wrong on the site's side ends as a ``Fetched`` with a short ``error``
class (``timeout``, ``dns``, ``dns_temporary``, ``connect``, ``too_large`` ...), never as an
exception escaping to the job, so one bad page or hostile server costs one failed page, not a
worker. The crawler's own failures (its callbacks ``may_follow`` and ``pace``, backed by Redis)
are not the page's: they escape as :class:`CrawlerFault`.

Time: ``deadline`` counts the site's time only. Waiting for the host's turn (a crawl delay can
be 30 s) and the crawler's own callbacks are left out of it, and out of ``elapsed_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.cookies import Morsel, SimpleCookie
from typing import Any

import aiohttp
from aiodns import error as ares
from aiohttp.typedefs import LooseCookies
from yarl import URL

from crawlfleet.common.urls import URLError, canonicalize, resolve

from .guard import BlockedAddressError, hop_refusal, session_guard
from .pacing import Turn, sending
from .parse import is_html
from .warc import Exchange

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 * 1024


@dataclass(slots=True)
class Fetched:
    url: str
    final_url: str | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes = b""
    elapsed_ms: float = 0.0  # the fetch's own time: pacing waits and callbacks left out
    error: str | None = None
    redirects: list[str] = field(default_factory=list)
    # The last redirect was not followed (another host, or a URL already in the crawl): the
    # result is the redirect itself, and its target is a link for the frontier.
    redirect_stopped: bool = False
    retry_after: str | None = None
    content_language: str | None = None  # the header, for CRAWLFLEET_TEXT's lang
    # For a human: why the fetch was refused, address and rule ("127.0.0.1 is loopback").
    detail: str | None = None


class CrawlerFault(Exception):
    """A crawler callback (``may_follow``, ``pace``) failed, e.g. its Redis is down. That is not
    the page's fault and must not be recorded as its result; ``__cause__`` is the original."""


_NO_URL = URL()


class HostCookieJar(aiohttp.CookieJar):
    """Cookies kept per host: a page's cookies go back to its own host only.

    A ``Domain`` attribute is dropped, so ``Domain=example.com`` set by www.example.com is sent
    neither to shop.example.com nor to example.com: every cookie is host-only. ``unsafe`` keeps
    the cookies of IP-literal hosts (the test web, allowed private networks) for that IP alone;
    values are sent as the server set them (``quote_cookie=False``), as browsers do."""

    def __init__(self) -> None:
        super().__init__(unsafe=True, quote_cookie=False)

    def update_cookies(self, cookies: LooseCookies, response_url: URL = _NO_URL) -> None:
        jar: SimpleCookie = SimpleCookie()
        items = cookies.items() if isinstance(cookies, Mapping) else cookies
        for name, value in items:
            if isinstance(value, Morsel):
                morsel: Morsel[str] = value.copy()
            else:
                jar[name] = value  # type: ignore[assignment]
                morsel = jar[name]
            morsel["domain"] = ""
            dict.__setitem__(jar, name, morsel)
        super().update_cookies(jar, response_url)

    def update_cookies_from_headers(self, headers: Sequence[str], response_url: URL) -> None:
        super().update_cookies_from_headers(
            [_DOMAIN_ATTRIBUTE.sub("", header) for header in headers], response_url
        )


_DOMAIN_ATTRIBUTE = re.compile(r";\s*domain\s*=[^;]*", re.IGNORECASE)


class _Clock:
    """The fetch's own time: a stopwatch and the ``deadline`` timer, both paused while the
    crawler waits on itself (the host's turn, its Redis-backed callbacks)."""

    def __init__(self, timer: asyncio.Timeout, deadline: float | None) -> None:
        self._timer = timer
        self._loop = asyncio.get_running_loop()
        self._left = deadline
        self._since: float | None = self._loop.time()
        self.elapsed = 0.0

    def stop(self) -> None:
        if self._since is None:
            return
        spent = self._loop.time() - self._since
        self._since = None
        self.elapsed += spent
        if self._left is not None:
            self._left -= spent
        if not self._timer.expired():  # expired: its cancellation is on the way; let it come
            self._timer.reschedule(None)

    def start(self) -> None:
        if self._since is not None:
            return
        self._since = self._loop.time()
        if self._left is not None and not self._timer.expired():
            self._timer.reschedule(self._since + self._left)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        self.stop()
        try:
            yield
        finally:
            self.start()


async def _crawler_call(name: str, call: Callable[[], Awaitable[Any]]) -> Any:
    try:
        return await call()
    except Exception as exc:
        raise CrawlerFault(f"{name} failed: {exc!r}") from exc


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    max_body_bytes: int,
    max_redirects: int = 10,
    allow_private: bool = False,
    deadline: float | None = None,
    may_follow: Callable[[str], Awaitable[bool]] | None = None,
    pace: Callable[[], Awaitable[Turn]] | None = None,
    truncate: bool = False,
    capture: list[Exchange] | None = None,
) -> Fetched:
    """``max_body_bytes`` caps the body: a larger one is the error ``too_large``, or with
    ``truncate`` is cut to its first ``max_body_bytes`` (robots.txt wants its first part).
    ``deadline`` (seconds; callers pass ``settings.fetch_timeout``) bounds the fetch once
    sent, every redirect hop, connect and body included, minus the time spent awaiting
    ``pace()`` and ``may_follow()``. (The session has no total timeout: it could not tell a
    pacing wait from the site's time.)
    ``may_follow(target)`` is asked before each redirect hop; False stops there.
    ``pace()`` is awaited before each request (every hop is one) for the host's turn.
    Either callback raising escapes as :class:`CrawlerFault`, the original as its cause.
    ``capture`` (CRAWLFLEET_WARC) gets one :class:`Exchange` per response received, redirect
    hops included, for the WARC writer; None (the default) costs nothing."""
    result = Fetched(url=url)
    clock: _Clock | None = None
    try:
        async with asyncio.timeout(deadline) as timer:
            clock = _Clock(timer, deadline)
            try:
                return await _follow(session, url, result, max_body_bytes, max_redirects,
                                     allow_private, may_follow, pace, truncate, clock, capture)
            finally:
                clock.stop()  # while the timer is still entered: it may be rescheduled
    except CrawlerFault:
        raise
    except BodyTooLarge:
        result.error = "too_large"
        return result
    except Exception as exc:  # a hostile server can raise anything; the page fails, not the worker
        result.error = classify_error(exc)
        result.detail = blocked_detail(exc)
        return result
    finally:
        if clock is not None:
            result.elapsed_ms = round(clock.elapsed * 1000, 1)


async def _follow(
    session: aiohttp.ClientSession,
    url: str,
    result: Fetched,
    max_body_bytes: int,
    max_redirects: int,
    allow_private: bool,
    may_follow: Callable[[str], Awaitable[bool]] | None,
    pace: Callable[[], Awaitable[Turn]] | None,
    truncate: bool,
    clock: _Clock,
    capture: list[Exchange] | None,
) -> Fetched:
    current = url
    guard = session_guard(session)
    for _hop in range(max_redirects + 1):
        # The SSRF guard for what the connector cannot check itself: IP literals, ports and,
        # through a proxy, the target's name (see SessionGuard).
        blocked = hop_refusal(current, url, allow_private, guard)
        if blocked is not None:
            result.error, result.detail = "blocked_address", blocked
            return result
        if guard is not None:
            await guard.check_target(current)
        turn = None
        if pace is not None:
            with clock.paused():
                turn = await _crawler_call("pace", pace)
        sent_at = time.time() if capture is not None else 0.0
        with sending(turn):  # the turn ends once the request is on the wire, or fails
            response = await session.get(current, allow_redirects=False)
        async with response:
            exchange = None
            if capture is not None:
                exchange = Exchange.of(response, current, sent_at)
                capture.append(exchange)
            location = response.headers.get("Location")
            if response.status in REDIRECT_STATUSES and location:
                if exchange is not None:
                    # The archive keeps the redirect's own (small) body too; nobody parses it.
                    exchange.body, exchange.truncated = await _read_capped(
                        response, NON_HTML_BYTES, True)
                target = resolve(location, current)
                try:
                    next_url = canonicalize(target) if target else None
                except URLError:
                    next_url = None
                if next_url is None:
                    result.status, result.final_url = response.status, current
                    result.error = "bad_redirect"
                    return result
                result.redirects.append(next_url)
                if may_follow is not None:
                    with clock.paused():
                        follow = await _crawler_call(
                            "may_follow", functools.partial(may_follow, next_url))
                    if not follow:
                        result.status, result.final_url = response.status, current
                        result.content_type = response.headers.get("Content-Type")
                        result.redirect_stopped = True
                        return result
                current = next_url
                continue
            result.status = response.status
            result.final_url = current
            result.content_type = response.headers.get("Content-Type")
            try:
                result.body, cut = await _read_capped(response, max_body_bytes, truncate)
            except BodyTooLarge:
                if exchange is not None:  # archived as its headers alone, marked truncated
                    exchange.body, exchange.truncated = b"", True
                raise
            if exchange is not None:
                exchange.body, exchange.truncated = result.body, cut
            result.retry_after = response.headers.get("Retry-After")
            result.content_language = response.headers.get("Content-Language")
            if response.status == 429:
                result.error = "http_429"
            elif response.status >= 500:
                result.error = "http_5xx"
            elif response.status >= 400:
                result.error = "http_4xx"
            return result
    result.error = "too_many_redirects"
    return result


class BodyTooLarge(Exception):
    pass


# A body nobody parses (an image, a PDF, a download) is read only this far: enough for its
# record (status, type, the first bytes), never the gigabytes it may be.
NON_HTML_BYTES = READ_CHUNK


def _wants_whole_body(response: aiohttp.ClientResponse) -> bool:
    """An HTML body, or one without a type (sniffed from its first bytes, then parsed if it is
    HTML), is parsed, so it is read up to the cap. Anything else only needs its record."""
    content_type = response.headers.get("Content-Type")
    return not content_type or is_html(content_type)


async def _read_capped(
    response: aiohttp.ClientResponse, limit: int, truncate: bool
) -> tuple[bytes, bool]:
    """The body and whether it was cut short, bounded: ``too_large`` (BodyTooLarge) past
    ``limit``, checked on the declared Content-Length before anything is read and on the
    decompressed bytes as they come; with ``truncate`` the first ``limit`` bytes instead. A
    body that is not HTML (and not untyped) is read only to ``NON_HTML_BYTES`` and the
    connection dropped: the result records what was read, never an error (its declared length
    does not matter either). A body of exactly ``limit`` bytes counts as cut unless its end
    has arrived with it."""
    if not truncate and not _wants_whole_body(response):
        limit, truncate = min(limit, NON_HTML_BYTES), True
    declared = response.content_length
    if declared is not None and declared > limit and not truncate:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    # The cap counts decompressed bytes, which is what defuses a compression bomb.
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        chunks.append(chunk)
        if size > limit or (truncate and size >= limit):
            if not truncate:
                raise BodyTooLarge
            # Leaving the response drops the connection and the rest of the body.
            return b"".join(chunks)[:limit], size > limit or not response.content.at_eof()
    return b"".join(chunks), False


# c-ares codes a retry may change: the nameserver failed, refused, timed out or was unreachable.
# NXDOMAIN and "no data" (ENOTFOUND, ENODATA) are the name's own answer, final like other codes.
TEMPORARY_DNS_CODES = frozenset(
    {ares.ARES_ESERVFAIL, ares.ARES_EREFUSED, ares.ARES_ETIMEOUT, ares.ARES_ECONNREFUSED}
)


def _chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    return chain


def blocked_detail(exc: BaseException) -> str | None:
    """The SSRF guard's address and rule, if it is what ``exc`` comes from."""
    return next((e.detail for e in _chain(exc) if isinstance(e, BlockedAddressError)), None)


def classify_error(exc: BaseException) -> str:
    """A short, stable class for a failed fetch, used in results and metrics."""
    chain = _chain(exc)
    if any(isinstance(e, BlockedAddressError) for e in chain):
        return "blocked_address"
    # aiohttp wraps aiodns' DNSError (args[0] is the c-ares code) in an OSError, and that in
    # ClientConnectorDNSError: the code is further down the chain.
    codes = [e.args[0] for e in chain if isinstance(e, ares.DNSError) and e.args]
    if codes:
        return "dns_temporary" if codes[0] in TEMPORARY_DNS_CODES else "dns"
    checks: list[tuple[type[BaseException] | tuple[type[BaseException], ...], str]] = [
        ((asyncio.TimeoutError, aiohttp.ServerTimeoutError), "timeout"),
        (aiohttp.TooManyRedirects, "too_many_redirects"),
        (_dns_error_types(), "dns"),
        ((aiohttp.ClientConnectorCertificateError, aiohttp.ClientSSLError), "tls"),
        (aiohttp.ClientConnectorError, "connect"),
        (aiohttp.InvalidURL, "invalid_url"),
        ((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError,
          aiohttp.ClientResponseError), "protocol"),
        ((aiohttp.ClientOSError, ConnectionError), "connect"),
        (UnicodeError, "protocol"),
    ]
    for types_, name in checks:
        if isinstance(exc, types_):
            return name
    return "error"


def _dns_error_types() -> tuple[type[BaseException], ...]:
    dns: Any = getattr(aiohttp, "ClientConnectorDNSError", None)
    return (dns,) if dns is not None else (socket.gaierror,)
