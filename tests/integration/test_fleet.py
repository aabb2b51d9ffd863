"""The core promise end to end: real redis-server, test web, scheduler and two worker processes."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable

import pytest

from ..conftest import Fleet, RedisServer, WebUnderTest

pytestmark = pytest.mark.integration

RESULT_FIELDS = {"url", "final_url", "status", "content_type", "depth", "title", "links", "bytes",
                 "elapsed_ms", "fetched_at", "error"}
LOG_FIELDS = {"worker_id", "job_id", "host", "url", "status", "elapsed_ms"}
STATUS_KEYS = {"seen", "pages", "failed", "skipped", "queued", "in_flight", "finished"}


def test_fleet_fetches_the_reachable_set_each_url_once(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(redis_server.url, testweb)
    fleet.spawn("scheduler", "scheduler")
    fleet.spawn("worker-a", "worker", CRAWLFLEET_WORKER_ID="worker-a")
    fleet.spawn("worker-b", "worker", CRAWLFLEET_WORKER_ID="worker-b")
    seeded = fleet.run("seed", "--file", "-", stdin="\n".join(testweb.seeds) + "\n")
    assert f"enqueued {len(testweb.seeds)} seed(s), refused 0" in seeded.stderr

    status = fleet.wait_finished()
    assert status.keys() >= STATUS_KEYS

    results = fleet.export()
    urls = [r["url"] for r in results]
    assert sorted(urls) == testweb.reachable()
    assert not [u for u, n in Counter(urls).items() if n > 1]
    for result in results:
        assert result.keys() >= RESULT_FIELDS
    by_status = Counter(r["status"] for r in results)
    assert by_status[200] > 0 and by_status[404] > 0  # the test web links to missing pages
    assert status["pages"] + status["failed"] + status["skipped"] == len(results)
    # robots.txt disallows /private/: those URLs are recorded as skipped, never fetched.
    private = [r for r in results if "/private/" in r["url"]]
    assert private and all(r["error"] == "robots" and r["status"] is None for r in private)
    assert status["skipped"] == len(private)
    assert status["queued"] == status["in_flight"] == 0

    # SIGTERM: every process stops cleanly.
    for name in ("worker-a", "worker-b", "scheduler"):
        assert fleet.stop(name, signal.SIGTERM) == 0, fleet.log(name)[-2000:]

    # Workers log one JSON object per line, with who did what, where and how fast.
    pages_logged = 0
    for name in ("worker-a", "worker-b"):
        for line in fleet.log(name).splitlines():
            record = json.loads(line)
            if record.get("event") == "page":
                assert record.keys() >= LOG_FIELDS
                assert record["worker_id"] == name
                pages_logged += 1
    assert pages_logged == len(results) - len(private)


def test_one_big_host_is_crawled_whole_in_continuous_turns(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet],
) -> None:
    """One host, 100 links a page, 16 fetches in flight: hundreds of links pile up between two
    progress calls and go first through admit.lua; none may be lost (the link cache would
    never send them again). The host is refilled by its worker, not dispatched page by page."""
    web = testweb_factory("--hosts", "1", "--pages", "400", "--links", "100")
    fleet = fleet_factory(redis_server.url, web, CRAWLFLEET_PER_HOST_CONCURRENCY="16",
                          CRAWLFLEET_CRAWL_DELAY="0")
    fleet.start(*web.seeds, workers=2)
    status = fleet.wait_finished(timeout=180)
    urls = [r["url"] for r in fleet.export()]
    assert sorted(urls) == web.reachable()
    assert not [u for u, n in Counter(urls).items() if n > 1]
    # Continuous work: far fewer turns than batches of CRAWLFLEET_BATCH_SIZE would have been.
    turns = sum(line.count('"batch_done"') for n in fleet.processes if n.startswith("worker")
                for line in fleet.log(n).splitlines())
    assert 1 <= turns < status["pages"] / 20 / 2, (turns, status["pages"])


def test_seed_reports_bad_lines_and_enqueues_the_rest(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(redis_server.url, testweb)
    good = testweb.seeds[0]
    lines = [good, "ftp://site0.test/file", "", "# a comment", "http://", "not a url", good]
    result = fleet.run("seed", "--file", "-", stdin="\n".join(lines), check=False)
    assert result.returncode == 1
    assert "line 2:" in result.stderr and "http and https" in result.stderr
    assert "line 5:" in result.stderr and "line 6:" in result.stderr
    assert "enqueued 2 seed(s), refused 3" in result.stderr
    # The two copies of the good seed dedup to one page, through the normal frontier path.
    fleet.spawn("scheduler", "scheduler")
    fleet.spawn("worker", "worker", CRAWLFLEET_MAX_DEPTH="0")
    status = fleet.wait_finished()
    assert status["seen"] == 1 and status["pages"] == 1


def test_crawl_command_on_the_embedded_backend(
    testweb: WebUnderTest, fleet_factory: Callable[..., Fleet], tmp_path: pytest.TempPathFactory
) -> None:
    fleet = fleet_factory("unused", testweb)
    del fleet.env["CRAWLFLEET_REDIS_URL"]  # no Redis at all: the embedded backend
    out = fleet.logdir / "crawl.jsonl"
    result = fleet.run("crawl", *testweb.seeds, "--workers", "2", "--out", str(out))
    assert "crawl finished" in result.stderr and "embedded backend" in result.stderr
    urls = [json.loads(line)["url"] for line in out.read_text().splitlines()]
    assert sorted(urls) == testweb.reachable()


def test_crawl_on_a_real_redis_remembers_until_fresh(
    redis_server: RedisServer, testweb: WebUnderTest, fleet_factory: Callable[..., Fleet]
) -> None:
    fleet = fleet_factory(redis_server.url, testweb)
    out = fleet.logdir / "crawl.jsonl"

    def crawl(*extra: str) -> int:
        fleet.run("crawl", *testweb.seeds, "--out", str(out), *extra)
        assert sorted(json.loads(line)["url"] for line in out.read_text().splitlines()) == (
            testweb.reachable())
        return int(testweb.stats()["total_requests"])

    first = crawl()
    assert crawl() == first  # the namespace remembers: nothing is fetched again
    assert crawl("--fresh") > first  # its keys are gone: the crawl starts over
