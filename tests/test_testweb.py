"""Tests of the synthetic test web: pure generator, HTTP server, DNS server and CLI.

Everything talks to 127.0.0.1 only. Nothing sleeps to wait for a result: waits are polls
with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import replace
from html.parser import HTMLParser
from itertools import pairwise
from typing import Any, cast
from urllib.parse import parse_qs, urldefrag, urljoin, urlsplit
from xml.etree import ElementTree

import aiodns
import aiohttp
import pytest
from dnslib import QTYPE, RCODE, DNSRecord
from protego import Protego

from crawlfleet.testweb import cli as cli_module
from crawlfleet.testweb import server as server_module
from crawlfleet.testweb.cli import main
from crawlfleet.testweb.dns import DnsServer
from crawlfleet.testweb.server import RESET_PATH, STATS_PATH, StatsRecorder, WebServer
from crawlfleet.testweb.site import (
    HTML,
    PDF,
    PNG,
    TEXT,
    XML,
    Page,
    WebSpec,
    canonical_url,
    extra_paths,
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
        self.rels: list[str | None] = []
        self.robots: str | None = None  # <meta name="robots" content>
        self.canonical: str | None = None
        self.title = ""
        self._in_title = False
        self.charset = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "base" and self.base is None:
            self.base = a["href"]
        elif tag == "a":
            self.hrefs.append(a["href"] or "")
            self.rels.append(a.get("rel"))
        elif tag == "meta" and a.get("charset") == "utf-8":
            self.charset = True
        elif tag == "meta" and a.get("name") == "robots":
            self.robots = a["content"]
        elif tag == "link" and a.get("rel") == "canonical":
            self.canonical = a["href"]
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
    outs = _outputs_under_hash_seeds(script)
    assert len(outs) == 1 and len(outs.pop()) == 64


def _outputs_under_hash_seeds(script: str) -> set[str]:
    """What ``script`` prints in this process and in two interpreters with other hash seeds:
    one value when nothing depends on set or dict order."""
    here = io.StringIO()
    with contextlib.redirect_stdout(here):
        exec(script, {})
    return {
        here.getvalue().strip(),
        *(
            subprocess.run(
                [sys.executable, "-c", script],
                env={**os.environ, "PYTHONHASHSEED": hash_seed},
                capture_output=True,
                text=True,
                check=True,
                timeout=60,
            ).stdout.strip()
            for hash_seed in ("1", "2")
        ),
    }


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


# --- site.py: opt-in knobs (robots variants, extras, trap_limit) ------------------------

# sha256 of _default_web_digest(), computed with the test web as it was BEFORE the robots /
# extras / trap_limit knobs existed (same function, old code) and hard-coded here. Every knob
# is off by default, so a default web must keep producing exactly these bytes and this ground
# truth. Do not update this value to make the test pass: a mismatch means a default changed.
DEFAULT_WEB_SHA256 = "0edfc9daef3d38fcb9693c55478db71c20a57769e98d2186d86f077d810da94f"

# Paths the knobs give a meaning to: on a default web they must stay 404s.
KNOB_PATHS = (
    "/sitemap.xml",
    "/agent-only/1",
    "/redirect/1",
    "/redirect/1/1",
    "/redirect/1/2",
    "/redirected/1",
    "/redirected/1/landed",
    "/redirect-loop/1",
    "/redirect-out/1",
    "/flaky/1",
    "/ratelimited/1",
    "/broken/1",
    "/calendar/2000/01",
    "/session",
    "/nofollow-page",
    "/only-via-nofollow/1",
    "/relnofollow",
    "/only-via-relnofollow/1",
    "/noindex-page",
    "/only-via-noindex/1",
    "/canonical-alias",
    "/canonical-target",
)


def _default_web_digest() -> str:
    h = hashlib.sha256()
    specs = (
        WebSpec(),
        WebSpec(hosts=3, pages=40, links=8, seed=7, port=8123),
        WebSpec(hosts=1, pages=12, links=5, seed=3, port=80),
        WebSpec(hosts=4, pages=30, links=0, seed=11, port=9),
        WebSpec(hosts=2, pages=1, links=20, seed=5, port=65535),
    )
    for spec in specs:
        for host in (*spec.host_names, f"site{spec.hosts}.test"):
            paths = ["/robots.txt", *KNOB_PATHS]
            for n in range(spec.pages + 1):
                paths += [page_path(n), f"/private/{n}", f"/files/{n}.pdf", f"/img/{n}.png"]
                paths.append(f"/missing/{n}")
            for path in paths:
                status, ctype, body, headers = render(spec, host, path)
                h.update(repr((host, path, status, ctype, sorted(headers.items()))).encode())
                h.update(body)
        seed_lists = (spec.roots, spec.roots[-1:], [spec.url(spec.host_names[0], "/p/1")])
        results = [reachable(spec, seeds) for seeds in seed_lists]
        results += [reachable(spec, seeds, obey_robots=True) for seeds in seed_lists]
        results += [reachable(spec, seeds, max_depth=2) for seeds in seed_lists]
        everywhere = set(spec.host_names)
        results += [reachable(spec, seeds, allowed_hosts=everywhere) for seeds in seed_lists]
        for found in results:
            h.update(repr(sorted(found.items())).encode())
    return h.hexdigest()


def test_default_web_is_unchanged_by_the_new_knobs() -> None:
    assert _default_web_digest() == DEFAULT_WEB_SHA256
    assert WebSpec() == WebSpec(robots=(), extras=False)
    # The new render() arguments (query string, hit count) change nothing on a default web.
    for path in ("/", "/p/3", "/private/2", "/robots.txt", *KNOB_PATHS):
        plain = render(SPEC, "site0.test", path)
        assert render(SPEC, "site0.test", path, "sid=x&i=3", hit=3) == plain, path
        if path in KNOB_PATHS:
            assert plain[0] == 404, path
    assert extra_paths(SPEC, "site0.test") == ()
    found = reachable(SPEC, SPEC.roots, trap_limit=5)
    assert found == reachable(SPEC, SPEC.roots)
    assert (found.redirects, found.redirect_loops, found.retried) == ({}, set(), {})
    assert found.robots_unreachable == set()


ROBOTS_SPEC = WebSpec(
    hosts=5,
    pages=24,
    seed=7,
    port=8123,
    robots=(
        ("site0.test", "agent"),
        ("site1.test", "status:404"),
        ("site2.test", "status:503"),
        ("site3.test", "sitemap"),
        ("site4.test", "delay:1.5"),
    ),
)
ROBOTS_PLAIN = replace(ROBOTS_SPEC, robots=())
CRAWLFLEET_UA = "crawlfleet/0.1 (+https://github.com/crawlfleet/crawlfleet)"


def _on(found: dict[str, int], host: str, prefix: str = "/") -> set[str]:
    return {u for u in found if _host_path(u)[0] == host and _host_path(u)[1].startswith(prefix)}


def test_robots_knob_is_normalised_and_validated() -> None:
    a = WebSpec(robots=(("SITE1.test.", "agent"), ("site0.test", " delay:2 ")))
    b = WebSpec(robots=cast(Any, {"site0.test": "delay:2", "site1.test": "agent"}))
    assert a == b and hash(a) == hash(b)
    assert a.robots == (("site0.test", "delay:2"), ("site1.test", "agent"))
    assert a.robots_variant("Site1.Test") == "agent"
    assert a.robots_variant("site2.test") == "default"
    for ok in ("default", "sitemap", "delay:0", "delay:0.25", "status:400", "status:599"):
        assert WebSpec(robots=(("site0.test", ok),)).robots_variant("site0.test") == ok
    bad = ("nope", "delay", "delay:", "delay:-1", "delay:1e3", "delay:.5", "status:200")
    bad += ("status:600", "status:5xx", "status:0500", "agent:1", "sitemap:x")
    for variant in bad:
        with pytest.raises(ValueError, match="robots variant"):
            WebSpec(robots=(("site0.test", variant),))


def test_robots_variants_render() -> None:
    spec = ROBOTS_SPEC

    def robots(host: str) -> tuple[int, str, bytes]:
        status, ctype, body, _ = render(spec, host, "/robots.txt")
        return status, ctype, body

    assert robots("site0.test") == (
        200,
        TEXT,
        b"User-agent: crawlfleet\nDisallow: /agent-only/\nAllow: /\n\n"
        b"User-agent: *\nDisallow: /private/\n",
    )
    assert robots("site1.test")[0] == 404
    assert robots("site2.test")[0] == 503
    assert robots("site3.test") == (
        200,
        TEXT,
        b"User-agent: *\nDisallow: /private/\n\nSitemap: http://site3.test:8123/sitemap.xml\n",
    )
    assert robots("site4.test") == (
        200,
        TEXT,
        b"User-agent: *\nDisallow: /private/\nCrawl-delay: 1.5\n",
    )
    port80 = WebSpec(hosts=1, port=80, robots=(("site0.test", "sitemap"),))
    assert (
        b"Sitemap: http://site0.test/sitemap.xml\n"
        in render(port80, "site0.test", "/robots.txt")[2]
    )
    # What a real robots.txt parser makes of them, as crawlfleet (token "crawlfleet").
    agent = Protego.parse(robots("site0.test")[2].decode())
    assert not agent.can_fetch("http://site0.test:8123/agent-only/0", CRAWLFLEET_UA)
    assert agent.can_fetch("http://site0.test:8123/private/0", CRAWLFLEET_UA)
    assert not agent.can_fetch("http://site0.test:8123/private/0", "otherbot/1.0")
    assert Protego.parse(robots("site4.test")[2].decode()).crawl_delay(CRAWLFLEET_UA) == 1.5
    assert list(Protego.parse(robots("site3.test")[2].decode()).sitemaps) == [
        "http://site3.test:8123/sitemap.xml"
    ]

    # The sitemap exists only where robots.txt points at it, and lists the public pages.
    status, ctype, body, _ = render(spec, "site3.test", "/sitemap.xml")
    assert (status, ctype) == (200, XML)
    ns = "{http://www.sitemaps.org/schemas/sitemap/0.9}"
    locs = [e.text for e in ElementTree.fromstring(body).iter(f"{ns}loc")]
    assert locs == [spec.url("site3.test", page_path(n)) for n in range(spec.pages)]
    assert render(spec, "site4.test", "/sitemap.xml")[0] == 404

    # /agent-only/N exists on the "agent" host only; its pages link to some of them and are
    # otherwise the same; every other host serves exactly the pages of a default web.
    assert render(spec, "site0.test", "/agent-only/10")[:2] == (200, HTML)
    assert render(spec, "site0.test", f"/agent-only/{spec.pages}")[0] == 404
    assert render(spec, "site1.test", "/agent-only/10")[0] == 404
    for host in spec.host_names:
        for n in range(spec.pages):
            path = page_path(n)
            if host == "site0.test" and n % 10 == 0:
                page, plain = html_page(spec, host, path), html_page(ROBOTS_PLAIN, host, path)
                assert page is not None and plain is not None
                assert page.links[:-1] == plain.links
                assert page.links[-1].target == spec.url(host, f"/agent-only/{n}")
                assert replace(page, links=plain.links) == plain
            else:
                assert render(spec, host, path) == render(ROBOTS_PLAIN, host, path)
            assert render(spec, host, f"/private/{n}") == render(
                ROBOTS_PLAIN, host, f"/private/{n}"
            )


def test_reachable_obeys_each_robots_variant() -> None:
    spec = ROBOTS_SPEC
    free = reachable(spec, spec.roots)
    polite = reachable(spec, spec.roots, obey_robots=True)
    agent_only = {spec.url("site0.test", f"/agent-only/{n}") for n in (0, 10, 20)}
    assert _on(free, "site0.test", "/agent-only/") == agent_only
    # agent: crawlfleet's own group applies, so /agent-only/ is skipped and /private/ is not.
    assert _on(polite, "site0.test") == _on(free, "site0.test") - agent_only
    assert _on(polite, "site0.test", "/private/") != set()
    # 4xx robots.txt: everything allowed. 5xx: nothing at all, and the host is noted.
    assert _on(polite, "site1.test") == _on(free, "site1.test")
    assert _on(polite, "site2.test") == set() != _on(free, "site2.test")
    assert polite.robots_unreachable == {"site2.test"}
    assert free.robots_unreachable == set()
    # sitemap / delay: today's rules.
    for host in ("site3.test", "site4.test"):
        assert _on(polite, host) == _on(free, host) - _on(free, host, "/private/")
    # The ground truth agrees with a real robots.txt parser on every URL of the rule hosts.
    for host in ("site0.test", "site3.test", "site4.test"):
        rules = Protego.parse(render(spec, host, "/robots.txt")[2].decode())
        for url in _on(free, host):
            assert rules.can_fetch(url, CRAWLFLEET_UA) == (url in polite), url
    # A 5xx host that the crawl never enters is not noted.
    alone = reachable(spec, spec.roots[:1], obey_robots=True)
    assert alone.robots_unreachable == set()
    assert reachable(spec, spec.roots[2:3], obey_robots=True) == {}


XSPEC = WebSpec(hosts=3, pages=24, links=8, seed=7, port=8123, extras=True)
XPLAIN = replace(XSPEC, extras=False)


def _get(spec: WebSpec, url: str, hit: int = 1) -> tuple[int, str, bytes, dict[str, str]]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    return render(spec, parts.hostname, parts.path, parts.query, hit=hit)


def test_extras_only_add_links_to_the_roots() -> None:
    for host in XSPEC.host_names:
        for n in range(XSPEC.pages):
            path = page_path(n)
            if n == 0:
                page, plain = html_page(XSPEC, host, path), html_page(XPLAIN, host, path)
                assert page is not None and plain is not None
                k = len(plain.links)
                assert page.links[:k] == plain.links
                targets = [link.target for link in page.links[k:]]
                assert targets == [XSPEC.url(host, p) for p in extra_paths(XSPEC, host)]
                assert replace(page, links=plain.links) == plain
            else:
                assert render(XSPEC, host, path) == render(XPLAIN, host, path)
            for other in (f"/private/{n}", f"/files/{n}.pdf", f"/img/{n}.png", f"/missing/{n}"):
                assert render(XSPEC, host, other) == render(XPLAIN, host, other)
        assert render(XSPEC, host, "/robots.txt") == render(XPLAIN, host, "/robots.txt")
    paths = extra_paths(XSPEC, "site1.test")
    assert paths[:7] == (
        "/redirect/1",
        "/redirect-loop/1",
        "/redirect-out/1",
        "/flaky/1",
        "/ratelimited/1",
        "/broken/1",
        "/calendar/2000/01",
    )
    assert re.fullmatch(r"/session\?sid=[0-9a-f]{16}", paths[7])
    assert paths[8:] == ("/nofollow-page", "/relnofollow", "/noindex-page", "/canonical-alias")
    assert extra_paths(XSPEC, "site0.test")[7] != paths[7]  # tokens differ per host
    assert extra_paths(XSPEC, "site9.test") == ()
    assert extra_paths(XPLAIN, "site1.test") == ()


def test_extras_redirects() -> None:
    host = "site1.test"
    url, locations = XSPEC.url(host, "/redirect/1"), []
    for _ in range(3):
        status, _, _, headers = _get(XSPEC, url)
        assert status == 301
        locations.append(headers["Location"])
        url = canonical_url(urljoin(url, headers["Location"]))
    assert locations == [
        "/redirect/1/1",
        "http://site1.test:8123/redirect/1/2",
        "../../redirected/1",
    ]
    assert url == XSPEC.url(host, "/redirected/1")
    status, ctype, body, _ = _get(XSPEC, url)
    assert (status, ctype) == (200, HTML)
    # The final page's relative link lands on a real page only if resolved against the FINAL URL.
    assert parse(body).hrefs == ["1/landed"]
    assert _get(XSPEC, urljoin(url, "1/landed"))[:2] == (200, HTML)
    assert urljoin(url, "1/landed") == XSPEC.url(host, "/redirected/1/landed")
    assert _get(XSPEC, urljoin(XSPEC.url(host, "/redirect/1"), "1/landed"))[0] == 404

    status, _, _, headers = render(XSPEC, host, "/redirect-loop/1")
    assert (status, headers["Location"]) == (302, "/redirect-loop/1?i=1")
    assert render(XSPEC, host, "/redirect-loop/1", "i=41")[3]["Location"] == "/redirect-loop/1?i=42"
    assert render(XSPEC, host, "/redirect-loop/5", "i=x")[3]["Location"] == "/redirect-loop/5?i=1"

    status, _, _, headers = render(XSPEC, host, "/redirect-out/1")
    assert (status, headers["Location"]) == (302, "http://site2.test:8123/p/1")
    assert render(XSPEC, "site2.test", "/redirect-out/7")[3]["Location"] == (
        "http://site0.test:8123/p/1"
    )
    one = WebSpec(hosts=1, pages=1, port=8123, extras=True)
    assert render(one, "site0.test", "/redirect-out/1")[3]["Location"] == "http://site0.test:8123/"
    assert render(XSPEC, host, "/redirect/12345")[0] == 301  # any N
    for path in ("/redirect/1/3", "/redirect/01", "/redirected/1/x", "/redirect-loop/"):
        assert render(XSPEC, host, path)[0] == 404, path
    assert render(XSPEC, host, "/redirect/1/2/3")[0] == 404


def test_extras_failing_endpoints_answer_by_hit_count() -> None:
    statuses = [render(XSPEC, "site0.test", "/flaky/3", hit=k)[0] for k in range(1, 6)]
    assert statuses == [503, 503, 200, 200, 200]
    status, ctype, body, headers = render(XSPEC, "site0.test", "/ratelimited/1")
    assert (status, headers["Retry-After"]) == (429, "1")
    status, ctype, body, headers = render(XSPEC, "site0.test", "/ratelimited/1", hit=2)
    assert (status, ctype) == (200, HTML) and "Retry-After" not in headers
    # What they finally serve has no links: the reachable set cannot depend on retry policy.
    assert parse(body).hrefs == []
    assert parse(render(XSPEC, "site0.test", "/flaky/1", hit=3)[2]).hrefs == []
    assert {render(XSPEC, "site0.test", "/broken/1", hit=k)[0] for k in (1, 2, 3, 100)} == {500}


def test_extras_traps_go_on_forever() -> None:
    host = "site0.test"
    url, months = XSPEC.url(host, "/calendar/2000/01"), []
    for _ in range(14):
        page = html_page(XSPEC, *_host_path(url))
        assert page is not None and len(page.links) == 1
        months.append(_host_path(url)[1])
        url = cast(str, page.links[0].target)
    assert months[:2] == ["/calendar/2000/01", "/calendar/2000/02"]
    assert months[11:] == ["/calendar/2000/12", "/calendar/2001/01", "/calendar/2001/02"]
    assert render(XSPEC, host, "/calendar/12345/06")[0] == 200
    for path in ("/calendar/1999/12", "/calendar/2000/13", "/calendar/2000/1", "/calendar/2000"):
        assert render(XSPEC, host, path)[0] == 404, path

    url, sids = XSPEC.url(host, extra_paths(XSPEC, host)[7]), []
    for _ in range(20):
        sids.append(parse_qs(urlsplit(url).query)["sid"][0])
        status, ctype, body, _ = _get(XSPEC, url)
        assert (status, ctype) == (200, HTML)
        nxt = urljoin(url, parse(body).hrefs[0])
        page = html_page(XSPEC, host, "/session", urlsplit(url).query)
        assert page is not None and [link.target for link in page.links] == [nxt]
        url = nxt
    assert len(set(sids)) == 20 and all(re.fullmatch("[0-9a-f]{16}", s) for s in sids)
    # Deterministic from seed, host and previous token; any sid (or none) gets an answer.
    href = parse(render(XSPEC, host, "/session", f"sid={sids[3]}")[2]).hrefs[0]
    assert href == f"/session?sid={sids[4]}"
    assert render(XSPEC, host, "/session")[0] == 200
    assert extra_paths(replace(XSPEC, seed=8), host)[7] != extra_paths(XSPEC, host)[7]


def test_extras_nofollow_noindex_canonical() -> None:
    host = "site2.test"

    def doc(path: str) -> _Links:
        status, ctype, body, _ = render(XSPEC, host, path)
        assert (status, ctype) == (200, HTML), path
        return parse(body)

    page = doc("/nofollow-page")
    assert (page.robots, page.hrefs) == ("nofollow", ["/only-via-nofollow/1"])
    page = doc("/relnofollow")
    assert page.robots is None
    assert page.hrefs == ["/only-via-relnofollow/1", "/relnofollow-followed/1"]
    assert page.rels == ["nofollow", None]
    page = doc("/noindex-page")
    assert (page.robots, page.hrefs) == ("noindex", ["/only-via-noindex/1"])
    page = doc("/canonical-alias")
    assert page.canonical == XSPEC.url(host, "/canonical-target")
    assert page.hrefs == ["/canonical-target"]
    assert doc("/canonical-target").canonical == XSPEC.url(host, "/canonical-target")
    for path in ("/only-via-nofollow/1", "/only-via-relnofollow/1", "/only-via-noindex/1"):
        assert doc(path).hrefs == []
    alias = html_page(XSPEC, host, "/canonical-alias")
    nofollow = html_page(XSPEC, host, "/nofollow-page")
    relnofollow = html_page(XSPEC, host, "/relnofollow")
    assert alias is not None and nofollow is not None and relnofollow is not None
    assert nofollow.nofollow and not alias.nofollow
    assert [link.nofollow for link in relnofollow.links] == [True, False]


def _assert_hrefs_resolve(spec: WebSpec, page: Page, body: bytes) -> None:
    doc = parse(body)
    base = urljoin(page.url, doc.base) if doc.base else page.url
    assert doc.hrefs == [link.href for link in page.links]
    assert doc.rels == [link.rel for link in page.links]
    for href, link in zip(doc.hrefs, page.links, strict=True):
        if href.startswith(("mailto:", "javascript:")):
            assert link.target is None
        else:
            assert canonical_url(urldefrag(urljoin(base, href))[0]) == link.target, href


@pytest.mark.parametrize("port", [8123, 80])
def test_knob_hrefs_resolve_to_the_generated_targets(port: int) -> None:
    """Every HTML page the knobs add or change, checked like the default pages."""
    spec = replace(XSPEC, port=port, robots=(("site1.test", "agent"),))
    found = reachable(spec, spec.roots, trap_limit=3)
    urls = [*found, spec.url("site0.test", "/redirected/1"), spec.url("site0.test", "/flaky/1")]
    urls += [spec.url("site0.test", p) for p in ("/only-via-nofollow/1", "/only-via-relnofollow/1")]
    checked = 0
    for url in urls:
        host, path = _host_path(url)
        path, _, query = path.partition("?")
        page = html_page(spec, host, path, query)
        status, ctype, body, _ = render(spec, host, path, query, hit=10)
        assert (page is not None) == (status == 200 and ctype == HTML), url
        if page is not None:
            assert page.url == url
            _assert_hrefs_resolve(spec, page, body)
            checked += 1
    assert checked > 3 * spec.pages


def test_reachable_with_extras() -> None:
    plain = reachable(XPLAIN, XPLAIN.roots)
    found = reachable(XSPEC, XSPEC.roots)
    assert {u: found[u] for u in plain} == plain  # nothing old moves
    added = {u: d for u, d in found.items() if u not in plain}
    expected: dict[str, int] = {}
    redirects: dict[str, tuple[str, ...]] = {}
    for i, host in enumerate(XSPEC.host_names):

        def url(path: str, host: str = host) -> str:
            return XSPEC.url(host, path)

        for path in extra_paths(XSPEC, host):
            if not path.startswith(("/calendar/", "/session")):  # traps: out by default
                expected[url(path)] = 1
        for path in ("/redirected/1/landed", "/relnofollow-followed/1", "/only-via-noindex/1"):
            expected[url(path)] = 2
        expected[url("/canonical-target")] = 2  # alias and target are both fetched
        redirects[url("/redirect/1")] = (
            url("/redirect/1/1"),
            url("/redirect/1/2"),
            url("/redirected/1"),
        )
        redirects[url("/redirect-out/1")] = (url("/p/1", f"site{(i + 1) % 3}.test"),)
        # Never fetched on their own: nofollow targets, redirect hops and targets.
        for path in ("/only-via-nofollow/1", "/only-via-relnofollow/1", "/redirected/1"):
            assert url(path) not in found
        assert url("/redirect/1/1") not in found
    assert added == expected
    assert found.redirects == redirects
    assert found.redirect_loops == {XSPEC.url(h, "/redirect-loop/1") for h in XSPEC.host_names}
    assert found.retried == {
        **{XSPEC.url(h, "/flaky/1"): (503, 503) for h in XSPEC.host_names},
        **{XSPEC.url(h, "/ratelimited/1"): (429,) for h in XSPEC.host_names},
    }
    assert found.robots_unreachable == set()
    # Every note is about a URL of the result.
    assert set(found.redirects) | found.redirect_loops | set(found.retried) <= set(found)


def test_reachable_trap_limit() -> None:
    roots = XSPEC.roots
    base = reachable(XSPEC, roots)
    assert not any("/calendar/" in u or "/session" in u for u in base)
    assert reachable(XSPEC, roots, trap_limit=0) == base
    four = reachable(XSPEC, roots, trap_limit=4)
    trap = {u: d for u, d in four.items() if u not in base}
    for host in XSPEC.host_names:
        months = {XSPEC.url(host, f"/calendar/2000/{m:02d}"): m for m in range(1, 5)}
        assert {u: d for u, d in trap.items() if "/calendar/" in u and host in u} == months
        sessions = sorted((d, u) for u, d in trap.items() if "/session" in u and host in u)
        assert [d for d, _ in sessions] == [1, 2, 3, 4]
        assert sessions[0][1] == XSPEC.url(host, extra_paths(XSPEC, host)[7])
        for (_, a), (_, b) in pairwise(sessions):  # each one links to the next
            page = html_page(XSPEC, host, "/session", urlsplit(a).query)
            assert page is not None and page.links[0].target == b
    assert len(trap) == 2 * 4 * XSPEC.hosts
    # A depth limit cuts traps too.
    deep = reachable(XSPEC, roots, trap_limit=1000, max_depth=3)
    assert {u for u in deep if "/calendar/" in u and "site0" in u} == {
        XSPEC.url("site0.test", f"/calendar/2000/0{m}") for m in (1, 2, 3)
    }
    # A seed inside a trap: the trap counts from there.
    inside = XSPEC.url("site0.test", "/calendar/2010/11")
    assert reachable(XSPEC, [inside], trap_limit=3) == {
        inside: 0,
        XSPEC.url("site0.test", "/calendar/2010/12"): 1,
        XSPEC.url("site0.test", "/calendar/2011/01"): 2,
    }
    assert reachable(XSPEC, [inside]) == {}
    with pytest.raises(ValueError):
        reachable(XSPEC, roots, trap_limit=-1)


def test_reachable_extras_seeds_and_allowed_hosts() -> None:
    def url(path: str, host: str = "site0.test") -> str:
        return XSPEC.url(host, path)

    found = reachable(XSPEC, [url("/redirect/1")])
    assert found == {url("/redirect/1"): 0, url("/redirected/1/landed"): 1}
    assert found.redirects == {
        url("/redirect/1"): (url("/redirect/1/1"), url("/redirect/1/2"), url("/redirected/1"))
    }
    # A cross-host redirect is followed by the fetch, whatever allowed_hosts says; the final
    # page's links are then filtered like any others.
    only0 = reachable(XSPEC, [XSPEC.roots[0]])
    assert url("/redirect-out/1") in only0
    assert only0.redirects[url("/redirect-out/1")] == (url("/p/1", "site1.test"),)
    assert {_host_path(u)[0] for u in only0} == {"site0.test"}
    loop = reachable(XSPEC, [url("/redirect-loop/3")])
    assert (loop, loop.redirect_loops, loop.redirects) == (
        {url("/redirect-loop/3"): 0},
        {url("/redirect-loop/3")},
        {},
    )
    assert reachable(XSPEC, [url("/nofollow-page")]) == {url("/nofollow-page"): 0}
    assert reachable(XSPEC, [url("/broken/1")]) == {url("/broken/1"): 0}
    # Redirect notes are kept at the depth limit too: the URL is still fetched.
    capped = reachable(XSPEC, XSPEC.roots, max_depth=1)
    assert url("/redirect/1") in capped.redirects and url("/redirected/1/landed") not in capped
    # obey_robots with extras: nothing of the extras is disallowed by the default rules.
    assert reachable(XSPEC, XSPEC.roots, obey_robots=True).keys() == {
        u for u in reachable(XSPEC, XSPEC.roots) if "/private/" not in u
    }


def test_knob_webs_are_deterministic_across_processes() -> None:
    script = (
        "import hashlib\n"
        "from crawlfleet.testweb.site import WebSpec, extra_paths, render, page_path\n"
        "spec = WebSpec(hosts=2, pages=12, seed=7, port=8123, extras=True,\n"
        "               robots=(('site1.test', 'agent'), ('site0.test', 'sitemap')))\n"
        "h = hashlib.sha256()\n"
        "paths = ['/robots.txt', '/sitemap.xml', '/agent-only/10', '/redirected/3']\n"
        "paths += [page_path(n) for n in range(spec.pages)]\n"
        "for host in spec.host_names:\n"
        "    for p in paths:\n"
        "        h.update(render(spec, host, p)[2])\n"
        "    path, _, query = extra_paths(spec, host)[7].partition('?')\n"
        "    h.update(render(spec, host, path, query)[2])\n"
        "print(h.hexdigest())\n"
    )
    outs = _outputs_under_hash_seeds(script)
    assert len(outs) == 1 and len(outs.pop()) == 64


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
        assert "paths" not in stats  # per-path counts are only reported with extras
        starts = stats["hosts"]["site0.test"].pop("request_starts")
        assert isinstance(starts, list) and len(starts) == 1 and isinstance(starts[0], float)
        assert stats["hosts"] == {
            "site0.test": {
                "requests": 1,
                "distinct_paths": 1,
                "in_flight": 0,
                "peak_concurrency": 1,
                "min_gap_s": None,
            }
        }


@pytest.fixture
def rendered(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """(host, path) of every page the test web's server renders, in order."""
    calls: list[tuple[str, str]] = []

    def counting(spec: WebSpec, host: str, path: str, query: str = "", *, hit: int = 1) -> Any:
        calls.append((host, path))
        return render(spec, host, path, query, hit=hit)

    monkeypatch.setattr(server_module, "render", counting)
    return calls


