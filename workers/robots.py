"""robots.txt (RFC 9309): fetched once per origin, cached in Redis for the whole fleet.

A host's batch is fetched by the one worker holding its lease, so that worker is the only one that
may need the host's robots.txt: no cross-worker lock. Every worker shares the cached copy in
``Keys.robots`` (origin -> JSON with the robots.txt body, so any worker rebuilds the same parser),
and keeps recent policies in memory.

Outcome of a fetch (RFC 9309 section 2.3.1):

* 2xx: the file is parsed (protego). Only its first ``ROBOTS_MAX_BYTES`` count (section 2.5), so
  a larger file is fetched once more and cut at the last whole line below the limit.
* 3xx left unresolved (a redirect without a usable Location, more than 5 redirects) or 4xx
  (including 401/403): "unavailable", crawl without restrictions (``allow_all``).
* 5xx, a timeout, broken HTTP, a transient DNS failure (``dns_temporary``), any other error:
  "unreachable", crawl nothing for now (``disallow_all``). It is asked again with backoff:
  ``robots_retry`` seconds after the first failure, doubling with each consecutive one, never
  past ``robots_max_wait`` after the first. The policy carries ``unavailable_since`` (the first
  failure of the run, taken over from the origin's previous policy) and ``failures`` (how many
  in a row). A success or a 4xx ends the run.
* The run has lasted ``robots_max_wait`` seconds: ``failed`` with failure
  ``robots_unavailable``, so the crawl can end.
* No response because none can be had (the name does not exist ``dns``, the port refuses
  ``connect``, the SSRF guard blocks the address ``blocked_address``/``private_address``, TLS
  fails ``tls``, the URL is invalid ``invalid_url``): ``failed`` at once, ``failure`` naming the
  error.

``failed`` allows nothing: the caller fails every URL of the origin with ``policy.failure`` as
its error. It is cached (memory and Redis) for ``robots_retry`` seconds only, so a host that comes
back is noticed. Errors of the crawler's own (Redis) propagate; they never become a policy.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
import msgspec
from protego import Protego
from redis.asyncio import Redis

from crawlfleet.common.keys import Keys
from crawlfleet.common.logs import get_logger
from crawlfleet.common.messages import MessageVersionError
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import URLError, resolve_and_canonicalize

from .fetch import fetch
from .pacing import Turn

__all__ = [
    "ALLOW_ALL",
    "DISALLOW_ALL",
    "FAILED",
    "OK",
    "ROBOTS_MAX_BYTES",
    "RobotsCache",
    "RobotsPolicy",
    "agent_token",
    "decode_policy",
    "encode_policy",
    "origin_of",
    "policy_from_response",
]

ROBOTS_MAX_BYTES: Final = 512 * 1024  # RFC 9309: parse at least 500 KiB
ROBOTS_MAX_REDIRECTS: Final = 5  # RFC 9309 2.3.1.2: follow at least five
MAX_SITEMAPS: Final = 1000  # a hostile robots.txt must not flood the shared sitemaps set
MEMORY_MAX_ENTRIES: Final = 10_000
MEMORY_MAX_CHARS: Final = 64 * 1024 * 1024  # bodies kept in memory, across all entries

OK: Final = "ok"
ALLOW_ALL: Final = "allow_all"
DISALLOW_ALL: Final = "disallow_all"
FAILED: Final = "failed"
_STATES: Final = frozenset({OK, ALLOW_ALL, DISALLOW_ALL, FAILED})

# fetch() errors with no response that no amount of waiting is expected to change: FAILED at once.
# ("private_address" is the SSRF guard's older name for "blocked_address".)
PERMANENT_ERRORS: Final = frozenset(
    {"dns", "connect", "blocked_address", "private_address", "tls", "invalid_url"}
)
ROBOTS_UNAVAILABLE: Final = "robots_unavailable"  # the failure once robots_max_wait has passed
_MAX_BACKOFF_EXPONENT: Final = 32  # retry * 2**32 is far past any max_wait; avoids overflow

CACHE_VERSION: Final = 1

log = get_logger("crawlfleet.robots")


@dataclass(frozen=True, slots=True)
class RobotsPolicy:
    """What one origin's robots.txt lets our agent do, and until when that answer holds."""

    origin: str  # "http://site0.test:8080"
    state: str  # OK, ALLOW_ALL, DISALLOW_ALL (unreachable, for now) or FAILED
    crawl_delay: float | None = None  # Crawl-delay of the group that applies to our agent
    sitemaps: tuple[str, ...] = ()  # canonical Sitemap: URLs (site-wide, for every agent)
    expires_at: float = 0.0  # unix time the copy goes stale
    agent: str = "*"  # the product token the rules were matched against
    body: str = field(default="", repr=False)  # the (capped) file, only for OK
    failure: str | None = None  # FAILED only: the error class for every URL of the origin
    # A run of "unreachable" answers (DISALLOW_ALL, then FAILED robots_unavailable): when its
    # first failure was, and how many in a row so far. None/0 otherwise.
    unavailable_since: float | None = None
    failures: int = 0
    # slots=True rules out functools.cached_property, so the parser gets a slot of its own,
    # filled on first use (or by _parsed, which has just built it anyway).
    _parser: Protego | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.state not in _STATES:
            raise ValueError(f"unknown robots state {self.state!r}")
        if (self.state == FAILED) != bool(self.failure):
            raise ValueError(f"robots state {self.state!r} with failure {self.failure!r}")

    def allows(self, url: str) -> bool:
        """May our agent fetch ``url`` (a URL of this origin)?"""
        if self.state != OK:
            return self.state == ALLOW_ALL
        parser = self._parser
        if parser is None:
            parser = Protego.parse(self.body)
            object.__setattr__(self, "_parser", parser)
        return parser.can_fetch(url, self.agent)

    def is_fresh(self, now: float) -> bool:
        return now < self.expires_at

    @classmethod
    def _parsed(cls, origin: str, text: str, *, agent: str, expires_at: float) -> RobotsPolicy:
        parser = Protego.parse(text)
        robots_url = f"{origin}/robots.txt"
        sitemaps: dict[str, None] = {}  # ordered set
        for raw in parser.sitemaps:
            # Relative or junk values are common; keep only what the crawler could fetch.
            url = resolve_and_canonicalize(raw, robots_url)
            if url is not None:
                sitemaps[url] = None
                if len(sitemaps) >= MAX_SITEMAPS:
                    break
        policy = cls(origin, OK, parser.crawl_delay(agent), tuple(sitemaps), expires_at, agent,
                     text)
        object.__setattr__(policy, "_parser", parser)
        return policy


