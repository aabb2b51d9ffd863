"""Tests for crawlfleet.workers.robots: RFC 9309 semantics, the Redis copy, and fetching once.

The pure part (``policy_from_response``) is tested with bodies and statuses directly. The cache
runs against in-process aiohttp servers on 127.0.0.1 (each one its own origin) and the embedded
fakeredis backend; time is an injected clock, so expiry needs no sleeping.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import redis.exceptions
from aiohttp import web

from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import MessageVersionError
from crawlfleet.common.settings import Settings
from crawlfleet.common.urls import URLError
from crawlfleet.workers.robots import (
    ALLOW_ALL,
    DISALLOW_ALL,
    FAILED,
    OK,
    ROBOTS_MAX_BYTES,
    RobotsCache,
    RobotsPolicy,
    agent_token,
    decode_policy,
    encode_policy,
    origin_of,
    policy_from_response,
)
from crawlfleet.workers.worker import worker_session

UA = "crawlfleet/0.1 (+https://github.com/crawlfleet/crawlfleet)"
ORIGIN = "http://site0.test:8080"
NOW = 1_000_000.0
TTL = 86400.0  # the defaults of Settings.robots_ttl / robots_retry / robots_max_wait
RETRY = 300.0
MAX_WAIT = 3600.0

ROBOTS = b"""\
# A comment line
User-agent: *
Disallow: /
Crawl-delay: 9

User-agent: otherbot
Disallow: /other-only

