"""URL resolution, canonicalisation and fingerprints for discovered links.

Parsing is the WHATWG URL standard (what browsers do), via the ``ada_url`` package. Links are
resolved exactly as a browser would resolve them, then canonicalised so that one resource has
one string: that string is both the dedup key and the URL that is fetched.

Canonical form (``canonicalize``), applied to the WHATWG serialisation of the URL:

* Parsing fails -> ``URLError('invalid')``; an http(s) URL whose host is empty (``http://``,
  ``https://user@/x``, ``http://:80/``) -> ``URLError('no_host')``. The parser itself refuses
  host-less http(s) URLs, so every parsed http(s) URL has a host.
* Scheme other than ``http``/``https`` -> ``URLError('scheme')``.
* Done by the parser: scheme and host lower-cased, IDN hosts to punycode, IPv4/IPv6 hosts in
  their standard form, default port (80/443) dropped, ``.``/``..`` segments removed, empty path
  becomes ``/``, characters outside the allowed sets percent-encoded. Existing percent escapes
  are left exactly as written (``%7e`` stays ``%7e``): the server sees the bytes the page linked.
* The fragment is dropped: it never reaches the server.
* ``user:password@`` is dropped: a crawler never sends credentials found in links, and keeping
  them would split one resource into many keys (and store secrets in the frontier).
* A bare trailing ``?`` (empty query) is dropped: every practical server treats ``/a?`` as ``/a``.
* ``sort_query=True``: ``&``-separated parameters are sorted by key (the raw text before the
  first ``=``), stably, so repeated keys keep their relative order; nothing is re-encoded. Empty
  parameters (``a=1&&b=2``) are dropped, as form decoding does, and a query left empty goes too.
* Longer than ``max_length`` characters -> ``URLError('too_long')``.

The result is idempotent: ``canonicalize(canonicalize(u)) == canonicalize(u)``.
"""

from __future__ import annotations

import hashlib
import re

from ada_url import join_url, normalize_url, parse_url

__all__ = [
    "URLError",
    "canonicalize",
    "fingerprint",
    "host_key",
    "resolve",
    "resolve_and_canonicalize",
]


class URLError(ValueError):
    """A URL that cannot be crawled; .reason is a short machine-readable slug.

    Reasons: ``'invalid'``, ``'scheme'``, ``'no_host'``, ``'too_long'``.
    """

    reason: str

    def __init__(self, reason: str, url: str = "") -> None:
        # Both in args so that the exception survives pickling (e.g. across worker processes).
        super().__init__(reason, url)
        self.reason = reason
        self.url = url

    def __str__(self) -> str:
        # Truncated: the URL may be megabytes long (that is one of the reasons to reject it).
        return f"uncrawlable URL ({self.reason}): {self.url[:200]!r}"


_DEFAULT_MAX_LENGTH = 2048

# What the parser strips from both ends of its input.
_C0_OR_SPACE = "".join(map(chr, range(0x21)))

# Only used once parsing has failed, to tell "no host" from other garbage.
_HTTP_AUTHORITY = re.compile(r"[\x00-\x20]*https?:[/\\]*([^/\\?#]*)", re.IGNORECASE)

# A clean authority of an absolute URL, with nothing that needs the parser: no userinfo, no
# percent escapes, no backslashes or whitespace.
_CLEAN_AUTHORITY = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://([^/?#\\@%\s]+)(?:[/?#]|\Z)")


def _to_usv(s: str) -> str:
    # Browsers hand the parser a USVString: surrogate pairs joined, lone surrogates become
    # U+FFFD. A Python str can hold lone surrogates (and ada_url then refuses the input).
    return s.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _has_surrogates(s: str) -> bool:
    return not s.isascii() and any("\ud800" <= c <= "\udfff" for c in s)


def resolve(href: str, base: str) -> str | None:
    """Resolve ``href`` against ``base`` as a browser does; the serialised URL, or None.

    None when either cannot be parsed. Leading/trailing C0 controls and spaces and embedded
    tabs/newlines are ignored, as the WHATWG standard says.
    """
    try:
        return join_url(base, href)
    except ValueError:
        # Rare path: retry only when the failure may be the lone-surrogate encoding error.
        if _has_surrogates(href) or _has_surrogates(base):
            try:
                return join_url(_to_usv(base), _to_usv(href))
            except ValueError:
                return None
        return None


