"""Turn a fetched HTML response into what the crawler needs: title, outlinks and directives.

Everything here is a pure function of (body bytes, Content-Type, URL): no I/O, no global state,
so the worker can call it on its hot path and tests can feed it handcrafted documents. The work
per page is bounded: at most ``max_links`` links are resolved (the rest are only counted), and
:func:`parse_page_async` takes a large body off the event loop.

Pipeline: :func:`decode_html` picks the encoding (BOM > header charset > ``<meta>`` > guess)
and rejects binary junk, then :func:`parse_html` does one Lexbor parse and one CSS query. With
``keep_text`` (CRAWLFLEET_TEXT) the same tree also gives the visible text and the language.
"""

from __future__ import annotations

import asyncio
import codecs
import itertools
import re
from dataclasses import dataclass

from selectolax.lexbor import LexborHTMLParser
from w3lib.encoding import (
    html_body_declared_encoding,
    http_content_type_encoding,
    read_bom,
    to_unicode,
)

from crawlfleet.common.urls import resolve, resolve_and_canonicalize

from .text import page_lang, visible_text

__all__ = [
    "BodyError",
    "ParsedPage",
    "decode_html",
    "is_html",
    "parse_html",
    "parse_page",
    "parse_page_async",
    "sniff_html",
]

TITLE_MAX_CHARS = 512
# Above this, parse_page_async parses in a worker thread: a few MB of HTML take tens of ms or
# more, which would stall every other fetch of the process on the event loop.
PARSE_IN_THREAD_BYTES = 256 * 1024
# Tree construction walks the stack of open elements, so Lexbor's time grows with the square of
# the nesting: 100,000 nested <div>s take it 35-90 s of CPU. Like Chromium's parser (512), the
# document is cut where it nests deeper than this; what came before, links included, is kept.
MAX_NESTING = 512
_NESTING_CHECK_CHARS = 64 * 1024  # below this, nesting cannot cost a second
_TAG_NAME = re.compile(r"<(/?[A-Za-z][A-Za-z0-9]*)")
# Elements that never nest: void ones, and those an HTML parser closes by itself when the next
# one starts (an old page's hundreds of unclosed <li> or <p> are not nesting).
_FLAT = frozenset({
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
    "track", "wbr", "param", "keygen", "p", "li", "dt", "dd", "tr", "td", "th", "option",
    "optgroup", "rb", "rt", "rp", "tbody", "thead", "tfoot", "colgroup", "caption", "html",
    "head", "body",
})
_SNIFF_BYTES = 1024

_HTML_MEDIA_TYPES = frozenset({"text/html", "application/xhtml+xml"})

# Formats that servers (or misconfigured proxies) deliver as text/html. A gzip signature usually
# means the body was compressed twice or Content-Encoding was lost on the way.
_BINARY_SIGNATURES: tuple[bytes, ...] = (
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"\xff\xd8\xff",  # JPEG
    b"RIFF",  # WebP, WAV, AVI
    b"%PDF-",
    b"\x1f\x8b",  # gzip
    b"PK\x03\x04",  # zip, docx, xlsx, epub
    b"\x28\xb5\x2f\xfd",  # zstd
    b"7z\xbc\xaf\x27\x1c",
    b"\x7fELF",
    b"wOFF",
    b"wOF2",
)
_WIDE_ENCODINGS = ("utf-16", "utf-32")  # the only ones whose ASCII text contains NUL bytes

# HTML's ASCII whitespace (no \v, unlike bytes.strip()), and the sniffed prefixes: each must be
# followed by a tag-terminating byte so "<header>" or "<htmlfoo>" does not count.
_WS = b"\t\n\x0c\r "
_SNIFF_PREFIXES = (b"<!doctype html", b"<html", b"<head", b"<body")
_TAG_END = frozenset(b" >\t\n\x0c\r/")

# One query, answered in document order, for everything parse_html reads. Filtering in the
# selector keeps the per-node Python work down to reading one or two attributes:
# - nofollow anchors never reach Python (rel is a token list, matched case-insensitively);
# - "title:not(svg *, math *)" skips an inline SVG's <title>, which is not the document title;
# - rel=canonical and name=robots are matched case-insensitively, as the values are.
_SELECTOR = (
    "title:not(svg *, math *),"
    "base[href],"
    "a[href]:not([rel~=nofollow i]),"
    "area[href]:not([rel~=nofollow i]),"
    "link[rel~=canonical i][href],"
    "meta[name=robots i][content]"
)
_TEXT_SELECTOR = _SELECTOR + ",meta[http-equiv=content-language i][content]"


