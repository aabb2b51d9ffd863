"""``crawlfleet reshard --to URLS``: move a namespace onto another shard list, between crawls.

Only hosts whose owning server changes move (a server is its URL: the same URL in both lists is
the same Redis). Each of their URLs goes to its new shard first (reshard_in.lua: it arrives only
if its fp is new there) and then leaves the old one (reshard_out.lua: it leaves only if its fp
was still there), a results-log page or a queue chunk at a time, with the counters, so that a
reshard killed at any line and run again ends exact. Then the host's own fields (pacing, page
count, robots.txt) move, a server no longer listed is emptied, and each shard gets its record.

The planning functions at the top are pure; the I/O is in ``Mover`` and ``reshard``.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from crawlfleet.common.cluster import ShardMismatch, shard_record
from crawlfleet.common.connections import (
    RedisProblem,
    as_text,
    open_redis,
    redact_url,
    redis_problem,
)
from crawlfleet.common.frontier import Frontier, MovedURL
from crawlfleet.common.keys import Keys
from crawlfleet.common.resultlog import current_crawl, log_page
from crawlfleet.common.scope import query_variant_key
from crawlfleet.common.settings import Settings
from crawlfleet.common.shards import ShardConfigError, owner, parse_redis_urls
from crawlfleet.common.snapshot import entry_fp, parse_host_key, read_result
from crawlfleet.common.urls import URLError, fingerprint, host_key

from .commands import UsageError

CHUNK = 250  # URLs per reshard_in/reshard_out call
HOST_FIELDS = ("not_before", "host_pages", "robots")  # the host's own fields that move
NO_OUTPUT = "reshard needs the results in Redis; not supported with an output yet"


# -- planning (pure) ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Server:
    url: str
    old: int | None  # its index in the old shard list
    new: int | None  # and in the new one

    @property
    def where(self) -> str:
        return redact_url(self.url)


def parse_targets(value: str) -> list[str]:
    try:
        return parse_redis_urls(value)
    except ShardConfigError as exc:
        raise UsageError(str(exc).replace("CRAWLFLEET_REDIS_URLS", "--to", 1)) from None


def servers(old: list[str], new: list[str]) -> list[Server]:
    """Every server of either list, old ones first; one URL is one server."""
    return [Server(url, old.index(url) if url in old else None,
                   new.index(url) if url in new else None) for url in dict.fromkeys(old + new)]


def new_home(host: str, new: list[str]) -> str:
    """The URL of the server that owns ``host`` under the new list."""
    return new[owner(host, len(new))]


def variant_of(url: str) -> str:
    key = query_variant_key(url)
    return fingerprint(key) if key else ""


def result_move(entry_id: str, fp: str | None, data: bytes) -> tuple[str, MovedURL] | None:
    """(host, the move) of a results-log entry; None when it cannot be read."""
    try:
        counter, url, dead = read_result(data)
        host = host_key(url)
    except (ValueError, URLError):
        return None
    return host, MovedURL(fp or fingerprint(url), counter, data, entry_id, dead, variant_of(url))


def queue_move(raw: bytes) -> MovedURL | None:
    """The move of a queue entry; None when it cannot be read."""
    from crawlfleet.common.messages import decode_entry

    try:
        fp = entry_fp(raw)
    except ValueError:
        return None
    return MovedURL(fp, "queued", raw, raw, False, variant_of(decode_entry(raw).url))


def record_problem(server: Server, have: str | None, old_count: int, new_count: int,
                   in_use: bool, namespace: str) -> str | None:
    """Why ``server``'s shard record (``have``) refuses the reshard, or None. Its new place's
    record is one a reshard wrote before (it runs again); no record at all is a server the
    namespace does not use yet, or a one-shard crawl's ("0/1")."""
    allowed = {shard_record(i, n) for i, n in ((server.old, old_count), (server.new, new_count))
               if i is not None}
    if have is None and (not in_use or shard_record(0, 1) in allowed):
        return None
    have = have or shard_record(0, 1)
    if have in allowed:
        return None
    if server.old is None:
        return (f"Redis at {server.where} already holds keys of namespace {namespace!r} "
                f"(shard record {have}) and is not in the current shard list: purge it there "
                "or pick another server")
    held, _, of = have.partition("/")
    return (f"Redis at {server.where} holds shard {int(held) + 1} of {of} of namespace "
            f"{namespace!r}, but the current shard list makes it shard {server.old + 1} of "
            f"{old_count}: set CRAWLFLEET_REDIS_URLS to the list the crawl runs on")


