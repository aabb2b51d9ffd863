"""The crawl processes' garbage-collector settings (common/heap.py), and the worker applying
them once its start-up is over (workers/worker.py startup)."""

from __future__ import annotations

import asyncio
import gc
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