async def test_server_renders_a_fixed_page_once(
    monkeypatch: pytest.MonkeyPatch, rendered: list[tuple[str, str]]
) -> None:
    """Pages, robots.txt and files are rendered once and kept (the test web shares the cores
    with the crawls it serves); answers that read the query or the hit count never are, and
    past MEMO_BYTES every request renders again, with the same answer."""
    spec = WebSpec(hosts=2, pages=5, seed=3, port=0, extras=True)
    async with WebServer(spec) as srv, aiohttp.ClientSession() as http:

        async def get(host: str, path: str) -> tuple[int, bytes]:
            headers = {"Host": f"{host}:{srv.port}"}
            async with http.get(srv.address + path, headers=headers, allow_redirects=False) as r:
                return r.status, await r.read()

        page = render(srv.spec, "site0.test", "/p/2")[2]
        for path in ("/p/2", "/p/2?x=1", "/p/2"):
            assert await get("site0.test", path) == (200, page)
        assert await get("SITE0.test.", "/p/2") == (200, page)  # the same virtual host
        assert await get("site1.test", "/p/2") == (200, render(srv.spec, "site1.test", "/p/2")[2])
        assert (await get("site0.test", "/robots.txt"))[0] == 200
        assert (await get("site0.test", "/robots.txt"))[0] == 200
        assert rendered == [("site0.test", "/p/2"), ("site1.test", "/p/2"),
                            ("site0.test", "/robots.txt")]

        # The flaky endpoint answers by hit count: rendered for every request.
        rendered.clear()
        assert [(await get("site0.test", "/flaky/1"))[0] for _ in range(4)] == [503, 503, 200, 200]
        assert rendered == [("site0.test", "/flaky/1")] * 4

        # Full: new pages are rendered each time, and still right.
        monkeypatch.setattr(server_module, "MEMO_BYTES", 0)
        rendered.clear()
        page3 = render(srv.spec, "site0.test", "/p/3")[2]
        assert [await get("site0.test", "/p/3") for _ in range(2)] == [(200, page3)] * 2
        assert rendered == [("site0.test", "/p/3")] * 2
        assert await get("site0.test", "/p/2") == (200, page)  # kept before, still served
        assert len(rendered) == 2


