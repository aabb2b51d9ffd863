"""The synthetic web itself: deterministic pages and the crawl ground truth. Pure, no I/O.

Every response is a function of ``(spec, host, path, query)`` alone (plus, for the two
deliberately stateful endpoints, which request for that path this is), and every page draws its
randomness from its own ``Random(f"{seed}:{host}:{page}")``, so any page can be rendered (or
its links listed) independently in O(links), and two processes always agree byte for byte.

Politeness fixtures are opt-in knobs of ``WebSpec`` and all off by default, so a default web is
byte for byte the web it always was:

* ``robots``: per-host robots.txt variants (crawl delay, a group for the crawler's own token,
  an error status, a Sitemap line), see ``ROBOTS_VARIANTS``;
* ``extras``: every root also links to special endpoints (redirect chains and loops, a
  cross-host redirect, flaky / rate-limited / broken pages, two crawler traps, nofollow,
  noindex and canonical pages), see ``extra_paths()`` and ``reachable()``.
"""

from __future__ import annotations

import hashlib
import html
import random
import re
import struct
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from urllib.parse import parse_qsl, urljoin, urlsplit

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PDF = "application/pdf"
PNG = "image/png"
XML = "application/xml; charset=utf-8"

ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
PRIVATE_PREFIX = "/private/"

# --- opt-in politeness fixtures (all off by default) ---
# robots.txt variants, per host (WebSpec.robots); "delay:SECONDS" and "status:CODE" take an
# argument: SECONDS a plain decimal number (2, 0.5), CODE an HTTP status in 400..599.
ROBOTS_VARIANTS = ("default", "delay:SECONDS", "agent", "status:CODE", "sitemap")
AGENT_TOKEN = "crawlfleet"  # the product token of crawlfleet's User-Agent
AGENT_ONLY_PREFIX = "/agent-only/"
# The "agent" variant: crawlfleet's own group replaces the * group (RFC 9309 2.2.1), so a
# crawler that matches its token skips /agent-only/ and may fetch /private/.
ROBOTS_AGENT_TXT = (
    f"User-agent: {AGENT_TOKEN}\nDisallow: {AGENT_ONLY_PREFIX}\nAllow: /\n\n"
    f"User-agent: *\nDisallow: {PRIVATE_PREFIX}\n"
)
SITEMAP_PATH = "/sitemap.xml"
AGENT_LINK_EVERY = 10  # on "agent" hosts, pages 0, 10, 20, ... link to /agent-only/<same n>
FLAKY_FAILURES = 2  # /flaky/N answers 503 to this many requests, then 200
RATELIMITED_FAILURES = 1  # /ratelimited/N answers 429 (Retry-After: 1) this often, then 200
CALENDAR_START = (2000, 1)
TRAP_KINDS = frozenset({"calendar", "session"})
MAX_REDIRECTS = 20  # reachable() calls a chain longer than this endless (real ones have 3 hops)

# (status, content type, body, extra headers): everything an HTTP response carries.
Response = tuple[int, str, bytes, dict[str, str]]

# Non-ASCII on purpose (Latin-1 range, CJK, Greek, astral plane) so that a crawler that
# decodes with the wrong charset produces visibly different text.
_PROSE = "crawl fleet café naïve résumé Straße 漢字 日本語 Ελληνικά 😀 frontier politeness señal"
_WORDS = tuple(_PROSE.split())

# Weighted link kinds for the random (non-chain) links: mostly same-host pages.
_KINDS = {"same": 60, "cross": 14, "self": 3, "pdf": 4, "png": 4, "missing": 4}
_KINDS |= {"private": 4, "mailto": 4, "javascript": 3}
_STYLES = ("relative", "dotdot", "rootrel", "absolute", "protorel")


@dataclass(frozen=True)
class WebSpec:
    """The knobs of a synthetic web; equal specs produce identical webs."""

    hosts: int = 3
    pages: int = 50  # HTML pages per host, including the root
    links: int = 8  # links per page (at least the chain links that keep everything reachable)
    latency_ms: float = 0.0
    seed: int = 1
    # host -> extra latency in ms. A sorted tuple of pairs keeps the spec hashable; a dict is
    # also accepted at runtime and normalised here.
    slow_hosts: tuple[tuple[str, float], ...] = ()
    port: int = 8080  # the HTTP port every generated URL carries (0 = not yet bound)
    # host -> robots.txt variant (one of ROBOTS_VARIANTS); unlisted hosts get "default".
    # Normalised like slow_hosts: a dict is accepted, hosts are lower-cased, pairs sorted.
    robots: tuple[tuple[str, str], ...] = ()
    # Link every root page to the special endpoints of extra_paths() (see reachable()).
    extras: bool = False

    def __post_init__(self) -> None:
        if self.hosts < 1 or self.pages < 1 or self.links < 0:
            raise ValueError("need hosts >= 1, pages >= 1 and links >= 0")
        if self.latency_ms < 0:
            raise ValueError("latency_ms must be >= 0")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port out of range: {self.port}")
        pairs: Iterable[tuple[str, float]] = (
            self.slow_hosts.items() if isinstance(self.slow_hosts, Mapping) else self.slow_hosts
        )
        merged = {str(h).lower().rstrip("."): float(ms) for h, ms in pairs}
        if any(ms < 0 for ms in merged.values()):
            raise ValueError("slow_hosts latencies must be >= 0")
        object.__setattr__(self, "slow_hosts", tuple(sorted(merged.items())))
        variants: Iterable[tuple[str, str]] = (
            self.robots.items() if isinstance(self.robots, Mapping) else self.robots
        )
        robots = {str(h).lower().rstrip("."): _robots_variant(str(v)) for h, v in variants}
        object.__setattr__(self, "robots", tuple(sorted(robots.items())))
        object.__setattr__(self, "extras", bool(self.extras))

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(f"site{i}.test" for i in range(self.hosts))

    @property
    def roots(self) -> list[str]:
        """The root URL of every host: the natural crawl seeds."""
        return [self.url(h, "/") for h in self.host_names]

    def origin(self, host: str) -> str:
        return f"http://{host}" if self.port == 80 else f"http://{host}:{self.port}"

    def url(self, host: str, path: str) -> str:
        return self.origin(host) + path

    def delay_ms(self, host: str) -> float:
        """Total artificial latency for one request to ``host``."""
        return self.latency_ms + dict(self.slow_hosts).get(host.lower(), 0.0)

    def robots_variant(self, host: str) -> str:
        """The robots.txt variant of ``host``: ``default`` unless ``robots`` names it."""
        host = host.lower().rstrip(".")
        return next((v for h, v in self.robots if h == host), "default")


