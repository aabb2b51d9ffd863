"""``crawl --out``'s resumable file, the embedded backend's state file, and ``purge``."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pytest

from crawlfleet.cli import state
from crawlfleet.cli.commands import UsageError
from crawlfleet.cli.main import main
from crawlfleet.cli.outfile import ResultsFile
from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys

KEYS = Keys("outtest")


@pytest.fixture
async def redis() -> Any:
    client = open_redis(f"embedded://out-{uuid.uuid4()}")
    yield client
    await client.aclose()


async def add(redis: Any, *ns: int) -> None:
    for n in ns:
        await redis.xadd(KEYS.results, {"f": f"{n:016x}", "r": f'{{"n":{n}}}'.encode()})


def numbers(path: Path) -> list[int]:
    return [int(line.split(b":")[1].rstrip(b"}")) for line in path.read_bytes().splitlines()]


async def test_the_file_grows_with_the_log_and_resumes_where_it_was_durable(
        redis: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    seen: list[bytes] = []
    first = ResultsFile(redis, KEYS, str(out), on_line=seen.append)
    await first.open(overwrite=False)
    await add(redis, 1, 2, 3)
    assert await first.pump() == 3 and await first.pump() == 0
    first.close()
    assert numbers(out) == [1, 2, 3] and len(seen) == 3
    # A kill between the write and the record leaves a tail the record does not cover.
    out.write_bytes(out.read_bytes() + b'{"n":4}\n{"n":')
    await add(redis, 4, 5)
    shown: list[bytes] = []
    again = ResultsFile(redis, KEYS, str(out), on_line=shown.append)
    await again.open(overwrite=False)
    assert again.resumed_at == 3 and shown == seen  # the tally covers the earlier run
    assert await again.pump() == 2
    again.close()
    assert numbers(out) == [1, 2, 3, 4, 5]


async def test_a_file_that_is_not_the_crawls_is_refused_unless_overwrite(
        redis: Any, tmp_path: Path) -> None:
    out = tmp_path / "notes.jsonl"
    out.write_text("mine\n")
    with pytest.raises(UsageError, match="exists and is not this crawl's: pass --overwrite"):
        await ResultsFile(redis, KEYS, str(out)).open(overwrite=False)
    assert out.read_text() == "mine\n"
    await add(redis, 7)
    replacing = ResultsFile(redis, KEYS, str(out))
    await replacing.open(overwrite=True)
    await replacing.pump()
    replacing.close()
    assert numbers(out) == [7]


async def test_a_file_cut_short_since_is_refused(redis: Any, tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    await add(redis, 1, 2)
    first = ResultsFile(redis, KEYS, str(out))
    await first.open(overwrite=False)
    await first.pump()
    first.close()
    out.write_bytes(b"")
    with pytest.raises(UsageError, match="it was changed since; pass --overwrite"):
        await ResultsFile(redis, KEYS, str(out)).open(overwrite=False)


async def test_state_round_trip_keeps_every_type_and_expires_leases(
        redis: Any, tmp_path: Path) -> None:
    await redis.set("s", "v")
    await redis.set("ttl", "v", px=600_000)
    await redis.rpush("l", "a", "b")
    await redis.hset("h", mapping={"k": "v"})
    await redis.sadd("set", 1, 2)
    await redis.zadd(KEYS.leases, {"host.test": 1e12})
    await redis.xadd("events", {"m": "1"}, id="5-1")
    await redis.xadd("events", {"m": "2"}, id="6-0")
    await redis.xgroup_create("events", "frontier", id="0")
    await redis.xreadgroup("frontier", "c", {"events": ">"}, count=2)
    await redis.xack("events", "frontier", "5-1")  # 6-0 read, not acknowledged
    await redis.set("arq:in-progress:outtest:b1", "1")  # meaningless after the process
    path = tmp_path / "crawl-state"
    assert await state.save(redis, path) == 7
    fresh = open_redis(f"embedded://out-{uuid.uuid4()}")
    try:
        assert await state.load(fresh, path, KEYS) == 7
        assert await fresh.get("s") == b"v" and 0 < await fresh.pttl("ttl") <= 600_000
        assert await fresh.lrange("l", 0, -1) == [b"a", b"b"]
        assert await fresh.hgetall("h") == {b"k": b"v"} and await fresh.smembers("set") == {
            b"1", b"2"}
        assert await fresh.zscore(KEYS.leases, "host.test") == 0  # expires at once
        assert not await fresh.exists("arq:in-progress:outtest:b1")
        redelivered = await fresh.xreadgroup("frontier", "c2", {"events": ">"})
        assert [entry_id for entry_id, _ in redelivered[0][1]] == [b"6-0"]
    finally:
        await fresh.aclose()


async def test_a_broken_state_file_is_one_clear_error(redis: Any, tmp_path: Path) -> None:
    path = tmp_path / "crawl-state"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(state.StateFileError, match="is not a crawlfleet state file"):
        await state.load(redis, path, KEYS)


def test_purge_deletes_the_namespace_and_asks_first(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"embedded://purge-{uuid.uuid4()}"
    assert main(["seed", "--redis-url", url, "--namespace", "p1", "http://a.test/"]) == 0
    assert main(["purge", "--redis-url", url, "--namespace", "p1"]) == 2  # no TTY to ask on
    assert "pass --yes" in capsys.readouterr().err
    assert main(["seed", "--redis-url", url, "--namespace", "p2", "http://b.test/"]) == 0
    assert asyncio.run(keys_of(url, "p1")) and asyncio.run(keys_of(url, "p2"))
    assert main(["purge", "--redis-url", url, "--namespace", "p1", "--yes"]) == 0
    assert "purged namespace 'p1': 2 key(s) deleted" in capsys.readouterr().err
    assert asyncio.run(keys_of(url, "p1")) == []
    assert asyncio.run(keys_of(url, "p2"))  # another namespace is left alone


async def keys_of(url: str, namespace: str) -> list[bytes]:
    redis = open_redis(url)
    try:
        return [k async for k in redis.scan_iter(match=f"{namespace}:*")]
    finally:
        await redis.aclose()
