"""Tests for crawlfleet.workers.parse: small handcrafted documents, one rule per test."""

from __future__ import annotations

import asyncio
import gzip
import itertools
import threading
import time
import warnings

import pytest

from crawlfleet.common.urls import resolve_and_canonicalize
from crawlfleet.workers import parse as parse_module
from crawlfleet.workers.parse import (
    MAX_NESTING,
    PARSE_IN_THREAD_BYTES,
    BodyError,
    ParsedPage,
    cap_nesting,
    decode_html,
    is_html,
    parse_html,
    parse_page,
    parse_page_async,
    sniff_html,
)

PAGE = "https://example.com/dir/page.html"


def parse(body_html: str, url: str = PAGE, *, sort_query: bool = False) -> ParsedPage:
    """Parse a fragment as a page body (<base>, <link> and <meta> are honoured anywhere)."""
    document = f"<!doctype html><html><head></head><body>{body_html}</body></html>"
    return parse_html(document, url, sort_query=sort_query)


def links(body_html: str, url: str = PAGE) -> list[str]:
    return parse(body_html, url).links


def title_of(head_html: str) -> str | None:
    return parse_html(f"<html><head>{head_html}</head><body></body></html>", PAGE).title


# --- title -------------------------------------------------------------------------------------


def test_title_present_is_stripped_and_collapsed() -> None:
    assert title_of("<title>\n  Hello \t  wide\n world  </title>") == "Hello wide world"


def test_title_absent_is_none() -> None:
    assert title_of('<meta charset="utf-8">') is None


@pytest.mark.parametrize("raw", ["<title></title>", "<title>   \n\t </title>"])
def test_title_empty_or_whitespace_is_none(raw: str) -> None:
    assert title_of(raw) is None


def test_title_entities_are_decoded() -> None:
    assert title_of("<title>Fish &amp; Chips &lt;3 &quot;caf&eacute;&quot; &#8212;</title>") == (
        'Fish & Chips <3 "café" \u2014'
    )


def test_title_non_ascii_kept() -> None:
    assert title_of("<title>Ünïcødé — 東京 ⚡</title>") == "Ünïcødé — 東京 ⚡"


def test_title_capped_at_512_chars() -> None:
    title = title_of(f"<title>{'x' * 600}</title>")
    assert title is not None
    assert len(title) == 512


def test_title_first_one_wins_and_svg_title_is_not_the_document_title() -> None:
    html = "<svg><title>icon</title></svg><title>Real</title><title>Second</title>"
    assert parse(html).title == "Real"
    assert parse("<svg><title>icon</title></svg>").title is None


# --- links -------------------------------------------------------------------------------------


def test_relative_links_resolve_against_page_url() -> None:
    assert links('<a href="other.html">a</a><a href="/root">b</a><a href="sub/x?q=1">c</a>') == [
        "https://example.com/dir/other.html",
        "https://example.com/root",
        "https://example.com/dir/sub/x?q=1",
    ]


def test_absolute_protocol_relative_and_dotdot_links() -> None:
    html = (
        '<a href="http://Other.EXAMPLE.org:80/a">abs</a>'
        '<a href="//cdn.example.net/lib">proto-relative</a>'
        '<a href="../up/./x">dotdot</a>'
    )
    assert links(html) == [
        "http://other.example.org/a",
        "https://cdn.example.net/lib",
        "https://example.com/up/x",
    ]


def test_area_links_are_included() -> None:
    html = '<map name="m"><area href="/map-target" shape="rect"><area nohref></map>'
    assert links(html) == ["https://example.com/map-target"]


def test_duplicates_removed_first_occurrence_order_kept() -> None:
    html = (
        '<a href="/b">1</a><a href="/a">2</a><a href="/b">3</a>'
        '<a href=" /a ">4</a><a href="/c">5</a>'
    )
    assert links(html) == [
        "https://example.com/b",
        "https://example.com/a",
        "https://example.com/c",
    ]


def test_fragments_dropped_and_merge_duplicates() -> None:
    html = '<a href="/x#one">1</a><a href="/x#two">2</a><a href="/y#z">3</a>'
    assert links(html) == ["https://example.com/x", "https://example.com/y"]