@dataclass(frozen=True)
class Link:
    href: str  # exactly as written in the HTML
    target: str | None  # canonical absolute URL it resolves to; None for mailto:/javascript:
    text: str
    rel: str | None = None  # the rel attribute, if any (only extras pages have one)

    @property
    def nofollow(self) -> bool:
        return "nofollow" in (self.rel or "").lower().split()


@dataclass(frozen=True)
class Page:
    """The model of one HTML page; render() serialises it, reachable() walks its links."""

    url: str
    title: str
    base_href: str | None
    canonical: bool
    paragraphs: tuple[str, ...]
    links: tuple[Link, ...]
    robots_meta: str | None = None  # content of <meta name="robots">, if the page has one
    canonical_href: str | None = None  # where rel=canonical points when not at url itself

    @property
    def nofollow(self) -> bool:
        """``<meta name="robots">`` forbids following this page's links."""
        tokens = {t.strip().lower() for t in (self.robots_meta or "").split(",")}
        return bool(tokens & {"nofollow", "none"})


def canonical_url(url: str) -> str:
    """``http://host[:port]/path[?query]``: lower-case host, no fragment, no default port."""
    parts = urlsplit(url.strip())
    if parts.scheme.lower() != "http" or not parts.hostname:
        raise ValueError(f"not an absolute http URL: {url!r}")
    port = 80 if parts.port is None else parts.port
    netloc = parts.hostname if port == 80 else f"{parts.hostname}:{port}"
    query = f"?{parts.query}" if parts.query else ""
    return f"http://{netloc}{parts.path or '/'}{query}"


def page_path(n: int) -> str:
    return "/" if n == 0 else f"/p/{n}"


def html_page(spec: WebSpec, host: str, path: str, query: str = "") -> Page | None:
    """The model of the HTML page at ``host`` + ``path``, or None if that is not an HTML page.

    ``query`` only matters to the extras endpoints that read it (``/session``). The flaky and
    rate-limited endpoints are modelled by the page they serve once they answer 200.
    """
    i = _host_index(spec, host)
    if i is None:
        return None
    parsed = _parse_path(spec, path)
    if parsed is None:
        special = _parse_special(spec, i, path)
        return None if special is None else _special_page(spec, i, special, query)
    if parsed[0] not in ("page", "private"):
        return None
    kind, n = parsed
    return _private_page(spec, i, n) if kind == "private" else _page(spec, i, n)


def render(spec: WebSpec, host: str, path: str, query: str = "", *, hit: int = 1) -> Response:
    """The complete response to ``GET path?query`` with ``Host: host``.

    ``hit`` says which request for this exact host and path (query ignored) this is, counting
    from 1; only the stateful extras endpoints look at it: ``/flaky/N`` answers 503 to hits
    1..FLAKY_FAILURES and ``/ratelimited/N`` 429 to hit 1, both 200 afterwards. The server
    keeps that count; the default is what a fresh server answers.
    """
    host = host.lower().rstrip(".")
    i = _host_index(spec, host)
    if i is None:
        return 404, TEXT, f"unknown host {host!r}\n".encode(), {"X-Testweb-Kind": "unknown-host"}
    parsed = _parse_path(spec, path)
    if parsed is None:
        special = _parse_special(spec, i, path)
        if special is not None:
            return _render_special(spec, i, special, query, hit)
        body = f"<!DOCTYPE html><title>404</title><p>{html.escape(path)} not found</p>\n"
        return 404, HTML, body.encode(), {"X-Testweb-Kind": "missing"}
    kind, n = parsed
    headers = {"X-Testweb-Kind": kind}
    if kind == "robots":
        return _robots(spec, host, headers)
    if kind == "pdf":
        return 200, PDF, _pdf_bytes(host, n), headers
    if kind == "png":
        return 200, PNG, _png_bytes(spec.seed, i, n), headers
    page = _private_page(spec, i, n) if kind == "private" else _page(spec, i, n)
    return 200, HTML, _page_html(page).encode(), headers


