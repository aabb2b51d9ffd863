"""Politeness that holds across the whole fleet, measured by the test web itself."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import pytest

from ..conftest import Fleet, RedisServer, WebUnderTest, wait_for

pytestmark = pytest.mark.integration

# The crawler spaces requests 10% wider than the delay so that connection set-up jitter cannot
# bring the gap the server sees below it; the test holds it to the delay itself, with 5 ms of
# measurement slack for a busy machine.
JITTER_S = 0.005


def test_per_host_limits_hold_across_four_workers_and_a_slow_host_does_not_stall_the_rest(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    web = testweb_factory("--hosts", "4", "--pages", "25", "--slow-host", "site0.test=1000")
    concurrency, delay = 2, 0.2
    fleet = fleet_factory(
        redis_server.url, web,
        CRAWLFLEET_PER_HOST_CONCURRENCY=str(concurrency),
        CRAWLFLEET_CRAWL_DELAY=str(delay),
        # Short turns, so that a host passes between workers often: the limits must hold
        # across hand-overs, not only within one worker's turn.
        CRAWLFLEET_BATCH_SIZE="4",
        CRAWLFLEET_HOST_TURN_SECONDS="1",
        CRAWLFLEET_JOBS_PER_WORKER="4",
    )
    fleet.start(*web.seeds, workers=4)
    fleet.wait_finished(timeout=120)

    stats = web.stats()["hosts"]
    for host, host_stats in stats.items():
        assert host_stats["peak_concurrency"] <= concurrency, (host, host_stats)
        assert host_stats["min_gap_s"] >= delay - JITTER_S, (host, host_stats)

    # Batches of every host really did pass between workers, so the limits held fleet-wide.
    results = fleet.export()
    workers_per_host: dict[str, set[str]] = defaultdict(set)
    fetched_at: dict[str, list[float]] = defaultdict(list)
    for r in results:
        host = r["url"].split("/")[2].split(":")[0]
        if r["worker"]:
            workers_per_host[host].add(r["worker"])
        fetched_at[host].append(r["fetched_at"])
    assert all(len(w) >= 2 for w in workers_per_host.values()), workers_per_host

    # The slow host takes far longer, and meanwhile the others run at their delay-bound pace.
    def span(host: str) -> float:
        return max(fetched_at[host]) - min(fetched_at[host])

    slow = span("site0.test")
    for host in ("site1.test", "site2.test", "site3.test"):
        pages = len(fetched_at[host])
        assert span(host) < slow, (host, span(host), slow)
        # Delay-bound ideal: (pages - 1) x delay; allow for hand-overs and a busy machine.
        assert span(host) < (pages - 1) * delay * 2.5 + 2, (host, span(host), pages)


def _host(url: str) -> str:
    return url.split("/")[2].split(":")[0]


def _path(url: str) -> str:
    return "/" + url.split("/", 3)[3] if url.count("/") >= 3 else "/"


def test_robots_links_retries_redirects_and_patterns(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """One crawl of the test web's special endpoints, then each rule checked on its results."""
    import redis as redis_sync

    from crawlfleet.testweb.site import WebSpec, reachable

    robots = {"site1.test": "agent", "site2.test": "delay:0.3", "site3.test": "sitemap",
              "site4.test": "status:404"}
    web = testweb_factory("--hosts", "5", "--pages", "12", "--extras",
                          *[f"--robots={h}={v}" for h, v in robots.items()])
    max_retries = 2
    fleet = fleet_factory(
        redis_server.url, web,
        CRAWLFLEET_MAX_RETRIES=str(max_retries), CRAWLFLEET_RETRY_BASE="0.1",
        CRAWLFLEET_RETRY_MAX="2", CRAWLFLEET_DENY_PATTERN="/calendar/|/session",
    )
    fleet.start(*web.seeds, workers=2)
    status = fleet.wait_finished(timeout=120)

    spec = WebSpec(hosts=5, pages=12, port=web.port, extras=True, robots=tuple(robots.items()))
    polite = reachable(spec, spec.roots, obey_robots=True)
    everything = reachable(spec, spec.roots, obey_robots=False)
    results = {r["url"]: r for r in fleet.export()}
    fetched = {u for u, r in results.items() if r["error"] != "robots"}
    skipped = {u for u, r in results.items() if r["error"] == "robots"}

    # robots.txt: each host's rules for our agent; a 404 robots.txt allows everything. Followed
    # redirect hops get results of their own (so they are never fetched again).
    hops = {hop for chain in polite.redirects.values() for hop in chain}
    assert fetched == set(polite) | hops
    assert skipped == set(everything) - set(polite)
    assert {_path(u).split("/")[1] for u in skipped} == {"private", "agent-only"}
    assert not any("/agent-only/" in u for u in fetched)
    assert any("/private/" in u and _host(u) == "site1.test" for u in fetched)  # agent rules
    assert any("/private/" in u and _host(u) == "site4.test" for u in fetched)  # 404 robots
    hits = web.stats()["paths"]
    assert all(paths.get("/robots.txt") == 1 for paths in hits.values()), "robots once per host"
    assert web.stats()["hosts"]["site2.test"]["min_gap_s"] >= 0.3 - JITTER_S  # Crawl-delay
    with redis_sync.Redis.from_url(redis_server.url) as r:
        sitemaps = {s.decode() for s in r.smembers(f"{fleet.env['CRAWLFLEET_NAMESPACE']}:sitemaps")}
    assert f"http://site3.test:{web.port}/sitemap.xml" in sitemaps

    for host in spec.host_names:
        origin = f"http://{host}:{web.port}"
        # Retries: 503 twice, then 200; 429 with Retry-After, then 200; 500 forever.
        assert results[f"{origin}/flaky/1"]["status"] == 200
        assert results[f"{origin}/ratelimited/1"]["status"] == 200
        broken = results[f"{origin}/broken/1"]
        assert broken["error"] == "http_5xx"
        assert hits[host]["/broken/1"] == max_retries + 1
        # Redirects: a same-host chain is followed and recorded; a loop fails; a hop to
        # another host is not followed inline but handed to the frontier as a link.
        chain = results[f"{origin}/redirect/1"]
        assert chain["status"] == 200 and chain["final_url"] == f"{origin}/redirected/1"
        assert len(chain["redirects"]) == 3
        assert f"{origin}/redirected/1/landed" in fetched  # resolved against the final URL
        assert results[f"{origin}/redirect-loop/1"]["error"] == "too_many_redirects"
        out = results[f"{origin}/redirect-out/1"]
        assert out["status"] == 302 and out["error"] is None
        assert out["redirects"][0] in results and _host(out["redirects"][0]) != host
        # Links: meta nofollow and rel=nofollow are not followed; noindex pages are.
        assert hits[host].get("/only-via-nofollow/1", 0) == 0
        assert hits[host].get("/only-via-relnofollow/1", 0) == 0
        assert results[f"{origin}/noindex-page"]["noindex"] is True
        assert f"{origin}/only-via-noindex/1" in fetched
        assert f"{origin}/canonical-target" in fetched

    dead = fleet.run("export", "--dead").stdout.splitlines()
    assert len(dead) == 5 and all('"http_5xx"' in line for line in dead)
    assert status["dead"] == 5
    assert status["retries"] >= 5 * (2 + 1 + max_retries)
    assert status["discarded_scope"] > 0  # the deny pattern kept the traps out
    assert not any("/calendar/" in u or "/session" in u for u in results)


