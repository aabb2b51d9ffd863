"""The job rate arq sustains on ONE Redis: enqueue N no-op jobs, then run them with one arq Worker.

Everything runs against a private ``redis-server`` started here on a free loopback port (never a
Redis of someone else's) and stopped at the end, on errors and Ctrl-C too. The worker is
configured as crawlfleet's (workers/worker.py ``worker_options``): ``max_jobs`` =
``jobs_per_worker``, ``poll_delay``, ``keep_result`` 0, ``max_tries`` 1. It runs in this
process, in burst mode, after the enqueue phase, so each phase is measured alone:

* jobs/s enqueued (``ArqRedis.enqueue_job``, ``--concurrency`` calls in flight) and completed;
* Redis CPU per job (``/proc/PID/task/*/schedstat`` of the redis-server, ns; utime+stime of
  ``/proc/PID/stat`` without it), and this process's CPU per job while it runs the worker;
* Redis commands per job (CONFIG RESETSTAT, then INFO commandstats after each phase);
* then an idle worker on the empty queue for ``--idle-seconds``: Redis CPU and commands per
  poll, over the CPU Redis spends by itself in as long a time with no client.

crawlfleet's scheduler does not call enqueue_job: dispatch.lua writes arq's job key and queue
entry inside its own script, so the enqueue figures bound arq's side, not crawlfleet's.

    python benchmarks/arq_rate.py            # ~10-20 s
    python benchmarks/arq_rate.py --small    # a few seconds
    python benchmarks/arq_rate.py --json     # and a one-line JSON summary at the end
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from arq import func
from arq.connections import ArqRedis, RedisSettings, create_pool
from arq.worker import Worker

sys.path.insert(0, str(Path(__file__).resolve().parent))  # throughput.py, next to this file
from throughput import BenchError, Processes, cpu_seconds, start_redis

from crawlfleet.common.settings import Settings

QUEUE = "arqrate:queue"
STARTUP_TIMEOUT_S = 10.0


def commands(stats: dict[str, Any]) -> Counter[str]:
    """INFO commandstats as {command: calls}."""
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"])
                    for name, v in stats.items() if isinstance(v, dict) and "calls" in v})


@dataclass
class Phase:
    jobs: int
    seconds: float
    redis_cpu_s: float
    own_cpu_s: float
    calls: dict[str, int]

    @property
    def jobs_per_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def per_job(self) -> dict[str, float]:
        n = max(self.jobs, 1)
        return {"jobs_per_s": round(self.jobs_per_s, 1),
                "redis_cpu_ms_per_job": round(1000 * self.redis_cpu_s / n, 4),
                "process_cpu_ms_per_job": round(1000 * self.own_cpu_s / n, 4),
                "redis_commands_per_job": round(sum(self.calls.values()) / n, 2)}


async def noop(ctx: dict[str, Any], n: int) -> None:
    return None


class Meter:
    def __init__(self, redis_pid: int, pool: ArqRedis) -> None:
        self.redis_pid, self.pool = redis_pid, pool

    async def start(self) -> tuple[float, float, float]:
        await self.pool.config_resetstat()
        return time.perf_counter(), cpu_seconds(self.redis_pid), time.process_time()

    async def stop(self, jobs: int, began: tuple[float, float, float]) -> Phase:
        t0, r0, p0 = began
        seconds = time.perf_counter() - t0
        redis_cpu, own = cpu_seconds(self.redis_pid) - r0, time.process_time() - p0
        calls = commands(await self.pool.info("commandstats"))
        # Our own INFO and CONFIG RESETSTAT are not arq's.
        for name in ("info", "config|resetstat", "config"):
            calls.pop(name, None)
        return Phase(jobs, seconds, redis_cpu, own, dict(calls))


async def measure(port: int, redis_pid: int, args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    pool = await create_pool(RedisSettings(host="127.0.0.1", port=port), default_queue_name=QUEUE)
    meter = Meter(redis_pid, pool)
    try:
        began = await meter.start()
        next_job = 0

        async def enqueuer() -> None:
            nonlocal next_job
            while next_job < args.jobs:
                n, next_job = next_job, next_job + 1
                await pool.enqueue_job("noop", n, _job_id=f"arqrate:b{n}")

        await asyncio.gather(*(enqueuer() for _ in range(args.concurrency)))
        enqueue = await meter.stop(args.jobs, began)
        queued = await pool.zcard(QUEUE)

        worker = Worker(
            [func(noop, name="noop", max_tries=1)], queue_name=QUEUE, redis_pool=pool,
            burst=True, max_jobs=settings.jobs_per_worker, poll_delay=settings.poll_delay,
            keep_result=0, handle_signals=False, log_results=False,
            health_check_interval=max(1, round(settings.health_check_interval)))
        began = await meter.start()
        await worker.async_run()
        run = await meter.stop(worker.jobs_complete, began)
        failed = worker.jobs_failed
        await worker.close()

        # An idle worker on the empty queue: what each poll costs Redis, over what Redis spends
        # by itself (serverCron) in as long a time with no client.
        r0 = cpu_seconds(redis_pid)
        await asyncio.sleep(args.idle_seconds)
        baseline = cpu_seconds(redis_pid) - r0
        idle_worker = Worker(
            [func(noop, name="noop", max_tries=1)], queue_name=QUEUE, redis_pool=pool,
            max_jobs=settings.jobs_per_worker, poll_delay=settings.poll_delay, keep_result=0,
            handle_signals=False, log_results=False,
            health_check_interval=max(1, round(settings.health_check_interval)))
        began = await meter.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(idle_worker.main(), args.idle_seconds)
        polls = max(1, (await pool.info("commandstats")).get(
            "cmdstat_zrangebyscore", {}).get("calls", 1))
        idle = await meter.stop(polls, began)
        idle.redis_cpu_s = max(0.0, idle.redis_cpu_s - baseline * idle.seconds / args.idle_seconds)
        await idle_worker.close()
    finally:
        with contextlib.suppress(Exception):
            await pool.aclose()
    both = enqueue.redis_cpu_s + run.redis_cpu_s
    calls = Counter(enqueue.calls) + Counter(run.calls)
    n = max(args.jobs, 1)
    return {
        "jobs": args.jobs, "queued_after_enqueue": queued, "completed": run.jobs,
        "failed": failed, "max_jobs": settings.jobs_per_worker,
        "poll_delay": settings.poll_delay, "enqueue_concurrency": args.concurrency,
        "enqueue": enqueue.per_job(), "run": run.per_job(),
        "redis_cpu_ms_per_job": round(1000 * both / n, 4),
        "redis_commands_per_job": round(sum(calls.values()) / n, 2),
        "commands": {"enqueue": enqueue.calls, "run": run.calls},
        "idle": {"seconds": round(idle.seconds, 2), "polls": polls,
                 "redis_baseline_cpu_ms_per_s": round(1000 * baseline / args.idle_seconds, 3),
                 "polls_per_s": round(polls / idle.seconds, 1),
                 "redis_cpu_ms_per_poll": round(1000 * idle.redis_cpu_s / polls, 4),
                 "redis_commands_per_poll": round(sum(idle.calls.values()) / polls, 2)},
        "phases": {"enqueue": asdict(enqueue), "run": asdict(run), "idle": asdict(idle)},
    }


def redis_version() -> str:
    out = subprocess.run(["redis-server", "--version"], capture_output=True, text=True,
                         check=False).stdout.split()
    return " ".join(out[2:3]).removeprefix("v=")


def report(r: dict[str, Any]) -> list[str]:
    e, w = r["enqueue"], r["run"]
    lines = [
        f"arq on one Redis ({r['redis']}): {r['jobs']:,} no-op jobs, one Worker with max_jobs "
        f"{r['max_jobs']}, poll_delay {r['poll_delay']} s (crawlfleet's defaults), "
        f"keep_result 0",
        f"  enqueue ({r['enqueue_concurrency']} enqueue_job calls in flight): "
        f"{e['jobs_per_s']:,.0f} jobs/s, Redis {e['redis_cpu_ms_per_job']:.3f} CPU-ms and "
        f"{e['redis_commands_per_job']:.1f} commands a job, this process "
        f"{e['process_cpu_ms_per_job']:.3f} CPU-ms a job",
        f"  run (one worker, burst):  {w['jobs_per_s']:,.0f} jobs/s completed, Redis "
        f"{w['redis_cpu_ms_per_job']:.3f} CPU-ms and {w['redis_commands_per_job']:.1f} "
        f"commands a job, the worker {w['process_cpu_ms_per_job']:.3f} CPU-ms a job",
        f"  in all: Redis {r['redis_cpu_ms_per_job']:.3f} CPU-ms and "
        f"{r['redis_commands_per_job']:.1f} commands per job; one Redis core at 100% would "
        f"carry ~{1000 / max(r['redis_cpu_ms_per_job'], 1e-9):,.0f} jobs/s",
        f"  idle (one worker, empty queue, {r['idle']['seconds']:g} s): "
        f"{r['idle']['polls_per_s']:.1f} polls/s, Redis {r['idle']['redis_cpu_ms_per_poll']:.4f} "
        f"CPU-ms and {r['idle']['redis_commands_per_poll']:.2f} commands a poll (over Redis's own "
        f"{r['idle']['redis_baseline_cpu_ms_per_s']:.2f} CPU-ms/s with no client)",
        f"  completed {r['completed']:,} of {r['jobs']:,}, failed {r['failed']}",
        "  commands (enqueue): " + ", ".join(
            f"{k} {v / r['jobs']:.2f}" for k, v in sorted(r["commands"]["enqueue"].items())),
        "  commands (run):     " + ", ".join(
            f"{k} {v / r['jobs']:.2f}" for k, v in sorted(r["commands"]["run"].items())),
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--jobs", type=int, default=20000, help="no-op jobs to enqueue and run")
    p.add_argument("--small", action="store_true", help="a quick run (1,000 jobs)")
    p.add_argument("--concurrency", type=int, default=32, help="enqueue_job calls in flight")
    p.add_argument("--idle-seconds", type=float, default=2.0,
                   help="how long an idle worker polls the empty queue")
    p.add_argument("--json", action="store_true", help="end with a one-line JSON summary")
    p.add_argument("--json-out", help="also write the JSON summary to this file")
    args = p.parse_args(argv)
    if args.small:
        args.jobs, args.idle_seconds = min(args.jobs, 1000), min(args.idle_seconds, 1.0)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    procs = Processes()
    with tempfile.TemporaryDirectory(prefix="arq_rate-") as tmp:
        try:
            server = start_redis(procs, Path(tmp))
            result = asyncio.run(measure(server.port, server.proc.pid, args))
        except BenchError as exc:
            print(f"arq_rate: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            procs.stop_all()
    result["redis"] = f"Redis {redis_version()}"
    result["date"] = time.strftime("%Y-%m-%d %H:%M %Z")
    result["nproc"] = len(os.sched_getaffinity(0))
    result["load_average"] = os.getloadavg()[0]
    print("\n".join(report(result)))
    summary = {k: v for k, v in result.items() if k not in ("phases",)}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=1) + "\n")
    if args.json:
        print(json.dumps(summary, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
