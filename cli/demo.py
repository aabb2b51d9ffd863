"""``crawlfleet demo``: crawl the local test web on the embedded backend and check the result.

Starts the test web (HTTP and DNS on free loopback ports) in this process, crawls it exactly as
``crawlfleet crawl`` would (workers resolve ``siteN.test`` only through the test web's DNS
server), then compares the results with the test web's own reachable set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from crawlfleet.common.connections import EMBEDDED_SCHEME
from crawlfleet.common.logs import configure_logging
from crawlfleet.common.settings import Settings
from crawlfleet.testweb.dns import DnsServer
from crawlfleet.testweb.server import WebServer
from crawlfleet.testweb.site import WebSpec, reachable

from .crawl import format_summary, run_crawl


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hosts", type=int, default=5)
    parser.add_argument("--pages", type=int, default=100, help="pages per host")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", "-o", help="results file (default: a temporary file)")


def demo(args: argparse.Namespace) -> int:
    if args.out:
        out_path = Path(args.out)
    else:
        handle, name = tempfile.mkstemp(suffix=".jsonl")
        os.close(handle)
        out_path = Path(name)
    summary, settings, spec, lookups = asyncio.run(_crawl_testweb(args, str(out_path)))
    print(format_summary(summary, settings, args.workers, str(out_path)), file=sys.stderr)
    got = [json.loads(line)["url"] for line in out_path.read_text().splitlines()]
    expected = reachable(spec, spec.roots)
    missing, extra = set(expected) - set(got), set(got) - set(expected)
    duplicates = len(got) - len(set(got))
    ok = not missing and not extra and not duplicates
    print(f"check: {len(set(got))}/{len(expected)} reachable URLs fetched, {len(missing)} missing, "
          f"{len(extra)} unexpected, {duplicates} duplicated; {lookups} DNS answers from the "
          f"test web's resolver -> {'OK' if ok else 'FAILED'}", file=sys.stderr)
    return 0 if ok else 1


async def _crawl_testweb(
    args: argparse.Namespace, out: str
) -> tuple[dict[str, Any], Settings, WebSpec, int]:
    spec = WebSpec(hosts=args.hosts, pages=args.pages, latency_ms=args.latency_ms, port=0)
    async with WebServer(spec) as web:
        with DnsServer(web.spec.host_names, port=0) as dns:
            settings = Settings.from_env(overrides={
                "redis_url": f"{EMBEDDED_SCHEME}demo",
                "namespace": "demo",
                "dns_nameservers": (f"127.0.0.1:{dns.port}",),
                "allow_private": True,  # the test web is on loopback: an explicit opt-in
                "crawl_delay": 0.0,  # and it is ours: no need to be polite to it
                "log_level": "warning",
            })
            configure_logging(settings.log_format, settings.log_level, role="demo")
            print(f"test web: {spec.hosts} hosts on 127.0.0.1:{web.port}, DNS on "
                  f"127.0.0.1:{dns.port}; crawling {', '.join(web.spec.roots)}", file=sys.stderr)
            # The results file is the demo's own (a temporary one unless --out says).
            summary = await run_crawl(settings, web.spec.roots, args.workers, out,
                                      overwrite=True)
            return summary, settings, web.spec, dns.answered