def fixed_response(spec: WebSpec, path: str) -> bool:
    """Whether ``render``'s answer for ``path`` depends on the host and the path alone: a page,
    a private page, robots.txt, a PDF or an image, never on the query or the hit count (only
    the extras endpoints read those). The server keeps such answers once rendered."""
    return _parse_path(spec, path) is not None


def extra_paths(spec: WebSpec, host: str) -> tuple[str, ...]:
    """The special endpoints ``host``'s root links to when ``spec.extras`` is on (else ``()``).

    * ``/redirect/1``: 301 -> ``/redirect/1/1`` -> 301 ``/redirect/1/2`` -> 301
      ``/redirected/1``, an HTML page that nothing links to, whose one (relative) link
      ``1/landed`` resolves against the final URL to ``/redirected/1/landed``. The three
      Location headers are root-relative, absolute and ``../../redirected/1``.
    * ``/redirect-loop/1``: 302 to ``/redirect-loop/1?i=1``, which 302s to ``?i=2``, forever.
    * ``/redirect-out/1``: 302 to ``http://site{j}.test:PORT/p/1`` with j = (i + 1) % hosts
      (the same host if there is only one; ``/`` instead of ``/p/1`` if pages == 1).
    * ``/flaky/1``: 503 to the first FLAKY_FAILURES requests for that host and path, then a
      200 HTML page without links; ``/ratelimited/1``: 429 with ``Retry-After: 1`` to the
      first request, then the same; ``/broken/1``: always 500.
    * ``/calendar/2000/01``: a trap, every month links to the next one, forever.
    * ``/session?sid=T0``: a trap, every answer links to ``/session?sid=<next token>``;
      the tokens are derived from seed, host and the previous token.
    * ``/nofollow-page``: ``<meta name="robots" content="nofollow">``, links to
      ``/only-via-nofollow/1``; ``/relnofollow``: ``<a rel="nofollow">`` to
      ``/only-via-relnofollow/1`` next to a plain link to ``/relnofollow-followed/1``.
    * ``/noindex-page``: ``<meta name="robots" content="noindex">``, links to
      ``/only-via-noindex/1`` (noindex does not stop link following).
    * ``/canonical-alias``: rel=canonical points to ``/canonical-target``, which it also links
      to; the target is a page of its own with a self-referencing canonical.

    Every numbered endpoint answers for any N >= 0, and every calendar month from 2000/01 on.
    """
    if not spec.extras or _host_index(spec, host) is None:
        return ()
    host = host.lower().rstrip(".")
    return (
        "/redirect/1",
        "/redirect-loop/1",
        "/redirect-out/1",
        "/flaky/1",
        "/ratelimited/1",
        "/broken/1",
        "/calendar/{:04d}/{:02d}".format(*CALENDAR_START),
        f"/session?sid={_session_token(spec, host, '')}",
        "/nofollow-page",
        "/relnofollow",
        "/noindex-page",
        "/canonical-alias",
    )


class Reached(dict[str, int]):
    """What ``reachable()`` returns: canonical URL -> BFS depth, plus notes on some of them.

    It is a plain ``dict`` to compare, iterate and print; the notes only concern URLs in it:

    * ``redirects``: original URL -> every URL its redirects lead to, in order; the last is
      the final URL, whose content the fetch of the original URL gets.
    * ``redirect_loops``: original URLs whose redirects never end (the fetch fails).
    * ``retried``: URL -> the error statuses it answers before its 200 (flaky: 503, 503;
      rate-limited: 429, with ``Retry-After: 1``), for a fresh server.
    * ``robots_unreachable``: hosts left out entirely because their robots.txt answers 5xx
      (only with ``obey_robots``; a polite crawler fetches their robots.txt and nothing else).
    """

    def __init__(self) -> None:
        super().__init__()
        self.redirects: dict[str, tuple[str, ...]] = {}
        self.redirect_loops: set[str] = set()
        self.retried: dict[str, tuple[int, ...]] = {}
        self.robots_unreachable: set[str] = set()


