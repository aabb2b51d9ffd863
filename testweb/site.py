"""The synthetic web itself: deterministic pages and the crawl ground truth. Pure, no I/O.

Every response is a function of ``(spec, host, path)`` alone, and every page draws its
randomness from its own ``Random(f"{seed}:{host}:{page}")``, so any page can be rendered (or
its links listed) independently in O(links), and two processes always agree byte for byte.
"""

from __future__ import annotations

import html
import random
import struct
import zlib
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

HTML = "text/html; charset=utf-8"
TEXT = "text/plain; charset=utf-8"
PDF = "application/pdf"
PNG = "image/png"

ROBOTS_TXT = "User-agent: *\nDisallow: /private/\n"
PRIVATE_PREFIX = "/private/"

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

    @property
    def host_names(self) -> tuple[str, ...]:
        return tuple(f"site{i}.test" for i in range(self.hosts))

    @property
    def roots(self) -> list[str]:
        """The root URL of every host: the natural crawl seeds."""
        return [self.url(h, "/") for h in self.host_names]

    def has_host(self, host: str) -> bool:
        return _host_index(self, host) is not None

    def origin(self, host: str) -> str:
        return f"http://{host}" if self.port == 80 else f"http://{host}:{self.port}"

    def url(self, host: str, path: str) -> str:
        return self.origin(host) + path

    def delay_ms(self, host: str) -> float:
        """Total artificial latency for one request to ``host``."""
        return self.latency_ms + dict(self.slow_hosts).get(host.lower(), 0.0)


@dataclass(frozen=True)
class Link:
    href: str  # exactly as written in the HTML
    target: str | None  # canonical absolute URL it resolves to; None for mailto:/javascript:
    text: str


@dataclass(frozen=True)
class Page:
    """The model of one HTML page; render() serialises it, reachable() walks its links."""

    url: str
    title: str
    base_href: str | None
    canonical: bool
    paragraphs: tuple[str, ...]
    links: tuple[Link, ...]


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


def html_page(spec: WebSpec, host: str, path: str) -> Page | None:
    """The model of the HTML page at ``host`` + ``path``, or None if that is not an HTML page."""
    i = _host_index(spec, host)
    parsed = _parse_path(spec, path)
    if i is None or parsed is None or parsed[0] not in ("page", "private"):
        return None
    kind, n = parsed
    return _private_page(spec, i, n) if kind == "private" else _page(spec, i, n)


def render(spec: WebSpec, host: str, path: str) -> Response:
    """The complete response to ``GET path`` with ``Host: host``."""
    host = host.lower().rstrip(".")
    i = _host_index(spec, host)
    if i is None:
        return 404, TEXT, f"unknown host {host!r}\n".encode(), {"X-Testweb-Kind": "unknown-host"}
    parsed = _parse_path(spec, path)
    if parsed is None:
        body = f"<!DOCTYPE html><title>404</title><p>{html.escape(path)} not found</p>\n"
        return 404, HTML, body.encode(), {"X-Testweb-Kind": "missing"}
    kind, n = parsed
    headers = {"X-Testweb-Kind": kind}
    if kind == "robots":
        return 200, TEXT, ROBOTS_TXT.encode(), headers
    if kind == "pdf":
        return 200, PDF, _pdf_bytes(host, n), headers
    if kind == "png":
        return 200, PNG, _png_bytes(spec.seed, i, n), headers
    page = _private_page(spec, i, n) if kind == "private" else _page(spec, i, n)
    return 200, HTML, _page_html(page).encode(), headers


def reachable(
    spec: WebSpec,
    seeds: list[str],
    *,
    allowed_hosts: set[str] | None = None,
    obey_robots: bool = False,
    max_depth: int | None = None,
) -> dict[str, int]:
    """Ground truth: canonical URL -> BFS depth of everything a rule-following crawler fetches.

    Link targets come from the generator (not from re-resolving hrefs), fragments are dropped,
    mailto:/javascript: are skipped, only ``allowed_hosts`` (default: the seeds' hosts) are
    entered, ``/private/`` is skipped when ``obey_robots``, and only HTML pages have outlinks
    (PDFs, images and 404s are in the result because they get fetched). Seeds that break
    the host or robots rules are dropped like any other URL.
    """
    if spec.port == 0:
        raise ValueError("reachable() needs the spec's real port (spec.port is 0)")
    start = [canonical_url(s) for s in seeds]
    allowed = (
        {h.lower().rstrip(".") for h in allowed_hosts}
        if allowed_hosts is not None
        else {_split(u)[0] for u in start}
    )

    def admissible(url: str) -> bool:
        host, _, path = _split(url)
        return host in allowed and not (obey_robots and path.startswith(PRIVATE_PREFIX))

    depth: dict[str, int] = {}
    queue: deque[str] = deque()
    for url in start:
        if url not in depth and admissible(url):
            depth[url] = 0
            queue.append(url)
    while queue:
        url = queue.popleft()
        d = depth[url]
        if max_depth is not None and d >= max_depth:
            continue
        host, port, path = _split(url)
        page = html_page(spec, host, path) if port == spec.port else None
        for link in page.links if page else ():
            t = link.target
            if t is not None and t not in depth and admissible(t):
                depth[t] = d + 1
                queue.append(t)
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
    return Page(
        url=spec.url(host, path),
        title=title,
        base_href=base_href,
        canonical=rng.random() < 0.5,
        paragraphs=paragraphs,
        links=links,
    )


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
    if page.canonical:
        head.append(f'<link rel="canonical" href="{e(page.url)}">')
    body = ["</head>", "<body>", f'<h1 id="top">{e(page.title)}</h1>']
    body += [f"<p>{e(p)}</p>" for p in page.paragraphs]
    body.append("<ul>")
    body += [f'<li><a href="{e(link.href)}">{e(link.text)}</a></li>' for link in page.links]
    body += ["</ul>", "</body>", "</html>", ""]
    return "\n".join(head + body)


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
    parts = urlsplit(url)
    return parts.hostname or "", 80 if parts.port is None else parts.port, parts.path or "/"
