"""Prometheus metrics of every role, and the endpoint that serves them (``/metrics``,
``/healthz``) when ``CRAWLFLEET_METRICS_PORT`` is set.

Each role exports its own metrics only: a worker its fetches, the scheduler the frontier-wide
gauges, a sink its parts. Roles run in one process (``crawlfleet crawl`` runs all three)
share one endpoint, which serves the union.

Labels stay bounded (a per-host label would grow a series per site crawled): status classes,
the error classes of the README's table (anything else is ``other``) and outcomes. Per-page
updates go to children bound once at import: a page costs a few dict lookups and increments.

The frontier-wide gauges come from ``read_status``, read by every scheduler every
``STATUS_EVERY_S``, the standbys too: they all export the same numbers (aggregate with
``max``), so a query still has a value the moment a leader dies. A snapshot older than
``STALE_AFTER_S`` (Redis unreachable) is not served at all: a consumer such as KEDA gets no
value, never an old one.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .frontier import DEAD, FAILED, PAGE, SKIPPED
from .keys import Keys
from .logs import get_logger
from .messages import PageResult
from .stats import read_status

log = get_logger("crawlfleet.metrics")
# No `_created` series beside each counter and histogram: twice the series, and rate() does
# not need them.
disable_created_metrics()  # type: ignore[no-untyped-call]

STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx", "none")
# The README's error classes; anything else a result carries is counted as "other".
ERROR_CLASSES = (
    "timeout", "dns", "dns_temporary", "connect", "tls", "protocol", "http_4xx", "http_5xx",
    "http_429", "robots", "robots_unavailable", "too_large", "too_many_redirects",
    "bad_redirect", "binary", "blocked_address", "worker_lost", "crawler_error", "other",
)
OUTCOMES = ("page", "failed", "skipped")  # as `status` counts them (dead is failed)
STATUS_EVERY_S = 2.0
STALE_AFTER_S = 30.0

# Web fetches: a fast local page to the 30 s CRAWLFLEET_FETCH_TIMEOUT and past it.
FETCH_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0)
# A host's pacing: none, a share of CRAWLFLEET_CRAWL_DELAY, up to a 30 s Crawl-delay.
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)

# -- the worker's (registry=None: each endpoint registers the metrics of its roles) ---------
PAGES = Counter("crawlfleet_pages", "URLs finished (a result stored), by the HTTP status "
                "class of the result; none: no response (network error, robots.txt refusal)",
                ["status_class"], registry=None)
URLS_FINISHED = Counter("crawlfleet_urls_finished", "URLs finished, by outcome as `crawlfleet "
                        "status` counts them (page, failed, skipped)", ["outcome"],
                        registry=None)
ERRORS = Counter("crawlfleet_errors", "Results with an error, by error class", ["error"],
                 registry=None)
DOWNLOADED_BYTES = Counter("crawlfleet_downloaded_bytes", "Body bytes read by page fetches "
                           "(after decompression), retried attempts included", registry=None)
FETCH_SECONDS = Histogram("crawlfleet_fetch_duration_seconds", "A page fetch's own time, "
                          "redirects included, pacing waits left out", buckets=FETCH_BUCKETS,
                          registry=None)
FETCHES_IN_FLIGHT = Gauge("crawlfleet_fetches_in_flight", "Page fetches this worker has "
                          "under way (in CRAWLFLEET_MAX_IN_FLIGHT's slots, pacing waits "
                          "included)", registry=None)
# One tracker for every fetch (it only steps the gauge): no object made per page.
FETCH_IN_FLIGHT = FETCHES_IN_FLIGHT.track_inprogress()
RETRIES = Counter("crawlfleet_retries", "Fetches that failed transiently and were queued "
                  "again", registry=None)
DEAD_LETTERS = Counter("crawlfleet_dead_letters", "URLs out of retries (to the dead letters)",
                       registry=None)
POLITENESS_WAIT = Histogram("crawlfleet_politeness_wait_seconds", "Seconds a request waited "
                            "for its host's pacing (no host label: one series per site would "
                            "not end)", buckets=WAIT_BUCKETS, registry=None)
# -- the scheduler's ----------------------------------------------------------------------
LEADING = Gauge("crawlfleet_scheduler_leading",
                "Shards whose lock this scheduler holds (1 or 0 with one Redis)",
                registry=None)
# -- the sink's ---------------------------------------------------------------------------
SINK_PARTS = Counter("crawlfleet_sink_parts_written", "Parts written to the output",
                     registry=None)
SINK_RESULTS = Counter("crawlfleet_sink_results_written", "Results written to the output",
                       registry=None)

# Children bound once: no label lookup on the per-page path.
_PAGES = {int(c[0]): PAGES.labels(c) for c in STATUS_CLASSES[:-1]}
_PAGES_NONE = PAGES.labels("none")
_ERRORS = {name: ERRORS.labels(name) for name in ERROR_CLASSES}
_ERROR_OTHER = _ERRORS["other"]
_FINISHED = {PAGE: URLS_FINISHED.labels("page"), FAILED: URLS_FINISHED.labels("failed"),
             DEAD: URLS_FINISHED.labels("failed"), SKIPPED: URLS_FINISHED.labels("skipped")}


def status_class(status: int | None) -> str:
    """``2xx`` ... ``5xx``; ``none`` for no response (or a status outside 200-599)."""
    if status is None or not 200 <= status <= 599:
        return "none"
    return STATUS_CLASSES[status // 100 - 2]


def error_class(error: str | None) -> str | None:
    """The ``error`` label for a result's error: its class, or ``other`` if unknown."""
    if error is None:
        return None
    return error if error in _ERRORS else "other"


