"""Tests for crawlfleet.workers.fetch and the worker's session/result glue, against real sockets.

Everything listens and connects on 127.0.0.1 only, on ports the OS hands out. An in-process
aiohttp server plays both the well-behaved site and the hostile one (endless redirects, bodies
that lie about their size, compression bombs, slow drips); raw asyncio servers play the peers
that do not speak HTTP at all; a dnslib server on a UDP port answers the resolver's questions.

Every ``fetch`` here must come back as a ``Fetched`` (never an exception) with the right
``error`` class, and quickly: each call is wrapped in a deadline well below the test budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.exceptions
from aiohttp import web
from dnslib import AAAA, QTYPE, RCODE, RR, A
from dnslib.server import BaseResolver, DNSServer

from crawlfleet.common.messages import QueuedURL
from crawlfleet.common.settings import Settings
from crawlfleet.testweb.dns import DnsServer
from crawlfleet.workers.fetch import CrawlerFault, Fetched, classify_error, fetch
from crawlfleet.workers.guard import (
    BlockedAddressError,
    GuardedResolver,
    PrivateAddressError,
    blocked_rule,
    is_private_address,
    literal_private_host,
)
from crawlfleet.workers.pacing import Pacer, Turn
from crawlfleet.workers.results import build_result
from crawlfleet.workers.worker import _build_session, worker_session

HOST = "127.0.0.1"
MB = 1024 * 1024
CAP = 1 * MB  # max_body_bytes for the size tests
FETCH_TIMEOUT = 1.0  # fetch()'s deadline; the slow-drip test relies on it, nothing else nears it
READ_TIMEOUT = 1.0  # the session's sock_read
FETCH_DEADLINE = 5.0  # a fetch that takes longer than this is a hang, not a slow answer

SLOW_HOP = 0.15  # seconds each /slow-chain hop takes

# A compression bomb: 32 MiB of zeros as ~32 KiB of gzip. Built once at import (~50 ms).
BOMB_SIZE = 32 * MB



def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


GZIP_BOMB = _gzip(bytes(BOMB_SIZE))

PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + bytes(64)

HTML_PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>  Hello \xe2\x80\x94 world  </title>
<link rel="canonical" href="/page"></head>
<body>
<a href="/a">a</a> <a href="b?x=1#frag">b</a> <a href="http://Example.COM:80/c">c</a>
<a href="/a">dup</a> <a href="#top">self</a> <a href="mailto:x@example.com">mail</a>
<a href="/n" rel="nofollow">not followed</a>
</body></html>
"""


# --------------------------------------------------------------------------------------------
# The in-process HTTP server
# --------------------------------------------------------------------------------------------


@dataclass
class Site:
    """A running test server: its base URL, per-path hit counts and handler bookkeeping."""

    base: str
    hits: Counter[str] = field(default_factory=Counter)
    stop: asyncio.Event = field(default_factory=asyncio.Event)  # set at teardown
    sent: dict[str, int] = field(default_factory=dict)  # body bytes a handler managed to write
    done: dict[str, asyncio.Event] = field(default_factory=dict)  # set when a handler returns
    arrivals: list[tuple[str, float]] = field(default_factory=list)  # (path, time.monotonic())

    def url(self, path: str) -> str:
        return self.base + path

    def finished(self, name: str) -> asyncio.Event:
        return self.done.setdefault(name, asyncio.Event())


