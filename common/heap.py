"""The heap of a long-running crawl process (the worker; the embedded crawl): the garbage
collector, and the C library's malloc.

CPython starts a young-generation collection every 700 net container allocations. A page's
parse and result allocate hundreds of short-lived lists, tuples and dicts in a burst, freed by
reference counting a moment later, so with the default the collector runs every few pages and
walks objects that were about to go anyway; its full collections walk every module, class and
function imported at start-up as well. On the `docs` shape (docs/profile.md) that was 0.45 s of
a worker's ~14 CPU-s for 29,538 pages (381 young, 35 middle and 4 full collections, the full ones
40 ms each); tuned as below, 1 young and 1 full collection in the whole crawl, 5 ms. Real
garbage cycles (aiohttp's response and connection objects, tracebacks) are rare, so the peak
RSS stays where it was (81-82 MB on that crawl).

glibc's malloc gives the top of its heap back to the kernel (brk) as soon as more than 128 KiB
of it is free, and asks for it again on the next page: a worker on the `many` shape made 3 brk
calls a page, and each regrowth faults its pages in afresh, zeroed by the kernel. Keeping a pad
of TOP_PAD bytes at the top (M_TOP_PAD) ends that: worker CPU 0.38 -> 0.32 ms a page, peak RSS
74 -> 75 MB. Elsewhere (musl, macOS) nothing is changed.
"""

from __future__ import annotations

import ctypes
import gc
import sys

YOUNG_THRESHOLD = 10_000  # net container allocations between young collections (CPython: 700)
TOP_PAD = 4 << 20  # bytes malloc keeps at its heap's top: more than a page's churn, bounded
M_TOP_PAD = -2  # glibc's <malloc.h>


def tune_for_crawling() -> None:
    """Freeze what start-up made (modules, classes, the session: never garbage) out of the
    collector's reach, and collect the young generation less often. Idempotent: calling it
    again (one worker per shard) freezes the little made since."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    keep_malloc_top()


def keep_malloc_top() -> bool:
    """Have glibc's malloc keep TOP_PAD bytes at its heap's top instead of trimming it after
    every page; True when it took. The setting also fixes the mmap threshold at its 128 KiB
    default (glibc stops raising it after large frees), so a large body is still mapped and
    unmapped on its own, not kept."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_TOP_PAD, TOP_PAD))


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the process's own C library
    except OSError:
        return None
    # M_TOP_PAD (-2) is glibc's own constant: only glibc gets the call.
    if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
