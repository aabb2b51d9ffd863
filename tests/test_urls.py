"""Tests for crawlfleet.common.urls: WHATWG conformance of resolve() and the canonical form."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from crawlfleet.common.urls import (
    URLError,
    canonicalize,
    fingerprint,
    host_key,
    resolve,
    resolve_and_canonicalize,
)

# The web-platform-tests data lives in the shared/ folder beside the repository.
URLTESTDATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "urltestdata.json"
MISSING_DATA = f"WHATWG conformance data not found at {URLTESTDATA}"


def _load_cases() -> list[dict[str, Any]]:
    if not URLTESTDATA.is_file():
        return []
    entries = json.loads(URLTESTDATA.read_text(encoding="utf-8"))
    # String entries are comments.
    return [e for e in entries if isinstance(e, dict)]


CASES = _load_cases()


def _is_http(url: str | None) -> bool:
    return url is not None and url.split(":", 1)[0].lower() in ("http", "https")


def _case_id(index: int, case: dict[str, Any]) -> str:
    # Indices keep ids unique: a few inputs occur more than once with different bases.
    return f"{index}: {case['input']!r} against {case['base']!r}"


def _params(cases: list[tuple[int, dict[str, Any]]]) -> list[Any]:
    if not CASES:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING_DATA), id="no-data")]
    return [pytest.param(case, id=_case_id(i, case)) for i, case in cases]


HTTP_BASE_CASES = _params([(i, c) for i, c in enumerate(CASES) if _is_http(c["base"])])
# Every successful case (any base) whose result is an http(s) URL: inputs for property tests.
HTTP_RESULT_CASES = _params(
    [(i, c) for i, c in enumerate(CASES) if not c.get("failure") and _is_http(c["href"])]
)


# --- WHATWG conformance ------------------------------------------------------------------------


def test_conformance_data_has_http_base_cases() -> None:
    if not CASES:
        pytest.skip(MISSING_DATA)
    assert len(HTTP_BASE_CASES) > 100


@pytest.mark.parametrize("case", HTTP_BASE_CASES)
def test_resolve_matches_whatwg(case: dict[str, Any]) -> None:
    expected = None if case.get("failure") else case["href"]
    assert resolve(case["input"], case["base"]) == expected


# --- properties over the conformance URLs ------------------------------------------------------


@pytest.mark.parametrize("case", HTTP_RESULT_CASES)
def test_canonicalize_is_idempotent_on_conformance_urls(case: dict[str, Any]) -> None:
    once = canonicalize(case["href"])
    assert canonicalize(once) == once
    sorted_once = canonicalize(case["href"], sort_query=True)
    assert canonicalize(sorted_once, sort_query=True) == sorted_once


@pytest.mark.parametrize("case", HTTP_RESULT_CASES)
def test_canonical_form_drops_fragment_and_userinfo(case: dict[str, Any]) -> None:
    canonical = canonicalize(case["href"])
    scheme = case["protocol"]
    host = case["host"]
    assert canonical == f"{scheme}//{host}{case['pathname']}{case['search']}"


@pytest.mark.parametrize("case", HTTP_RESULT_CASES)
def test_host_key_matches_whatwg_hostname(case: dict[str, Any]) -> None:
    assert host_key(canonicalize(case["href"])) == case["hostname"]
    # The raw serialisation (userinfo, port, fragment still there) gives the same key.
    assert host_key(case["href"]) == case["hostname"]


# --- resolve -----------------------------------------------------------------------------------


BASE = "https://www.example.com/a/b/page.html?x=1#section"


def test_resolve_strips_c0_controls_spaces_tabs_and_newlines() -> None:
    assert resolve(" \x00\x1f /c\td\n/e\r \x01", BASE) == "https://www.example.com/cd/e"


def test_resolve_failure_returns_none() -> None:
    assert resolve("http://exa mple.com/", BASE) is None
    assert resolve("x", "not a base") is None


def test_resolve_replaces_lone_surrogates_like_a_browser() -> None:
    # A browser turns a lone surrogate into U+FFFD before parsing; U+FFFD is EF BF BD in UTF-8.
    assert resolve("/\ud800", BASE) == "https://www.example.com/%EF%BF%BD"
    assert resolve("\ud800", "https://h/\udfff/") == "https://h/%EF%BF%BD/%EF%BF%BD"


# --- canonicalize: one test per rule -----------------------------------------------------------


def test_fragment_dropped() -> None:
    assert canonicalize("http://example.com/a?q=1#frag") == "http://example.com/a?q=1"
    assert canonicalize("http://example.com/a#") == "http://example.com/a"


def test_default_port_dropped_other_ports_kept() -> None:
    assert canonicalize("http://example.com:80/a") == "http://example.com/a"
    assert canonicalize("https://example.com:443/a") == "https://example.com/a"
    assert canonicalize("http://example.com:443/a") == "http://example.com:443/a"
    assert canonicalize("https://example.com:8443/a") == "https://example.com:8443/a"


def test_scheme_and_host_lower_cased_path_case_kept() -> None:
    assert canonicalize("HTTPS://WWW.Example.COM/Path/File") == "https://www.example.com/Path/File"


def test_idn_host_converted_to_punycode() -> None:
    assert canonicalize("http://Bücher.example/ä") == "http://xn--bcher-kva.example/%C3%A4"


def test_empty_path_becomes_slash() -> None:
    assert canonicalize("http://example.com") == "http://example.com/"
    assert canonicalize("http://example.com?q") == "http://example.com/?q"


def test_dot_segments_resolved() -> None:
    assert canonicalize("http://example.com/a/./b/../c") == "http://example.com/a/c"


def test_userinfo_dropped() -> None:
    assert canonicalize("http://user:secret@example.com/a") == "http://example.com/a"
    assert canonicalize("http://user@example.com:8080/") == "http://example.com:8080/"
    # An '@' in the password is part of the userinfo, not of the host.
    assert canonicalize("http://u:p@ss@example.com/a@b") == "http://example.com/a@b"


def test_bare_trailing_question_mark_dropped() -> None:
    assert canonicalize("http://example.com/a?") == "http://example.com/a"
    assert canonicalize("http://example.com/a?#frag") == "http://example.com/a"
    # A non-empty query is not touched.
    assert canonicalize("http://example.com/a?=") == "http://example.com/a?="


def test_query_order_kept_by_default() -> None:
    assert canonicalize("http://example.com/?b=2&a=1") == "http://example.com/?b=2&a=1"


def test_sort_query_sorts_by_key_stably() -> None:
    url = "http://example.com/p?b=2&a=1&c&b=1&a=0"
    assert canonicalize(url, sort_query=True) == "http://example.com/p?a=1&a=0&b=2&b=1&c"


def test_sort_query_does_not_reencode() -> None:
    url = "http://example.com/?z=%7e&y=a+b&x=%2F"
    assert canonicalize(url, sort_query=True) == "http://example.com/?x=%2F&y=a+b&z=%7e"


def test_sort_query_drops_empty_params_and_empty_query() -> None:
    assert canonicalize("http://example.com/?b=1&&a=2&", sort_query=True) == (
        "http://example.com/?a=2&b=1"
    )
    assert canonicalize("http://example.com/?&&", sort_query=True) == "http://example.com/"


def test_percent_escapes_left_as_parsed() -> None:
    # Only what the WHATWG parser does: it encodes spaces but keeps existing escapes as written.
    assert canonicalize("http://example.com/a b/%7e?q=%7E x") == (
        "http://example.com/a%20b/%7e?q=%7E%20x"
    )


@pytest.mark.parametrize(
    "url", ["mailto:a@example.com", "javascript:alert(1)", "data:,x", "ftp://example.com/"]
)
def test_non_http_schemes_rejected(url: str) -> None:
    with pytest.raises(URLError) as info:
        canonicalize(url)
    assert info.value.reason == "scheme"


@pytest.mark.parametrize("url", ["http://", "https:///", "http://user@/x", "http://:80/", "http:"])
def test_missing_host_rejected(url: str) -> None:
    with pytest.raises(URLError) as info:
        canonicalize(url)
    assert info.value.reason == "no_host"


@pytest.mark.parametrize("url", ["", "not a url", "/relative/path", "http://exa mple.com/"])
def test_unparseable_rejected(url: str) -> None:
    with pytest.raises(URLError) as info:
        canonicalize(url)
    assert info.value.reason == "invalid"


def test_too_long_rejected() -> None:
    prefix = "http://example.com/"
    fits = prefix + "a" * (2048 - len(prefix))
    assert canonicalize(fits) == fits
    with pytest.raises(URLError) as info:
        canonicalize(fits + "a")
    assert info.value.reason == "too_long"
    # The limit applies to the canonical form: a long fragment does not count.
    assert canonicalize(fits + "#" + "f" * 5000) == fits
    with pytest.raises(URLError) as info:
        canonicalize(prefix + "abc", max_length=len(prefix) + 2)
    assert info.value.reason == "too_long"


def test_url_error_is_value_error_and_pickles() -> None:
    with pytest.raises(ValueError, match="scheme"):
        canonicalize("mailto:x@example.com")
    error = pickle.loads(pickle.dumps(URLError("too_long", "http://example.com/")))
    assert (error.reason, error.url) == ("too_long", "http://example.com/")


MESSY_URLS = [
    "HTTP://User:Pw@Example.COM:80/a/../b/./c?#frag",
    "https://bücher.example:443/ä?ö=1#x",
    "http://example.com/?b=2&a=1&&b=1&a=0&",
    "http://0x7f.1/%7e?%7E",
    "http://[0:0::1]:8080/p?q#f",
    "  http://example.com/a\tb\n  ",
    "http://example.com/a?",
    "https://EXAMPLE.com./",
]


@pytest.mark.parametrize("url", MESSY_URLS)
@pytest.mark.parametrize("sort_query", [False, True])
def test_canonicalize_is_idempotent(url: str, sort_query: bool) -> None:
    once = canonicalize(url, sort_query=sort_query)
    assert canonicalize(once, sort_query=sort_query) == once


# --- fingerprint -------------------------------------------------------------------------------


def test_fingerprint_is_16_hex_chars_and_stable() -> None:
    url = canonicalize("http://example.com/a")
    fp = fingerprint(url)
    assert len(fp) == 16
    assert int(fp, 16) >= 0
    assert fingerprint(url) == fp
    assert fingerprint(canonicalize("HTTP://EXAMPLE.COM:80/a#x")) == fp


def test_fingerprint_differs_for_different_urls() -> None:
    urls = [f"http://example.com/{i}" for i in range(1000)]
    assert len({fingerprint(u) for u in urls}) == len(urls)


# --- host_key ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("http://Site0.TEST:8080/a", "site0.test"),
        ("https://example.com/", "example.com"),
        ("https://example.com", "example.com"),
        ("http://example.com?q", "example.com"),
        ("http://[::1]:8080/x", "[::1]"),
        ("http://user:pw@Example.com:81/", "example.com"),
        ("http://bücher.example/", "xn--bcher-kva.example"),
        ("http://ex%41mple.com/", "example.com"),
    ],
)
def test_host_key(url: str, key: str) -> None:
    assert host_key(url) == key


def test_host_key_of_garbage_raises() -> None:
    with pytest.raises(URLError):
        host_key("not a url")


# --- resolve_and_canonicalize ------------------------------------------------------------------


PAGE = canonicalize(BASE)


@pytest.mark.parametrize(
    "href",
    [
        "javascript:void(0)",
        " JavaScript:alert(1)",
        "mailto:someone@example.com",
        "data:text/html,<p>x</p>",
        "tel:+123",
        "ftp://example.com/file",
        "http://exa mple.com/",
        "http://",
    ],
)
def test_uncrawlable_hrefs_give_none(href: str) -> None:
    assert resolve_and_canonicalize(href, BASE) is None


@pytest.mark.parametrize("href", ["#top", "#", ""])
def test_fragment_only_and_empty_href_give_the_page(href: str) -> None:
    assert resolve_and_canonicalize(href, BASE) == PAGE


@pytest.mark.parametrize(
    ("href", "expected"),
    [
        ("c.html", "https://www.example.com/a/b/c.html"),
        ("./c/d?y=2#f", "https://www.example.com/a/b/c/d?y=2"),
        ("../c", "https://www.example.com/a/c"),
        ("../../../../../c", "https://www.example.com/c"),
        ("/", "https://www.example.com/"),
        ("?", "https://www.example.com/a/b/page.html"),
        ("?y=2", "https://www.example.com/a/b/page.html?y=2"),
        ("//other.host/x", "https://other.host/x"),
        ("//Other.HOST:443", "https://other.host/"),
        ("http://user:pw@Other.host:80/x#f", "http://other.host/x"),
        (" /c\t/d\n", "https://www.example.com/c/d"),
    ],
)
def test_relative_and_absolute_hrefs(href: str, expected: str) -> None:
    assert resolve_and_canonicalize(href, BASE) == expected


def test_resolve_and_canonicalize_sort_query() -> None:
    assert resolve_and_canonicalize("x?b=1&a=2", BASE, sort_query=True) == (
        "https://www.example.com/a/b/x?a=2&b=1"
    )


def test_resolve_and_canonicalize_rejects_too_long() -> None:
    assert resolve_and_canonicalize("/" + "a" * 3000, BASE) is None


def test_resolve_and_canonicalize_with_invalid_base() -> None:
    assert resolve_and_canonicalize("/a", "not a base") is None
    # As in `new URL(href, base)`: an unparseable base fails even an absolute href.
    assert resolve_and_canonicalize("http://example.com/a", "not a base") is None