def _make_app(site: Site) -> web.Application:
    @web.middleware
    async def count_hits(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        site.hits[request.path] += 1
        site.arrivals.append((request.path, time.monotonic()))
        return await handler(request)

    async def page(request: web.Request) -> web.Response:
        return web.Response(body=HTML_PAGE, content_type="text/html", charset="utf-8")

    async def status(request: web.Request) -> web.Response:
        return web.Response(status=int(request.match_info["code"]), text="status page")

    async def chain(request: web.Request) -> web.Response:
        # /chain/3 -> /chain/2 -> /chain/1 (relative Location) -> /final
        n = int(request.match_info["n"])
        if n == 1:
            raise web.HTTPFound("../final")  # relative: must be resolved against /chain/1
        raise web.HTTPMovedPermanently(site.url(f"/chain/{n - 1}"))

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPFound("/loop")

    async def to_literal(request: web.Request) -> web.Response:
        raise web.HTTPFound(site.url("/page"))

    async def bad_redirect(request: web.Request) -> web.Response:
        raise web.HTTPFound("javascript:alert(1)")

    async def big_declared(request: web.Request) -> web.StreamResponse:
        # Declares 50 MiB, sends 1 KiB, then stalls: only the header can make the client give up.
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.content_length = 50 * MB
        await resp.prepare(request)
        await resp.write(b"x" * 1024)
        site.sent["big_declared"] = 1024
        try:
            await asyncio.wait_for(site.stop.wait(), 10)
        finally:
            site.finished("big_declared").set()
        return resp

    async def big_chunked(request: web.Request) -> web.StreamResponse:
        # No Content-Length: streams 64 KiB chunks until the client hangs up (or 64 MiB).
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        try:
            while sent < 64 * MB and not site.stop.is_set():
                await resp.write(b"y" * 65536)
                sent += 65536
                site.sent["big_chunked"] = sent
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass  # the client closed the connection: exactly what the test wants
        finally:
            site.finished("big_chunked").set()
        return resp

    async def bomb(request: web.Request) -> web.Response:
        return web.Response(
            body=GZIP_BOMB,
            headers={"Content-Type": "text/html", "Content-Encoding": "gzip"},
        )

    async def drip(request: web.Request) -> web.StreamResponse:
        # Headers at once, then one body byte every 0.2 s, forever: no read ever times out.
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        try:
            while not site.stop.is_set():
                await resp.write(b".")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(site.stop.wait(), 0.2)
        except (ConnectionError, aiohttp.ClientConnectionResetError):
            pass
        finally:
            site.finished("drip").set()
        return resp

    async def stall(request: web.Request) -> web.StreamResponse:
        # Headers and a first chunk at once, then silence until teardown: only sock_read ends it.
        resp = web.StreamResponse(headers={"Content-Type": "text/html"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"<html>")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(site.stop.wait(), 10)
        return resp

    async def slow_chain(request: web.Request) -> web.Response:
        # /slow-chain/N: each hop takes SLOW_HOP seconds; /slow-chain/0 is the page.
        await asyncio.sleep(SLOW_HOP)
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=HTML_PAGE, content_type="text/html")
        raise web.HTTPFound(f"/slow-chain/{n - 1}")

    async def pdf(request: web.Request) -> web.Response:
        return web.Response(body=b"%PDF-1.4\n" + bytes(100), content_type="application/pdf")

    async def png_as_html(request: web.Request) -> web.Response:
        return web.Response(body=PNG_BYTES, headers={"Content-Type": "text/html"})

    app = web.Application(middlewares=[count_hits])
    app.router.add_get("/page", page)
    app.router.add_get("/final", page)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/chain/{n}", chain)
    app.router.add_get("/loop", loop)
    app.router.add_get("/bad-redirect", bad_redirect)
    app.router.add_get("/to-literal", to_literal)
    app.router.add_get("/big-declared", big_declared)
    app.router.add_get("/big-chunked", big_chunked)
    app.router.add_get("/bomb", bomb)
    app.router.add_get("/drip", drip)
    app.router.add_get("/stall", stall)
    app.router.add_get("/slow-chain/{n}", slow_chain)
    app.router.add_get("/doc.pdf", pdf)
    app.router.add_get("/png", png_as_html)
    return app


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    site = Site(base="")
    runner = web.AppRunner(_make_app(site), shutdown_timeout=1.0, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, HOST, 0)
    await tcp.start()
    port = runner.addresses[0][1]
    site.base = f"http://{HOST}:{port}"
    try:
        yield site
    finally:
        site.stop.set()  # release every stalled or dripping handler
        await runner.cleanup()


def _settings(**changes: Any) -> Settings:
    base = Settings(
        allow_private=True,
        fetch_timeout=FETCH_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        connect_timeout=1.0,
        max_body_bytes=CAP,
        dns_cache_ttl=1,
        worker_id="test-worker",
    )
    return base.replace(**changes)


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with worker_session(_settings()) as s:
        yield s


async def timed_fetch(
    session: aiohttp.ClientSession, url: str, **kwargs: Any
) -> tuple[Fetched, float]:
    """fetch() under a hard deadline; returns the result and the wall time it took. Like the
    workers, it passes fetch_timeout as fetch()'s deadline unless told otherwise."""
    kwargs.setdefault("max_body_bytes", CAP)
    kwargs.setdefault("allow_private", True)
    kwargs.setdefault("deadline", FETCH_TIMEOUT)
    started = time.monotonic()
    result = await asyncio.wait_for(fetch(session, url, **kwargs), FETCH_DEADLINE)
    elapsed = time.monotonic() - started
    assert isinstance(result, Fetched)
    assert result.url == url
    return result, elapsed


# --------------------------------------------------------------------------------------------
# 1-2. Normal pages and HTTP errors
# --------------------------------------------------------------------------------------------


async def test_normal_html_page(site: Site, session: aiohttp.ClientSession) -> None:
    url = site.url("/page")
    result, elapsed = await timed_fetch(session, url)
    assert result.error is None
    assert result.status == 200
    assert result.content_type is not None
    assert result.content_type.startswith("text/html")
    assert result.body == HTML_PAGE
    assert result.final_url == url
    assert result.redirects == []
    assert result.elapsed_ms > 0
    assert result.elapsed_ms <= elapsed * 1000 + 1
    assert site.hits["/page"] == 1


async def test_404_is_http_4xx(site: Site, session: aiohttp.ClientSession) -> None:
    result, elapsed = await timed_fetch(session, site.url("/status/404"))
    assert result.error == "http_4xx"
    assert result.status == 404
    assert result.body == b"status page"  # the body is still kept (small, under the cap)
    assert result.final_url == site.url("/status/404")
    assert elapsed < 2


async def test_503_is_http_5xx(site: Site, session: aiohttp.ClientSession) -> None:
    result, elapsed = await timed_fetch(session, site.url("/status/503"))
    assert result.error == "http_5xx"
    assert result.status == 503
    assert elapsed < 2


# --------------------------------------------------------------------------------------------
# 3. Redirects
# --------------------------------------------------------------------------------------------


async def test_redirect_chain_records_every_hop(site: Site, session: aiohttp.ClientSession) -> None:
    result, _ = await timed_fetch(session, site.url("/chain/3"))
    assert result.error is None
    assert result.status == 200
    # /chain/1 answers with the relative "../final", resolved against /chain/1.
    assert result.redirects == [site.url("/chain/2"), site.url("/chain/1"), site.url("/final")]
    assert result.final_url == result.redirects[-1] == site.url("/final")
    assert result.body == HTML_PAGE
    assert [site.hits[p] for p in ("/chain/3", "/chain/2", "/chain/1", "/final")] == [1, 1, 1, 1]


@pytest.mark.parametrize("max_redirects", [0, 3, 10])
async def test_redirect_loop_stops_after_max_redirects(
    site: Site, session: aiohttp.ClientSession, max_redirects: int
) -> None:
    result, elapsed = await timed_fetch(session, site.url("/loop"), max_redirects=max_redirects)
    assert result.error == "too_many_redirects"
    # The first request plus max_redirects followed hops, not one more.
    assert site.hits["/loop"] == max_redirects + 1
    assert len(result.redirects) == max_redirects + 1
    assert elapsed < 2


async def test_redirect_to_non_http_scheme_is_bad_redirect(
    site: Site, session: aiohttp.ClientSession
) -> None:
    result, _ = await timed_fetch(session, site.url("/bad-redirect"))
    assert result.error == "bad_redirect"
    assert result.status == 302
    assert result.final_url == site.url("/bad-redirect")
    assert result.redirects == []


# --------------------------------------------------------------------------------------------
# 4-5. Size caps: declared, chunked, compressed
# --------------------------------------------------------------------------------------------


async def test_declared_content_length_over_cap_is_too_large_without_the_body(
    site: Site, session: aiohttp.ClientSession
) -> None:
    result, elapsed = await timed_fetch(session, site.url("/big-declared"))
    assert result.error == "too_large"
    assert result.body == b""
    # The server sent 1 KiB of the 50 MiB and then stalled: only the header can explain a
    # quick answer, so the client never waited for (or read) the body.
    assert site.sent["big_declared"] == 1024
    assert elapsed < FETCH_TIMEOUT


async def test_chunked_body_over_cap_is_too_large_and_connection_dropped(
    site: Site, session: aiohttp.ClientSession
) -> None:
    result, elapsed = await timed_fetch(session, site.url("/big-chunked"))
    assert result.error == "too_large"
    assert result.body == b""
    assert elapsed < 2
    # The client hung up: the handler's writes fail long before its 64 MiB are out.
    await asyncio.wait_for(site.finished("big_chunked").wait(), 3)
    assert CAP <= site.sent["big_chunked"] < 64 * MB


async def test_truncate_keeps_the_first_bytes_of_an_oversized_body(
    site: Site, session: aiohttp.ClientSession
) -> None:
    result, elapsed = await timed_fetch(session, site.url("/big-chunked"), truncate=True)
    assert result.error is None and result.status == 200
    assert len(result.body) == CAP  # cut at the cap, not refused
    assert elapsed < 3


async def test_gzip_bomb_is_too_large_fast_and_bounded(
    site: Site, session: aiohttp.ClientSession
) -> None:
    assert len(GZIP_BOMB) < 64 * 1024  # the wire carries next to nothing...
    tracemalloc.start()
    try:
        result, elapsed = await timed_fetch(session, site.url("/bomb"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.error == "too_large"  # ...but the cap counts decompressed bytes
    assert result.body == b""
    assert elapsed < 3
    # Never anywhere near the 32 MiB the bomb expands to (the cap is 1 MiB).
    assert peak < BOMB_SIZE // 4, f"peak traced memory {peak / MB:.1f} MiB"


# --------------------------------------------------------------------------------------------
# 6. Slow drip
# --------------------------------------------------------------------------------------------


async def test_slow_drip_hits_total_timeout(site: Site, session: aiohttp.ClientSession) -> None:
    result, elapsed = await timed_fetch(session, site.url("/drip"))
    assert result.error == "timeout"
    assert FETCH_TIMEOUT * 0.9 <= elapsed < 3
    assert result.body == b""


async def test_silence_between_reads_hits_read_timeout(site: Site) -> None:
    # The deadline is far off; the session's sock_read (read_timeout) is what gives up.
    async with worker_session(_settings(read_timeout=0.3)) as session:
        result, elapsed = await timed_fetch(session, site.url("/stall"), deadline=4.0)
    assert result.error == "timeout"
    assert 0.25 <= elapsed < 2
    assert result.status == 200  # the headers came; the body did not


# --------------------------------------------------------------------------------------------
# 6b. Time: the deadline is the site's time, pacing waits are not
# --------------------------------------------------------------------------------------------

PACING_WAIT = 0.4  # longer than the deadlines below


async def slow_pace() -> Turn:
    """The host's turn comes late (a robots.txt Crawl-delay, say)."""
    await asyncio.sleep(PACING_WAIT)
    return Turn(None)


async def test_pacing_waits_are_outside_the_deadline_on_every_hop(
    site: Site, session: aiohttp.ClientSession
) -> None:
    deadline = 0.3
    # Three requests, each waiting longer than the whole deadline for its turn.
    result, elapsed = await timed_fetch(session, site.url("/chain/2"), deadline=deadline,
                                        pace=slow_pace)
    assert result.error is None, result.error
    assert result.final_url == site.url("/final")
    assert elapsed >= 3 * PACING_WAIT  # the waits did happen...
    assert result.elapsed_ms < deadline * 1000  # ...and neither they nor the deadline count them
    assert result.elapsed_ms <= (elapsed - 3 * PACING_WAIT) * 1000 + 1


async def test_a_hosts_next_request_goes_out_a_spacing_after_this_one_was_sent(
    site: Site, session: aiohttp.ClientSession
) -> None:
    # The worker's session ends a request's turn when the request is on the wire: a slow answer
    # (SLOW_HOP) does not hold the host's next request back, and the spacing still holds.
    spacing = 0.05
    pacer = Pacer(spacing)
    fetched = await asyncio.gather(*(
        timed_fetch(session, site.url("/slow-chain/0"), pace=pacer.turn) for _ in range(2)))
    assert [result.error for result, _ in fetched] == [None, None]
    first, second = sorted(at for path, at in site.arrivals if path == "/slow-chain/0")
    assert spacing - 0.01 <= second - first < SLOW_HOP  # ended by the answer: >= SLOW_HOP + spacing


async def test_the_deadline_covers_the_whole_chain_of_hops(
    site: Site, session: aiohttp.ClientSession
) -> None:
    # Four hops of SLOW_HOP each: every one is well inside the deadline, all of them are not.
    deadline = 2.5 * SLOW_HOP
    result, elapsed = await timed_fetch(session, site.url("/slow-chain/3"), deadline=deadline,
                                        pace=slow_pace)
    assert result.error == "timeout"
    assert site.hits["/slow-chain/0"] == 0
    assert deadline * 1000 * 0.9 <= result.elapsed_ms < deadline * 1000 + 200
    assert elapsed >= 3 * PACING_WAIT  # and the deadline still ran on after each pacing wait


# --------------------------------------------------------------------------------------------
# 6c. The crawler's own faults are not the page's
# --------------------------------------------------------------------------------------------


async def test_may_follow_raising_is_a_crawler_fault(
    site: Site, session: aiohttp.ClientSession
) -> None:
    async def may_follow(target: str) -> bool:
        raise redis.exceptions.ConnectionError("Error 111 connecting to localhost:6379")

    with pytest.raises(CrawlerFault) as fault:
        await timed_fetch(session, site.url("/chain/3"), may_follow=may_follow)
    assert isinstance(fault.value.__cause__, redis.exceptions.ConnectionError)
    assert site.hits["/chain/3"] == 1 and site.hits["/chain/2"] == 0


async def test_pace_raising_is_a_crawler_fault(
    site: Site, session: aiohttp.ClientSession
) -> None:
    async def pace() -> Turn:
        raise redis.exceptions.ResponseError("NOSCRIPT No matching script")

    with pytest.raises(CrawlerFault) as fault:
        await timed_fetch(session, site.url("/page"), pace=pace)
    assert isinstance(fault.value.__cause__, redis.exceptions.ResponseError)
    assert sum(site.hits.values()) == 0


# --------------------------------------------------------------------------------------------
# 7-8. Peers that do not speak HTTP, and nobody listening
# --------------------------------------------------------------------------------------------

# What a broken peer may legitimately be classified as; never the catch-all "error".
BROKEN_PEER_ERRORS = {"protocol", "connect"}


async def _raw_server(
    on_connect: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> tuple[asyncio.Server, int, list[int]]:
    connections: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await on_connect(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    return server, port, connections


async def _close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    return None


async def _send_garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"\x00\xffTHIS IS NOT HTTP AT ALL\r\n\r\n" + bytes(range(256)))
    await writer.drain()


async def _bad_status_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 abc Nope\r\nContent-Length: 2\r\n\r\nhi")
    await writer.drain()


async def _header_bomb(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nX-Bomb: " + b"a" * (1024 * 1024) + b"\r\n\r\n")
    with contextlib.suppress(ConnectionError):
        await writer.drain()


@pytest.mark.parametrize(
    "behaviour",
    [_close_at_once, _send_garbage, _bad_status_line],
    ids=["close-at-once", "garbage", "bad-status-line"],
)
async def test_broken_peer_is_classified(
    session: aiohttp.ClientSession,
    behaviour: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> None:
    server, port, connections = await _raw_server(behaviour)
    try:
        result, elapsed = await timed_fetch(session, f"http://{HOST}:{port}/")
    finally:
        server.close()
        await server.wait_closed()
    assert result.error in BROKEN_PEER_ERRORS, result.error
    assert result.status is None
    assert connections  # it really did connect to the broken peer
    assert elapsed < 2


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def test_connection_refused_is_connect(session: aiohttp.ClientSession) -> None:
    result, elapsed = await timed_fetch(session, f"http://{HOST}:{_closed_port()}/")
    assert result.error == "connect"
    assert result.status is None
    assert result.final_url is None
    assert elapsed < 2


# --------------------------------------------------------------------------------------------
# 9-10. DNS and the SSRF guard
# --------------------------------------------------------------------------------------------

# Names the test DNS server knows; everything else is NXDOMAIN.
DNS_ZONE: dict[str, list[RR]] = {
    "loop.test.": [RR("loop.test.", QTYPE.A, rdata=A("127.0.0.1"), ttl=60)],
    "loop6.test.": [RR("loop6.test.", QTYPE.AAAA, rdata=AAAA("::1"), ttl=60)],
    # A public address (TEST-NET is not global, so use a real public one) beside loopback.
    "mixed.test.": [
        RR("mixed.test.", QTYPE.A, rdata=A("127.0.0.1"), ttl=60),
        RR("mixed.test.", QTYPE.A, rdata=A("8.8.8.8"), ttl=60),
    ],
}


class ZoneResolver(BaseResolver):  # type: ignore[misc]
    def __init__(self) -> None:
        self.questions: list[str] = []

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower()
        self.questions.append(name)
        records = DNS_ZONE.get(name)
        if records is None:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rr in records:
            if rr.rtype == request.q.qtype:
                reply.add_answer(rr)
        return reply  # NOERROR, possibly with no answer (e.g. AAAA for an A-only name)


@dataclass
class Dns:
    nameserver: str
    resolver: ZoneResolver


@pytest.fixture
def dns() -> Iterator[Dns]:
    zone = ZoneResolver()
    server = DNSServer(zone, port=0, address=HOST, logger=_QuietLogger())
    # serve_forever by hand: DNSServer.start_thread() polls for shutdown only every 0.5 s.
    thread = threading.Thread(
        target=server.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        port = server.server.server_address[1]
        yield Dns(nameserver=f"{HOST}:{port}", resolver=zone)
    finally:
        server.server.shutdown()
        server.server.server_close()
        thread.join(2)


class _QuietLogger:
    def __getattr__(self, name: str) -> Callable[..., None]:
        return lambda *args, **kwargs: None


async def test_nxdomain_is_dns(dns: Dns) -> None:
    async with worker_session(_settings(dns_nameservers=(dns.nameserver,))) as session:
        result, elapsed = await timed_fetch(session, f"http://nonexistent.test:{_closed_port()}/")
    assert result.error == "dns"
    assert elapsed < 2
    assert any(q.startswith("nonexistent.test.") for q in dns.resolver.questions)


async def test_unreachable_nameserver_is_dns_temporary() -> None:
    # Nothing listens on the port: the query is refused (ICMP), c-ares gives up at once. The
    # name may well exist: that is worth another try, unlike an NXDOMAIN.
    settings = _settings(dns_nameservers=(f"{HOST}:{_closed_udp_port()}",))
    async with worker_session(settings) as session:
        result, elapsed = await timed_fetch(session, f"http://nonexistent.test:{_closed_port()}/")
    assert result.error == "dns_temporary"
    assert elapsed < 2


async def test_silent_nameserver_is_bounded_by_the_fetch_deadline() -> None:
    # A nameserver that swallows queries: c-ares alone would retry for many seconds; fetch()'s
    # deadline must cut the lookup short (the session has no total timeout of its own).
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind((HOST, 0))
        port = silent.getsockname()[1]
        settings = _settings(dns_nameservers=(f"{HOST}:{port}",))
        async with worker_session(settings) as session:
            result, elapsed = await timed_fetch(
                session, f"http://silent.test:{_closed_port()}/", deadline=0.5
            )
    assert result.error == "timeout"
    assert 0.4 <= elapsed < 2


@pytest.fixture(scope="module")
def testweb_dns() -> Iterator[DnsServer]:
    """The test web's own DNS server, with its broken-nameserver names."""
    with DnsServer(["site0.test"]) as server:
        yield server


@pytest.mark.parametrize(
    ("host", "error"),
    [
        ("nope.test", "dns"),  # NXDOMAIN: the name does not exist, final
        ("test", "dns"),  # the zone apex has no A/AAAA: "no data", final
        ("servfail.test", "dns_temporary"),  # SERVFAIL
        ("example.com", "dns_temporary"),  # REFUSED (outside the zone)
        ("silent.test", "dns_temporary"),  # dropped: c-ares' own timeout
    ],
)
async def test_resolver_failures_are_final_or_temporary(
    testweb_dns: DnsServer, host: str, error: str
) -> None:
    # A short c-ares timeout, so the silent name times out in the resolver (with a code)
    # before fetch()'s deadline does.
    resolver = GuardedResolver(
        allow_private=True, nameservers=[f"{HOST}:{testweb_dns.port}"], timeout=0.2, tries=1
    )
    session = _build_session(_settings(), resolver)
    try:
        result, elapsed = await timed_fetch(
            session, f"http://{host}:{_closed_port()}/", deadline=3.0
        )
    finally:
        await session.close()
        await resolver.close()
    assert result.error == error
    assert result.status is None
    assert elapsed < 2


async def test_literal_private_ip_is_refused_without_a_request(
    site: Site, session: aiohttp.ClientSession
) -> None:
    result, elapsed = await timed_fetch(session, site.url("/page"), allow_private=False)
    assert result.error == "blocked_address"
    assert result.detail == "127.0.0.1 is loopback"
    assert result.status is None
    assert sum(site.hits.values()) == 0
    assert elapsed < 1


async def test_redirect_to_private_literal_is_refused_at_the_hop(site: Site, dns: Dns) -> None:
    """The literal check runs on every hop, not only on the first URL.

    The session's resolver lets loop.test (127.0.0.1) through so that the first hop reaches the
    test site; fetch itself forbids private addresses, so the redirect to the IP literal
    http://127.0.0.1:PORT/page must be refused before it is requested.
    """
    port = site.base.rsplit(":", 1)[1]
    settings = _settings(allow_private=True, dns_nameservers=(dns.nameserver,))
    async with worker_session(settings) as session:
        result, _ = await timed_fetch(
            session, f"http://loop.test:{port}/to-literal", allow_private=False
        )
    assert result.error == "blocked_address"
    assert result.detail == "127.0.0.1 is loopback"
    assert result.redirects == [site.url("/page")]
    assert site.hits["/to-literal"] == 1
    assert site.hits["/page"] == 0


async def test_hostname_resolving_to_loopback_is_blocked_address(site: Site, dns: Dns) -> None:
    port = site.base.rsplit(":", 1)[1]
    settings = _settings(allow_private=False, dns_nameservers=(dns.nameserver,))
    async with worker_session(settings) as session:
        result, elapsed = await timed_fetch(
            session, f"http://loop.test:{port}/page", allow_private=False
        )
    assert result.error == "blocked_address"
    assert result.detail == "127.0.0.1 is loopback"
    assert result.status is None
    assert sum(site.hits.values()) == 0  # refused in the resolver, before any connection
    assert elapsed < 2
    assert "loop.test." in dns.resolver.questions


async def test_hostname_resolving_to_loopback_allowed_when_private_allowed(
    site: Site, dns: Dns
) -> None:
    port = site.base.rsplit(":", 1)[1]
    url = f"http://loop.test:{port}/page"
    settings = _settings(allow_private=True, dns_nameservers=(dns.nameserver,))
    async with worker_session(settings) as session:
        result, _ = await timed_fetch(session, url, allow_private=True)
    assert result.error is None
    assert result.status == 200
    assert result.final_url == url
    assert result.body == HTML_PAGE
    assert site.hits["/page"] == 1


async def test_guarded_resolver_filters_answers(dns: Dns) -> None:
    guarded = GuardedResolver(allow_private=False, nameservers=[dns.nameserver])
    open_ = GuardedResolver(allow_private=True, nameservers=[dns.nameserver])
    try:
        with pytest.raises(BlockedAddressError) as blocked:
            await asyncio.wait_for(guarded.resolve("loop.test", 80), FETCH_DEADLINE)
        assert blocked.value.detail == "127.0.0.1 is loopback"
        with pytest.raises(PrivateAddressError):  # the old name still catches it
            await asyncio.wait_for(
                guarded.resolve("loop6.test", 80, socket.AF_INET6), FETCH_DEADLINE
            )
        # Mixed answers refuse the name: filtering would still connect where its owner chose.
        with pytest.raises(BlockedAddressError) as mixed:
            await asyncio.wait_for(guarded.resolve("mixed.test", 80), FETCH_DEADLINE)
        assert mixed.value.detail == "127.0.0.1 is loopback (beside 1 allowed address)"
        allowed = await asyncio.wait_for(open_.resolve("loop.test", 80), FETCH_DEADLINE)
        assert [(a["host"], a["port"]) for a in allowed] == [("127.0.0.1", 80)]
    finally:
        await guarded.close()
        await open_.close()


@pytest.mark.parametrize(
    ("address", "private"),
    [
        ("10.0.0.1", True),
        ("192.168.1.1", True),
        ("172.16.0.1", True),
        ("127.0.0.1", True),
        ("169.254.1.1", True),
        ("100.64.0.1", True),  # carrier-grade NAT
        ("0.0.0.0", True),
        ("224.0.0.1", True),  # multicast
        ("::1", True),
        ("fc00::1", True),
        ("fe80::1", True),
        ("::ffff:127.0.0.1", True),  # IPv4-mapped loopback
        ("8.8.8.8", False),
        ("2001:4860:4860::8888", False),
    ],
)
def test_is_private_address(address: str, private: bool) -> None:
    assert is_private_address(address) is private


@pytest.mark.parametrize(
    ("address", "rule"),
    [
        ("127.0.0.1", "loopback"),
        ("::ffff:127.0.0.1", "IPv4-mapped to 127.0.0.1 (loopback)"),  # by the IPv4 inside
        ("10.0.0.1", "private"),
        ("fe80::1", "link-local"),
        ("169.254.1.1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("100.64.0.1", "shared address space"),
        ("8.8.8.8", None),
    ],
)
def test_blocked_rule_names_the_rule(address: str, rule: str | None) -> None:
    assert blocked_rule(address) == rule


@pytest.mark.parametrize(
    ("url", "private"),
    [
        ("http://127.0.0.1:8080/x", True),
        ("http://[::1]/", True),
        ("http://10.1.2.3/", True),
        ("http://8.8.8.8/", False),
        ("http://example.com/", False),  # names are the resolver's business
    ],
)
def test_literal_private_host(url: str, private: bool) -> None:
    assert literal_private_host(url) is private


def test_classify_error_follows_the_cause_chain() -> None:
    try:
        try:
            raise BlockedAddressError("x resolves only to blocked addresses", "10.0.0.1 is private")
        except BlockedAddressError as inner:
            raise OSError("wrapped") from inner
    except OSError as outer:
        assert classify_error(outer) == "blocked_address"
    assert classify_error(TimeoutError()) == "timeout"
    assert classify_error(RuntimeError("surprise")) == "error"


# --------------------------------------------------------------------------------------------
# 11. build_result
# --------------------------------------------------------------------------------------------


def _entry(url: str, depth: int = 0) -> QueuedURL:
    return QueuedURL(v=1, fp="f" * 16, url=url, depth=depth)


def _fetched(url: str, body: bytes, content_type: str | None) -> Fetched:
    return Fetched(
        url=url, final_url=url, status=200, content_type=content_type, body=body, elapsed_ms=12.5
    )


async def test_build_result_for_fetched_html(site: Site, session: aiohttp.ClientSession) -> None:
    url = site.url("/page")
    fetched, _ = await timed_fetch(session, url)
    result, links, _aliases = build_result(_entry(url, depth=1), fetched, _settings())
    assert result.error is None
    assert result.status == 200
    assert result.title == "Hello \u2014 world"
    assert result.encoding == "utf-8"
    assert result.depth == 1
    assert result.bytes == len(HTML_PAGE)
    assert result.worker == "test-worker"
    # Absolute, canonical, de-duplicated, in document order; self-links, mailto: and
    # rel=nofollow anchors dropped; default port and fragment gone.
    assert links == [site.url("/a"), site.url("/b?x=1"), "http://example.com/c"]
    assert result.links == len(links)
    assert result.canonical == url


async def test_build_result_for_pdf(site: Site, session: aiohttp.ClientSession) -> None:
    url = site.url("/doc.pdf")
    fetched, _ = await timed_fetch(session, url)
    assert fetched.content_type == "application/pdf"
    result, links, _aliases = build_result(_entry(url), fetched, _settings())
    assert result.error is None
    assert result.title is None
    assert result.links == 0
    assert links == []
    assert result.encoding is None
    assert result.bytes == len(fetched.body) > 0


async def test_build_result_binary_served_as_html(
    site: Site, session: aiohttp.ClientSession
) -> None:
    url = site.url("/png")
    fetched, _ = await timed_fetch(session, url)
    assert fetched.error is None
    assert fetched.content_type == "text/html"
    result, links, _aliases = build_result(_entry(url), fetched, _settings())
    assert result.error == "binary"
    assert result.title is None
    assert links == []


def test_build_result_unknown_charset_label_still_decodes() -> None:
    url = "http://example.com/"
    body = '<html><title>caf\u00e9</title><a href="/x">x</a></html>'.encode()
    result, links, _aliases = build_result(
        _entry(url), _fetched(url, body, "text/html; charset=utf-99"), _settings()
    )
    assert result.error is None
    assert result.title == "caf\u00e9"
    assert result.encoding == "utf-8"
    assert links == ["http://example.com/x"]


def test_build_result_meta_robots_nofollow() -> None:
    url = "http://example.com/"
    body = (
        b'<html><head><meta name="ROBOTS" content="noindex, nofollow"></head>'
        b'<a href="/one">1</a><a href="/two">2</a></html>'
    )
    fetched = _fetched(url, body, "text/html")
    result, links, _aliases = build_result(_entry(url), fetched, _settings())
    assert result.error is None
    assert links == []  # nothing to follow...
    assert result.links == 2  # ...but the page's outlinks are still counted
    assert result.nofollow is True
    assert result.noindex is True


@pytest.mark.parametrize(("depth", "follows"), [(1, True), (2, False), (3, False)])
def test_build_result_respects_max_depth(depth: int, follows: bool) -> None:
    url = "http://example.com/"
    body = b'<html><a href="/one">1</a><a href="/two">2</a></html>'
    result, links, _aliases = build_result(
        _entry(url, depth=depth), _fetched(url, body, "text/html"), _settings(max_depth=2)
    )
    assert result.error is None
    assert result.links == 2
    expected = ["http://example.com/one", "http://example.com/two"]
    assert links == (expected if follows else [])


def test_build_result_keeps_fetch_error_and_skips_parsing() -> None:
    url = "http://example.com/missing"
    fetched = Fetched(
        url=url,
        final_url=url,
        status=404,
        content_type="text/html",
        body=b'<html><title>Not found</title><a href="/x">x</a></html>',
        error="http_4xx",
    )
    result, links, _aliases = build_result(_entry(url), fetched, _settings())
    assert result.error == "http_4xx"
    assert result.status == 404
    assert result.title is None
    assert links == []


# --------------------------------------------------------------------------------------------
# 12. The guard's settings: mixed answers, allow_networks, ports (stub resolver and loopback)
# --------------------------------------------------------------------------------------------


@pytest.fixture
def stub_dns(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """aiohttp's AsyncResolver answers from this table instead of asking any nameserver."""
    table: dict[str, list[str]] = {}

    async def resolve(self: Any, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[Any]:
        return [{"hostname": host, "host": a, "port": port, "family": socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for a in table[host]]

    monkeypatch.setattr(aiohttp.AsyncResolver, "resolve", resolve)
    return table


@pytest.mark.parametrize(
    ("answers", "detail"),
    [
        (["8.8.8.8"], None),
        (["8.8.8.8", "10.0.0.1"], "10.0.0.1 is private (beside 1 allowed address)"),
        (["64:ff9b::a9fe:a9fe"], "64:ff9b::a9fe:a9fe is NAT64 to 169.254.169.254 (link-local)"),
        (["64:ff9b::808:808"], None),
        (["2002:7f00:1::1"], "2002:7f00:1::1 is 6to4 to 127.0.0.1 (loopback)"),
    ],
)
async def test_resolver_refuses_a_name_with_any_blocked_answer(
    stub_dns: dict[str, list[str]], answers: list[str], detail: str | None
) -> None:
    stub_dns["name.test"] = answers
    resolver = GuardedResolver(allow_private=False)
    try:
        if detail is None:
            got = await resolver.resolve("name.test", 80)
            assert [a["host"] for a in got] == answers
        else:
            with pytest.raises(BlockedAddressError) as blocked:
                await resolver.resolve("name.test", 80)
            assert blocked.value.detail == detail
            assert classify_error(blocked.value) == "blocked_address"
    finally:
        await resolver.close()


async def test_resolver_allow_networks_and_exempt_proxy(stub_dns: dict[str, list[str]]) -> None:
    from crawlfleet.common.addresses import parse_networks

    stub_dns.update({"inside.test": ["10.1.0.5"], "public.test": ["8.8.8.8"],
                     "proxy.test": ["10.9.9.9"]})
    resolver = GuardedResolver(allow_private=False, allow_networks=parse_networks(["10.1.0.0/16"]),
                               exempt_hosts=("proxy.test",))
    try:
        assert [a["host"] for a in await resolver.resolve("inside.test", 80)] == ["10.1.0.5"]
        with pytest.raises(BlockedAddressError, match="outside CRAWLFLEET_ALLOW_NETWORKS"):
            await resolver.resolve("public.test", 80)
        # The configured proxy is resolved unchecked by the connector...
        assert [a["host"] for a in await resolver.resolve("proxy.test", 3128)] == ["10.9.9.9"]
        # ...but never when it is a fetch's target.
        with pytest.raises(BlockedAddressError):
            await resolver.checked("proxy.test", 80)
    finally:
        await resolver.close()


async def test_proxy_target_is_checked_before_the_request(stub_dns: dict[str, list[str]]) -> None:
    """Through a proxy the connector resolves only the proxy: the session's guard resolves the
    target itself. Nothing listens on the proxy's port; the refusal comes before any request."""
    stub_dns["internal.test"] = ["8.8.8.8", "192.168.0.10"]
    settings = _settings(allow_private=False, proxy=f"http://u:pw@{HOST}:{_closed_port()}")
    async with worker_session(settings) as session:
        result, _ = await timed_fetch(session, "http://internal.test/", allow_private=False)
    assert result.error == "blocked_address"
    assert result.detail == "192.168.0.10 is private (beside 1 allowed address)"


async def test_allow_networks_admits_loopback_literal(site: Site) -> None:
    settings = _settings(allow_private=False, allow_networks=("127.0.0.0/8",))
    async with worker_session(settings) as session:
        result, _ = await timed_fetch(session, site.url("/page"), allow_private=False)
    assert result.error is None and result.status == 200
    settings = _settings(allow_private=False, allow_networks=("10.0.0.0/8",))
    async with worker_session(settings) as session:
        result, _ = await timed_fetch(session, site.url("/page"), allow_private=False)
    assert result.error == "blocked_address"
    assert result.detail == "127.0.0.1 is outside CRAWLFLEET_ALLOW_NETWORKS"
    assert site.hits["/page"] == 1


async def test_redirect_to_another_port_is_refused(site: Site) -> None:
    other = _closed_port()

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: http://{HOST}:{other}/\r\n"
                     "Content-Length: 0\r\n\r\n".encode())
        await writer.drain()

    server, port, _ = await _raw_server(redirect)
    try:
        async with worker_session(_settings()) as session:
            result, _ = await timed_fetch(session, f"http://{HOST}:{port}/")
        assert result.error == "blocked_address"
        assert result.detail == (
            f"port {other} is not allowed (only 80, 443 and the port the fetch started on)")
        # Listed in CRAWLFLEET_ALLOWED_PORTS, it is followed (and refused by nobody there).
        async with worker_session(_settings(allowed_ports=(str(port), str(other)))) as session:
            result, _ = await timed_fetch(session, f"http://{HOST}:{port}/")
        assert result.error == "connect"
        async with worker_session(_settings(allowed_ports=("80",))) as session:
            result, _ = await timed_fetch(session, site.url("/page"))
        assert result.error == "blocked_address"
        site_port = site.base.rsplit(":", 1)[1]
        assert result.detail == f"port {site_port} is not in CRAWLFLEET_ALLOWED_PORTS"
    finally:
        server.close()
        await server.wait_closed()