User-agent: CrawlFleet
Disallow: /private
Allow: /private/open
Disallow: /page
Allow: /page
Allow: /*.css$
Disallow: /*.php
Disallow: /search?
Crawl-delay: 2.5

Sitemap: https://Site0.test:8080/sitemap.xml
Sitemap: /relative-sitemap.xml
Sitemap: javascript:alert(1)
"""


def policy(body: bytes = ROBOTS, status: int | None = 200, error: str | None = None,
           *, user_agent: str = UA, now: float = NOW, previous: RobotsPolicy | None = None,
           max_wait: float = MAX_WAIT) -> RobotsPolicy:
    return policy_from_response(ORIGIN, status, body, error, user_agent=user_agent, now=now,
                                ttl=TTL, retry=RETRY, max_wait=max_wait, previous=previous)


def unreachable(now: float, previous: RobotsPolicy | None = None) -> RobotsPolicy:
    """What a robots.txt answering 503 at ``now`` means."""
    return policy(b"busy", status=503, error="http_5xx", now=now, previous=previous)


def allows(p: RobotsPolicy, path: str) -> bool:
    return p.allows(ORIGIN + path)


# --------------------------------------------------------------------------------------------
# Pure: agent_token, origin_of, policy_from_response
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("user_agent", "token"), [
    (UA, "crawlfleet"),
    ("CrawlFleet/2.0", "crawlfleet"),
    ("  my_bot-x/1 extra", "my_bot-x"),
    ("crawlfleet", "crawlfleet"),
    ("", "*"),
    ("/1.0", "*"),
])
def test_agent_token(user_agent: str, token: str) -> None:
    assert agent_token(user_agent) == token


@pytest.mark.parametrize(("url", "origin"), [
    ("http://site0.test:8080/a/b?c=d", "http://site0.test:8080"),
    ("https://example.org/", "https://example.org"),
    ("https://example.org?x", "https://example.org"),
    ("http://[::1]:81/x", "http://[::1]:81"),
    ("http://user:pw@example.org/", "http://example.org"),
])
def test_origin_of(url: str, origin: str) -> None:
    assert origin_of(url) == origin


@pytest.mark.parametrize("url", ["/relative", "http:///x", ""])
def test_origin_of_refuses_urls_without_origin(url: str) -> None:
    with pytest.raises(URLError):
        origin_of(url)


def test_our_group_beats_star_group() -> None:
    p = policy()
    assert p.state == OK and p.agent == "crawlfleet"
    assert allows(p, "/")  # '*' disallows everything; our own group does not
    assert allows(p, "/other-only")  # another agent's rules are not ours
    assert not allows(p, "/private")
    assert not allows(p, "/private/x")
    assert not allows(p, "/privateer")  # rules are path prefixes


def test_star_group_applies_without_our_group() -> None:
    p = policy(b"User-agent: *\nDisallow: /tmp/\n\nUser-agent: crawl\nDisallow: /\n",
               user_agent="otherbot/1.0")
    assert p.agent == "otherbot"
    assert not allows(p, "/tmp/x")
    assert allows(p, "/tmpfile")


def test_longest_match_and_allow_beats_disallow_at_equal_length() -> None:
    p = policy()
    assert allows(p, "/private/open")  # the longer Allow wins over the shorter Disallow
    assert allows(p, "/private/open/deeper")
    assert allows(p, "/page")  # Allow and Disallow equally long: the least restrictive wins
    assert allows(p, "/page/sub")


def test_wildcards_and_end_anchor() -> None:
    p = policy()
    assert not allows(p, "/x/index.php")
    assert not allows(p, "/index.php?a=1")
    assert allows(p, "/style.css")
    assert not allows(p, "/search?q=1")
    assert allows(p, "/search")
    assert allows(p, "/robots.txt")  # never disallowed


def test_crawl_delay_is_our_groups() -> None:
    assert policy().crawl_delay == 2.5
    assert policy(user_agent="someone/1").crawl_delay == 9.0  # the '*' group's
    assert policy(b"User-agent: *\nDisallow: /x\n").crawl_delay is None
    assert policy(b"User-agent: crawlfleet\nCrawl-delay: soon\n").crawl_delay is None


def test_sitemaps_resolved_canonical_and_site_wide() -> None:
    assert policy().sitemaps == (
        "https://site0.test:8080/sitemap.xml",
        "http://site0.test:8080/relative-sitemap.xml",
    )
    other = policy(user_agent="someone/1")
    assert other.sitemaps == policy().sitemaps  # Sitemap lines belong to no group


def test_expiry_of_a_parsed_file() -> None:
    assert policy().expires_at == NOW + TTL
    assert policy().is_fresh(NOW + TTL - 1)
    assert not policy().is_fresh(NOW + TTL)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 451, 301])
def test_unavailable_means_allow_all(status: int) -> None:
    # 3xx reaching here is a redirect fetch() could not follow (no usable Location).
    p = policy(b"User-agent: *\nDisallow: /\n", status=status, error="http_4xx")
    assert p.state == ALLOW_ALL
    assert allows(p, "/anything")
    assert p.expires_at == NOW + TTL
    assert p.crawl_delay is None and p.sitemaps == () and p.body == ""


def test_too_many_redirects_means_allow_all() -> None:
    # RFC 9309 2.3.1.2: after five redirects the file MAY be assumed unavailable.
    p = policy(b"", status=None, error="too_many_redirects")
    assert p.state == ALLOW_ALL and p.expires_at == NOW + TTL


@pytest.mark.parametrize(("status", "error"), [
    (500, "http_5xx"), (503, "http_5xx"), (None, "timeout"), (None, "dns_temporary"),
    (None, "protocol"), (None, "error"),
    (200, "too_large"),  # a 2xx whose body never arrived is not an empty file
    (200, "protocol"),
    (200, "connect"),  # dropped mid-body: the origin answered, it is not gone
])
def test_unreachable_means_disallow_all_until_retry(status: int | None, error: str) -> None:
    p = policy(b"User-agent: *\nAllow: /\n", status=status, error=error)
    assert p.state == DISALLOW_ALL and p.failure is None
    assert not allows(p, "/")
    assert not allows(p, "/robots.txt")
    assert p.expires_at == NOW + RETRY
    assert (p.unavailable_since, p.failures) == (NOW, 1)


@pytest.mark.parametrize("error", [
    "dns", "connect", "blocked_address", "private_address", "tls", "invalid_url",
])
def test_no_response_possible_means_failed(error: str) -> None:
    p = policy(b"", status=None, error=error)
    assert p.state == FAILED and p.failure == error
    assert not allows(p, "/") and not allows(p, "/robots.txt")
    assert p.expires_at == NOW + RETRY  # cached only briefly: the host may come back
    assert (p.unavailable_since, p.failures) == (None, 0)  # no run of retries to continue


def test_unreachable_backs_off_then_fails() -> None:
    p = unreachable(NOW)
    seen = [(p.state, p.expires_at - NOW, p.failures)]
    while p.state == DISALLOW_ALL:
        p = unreachable(p.expires_at, previous=p)  # asked again as soon as it is due
        seen.append((p.state, p.expires_at - NOW, p.failures))
    assert seen == [
        (DISALLOW_ALL, RETRY, 1),  # 300
        (DISALLOW_ALL, RETRY + 2 * RETRY, 2),  # 900
        (DISALLOW_ALL, 3 * RETRY + 4 * RETRY, 3),  # 2100
        (DISALLOW_ALL, MAX_WAIT, 4),  # 2400 more would pass max_wait: cut to it
        (FAILED, MAX_WAIT + RETRY, 5),
    ]
    assert p.failure == "robots_unavailable" and p.unavailable_since == NOW
    assert not allows(p, "/")
    # Still answering 5xx after the FAILED copy expires: failed again at once, no new wait.
    again = unreachable(p.expires_at, previous=p)
    assert again.state == FAILED and again.failure == "robots_unavailable"
    assert again.unavailable_since == NOW and again.expires_at == p.expires_at + RETRY


def test_late_retry_still_counts_from_the_first_failure() -> None:
    first = unreachable(NOW)
    late = unreachable(NOW + MAX_WAIT - 1, previous=first)  # the host's batch came back late
    assert late.state == DISALLOW_ALL and late.failures == 2
    assert late.expires_at == NOW + MAX_WAIT  # never past max_wait after the first failure
    assert unreachable(NOW + MAX_WAIT, previous=first).state == FAILED


@pytest.mark.parametrize(("status", "error", "state"), [
    (200, None, OK), (404, "http_4xx", ALLOW_ALL), (None, "too_many_redirects", ALLOW_ALL),
])
def test_an_answer_ends_the_run(status: int | None, error: str | None, state: str) -> None:
    run = unreachable(NOW + RETRY, previous=unreachable(NOW))
    answered = policy(status=status, error=error, now=run.expires_at, previous=run)
    assert answered.state == state
    assert (answered.unavailable_since, answered.failures) == (None, 0)
    later = unreachable(answered.expires_at, previous=answered)
    assert (later.unavailable_since, later.failures) == (answered.expires_at, 1)
    assert later.expires_at == answered.expires_at + RETRY


def test_a_permanent_failure_ends_the_run() -> None:
    gone = policy(b"", status=None, error="dns", now=NOW + 3000,
                  previous=unreachable(NOW + 2000, previous=unreachable(NOW)))
    assert gone.state == FAILED and gone.failure == "dns"
    back = unreachable(gone.expires_at, previous=gone)  # resolves now, but answers 5xx
    assert back.state == DISALLOW_ALL and back.failures == 1
    assert back.unavailable_since == gone.expires_at


def test_what_does_not_continue_a_run() -> None:
    old = unreachable(NOW)
    # A copy whose retry came due more than max_wait ago (an earlier crawl's): a new run.
    fresh_run = unreachable(old.expires_at + MAX_WAIT, previous=old)
    assert fresh_run.state == DISALLOW_ALL and fresh_run.failures == 1
    assert fresh_run.unavailable_since == old.expires_at + MAX_WAIT
    # Another origin's policy is not this one's history.
    other = policy_from_response("http://other.test", 503, b"", "http_5xx", user_agent=UA,
                                 now=NOW, ttl=TTL, retry=RETRY, max_wait=MAX_WAIT)
    assert unreachable(NOW + RETRY, previous=other).failures == 1


def test_zero_max_wait_fails_at_the_first_failure() -> None:
    p = policy(b"", status=503, error="http_5xx", max_wait=0.0)
    assert p.state == FAILED and p.failure == "robots_unavailable"


def test_huge_failure_counts_do_not_overflow() -> None:
    previous = RobotsPolicy(ORIGIN, DISALLOW_ALL, expires_at=NOW, unavailable_since=NOW - 1,
                            failures=5000)
    p = policy(b"", status=503, error="http_5xx", now=NOW, previous=previous,
               max_wait=float("inf"))
    assert p.state == DISALLOW_ALL and p.failures == 5001
    assert p.expires_at == NOW + RETRY * 2.0**32


def test_failed_policy_needs_its_failure() -> None:
    with pytest.raises(ValueError):
        RobotsPolicy(ORIGIN, FAILED)
    with pytest.raises(ValueError):
        RobotsPolicy(ORIGIN, DISALLOW_ALL, failure="dns")


def test_oversized_body_is_cut_at_a_whole_line() -> None:
    head = b"User-agent: *\nDisallow: /early\n"
    filler = b"# " + b"x" * 98 + b"\n"
    body = head + filler * (ROBOTS_MAX_BYTES // len(filler) + 1) + b"Disallow: /late\n"
    assert len(body) > ROBOTS_MAX_BYTES
    # A rule across the limit: cut as bytes, "Disallow: /abc" would become "Disallow: /a".
    line = b"Disallow: /abc\n"
    body2 = head + b"#" * (ROBOTS_MAX_BYTES - len(head) - 13) + b"\n" + line
    assert body2[:ROBOTS_MAX_BYTES].endswith(b"\nDisallow: /a")
    p, p2 = policy(body), policy(body2)
    assert p.state == OK and len(p.body) <= ROBOTS_MAX_BYTES
    assert not allows(p, "/early")
    assert allows(p, "/late")  # beyond the limit: ignored
    assert allows(p2, "/a") and allows(p2, "/abc")  # the cut line is dropped, not shortened
    assert not allows(p2, "/early")


@pytest.mark.parametrize("body", [
    bytes(range(256)) * 50,
    b"\xff\xfe\x00U\x00s\x00e\x00r",
    b"User-agent: *\nDisallow: /\xff\xfe\n",
    b"::::\n\n\r\r\x00\nUser-agent\nDisallow\nAllow: \nCrawl-delay: -3\nCrawl-delay: nan\n",
    b"Sitemap: \nSitemap: http://\nSitemap: " + b"a" * 5000 + b"\n",
    b"<html><body>Not a robots.txt</body></html>",
    b"",
])
def test_garbage_bodies_do_not_raise(body: bytes) -> None:
    p = policy(body)
    assert p.state == OK
    for path in ("/", "/a%ZZ", "/%ff%fe", "/\u00e9t\u00e9?q=\u00fc"):
        assert isinstance(allows(p, path), bool)
    assert decode_policy(encode_policy(p)) == p


def test_empty_file_allows_everything() -> None:
    assert allows(policy(b""), "/anything")


def test_byte_order_mark_and_crlf() -> None:
    p = policy(b"\xef\xbb\xbfUser-agent: crawlfleet\r\nDisallow: /x\r\n")
    assert not allows(p, "/x")


def test_percent_encoding_compares_equal() -> None:
    p = policy("User-agent: *\nDisallow: /caf\u00e9\n".encode())
    assert not allows(p, "/caf%C3%A9")
    assert not allows(p, "/caf%c3%a9/menu")


# --------------------------------------------------------------------------------------------
# encode_policy / decode_policy
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("p", [
    policy(),
    policy(status=404, error="http_4xx"),
    policy(status=503, error="http_5xx"),
    unreachable(NOW + 900, previous=unreachable(NOW + 300, previous=unreachable(NOW))),
    policy(status=None, error="connect"),
    unreachable(NOW + MAX_WAIT, previous=unreachable(NOW)),  # failed: robots_unavailable
])
def test_round_trip(p: RobotsPolicy) -> None:
    data = encode_policy(p)
    assert isinstance(data, bytes) and data.startswith(b"{")
    back = decode_policy(data)
    assert back == p
    paths = ["/", "/private", "/private/open", "/page", "/x.php", "/a.css", "/search?q"]
    assert [back.allows(ORIGIN + u) for u in paths] == [p.allows(ORIGIN + u) for u in paths]


def test_decoded_copy_rebuilds_its_parser() -> None:
    back = decode_policy(encode_policy(policy()).decode())  # str works too (decode_responses)
    assert back._parser is None  # built on first use, once
    assert not allows(back, "/private")
    parser = back._parser
    assert parser is not None
    assert allows(back, "/private/open") and back._parser is parser


def test_decode_for_another_agent_rereads_its_group() -> None:
    data = encode_policy(policy())
    other = decode_policy(data, agent="someone")
    assert other.agent == "someone" and other.crawl_delay == 9.0
    assert not allows(other, "/")
    assert other.expires_at == NOW + TTL  # same copy, same age
    assert decode_policy(data, agent="crawlfleet") == policy()


def test_decode_refuses_garbage_and_newer_versions() -> None:
    with pytest.raises(ValueError):
        decode_policy(b"not json")
    with pytest.raises(ValueError):
        decode_policy(b'{"v":1,"origin":"x","state":"maybe","agent":"a","expires_at":1}')
    with pytest.raises(MessageVersionError):
        decode_policy(b'{"v":2,"origin":"x","state":"ok","agent":"a","expires_at":1}')
    with pytest.raises(ValueError):  # failed needs its failure
        decode_policy(b'{"v":1,"origin":"x","state":"failed","agent":"a","expires_at":1}')


def test_decode_entries_of_the_previous_code() -> None:
    # What encode_policy wrote before failure / unavailable_since / failures existed.
    old = decode_policy(b'{"v":1,"origin":"http://site0.test:8080","state":"disallow_all",'
                        b'"agent":"crawlfleet","expires_at":1000300.0,"crawl_delay":null,'
                        b'"sitemaps":[],"body":""}')
    assert old.state == DISALLOW_ALL and old.expires_at == NOW + RETRY
    assert (old.failure, old.unavailable_since, old.failures) == (None, None, 0)
    # Such a copy carries no run: the next failure starts one.
    assert unreachable(NOW + RETRY, previous=old).failures == 1


@pytest.mark.parametrize("data", [
    b'{"v":2,"origin":"x","state":"failed","agent":"a","expires_at":1,"failure":"dns",'
    b'"unavailable_since":1.0,"failures":3,"new_field":[1]}',
    # A newer version may change a field's shape; it is still refused as a newer version.
    b'{"v":2,"origin":"x","state":"failed","agent":"a","expires_at":1,"failures":"many"}',
    b'{"v":2,"origin":["x"]}',
])
def test_decode_refuses_newer_versions_with_any_fields(data: bytes) -> None:
    with pytest.raises(MessageVersionError):
        decode_policy(data)


# --------------------------------------------------------------------------------------------
# RobotsCache against real sockets and the embedded Redis
# --------------------------------------------------------------------------------------------


@dataclass
class RobotsSite:
    """One origin serving a robots.txt that a test can change between requests."""

    status: int = 200
    body: bytes = ROBOTS
    hits: int = 0
    base: str = ""
    redirect: str | None = None  # when set, /robots.txt redirects there
    gate: asyncio.Event | None = None  # when set by a test, /robots.txt waits for it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def origin(self) -> str:
        return self.base

    def url(self, path: str) -> str:
        return self.base + path


SiteFactory = Callable[..., Awaitable[RobotsSite]]


@pytest.fixture
async def sites() -> AsyncIterator[SiteFactory]:
    runners: list[web.AppRunner] = []

    async def start(**kwargs: Any) -> RobotsSite:
        site = RobotsSite(**kwargs)

        async def robots(request: web.Request) -> web.Response:
            site.hits += 1
            if site.redirect is not None and request.path == "/robots.txt":
                raise web.HTTPMovedPermanently(site.redirect)
            site.arrived.set()
            if site.gate is not None:
                await site.gate.wait()
            return web.Response(status=site.status, body=site.body, content_type="text/plain")

        app = web.Application()
        app.router.add_get("/robots.txt", robots)
        app.router.add_get("/moved/robots.txt", robots)
        runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        site.base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        return site

    yield start
    for runner in runners:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


@dataclass
class Env:
    redis: Any
    keys: Keys
    session: aiohttp.ClientSession
    settings: Settings
    clock: Clock

    def cache(self) -> RobotsCache:
        """A new cache: what another worker process sharing the Redis would have."""
        return RobotsCache(self.redis, self.keys, self.session, self.settings, now=self.clock)


@pytest.fixture
async def env() -> AsyncIterator[Env]:
    settings = Settings(allow_private=True, fetch_timeout=2.0, connect_timeout=1.0,
                        namespace="t", redis_url=f"embedded://{uuid.uuid4().hex}")
    redis = open_redis(settings.redis_url)
    try:
        async with worker_session(settings) as session:
            yield Env(redis, Keys(settings.namespace), session, settings, Clock())
    finally:
        await redis.aclose()


async def test_concurrent_calls_fetch_once_per_origin(env: Env, sites: SiteFactory) -> None:
    a, b = await sites(), await sites(body=b"User-agent: *\nDisallow: /\n")
    cache = env.cache()
    calls = [cache.policy(site.url(f"/page{i}")) for i in range(20) for site in (a, b)]
    policies = await asyncio.gather(*calls)
    assert (a.hits, b.hits) == (1, 1)
    assert {p.origin for p in policies} == {a.origin, b.origin}
    assert all(p is policies[0] for p in policies[0::2])  # one shared object per origin
    assert policies[0].crawl_delay == 2.5 and policies[0].allows(a.url("/private/open"))
    assert not policies[1].allows(b.url("/x"))
    assert await cache.allows(a.url("/")) and not await cache.allows(a.url("/private"))
    assert (a.hits, b.hits) == (1, 1)


async def test_another_worker_uses_the_shared_copy(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    first = await env.cache().policy(site.url("/"))
    stored = await env.redis.hget(env.keys.robots, site.origin)
    assert decode_policy(stored) == first
    second = await env.cache().policy(site.url("/private"))  # a fresh process: no memory
    assert site.hits == 1
    assert second == first and second is not first
    assert not second.allows(site.url("/private"))


async def test_expired_copy_is_fetched_again(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    cache = env.cache()
    await cache.policy(site.url("/"))
    env.clock.now += TTL - 1
    await cache.policy(site.url("/"))
    await env.cache().policy(site.url("/"))
    assert site.hits == 1
    site.body = b"User-agent: *\nDisallow: /\n"
    env.clock.now += 2
    renewed = await cache.policy(site.url("/"))
    assert site.hits == 2
    assert not renewed.allows(site.url("/"))
    assert renewed.expires_at == env.clock.now + TTL
    assert await env.cache().policy(site.url("/")) == renewed  # Redis has the new copy
    assert site.hits == 2


async def test_server_error_disallows_until_retry(env: Env, sites: SiteFactory) -> None:
    site = await sites(status=503, body=b"busy")
    cache = env.cache()
    p = await cache.policy(site.url("/"))
    assert p.state == DISALLOW_ALL and not p.allows(site.url("/"))
    assert p.expires_at == NOW + RETRY
    assert (p.unavailable_since, p.failures) == (NOW, 1)
    site.status, site.body = 200, b"User-agent: *\nDisallow: /x\n"
    env.clock.now += RETRY - 1
    assert (await cache.policy(site.url("/"))).state == DISALLOW_ALL
    assert (await env.cache().policy(site.url("/"))).state == DISALLOW_ALL  # shared too
    assert site.hits == 1
    env.clock.now += 1
    p = await cache.policy(site.url("/"))
    assert site.hits == 2
    assert p.state == OK and p.allows(site.url("/")) and not p.allows(site.url("/x"))


async def test_not_found_allows_all(env: Env, sites: SiteFactory) -> None:
    site = await sites(status=404, body=b"User-agent: *\nDisallow: /\n")
    p = await env.cache().policy(site.url("/a"))
    assert p.state == ALLOW_ALL and p.allows(site.url("/a"))
    assert p.expires_at == NOW + TTL


async def test_server_errors_back_off_across_workers(env: Env, sites: SiteFactory) -> None:
    site = await sites(status=503, body=b"busy")
    first = await env.cache().policy(site.url("/"))
    env.clock.now = first.expires_at
    # Another worker (no memory) continues the run from the Redis copy.
    second = await env.cache().policy(site.url("/"))
    assert (second.state, second.failures, second.unavailable_since) == (DISALLOW_ALL, 2, NOW)
    assert second.expires_at == NOW + RETRY + 2 * RETRY
    # This worker continues it from memory when the Redis copy is gone.
    cache = env.cache()
    await cache.policy(site.url("/"))  # fresh in Redis: remembered, not fetched
    await env.redis.hdel(env.keys.robots, site.origin)
    env.clock.now = second.expires_at
    third = await cache.policy(site.url("/"))
    assert (third.failures, third.unavailable_since) == (3, NOW) and site.hits == 3
    env.clock.now = NOW + MAX_WAIT
    failed = await cache.policy(site.url("/"))
    assert failed.state == FAILED and failed.failure == "robots_unavailable"
    assert failed.expires_at == NOW + MAX_WAIT + RETRY and not failed.allows(site.url("/"))
    assert decode_policy(await env.redis.hget(env.keys.robots, site.origin)) == failed
    # The host recovers: the next fetch after the failed copy expires starts over.
    site.status, site.body = 200, b"User-agent: *\nDisallow: /x\n"
    env.clock.now = failed.expires_at
    ok = await env.cache().policy(site.url("/"))
    assert ok.state == OK and (ok.failure, ok.unavailable_since, ok.failures) == (None, None, 0)
    assert site.hits == 5


async def test_refused_connection_fails_the_origin(env: Env) -> None:
    with socket.socket() as s:  # a port nobody listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    origin = f"http://127.0.0.1:{port}"
    cache = env.cache()
    p = await cache.policy(f"{origin}/x")
    assert p.state == FAILED and p.failure == "connect"
    assert p.expires_at == NOW + RETRY and not p.allows(f"{origin}/x")
    assert decode_policy(await env.redis.hget(env.keys.robots, origin)) == p
    env.clock.now += RETRY - 1
    assert await cache.policy(f"{origin}/y") is p  # from memory, until it expires
    assert await env.cache().policy(f"{origin}/y") == p  # and from Redis
    env.clock.now += 1
    again = await cache.policy(f"{origin}/x")  # expired: asked again
    assert again.state == FAILED and again.expires_at == env.clock.now + RETRY


async def test_blocked_address_fails_the_origin(env: Env, sites: SiteFactory) -> None:
    site = await sites()  # on 127.0.0.1, which the SSRF guard refuses without allow_private
    guarded = RobotsCache(env.redis, env.keys, env.session,
                          env.settings.replace(allow_private=False), now=env.clock)
    p = await guarded.policy(site.url("/"))
    assert site.hits == 0
    assert p.state == FAILED and p.failure in ("blocked_address", "private_address")
    assert p.expires_at == NOW + RETRY


class FailingRedis:
    """The embedded Redis, but the named commands raise as if the server had gone."""

    def __init__(self, redis: Any, *, hget: bool = False, execute: bool = False) -> None:
        self._redis, self._hget, self._execute = redis, hget, execute

    def __getattr__(self, name: str) -> Any:
        return getattr(self._redis, name)

    async def hget(self, *args: Any) -> Any:
        if self._hget:
            raise redis.exceptions.ConnectionError("Connection refused")
        return await self._redis.hget(*args)

    def pipeline(self, **kwargs: Any) -> Any:
        pipe = self._redis.pipeline(**kwargs)
        if self._execute:
            async def execute() -> Any:
                raise redis.exceptions.ConnectionError("Connection reset by peer")
            pipe.execute = execute
        return pipe


async def test_redis_read_errors_propagate(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    cache = RobotsCache(FailingRedis(env.redis, hget=True), env.keys, env.session, env.settings,
                        now=env.clock)
    with pytest.raises(redis.exceptions.ConnectionError):
        await cache.policy(site.url("/"))
    assert site.hits == 0  # not turned into a policy, nor a reason to fetch
    with pytest.raises(redis.exceptions.ConnectionError):
        await cache.policy(site.url("/"))  # nothing remembered either


async def test_redis_write_errors_propagate(env: Env, sites: SiteFactory) -> None:
    site = await sites(status=503)
    cache = RobotsCache(FailingRedis(env.redis, execute=True), env.keys, env.session,
                        env.settings, now=env.clock)
    with pytest.raises(redis.exceptions.ConnectionError):
        await cache.policy(site.url("/"))
    assert site.hits == 1
    assert await env.redis.hget(env.keys.robots, site.origin) is None
    p = await env.cache().policy(site.url("/"))  # nothing kept: fetched again, a new run
    assert site.hits == 2 and p.failures == 1


async def test_sitemaps_land_in_the_shared_set(env: Env, sites: SiteFactory) -> None:
    site = await sites(body=b"Sitemap: /a.xml\nSitemap: https://cdn.test/b.xml\n")
    await env.cache().policy(site.url("/"))
    members = {m.decode() for m in await env.redis.smembers(env.keys.sitemaps)}
    assert members == {site.url("/a.xml"), "https://cdn.test/b.xml"}


async def test_oversized_file_parses_its_first_part(env: Env, sites: SiteFactory) -> None:
    filler = b"# " + b"x" * 1021 + b"\n"
    body = (b"User-agent: *\nDisallow: /early\n" + filler * (ROBOTS_MAX_BYTES // 1024)
            + b"Disallow: /late\n")
    site = await sites(body=body)
    p = await env.cache().policy(site.url("/"))
    assert site.hits == 1  # one GET, cut after the limit
    assert p.state == OK
    assert not p.allows(site.url("/early")) and p.allows(site.url("/late"))
    assert len(p.body) <= ROBOTS_MAX_BYTES


async def test_redirected_robots_is_followed(env: Env, sites: SiteFactory) -> None:
    site = await sites(body=b"User-agent: *\nDisallow: /moved-rule\n", redirect="/moved/robots.txt")
    p = await env.cache().policy(site.url("/"))
    assert site.hits == 2  # the redirect, then the file
    assert p.state == OK and p.origin == site.origin  # the rules are the origin's all the same
    assert not p.allows(site.url("/moved-rule"))


async def test_redirect_loop_allows_all(env: Env, sites: SiteFactory) -> None:
    site = await sites(redirect="/robots.txt")
    p = await env.cache().policy(site.url("/"))
    assert site.hits == 6  # the request and five redirects (RFC 9309: at least five)
    assert p.state == ALLOW_ALL


async def test_unreadable_cached_copy_is_replaced(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    await env.redis.hset(env.keys.robots, site.origin, b"{garbage")
    p = await env.cache().policy(site.url("/"))
    assert site.hits == 1 and p.state == OK
    assert decode_policy(await env.redis.hget(env.keys.robots, site.origin)) == p


async def test_cancelled_caller_does_not_cancel_the_others(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    site.gate = asyncio.Event()
    cache = env.cache()
    first = asyncio.create_task(cache.policy(site.url("/")))
    second = asyncio.create_task(cache.policy(site.url("/x")))
    await site.arrived.wait()  # the one request is at the server, both callers waiting
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    site.gate.set()
    p = await second
    assert p.state == OK and site.hits == 1


async def test_shutdown_mid_fetch_stores_nothing(env: Env, sites: SiteFactory) -> None:
    site = await sites()
    site.gate = asyncio.Event()
    loading = asyncio.create_task(env.cache().policy(site.url("/")))
    await site.arrived.wait()
    await env.session.close()  # what the worker's shutdown does
    site.gate.set()
    with pytest.raises(RuntimeError, match="session closed"):
        await loading
    assert await env.redis.hget(env.keys.robots, site.origin) is None
