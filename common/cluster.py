"""The shards of a crawl: one full frontier per Redis server in ``CRAWLFLEET_REDIS_URLS``.

Each shard holds, under the same namespace and key names as a one-Redis crawl, the frontier of
the hosts it owns (``shards.owner``): their queues, leases, pacing, robots.txt, budgets, the seen
fingerprints of their URLs, their results, and its own crawl marker, events stream, scheduler
lock and arq queue. Nothing of one host is on two shards, so every script stays single-shard
and dedup stays exact. What is crawl-wide is either copied to every shard (the scope: the
seeds' hosts and ports) or summed over them (``status``, ``check``).

A link found on shard A for a host of shard B is admitted on B (admit.lua) before A's progress
call stores the page it came from, so a kill between the two re-fetches the page and re-admits
a duplicate. When B cannot be reached, the links go into A's outbox stream instead (still before
the progress call), and A's scheduler forwards them to B when B is back: a shard that is down
pauses its own hosts and nothing else.

Each Redis records which shard it is (``Keys.shard``, "index/count"): a process whose shard list
disagrees with a shard's record stops with one line instead of splitting hosts' dedup.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import ConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .connections import (
    REDIS_UNAVAILABLE,
    RedisProblem,
    as_text,
    is_embedded,
    is_refused,
    is_transient,
    open_redis,
    redact_url,
)
from .frontier import Admission, Frontier, Limits, StateLost
from .keys import Keys
from .messages import (
    ForeignLink,
    Links,
    MessageVersionError,
    decode_entry,
    decode_links,
    encode,
)
from .settings import Settings
from .shards import owner
from .stats import combine_status, read_status

OUTBOX_READ = 50  # outbox entries a scheduler forwards per pass
OUTBOX_SCAN = 4 * OUTBOX_READ  # entries it looks at per pass, past those for down shards
OUTBOX_RETRY = 5.0  # seconds a shard unable to take links is left alone by the forwarding


def undeliverable(exc: BaseException) -> bool:
    """Another shard cannot take links now (down, loading, out of memory, read-only, busy, its
    state lost, or refusing us): they wait in the outbox. Its trouble is never the caller's:
    raised into a worker's turn, it would fail that shard's pages instead."""
    return isinstance(exc, (*REDIS_UNAVAILABLE, StateLost, ShardMismatch)) \
        or is_transient(exc) or is_refused(exc)


class ShardMismatch(RedisProblem):
    """A Redis holds another shard of this namespace than the shard list says: one line,
    exit 2 (the settings must change)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, 2)


def shard_limits(settings: Settings, index: int, count: int) -> Limits:
    """The budgets one shard enforces. A per-host budget is the host's own shard's; the crawl's
    page budget is split between the shards (index 0 takes the remainder first), so that the
    crawl never admits more than ``max_pages`` in all."""
    total = settings.max_pages
    if total is not None and count > 1:
        total = total // count + (1 if index < total % count else 0)
    return Limits(total, settings.max_pages_per_host, settings.max_query_variants)


def shard_record(index: int, count: int) -> str:
    return f"{index}/{count}"


def marker_record(index: int, count: int) -> str:
    """What crawl.lua writes beside a new crawl marker: this Redis's shard record, or nothing
    for a one-shard crawl (whose keys stay what they were)."""
    return shard_record(index, count) if count > 1 else ""


async def bind_shard(redis: Any, keys: Keys, index: int, count: int, where: str) -> None:
    """Record (first use) or check that this Redis is shard ``index`` of ``count`` for the
    namespace. A one-shard crawl writes nothing, so a plain crawl's keys are what they were;
    a record left by a sharded crawl still refuses it."""
    # The marker is read before the record: a sharded process's marker comes with its record
    # (crawl.lua writes both), so a marker seen first means the record is there too, unless a
    # one-shard crawl made it. Read the other way round, another process's record and crawl
    # could both land between the two reads: a false refusal.
    if count > 1 and await redis.exists(keys.crawl) and not await redis.exists(keys.shard):
        have = ""  # a one-shard crawl's marker
    else:
        if count > 1:
            await redis.set(keys.shard, shard_record(index, count), nx=True)
        raw = await redis.get(keys.shard)
        have = as_text(raw) if raw is not None else ""
    problem = record_mismatch(have, index, count, keys, where)
    if problem is not None:
        raise problem


