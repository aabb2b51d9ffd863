"""Which Redis shard owns a host: rendezvous (highest-random-weight) hashing of host keys.

Every per-host piece of the frontier (queue, lease, pacing, robots, the seen fingerprints of the
host's URLs) lives on the one shard that owns the host, so that dedup stays exact and
shard-local: a URL's host decides its shard, and so does its fingerprint's.

A shard is named by its position in ``CRAWLFLEET_REDIS_URLS``, not by its URL, so that a
password or a host name can change without moving a host. Appending a shard moves only the
hosts the new shard wins (about 1/N of them); each host's weight on the other shards is
unchanged, so no host moves between two old shards. Removing or reordering shards moves more;
``crawlfleet reshard`` is how a namespace changes its shard list between crawls.

Pure functions only: the connections live in common/connections.py.
"""

from __future__ import annotations

import hashlib

from .settings import check_redis_url, redact_url


class ShardConfigError(ValueError):
    """CRAWLFLEET_REDIS_URLS cannot be used; the message is one line naming what is wrong."""


def parse_redis_urls(value: str) -> list[str]:
    """The shard list from a comma-separated ``CRAWLFLEET_REDIS_URLS``, in order.

    Empty entries, entries that are not Redis URLs and the same URL twice are errors (a
    duplicate would make two shards of one server and split its hosts' dedup). Messages never
    show a password."""
    urls = [part.strip() for part in value.split(",")]
    if not any(urls):
        raise ShardConfigError("CRAWLFLEET_REDIS_URLS is empty")
    seen: dict[str, int] = {}
    for i, url in enumerate(urls):
        if not url:
            raise ShardConfigError(f"CRAWLFLEET_REDIS_URLS: entry {i + 1} is empty")
        problem = check_redis_url(url)
        if problem is not None:
            raise ShardConfigError(
                f"CRAWLFLEET_REDIS_URLS: entry {i + 1} {redact_url(url)!r} {problem}")
        if url in seen:
            raise ShardConfigError(
                f"CRAWLFLEET_REDIS_URLS: entries {seen[url] + 1} and {i + 1} are the same "
                f"server ({redact_url(url)!r})")
        seen[url] = i
    return urls


def weight(shard: int, host: str) -> int:
    """The host's weight on one shard: 64 bits of blake2b over (shard, host)."""
    digest = hashlib.blake2b(f"{shard}\x00{host}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def owner(host: str, shards: int) -> int:
    """The index of the shard that owns ``host`` (its host key) among ``shards`` shards."""
    if shards < 1:
        raise ValueError("at least one shard")
    if shards == 1:
        return 0
    return max(range(shards), key=lambda shard: weight(shard, host))