async def test_server_prerenders_every_page(
    monkeypatch: pytest.MonkeyPatch, rendered: list[tuple[str, str]]
) -> None:
    """With prerender, every host's pages and robots.txt are rendered before the server
    answers (with the bound port in their links), and no request renders them again."""
    spec = WebSpec(hosts=2, pages=4, seed=3, port=0)
    async with WebServer(spec, prerender=True) as srv, aiohttp.ClientSession() as http:
        expected = {(h, p) for h in srv.spec.host_names
                    for p in ("/robots.txt", *(page_path(n) for n in range(4)))}
        assert len(rendered) == len(expected) and set(rendered) == expected
        rendered.clear()
        for host, path in sorted(expected):
            async with http.get(srv.address + path, headers={"Host": host}) as r:
                assert await r.read() == render(srv.spec, host, path)[2]
        assert rendered == []
        assert f"http://site0.test:{srv.port}/" in (await _text(http, srv, "site0.test", "/p/1"))

    # Past MEMO_BYTES it stops early instead of rendering the rest for nothing.
    monkeypatch.setattr(server_module, "MEMO_BYTES", 1)
    rendered.clear()
    async with WebServer(spec, prerender=True):
        assert rendered == [("site0.test", "/robots.txt")]


async def _text(http: aiohttp.ClientSession, srv: WebServer, host: str, path: str) -> str:
    async with http.get(srv.address + path, headers={"Host": host}) as r:
        return await r.text()