def record_mismatch(have: str, index: int, count: int, keys: Keys,
                    where: str) -> ShardMismatch | None:
    """What is wrong with a Redis holding shard record ``have`` ("" for none, beside a crawl
    marker) for shard ``index`` of ``count``; None when it fits."""
    if have == shard_record(index, count) or (not have and count == 1):
        return None
    if not have:
        # A one-shard crawl's Redis: adopting it would leave the seen fingerprints of the
        # hosts other shards now own here, and those URLs would be fetched again there.
        return ShardMismatch(
            f"Redis at {where} holds a one-shard crawl of namespace {keys.namespace!r}, but "
            f"the shard list makes it shard {index + 1} of {count}: move the crawl with "
            "`crawlfleet reshard --to URLS` first")
    held, _, of = have.partition("/")
    if count == 1:
        return ShardMismatch(
            f"Redis at {where} holds shard {int(held) + 1} of {of} of namespace "
            f"{keys.namespace!r}, a sharded crawl: set CRAWLFLEET_REDIS_URLS to its whole "
            "shard list (one Redis of it alone would split its hosts' dedup)")
    return ShardMismatch(
        f"Redis at {where} holds shard {int(held) + 1} of {of} of namespace "
        f"{keys.namespace!r}, but the shard list makes it shard {index + 1} of {count}: "
        "give the list the crawl was seeded with, or move the crawl with "
        "`crawlfleet reshard --to URLS`")


async def check_unsharded(redis: Any, keys: Keys, where: str) -> None:
    """A process given one Redis: refuse one that holds a shard of a sharded crawl (a list
    shortened to one URL, or CRAWLFLEET_REDIS_URL pointed at one shard)."""
    await bind_shard(redis, keys, 0, 1, where)


@dataclass
class Shard:
    index: int
    url: str
    redis: Any
    frontier: Frontier
    limits: Limits
    crawl_id: str = ""  # this shard's crawl marker, once read

    @property
    def where(self) -> str:
        return redact_url(self.url)


def quick_client(url: str) -> Any:
    """A client that fails at once when its Redis is not there (no retries, short timeouts):
    for writes to other shards, where a down shard must cost a fallback, not a 30 s stall."""
    if is_embedded(url):
        return open_redis(url)
    pool = ConnectionPool.from_url(
        url, retry=Retry(NoBackoff(), 0), socket_connect_timeout=2, socket_timeout=5,
        socket_keepalive=True)
    return Redis(connection_pool=pool)


@dataclass
class Cluster:
    """Every shard of one crawl, each with a client and its frontier."""

    settings: Settings
    keys: Keys
    shards: list[Shard] = field(default_factory=list)

    @classmethod
    def open(cls, settings: Settings, *, quick: bool = False) -> Cluster:
        """Clients for every shard (``quick``: ones that fail fast, for cross-shard writes)."""
        keys = Keys(settings.namespace)
        urls = settings.shard_urls
        shards = []
        for i, url in enumerate(urls):
            redis = quick_client(url) if quick else open_redis(url)
            shards.append(Shard(i, url, redis, Frontier(redis, keys),
                                shard_limits(settings, i, len(urls))))
        return cls(settings, keys, shards)

    def __len__(self) -> int:
        return len(self.shards)

    def owner(self, host: str) -> Shard:
        return self.shards[owner(host, len(self.shards))]

    async def bind(self) -> None:
        """Check every shard's record (ShardMismatch), writing it on first use."""
        for shard in self.shards:
            await self.bind_one(shard)

    async def bind_one(self, shard: Shard) -> None:
        await bind_shard(shard.redis, self.keys, shard.index, len(self.shards), shard.where)

    async def aclose(self) -> None:
        for shard in self.shards:
            with contextlib.suppress(Exception):
                await shard.redis.aclose()

    async def crawl_id(self, shard: Shard, *, fresh: bool = False) -> str:
        if fresh or not shard.crawl_id:
            # The id known so far goes with it, so that a lost state is recorded as lost. A
            # worker's links may reach a shard before its own processes have bound it, or
            # after its state was lost: the marker comes with the record (crawl.lua), and the
            # record found there is checked as bind_shard checks it.
            count = len(self.shards)
            marker = await shard.frontier.open_crawl(
                shard.crawl_id, expected_urls=self.settings.expected_urls,
                shard=marker_record(shard.index, count))
            problem = record_mismatch(marker.shard, shard.index, count, self.keys, shard.where)
            if problem is not None:
                raise problem
            shard.crawl_id = marker.id
        return shard.crawl_id

    def split(self, admissions: Sequence[Admission], home: int,
              ) -> tuple[list[Admission], dict[int, list[Admission]]]:
        """The admissions for ``home``'s own hosts, and the others by owning shard."""
        if len(self.shards) == 1:
            return list(admissions), {}
        mine: list[Admission] = []
        others: dict[int, list[Admission]] = {}
        count = len(self.shards)
        for a in admissions:
            index = owner(a.host, count)
            if index == home:
                mine.append(a)
            else:
                others.setdefault(index, []).append(a)
        return mine, others

    async def admit_on(self, shard: Shard, admissions: Sequence[Admission]) -> int:
        """admit.lua on ``shard``; a lost state there re-reads its marker once."""
        crawl = await self.crawl_id(shard)
        try:
            return await shard.frontier.admit(crawl, admissions, shard.limits)
        except StateLost:
            crawl = await self.crawl_id(shard, fresh=True)
            return await shard.frontier.admit(crawl, admissions, shard.limits)