def busy_problem(where: str, lock: bool, leases: int, events: int, outbox: int) -> str | None:
    what = [text for text, n in (("a scheduler holds its lock", lock),
                                 (f"{leases} lease(s) or batch(es) out", leases),
                                 (f"{events} unread event(s)", events),
                                 (f"{outbox} outbox entry(ies)", outbox)) if n]
    if not what:
        return None
    return (f"the crawl is not quiescent on {where}: {', '.join(what)}; stop the fleet once "
            "it is finished (or its schedulers are), then run reshard again")


@dataclass
class Tally:
    hosts: set[str] = field(default_factory=set)
    arrived: dict[str, int] = field(default_factory=dict)  # server url -> URLs in
    left: dict[str, int] = field(default_factory=dict)  # server url -> URLs out
    unreadable: int = 0

    def add(self, into: dict[str, int], url: str, n: int) -> None:
        into[url] = into.get(url, 0) + n


def format_summary(tally: Tally, all_servers: list[Server], dry: bool, namespace: str) -> str:
    moved = sum(tally.left.values())
    parts = []
    for s in all_servers:
        name = f"shard {s.new + 1}" if s.new is not None else "removed"
        parts.append(f"{name} {s.where} -{tally.left.get(s.url, 0)} "
                     f"+{tally.arrived.get(s.url, 0)}")
    head = "would move" if dry else "resharded"
    tail = f"; {tally.unreadable} unreadable entries stay" if tally.unreadable else ""
    return (f"{head} namespace {namespace!r}: {len(tally.hosts)} host(s), {moved} URL(s) "
            f"moved ({', '.join(parts)}){tail}")


# -- I/O ---------------------------------------------------------------------------------
@dataclass
class Node:
    server: Server
    redis: Any
    frontier: Frontier
    crawl: str = ""


