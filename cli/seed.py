"""``crawlfleet seed``: seed lines read, checked and canonicalised (each bad line named), then
enqueued on the events stream (on each seed's own shard, with several)."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from crawlfleet.common.addresses import literal_host_refusal
from crawlfleet.common.connections import RedisProblem
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import Seeds, encode
from crawlfleet.common.settings import Settings, shorten
from crawlfleet.common.urls import URLError, canonicalize

from .commands import UsageError, one_redis, run_on_redis, sharded

SEEDS_PER_MESSAGE = 1000


UTF8_BOM = b"\xef\xbb\xbf"


def read_seed_file(path: str) -> list[bytes]:
    """The lines of a seed file ('-': stdin) as bytes: each is decoded, and a bad one
    reported, on its own (``parse_seed_lines``)."""
    if path == "-":
        return sys.stdin.buffer.read().splitlines()
    try:
        with open(path, "rb") as handle:
            return handle.read().splitlines()
    except OSError as exc:
        raise UsageError(f"cannot read seed file {path}: {exc.strerror or exc}") from None


@dataclass(frozen=True, slots=True)
class SeedError:
    line: int
    reason: str
    text: str
    source: str = "line"

    def __str__(self) -> str:
        return f"{self.source} {self.line}: {self.reason}: {shorten(self.text)!r}"


_REASONS = {
    "scheme": "only http and https URLs can be crawled",
    "no_host": "the URL has no host",
    "invalid": "not a valid URL",
    "too_long": "the URL is too long",
}


def parse_seed_lines(lines: Iterable[str | bytes], *, sort_query: bool = False,
                     source: str = "line", settings: Settings | None = None,
                     ) -> tuple[list[str], list[SeedError]]:
    """Canonical seeds and the lines refused, by line number; blank lines and #comments skip.
    A line given as bytes must be UTF-8 (a BOM before line 1 is dropped); one that is not is
    refused with its number, never mangled. With ``settings``, a seed the SSRF guard refuses
    on its face (an IP literal in a refused range, a port or scheme not allowed) is refused."""
    seeds: list[str] = []
    errors: list[SeedError] = []
    for number, raw in enumerate(lines, start=1):
        if isinstance(raw, bytes):
            data = raw.removeprefix(UTF8_BOM) if number == 1 else raw
            try:
                line = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                errors.append(SeedError(
                    number, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
                            f"{exc.start + 1})", data.decode("utf-8", "replace"), source))
                continue
        else:
            line = raw.removeprefix("\ufeff") if number == 1 else raw
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if "://" not in text and not text.lower().startswith(("http:", "https:")):
            errors.append(SeedError(number, "not an absolute http(s) URL", text, source))
            continue
        try:
            url = canonicalize(text, sort_query=sort_query)
        except URLError as exc:
            reason = _REASONS.get(exc.reason, exc.reason)
            if exc.reason == "too_long":
                reason += f" ({len(text)} characters)"
            errors.append(SeedError(number, reason, text, source))
            continue
        refused = literal_host_refusal(url, settings) if settings is not None else None
        if refused:
            errors.append(SeedError(number, f"blocked_address: {refused}", text, source))
            continue
        seeds.append(url)
    return seeds, errors


async def enqueue_seeds(redis: Any, keys: Keys, seeds: list[str], *,
                        expected_urls: int = 1_000_000) -> None:
    """Seeds go onto the events stream, which the scheduler admits (scope, dedup). The crawl
    marker (and the scheduler's consumer group) is created first if there is none."""
    from crawlfleet.common.frontier import Frontier

    await Frontier(redis, keys).open_crawl(expected_urls=expected_urls)
    async with redis.pipeline(transaction=False) as pipe:
        for i in range(0, len(seeds), SEEDS_PER_MESSAGE):
            pipe.xadd(keys.events, {"m": encode(Seeds(urls=seeds[i:i + SEEDS_PER_MESSAGE]))})
        pipe.publish(keys.scheduler_wake, 1)  # it reads them now, not at its next pass
        await pipe.execute()


def seed(settings: Settings, urls: list[str], file: str | None) -> int:
    """Arguments, ``--file F`` and stdin (``--file -``, or a lone ``-`` argument), each line
    numbered within its source. Refused lines are reported and the rest go in."""
    sources: list[tuple[str, list[str | bytes]]] = []
    if any(url != "-" for url in urls):
        # A lone '-' stands for stdin; it keeps its place so arguments keep their numbers.
        sources.append(("argument", ["" if url == "-" else url for url in urls]))
    if file and file != "-":
        sources.append((f"{file} line", list(read_seed_file(file))))
    if file == "-" or "-" in urls:
        sources.append(("stdin line", list(read_seed_file("-"))))
    if not any(lines for _, lines in sources):
        print("crawlfleet seed: no URLs given (arguments, --file F, --file - or - for stdin)",
              file=sys.stderr)
        return 2
    seeds: list[str] = []
    errors: list[SeedError] = []
    for source, lines in sources:
        found, refused = parse_seed_lines(lines, sort_query=settings.sort_query, source=source,
                                          settings=settings)
        seeds += found
        errors += refused
    for error in errors:
        print(f"crawlfleet seed: {error}", file=sys.stderr)

    async def go() -> None:
        async with one_redis(settings) as redis:
            await enqueue_seeds(redis, Keys(settings.namespace), seeds,
                                expected_urls=settings.expected_urls)

    if seeds:
        try:
            if sharded(settings):
                from .shards import enqueue_sharded, run_on_cluster

                run_on_cluster(settings, lambda cluster: enqueue_sharded(cluster, seeds))
            else:
                run_on_redis(settings, go)
        except RedisProblem as problem:
            partly = ("some shards may have their seeds already: the same command again "
                      "enqueues the rest, each URL once" if sharded(settings)
                      else "no seed was enqueued")
            raise RedisProblem(f"{problem}; {partly}", problem.exit_code) from None
    print(f"enqueued {len(seeds)} seed(s), refused {len(errors)}", file=sys.stderr)
    return 1 if errors else 0
