"""The results, wherever they are: the results log in Redis, and the parts sinks wrote out.

Every result enters the results log (a Redis stream, ``{ns}:results:log``) as its URL leaves
the frontier. With no output set it stays there and ``export`` reads it. With one, a sink
(``common/sink.py``) writes ranges of it as JSON-lines parts, ``results/{ns}/{crawl}/part-
{first}-{last}.jsonl``, then trims them from Redis. A part's name is its range, so a range
written twice is one part, and a log entry whose range already has a part (written, not yet
trimmed) is read from the part alone: ``iter_results`` yields each result once.
"""

from __future__ import annotations

import bisect
import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from .connections import as_text
from .keys import Keys
from .storage import Store

PAGE = 1000
_PART = re.compile(r"part-(\d{15})\.(\d{10})-(\d{15})\.(\d{10})\.jsonl$")


def part_prefix(namespace: str, crawl_id: str) -> str:
    return f"results/{namespace}/{crawl_id}/"


def _padded(entry_id: str) -> str:
    ms, _, seq = entry_id.partition("-")
    return f"{int(ms):015d}.{int(seq):010d}"


def part_name(namespace: str, crawl_id: str, first: str, last: str) -> str:
    """The part of log range [first, last]: zero-padded ids, so names sort in log order."""
    return f"{part_prefix(namespace, crawl_id)}part-{_padded(first)}-{_padded(last)}.jsonl"


def _id_key(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def part_range(name: str) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """The log range a part's name stands for, or None for a name that is no part."""
    m = _PART.search(name)
    if not m:
        return None
    return (int(m[1]), int(m[2])), (int(m[3]), int(m[4]))


@dataclass(frozen=True, slots=True)
class Stored:
    """One result as read: its JSON, its fingerprint when the log gave it (parts hold the
    JSON alone), and where it was found (a log entry id or a part's name)."""

    data: bytes
    fp: str | None
    where: str


async def log_page(redis: Any, keys: Keys, *, after: str | None = None,
                   count: int = PAGE) -> list[tuple[str, str | None, bytes]]:
    """Up to ``count`` (entry id, fp, result JSON) of the results log after entry ``after``
    (from the start when None), oldest first."""
    entries = await redis.xrange(keys.results, min="-" if after is None else "(" + after,
                                 max="+", count=count)
    page = []
    for entry_id_raw, fields in entries:
        fp = fields.get(b"f", fields.get("f"))
        data = fields.get(b"r", fields.get("r")) or b""
        page.append((as_text(entry_id_raw), as_text(fp) if fp is not None else None,
                     data if isinstance(data, bytes) else data.encode()))
    return page


async def log_entries(redis: Any, keys: Keys, *, after: str | None = None,
                      page: int = PAGE) -> AsyncIterator[tuple[str, str | None, bytes]]:
    """(entry id, fp, result JSON) of the results log, oldest first, a page at a time."""
    while True:
        entries = await log_page(redis, keys, after=after, count=page)
        for entry in entries:
            yield entry
        if len(entries) < page:
            return
        after = entries[-1][0]


async def list_parts(store: Store, namespace: str, crawl_id: str) -> list[str]:
    return [name for name in await store.list(part_prefix(namespace, crawl_id))
            if part_range(name)]


class _Covered:
    """The log ranges that parts exist for: is an entry id inside one?"""

    def __init__(self, names: list[str]) -> None:
        ranges = sorted(r for r in map(part_range, names) if r)
        self.firsts = [first for first, _ in ranges]
        self.ranges = ranges

    def __contains__(self, entry_id: str) -> bool:
        key = _id_key(entry_id)
        i = bisect.bisect_right(self.firsts, key) - 1
        return i >= 0 and key <= self.ranges[i][1]


async def iter_results(redis: Any, keys: Keys, store: Store | None = None,
                       crawl_id: str | None = None) -> AsyncIterator[Stored]:
    """Every result once: the parts in ``store`` (oldest first), then the log entries no part
    covers. Streams: one line or one page of entries in memory at a time."""
    covered = _Covered([])
    if store is not None and crawl_id:
        names = await list_parts(store, keys.namespace, crawl_id)
        covered = _Covered(names)
        for name in names:
            # Closed at once when the reader stops early (export | head), not at GC.
            async with contextlib.aclosing(store.open_lines(name)) as lines:  # type: ignore[type-var]
                async for line in lines:
                    if line.strip():
                        yield Stored(line, None, name)
    async for entry_id, fp, data in log_entries(redis, keys):
        if entry_id not in covered:
            yield Stored(data, fp, entry_id)


async def output_store(redis: Any, keys: Keys, output: str | None) -> Store | None:
    """Where this crawl's parts are: the output setting, else the one its sinks recorded
    (so ``export`` and ``check`` find them without it); None when results stay in Redis."""
    from .storage import open_store

    if output is None:
        raw = await redis.get(keys.output)
        output = as_text(raw) if raw else None
    return open_store(output) if output else None


async def current_crawl(redis: Any, keys: Keys) -> str:
    raw = await redis.hget(keys.crawl, "id")
    return as_text(raw) if raw else ""


async def results_by_fp(redis: Any, keys: Keys) -> dict[str, bytes]:
    """The results log as fp -> result JSON (the last one of an fp): for tests and small
    crawls, it holds the whole log in memory."""
    return {fp or "": data async for _, fp, data in log_entries(redis, keys)}
