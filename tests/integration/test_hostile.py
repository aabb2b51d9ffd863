"""A hostile server costs one failed page with a recorded reason, never a stuck or crashed worker.

One fleet (a scheduler and ONE worker, default settings but for a few lowered timeouts) crawls
the test web's ``hostile.test`` (``crawlfleet testweb --hostile``: its root links every hostile
path) and an ordinary site at the same time. Each test below reads one URL's recorded result
from that crawl; the crawl must finish, ``check`` must agree, the worker must stay alive, keep
crawling the ordinary site meanwhile, and stay under 300 MB peak RSS.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.request import urlopen

import pytest

from crawlfleet.testweb.hostile import PATHS, STATS_PATH

from ..conftest import Fleet, RedisServer, WebUnderTest, start_testweb

pytestmark = pytest.mark.integration

FETCH_TIMEOUT = 2.5  # the slow drip must end by this, not by the read timeout
READ_TIMEOUT = 1.5  # above the drip's one byte a second, so only the total deadline stops it
RSS_LIMIT_KB = 300 * 1024
MAX_BODY = 10 * 1024 * 1024  # CRAWLFLEET_MAX_BODY_BYTES' default
ROBOTS_CAP = 512 * 1024 + 1  # what the robots fetch reads at most (workers/robots.py)
NON_HTML_CAP = 64 * 1024  # workers/fetch.py NON_HTML_BYTES


@dataclass
class HostileCrawl:
    web: WebUnderTest
    fleet: Fleet
    results: dict[str, dict[str, Any]]
    status: dict[str, Any]
    server: dict[str, dict[str, int]]  # the hostile server's per-path stats
    peak_rss_kb: int
    seconds: float

    @property
    def base(self) -> str:
        return str(self.web.info["hostile_seed"]).rstrip("/")

    def result(self, path: str) -> dict[str, Any]:
        url = self.base + path
        assert url in self.results, f"no result for {url}"
        return self.results[url]


def _peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.fixture(scope="module")
def crawl(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[HostileCrawl]:
    web = start_testweb("--hosts", "1", "--pages", "40", "--latency-ms", "100", "--hostile")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
    env.update({
        "CRAWLFLEET_REDIS_URL": redis_server.url,
        "CRAWLFLEET_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
        "CRAWLFLEET_DNS_NAMESERVERS": web.dns,
        "CRAWLFLEET_ALLOW_PRIVATE": "1",  # the test web lives on loopback
        "CRAWLFLEET_LOG_FORMAT": "json",
        "CRAWLFLEET_CRAWL_DELAY": "0",
        "CRAWLFLEET_FETCH_TIMEOUT": str(FETCH_TIMEOUT),
        "CRAWLFLEET_READ_TIMEOUT": str(READ_TIMEOUT),
        "CRAWLFLEET_RETRY_BASE": "0.2",  # CRAWLFLEET_MAX_RETRIES stays at its default, 3
    })
    fleet = Fleet(env, tmp_path_factory.mktemp("hostile-fleet"))
    try:
        started = time.monotonic()
        fleet.start(web.seeds[0], web.info["hostile_seed"])
        status = fleet.wait_finished(timeout=120)
        seconds = time.monotonic() - started
        worker = fleet.processes["worker-0"]
        assert worker.poll() is None, fleet.log("worker-0")[-3000:]
        peak = _peak_rss_kb(worker.pid)
        results = fleet.export()
        assert not [u for u, n in Counter(r["url"] for r in results).items() if n > 1]
        with urlopen(f"http://127.0.0.1:{web.info['hostile_port']}{STATS_PATH}",
                     timeout=5) as response:
            server = json.loads(response.read())
        print(f"\nhostile crawl: {seconds:.1f} s, worker peak RSS {peak / 1024:.1f} MB, "
              f"{len(results)} results", file=sys.stderr)
        yield HostileCrawl(web, fleet, {r["url"]: r for r in results}, status, server, peak,
                           seconds)
    finally:
        fleet.stop_all()
        web.process.terminate()
        web.process.wait(timeout=10)


# --- the fleet as a whole -----------------------------------------------------------------


def test_the_worker_survives_and_keeps_crawling_the_other_site(crawl: HostileCrawl) -> None:
    site = {u: r for u, r in crawl.results.items() if u.startswith("http://site0.test:")}
    hostile = {u: r for u, r in crawl.results.items() if u.startswith(crawl.base)}
    assert sorted(site) == crawl.web.reachable()
    assert not [r for r in site.values() if r["error"] not in (None, "http_4xx", "robots")]
    # One worker did everything, and the ordinary site was crawled while hostile.test was.
    assert {r["worker"] for r in crawl.results.values()} == {"worker-0"}
    assert min(r["fetched_at"] for r in site.values()) < max(
        r["fetched_at"] for r in hostile.values())
    assert not [r for r in crawl.results.values() if r["error"] in ("crawler_error", "error",
                                                                    "worker_lost")]
    for name, process in crawl.fleet.processes.items():
        assert process.poll() is None, f"{name} exited: {crawl.fleet.log(name)[-2000:]}"
    assert crawl.status["finished"]


def test_every_hostile_path_has_a_result(crawl: HostileCrawl) -> None:
    for path in PATHS:
        if path in ("/robots.txt", "/redirect-loop"):
            continue
        crawl.result(path)
    crawl.result("/redirect-loop?n=0")


def test_peak_rss_of_the_worker_stays_bounded(crawl: HostileCrawl) -> None:
    print(f"\nworker peak RSS (VmHWM) during the hostile run: {crawl.peak_rss_kb / 1024:.1f} MB")
    assert crawl.peak_rss_kb < RSS_LIMIT_KB


# --- one behaviour each -------------------------------------------------------------------


def test_slow_drip_is_a_timeout(crawl: HostileCrawl) -> None:
    r = crawl.result("/drip")
    assert r["error"] == "timeout"
    assert r["elapsed_ms"] < (FETCH_TIMEOUT + 1) * 1000  # ended by the fetch's deadline
    assert crawl.server["/drip"]["requests"] == 4  # 1 + CRAWLFLEET_MAX_RETRIES, then dead


def test_a_body_that_never_ends_is_too_large(crawl: HostileCrawl) -> None:
    assert crawl.result("/endless")["error"] == "too_large"
    assert crawl.server["/endless"]["closed_early"] == crawl.server["/endless"]["requests"] == 1


def test_a_10_gb_content_length_is_refused_before_reading(crawl: HostileCrawl) -> None:
    assert crawl.result("/huge-length")["error"] == "too_large"
    st = crawl.server["/huge-length"]
    assert st["closed_early"] == 1 and st["max_sent"] < MAX_BODY  # not read to the cap


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_compression_bomb_is_too_large(crawl: HostileCrawl, encoding: str) -> None:
    assert crawl.result(f"/bomb.{encoding}")["error"] == "too_large"
    st = crawl.server[f"/bomb.{encoding}"]
    assert st["closed_early"] == 1 and st["max_sent"] < 4 * 1024 * 1024  # of 4 GiB inflated


def test_a_brotli_bomb(crawl: HostileCrawl) -> None:
    """Brotli is a dependency, so aiohttp decodes br, and the cap stops the bomb."""
    assert crawl.result("/bomb.br")["error"] == "too_large"


def test_a_redirect_loop_minting_new_urls_is_too_many_redirects(crawl: HostileCrawl) -> None:
    r = crawl.result("/redirect-loop?n=0")
    assert r["error"] == "too_many_redirects"
    assert len(r["redirects"]) == 11  # CRAWLFLEET_MAX_REDIRECTS (10) hops followed, one more


def test_a_redirect_chain_longer_than_the_limit_is_too_many_redirects(crawl: HostileCrawl
                                                                      ) -> None:
    assert crawl.result("/redirect-chain/12")["error"] == "too_many_redirects"
    ok = crawl.result("/short-chain/3")  # within the limit: the page at its end
    assert ok["error"] is None and ok["final_url"] == crawl.base + "/short-chain/0"


def test_a_redirect_cycle_is_ended_by_dedup(crawl: HostileCrawl) -> None:
    """a -> b -> a: the hop back to a URL already in the crawl is not followed, so the result
    is the redirect itself (no error) and nothing is fetched in circles."""
    r = crawl.result("/redirect-cycle/a")
    assert r["error"] is None and r["status"] == 302
    assert r["redirects"][-1] == crawl.base + "/redirect-cycle/a"
    assert crawl.server["/redirect-cycle/a"]["requests"] == 1


@pytest.mark.skip(reason="needs CRAWLFLEET_ALLOW_PRIVATE=0, which makes the loopback test web "
                  "itself unreachable; the SSRF guard's own tests cover a hop to a private "
                  "address (tests/test_fetch.py)")
def test_a_redirect_to_a_private_address_is_blocked() -> None:
    raise AssertionError("unreachable")


def test_a_reset_mid_body_is_a_broken_response(crawl: HostileCrawl) -> None:
    assert crawl.result("/reset")["error"] in ("protocol", "connect")
    assert crawl.server["/reset"]["requests"] == 4  # retried, then dead-lettered


def test_a_server_that_never_answers_is_a_timeout(crawl: HostileCrawl) -> None:
    r = crawl.result("/silent")
    assert r["error"] == "timeout" and r["status"] is None
    st = crawl.server["/silent"]
    assert st["requests"] == st["closed_early"] == 4  # the crawler hung up each time


@pytest.mark.parametrize("path", ["/bad-status", "/bad-header", "/huge-header"])
def test_broken_http_is_protocol(crawl: HostileCrawl, path: str) -> None:
    r = crawl.result(path)
    assert r["error"] == "protocol" and r["status"] is None


def test_html_nested_100000_deep_parses(crawl: HostileCrawl) -> None:
    """Cut where it nests past 512 elements (its one link is below that): a page, not tens of
    seconds of parser CPU."""
    r = crawl.result("/deep")
    assert r["error"] is None and r["title"] == "deep" and r["links"] == 0


def test_a_wrong_charset_decodes(crawl: HostileCrawl) -> None:
    r = crawl.result("/wrong-charset")
    assert r["error"] is None and r["title"] is not None and r["title"].startswith("caf")


def test_an_unknown_charset_decodes(crawl: HostileCrawl) -> None:
    r = crawl.result("/unknown-charset")
    assert r["error"] is None and r["title"] == "unknown charset"


def test_binary_served_as_html_is_binary(crawl: HostileCrawl) -> None:
    assert crawl.result("/binary-as-html")["error"] == "binary"


def test_javascript_data_and_overlong_links_are_not_followed(crawl: HostileCrawl) -> None:
    r = crawl.result("/weird-links")
    assert r["error"] is None and r["links"] == 1  # /ok only
    assert not [u for u in crawl.results if len(u) > 2048 or not u.startswith("http")]


def test_a_429_storm_is_retried_then_dead_lettered(crawl: HostileCrawl) -> None:
    assert crawl.result("/ratelimited")["error"] == "http_429"
    assert crawl.server["/ratelimited"]["requests"] == 4  # 1 + CRAWLFLEET_MAX_RETRIES
    dead = crawl.fleet.run("export", "--dead", "--out", "-", check=False).stdout
    assert "/ratelimited" in dead or crawl.status["dead"] >= 1


def test_a_50_mb_robots_txt_is_read_only_to_its_cap(crawl: HostileCrawl) -> None:
    st = crawl.server["/robots.txt"]
    assert st["requests"] == 1 and st["closed_early"] == 1
    assert st["max_sent"] < 10 * 1024 * 1024  # of 50 MiB
    assert crawl.result("/ok")["error"] is None  # and its Allow: / was obeyed


@pytest.mark.parametrize(("path", "kind"), [("/binary.bin", "application/octet-stream"),
                                            ("/image.png", "image/png")])
def test_a_non_html_body_is_not_downloaded(crawl: HostileCrawl, path: str, kind: str) -> None:
    r = crawl.result(path)
    assert r["error"] is None and r["content_type"] == kind
    assert 0 < r["bytes"] <= NON_HTML_CAP
    st = crawl.server[path]
    assert st["closed_early"] == st["requests"] == 1  # the crawler hung up mid-body
    assert st["max_sent"] < 9 * 1024 * 1024  # /image.png is 9 MiB, /binary.bin endless
