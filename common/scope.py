"""Which discovered URLs belong to the crawl: pure functions, tested without Redis.

The counting rules (pages per host, query-string variants per path) need shared state and live
in the frontier's ingest script; everything decidable from the URL alone is here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field

from crawlfleet.common.addresses import port_allowed
from crawlfleet.common.settings import Settings


@dataclass(frozen=True)
class ScopeRules:
    max_depth: int | None = None
    include_subdomains: bool = False
    allowed_domains: tuple[str, ...] = ()
    allow: re.Pattern[str] | None = None
    deny: re.Pattern[str] | None = None
    max_url_length: int = 2048
    max_repeated_segments: int = 3
    _suffixes: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> ScopeRules:
        return cls(
            max_depth=settings.max_depth,
            include_subdomains=settings.include_subdomains,
            allowed_domains=tuple(d.lower().strip(".") for d in settings.allowed_domains),
            allow=re.compile(settings.allow_pattern) if settings.allow_pattern else None,
            deny=re.compile(settings.deny_pattern) if settings.deny_pattern else None,
            max_url_length=settings.max_url_length,
            max_repeated_segments=settings.max_repeated_segments,
        )


def host_allowed(host: str, seed_hosts: Collection[str], rules: ScopeRules) -> bool:
    if host in seed_hosts or host in rules.allowed_domains:
        return True
    if rules.include_subdomains:
        return any(host.endswith("." + d) for d in (*seed_hosts, *rules.allowed_domains))
    return False


def out_of_scope(
    url: str, host: str, depth: int, *, allowed_hosts: Collection[str], rules: ScopeRules
) -> str | None:
    """The reason a canonical URL is refused, or None when it is in scope.

    Reasons: 'host', 'depth', 'too_long', 'pattern' (deny matched or allow did not), and
    'repeated_segments' (a path segment repeated more than the limit: /a/b/a/b/a/b loops).
    """
    if not host_allowed(host, allowed_hosts, rules):
        return "host"
    if rules.max_depth is not None and depth > rules.max_depth:
        return "depth"
    if len(url) > rules.max_url_length:
        return "too_long"
    if rules.deny is not None and rules.deny.search(url):
        return "pattern"
    if rules.allow is not None and not rules.allow.search(url):
        return "pattern"
    if repeated_segments(url) > rules.max_repeated_segments:
        return "repeated_segments"
    return None


def refused(
    url: str, host: str, depth: int, *, allowed_hosts: Collection[str], rules: ScopeRules,
    allowed_ports: Collection[str], seed_ports: Collection[int],
) -> bool:
    """The one scope decision for a canonical URL, seeds and links alike: the rules above and
    the port (80, 443, the seeds' ports, or only CRAWLFLEET_ALLOWED_PORTS)."""
    return out_of_scope(url, host, depth, allowed_hosts=allowed_hosts, rules=rules) is not None \
        or not port_allowed(url, allowed_ports, seed_ports)


def repeated_segments(url: str) -> int:
    """How often the most repeated non-empty path segment occurs."""
    path = url.split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
    counts: dict[str, int] = {}
    for segment in path.split("/"):
        if segment:
            counts[segment] = counts.get(segment, 0) + 1
    return max(counts.values(), default=0)


def query_variant_key(url: str) -> str | None:
    """URLs that differ only in their query string share this key; None without a query."""
    base, sep, _query = url.partition("?")
    return base if sep else None