@dataclass(frozen=True, slots=True)
class ParsedPage:
    title: str | None
    """``<title>`` text, whitespace-collapsed and capped at 512 chars; None if absent or blank."""
    links: list[str]
    """Canonical absolute http(s) outlinks, de-duplicated, in document order, self-links removed;
    at most ``max_links`` of them (the first ones)."""
    links_found: int
    """How many followable links the page has, :attr:`links` and those past ``max_links``. Past
    the cap they are counted cheaply, not resolved: distinct raw hrefs that are not fragment-only
    or of a non-http(s) scheme (so self-links and spelling variants there count too)."""
    canonical: str | None
    """``<link rel=canonical>`` resolved against :attr:`base_url` and canonicalised."""
    noindex: bool
    """``<meta name=robots>`` says noindex (or none)."""
    nofollow: bool
    """``<meta name=robots>`` says nofollow (or none); :attr:`links` are still returned."""
    base_url: str
    """What relative URLs were resolved against: a valid ``<base href>``, else the page URL."""
    encoding: str
    """Python codec name the body was decoded with; ``""`` from :func:`parse_html` (given str)."""
    text: str | None = None
    """With ``keep_text``: the visible text (no script, style, noscript, template, head ...),
    whitespace collapsed, at most ``TEXT_MAX_BYTES`` of UTF-8; else None."""
    lang: str | None = None
    """With ``keep_text``: the language tag, lower-case, of ``<html lang>``, else of ``<meta
    http-equiv=content-language>``, else of the Content-Language header; None if none is
    valid."""