class Mover:
    def __init__(self, settings: Settings, new: list[str], *, dry: bool) -> None:
        self.settings, self.keys, self.dry = settings, Keys(settings.namespace), dry
        self.old, self.new = settings.shard_urls, new
        self.nodes: dict[str, Node] = {}
        for s in servers(self.old, new):
            redis = open_redis(s.url)
            self.nodes[s.url] = Node(s, redis, Frontier(redis, self.keys))
        self.tally = Tally()
        self.where = self.old[0]  # the server of the call under way, for errors

    async def aclose(self) -> None:
        for node in self.nodes.values():
            await node.redis.aclose()

    async def same_servers(self) -> None:
        """Refuse two URLs of the lists that reach one Redis (a host name and its address,
        another port mapping, a changed password): a server is its URL everywhere else here,
        and one moved onto itself under another name would lose its URLs."""
        token, k = uuid.uuid4().hex, self.keys
        nodes = list(self.nodes.values())
        try:
            for i, node in enumerate(nodes):
                self.where = node.server.url
                raw = await node.redis.get(k.server_probe)
                mark, _, other = as_text(raw).partition("|") if raw is not None else ("", "", "")
                if mark == token:
                    raise UsageError(
                        f"{nodes[int(other)].server.where} and {node.server.where} reach the "
                        "same Redis server: give each server once, by one URL")
                await node.redis.set(k.server_probe, f"{token}|{i}", ex=60)
        finally:
            for node in nodes:
                with contextlib.suppress(RedisError):
                    await node.redis.delete(k.server_probe)

    async def check(self) -> None:
        k = self.keys
        await self.same_servers()
        for node in self.nodes.values():
            self.where, r, s = node.server.url, node.redis, node.server
            raw = await r.get(k.shard)
            in_use = bool(await r.exists(k.crawl, k.stats, k.results, k.events))
            problem = record_problem(s, as_text(raw) if raw is not None else None,
                                     len(self.old), len(self.new), in_use, k.namespace)
            if problem:
                raise ShardMismatch(problem)
            if s.old is None:
                continue
            if await r.exists(k.output):
                raise UsageError(NO_OUTPUT)
            leases = (await r.hlen(k.lease_batch) + await r.zcard(k.leases)
                      + await r.zcard(k.waiting))
            busy = busy_problem(s.where, bool(await r.exists(k.scheduler_lock)), leases,
                                await r.xlen(k.events), await r.xlen(k.outbox))
            if busy:
                raise RedisProblem(busy, 1)

    async def prepare(self) -> None:
        """Every new shard: its record first (a rerun knows it), its crawl marker, the scope."""
        k, hosts, ports = self.keys, set(), set()
        for node in self.nodes.values():
            if node.server.old is not None:
                hosts |= await node.redis.smembers(k.scope_hosts)
                ports |= await node.redis.smembers(k.scope_ports)
        for node in self.nodes.values():
            self.where, s = node.server.url, node.server
            if s.new is not None and s.old is None and len(self.new) > 1:
                await node.redis.set(k.shard, shard_record(s.new, len(self.new)))
            node.crawl = (await node.frontier.open_crawl(
                expected_urls=self.settings.expected_urls)).id
            if s.new is not None and hosts:
                await node.redis.sadd(k.scope_hosts, *sorted(hosts))
            if s.new is not None and ports:
                await node.redis.sadd(k.scope_ports, *sorted(ports))

    async def move(self, src: Node, dest_url: str, host: str, urls: list[MovedURL],
                   ready: float | None = None,
                   fields: Sequence[tuple[str, str, Any]] = ()) -> None:
        if host:
            self.tally.hosts.add(host)
        if self.dry:
            self.tally.add(self.tally.left, src.server.url, len(urls))
            self.tally.add(self.tally.arrived, dest_url, len(urls))
            return
        dest = self.nodes[dest_url]
        self.where = dest_url
        arrived = await dest.frontier.reshard_in(dest.crawl, host, urls, ready=ready,
                                                 fields=fields)
        self.where = src.server.url
        left = await src.frontier.reshard_out(src.crawl, host, urls,
                                              fields=[(n, f) for n, f, _ in fields])
        self.tally.add(self.tally.arrived, dest_url, arrived)
        self.tally.add(self.tally.left, src.server.url, left)

    async def move_results(self, src: Node) -> None:
        after: str | None = None
        while True:
            page = await log_page(src.redis, self.keys, after=after, count=CHUNK)
            groups: dict[str, list[MovedURL]] = {}
            for entry_id, fp, data in page:
                found = result_move(entry_id, fp, data)
                if found is None:
                    self.tally.unreadable += 1
                elif (dest := new_home(found[0], self.new)) != src.server.url:
                    self.tally.hosts.add(found[0])
                    groups.setdefault(dest, []).append(found[1])
            for dest, urls in sorted(groups.items()):
                await self.move(src, dest, "", urls)
            if len(page) < CHUNK:
                return
            after = page[-1][0]

    async def move_queues(self, src: Node) -> None:
        k, r = self.keys, src.redis
        queues = [parsed[0] async for key in r.scan_iter(match=k.host_pattern, count=1000)
                  if (parsed := parse_host_key(k, as_text(key))) and parsed[1] == "q"]
        for host in sorted(set(queues)):
            dest = new_home(host, self.new)
            if dest == src.server.url:
                continue
            score = await r.zscore(k.ready, host)
            offset = 0
            while True:
                raws = await r.lrange(k.host_queue(host), offset, offset + CHUNK - 1)
                urls = [m for m in map(queue_move, raws) if m is not None]
                self.tally.unreadable += len(raws) - len(urls)
                if urls:
                    await self.move(src, dest, host, urls, score)
                offset += len(raws) if self.dry else len(raws) - len(urls)
                if len(raws) < CHUNK:
                    break

    async def move_fields(self, src: Node) -> None:
        k, r = self.keys, src.redis
        fields: dict[str, list[tuple[str, str, Any]]] = {}
        for name in HOST_FIELDS:
            for key, value in (await r.hgetall(getattr(k, name))).items():
                try:
                    host = host_key(as_text(key)) if name == "robots" else as_text(key)
                except URLError:
                    continue
                fields.setdefault(host, []).append((name, as_text(key), value))
        for member in await r.zrange(k.ready, 0, -1):  # a host in ready with no queue
            fields.setdefault(as_text(member), [])
        for host, own in sorted(fields.items()):
            if (dest := new_home(host, self.new)) != src.server.url:
                await self.move(src, dest, host, [], fields=own)

    async def retire(self) -> list[str]:
        """Empty the servers the new list drops (their sitemaps go to their hosts' shards);
        then write each new shard's record. Problems, if something could not move."""
        from .crawl import _delete_namespace

        k, problems = self.keys, []
        for node in self.nodes.values():
            self.where, r = node.server.url, node.redis
            if node.server.new is not None:
                continue
            left = await r.xlen(k.results) + len(
                [x async for x in r.scan_iter(match=k.host_pattern, count=1000)])
            if left:
                problems.append(f"{node.server.where} still holds {left} results or host "
                                "queues that cannot be read; it was not emptied")
                continue
            for sitemap in await r.smembers(k.sitemaps):
                try:
                    home = self.nodes[new_home(host_key(as_text(sitemap)), self.new)]
                except URLError:
                    continue
                await home.redis.sadd(k.sitemaps, sitemap)
            await _delete_namespace(r, k)
        if problems:
            return problems
        for node in self.nodes.values():
            if node.server.new is None:
                continue
            self.where = node.server.url
            if len(self.new) > 1:
                await node.redis.set(k.shard, shard_record(node.server.new, len(self.new)))
            else:
                await node.redis.delete(k.shard)
        return []

    async def run(self) -> list[str]:
        await self.check()
        if not self.dry:
            await self.prepare()
        for node in self.nodes.values():
            if node.server.old is None:
                continue
            self.where = node.server.url
            node.crawl = node.crawl or await current_crawl(node.redis, self.keys)
            for step in (self.move_results, self.move_queues, self.move_fields):
                await step(node)
        return [] if self.dry else await self.retire()


