"""The fleet commands: seed, scheduler, status, export."""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO, Any

import msgspec

from crawlfleet.common.connections import as_text, open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import configure_logging
from crawlfleet.common.messages import Seeds, decode_result, encode
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import read_status
from crawlfleet.common.urls import URLError, canonicalize

SEEDS_PER_MESSAGE = 1000


@dataclass(frozen=True, slots=True)
class SeedError:
    line: int
    reason: str
    text: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}: {self.text!r}"


_REASONS = {
    "scheme": "only http and https URLs can be crawled",
    "no_host": "the URL has no host",
    "invalid": "not a valid URL",
    "too_long": "the URL is too long",
}


def parse_seed_lines(lines: Iterable[str], *, sort_query: bool = False) -> tuple[
    list[str], list[SeedError]
]:
    """Canonical seeds and the lines refused, by line number; blank lines and #comments skip."""
    seeds: list[str] = []
    errors: list[SeedError] = []
    for number, raw in enumerate(lines, start=1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        if "://" not in text and not text.lower().startswith(("http:", "https:")):
            errors.append(SeedError(number, "not an absolute http(s) URL", text))
            continue
        try:
            seeds.append(canonicalize(text, sort_query=sort_query))
        except URLError as exc:
            errors.append(SeedError(number, _REASONS.get(exc.reason, exc.reason), text))
    return seeds, errors


async def enqueue_seeds(redis: Any, keys: Keys, seeds: list[str]) -> None:
    """Seeds go onto the same stream as discovered links: same scope and dedup path. The
    crawl marker (and the scheduler's consumer group) is created first if there is none."""
    from crawlfleet.common.frontier import Frontier

    await Frontier(redis, keys).open_crawl()
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(0, len(seeds), SEEDS_PER_MESSAGE):
            pipe.xadd(keys.events, {"m": encode(Seeds(urls=seeds[i:i + SEEDS_PER_MESSAGE]))})
        await pipe.execute()


def seed(settings: Settings, urls: list[str], file: str | None) -> int:
    lines: list[str] = list(urls)
    if file == "-":
        lines += sys.stdin.read().splitlines()
    elif file:
        with open(file, encoding="utf-8", errors="replace") as handle:
            lines += handle.read().splitlines()
    if not lines:
        print("crawlfleet seed: no URLs given (arguments, --file F or --file -)", file=sys.stderr)
        return 2
    seeds, errors = parse_seed_lines(lines, sort_query=settings.sort_query)
    for error in errors:
        print(f"crawlfleet seed: {error}", file=sys.stderr)

    async def go() -> None:
        redis = open_redis(settings.redis_url)
        try:
            await enqueue_seeds(redis, Keys(settings.namespace), seeds)
        finally:
            await redis.aclose()

    if seeds:
        asyncio.run(go())
    print(f"enqueued {len(seeds)} seed(s), refused {len(errors)}", file=sys.stderr)
    return 1 if errors else 0


def scheduler(settings: Settings) -> int:
    from crawlfleet.scheduler.service import Scheduler

    configure_logging(settings.log_format, settings.log_level, role="scheduler")

    async def go() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        redis = open_redis(settings.redis_url)
        try:
            await Scheduler(settings, redis).run(stop)
        finally:
            await redis.aclose()

    asyncio.run(go())
    return 0


def status(settings: Settings, *, as_json: bool) -> int:
    async def go() -> dict[str, Any]:
        redis = open_redis(settings.redis_url)
        try:
            return await read_status(redis, Keys(settings.namespace))
        finally:
            await redis.aclose()

    current = asyncio.run(go())
    if as_json:
        print(msgspec.json.encode(current).decode())
    else:
        print(format_status(current))
    return 0


def check(settings: Settings, *, as_json: bool) -> int:
    """``crawlfleet check``: count the structures, compare them with the counters; 1 if they
    disagree. A running crawl moves while it is counted: check a finished or stopped crawl."""
    from crawlfleet.common import check as consistency

    async def go() -> tuple[consistency.Snapshot, list[consistency.Problem]]:
        redis = open_redis(settings.redis_url)
        try:
            return await consistency.check(redis, Keys(settings.namespace))
        finally:
            await redis.aclose()

    snapshot, problems = asyncio.run(go())
    if as_json:
        print(msgspec.json.encode(consistency.report(snapshot, problems)).decode())
    else:
        print(consistency.format_report(snapshot, problems))
    return 1 if problems else 0


def format_status(s: dict[str, Any]) -> str:
    rows = [
        ("finished", "yes" if s["finished"] else "no"),
        *([("state lost", "yes: the frontier's state vanished from Redis mid-crawl "
                          "(restart without persistence, or a flush); results are incomplete")]
          if s["state_lost"] else []),
        ("seen", s["seen"]),
        ("pages", s["pages"]),
        ("failed", s["failed"]),
        ("skipped", s["skipped"]),
        ("queued", s["queued"]),
        ("in flight", f"{s['in_flight']} (hosts leased: {s['hosts_leased']})"),
        ("retries", f"{s['retries']} (dead-lettered: {s['dead']})"),
        ("quarantined", f"{s['quarantined']} URL entries, {s['quarantine_entries']} entries "
                        "in all (crawlfleet check; the scheduler logs each)"),
        ("pages/s (last minute)", s["pages_per_s"]),
        ("links discarded", f"scope {s['discarded_scope']}, invalid {s['discarded_invalid']}, "
                            f"over max pages {s['discarded_max_pages']}, over host budget "
                            f"{s['discarded_host_budget']}, query variants "
                            f"{s['discarded_query_variants']}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


async def write_results(redis: Any, keys: Keys, out: IO[bytes], *, dead: bool = False) -> int:
    """Stream every stored result (or only the dead-lettered ones) as JSON lines; the count.
    A result this version cannot read is left out with a one-line note (``check`` lists it)."""
    count = 0
    async for fp, data in redis.hscan_iter(keys.dead_letter if dead else keys.results,
                                           count=1000):
        try:
            decode_result(data)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
            print(f"crawlfleet export: result {as_text(fp)} left out, unreadable: {exc}",
                  file=sys.stderr)
            continue
        out.write(data + b"\n")
        count += 1
    return count


def export(settings: Settings, out_path: str | None, *, dead: bool = False) -> int:
    async def go(out: IO[bytes]) -> int:
        redis = open_redis(settings.redis_url)
        try:
            return await write_results(redis, Keys(settings.namespace), out, dead=dead)
        finally:
            await redis.aclose()

    if out_path and out_path != "-":
        with open(out_path, "wb") as handle:
            count = asyncio.run(go(handle))
    else:
        count = asyncio.run(go(sys.stdout.buffer))
    print(f"exported {count} result(s)", file=sys.stderr)
    return 0