def test_self_links_dropped() -> None:
    page = "https://example.com/dir/page.html?x=1#section"
    html = (
        '<a href="#top">top</a><a href="">empty</a><a href="?x=1">same query</a>'
        '<a href="page.html?x=1#other">same</a><a href="https://EXAMPLE.com/dir/page.html?x=1">abs</a>'
        '<a href="page.html">different query</a>'
    )
    assert links(html, page) == ["https://example.com/dir/page.html"]


def test_nofollow_anchors_dropped_rel_is_a_case_insensitive_token_list() -> None:
    html = (
        '<a href="/dropped1" rel="nofollow">a</a>'
        '<a href="/dropped2" rel="noopener NoFollow ugc">b</a>'
        '<area href="/dropped3" rel="NOFOLLOW">'
        '<a href="/kept1" rel="nofollowing">c</a>'
        '<a href="/kept2" rel="noopener">d</a>'
    )
    assert links(html) == ["https://example.com/kept1", "https://example.com/kept2"]


def test_nofollow_anchor_does_not_hide_a_followed_link_to_the_same_url() -> None:
    html = '<a href="/x" rel="nofollow">ad</a><a href="/y">y</a><a href="/x">editorial</a>'
    assert links(html) == ["https://example.com/y", "https://example.com/x"]


def test_non_http_schemes_ignored() -> None:
    html = (
        '<a href="javascript:void(0)">js</a><a href="JavaScript:alert(1)">js2</a>'
        '<a href="mailto:someone@example.com">mail</a><a href="tel:+123">tel</a>'
        '<a href="data:text/html,hi">data</a><a href="ftp://example.com/f">ftp</a>'
        '<a href="/real">real</a>'
    )
    assert links(html) == ["https://example.com/real"]


def test_anchors_without_href_and_non_link_elements_ignored() -> None:
    html = (
        '<a name="anchor">no href</a><link rel="stylesheet" href="/style.css">'
        '<img src="/img.png"><script src="/app.js"></script><a href="/only">x</a>'
    )
    assert links(html) == ["https://example.com/only"]


def test_sort_query_applies_to_links_self_check_and_canonical() -> None:
    page = "https://example.com/p?b=2&a=1"
    html = (
        '<link rel="canonical" href="/c?z=1&amp;y=2">'
        '<a href="/p?a=1&amp;b=2">self</a><a href="/q?z=1&amp;y=2">q</a>'
    )
    unsorted = parse(html, page)
    assert unsorted.links == ["https://example.com/p?a=1&b=2", "https://example.com/q?z=1&y=2"]
    sorted_ = parse(html, page, sort_query=True)
    assert sorted_.links == ["https://example.com/q?y=2&z=1"]
    assert sorted_.canonical == "https://example.com/c?y=2&z=1"


# --- <base href> -------------------------------------------------------------------------------


def test_relative_base_resolved_against_page_url() -> None:
    page = parse_html(
        '<head><base href="../assets/"></head><body><a href="x">x</a></body>',
        "https://example.com/a/b/page.html",
    )
    assert page.base_url == "https://example.com/a/assets/"
    assert page.links == ["https://example.com/a/assets/x"]


def test_absolute_base() -> None:
    page = parse_html(
        '<head><base href="https://cdn.example.org/root/"></head>'
        '<body><a href="x">rel</a><a href="/y">root</a></body>',
        PAGE,
    )
    assert page.base_url == "https://cdn.example.org/root/"
    assert page.links == ["https://cdn.example.org/root/x", "https://cdn.example.org/y"]


def test_first_base_with_href_wins() -> None:
    page = parse_html(
        '<head><base href="/first/"><base href="/second/"></head><body><a href="x">x</a></body>',
        PAGE,
    )
    assert page.base_url == "https://example.com/first/"
    assert page.links == ["https://example.com/first/x"]


def test_base_without_href_is_ignored() -> None:
    page = parse_html(
        '<head><base target="_blank"><base href="/b/"></head><body><a href="x">x</a></body>', PAGE
    )
    assert page.base_url == "https://example.com/b/"
    assert parse('<base target="_blank"><a href="x">x</a>').base_url == PAGE


def test_no_base_means_page_url() -> None:
    assert parse('<a href="x">x</a>').base_url == PAGE


def test_base_applies_to_links_before_it() -> None:
    # The document base URL is a property of the whole document, not of what follows <base>.
    assert links('<a href="x">x</a><base href="/late/">') == ["https://example.com/late/x"]


