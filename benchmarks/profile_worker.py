"""Where a worker's time goes: py-spy samples one worker through a one-host crawl.

Usage::

    .venv/bin/pip install py-spy        # a sampling profiler; not a dependency of crawlfleet
    .venv/bin/python benchmarks/profile_worker.py [--pages 1200] [--links 100] [--top 25]

It starts the test web (one host), a private redis-server on a free port, one scheduler and one
worker under ``py-spy record --format raw`` (collapsed stacks), seeds the host, waits for the
crawl to finish, and prints the share of samples by area (fetch, parse, link filter, Redis
client, logging, event loop) and the functions with the most samples of their own.
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

from throughput import free_port  # noqa: E402

# Areas, by the first frame (from the leaf up) whose file matches.
AREAS = (
    ("parse (selectolax, decoding)", ("workers/parse.py", "selectolax", "w3lib")),
    ("URL resolution and canonical form", ("common/urls.py", "ada_url", "w3lib/url")),
    ("link filter (scope, cache)", ("workers/links.py", "common/scope.py")),
    ("Redis client", ("redis/", "common/frontier.py")),
    ("logging", ("structlog", "common/logs.py", "logging/")),
    ("HTTP (aiohttp)", ("aiohttp/", "multidict", "yarl", "workers/fetch.py", "aiodns")),
    ("messages (msgspec)", ("msgspec", "common/messages.py")),
    ("event loop", ("asyncio/", "uvloop")),
)


def area_of(frames: list[str]) -> str:
    for frame in reversed(frames):
        for area, needles in AREAS:
            if any(n in frame for n in needles):
                return area
    return "other"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pages", type=int, default=1200)
    p.add_argument("--links", type=int, default=100)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(BIN / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: .venv/bin/pip install py-spy")
    work = Path(tempfile.mkdtemp(prefix="crawlfleet-profile-"))
    procs: list[subprocess.Popen[bytes]] = []
    files = contextlib.ExitStack()
    try:
        web = subprocess.Popen([str(BIN / "crawlfleet"), "testweb", "--hosts", "1", "--pages",
                                str(args.pages), "--links", str(args.links), "--port", "0",
                                "--dns-port", "0", "--robots", "site0.test=status:404"],
                               stdout=subprocess.PIPE, start_new_session=True)
        procs.append(web)
        assert web.stdout is not None
        info = json.loads(web.stdout.readline())
        port = free_port()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, start_new_session=True)
        procs.append(redis)
        env = {**os.environ, "CRAWLFLEET_REDIS_URL": f"redis://127.0.0.1:{port}/0",
               "CRAWLFLEET_NAMESPACE": "profile", "CRAWLFLEET_DNS_NAMESERVERS": info["dns"],
               "CRAWLFLEET_ALLOW_PRIVATE": "1", "CRAWLFLEET_CRAWL_DELAY": "0",
               "CRAWLFLEET_PER_HOST_CONCURRENCY": "16", "CRAWLFLEET_LOG_FORMAT": "json"}
        # The scheduler and the worker wait for Redis themselves; seeds wait for them.
        log = files.enter_context((work / "fleet.log").open("wb"))
        procs.append(subprocess.Popen([str(BIN / "crawlfleet"), "scheduler"], env=env,
                                      stdout=log, stderr=log, start_new_session=True))
        raw = work / "worker.txt"
        procs.append(subprocess.Popen([pyspy, "record", "--format", "raw", "--rate", "250",
                                       "-o", str(raw), "--", str(BIN / "crawlfleet"), "worker"],
                                      env=env, stdout=log, stderr=log, start_new_session=True))
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
        os.killpg(procs[-1].pid, signal.SIGINT)  # py-spy writes its file and stops the worker
        procs[-1].wait(timeout=60)
        counts: Counter[str] = Counter()
        own: Counter[str] = Counter()
        total = 0
        for line in raw.read_text().splitlines():
            stack, _, n = line.rpartition(" ")
            frames = stack.split(";")
            samples = int(n)
            total += samples
            counts[area_of(frames)] += samples
            own[frames[-1]] += samples
        print(f"{pages} URLs crawled; {total} samples of the worker (250 a second)")
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
