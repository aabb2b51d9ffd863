"""Size a crawl of a billion URLs over Redis shards from per-shard figures measured on this machine.

Inputs, each printed with its source: docs/benchmarks.json (benchmarks/throughput.py: a worker's
pages/s, CPU ms per page of workers, scheduler and redis-server, Redis commands per page; shape
'docs', else 'many'); benchmarks/arq_rate.py's JSON (run here, or ``--arq-json FILE``); bytes per
host, queued URL and lease, measured here by filling crawlfleet's keys (common/keys.py, the Lua
scripts) for ``--sample-hosts`` hosts on a private redis-server; the seen set's bytes and
connection buffers from docs/benchmarks.md. The model (``plan``) is pure, I/O at the edges;
``--write-docs docs/scale.md`` replaces the section between the markers, keeping the rest.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))  # arq_rate, next to this file
import docs_section

from crawlfleet.common.keys import BUCKET_FILL, INTSET_LIMIT, Keys, seen_digits
from crawlfleet.common.settings import Settings

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- benchmarks/scale.py: begin -->", "<!-- benchmarks/scale.py: end -->"
GB = 1e9
# docs/benchmarks.md, benchmarks/memory.py section: "8 B a member plus ~88 B a bucket"; 534 KiB
# of client buffers for 46 connections (a scheduler, 2 workers, a sink); 25.9 B per seen URL.
DOC_SEEN_MEMBER_B, DOC_SEEN_BUCKET_B = 8.0, 88.0
DOC_CONN_B, DOC_CONNS_PER_WORKER = 534 * 1024 / 46, 46 / 2
DOC_REDIS_B_PER_URL = 25.9


class Fleet(NamedTuple):  # per page, a fleet of 1 (benchmarks/throughput.py)
    source: str
    worker_pages_per_s: float
    worker_cpu_ms: float
    scheduler_cpu_ms: float
    redis_cpu_ms: float
    redis_commands: float


class Arq(NamedTuple):  # per job and per idle poll (benchmarks/arq_rate.py)
    source: str
    redis_cpu_ms_per_job: float
    commands_per_job: float
    worker_jobs_per_s: float
    redis_cpu_ms_per_poll: float
    polls_per_s: float


class Bytes(NamedTuple):  # used_memory growth per thing, measure_bytes()
    source: str
    host: dict[str, float]  # per host: host:pages, host:not-before, ready, robots (allow-all)
    robots_ok: float  # a robots entry with a body, in place of the allow-all one
    queue_key: float  # a host queue list, without its entries
    queue_entry: float  # one QueuedURL entry in it
    lease: float  # a host out in a batch: lease hash, fetching set, lease:batch, leases
    seen_member_big_bucket: float  # a seen member once its bucket is past the intset limit


@dataclass(frozen=True)
class Crawl:
    urls: float = 1e9
    hosts: float = 5e7
    pages_per_s: float = 10_000
    shard_memory_gb: float = 25.0
    memory_utilisation: float = 0.8
    redis_core_utilisation: float = 0.7
    queued_fraction: float = 0.8
    url_length: int = 80
    robots_body_bytes: int = 300
    fetch_latency_s: float = 0.5
    worker_core_utilisation: float = 0.7
    standby_schedulers: int = 1


def per_host_rate(s: Settings, latency_s: float) -> float:
    """Pages/s one host gives: its crawl delay and its fetches in flight both bound it."""
    return min(1 / s.crawl_delay if s.crawl_delay > 0 else math.inf,
               s.per_host_concurrency / latency_s)


def pages_per_turn(c: Crawl, s: Settings) -> float:
    """Pages one host turn (one arq job) covers at most: the host's pages, host_turn_pages, what
    the host gives in host_turn_seconds. A queue that runs dry mid-crawl costs more turns."""
    return min(c.urls / c.hosts, s.host_turn_pages,
               s.host_turn_seconds * per_host_rate(s, c.fetch_latency_s))


def seen_bytes(urls: float, digits: int, b: Bytes) -> tuple[float, float]:
    """(bytes, members a bucket) of a seen set of ``urls`` with ``digits`` bucket digits."""
    buckets = 16.0 ** digits
    fill = urls / buckets
    member = DOC_SEEN_MEMBER_B if fill < INTSET_LIMIT else b.seen_member_big_bucket
    return urls * member + buckets * DOC_SEEN_BUCKET_B, fill


def workers_needed(c: Crawl, s: Settings, f: Fleet) -> dict[str, int]:
    return {
        "at the benchmark's rate a worker": math.ceil(c.pages_per_s / f.worker_pages_per_s),
        "by CPU": math.ceil(c.pages_per_s * f.worker_cpu_ms / 1000 / c.worker_core_utilisation),
        "by fetches in flight (max_in_flight)": math.ceil(
            c.pages_per_s * c.fetch_latency_s / s.max_in_flight),
        "by host slots (jobs_per_worker)": math.ceil(
            c.pages_per_s / per_host_rate(s, c.fetch_latency_s) / s.jobs_per_worker),
    }


def memory_per_shard(shards: int, c: Crawl, s: Settings, b: Bytes, workers: int,
                     digits: int | None = None) -> dict[str, float]:
    """Bytes of one shard at the peak, by class; ``_digits`` and ``_fill`` describe the seen set
    (bucket digits from the shard's own share of the URLs unless ``digits`` is given)."""
    urls, hosts = c.urls / shards, c.hosts / shards
    d = seen_digits(int(urls)) if digits is None else digits
    seen, fill = seen_bytes(urls, d, b)
    host = sum(b.host.values()) - b.host["robots (allow-all)"] + b.robots_ok
    queued = c.queued_fraction * urls
    return {
        "seen set": seen, "per-host state": hosts * host,
        "queued URLs": queued * b.queue_entry + min(hosts, queued) * b.queue_key,
        "leases (in flight)": workers * s.jobs_per_worker / shards * b.lease,
        "connections": workers * DOC_CONNS_PER_WORKER * DOC_CONN_B,
        "_digits": d, "_fill": fill,
    }


def total(mem: dict[str, float]) -> float:
    return sum(v for k, v in mem.items() if not k.startswith("_"))


def shards_by_memory(c: Crawl, s: Settings, b: Bytes, workers: int) -> int:
    budget = c.shard_memory_gb * GB * c.memory_utilisation
    return next(n for n in range(1, 1_000_000)
                if total(memory_per_shard(n, c, s, b, workers)) <= budget)


def shards_by_cpu(pages_per_s: float, ms_per_page: float, poll_core: float, util: float) -> int:
    """Shards whose one core, used to ``util``, carries the pages' Redis CPU on top of every
    worker's polls (each worker polls each shard); 0 if the polls alone fill a shard."""
    room = util - poll_core
    return math.ceil(pages_per_s * ms_per_page / 1000 / room) if room > 0 else 0


def idle_polls_per_s(s: Settings) -> float:
    """A crawlfleet worker's polls of one shard's queue a second with nothing to take: they slow
    down to one per poll_max_delay (workers/worker.py; the scheduler's word wakes them when it
    queues jobs). arq's own worker polls every poll_delay (what arq_rate.py measures)."""
    return 1 / s.poll_max_delay


def plan(c: Crawl, s: Settings, f: Fleet, a: Arq, b: Bytes) -> dict[str, Any]:
    turn = pages_per_turn(c, s)
    jobs_per_s = c.pages_per_s / turn
    redis_ms = f.redis_cpu_ms + a.redis_cpu_ms_per_job / turn  # the turns' arq jobs on top
    workers = workers_needed(c, s, f)
    worker_count = max(workers.values())
    poll_core = worker_count * idle_polls_per_s(s) * a.redis_cpu_ms_per_poll / 1000
    util = c.redis_core_utilisation
    cmds_per_core_s = a.commands_per_job / (a.redis_cpu_ms_per_job / 1000)
    limits = {
        "memory": shards_by_memory(c, s, b, worker_count),
        "Redis CPU": shards_by_cpu(c.pages_per_s, redis_ms, poll_core, util),
        "Redis command rate": math.ceil(c.pages_per_s * f.redis_commands
                                        / (cmds_per_core_s * util)),
        "arq job rate": math.ceil(jobs_per_s * a.redis_cpu_ms_per_job / 1000 / util),
        "arq job rate at issue 492's 300 jobs/s": math.ceil(jobs_per_s / 300),
    }
    first = max(limits, key=lambda k: limits[k] or math.inf)  # 0: no shard count does
    n = max(limits.values())
    return {
        "crawl": asdict(c), "hours": c.urls / c.pages_per_s / 3600, "pages_per_turn": turn,
        "jobs_per_s": jobs_per_s, "redis_cpu_ms_per_page": redis_ms, "poll_core": poll_core,
        "commands_per_core_s": cmds_per_core_s, "limits": limits, "first_limit": first,
        "shards": n, "memory": memory_per_shard(n, c, s, b, worker_count),
        **{key: memory_per_shard(n, c, s, b, worker_count, seen_digits(int(urls)))
           for key, urls in (("memory_whole_digits", c.urls),
                             ("memory_default_digits", s.expected_urls))},
        "memory_shards_by_backlog": {q: shards_by_memory(replace(c, queued_fraction=q), s, b,
                                                         worker_count) for q in (0, .2, .5, .8, 1)},
        "redis_core_per_shard": c.pages_per_s / n * redis_ms / 1000 + poll_core,
        "workers": workers, "worker_count": worker_count,
        "worker_cores": c.pages_per_s * f.worker_cpu_ms / 1000,
        "schedulers": n * (1 + c.standby_schedulers),
        "scheduler_core_per_shard": c.pages_per_s / n * f.scheduler_cpu_ms / 1000,
    }


def past_the_limit(p: dict[str, Any]) -> str:
    m = p["memory"]
    parts = sorted(((v, k) for k, v in m.items() if not k.startswith("_")), reverse=True)
    big = ", ".join(f"{k} {100 * v / total(m):.0f}%" for v, k in parts[:3])
    if p["limits"][p["first_limit"]] == 0:
        return (f"{p['first_limit']}: the workers' polls of every shard ({p['poll_core']:.2f} "
                "core a shard) leave no room for pages. Fewer polls must come first: one poller "
                "a process for all shards, a longer poll_max_delay, or a blocking pop.")
    if p["first_limit"] == "memory":
        return (f"memory decides ({big} of a shard). More shards only divide it; what changes "
                "the count is what a queued URL and a host cost: a queue entry shorter than a "
                "JSON object or a backlog kept out of Redis, robots entries that leave once "
                "their host is done. Redis CPU per page comes next.")
    return (f"{p['first_limit']} decides; past it the Lua scripts' Redis CPU per page (and the "
            f"workers' polls of every shard) must fall. Memory: {big}.")


def report(p: dict[str, Any], s: Settings, f: Fleet, a: Arq, b: Bytes) -> list[str]:
    c, mem, n = Crawl(**p["crawl"]), p["memory"], p["shards"]

    def gb(v: float) -> str:
        return f"{v / GB:,.2f} GB"
    out = [
        f"crawl: {c.urls:,.0f} URLs, {c.hosts:,.0f} hosts, {c.pages_per_s:,.0f} pages/s "
        f"({p['hours']:.1f} h); a shard: {c.shard_memory_gb:g} GB filled to "
        f"{c.memory_utilisation:.0%}, one Redis core used to {c.redis_core_utilisation:.0%}",
        "inputs, measured:",
        f"  {f.source}: a worker {f.worker_pages_per_s:,.0f} pages/s; CPU ms/page: workers "
        f"{f.worker_cpu_ms:.3f}, scheduler {f.scheduler_cpu_ms:.4f}, redis-server "
        f"{f.redis_cpu_ms:.4f}; {f.redis_commands:.2f} Redis commands/page",
        f"  {a.source}: Redis {a.redis_cpu_ms_per_job:.4f} CPU-ms, {a.commands_per_job:.1f} "
        f"commands a job; one worker {a.worker_jobs_per_s:,.0f} jobs/s; an idle poll "
        f"{a.redis_cpu_ms_per_poll:.4f} CPU-ms ({a.polls_per_s:.0f} polls/s an arq worker; a "
        f"crawlfleet worker with nothing to take polls a shard {idle_polls_per_s(s):g} times "
        f"a second, poll_max_delay {s.poll_max_delay:g} s)",
        f"  {b.source}, B per host: " + ", ".join(f"{k} {v:.0f}" for k, v in b.host.items()),
        f"    robots entry with a {c.robots_body_bytes} B body {b.robots_ok:.0f}; host queue "
        f"{b.queue_key:.0f} + {b.queue_entry:.0f} an entry ({c.url_length}-char URL); a lease "
        f"{b.lease:.0f}; a seen member in a bucket past the intset limit "
        f"{b.seen_member_big_bucket:.1f}",
        f"inputs from docs/benchmarks.md (memory.py): seen set {DOC_SEEN_MEMBER_B:g} B a member "
        f"+ {DOC_SEEN_BUCKET_B:g} B a bucket; {DOC_CONN_B / 1024:.1f} KiB a connection, "
        f"~{DOC_CONNS_PER_WORKER:.0f} a worker ({DOC_REDIS_B_PER_URL} B per seen URL in all "
        "at the end of a 59 k-URL crawl with an output: no backlog, 40 hosts)",
        f"assumed (flags): peak backlog {c.queued_fraction:.0%} of the URLs, fetch latency "
        f"{c.fetch_latency_s} s; settings: crawl_delay {s.crawl_delay}, per_host_concurrency "
        f"{s.per_host_concurrency}, jobs_per_worker {s.jobs_per_worker}, max_in_flight "
        f"{s.max_in_flight}, host_turn_pages {s.host_turn_pages}, poll_delay {s.poll_delay}, "
        f"poll_max_delay {s.poll_max_delay}",
        "shards needed, by:",
        *(f"  {k:<44} {v if v else 'never (polls fill a shard)':>5}"
          for k, v in p["limits"].items()),
        f"  first limit: {p['first_limit']} -> {n} shards",
        f"  ({p['pages_per_turn']:.0f} pages a host turn at most: >= {p['jobs_per_s']:,.0f} "
        f"arq jobs/s in all; Redis {p['redis_cpu_ms_per_page']:.4f} CPU-ms/page with them; the "
        f"workers' idle polls {p['poll_core']:.3f} core a shard; a Redis core runs "
        f"~{p['commands_per_core_s']:,.0f} arq-type commands/s)",
        f"per shard at {n} shards ({c.urls / n:,.0f} URLs, {c.hosts / n:,.0f} hosts, "
        f"{c.pages_per_s / n:,.0f} pages/s), at the peak:",
        *(f"  {k:<20} {gb(v):>10}" for k, v in mem.items() if not k.startswith("_")),
        f"  {'in all':<20} {gb(total(mem)):>10} of {c.shard_memory_gb * c.memory_utilisation:g}"
        f" GB planned; Redis {p['redis_core_per_shard']:.2f} core",
        f"  B per seen URL: {total(mem) / (c.urls / n):.0f} at the peak, "
        f"{(total(mem) - mem['queued URLs']) / (c.urls / n):.0f} once the queues are empty; "
        f"{mem['per-host state'] / (c.hosts / n):.0f} B per host",
        f"  seen set: {mem['_digits']} bucket digits ({16 ** mem['_digits']:,} buckets, "
        f"{mem['_fill']:,.0f} a bucket; intset below {INTSET_LIMIT}, aimed at {BUCKET_FILL})",
    ]
    for label, key in (("the whole crawl's 1e9", "memory_whole_digits"),
                       (f"the default {s.expected_urls:,}", "memory_default_digits")):
        m = p[key]
        out.append(f"  with digits for {label} expected_urls: {m['_digits']} digits, "
                   f"{m['_fill']:,.0f} a bucket ("
                   f"{'intset' if m['_fill'] < INTSET_LIMIT else 'hash table'}), seen set "
                   f"{gb(m['seen set'])}, shard {gb(total(m))}")
    out += [
        "  shards by memory vs peak backlog: " + ", ".join(
            f"{q:.0%} {k}" for q, k in p["memory_shards_by_backlog"].items()),
        f"workers: {p['worker_count']:,} (" + ", ".join(
            f"{k} {v:,}" for k, v in p["workers"].items())
        + f"); {p['worker_cores']:.1f} worker cores busy",
        f"schedulers: {p['schedulers']} (one leading per shard + {c.standby_schedulers} "
        f"standby); {p['scheduler_core_per_shard']:.3f} core each",
        "past it: " + past_the_limit(p),
    ]
    return out


def load_fleet(path: Path) -> Fleet:
    data = json.loads(path.read_text())
    shape = "docs" if "docs" in data["shapes"] else "many"
    row = data["shapes"][shape]["rows"]["fleet of 1"]
    cpu = row["cpu_ms_per_page"]
    return Fleet(f"{path.name} of {data['date']}, shape '{shape}', fleet of 1",
                 row["pages_per_s"], cpu["workers"], cpu["scheduler"], cpu["redis-server"],
                 row["redis_commands_per_page"])


def load_arq(path: Path | None, small: bool) -> Arq:
    source = f"arq_rate.py's JSON ({path})" if path else "benchmarks/arq_rate.py, run now"
    with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
        if path is None:
            path = Path(tmp.name)
            subprocess.run([sys.executable, str(HERE / "arq_rate.py"), "--json-out", tmp.name,
                            *(["--small"] if small else [])], check=True, stdout=subprocess.DEVNULL)
        data = json.loads(path.read_text())
    idle = data.get("idle", {})
    return Arq(f"{source}, {data['jobs']:,} jobs, {data['date']}", data["redis_cpu_ms_per_job"],
               data["redis_commands_per_job"], data["run"]["jobs_per_s"],
               idle.get("redis_cpu_ms_per_poll", 0.0), idle.get("polls_per_s", 0.0))


def measure_bytes(c: Crawl, s: Settings, sample: int) -> Bytes:
    """Fill crawlfleet's per-host keys for ``sample`` hosts on a private Redis, one class at a
    time, and divide used_memory's growth by the count."""
    import redis
    from throughput import Processes, start_redis  # type: ignore[import-not-found]

    from crawlfleet.common.messages import QueuedURL, encode
    from crawlfleet.workers.robots import ALLOW_ALL, OK, RobotsPolicy, encode_policy

    k, now = Keys("crawlfleet"), time.time()
    per_host_q, batch = max(1, round(c.queued_fraction * c.urls / c.hosts)), range(s.batch_size)

    def entry(host: str, n: int) -> bytes:
        url = f"https://{host}/" + "p" * max(1, c.url_length - len(host) - 15) + f"/{n:05d}"
        return encode(QueuedURL(fp=f"{hash((host, n)) & (2**64 - 1):016x}", url=url, depth=3))

    def robots(host: str, state: str) -> bytes:
        body = ("User-agent: *\nDisallow: /private/\n" * 99)[:c.robots_body_bytes]
        return encode_policy(RobotsPolicy(f"https://{host}", state, expires_at=now + 86400,
                                          body=body if state == OK else ""))

    fills: dict[str, Any] = {
        "host:pages": lambda p, h: p.hset(k.host_pages, h, 20),
        "host:not-before": lambda p, h: p.hset(k.not_before, h, f"{now:.3f}"),
        "ready": lambda p, h: p.zadd(k.ready, {h: now}),
        "robots (allow-all)": lambda p, h: p.hset(k.robots, f"https://{h}", robots(h, ALLOW_ALL)),
        "robots (ok)": lambda p, h: p.hset(k.robots + ":ok", f"https://{h}", robots(h, OK)),
        "queue, 1 entry": lambda p, h: p.rpush(k.host_queue(h), entry(h, 0)),
        "queue, more": lambda p, h: p.rpush(k.host_queue(h + ".x"), *(
            entry(h, i) for i in range(per_host_q + 1))),
        "lease": lambda p, h: (
            p.hset(k.host_lease(h), mapping={f"{i:016x}": entry(h, i) for i in batch}),
            p.sadd(k.host_fetching(h), *(f"{i:016x}" for i in range(s.per_host_concurrency))),
            p.hset(k.lease_batch, h, f"crawlfleet:b{len(h)}"), p.zadd(k.leases, {h: now})),
        "big bucket": lambda p, h: p.sadd(k.seen + "fff", *range(
            hash(h) & 0xFFFFFFF, (hash(h) & 0xFFFFFFF) + 10)),
    }
    hosts = [f"www.site-{i:08d}.example.com" for i in range(sample)]
    grown: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="scale-") as tmp:
        procs = Processes()
        try:
            server = start_redis(procs, Path(tmp))
            r: Any = redis.Redis(host="127.0.0.1", port=server.port)
            for name, fill in fills.items():
                before = int(r.info("memory")["used_memory"])
                pipe = r.pipeline(transaction=False)
                for i, h in enumerate(hosts, 1):
                    fill(pipe, h)
                    if i % 1000 == 0 or i == sample:
                        pipe.execute()
                grown[name] = (int(r.info("memory")["used_memory"]) - before) / sample
            r.close()
        finally:
            procs.stop_all()
    entry_b = (grown["queue, more"] - grown["queue, 1 entry"]) / per_host_q
    return Bytes(f"measured now, {sample:,} hosts on a private redis-server (used_memory)",
                 {n: grown[n] for n in ("host:pages", "host:not-before", "ready",
                                        "robots (allow-all)")},
                 grown["robots (ok)"], grown["queue, 1 entry"] - entry_b, entry_b,
                 grown["lease"], grown["big bucket"] / 10)


