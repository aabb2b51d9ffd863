"""Tests for CRAWLFLEET_TEXT: workers/text.py through parse_page, and its way into results."""

from __future__ import annotations

import threading
import time

import pytest

from crawlfleet.common.messages import QueuedURL
from crawlfleet.common.settings import Settings
from crawlfleet.workers.fetch import Fetched
from crawlfleet.workers.parse import (
    PARSE_IN_THREAD_BYTES,
    parse_html,
    parse_page,
    parse_page_async,
)
from crawlfleet.workers.results import build_result, parse_fetched
from crawlfleet.workers.text import TEXT_MAX_BYTES, cap_text, normalize_lang

PAGE = "https://example.com/page"
HTML = "text/html; charset=utf-8"


def text_of(document: str, content_language: str | None = None) -> tuple[str | None, str | None]:
    page = parse_page(document.encode(), HTML, PAGE, keep_text=True,
                      content_language=content_language)
    return page.text, page.lang


def test_only_the_visible_text_is_kept_whitespace_collapsed() -> None:
    text, _ = text_of("""<!doctype html><html><head><title>The title</title>
        <style>body { color: red }</style><script>var head = 1;</script></head>
        <body>
          <h1>Hello,\t  world</h1>
          <script>document.write("no")</script><noscript>enable scripts</noscript>
          <template><p>later</p></template><style>.x{}</style>
          <p>One   <b>bo</b>ld   <a href="/x">link</a>s.</p><div hidden>secret <p>too</p></div>
          <ul><li>first</li><li>second</li></ul><table><tr><td>a</td><td>b</td></tr></table>
          line<br>break
          <iframe>fallback</iframe>
        </body></html>""")
    assert text == "Hello, world One bold links. first second a b line break"


def test_text_is_off_by_default() -> None:
    page = parse_page(b"<html lang=en><body>words</body></html>", HTML, PAGE)
    assert page.text is None and page.lang is None


def test_a_page_without_text_has_empty_text() -> None:
    assert text_of("<html><head><title>only a title</title></head></html>") == ("", None)
    assert text_of("<frameset><frame src=a></frameset>")[0] == ""


@pytest.mark.parametrize(("document", "header", "lang"), [
    ('<html lang="EN-gb"><body>x</body></html>', None, "en-gb"),
    ("<html lang=de_AT><body>x</body></html>", "fr", "de-at"),
    # <html lang> absent or no tag at all: <meta http-equiv>, then the header.
    ('<meta http-equiv="Content-Language" content="pt-BR, en"><p>x', "fr", "pt-br"),
    ("<p>x", "fr-CA", "fr-ca"),
    ('<html lang="  zh-Hant-TW "><p>x', None, "zh-hant-tw"),
    ("<html lang=''><p>x", None, None),
    ("<html lang='not a language'><p>x", None, None),
    ("<html lang='e'><p>x", None, None),
    ("<html lang='en-<script>'><p>x", "*", None),
    (f"<html lang='en-{'a' * 60}'><p>x", None, None),
    ("<p>x", None, None),
])
def test_lang(document: str, header: str | None, lang: str | None) -> None:
    assert text_of(document, header)[1] == lang


def test_normalize_lang() -> None:
    assert normalize_lang("EN_us") == "en-us"
    assert normalize_lang("en, fr") == "en"
    assert normalize_lang("12") is None
    assert normalize_lang(None) is None


def test_cap_cuts_on_a_character_boundary() -> None:
    assert cap_text("abc", 3) == "abc"
    # "é" is 2 bytes, "漢" 3, "😀" 4: a cut inside one drops it whole.
    assert cap_text("aé漢😀", 2) == "a"
    assert cap_text("aé漢😀", 3) == "aé"
    assert cap_text("aé漢😀", 9) == "aé漢"
    assert cap_text("aé漢😀", 10) == "aé漢😀"
    assert cap_text("word " * 10, 10) == "word word"  # no dangling space


def test_the_page_text_is_capped_at_a_mib() -> None:
    words = "漢字 naïve " * (TEXT_MAX_BYTES // 8)  # ~1.6 MiB of UTF-8
    text, _ = text_of(f"<html><body><p>{words}</p></body></html>")
    assert text is not None
    assert TEXT_MAX_BYTES - 4 <= len(text.encode()) <= TEXT_MAX_BYTES
    assert words.startswith(text)


async def test_large_bodies_keep_their_text_on_the_thread_path() -> None:
    body = ("<html lang=nl><body>" + "<p>woord</p>" * (PARSE_IN_THREAD_BYTES // 10)
            + "</body></html>").encode()
    assert len(body) > PARSE_IN_THREAD_BYTES
    threads: list[str] = []
    real = parse_page

    def spy(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    import crawlfleet.workers.parse as parse_module

    parse_module.parse_page = spy  # type: ignore[assignment]
    try:
        page = await parse_page_async(body, HTML, PAGE, keep_text=True)
    finally:
        parse_module.parse_page = real
    assert threads and threads[0] != threading.main_thread().name
    assert page.lang == "nl" and page.text is not None
    assert page.text.startswith("woord woord") and page.text.count("woord") > 20_000


@pytest.mark.parametrize("document", [
    "<div>" * 100_000 + "deep" + "</div>" * 10,  # cut by cap_nesting before the parse
    "<table><tr><td>" * 5_000 + "cells",
    "<p " + "a=" * 50_000 + ">attrs",
    "<template>" * 300 + "<script>" * 300 + "x",
    "<html lang=" + "x" * 100_000 + "><body>big attribute",
    "<svg><title>icon</title><text>drawn</text></svg><math><mi>x</mi></math>",
    "\x00\ufffd<\x01>text</\x02><" * 1000,
    "<noscript><p>nested <script>x</script></noscript>after",
])
def test_hostile_markup_never_raises(document: str) -> None:
    started = time.monotonic()
    # As decoded text: parse_page would turn the NUL bytes away before any parse.
    page = parse_html(document, PAGE, keep_text=True)
    assert isinstance(page.text, str) and page.lang is None
    assert time.monotonic() - started < 10


async def test_text_and_lang_reach_the_result_and_its_aliases() -> None:
    settings = Settings(text=True)
    entry = QueuedURL(fp="f", url="https://example.com/old", depth=0)
    fetched = Fetched(url=entry.url, final_url=PAGE, status=200, content_type=HTML,
                      body=b"<body><p>Hej</p></body>", content_language="sv",
                      redirects=[PAGE])
    parsed = await parse_fetched(entry, fetched, settings)
    result, _, aliases = build_result(entry, fetched, settings, parsed)
    assert (result.text, result.lang) == ("Hej", "sv")
    assert [(a.url, a.text, a.lang) for a in aliases] == [(PAGE, "Hej", "sv")]
    off, _, _ = build_result(entry, fetched, Settings())
    assert (off.text, off.lang) == (None, None)