async def test_server_extras_counters_and_politeness_stats() -> None:
    spec = WebSpec(
        hosts=2,
        pages=5,
        seed=3,
        port=0,
        extras=True,
        robots=(("site1.test", "status:503"),),
        slow_hosts=(("site1.test", 200.0),),
    )
    async with WebServer(spec) as srv, aiohttp.ClientSession() as http:

        async def get(host: str, path: str) -> tuple[int, dict[str, str], bytes]:
            headers = {"Host": f"{host}:{srv.port}"}
            async with http.get(srv.address + path, headers=headers, allow_redirects=False) as r:
                return r.status, dict(r.headers), await r.read()

        async def stats() -> dict[str, Any]:
            async with http.get(srv.address + STATS_PATH) as r:
                return cast(dict[str, Any], await r.json())

        # Stateful endpoints count requests per host and exact path (query string ignored).
        assert [(await get("site0.test", "/flaky/1"))[0] for _ in range(4)] == [503, 503, 200, 200]
        assert (await get("site0.test", "/flaky/2"))[0] == 503
        assert (await get("site1.test", "/flaky/1"))[0] == 503
        assert (await get("site0.test", "/flaky/2?retry=1"))[0] == 503
        status, _, body = await get("site0.test", "/flaky/2")
        assert (status, body) == (200, render(srv.spec, "site0.test", "/flaky/2", hit=3)[2])
        status, headers, _ = await get("site0.test", "/ratelimited/1")
        assert (status, headers["Retry-After"]) == (429, "1")
        status, headers, _ = await get("site0.test", "/ratelimited/1")
        assert status == 200 and "Retry-After" not in headers
        assert [(await get("site0.test", "/broken/1"))[0] for _ in range(3)] == [500] * 3

        # Query strings reach the pages; redirects carry their Location.
        status, headers, _ = await get("site0.test", "/redirect-loop/1?i=7")
        assert (status, headers["Location"]) == (302, "/redirect-loop/1?i=8")
        status, headers, _ = await get("site0.test", "/redirect/2")
        assert (status, headers["Location"]) == (301, "/redirect/2/1")
        status, headers, _ = await get("site0.test", "/redirect-out/1")
        assert (status, headers["Location"]) == (302, f"http://site1.test:{srv.port}/p/1")
        status, _, body = await get("site0.test", "/session?sid=abc")
        assert (status, body) == (200, render(srv.spec, "site0.test", "/session", "sid=abc")[2])
        assert (await get("site1.test", "/robots.txt"))[0] == 503

        # Three overlapping requests to the slow host.
        await asyncio.gather(*(get("site1.test", page_path(n)) for n in range(3)))

        snap = await stats()
        assert snap["paths"]["site0.test"]["/flaky/1"] == 4
        assert snap["paths"]["site0.test"]["/flaky/2"] == 3  # /flaky/2?retry=1 included
        assert snap["paths"]["site0.test"]["/broken/1"] == 3
        assert snap["paths"]["site1.test"] == {
            "/": 1,
            "/flaky/1": 1,
            "/p/1": 1,
            "/p/2": 1,
            "/robots.txt": 1,
        }
        s1 = snap["hosts"]["site1.test"]
        assert s1["peak_concurrency"] == 3 and s1["requests"] == 5
        for st in snap["hosts"].values():
            starts = st["request_starts"]
            assert len(starts) == st["requests"] and starts == sorted(starts)
            # A test can compute the gaps itself; the smallest is min_gap_s.
            assert min(b - a for a, b in pairwise(starts)) == st["min_gap_s"]

        # Reset clears the stats and the flaky / rate-limit counters.
        async with http.post(srv.address + RESET_PATH) as r:
            assert r.status == 200
        assert (await get("site0.test", "/flaky/1"))[0] == 503
        assert (await get("site0.test", "/ratelimited/1"))[0] == 429
        snap = await stats()
        assert snap["paths"] == {"site0.test": {"/flaky/1": 1, "/ratelimited/1": 1}}
        assert snap["total_requests"] == 2


