"""Where a worker's time goes: py-spy samples one worker through a crawl of the test web.

Usage::

    .venv/bin/pip install py-spy        # a sampling profiler; not a dependency of crawlfleet
    .venv/bin/python benchmarks/profile_worker.py [--shape one|docs|many] [--pages N] [--links 100]
        [--log-level info] [--top 25]

It starts the test web in one of benchmarks/throughput.py's shapes, with its defaults (``one``:
one host of 1,200 pages, 16 fetches in flight; ``docs``: 40 hosts of 150 pages, 4 in flight
each, 20 ms latency; ``many``: 20 hosts of 150 pages, 8 links, 2 in flight each), a private
redis-server on a free port, one scheduler and one worker; once the worker has started, ``py-spy
record --native --format raw`` (collapsed stacks) samples it, so that start-up's imports stay
out, and only the event loop's thread at work is counted (not its epoll waits). It
seeds the hosts, waits for the crawl to finish, and prints the share of samples by area (fetch,
parse, link filter, Redis client, logging, event loop) and the functions with the most samples
of their own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

from redis import Redis  # noqa: E402
from redis.exceptions import RedisError  # noqa: E402
from throughput import (  # noqa: E402
    build_parser,
    free_port,
    polling_workers_pattern,
    shapes_from,
)

from crawlfleet.common.keys import Keys  # noqa: E402

NAMESPACE = "profile"
SHAPES = ("one", "docs", "many")

# Areas, by the first frame (from the leaf up) whose file matches.
AREAS = (
    ("garbage collector", ("gc_collect",)),
    ("parse (selectolax, decoding)", ("workers/parse.py", "selectolax", "w3lib")),
    ("URL resolution and canonical form", ("common/urls.py", "ada_url", "w3lib/url")),
    ("link filter (scope, cache)", ("workers/links.py", "common/scope.py")),
    ("Redis client", ("redis/", "common/frontier.py")),
    ("logging", ("structlog", "common/logs.py", "logging/")),
    ("HTTP (aiohttp)", ("aiohttp/", "multidict", "yarl", "workers/fetch.py", "aiodns")),
    ("messages (msgspec)", ("msgspec", "common/messages.py")),
    ("event loop", ("asyncio/", "uvloop")),
)


# The event loop thread's own frames (py-spy --native) while it waits for I/O: not CPU.
IDLE_LEAVES = ("epoll_wait", "epoll_pwait")
MAIN_THREAD = "run_worker (workers/worker.py"  # every frame of the event loop's thread has it


def busy(frames: list[str]) -> bool:
    """A sample of the worker's event-loop thread doing work. py-spy's own idle detection
    counts threads blocked in C (pycares' shutdown thread, waiting on a queue forever) as busy,
    and the loop's epoll wait as uvloop's run frame: the native frames tell them apart."""
    return (any(MAIN_THREAD in f for f in frames)
            and not any(leaf in frames[-1] for leaf in IDLE_LEAVES))


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, needles in AREAS:
            if any(n in frame for n in needles):
                return area
    return "other"


def worker_polls(client: Redis) -> bool:
    """Whether the worker polls arq's queue (False while Redis starts)."""
    try:
        return any(client.scan_iter(match=polling_workers_pattern(Keys(NAMESPACE))))
    except RedisError:
        return False


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="one")
    p.add_argument("--pages", type=int, default=None,
                   help="per host (default: benchmarks/throughput.py's shape)")
    p.add_argument("--links", type=int, default=None,
                   help="a page (default: benchmarks/throughput.py's shape)")
    p.add_argument("--log-level", default="info", help="the worker's (info: a line a page)")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    # The shape as benchmarks/throughput.py measures it, by its own defaults.
    (shape,) = shapes_from(build_parser().parse_args(["--shape", args.shape]))
    hosts, concurrency, latency = shape.hosts, shape.per_host_concurrency, shape.latency_ms
    pages = args.pages or shape.pages
    links = shape.links if args.links is None else args.links
    pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="crawlfleet-profile-"))
    procs: list[subprocess.Popen[bytes]] = []
    files = contextlib.ExitStack()
    try:
        robots = [a for i in range(hosts) for a in ("--robots", f"site{i}.test=status:404")]
        web = subprocess.Popen([str(BIN / "crawlfleet"), "testweb", "--hosts", str(hosts),
                                "--pages", str(pages), "--links", str(links),
                                "--latency-ms", str(latency), "--port", "0", "--dns-port", "0",
                                *robots], stdout=subprocess.PIPE, start_new_session=True)
        procs.append(web)
        assert web.stdout is not None
        info = json.loads(web.stdout.readline())
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, start_new_session=True)
        procs.append(redis)
        env = {**os.environ, "CRAWLFLEET_REDIS_URL": f"redis://127.0.0.1:{port}/0",
               "CRAWLFLEET_NAMESPACE": NAMESPACE, "CRAWLFLEET_DNS_NAMESERVERS": info["dns"],
               "CRAWLFLEET_ALLOW_PRIVATE": "1", "CRAWLFLEET_CRAWL_DELAY": "0",
               "CRAWLFLEET_PER_HOST_CONCURRENCY": str(concurrency),
               "CRAWLFLEET_LOG_FORMAT": "json", "CRAWLFLEET_LOG_LEVEL": args.log_level}
        # The scheduler and the worker wait for Redis themselves; seeds wait for them.
        log = files.enter_context((work / "fleet.log").open("wb"))
        procs.append(subprocess.Popen([str(BIN / "crawlfleet"), "scheduler"], env=env,
                                      stdout=log, stderr=log, start_new_session=True))
        raw = work / "worker.txt"
        worker_log = work / "worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen([str(BIN / "crawlfleet"), "worker"], env=env, stdout=out,
                                      stderr=out, start_new_session=True)
        procs.append(worker)
        started = time.monotonic()
        # Start-up is not sampled: the worker is up once it polls arq's queue.
        with Redis(host="127.0.0.1", port=port) as client:
            while not worker_polls(client):
                if worker.poll() is not None or time.monotonic() - started > 60:
                    raise SystemExit("the worker did not start: "
                                     f"{worker_log.read_text()[-2000:]}")
                time.sleep(0.05)
        procs.append(subprocess.Popen([pyspy, "record", "--format", "raw", "--rate", "250",
                                       "--native", "-o", str(raw), "--pid", str(worker.pid)],
                                      stdout=log, stderr=log, start_new_session=True))
        time.sleep(1.0)  # py-spy attached before the crawl starts
        subprocess.run([str(BIN / "crawlfleet"), "seed", *info["seeds"]], env=env, check=True,
                       capture_output=True)
        started = time.monotonic()
        while time.monotonic() - started < 300:
            out = subprocess.run([str(BIN / "crawlfleet"), "status", "--json"], env=env,
                                 capture_output=True, text=True)
            status = json.loads(out.stdout) if out.returncode == 0 else {}
            if status.get("finished"):
                break
            time.sleep(0.2)  # the poll interval
        else:
            raise SystemExit("the crawl did not finish in 300 s")
        pages = status["pages"] + status["failed"]
        os.killpg(procs[-1].pid, signal.SIGINT)  # py-spy writes its file and lets go
        procs[-1].wait(timeout=60)
        counts: Counter[str] = Counter()
        own: Counter[str] = Counter()
        total = idle = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            samples = int(n)
            if not busy(frames):
                idle += samples
                continue
            total += samples
            counts[area_of(frames)] += samples
            own[frames[-1]] += samples
        # Shares only: py-spy stops the process to read native stacks, which slows the crawl,
        # so samples do not add up to its CPU time.
        print(f"{pages} URLs crawled; {total} samples of the worker's event-loop thread at "
              f"work, {idle} idle or of other threads")
        for area, n in counts.most_common():
            print(f"  {100 * n / total:5.1f} %  {area}")
        print(f"functions with the most samples of their own (top {args.top}):")
        for frame, n in own.most_common(args.top):
            print(f"  {100 * n / total:5.1f} %  {frame[:110]}")
        return 0
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        files.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