def record_result(outcome: str, result: PageResult) -> None:
    """A URL a worker finished (``outcome``: frontier.PAGE, FAILED, DEAD or SKIPPED)."""
    status = result.status
    (_PAGES.get(status // 100, _PAGES_NONE) if status else _PAGES_NONE).inc()
    _FINISHED[outcome].inc()
    if outcome == DEAD:
        DEAD_LETTERS.inc()
    if result.error is not None:
        _ERRORS.get(result.error, _ERROR_OTHER).inc()


def record_fetch(elapsed_ms: float, size: int) -> None:
    """One page fetch attempt: its own time and the body bytes it read."""
    FETCH_SECONDS.observe(elapsed_ms / 1000)
    DOWNLOADED_BYTES.inc(size)


def record_given_up(urls: int) -> None:
    """URLs the scheduler failed as ``worker_lost`` (expire.lua): finished, by nobody's fetch."""
    _PAGES_NONE.inc(urls)
    _FINISHED[FAILED].inc(urls)
    _ERRORS["worker_lost"].inc(urls)


class FrontierGauges:
    """The frontier-wide numbers of the last status snapshot, served while it is fresh."""

    # metric name -> (status key, help)
    FIELDS = {
        "crawlfleet_urls_seen": ("seen", "URLs admitted to the crawl"),
        "crawlfleet_urls_queued": ("queued", "URLs waiting in host queues"),
        "crawlfleet_urls_in_flight": ("in_flight", "URLs in leases (being fetched), fleet-wide"),
        "crawlfleet_hosts_leased": ("hosts_leased", "Hosts whose turn a worker holds"),
        "crawlfleet_hosts_waiting": ("batches_waiting", "Hosts whose turn (a batch) is "
                                     "dispatched and waits for a worker"),
        "crawlfleet_hosts_queued": ("hosts_queued", "Hosts with URLs queued and no turn out "
                                    "(due now, or after a backoff)"),
        # What the workers autoscale on (KEDA): the hosts a worker holds, or will.
        "crawlfleet_hosts_with_work": ("hosts_with_work", "Hosts leased + waiting + queued"),
        "crawlfleet_results_in_redis": ("results_in_redis", "Results not yet drained by a sink"),
        "crawlfleet_quarantine_entries": ("quarantine_entries", "Entries set aside as malformed"),
        "crawlfleet_crawl_finished": ("finished", "1 once the crawl is finished"),
        "crawlfleet_status_read_timestamp_seconds": ("read_at", "When the numbers above were "
                                                     "read (Redis's clock, unix seconds)"),
    }

    def __init__(self) -> None:
        self._values: dict[str, float] = {}
        self._read_at = 0.0  # time.monotonic() of the snapshot

    def update(self, status: Mapping[str, Any], hosts_queued: int) -> None:
        values = {**status, "hosts_queued": hosts_queued, "hosts_with_work": (
            status["hosts_leased"] + status["batches_waiting"] + hosts_queued)}
        self._values = {name: float(values[key]) for name, (key, _) in self.FIELDS.items()}
        self._read_at = time.monotonic()

    def clear(self) -> None:
        self._values = {}

    def describe(self) -> Iterable[Metric]:
        return [GaugeMetricFamily(name, text) for name, (_, text) in self.FIELDS.items()]

    def collect(self) -> Iterable[Metric]:
        if not self._values or time.monotonic() - self._read_at > STALE_AFTER_S:
            return []
        return [GaugeMetricFamily(name, text, value=self._values[name])
                for name, (_, text) in self.FIELDS.items()]


FRONTIER = FrontierGauges()


async def refresh_frontier(redis: Any, keys: Keys) -> None:
    """Read the status (one transaction, the hosts queued in it) into ``FRONTIER``."""
    status = await read_status(redis, keys)
    FRONTIER.update(status, status["hosts_ready"])


ROLES: dict[str, tuple[Collector, ...]] = {
    "worker": (PAGES, URLS_FINISHED, ERRORS, DOWNLOADED_BYTES, FETCH_SECONDS, FETCHES_IN_FLIGHT,
               RETRIES, DEAD_LETTERS, POLITENESS_WAIT),
    # The scheduler finishes URLs too: those given up as worker_lost.
    "scheduler": (FRONTIER, LEADING, PAGES, URLS_FINISHED, ERRORS),
    "sink": (SINK_PARTS, SINK_RESULTS),
}


def build_registry(roles: Iterable[str]) -> CollectorRegistry:
    """A registry of the roles' metrics (tests, and each endpoint's own)."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in _collectors(roles):
        registry.register(collector)
    return registry


def _collectors(roles: Iterable[str]) -> Iterator[Collector]:
    seen: set[int] = set()
    for role in roles:
        for collector in ROLES[role]:
            if id(collector) not in seen:
                seen.add(id(collector))
                yield collector


def metric_names() -> set[str]:
    """Every crawlfleet metric family's name (counters without ``_total``)."""
    return {family.name for collector in _collectors(ROLES)
            for family in collector.describe()}  # type: ignore[attr-defined]


class _Endpoint:
    """``/metrics`` and ``/healthz`` on 0.0.0.0:port, served by the process's own event loop:
    a loop that is blocked answers neither, which is what a probe should see."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.registry = CollectorRegistry(auto_describe=True)
        for standard in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(standard)
        self._registered: set[int] = set()
        self.checks: list[Callable[[], bool] | None] = []
        self._runner: web.AppRunner | None = None
        self._starting: asyncio.Future[None] | None = None

    def join(self, role: str, healthy: Callable[[], bool] | None) -> None:
        for collector in ROLES[role]:
            if id(collector) not in self._registered:
                self._registered.add(id(collector))
                self.registry.register(collector)
        self.checks.append(healthy)

    async def start(self) -> bool:
        """Bind the port, once for every role sharing it; False if it is taken."""
        if self._starting is None:
            self._starting = asyncio.ensure_future(self._bind())
        try:
            await asyncio.shield(self._starting)
        except OSError:
            return False
        return True

    async def _bind(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, "0.0.0.0", self.port).start()
        except OSError as exc:
            await runner.cleanup()
            log.warning("metrics_port_unavailable", port=self.port, error=str(exc),
                        detail="going on without /metrics and /healthz")
            raise
        self._runner = runner
        log.info("metrics_serving", port=self.port)

    async def stop(self) -> None:
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await self._starting
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    def healthy(self) -> bool:
        try:
            return all(check() for check in self.checks if check is not None)
        except Exception:
            return False

    async def _metrics(self, request: web.Request) -> web.Response:
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encode(self.registry), headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        if self.healthy():
            return web.Response(text="ok\n")
        return web.Response(text="unhealthy\n", status=503)


_ENDPOINTS: dict[int, _Endpoint] = {}


@contextlib.asynccontextmanager
async def serve_metrics(port: int, *, role: str,
                        healthy: Callable[[], bool] | None = None) -> AsyncIterator[bool]:
    """Serve ``role``'s metrics on ``port`` (0: off) while the block runs; yields whether they
    are served. /healthz answers 200 while ``healthy()`` of every role on the port is true,
    503 otherwise. A port already taken by another process is one warning
    (``metrics_port_unavailable``), and the role goes on without metrics."""
    if port <= 0:
        yield False
        return
    endpoint = _ENDPOINTS.get(port)
    if endpoint is None:  # a port found taken stays so (one warning) until its roles end
        endpoint = _ENDPOINTS[port] = _Endpoint(port)
    endpoint.join(role, healthy)
    try:
        yield await endpoint.start()
    finally:
        endpoint.checks.remove(healthy)
        if not endpoint.checks:
            if _ENDPOINTS.get(port) is endpoint:
                del _ENDPOINTS[port]
            await endpoint.stop()