def test_non_http_base_falls_back_to_page_url() -> None:
    page = parse('<base href="javascript:alert(1)"><a href="x">x</a>')
    assert page.base_url == PAGE
    assert page.links == ["https://example.com/dir/x"]


def test_fragment_link_follows_base_so_it_is_not_a_self_link() -> None:
    assert links('<base href="https://other.example/"><a href="#frag">f</a>') == [
        "https://other.example/"
    ]


# --- canonical ---------------------------------------------------------------------------------


def test_canonical_resolved_and_canonicalised() -> None:
    page = parse_html(
        '<head><link rel="canonical" href="/Canon/../canon?id=1#frag"></head><body></body>', PAGE
    )
    assert page.canonical == "https://example.com/canon?id=1"


def test_canonical_absent_or_unresolvable_is_none() -> None:
    assert parse('<link rel="alternate" href="/alt">').canonical is None
    assert parse('<link rel="canonical" href="javascript:void(0)">').canonical is None
    assert parse('<link rel="canonical">').canonical is None


def test_canonical_rel_token_case_insensitive_and_first_wins() -> None:
    html = '<link rel="Canonical" href="/one"><link rel="canonical" href="/two">'
    assert parse(html).canonical == "https://example.com/one"


def test_canonical_resolved_against_base_and_not_an_outlink() -> None:
    page = parse('<base href="https://b.example/x/"><link rel="canonical" href="c">')
    assert page.canonical == "https://b.example/x/c"
    assert page.links == []


# --- meta robots -------------------------------------------------------------------------------


def robots(meta_html: str) -> tuple[bool, bool]:
    page = parse_html(f"<head>{meta_html}</head><body><a href='/l'>l</a></body>", PAGE)
    return page.noindex, page.nofollow


def test_meta_robots_absent_or_permissive() -> None:
    assert robots("") == (False, False)
    assert robots('<meta name="robots" content="index, follow">') == (False, False)


def test_meta_robots_noindex() -> None:
    assert robots('<meta name="robots" content="noindex">') == (True, False)


def test_meta_robots_nofollow_still_returns_links() -> None:
    page = parse_html(
        '<head><meta name="robots" content="nofollow"></head><body><a href="/l">l</a></body>', PAGE
    )
    assert (page.noindex, page.nofollow) == (False, True)
    assert page.links == ["https://example.com/l"]


def test_meta_robots_none_means_both() -> None:
    assert robots('<meta name="robots" content="none">') == (True, True)


def test_meta_robots_case_insensitive_name_and_content() -> None:
    assert robots('<meta name="ROBOTS" content="NoIndex, NOFOLLOW">') == (True, True)


def test_meta_robots_space_separated_tokens_and_other_directives() -> None:
    assert robots('<meta name="robots" content="max-snippet:50 noindex">') == (True, False)


def test_multiple_robots_metas_combine() -> None:
    html = '<meta name="robots" content="noindex"><meta name="robots" content="nofollow">'
    assert robots(html) == (True, True)


def test_meta_for_other_names_ignored() -> None:
    html = '<meta name="googlebot" content="noindex"><meta name="description" content="nofollow">'
    assert robots(html) == (False, False)


# --- decoding ----------------------------------------------------------------------------------


def test_plain_utf8_by_header() -> None:
    text, encoding = decode_html("<title>Grüße</title>".encode(), "text/html; charset=UTF-8")
    assert (text, encoding) == ("<title>Grüße</title>", "utf-8")


@pytest.mark.parametrize(
    ("body", "content_type", "expected"),
    [
        ("<title>Grüße</title>".encode(), "text/html; charset=UTF-8", "utf-8"),
        (b"\xef\xbb\xbf<title>x</title>", None, "utf-8"),
        (b'<meta charset="shift_jis"><title>x</title>', "text/html", "cp932"),
        (b"<title>caf\xe9</title>", "text/html", "cp1252"),
        ("<title>café</title>".encode(), None, "utf-8"),
        (b"<title>x</title>", "text/html; charset=no-such-label", "utf-8"),
    ],
)
def test_decoding_uses_no_deprecated_w3lib_api(
    body: bytes, content_type: str | None, expected: str
) -> None:
    # w3lib 2.6 deprecates html_to_unicode's default_encoding and auto_detect_fun, which the
    # decoder used; a release without them would fail every page. Its parts are used instead.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_html(body, content_type)[1] == expected


