"""A naive crawler, "what an afternoon gives": the baseline benchmarks/throughput.py compares to.

Usage::

    .venv/bin/python benchmarks/naive.py SEED_URL... --redis-url redis://127.0.0.1:PORT/0 \\
        [--dns 127.0.0.1:5353] [--max-in-flight 64] [--per-host-concurrency 2] \\
        [--crawl-delay 0] [--key naive:seen] [--out urls.txt]

asyncio + aiohttp: one shared ``ClientSession`` (aiodns resolver pointed at ``--dns``, the test
web's DNS server), one global ``asyncio.Semaphore`` of ``--max-in-flight`` and one per host of
``--per-host-concurrency``, and ``--crawl-delay`` seconds between request starts per host: the
same politeness limits as crawlfleet's. Links come from selectolax (Lexbor) and
``urllib.parse.urljoin`` (``<base href>`` honoured, fragments dropped), stay within the seeds'
hosts, and are deduplicated in ONE Redis SET: one SADD per link, sent per page in one pipeline.

What it does NOT do: robots.txt (not even fetched), retries, leases, crash safety (a crash loses
the crawl), a result store (the fetched URLs are only written to ``--out`` at the end), URL
canonicalisation beyond urljoin, any limit on depth or pages, any guard against private
addresses. It follows redirects (aiohttp's default) and parses only text/html bodies.

It prints one JSON line at the end: ``{"pages", "failed", "elapsed_s", "robots": "ignored"}``
(pages: answers < 400; failed: >= 400, errors and timeouts). For the benchmark: ``--wait-go``
prints ``{"ready": true}`` once the session and Redis are up and starts on SIGUSR1 (so start-up
is not timed), and ``--linger`` waits for SIGTERM after the summary (so that the benchmark can
read the process's CPU time and peak RSS before it ends).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import urldefrag, urljoin, urlsplit

import aiohttp
from redis.asyncio import Redis
from selectolax.lexbor import LexborHTMLParser


class Host:
    """One host's politeness: requests in flight, and the earliest next request start."""

    def __init__(self, concurrency: int) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.next_start = 0.0


class Crawler:
    def __init__(self, args: argparse.Namespace, session: aiohttp.ClientSession,
                 redis: Redis) -> None:
        self.args = args
        self.session = session
        # redis-py types asyncio commands as `Awaitable[T] | T`; this client is asyncio only.
        self.redis: Any = redis
        self.key: str = args.key
        self.scope = {urlsplit(seed).hostname for seed in args.seeds}
        self.slots = asyncio.Semaphore(args.max_in_flight)
        self.hosts: defaultdict[str, Host] = defaultdict(
            lambda: Host(args.per_host_concurrency))
        self.tasks: set[asyncio.Task[None]] = set()
        self.fetched: list[str] = []
        self.pages = self.failed = 0

    def spawn(self, url: str) -> None:
        task = asyncio.create_task(self.visit(url))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run(self) -> None:
        seeds = list(dict.fromkeys(urldefrag(s.strip()).url for s in self.args.seeds))
        await self.redis.sadd(self.key, *seeds)
        for url in seeds:
            self.spawn(url)
        while self.tasks:
            await asyncio.gather(*list(self.tasks))

    async def pace(self, host: Host) -> None:
        delay = self.args.crawl_delay
        if delay <= 0:
            return
        now = time.monotonic()
        start = max(now, host.next_start)
        host.next_start = start + delay
        if start > now:
            await asyncio.sleep(start - now)

    async def visit(self, url: str) -> None:
        host = self.hosts[urlsplit(url).netloc]
        body = b""
        final_url = url
        is_page = False
        async with host.slots, self.slots:
            await self.pace(host)
            try:
                async with self.session.get(url) as response:
                    body = await response.read()
                    final_url = str(response.url)
                    ok = response.status < 400
                    is_page = ok and response.content_type == "text/html"
            except (aiohttp.ClientError, TimeoutError, ValueError):
                ok = False
        self.fetched.append(url)
        if not ok:
            self.failed += 1
            return
        self.pages += 1
        if is_page:
            await self.follow(self.links(body, final_url))

    def links(self, body: bytes, page_url: str) -> set[str]:
        tree = LexborHTMLParser(body)
        base_tag = tree.css_first("base[href]")
        base = page_url
        if base_tag is not None:
            base = urljoin(page_url, (base_tag.attributes.get("href") or "").strip())
        found = set()
        for a in tree.css("a[href]"):
            href = (a.attributes.get("href") or "").strip()
            if not href:
                continue
            link = urldefrag(urljoin(base, href)).url
            parts = urlsplit(link)
            if parts.scheme in ("http", "https") and parts.hostname in self.scope:
                found.add(link)
        return found

    async def follow(self, links: set[str]) -> None:
        if not links:
            return
        ordered = sorted(links)
        async with self.redis.pipeline(transaction=False) as pipe:
            for link in ordered:
                pipe.sadd(self.key, link)
            added = await pipe.execute()
        for link, new in zip(ordered, added, strict=True):
            if new:
                self.spawn(link)


async def main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    go, stop = asyncio.Event(), asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, go.set)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    resolver = aiohttp.AsyncResolver(nameservers=[args.dns]) if args.dns else None
    connector = aiohttp.TCPConnector(limit=args.max_in_flight,
                                     limit_per_host=args.per_host_concurrency,
                                     resolver=resolver, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=30)
    redis: Redis = Redis.from_url(args.redis_url)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        try:
            await redis.ping()
            crawler = Crawler(args, session, redis)
            if args.wait_go:
                print(json.dumps({"ready": True}), flush=True)
                await go.wait()
            started = time.perf_counter()
            await crawler.run()
            elapsed = time.perf_counter() - started
        finally:
            await redis.aclose()
    if args.out:
        text = "".join(f"{url}\n" for url in crawler.fetched)
        await asyncio.to_thread(Path(args.out).write_text, text)
    print(json.dumps({"pages": crawler.pages, "failed": crawler.failed,
                      "elapsed_s": round(elapsed, 4), "robots": "ignored"}), flush=True)
    if args.linger:
        await stop.wait()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="A naive asyncio crawler (the benchmarks' "
                                "baseline). No robots.txt, no retries, no crash safety.")
    p.add_argument("seeds", nargs="+", metavar="SEED_URL")
    p.add_argument("--redis-url", required=True, help="Redis for the one dedup SET")
    p.add_argument("--key", default="naive:seen", help="the dedup SET's key")
    add_peer_arguments(p)
    return p


def add_peer_arguments(p: argparse.ArgumentParser) -> None:
    """The options every peer crawler of the benchmark takes (scrapy_peer.py too), so that
    benchmarks/throughput.py drives them alike."""
    p.add_argument("--dns", default="", help="nameserver HOST:PORT (default: the system's)")
    p.add_argument("--max-in-flight", type=int, default=64)
    p.add_argument("--per-host-concurrency", type=int, default=2)
    p.add_argument("--crawl-delay", type=float, default=0.0,
                   help="seconds between request starts per host")
    p.add_argument("--out", default="", help="write the fetched URLs here, one a line")
    p.add_argument("--wait-go", action="store_true",
                   help="print a ready line, then wait for SIGUSR1 before crawling")
    p.add_argument("--linger", action="store_true",
                   help="after the summary line, wait for SIGTERM before exiting")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