def links_message(admissions: Sequence[Admission]) -> bytes:
    return encode(Links(links=[
        ForeignLink(host=a.host, entry=decode_entry(a.entry), variant=a.variant)
        for a in admissions]))


def admissions_of(data: bytes) -> list[Admission]:
    """An outbox entry's admissions (raises msgspec's errors or MessageVersionError)."""
    return [Admission(link.entry.fp, link.host, encode(link.entry), link.variant)
            for link in decode_links(data).links]


async def deliver(cluster: Cluster, others: dict[int, list[Admission]], outbox: Any,
                  chunk: int) -> int:
    """Admit links on their own shards; those whose shard cannot be reached go into the
    outbox of the shard ``outbox`` is a client of (the caller's own: an error there is the
    caller's, as any error of its own shard). Returns how many went to the outbox."""
    parked = 0
    for index, admissions in sorted(others.items()):
        shard = cluster.shards[index]
        try:
            for i in range(0, len(admissions), chunk):
                await cluster.admit_on(shard, admissions[i:i + chunk])
            continue
        except Exception as exc:
            if not undeliverable(exc):
                raise
        # Admitting twice is a no-op (the seen set), so a chunk that did land may come again.
        for i in range(0, len(admissions), chunk):
            await outbox.xadd(cluster.keys.outbox,
                              {"m": links_message(admissions[i:i + chunk])})
        parked += len(admissions)
    return parked


@dataclass
class OutboxCursor:
    """What a shard's leader remembers between its forwarding passes: where the last pass
    stopped looking (the next starts there, so entries far down a long outbox get their turn),
    and until when each shard found unable to take links is left alone (a shard that is not
    there costs no connect timeout each pass)."""

    start: str = "-"
    down_until: dict[int, float] = field(default_factory=dict)


async def forward_outbox(cluster: Cluster, home: int, frontier: Frontier, *,
                         count: int = OUTBOX_READ, cursor: OutboxCursor | None = None) -> int:
    """The leader of shard ``home`` (``frontier`` on its own client) sends its outbox's links
    to their shards, oldest first from ``cursor``, deleting each entry once all its links are
    admitted. An entry for a shard unable to take them stays, the shard is left alone for
    ``OUTBOX_RETRY`` seconds, and the entries after it for other shards go on (up to ``count``
    entries forwarded and ``OUTBOX_SCAN`` looked at a pass; the next pass goes on from there,
    and from the start once it reaches the end). A malformed entry is quarantined. Returns the
    links forwarded."""
    cursor = cursor if cursor is not None else OutboxCursor()
    redis = frontier.redis
    keys = cluster.keys
    forwarded = entries = looked = 0
    now = time.monotonic()
    down = {i for i, until in cursor.down_until.items() if until > now}
    start = cursor.start
    while entries < count and looked < OUTBOX_SCAN:
        page = await redis.xrange(keys.outbox, min=start, count=OUTBOX_READ)
        for entry_id, fields in page:
            entry = as_text(entry_id)
            looked += 1
            start = "(" + entry
            data = fields.get(b"m") or fields.get("m") or b""
            try:
                admissions = admissions_of(data)
            except (msgspec.DecodeError, msgspec.ValidationError, MessageVersionError) as exc:
                await frontier.quarantine(f"{keys.outbox}#{entry}",
                                          str(exc)[:200] or "unreadable", bytes(data))
                await redis.xdel(keys.outbox, entry_id)
                continue
            mine, others = cluster.split(admissions, home)
            if mine:  # only after a reshard moved the host here
                others[home] = mine
            if down & set(others):
                continue
            failed = None
            for index, group in sorted(others.items()):
                try:
                    await cluster.admit_on(cluster.shards[index], group)
                except Exception as exc:
                    if not undeliverable(exc):
                        raise
                    failed = index
                    break
            if failed is not None:
                down.add(failed)
                cursor.down_until[failed] = time.monotonic() + OUTBOX_RETRY
                continue  # all of it again later: the seen set makes a repeat a no-op
            await redis.xdel(keys.outbox, entry_id)
            forwarded += len(admissions)
            entries += 1
            if entries >= count:
                break
        if len(page) < OUTBOX_READ:
            start = "-"  # the end: the next pass starts over
            break
    cursor.start = start
    return forwarded


async def cluster_status(cluster: Cluster) -> dict[str, Any]:
    """Every shard's status, summed (``combine_status``). Finished needs every shard finished
    on two rounds of reads with nothing admitted in between: a worker admits links on another
    shard before it gives its own host back, so a shard read as finished before such links
    arrived is read again after."""
    first = [await read_status(s.redis, cluster.keys) for s in cluster.shards]
    combined = combine_status(first)
    if combined["finished"]:
        second = [await read_status(s.redis, cluster.keys) for s in cluster.shards]
        combined = combine_status(second)
        if [s["seen"] for s in first] != [s["seen"] for s in second]:
            combined["finished"] = False
            combined["finished_at"] = None
    return combined
