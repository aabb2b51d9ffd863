"""``crawlfleet check`` (common/check.py): states built with plain Redis commands on the
embedded backend, consistent first, then each kind of drift."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest

from crawlfleet.cli.main import main
from crawlfleet.common.check import (
    Problem,
    Snapshot,
    collect,
    compare,
    format_report,
    parse_host_key,
    report,
    structure_counts,
)
from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys

NS = "chk"
KEYS = Keys(NS)
A, B = "a.example", "b.example"  # A: two queued URLs; B: a leased batch


def fp(name: str) -> str:
    """A 16-hex fingerprint per name."""
    return (name.encode().hex() + "0" * 16)[:16]


R_PAGE, R_ROBOTS, R_FAILED = fp("rp"), fp("rr"), fp("rf")
Q1, Q2 = fp("q1"), fp("q2")
L1, L2 = fp("l1"), fp("l2")
QX = fp("qx")  # a URL that went to quarantine (counted)


def entry(f: str, url: str | None = None, **extra: Any) -> bytes:
    url = f"https://x/{f}" if url is None else url
    return msgspec.json.encode({"v": 1, "fp": f, "url": url, "depth": 1, "tries": 0,
                                "retries": 0, **extra})


def result(url: str, error: str | None, *, dead: bool = False) -> bytes:
    return msgspec.json.encode({
        "v": 1, "url": url, "final_url": url, "status": 200 if error is None else None,
        "content_type": "text/html", "depth": 1, "title": None, "links": 0, "bytes": 10,
        "elapsed_ms": 1.0, "fetched_at": 1.0, "error": error, "dead": dead})


async def store(redis: Any, f: str, data: bytes) -> None:
    """A result into the results log, as the Lua commands append it."""
    await redis.xadd(KEYS.results, {"f": f, "r": data})


async def store_fixture_results(redis: Any, page: bytes | None = None) -> None:
    await store(redis, R_PAGE, result("https://a/p", None) if page is None else page)
    await store(redis, R_ROBOTS, result("https://a/r", "robots"))
    await store(redis, R_FAILED, result("https://a/f", "timeout", dead=True))


DIGITS = 3  # the seen set's bucket digits (the crawl marker's default)


async def seen_add(redis: Any, *fps: str) -> None:
    """Into the seen set as the Lua commands write it: bucket by the first digits, the rest of
    the fingerprint as an integer member."""
    for f in fps:
        await redis.sadd(*KEYS.seen_slot(f, DIGITS))


async def seen_remove(redis: Any, f: str) -> None:
    await redis.srem(*KEYS.seen_slot(f, DIGITS))


async def build_consistent(redis: Any) -> None:
    await seen_add(redis, R_PAGE, R_ROBOTS, R_FAILED, Q1, Q2, L1, L2, QX)
    await store_fixture_results(redis)
    await redis.rpush(KEYS.host_queue(A), entry(Q1), entry(Q2))
    await redis.zadd(KEYS.ready, {A: 1.0})
    # B's batch, claimed by a worker, one URL being fetched.
    await redis.hset(KEYS.host_lease(B), mapping={L1: entry(L1), L2: entry(L2)})
    await redis.hset(KEYS.lease_batch, B, f"{NS}:b1")
    await redis.zadd(KEYS.leases, {B: 100.0})
    await redis.sadd(KEYS.host_fetching(B), L1)
    # A counted URL entry in quarantine (unreadable), and an uncounted event.
    await redis.xadd(KEYS.quarantine, {"source": KEYS.host_queue(A), "reason": "bad depth",
                                       "data": b'{"v":1,"fp":"' + QX.encode() + b'"}',
                                       "counted": "1"})
    await redis.xadd(KEYS.quarantine, {"source": f"{KEYS.events}#1-0", "reason": "junk",
                                       "data": b"junk", "counted": "0"})
    await redis.hset(KEYS.stats, mapping={
        "seen": 8, "pages": 1, "skipped": 1, "failed": 1, "queued": 2, "in_flight": 2,
        "quarantined": 1, "retries": 3, "dead": 1, "finished_at": "12.5"})


@pytest.fixture
async def redis() -> AsyncIterator[Any]:
    client = open_redis(f"embedded://check-{uuid.uuid4()}")
    await build_consistent(client)
    try:
        yield client
    finally:
        await client.aclose()


async def problems_of(redis: Any) -> list[Problem]:
    return compare(await collect(redis, KEYS))


def kinds(problems: list[Problem]) -> set[str]:
    return {p.kind for p in problems}


def only(problems: list[Problem], kind: str) -> Problem:
    found = [p for p in problems if p.kind == kind]
    assert len(found) == 1, problems
    return found[0]


async def test_consistent_state_passes(redis: Any) -> None:
    snap = await collect(redis, KEYS)
    assert compare(snap) == []
    counts = structure_counts(snap)
    assert counts["seen"] == 8
    assert (counts["pages"], counts["skipped"], counts["failed"]) == (1, 1, 1)
    assert counts["queued"] == 2 and counts["queue_entries"] == 2
    assert counts["in_flight"] == 2 and counts["quarantined"] == 1
    assert counts["quarantine_entries"] == 2 and counts["dead"] == 1
    text = format_report(snap)
    assert text.endswith("check: OK")
    obj = report(snap)
    assert obj["ok"] is True and obj["problems"] == []
    assert obj["counters"]["pages"] == 1 and obj["structures"]["in_flight"] == 2


async def test_a_queued_url_with_a_result_is_in_two_places(redis: Any) -> None:
    """Results are stored only as an fp leaves its lease, so a queue entry whose result exists
    would be fetched and stored again."""
    await redis.rpush(KEYS.host_queue(A), entry(R_PAGE))
    await redis.hincrby(KEYS.stats, "queued", 1)
    problem = only(await problems_of(redis), "fp_in_two_places")
    assert any(R_PAGE in example for example in problem.examples)


async def test_small_pages_read_the_same(redis: Any) -> None:
    for _ in range(3):  # more quarantine entries than a page, to page through the stream
        await redis.xadd(KEYS.quarantine, {"source": "x", "reason": "y", "data": "z",
                                           "counted": "0"})
    whole = await collect(redis, KEYS)
    paged = await collect(redis, KEYS, page=2)
    assert structure_counts(paged) == structure_counts(whole)
    assert paged.quarantine_entries == 5
    assert compare(paged) == []


async def test_corrupted_counter(redis: Any) -> None:
    await redis.hincrby(KEYS.stats, "pages", 1)
    problems = await problems_of(redis)
    assert kinds(problems) == {"counter_mismatch"}
    assert "stats.pages = 2" in problems[0].message and "= 1" in problems[0].message


async def test_lost_queue_entry(redis: Any) -> None:
    await redis.lpop(KEYS.host_queue(A))  # Q1 vanishes; seen and the counter still have it
    problems = await problems_of(redis)
    assert kinds(problems) == {"counter_mismatch", "seen_unaccounted"}
    assert "stats.queued = 2" in only(problems, "counter_mismatch").message
    lost = only(problems, "seen_unaccounted")
    assert Q1 in lost.examples
    assert "SCARD seen = 8" in lost.message and "= 7" in lost.message


async def test_fp_in_queue_and_lease(redis: Any) -> None:
    await redis.rpush(KEYS.host_queue(B), entry(L1))
    await redis.hincrby(KEYS.stats, "queued", 1)
    await redis.zadd(KEYS.ready, {B: 1.0})
    problems = await problems_of(redis)
    assert "fp_in_two_places" in kinds(problems)
    doubled = only(problems, "fp_in_two_places")
    assert doubled.examples == (f"{L1} in queue {B} + lease {B}",)
    assert "seen_unaccounted" in kinds(problems)  # 8 fps, 9 places


async def test_two_live_queue_entries_and_lease_plus_result(redis: Any) -> None:
    await redis.rpush(KEYS.host_queue(A), entry(Q1))
    await store(redis, L2, result("https://b/l2", None))
    problems = await problems_of(redis)
    doubled = only(problems, "fp_in_two_places")
    assert f"{Q1} in queue {A} + queue {A}" in doubled.examples
    assert f"{L2} in result + lease {B}" in doubled.examples


async def test_result_missing_from_seen(redis: Any) -> None:
    await seen_remove(redis, R_ROBOTS)
    await redis.hincrby(KEYS.stats, "seen", -1)
    problems = await problems_of(redis)
    missing = only(problems, "result_not_in_seen")
    assert missing.examples == (R_ROBOTS,)
    assert "seen_unaccounted" in kinds(problems)


async def test_malformed_entries_are_problems_not_errors(redis: Any) -> None:
    # A malformed queue entry is still a URL counted in seen and queued: only it is reported.
    await redis.rpush(KEYS.host_queue(A), b"not json")
    await seen_add(redis, fp("junk"))
    await redis.hincrby(KEYS.stats, "queued", 1)
    await redis.hincrby(KEYS.stats, "seen", 1)
    problems = await problems_of(redis)
    assert kinds(problems) == {"malformed_queue"}
    assert KEYS.host_queue(A) in problems[0].examples[0]


async def test_malformed_lease_entry_and_result(redis: Any) -> None:
    await redis.hset(KEYS.host_lease(B), L2, entry(L2, url=""))  # no URL
    await redis.delete(KEYS.results)
    await store_fixture_results(redis, page=b"[1, 2]")
    problems = await problems_of(redis)
    assert {"malformed_lease", "malformed_result"} <= kinds(problems)
    assert "bad url" in only(problems, "malformed_lease").examples[0]
    # The unreadable result is no page any more: the counter disagrees, and says why.
    mismatch = only(problems, "counter_mismatch")
    assert "stats.pages" in mismatch.message and "unreadable" in mismatch.message


async def test_non_integer_counter(redis: Any) -> None:
    await redis.hset(KEYS.stats, "pages", "1.5")
    await redis.hset(KEYS.stats, "retries", "many")
    snap = await collect(redis, KEYS)
    problems = compare(snap)
    assert kinds(problems) == {"malformed_counter"}
    bad = only(problems, "malformed_counter")
    assert bad.count == 2
    assert any("stats.pages" in e for e in bad.examples)
    assert report(snap)["counters"]["pages"] is None
    assert "?" in format_report(snap)


async def test_lease_without_lease_batch(redis: Any) -> None:
    await redis.hdel(KEYS.lease_batch, B)
    problems = await problems_of(redis)
    assert kinds(problems) == {"lease_without_batch", "lease_entries_without_batch"}
    assert only(problems, "lease_without_batch").examples == (B,)


async def test_lease_bookkeeping(redis: Any) -> None:
    await redis.zadd(KEYS.waiting, {B: 50.0})  # both claimed and waiting
    await redis.hset(KEYS.lease_batch, "c.example", f"{NS}:b2")  # a batch nobody holds
    await redis.sadd(KEYS.host_fetching(B), fp("zz"))  # a fetch mark for no lease entry
    problems = await problems_of(redis)
    assert kinds(problems) == {"leased_and_waiting", "batch_without_lease",
                               "fetching_not_in_lease"}


async def test_a_url_with_two_results_is_a_duplicate(redis: Any) -> None:
    await store(redis, R_PAGE, result("https://a/p", None))  # the same URL's result again
    problems = await problems_of(redis)
    assert kinds(problems) == {"duplicate_result"}
    assert only(problems, "duplicate_result").examples == (R_PAGE,)


async def test_the_dead_counter_is_checked_against_the_results(redis: Any) -> None:
    await redis.hset(KEYS.stats, "dead", 2)
    problems = await problems_of(redis)
    assert kinds(problems) == {"counter_mismatch"}
    assert "stats.dead = 2" in only(problems, "counter_mismatch").message


async def test_queue_not_ready_and_wrong_type(redis: Any) -> None:
    await redis.zrem(KEYS.ready, A)
    await redis.delete(KEYS.results)
    await redis.set(KEYS.results, "oops")
    await redis.set(f"{NS}:h:{{{A}}}:other", "x")
    problems = await problems_of(redis)  # never raises
    assert {"queue_not_ready", "malformed_key", "unknown_key"} <= kinds(problems)
    assert only(problems, "queue_not_ready").examples == (A,)


async def test_seen_is_read_from_every_bucket(redis: Any) -> None:
    snap = await collect(redis, KEYS)
    assert snap.seen == {R_PAGE, R_ROBOTS, R_FAILED, Q1, Q2, L1, L2, QX}
    buckets = {k async for k in redis.scan_iter(match=KEYS.seen_pattern)}
    assert len(buckets) > 1  # the fixture's fps start with several different digits
    # A fingerprint whose member has leading zeros comes back whole.
    edge = "abc0000000000001"
    await seen_add(redis, edge)
    await store(redis, edge, result("https://a/e", None))
    await redis.hincrby(KEYS.stats, "seen", 1)
    await redis.hincrby(KEYS.stats, "pages", 1)
    assert await redis.smembers(f"{KEYS.seen}abc") == {b"1"}
    assert await problems_of(redis) == []


async def test_a_bad_seen_member_and_a_stray_seen_key(redis: Any) -> None:
    await redis.sadd(f"{KEYS.seen}abc", "not-a-number")  # in a bucket, but no fingerprint
    await redis.set(f"{KEYS.seen}xyz", "x")  # under the prefix, but no bucket
    await redis.set(f"{KEYS.seen}123", "x")  # a bucket's name, of the wrong type
    problems = await problems_of(redis)
    assert kinds(problems) == {"malformed_seen", "malformed_key", "unknown_key"}
    assert "not-a-number" in only(problems, "malformed_seen").examples[0]
    assert only(problems, "unknown_key").examples == (f"{KEYS.seen}xyz",)
    assert f"{KEYS.seen}123" in only(problems, "malformed_key").examples[0]


def test_parse_host_key() -> None:
    host = "we{ird}%7B.example"
    for kind in ("q", "lease", "fetching"):
        assert parse_host_key(KEYS, KEYS.host_key(host, kind)) == (host, kind)
    assert parse_host_key(KEYS, f"{NS}:seen") is None
    assert parse_host_key(KEYS, KEYS.seen_slot(Q1, DIGITS)[0]) is None  # a seen bucket
    assert parse_host_key(KEYS, f"{NS}:h:{{a{{b}}:q") is None  # not the escaped form


def test_compare_is_pure() -> None:
    snap = Snapshot(NS, stats={"seen": "1"}, seen={Q1})
    assert kinds(compare(snap)) == {"seen_unaccounted"}
    assert compare(Snapshot(NS)) == []


def test_cli_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"embedded://check-cli-{uuid.uuid4()}"

    async def run(step: Any) -> None:
        client = open_redis(url)
        try:
            await step(client)
        finally:
            await client.aclose()

    asyncio.run(run(build_consistent))
    args = ["check", "--redis-url", url, "--namespace", NS]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().endswith("check: OK")

    async def drift(client: Any) -> None:
        await client.hincrby(KEYS.stats, "pages", 1)

    asyncio.run(run(drift))
    assert main(args) == 1
    assert "check: 1 problem(s)" in capsys.readouterr().out
    assert main([*args, "--json"]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj["ok"] is False
    assert set(obj) >= {"ok", "counters", "structures", "problems"}
    assert obj["problems"][0]["kind"] == "counter_mismatch"
