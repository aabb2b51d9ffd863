"""CRAWLFLEET_TEXT: a parsed page's visible text and its language.

Called by ``workers/parse.py`` on the tree it has parsed already (one parse a page), so it
runs where the parse runs, in a worker thread for a large body. Pure, bounded and total: the
text is capped, a bad language tag is None, hostile markup is Lexbor's to survive (and
``cap_nesting`` has cut a deep one before the parse).
"""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser

# CRAWLFLEET_TEXT: the visible text is kept up to this many UTF-8 bytes, cut on a character.
TEXT_MAX_BYTES = 1024 * 1024
# Never rendered, so not visible text (a hidden="" element and its subtree neither).
_INVISIBLE = ["script", "style", "noscript", "template", "iframe"]
_HIDDEN = "[hidden]:not([hidden] *)"
# Elements a browser renders on a line (or in a cell) of their own: their text must not run
# into the next word when the text nodes are joined. Inline ones (<b>, <a>) join as they are.
_BLOCKS = (
    "address,article,aside,blockquote,br,caption,dd,details,dialog,div,dl,dt,fieldset,"
    "figcaption,figure,footer,form,h1,h2,h3,h4,h5,h6,header,hr,legend,li,main,nav,ol,option,"
    "p,pre,section,summary,table,td,th,tr,ul"
)
# BCP 47-ish: a primary language subtag, then subtags of up to 8 letters or digits.
_LANG_TAG = re.compile(r"[a-z]{2,8}(?:-[a-z0-9]{1,8})*")
_LANG_MAX_CHARS = 35


def visible_text(tree: LexborHTMLParser, max_bytes: int = TEXT_MAX_BYTES) -> str:
    """The body's text as a reader sees it, whitespace collapsed, at most ``max_bytes`` of
    UTF-8 (cut on a character). Takes the invisible elements out of ``tree``."""
    tree.strip_tags(_INVISIBLE, recursive=True)
    body = tree.body
    if body is None:  # a frameset: nothing of its own to read
        return ""
    for node in body.css(_HIDDEN):
        node.decompose()
    for node in body.css(_BLOCKS):
        node.insert_before(" ")
        node.insert_after(" ")
    return cap_text(" ".join(body.text().split()), max_bytes)


def cap_text(text: str, max_bytes: int) -> str:
    """``text`` cut to at most ``max_bytes`` of UTF-8, never inside a character."""
    if len(text) <= max_bytes // 4:  # no character takes more than 4 bytes
        return text
    data = text.encode("utf-8", "replace")
    if len(data) <= max_bytes:
        return text
    return data[:max_bytes].decode("utf-8", "ignore").rstrip()


def normalize_lang(value: str | None) -> str | None:
    """A language tag lower-cased (``en_US`` -> ``en-us``; of a list, the first), or None
    when it does not look like BCP 47."""
    if not value:
        return None
    tag = value.split(",", 1)[0].strip().lower().replace("_", "-")
    if len(tag) <= _LANG_MAX_CHARS and _LANG_TAG.fullmatch(tag):
        return tag
    return None


def page_lang(tree: LexborHTMLParser, meta: str | None, header: str | None) -> str | None:
    """The language of ``<html lang>``, else of the ``<meta http-equiv=content-language>``
    content ``meta``, else of the Content-Language header ``header`` (HTML's own order); the
    first that is a valid tag, normalised, or None."""
    root = tree.root
    declared = root.attrs.get("lang") if root is not None and root.tag == "html" else None
    for value in (declared, meta, header):
        tag = normalize_lang(value)
        if tag is not None:
            return tag
    return None