def reshard(settings: Settings, to: str, *, yes: bool, dry_run: bool) -> int:
    new = parse_targets(to)
    if settings.output:
        raise UsageError(NO_OUTPUT)

    async def go(dry: bool) -> tuple[Tally, list[str]]:
        mover = Mover(settings, new, dry=dry)
        try:
            return mover.tally, await mover.run()
        except RedisError as exc:
            raise redis_problem(exc, mover.where) from None
        finally:
            await mover.aclose()

    everything = servers(settings.shard_urls, new)
    if not (yes or dry_run or sys.stdin.isatty()):
        raise UsageError("refusing to reshard without a terminal to ask on: pass --yes")
    if dry_run or not yes:
        tally, _ = asyncio.run(go(True))  # the checks, and what would move
        plan = format_summary(tally, everything, True, settings.namespace)
        if dry_run:
            print(plan)
            return 0
        answer = input(f"{plan}.\nMove namespace {settings.namespace!r} onto "
                       f"{','.join(map(redact_url, new))}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing moved", file=sys.stderr)
            return 1
    tally, problems = asyncio.run(go(False))
    print(format_summary(tally, everything, False, settings.namespace), file=sys.stderr)
    for problem in problems:
        print(f"crawlfleet reshard: {problem}", file=sys.stderr)
    return 1 if problems else 0
