"""Fetching one URL: bounded in time and bytes, redirects followed by hand, failures classified.

Every way a fetch can go wrong ends as a ``Fetched`` with a short ``error`` class (``timeout``,
``dns``, ``connect``, ``too_large`` ...), never as an exception escaping to the job, so one bad
page or hostile server costs one failed page, not a worker.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.abc import ResolveResult

from crawlfleet.common.urls import URLError, canonicalize, resolve

from .pacing import Turn

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
READ_CHUNK = 64 * 1024


@dataclass(slots=True)
class Fetched:
    url: str
    final_url: str | None = None
    status: int | None = None
    content_type: str | None = None
    body: bytes = b""
    elapsed_ms: float = 0.0
    error: str | None = None
    redirects: list[str] = field(default_factory=list)
    # The last redirect was not followed (another host, or a URL already in the crawl): the
    # result is the redirect itself, and its target is a link for the frontier.
    redirect_stopped: bool = False
    retry_after: str | None = None


class PrivateAddressError(OSError):
    """The host resolved only to addresses a crawler must not reach (SSRF guard)."""


def is_private_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not ip.is_global or ip.is_multicast


class GuardedResolver(aiohttp.AsyncResolver):
    """aiodns resolution that drops private, loopback and link-local answers unless allowed.

    The check sits in the resolver so that it also covers every redirect hop and every retry:
    there is no way to open a connection without passing through it.
    """

    def __init__(self, *, allow_private: bool, nameservers: list[str] | None = None) -> None:
        super().__init__(nameservers=nameservers or None)
        self.allow_private = allow_private

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        answers = await super().resolve(host, port, family)
        if self.allow_private:
            return answers
        public = [a for a in answers if not is_private_address(a["host"])]
        if not public:
            raise PrivateAddressError(f"{host} resolves only to private addresses")
        return public


def literal_private_host(url: str) -> bool:
    """URLs with an IP literal never reach the resolver, so they are checked here."""
    from yarl import URL

    try:
        host = URL(url).host or ""
        return is_private_address(host.strip("[]"))
    except ValueError:
        return False


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
) -> Fetched:
    """``max_body_bytes`` caps the body: a larger one is the error ``too_large``, or with
    ``truncate`` is cut to its first ``max_body_bytes`` (robots.txt wants its first part).
    ``deadline`` bounds the whole fetch, every redirect hop included (the session's own
    timeout applies per request, so a chain of slow redirects could otherwise multiply it).
    ``may_follow(target)`` is asked before each redirect hop; False stops there.
    ``pace()`` is awaited before each request (every hop is one) for the host's turn."""
    started = time.monotonic()
    result = Fetched(url=url)
    try:
        async with asyncio.timeout(deadline):
            return await _follow(session, url, result, max_body_bytes, max_redirects,
                                 allow_private, may_follow, pace, truncate)
    except BodyTooLarge:
        result.error = "too_large"
        return result
    except Exception as exc:  # a hostile server can raise anything; the page fails, not the worker
        result.error = classify_error(exc)
        return result
    finally:
        result.elapsed_ms = round((time.monotonic() - started) * 1000, 1)


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
) -> Fetched:
    current = url
    for _hop in range(max_redirects + 1):
        if not allow_private and literal_private_host(current):
            result.error = "private_address"
            return result
        turn = await pace() if pace is not None else None
        try:
            response = await session.get(current, allow_redirects=False, trace_request_ctx=turn)
        finally:
            if turn is not None:
                turn.done()  # sent already, or failed before anything was sent
        async with response:
            location = response.headers.get("Location")
            if response.status in REDIRECT_STATUSES and location:
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
                if may_follow is not None and not await may_follow(next_url):
                    result.status, result.final_url = response.status, current
                    result.content_type = response.headers.get("Content-Type")
                    result.redirect_stopped = True
                    return result
                current = next_url
                continue
            result.status = response.status
            result.final_url = current
            result.content_type = response.headers.get("Content-Type")
            result.body = await _read_capped(response, max_body_bytes, truncate)
            result.retry_after = response.headers.get("Retry-After")
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


async def _read_capped(response: aiohttp.ClientResponse, limit: int, truncate: bool) -> bytes:
    declared = response.content_length
    if declared is not None and declared > limit and not truncate:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    # The cap counts decompressed bytes, which is what defuses a compression bomb.
    async for chunk in response.content.iter_chunked(READ_CHUNK):
        size += len(chunk)
        if size > limit:
            if not truncate:
                raise BodyTooLarge
            chunks.append(chunk)
            break  # leaving the response drops the connection and the rest of the body
        chunks.append(chunk)
    return b"".join(chunks)[:limit]


def classify_error(exc: BaseException) -> str:
    """A short, stable class for a failed fetch, used in results and metrics."""
    chain: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and len(chain) < 8:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    if any(isinstance(e, PrivateAddressError) for e in chain):
        return "private_address"
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
