"""Tests of the synthetic test web: pure generator, HTTP server, DNS server and CLI.

Everything talks to 127.0.0.1 only. Nothing sleeps to wait for a result: waits are polls
with a deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from typing import Any, cast
from urllib.parse import urldefrag, urljoin

import aiodns
import aiohttp
import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from crawlfleet.testweb.cli import main
from crawlfleet.testweb.dns import DnsServer
from crawlfleet.testweb.server import RESET_PATH, STATS_PATH, WebServer
from crawlfleet.testweb.site import (
    HTML,
    PDF,
    PNG,
    WebSpec,
    canonical_url,
    html_page,
    page_path,
    reachable,
    render,
)

SPEC = WebSpec(hosts=3, pages=40, links=8, seed=7, port=8123)


def all_paths(spec: WebSpec) -> Iterator[tuple[str, str]]:
    for host in spec.host_names:
        yield host, "/robots.txt"
        for n in range(spec.pages):
            yield from (
                (host, page_path(n)),
                (host, f"/private/{n}"),
                (host, f"/files/{n}.pdf"),
                (host, f"/img/{n}.png"),
                (host, f"/missing/{n}"),
            )


def web_digest(spec: WebSpec) -> str:
    h = hashlib.sha256()
    for host, path in all_paths(spec):
        status, ctype, body, headers = render(spec, host, path)
        h.update(repr((host, path, status, ctype, sorted(headers.items()))).encode() + body)
    return h.hexdigest()


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.base: str | None = None
        self.hrefs: list[str] = []
        self.title = ""
        self._in_title = False
        self.charset = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "base" and self.base is None:
            self.base = a["href"]
        elif tag == "a":
            self.hrefs.append(a["href"] or "")
        elif tag == "meta" and a.get("charset") == "utf-8":
            self.charset = True
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def parse(body: bytes) -> _Links:
    p = _Links()
    p.feed(body.decode("utf-8"))
    p.close()
    return p


# --- site.py: pure ----------------------------------------------------------------------


def test_deterministic_bytes() -> None:
    assert web_digest(SPEC) == web_digest(WebSpec(hosts=3, pages=40, links=8, seed=7, port=8123))
    assert web_digest(SPEC) != web_digest(WebSpec(hosts=3, pages=40, links=8, seed=8, port=8123))
    # Same bytes in another interpreter with another hash seed: no set/dict-order leaks.
    script = (
        "import hashlib\n"
        "from crawlfleet.testweb.site import WebSpec, render, page_path\n"
        "spec = WebSpec(hosts=3, pages=40, links=8, seed=7, port=8123)\n"
        "h = hashlib.sha256()\n"
        "for host in spec.host_names:\n"
        "    for n in range(spec.pages):\n"
        "        h.update(render(spec, host, page_path(n))[2])\n"
        "print(h.hexdigest())\n"
    )
    h = hashlib.sha256()
    for host in SPEC.host_names:
        for n in range(SPEC.pages):
            h.update(render(SPEC, host, page_path(n))[2])
    for hash_seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout.strip()
        assert out == h.hexdigest()


def test_spec_is_hashable_and_normalises_slow_hosts() -> None:
    a = WebSpec(slow_hosts=(("site2.test", 5.0), ("SITE1.test", 300)))
    b = WebSpec(slow_hosts=cast(Any, {"site1.test": 300.0, "site2.test": 5.0}))  # dict is ok
    assert a == b and hash(a) == hash(b)
    assert a.slow_hosts == (("site1.test", 300.0), ("site2.test", 5.0))
    assert WebSpec(latency_ms=10, slow_hosts=a.slow_hosts).delay_ms("site1.test") == 310.0
    assert a.delay_ms("site0.test") == 0.0
    with pytest.raises(ValueError):
        WebSpec(hosts=0)


@pytest.mark.parametrize(
    "spec",
    [SPEC, WebSpec(hosts=1, pages=12, links=5, seed=3, port=80), WebSpec(links=0, port=9)],
    ids=["3hosts", "1host-port80", "nolinks"],
)
def test_hrefs_resolve_to_the_generated_targets(spec: WebSpec) -> None:
    """An independent resolver (urljoin + <base>) lands exactly where the generator says."""
    for host in spec.host_names:
        for n in range(spec.pages):
            for path in (page_path(n), f"/private/{n}"):
                page = html_page(spec, host, path)
                assert page is not None
                doc = parse(render(spec, host, path)[2])
                base = urljoin(page.url, doc.base) if doc.base else page.url
                assert len(doc.hrefs) == len(page.links)
                for href, link in zip(doc.hrefs, page.links, strict=True):
                    assert href == link.href
                    if href.startswith(("mailto:", "javascript:")):
                        assert link.target is None
                    else:
                        assert canonical_url(urldefrag(urljoin(base, href))[0]) == link.target


def test_pages_are_well_formed_and_varied() -> None:
    hrefs: list[str] = []
    bases = 0
    canonicals = 0
    for host in SPEC.host_names:
        for n in range(SPEC.pages):
            status, ctype, body, _ = render(SPEC, host, page_path(n))
            assert (status, ctype) == (200, HTML)
            text = body.decode("utf-8")
            assert text.startswith("<!DOCTYPE html>")
            assert any(ord(c) > 127 for c in text)
            doc = parse(body)
            assert doc.charset and doc.title == f"{host} page {n}"
            assert len(doc.hrefs) == SPEC.links
            hrefs += doc.hrefs
            bases += doc.base is not None
            canonicals += f'<link rel="canonical" href="{SPEC.url(host, page_path(n))}">' in text
    assert 0 < bases < len(SPEC.host_names) * SPEC.pages
    assert 0 < canonicals < len(SPEC.host_names) * SPEC.pages
    kinds: dict[str, Callable[[str], bool]] = {
        "relative": lambda h: not h.startswith(("/", ".", "#", "http:", "mailto:", "javascript:")),
        "dot-dot": lambda h: h.startswith("../"),
        "root-relative": lambda h: h.startswith("/") and not h.startswith("//"),
        "absolute": lambda h: h.startswith("http://"),
        "protocol-relative": lambda h: h.startswith("//"),
        "fragment": lambda h: "#" in h,
        "bare fragment": lambda h: h.startswith("#"),
        "cross-host": lambda h: "//site" in h and "site0.test" not in h,
        "pdf": lambda h: h.endswith(".pdf") or ".pdf#" in h,
        "png": lambda h: ".png" in h,
        "missing": lambda h: "missing/" in h,
        "private": lambda h: "private/" in h,
        "mailto": lambda h: h.startswith("mailto:"),
        "javascript": lambda h: h.startswith("javascript:"),
    }
    missing = [name for name, pred in kinds.items() if not any(pred(h) for h in hrefs)]
    assert missing == []


def test_other_responses() -> None:
    assert render(SPEC, "site0.test", "/robots.txt")[:3] == (
        200,
        "text/plain; charset=utf-8",
        b"User-agent: *\nDisallow: /private/\n",
    )
    status, ctype, body, _ = render(SPEC, "site1.test", "/files/3.pdf")
    assert (status, ctype) == (200, PDF) and body.startswith(b"%PDF-")
    status, ctype, body, _ = render(SPEC, "site1.test", "/img/3.png")
    assert (status, ctype) == (200, PNG) and body.startswith(b"\x89PNG\r\n\x1a\n")
    assert render(SPEC, "site2.test", "/private/4")[0] == 200  # robots is only advisory
    for path in ("/missing/3", "/p/0", "/p/03", f"/p/{SPEC.pages}", "/p/x", "/files/3.png"):
        assert render(SPEC, "site0.test", path)[0] == 404, path
    assert render(SPEC, "SITE0.test.", "/")[0] == 200
    status, ctype, _, _ = render(SPEC, "site3.test", "/")
    assert (status, ctype) == (404, "text/plain; charset=utf-8")


def test_every_page_is_reachable_from_the_roots() -> None:
    found = reachable(SPEC, SPEC.roots)
    pages = {SPEC.url(h, page_path(n)) for h in SPEC.host_names for n in range(SPEC.pages)}
    assert pages <= found.keys()
    assert all(found[u] == 0 for u in SPEC.roots)
    # Non-HTML files and 404s are fetched, so they are in the set (with no outlinks).
    for kind in ("/files/", "/img/", "/missing/", "/private/"):
        assert any(kind in u for u in found), kind
    assert all(render(SPEC, *_host_path(u))[0] in (200, 404) for u in found)
    # Even a single root reaches every host through the root -> next root chain.
    assert pages <= reachable(SPEC, [SPEC.roots[0]], allowed_hosts=set(SPEC.host_names)).keys()


def _host_path(url: str) -> tuple[str, str]:
    rest = url.split("//", 1)[1]
    netloc, _, path = rest.partition("/")
    return netloc.split(":")[0], "/" + path


def test_reachable_respects_allowed_hosts() -> None:
    root = SPEC.roots[1]
    only = reachable(SPEC, [root])  # default: the seeds' hosts
    assert only == reachable(SPEC, [root], allowed_hosts={"site1.test"})
    assert {_host_path(u)[0] for u in only} == {"site1.test"}
    assert len(only) > SPEC.pages
    # Seeds outside allowed_hosts are dropped too.
    two = reachable(SPEC, SPEC.roots, allowed_hosts={"site2.test"})
    assert {_host_path(u)[0] for u in two} == {"site2.test"}


def test_reachable_obey_robots_removes_exactly_private() -> None:
    free = reachable(SPEC, SPEC.roots)
    polite = reachable(SPEC, SPEC.roots, obey_robots=True)
    assert not any("/private/" in u for u in polite)
    assert set(free) - set(polite) == {u for u in free if "/private/" in u} != set()


def test_reachable_max_depth() -> None:
    assert reachable(SPEC, SPEC.roots, max_depth=0) == dict.fromkeys(SPEC.roots, 0)
    one = reachable(SPEC, SPEC.roots, max_depth=1)
    expected = set(SPEC.roots)
    for root in SPEC.roots:
        page = html_page(SPEC, *_host_path(root))
        assert page is not None
        expected |= {link.target for link in page.links if link.target is not None}
    assert set(one) == expected
    assert sorted(set(one.values())) == [0, 1]
    full = reachable(SPEC, SPEC.roots)
    two = reachable(SPEC, SPEC.roots, max_depth=2)
    assert two == {u: d for u, d in full.items() if d <= 2}
    # Fragments and case are canonicalised away in seeds.
    assert reachable(SPEC, ["http://SITE0.test:8123/#x"], max_depth=0) == {SPEC.roots[0]: 0}


# --- server.py ---------------------------------------------------------------------------


async def test_server_serves_virtual_hosts_and_records_stats() -> None:
    spec = WebSpec(hosts=2, pages=10, seed=3, slow_hosts=(("site1.test", 300.0),), port=0)
    async with WebServer(spec) as srv, aiohttp.ClientSession() as http:
        assert srv.port != 0 and srv.spec.port == srv.port
        spec = srv.spec

        async def get(host: str, path: str) -> tuple[int, str, bytes]:
            headers = {"Host": f"{host}:{srv.port}"}
            async with http.get(srv.address + path, headers=headers) as r:
                return r.status, r.headers["Content-Type"], await r.read()

        status, ctype, body = await get("site0.test", "/p/3")
        assert (status, ctype, body) == (200, HTML, render(spec, "site0.test", "/p/3")[2])
        page = html_page(spec, "site0.test", "/p/3")
        assert page is not None  # the generated URLs carry the bound port
        assert f"http://site0.test:{srv.port}/p/4" in {link.target for link in page.links}
        assert await get("site0.test", "/robots.txt") == (
            200,
            "text/plain; charset=utf-8",
            b"User-agent: *\nDisallow: /private/\n",
        )
        assert (await get("site0.test", "/files/1.pdf"))[:2] == (200, PDF)
        assert (await get("site0.test", "/img/1.png"))[:2] == (200, PNG)
        assert (await get("site0.test", "/missing/1"))[0] == 404
        status, ctype, _ = await get("nowhere.test", "/")
        assert (status, ctype) == (404, "text/plain; charset=utf-8")

        # Two overlapping requests to the slow host.
        r1, r2 = await asyncio.gather(get("site1.test", "/"), get("site1.test", "/p/1"))
        assert r1[0] == r2[0] == 200

        async with http.get(srv.address + STATS_PATH) as r:
            stats = await r.json()
        s0, s1 = stats["hosts"]["site0.test"], stats["hosts"]["site1.test"]
        assert s0["requests"] == 5 and s0["peak_concurrency"] == 1
        assert isinstance(s0["min_gap_s"], float) and s0["min_gap_s"] >= 0
        assert s1["requests"] == 2 and s1["peak_concurrency"] == 2
        assert s1["min_gap_s"] < 0.3  # the second started before the first finished
        assert stats["hosts"]["nowhere.test"]["requests"] == 1
        assert stats["total_requests"] == 8

        async with http.post(srv.address + RESET_PATH) as r:
            assert r.status == 200
        await get("site0.test", "/")
        async with http.get(srv.address + STATS_PATH) as r:
            stats = await r.json()
        assert stats["hosts"] == {
            "site0.test": {
                "requests": 1,
                "distinct_paths": 1,
                "in_flight": 0,
                "peak_concurrency": 1,
                "min_gap_s": None,
            }
        }


async def test_server_refuses_non_loopback_bind() -> None:
    with pytest.raises(ValueError):
        WebServer(WebSpec(port=0), bind="0.0.0.0")


# --- dns.py -----------------------------------------------------------------------------


async def test_dns_answers_through_aiodns() -> None:
    with DnsServer(SPEC.host_names) as dns:
        assert dns.port != 0
        # pycares >= 4.2 takes "ip:port" nameservers (c-ares ares_set_servers_ports_csv).
        resolver = aiodns.DNSResolver(nameservers=[f"127.0.0.1:{dns.port}"], timeout=2, tries=1)
        try:
            result = await resolver.query_dns("site1.test", "A")
            answers: list[Any] = result.answer
            assert [(rr.data.addr, rr.ttl) for rr in answers] == [("127.0.0.1", 60)]
            assert dns.queries == 1 and dns.answered == 1
            # What aiohttp's AsyncResolver calls: A + AAAA; AAAA is NODATA, not an error.
            info = await resolver.getaddrinfo("site2.test", socket.AF_UNSPEC, port=80)
            assert [n.addr for n in info.nodes] == [(b"127.0.0.1", 80)]
            assert dns.answered == 2
            with pytest.raises(aiodns.error.DNSError):
                await resolver.query_dns("nope.test", "A")
            with pytest.raises(aiodns.error.DNSError):
                await resolver.query_dns(f"site{SPEC.hosts}.test", "A")
            with pytest.raises(aiodns.error.DNSError):
                await resolver.query_dns("example.com", "A")  # refused, never forwarded
            assert dns.answered == 2 and dns.queries >= 6
        finally:
            await resolver.close()


def test_dns_tcp_rcodes_and_port_release() -> None:
    dns = DnsServer(["site0.test"])
    port = dns.start()
    try:

        def ask(name: str, qtype: str, tcp: bool) -> DNSRecord:
            raw = DNSRecord.question(name, qtype).send("127.0.0.1", port, tcp=tcp, timeout=5)
            return DNSRecord.parse(raw)

        for tcp in (False, True):
            reply = ask("site0.test", "A", tcp)
            assert reply.header.rcode == RCODE.NOERROR
            assert [str(rr.rdata) for rr in reply.rr] == ["127.0.0.1"]
            assert ask("site0.test", "AAAA", tcp).header.rcode == RCODE.NOERROR
            assert ask("site0.test", "AAAA", tcp).rr == []
            assert ask("other.test", "A", tcp).header.rcode == RCODE.NXDOMAIN
            assert ask("example.com", "A", tcp).header.rcode == RCODE.REFUSED
        assert ask("test", "SOA", False).rr[0].rtype == QTYPE.SOA
        assert dns.answered == 2
    finally:
        dns.stop()
    # stop() really releases the port: a new server binds the same UDP+TCP port at once.
    again = DnsServer(["site0.test"], port=port)
    assert again.start() == port
    try:
        raw = DNSRecord.question("site0.test").send("127.0.0.1", port, timeout=5)
        assert DNSRecord.parse(raw).header.rcode == RCODE.NOERROR
    finally:
        again.stop()


# --- cli.py -----------------------------------------------------------------------------


async def test_cli_serves_until_sigterm(capsys: pytest.CaptureFixture[str]) -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "crawlfleet.testweb", "--port", "0", "--dns-port", "0"],
        *["--hosts", "2", "--pages", "5", "--seed", "4"],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), timeout=30)
        ready = json.loads(line)
        port = ready["http_port"]
        assert ready["hosts"] == ["site0.test", "site1.test"]
        assert ready["seeds"] == [f"http://site0.test:{port}/", f"http://site1.test:{port}/"]
        assert ready["dns"].startswith("127.0.0.1:")

        # Resolve through the CLI's own DNS server, the way a crawler worker does.
        resolver = aiohttp.AsyncResolver(nameservers=[ready["dns"]], timeout=2, tries=1)
        connector = aiohttp.TCPConnector(resolver=resolver)
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(ready["seeds"][1] + "p/2") as r,
        ):
            assert r.status == 200
            spec = WebSpec(hosts=2, pages=5, seed=4, port=port)
            assert await r.read() == render(spec, "site1.test", "/p/2")[2]

        assert main(["--report", "--port", str(port)]) == 0
        report = capsys.readouterr().out
        assert "site1.test" in report and "total requests: 1" in report

        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("extra", "seeds", "obey", "depth"),
    [
        ([], None, False, None),
        (["--obey-robots", "--max-depth", "3"], None, True, 3),
        (["--seed-url", "http://site1.test:8123/p/5"], ["http://site1.test:8123/p/5"], False, None),
    ],
)
def test_cli_print_reachable(
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    seeds: list[str] | None,
    obey: bool,
    depth: int | None,
) -> None:
    argv = ["--print-reachable", "--port", "8123", "--hosts", "3", "--pages", "40", "--seed", "7"]
    assert main(argv + extra) == 0
    expected = reachable(SPEC, seeds or SPEC.roots, obey_robots=obey, max_depth=depth)
    assert capsys.readouterr().out.splitlines() == sorted(expected)


@pytest.mark.parametrize(
    "argv",
    [
        ["--bind", "0.0.0.0"],
        ["--bind", "10.0.0.1"],
        ["--bind", "localhost"],
        ["--print-reachable", "--port", "0"],
        ["--slow-host", "site9.test=10"],
        ["--slow-host", "nonsense"],
        ["--max-depth", "2"],
    ],
)
def test_cli_rejects(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "crawlfleet testweb: error:" in capsys.readouterr().err
