"""Which discovered URLs belong to the crawl: pure functions, tested without Redis."""

from __future__ import annotations

from collections.abc import Collection


def out_of_scope(
    host: str, depth: int, *, allowed_hosts: Collection[str], max_depth: int | None
) -> str | None:
    """The reason a URL is refused ('host', 'depth'), or None when it is in scope.

    By default the crawl stays on the seeds' hosts: a seed's host joins ``allowed_hosts``.
    """
    if host not in allowed_hosts:
        return "host"
    if max_depth is not None and depth > max_depth:
        return "depth"
    return None
