"""Redis memory at the end of a crawl, with and without an output: bytes per seen URL, by key.

Usage::

    .venv/bin/python benchmarks/memory.py [--hosts 40 --pages 200 --links 8] [--repeat 3]
        [--workers 2] [--latency-ms 0] [--write-docs [docs/benchmarks.md]] [--keep-logs]

Everything runs on loopback: one ``crawlfleet testweb`` (``--hosts`` x ``--pages``, robots.txt
404 everywhere, as in benchmarks/throughput.py), one private ``redis-server`` on a free port
(never the machine's 6379, no persistence) and, for each configuration, a fleet of
``crawlfleet scheduler`` and ``--workers`` ``crawlfleet worker`` processes:

no output
    ``CRAWLFLEET_OUTPUT`` unset: every result stays in the results log (``{ns}:results:log``).
output + sink
    ``CRAWLFLEET_OUTPUT`` a temporary folder and one ``crawlfleet sink``; after the crawl
    finishes, the benchmark waits until ``crawlfleet status --json`` says
    ``results_in_redis == 0``. Parts are written every ``CRAWLFLEET_OUTPUT_PART_SECONDS`` = 1 s
    (default 10 s, which only delays the last part: it changes nothing at the end).

Each run flushes the database, starts its fleet, reads ``INFO memory`` used_memory and the
``MEMORY USAGE key SAMPLES 0`` of every key (a SCAN of the whole database, which holds only this
crawl) right before ``crawlfleet seed``, then again at the end; the growth of each is divided by
the URLs seen. Keys are sorted into classes (``key_class``); "not in any key" is what used_memory
grew by beyond the keys' own usage: Redis's key table, client buffers. The peak is the largest
used_memory of the status polls during the crawl (every ``POLL_S``). The output's part files,
divided by the URLs seen, are what left Redis. A first crawl, not counted, warms the server up
(``warm_up``): a fresh Redis keeps ~1 MB for itself after its first crawl, whatever its size.

Every run is checked: ``crawlfleet export`` gives one line per seen URL and exactly the test
web's reachable set, and ``crawlfleet check`` exits 0; otherwise the benchmark exits 1 with the
reason. The namespace is crawlfleet's default (``crawlfleet``): key names are part of what
Redis holds, and the benchmarks' long random namespaces would add ~30 B to every seen bucket.

``--write-docs [PATH]`` writes the table, the machine and the date into this script's own
section of PATH (default docs/benchmarks.md); ``benchmarks/throughput.py --write-docs`` keeps it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.asyncio import Redis

from crawlfleet.common.commands import COMMANDS, source
from crawlfleet.common.keys import Keys
from crawlfleet.common.stats import read_status

# The sibling script lends its processes, Redis, test web, fleet and docs helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import docs_section
from benchmarks import throughput as tp

BEGIN = "<!-- benchmarks/memory.py: begin -->"
END = "<!-- benchmarks/memory.py: end -->"
NAMESPACE = "crawlfleet"  # the default: what a crawl's key names cost unless one is chosen
POLL_S = 0.05
DRAIN_TIMEOUT_S = 60.0  # crawl finished -> results_in_redis == 0
PART_SECONDS = "1"

# The figures, next to the measured ones.
SEEN_FLOOR = 8.0  # B/URL: one intset member (64-bit) per URL
TARGET_WITH_OUTPUT = 32.0  # B/URL in all, at the end of a crawl with an output
DRAINED_AT_MOST = 1.0  # B/URL the results log may keep once drained ("costs nothing")

NO_OUTPUT, WITH_OUTPUT = "no output", "output + sink"
CONFIGS = (NO_OUTPUT, WITH_OUTPUT)

# Key classes, in the order they are shown.
SEEN, RESULTS, PER_HOST, HOST_MAPS, ROBOTS, OTHER = (
    "seen", "results", "per_host", "host_maps", "robots", "other")
CLASS_LABELS = {
    SEEN: "seen buckets `{ns}:seen:*`",
    RESULTS: "results log `{ns}:results:log`",
    PER_HOST: "per-host keys `{ns}:h:*` (queues, leases)",
    HOST_MAPS: "host hashes/zsets (ready, not-before, host:pages, ...)",
    ROBOTS: "robots cache (`{ns}:robots`, sitemaps)",
    OTHER: "everything else (stats, rate, events, sink, arq ...)",
}


def key_class(key: str, keys: Keys) -> str:
    if key.startswith(keys.seen):
        return SEEN
    if key == keys.results:
        return RESULTS
    if key.startswith(keys.host_pattern[:-1]):
        return PER_HOST
    if key in (keys.ready, keys.not_before, keys.host_pages, keys.query_variants,
               keys.lease_batch, keys.waiting, keys.leases):
        return HOST_MAPS
    if key in (keys.robots, keys.sitemaps):
        return ROBOTS
    return OTHER


@dataclass
class Usage:
    """MEMORY USAGE summed per key class, and the keys counted."""

    bytes: Counter[str] = field(default_factory=Counter)
    keys: Counter[str] = field(default_factory=Counter)

    def __sub__(self, other: Usage) -> Usage:
        return Usage(Counter({c: self.bytes[c] - other.bytes[c] for c in CLASS_LABELS}),
                     Counter({c: self.keys[c] - other.keys[c] for c in CLASS_LABELS}))


async def key_usage(client: Redis, keys: Keys) -> Usage:
    """Every key of the database (only this crawl's, on the private Redis), by class."""
    usage = Usage()
    names = [k.decode() async for k in client.scan_iter(count=1000)]
    for i in range(0, len(names), 1000):
        chunk = names[i:i + 1000]
        async with client.pipeline(transaction=False) as pipe:
            for name in chunk:
                pipe.memory_usage(name, samples=0)
            sizes = await pipe.execute()
        for name, size in zip(chunk, sizes, strict=True):
            if size is not None:  # a key that expired between SCAN and MEMORY USAGE
                usage.bytes[key_class(name, keys)] += int(size)
                usage.keys[key_class(name, keys)] += 1
    return usage


async def memory(client: Redis) -> tuple[int, int]:
    """used_memory, and the part of it that is client connections' buffers."""
    info = await client.info("memory")
    return int(info["used_memory"]), int(info["mem_clients_normal"])


@dataclass
class MemoryRun:
    seen: int
    grown: int  # used_memory at the end minus right before seeding
    clients: int  # of which client connections' buffers (mem_clients_normal)
    connections: int  # the fleet's, at the end
    peak: int  # the largest used_memory polled during the crawl, minus the same
    usage: Usage  # MEMORY USAGE growth by class
    seen_buckets: int
    crawl_s: float
    drain_s: float | None = None  # finished -> results_in_redis == 0 (with an output)
    part_bytes: int | None = None
    parts: int = 0

    def per_url(self, value: float) -> float:
        return value / self.seen if self.seen else 0.0

    @property
    def in_keys(self) -> int:
        return sum(self.usage.bytes.values())

    @property
    def rest(self) -> int:
        """Neither keys nor connections: the key table, and MEMORY USAGE's estimates' error."""
        return self.grown - self.in_keys - self.clients


def status_json(procs: tp.Processes, env: dict[str, str]) -> dict[str, Any]:
    done = procs.run([tp.CRAWLFLEET, "status", "--json"], env=env)
    if done.returncode != 0:
        raise tp.BenchError(f"crawlfleet status --json failed: {done.stderr.strip()[-500:]}")
    status: dict[str, Any] = json.loads(done.stdout)
    return status


async def _measure(fleet: tp.Fleet, web: tp.TestWeb, workers: int, output: bool) -> MemoryRun:
    keys = Keys(fleet.env["CRAWLFLEET_NAMESPACE"])
    client = tp.connect(fleet.env["CRAWLFLEET_REDIS_URL"])
    try:
        await tp.wait_ready(client, workers, fleet)
        before, clients_before = await memory(client)
        usage_before = await key_usage(client, keys)
        started = fleet.seed(web.seeds, on_seeded=lambda: None)
        peak = before
        while True:
            status = await read_status(client, keys)
            peak = max(peak, (await memory(client))[0])
            if status["finished"]:
                crawl_s = time.monotonic() - started
                break
            if time.monotonic() > started + tp.CRAWL_TIMEOUT_S:
                raise tp.BenchError(f"the crawl did not finish in {tp.CRAWL_TIMEOUT_S:.0f} s: "
                                    f"{status}")
            fleet.check_alive()
            await asyncio.sleep(POLL_S)
        drain_s = None
        if output:
            finished = time.monotonic()
            while status["results_in_redis"]:
                if time.monotonic() > finished + DRAIN_TIMEOUT_S:
                    raise tp.BenchError(f"the sink left {status['results_in_redis']} results in "
                                        f"Redis {DRAIN_TIMEOUT_S:.0f} s after the crawl finished")
                fleet.check_alive()
                await asyncio.sleep(POLL_S)
                status = await read_status(client, keys)
                peak = max(peak, (await memory(client))[0])
            drain_s = time.monotonic() - finished
            # The command an operator would look at says so too.
            shown = status_json(fleet.procs, fleet.env)
            if shown.get("results_in_redis") != 0 or not shown.get("finished"):
                raise tp.BenchError(f"crawlfleet status --json after the drain: {shown}")
            status = shown
        after, clients_after = await memory(client)
        usage = await key_usage(client, keys) - usage_before
        connections = len(await client.client_list()) - 1  # not this one
        return MemoryRun(int(status["seen"]), after - before, clients_after - clients_before,
                         connections, peak - before, usage, usage.keys[SEEN], crawl_s, drain_s)
    finally:
        await client.aclose()


def verify(procs: tp.Processes, env: dict[str, str], run: MemoryRun, web: tp.TestWeb,
           workdir: Path, label: str) -> None:
    """export = one line per seen URL = the reachable set, and check exits 0; else BenchError."""
    out = workdir / "export.jsonl"
    exported = procs.run([tp.CRAWLFLEET, "export", "--out", str(out)], env=env)
    if exported.returncode != 0:
        raise tp.BenchError(f"{label}: crawlfleet export failed: {exported.stderr[-2000:]}")
    urls = tp.exported_urls(out)
    out.unlink()
    if len(urls) != run.seen:
        raise tp.BenchError(f"{label}: crawlfleet export gave {len(urls)} results for "
                            f"{run.seen} URLs seen")
    problems = tp.check_results(urls, len(urls), web, label)
    if problems:
        raise tp.BenchError("; ".join(problems))
    checked = procs.run([tp.CRAWLFLEET, "check"], env=env)
    if checked.returncode != 0:
        raise tp.BenchError(f"{label}: crawlfleet check exited {checked.returncode}: "
                            f"{(checked.stdout + checked.stderr).strip()[-2000:]}")


def measure(procs: tp.Processes, web: tp.TestWeb, shape: tp.Shape, args: argparse.Namespace,
            server: tp.RedisServer, workdir: Path, label: str) -> MemoryRun:
    output = label == WITH_OUTPUT
    with redis.Redis.from_url(server.url) as plain:
        plain.flushdb()  # before the fleet starts: a flush under a running one is "state lost"
    logdir = Path(tempfile.mkdtemp(prefix="memory-", dir=workdir))
    outdir = logdir / "output"
    extra = {"CRAWLFLEET_OUTPUT": str(outdir),
             "CRAWLFLEET_OUTPUT_PART_SECONDS": PART_SECONDS} if output else {}
    env = tp.crawl_env(web, shape, args, CRAWLFLEET_REDIS_URL=server.url,
                       CRAWLFLEET_NAMESPACE=NAMESPACE, **extra)
    fleet = tp.Fleet(procs, env, logdir)
    try:
        fleet.spawn("scheduler", "scheduler")
        for i in range(args.workers):
            fleet.spawn(f"worker{i}", "worker")
        if output:
            fleet.spawn("sink", "sink")
        run = asyncio.run(_measure(fleet, web, args.workers, output))
    finally:
        fleet.stop()
    verify(procs, env, run, web, logdir, label)
    if output:
        parts = list(outdir.glob("results/**/part-*.jsonl"))
        run.parts, run.part_bytes = len(parts), sum(p.stat().st_size for p in parts)
        shutil.rmtree(outdir)
    return run


def warm_up(procs: tp.Processes, web: tp.TestWeb, shape: tp.Shape, args: argparse.Namespace,
            server: tp.RedisServer, workdir: Path) -> int:
    """Ready the server for the measured runs; the bytes it kept for itself after that.

    A fresh Redis grows by ~1 MB the first time it serves a crawl, and keeps it across
    FLUSHDB: the script cache (loaded here), and, mostly, Redis 7's latency-tracking, one
    histogram (~25 KB) per command name, made at its first call. That is the server's, the same
    for any crawl, so one crawl with an output and a sink, not counted, pays for it first."""
    with redis.Redis.from_url(server.url) as plain:
        for name in COMMANDS:
            plain.script_load(source(name))
        base = int(plain.info("memory")["used_memory"])
        run = measure(procs, web, shape, args, server, workdir, WITH_OUTPUT)
        plain.flushdb()
        kept = int(plain.info("memory")["used_memory"]) - base
    print(f"  warm-up: {run.seen} URLs seen in {run.crawl_s:5.1f} s; Redis kept {kept:,} B "
          "of its own after the flush (not counted)", file=sys.stderr, flush=True)
    return kept


# --------------------------------------------------------------------------------------------
# The table, as text and as Markdown
# --------------------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Summary:
    """Medians over the runs of each configuration."""

    runs: dict[str, list[MemoryRun]]
    scratch: int  # what Redis kept for itself after the warm-up crawl (not counted)

    def of(self, label: str, figure: str) -> float | None:
        """The median B/URL of one figure: a key class, or one of FIGURES."""
        runs = self.runs[label]
        if figure == "parts":
            known = [r.per_url(r.part_bytes) for r in runs if r.part_bytes is not None]
            return med(known) if known else None
        pick = FIGURES.get(figure) or (lambda r: r.usage.bytes[figure])
        return med([r.per_url(pick(r)) for r in runs])

    def median(self, label: str, pick: Callable[[MemoryRun], float]) -> float:
        return med([pick(r) for r in self.runs[label]])

    def seen(self, label: str) -> int:
        return int(self.median(label, lambda r: r.seen))

    def rows(self) -> list[tuple[str, str, str, str]]:
        """(what, no output, output + sink, floor / target), B per seen URL."""
        def cells(figure: str) -> tuple[str, str]:
            a, b = (self.of(label, figure) for label in CONFIGS)
            return (fmt(a), fmt(b))

        buckets = self.median(WITH_OUTPUT, lambda r: r.seen_buckets)
        connections = self.median(WITH_OUTPUT, lambda r: r.connections)
        compare = {
            SEEN: f"floor {SEEN_FLOOR:g} (an intset member); {buckets:,.0f} buckets",
            RESULTS: f"≈ 0 once drained (≤ {DRAINED_AT_MOST:g})",
        }
        rows = [("**Redis in all** (used_memory growth)", *cells("total"),
                 f"target ≤ {TARGET_WITH_OUTPUT:g} with an output"),
                ("without connections' buffers (below)", *cells("data"), ""),
                ("in keys (MEMORY USAGE, the classes below)", *cells("keys"), "")]
        for cls, what in CLASS_LABELS.items():
            rows.append((f"· {what}", *cells(cls), compare.get(cls, "")))
        rows += [
            ("client connections' buffers (mem_clients_normal)", *cells("clients"),
             f"{connections:.0f} connections with an output"),
            ("the rest (key table; MEMORY USAGE is an estimate)", *cells("rest"),
             "< 0 with the log: MEMORY USAGE overestimates streams"),
            ("peak during the crawl (used_memory, polled)", *cells("peak"), ""),
            ("part files in the output (what left Redis)", *cells("parts"),
             f"{self.median(WITH_OUTPUT, lambda r: r.parts):.0f} parts"),
        ]
        return rows

    def verdicts(self) -> list[tuple[str, str, bool]]:
        total = self.of(WITH_OUTPUT, "total") or 0.0
        results = self.of(WITH_OUTPUT, RESULTS) or 0.0
        return [
            (f"Redis ≤ {TARGET_WITH_OUTPUT:g} B per seen URL at the end of a crawl, with an "
             "output", f"{total:.1f} B/URL", total <= TARGET_WITH_OUTPUT),
            ("the results cost Redis nothing once drained (results log ≤ "
             f"{DRAINED_AT_MOST:g} B/URL)", f"{results:.2f} B/URL", results <= DRAINED_AT_MOST),
        ]

    def notes(self) -> list[str]:
        """What the figures with an output are made of: per URL, and fixed."""
        def m(pick: Callable[[MemoryRun], float]) -> float:
            return self.median(WITH_OUTPUT, pick)

        seen, buckets = m(lambda r: r.seen), m(lambda r: r.seen_buckets)
        per_bucket = (m(lambda r: r.usage.bytes[SEEN]) - SEEN_FLOOR * seen) / max(buckets, 1)
        # Beyond the seen set's members, nothing left in Redis grows with the URLs: buckets,
        # connections and hosts are as many for a crawl twice the size.
        fixed = m(lambda r: r.grown) - SEEN_FLOOR * seen
        clients, connections = m(lambda r: r.clients), m(lambda r: r.connections)
        lines = [
            f"The seen set holds {seen:,.0f} URLs in {buckets:,.0f} buckets "
            f"({seen / max(buckets, 1):.1f} a bucket): {SEEN_FLOOR:g} B a member plus "
            f"~{per_bucket:.0f} B a bucket (key name, object, table entry, intset header), "
            f"{per_bucket * buckets / seen:.1f} B/URL at this size, ~0.4 B/URL at 1 M URLs "
            "(benchmarks/scheduler.py (c)).",
            f"With an output, all but the members' {SEEN_FLOOR:g} B/URL is fixed: the buckets' "
            f"{per_bucket * buckets / 1024:,.0f} KiB, the {connections:.0f} connections' "
            f"{clients / 1024:,.0f} KiB (connections opened as the crawl got busy, and query "
            "buffers a busy connection keeps at the size of a recent large call, up to ~20 KB; "
            "it varies from run to run), "
            f"{(fixed - per_bucket * buckets - clients) / 1024:,.0f} KiB of the rest: "
            f"{fixed / seen:.1f} B/URL at {seen:,.0f} URLs. At "
            f"{SEEN_FLOOR:g} B/URL plus that, the total is ≤ {TARGET_WITH_OUTPUT:g} B/URL from "
            f"~{fixed / (TARGET_WITH_OUTPUT - SEEN_FLOOR):,.0f} URLs on.",
            f"Not counted: the {self.scratch / 1024:,.0f} KiB a fresh Redis kept for itself "
            "after a first, uncounted crawl and FLUSHDB, mostly Redis 7's latency-tracking (a "
            "~25 KB histogram per command name, made at its first call): once per server, not "
            "per URL.",
        ]
        return lines


FIGURES: dict[str, Callable[[MemoryRun], float]] = {
    "total": lambda r: r.grown,
    "data": lambda r: r.grown - r.clients,
    "keys": lambda r: r.in_keys,
    "clients": lambda r: r.clients,
    "rest": lambda r: r.rest,
    "peak": lambda r: r.peak,
}


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def run_line(runs: dict[str, list[MemoryRun]]) -> str:
    parts = []
    for label in CONFIGS:
        rs = runs[label]
        crawl = ", ".join(f"{r.crawl_s:.1f}" for r in rs)
        drain = [r.drain_s for r in rs if r.drain_s is not None]
        tail = f"; drained in {', '.join(f'{d:.1f}' for d in drain)} s" if drain else ""
        parts.append(f"{label}: crawls of {crawl} s{tail}")
    return "; ".join(parts)


def text_report(summary: Summary, args: argparse.Namespace, shape: tp.Shape,
                web: tp.TestWeb) -> list[str]:
    rows = summary.rows()
    head = ("B per seen URL", *CONFIGS, "floor / target")
    widths = [max(len(strip_md(r[i])) for r in [head, *rows]) for i in range(4)]
    rule = "-" * (sum(widths) + 9)
    n = args.repeat
    lines = [
        f"Redis memory at the end of a crawl: {shape.describe()}; {len(web.reachable):,} "
        f"reachable URLs; scheduler + {args.workers} workers; median of {n} run"
        f"{'s' if n > 1 else ''}",
        rule,
    ]
    for row in [head, *rows]:
        what, a, b, compare = map(strip_md, row)
        lines.append(f"{what:<{widths[0]}}  {a:>{widths[1]}}  {b:>{widths[2]}}  "
                     f"{compare}".rstrip())
    lines += [rule, f"URLs seen: {summary.seen(NO_OUTPUT):,} / {summary.seen(WITH_OUTPUT):,}; "
              f"{run_line(summary.runs)}",
              "Targets:"]
    for target, measured, met in summary.verdicts():
        lines.append(f"  {target}: {measured}  {'met' if met else 'NOT MET'}")
    lines += [f"  * {note}" for note in summary.notes()]
    lines.append(f"Every run checked: export = {len(web.reachable):,} lines = the URLs seen = "
                 "the reachable set, and crawlfleet check exited 0.")
    return lines


def strip_md(text: str) -> str:
    return text.replace("**", "").replace("`", "")


def docs_block(summary: Summary, args: argparse.Namespace, argv: list[str], shape: tp.Shape,
               web: tp.TestWeb) -> str:
    n = args.repeat
    lines = [
        BEGIN,
        "## Redis memory at the end of a crawl: `benchmarks/memory.py`",
        "",
        "Written by `benchmarks/memory.py --write-docs` (measured, not typed in).",
        "",
        f"* date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"* command: `{shlex.join(['python', 'benchmarks/memory.py', *argv])}`",
        f"* crawl: {shape.describe()}; {len(web.reachable):,} reachable URLs; a scheduler and "
        f"{args.workers} workers; namespace `{NAMESPACE}`",
        *(f"* {fact}" for fact in tp.machine_facts()),
        "",
        f"Bytes per seen URL, the median of {n} run{'s' if n > 1 else ''} of each "
        "configuration. *no output*: the results stay in the results log. *output + sink*: "
        "`CRAWLFLEET_OUTPUT` set and one `crawlfleet sink`, measured once `crawlfleet status "
        "--json` says `results_in_redis` 0. Growth of `INFO memory` used_memory and, per key "
        "class, of `MEMORY USAGE key SAMPLES 0` over a SCAN, from right before seeding to the "
        "end. Every run was checked: `crawlfleet export` gave one line per seen URL, exactly "
        "the reachable set, and `crawlfleet check` exited 0.",
        "",
        "| B per seen URL | no output | output + sink | floor / target |",
        "| --- | ---: | ---: | --- |",
        *(f"| {' | '.join(row)} |" for row in summary.rows()),
        "",
        f"URLs seen: {summary.seen(NO_OUTPUT):,} / {summary.seen(WITH_OUTPUT):,}; "
        f"{run_line(summary.runs)}.",
        "",
        "| target | measured | |",
        "| --- | ---: | --- |",
        *(f"| {t} | {m} | {'met' if ok else '**NOT MET**'} |" for t, m, ok in summary.verdicts()),
        "",
        *(f"* {note}" for note in summary.notes()),
        END,
    ]
    return "\n".join(lines)


def write_docs(path: Path, block: str) -> None:
    """Replace this script's section of ``path``, or add it at the end; the rest stays."""
    docs_section.replace(path, BEGIN, END, block, new_file_head="# Benchmarks\n\n")


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Redis memory per seen URL at the end of a crawl, without an output and "
        "with one drained by a sink, by key class. See the module docstring.")
    p.add_argument("--hosts", type=int, default=40, help="test web hosts (default 40)")
    p.add_argument("--pages", type=int, default=750,
                   help="HTML pages per host (default 750: ~60,000 URLs, past the fixed costs)")
    p.add_argument("--links", type=int, default=8, help="links per page (default 8)")
    p.add_argument("--latency-ms", type=float, default=0.0,
                   help="test web latency per response (default 0: memory, not speed)")
    p.add_argument("--workers", type=int, default=2, help="workers per fleet (default 2)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs of each configuration (default 3)")
    p.add_argument("--write-docs", nargs="?", const=str(tp.DOCS), default=None, metavar="PATH",
                   help=f"write the table into its section of PATH (default {tp.DOCS})")
    p.add_argument("--keep-logs", action="store_true", help="keep the temporary log folder")
    p.set_defaults(env=[])  # tp.crawl_env reads throughput's --set settings from here
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if min(args.repeat, args.hosts, args.pages, args.workers) < 1 or args.links < 0:
        raise SystemExit("--repeat, --hosts, --pages and --workers must be at least 1, "
                         "--links at least 0")
    began = time.monotonic()
    shape = tp.Shape("many", args.hosts, args.pages, args.links,
                     tp.DEFAULTS.per_host_concurrency, args.latency_ms, 0.0,
                     tp.DEFAULTS.max_in_flight)
    runs: dict[str, list[MemoryRun]] = {label: [] for label in CONFIGS}
    with tp.benchmark_processes() as procs, tp.workspace(args.keep_logs) as workdir:
        try:
            server = tp.start_redis(procs, workdir)
            web = tp.start_testweb(procs, shape, workdir)
            print(f"test web: {shape.describe()}; {len(web.reachable)} URLs; redis-server "
                  f"on port {server.port}; work folder {workdir}", file=sys.stderr)
            scratch = warm_up(procs, web, shape, args, server, workdir)
            for i in range(1, args.repeat + 1):
                for label in CONFIGS:  # interleaved: drift spreads over both
                    run = measure(procs, web, shape, args, server, workdir, label)
                    runs[label].append(run)
                    print(f"  run {i}: {label:<13} {run.seen} URLs seen in "
                          f"{run.crawl_s:5.1f} s: {run.per_url(run.grown):7.1f} B/URL in "
                          f"Redis", file=sys.stderr, flush=True)
        finally:
            procs.stop_all()  # before the work folder (their logs) goes
    summary = Summary(runs, scratch)
    print("\n".join(text_report(summary, args, shape, web)))
    for fact in tp.machine_facts():
        print(f"  * {fact}")
    if args.write_docs:
        path = Path(args.write_docs)
        write_docs(path, docs_block(summary, args, argv, shape, web))
        print(f"wrote its section of {path}")
    print(f"(benchmark wall time {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