def reachable(
    spec: WebSpec,
    seeds: list[str],
    *,
    allowed_hosts: set[str] | None = None,
    obey_robots: bool = False,
    max_depth: int | None = None,
    trap_limit: int | None = None,
) -> Reached:
    """Ground truth: canonical URL -> BFS depth of everything a rule-following crawler fetches.

    Link targets come from the generator (not from re-resolving hrefs), fragments are dropped,
    mailto:/javascript: are skipped, only ``allowed_hosts`` (default: the seeds' hosts) are
    entered, ``/private/`` is skipped when ``obey_robots``, and only HTML pages have outlinks
    (PDFs, images and 404s are in the result because they get fetched). Seeds that break
    the host or robots rules are dropped like any other URL.

    ``obey_robots`` follows each host's robots.txt variant (``spec.robots``), as the crawler
    with agent token ``crawlfleet`` reads it: ``default``, ``delay:S`` and ``sitemap`` disallow
    ``/private/`` (the crawl delay and the sitemap change nothing here; sitemap.xml is not a
    link source); ``agent`` disallows only ``/agent-only/`` (crawlfleet's own group applies,
    not the ``*`` one, so ``/private/`` is fetched); ``status:4xx`` allows everything
    (RFC 9309 "unavailable"; 429 included); ``status:5xx`` means complete disallow
    (RFC 9309 "unreachable"): no URL of that host is in the result, and the host is listed in
    ``robots_unreachable`` if the crawl came across any of its URLs. robots.txt itself is
    never in the result, whatever the variant.

    With ``spec.extras`` (see ``extra_paths()``), one fetch of a URL is what the crawler's
    fetcher does with it, redirects followed:

    * a redirect chain counts as the ORIGINAL URL, fetched; ``redirects`` maps it to its hops
      (final URL last), the final page's links are followed (``/redirected/N`` links to
      ``/redirected/N/landed``), and neither the hops nor the final URL are results of their
      own unless something links to them (the cross-host ``/redirect-out/N`` ends on a real
      ``/p/1``). Hops are not re-checked against ``allowed_hosts`` or robots.txt.
    * ``/redirect-loop/N`` and ``/broken/N`` count as fetched (failures, no outlinks); loops
      are listed in ``redirect_loops``.
    * ``/flaky/N`` and ``/ratelimited/N`` count as fetched, listed in ``retried``; what they
      finally serve has no links, so the result does not depend on the retry policy.
    * traps (``/calendar/...``, ``/session?sid=...``) are left out while ``trap_limit`` is
      None; with ``trap_limit=k`` the first k URLs of each trap are in (counted from where the
      crawl enters it: the root's link, or a seed inside the trap), depth growing by one each.
    * ``<meta name="robots" content="nofollow">`` (or ``none``): the page is fetched, its
      links are not followed; ``<a rel="nofollow">`` links are skipped, the page's other links
      are followed. ``noindex`` pages are followed like any page.
    * ``/canonical-alias`` and ``/canonical-target`` are both fetched: the alias links to it.

    The result is a ``Reached``: a dict with the notes described there.
    """
    if spec.port == 0:
        raise ValueError("reachable() needs the spec's real port (spec.port is 0)")
    if trap_limit is not None and trap_limit < 0:
        raise ValueError("trap_limit must be >= 0")
    start = [canonical_url(s) for s in seeds]
    allowed = (
        {h.lower().rstrip(".") for h in allowed_hosts}
        if allowed_hosts is not None
        else {_split(u)[0] for u in start}
    )
    depth = Reached()
    trap_pos: dict[str, int] = {}  # trap URL -> its position in its trap, from 0
    queue: deque[str] = deque()

    def robots_allow(host: str, path: str) -> bool:
        if not obey_robots:
            return True
        name, _, arg = spec.robots_variant(host).partition(":")
        if name == "agent":
            return not path.startswith(AGENT_ONLY_PREFIX)
        if name == "status":
            if int(arg) >= 500:
                depth.robots_unreachable.add(host)
                return False
            return True
        return not path.startswith(PRIVATE_PREFIX)

    def visit(url: str, d: int, source: str | None) -> None:
        if url in depth:
            return
        host, port, path, _ = _split_query(url)
        if host not in allowed or not robots_allow(host, path):
            return
        if port == spec.port and _trap_kind(spec, host, path) is not None:
            pos = trap_pos[source] + 1 if source in trap_pos else 0
            if trap_limit is None or pos >= trap_limit:
                return
            trap_pos[url] = pos
        depth[url] = d
        queue.append(url)

    for url in start:
        visit(url, 0, None)
    while queue:
        url = queue.popleft()
        d = depth[url]
        at_limit = max_depth is not None and d >= max_depth
        page, hops, endless = _fetch(spec, url, want_page=not at_limit)
        if endless:
            depth.redirect_loops.add(url)
        elif hops:
            depth.redirects[url] = hops
        retried = _retry_statuses(spec, url)
        if retried:
            depth.retried[url] = retried
        if page is None or page.nofollow:
            continue
        for link in page.links:
            if link.target is not None and not link.nofollow:
                visit(link.target, d + 1, url)
    return depth


# --- generation -------------------------------------------------------------------------


def _host_index(spec: WebSpec, host: str) -> int | None:
    host = host.lower().rstrip(".")
    if not (host.startswith("site") and host.endswith(".test")):
        return None
    i = _strict_int(host[4:-5])
    return i if i is not None and i < spec.hosts else None


def _strict_int(s: str) -> int | None:
    # Only the canonical spelling counts, so /p/03 or /p/+3 are 404s, not aliases of /p/3.
    return int(s) if s.isascii() and s.isdigit() and str(int(s)) == s else None


def _parse_path(spec: WebSpec, path: str) -> tuple[str, int] | None:
    """(kind, number) for every path that exists on a known host; None means 404."""
    if path == "/":
        return "page", 0
    if path == "/robots.txt":
        return "robots", 0
    for prefix, suffix, kind, lowest in (
        ("/p/", "", "page", 1),
        (PRIVATE_PREFIX, "", "private", 0),
        ("/files/", ".pdf", "pdf", 0),
        ("/img/", ".png", "png", 0),
    ):
        if path.startswith(prefix) and path.endswith(suffix):
            n = _strict_int(path[len(prefix) : len(path) - len(suffix)])
            if n is not None and lowest <= n < spec.pages:
                return kind, n
    return None


@dataclass(frozen=True)
class _Base:
    """Where relative hrefs resolve from: the document URL or its <base href>."""

    host: str
    dir: str  # ends with "/"