def test_traps_are_bounded_by_the_host_budget_and_query_variants(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    web = testweb_factory("--hosts", "1", "--pages", "10", "--extras")
    budget, variants = 60, 5
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_MAX_PAGES_PER_HOST=str(budget),
                          CRAWLFLEET_MAX_QUERY_VARIANTS=str(variants),
                          CRAWLFLEET_MAX_RETRIES="0")
    fleet.start(*web.seeds)
    status = fleet.wait_finished(timeout=90)  # the endless calendar and session ids end
    urls = [r["url"] for r in fleet.export()]
    assert len([u for u in urls if "/session?" in u]) <= variants
    assert any("/calendar/" in u for u in urls)
    assert status["discarded_host_budget"] > 0 and status["discarded_query_variants"] > 0
    # Admitted through the frontier: exactly the budget (redirect targets come on top).
    assert status["seen"] - len([u for u in urls if "/redirect" in u and "/1/" in u]) <= budget


def test_an_unavailable_robots_txt_holds_its_host_and_is_retried(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:

    web = testweb_factory("--hosts", "2", "--pages", "8", "--robots", "site1.test=status:503")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_ROBOTS_RETRY="1")
    fleet.start(*web.seeds)
    site0 = [u for u in web.reachable() if _host(u) == "site0.test"]
    wait_for(lambda: fleet.status()["pages"] + fleet.status()["failed"]
             + fleet.status()["skipped"] >= len(site0), timeout=60, what="site0 to be crawled")
    wait_for(lambda: web.stats()["hosts"]["site1.test"]["requests"] >= 3, timeout=30,
             what="site1's robots.txt to be retried")
    status = fleet.status()
    assert not status["finished"] and status["queued"] + status["in_flight"] >= 1
    assert not [u for u in (r["url"] for r in fleet.export()) if _host(u) == "site1.test"]
    hosts = web.stats()["hosts"]
    assert hosts["site1.test"]["distinct_paths"] == 1  # only robots.txt, asked again and again