def test_stats_recorder_bounds_request_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert server_module.MAX_REQUEST_STARTS == 10_000
    monkeypatch.setattr(server_module, "MAX_REQUEST_STARTS", 3)
    rec = StatsRecorder()
    for path in ("/", "/a", "/"):
        rec.end(rec.begin("a.test", path))
    host = rec.snapshot()["hosts"]["a.test"]
    starts = host["request_starts"]
    assert starts is not None and len(starts) == 3
    assert "paths" not in rec.snapshot()
    rec.end(rec.begin("a.test", "/b"))
    host = rec.snapshot()["hosts"]["a.test"]
    assert host["request_starts"] is None and host["requests"] == 4
    assert host["distinct_paths"] == 3
    assert rec.snapshot(paths=True)["paths"] == {"a.test": {"/": 2, "/a": 1, "/b": 1}}
    rec.reset()
    rec.end(rec.begin("a.test", "/"))
    assert rec.snapshot()["hosts"]["a.test"]["request_starts"] is not None


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


def test_dns_servfail_and_silent_names() -> None:
    with DnsServer(["site0.test"]) as dns:

        def ask(name: str, tcp: bool = False, timeout: float = 5) -> DNSRecord:
            raw = DNSRecord.question(name, "A").send("127.0.0.1", dns.port, tcp=tcp,
                                                     timeout=timeout)
            return DNSRecord.parse(raw)

        for name in ("servfail.test", "x1.servfail.test", "SERVFAIL.test"):
            for tcp in (False, True):
                reply = ask(name, tcp)
                assert reply.header.rcode == RCODE.SERVFAIL and reply.rr == []
        for name in ("silent.test", "x1.silent.test"):
            with pytest.raises(TimeoutError):
                ask(name, timeout=0.3)  # dropped: no reply ever comes
        assert ask("site0.test").header.rcode == RCODE.NOERROR  # still serving
        assert dns.answered == 1