def _page(spec: WebSpec, i: int, n: int) -> Page:
    host = f"site{i}.test"
    path = page_path(n)
    rng = random.Random(f"{spec.seed}:{host}:{n}")
    base_href, base = _choose_base(spec, rng, i, path)

    # Chain links come first in the plan (shuffled later): n -> n+1 keeps every page of the
    # host reachable from its root, root -> next host's root links the hosts together.
    targets: list[tuple[str, str, str]] = []  # (kind, host, path)
    if n + 1 < spec.pages:
        targets.append(("same", host, page_path(n + 1)))
    if n == 0 and spec.hosts > 1:
        targets.append(("cross", f"site{(i + 1) % spec.hosts}.test", "/"))
    kinds, weights = list(_KINDS), list(_KINDS.values())
    for _ in range(max(0, spec.links - len(targets))):
        kind = rng.choices(kinds, weights)[0]
        targets.append(_random_target(spec, rng, kind, i, n))
    rng.shuffle(targets)

    bare = base_href is None
    links = tuple(_make_link(spec, rng, host, base, bare, k, th, tp) for k, th, tp in targets)
    title = f"{host} page {n}"
    paragraphs = tuple(" ".join(rng.choices(_WORDS, k=12)) for _ in range(rng.randint(1, 3)))
    canonical = rng.random() < 0.5
    # Links that only opt-in knobs add go last, from their own Random, so the rest of the
    # page is the same with the knobs on or off.
    extra = _knob_links(spec, i, n)
    if extra:
        xrng = random.Random(f"{spec.seed}:{host}:{n}:extra")
        links += tuple(_make_link(spec, xrng, host, base, bare, k, host, p) for k, p in extra)
    return Page(
        url=spec.url(host, path),
        title=title,
        base_href=base_href,
        canonical=canonical,
        paragraphs=paragraphs,
        links=links,
    )


def _knob_links(spec: WebSpec, i: int, n: int) -> list[tuple[str, str]]:
    """(kind, path) of the links that ``robots`` / ``extras`` add to page n of host i."""
    host = f"site{i}.test"
    out: list[tuple[str, str]] = []
    if n % AGENT_LINK_EVERY == 0 and spec.robots_variant(host) == "agent":
        out.append(("agent-only", f"{AGENT_ONLY_PREFIX}{n}"))
    if n == 0:
        out += [("extra", p) for p in extra_paths(spec, host)]
    return out


def _private_page(spec: WebSpec, i: int, n: int) -> Page:
    # Private pages only point back into the public pages, so obeying robots.txt removes
    # exactly the /private/ URLs from the reachable set and nothing else.
    host = f"site{i}.test"
    path = f"{PRIVATE_PREFIX}{n}"
    base = _Base(host, PRIVATE_PREFIX)
    rng = random.Random(f"{spec.seed}:{host}:private:{n}")
    links = tuple(
        _make_link(spec, rng, host, base, True, "same", host, p)
        for p in dict.fromkeys(("/", page_path(n)))
    )
    return Page(
        url=spec.url(host, path),
        title=f"{host} private {n}",
        base_href=None,
        canonical=False,
        paragraphs=("Disallowed by robots.txt, served anyway: robots is advisory. Ünïcödé.",),
        links=links,
    )


# --- opt-in endpoints --------------------------------------------------------------------

# (kind, a, b): a special endpoint and its numbers (N; or year and month for the calendar).
_Special = tuple[str, int, int]
_SINGLE = frozenset(
    {"session", "nofollow-page", "relnofollow", "noindex-page", "canonical-alias"}
    | {"canonical-target"}
)
_NUMBERED = frozenset(
    {"redirect", "redirected", "redirect-loop", "redirect-out", "flaky", "ratelimited"}
    | {"broken", "only-via-nofollow", "only-via-relnofollow", "relnofollow-followed"}
    | {"only-via-noindex"}
)
_MONTHS = tuple(f"{m:02d}" for m in range(1, 13))
_DELAY = re.compile(r"[0-9]+(\.[0-9]+)?")


def _robots_variant(value: str) -> str:
    """``value`` if it names a robots.txt variant (see ROBOTS_VARIANTS), else ValueError."""
    name, sep, arg = value.strip().partition(":")
    if not sep and name in ("default", "agent", "sitemap"):
        return name
    if name == "delay" and _DELAY.fullmatch(arg):
        return f"delay:{arg}"
    code = _strict_int(arg) if name == "status" else None
    if code is not None and 400 <= code <= 599:
        return f"status:{code}"
    raise ValueError(
        f"unknown robots variant {value!r}; expected one of {', '.join(ROBOTS_VARIANTS)} "
        "(SECONDS a decimal number, CODE in 400..599)"
    )


def _robots(spec: WebSpec, host: str, headers: dict[str, str]) -> Response:
    name, _, arg = spec.robots_variant(host).partition(":")
    if name == "status":
        return int(arg), TEXT, f"robots.txt answers {arg} on purpose\n".encode(), headers
    body = ROBOTS_AGENT_TXT if name == "agent" else ROBOTS_TXT
    if name == "delay":
        body += f"Crawl-delay: {arg}\n"
    elif name == "sitemap":
        body += f"\nSitemap: {spec.url(host, SITEMAP_PATH)}\n"
    return 200, TEXT, body.encode(), headers