def _failure_reason(url: str) -> str:
    m = _HTTP_AUTHORITY.match(url)
    if m is not None:
        host = m.group(1).rpartition("@")[2].partition(":")[0]
        if not host.strip(_C0_OR_SPACE):
            return "no_host"
    return "invalid"


def _canonical_from_href(href: str, sort_query: bool, max_length: int) -> str:
    """Canonical form of an http(s) WHATWG serialisation (the caller has checked the scheme)."""
    # In a serialised URL every '#', '?', '/' and '@' that is not a delimiter is
    # percent-encoded, so plain string searches find the components; no second parse needed.
    start = 8 if href[4] == "s" else 7
    hash_at = href.find("#", start)
    if hash_at >= 0:
        href = href[:hash_at]
    # A special URL always has a host and a path starting with '/'.
    path_at = href.find("/", start)
    at = href.rfind("@", start, path_at)
    if at >= 0:
        href = href[:start] + href[at + 1 :]
        path_at -= at + 1 - start
    query_at = href.find("?", path_at)
    if query_at >= 0:
        if sort_query:
            params = [p for p in href[query_at + 1 :].split("&") if p]
            params.sort(key=_param_key)
            href = href[: query_at + 1] + "&".join(params)
        if len(href) == query_at + 1:
            href = href[:query_at]
    if len(href) > max_length:
        raise URLError("too_long", href)
    return href


def _param_key(param: str) -> str:
    return param.partition("=")[0]


def canonicalize(
    url: str, *, sort_query: bool = False, max_length: int = _DEFAULT_MAX_LENGTH
) -> str:
    """The canonical form of absolute ``url`` (rules in the module docstring).

    Raises URLError with reason 'invalid', 'scheme', 'no_host' or 'too_long'.
    """
    try:
        href = normalize_url(url)
    except ValueError:
        if not _has_surrogates(url):
            raise URLError(_failure_reason(url), url) from None
        try:
            href = normalize_url(_to_usv(url))
        except ValueError:
            raise URLError(_failure_reason(url), url) from None
    if not href.startswith(("http://", "https://")):
        raise URLError("scheme", url)
    return _canonical_from_href(href, sort_query, max_length)


def fingerprint(canonical_url: str) -> str:
    """16 hex characters: blake2b (8-byte digest) of the UTF-8 URL, stable across processes."""
    return hashlib.blake2b(canonical_url.encode(), digest_size=8).hexdigest()


def host_key(canonical_url: str) -> str:
    """Politeness/scope key: the hostname (lower-case, punycode, IPv6 in brackets), no port.

    Meant for canonical URLs and cheap for them (no parse). Anything with userinfo, percent
    escapes, non-ASCII or stray whitespace in the authority is parsed properly instead; other
    non-canonical spellings of a host (e.g. numeric IPv4 forms) are only lower-cased.
    """
    m = _CLEAN_AUTHORITY.match(canonical_url)
    if m is not None and m.group(1).isascii():
        host = m.group(1)
        # IPv6 literals contain ':' themselves; the port follows the closing bracket.
        host = host[: host.find("]") + 1] if host[0] == "[" else host.partition(":")[0]
        if host:
            return host.lower()
    try:
        hostname = parse_url(canonical_url, ("hostname",))["hostname"]
    except ValueError:
        raise URLError(_failure_reason(canonical_url), canonical_url) from None
    if not hostname:
        raise URLError("no_host", canonical_url)
    return hostname


def resolve_and_canonicalize(href: str, base: str, *, sort_query: bool = False) -> str | None:
    """``canonicalize(resolve(href, base))``, or None for anything that cannot be crawled.

    None when ``href`` does not resolve, is not http(s) (``javascript:``, ``mailto:``,
    ``data:``, ...) or is too long. A fragment-only href (``#top``) gives the page's own
    canonical URL; deduplicating it is the caller's job.
    """
    url = resolve(href, base)
    if url is None or not url.startswith(("http://", "https://")):
        return None
    try:
        return _canonical_from_href(url, sort_query, _DEFAULT_MAX_LENGTH)
    except URLError:
        return None
