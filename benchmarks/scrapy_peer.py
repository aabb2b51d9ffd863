"""A Scrapy peer of benchmarks/naive.py: the same crawl, written as a typical Scrapy user would.

Usage::

    .venv/bin/python benchmarks/scrapy_peer.py SEED_URL... [--dns 127.0.0.1:5353] \\
        [--max-in-flight 64] [--per-host-concurrency 2] [--crawl-delay 0] [--out urls.txt] \\
        [--wait-go] [--linger] [--redis-url URL] [--key KEY]

One ``scrapy.Spider`` run by ``CrawlerProcess`` (Scrapy's default asyncio Twisted reactor, its
HTTP/1.1 download handler, its scheduler and its default dupe filter, ``RFPDupeFilter``, in
memory). Politeness as naive.py's: ``CONCURRENT_REQUESTS`` = ``--max-in-flight``,
``CONCURRENT_REQUESTS_PER_DOMAIN`` = ``--per-host-concurrency``, ``DOWNLOAD_DELAY`` =
``--crawl-delay`` (not randomised), a 30 s download timeout. Names resolve through ``--dns`` only
(the test web's DNS server; twisted.names, no /etc/hosts, no resolv.conf, answers outside
127.0.0.0/8 refused), cached for the crawl; without ``--dns``, Scrapy's default resolver. Links
are ``response.css("a::attr(href)")`` joined by ``response.urljoin`` (``<base href>`` honoured,
as Scrapy does, within the first 4 KiB), fragments dropped, http(s) on the seeds' exact hosts.

What it does NOT do: robots.txt (``ROBOTSTXT_OBEY`` off: not even fetched), retries, AutoThrottle,
an HTTP cache, the telnet console, crash safety, a result store (the fetched URLs are only written
to ``--out`` at the end), any limit on depth or pages. ``--redis-url`` and ``--key`` are accepted
(naive.py's interface) and ignored: Scrapy dedups in memory. It follows redirects (Scrapy's
default) and parses only text/html bodies. The URLs are deduplicated by Scrapy's request
fingerprint (canonicalised: query arguments sorted ...), where naive.py compares them as strings.

It prints one JSON line at the end: ``{"pages", "failed", "elapsed_s", "robots": "ignored",
"scrapy"}`` (pages: answers < 400; failed: >= 400, errors and timeouts; every one of them is a
fetched URL, written to ``--out`` as requested, before redirects). ``--wait-go`` prints
``{"ready": true}`` once the crawler and its engine are up and starts requesting on SIGUSR1 (so
start-up is not timed), and ``--linger`` waits for SIGTERM after the summary (so that the
benchmark can read the process's CPU time and peak RSS before it ends).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urlsplit

import scrapy
from scrapy.crawler import CrawlerProcess
from scrapy.http import Response, TextResponse
from twisted.internet import defer
from twisted.internet.abstract import isIPAddress
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import IResolverSimple
from twisted.names import client
from twisted.python.failure import Failure
from zope.interface import implementer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # naive.py, next to this file
from naive import add_peer_arguments

LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


@implementer(IResolverSimple)
class TestWebResolver:
    """Scrapy's ``TWISTED_DNS_RESOLVER``: A records from the ``PEER_DNS`` server alone, cached;
    an address outside 127.0.0.0/8 is a lookup error (the test web answers loopback only)."""

    def __init__(self, reactor: Any, server: tuple[str, int], timeout: float) -> None:
        self.reactor = reactor
        resolver: Any = client.Resolver  # twisted.names is untyped
        self.names = resolver(servers=[server], reactor=reactor)  # no resolv.conf, no hosts
        self.timeout = timeout
        self.cache: dict[str, str] = {}

    @classmethod
    def from_crawler(cls, crawler: Any, reactor: Any) -> TestWebResolver:
        host, _, port = crawler.settings["PEER_DNS"].rpartition(":")
        return cls(reactor, (host, int(port)), crawler.settings.getfloat("DNS_TIMEOUT"))

    def install_on_reactor(self) -> None:
        self.reactor.installResolver(self)

    def getHostByName(self, name: str, timeout: Sequence[int] = ()) -> defer.Deferred[str]:
        if name in self.cache:
            return defer.succeed(self.cache[name])
        if isIPAddress(name):
            return defer.maybeDeferred(self.checked, name, name)
        d: defer.Deferred[str] = self.names.getHostByName(name, timeout=(self.timeout,))
        return d.addCallback(self.checked, name)

    def checked(self, address: str, name: str) -> str:
        if ipaddress.ip_address(address) not in LOOPBACK:
            raise DNSLookupError(f"{name} resolved to {address}, outside 127.0.0.0/8")
        self.cache[name] = address
        return address


@dataclass
class Tally:
    """What the crawl fetched, and when its first request was made."""

    fetched: list[str] = field(default_factory=list)
    pages: int = 0
    failed: int = 0
    started: float = 0.0

    def record(self, url: str, ok: bool) -> None:
        self.fetched.append(url)
        if ok:
            self.pages += 1
        else:
            self.failed += 1


def is_html(response: Response) -> bool:
    content_type = response.headers.get(b"Content-Type") or b""
    return content_type.split(b";", 1)[0].strip().lower() == b"text/html"


class PeerSpider(scrapy.Spider):
    name = "peer"

    def __init__(self, seeds: list[str], wait_go: bool, tally: Tally, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seeds = seeds
        self.scope = {urlsplit(seed).hostname for seed in seeds}
        self.wait_go = wait_go
        self.tally = tally

    async def start(self) -> AsyncIterator[scrapy.Request]:
        if self.wait_go:
            loop, go = asyncio.get_running_loop(), asyncio.Event()
            signal.signal(signal.SIGUSR1, lambda *_: loop.call_soon_threadsafe(go.set))
            print(json.dumps({"ready": True}), flush=True)
            await go.wait()
        self.tally.started = time.perf_counter()
        for url in self.seeds:
            yield scrapy.Request(url, callback=self.parse, errback=self.fail)

    def parse(self, response: Response) -> Iterator[scrapy.Request]:
        ok = response.status < 400
        self.tally.record(response.meta.get("redirect_urls", [response.url])[0], ok)
        if not (ok and isinstance(response, TextResponse) and is_html(response)):
            return
        for href in response.css("a::attr(href)").getall():
            href = href.strip()
            if not href:
                continue
            link = urldefrag(response.urljoin(href)).url
            parts = urlsplit(link)
            if parts.scheme in ("http", "https") and parts.hostname in self.scope:
                yield scrapy.Request(link, callback=self.parse, errback=self.fail)

    def fail(self, failure: Failure) -> None:
        request = getattr(failure, "request", None)
        self.tally.record(request.url if request is not None else "", False)


def settings_for(args: argparse.Namespace) -> dict[str, Any]:
    settings: dict[str, Any] = {
        "CONCURRENT_REQUESTS": args.max_in_flight,
        "CONCURRENT_REQUESTS_PER_DOMAIN": args.per_host_concurrency,
        "DOWNLOAD_DELAY": args.crawl_delay,
        "DOWNLOAD_DELAY_JITTER": 0,  # Scrapy 2.19; RANDOMIZE_DOWNLOAD_DELAY before
        "DOWNLOAD_TIMEOUT": 30,
        "ROBOTSTXT_OBEY": False,
        "RETRY_ENABLED": False,
        "AUTOTHROTTLE_ENABLED": False,
        "HTTPCACHE_ENABLED": False,
        "HTTPERROR_ALLOW_ALL": True,
        "TELNETCONSOLE_ENABLED": False,
        "LOG_LEVEL": "WARNING",
    }
    if args.dns:
        settings |= {"TWISTED_DNS_RESOLVER": TestWebResolver, "PEER_DNS": args.dns}
    return settings


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    seeds = list(dict.fromkeys(urldefrag(s.strip()).url for s in args.seeds))
    tally = Tally()
    outcome: list[Failure] = []
    process = CrawlerProcess(settings_for(args))

    def finished(result: Any) -> None:
        from twisted.internet import reactor as installed  # the one Scrapy installed

        reactor: Any = installed
        # The engine has closed: the crawl's end (0 if it was stopped before the start signal).
        elapsed = time.perf_counter() - tally.started if tally.started else 0.0
        if isinstance(result, Failure):
            outcome.append(result)
            print(json.dumps({"error": result.getErrorMessage()}), flush=True)
        else:
            if args.out:
                Path(args.out).write_text("".join(f"{url}\n" for url in tally.fetched))
            print(json.dumps({"pages": tally.pages, "failed": tally.failed,
                              "elapsed_s": round(elapsed, 4), "robots": "ignored",
                              "scrapy": scrapy.__version__}), flush=True)
        if not args.linger:  # else Scrapy's SIGTERM handler stops the reactor
            reactor.callLater(0, reactor.stop)

    process.crawl(PeerSpider, seeds=seeds, wait_go=args.wait_go, tally=tally).addBoth(finished)
    process.start(stop_after_crawl=False)
    return 1 if outcome else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A Scrapy crawler (a peer of the benchmarks' naive "
                                "baseline). No robots.txt, no retries, no crash safety.")
    p.add_argument("seeds", nargs="+", metavar="SEED_URL")
    p.add_argument("--redis-url", default="", help="ignored (naive.py's interface)")
    p.add_argument("--key", default="", help="ignored (naive.py's interface)")
    add_peer_arguments(p)
    return p


if __name__ == "__main__":
    sys.exit(main())
