"""/metrics of a real fleet: redis-server, the test web, a scheduler, a worker and a sink, each
serving on its own port. At the end of the crawl the metrics agree with `status`, the export
and the output."""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from urllib.error import HTTPError, URLError
from urllib.request import urlopen

import pytest
from prometheus_client.parser import text_string_to_metric_families

from crawlfleet.common.metrics import error_class, status_class

from ..conftest import Fleet, RedisServer, WebUnderTest, free_port, wait_for

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def get(port: int, path: str) -> tuple[int, str] | None:
    """The status and body of GET ``path`` over loopback; None while nothing listens."""
    try:
        with urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except HTTPError as exc:
        return exc.code, exc.read().decode()
    except (URLError, OSError):
        return None


def scrape(port: int) -> Samples | None:
    answer = get(port, "/metrics")
    if answer is None:
        return None
    assert answer[0] == 200, answer
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(answer[1]) for s in family.samples}


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(ls)[label]: v for (n, ls), v in samples.items() if n == name and v}


def test_the_fleets_metrics_match_the_crawl(
    redis_server: RedisServer, testweb_factory: Callable[..., WebUnderTest],
    fleet_factory: Callable[..., Fleet], tmp_path: Path,
) -> None:
    # Redirects, flaky 503s and 429s (retried), 404s and robots.txt refusals.
    web = testweb_factory("--hosts", "3", "--pages", "15", "--extras")
    out = tmp_path / "out"
    fleet = fleet_factory(
        redis_server.url, web, CRAWLFLEET_OUTPUT=str(out), CRAWLFLEET_OUTPUT_PART_SECONDS="0.5",
        CRAWLFLEET_MAX_RETRIES="1", CRAWLFLEET_RETRY_BASE="0.1", CRAWLFLEET_RETRY_MAX="0.5",
        CRAWLFLEET_DENY_PATTERN="/calendar/|/session",
    )
    # Every process binds 0.0.0.0:port: one free port each.
    ports = {name: free_port() for name in ("scheduler", "worker", "sink")}
    fleet.spawn("scheduler", "scheduler", CRAWLFLEET_METRICS_PORT=str(ports["scheduler"]))
    fleet.spawn("worker", "worker", CRAWLFLEET_WORKER_ID="worker",
                CRAWLFLEET_METRICS_PORT=str(ports["worker"]))
    fleet.spawn("sink", "sink", CRAWLFLEET_METRICS_PORT=str(ports["sink"]))
    for name, port in ports.items():
        healthz = wait_for(lambda port=port: get(port, "/healthz"), timeout=30,
                           what=f"{name}'s /healthz")
        assert healthz == (200, "ok\n"), (name, healthz)
    fleet.run("seed", *web.seeds)
    status = fleet.wait_finished(timeout=120)

    # The sink drains the log; the scheduler's gauges catch up within a few seconds.
    def drained() -> Samples | None:
        samples = scrape(ports["scheduler"])
        if samples is None or total(samples, "crawlfleet_crawl_finished") != 1:
            return None
        return samples if total(samples, "crawlfleet_results_in_redis") == 0 else None

    frontier = wait_for(drained, timeout=60, what="the sink to drain the results", every=0.2)
    status = fleet.status()
    results = fleet.export()
    assert len(results) == status["pages"] + status["failed"] + status["skipped"]
    assert status["retries"] > 0 and status["dead"] > 0  # the test web's flaky pages
    assert "metrics_port_unavailable" not in "".join(fleet.log(n) for n in ports)

    # Scheduler: the frontier-wide gauges, as `status` reads them.
    assert total(frontier, "crawlfleet_urls_queued") == 0
    assert total(frontier, "crawlfleet_urls_in_flight") == 0
    assert total(frontier, "crawlfleet_hosts_leased") == 0
    assert total(frontier, "crawlfleet_hosts_waiting") == total(frontier,
                                                                 "crawlfleet_hosts_queued") == 0
    assert total(frontier, "crawlfleet_hosts_with_work") == 0  # KEDA scales to zero on it
    assert total(frontier, "crawlfleet_urls_seen") == status["seen"]
    assert total(frontier, "crawlfleet_scheduler_leading") == 1
    assert total(frontier, "crawlfleet_fetch_duration_seconds_count") == 0  # not its role

    # Worker: what it finished is the crawl's (nothing was lost, so nothing came from expiry).
    worker = scrape(ports["worker"])
    assert worker is not None
    finished = by_label(worker, "crawlfleet_urls_finished_total", "outcome")
    assert finished == {k: status[v] for k, v in (("page", "pages"), ("failed", "failed"),
                                                   ("skipped", "skipped")) if status[v]}
    assert total(worker, "crawlfleet_pages_total") == len(results)
    assert by_label(worker, "crawlfleet_pages_total", "status_class") == dict(
        Counter(status_class(r["status"]) for r in results))
    assert by_label(worker, "crawlfleet_errors_total", "error") == dict(
        Counter(error_class(r["error"]) for r in results if r["error"]))
    assert total(worker, "crawlfleet_retries_total") == status["retries"]
    assert total(worker, "crawlfleet_dead_letters_total") == status["dead"]
    # Every fetch attempt is timed: a `page` line each, and a `retry_scheduled` each retried
    # (redirect targets fetched on the way have results, but no fetch of their own).
    events = [json.loads(line) for line in fleet.log("worker").splitlines()
              if line.startswith("{")]
    pages = [e for e in events if e.get("event") == "page"]
    retried = [e for e in events if e.get("event") == "retry_scheduled"]
    assert len(retried) == status["retries"]
    assert total(worker, "crawlfleet_fetch_duration_seconds_count") == len(pages) + len(retried)
    assert total(worker, "crawlfleet_downloaded_bytes_total") >= sum(e["bytes"] for e in pages)
    assert total(worker, "crawlfleet_fetches_in_flight") == 0
    assert total(worker, "crawlfleet_politeness_wait_seconds_count") >= len(pages)
    assert total(worker, "crawlfleet_urls_queued") == 0 and not any(
        n == "crawlfleet_urls_queued" for n, _ in worker)  # the scheduler's, not a worker's

    # Sink: every result written once, in the parts on disk.
    sink = scrape(ports["sink"])
    assert sink is not None
    lines = sum(len(p.read_bytes().splitlines()) for p in out.rglob("part-*.jsonl"))
    assert total(sink, "crawlfleet_sink_results_written_total") == lines == len(results)
    assert total(sink, "crawlfleet_sink_parts_written_total") == len(list(
        out.rglob("part-*.jsonl")))

    for name in ("worker", "sink", "scheduler"):
        assert fleet.stop(name, signal.SIGTERM) == 0, fleet.log(name)[-2000:]
    assert get(ports["worker"], "/healthz") is None  # the endpoint went with the process
