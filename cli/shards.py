"""The fleet commands over several shards (``CRAWLFLEET_REDIS_URLS``): seed, status, check,
export and purge, each run on every shard and put together; ``reshard`` in cli/reshard.py.

With one shard these are not used: cli/commands.py speaks to the one Redis as it always did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

from redis.exceptions import RedisError

from crawlfleet.common.addresses import url_port
from crawlfleet.common.cluster import Cluster, quick_client
from crawlfleet.common.connections import as_text, redact_url, redis_problem
from crawlfleet.common.messages import Seeds, encode
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import URLError, host_key

from .seed import SEEDS_PER_MESSAGE

T = TypeVar("T")


def run_on_cluster(settings: Settings,
                   go: Callable[[Cluster], Coroutine[Any, Any, T]]) -> T:
    """``go(cluster)`` with every shard open and its shard record checked; a Redis error
    becomes one line naming the shard it came from."""

    async def main() -> T:
        cluster = Cluster.open(settings)
        try:
            for shard in cluster.shards:
                try:
                    await cluster.bind_one(shard)
                except RedisError as exc:
                    raise redis_problem(exc, shard.url) from None
            try:
                return await go(cluster)
            except RedisError as exc:
                raise redis_problem(exc, await failing_shard(cluster, exc)) from None
        finally:
            await cluster.aclose()

    return asyncio.run(main())


async def failing_shard(cluster: Cluster, exc: RedisError) -> str:
    """Which shard an error met in the middle of a command came from: the one whose address
    the error names, else the first that does not answer a ping, else all of them."""
    text = str(exc)
    for shard in cluster.shards:
        parts = urlsplit(shard.url)
        if parts.hostname and f"{parts.hostname}:{parts.port or 6379}" in text:
            return shard.url
    for shard in cluster.shards:
        probe = quick_client(shard.url)
        try:
            await probe.ping()
        except Exception:
            return shard.url
        finally:
            await probe.aclose()
    return ",".join(redact_url(s.url) for s in cluster.shards)


def seed_groups(cluster: Cluster, seeds: list[str]) -> dict[int, list[str]]:
    """Each seed goes to its host's shard."""
    groups: dict[int, list[str]] = {}
    for url in seeds:
        groups.setdefault(cluster.owner(host_key(url)).index, []).append(url)
    return groups


def seed_scope(seeds: list[str]) -> tuple[set[str], set[int]]:
    """The seeds' hosts and explicit ports: the crawl's scope, copied to every shard."""
    hosts: set[str] = set()
    ports: set[int] = set()
    for url in seeds:
        try:
            hosts.add(host_key(url))
        except URLError:
            continue
        port = url_port(url)
        if port is not None:
            ports.add(port)
    return hosts, ports


async def enqueue_sharded(cluster: Cluster, seeds: list[str]) -> None:
    """The scope goes to every shard first, then each shard's seeds onto its events stream:
    a shard's workers then judge a link to any seed host as in scope, whichever shard found
    it. Run again after a failure, it is a no-op for what landed (dedup)."""
    keys = cluster.keys
    hosts, ports = seed_scope(seeds)
    for shard in cluster.shards:
        await cluster.crawl_id(shard)  # the crawl marker and the scheduler's consumer group
        async with shard.redis.pipeline(transaction=True) as pipe:
            if hosts:
                pipe.sadd(keys.scope_hosts, *sorted(hosts))
            if ports:
                pipe.sadd(keys.scope_ports, *sorted(ports))
            await pipe.execute()
    for index, group in sorted(seed_groups(cluster, seeds).items()):
        shard = cluster.shards[index]
        async with shard.redis.pipeline(transaction=False) as pipe:
            for i in range(0, len(group), SEEDS_PER_MESSAGE):
                pipe.xadd(keys.events,
                          {"m": encode(Seeds(urls=group[i:i + SEEDS_PER_MESSAGE]))})
            pipe.publish(keys.scheduler_wake, 1)  # its scheduler reads them now
            await pipe.execute()


async def export_sharded(cluster: Cluster, out: IO[bytes], **options: Any) -> int:
    """Every shard's results, one shard after the other."""
    from .export import write_results

    count = 0
    for shard in cluster.shards:
        count += await write_results(shard.redis, cluster.keys, out, **options)
    return count


async def hosts_with_state(redis: Any, keys: Any, snapshot: Any) -> set[str]:
    """Every host with state on one shard: its per-host keys and lease bookkeeping (from
    ``snapshot``), its pacing, page count and ready entry, and its robots.txt cache."""
    hosts: set[str] = set()
    for part in (snapshot.queues, snapshot.queue_unreadable, snapshot.leases,
                 snapshot.fetching, snapshot.lease_batch, snapshot.leased, snapshot.waiting):
        hosts.update(part)
    for name in (keys.not_before, keys.host_pages):
        hosts.update([as_text(h) async for h, _ in redis.hscan_iter(name, count=1000)])
    hosts.update([as_text(h) async for h, _ in redis.zscan_iter(keys.ready, count=1000)])
    async for origin, _ in redis.hscan_iter(keys.robots, count=1000):
        try:
            hosts.add(host_key(as_text(origin)))
        except URLError:
            continue
    return hosts


def foreign_hosts(hosts: set[str], index: int, count: int) -> list[str]:
    """The hosts among ``hosts`` (with state on shard ``index``) that another shard owns."""
    from crawlfleet.common.shards import owner

    return sorted(h for h in hosts if owner(h, count) != index)


async def check_sharded(cluster: Cluster, output: str | None) -> list[tuple[Any, list[Any]]]:
    """``check`` on every shard, plus one problem per shard holding another shard's hosts."""
    from crawlfleet.common import check as consistency
    from crawlfleet.common.resultlog import output_store

    reports = []
    for shard in cluster.shards:
        store = await output_store(shard.redis, cluster.keys, output)
        snapshot, problems = await consistency.check(shard.redis, cluster.keys, store)
        held = await hosts_with_state(shard.redis, cluster.keys, snapshot)
        foreign = foreign_hosts(held, shard.index, len(cluster))
        if foreign:
            problems.append(consistency.Problem(
                "foreign_host", f"shard {shard.index + 1} holds state of hosts another shard "
                "owns (a changed shard list? see crawlfleet reshard)", len(foreign),
                tuple(foreign[:consistency.EXAMPLES])))
        reports.append((snapshot, problems))
    return reports


def format_check(cluster_reports: list[tuple[Any, list[Any]]], as_json: bool) -> str:
    from crawlfleet.common import check as consistency

    if as_json:
        import msgspec

        shards = [consistency.report(s, p) for s, p in cluster_reports]
        return msgspec.json.encode({"ok": all(r["ok"] for r in shards),
                                    "shards": shards}).decode()
    parts = []
    for i, (snapshot, problems) in enumerate(cluster_reports):
        parts.append(f"# shard {i + 1} of {len(cluster_reports)}\n"
                     + consistency.format_report(snapshot, problems))
    bad = sum(len(p) for _, p in cluster_reports)
    parts.append("check: OK on every shard" if not bad else f"check: {bad} problem(s)")
    return "\n".join(parts)