def test_utf8_bom_wins_over_header_and_is_stripped() -> None:
    body = b"\xef\xbb\xbf" + "<title>naïve</title>".encode()
    text, encoding = decode_html(body, "text/html; charset=iso-8859-1")
    assert encoding == "utf-8"
    assert text == "<title>naïve</title>"


@pytest.mark.parametrize("codec", ["utf-16-le", "utf-16-be"])
def test_utf16_bom(codec: str) -> None:
    body = "\ufeff<title>Ω wide</title><a href='/w'>w</a>".encode(codec)
    page = parse_page(body, "text/html", PAGE)
    assert page.encoding == codec
    assert page.title == "Ω wide"
    assert page.links == ["https://example.com/w"]


def test_header_latin1_decodes_body_bytes_as_windows_1252() -> None:
    # WHATWG maps the latin-1 labels to windows-1252, so 0x93/0x94 are curly quotes, not C1.
    body = b"<title>\xe9t\xe9 \x93quoted\x94</title>"
    text, encoding = decode_html(body, "text/html; charset=ISO-8859-1")
    assert encoding == "cp1252"
    assert text == "<title>été “quoted”</title>"


def test_header_charset_beats_meta_charset() -> None:
    body = b'<meta charset="utf-8"><title>caf\xe9</title>'
    assert decode_html(body, "text/html; charset=latin-1")[0].endswith("<title>café</title>")


def test_meta_charset_shift_jis() -> None:
    # "①" exists in Windows-31J only; WHATWG (and w3lib) treat the Shift_JIS label as that.
    body = '<meta charset="shift_jis"><title>日本語①</title>'.encode("cp932")
    page = parse_page(body, "text/html", PAGE)
    assert page.encoding == "cp932"
    assert page.title == "日本語①"


def test_meta_http_equiv_content_type() -> None:
    body = (
        b'<meta http-equiv="Content-Type" content="text/html; charset=iso-8859-2">'
        b"<title>\xb1\xe6</title>"
    )
    text, encoding = decode_html(body, None)
    assert encoding == "iso8859-2"
    assert "<title>ąć</title>" in text


def test_unknown_charset_label_in_header_is_ignored_not_raised() -> None:
    body = b'<meta charset="windows-1252"><title>caf\xe9</title>'
    text, encoding = decode_html(body, "text/html; charset=utf-99")
    assert encoding == "cp1252"  # fell through to the <meta>
    assert "café" in text


def test_unknown_charset_labels_everywhere_fall_back_to_a_guess() -> None:
    body = '<meta charset="x-bogus"><title>Grüße</title>'.encode()
    text, encoding = decode_html(body, "text/html; charset=utf-99")
    assert encoding == "utf-8"
    assert "Grüße" in text


def test_invalid_utf8_bytes_become_replacement_characters() -> None:
    body = b"<title>a\xffb\xc3</title>"
    text, encoding = decode_html(body, "text/html; charset=utf-8")
    assert encoding == "utf-8"
    assert text == "<title>a\ufffdb\ufffd</title>"


def test_undeclared_non_utf8_bytes_guessed_as_windows_1252() -> None:
    text, encoding = decode_html(b"<title>caf\xe9 \x80</title>", "text/html")
    assert (text, encoding) == ("<title>café €</title>", "cp1252")


def test_undeclared_utf8_cut_mid_character_still_utf8() -> None:
    body = "<title>é</title><p>…".encode()[:-1]  # a size-capped body ending mid-sequence
    text, encoding = decode_html(body, None)
    assert encoding == "utf-8"
    assert text.startswith("<title>é</title>")
    assert text.endswith("\ufffd")


def test_meta_claiming_utf16_on_ascii_body_decodes_as_utf8() -> None:
    # A <meta> readable as ASCII proves the body is not UTF-16 (HTML standard: use UTF-8).
    body = '<meta charset="utf-16"><title>plain é</title>'.encode()
    page = parse_page(body, "text/html", PAGE)
    assert page.encoding == "utf-8"
    assert page.title == "plain é"


def test_header_utf16_without_bom_is_little_endian() -> None:
    body = "<title>wide</title>".encode("utf-16-le")
    text, encoding = decode_html(body, "text/html; charset=utf-16")
    assert (text, encoding) == ("<title>wide</title>", "utf-16-le")