def write_docs(path: Path, lines: list[str], argv: list[str]) -> None:
    docs_section.write(path, BEGIN, END, "## The figures: `benchmarks/scale.py`",
                       "Written by `benchmarks/scale.py --write-docs`, derived from the inputs it "
                       "names;\nedit the script, not this section.", "benchmarks/scale.py", argv,
                       lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for name, value in asdict(Crawl()).items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    p.add_argument("--benchmarks-json", type=Path, default=HERE.parent / "docs/benchmarks.json")
    p.add_argument("--arq-json", type=Path, help="benchmarks/arq_rate.py --json-out output")
    p.add_argument("--arq-small", action="store_true", help="run arq_rate.py --small")
    p.add_argument("--sample-hosts", type=int, default=20_000)
    p.add_argument("--json", action="store_true", help="end with the plan as one JSON line")
    p.add_argument("--write-docs", type=Path, metavar="FILE")
    args = p.parse_args(argv)
    crawl = Crawl(**{n: getattr(args, n) for n in asdict(Crawl())})
    settings = Settings()
    fleet, arq = load_fleet(args.benchmarks_json), load_arq(args.arq_json, args.arq_small)
    sizes = measure_bytes(crawl, settings, args.sample_hosts)
    result = plan(crawl, settings, fleet, arq, sizes)
    lines = report(result, settings, fleet, arq, sizes)
    print("\n".join(lines))
    if args.json:
        print(json.dumps(result, separators=(",", ":")))
    if args.write_docs:
        write_docs(args.write_docs, lines, argv)
        print(f"wrote its section of {args.write_docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