class BodyError(Exception):
    """The body cannot be treated as an HTML document; :attr:`reason` is a short slug."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def is_html(content_type: str | None) -> bool:
    """True for text/html and application/xhtml+xml, parameters and case ignored.

    A missing or empty header gives False: the caller decides those by :func:`sniff_html`.
    """
    if not content_type:
        return False
    return content_type.partition(";")[0].strip().lower() in _HTML_MEDIA_TYPES


def sniff_html(body: bytes) -> bool:
    """Guess whether an untyped body is HTML from its first 1 KiB.

    After an optional BOM and whitespace (and any leading comments or ``<?xml ...?>``
    declaration, common on XHTML), the document must open with ``<!doctype html``, ``<html``,
    ``<head`` or ``<body``, case-insensitively.
    """
    chunk = body[:_SNIFF_BYTES]
    bom_encoding, bom = read_bom(chunk)
    if bom_encoding is not None and bom is not None:
        # A UTF-16/32 document spells its tags with NULs in between; bring them back to ASCII.
        chunk = chunk[len(bom) :].decode(bom_encoding, "ignore").encode("ascii", "replace")
    chunk = chunk.lstrip(_WS).lower()
    while True:
        if chunk.startswith(b"<!--"):
            closer = b"-->"
        elif chunk.startswith(b"<?xml"):
            closer = b"?>"
        else:
            break
        end = chunk.find(closer, 4)
        if end < 0:
            return False
        chunk = chunk[end + len(closer) :].lstrip(_WS)
    for prefix in _SNIFF_PREFIXES:
        if chunk.startswith(prefix):
            # Running off the end of the 1 KiB window after a prefix still counts.
            return len(chunk) == len(prefix) or chunk[len(prefix)] in _TAG_END
    return False


def decode_html(body: bytes, content_type: str | None) -> tuple[str, str]:
    """Decode an HTML body to text; returns ``(text, encoding)``.

    Precedence: BOM, the Content-Type charset,
    ``<meta charset>`` / ``<meta http-equiv=content-type>`` in the first 4 KiB, then a guess:
    UTF-8 if the bytes are valid UTF-8, else windows-1252. An unknown charset label is skipped
    as if absent, and undecodable bytes become U+FFFD, so this never raises UnicodeError.

    Raises :class:`BodyError` ``('binary')`` for a known binary signature or NUL bytes in the
    first 1 KiB of a body not declared UTF-16/32.
    """
    _reject_binary(body, content_type)
    # w3lib's html_to_unicode did this with auto_detect_fun, which w3lib 2.6 deprecates (it
    # guesses by the URL's top-level domain instead): built from its parts, decoded once.
    bom_encoding, bom = read_bom(body)
    if bom_encoding is not None and bom is not None:
        return to_unicode(body[len(bom) :], bom_encoding), bom_encoding
    encoding = (http_content_type_encoding(content_type)
                or html_body_declared_encoding(body) or _utf8_or_cp1252(body))
    if encoding.startswith(_WIDE_ENCODINGS):
        encoding = _wide_without_bom(content_type)
    return to_unicode(body, encoding), encoding


def parse_html(
    text: str, page_url: str, *, sort_query: bool = False, max_links: int | None = None,
    keep_text: bool = False, content_language: str | None = None,
) -> ParsedPage:
    """Extract title, outlinks, canonical and robots directives from decoded HTML.

    Links come from ``<a href>`` and ``<area href>``, minus rel=nofollow ones, resolved against
    the first ``<base href>`` (itself resolved against *page_url*; ignored unless http(s)) or
    *page_url*, canonicalised, de-duplicated in document order; non-http(s) targets and links to
    the page itself are dropped; ``max_links`` (None: no limit) caps how many are kept.
    ``encoding`` is ``""``: *text* arrived already decoded. ``keep_text`` fills ``text`` and
    ``lang`` (``content_language``: the response's header, the last resort for ``lang``).
    """
    return _parse(text, page_url, sort_query, "", max_links, keep_text, content_language)


def parse_page(
    body: bytes,
    content_type: str | None,
    page_url: str,
    *,
    sort_query: bool = False,
    max_links: int | None = None,
    keep_text: bool = False,
    content_language: str | None = None,
) -> ParsedPage:
    """:func:`decode_html` then :func:`parse_html`; may raise :class:`BodyError`."""
    text, encoding = decode_html(body, content_type)
    return _parse(text, page_url, sort_query, encoding, max_links, keep_text, content_language)


async def parse_page_async(
    body: bytes,
    content_type: str | None,
    page_url: str,
    *,
    sort_query: bool = False,
    max_links: int | None = None,
    keep_text: bool = False,
    content_language: str | None = None,
) -> ParsedPage:
    """:func:`parse_page`, in a worker thread when the body is over ``PARSE_IN_THREAD_BYTES``
    so a large page does not block the event loop; inline (cheaper) otherwise."""
    if len(body) > PARSE_IN_THREAD_BYTES:
        return await asyncio.to_thread(
            parse_page, body, content_type, page_url, sort_query=sort_query,
            max_links=max_links, keep_text=keep_text, content_language=content_language,
        )
    return parse_page(body, content_type, page_url, sort_query=sort_query, max_links=max_links,
                      keep_text=keep_text, content_language=content_language)


# A scheme, as the URL parser would see it after stripping leading whitespace.
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_HREF_WS = " \t\n\r\x0c"


def _may_be_followable(href: str) -> bool:
    """The cheap stand-in for resolving, for counting links past the cap: not empty, not
    fragment-only, no scheme other than http(s)."""
    href = href.strip(_HREF_WS)
    if not href or href[0] == "#":
        return False
    scheme = _SCHEME.match(href)
    return scheme is None or scheme.group().lower() in ("http:", "https:")


def cap_nesting(text: str, limit: int = MAX_NESTING) -> str:
    """``text`` cut just before the tag that opens element number ``limit + 1`` of one chain of
    nested elements (a rough count: every end tag closes one, elements in _FLAT never nest).
    Unchanged when it never nests that deep, which one findall over the tags decides."""
    if len(text) < _NESTING_CHECK_CHARS:
        return text
    too_deep = _too_deep_at(_TAG_NAME.findall(text), limit)
    if too_deep is None:
        return text
    # The same tag again, now with its offset (finditer is slower, so only on the rare page).
    match = next(itertools.islice(_TAG_NAME.finditer(text), too_deep, None))
    return text[:match.start()]


def _too_deep_at(tags: list[str], limit: int) -> int | None:
    """Index of the first tag that nests past ``limit``, or None."""
    depth = 0
    for i, tag in enumerate(tags):
        if tag[0] == "/":
            depth = depth - 1 if depth else 0
        elif tag.lower() not in _FLAT:
            depth += 1
            if depth > limit:
                return i
    return None


def _parse(
    text: str, page_url: str, sort_query: bool, encoding: str, max_links: int | None,
    keep_text: bool = False, content_language: str | None = None,
) -> ParsedPage:
    text = cap_nesting(text)
    title: str | None = None
    seen_title = False
    base_href: str | None = None
    canonical_href: str | None = None
    noindex = nofollow = False
    hrefs: list[str] = []
    meta_lang: str | None = None

    tree = LexborHTMLParser(text)
    for node in tree.css(_TEXT_SELECTOR if keep_text else _SELECTOR):
        tag = node.tag
        if tag == "a" or tag == "area":
            hrefs.append(node.attrs.sget("href"))
        elif tag == "title":
            # The document title is the first <title>, even if it is blank.
            if not seen_title:
                seen_title = True
                title = " ".join(node.text().split())[:TITLE_MAX_CHARS] or None
        elif tag == "meta":
            if keep_text and node.attrs.sget("http-equiv").lower() == "content-language":
                meta_lang = meta_lang or node.attrs.sget("content")
                continue
            # "noindex, nofollow" is the norm, but "noindex nofollow" is seen too.
            tokens = node.attrs.sget("content").lower().replace(",", " ").split()
            if "none" in tokens:
                noindex = nofollow = True
            else:
                noindex = noindex or "noindex" in tokens
                nofollow = nofollow or "nofollow" in tokens
        elif tag == "base":
            if base_href is None:
                base_href = node.attrs.sget("href")
        elif tag == "link" and canonical_href is None:
            canonical_href = node.attrs.sget("href")

    # The base applies to the whole document, also to links before it, hence resolve after the
    # walk. A data:/javascript: (or any non-http) base falls back to the page URL, as in HTML.
    base_url = page_url
    if base_href is not None:
        resolved_base = resolve(base_href, page_url)
        if resolved_base is not None and resolved_base.startswith(("http://", "https://")):
            base_url = resolved_base

    # Seeding `seen` with the page itself drops self-links ("", "#top", "?" variants that
    # canonicalise to it). Raw hrefs repeat a lot (navigation), so skip resolving repeats.
    seen: set[str] = set()
    self_url = resolve_and_canonicalize(page_url, page_url, sort_query=sort_query)
    if self_url is not None:
        seen.add(self_url)
    seen_raw: set[str] = set()
    links: list[str] = []
    cap = len(hrefs) if max_links is None else max(max_links, 0)
    rest = len(hrefs)
    for i, href in enumerate(hrefs):
        if len(links) >= cap:
            rest = i
            break
        if href in seen_raw:
            continue
        seen_raw.add(href)
        url = resolve_and_canonicalize(href, base_url, sort_query=sort_query)
        if url is not None and url not in seen:
            seen.add(url)
            links.append(url)
    # Past the cap, resolving (~3 µs a link) is the cost being bounded: count without it.
    uncounted = {h for h in hrefs[rest:] if h not in seen_raw}
    links_found = len(links) + sum(1 for h in uncounted if _may_be_followable(h))

    canonical = None
    if canonical_href is not None:
        canonical = resolve_and_canonicalize(canonical_href, base_url, sort_query=sort_query)

    page_text = lang = None
    if keep_text:
        lang = page_lang(tree, meta_lang, content_language)
        page_text = visible_text(tree)  # last: it takes the invisible parts out of the tree

    return ParsedPage(
        title=title,
        links=links,
        links_found=links_found,
        canonical=canonical,
        noindex=noindex,
        nofollow=nofollow,
        base_url=base_url,
        encoding=encoding,
        text=page_text,
        lang=lang,
    )


def _reject_binary(body: bytes, content_type: str | None) -> None:
    if body.startswith(_BINARY_SIGNATURES):
        raise BodyError("binary", f"signature {body[:8]!r}")
    if b"\x00" in body[:_SNIFF_BYTES]:
        # UTF-16/32 text is full of NULs; only a BOM or the header can say so (a <meta> in such a
        # body could not have been read, and HTML ignores one that claims UTF-16 anyway).
        declared = read_bom(body)[0] or http_content_type_encoding(content_type) or ""
        if not declared.startswith(_WIDE_ENCODINGS):
            raise BodyError("binary", "NUL byte in the first 1 KiB")


def _utf8_or_cp1252(body: bytes) -> str:
    """Guess for an undeclared body: UTF-8 if it is valid UTF-8, else windows-1252.

    Legacy pages that declare nothing are overwhelmingly windows-1252, and valid multi-byte UTF-8
    almost never occurs by accident in them. A final incomplete sequence is tolerated, as a body
    cut at the size limit can end mid-character.
    """
    if body.isascii():
        return "utf-8"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(body, final=False)
    except UnicodeDecodeError:
        return "cp1252"
    return "utf-8"


def _wide_without_bom(content_type: str | None) -> str:
    """The encoding of a BOM-less body declared UTF-16/32 (rare path).

    - Declared by ``<meta>`` only: the HTML standard says UTF-8, since a meta tag that could be
      read as ASCII proves the body is not UTF-16; decoding it as UTF-16 would turn every byte
      pair into a CJK character and lose all links.
    - A bare "utf-16" header label means UTF-16LE (WHATWG Encoding); a bare "utf-32" is read
      big-endian, as w3lib read both; a label with its byte order is taken as it is.
    """
    declared = http_content_type_encoding(content_type)
    if declared is None or not declared.startswith(_WIDE_ENCODINGS):
        return "utf-8"
    if declared == "utf-16":
        return "utf-16-le"
    if declared == "utf-32":
        return "utf-32-be"
    return declared
