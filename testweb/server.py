"""The HTTP side of the test web: ``render()`` for every virtual host, over ``wire.py``.

It also watches how it is being crawled. Per host it records the request count, the peak
number of requests in progress at once, the shortest gap between two consecutive request
starts, and the start times themselves (``request_starts``, monotonic seconds, kept while the
host has had at most MAX_REQUEST_STARTS requests, then ``null``), which is what politeness
tests assert on (``GET /__testweb__/stats``).

It also counts the requests for every host and path (query string ignored). That count is what
the stateful ``extras`` endpoints (``/flaky/N``, ``/ratelimited/N``) answer by, and with
``spec.extras`` on the stats carry it as ``"paths": {host: {path: hits}}``.
``POST /__testweb__/reset`` clears everything, those counters included.

Pages are rendered once and kept (up to MEMO_BYTES of bodies): a documentation page with 100
links costs ``render`` about half a millisecond, and the test web shares the machine's cores with
the crawlers it serves, so rendering each request again would slow the crawls it measures. Only
answers that ``fixed_response`` says depend on nothing but the host and path are kept.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import NamedTuple, NotRequired, TypedDict

from .loopback import require_loopback
from .site import WebSpec, fixed_response, page_path, render
from .wire import Connection, Reply, Request

STATS_PATH = "/__testweb__/stats"
RESET_PATH = "/__testweb__/reset"
MAX_REQUEST_STARTS = 10_000  # per host; beyond that request_starts is dropped (null)
MEMO_BYTES = 64 * 1024 * 1024  # rendered bodies kept; past this, new pages are rendered each time


class HostStatsJSON(TypedDict):
    requests: int
    distinct_paths: int
    in_flight: int
    peak_concurrency: int
    min_gap_s: float | None
    request_starts: list[float] | None  # None once the host has had > MAX_REQUEST_STARTS


class StatsJSON(TypedDict):
    total_requests: int
    hosts: dict[str, HostStatsJSON]
    paths: NotRequired[dict[str, dict[str, int]]]  # host -> path -> hits; only with extras


@dataclass
class HostStats:
    requests: int = 0
    in_flight: int = 0
    peak_concurrency: int = 0
    min_gap_s: float | None = None  # None until a second request arrives
    last_start: float | None = None
    paths: dict[str, int] = field(default_factory=dict)  # path -> requests (hits)
    request_starts: list[float] | None = field(default_factory=list)

    def as_json(self) -> HostStatsJSON:
        return {
            "requests": self.requests,
            "distinct_paths": len(self.paths),
            "in_flight": self.in_flight,
            "peak_concurrency": self.peak_concurrency,
            "min_gap_s": self.min_gap_s,
            "request_starts": None if self.request_starts is None else list(self.request_starts),
        }


class StatsRecorder:
    """Per-host request statistics. Only touched from the event loop, so no locking."""

    def __init__(self) -> None:
        self.hosts: dict[str, HostStats] = {}

    def begin(self, host: str, path: str) -> HostStats:
        """Record a request start; pass the result to ``end`` when it finishes.

        ``result.paths[path]`` is then the number of this request among those for ``path``.
        """
        now = time.monotonic()
        st = self.hosts.setdefault(host, HostStats())
        st.requests += 1
        st.paths[path] = st.paths.get(path, 0) + 1
        if st.request_starts is not None:
            if st.requests > MAX_REQUEST_STARTS:
                st.request_starts = None  # bounded memory for long runs
            else:
                st.request_starts.append(now)
        st.in_flight += 1
        st.peak_concurrency = max(st.peak_concurrency, st.in_flight)
        if st.last_start is not None:
            gap = now - st.last_start
            st.min_gap_s = gap if st.min_gap_s is None else min(st.min_gap_s, gap)
        st.last_start = now
        return st

    @staticmethod
    def end(st: HostStats) -> None:
        # Works on the object begin() returned, so a reset in between cannot go negative.
        st.in_flight -= 1

    def reset(self) -> None:
        self.hosts = {}

    def snapshot(self, *, paths: bool = False) -> StatsJSON:
        """The stats as JSON; ``paths=True`` adds the per-host, per-path request counts."""
        snap: StatsJSON = {
            "total_requests": sum(s.requests for s in self.hosts.values()),
            "hosts": {h: s.as_json() for h, s in sorted(self.hosts.items())},
        }
        if paths:
            snap["paths"] = {
                h: dict(sorted(s.paths.items())) for h, s in sorted(self.hosts.items())
            }
        return snap


def vhost(host_header: str) -> str:
    """The host name of a Host header: no port, lower case, no trailing dot."""
    h = host_header.strip().lower()
    if h.startswith("["):  # [v6]:port
        h = h[1 : h.find("]")] if "]" in h else h[1:]
    elif h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


class WebServer:
    """Serves a ``WebSpec`` on a loopback port; use as ``async with WebServer(spec) as srv``.

    If ``spec.port`` is 0 a free port is picked and ``self.spec`` is replaced by a copy that
    carries it, so the generated URLs point back at this server.
    """

    def __init__(
        self,
        spec: WebSpec,
        *,
        bind: str = "127.0.0.1",
        access_log: logging.Logger | None = None,
        prerender: bool = False,
    ) -> None:
        self.spec = spec
        self.bind = require_loopback(bind)
        self.stats = StatsRecorder()
        self._access_log = access_log
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Connection] = set()
        self._rendered: dict[tuple[str, str], Answer] = {}
        self._rendered_bytes = 0
        self._prerender = prerender

    @property
    def port(self) -> int:
        return self.spec.port

    @property
    def address(self) -> str:
        """Where to connect (the Host header then picks the site)."""
        return f"http://{self.bind}:{self.port}"

    async def start(self) -> int:
        if self._server is not None:
            raise RuntimeError("server already started")
        # Bind the socket ourselves so that port 0 works and the real port is known up front.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.bind, self.spec.port))
            port = int(sock.getsockname()[1])
            if self.spec.port == 0:
                self.spec = replace(self.spec, port=port)
            if self._prerender:
                self.prerender()  # the pages carry the port: only now
            loop = asyncio.get_running_loop()
            self._server = await loop.create_server(
                lambda: Connection(self._handle, self._connections), sock=sock, backlog=1024)
        except BaseException:
            sock.close()
            raise
        return port

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            for conn in list(self._connections):
                conn.close()
            await server.wait_closed()

    async def __aenter__(self) -> WebServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def prerender(self) -> None:
        """Render every host's pages and robots.txt now (until MEMO_BYTES is full), so that the
        first crawl of a benchmark pays no more for its pages than the next."""
        for host in self.spec.host_names:
            for path in ("/robots.txt", *(page_path(n) for n in range(self.spec.pages))):
                self._render(host, path, "", 1)
                if (host, path) not in self._rendered:
                    return  # full

    def _render(self, host: str, path: str, query: str, hit: int) -> Answer:
        key = (host, path)
        kept = self._rendered.get(key)
        if kept is not None:
            return kept
        status, content_type, body, headers = render(self.spec, host, path, query, hit=hit)
        # Content-Type verbatim: it may carry a charset.
        answer = Answer(status, (("Content-Type", content_type), *headers.items()), body)
        if fixed_response(self.spec, path) and self._rendered_bytes + len(body) <= MEMO_BYTES:
            self._rendered[key] = answer
            self._rendered_bytes += len(body)
        return answer

    def _handle(self, request: Request) -> Reply:
        path = request.path
        reply = self._reply(request, path)
        if self._access_log is not None:
            self._access_log.info(
                '%s "%s %s" %d %d', request.peer, request.method, path, reply.status,
                len(reply.body))
        return reply

    def _reply(self, request: Request, path: str) -> Reply:
        if path == STATS_PATH and request.method == "GET":
            return _json(self.stats.snapshot(paths=self.spec.extras))
        if path == RESET_PATH and request.method == "POST":
            self.stats.reset()
            return _json({"ok": True})
        host = vhost(request.headers.get("host", ""))
        st = self.stats.begin(host, path)
        if request.method not in ("GET", "HEAD"):
            self.stats.end(st)
            return Reply(405, (("Content-Type", TEXT_PLAIN), ("Allow", "GET, HEAD")),
                         b"method not allowed\n")
        try:
            answer = self._render(host, path, request.query, st.paths[path])
        except BaseException:
            self.stats.end(st)
            raise
        delay_ms = self.spec.delay_ms(host)
        # The request is in progress (stats' in_flight) until its answer goes out.
        return Reply(answer.status, answer.headers, answer.body, delay_ms / 1000,
                     lambda: self.stats.end(st))


TEXT_PLAIN = "text/plain; charset=utf-8"


class Answer(NamedTuple):
    """A rendered response as it goes on the wire: the header list starts with Content-Type."""

    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes


def _json(data: object) -> Reply:
    body = json.dumps(data).encode()
    return Reply(200, (("Content-Type", "application/json; charset=utf-8"),), body)
