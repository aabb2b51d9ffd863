"""What a page costs Redis in progress.lua, against how many pages one call carries.

Usage::

    .venv/bin/python benchmarks/progress_cost.py [--pages-per-call 4,6,8,14] [--calls 1500]
                                                 [--repeat 5]

A worker holding a host makes one ``progress.lua`` call every few pages: it reports the pages
done since the last call with their links, marks the next fetches and refills its lease. How
many pages a call carries is bounded by the marks a call may set ahead of the fetches
(``workers/batch.py``: ``max(per-host concurrency, MIN_MARK_AHEAD)``, and a call goes out when
a quarter of them is left), so on a host with 2 fetches in flight a call carries ~6 pages.

This replays that steady state on ONE private ``redis-server`` (a free loopback port, never the
machine's 6379), with no HTTP and no other process competing for the cores: 20 hosts, each
held under a claimed lease; every call reports N pages (a PageResult like a real one), admits
1.1 links a page (what reaches Redis on ``benchmarks/throughput.py``'s ``many`` shape after the
worker's filter; half of them new), marks the next N fetches and refills the lease to 20. For
each N it prints, as medians of ``--repeat`` runs of ``--calls`` calls: the redis-server's CPU
per page (``/proc``; the round trips included), the time inside EVALSHA per page and per call
(INFO commandstats), and the fixed part of a call, measured apart: an empty script given the
same arguments, then with lib.lua's preamble, then with the crawl check and Redis's clock that
every call makes.

The live crawl pays more per call than this (the worker and the test web share the two cores
and evict Redis's caches): compare N against N here, not with the crawl's figures.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import throughput as tp  # noqa: E402
from redis.asyncio import Redis  # noqa: E402

from crawlfleet.common import commands  # noqa: E402
from crawlfleet.common.frontier import Admission, Limits, Progress, StoredResult  # noqa: E402
from crawlfleet.common.messages import HostBatch, QueuedURL  # noqa: E402
from scheduler import Frontiers, page_result, url_of  # noqa: E402

HOSTS = 20
LEASE = 20  # URLs a lease holds (the default batch size)
LINKS_PER_PAGE = 1.1  # links reaching Redis per page on `many`, after the worker's filter
PAGE = "p"


@dataclass
class Held:
    batch: HostBatch
    host_index: int
    todo: list[QueuedURL] = field(default_factory=list)


@dataclass
class Cost:
    redis_ms_per_page: float
    evalsha_ms_per_page: float
    evalsha_us_per_call: float


def links_for(rng: random.Random, host: int, depth: int, fresh: list[int]) -> list[Admission]:
    """LINKS_PER_PAGE links of the page's host, on average; half of them new to the crawl."""
    links = []
    expected = LINKS_PER_PAGE
    while expected > 0:
        if rng.random() < expected:
            new = rng.random() < 0.5
            n = fresh[host] if new else rng.randrange(fresh[host])
            fresh[host] += new
            links.append(Admission.of(*url_of(host, n), depth + 1))
        expected -= 1
    return links


async def hold_hosts(f: Frontiers, per_host: int) -> tuple[list[Held], list[int]]:
    """Fill 20 host queues, dispatch and claim each host once, mark its first fetches."""
    admissions = [Admission.of(*url_of(h, i), 0) for h in range(HOSTS) for i in range(per_host)]
    await f.admit_all(admissions, Limits())
    await f.frontier.dispatch(f.crawl, batch_size=LEASE, max_waiting=HOSTS * 2)
    index = {url_of(h, 0)[1]: h for h in range(HOSTS)}
    held = []
    for job_id, batch in await f.waiting_batches():
        claim = await f.frontier.claim(batch, lease_seconds=600.0, job_id=job_id)
        if claim is None:
            raise tp.BenchError(f"the claim of {batch.host} was stale")
        held.append(Held(batch, index[batch.host], list(claim.urls)))
    if len(held) != HOSTS:
        raise tp.BenchError(f"{len(held)} of {HOSTS} hosts were dispatched")
    return held, [per_host] * HOSTS