def test_scope_allowed_domains_depth_and_page_budgets(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    from crawlfleet.testweb.site import WebSpec, reachable

    web = testweb_factory("--hosts", "3", "--pages", "30")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_ALLOWED_DOMAINS="site1.test",
                          CRAWLFLEET_MAX_DEPTH="3")
    site0 = web.seeds[0]
    fleet.start(site0)  # only site0 is seeded; site1 is allowed, site2 is not
    status = fleet.wait_finished()
    spec = WebSpec(hosts=3, pages=30, port=web.port)
    hosts = {"site0.test", "site1.test"}
    within = reachable(spec, [site0], allowed_hosts=hosts, max_depth=3)
    results = fleet.export()
    urls = sorted(r["url"] for r in results)
    # A URL's depth is the depth it was first found at (as in Scrapy's DEPTH_LIMIT). Hosts are
    # crawled concurrently, so a page may be found first by a longer path than the shortest:
    # nothing beyond the limit is ever fetched, everything short of it always is, and a URL
    # exactly at the limit may be missed when its parent was first found the long way round.
    assert set(urls) <= set(within), sorted(set(urls) - set(within))[:5]
    short_of_it = reachable(spec, [site0], allowed_hosts=hosts, max_depth=2)
    assert set(urls) >= set(short_of_it), sorted(set(short_of_it) - set(urls))[:5]
    assert all(r["depth"] <= 3 and r["depth"] >= within[r["url"]] for r in results)
    assert {_host(u) for u in urls} == {"site0.test", "site1.test"}
    assert status["discarded_scope"] > 0  # links to site2 and beyond depth 3

    # A total page budget: exactly that many URLs enter the crawl, each with a result.
    out = fleet.logdir / "budget.jsonl"
    result = fleet.run("crawl", *web.seeds, "--max-pages", "25", "--out", str(out),
                       CRAWLFLEET_REDIS_URL="", CRAWLFLEET_NAMESPACE="budget")
    assert "crawl finished" in result.stderr
    assert len(out.read_text().splitlines()) == 25


def test_a_worker_short_of_fetch_slots_hands_hosts_to_an_idle_one(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """worker-0 starts alone and takes every host; with 8 fetch slots and 4 a host, its hosts
    wait for each other. worker-1, started once their queues are long, has nothing to do and
    asks for hosts (Keys.hungry): worker-0 hands some over at their next refill, instead of
    keeping them to the end of their turns (500 pages or 120 s, more than this crawl)."""
    import redis as redis_sync

    from crawlfleet.common.keys import Keys

    web = testweb_factory("--hosts", "6", "--pages", "200", "--latency-ms", "30")
    fleet = fleet_factory(
        redis_server.url, web,
        CRAWLFLEET_MAX_IN_FLIGHT="8",
        CRAWLFLEET_PER_HOST_CONCURRENCY="4",
    )
    fleet.start(*web.seeds, workers=1)
    keys = Keys(fleet.env["CRAWLFLEET_NAMESPACE"])
    client = redis_sync.Redis.from_url(redis_server.url)

    def stocked() -> bool | None:
        leased = client.hlen(keys.lease_batch)
        queued = sum(client.llen(keys.host_queue(h)) for h in web.info["hosts"])
        return True if leased == 6 and queued >= 200 else None

    wait_for(stocked, timeout=60, what="worker-0 to hold every host with long queues")
    fleet.spawn("worker-1", "worker", CRAWLFLEET_WORKER_ID="worker-1")
    fleet.wait_finished(timeout=120)  # every URL accounted for, and `crawlfleet check` passes

    hosts_by_worker: dict[str, set[str]] = defaultdict(set)
    for r in fleet.export():
        if r["worker"]:
            hosts_by_worker[r["worker"]].add(_host(r["url"]))
    assert hosts_by_worker["worker-1"], dict(hosts_by_worker)
    # Handed over, never shared: each host had at most its 4 fetches in flight at once.
    for host, host_stats in web.stats()["hosts"].items():
        assert host_stats["peak_concurrency"] <= 4, (host, host_stats)
