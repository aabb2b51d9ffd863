"""Prometheus metrics (common/metrics.py): names and labels, what a page updates, the Grafana
dashboard's names, and the endpoint (/metrics, /healthz, a port already taken)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from crawlfleet.common import metrics
from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import DEAD, FAILED, PAGE, SKIPPED
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import HostBatch, PageResult
from crawlfleet.common.settings import Settings
from crawlfleet.scheduler.service import Scheduler
from crawlfleet.workers.batch import BatchRun
from crawlfleet.workers.links import LinkFilter
from crawlfleet.workers.pacing import Pacer
from crawlfleet.workers.robots import OK, RobotsPolicy

DASHBOARD = Path(__file__).parent.parent / "k8s" / "grafana" / "crawlfleet-dashboard.json"
WORKER = metrics.build_registry(["worker"])
SCHEDULER = metrics.build_registry(["scheduler"])


def value(registry: Any, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, f"no sample {name}{labels}"
    return float(found)


def result(status: int | None, error: str | None = None) -> PageResult:
    return PageResult(url="http://a.test/", final_url=None, status=status, content_type=None,
                      depth=0, title=None, links=0, bytes=0, elapsed_ms=0.0, fetched_at=0.0,
                      error=error)


def test_every_metric_is_named_and_labelled_as_documented() -> None:
    assert metrics.metric_names() == {
        "crawlfleet_pages", "crawlfleet_urls_finished", "crawlfleet_errors",
        "crawlfleet_downloaded_bytes", "crawlfleet_fetch_duration_seconds",
        "crawlfleet_fetches_in_flight", "crawlfleet_retries", "crawlfleet_dead_letters",
        "crawlfleet_politeness_wait_seconds", "crawlfleet_scheduler_leading",
        "crawlfleet_sink_parts_written", "crawlfleet_sink_results_written",
        *metrics.FrontierGauges.FIELDS,
    }
    # Every child exists (at 0) from the start, so rate() and alerts see the series at once.
    for status_class in ("2xx", "3xx", "4xx", "5xx", "none"):
        value(WORKER, "crawlfleet_pages_total", status_class=status_class)
    for error in metrics.ERROR_CLASSES:
        value(WORKER, "crawlfleet_errors_total", error=error)
    for outcome in metrics.OUTCOMES:
        value(WORKER, "crawlfleet_urls_finished_total", outcome=outcome)
    # Each role exports its own: no worker serves frontier gauges, no scheduler fetch times.
    assert WORKER.get_sample_value("crawlfleet_scheduler_leading") is None
    assert SCHEDULER.get_sample_value("crawlfleet_fetch_duration_seconds_count") is None


def test_the_error_classes_are_the_readmes() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    table = readme.split("`error` is null or a short class:", 1)[1].split("\n\n")[1]
    documented = {name for line in table.splitlines() if line.startswith("| `")
                  for name in re.findall(r"`([a-z_0-9]+)`", line.split("|")[1])}
    assert documented == set(metrics.ERROR_CLASSES) - {"other"}
    assert metrics.error_class("invalid_url") == "other" and metrics.error_class(None) is None


@pytest.mark.parametrize(("outcome", "status", "error", "status_class", "finished"), [
    (PAGE, 200, None, "2xx", "page"),
    (PAGE, 301, None, "3xx", "page"),
    (FAILED, 404, "http_4xx", "4xx", "failed"),
    (FAILED, 200, "binary", "2xx", "failed"),
    (DEAD, 503, "http_5xx", "5xx", "failed"),
    (FAILED, None, "timeout", "none", "failed"),
    (SKIPPED, None, "robots", "none", "skipped"),
    (FAILED, 999, "somethingnew", "none", "failed"),
])
def test_a_result_updates_its_children(outcome: str, status: int | None, error: str | None,
                                       status_class: str, finished: str) -> None:
    def snapshot() -> dict[str, float]:
        got = {
            "class": value(WORKER, "crawlfleet_pages_total", status_class=status_class),
            "pages": sum(value(WORKER, "crawlfleet_pages_total", status_class=c)
                         for c in metrics.STATUS_CLASSES),
            "finished": value(WORKER, "crawlfleet_urls_finished_total", outcome=finished),
            "dead": value(WORKER, "crawlfleet_dead_letters_total"),
            "errors": sum(value(WORKER, "crawlfleet_errors_total", error=e)
                          for e in metrics.ERROR_CLASSES),
        }
        if error is not None:
            got["error"] = value(WORKER, "crawlfleet_errors_total",
                                 error=metrics.error_class(error) or "")
        return got

    before = snapshot()
    metrics.record_result(outcome, result(status, error))
    after = snapshot()
    assert {k: after[k] - before[k] for k in after} == {
        "class": 1, "pages": 1, "finished": 1, "dead": int(outcome == DEAD),
        "errors": int(error is not None), **({"error": 1} if error is not None else {}),
    }
    assert metrics.status_class(status) == status_class


def test_a_fetch_is_timed_and_its_bytes_counted() -> None:
    count = value(WORKER, "crawlfleet_fetch_duration_seconds_count")
    under_1s = value(WORKER, "crawlfleet_fetch_duration_seconds_bucket", le="1.0")
    size = value(WORKER, "crawlfleet_downloaded_bytes_total")
    metrics.record_fetch(420.0, 1234)
    assert value(WORKER, "crawlfleet_fetch_duration_seconds_count") == count + 1
    assert value(WORKER, "crawlfleet_fetch_duration_seconds_bucket", le="1.0") == under_1s + 1
    assert value(WORKER, "crawlfleet_downloaded_bytes_total") == size + 1234


async def test_pacing_waits_are_observed() -> None:
    count = value(WORKER, "crawlfleet_politeness_wait_seconds_count")
    total = value(WORKER, "crawlfleet_politeness_wait_seconds_sum")
    pacer = Pacer(0.05)
    for _ in range(3):
        (await pacer.turn()).sent()
    assert value(WORKER, "crawlfleet_politeness_wait_seconds_count") == count + 3
    # The second and third turns waited their spacing (less a little: sleep's granularity).
    assert value(WORKER, "crawlfleet_politeness_wait_seconds_sum") - total >= 0.09


def test_the_worker_lost_urls_of_the_scheduler_are_counted() -> None:
    before = value(SCHEDULER, "crawlfleet_errors_total", error="worker_lost")
    failed = value(SCHEDULER, "crawlfleet_urls_finished_total", outcome="failed")
    metrics.record_given_up(0)
    metrics.record_given_up(2)
    assert value(SCHEDULER, "crawlfleet_errors_total", error="worker_lost") == before + 2
    assert value(SCHEDULER, "crawlfleet_urls_finished_total", outcome="failed") == failed + 2


def test_frontier_gauges_are_served_while_fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    gauges = metrics.FrontierGauges()
    registry = metrics.CollectorRegistry()
    registry.register(gauges)
    assert registry.get_sample_value("crawlfleet_urls_queued") is None  # nothing read yet
    status = {"seen": 9, "queued": 3, "in_flight": 2, "hosts_leased": 1, "batches_waiting": 4,
              "results_in_redis": 5, "quarantine_entries": 0, "finished": False, "read_at": 7.5}
    gauges.update(status, hosts_queued=6)
    assert {name: registry.get_sample_value(name) for name in gauges.FIELDS} == {
        "crawlfleet_urls_seen": 9, "crawlfleet_urls_queued": 3, "crawlfleet_urls_in_flight": 2,
        "crawlfleet_hosts_leased": 1, "crawlfleet_hosts_waiting": 4,
        "crawlfleet_hosts_queued": 6, "crawlfleet_hosts_with_work": 11,
        "crawlfleet_results_in_redis": 5,
        "crawlfleet_quarantine_entries": 0, "crawlfleet_crawl_finished": 0,
        "crawlfleet_status_read_timestamp_seconds": 7.5,
    }
    # Redis away for a while: no value at all rather than an old one (KEDA falls back).
    later = time.monotonic() + metrics.STALE_AFTER_S + 1
    monkeypatch.setattr(metrics.time, "monotonic", lambda: later)
    assert registry.get_sample_value("crawlfleet_urls_queued") is None


async def test_the_scheduler_reads_the_frontier_gauges() -> None:
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", namespace="t")
    redis = open_redis(settings.redis_url)
    try:
        scheduler = Scheduler(settings, redis)
        await scheduler.open_crawl()
        scheduler.allowed_hosts |= {"a.test", "b.test"}
        admissions, _, _ = await scheduler.admissions(
            [(0, ["http://a.test/", "http://a.test/x", "http://b.test/"])])
        await scheduler.frontier.admit(scheduler.crawl_id, admissions, scheduler.limits)
        await metrics.refresh_frontier(redis, Keys("t"))
    finally:
        await redis.aclose()
    collected = {m.name: m.samples[0].value for m in metrics.FRONTIER.collect()}
    assert (collected["crawlfleet_urls_seen"], collected["crawlfleet_urls_queued"],
            collected["crawlfleet_hosts_queued"], collected["crawlfleet_hosts_with_work"],
            collected["crawlfleet_crawl_finished"]) == (3, 3, 2, 2, 0)
    metrics.FRONTIER.clear()


def dashboard_exprs() -> list[str]:
    exprs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for item in node.values():
                walk(item)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(json.loads(DASHBOARD.read_text()))
    return exprs


def test_the_dashboard_uses_only_metrics_that_exist() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert any(v["type"] == "datasource" and v["query"] == "prometheus"
               for v in dashboard["templating"]["list"])
    exprs = dashboard_exprs()
    used = {re.sub(r"_(bucket|sum|count|total)$", "", name)
            for expr in exprs for name in re.findall(r"crawlfleet_[a-z_]+", expr)}
    assert used and used <= metrics.metric_names(), used - metrics.metric_names()
    # The panels the operators asked for are there.
    for name in ("crawlfleet_pages", "crawlfleet_errors", "crawlfleet_fetch_duration_seconds",
                 "crawlfleet_fetches_in_flight", "crawlfleet_urls_queued",
                 "crawlfleet_hosts_leased", "crawlfleet_hosts_waiting",
                 "crawlfleet_results_in_redis", "crawlfleet_politeness_wait_seconds",
                 "crawlfleet_dead_letters", "crawlfleet_retries"):
        assert name in used, name
    assert sum("histogram_quantile(0.95" in e for e in exprs) >= 2
    # Histograms are read through their buckets, counters through rate().
    for expr in exprs:
        for name in re.findall(r"crawlfleet_[a-z_]+_total", expr):
            assert f"rate({name}" in expr, expr


# -- the endpoint ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)) as r:
        return r.status, r.headers.get("Content-Type", ""), await r.text()


async def test_metrics_and_healthz_are_served() -> None:
    port = free_port()
    healthy = True
    async with metrics.serve_metrics(port, role="worker", healthy=lambda: healthy) as serving:
        assert serving
        status, content_type, text = await get(port, "/metrics")
        assert status == 200 and content_type.startswith("text/plain")
        families = {f.name for f in text_string_to_metric_families(text)}
        assert {"crawlfleet_pages", "crawlfleet_fetch_duration_seconds",
                "process_cpu_seconds"} <= families
        assert "crawlfleet_urls_queued" not in families  # the scheduler's, not a worker's
        assert (await get(port, "/healthz"))[::2] == (200, "ok\n")
        healthy = False
        assert (await get(port, "/healthz"))[0] == 503
    with pytest.raises(aiohttp.ClientConnectionError):  # closed with the block
        await get(port, "/healthz")


async def test_roles_in_one_process_share_the_port() -> None:
    """`crawlfleet crawl` runs every role in one process, its workers starting at once."""
    port = free_port()
    sink_ok = True
    async with metrics.serve_metrics(port, role="sink", healthy=lambda: sink_ok):
        async with contextlib.AsyncExitStack() as workers:
            served = await asyncio.gather(*[workers.enter_async_context(
                metrics.serve_metrics(port, role="worker")) for _ in range(3)])
            assert served == [True] * 3
            text = (await get(port, "/metrics"))[2]
            assert "crawlfleet_sink_parts_written_total" in text
            assert "crawlfleet_fetches_in_flight" in text
            assert (await get(port, "/healthz"))[0] == 200
            sink_ok = False
            assert (await get(port, "/healthz"))[0] == 503  # one role unhealthy: the process
        assert (await get(port, "/healthz"))[0] == 503  # the sink still serves, unhealthy
    with pytest.raises(aiohttp.ClientConnectionError):
        await get(port, "/metrics")


class Recorder:
    def __init__(self) -> None:
        self.lines: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **fields: Any) -> None:
        self.lines.append((event, fields))

    info = warning


async def test_a_taken_port_is_one_warning_and_no_metrics(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    recorder = Recorder()
    monkeypatch.setattr(metrics, "log", recorder)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with metrics.serve_metrics(port, role="scheduler") as serving:
            assert serving is False
            async with metrics.serve_metrics(port, role="worker") as again:
                assert again is False
    warnings = [fields for event, fields in recorder.lines if event == "metrics_port_unavailable"]
    assert len(warnings) == 1 and warnings[0]["port"] == port  # once a process, named
    assert not metrics._ENDPOINTS


async def test_port_zero_serves_nothing() -> None:
    async with metrics.serve_metrics(0, role="worker") as serving:
        assert serving is False
    assert not metrics._ENDPOINTS


# -- a real turn ----------------------------------------------------------------------------
class Robots:
    """robots.txt for the local site: /private/ is disallowed."""

    def __init__(self, origin: str) -> None:
        self.policy_ = RobotsPolicy(origin, OK, body="User-agent: *\nDisallow: /private/\n",
                                    expires_at=time.time() + 3600)

    async def policy(self, url: str, **_: Any) -> RobotsPolicy:
        return self.policy_


@pytest.fixture
async def site() -> AsyncIterator[str]:
    async def page(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name == "missing":
            return web.Response(status=404, text="no")
        if name == "broken":
            return web.Response(status=503, text="later")
        return web.Response(text="<html><title>t</title>" + "x" * 100 + "</html>",
                            content_type="text/html")

    app = web.Application()
    app.router.add_get("/{name:.*}", page)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server = web.TCPSite(runner, "127.0.0.1", 0)
    await server.start()
    port = runner.addresses[0][1]
    yield f"127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_turn_updates_the_worker_metrics(site: str) -> None:
    """One host's turn against a local site: a page, a 404, a 503 out of retries (dead) and a
    robots.txt refusal, each counted once where the issue says."""
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", namespace="t",
                        allow_private=True, crawl_delay=0, max_retries=0)
    urls = [f"http://{site}/{path}" for path in ("ok", "missing", "broken", "private/x")]
    redis = open_redis(settings.redis_url)
    keys = Keys("t")
    scheduler = Scheduler(settings, redis)
    await scheduler.open_crawl()
    host, port = site.split(":")
    scheduler.allowed_hosts.add(host)
    scheduler.seed_ports.add(int(port))
    admissions, _, _ = await scheduler.admissions([(0, urls)])
    assert len(admissions) == len(urls)
    await scheduler.frontier.admit(scheduler.crawl_id, admissions, scheduler.limits)
    await scheduler.frontier.dispatch(scheduler.crawl_id, batch_size=10, max_waiting=10)
    batch_id = (await redis.hget(keys.lease_batch, host)).decode()
    batch = HostBatch(batch_id=batch_id, host=host, crawl=scheduler.crawl_id)
    claim = await scheduler.frontier.claim(batch, lease_seconds=60, job_id=batch_id)
    assert claim is not None
    names = [*[("crawlfleet_pages_total", {"status_class": c}) for c in ("2xx", "4xx", "5xx",
                                                                        "none")],
             *[("crawlfleet_errors_total", {"error": e}) for e in ("http_4xx", "http_5xx",
                                                                 "robots")],
             *[("crawlfleet_urls_finished_total", {"outcome": o}) for o in metrics.OUTCOMES],
             *[(name, {}) for name in ("crawlfleet_dead_letters_total",
                                       "crawlfleet_retries_total",
                                       "crawlfleet_fetch_duration_seconds_count",
                                       "crawlfleet_fetches_in_flight")]]
    before = [value(WORKER, n, **labels) for n, labels in names]
    try:
        async with aiohttp.ClientSession() as session:
            ctx = {"settings": settings, "session": session, "semaphore": asyncio.Semaphore(4),
                   "frontier": scheduler.frontier, "robots": Robots(f"http://{site}"),
                   "redis": redis, "keys": keys, "job_id": batch_id,
                   "links": LinkFilter(settings), "turns": set()}
            await BatchRun(ctx, batch, claim).run()
    finally:
        await redis.aclose()
    deltas = {(n, tuple(labels.values())): value(WORKER, n, **labels) - b
              for (n, labels), b in zip(names, before, strict=True)}
    assert deltas == {
        ("crawlfleet_pages_total", ("2xx",)): 1, ("crawlfleet_pages_total", ("4xx",)): 1,
        ("crawlfleet_pages_total", ("5xx",)): 1, ("crawlfleet_pages_total", ("none",)): 1,
        ("crawlfleet_errors_total", ("http_4xx",)): 1,
        ("crawlfleet_errors_total", ("http_5xx",)): 1,
        ("crawlfleet_errors_total", ("robots",)): 1,
        ("crawlfleet_urls_finished_total", ("page",)): 1,
        ("crawlfleet_urls_finished_total", ("failed",)): 2,
        ("crawlfleet_urls_finished_total", ("skipped",)): 1,
        ("crawlfleet_dead_letters_total", ()): 1,
        ("crawlfleet_retries_total", ()): 0,  # max_retries 0: straight to the dead letters
        ("crawlfleet_fetch_duration_seconds_count", ()): 3,  # robots' refusal is no fetch
        ("crawlfleet_fetches_in_flight", ()): 0,
    }


def test_per_page_overhead_is_small() -> None:
    """What the metrics cost a page: a result, a fetch, a pacing wait and the in-flight
    gauge's two steps. Printed (pytest -s) for the record; bounded loosely here."""
    page = result(200)
    n = 20_000
    started = time.perf_counter()
    for _ in range(n):
        with metrics.FETCH_IN_FLIGHT:
            pass
        metrics.record_fetch(12.5, 4096)
        metrics.POLITENESS_WAIT.observe(0.01)
        metrics.record_result(PAGE, page)
    per_page_us = (time.perf_counter() - started) / n * 1e6
    print(f"metrics per page: {per_page_us:.2f} µs")
    assert per_page_us < 100
