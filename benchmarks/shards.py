"""The cost of sharding: the same crawl on one Redis and on several shards, on one machine.

Usage::

    .venv/bin/python benchmarks/shards.py [--shards 1,3] [--workers 2] [--repeat 3]
        [--hosts 48 --pages 60 --links 8 --per-host-concurrency 2] [--latency-ms 20]
        [--idle-s 3] [--write-docs [docs/scale.md]]

Everything runs on loopback, like ``benchmarks/throughput.py`` (whose processes, test web and
measurements this reuses): one ``crawlfleet testweb`` with ``--hosts`` hosts, and for each
shard count one private ``redis-server`` a shard on a free port (never the machine's 6379).
One shard is the ordinary case (``CRAWLFLEET_REDIS_URL``, one scheduler); N shards are
``CRAWLFLEET_REDIS_URLS`` with one scheduler a shard and the same ``--workers`` worker
processes, each running one arq worker a shard. Runs are interleaved over the repeats, and
each figure is the median of ``--repeat`` runs.

On one machine the shards share its cores, so sharding cannot make this crawl faster here;
what it shows is what sharding costs per page (the rate beside one shard's, CPU ms and Redis
commands a page summed over every shard) and what a fleet costs at rest: each shard's
scheduler loop, and every worker's polls of every shard's arq queue (slowed down to one per
``poll_max_delay`` while there is nothing to take), so an idle fleet's Redis commands and CPU
grow with the shards and, more slowly, with shards x workers. The idle figures are taken over
``--idle-s`` seconds after each crawl, with the fleet still running. Each crawl's export is
checked against the test web's reachable set (each URL once), and the pages each shard fetched
are shown beside the hosts it owns.

``--write-docs [PATH]`` writes the table into its own section of PATH (default docs/scale.md),
keeping the rest of the file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput, next to this file
import docs_section
import throughput as tp

from crawlfleet.common.keys import Keys
from crawlfleet.common.settings import Settings
from crawlfleet.common.shards import owner
from crawlfleet.common.stats import combine_status, read_status
from crawlfleet.common.urls import host_key

DOCS = Path(__file__).resolve().parent.parent / "docs" / "scale.md"
BEGIN, END = "<!-- benchmarks/shards.py: begin -->", "<!-- benchmarks/shards.py: end -->"
POLL_S = 0.05  # status polls while a fleet crawls (each one reads every shard)
DEFAULTS = Settings()


@dataclass
class ShardRun:
    shards: int
    urls: int  # pages + failures, summed over the shards
    elapsed_s: float
    cpu: dict[str, float]  # CPU seconds per component over the crawl
    calls: int  # Redis commands over every shard, the benchmark's own status reads taken out
    urls_by_shard: list[int]
    idle_calls_per_s: float  # every shard's commands a second with the fleet idle
    idle_redis_cores: float  # every redis-server's CPU with the fleet idle, in cores
    incomplete: bool = False

    @property
    def rate(self) -> float:
        return self.urls / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def cpu_ms(self, name: str) -> float:
        return 1000 * self.cpu.get(name, 0.0) / self.urls if self.urls else 0.0


def shard_counts(text: str) -> list[int]:
    counts: list[int] = tp.worker_counts(text)  # the same "1,3" syntax and checks
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"each shard count once, got {text!r}")
    return counts


async def status_of(clients: list[Redis], keys: Keys) -> tuple[dict[str, Any], int]:
    """The crawl's status over the shards, as ``crawlfleet status`` reads it (finished on two
    agreeing rounds), and how many rounds of reads that took."""
    first = [await read_status(c, keys) for c in clients]
    combined = combine_status(first)
    if not combined["finished"] or len(clients) == 1:
        return combined, 1
    second = [await read_status(c, keys) for c in clients]
    again = combine_status(second)
    if [s["seen"] for s in first] != [s["seen"] for s in second]:
        again["finished"] = False
    return again, 2


async def wait_ready(clients: list[Redis], keys: Keys, workers: int, fleet: tp.Fleet) -> None:
    """Until every shard has a leading scheduler and every worker polls its arq queue."""
    deadline = time.monotonic() + tp.STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        fleet.check_alive()
        ready = True
        for client in clients:
            led = await tp.scheduler_leads(client, keys)
            ready = ready and led and await tp.polling_workers(client, keys) >= workers
        if ready:
            return
        await asyncio.sleep(0.05)
    raise tp.BenchError(f"a fleet of {workers} workers over {len(clients)} shard(s) did not "
                        f"start in {tp.STARTUP_TIMEOUT_S:.0f} s")


async def commands(clients: list[Redis]) -> int:
    total = 0
    for client in clients:
        total += sum((await tp.command_calls(client)).values())
    return total


async def _crawl(fleet: tp.Fleet, web: tp.TestWeb, servers: list[tp.RedisServer],
                 workers: int, per_poll: tp.PollCost, idle_s: float) -> ShardRun:
    keys = Keys(fleet.env["CRAWLFLEET_NAMESPACE"])
    clients = [tp.connect(s.url) for s in servers]
    redis_pids = [s.proc.pid for s in servers]
    try:
        await wait_ready(clients, keys, workers, fleet)
        meter = tp.CpuMeter({"testweb": [web.pid], "redis-server": redis_pids,
                             "scheduler": fleet.pids("scheduler"),
                             "workers": fleet.pids("worker")})
        for client in clients:
            await client.config_resetstat()
        started = fleet.seed(web.seeds, on_seeded=meter.start)
        rounds = 0
        while True:
            status, n = await status_of(clients, keys)
            rounds += n
            if status["finished"]:
                elapsed = time.monotonic() - started
                break
            if time.monotonic() > started + tp.CRAWL_TIMEOUT_S:
                raise tp.BenchError(f"{len(servers)} shard(s) did not finish in "
                                    f"{tp.CRAWL_TIMEOUT_S:.0f} s: {status}")
            fleet.check_alive()
            await asyncio.sleep(POLL_S)
        cpu, _window = meter.stop()
        # The benchmark's own status reads (each round reads every shard) are taken out.
        reads = rounds * len(clients)
        cpu["redis-server"] = max(0.0, cpu["redis-server"] - reads * per_poll.redis_cpu_s)
        calls = await commands(clients) - sum(per_poll.calls.values()) * reads
        shards = status.get("shards", [status])
        by_shard = [s["pages"] + s["failed"] for s in shards]

        # The fleet at rest: only the workers' polls of every queue and the schedulers' loops.
        for client in clients:
            await client.config_resetstat()
        idle = tp.CpuMeter({"redis-server": redis_pids})
        idle.start()
        await asyncio.sleep(idle_s)  # a measurement window, not a wait for a result
        idle_cpu, window = idle.stop()
        idle_calls = await commands(clients)
        return ShardRun(len(servers), status["pages"] + status["failed"], elapsed, cpu, calls,
                        by_shard, idle_calls / window, idle_cpu["redis-server"] / window)
    finally:
        for client in clients:
            await client.aclose()


def measure(procs: tp.Processes, web: tp.TestWeb, shape: tp.Shape, args: argparse.Namespace,
            servers: list[tp.RedisServer], per_poll: tp.PollCost, workdir: Path,
            warnings: list[str]) -> ShardRun:
    urls = [s.url for s in servers]
    where = ({"CRAWLFLEET_REDIS_URL": urls[0]} if len(urls) == 1
             else {"CRAWLFLEET_REDIS_URLS": ",".join(urls)})
    env = tp.crawl_env(web, shape, args, **where)
    logdir = Path(tempfile.mkdtemp(prefix=f"shards{len(urls)}-", dir=workdir))
    fleet = tp.Fleet(procs, env, logdir)
    try:
        for i in range(len(urls)):
            fleet.spawn(f"scheduler{i}", "scheduler")
        for i in range(args.workers):
            fleet.spawn(f"worker{i}", "worker")
        run = asyncio.run(_crawl(fleet, web, servers, args.workers, per_poll, args.idle_s))
    finally:
        fleet.stop()
    out = logdir / "export.jsonl"
    exported = procs.run([tp.CRAWLFLEET, "export", "--out", str(out)], env=env)
    if exported.returncode != 0:
        raise tp.BenchError(f"crawlfleet export failed: {exported.stderr[-2000:]}")
    problems = tp.check_results(tp.exported_urls(out), run.urls, web, f"{len(urls)} shard(s)")
    warnings += problems
    run.incomplete = bool(problems)
    out.unlink()
    for server in servers:
        with redis.Redis.from_url(server.url) as client:
            client.flushdb()
    return run


def hosts_by_shard(web: tp.TestWeb, shards: int) -> list[int]:
    hosts = {host_key(url) for url in web.reachable}
    counts = [0] * shards
    for host in hosts:
        counts[owner(host, shards)] += 1
    return counts


def median_run(runs: list[ShardRun]) -> ShardRun:
    """The run of median rate, with every other figure the median over the runs."""
    runs = sorted(runs, key=lambda r: r.rate)
    mid = runs[len(runs) // 2]
    cpu = {name: statistics.median(r.cpu.get(name, 0.0) / r.urls for r in runs) * mid.urls
           for name in mid.cpu}
    return ShardRun(mid.shards, mid.urls, mid.elapsed_s, cpu,
                    round(statistics.median(r.calls / r.urls for r in runs) * mid.urls),
                    mid.urls_by_shard, statistics.median(r.idle_calls_per_s for r in runs),
                    statistics.median(r.idle_redis_cores for r in runs),
                    any(r.incomplete for r in runs))


def report(args: argparse.Namespace, shape: tp.Shape, web: tp.TestWeb,
           results: list[ShardRun], warnings: list[str]) -> list[str]:
    base = next((r for r in results if r.shards == 1), results[0])
    lines = [
        f"site: {shape.describe()}; {len(web.reachable):,} reachable URLs",
        f"fleet: {args.workers} worker process(es), one scheduler a shard; poll_delay "
        f"{DEFAULTS.poll_delay:g} s (up to {DEFAULTS.poll_max_delay:g} s idle), "
        f"jobs_per_worker {DEFAULTS.jobs_per_worker} (split over "
        f"the shards); medians of {args.repeat}",
        "",
        "CPU-ms a page: each kind of process summed (every redis-server, every scheduler; the "
        "benchmark's own status reads taken out of Redis, as of its commands); idle: the "
        "fleet at rest after the crawl",
        f"{'shards':>6} {'pages/s':>8} {'x 1':>6} {'workers':>8} {'sched':>7} {'redis':>7} "
        f"{'cmds/page':>9}  {'idle cmds/s':>11} {'idle redis':>10}  URLs (hosts) a shard"]
    for r in results:
        flag = " (!)" if r.incomplete else ""
        split = ", ".join(f"{p:,} ({h})" for p, h in
                          zip(r.urls_by_shard, hosts_by_shard(web, r.shards), strict=True))
        lines.append(
            f"{r.shards:>6} {r.rate:>8,.0f} {r.rate / base.rate:>5.2f}{tp.TIMES} "
            f"{r.cpu_ms('workers'):>8.3f} {r.cpu_ms('scheduler'):>7.3f} "
            f"{r.cpu_ms('redis-server'):>7.3f} {r.calls / r.urls:>9.2f}  "
            f"{r.idle_calls_per_s:>11,.0f} {100 * r.idle_redis_cores:>9.1f}%  {split}{flag}")
    lines.append("")
    for r in results:
        if r.shards > 1:
            lines.append(
                f"{r.shards} shards: {r.rate / base.rate:.2f}{tp.TIMES} one shard's rate on "
                f"these {os.cpu_count()} cores; Redis {r.cpu_ms('redis-server'):.3f} CPU-ms a "
                f"page in all vs {base.cpu_ms('redis-server'):.3f}; at rest "
                f"{r.idle_calls_per_s / r.shards:,.0f} commands/s a shard vs "
                f"{base.idle_calls_per_s:,.0f} (its scheduler's housekeeping, twice a second, "
                f"and {args.workers} workers' polls of its queue, slowed down while there is "
                "nothing to take)")
    lines += [f"{w}" for w in warnings]
    return lines


def write_docs(path: Path, lines: list[str], argv: list[str]) -> None:
    docs_section.write(path, BEGIN, END, "## Sharding on one machine: `benchmarks/shards.py`",
                       "Written by `benchmarks/shards.py --write-docs`; edit the script, not "
                       "this section.", "benchmarks/shards.py", argv, lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shards", type=shard_counts, default=[1, 3],
                   help="shard counts to compare (default 1,3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per shard count (default 3)")
    p.add_argument("--hosts", type=int, default=48, help="test web hosts (default 48)")
    p.add_argument("--pages", type=int, default=60, help="HTML pages per host (default 60)")
    p.add_argument("--links", type=int, default=8, help="links per page (default 8)")
    p.add_argument("--per-host-concurrency", type=int, default=DEFAULTS.per_host_concurrency)
    p.add_argument("--latency-ms", type=float, default=20.0, help="per answer (default 20)")
    p.add_argument("--idle-s", type=float, default=3.0,
                   help="seconds the idle fleet is measured after each crawl (default 3)")
    p.add_argument("--write-docs", nargs="?", const=str(DOCS), default=None, metavar="PATH")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary log folder")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.workers < 1 or args.repeat < 1 or args.hosts < 1 or args.pages < 1:
        print("shards.py: --workers, --repeat, --hosts and --pages must be 1 or more",
              file=sys.stderr)
        return 2
    args.env = []  # crawl_env's --set list: none here
    shape = tp.Shape("many", args.hosts, args.pages, args.links, args.per_host_concurrency,
                     args.latency_ms, 0.0, DEFAULTS.max_in_flight)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, tp._interrupt)  # unwinds through every finally: all stopped
    procs = tp.Processes()
    warnings: list[str] = []
    try:
        with tp.workspace(args.keep_logs) as workdir:
            web = tp.start_testweb(procs, shape, workdir)
            servers: dict[int, list[tp.RedisServer]] = {}
            for count in args.shards:
                servers[count] = []
                for i in range(count):
                    logdir = Path(tempfile.mkdtemp(prefix=f"redis{count}-{i}-", dir=workdir))
                    servers[count].append(tp.start_redis(procs, logdir))
            per_poll = asyncio.run(tp.poll_cost(servers[args.shards[0]][0], POLL_S))
            runs: dict[int, list[ShardRun]] = {count: [] for count in args.shards}
            for i in range(args.repeat):
                for count in args.shards:
                    run = measure(procs, web, shape, args, servers[count], per_poll, workdir,
                                  warnings)
                    runs[count].append(run)
                    print(f"  run {i + 1}/{args.repeat}, {count} shard(s): {run.rate:,.0f} "
                          f"pages/s", file=sys.stderr, flush=True)
            results = [median_run(runs[count]) for count in args.shards]
    except tp.BenchError as exc:
        print(f"shards.py: {exc}", file=sys.stderr)
        return 1
    finally:
        procs.stop_all()
    lines = report(args, shape, web, results, warnings)
    print("\n".join(lines))
    if args.write_docs:
        write_docs(Path(args.write_docs), lines, argv)
        print(f"wrote its section of {args.write_docs}")
    return 1 if any(r.incomplete for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