def _parse_special(spec: WebSpec, i: int, path: str) -> _Special | None:
    """The opt-in endpoint at ``path`` (for paths ``_parse_path`` does not know), or None."""
    variant = spec.robots_variant(f"site{i}.test")
    if variant == "sitemap" and path == SITEMAP_PATH:
        return "sitemap", 0, 0
    if variant == "agent" and path.startswith(AGENT_ONLY_PREFIX):
        n = _strict_int(path[len(AGENT_ONLY_PREFIX) :])
        return ("agent-only", n, 0) if n is not None and n < spec.pages else None
    if not spec.extras:
        return None
    first, *rest = path[1:].split("/")
    if not rest:
        return (first, 0, 0) if first in _SINGLE else None
    n = _strict_int(rest[0])
    if n is None:
        return None
    if first == "calendar":
        ok = len(rest) == 2 and n >= CALENDAR_START[0] and rest[1] in _MONTHS
        return ("calendar", n, int(rest[1])) if ok else None
    if len(rest) == 1:
        return (first, n, 0) if first in _NUMBERED else None
    if len(rest) == 2 and first == "redirect" and rest[1] in ("1", "2"):
        return "redirect", n, int(rest[1])
    if len(rest) == 2 and first == "redirected" and rest[1] == "landed":
        return "landed", n, 0
    return None


def _special_at(spec: WebSpec, host: str, path: str) -> tuple[int, _Special] | None:
    """(host index, endpoint) if ``path`` on ``host`` is an opt-in endpoint."""
    i = _host_index(spec, host)
    if i is None or _parse_path(spec, path) is not None:
        return None
    special = _parse_special(spec, i, path)
    return None if special is None else (i, special)


def _location(spec: WebSpec, i: int, special: _Special, query: str) -> str | None:
    """The Location header of a redirecting endpoint, None for the others."""
    kind, n, hop = special
    if kind == "redirect":
        # Three spellings of Location: root-relative, absolute, and dot-dot relative.
        if hop == 0:
            return f"/redirect/{n}/1"
        if hop == 1:
            return spec.url(f"site{i}.test", f"/redirect/{n}/2")
        return f"../../redirected/{n}"
    if kind == "redirect-loop":
        return f"/redirect-loop/{n}?i={(_query_int(query, 'i') or 0) + 1}"
    if kind == "redirect-out":
        return spec.url(f"site{(i + 1) % spec.hosts}.test", page_path(min(1, spec.pages - 1)))
    return None


def _render_special(spec: WebSpec, i: int, special: _Special, query: str, hit: int) -> Response:
    kind = special[0]
    headers = {"X-Testweb-Kind": kind}
    location = _location(spec, i, special, query)
    if location is not None:
        status = 301 if kind == "redirect" else 302
        body = f"<!DOCTYPE html><title>{status}</title><p>moved</p>\n"
        return status, HTML, body.encode(), {**headers, "Location": location}
    if kind == "sitemap":
        return 200, XML, _sitemap(spec, f"site{i}.test"), headers
    if kind == "broken":
        return 500, TEXT, b"internal server error, every time\n", headers
    if kind == "flaky" and hit <= FLAKY_FAILURES:
        return 503, TEXT, f"service unavailable (request {hit})\n".encode(), headers
    if kind == "ratelimited" and hit <= RATELIMITED_FAILURES:
        return 429, TEXT, b"too many requests\n", {**headers, "Retry-After": "1"}
    page = _special_page(spec, i, special, query)
    if page is None:  # pragma: no cover - every other endpoint is an HTML page
        raise AssertionError(f"no page for {special}")
    return 200, HTML, _page_html(page).encode(), headers


def _special_page(spec: WebSpec, i: int, special: _Special, query: str) -> Page | None:
    """The HTML page an opt-in endpoint serves (with status 200), None for the others."""
    kind, n, m = special
    host = f"site{i}.test"
    if kind in ("sitemap", "broken") or _location(spec, i, special, query) is not None:
        return None
    if kind == "agent-only":
        return _agent_only_page(spec, host, n)

    def link(path: str, rel: str | None = None, href: str | None = None) -> Link:
        return Link(href or path, spec.url(host, path), f"{kind} → {path}", rel)

    if kind == "calendar":
        path = f"/calendar/{n:04d}/{m:02d}"
        y, mo = (n, m + 1) if m < 12 else (n + 1, 1)
        nxt = link(f"/calendar/{y:04d}/{mo:02d}")
        return _plain_page(spec, host, path, "A crawler trap: next month, forever.", (nxt,))
    if kind == "session":
        sid = _query_value(query, "sid") or ""
        path = "/session" + (f"?{query}" if query else "")
        nxt = link(f"/session?sid={_session_token(spec, host, sid)}")
        return _plain_page(spec, host, path, "A crawler trap: a new session id, forever.", (nxt,))
    texts = {
        "redirected": "The end of a redirect chain; nothing links here.",
        "landed": "Linked relatively from a redirect target: resolve against the final URL.",
        "flaky": f"Served after {FLAKY_FAILURES} answers of 503.",
        "ratelimited": "Served after a 429 with Retry-After: 1.",
        "nofollow-page": 'meta robots "nofollow": do not follow the link below.',
        "relnofollow": 'One link with rel="nofollow" (skip it), one without (follow it).',
        "noindex-page": 'meta robots "noindex": still follow the link below.',
        "canonical-alias": "An alias: rel=canonical points to /canonical-target.",
        "canonical-target": "The canonical page of /canonical-alias.",
    }
    path = f"/{kind}/{n}" if kind in _NUMBERED else f"/{kind}"
    text = texts.get(kind, "Reachable only through one special link.")
    links: tuple[Link, ...] = ()
    meta: str | None = None
    canonical_href: str | None = None
    if kind == "landed":
        path = f"/redirected/{n}/landed"
    elif kind == "redirected":
        links = (link(f"/redirected/{n}/landed", href=f"{n}/landed"),)
    elif kind == "nofollow-page":
        meta, links = "nofollow", (link("/only-via-nofollow/1"),)
    elif kind == "relnofollow":
        links = (link("/only-via-relnofollow/1", "nofollow"), link("/relnofollow-followed/1"))
    elif kind == "noindex-page":
        meta, links = "noindex", (link("/only-via-noindex/1"),)
    elif kind == "canonical-alias":
        canonical_href = spec.url(host, "/canonical-target")
        links = (link("/canonical-target"),)
    page = _plain_page(spec, host, path, text, links, robots_meta=meta)
    if kind in ("canonical-alias", "canonical-target"):
        page = replace(page, canonical=True, canonical_href=canonical_href)
    return page