async def measure(client: Any, pages_per_call: int, calls: int, seed: int) -> Cost:
    await client.flushdb()
    f = Frontiers(client, f"pc{seed}")
    await f.open(1_000_000)
    # Enough queued URLs that no host runs dry: each call takes pages_per_call from its queue.
    held, fresh = await hold_hosts(f, per_host=calls * pages_per_call // HOSTS + 2 * LEASE)
    for h in held:
        await f.frontier.progress(
            h.batch, Progress(marks=[e.fp for e in h.todo[:pages_per_call]]), Limits())
    rng = random.Random(seed)
    pid = int((await client.info("server"))["process_id"])
    await client.config_resetstat()
    cpu_before = tp.cpu_seconds(pid)
    pages = made = 0
    while made < calls:
        for h in held:
            done, h.todo = h.todo[:pages_per_call], h.todo[pages_per_call:]
            step = Progress(
                results=[StoredResult(e.fp, PAGE, page_result(e)) for e in done],
                admissions=[a for e in done for a in links_for(rng, h.host_index, e.depth, fresh)],
                marks=[e.fp for e in h.todo[:pages_per_call]],
                want=max(0, LEASE - len(h.todo)))
            outcome = await f.frontier.progress(h.batch, step, Limits())
            if not outcome.lease_held or outcome.stored != len(done):
                raise tp.BenchError(f"progress stored {outcome.stored} of {len(done)} pages")
            h.todo += outcome.refill
            pages += len(done)
            made += 1
    cpu = tp.cpu_seconds(pid) - cpu_before
    stats = (await client.info("commandstats"))["cmdstat_evalsha"]
    return Cost(1000 * cpu / pages, int(stats["usec"]) / pages / 1000,
                float(stats["usec_per_call"]))


async def fixed_parts(client: Any, pages_per_call: int, repeat: int) -> dict[str, float]:
    """EVALSHA µs a call of an empty script, then lib.lua's preamble, then the crawl check and
    TIME, each given a typical call's arguments."""
    await client.flushdb()
    f = Frontiers(client, "pcfixed")
    await f.open(1_000)
    entries = [QueuedURL(fp=f"{i:016x}", url=url_of(0, i)[0], depth=1) for i in range(LEASE)]
    step = Progress(
        results=[StoredResult(e.fp, PAGE, page_result(e)) for e in entries[:pages_per_call]],
        marks=[e.fp for e in entries[pages_per_call:2 * pages_per_call]],
        admissions=[Admission.of(*url_of(0, 100 + i), 2)
                    for i in range(round(pages_per_call * LINKS_PER_PAGE))],
        want=pages_per_call)
    batch = HostBatch(batch_id="b", host=url_of(0, 0)[1], crawl=f.crawl)
    argv = [f.keys.prefix, f.crawl, *f.frontier.progress_args(batch, step, Limits())]
    preamble = commands.preamble()
    scripts = {
        "an empty script": "return 1",
        "+ lib.lua's preamble": preamble + "return 1",
        "+ the crawl check and TIME": preamble + "crawl_is_current()\nnow_s()\nreturn 1",
    }
    out = {}
    for name, source in scripts.items():
        sha = await client.script_load(source)
        runs = []
        for _ in range(repeat):
            await client.config_resetstat()
            for _ in range(500):
                await client.evalsha(sha, 0, *argv)
            runs.append(float((await client.info("commandstats"))["cmdstat_evalsha"]
                              ["usec_per_call"]))
        out[name] = statistics.median(runs)
    out["arguments"] = len(argv)
    return out


async def measure_all(args: argparse.Namespace, port: int) -> list[str]:
    client = Redis(host="127.0.0.1", port=port)
    try:
        costs: dict[int, list[Cost]] = {n: [] for n in args.pages_per_call}
        for run in range(args.repeat):  # the settings take turns, so drift spreads over all
            for n in args.pages_per_call:
                costs[n].append(await measure(client, n, args.calls, seed=run * 100 + n))
        fixed = await fixed_parts(client, args.pages_per_call[0], args.repeat)
    finally:
        await client.aclose()
    lines = [f"progress.lua in a steady state: {HOSTS} hosts held, {LINKS_PER_PAGE} links a page "
             f"reach Redis; medians of {args.repeat} runs of {args.calls} calls",
             f"  {'pages a call':>12}  {'Redis CPU-ms/page':>17}  {'EVALSHA ms/page':>15}  "
             f"{'EVALSHA µs/call':>15}"]
    first = statistics.median(c.redis_ms_per_page for c in costs[args.pages_per_call[0]])
    for n, runs in costs.items():
        cpu = statistics.median(c.redis_ms_per_page for c in runs)
        lines.append(
            f"  {n:>12}  {cpu:>17.4f}  "
            f"{statistics.median(c.evalsha_ms_per_page for c in runs):>15.4f}  "
            f"{statistics.median(c.evalsha_us_per_call for c in runs):>15.1f}"
            f"   ({cpu / first:.2f}x the first)")
    lines.append(f"Fixed part of a call ({fixed.pop('arguments'):.0f} arguments, "
                 f"{args.pages_per_call[0]} pages), EVALSHA µs a call:")
    lines += [f"  {name:<28} {us:6.1f}" for name, us in fixed.items()]
    return lines


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of whole numbers: {text!r}") from None
    if not sizes or any(n < 1 or n > LEASE for n in sizes):
        raise argparse.ArgumentTypeError(f"pages a call must be 1 to {LEASE}: {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages-per-call", type=parse_sizes, default=[4, 6, 8, 14],
                        help="pages each call reports, comma-separated (default 4,6,8,14)")
    parser.add_argument("--calls", type=int, default=1500, help="calls a run (default 1500)")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each (default 5)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.calls < HOSTS or args.repeat < 1:
        raise SystemExit(f"--calls must be at least {HOSTS} and --repeat at least 1")
    began = time.monotonic()
    with tp.benchmark_processes() as procs, tp.workspace(False) as workdir:
        try:
            server = tp.start_redis(procs, workdir)
            lines = asyncio.run(measure_all(args, server.port))
        finally:
            procs.stop_all()  # before the work folder (its log) goes
    print("\n".join(lines + tp.machine_facts()[:1]))
    print(f"(benchmark wall time {time.monotonic() - began:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
