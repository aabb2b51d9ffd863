"""The crawl processes' heap settings (common/heap.py: the garbage collector, glibc's malloc),
and the worker applying them once its start-up is over (workers/worker.py startup)."""

from __future__ import annotations

import asyncio
import gc
import platform
import subprocess
import sys
import textwrap
import uuid
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from crawlfleet.common import heap
from crawlfleet.common.settings import Settings
from crawlfleet.workers import worker


@pytest.fixture
def restored_gc() -> Iterator[None]:
    """The test process's own collector as it was, whatever the test did to it."""
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


def test_start_up_objects_are_frozen_and_young_collections_are_rarer(restored_gc: None) -> None:
    gc.unfreeze()
    _, older, oldest = gc.get_threshold()
    heap.tune_for_crawling()
    assert gc.get_threshold() == (heap.YOUNG_THRESHOLD, older, oldest)
    assert heap.YOUNG_THRESHOLD > 700  # CPython's default
    frozen = gc.get_freeze_count()
    assert frozen > 0
    # A cycle made after start-up is still garbage that the collector finds.
    cycle = Node()
    cycle.next = cycle
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None
    # Again (a worker per shard): what was made since joins the frozen objects.
    later = [Node() for _ in range(10)]
    heap.tune_for_crawling()
    assert gc.get_freeze_count() >= frozen + len(later)


class Node:
    next: Node | None = None


def test_the_worker_tunes_the_collector_when_its_start_up_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def tune() -> None:
        calls.append("robots" if "robots" in ctx else "too early")

    monkeypatch.setattr(worker, "tune_for_crawling", tune)
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}")
    ctx: dict[str, Any] = {}

    async def go() -> None:
        arq_worker = worker.make_worker(settings, handle_signals=False)
        ctx.update(arq_worker.ctx, redis=arq_worker.pool)  # as arq's main() does
        await worker.startup(ctx)
        await worker.shutdown(ctx)
        await arq_worker.pool.aclose()

    asyncio.run(go())
    assert calls == ["robots"]


# Frees 2 MiB of malloc'd blocks below the mmap threshold, from the top of the heap down, and
# prints how much free memory glibc keeps at the top (mallinfo2's keepcost): trimmed back to
# ~128 KiB by default; TOP_PAD once the crawl's setting is applied.
MALLOC_PROBE = textwrap.dedent("""
    import ctypes, sys
    from crawlfleet.common import heap
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in (
            "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
        ).split()]
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "tuned":
        heap.tune_for_crawling()
    blocks = [libc.malloc(64 << 10) for _ in range(32)]
    for block in reversed(blocks):
        libc.free(block)
    print(libc.mallinfo2().keepcost)
""")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")
def test_malloc_keeps_its_top_instead_of_trimming_it_after_each_page() -> None:
    def keepcost(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], capture_output=True,
                             text=True, check=True, timeout=60)
        return int(out.stdout.split()[-1])

    assert keepcost("default") < heap.TOP_PAD // 4  # glibc gave the freed top back
    assert keepcost("tuned") >= heap.TOP_PAD


def test_keeping_malloc_top_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap.sys, "platform", "darwin")
    assert heap.keep_malloc_top() is False