def _agent_only_page(spec: WebSpec, host: str, n: int) -> Page:
    # Like /private/: links back into the public pages only.
    rng = random.Random(f"{spec.seed}:{host}:agent-only:{n}")
    base = _Base(host, AGENT_ONLY_PREFIX)
    links = tuple(
        _make_link(spec, rng, host, base, True, "same", host, p)
        for p in dict.fromkeys(("/", page_path(n)))
    )
    text = f"Disallowed for {AGENT_TOKEN} only, served anyway."
    return _plain_page(spec, host, f"{AGENT_ONLY_PREFIX}{n}", text, links)


def _plain_page(
    spec: WebSpec,
    host: str,
    path: str,
    text: str,
    links: tuple[Link, ...],
    *,
    robots_meta: str | None = None,
) -> Page:
    return Page(
        url=spec.url(host, path),
        title=f"{host} {path}",
        base_href=None,
        canonical=False,
        paragraphs=(text,),
        links=links,
        robots_meta=robots_meta,
    )


def _sitemap(spec: WebSpec, host: str) -> bytes:
    """Lists the public HTML pages, all linked from the root anyway: nothing new to find."""
    locs = "".join(
        f"<url><loc>{html.escape(spec.url(host, page_path(n)))}</loc></url>\n"
        for n in range(spec.pages)
    )
    head = '<?xml version="1.0" encoding="UTF-8"?>\n'
    urlset = '<urlset xmlns="http://www.sitemaps.org/schemas/sitemap/0.9">\n'
    return (head + urlset + locs + "</urlset>\n").encode()


def _session_token(spec: WebSpec, host: str, sid: str) -> str:
    return hashlib.sha256(f"{spec.seed}:{host}:session:{sid}".encode()).hexdigest()[:16]


def _query_value(query: str, name: str) -> str | None:
    return next((v for k, v in parse_qsl(query, keep_blank_values=True) if k == name), None)


def _query_int(query: str, name: str) -> int | None:
    value = _query_value(query, name)
    return None if value is None else _strict_int(value)


def _trap_kind(spec: WebSpec, host: str, path: str) -> str | None:
    if not spec.extras:
        return None
    found = _special_at(spec, host, path)
    return found[1][0] if found is not None and found[1][0] in TRAP_KINDS else None


def _fetch(
    spec: WebSpec, url: str, *, want_page: bool = True
) -> tuple[Page | None, tuple[str, ...], bool]:
    """What fetching ``url`` yields: (final HTML page or None, redirect hops, endless?).

    ``want_page=False`` skips building the page (its links are not needed)."""
    hops: list[str] = []
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        host, port, path, query = _split_query(current)
        if port != spec.port:
            return None, tuple(hops), False
        found = _special_at(spec, host, path) if spec.extras else None
        location = None if found is None else _location(spec, *found, query)
        if location is None:
            page = html_page(spec, host, path, query) if want_page else None
            return page, tuple(hops), False
        current = canonical_url(urljoin(current, location))
        hops.append(current)
    return None, tuple(hops), True


def _retry_statuses(spec: WebSpec, url: str) -> tuple[int, ...]:
    if not spec.extras:
        return ()
    host, port, path, _ = _split_query(url)
    found = _special_at(spec, host, path) if port == spec.port else None
    kind = found[1][0] if found is not None else None
    if kind == "flaky":
        return (503,) * FLAKY_FAILURES
    if kind == "ratelimited":
        return (429,) * RATELIMITED_FAILURES
    return ()


