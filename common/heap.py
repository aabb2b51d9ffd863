"""The garbage collector of a long-running crawl process (the worker; the embedded crawl).

CPython starts a young-generation collection every 700 net container allocations. A page's
parse and result allocate hundreds of short-lived lists, tuples and dicts in a burst, freed by
reference counting a moment later, so with the default the collector runs every few pages and
walks objects that were about to go anyway; its full collections walk every module, class and
function imported at start-up as well. On the `docs` shape (docs/profile.md) that was 0.45 s of
a worker's ~14 CPU-s for 29,538 pages (381 young, 35 middle and 4 full collections, the full ones
40 ms each); tuned as below, 1 young and 1 full collection in the whole crawl, 5 ms. Real
garbage cycles (aiohttp's response and connection objects, tracebacks) are rare, so the peak
RSS stays where it was (81-82 MB on that crawl).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 10_000  # net container allocations between young collections (CPython: 700)


def tune_for_crawling() -> None:
    """Freeze what start-up made (modules, classes, the session: never garbage) out of the
    collector's reach, and collect the young generation less often. Idempotent: calling it
    again (one worker per shard) freezes the little made since."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
