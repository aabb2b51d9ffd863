"""``crawlfleet testweb``: run the synthetic web, print its ground truth, or report its stats."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from crawlfleet.common.eventloop import use_configured_loop
from crawlfleet.common.settings import SettingsError

from .dns import DnsServer
from .hostile import HOSTILE_HOST, HostileServer
from .loopback import require_loopback
from .server import STATS_PATH, WebServer
from .site import ROBOTS_VARIANTS, WebSpec, reachable


def _slow_host(value: str) -> tuple[str, float]:
    host, sep, ms = value.partition("=")
    try:
        if not sep or not host:
            raise ValueError
        return host.strip().lower(), float(ms)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HOST=MS, got {value!r}") from None


def _robots(value: str) -> tuple[str, str]:
    host, sep, variant = value.partition("=")
    if not sep or not host.strip() or not variant.strip():
        raise argparse.ArgumentTypeError(f"expected HOST=VARIANT, got {value!r}")
    return host.strip().lower(), variant.strip()


def _loopback(value: str) -> str:
    try:
        return require_loopback(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crawlfleet testweb",
        description="A deterministic synthetic web (HTTP + DNS) on loopback, for tests and demos.",
        allow_abbrev=False,  # --seed must never be taken for --seed-url or vice versa
    )
    web = p.add_argument_group("the web")
    web.add_argument("--hosts", type=int, default=3, help="number of hosts siteN.test")
    web.add_argument("--pages", type=int, default=50, help="HTML pages per host, root included")
    web.add_argument("--links", type=int, default=8, help="links per page")
    web.add_argument("--latency-ms", type=float, default=0.0, help="delay before every answer")
    web.add_argument("--seed", type=int, default=1, help="generator seed")
    web.add_argument(
        "--slow-host",
        type=_slow_host,
        action="append",
        default=[],
        metavar="HOST=MS",
        help="extra latency for one host (repeatable)",
    )
    web.add_argument(
        "--robots",
        type=_robots,
        action="append",
        default=[],
        metavar="HOST=VARIANT",
        help=f"robots.txt variant of one host (repeatable): {', '.join(ROBOTS_VARIANTS)}",
    )
    web.add_argument(
        "--extras",
        action="store_true",
        help="link every root to the special endpoints: redirects, flaky/429/500 pages, "
        "crawler traps, nofollow/noindex/canonical pages",
    )
    web.add_argument(
        "--hostile",
        action="store_true",
        help=f"also serve the hostile server ({HOSTILE_HOST}, on its own port: slow drips, "
        "bombs, resets, broken HTTP ...); the ready line gains hostile_port and hostile_seed",
    )
    net = p.add_argument_group("network")
    net.add_argument("--port", type=int, default=8080, help="HTTP port (0 = any free port)")
    net.add_argument("--dns-port", type=int, default=5353, help="DNS port (0 = any free port)")
    net.add_argument(
        "--hostile-port", type=int, default=0, help="the hostile server's port (0 = any free)"
    )
    net.add_argument("--bind", type=_loopback, default="127.0.0.1", help="address in 127.0.0.0/8")
    net.add_argument("--log-requests", action="store_true", help="access log on stderr")
    net.add_argument(
        "--prerender",
        action="store_true",
        help="render every page before the ready line (benchmarks: the first crawl then pays "
        "no more for its pages than the next; pages are kept once rendered either way)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--print-reachable",
        action="store_true",
        help="print the URLs a correct crawl fetches (for URLs carrying --port) and exit",
    )
    mode.add_argument(
        "--report", action="store_true", help="print the stats of a test web running at --port"
    )
    gt = p.add_argument_group("--print-reachable options")
    gt.add_argument(
        "--seed-url",
        action="append",
        default=[],
        metavar="URL",
        help="crawl seed (repeatable; default: every host's root)",
    )
    gt.add_argument(
        "--allowed-host",
        action="append",
        default=None,
        metavar="HOST",
        help="host the crawl may enter (repeatable; default: the seeds' hosts)",
    )
    gt.add_argument("--obey-robots", action="store_true", help="skip what robots.txt disallows")
    gt.add_argument("--max-depth", type=int, default=None, metavar="N", help="link depth limit")
    gt.add_argument(
        "--trap-limit",
        type=int,
        default=None,
        metavar="N",
        help="with --extras: include the first N URLs of each crawler trap (default: none)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.print_reachable and (
        args.seed_url
        or args.allowed_host
        or args.obey_robots
        or args.max_depth is not None
        or args.trap_limit is not None
    ):
        parser.error(
            "--seed-url, --allowed-host, --obey-robots, --max-depth and --trap-limit "
            "only apply to --print-reachable"
        )
    if args.report:
        return _report(args.bind, args.port)
    try:
        spec = WebSpec(
            hosts=args.hosts,
            pages=args.pages,
            links=args.links,
            latency_ms=args.latency_ms,
            seed=args.seed,
            slow_hosts=tuple(args.slow_host),
            port=args.port,
            robots=tuple(args.robots),
            extras=args.extras,
        )
    except ValueError as e:
        parser.error(str(e))
    for flag, pairs in (("--slow-host", spec.slow_hosts), ("--robots", spec.robots)):
        unknown = sorted({h for h, _ in pairs} - set(spec.host_names))
        if unknown:
            parser.error(
                f"{flag} for unknown host(s) {', '.join(unknown)}; "
                f"hosts are site0.test..site{spec.hosts - 1}.test"
            )
    if args.print_reachable:
        if spec.port == 0:
            parser.error("--print-reachable needs the real --port the URLs carry, not 0")
        try:
            found = reachable(
                spec,
                args.seed_url or spec.roots,
                allowed_hosts=set(args.allowed_host) if args.allowed_host else None,
                obey_robots=args.obey_robots,
                max_depth=args.max_depth,
                trap_limit=args.trap_limit,
            )
        except ValueError as e:
            parser.error(str(e))
        sys.stdout.write("".join(f"{url}\n" for url in sorted(found)))
        for host in sorted(found.robots_unreachable):
            print(f"note: {host}'s robots.txt answers 5xx: nothing fetched there", file=sys.stderr)
        return 0
    try:
        # The test web shares the machine's cores with the crawls it serves.
        use_configured_loop()
    except SettingsError as e:
        parser.error(str(e))
    try:
        return asyncio.run(
            _serve(spec, args.bind, args.dns_port, args.log_requests,
                   args.hostile_port if args.hostile else None, prerender=args.prerender)
        )
    except OSError as e:
        print(f"crawlfleet testweb: {e}", file=sys.stderr)
        return 1


async def _serve(
    spec: WebSpec,
    bind: str,
    dns_port: int,
    log_requests: bool,
    hostile_port: int | None = None,
    *,
    prerender: bool = False,
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Handlers go in before the ready line, so a parent may signal as soon as it reads it.
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    access_log: logging.Logger | None = None
    if log_requests:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
        access_log = logging.getLogger("crawlfleet.testweb.access")
    names = (*spec.host_names, HOSTILE_HOST) if hostile_port is not None else spec.host_names
    dns = DnsServer(names, address=bind, port=dns_port, answer=bind)
    dns.start()
    try:
        async with contextlib.AsyncExitStack() as stack:
            server = await stack.enter_async_context(
                WebServer(spec, bind=bind, access_log=access_log, prerender=prerender))
            ready: dict[str, Any] = {
                "http_port": server.port,
                "dns": f"{bind}:{dns.port}",
                "hosts": list(server.spec.host_names),
                "seeds": server.spec.roots,
            }
            if hostile_port is not None:
                hostile = await stack.enter_async_context(
                    HostileServer(bind=bind, port=hostile_port))
                ready["hostile_port"] = hostile.port
                ready["hostile_seed"] = hostile.seed
            print(json.dumps(ready), flush=True)
            await stop.wait()
            total = server.stats.snapshot()["total_requests"]
        print(f"testweb: served {total} requests, {dns.queries} DNS queries", file=sys.stderr)
    finally:
        dns.stop()
    return 0


def _report(bind: str, port: int) -> int:
    url = f"http://{bind}:{port}{STATS_PATH}"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via a proxy
    try:
        with opener.open(url, timeout=10) as resp:
            stats: dict[str, Any] = json.load(resp)
    except (urllib.error.URLError, OSError, ValueError) as e:
        print(f"crawlfleet testweb: cannot read {url}: {e}", file=sys.stderr)
        return 1
    rows = [("host", "requests", "peak", "min gap (s)")]
    for host, st in stats["hosts"].items():
        gap = st["min_gap_s"]
        rows.append(
            (
                host,
                str(st["requests"]),
                str(st["peak_concurrency"]),
                "-" if gap is None else f"{gap:.4f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print(r[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)))
    print(f"total requests: {stats['total_requests']}")
    return 0