def _choose_base(spec: WebSpec, rng: random.Random, i: int, path: str) -> tuple[str | None, _Base]:
    host = f"site{i}.test"
    doc_dir = path[: path.rfind("/") + 1]
    if rng.random() >= 0.15:
        return None, _Base(host, doc_dir)
    options: list[tuple[str, _Base]] = [
        ("/", _Base(host, "/")),
        (spec.url(host, "/p/"), _Base(host, "/p/")),
        ("/p/index.html", _Base(host, "/p/")),  # last segment is dropped when resolving
        ("/files/", _Base(host, "/files/")),
    ]
    if spec.hosts > 1:
        # A base on another host: relative hrefs now leave the site, a classic resolver trap.
        other = f"site{(i + 1 + rng.randrange(spec.hosts - 1)) % spec.hosts}.test"
        options.append(("//" + spec.url(other, "/p/").split("//", 1)[1], _Base(other, "/p/")))
    return rng.choice(options)


def _random_target(
    spec: WebSpec, rng: random.Random, kind: str, i: int, n: int
) -> tuple[str, str, str]:
    host = f"site{i}.test"
    k = rng.randrange(spec.pages)
    if kind == "cross" and spec.hosts > 1:
        other = f"site{(i + 1 + rng.randrange(spec.hosts - 1)) % spec.hosts}.test"
        return kind, other, page_path(k)
    paths = {
        "self": page_path(n),
        "pdf": f"/files/{k}.pdf",
        "png": f"/img/{k}.png",
        "missing": f"/missing/{k}",
        "private": f"{PRIVATE_PREFIX}{k}",
    }
    return ("same" if kind == "cross" else kind), host, paths.get(kind, page_path(k))


def _make_link(
    spec: WebSpec,
    rng: random.Random,
    doc_host: str,
    base: _Base,
    no_base_tag: bool,
    kind: str,
    host: str,
    path: str,
) -> Link:
    if kind == "mailto":
        return Link(f"mailto:webmaster@{doc_host}", None, "write to the webmaster ✉")
    if kind == "javascript":
        return Link("javascript:void(0)", None, "a script link")
    target = spec.url(host, path)
    if kind == "self":
        # A bare fragment resolves against the base URL, so only use it without a <base>.
        href = "#top" if no_base_tag else f"{target}#top"
        return Link(href, target, "this page, top")
    href = _href(spec, base, host, path, rng.choice(_STYLES), rng)
    if rng.random() < 0.2:
        href += f"#s{rng.randrange(10)}"
    return Link(href, target, f"{kind} {host}{path} →")


def _href(spec: WebSpec, base: _Base, host: str, path: str, style: str, rng: random.Random) -> str:
    """An href of the requested style that resolves from ``base`` to ``host`` + ``path``."""
    if host != base.host and style in ("relative", "dotdot", "rootrel"):
        style = "protorel" if style == "relative" else "absolute"
    if style == "absolute":
        return spec.url(host, path)
    if style == "protorel":
        return "//" + spec.url(host, path).split("//", 1)[1]
    if style == "rootrel":
        return path
    base_segs = base.dir.strip("/").split("/") if base.dir != "/" else []
    if style == "dotdot":
        # One ".." more than needed: resolvers must clamp at the root.
        return "../" * (len(base_segs) + 1) + path.lstrip("/")
    segs = path.lstrip("/").split("/")
    k = 0
    while k < len(base_segs) and k < len(segs) - 1 and base_segs[k] == segs[k]:
        k += 1
    rel = "../" * (len(base_segs) - k) + "/".join(segs[k:])
    if not rel:
        return "./"
    return "./" + rel if not rel.startswith(".") and rng.random() < 0.3 else rel


def _page_html(page: Page) -> str:
    e = html.escape
    head = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{e(page.title)}</title>",
    ]
    if page.base_href is not None:
        head.append(f'<base href="{e(page.base_href)}">')
    if page.robots_meta is not None:
        head.append(f'<meta name="robots" content="{e(page.robots_meta)}">')
    if page.canonical:
        head.append(f'<link rel="canonical" href="{e(page.canonical_href or page.url)}">')
    body = ["</head>", "<body>", f'<h1 id="top">{e(page.title)}</h1>']
    body += [f"<p>{e(p)}</p>" for p in page.paragraphs]
    body.append("<ul>")
    body += [
        f'<li><a{_rel(link)} href="{e(link.href)}">{e(link.text)}</a></li>' for link in page.links
    ]
    body += ["</ul>", "</body>", "</html>", ""]
    return "\n".join(head + body)


def _rel(link: Link) -> str:
    return "" if link.rel is None else f' rel="{html.escape(link.rel)}"'


def _pdf_bytes(host: str, n: int) -> bytes:
    # Not a renderable PDF, just the right magic and trailer: crawlers only need to skip it.
    return f"%PDF-1.4\n% crawlfleet testweb {host} file {n}\n%%EOF\n".encode()


def _png_bytes(seed: int, i: int, n: int) -> bytes:
    """A valid 1x1 RGB PNG whose colour depends on (seed, host, n)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rgb = bytes(((seed * 31 + i * 7 + n) * m) % 256 for m in (1, 3, 5))
    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" + rgb))
        + chunk(b"IEND", b"")
    )


def _split(url: str) -> tuple[str, int, str]:
    """(host, port, path) of a canonical URL."""
    return _split_query(url)[:3]


def _split_query(url: str) -> tuple[str, int, str, str]:
    """(host, port, path, query) of a canonical URL."""
    parts = urlsplit(url)
    port = 80 if parts.port is None else parts.port
    return parts.hostname or "", port, parts.path or "/", parts.query
