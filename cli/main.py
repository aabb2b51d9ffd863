"""``crawlfleet``: one command, one subcommand per process or task.

    seed       enqueue seed URLs (arguments, --file F, or - for stdin)
    scheduler  run the frontier
    worker     run a fetch worker (crawlfleet's arq worker: JSON logs, waits for Redis)
    sink       drain results out of Redis into CRAWLFLEET_OUTPUT (parts, exactly once)
    status     counters of the crawl, --json for machines, --watch for a live view
    health     exit 0 if this worker is alive (a Kubernetes probe)
    check      count the crawl's structures, compare them with the counters (exit 1 if not)
    export     every result once, as JSON lines or CSV (--failed, --dead)
    purge      delete every key of a namespace (asks first; --yes)
    reshard    move a namespace onto another shard list, between crawls (--to URLS)
    crawl      the whole crawl in one process (embedded backend unless CRAWLFLEET_REDIS_URL is set)
    demo       crawl the local test web on the embedded backend and check the result
    testweb    the local synthetic web for tests, demos and benchmarks

Exit codes: 0 done; 1 done but not OK (a seed refused, check found drift, a crawl stopped
early) or Redis unreachable; 2 bad input: a setting, an argument, a file that cannot be read
or written, or a Redis that refuses the password or database. Errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any

from crawlfleet.common.settings import Settings, SettingsError


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--redis-url", help="Redis URL (env CRAWLFLEET_REDIS_URL)")
    parser.add_argument("--namespace", help="key namespace (env CRAWLFLEET_NAMESPACE)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="crawlfleet", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    seed = sub.add_parser("seed", help="enqueue seed URLs")
    _common(seed)
    seed.add_argument("urls", nargs="*", metavar="URL", help="URLs ('-' alone: read stdin)")
    seed.add_argument("--file", "-f", help="a file of URLs, one per line ('-' for stdin)")

    for name, text in (("scheduler", "run the scheduler"), ("worker", "run a fetch worker"),
                       ("sink", "drain results into CRAWLFLEET_OUTPUT")):
        p = sub.add_parser(name, help=text)
        _common(p)

    status = sub.add_parser("status", help="show the crawl's counters")
    _common(status)
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--watch", action="store_true",
                        help="a live view, refreshed every second (Ctrl-C ends it)")

    health = sub.add_parser(
        "health", help="exit 0 if this worker is alive (a probe command)",
        description="Exit 0 when the worker named CRAWLFLEET_WORKER_ID has written its health "
                    "check within CRAWLFLEET_HEALTH_CHECK_INTERVAL (plus slack), 1 otherwise: "
                    "the liveness/readiness probe of a worker pod.")
    _common(health)

    check = sub.add_parser(
        "check", help="count the crawl's structures and compare them with its counters",
        description="Count the crawl's real structures in Redis (seen, results, host queues, "
                    "leases, quarantine) and compare them with the counters; print every "
                    "difference and exit 1 if there is one, 0 if consistent. A running crawl "
                    "moves while it is counted: check a finished or stopped crawl for exact "
                    "answers.")
    _common(check)
    check.add_argument("--json", action="store_true",
                       help="one JSON object {ok, counters, structures, problems}")

    export = sub.add_parser(
        "export", help="write every result once (JSON lines or CSV)",
        description="Every result of the crawl once, streamed: from Redis when no output is "
                    "set, from the output (CRAWLFLEET_OUTPUT, or the one the sinks recorded) "
                    "and what is not drained yet when one is.")
    _common(export)
    export.add_argument("--out", "-o", help="output file (default: stdout)")
    export.add_argument("--format", choices=("jsonl", "csv"), default="jsonl",
                        help="JSON lines (default) or CSV with a header row")
    export.add_argument("--failed", action="store_true",
                        help="only the URLs that failed (robots.txt refusals are skipped, "
                             "not failed)")
    export.add_argument("--dead", action="store_true",
                        help="only the URLs that ran out of retries, with their last error")

    crawl = sub.add_parser("crawl", help="crawl in one process and exit when done")
    _common(crawl)
    crawl.add_argument("urls", nargs="+", metavar="URL")
    crawl.add_argument("--max-pages", type=int)
    crawl.add_argument("--max-depth", type=int)
    crawl.add_argument("--workers", type=int, default=2, help="in-process workers (default 2)")
    crawl.add_argument("--out", "-o",
                       help="results file, appended as the crawl goes and continued by the "
                            "same command after Ctrl-C (default results.jsonl; '-' for "
                            "stdout; not with CRAWLFLEET_OUTPUT)")
    crawl.add_argument("--overwrite", action="store_true",
                       help="replace an existing --out file this crawl did not write")
    crawl.add_argument("--fresh", action="store_true",
                       help="forget the namespace's previous crawl (its Redis keys, or the "
                            "embedded backend's state file) and start over")

    purge = sub.add_parser("purge", help="delete every Redis key of a namespace",
                           description="Delete every Redis key of the namespace (the frontier, "
                                       "the results not yet drained, arq's jobs). The files in "
                                       "CRAWLFLEET_OUTPUT stay. Asks first.")
    _common(purge)
    purge.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")

    reshard = sub.add_parser(
        "reshard", help="move a namespace onto another list of Redis shards",
        description="Between crawls, move the namespace from its shard list "
                    "(CRAWLFLEET_REDIS_URLS, or CRAWLFLEET_REDIS_URL) to the one given: only "
                    "the hosts whose owning server changes move, with their seen URLs, "
                    "results, queues, pacing and robots.txt. Safe to run again after a kill. "
                    "Asks first.")
    _common(reshard)
    reshard.add_argument("--to", required=True, metavar="URLS",
                         help="the new shard list, comma-separated Redis URLs")
    reshard.add_argument("--yes", "-y", action="store_true", help="do not ask (for scripts)")
    reshard.add_argument("--dry-run", action="store_true",
                         help="print what would move and change nothing")

    demo = sub.add_parser("demo", help="crawl the local test web on the embedded backend")
    from .demo import add_arguments

    add_arguments(demo)

    sub.add_parser("testweb", help="serve the local test web (see crawlfleet testweb --help)",
                   add_help=False)
    return parser


def settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    overrides = {"redis_url": getattr(args, "redis_url", None),
                 "namespace": getattr(args, "namespace", None), **extra}
    return Settings.from_env(overrides=overrides)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["testweb"]:
        from crawlfleet.testweb.cli import main as testweb_main

        return testweb_main(argv[1:])
    args = build_parser().parse_args(argv)
    from crawlfleet.common.connections import RedisProblem

    from .commands import UsageError

    # Bad input ends with one line naming what is wrong, never a traceback (EXIT_CODES).
    try:
        return _run(args)
    except (SettingsError, UsageError) as exc:
        print(f"crawlfleet {args.command}: {exc}", file=sys.stderr)
        return 2
    except RedisProblem as exc:
        print(f"crawlfleet {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        # The reader went away (`crawlfleet export | head`): stop quietly, and keep Python
        # from complaining about stdout at exit.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    from crawlfleet.common.eventloop import use_configured_loop

    from . import commands

    # Before any loop exists, and before the command reads its settings (crawl reads its own).
    use_configured_loop()

    if args.command == "seed":
        from .seed import seed

        return seed(settings_from(args), args.urls, args.file)
    if args.command == "scheduler":
        return commands.scheduler(settings_from(args))
    if args.command == "worker":
        from crawlfleet.workers.worker import run_worker

        run_worker(settings_from(args))
        return 0
    if args.command == "sink":
        return commands.sink(settings_from(args))
    if args.command == "purge":
        return commands.purge(settings_from(args), yes=args.yes)
    if args.command == "reshard":
        from .reshard import reshard

        return reshard(settings_from(args), args.to, yes=args.yes, dry_run=args.dry_run)
    if args.command == "status":
        if args.watch:
            from .watch import watch

            return watch(settings_from(args))
        return commands.status(settings_from(args), as_json=args.json)
    if args.command == "health":
        from .health import health

        return health(settings_from(args))
    if args.command == "check":
        return commands.check(settings_from(args), as_json=args.json)
    if args.command == "export":
        return commands.export(settings_from(args), args.out, fmt=args.format,
                               failed=args.failed, dead=args.dead)
    if args.command == "demo":
        from .demo import demo

        return demo(args)
    if args.command == "crawl":
        from .crawl import crawl

        return crawl(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