_TOKEN = re.compile(r"[A-Za-z_-]*")


def agent_token(user_agent: str) -> str:
    """The product token robots.txt groups are matched against, lower-cased.

    RFC 9309 2.2.1: the name before the version, ``[a-zA-Z_-]+``.
    ``'crawlfleet/0.1 (+https://...)'`` -> ``'crawlfleet'``; a UA without one gets ``'*'``, i.e.
    only the ``User-agent: *`` group applies.
    """
    match = _TOKEN.match(user_agent.strip())
    return (match.group() if match else "").lower() or "*"


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of a canonical URL, spelled exactly as in it."""
    scheme_end = url.find("://")
    if scheme_end <= 0:
        raise URLError("invalid", url)
    start = scheme_end + 3
    end = len(url)
    for delimiter in "/?#":
        at = url.find(delimiter, start)
        if at != -1:
            end = min(end, at)
    authority = url[start:end].rpartition("@")[2]  # canonical URLs have no userinfo anyway
    if not authority:
        raise URLError("no_host", url)
    return f"{url[:start]}{authority}"


def _cap(body: bytes) -> bytes:
    if len(body) <= ROBOTS_MAX_BYTES:
        return body
    body = body[:ROBOTS_MAX_BYTES]
    # Cut at the last whole line: a rule cut short ("Allow: /a" of "Allow: /admin-public")
    # would mean something else.
    line_end = max(body.rfind(b"\n"), body.rfind(b"\r"))
    return body[: line_end + 1] if line_end >= 0 else body


def policy_from_response(
    origin: str,
    status: int | None,
    body: bytes,
    error: str | None,
    *,
    user_agent: str,
    now: float,
    ttl: float,
    retry: float,
    max_wait: float,
    previous: RobotsPolicy | None = None,
) -> RobotsPolicy:
    """The policy a robots.txt fetch outcome means (RFC 9309 2.3.1). Pure.

    ``status``/``body``/``error`` are those of ``fetch()``, which has followed the redirects.
    ``previous`` is the origin's last policy (stale, usually), whose run of "unreachable"
    answers an unreachable one continues; ``max_wait`` is how long such a run may last.
    """
    agent = agent_token(user_agent)
    if status is not None and 200 <= status < 300:
        if error is None:
            # utf-8-sig: a byte order mark would otherwise glue itself to the first directive.
            text = _cap(body).decode("utf-8-sig", errors="replace")
            return RobotsPolicy._parsed(origin, text, agent=agent, expires_at=float(now + ttl))
        # A 2xx whose body never arrived (too large, connection dropped) is not an empty file.
    elif (status is not None and 300 <= status < 500) or (
        status is None and error == "too_many_redirects"
    ):
        # "Unavailable": 4xx (401/403 too), or redirects that never reach a file.
        return RobotsPolicy(origin, ALLOW_ALL, expires_at=float(now + ttl), agent=agent)
    if status is None and error in PERMANENT_ERRORS:
        # Nothing answers, and waiting is not expected to change that: fail the origin now.
        return RobotsPolicy(origin, FAILED, expires_at=float(now + retry), agent=agent,
                            failure=error)
    # "Unreachable": 5xx, timeouts, other errors. Crawl nothing for now, ask again with backoff.
    since, failures = float(now), 1
    if (
        previous is not None
        and previous.unavailable_since is not None
        and previous.origin == origin
        # A retry that came due long ago (an old crawl's copy) starts a new run.
        and now - previous.expires_at < max_wait
    ):
        since = min(previous.unavailable_since, float(now))
        failures = previous.failures + 1
    waited = now - since
    if waited >= max_wait:
        return RobotsPolicy(origin, FAILED, expires_at=float(now + retry), agent=agent,
                            failure=ROBOTS_UNAVAILABLE, unavailable_since=since,
                            failures=failures)
    backoff = retry * 2.0 ** min(failures - 1, _MAX_BACKOFF_EXPONENT)
    delay = min(backoff, max_wait - waited)
    return RobotsPolicy(origin, DISALLOW_ALL, expires_at=float(now + delay), agent=agent,
                        unavailable_since=since, failures=failures)


class CachedRobots(msgspec.Struct, kw_only=True, frozen=True):
    """A policy as stored in ``Keys.robots``: JSON, with the body to rebuild the parser from."""

    v: int = CACHE_VERSION
    origin: str
    state: str
    agent: str
    expires_at: float
    crawl_delay: float | None = None
    sitemaps: list[str] = []
    body: str = ""
    # Added within version 1 (entries without them decode with these defaults).
    failure: str | None = None
    unavailable_since: float | None = None
    failures: int = 0


class _Version(msgspec.Struct):
    v: int = CACHE_VERSION


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CachedRobots)
_version_decoder = msgspec.json.Decoder(_Version)


def encode_policy(policy: RobotsPolicy) -> bytes:
    return _encoder.encode(CachedRobots(
        origin=policy.origin, state=policy.state, agent=policy.agent,
        expires_at=policy.expires_at, crawl_delay=policy.crawl_delay,
        sitemaps=list(policy.sitemaps), body=policy.body, failure=policy.failure,
        unavailable_since=policy.unavailable_since, failures=policy.failures,
    ))


def decode_policy(data: bytes | str, *, agent: str | None = None) -> RobotsPolicy:
    """The policy ``encode_policy`` stored; raises ValueError for anything else.

    With ``agent`` (a product token) different from the one the copy was made for, the
    agent-specific part (Crawl-delay, which group applies) is worked out again from the body.
    """
    try:
        cached = _decoder.decode(data)
    except msgspec.ValidationError as exc:
        # A newer crawlfleet may have changed a field's shape: say so rather than "invalid".
        _check_version(_version_decoder.decode(data).v, exc)
        raise
    _check_version(cached.v)
    if cached.state == OK and agent is not None and agent != cached.agent:
        return RobotsPolicy._parsed(cached.origin, cached.body, agent=agent,
                                    expires_at=cached.expires_at)
    return RobotsPolicy(cached.origin, cached.state, cached.crawl_delay, tuple(cached.sitemaps),
                        cached.expires_at, cached.agent, cached.body, cached.failure,
                        cached.unavailable_since, cached.failures)


def _check_version(v: int, cause: BaseException | None = None) -> None:
    if v > CACHE_VERSION:
        raise MessageVersionError(
            f"cached robots.txt has version {v}; this crawlfleet reads up to {CACHE_VERSION}"
        ) from cause


class RobotsCache:
    """Policies per origin: process memory, then Redis (shared), then the origin itself."""

    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        session: aiohttp.ClientSession,
        settings: Settings,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        # redis-py types asyncio commands as `Awaitable[T] | T`; this client is asyncio only.
        self.redis: Any = redis
        self.keys = keys
        self.session = session
        self.settings = settings
        self.agent = agent_token(settings.user_agent)
        self.ttl = settings.robots_ttl
        self.retry = settings.robots_retry
        self.max_wait = settings.robots_max_wait
        self._now = now
        self._memory: dict[str, RobotsPolicy] = {}  # insertion order = age, oldest first
        self._memory_chars = 0
        # One load per origin at a time in this process; every caller awaits the same task.
        self._loading: dict[str, asyncio.Task[RobotsPolicy]] = {}

    async def policy(
        self, url: str, *, pace: Callable[[], Awaitable[Turn]] | None = None
    ) -> RobotsPolicy:
        """``pace`` paces the robots.txt request like any other to the host (it is only
        called when robots.txt is really requested, not when a cached copy serves)."""
        origin = origin_of(url)
        remembered = self._memory.get(origin)
        if remembered is not None and remembered.is_fresh(self._now()):
            return remembered
        task = self._loading.get(origin)
        if task is None:
            task = asyncio.create_task(self._load(origin, pace))
            self._loading[origin] = task
            task.add_done_callback(lambda done: self._loaded(origin, done))
        # Shielded: one caller being cancelled (its batch shut down) must not cancel the load
        # the other callers are waiting for.
        return await asyncio.shield(task)

    async def allows(self, url: str) -> bool:
        return (await self.policy(url)).allows(url)

    def _loaded(self, origin: str, task: asyncio.Task[RobotsPolicy]) -> None:
        if self._loading.get(origin) is task:
            del self._loading[origin]
        if not task.cancelled():
            task.exception()  # retrieved here, so a load nobody awaits any more logs nothing

    async def _load(
        self, origin: str, pace: Callable[[], Awaitable[Turn]] | None = None
    ) -> RobotsPolicy:
        # Redis errors propagate (the caller's to handle): they say nothing about the origin.
        raw = await self.redis.hget(self.keys.robots, origin)
        previous = self._memory.get(origin)
        if raw is not None:
            try:
                shared = decode_policy(raw, agent=self.agent)
            except ValueError as exc:  # corrupt, or written by a newer crawlfleet: refetch
                log.warning("robots_cache_unreadable", origin=origin, error=str(exc))
            else:
                if shared.is_fresh(self._now()):
                    return self._remember(shared)
                if previous is None or shared.expires_at >= previous.expires_at:
                    previous = shared  # the newer of the two stale copies
        policy = await self._fetch(origin, pace, previous)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.robots, origin, encode_policy(policy))
            if policy.sitemaps:
                pipe.sadd(self.keys.sitemaps, *policy.sitemaps)
            await pipe.execute()
        return self._remember(policy)

    async def _fetch(
        self,
        origin: str,
        pace: Callable[[], Awaitable[Turn]] | None = None,
        previous: RobotsPolicy | None = None,
    ) -> RobotsPolicy:
        url = f"{origin}/robots.txt"
        # RFC 9309 2.5: an oversized file's first part is parsed, so it is truncated rather
        # than refused; one byte over the limit tells policy_from_response it was cut.
        fetched = await fetch(
            self.session, url, max_body_bytes=ROBOTS_MAX_BYTES + 1, truncate=True,
            max_redirects=ROBOTS_MAX_REDIRECTS, allow_private=self.settings.allow_private,
            pace=pace, deadline=self.settings.fetch_timeout,
        )
        if self.session.closed:
            # The worker is shutting down under us: the error says nothing about the origin and
            # must not be shared as a disallow_all with every worker.
            raise RuntimeError(f"session closed while fetching {url}")
        policy = policy_from_response(
            origin, fetched.status, fetched.body, fetched.error,
            user_agent=self.settings.user_agent, now=self._now(), ttl=self.ttl, retry=self.retry,
            max_wait=self.max_wait, previous=previous,
        )
        log.info("robots_fetched", origin=origin, state=policy.state, status=fetched.status,
                 error=fetched.error, failure=policy.failure, failures=policy.failures,
                 expires_at=policy.expires_at, crawl_delay=policy.crawl_delay,
                 sitemaps=len(policy.sitemaps), elapsed_ms=fetched.elapsed_ms)
        return policy

    def _remember(self, policy: RobotsPolicy) -> RobotsPolicy:
        old = self._memory.pop(policy.origin, None)
        if old is not None:
            self._memory_chars -= len(old.body)
        self._memory[policy.origin] = policy
        self._memory_chars += len(policy.body)
        while len(self._memory) > MEMORY_MAX_ENTRIES or (
            self._memory_chars > MEMORY_MAX_CHARS and len(self._memory) > 1
        ):
            oldest = next(iter(self._memory))
            self._memory_chars -= len(self._memory.pop(oldest).body)
        return policy

