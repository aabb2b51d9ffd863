"""A frontier nothing can corrupt or stall, end to end at the default settings: unreachable
seeds, batches that wait for a worker, long crawl delays, Redis faults mid-batch, a 200,000-link
page, malformed entries, and a Redis that lost its state. Every test ends with `check`."""

from __future__ import annotations

import contextlib
import http.server
import json
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_sync

from ..conftest import Fleet, RedisServer, WebUnderTest, free_port, wait_for

pytestmark = pytest.mark.integration


def by_url(fleet: Fleet) -> dict[str, dict[str, Any]]:
    results = fleet.export()
    urls = Counter(r["url"] for r in results)
    assert not [u for u, n in urls.items() if n > 1], "a URL has two results"
    return {r["url"]: r for r in results}


def client(server: RedisServer) -> redis_sync.Redis:
    return redis_sync.Redis.from_url(server.url)


def test_unreachable_seeds_end_as_failures_and_the_crawl_finishes(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    """No such name (NXDOMAIN from the test web's DNS) and a port that refuses connections:
    robots.txt cannot be fetched, so each seed fails with that reason, at once."""
    fleet = fleet_factory(redis_server.url, testweb)
    nxdomain = f"http://nosuch.test:{testweb.port}/"
    refused = f"http://site0.test:{free_port()}/"
    fleet.start(nxdomain, refused, testweb.seeds[0])
    status = fleet.wait_finished(timeout=60)
    results = by_url(fleet)
    assert results[nxdomain]["error"] == "dns"
    assert results[refused]["error"] == "connect"
    assert results[testweb.seeds[0]]["error"] is None
    assert status["failed"] >= 2 and status["finished"]


def test_a_private_address_without_the_opt_in_ends_as_blocked(
    testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    """The embedded `crawl` of loopback addresses without CRAWLFLEET_ALLOW_PRIVATE used to hang
    on its robots.txt forever. An IP literal is refused as a seed, by line; a name that
    resolves to loopback ends as a blocked_address result, and the crawl finishes."""
    fleet = fleet_factory("unused", testweb, CRAWLFLEET_ALLOW_PRIVATE="0")
    del fleet.env["CRAWLFLEET_REDIS_URL"]
    out = fleet.logdir / "crawl.jsonl"
    literal = f"http://127.0.0.1:{testweb.port}/"
    named = testweb.seeds[0]  # site0.test resolves to 127.0.0.1
    done = fleet.run("crawl", literal, named, "--out", str(out), check=False)
    assert done.returncode == 0, done.stderr
    assert "blocked_address" in done.stderr and "127.0.0.1" in done.stderr
    results = {r["url"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert literal not in results
    assert results[named]["error"] == "blocked_address"


def test_batches_that_wait_longer_than_a_lease_are_not_worker_losses(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """One job slot, three hosts, ~1.5 s batches and 1 s leases: on main 36 URLs failed as
    worker_lost with no worker dead. The lease starts at the claim now."""
    web = testweb_factory("--hosts", "3", "--pages", "8", "--latency-ms", "300")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_JOBS_PER_WORKER="1",
                          CRAWLFLEET_LEASE_SECONDS="1", CRAWLFLEET_BATCH_SIZE="5",
                          CRAWLFLEET_PER_HOST_CONCURRENCY="1")
    fleet.start(*web.seeds)
    status = fleet.wait_finished(timeout=120)
    results = by_url(fleet)
    assert not [u for u, r in results.items() if r["error"] == "worker_lost"]
    assert sorted(results) == web.reachable()
    assert status["leases_expired"] == 0


def test_a_long_crawl_delay_is_not_a_timeout(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A 30 s Crawl-delay with a 30 s timeout, at a tenth of the time: on main every fetch after
    the first timed out before it was sent, waiting for its turn."""
    web = testweb_factory("--hosts", "1", "--pages", "4", "--links", "3",
                          "--robots", "site0.test=delay:3")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_FETCH_TIMEOUT="2.7")
    fleet.start(*web.seeds)
    fleet.wait_finished(timeout=120)
    results = by_url(fleet)
    assert sorted(results) == web.reachable()
    fetched = [r for r in results.values() if r["status"] is not None]
    assert len(fetched) >= 4 and not [r for r in fetched if r["error"] == "timeout"]
    assert max(r["elapsed_ms"] for r in fetched) < 1000  # the fetch alone, not the wait


@pytest.mark.parametrize("fault", ["busy", "oom"])
def test_redis_faults_mid_batch_are_not_page_failures(
    fault: str, redis_factory: Callable[..., RedisServer],
    testweb_factory: Callable[..., WebUnderTest], fleet_factory: Callable[..., Fleet],
) -> None:
    """BUSY (a long script) or OOM (no memory for writes) while batches run: their URLs are
    handed back and retried, never recorded as the page's failure."""
    redis = redis_factory(aof=False)
    web = testweb_factory("--hosts", "3", "--pages", "60", "--latency-ms", "100")
    fleet = fleet_factory(redis.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1")
    fleet.start(*web.seeds, workers=2)
    admin = client(redis)
    wait_for(lambda: fleet.status()["pages"] >= 10, timeout=60, what="the crawl to get going")
    if fault == "busy":
        admin.config_set("busy-reply-threshold", 100)
        # A script that runs for two seconds: every other client is answered BUSY meanwhile.
        admin.eval("local t = redis.call('TIME') local s = tonumber(t[1]) "
                   "while tonumber(redis.call('TIME')[1]) < s + 2 do end return 1", 0)
    else:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)
        wait_for(lambda: any("maxmemory" in fleet.log(n) for n in ("worker-0", "worker-1")),
                 timeout=30, what="a worker to meet the OOM answer")
        admin.config_set("maxmemory", 0)
    status = fleet.wait_finished(timeout=120)
    results = by_url(fleet)
    assert sorted(results) == web.reachable()
    crawler_side = [r for r in results.values() if r["error"] in ("error", "crawler_error")]
    assert not crawler_side, crawler_side[:3]
    for name, process in fleet.processes.items():
        assert process.poll() is None, f"{name} exited: {fleet.log(name)[-2000:]}"
    assert status["finished"]


class _BigPage(http.server.BaseHTTPRequestHandler):
    links = 200_000
    body = ("<html><body>" + "".join(f'<a href="/p{i}">{i}</a>' for i in range(links))
            + "</body></html>").encode()

    def do_GET(self) -> None:
        if self.path == "/robots.txt":
            data, kind = b"User-agent: *\nDisallow: /p\n", "text/plain"
        elif self.path == "/":
            data, kind = self.body, "text/html"
        else:
            data, kind = b"<html>leaf</html>", "text/html"
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@contextlib.contextmanager
def big_page_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BigPage)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_a_page_with_200000_links_stalls_nothing(
    redis_factory: Callable[..., RedisServer], testweb: WebUnderTest,
    fleet_factory: Callable[..., Fleet],
) -> None:
    """5,000 links are followed (the default cap), all 200,000 counted; no Redis command or
    script runs longer than 10 ms (SLOWLOG)."""
    redis = redis_factory(aof=False)
    admin = client(redis)
    admin.config_set("slowlog-log-slower-than", 10_000)  # microseconds
    admin.slowlog_reset()
    with big_page_server() as root:
        fleet = fleet_factory(redis.url, testweb)
        fleet.start(root)
        status = fleet.wait_finished(timeout=120)
    results = by_url(fleet)
    assert results[root]["links"] == 200_000
    assert status["seen"] == 5001 and status["skipped"] == 5000  # robots.txt keeps it quick
    slow = [(e["duration"], e["command"][:80]) for e in admin.slowlog_get(128)]
    assert not slow, slow


def test_malformed_entries_injected_mid_crawl_are_quarantined(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """A corrupted host-queue entry, a corrupted lease entry, an unreadable event and an
    unreadable arq job: each goes to quarantine with its source and reason, the crawl finishes,
    `check` agrees, and nothing else is lost."""
    web = testweb_factory("--hosts", "3", "--pages", "60", "--latency-ms", "60")
    # A short lease, so that the lease entry corrupted under a killed worker is read back soon.
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1",
                          CRAWLFLEET_LEASE_SECONDS="3")
    ns = fleet.env["CRAWLFLEET_NAMESPACE"]
    admin = client(redis_server)
    fleet.start(*web.seeds)
    wait_for(lambda: fleet.status()["queued"] >= 20, timeout=60, what="a backlog")

    def corrupt_queue_entry() -> bool:
        for key in admin.scan_iter(f"{ns}:h:*:q"):
            if admin.llen(key) > 1:
                admin.lset(key, -1, b'{"v":1,"fp":"zz"}')
                return True
        return False

    def corrupt_lease_entry() -> bool:
        # The worker is stopped: what is in its lease now stays there until the lease expires
        # and the scheduler reads it back.
        for key in admin.scan_iter(f"{ns}:h:*:lease"):
            fields = admin.hkeys(key)
            if len(fields) > 1:
                return admin.hset(key, fields[-1], b"\xff not json") == 0
        return False

    wait_for(corrupt_queue_entry, timeout=30, what="a queue entry to corrupt")
    worker = fleet.processes["worker-0"]
    worker.send_signal(signal.SIGSTOP)
    try:
        wait_for(corrupt_lease_entry, timeout=10, what="a lease entry to corrupt")
    finally:
        fleet.stop("worker-0", signal.SIGKILL)
    fleet.spawn("worker-1", "worker", CRAWLFLEET_WORKER_ID="worker-1")
    admin.xadd(f"{ns}:events", {"m": b'{"type":"links","v":1,"batch_id":7}'})
    admin.set(f"arq:job:{ns}:bogus", b'{"t":1,"f":"fetch_batch","a":[{"v":1}],"k":{},"et":1}')
    admin.zadd(f"{ns}:arq:queue", {f"{ns}:bogus": 1})

    status = fleet.wait_finished(timeout=120)  # ends with `check`
    sources = [e[1][b"source"].decode() for e in admin.xrange(f"{ns}:quarantine")]
    assert any(s.endswith(":q") for s in sources), sources
    assert any(s.endswith(":lease") for s in sources), sources
    assert any(s.startswith(f"{ns}:events") for s in sources), sources
    assert f"arq:job:{ns}:bogus" in sources
    assert status["quarantined"] == 2 and status["quarantine_entries"] >= 4
    logged = [json.loads(line) for line in fleet.log("scheduler").splitlines()]
    assert len([r for r in logged if r.get("event") == "quarantined"]) >= 3  # once each
    results = by_url(fleet)
    assert set(results) <= set(web.reachable())
    assert status["pages"] + status["failed"] + status["skipped"] == len(results)


def test_redis_restarted_without_persistence_is_noticed(
    redis_factory: Callable[..., RedisServer], testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """Every process notices that the frontier's state is gone, says so, recreates what it
    needs (the consumer group) and keeps running; the crawl never reports finished."""
    redis = redis_factory(aof=False)
    web = testweb_factory("--hosts", "2", "--pages", "60", "--latency-ms", "40")
    fleet = fleet_factory(redis.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="1")
    fleet.start(*web.seeds)
    wait_for(lambda: fleet.status()["pages"] >= 10, timeout=60, what="progress")
    redis.stop(signal.SIGKILL)
    redis.start()  # empty: no AOF, no RDB
    wait_for(lambda: "state_lost" in fleet.log("scheduler"), timeout=30,
             what="the scheduler to notice")
    fleet.run("seed", *web.seeds)  # a user re-seeds: crawled again, but never "finished"

    def settled() -> dict[str, Any] | None:
        s = fleet.status()
        return s if s["state_lost"] and s["pages"] > 0 and s["queued"] == s["in_flight"] == 0 \
            else None

    status = wait_for(settled, timeout=120, what="the re-seeded crawl to settle")
    assert not status["finished"] and status["finished_at"] is None
    for name, process in fleet.processes.items():
        assert process.poll() is None, f"{name} exited: {fleet.log(name)[-2000:]}"
    shown = fleet.run("status").stdout
    assert "state lost" in shown