async def test_dns_broken_names_through_aiodns() -> None:
    with DnsServer(["site0.test"]) as dns:
        resolver = aiodns.DNSResolver(nameservers=[f"127.0.0.1:{dns.port}"], timeout=0.3, tries=1)
        try:
            with pytest.raises(aiodns.error.DNSError) as servfail:
                await resolver.query_dns("servfail.test", "A")
            assert servfail.value.args[0] == aiodns.error.ARES_ESERVFAIL
            with pytest.raises(aiodns.error.DNSError) as silent:
                await resolver.query_dns("silent.test", "A")
            assert silent.value.args[0] == aiodns.error.ARES_ETIMEOUT
            with pytest.raises(aiodns.error.DNSError) as nxdomain:
                await resolver.query_dns("nope.test", "A")
            assert nxdomain.value.args[0] == aiodns.error.ARES_ENOTFOUND
        finally:
            await resolver.close()


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


def test_cli_print_reachable_with_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--print-reachable", "--port", "8123", "--hosts", "3", "--pages", "40", "--seed", "7"]
    argv += ["--extras", "--robots", "site0.test=agent", "--robots", "SITE2.test=status:503"]
    argv += ["--obey-robots", "--trap-limit", "3"]
    assert main(argv) == 0
    spec = replace(
        SPEC, extras=True, robots=(("site0.test", "agent"), ("site2.test", "status:503"))
    )
    expected = reachable(spec, spec.roots, obey_robots=True, trap_limit=3)
    out = capsys.readouterr()
    assert out.out.splitlines() == sorted(expected)
    assert any("/calendar/2000/03" in u for u in expected)
    assert "site2.test's robots.txt answers 5xx" in out.err