def test_parse_page_reports_encoding_parse_html_does_not() -> None:
    body = "<title>é</title>".encode("cp1252")
    assert parse_page(body, "text/html; charset=windows-1252", PAGE).encoding == "cp1252"
    assert parse_html("<title>é</title>", PAGE).encoding == ""


def test_empty_body() -> None:
    page = parse_page(b"", "text/html", PAGE)
    assert (page.title, page.links, page.canonical) == (None, [], None)


# --- binary served as HTML ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
        b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n",
        gzip.compress(b"<html><title>double-compressed</title></html>"),
        b"GIF89a\x01\x00\x01\x00",
        b"\xff\xd8\xff\xe0\x00\x10JFIF",
        b"PK\x03\x04\x14\x00",
    ],
    ids=["png", "pdf", "gzip", "gif", "jpeg", "zip"],
)
def test_binary_signatures_rejected(body: bytes) -> None:
    with pytest.raises(BodyError) as excinfo:
        parse_page(body, "text/html", PAGE)
    assert excinfo.value.reason == "binary"


def test_nul_bytes_in_first_kib_rejected() -> None:
    with pytest.raises(BodyError) as excinfo:
        decode_html(b"<html>\x00\x01\x02\x03 garbage", "text/html; charset=utf-8")
    assert excinfo.value.reason == "binary"


def test_nul_bytes_after_first_kib_tolerated() -> None:
    body = b"<html><title>ok</title>" + b" " * 2000 + b"\x00"
    assert decode_html(body, "text/html")[1] == "utf-8"


def test_utf16_nul_bytes_are_not_binary() -> None:
    with_bom = "\ufeff<title>x</title>".encode("utf-16-le")
    declared = "<title>x</title>".encode("utf-16-be")
    assert decode_html(with_bom, "text/html")[0] == "<title>x</title>"
    assert decode_html(declared, "text/html; charset=UTF-16BE")[0] == "<title>x</title>"


# --- content type and sniffing ----------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/html",
        "text/html; charset=utf-8",
        "TEXT/HTML;CHARSET=UTF-8",
        " text/html ; charset=utf-8",
        "application/xhtml+xml",
        "Application/XHTML+XML; charset=utf-8",
    ],
)
def test_is_html_true(content_type: str) -> None:
    assert is_html(content_type)


@pytest.mark.parametrize(
    "content_type",
    [None, "", "text/plain", "application/json", "text/htmlx", "image/png", "text/xml"],
)
def test_is_html_false(content_type: str | None) -> None:
    assert not is_html(content_type)


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html><head>",
        b"<!doctype HTML>",
        b"<html lang='en'>",
        b"<HEAD><title>x",
        b"<body>",
        b"\xef\xbb\xbf \r\n\t<html>",
        b"<!-- generated --><!DOCTYPE html>",
        b'<?xml version="1.0"?>\n<html xmlns="http://www.w3.org/1999/xhtml">',
        "\ufeff<!doctype html>".encode("utf-16-le"),
        b"<html",
    ],
)
def test_sniff_html_true(body: bytes) -> None:
    assert sniff_html(body)


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"plain text <html>",
        b'{"json": "<html>"}',
        b"<header>not a document start</header>",
        b"<htmlfoo>",
        b"<?xml version='1.0'?><rss>",
        b"\x89PNG\r\n\x1a\n",
        b"<!-- never closed <html>",
        b" " * 1024 + b"<html>",
    ],
)
def test_sniff_html_false(body: bytes) -> None:
    assert not sniff_html(body)


# --- bounded work per page ---------------------------------------------------------------------


def _many_links(n: int) -> bytes:
    anchors = "".join(f'<a href="/p/{i}">{i}</a>' for i in range(n))
    return f"<!doctype html><html><body>{anchors}</body></html>".encode()


def test_links_are_capped_and_all_are_counted() -> None:
    body = _many_links(200_000)
    page = parse_page(body, "text/html", PAGE, max_links=5000)
    assert len(page.links) == 5000
    assert page.links[0] == "https://example.com/p/0"
    assert page.links[-1] == "https://example.com/p/4999"  # the first ones, in document order
    assert page.links_found == 200_000


def test_links_past_the_cap_are_not_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0
    real = resolve_and_canonicalize

    def counting(*args: object, **kwargs: object) -> str | None:
        nonlocal calls
        calls += 1
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(parse_module, "resolve_and_canonicalize", counting)
    page = parse_page(_many_links(10_000), "text/html", PAGE, max_links=100)
    assert page.links_found == 10_000
    assert calls <= 100 + 1  # the kept links, plus the page URL itself (for self-links)


