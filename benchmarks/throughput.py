"""Throughput of crawlfleet on the local test web, next to a naive crawler and two floors.

Usage::

    .venv/bin/python benchmarks/throughput.py [--shape many|docs|one|both|all] [--repeat 3]
        [--workers 1,2] [--write-docs [docs/benchmarks.md]] [--no-embedded]
        [--hosts 20 --pages 150 --links 8 --per-host-concurrency 2]     # the "many" shape
        [--docs-hosts 40 --docs-pages 150 --docs-links 100 --docs-concurrency 4]  # "docs"
        [--one-pages 1200 --one-links 100 --one-concurrency 16 --one-latency-ms 0]  # "one"
        [--latency-ms 20] [--crawl-delay 0] [--max-in-flight 64] [--set NAME=VALUE]

Everything runs on loopback: one ``crawlfleet testweb`` (HTTP + DNS) per shape, one private
``redis-server`` on a free port (never the machine's 6379), and the crawlers' own processes.
Every run stops by itself (deadlines everywhere), and every process started here is stopped
(its process group gets SIGTERM, then SIGKILL) on the way out, Ctrl-C and errors included.

Four site shapes (``--shape``, default all; ``both`` is many and one):

many
    ``--hosts`` hosts x ``--pages`` HTML pages, ``--links`` links a page, ``--per-host-
    concurrency`` fetches in flight per host (default 20 x 150, 8 links, 2 in flight). Thin
    pages and a low per-host limit: the politeness bound (hosts x in flight / latency) is what
    every crawler meets here, so the naive crawler runs at the fetch+parse floor and the ratios
    show the cost of the machinery, not what it buys.
docs
    ``--docs-hosts`` documentation sites of ``--docs-pages`` pages, ``--docs-links`` links a
    page (navigation, mostly links already seen) and ``--docs-concurrency`` fetches in flight
    per host (default 40 x 150, 100 links, 4 in flight): the shape the project's issue measured
    (documentation sites, ~114 links a page). The politeness bound is far above what two cores
    parse, so the machine's CPU bounds every crawler, and how the work spreads over processes
    and what each link costs decide the ratios.
one
    ONE host of ``--one-pages`` pages with ``--one-links`` links a page and ``--one-concurrency``
    fetches in flight (default 1200 pages, 100 links, 16 in flight): a big documentation site,
    answering with ``--one-latency-ms`` (default 0), as the issue measured it (nginx on
    loopback): with 20 ms the politeness bound (800 pages/s) is 1.24x what the naive crawler
    reaches, and every crawler meets it, so the ratios would say nothing about one host's
    work; with none, the machine's CPU bounds every crawler, as on ``docs``.
inflight (in ``all``, unless ``--in-flight 0``)
    The worker's memory with ``--in-flight`` fetches in flight (default 256): one host of
    ``--in-flight-pages`` (2,000) pages with 20 links, that many in flight to it and per
    process, 500 ms latency so that the slots stay full. Only the naive crawler and a fleet of
    1 run; the report gives the fetches in flight on average (at least pages/s x latency, by
    Little's law) beside the worker's peak RSS.

``many`` and ``docs`` have ``--latency-ms`` per answer, and every shape ``--crawl-delay``
(default 0: the machinery is measured, not politeness). robots.txt answers 404 on every host
of every shape (RFC 9309 "unavailable": nothing is disallowed), so that the naive crawler,
which ignores robots.txt, and crawlfleet, which obeys it, fetch exactly the same URLs: the
test web's reachable set, which every crawl's results are checked against (count and URL
set). crawlfleet still requests each
host's robots.txt; that request is not counted as a page.

Rates are URLs fetched per second ("pages/s"): pages plus failures (the test web's 404s are one
HTTP request and one result each, like a page).

What is measured, per shape, in each repeat (interleaved, so that drift on the machine spreads
over all of them; each figure is the median of ``--repeat`` runs):

fetch floor / fetch+parse floor
    The bare loop in ONE process (this one): no Redis, no scheduler, no arq. One aiohttp
    session made by ``crawlfleet.workers.worker.worker_session`` (the worker's resolver,
    connector limits and timeouts), the same per-host concurrency and global in-flight cap (one
    ``asyncio.Semaphore`` per host, one for the process) and the worker's own pacer. It fetches
    the reachable list, known in advance: no discovery, no dedup, no robots.txt, every host busy
    from the first second; the fetch+parse floor also parses every HTML body with
    ``crawlfleet.workers.parse.parse_page``. That favours both, most of all at the start of a
    crawl, when a crawler knows only the seeds.
naive
    ``benchmarks/naive.py`` in its own process: asyncio + aiohttp + one Redis SET (on the
    private redis-server) for dedup, the same politeness limits, no robots.txt, no leases, no
    crash safety, no result store: "what an afternoon gives". Timed from its start signal
    (sent once its session and Redis connection are up) to its last page.
crawlfleet embedded
    ``crawlfleet crawl <seeds> --workers 2`` without ``CRAWLFLEET_REDIS_URL``: scheduler and two
    arq workers in one process over fakeredis. Its elapsed time is the one its summary line
    reports (seeding to finished, plus writing the results file).
crawlfleet fleet, N workers
    ``crawlfleet scheduler`` and N ``crawlfleet worker`` processes on the private Redis, in a
    fresh namespace, started and polling before the clock starts. Timed from the moment
    ``crawlfleet seed`` reports its seeds enqueued (its stderr line, read as it is written) to
    the first status poll that says ``finished`` (``read_status`` through redis-py, every
    ``POLL_S``).

And for each of them:

CPU ms per page, per process
    The CPU seconds each process used during the timed run (``/proc/PID/stat``; the floors:
    this process; embedded: the crawl process's whole life, from ``wait4``), divided by the
    pages. Also shown as cores busy, so one can see whether the machine's cores, the test web
    or the crawler bound a run. The test web is one Python process on the same cores as
    everything else; it renders every page before its ready line (``--prerender``) and serves
    them from memory over a bare HTTP/1.1 protocol (``testweb/wire.py``), so that no crawler
    pays for another's first renders and the web takes as little of the cores as it can (the
    issue measured against nginx).
Redis commands per page
    ``CONFIG RESETSTAT`` before the start, ``INFO commandstats`` at the end. The benchmark's
    own status polls are subtracted exactly (their commands are measured once at start-up) and
    ``INFO``/``CONFIG``/``MEMORY`` are never counted. commandstats counts the commands that Lua
    scripts run (``redis.call``) as well as those clients send; ``--redis-breakdown`` adds one
    untimed crawl per fleet size under ``MONITOR`` to tell the two apart.
Redis bytes per seen URL
    ``INFO memory`` used_memory after the crawl minus before the start, divided by the URLs
    seen (everything the crawl keeps in Redis: results, seen set, stats ...); and the seen set
    alone: the sum of ``MEMORY USAGE`` over the ``{ns}:seen:*`` buckets (the naive crawler: its
    one SET), divided by the URLs seen. A small crawl has far fewer URLs than buckets hold, so
    its seen set is mostly per-key overhead; ``benchmarks/scheduler.py`` measures it at 1 M.
Peak RSS per process
    VmHWM from ``/proc/PID/status``, read just before the process is stopped (the redis-server's
    is reset through ``/proc/PID/clear_refs`` before each run; the floors': this process's,
    reset alike; embedded: ``ru_maxrss`` from ``wait4``).

``--write-docs [PATH]`` writes the tables, the machine, the date, the command line and the
project's targets (met / not met, from the measured figures) to PATH (default
docs/benchmarks.md), keeping the sections ``benchmarks/scheduler.py --write-docs`` and
``benchmarks/memory.py --write-docs`` put there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import aiohttp
import redis
from redis.asyncio import Redis

from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import read_status
from crawlfleet.workers.pacing import Pacer, sending
from crawlfleet.workers.page import PACING_MARGIN
from crawlfleet.workers.parse import BodyError, is_html, parse_page
from crawlfleet.workers.worker import worker_session

BIN = Path(sys.executable).parent
CRAWLFLEET = str(BIN / "crawlfleet") if (BIN / "crawlfleet").exists() else "crawlfleet"
NAIVE = str(Path(__file__).with_name("naive.py"))
SCRAPY_PEER = str(Path(__file__).with_name("scrapy_peer.py"))
DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

POLL_S = 0.025  # status poll interval while a fleet crawls
STARTUP_TIMEOUT_S = 30.0  # for the test web, redis-server and the fleet's processes
CRAWL_TIMEOUT_S = 300.0  # one crawl; a crawl that takes longer fails the benchmark
STOP_TIMEOUT_S = 15.0  # SIGTERM -> exit, before SIGKILL
SHUTDOWN_GRACE_S = 5  # CRAWLFLEET_SHUTDOWN_GRACE for the fleet's workers (they are idle by then)
MEASUREMENT_COMMANDS = ("info", "config|resetstat", "client|list", "client|setname", "monitor",
                        "memory|usage")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULTS = Settings()
TIMES = "\N{MULTIPLICATION SIGN}"

# The benchmark's rows, in the order they run and are shown.
FETCH_FLOOR, PARSE_FLOOR, NAIVE_ROW, EMBEDDED = ("fetch floor", "fetch+parse floor", "naive",
                                                 "embedded")
FLEET_PREFIX = "fleet of "
SCRAPY_ROW = "scrapy"  # benchmarks/scrapy_peer.py, when Scrapy is installed (the bench extra)
INFLIGHT = "inflight"  # the shape that measures the worker's memory with many fetches in flight
INFLIGHT_LATENCY_MS = 500.0

# The project's targets (the issue), next to the figures in the report and the docs.
# x naive: (target, goal)
TARGET_RATIO = {"one": (1.0, 1.2), "many": (1.3, None), "docs": (1.3, None)}
TARGET_SCRAPY_RATIO = 20.0  # many sites: x Scrapy
TARGET_REDIS_CMDS = 6.0  # per page
TARGET_CPU_MS = {"workers": 1.2, "scheduler": 0.05, "redis-server": 0.05}  # per page
TARGET_WORKER_RSS_MB = 120.0
TARGET_SEEN_BYTES = 12.0  # per URL, over 1,000,000 URLs: benchmarks/scheduler.py judges it


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


# --------------------------------------------------------------------------------------------
# Processes: every one started here is registered, and all are stopped on the way out.
# --------------------------------------------------------------------------------------------


class Processes:
    """Start subprocesses in their own process groups and stop every one of them at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            list(argv), env=env, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            start_new_session=True,  # its own group: Ctrl-C does not reach it, we stop it
        )
        self.running.append(proc)
        return proc

    def run(
        self, argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a command to completion (stopped on timeout or interruption)."""
        proc = self.start(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            command = " ".join(map(str, argv[:3]))
            raise BenchError(f"{command} ... did not finish in {timeout:.0f} s") from None
        finally:
            self.stop(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out.decode(), err.decode())

    def run_to_exit(
        self, argv: Sequence[str], *, env: dict[str, str], timeout: float, stderr: Path
    ) -> tuple[int, resource.struct_rusage]:
        """Run a command to completion with its stderr in a file; its exit code and its own
        resource usage (``wait4``: CPU time and peak RSS of that one process)."""
        with stderr.open("wb") as err:
            proc = self.start(argv, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
                if pid == proc.pid:
                    proc.returncode = os.waitstatus_to_exitcode(status)
                    return proc.returncode, usage
                time.sleep(0.01)
            command = " ".join(map(str, argv[:3]))
            raise BenchError(f"{command} ... did not finish in {timeout:.0f} s")
        finally:
            self.stop(proc)

    def stop(self, proc: subprocess.Popen[bytes]) -> int | None:
        """SIGTERM to the process group, wait, SIGKILL if it lingers; returns the exit code."""
        if proc.poll() is None:
            signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                signal_group(proc, signal.SIGKILL)
                proc.wait(timeout=STOP_TIMEOUT_S)
        signal_group(proc, signal.SIGKILL)  # whatever it left behind in its group
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.running:
            self.running.remove(proc)
        return proc.returncode

    def stop_all(self) -> None:
        # A second Ctrl-C must not cut the clean-up short.
        previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT,
                                                                           signal.SIGTERM)}
        try:
            for proc in reversed(list(self.running)):
                with contextlib.suppress(Exception):
                    self.stop(proc)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)  # pid == pgid, as start_new_session=True


def _interrupt(signum: int, _frame: object) -> None:
    # Raised wherever the main thread is, event loops included (asyncio.run only installs its
    # own SIGINT handler, which can be swallowed by a finishing task, over the default one).
    # It unwinds through every finally, so every process started here is stopped.
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def benchmark_processes() -> Iterator[Processes]:
    """Every process a benchmark script starts, all stopped when the block ends, however it
    ends: SIGINT and SIGTERM unwind it (``_interrupt``), and a BenchError or an interrupt
    becomes one line on stderr and exit status 1 or 130 instead of a traceback."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    procs = Processes()
    try:
        yield procs
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        procs.stop_all()


def read_line(stream: IO[bytes], timeout: float, what: str) -> str:
    """One line from a child's pipe, or BenchError after ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(stream, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise BenchError(f"{what}: nothing within {timeout:.0f} s")
    line = stream.readline().decode()
    if not line:
        raise BenchError(f"{what}: exited before printing")
    return line


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float:
    """CPU seconds of one live process (0 if it is gone): the sum over its threads of
    ``/proc/PID/task/TID/schedstat`` (nanoseconds, where ``/proc/PID/stat`` counts 10 ms
    ticks: a scheduler's few ms per run need the finer clock). A thread that ends is no longer
    listed, so the CPU of threads that end during a run would be missed; the processes measured
    here keep theirs (asyncio's executor, Redis's bio threads). Without schedstat: utime +
    stime from ``/proc/PID/stat``."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        total = 0
        for task in os.scandir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that just ended
                total += int(Path(task.path, "schedstat").read_text().split()[0])
        return total / 1e9
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process in kB (0 if it is gone)."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def reset_peak_rss(pid: int) -> None:
    """Start a process's VmHWM again from its current RSS (Linux 4.0+; a no-op elsewhere)."""
    with contextlib.suppress(OSError):
        Path(f"/proc/{pid}/clear_refs").write_text("5")


def machine_cpu_seconds() -> float:
    """CPU seconds all CPUs of the machine spent busy since boot (/proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


class CpuMeter:
    """CPU seconds per component (a name and its pids) between start() and stop(), the wall
    time between, and what the rest of the machine used meanwhile ("others": other users'
    load, which makes a run slower without being part of it)."""

    SELF = "benchmark"
    OTHERS = "others"
    _MACHINE = "machine"

    def __init__(self, components: dict[str, list[int]]) -> None:
        self.components = components
        self.before: dict[str, float] = {}
        self.started = 0.0

    def _now(self) -> dict[str, float]:
        now = {name: sum(map(cpu_seconds, pids)) for name, pids in self.components.items()}
        now[self.SELF] = time.process_time()
        now[self._MACHINE] = machine_cpu_seconds()
        return now

    def start(self) -> None:
        self.before = self._now()
        self.started = time.monotonic()

    def stop(self, extra: dict[str, float] | None = None) -> tuple[dict[str, float], float]:
        """({component: CPU seconds}, wall seconds); ``extra`` adds components measured
        otherwise (a child process that has exited)."""
        window = time.monotonic() - self.started
        used = {name: value - self.before[name] for name, value in self._now().items()}
        machine = used.pop(self._MACHINE)
        used |= extra or {}
        used[self.OTHERS] = max(0.0, machine - sum(used.values()))
        return used, window


# --------------------------------------------------------------------------------------------
# Site shapes, the test web and Redis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str  # "many", "docs", "one" or INFLIGHT
    hosts: int
    pages: int
    links: int
    per_host_concurrency: int
    latency_ms: float
    crawl_delay: float
    max_in_flight: int

    def web_args(self) -> list[str]:
        """The test web's options: robots.txt answers 404 (nothing disallowed) everywhere."""
        robots = [arg for i in range(self.hosts)
                  for arg in ("--robots", f"site{i}.test=status:404")]
        return ["--hosts", str(self.hosts), "--pages", str(self.pages), "--links",
                str(self.links), *robots]

    def describe(self) -> str:
        hosts = "1 host" if self.hosts == 1 else f"{self.hosts} hosts"
        return (f"{hosts} {TIMES} {self.pages} pages, {self.links} links a page, "
                f"{self.per_host_concurrency} in flight per host, {self.latency_ms:g} ms latency, "
                f"crawl delay {self.crawl_delay:g} s, {self.max_in_flight} in flight per process")

    def bound(self) -> float | None:
        """Pages/s nobody can beat: hosts x fetches in flight / latency (or the crawl delay)."""
        if self.latency_ms <= 0:
            return None
        per_host = self.per_host_concurrency / (self.latency_ms / 1000)
        if self.crawl_delay > 0:
            per_host = min(per_host, 1 / self.crawl_delay)
        return self.hosts * per_host


def shapes_from(args: argparse.Namespace) -> list[Shape]:
    many = Shape("many", args.hosts, args.pages, args.links, args.per_host_concurrency,
                 args.latency_ms, args.crawl_delay, args.max_in_flight)
    docs = Shape("docs", args.docs_hosts, args.docs_pages, args.docs_links,
                 args.docs_concurrency, args.latency_ms, args.crawl_delay, args.max_in_flight)
    one = Shape("one", 1, args.one_pages, args.one_links, args.one_concurrency,
                args.one_latency_ms, args.crawl_delay, args.max_in_flight)
    wide = [Shape(INFLIGHT, 1, args.in_flight_pages, 20, args.in_flight, INFLIGHT_LATENCY_MS, 0.0,
                  args.in_flight)] if args.in_flight > 0 else []
    return {"many": [many], "docs": [docs], "one": [one], "both": [many, one],
            "inflight": wide, "all": [many, docs, one, *wide]}[args.shape]


@dataclass(frozen=True)
class TestWeb:
    proc: subprocess.Popen[bytes]
    dns: str
    seeds: list[str]
    reachable: list[str]  # what every crawl fetches (nothing is robots-disallowed)

    @property
    def pid(self) -> int:
        return self.proc.pid


def start_testweb(procs: Processes, shape: Shape, logdir: Path) -> TestWeb:
    web_args = shape.web_args()
    with (logdir / f"testweb-{shape.name}.log").open("wb") as log:
        proc = procs.start(
            [CRAWLFLEET, "testweb", "--port", "0", "--dns-port", "0", *web_args,
             "--latency-ms", str(shape.latency_ms), "--prerender"],
            stdout=subprocess.PIPE, stderr=log,
        )
    assert proc.stdout is not None
    ready = json.loads(read_line(proc.stdout, STARTUP_TIMEOUT_S, "crawlfleet testweb"))
    lists = []
    for extra in ([], ["--obey-robots"]):
        listed = procs.run([CRAWLFLEET, "testweb", "--print-reachable", "--port",
                            str(ready["http_port"]), *web_args, *extra])
        if listed.returncode != 0:
            raise BenchError(f"crawlfleet testweb --print-reachable failed: {listed.stderr}")
        lists.append(listed.stdout.split())
    if lists[0] != lists[1]:
        raise BenchError("the test web's robots.txt disallows URLs; the shapes must have none, "
                         "so that the naive crawler and crawlfleet fetch the same ones")
    return TestWeb(proc, ready["dns"], list(ready["seeds"]), lists[0])


@dataclass(frozen=True)
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


def start_redis(procs: Processes, logdir: Path) -> RedisServer:
    server = shutil.which("redis-server")
    if server is None:
        raise BenchError("redis-server is not installed")
    port = free_port()
    with (logdir / "redis.log").open("wb") as log:
        proc = procs.start(
            [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no"],
            stdout=log, stderr=log,
        )
    client = redis.Redis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    return RedisServer(proc, port)
            if proc.poll() is not None:
                break
            time.sleep(0.05)
    finally:
        client.close()
    raise BenchError(f"redis-server on port {port} did not answer in {STARTUP_TIMEOUT_S:.0f} s")


# --------------------------------------------------------------------------------------------
# A measurement
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    urls: int  # URLs fetched (pages + failures)
    elapsed_s: float
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per component...
    cpu_window_s: float = 0.0  # ...over this wall time
    redis_calls: Counter[str] = field(default_factory=Counter)  # naive and fleets
    polls: int = 0
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)  # --redis-breakdown
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds, URLs done)
    rss_kb: dict[str, int] = field(default_factory=dict)  # peak RSS per process
    seen: int = 0  # URLs in the seen set at the end (naive and fleets)
    redis_bytes: int | None = None  # used_memory after the crawl minus before it
    seen_bytes: int | None = None  # MEMORY USAGE of the seen set's keys
    seen_keys: int = 0
    incomplete: bool = False  # its results were not exactly the reachable set

    def time_to(self, fraction: float) -> float | None:
        """Seconds until ``fraction`` of the URLs were fetched (None if not recorded)."""
        goal = fraction * self.urls
        return next((t for t, done in self.progress if done >= goal), None)

    @property
    def rate(self) -> float:
        return self.urls / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def redis_total(self) -> int:
        return sum(self.redis_calls.values())

    def cpu_ms(self, name: str) -> float:
        return 1000 * self.cpu.get(name, 0.0) / self.urls if self.urls else 0.0


# --------------------------------------------------------------------------------------------
# Floors: fetch (and parse) of the known URL list, one process, no Redis
# --------------------------------------------------------------------------------------------


class HostPace:
    """At most ``concurrency`` requests in flight to a host, started by the crawler's own
    pacer (workers/pacing.py), so the floor paces exactly as a worker does."""

    def __init__(self, concurrency: int, delay: float) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.pacer = Pacer(delay * PACING_MARGIN)


async def _floor(
    urls: list[str], settings: Settings, delay: float, parse: bool
) -> tuple[int, float, list[tuple[float, int]]]:
    resources = contextlib.AsyncExitStack()
    session = await resources.enter_async_context(worker_session(settings))
    global_slots = asyncio.Semaphore(settings.max_in_flight)
    hosts: dict[str, HostPace] = {}
    errors: Counter[str] = Counter()
    finished: list[float] = []

    async def one(url: str) -> None:
        host = hosts.setdefault(urlsplit(url).netloc,
                                HostPace(settings.per_host_concurrency, delay))
        async with host.slots, global_slots:
            turn = await host.pacer.turn()
            try:
                with sending(turn):  # as workers/fetch.py: the turn ends once it is sent
                    response = await session.get(url, allow_redirects=False)
                async with response:
                    body = await response.read()
                    status, content_type = response.status, response.headers.get("Content-Type")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
        if parse and status < 400 and is_html(content_type):
            try:
                parse_page(body, content_type, url)
            except BodyError as exc:
                errors[exc.reason] += 1
        finished.append(time.perf_counter())

    try:
        started = time.perf_counter()
        async with asyncio.TaskGroup() as tasks:
            for url in urls:
                tasks.create_task(one(url))
        elapsed = time.perf_counter() - started
    finally:
        await resources.aclose()
    if errors:
        raise BenchError(f"floor: fetch errors {dict(errors)} (the floor must fetch every URL)")
    return len(urls), elapsed, [(t - started, i) for i, t in enumerate(finished, 1)]


def measure_floor(web: TestWeb, shape: Shape, *, parse: bool) -> Run:
    settings = Settings(
        dns_nameservers=(web.dns,), allow_private=True,
        max_in_flight=shape.max_in_flight, per_host_concurrency=shape.per_host_concurrency,
    )
    reset_peak_rss(os.getpid())
    meter = CpuMeter({"testweb": [web.pid]})
    meter.start()
    urls, elapsed, progress = asyncio.run(_floor(web.reachable, settings, shape.crawl_delay,
                                                 parse))
    cpu, window = meter.stop()
    cpu = {"floor": cpu.pop(CpuMeter.SELF), **cpu}
    return Run(urls, elapsed, cpu, window, progress=progress,
               rss_kb={"benchmark process": peak_rss_kb(os.getpid())})


# --------------------------------------------------------------------------------------------
# The naive crawler (benchmarks/naive.py), in its own process
# --------------------------------------------------------------------------------------------


def parse_commandstats(stats: dict[str, Any]) -> Counter[str]:
    """Calls per command since the last CONFIG RESETSTAT, without the benchmark's own."""
    calls: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in MEASUREMENT_COMMANDS:
            calls[command] = int(values["calls"])
    return calls


def used_memory(client: Any) -> int:
    return int(client.info("memory")["used_memory"])


def scrapy_installed() -> bool:
    return importlib.util.find_spec("scrapy") is not None


def measure_naive(
    procs: Processes, web: TestWeb, shape: Shape, server: RedisServer, workdir: Path,
    warnings: list[str], script: str = NAIVE, name: str = NAIVE_ROW,
) -> Run:
    """benchmarks/naive.py, or (script, name) a peer with its interface: scrapy_peer.py."""
    shown = f"benchmarks/{Path(script).name}"
    out = workdir / f"{name}.txt"
    key = f"naive{uuid.uuid4().hex}:seen"
    argv = [sys.executable, script, *web.seeds, "--redis-url", server.url, "--key", key,
            "--dns", web.dns, "--max-in-flight", str(shape.max_in_flight),
            "--per-host-concurrency", str(shape.per_host_concurrency),
            "--crawl-delay", str(shape.crawl_delay), "--out", str(out), "--wait-go", "--linger"]
    with (workdir / f"{name}.log").open("ab") as log:
        proc = procs.start(argv, stdout=subprocess.PIPE, stderr=log)
    # redis-py types its commands as `Awaitable[T] | T`; this client is the synchronous one.
    client: Any = redis.Redis.from_url(server.url)
    try:
        assert proc.stdout is not None
        ready = read_line(proc.stdout, STARTUP_TIMEOUT_S, shown)
        if not json.loads(ready).get("ready"):
            raise BenchError(f"{shown}: {ready.strip()}")
        client.config_resetstat()
        memory_before = used_memory(client)
        reset_peak_rss(server.proc.pid)
        meter = CpuMeter({"testweb": [web.pid], "redis-server": [server.proc.pid],
                          name: [proc.pid]})
        meter.start()
        os.kill(proc.pid, signal.SIGUSR1)
        line = read_line(proc.stdout, CRAWL_TIMEOUT_S, shown)
        cpu, window = meter.stop()
        rss = {name: peak_rss_kb(proc.pid), "redis-server": peak_rss_kb(server.proc.pid)}
        calls = parse_commandstats(client.info("commandstats"))
        memory = used_memory(client) - memory_before
        seen = int(client.scard(key))
        seen_bytes = int(client.memory_usage(key, samples=0) or 0)
        client.flushdb()
    finally:
        client.close()
        if procs.stop(proc) not in (0, None):
            warnings.append(f"WARNING {name}: exited with {proc.returncode}; see "
                            f"{workdir / (name + '.log')} (--keep-logs keeps it)")
    try:
        summary = json.loads(line)
        fetched = int(summary["pages"]) + int(summary["failed"])
        elapsed = float(summary["elapsed_s"])
    except (ValueError, KeyError, TypeError):
        raise BenchError(f"{shown}: {line.strip()[:300]}") from None
    problems = check_results(out.read_text().split(), fetched, web, name)
    warnings += problems
    out.unlink()
    if name != NAIVE_ROW:  # Scrapy keeps its dedup in memory: Redis figures are not its own
        cpu.pop("redis-server", None)
        return Run(fetched, elapsed, cpu, window, Counter(), rss_kb={name: rss[name]},
                   incomplete=bool(problems))
    return Run(fetched, elapsed, cpu, window, calls, rss_kb=rss, seen=seen,
               redis_bytes=memory, seen_bytes=seen_bytes, seen_keys=1,
               incomplete=bool(problems))


# --------------------------------------------------------------------------------------------
# crawlfleet: the embedded backend, and a real fleet
# --------------------------------------------------------------------------------------------


def crawl_env(web: TestWeb, shape: Shape, args: argparse.Namespace,
              **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
    env.update(
        CRAWLFLEET_NAMESPACE=f"bench{uuid.uuid4().hex}",
        CRAWLFLEET_DNS_NAMESERVERS=web.dns,
        CRAWLFLEET_ALLOW_PRIVATE="1",
        CRAWLFLEET_LOG_LEVEL="warning",
        CRAWLFLEET_LOG_FORMAT="json",
        CRAWLFLEET_MAX_IN_FLIGHT=str(shape.max_in_flight),
        CRAWLFLEET_PER_HOST_CONCURRENCY=str(shape.per_host_concurrency),
        CRAWLFLEET_CRAWL_DELAY=str(shape.crawl_delay),
        CRAWLFLEET_SHUTDOWN_GRACE=str(SHUTDOWN_GRACE_S),
    )
    env.update(args.env)
    env.update(extra)
    return env


def check_results(urls: list[str], fetched: int, web: TestWeb, label: str) -> list[str]:
    """Warnings if the results are not exactly the reachable set, or the fetch count is off."""
    got, expected = set(urls), set(web.reachable)
    warnings = []
    if len(urls) != len(web.reachable) or got != expected:
        warnings.append(
            f"WARNING {label}: {len(urls)} results for {len(web.reachable)} reachable "
            f"URLs ({len(expected - got)} missing, {len(got - expected)} unexpected, "
            f"{len(urls) - len(got)} duplicated)")
    if fetched != len(web.reachable):
        warnings.append(f"WARNING {label}: {fetched} URLs fetched (pages + failed) for "
                        f"{len(web.reachable)} reachable")
    return warnings


def exported_urls(path: Path) -> list[str]:
    return [json.loads(line)["url"] for line in path.read_text().splitlines() if line.strip()]


_SUMMARY = re.compile(
    r"crawl (?P<state>finished|stopped before the end): (?P<pages>\d+) pages, "
    r"(?P<failed>\d+) failed.* in (?P<elapsed>[\d.]+) s"
)


def measure_embedded(
    procs: Processes, web: TestWeb, shape: Shape, args: argparse.Namespace, workdir: Path,
    warnings: list[str],
) -> Run:
    out, log = workdir / "embedded.jsonl", workdir / "embedded.log"
    meter = CpuMeter({"testweb": [web.pid]})
    meter.start()
    code, usage = procs.run_to_exit(
        [CRAWLFLEET, "crawl", *web.seeds, "--workers", "2", "--out", str(out)],
        env=crawl_env(web, shape, args), timeout=CRAWL_TIMEOUT_S, stderr=log)
    cpu, window = meter.stop({"crawl process": usage.ru_utime + usage.ru_stime})
    del cpu[CpuMeter.SELF]
    stderr = log.read_text(errors="replace")
    match = _SUMMARY.search(stderr)
    if code != 0 or match is None or match["state"] != "finished":
        raise BenchError(f"crawlfleet crawl failed ({code}): {stderr[-2000:]}")
    fetched = int(match["pages"]) + int(match["failed"])
    problems = check_results(exported_urls(out), fetched, web, "embedded")
    warnings += problems
    out.unlink()
    return Run(fetched, float(match["elapsed"]), cpu, window,
               rss_kb={"crawl process": int(usage.ru_maxrss)}, incomplete=bool(problems))


async def command_calls(client: Redis) -> Counter[str]:
    """Calls per command since the last CONFIG RESETSTAT, without the benchmark's own."""
    return parse_commandstats(await client.info("commandstats"))


BENCH_CLIENT_NAME = "crawlfleet-benchmark"


def connect(redis_url: str) -> Redis:
    # Named, so that its connections' addresses can be told apart in MONITOR output.
    client: Redis = Redis.from_url(redis_url, client_name=BENCH_CLIENT_NAME)
    return client


async def own_addresses(client: Redis) -> set[str]:
    return {c["addr"] for c in await client.client_list() if c.get("name") == BENCH_CLIENT_NAME}


@dataclass
class PollCost:
    """What one of the benchmark's own ``read_status`` polls costs Redis: taken out of a fleet's
    commands and Redis CPU, so that those figures are the crawl's alone."""

    calls: Counter[str]
    redis_cpu_s: float


async def poll_cost(server: RedisServer, every: float = POLL_S) -> PollCost:
    """Polls on the idle server, ``every`` seconds apart as during a crawl: their commands
    (INFO commandstats) and their Redis CPU, less what the server spends alone in as long a
    time. Paced, not back to back: a poll that finds Redis asleep in epoll_wait pays for
    waking it, as the crawl's polls do (about twice the cost of one among many, here)."""
    polls = 120
    client = connect(server.url)
    try:
        keys = Keys(f"bench{uuid.uuid4().hex}")
        await read_status(client, keys)  # connect first: the handshake is not per poll
        await client.config_resetstat()
        before, began = cpu_seconds(server.proc.pid), time.monotonic()
        for _ in range(polls):
            await read_status(client, keys)
            await asyncio.sleep(every)
        spent, took = cpu_seconds(server.proc.pid) - before, time.monotonic() - began
        calls = await command_calls(client)
        alone = cpu_seconds(server.proc.pid)
        await asyncio.sleep(took)  # a window for the server's own cost, no client speaking
        alone = cpu_seconds(server.proc.pid) - alone
    finally:
        await client.aclose()
    per_poll: Counter[str] = Counter()
    for command, n in calls.items():
        if n % polls:
            raise BenchError(f"calibration: {n} {command} calls in {polls} status polls")
        per_poll[command] = n // polls
    return PollCost(per_poll, max(0.0, spent - alone) / polls)


async def seen_set_usage(client: Redis, keys: Keys) -> tuple[int, int]:
    """(bytes, keys) of the seen set's buckets: MEMORY USAGE of every ``{ns}:seen:*`` key."""
    total = count = 0
    async for key in client.scan_iter(match=keys.seen_pattern, count=1000):
        total += int(await client.memory_usage(key, samples=0) or 0)
        count += 1
    return total, count


@dataclass
class Fleet:
    """One scheduler and N workers, with their logs."""

    procs: Processes
    env: dict[str, str]
    logdir: Path
    members: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def spawn(self, name: str, role: str) -> None:
        with (self.logdir / f"{name}.log").open("wb") as log:
            self.members[name] = self.procs.start([CRAWLFLEET, role], env=self.env, stdout=log,
                                                  stderr=log)

    def pids(self, prefix: str) -> list[int]:
        return [p.pid for name, p in self.members.items() if name.startswith(prefix)]

    def check_alive(self) -> None:
        for name, proc in self.members.items():
            if proc.poll() is not None:
                raise BenchError(f"{name} exited with {proc.returncode}; see "
                                 f"{self.logdir / name}.log (--keep-logs keeps it)")

    def seed(self, seeds: list[str], on_seeded: Callable[[], None]) -> float:
        """Run ``crawlfleet seed``; returns the monotonic time its seeds were in Redis, when
        ``on_seeded`` is called too (not when the process started: its start-up is not the
        crawl's)."""
        proc = self.procs.start([CRAWLFLEET, "seed", *seeds], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            assert proc.stderr is not None
            line = read_line(proc.stderr, STARTUP_TIMEOUT_S, "crawlfleet seed")
            seeded_at = time.monotonic()  # it prints this right after its XADDs returned
            on_seeded()
            if f"enqueued {len(seeds)} seed(s)" not in line:
                raise BenchError(f"crawlfleet seed: {line.strip()}")
            proc.wait(timeout=STARTUP_TIMEOUT_S)
        finally:
            self.procs.stop(proc)
        return seeded_at

    def stop(self) -> None:
        for proc in self.members.values():  # SIGTERM to all at once, then wait for each
            signal_group(proc, signal.SIGTERM)
        for proc in self.members.values():
            self.procs.stop(proc)


def polling_workers_pattern(keys: Keys) -> str:
    """SCAN MATCH pattern of the workers' arq health-check keys: arq writes a worker's key
    from its poll loop, so a worker is up (start-up done, polling) once its key exists."""
    return keys.arq_health_check("*")


async def polling_workers(client: Redis, keys: Keys) -> int:
    return len([k async for k in client.scan_iter(match=polling_workers_pattern(keys))])


async def wait_ready(client: Redis, workers: int, fleet: Fleet) -> None:
    """Until every worker polls arq's queue and the scheduler leads (it listens for
    wake-ups, Keys.scheduler_wake)."""
    keys = Keys(fleet.env["CRAWLFLEET_NAMESPACE"])
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        fleet.check_alive()
        if (await polling_workers(client, keys) >= workers
                and await scheduler_leads(client, keys)):
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"a fleet of {workers} did not start in {STARTUP_TIMEOUT_S:.0f} s")


async def scheduler_leads(client: Redis, keys: Keys) -> bool:
    """A scheduler leads and sleeps between passes: it holds the lock and listens."""
    [(_, listeners)] = await client.pubsub_numsub(keys.scheduler_wake)
    return bool(listeners) and bool(await client.exists(keys.scheduler_lock))


async def wait_for_monitor(client: Redis, monitor: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline and monitor.poll() is None:
        if any(c.get("cmd") == "monitor" for c in await client.client_list()):
            return
        await asyncio.sleep(0.02)
    raise BenchError("redis-cli monitor did not start")


_MONITOR_LINE = re.compile(r'^([\d.]+) \[\d+ (\S+)\] "([^"]+)"(?: "([^"]*)")?')
_CONTAINER_COMMANDS = frozenset({"client", "config", "script", "xgroup", "xinfo", "object"})


def monitor_counts(
    path: Path, own: set[str], since: float, until: float
) -> Counter[tuple[str, str]]:
    """(source, command) -> calls from a MONITOR log between two wall-clock times (the same
    window as commandstats); source is "client" or "lua"."""
    counts: Counter[tuple[str, str]] = Counter()
    with path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            match = _MONITOR_LINE.match(line)
            if match is None or match[2] in own or not since <= float(match[1]) <= until:
                continue
            source = "lua" if match[2] == "lua" else "client"
            command = match[3].lower()
            if command in _CONTAINER_COMMANDS and match[4]:
                command += "|" + match[4].lower()  # as commandstats names it
            counts[source, command] += 1
    return counts



async def _fleet(
    fleet: Fleet, web: TestWeb, server: RedisServer, workers: int,
    per_poll: PollCost, monitor_log: Path | None,
) -> Run:
    redis_url = fleet.env["CRAWLFLEET_REDIS_URL"]
    keys = Keys(fleet.env["CRAWLFLEET_NAMESPACE"])
    client = connect(redis_url)
    monitor: subprocess.Popen[bytes] | None = None
    try:
        await wait_ready(client, workers, fleet)
        if monitor_log is not None:
            with monitor_log.open("wb") as out:
                monitor = fleet.procs.start(
                    [shutil.which("redis-cli") or "redis-cli", "-p", str(server.port), "monitor"],
                    stdout=out, stderr=subprocess.DEVNULL)
            await wait_for_monitor(client, monitor)
        meter = CpuMeter({"testweb": [web.pid], "redis-server": [server.proc.pid],
                          "scheduler": fleet.pids("scheduler"), "workers": fleet.pids("worker")})
        await client.config_resetstat()
        memory_before = int((await client.info("memory"))["used_memory"])
        reset_peak_rss(server.proc.pid)
        counting_since = time.time()
        started = fleet.seed(web.seeds, on_seeded=meter.start)
        polls = 0
        progress = []
        while True:
            status = await read_status(client, keys)
            polls += 1
            progress.append((time.monotonic() - started, status["pages"] + status["failed"]))
            if status["finished"]:
                elapsed = time.monotonic() - started
                break
            if time.monotonic() > started + CRAWL_TIMEOUT_S:
                raise BenchError(f"a fleet of {workers} did not finish in "
                                 f"{CRAWL_TIMEOUT_S:.0f} s: {status}")
            fleet.check_alive()
            await asyncio.sleep(POLL_S)
        cpu, window = meter.stop()
        cpu["redis-server"] = max(0.0, cpu["redis-server"] - polls * per_poll.redis_cpu_s)
        counting_until = time.time()
        rss = {"worker": max(map(peak_rss_kb, fleet.pids("worker"))),
               "scheduler": max(map(peak_rss_kb, fleet.pids("scheduler"))),
               "redis-server": peak_rss_kb(server.proc.pid)}
        calls = await command_calls(client)
        for command, n in per_poll.calls.items():
            calls[command] -= n * polls
        memory = int((await client.info("memory"))["used_memory"]) - memory_before
        seen_bytes, seen_keys = await seen_set_usage(client, keys)
        run = Run(status["pages"] + status["failed"], elapsed, cpu, window, +calls, polls,
                  progress=progress, rss_kb=rss, seen=status["seen"], redis_bytes=memory,
                  seen_bytes=seen_bytes, seen_keys=seen_keys)
        if monitor is not None and monitor_log is not None:
            fleet.procs.stop(monitor)
            run.by_source = monitor_counts(monitor_log, await own_addresses(client),
                                           counting_since, counting_until)
        return run
    finally:
        if monitor is not None:
            fleet.procs.stop(monitor)
        await client.aclose()


def measure_fleet(
    procs: Processes, web: TestWeb, shape: Shape, args: argparse.Namespace, server: RedisServer,
    workers: int, per_poll: PollCost, workdir: Path, warnings: list[str], *,
    breakdown: bool = False,
) -> Run:
    env = crawl_env(web, shape, args, CRAWLFLEET_REDIS_URL=server.url)
    logdir = Path(tempfile.mkdtemp(prefix=f"{shape.name}-fleet{workers}-", dir=workdir))
    fleet = Fleet(procs, env, logdir)
    try:
        fleet.spawn("scheduler", "scheduler")
        for i in range(workers):
            fleet.spawn(f"worker{i}", "worker")
        monitor_log = logdir / "monitor.log" if breakdown else None
        run = asyncio.run(_fleet(fleet, web, server, workers, per_poll, monitor_log))
    finally:
        fleet.stop()
    out = logdir / "export.jsonl"
    exported = procs.run([CRAWLFLEET, "export", "--out", str(out)], env=env)
    if exported.returncode != 0:
        raise BenchError(f"crawlfleet export failed: {exported.stderr[-2000:]}")
    problems = check_results(exported_urls(out), run.urls, web,
                             f"{shape.name}, {FLEET_PREFIX}{workers}")
    warnings += problems
    run.incomplete = bool(problems)
    out.unlink()
    with redis.Redis.from_url(server.url) as client:
        client.flushdb()  # keep the private Redis small between runs
    return run


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine_facts() -> list[str]:
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    redis_version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                                   check=False).stdout.split()
    return [
        f"machine: nproc {len(os.sched_getaffinity(0))} ({os.cpu_count()} online), {cpu}, "
        f"{platform.system()} {platform.release()}",
        f"python {platform.python_version()} ({platform.python_implementation()}), aiohttp "
        f"{aiohttp.__version__}, {' '.join(redis_version[:3])}",
    ]


def median_of(runs: list[Run]) -> Run:
    """The run with the median elapsed time (the upper middle one for an even count)."""
    return sorted(runs, key=lambda r: r.elapsed_s)[len(runs) // 2]


NOT_CRAWLER = ("testweb", CpuMeter.SELF, CpuMeter.OTHERS)  # CPU that is not the crawl's own
PROCESS_ORDER = ("floor", "naive", "scrapy", "crawl process", "workers", "worker", "scheduler",
                 "redis-server")


def median(values: Iterator[float | None] | list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


@dataclass
class Row:
    """One measurement of one shape: its runs and their medians."""

    label: str
    runs: list[Run]

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs)

    @property
    def seconds(self) -> float:
        return statistics.median(r.elapsed_s for r in self.runs)

    @property
    def shown(self) -> str:
        """The label, flagged when some runs' results were not the reachable set."""
        bad = sum(r.incomplete for r in self.runs)
        return f"{self.label} (!{bad}/{len(self.runs)})" if bad else self.label

    @property
    def is_fleet(self) -> bool:
        return self.label.startswith(FLEET_PREFIX)

    @property
    def uses_redis(self) -> bool:
        return self.runs[0].redis_bytes is not None

    def processes(self) -> list[str]:
        """The crawler's own processes (CPU components), then the test web."""
        names = [n for n in self.runs[0].cpu if n not in NOT_CRAWLER]
        names.sort(key=lambda n: PROCESS_ORDER.index(n) if n in PROCESS_ORDER else 99)
        return [*names, "testweb"]

    def cpu_ms(self, name: str) -> float:
        return statistics.median(r.cpu_ms(name) for r in self.runs)

    def own_cpu_ms(self) -> float:
        return statistics.median(
            1000 * sum(v for n, v in r.cpu.items() if n not in NOT_CRAWLER) / r.urls
            for r in self.runs)

    def cores(self, name: str) -> float:
        return statistics.median(r.cpu.get(name, 0.0) / r.cpu_window_s for r in self.runs
                                 if r.cpu_window_s > 0)

    def redis_per_page(self) -> float | None:
        return median([r.redis_total / r.urls for r in self.runs]) if self.uses_redis else None

    def bytes_per_seen(self) -> float | None:
        return median([r.redis_bytes / r.seen if r.redis_bytes is not None and r.seen else None
                       for r in self.runs])

    def seen_bytes_per_url(self) -> float | None:
        return median([r.seen_bytes / r.seen if r.seen_bytes is not None and r.seen else None
                       for r in self.runs])

    def rss_mb(self, name: str) -> float:
        return statistics.median(r.rss_kb.get(name, 0) for r in self.runs) / 1024


@dataclass
class ShapeResult:
    shape: Shape
    web: TestWeb
    rows: dict[str, Row]
    breakdowns: dict[int, Run] = field(default_factory=dict)

    def ratio(self, label: str, to: str) -> float | None:
        base = self.rows.get(to)
        return self.rows[label].rate / base.rate if base and base.rate > 0 else None


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def cpu_cells(row: Row) -> str:
    return " · ".join(f"{n} {row.cpu_ms(n):.2f}" for n in row.processes())


def rss_cells(row: Row) -> str:
    return " · ".join(f"{n} {row.rss_mb(n):.0f}" for n in row.runs[0].rss_kb)


def redis_cells(row: Row) -> str:
    if not row.uses_redis:
        return "-"
    run = median_of(row.runs)
    top = ", ".join(f"{cmd} {calls / run.urls:.1f}"
                    for cmd, calls in run.redis_calls.most_common(4))
    seen = "dedup SET" if row.label == NAIVE_ROW else f"seen set ({run.seen_keys} keys)"
    return (f"{_fmt(row.redis_per_page(), '.1f')} cmds/page (top: {top}) · "
            f"{_fmt(row.bytes_per_seen(), '.0f')} B per seen URL in all · {seen} "
            f"{_fmt(row.seen_bytes_per_url(), '.1f')} B/URL")


@dataclass(frozen=True)
class Verdict:
    target: str
    shape: str
    row: str
    measured: str
    met: bool | None  # None: no figure


def verdicts(result: ShapeResult) -> list[Verdict]:
    """Each of the project's targets against the measured figures of each fleet."""
    out = []
    name = result.shape.name
    for label, row in result.rows.items():
        if not row.is_fleet:
            continue

        def add(target: str, value: float | None, limit: float, unit: str, spec: str,
                at_least: bool = False, label: str = label) -> None:
            met = None if value is None else (value >= limit if at_least else value <= limit)
            out.append(Verdict(target, name, label, _fmt(value, spec, unit), met))

        low, goal = TARGET_RATIO.get(name, (None, None))
        ratio = result.ratio(label, NAIVE_ROW)
        if low is not None:
            target = f"{'one site' if name == 'one' else 'many sites'} ≥ {low:.1f}{TIMES} naive"
            if goal is not None:
                reached = ratio is not None and ratio >= goal
                target += f" (goal {goal:.1f}{TIMES}: {'reached' if reached else 'not reached'})"
            # Where the floor itself (no Redis, URLs known in advance) is below the target, no
            # crawler can meet it on this shape: said beside the verdict, which stays as it is.
            floor = result.ratio(PARSE_FLOOR, NAIVE_ROW)
            if floor is not None and floor < low:
                target += f" (the fetch+parse floor is {floor:.2f}{TIMES} naive here)"
            bound, naive = result.shape.bound(), result.rows.get(NAIVE_ROW)
            if bound is not None and naive is not None and naive.rate > 0 \
                    and bound / naive.rate < low:
                target += (f" (the politeness bound is {bound / naive.rate:.2f}{TIMES} naive "
                           "here)")
            add(target, ratio, low, TIMES, ".2f", at_least=True)
        scrapy = result.ratio(label, SCRAPY_ROW)
        if name != "one" and SCRAPY_ROW in result.rows:
            target = f"many sites ≥ {TARGET_SCRAPY_RATIO:g}{TIMES} Scrapy"
            floor = result.ratio(PARSE_FLOOR, SCRAPY_ROW)
            if floor is not None and floor < TARGET_SCRAPY_RATIO:
                target += f" (the fetch+parse floor is {floor:.1f}{TIMES} Scrapy here)"
            add(target, scrapy, TARGET_SCRAPY_RATIO, TIMES, ".1f", at_least=True)
        add(f"≤ {TARGET_REDIS_CMDS:g} Redis commands per page", row.redis_per_page(),
            TARGET_REDIS_CMDS, "", ".1f")
        for process, limit in TARGET_CPU_MS.items():
            what = {"workers": "worker(s)", "redis-server": "Redis"}.get(process, process)
            add(f"{what} ≤ {limit:g} CPU-ms per page", row.cpu_ms(process), limit, " ms",
                ".2f" if limit >= 1 else ".3f")
        # The seen set's target is over 1,000,000 URLs (benchmarks/scheduler.py judges it);
        # at a few thousand its buckets are mostly per-key overhead.
        rss = f"worker RSS ≤ {TARGET_WORKER_RSS_MB:g} MB"
        if name == INFLIGHT and row.rate > 0:
            rss += (f" at ≥ {row.rate * result.shape.latency_ms / 1000:.0f} fetches in flight "
                    f"(pages/s {TIMES} latency, Little's law; "
                    f"{result.shape.max_in_flight} allowed)")
        add(rss, row.rss_mb("worker"), TARGET_WORKER_RSS_MB, " MB", ".0f")
    return out


def met_word(met: bool | None) -> str:
    return {True: "met", False: "NOT MET", None: "no figure"}[met]


def report_shape(args: argparse.Namespace, result: ShapeResult, per_poll: PollCost) -> None:
    shape, rows, n = result.shape, result.rows, args.repeat
    rule = "-" * 100
    print()
    print("=" * 100)
    print(f"Shape {shape.name!r}: {shape.describe()}; {len(result.web.reachable)} URLs per "
          f"crawl (robots.txt 404 everywhere: nothing disallowed); median of {n}")
    print(rule)
    width = max(len(row.shown) for row in rows.values()) + 2
    print(f"{'':<{width}}{'pages/s':>8}{TIMES + ' naive':>9}{TIMES + ' floor':>9}{'seconds':>9}"
          f"   runs (pages/s)          ({TIMES} floor: to the fetch+parse floor)")
    for label, row in rows.items():
        every = ", ".join(f"{r.rate:.0f}" for r in row.runs)
        print(f"{row.shown:<{width}}{row.rate:8.0f}"
              f"{_fmt(result.ratio(label, NAIVE_ROW), '9.2f'):>9}"
              f"{_fmt(result.ratio(label, PARSE_FLOOR), '9.2f'):>9}{row.seconds:9.2f}   {every}")
    if any(row.shown != row.label for row in rows.values()):
        print("(!k/n): in k of n runs the crawl's results were NOT the reachable set (see the "
              "warnings at the end); their pages/s are over fewer URLs")
    print(rule)
    print("CPU ms per page, per process (median; floors: this process; embedded: the crawl "
          "process's whole life, start-up included; fleets' redis-server: the benchmark's "
          f"status polls, {1e6 * per_poll.redis_cpu_s:.0f} µs of Redis CPU each, measured on "
          f"the idle server at the crawl's pace ({1000 * POLL_S:.0f} ms), taken out):")
    for label, row in rows.items():
        print(f"  {label:<{width}}{cpu_cells(row)}")
    print(f"Cores busy during each run (median; {len(os.sched_getaffinity(0))} cores in all; "
          "'others': the rest of the machine, not part of the benchmark):")
    for label, row in rows.items():
        names = [*row.processes(), CpuMeter.SELF, CpuMeter.OTHERS]
        busy = {nm: row.cores(nm) for nm in names if nm in row.runs[0].cpu}
        others = busy.pop(CpuMeter.OTHERS, 0.0)
        parts = ", ".join(f"{nm} {b:.2f}" for nm, b in busy.items())
        print(f"  {label:<{width}}{parts}; total {sum(busy.values()):.2f} (+ others "
              f"{others:.2f}) | {row.own_cpu_ms():.2f} ms CPU/page without the test web")
    print(rule)
    print("Redis (median): commands per page (INFO commandstats: commands inside Lua scripts "
          f"count too; the benchmark's status polls, {sum(per_poll.calls.values())} commands "
          "each, are subtracted), used_memory growth per seen URL, the seen set per URL:")
    for label, row in rows.items():
        if row.uses_redis:
            print(f"  {label:<{width}}{redis_cells(row)}")
    print("Peak RSS, MB (VmHWM just before the process stopped; fleets: the largest worker):")
    for label, row in rows.items():
        print(f"  {label:<{width}}{rss_cells(row)}")
    print(rule)
    marks = (0.1, 0.5, 0.9, 1.0)
    print(f"Progress, seconds until {' / '.join(f'{m:.0%}' for m in marks)} of the URLs were "
          "fetched (median; fleets: from their status polls):")
    for label, row in rows.items():
        if not row.runs[0].progress:
            continue
        times = []
        for mark in marks:
            reached = [t for r in row.runs if (t := r.time_to(mark)) is not None]
            times.append(f"{statistics.median(reached):5.2f}" if reached else "    -")
        print(f"  {label:<{width}}{' / '.join(times)}")
    if result.breakdowns:
        print(rule)
        print("Sent by clients vs run inside Lua scripts (one extra, untimed crawl per fleet size "
              "under MONITOR; the benchmark's own connection excluded), per page:")
        for workers, run in result.breakdowns.items():
            print(f"  {workers} worker(s): MONITOR saw {sum(run.by_source.values())} commands, "
                  f"commandstats counted {run.redis_total} in the same crawl")
            for source in ("client", "lua"):
                calls = Counter({c: k for (s, c), k in run.by_source.items() if s == source})
                top = ", ".join(f"{c} {k / run.urls:.1f}" for c, k in calls.most_common(6))
                print(f"  {workers} worker(s), {source:<6}: {sum(calls.values()) / run.urls:5.1f}"
                      f"/page; {top}")
    print(rule)
    print("Targets (fleets):")
    for v in verdicts(result):
        print(f"  {v.row:<12} {v.target:<58} {v.measured:>9}  {met_word(v.met)}")
    bound = shape.bound()
    if bound:
        best = max(rows.values(), key=lambda row: row.rate)
        print(f"  * Per-host bound: {shape.hosts} host(s) {TIMES} {shape.per_host_concurrency} "
              f"in flight / {shape.latency_ms:g} ms: at most {bound:.0f} pages/s for anyone; "
              f"the fastest here ({best.label}) reaches {best.rate / bound:.0%} of it.")


def report(args: argparse.Namespace, results: list[ShapeResult], per_poll: PollCost,
           warnings: list[str], load_before: tuple[float, float, float]) -> None:
    for result in results:
        report_shape(args, result, per_poll)
    rule = "-" * 100
    print(rule)
    print("Notes:")
    print("  * The floors fetch a list they are given: no link discovery, no dedup, no "
          "robots.txt, every host busy from the first second. That favours them.")
    print("  * naive: benchmarks/naive.py, robots.txt ignored (never fetched), one SADD per link "
          "(pipelined per page), no retries, no leases, no crash safety, no result store.")
    print("  * Fleet time: from `crawlfleet seed`'s 'enqueued' line to the first status poll "
          f"saying finished (every {POLL_S * 1000:.0f} ms); the processes were already up. "
          "Embedded time: its own summary line (includes writing its results file). naive: "
          "from its start signal to its last page.")
    print(f"  * parameters: {' '.join(parameters(args))}; other settings at their defaults "
          f"unless set (batch size {DEFAULTS.batch_size}, jobs per worker "
          f"{DEFAULTS.jobs_per_worker}, poll delay {DEFAULTS.poll_delay} s, dispatch ahead "
          f"{DEFAULTS.dispatch_ahead}, host turn {DEFAULTS.host_turn_pages} pages / "
          f"{DEFAULTS.host_turn_seconds:g} s)")
    for line in machine_facts():
        print(f"  * {line}")
    print("  * load average before the benchmark / now: "
          f"{' '.join(f'{x:.2f}' for x in load_before)} / "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if warnings:
        print(rule)
        for warning in warnings:
            print(warning)
    else:
        print("  * every crawl's results were exactly the reachable set (count and URLs), and "
              "each fetched every reachable URL once")


def parameters(args: argparse.Namespace) -> list[str]:
    return [f"--shape {args.shape}", f"--hosts {args.hosts}", f"--pages {args.pages}",
            f"--links {args.links}", f"--per-host-concurrency {args.per_host_concurrency}",
            f"--one-pages {args.one_pages}", f"--one-links {args.one_links}",
            f"--one-concurrency {args.one_concurrency}",
            f"--one-latency-ms {args.one_latency_ms:g}", f"--latency-ms {args.latency_ms:g}",
            f"--crawl-delay {args.crawl_delay:g}", f"--max-in-flight {args.max_in_flight}",
            f"--workers {','.join(map(str, args.workers))}", f"--repeat {args.repeat}",
            *(f"--set {k}={v}" for k, v in args.env)]


# --------------------------------------------------------------------------------------------
# docs/benchmarks.md (and its figures as JSON, for benchmarks/scheduler.py)
# --------------------------------------------------------------------------------------------

# benchmarks/scheduler.py --write-docs keeps its own section between these lines, and
# benchmarks/memory.py its own between the same lines with its name.
SCHEDULER_BEGIN = "<!-- benchmarks/scheduler.py: begin -->"
SCHEDULER_END = "<!-- benchmarks/scheduler.py: end -->"
_SECTION = re.compile(r"<!-- (benchmarks/[\w.-]+\.py): begin -->.*?<!-- \1: end -->", re.DOTALL)


def kept_section(path: Path) -> str:
    """The sections other scripts wrote into ``path`` (with their markers, in their order),
    or ''."""
    with contextlib.suppress(OSError):
        return "\n".join(m[0] + "\n" for m in _SECTION.finditer(path.read_text()))
    return ""


def docs_markdown(args: argparse.Namespace, argv: list[str], results: list[ShapeResult],
                  warnings: list[str], load: tuple[float, float, float],
                  per_poll: PollCost) -> str:
    n = args.repeat
    lines = [
        "# Benchmarks",
        "",
        "Written by `benchmarks/throughput.py --write-docs`: every figure below is measured, "
        "none is typed in. Run it again to refresh this file.",
        "",
        f"* date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"* command: `{shlex.join(['python', 'benchmarks/throughput.py', *argv])}`",
        f"* parameters: `{' '.join(parameters(args))}`",
        *(f"* {fact}" for fact in machine_facts()),
        f"* load average at the start / at the end: {' '.join(f'{x:.2f}' for x in load)} / "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())} (other work on the machine makes "
        "every figure noisier)",
        "",
        f"Each figure is the median of {n} run{'s' if n > 1 else ''}. pages/s counts every URL "
        f"fetched (pages and 404s). {TIMES} naive and {TIMES} floor are ratios of pages/s to the "
        "naive crawler and to the fetch+parse floor. CPU is milliseconds per page of each process; "
        "a fleet's redis-server has the benchmark's own status polls taken out "
        f"({1e6 * per_poll.redis_cpu_s:.0f} µs of Redis CPU each, measured on the idle server "
        f"at the crawl's pace, a poll every {1000 * POLL_S:.0f} ms), "
        "as its Redis commands do. Redis B/URL is used_memory growth over the crawl per seen "
        "URL; seen B/URL the seen set alone (MEMORY USAGE of its keys). RSS is the peak "
        "(VmHWM) in MB. robots.txt answers 404 on every host, so every crawler fetches exactly "
        "the reachable set, which each crawl's results were checked against.",
        "",
    ]
    for result in results:
        shape = result.shape
        lines += [f"## Shape `{shape.name}`: {shape.describe()}", "",
                  f"{len(result.web.reachable)} URLs per crawl.", "",
                  f"| what | pages/s | {TIMES} naive | {TIMES} floor | CPU ms/page | "
                  "Redis cmds/page | "
                  "Redis B/URL | seen B/URL | peak RSS MB |",
                  "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: | --- |"]
        for label, row in result.rows.items():
            lines.append(
                f"| {row.shown} | {row.rate:,.0f} | {_fmt(result.ratio(label, NAIVE_ROW), '.2f')} "
                f"| {_fmt(result.ratio(label, PARSE_FLOOR), '.2f')} | {cpu_cells(row)} | "
                f"{_fmt(row.redis_per_page(), '.1f')} | {_fmt(row.bytes_per_seen(), ',.0f')} | "
                f"{_fmt(row.seen_bytes_per_url(), '.1f')} | {rss_cells(row)} |")
        if any(row.shown != row.label for row in result.rows.values()):
            lines += ["", "(!k/n): in k of n runs the crawl's results were NOT the reachable "
                      "set (see Warnings); their pages/s are over fewer URLs."]
        bound = shape.bound()
        if bound:
            lines += ["", f"No crawler can pass {bound:,.0f} pages/s here ({shape.hosts} host(s) "
                      f"{TIMES} {shape.per_host_concurrency} in flight / {shape.latency_ms:g} ms)."]
        lines.append("")
    lines += ["## Targets", "",
              "From the issue, judged on each fleet's measured median. The seen set's bytes per "
              "URL at this crawl size are mostly per-key overhead (the buckets are nearly "
              "empty); see the frontier section for 1 M URLs when it is there. The CPU-ms "
              "targets are absolute, so they depend on the machine: " + machine_speed(results)
              + ".", "",
              "| target | shape | run | measured | |", "| --- | --- | --- | ---: | --- |"]
    for result in results:
        for v in verdicts(result):
            word = met_word(v.met)
            lines.append(f"| {v.target} | {v.shape} | {v.row} | {v.measured} | "
                         f"{word if v.met else f'**{word}**'} |")
    lines.append("")
    if warnings:
        lines += ["## Warnings", "", *(f"* {w}" for w in warnings), ""]
    return "\n".join(lines)


def machine_speed(results: list[ShapeResult]) -> str:
    """How fast this machine is, in the figure every run has: the fetch+parse floor's own CPU
    per page (one process, no Redis), by shape."""
    speeds = [f"{row.cpu_ms('floor'):.2f} CPU-ms a page on `{r.shape.name}`" for r in results
              if (row := r.rows.get(PARSE_FLOOR)) is not None and row.cpu_ms("floor")]
    if not speeds:
        return "no floor ran to gauge this one"
    return "the fetch+parse floor's own process spends " + ", ".join(speeds) + " here"


def docs_figures(results: list[ShapeResult]) -> dict[str, Any]:
    """The medians as JSON (benchmarks/scheduler.py reads a worker's page rate from it)."""
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "shapes": {}}
    for result in results:
        rows = {}
        for label, row in result.rows.items():
            rows[label] = {
                "pages_per_s": round(row.rate, 1),
                "cpu_ms_per_page": {n: round(row.cpu_ms(n), 4) for n in row.processes()},
                "redis_commands_per_page": row.redis_per_page(),
                "redis_bytes_per_seen_url": row.bytes_per_seen(),
                "seen_bytes_per_url": row.seen_bytes_per_url(),
                "peak_rss_mb": {n: round(row.rss_mb(n), 1) for n in row.runs[0].rss_kb},
            }
        out["shapes"][result.shape.name] = {"describe": result.shape.describe(),
                                            "urls": len(result.web.reachable), "rows": rows}
    return out


def write_docs(path: Path, text: str, figures: dict[str, Any]) -> None:
    kept = kept_section(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + ("\n" + kept if kept else ""))
    path.with_suffix(".json").write_text(json.dumps(figures, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


SHARED_WITH_FLOOR = ("CRAWLFLEET_MAX_IN_FLIGHT", "CRAWLFLEET_PER_HOST_CONCURRENCY",
                     "CRAWLFLEET_CRAWL_DELAY")


def crawler_setting(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    name = name.strip().upper()
    if not name.startswith("CRAWLFLEET_"):
        name = "CRAWLFLEET_" + name
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    if name in SHARED_WITH_FLOOR:
        raise argparse.ArgumentTypeError(f"{name} applies to the floor too: use its own option")
    return name, value.strip()


def worker_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,2,4, got {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError("worker counts must be 1 or more")
    return counts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Throughput of crawlfleet (embedded, and fleets of N workers) against a "
        "naive crawler and the bare fetch (and parse) floors, on the local test web, for three "
        "site shapes. See the module docstring.")
    p.add_argument("--shape", choices=("many", "docs", "one", "both", INFLIGHT, "all"),
                   default="all",
                   help="site shape(s) to measure (default all; both: many and one)")
    many = p.add_argument_group("the 'many' shape")
    many.add_argument("--hosts", type=int, default=20, help="test web hosts (default 20)")
    many.add_argument("--pages", type=int, default=150, help="HTML pages per host (default 150)")
    many.add_argument("--links", type=int, default=8, help="links per page (default 8)")
    many.add_argument("--per-host-concurrency", type=int, default=DEFAULTS.per_host_concurrency,
                      help="fetches in flight per host (CRAWLFLEET_PER_HOST_CONCURRENCY, "
                      f"default {DEFAULTS.per_host_concurrency})")
    docs = p.add_argument_group("the 'docs' shape (many documentation sites)")
    docs.add_argument("--docs-hosts", type=int, default=40, help="hosts (default 40)")
    docs.add_argument("--docs-pages", type=int, default=150,
                      help="HTML pages per host (default 150)")
    docs.add_argument("--docs-links", type=int, default=100,
                      help="links per page (default 100)")
    docs.add_argument("--docs-concurrency", type=int, default=4,
                      help="fetches in flight per host (default 4)")
    one = p.add_argument_group("the 'one' shape (one host)")
    one.add_argument("--one-pages", type=int, default=1200, help="HTML pages (default 1200)")
    one.add_argument("--one-links", type=int, default=100, help="links per page (default 100)")
    one.add_argument("--one-concurrency", type=int, default=16,
                     help="fetches in flight to the host (default 16)")
    one.add_argument("--one-latency-ms", type=float, default=0.0,
                     help="test web latency per response (default 0: CPU-bound, as the "
                     "issue measured it)")
    p.add_argument("--in-flight", type=int, default=256,
                   help="fetches in flight for the inflight shape (default 256; 0: skip it)")
    p.add_argument("--in-flight-pages", type=int, default=2000,
                   help="pages of the inflight shape's host (default 2000)")
    both = p.add_argument_group("every shape")
    both.add_argument("--latency-ms", type=float, default=20.0,
                      help="test web latency per response, 'many' and 'docs' (default 20)")
    both.add_argument("--crawl-delay", type=float, default=0.0,
                      help="seconds between request starts per host, for every crawler "
                      "(CRAWLFLEET_CRAWL_DELAY; default 0: measure the machinery, not "
                      f"politeness; crawlfleet's own default is {DEFAULTS.crawl_delay})")
    both.add_argument("--max-in-flight", type=int, default=DEFAULTS.max_in_flight,
                      help="fetches in flight per process (CRAWLFLEET_MAX_IN_FLIGHT)")
    p.add_argument("--workers", type=worker_counts, default=[1, 2],
                   help="fleet sizes, comma-separated (default 1,2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--set", dest="env", type=crawler_setting, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="a crawler setting for every crawl, e.g. --set BATCH_SIZE=50 "
                   "(CRAWLFLEET_ prefix optional; repeatable)")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded backend")
    p.add_argument("--no-scrapy", dest="scrapy", action="store_false", default=None,
                   help="skip Scrapy (benchmarks/scrapy_peer.py; it runs on the many and docs "
                   "shapes when Scrapy is installed: pip install -e '.[bench]')")
    p.add_argument("--redis-breakdown", action="store_true",
                   help="one more crawl per fleet size under MONITOR: commands sent by clients "
                   "vs run inside Lua scripts (untimed)")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH",
                   help=f"write the tables and targets to PATH (default {DOCS}) and the "
                   "figures to PATH with .json")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary log folder")
    return p


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="crawlfleet-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"logs kept in {path}", file=sys.stderr)
        else:
            shutil.rmtree(path, ignore_errors=True)


def progress(i: int, shape: Shape, label: str, run: Run) -> None:
    extra = f", {run.redis_total} Redis commands" if run.redis_calls else ""
    print(f"  run {i}: {shape.name:<4} {label:<18} {run.urls} URLs in {run.elapsed_s:6.2f} s = "
          f"{run.rate:5.0f} pages/s{extra}", file=sys.stderr, flush=True)


def measure_shape(
    procs: Processes, shape: Shape, args: argparse.Namespace, server: RedisServer,
    per_poll: PollCost, workdir: Path, warnings: list[str],
) -> ShapeResult:
    web = start_testweb(procs, shape, workdir)
    labels = [FETCH_FLOOR, PARSE_FLOOR, NAIVE_ROW,
              *([SCRAPY_ROW] if args.scrapy and shape.name != "one" else []),
              *([] if args.no_embedded else [EMBEDDED]),
              *(f"{FLEET_PREFIX}{w}" for w in args.workers)]
    if shape.name == INFLIGHT:
        labels = [NAIVE_ROW, f"{FLEET_PREFIX}1"]
    result = ShapeResult(shape, web, {label: Row(label, []) for label in labels})
    print(f"test web {shape.name!r}: {shape.describe()}; {len(web.reachable)} URLs to fetch; "
          f"redis-server on port {server.port}; work folder {workdir}", file=sys.stderr)
    try:
        for i in range(1, args.repeat + 1):
            for label in labels:
                if label == FETCH_FLOOR:
                    run = measure_floor(web, shape, parse=False)
                elif label == PARSE_FLOOR:
                    run = measure_floor(web, shape, parse=True)
                elif label == NAIVE_ROW:
                    run = measure_naive(procs, web, shape, server, workdir, warnings)
                elif label == SCRAPY_ROW:
                    run = measure_naive(procs, web, shape, server, workdir, warnings,
                                        SCRAPY_PEER, SCRAPY_ROW)
                elif label == EMBEDDED:
                    run = measure_embedded(procs, web, shape, args, workdir, warnings)
                else:
                    workers = int(label.removeprefix(FLEET_PREFIX))
                    run = measure_fleet(procs, web, shape, args, server, workers, per_poll,
                                        workdir, warnings)
                result.rows[label].runs.append(run)
                progress(i, shape, label, run)
        if args.redis_breakdown:
            for w in args.workers:
                result.breakdowns[w] = run = measure_fleet(
                    procs, web, shape, args, server, w, per_poll, workdir, warnings,
                    breakdown=True)
                progress(0, shape, f"{FLEET_PREFIX}{w} under MONITOR", run)
    finally:
        procs.stop(web.proc)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.in_flight < 0 or (args.in_flight and args.in_flight_pages < 1):
        raise SystemExit("--in-flight must be 0 or more, --in-flight-pages at least 1")
    if min(args.repeat, args.hosts, args.pages, args.docs_hosts, args.docs_pages,
           args.one_pages, args.per_host_concurrency, args.docs_concurrency,
           args.one_concurrency, args.max_in_flight) < 1 or min(
               args.links, args.docs_links, args.one_links) < 0:
        raise SystemExit("--repeat, the host and page counts and the concurrencies must be at "
                         "least 1, the link counts at least 0")
    if args.scrapy is None:
        args.scrapy = scrapy_installed()
    load_before = os.getloadavg()
    began = time.monotonic()
    warnings: list[str] = []
    results: list[ShapeResult] = []
    with benchmark_processes() as procs, workspace(args.keep_logs) as workdir:
        try:
            server = start_redis(procs, workdir)
            per_poll = asyncio.run(poll_cost(server))
            for shape in shapes_from(args):
                results.append(measure_shape(procs, shape, args, server, per_poll, workdir,
                                             warnings))
        finally:
            procs.stop_all()  # before the work folder (their logs) goes
        report(args, results, per_poll, warnings, load_before)
        if args.write_docs:
            path = Path(args.write_docs)
            text = docs_markdown(args, argv, results, warnings, load_before, per_poll)
            write_docs(path, text, docs_figures(results))
            print(f"wrote {path} and {path.with_suffix('.json')}")
    print(f"(benchmark wall time {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