@pytest.mark.parametrize(
    "argv",
    [
        ["--robots", "site9.test=agent"],
        ["--robots", "site0.test=bogus"],
        ["--robots", "site0.test=status:200"],
        ["--robots", "nonsense"],
        ["--trap-limit", "3"],
        ["--print-reachable", "--port", "8123", "--extras", "--trap-limit", "-1"],
    ],
)
def test_cli_rejects_bad_knobs(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "crawlfleet testweb: error:" in capsys.readouterr().err


# --- hostile.py ----------------------------------------------------------------------------


def test_hostile_bombs_are_valid_streams_of_the_claimed_size() -> None:
    from crawlfleet.testweb.hostile import BOMB_BLOCK, _compressed

    for encoding, wbits in (("gzip", 31), ("deflate", 15)):
        inflate = zlib.decompressobj(wbits)
        wire = inflated = 0
        for piece in _compressed(encoding, 4 * BOMB_BLOCK):
            wire += len(piece)
            inflated += len(inflate.decompress(piece))
        assert inflate.eof and not inflate.unused_data  # trailer (checksum, size) correct
        assert inflated == 4 * BOMB_BLOCK and wire < inflated // 500


async def _raw_get(port: int, path: str, *, limit: int = 1 << 16) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: hostile.test\r\n\r\n".encode())
        await writer.drain()
        data = b""
        while len(data) < limit:
            piece = await asyncio.wait_for(reader.read(limit - len(data)), timeout=10)
            if not piece:
                break
            data += piece
        return data
    finally:
        writer.close()


async def test_hostile_server_paths_and_stats() -> None:
    from crawlfleet.testweb.hostile import PATHS, ROOT_LINKS, STATS_PATH, HostileServer

    async with HostileServer() as srv:
        root = await _raw_get(srv.port, "/")
        assert root.startswith(b"HTTP/1.1 200 OK\r\n")
        for link in ROOT_LINKS:
            assert f'href="{link}"'.encode() in root
        assert set(ROOT_LINKS) >= {p for p in PATHS if p not in ("/robots.txt", "/redirect-loop")}
        assert (await _raw_get(srv.port, "/bad-status")).startswith(b"HTTP/1.1 two hundred")
        assert b"This is not a header\r\n" in await _raw_get(srv.port, "/bad-header")
        loop = await _raw_get(srv.port, "/redirect-loop?n=7")
        assert b"302 Found" in loop and b"Location: /redirect-loop?n=8\r\n" in loop
        chain = await _raw_get(srv.port, "/short-chain/1")
        assert b"Location: /short-chain/0\r\n" in chain
        assert b"Retry-After: 1\r\n" in await _raw_get(srv.port, "/ratelimited")
        huge = await _raw_get(srv.port, "/huge-length", limit=200_000)  # we hang up early
        assert b"Content-Length: 10737418240\r\n" in huge
        assert (await _raw_get(srv.port, "/nope")).startswith(b"HTTP/1.1 404")

        def closed() -> bool:
            return srv.stats["/huge-length"].closed_early == 1

        deadline = asyncio.get_running_loop().time() + 10
        while not closed():
            assert asyncio.get_running_loop().time() < deadline, "hang-up not recorded"
            await asyncio.sleep(0.02)
        stats = json.loads((await _raw_get(srv.port, STATS_PATH)).partition(b"\r\n\r\n")[2])
        assert stats["/"] == {"requests": 1, "closed_early": 0, "completed": 1,
                              "max_sent": len(root.partition(b"\r\n\r\n")[2])}
        assert STATS_PATH not in stats and stats["/huge-length"]["closed_early"] == 1


async def test_hostile_server_refuses_non_loopback_bind() -> None:
    from crawlfleet.testweb.hostile import HostileServer

    with pytest.raises(ValueError, match=r"127\.0\.0\.0/8"):
        HostileServer(bind="0.0.0.0")


async def test_cli_hostile_serves_hostile_test_on_its_own_port() -> None:
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "crawlfleet.testweb", "--port", "0", "--dns-port", "0"],
        *["--hosts", "1", "--pages", "5", "--hostile"],
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(await asyncio.wait_for(proc.stdout.readline(), timeout=30))
        port = ready["hostile_port"]
        assert port != ready["http_port"]
        assert ready["hostile_seed"] == f"http://hostile.test:{port}/"
        assert ready["hosts"] == ["site0.test"]  # the ordinary web is unchanged
        resolver = aiohttp.AsyncResolver(nameservers=[ready["dns"]], timeout=2, tries=1)
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(resolver=resolver)) as http,
            http.get(ready["hostile_seed"] + "ok") as r,
        ):
            assert r.status == 200 and b"a plain page" in await r.read()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), timeout=30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(("value", "uv"), [(None, True), ("1", True), ("0", False), ("off", False)])
def test_cli_event_loop_is_uvloop_unless_turned_off(
    monkeypatch: pytest.MonkeyPatch, value: str | None, uv: bool
) -> None:
    uvloop = pytest.importorskip("uvloop")
    if value is None:
        monkeypatch.delenv("CRAWLFLEET_UVLOOP", raising=False)
    else:
        monkeypatch.setenv("CRAWLFLEET_UVLOOP", value)
    before = asyncio.get_event_loop_policy()
    try:
        asyncio.set_event_loop_policy(None)
        cli_module.use_configured_loop()
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy) is uv
    finally:
        asyncio.set_event_loop_policy(before)


def test_cli_refuses_a_bad_event_loop_setting_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("CRAWLFLEET_UVLOOP", "maybe")
    with pytest.raises(SystemExit) as exit_:
        main(["--hosts", "1", "--port", "0", "--dns-port", "0"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "CRAWLFLEET_UVLOOP" in err[-1] and "Traceback" not in "\n".join(err)
