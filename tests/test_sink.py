"""The results log and the sink: each result leaves Redis once, into one part, whatever is lost.

Fast tests on the embedded backend (fakeredis with Lua) and a LocalStore in a temporary
folder; tests/integration/test_output.py kills real sinks mid-crawl.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import Frontier, SinkClaim
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import PageResult, decode_result, encode
from crawlfleet.common.resultlog import (
    iter_results,
    list_parts,
    output_store,
    part_name,
    part_range,
)
from crawlfleet.common.settings import Settings
from crawlfleet.common.sink import Sink
from crawlfleet.common.storage import LocalStore
from crawlfleet.common.urls import fingerprint

NS = "sinktest"
KEYS = Keys(NS)


def page(n: int, error: str | None = None) -> bytes:
    url = f"https://a.test/{n}"
    return encode(PageResult(url=url, final_url=url, status=200, content_type="text/html",
                             depth=1, title=f"t{n}", links=0, bytes=10, elapsed_ms=1.0,
                             fetched_at=1.0, error=error))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    redis = open_redis(f"embedded://sink-{uuid.uuid4()}")
    marker = await Frontier(redis, KEYS).open_crawl()
    settings = Settings(redis_url="embedded://x", namespace=NS, output=str(tmp_path / "out"),
                        output_part_results=4, output_part_seconds=30.0)
    yield {"redis": redis, "crawl": marker.id, "settings": settings,
           "store": LocalStore(tmp_path / "out")}
    await redis.aclose()


async def add(env: dict[str, Any], *ns: int) -> None:
    for n in ns:
        data = page(n)
        await env["redis"].xadd(KEYS.results, {"f": fingerprint(decode_result(data).url),
                                               "r": data})


async def everything(env: dict[str, Any]) -> list[str]:
    return [decode_result(s.data).url async for s in
            iter_results(env["redis"], KEYS, env["store"], env["crawl"])]


def urls(*ns: int) -> list[str]:
    return [f"https://a.test/{n}" for n in ns]


async def test_a_full_part_is_written_and_leaves_redis(env: dict[str, Any]) -> None:
    await add(env, *range(10))
    sink = Sink(env["settings"], env["redis"], env["store"])
    assert await sink.step() is None and await sink.step() is None  # two parts of 4
    assert await sink.step() == pytest.approx(2.0)  # 2 left: not a part yet, poll later
    assert await env["redis"].xlen(KEYS.results) == 2
    names = await list_parts(env["store"], NS, env["crawl"])
    assert len(names) == 2 and names == sorted(names)
    lines = []
    for name in names:
        lines += [line async for line in env["store"].open_lines(name)]
    assert [decode_result(line).url for line in lines] == urls(*range(8))
    # Export order: parts, then what is still in the log; each result once.
    assert await everything(env) == urls(*range(10))
    assert await env["redis"].get(KEYS.output) == env["settings"].output.encode()


async def test_drain_writes_whatever_is_left(env: dict[str, Any]) -> None:
    await add(env, 1, 2, 3)
    sink = Sink(env["settings"], env["redis"], env["store"])
    assert await sink.drain() == 3
    assert await env["redis"].xlen(KEYS.results) == 0
    assert await everything(env) == urls(1, 2, 3)
    assert await sink.drain() == 0


async def test_an_old_small_batch_becomes_a_part(env: dict[str, Any]) -> None:
    settings = env["settings"].replace(output_part_seconds=0.05)
    await add(env, 1)
    sink = Sink(settings, env["redis"], env["store"])
    deadline = time.monotonic() + 5
    while await sink.step() is not None:  # waits until the entry is 50 ms old
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert await everything(env) == urls(1)
    assert await env["redis"].xlen(KEYS.results) == 0


async def take(env: dict[str, Any], owner: str, hold: float = 30.0) -> SinkClaim | float | None:
    return await Frontier(env["redis"], KEYS).sink_take(
        env["crawl"], owner, max_results=4, max_bytes=1 << 20, min_results=1, max_age_s=0,
        hold_s=hold)


async def test_a_sink_lost_after_writing_is_taken_over_without_a_second_copy(
        env: dict[str, Any]) -> None:
    await add(env, *range(6))
    # Sink A takes a range and writes its part, then dies before sink_done.
    claim = await take(env, "a", hold=0.05)
    assert isinstance(claim, SinkClaim)
    name = part_name(NS, env["crawl"], claim.first, claim.last)
    await env["store"].put(name, b"".join(line + b"\n" for line in claim.lines))
    # Meanwhile the part and the log overlap; export still gives each result once.
    assert await everything(env) == urls(*range(6))
    # Sink B takes the abandoned claim over once its hold has passed, before anything new.
    sink = Sink(env["settings"], env["redis"], env["store"], owner="b")
    deadline = time.monotonic() + 5
    while True:
        again = await take(env, "b")
        if isinstance(again, SinkClaim):
            await sink._write(env["crawl"], again)
            if again.first == claim.first:  # the same part, under the same name
                break
        assert time.monotonic() < deadline, "the abandoned claim was never taken over"
        await asyncio.sleep(0.02)  # B takes the next range (or nothing) until A's hold passes
    assert (again.last, again.lines) == (claim.last, claim.lines)
    await sink.drain()
    names = await list_parts(env["store"], NS, env["crawl"])
    assert name in names
    assert await everything(env) == urls(*range(6))
    assert await env["redis"].xlen(KEYS.results) == 0
    assert await env["redis"].hlen(KEYS.sink_claims) == 0


async def test_a_part_of_many_results_fits_one_reply(env: dict[str, Any]) -> None:
    await add(env, *range(12_000))  # more than Lua's unpack() could return at once
    sink = Sink(env["settings"].replace(output_part_results=10_000), env["redis"], env["store"])
    assert await sink.step() is None
    assert sink.results == 10_000
    assert await sink.drain() == 2_000


async def test_a_late_done_changes_nothing(env: dict[str, Any]) -> None:
    await add(env, 1, 2)
    frontier = Frontier(env["redis"], KEYS)
    claim = await take(env, "a")
    assert isinstance(claim, SinkClaim)
    assert await frontier.sink_done(env["crawl"], claim) == 2
    assert await frontier.sink_done(env["crawl"], claim) is None
    await add(env, 3)
    assert await env["redis"].xlen(KEYS.results) == 1  # the new entry stays


async def test_the_log_is_trimmed_only_below_claims_still_open(env: dict[str, Any]) -> None:
    await add(env, *range(8))
    frontier = Frontier(env["redis"], KEYS)
    first = await take(env, "a")
    second = await take(env, "b")
    assert isinstance(first, SinkClaim) and isinstance(second, SinkClaim)
    assert await frontier.sink_done(env["crawl"], second) == 0  # 'a' still writes 0..3
    assert await env["redis"].xlen(KEYS.results) == 8
    assert await frontier.sink_done(env["crawl"], first) == 8
    assert await env["redis"].xlen(KEYS.results) == 0


async def test_a_part_name_is_its_range_and_sorts_in_log_order() -> None:
    a = part_name(NS, "c1", "1700000000000-5", "1700000000001-0")
    b = part_name(NS, "c1", "1700000000001-1", "1800000000000-12")
    assert a < b and a.startswith(f"results/{NS}/c1/part-")
    assert part_range(a) == ((1700000000000, 5), (1700000000001, 0))
    assert part_range("results/x/c/notes.txt") is None


async def test_a_new_crawl_writes_its_own_parts(env: dict[str, Any]) -> None:
    await add(env, 1)
    sink = Sink(env["settings"], env["redis"], env["store"])
    await sink.drain()
    await env["redis"].delete(KEYS.crawl)  # the namespace starts a new crawl
    marker = await Frontier(env["redis"], KEYS).open_crawl()
    await add(env, 2)
    assert await sink.step(eager=True) is not None  # state lost: it re-reads the marker
    await sink.drain()
    crawls = {name.split("/")[2] for name in await env["store"].list(f"results/{NS}/")}
    assert crawls == {env["crawl"], marker.id}
    assert len(await list_parts(env["store"], NS, marker.id)) == 1
    assert [decode_result(s.data).url async for s in iter_results(
        env["redis"], KEYS, env["store"], marker.id)] == urls(2)


async def test_export_finds_the_output_the_sinks_recorded(env: dict[str, Any]) -> None:
    await add(env, 1, 2)
    await Sink(env["settings"], env["redis"], env["store"]).drain()
    store = await output_store(env["redis"], KEYS, None)
    assert store is not None and store.where == env["store"].where
    assert await output_store(open_redis(f"embedded://none-{uuid.uuid4()}"), KEYS, None) is None


async def test_an_unreadable_part_line_is_reported_by_check(env: dict[str, Any]) -> None:
    from crawlfleet.common.check import check

    await add(env, 1)
    await env["redis"].hset(KEYS.stats, mapping={"seen": 1, "pages": 1})
    await env["redis"].sadd(*KEYS.seen_slot(fingerprint("https://a.test/1"), 3))
    await Sink(env["settings"], env["redis"], env["store"]).drain()
    _, problems = await check(env["redis"], KEYS, env["store"])
    assert problems == []
    (name,) = await list_parts(env["store"], NS, env["crawl"])
    await env["store"].put(name, b"not json\n" + page(1) + b"\n" + page(1) + b"\n")
    _, problems = await check(env["redis"], KEYS, env["store"])
    assert {p.kind for p in problems} >= {"malformed_result", "duplicate_result"}
    assert msgspec.json.decode(page(1))["url"] == "https://a.test/1"
