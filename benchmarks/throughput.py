"""Throughput of crawlfleet on the local test web, next to the floor it is compared to.

Usage::

    .venv/bin/python benchmarks/throughput.py [--hosts 20] [--pages 150] [--workers 1,2,4]
                                              [--latency-ms 20] [--repeat 3]

Everything runs on loopback: one ``crawlfleet testweb`` (HTTP + DNS), one private
``redis-server`` on a free port, and the crawler's own processes. Every run stops by itself
(deadlines everywhere), and every process started here is stopped (its process group gets
SIGTERM, then SIGKILL) on the way out, Ctrl-C and errors included.

Rates are URLs fetched per second: pages plus failures (the test web's 404s are one HTTP request
and one result each, like a page). URLs that robots.txt disallows are recorded by the crawler
without a request and are not counted.

floor
    The bare fetch-and-parse loop in ONE process: no Redis, no scheduler, no arq. One aiohttp
    session made by ``crawlfleet.workers.worker.worker_session`` (the worker's resolver,
    connector limits and timeouts), the same per-host concurrency and global in-flight cap (one
    ``asyncio.Semaphore`` per host, one for the process), the same start-to-start delay per host
    (``--crawl-delay``), and every HTML body parsed with ``crawlfleet.workers.parse.parse_page``.
    It fetches exactly the URLs a polite crawl fetches (``crawlfleet testweb --print-reachable
    --obey-robots``), known in advance: no discovery, no dedup, no robots.txt, no waiting for a
    parent page before its links can be fetched, every host busy from the first second. That
    favours the floor, most of all at the start of a crawl, when the crawler knows only the
    seeds.

crawlfleet embedded
    ``crawlfleet crawl <seeds> --workers 2`` without ``CRAWLFLEET_REDIS_URL``: scheduler and two
    arq workers in one process over fakeredis. Its elapsed time is the one its summary line
    reports (seeding to finished, plus writing the results file).

crawlfleet fleet, N workers
    ``crawlfleet scheduler`` and N ``crawlfleet worker`` processes on the private Redis, in a
    fresh namespace, started and polling before the clock starts. Timed from the moment
    ``crawlfleet seed`` reports its seeds enqueued (its stderr line, read as it is written) to
    the first status poll that says ``finished`` (``read_status`` through redis-py, every
    ``POLL_S``). Redis commands: ``CONFIG RESETSTAT`` before seeding, ``INFO commandstats`` at
    the end. The benchmark's own status polls are subtracted exactly (their commands are
    measured once at start-up) and ``INFO``/``CONFIG`` are never counted. commandstats counts
    the commands that Lua scripts run (``redis.call``) as well as those clients send;
    ``--redis-breakdown`` adds one untimed crawl per fleet size under ``MONITOR`` to tell the two
    apart.

CPU: the CPU seconds each process used during each timed run (``/proc/PID/stat``), shown as
cores busy, so one can see whether the machine's cores, the test web or the crawler bound a run.
The test web is one Python process on the same cores as everything else.

Each figure is the median of ``--repeat`` runs. The runs of one repeat are interleaved (floor,
embedded, fleet 1, fleet 2, ...) so that drift on the machine spreads over all of them. Every
crawl's results are checked against the test web's reachable list (count and URL set), and its
count of fetched URLs against the floor's list.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import resource
import selectors
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
from crawlfleet.workers.batch import PACING_MARGIN
from crawlfleet.workers.pacing import Pacer
from crawlfleet.workers.parse import BodyError, is_html, parse_page
from crawlfleet.workers.worker import worker_session

BIN = Path(sys.executable).parent
CRAWLFLEET = str(BIN / "crawlfleet") if (BIN / "crawlfleet").exists() else "crawlfleet"

POLL_S = 0.025  # status poll interval while a fleet crawls
STARTUP_TIMEOUT_S = 30.0  # for the test web, redis-server and the fleet's processes
CRAWL_TIMEOUT_S = 300.0  # one crawl; a crawl that takes longer fails the benchmark
STOP_TIMEOUT_S = 15.0  # SIGTERM -> exit, before SIGKILL
SHUTDOWN_GRACE_S = 5  # CRAWLFLEET_SHUTDOWN_GRACE for the fleet's workers (they are idle by then)
MEASUREMENT_COMMANDS = ("info", "config|resetstat", "client|list", "client|setname", "monitor")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
DEFAULTS = Settings()
TIMES = "\N{MULTIPLICATION SIGN}"


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
    """User + system CPU seconds of one live process (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


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
# The test web and Redis
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestWeb:
    pid: int
    dns: str
    seeds: list[str]
    reachable: list[str]  # a crawl's results: every URL it reaches, robots-skipped ones too
    fetched: list[str]  # the URLs a polite crawl requests (robots.txt obeyed): the floor's list


def start_testweb(procs: Processes, args: argparse.Namespace, logdir: Path) -> TestWeb:
    web_args = ["--hosts", str(args.hosts), "--pages", str(args.pages)]
    with (logdir / "testweb.log").open("wb") as log:
        proc = procs.start(
            [CRAWLFLEET, "testweb", "--port", "0", "--dns-port", "0", *web_args,
             "--latency-ms", str(args.latency_ms)],
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
    return TestWeb(proc.pid, ready["dns"], list(ready["seeds"]), *lists)


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
    redis_calls: Counter[str] = field(default_factory=Counter)  # fleet only
    polls: int = 0
    by_source: Counter[tuple[str, str]] = field(default_factory=Counter)  # --redis-breakdown
    progress: list[tuple[float, int]] = field(default_factory=list)  # (seconds, URLs done)

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


# --------------------------------------------------------------------------------------------
# Floor: fetch-and-parse of the known URL list, one process, no Redis
# --------------------------------------------------------------------------------------------


class HostPace:
    """At most ``concurrency`` requests in flight to a host, started by the crawler's own
    pacer (workers/pacing.py), so the floor paces exactly as a worker does."""

    def __init__(self, concurrency: int, delay: float) -> None:
        self.slots = asyncio.Semaphore(concurrency)
        self.pacer = Pacer(delay * PACING_MARGIN)


async def _floor(
    urls: list[str], settings: Settings, delay: float
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
                async with session.get(url, allow_redirects=False,
                                       trace_request_ctx=turn) as response:
                    body = await response.read()
                    status, content_type = response.status, response.headers.get("Content-Type")
            except (aiohttp.ClientError, TimeoutError) as exc:
                errors[type(exc).__name__] += 1
                return
            finally:
                turn.done()
        if status < 400 and is_html(content_type):
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


def measure_floor(web: TestWeb, args: argparse.Namespace) -> Run:
    settings = Settings(
        dns_nameservers=(web.dns,), allow_private=True,
        max_in_flight=args.max_in_flight, per_host_concurrency=args.per_host_concurrency,
    )
    meter = CpuMeter({"testweb": [web.pid]})
    meter.start()
    urls, elapsed, progress = asyncio.run(_floor(web.fetched, settings, args.crawl_delay))
    cpu, window = meter.stop()
    cpu = {"floor": cpu.pop(CpuMeter.SELF), **cpu}
    return Run(urls, elapsed, cpu, window, progress=progress)


# --------------------------------------------------------------------------------------------
# crawlfleet: the embedded backend, and a real fleet
# --------------------------------------------------------------------------------------------


def crawl_env(web: TestWeb, args: argparse.Namespace, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRAWLFLEET_")}
    env.update(
        CRAWLFLEET_NAMESPACE=f"bench{uuid.uuid4().hex}",
        CRAWLFLEET_DNS_NAMESERVERS=web.dns,
        CRAWLFLEET_ALLOW_PRIVATE="1",
        CRAWLFLEET_LOG_LEVEL="warning",
        CRAWLFLEET_LOG_FORMAT="json",
        CRAWLFLEET_MAX_IN_FLIGHT=str(args.max_in_flight),
        CRAWLFLEET_PER_HOST_CONCURRENCY=str(args.per_host_concurrency),
        CRAWLFLEET_CRAWL_DELAY=str(args.crawl_delay),
        CRAWLFLEET_SHUTDOWN_GRACE=str(SHUTDOWN_GRACE_S),
    )
    env.update(args.env)
    env.update(extra)
    return env


def check_results(path: Path, fetched: int, web: TestWeb, label: str) -> list[str]:
    """Warnings if the results are not exactly the reachable set, or the fetch count is off."""
    urls = [json.loads(line)["url"] for line in path.read_text().splitlines() if line.strip()]
    got, expected = set(urls), set(web.reachable)
    warnings = []
    if len(urls) != len(web.reachable) or got != expected:
        warnings.append(
            f"WARNING {label}: export has {len(urls)} lines for {len(web.reachable)} reachable "
            f"URLs ({len(expected - got)} missing, {len(got - expected)} unexpected, "
            f"{len(urls) - len(got)} duplicated)")
    if fetched != len(web.fetched):
        warnings.append(f"WARNING {label}: {fetched} URLs fetched (pages + failed), the floor "
                        f"fetches {len(web.fetched)}")
    return warnings


_SUMMARY = re.compile(
    r"crawl (?P<state>finished|stopped before the end): (?P<pages>\d+) pages, "
    r"(?P<failed>\d+) failed.* in (?P<elapsed>[\d.]+) s"
)


def measure_embedded(
    procs: Processes, web: TestWeb, args: argparse.Namespace, workdir: Path, warnings: list[str]
) -> Run:
    out = workdir / "embedded.jsonl"
    meter = CpuMeter({"testweb": [web.pid]})
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    meter.start()
    done = procs.run([CRAWLFLEET, "crawl", *web.seeds, "--workers", "2", "--out", str(out)],
                     env=crawl_env(web, args), timeout=CRAWL_TIMEOUT_S)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    crawl_cpu = (children.ru_utime + children.ru_stime
                 - children_before.ru_utime - children_before.ru_stime)
    cpu, window = meter.stop({"crawl process": crawl_cpu})
    del cpu[CpuMeter.SELF]
    match = _SUMMARY.search(done.stderr)
    if done.returncode != 0 or match is None or match["state"] != "finished":
        raise BenchError(f"crawlfleet crawl failed ({done.returncode}): {done.stderr[-2000:]}")
    fetched = int(match["pages"]) + int(match["failed"])
    warnings += check_results(out, fetched, web, "embedded")
    out.unlink()
    return Run(fetched, float(match["elapsed"]), cpu, window)


async def command_calls(client: Redis) -> Counter[str]:
    """Calls per command since the last CONFIG RESETSTAT, without the benchmark's own."""
    stats = await client.info("commandstats")
    calls: Counter[str] = Counter()
    for name, values in stats.items():
        command = name.removeprefix("cmdstat_")
        if command not in MEASUREMENT_COMMANDS:
            calls[command] = int(values["calls"])
    return calls


BENCH_CLIENT_NAME = "crawlfleet-benchmark"


def connect(redis_url: str) -> Redis:
    # Named, so that its connections' addresses can be told apart in MONITOR output.
    client: Redis = Redis.from_url(redis_url, client_name=BENCH_CLIENT_NAME)
    return client


async def own_addresses(client: Redis) -> set[str]:
    return {c["addr"] for c in await client.client_list() if c.get("name") == BENCH_CLIENT_NAME}


async def calls_per_poll(redis_url: str) -> Counter[str]:
    """Redis commands one ``read_status`` poll costs (subtracted from a fleet's count)."""
    polls = 20
    client = connect(redis_url)
    try:
        keys = Keys(f"bench{uuid.uuid4().hex}")
        await read_status(client, keys)  # connect first: the handshake is not per poll
        await client.config_resetstat()
        for _ in range(polls):
            await read_status(client, keys)
        calls = await command_calls(client)
    finally:
        await client.aclose()
    per_poll: Counter[str] = Counter()
    for command, n in calls.items():
        if n % polls:
            raise BenchError(f"calibration: {n} {command} calls in {polls} status polls")
        per_poll[command] = n // polls
    return per_poll


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


async def wait_ready(client: Redis, workers: int, fleet: Fleet) -> None:
    """Until every worker polls arq's queue (its connection's last command is arq's
    ZRANGEBYSCORE) and the scheduler blocks on the events stream (XREADGROUP)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        fleet.check_alive()
        last = Counter(c.get("cmd") for c in await client.client_list())
        if last["zrangebyscore"] >= workers and last["xreadgroup"] >= 1:
            return
        await asyncio.sleep(0.05)
    raise BenchError(f"a fleet of {workers} did not start in {STARTUP_TIMEOUT_S:.0f} s")


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
    per_poll: Counter[str], monitor_log: Path | None,
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
        counting_until = time.time()
        calls = await command_calls(client)
        for command, n in per_poll.items():
            calls[command] -= n * polls
        run = Run(status["pages"] + status["failed"], elapsed, cpu, window, +calls, polls,
                  progress=progress)
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
    procs: Processes, web: TestWeb, args: argparse.Namespace, server: RedisServer, workers: int,
    per_poll: Counter[str], workdir: Path, warnings: list[str], *, breakdown: bool = False,
) -> Run:
    env = crawl_env(web, args, CRAWLFLEET_REDIS_URL=server.url)
    logdir = Path(tempfile.mkdtemp(prefix=f"fleet{workers}-", dir=workdir))
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
    warnings += check_results(out, run.urls, web, f"fleet of {workers}")
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


def cores_busy(runs: list[Run]) -> str:
    """Cores busy per component, and the crawler's (or the floor's) own CPU ms per URL."""
    names = list(runs[0].cpu)
    busy = {n: statistics.median(r.cpu.get(n, 0.0) / r.cpu_window_s for r in runs)
            for n in names}
    others = busy.pop(CpuMeter.OTHERS, 0.0)
    own_ms = statistics.median(
        1000 * sum(v for n, v in r.cpu.items() if n not in NOT_CRAWLER) / r.urls for r in runs
    )
    parts = ", ".join(f"{n} {b:.2f}" for n, b in busy.items())
    return (f"{parts}; total {sum(busy.values()):.2f} (+ other processes {others:.2f}) | "
            f"{own_ms:.2f} ms CPU/URL without the test web")


def report(
    args: argparse.Namespace, web: TestWeb, results: dict[str, list[Run]],
    per_poll: Counter[str], breakdowns: dict[int, Run], warnings: list[str],
    load_before: tuple[float, float, float],
) -> None:
    n = args.repeat
    floor_rate = statistics.median(r.rate for r in results["floor"])
    rule = "-" * 100
    print()
    print("=" * 100)
    print(f"Throughput: {len(web.fetched)} URLs fetched per crawl ({len(web.reachable)} results; "
          f"{len(web.reachable) - len(web.fetched)} are robots.txt-disallowed, recorded without a "
          f"request), {args.hosts} hosts; median of {n}")
    print(rule)
    rows = []
    for label, runs in results.items():
        rate = statistics.median(r.rate for r in runs)
        secs = statistics.median(r.elapsed_s for r in runs)
        every = ", ".join(f"{r.rate:.0f}" for r in runs)
        if label == "floor":
            rows.append(("floor (1 process, no Redis, URLs known):", f"{rate:6.0f} pages/s",
                         f"  (median of {n})", f"   {secs:6.2f} s; runs {every}"))
            continue
        ratio = f"  = {rate / floor_rate:.2f} {TIMES} floor"
        if label == "embedded":
            rows.append(("crawlfleet embedded, 2 in-process workers:", f"{rate:6.0f} pages/s",
                         ratio, f"   {secs:6.2f} s; runs {every}"))
            continue
        workers = int(label)
        per_page = statistics.median(r.redis_total / r.urls for r in runs)
        rows.append((f"crawlfleet fleet, {workers} worker{'s' if workers > 1 else ''}:",
                     f"{rate:6.0f} pages/s", ratio,
                     f"   {secs:6.2f} s; runs {every}   Redis cmds/page: {per_page:.1f}"))
    width = max(len(r[0]) for r in rows)
    for row in rows:
        print(f"{row[0]:<{width}} {row[1]}{row[2]:<18}{row[3]}")

    print(rule)
    print(f"CPU, in cores busy during each run (median; {len(os.sched_getaffinity(0))} cores in "
          "all; embedded: over the crawl process's whole life, start-up included; 'other "
          "processes': the rest of the machine, not part of the benchmark):")
    for label, runs in results.items():
        name = label if label in ("floor", "embedded") else f"fleet of {label}"
        print(f"  {name:<11} {cores_busy(runs)}")

    print(rule)
    marks = (0.1, 0.5, 0.9, 1.0)
    print(f"Progress, seconds until {' / '.join(f'{m:.0%}' for m in marks)} of the URLs were "
          "fetched (median; fleet: from its status polls):")
    for label, runs in results.items():
        if not runs[0].progress:
            continue
        name = label if label == "floor" else f"fleet of {label}"
        times = []
        for mark in marks:
            reached = [t for r in runs if (t := r.time_to(mark)) is not None]
            times.append(f"{statistics.median(reached):5.2f}" if reached else "    -")
        print(f"  {name:<11} {' / '.join(times)}")

    fleets = {int(k): v for k, v in results.items() if k.isdigit()}
    if fleets:
        print(rule)
        print("Redis commands, fleet (median run; INFO commandstats, so commands run inside Lua "
              f"scripts count too; the benchmark's status polls, {sum(per_poll.values())} "
              "commands each, are subtracted):")
        for workers, runs in fleets.items():
            run = median_of(runs)
            top = ", ".join(f"{cmd} {calls / run.urls:.1f}"
                            for cmd, calls in run.redis_calls.most_common(5))
            print(f"  {workers} worker(s): {run.redis_total} commands = "
                  f"{run.redis_total / run.urls:.1f}/page, {run.redis_total / run.elapsed_s:.0f}/s"
                  f" ({run.polls} polls subtracted); top 5 per page: {top}")
    if breakdowns:
        print(rule)
        print("Sent by clients vs run inside Lua scripts (one extra, untimed crawl per fleet size "
              "under MONITOR; the benchmark's own connection excluded), per page:")
        for workers, run in breakdowns.items():
            print(f"  {workers} worker(s): MONITOR saw {sum(run.by_source.values())} commands, "
                  f"commandstats counted {run.redis_total} in the same crawl")
            for source in ("client", "lua"):
                calls = Counter({c: k for (s, c), k in run.by_source.items() if s == source})
                top = ", ".join(f"{c} {k / run.urls:.1f}" for c, k in calls.most_common(6))
                print(f"  {workers} worker(s), {source:<6}: {sum(calls.values()) / run.urls:5.1f}"
                      f"/page; {top}")

    print(rule)
    print("Notes:")
    print("  * The floor fetches a list it is given: no link discovery, no dedup, no robots.txt, "
          "every host busy from the first second. That favours it.")
    if args.latency_ms > 0:
        per_host = args.per_host_concurrency / (args.latency_ms / 1000)
        if args.crawl_delay > 0:
            per_host = min(per_host, 1 / args.crawl_delay)
        bound = args.hosts * per_host
        print(f"  * Per-host bound: {args.hosts} hosts, {args.per_host_concurrency} in flight, "
              f"{args.latency_ms:g} ms latency, crawl delay {args.crawl_delay:g} s: at most "
              f"{bound:.0f} pages/s for anyone; the floor reaches {floor_rate / bound:.0%} of it.")
    print("  * Fleet time: from `crawlfleet seed`'s 'enqueued' line to the first status poll "
          f"saying finished (every {POLL_S * 1000:.0f} ms); the processes were already up. "
          "Embedded time: its own summary line (includes writing its results file).")
    print(f"  * parameters: --hosts {args.hosts} --pages {args.pages} --latency-ms "
          f"{args.latency_ms:g} --workers {','.join(map(str, args.workers))} --repeat {n} "
          f"--crawl-delay {args.crawl_delay:g} --max-in-flight {args.max_in_flight} "
          f"--per-host-concurrency {args.per_host_concurrency}"
          f"{''.join(f' --set {k}={v}' for k, v in args.env)}; other settings at their "
          f"defaults unless set (batch size {DEFAULTS.batch_size}, jobs per worker "
          f"{DEFAULTS.jobs_per_worker}, poll delay {DEFAULTS.poll_delay} s, dispatch ahead "
          f"{DEFAULTS.dispatch_ahead})")
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
              "each fetched as many URLs as the floor")


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
        description="Throughput of crawlfleet (embedded, and fleets of N workers) against the "
        "bare fetch-and-parse floor, on the local test web. See the module docstring.")
    p.add_argument("--hosts", type=int, default=20, help="test web hosts (default 20)")
    p.add_argument("--pages", type=int, default=150, help="HTML pages per host (default 150)")
    p.add_argument("--workers", type=worker_counts, default=[1, 2, 4],
                   help="fleet sizes, comma-separated (default 1,2,4)")
    p.add_argument("--latency-ms", type=float, default=20.0,
                   help="test web latency per response (default 20)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (default 3)")
    p.add_argument("--crawl-delay", type=float, default=0.0,
                   help="seconds between request starts per host, for the crawler "
                   "(CRAWLFLEET_CRAWL_DELAY) and the floor alike (default 0: measure the "
                   "machinery, not politeness; crawlfleet's own default is "
                   f"{DEFAULTS.crawl_delay})")
    p.add_argument("--max-in-flight", type=int, default=DEFAULTS.max_in_flight,
                   help="fetches in flight per process (CRAWLFLEET_MAX_IN_FLIGHT)")
    p.add_argument("--per-host-concurrency", type=int, default=DEFAULTS.per_host_concurrency,
                   help="fetches in flight per host (CRAWLFLEET_PER_HOST_CONCURRENCY)")
    p.add_argument("--set", dest="env", type=crawler_setting, action="append", default=[],
                   metavar="NAME=VALUE",
                   help="a crawler setting for every crawl, e.g. --set BATCH_SIZE=50 "
                   "(CRAWLFLEET_ prefix optional; repeatable)")
    p.add_argument("--no-embedded", action="store_true", help="skip the embedded backend")
    p.add_argument("--redis-breakdown", action="store_true",
                   help="one more crawl per fleet size under MONITOR: commands sent by clients "
                   "vs run inside Lua scripts (untimed)")
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


def progress(i: int, label: str, run: Run) -> None:
    extra = f", {run.redis_total} Redis commands" if run.redis_calls else ""
    print(f"  run {i}: {label:<12} {run.urls} URLs in {run.elapsed_s:6.2f} s = "
          f"{run.rate:5.0f} pages/s{extra}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.repeat < 1 or args.hosts < 1 or args.pages < 1:
        raise SystemExit("--repeat, --hosts and --pages must be at least 1")
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    load_before = os.getloadavg()
    began = time.monotonic()
    procs = Processes()
    warnings: list[str] = []
    results: dict[str, list[Run]] = {"floor": []}
    if not args.no_embedded:
        results["embedded"] = []
    results |= {str(n): [] for n in args.workers}
    breakdowns: dict[int, Run] = {}
    try:
        with workspace(args.keep_logs) as workdir:
            try:
                web = start_testweb(procs, args, workdir)
                server = start_redis(procs, workdir)
                per_poll = asyncio.run(calls_per_poll(server.url))
                print(f"test web: {args.hosts} hosts {TIMES} {args.pages} pages, "
                      f"{args.latency_ms:g} ms latency, {len(web.fetched)} URLs to fetch; "
                      f"redis-server on port {server.port}; work folder {workdir}", file=sys.stderr)
                for i in range(1, args.repeat + 1):
                    results["floor"].append(run := measure_floor(web, args))
                    progress(i, "floor", run)
                    if not args.no_embedded:
                        run = measure_embedded(procs, web, args, workdir, warnings)
                        results["embedded"].append(run)
                        progress(i, "embedded", run)
                    for w in args.workers:
                        run = measure_fleet(procs, web, args, server, w, per_poll, workdir,
                                            warnings)
                        results[str(w)].append(run)
                        progress(i, f"fleet of {w}", run)
                if args.redis_breakdown:
                    for w in args.workers:
                        breakdowns[w] = measure_fleet(procs, web, args, server, w, per_poll,
                                                      workdir, warnings, breakdown=True)
                        progress(0, f"fleet of {w} under MONITOR", breakdowns[w])
            finally:
                procs.stop_all()  # before the work folder (their logs) goes
            report(args, web, results, per_poll, breakdowns, warnings, load_before)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; every process started here was stopped", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
    print(f"(benchmark wall time {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
