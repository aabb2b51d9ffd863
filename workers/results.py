"""A fetch turned into its result, its links and its aliases: pure, apart from parsing large
bodies off the event loop."""

from __future__ import annotations

import time
from typing import Any

import msgspec

from crawlfleet.common.messages import PageResult, QueuedURL
from crawlfleet.common.settings import Settings

from .fetch import Fetched
from .parse import BodyError, ParsedPage, is_html, parse_page, parse_page_async, sniff_html
from .warc import WarcRef


def skipped_result(entry: QueuedURL, reason: str, settings: Settings) -> PageResult:
    return PageResult(url=entry.url, final_url=None, status=None, content_type=None,
                      depth=entry.depth, title=None, links=0, bytes=0, elapsed_ms=0.0,
                      fetched_at=round(time.time(), 3), error=reason, worker=settings.worker_id)


def wants_parsing(fetched: Fetched) -> bool:
    return fetched.error is None and bool(fetched.body) and (
        is_html(fetched.content_type)
        or (fetched.content_type is None and sniff_html(fetched.body))
    )


def _parse_args(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> tuple[tuple[bytes, str | None, str], dict[str, Any]]:
    kwargs: dict[str, Any] = {"sort_query": settings.sort_query,
                              "max_links": settings.max_links_per_page}
    if settings.text:
        kwargs.update(keep_text=True, content_language=fetched.content_language)
    return (fetched.body, fetched.content_type, fetched.final_url or entry.url), kwargs


async def parse_fetched(
    entry: QueuedURL, fetched: Fetched, settings: Settings
) -> ParsedPage | str | None:
    """The parsed page (off the event loop when it is large), the body's error class, or None
    when there is nothing to parse."""
    if not wants_parsing(fetched):
        return None
    try:
        args, kwargs = _parse_args(entry, fetched, settings)
        return await parse_page_async(*args, **kwargs)
    except BodyError as exc:
        return exc.reason


_UNPARSED: Any = object()


def build_result(
    entry: QueuedURL, fetched: Fetched, settings: Settings,
    parsed_page: ParsedPage | str | None = _UNPARSED,
    warc: WarcRef | None = None,
) -> tuple[PageResult, list[str], list[PageResult]]:
    """Turn a fetch (and its parsed page, from ``parse_fetched``; parsed here when not given)
    into the page result, the links to follow from it, and results for the redirect targets
    it followed (pure). ``warc``: where the fetch's records went (CRAWLFLEET_WARC)."""
    if parsed_page is _UNPARSED:
        parsed_page = None
        if wants_parsing(fetched):
            try:
                args, kwargs = _parse_args(entry, fetched, settings)
                parsed_page = parse_page(*args, **kwargs)
            except BodyError as exc:
                parsed_page = exc.reason
    error = fetched.error
    parsed: ParsedPage | None = None
    if isinstance(parsed_page, str):
        error = parsed_page
    else:
        parsed = parsed_page
    links: list[str] = []
    if parsed is not None and not parsed.nofollow:
        links = list(parsed.links)
        if parsed.canonical and parsed.canonical != (fetched.final_url or entry.url):
            links.append(parsed.canonical)  # the page names its preferred URL: crawl that too
    if fetched.redirect_stopped and fetched.redirects:
        links = [fetched.redirects[-1]]  # not followed here; the frontier decides
    if settings.max_depth is not None and entry.depth + 1 > settings.max_depth:
        links = []  # the scheduler would refuse them anyway; don't send them
    result = PageResult(
        url=entry.url,
        final_url=fetched.final_url,
        status=fetched.status,
        content_type=fetched.content_type,
        depth=entry.depth,
        title=parsed.title if parsed else None,
        links=parsed.links_found if parsed else 0,
        bytes=len(fetched.body),
        elapsed_ms=fetched.elapsed_ms,
        fetched_at=round(time.time(), 3),
        error=error,
        canonical=parsed.canonical if parsed else None,
        noindex=parsed.noindex if parsed else False,
        nofollow=parsed.nofollow if parsed else False,
        encoding=parsed.encoding if parsed else None,
        worker=settings.worker_id,
        redirects=fetched.redirects,
        warc_file=warc.file if warc else None,
        warc_offset=warc.offset if warc else None,
        warc_length=warc.length if warc else None,
        text=parsed.text if parsed else None,
        lang=parsed.lang if parsed else None,
    )
    # The targets on the way got the same content; a failed fetch vouches for none of them.
    followed = fetched.redirects[:-1] if fetched.redirect_stopped else fetched.redirects
    aliases = [] if result.error else [
        msgspec.structs.replace(result, url=url, redirects=[]) for url in followed
    ]
    return result, links, aliases