def test_links_found_follows_the_same_rules_as_links() -> None:
    html = (
        '<a href="/a">a</a><a href="/a">dup</a><a href="#top">frag</a>'
        '<a href="mailto:x@example.com">m</a><a href=" JavaScript:void(0)">js</a>'
        '<a href="/b" rel="nofollow">nf</a><a href="/c">c</a><a href="HTTP://other.org/">o</a>'
        '<a href="data:text/html,x">d</a><a href="/c">dup past the cap</a>'
    )
    uncapped = parse(html)
    assert uncapped.links == [
        "https://example.com/a", "https://example.com/c", "http://other.org/",
    ]
    assert uncapped.links_found == 3
    for cap in (0, 1, 2, 3, 10):
        capped = parse_html(
            f"<html><body>{html}</body></html>", PAGE, max_links=cap
        )
        assert capped.links == uncapped.links[:cap]
        assert capped.links_found == 3, cap


def test_no_cap_by_default() -> None:
    page = parse_page(_many_links(6000), "text/html", PAGE)
    assert len(page.links) == page.links_found == 6000


async def test_parse_page_async_small_body_runs_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real = parse_module.parse_page

    def recording(*args: object, **kwargs: object) -> ParsedPage:
        threads.append(threading.get_ident())
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(parse_module, "parse_page", recording)
    small = _many_links(10)
    assert len(small) <= PARSE_IN_THREAD_BYTES
    page = await parse_page_async(small, "text/html", PAGE, max_links=5)
    assert len(page.links) == 5 and page.links_found == 10
    assert threads == [threading.get_ident()]
    big = _many_links(20_000)
    assert len(big) > PARSE_IN_THREAD_BYTES
    await parse_page_async(big, "text/html", PAGE, max_links=5)
    assert threads[1] != threading.get_ident()


async def test_parse_page_async_of_a_big_body_leaves_the_loop_running() -> None:
    body = _many_links(200_000)  # ~5.8 MB
    ticks: list[float] = []
    parsing = True

    async def ticker() -> None:
        while parsing:
            ticks.append(time.perf_counter())
            await asyncio.sleep(0)  # a yield, not a wait

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    started = time.perf_counter()
    page = await parse_page_async(body, "text/html", PAGE, max_links=5000)
    took = time.perf_counter() - started
    parsing = False
    await task
    assert len(page.links) == 5000 and page.links_found == 200_000
    during = [t for t in ticks if started <= t <= started + took]
    gaps = [b - a for a, b in itertools.pairwise(during)]
    # Parsed inline, the loop would stall for the whole parse: no ticks, one gap of `took`.
    assert len(during) > 100
    assert max(gaps) < took / 2, (max(gaps), took)


def test_a_page_nested_100000_deep_is_cut_where_it_nests_past_the_limit() -> None:
    """Lexbor's tree construction is quadratic in the nesting (100,000 <div>s: tens of seconds
    of CPU); the part before the cut is kept, links included."""
    body = (b"<html><head><title>deep</title></head><body><a href='/before'>b</a>"
            + b"<div>" * 100_000 + b"<a href='/bottom'>x</a>" + b"</div>" * 100_000
            + b"</body></html>")
    page = parse_page(body, "text/html", "http://a.test/deep")
    assert page.title == "deep"
    assert page.links == ["http://a.test/before"]


def test_unclosed_list_items_and_paragraphs_are_not_nesting() -> None:
    rows = "".join(f"<li><p>item {i} <a href='/i{i}'>x</a><br>" for i in range(3000))
    text = f"<html><body><ul>{rows}</ul></body></html>"
    assert len(text) > 64 * 1024
    assert cap_nesting(text) == text
    page = parse_page(text.encode(), "text/html", "http://a.test/")
    assert len(page.links) == 3000


def test_nesting_just_under_the_limit_is_kept_whole() -> None:
    text = "<html><body>" + "<div>" * MAX_NESTING + "x" * 70_000 + "</div>" * MAX_NESTING
    assert cap_nesting(text) == text
    deeper = "<html><body>" + "<span>" * (MAX_NESTING + 1) + "x" * 70_000
    assert cap_nesting(deeper) == "<html><body>" + "<span>" * MAX_NESTING
