"""CRAWLFLEET_PROXY and the per-host cookie jar, end to end on loopback only.

The proxy is written here: an asyncio HTTP proxy on 127.0.0.1 that counts requests, checks
Proxy-Authorization and forwards to 127.0.0.1 (the test web's hosts all live there), so
nothing leaves the machine. Cookies are tested against a small aiohttp server of our own
behind the test web's DNS server, which answers a few ``.test`` names with 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import pytest
from aiohttp import web

from crawlfleet.common.settings import Settings
from crawlfleet.testweb.dns import DnsServer
from crawlfleet.workers.fetch import Fetched, fetch
from crawlfleet.workers.worker import worker_session

from ..conftest import WebUnderTest

pytestmark = pytest.mark.integration

HOST = "127.0.0.1"
USER, PASSWORD = "crawler", "s3cret-pw"


@dataclass
class Proxy:
    port: int
    requests: list[str] = field(default_factory=list)  # request targets, absolute-form
    refused: int = 0  # requests without the right Proxy-Authorization

    def url(self, password: str = PASSWORD) -> str:
        return f"http://{USER}:{password}@{HOST}:{self.port}"


@contextlib.asynccontextmanager
async def http_proxy() -> AsyncIterator[Proxy]:
    expected = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    proxy = Proxy(port=0)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *header_lines = head.split("\r\n")
            method, target, version = request_line.split(" ")
            headers = dict(line.split(": ", 1) for line in header_lines if line)
            if headers.get("Proxy-Authorization") != expected:
                proxy.refused += 1
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                             b"Proxy-Authenticate: Basic realm=\"t\"\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
                return
            proxy.requests.append(target)
            parts = urlsplit(target)  # absolute-form: http://site0.test:PORT/path
            # Every test host lives on loopback: never connect anywhere else.
            up_reader, up_writer = await asyncio.open_connection(HOST, parts.port or 80)
            path = parts.path + (f"?{parts.query}" if parts.query else "")
            kept = {k: v for k, v in headers.items()
                    if k.lower() not in ("proxy-authorization", "proxy-connection", "connection")}
            up_writer.write((f"{method} {path} {version}\r\n"
                             + "".join(f"{k}: {v}\r\n" for k, v in kept.items())
                             + "Connection: close\r\n\r\n").encode("latin-1"))
            await up_writer.drain()
            while chunk := await up_reader.read(65536):
                writer.write(chunk)
            up_writer.close()
        finally:
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    proxy.port = server.sockets[0].getsockname()[1]
    try:
        yield proxy
    finally:
        server.close()
        await server.wait_closed()


def _settings(**changes: Any) -> Settings:
    return Settings(fetch_timeout=5.0, connect_timeout=2.0, read_timeout=5.0,
                    worker_id="test-worker").replace(**changes)


async def _fetch(session: Any, url: str, **kwargs: Any) -> Fetched:
    kwargs.setdefault("allow_private", False)
    return await asyncio.wait_for(
        fetch(session, url, max_body_bytes=1 << 20, deadline=5.0, **kwargs), 10)


def _text(result: Fetched) -> str:
    return "|".join(str(v) for v in (result.url, result.final_url, result.error, result.detail,
                                     result.body[:2000]))


async def test_every_fetch_goes_through_the_proxy(testweb: WebUnderTest) -> None:
    page, robots = testweb.seeds[0], testweb.seeds[0] + "robots.txt"
    async with http_proxy() as proxy:
        # The test web is on loopback: allowed by name of its network, the guard still on.
        settings = _settings(proxy=proxy.url(), dns_nameservers=(testweb.dns,),
                             allow_networks=("127.0.0.0/8",))
        async with worker_session(settings) as session:
            first = await _fetch(session, page)
            second = await _fetch(session, robots, truncate=True)
        assert (first.error, first.status) == (None, 200)
        assert (second.error, second.status) == (None, 200)
        assert proxy.requests == [page, robots]  # both, robots.txt included, via the proxy
        assert proxy.refused == 0

        # A wrong password: the proxy's 407 is the page's result, and the password is nowhere.
        settings = settings.replace(proxy=proxy.url("wrong-pw"))
        async with worker_session(settings) as session:
            denied = await _fetch(session, page)
        assert (denied.status, denied.error) == (407, "http_4xx")
        assert proxy.refused == 1
        assert "wrong-pw" not in _text(denied) and "wrong-pw" not in repr(settings)


async def test_the_guard_applies_to_targets_behind_the_proxy(testweb: WebUnderTest) -> None:
    page = testweb.seeds[0]
    async with http_proxy() as proxy:
        # Guard on, no allowed networks: site0.test resolves to 127.0.0.1 through the worker's
        # resolver and is refused before anything reaches the proxy (itself on loopback).
        settings = _settings(proxy=proxy.url(), dns_nameservers=(testweb.dns,))
        async with worker_session(settings) as session:
            result = await _fetch(session, page)
            literal = await _fetch(session, f"http://{HOST}:{testweb.port}/")
            missing = await _fetch(session, f"http://nope.test:{testweb.port}/")
        assert (result.error, result.detail) == ("blocked_address", "127.0.0.1 is loopback")
        assert (literal.error, literal.detail) == ("blocked_address", "127.0.0.1 is loopback")
        assert missing.error == "dns"  # as without a proxy
        assert proxy.requests == [] and proxy.refused == 0
        assert PASSWORD not in _text(result)


# --------------------------------------------------------------------------------------------
# Cookies
# --------------------------------------------------------------------------------------------

NAMES = ["a.test", "www.a.test", "b.test"]


@contextlib.asynccontextmanager
async def cookie_site() -> AsyncIterator[tuple[int, int, list[tuple[str, str]]]]:
    """/set?name=value sets a host-only cookie, /set-domain?... one with Domain=a.test, and
    /echo answers the Cookie header it got. Yields (http port, dns port, [(host, cookie)])."""
    seen: list[tuple[str, str]] = []

    async def set_cookie(request: web.Request) -> web.Response:
        response = web.Response(text="set")
        for name, value in request.query.items():
            response.set_cookie(name, value, path="/")
        return response

    async def set_domain(request: web.Request) -> web.Response:
        response = web.Response(text="set")
        for name, value in request.query.items():
            response.set_cookie(name, value, path="/", domain="a.test")
        return response

    async def echo(request: web.Request) -> web.Response:
        cookie = request.headers.get("Cookie", "")
        seen.append((request.host.split(":")[0], cookie))
        return web.Response(text=cookie)

    app = web.Application()
    app.router.add_get("/set", set_cookie)
    app.router.add_get("/set-domain", set_domain)
    app.router.add_get("/echo", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    tcp = web.TCPSite(runner, HOST, 0)
    await tcp.start()
    with DnsServer(NAMES) as dns:
        try:
            yield runner.addresses[0][1], dns.port, seen
        finally:
            await runner.cleanup()


async def test_cookies_go_back_to_their_own_host_only() -> None:
    async with cookie_site() as (port, dns_port, seen):
        settings = _settings(dns_nameservers=(f"{HOST}:{dns_port}",),
                             allow_networks=("127.0.0.0/8",))
        async with worker_session(settings) as session:
            url: Callable[[str, str], str] = lambda host, path: f"http://{host}:{port}{path}"  # noqa: E731
            assert (await _fetch(session, url("a.test", "/set?sid=one"))).error is None
            assert (await _fetch(session, url("a.test", "/echo"))).body == b"sid=one"
            assert (await _fetch(session, url("b.test", "/echo"))).body == b""
            assert (await _fetch(session, url("www.a.test", "/echo"))).body == b""
            # Domain=a.test from www.a.test is kept for www.a.test alone.
            await _fetch(session, url("www.a.test", "/set-domain?wide=1"))
            assert (await _fetch(session, url("www.a.test", "/echo"))).body == b"wide=1"
            assert (await _fetch(session, url("a.test", "/echo"))).body == b"sid=one"
            # An IP host keeps its own too, and a name on the same address does not get them.
            await _fetch(session, f"http://{HOST}:{port}/set?ip=1")
            assert (await _fetch(session, f"http://{HOST}:{port}/echo")).body == b"ip=1"
            assert (await _fetch(session, url("b.test", "/echo"))).body == b""
        assert ("b.test", "") in seen
