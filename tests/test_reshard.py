"""`crawlfleet reshard` (cli/reshard.py, reshard_in.lua, reshard_out.lua) on the embedded
backend: each ``embedded://NAME`` is its own Redis. A crawl's state is built through the real
commands (admit, dispatch, claim, progress), moved, and compared with what it was: every URL on
its new owner once, counters exact (``check`` per shard), a second run a no-op, and a run
killed at any call finishing exactly when run again."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any

import pytest

from crawlfleet.cli import reshard as rs
from crawlfleet.cli.commands import UsageError
from crawlfleet.common.check import collect, compare
from crawlfleet.common.cluster import Cluster, ShardMismatch
from crawlfleet.common.connections import RedisProblem, open_redis
from crawlfleet.common.frontier import DEAD as DEAD_OUTCOME
from crawlfleet.common.frontier import (
    FAILED,
    PAGE,
    SKIPPED,
    Admission,
    Frontier,
    Limits,
    MovedURL,
    Progress,
    StoredResult,
)
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import HostBatch, PageResult, decode_entry, encode
from crawlfleet.common.resultlog import log_entries
from crawlfleet.common.settings import Settings
from crawlfleet.common.shards import owner
from crawlfleet.common.snapshot import parse_host_key
from crawlfleet.common.urls import fingerprint, host_key

NS = "t"
ERRORS = {PAGE: None, SKIPPED: "robots", FAILED: "http_4xx", DEAD_OUTCOME: "http_5xx"}
OUTCOMES = [PAGE, FAILED, SKIPPED, DEAD_OUTCOME]


def urls_of(run: str, n: int) -> list[str]:
    return [f"embedded://{run}-{i}" for i in range(n)]


def settings_for(urls: list[str]) -> Settings:
    return Settings(redis_urls=",".join(urls), namespace=NS)


def result(url: str, outcome: str) -> bytes:
    return encode(PageResult(url=url, final_url=url, status=200, content_type="text/html",
                             depth=0, title="t", links=0, bytes=1, elapsed_ms=1.0,
                             fetched_at=time.time(), error=ERRORS[outcome]))


async def build(urls: list[str], hosts: int = 12, per_host: int = 7) -> None:
    """A finished-for-now crawl on the shards ``urls``: each host's URLs admitted on its owner,
    one turn of 3 URLs fetched (every outcome), the rest queued; robots.txt cached."""
    cluster = Cluster.open(settings_for(urls))
    keys = cluster.keys
    try:
        await cluster.bind()
        for shard in cluster.shards:
            await shard.redis.sadd(keys.scope_hosts, *[f"h{i}.test" for i in range(hosts)])
        admissions = [Admission.of(u, host_key(u), 0) for i in range(hosts)
                      for u in [f"http://h{i}.test/p{j}" + ("?q=1" if j % 3 == 0 else "")
                                for j in range(per_host)]]
        for a in admissions:
            await cluster.admit_on(cluster.owner(a.host), [a])
        for shard in cluster.shards:
            crawl = await cluster.crawl_id(shard)
            await shard.frontier.dispatch(crawl, batch_size=3, max_waiting=100)
            for host_raw, job_raw in (await shard.redis.hgetall(keys.lease_batch)).items():
                job, batch_host = job_raw.decode(), host_raw.decode()
                batch = HostBatch(batch_id=job, host=batch_host, crawl=crawl)
                claim = await shard.frontier.claim(batch, lease_seconds=60, job_id=job)
                assert claim is not None
                results = [StoredResult(u.fp, OUTCOMES[n % 4], result(u.url, OUTCOMES[n % 4]))
                           for n, u in enumerate(claim.urls)]
                await shard.frontier.progress(batch, Progress(results=results, final=True),
                                              shard.limits)
                await shard.redis.hset(keys.robots, f"http://{batch_host}",
                                       b'{"origin":"x"}')
    finally:
        await cluster.aclose()


async def dump(urls: list[str]) -> dict[str, Any]:
    """What each server holds, by host (order-free where Redis's ids are not the crawl's)."""
    keys = Keys(NS)
    out: dict[str, Any] = {}
    for url in urls:
        redis = open_redis(url)
        try:
            snap = await collect(redis, keys)
            assert compare(snap) == [], (url, [str(p) for p in compare(snap)])
            queues = {}
            async for key in redis.scan_iter(match=keys.host_pattern):
                parsed = parse_host_key(keys, key.decode())
                assert parsed and parsed[1] == "q"
                queues[parsed[0]] = await redis.lrange(key, 0, -1)
            out[url] = {
                "results": sorted([(fp, data) async for _, fp, data in log_entries(redis, keys)]),
                "queues": queues,
                "stats": {k: v for k, v in (await redis.hgetall(keys.stats)).items()
                          if k != b"finished_at"},
                **{name: await redis.hgetall(getattr(keys, name))
                   for name in ("not_before", "host_pages", "query_variants", "robots")},
                "ready": await redis.zrange(keys.ready, 0, -1, withscores=True),
                "shard": await redis.get(keys.shard),
                "scope": await redis.smembers(keys.scope_hosts),
            }
        finally:
            await redis.aclose()
    return out


def everything(state: dict[str, Any]) -> dict[str, Any]:
    """The crawl's URLs whichever shard holds them."""
    results = sorted(r for s in state.values() for r in s["results"])
    queues = {h: q for s in state.values() for h, q in s["queues"].items()}
    totals: Counter[bytes] = Counter()
    for s in state.values():
        totals.update({k: int(v) for k, v in s["stats"].items()})
    return {"results": results, "queues": queues, "stats": +totals}


def hosts_on(server: dict[str, Any]) -> set[str]:
    found = {host_key(decode_result_url(d)) for _, d in server["results"]}
    found |= set(server["queues"])
    for name in ("not_before", "host_pages"):
        found |= {h.decode() for h in server[name]}
    found |= {host_key(o.decode()) for o in server["robots"]}
    return found


def decode_result_url(data: bytes) -> str:
    from crawlfleet.common.messages import decode_result

    return decode_result(data).url


def run(old: list[str], new: list[str], **kw: Any) -> int:
    kw.setdefault("yes", True)
    kw.setdefault("dry_run", False)
    return rs.reshard(settings_for(old), ",".join(new), **kw)


# -- planning ------------------------------------------------------------------------------
def test_servers_are_urls_and_only_hosts_whose_server_changes_move() -> None:
    a, b, c = "redis://127.0.0.1:1/0", "redis://127.0.0.1:2/0", "redis://127.0.0.1:3/0"
    assert rs.servers([a, b], [b, c]) == [rs.Server(a, 0, None), rs.Server(b, 1, 0),
                                          rs.Server(c, None, 1)]
    hosts = [f"host{i}.test" for i in range(300)]
    for host in hosts:
        assert rs.new_home(host, [a, b, c]) == [a, b, c][owner(host, 3)]
    # Appending a shard: hosts only go to the new one.
    moved = [h for h in hosts if rs.new_home(h, [a, b]) != rs.new_home(h, [a, b, c])]
    assert moved and all(rs.new_home(h, [a, b, c]) == c for h in moved)


def test_parse_targets_names_what_is_wrong() -> None:
    with pytest.raises(UsageError, match=r"--to: entry 2 is empty"):
        rs.parse_targets("redis://127.0.0.1:1/0,")
    with pytest.raises(UsageError, match=r"--to: entries 1 and 2 are the same"):
        rs.parse_targets("redis://127.0.0.1:1/0,redis://127.0.0.1:1/0")


def test_result_and_queue_moves_read_counter_dead_and_variant() -> None:
    url = "http://h.test/a?x=1"
    found = rs.result_move("1-0", None, result(url, SKIPPED))
    assert found is not None and found[0] == "h.test"
    assert found[1].counter == "skipped" and found[1].fp == fingerprint(url)
    assert found[1].variant == fingerprint("http://h.test/a") and found[1].where == "1-0"
    dead = rs.result_move("2-0", "0" * 16, result(url, FAILED).replace(b'"dead":false',
                                                                        b'"dead":true'))
    assert dead is not None and dead[1].dead and dead[1].counter == "failed"
    assert rs.result_move("3-0", "0" * 16, b"not json") is None
    entry = Admission.of("http://h.test/b", "h.test", 1).entry
    move = rs.queue_move(entry)
    assert move is not None and move.counter == "queued" and move.variant == ""
    assert move.fp == decode_entry(entry).fp and rs.queue_move(b"{}") is None


def test_records_and_quiescence() -> None:
    s = rs.Server("redis://127.0.0.1:1/0", 0, 1)
    assert rs.record_problem(s, "0/2", 2, 3, True, NS) is None
    assert rs.record_problem(s, "1/3", 2, 3, True, NS) is None  # a run before wrote it
    assert "holds shard 2 of 2" in (rs.record_problem(s, "1/2", 2, 3, True, NS) or "")
    assert rs.record_problem(s, None, 2, 3, False, NS) is None  # not used yet
    assert "shard 1 of 1" in (rs.record_problem(s, None, 2, 3, True, NS) or "")
    assert rs.record_problem(rs.Server("x", 0, 0), None, 1, 2, True, NS) is None
    stranger = rs.record_problem(rs.Server("x", None, 2), None, 2, 3, True, NS) or ""
    assert "already holds keys" in stranger
    assert rs.record_problem(rs.Server("x", None, 2), "2/3", 2, 3, True, NS) is None
    assert rs.busy_problem("here", False, 0, 0, 0) is None
    problem = rs.busy_problem("here", True, 2, 1, 0) or ""
    assert "scheduler holds its lock" in problem and "1 unread event" in problem


# -- the commands ----------------------------------------------------------------------------
async def test_each_command_moves_a_url_once() -> None:
    run_id = uuid.uuid4().hex[:8]
    src, dst = (open_redis(u) for u in urls_of(run_id, 2))
    keys = Keys(NS)
    f_src, f_dst = Frontier(src, keys), Frontier(dst, keys)
    try:
        crawl_src = (await f_src.open_crawl()).id
        crawl_dst = (await f_dst.open_crawl(expected_urls=10**8)).id  # other seen digits
        url = "http://h.test/a?b=1"
        adm = Admission.of(url, "h.test", 0)
        assert await f_src.admit(crawl_src, [adm], Limits()) == 1
        move = rs.queue_move(adm.entry)
        assert move is not None
        fields = [("host_pages", "h.test", "1")]
        assert await f_dst.reshard_in(crawl_dst, "h.test", [move], ready=5.0,
                                      fields=fields) == 1
        assert await f_dst.reshard_in(crawl_dst, "h.test", [move], ready=5.0,
                                      fields=fields) == 0
        assert await f_src.reshard_out(crawl_src, "h.test", [move],
                                       fields=[("host_pages", "h.test")]) == 1
        assert await f_src.reshard_out(crawl_src, "h.test", [move]) == 0
        assert await dst.lrange(keys.host_queue("h.test"), 0, -1) == [adm.entry]
        assert await dst.zscore(keys.ready, "h.test") == 5.0
        assert await f_dst.is_seen(adm.fp, 5) and not await f_src.is_seen(adm.fp, 3)
        assert await dst.hget(keys.query_variants, adm.variant) == b"1"
        assert not await src.exists(keys.host_queue("h.test"))
        assert await src.hget(keys.query_variants, adm.variant) is None
        assert await src.zscore(keys.ready, "h.test") is None
        for redis in (src, dst):
            snap = await collect(redis, keys)
            assert compare(snap) == []
        with pytest.raises(ValueError, match="counter"):
            await f_dst.reshard_in(crawl_dst, "", [MovedURL("0" * 16, "nope", b"", b"")])
    finally:
        await src.aclose()
        await dst.aclose()


# -- the whole command ----------------------------------------------------------------------
@pytest.mark.parametrize(("old", "new"), [
    ([0], [0, 1]),  # one Redis becomes two
    ([0, 1], [0, 1, 2]),  # a shard appended
    ([0, 1], [1, 0]),  # reordered: hosts swap servers
    ([0, 1, 2], [2, 0]),  # one dropped
    ([0, 1], [2]),  # everything onto a new one
])
def test_reshard_moves_each_host_to_its_owner_exactly(old: list[int], new: list[int],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    servers = urls_of(uuid.uuid4().hex[:8], 3)
    old_urls, new_urls = [servers[i] for i in old], [servers[i] for i in new]
    asyncio.run(build(old_urls))
    before = asyncio.run(dump(servers))
    assert len(everything(before)["results"]) == 12 * 3
    assert run(old_urls, new_urls) == 0
    first = capsys.readouterr().err
    after = asyncio.run(dump(servers))
    assert everything(after) == everything(before)
    for url in servers:
        if url not in new_urls:
            assert after[url]["results"] == [] and after[url]["stats"] == {}
            assert after[url]["shard"] is None and after[url]["scope"] == set()
            continue
        index = new_urls.index(url)
        assert all(owner(h, len(new)) == index for h in hosts_on(after[url])), url
        want = f"{index}/{len(new)}".encode() if len(new) > 1 else None
        assert after[url]["shard"] == want and after[url]["scope"] == before[old_urls[0]][
            "scope"]
    assert "resharded namespace 't'" in first and " 0 URL(s) moved" not in first
    # Run again: nothing moves, nothing changes.
    assert run(old_urls, new_urls) == 0
    assert " 0 host(s), 0 URL(s) moved" in capsys.readouterr().err
    assert asyncio.run(dump(servers)) == after


@pytest.mark.parametrize("kill_at", range(1, 34, 3))  # of ~32 calls, in (odd) and out (even)
def test_a_reshard_killed_at_any_call_ends_exact_when_run_again(
        kill_at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    servers = urls_of(uuid.uuid4().hex[:8], 3)
    old, new = servers[:2], servers
    asyncio.run(build(old, hosts=20))
    before = asyncio.run(dump(servers))
    calls = {"n": 0}
    real_in, real_out = Frontier.reshard_in, Frontier.reshard_out

    class Killed(Exception):
        pass

    def killing(real: Any) -> Any:
        async def call(self: Frontier, *args: Any, **kw: Any) -> int:
            calls["n"] += 1
            if calls["n"] == kill_at:
                raise Killed
            return int(await real(self, *args, **kw))
        return call

    monkeypatch.setattr(Frontier, "reshard_in", killing(real_in))
    monkeypatch.setattr(Frontier, "reshard_out", killing(real_out))
    with pytest.raises(Killed):
        run(old, new)
    monkeypatch.setattr(Frontier, "reshard_in", real_in)
    monkeypatch.setattr(Frontier, "reshard_out", real_out)
    assert run(old, new) == 0
    after = asyncio.run(dump(servers))
    assert everything(after) == everything(before)
    for index, url in enumerate(new):
        assert all(owner(h, 3) == index for h in hosts_on(after[url]))


def test_a_reshard_killed_once_a_dropped_server_is_emptied_ends_exact_when_run_again(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from crawlfleet.cli import crawl

    servers = urls_of(uuid.uuid4().hex[:8], 3)
    old, new = servers[:2], servers[1:]
    asyncio.run(build(old))
    before = asyncio.run(dump(servers))
    real = crawl._delete_namespace

    async def then_killed(*args: Any) -> None:
        await real(*args)
        raise KeyboardInterrupt

    monkeypatch.setattr(crawl, "_delete_namespace", then_killed)
    with pytest.raises(KeyboardInterrupt):
        run(old, new)
    monkeypatch.setattr(crawl, "_delete_namespace", real)
    assert run(old, new) == 0
    after = asyncio.run(dump(servers))
    assert everything(after) == everything(before)
    assert [after[u]["shard"] for u in new] == [b"0/2", b"1/2"]
    assert after[servers[0]]["stats"] == {}


def test_dry_run_changes_nothing_and_refusals(capsys: pytest.CaptureFixture[str]) -> None:
    servers = urls_of(uuid.uuid4().hex[:8], 3)
    asyncio.run(build(servers[:2]))
    before = asyncio.run(dump(servers))
    assert run(servers[:2], servers, dry_run=True) == 0
    out = capsys.readouterr().out
    assert out.startswith("would move namespace 't'") and " 0 URL(s)" not in out
    assert asyncio.run(dump(servers)) == before
    # Not quiescent: a scheduler holds its lock.
    async def lock() -> None:
        redis = open_redis(servers[1])
        await redis.set(Keys(NS).scheduler_lock, "s1")
        await redis.aclose()

    asyncio.run(lock())
    with pytest.raises(RedisProblem, match=r"not quiescent on .*scheduler holds") as busy:
        run(servers[:2], servers)
    assert busy.value.exit_code == 1
    # A list the crawl was not seeded with (shard 2 of 2 is not shard 1 of 2).
    with pytest.raises(ShardMismatch, match="holds shard 2 of 2") as mismatch:
        run(servers[1:2] + servers[:1], servers)
    assert mismatch.value.exit_code == 2
    # Results drained to an output.
    with pytest.raises(UsageError, match="needs the results in Redis"):
        rs.reshard(Settings(redis_urls=",".join(servers[:2]), namespace=NS, output="/tmp/o"),
                   ",".join(servers), yes=True, dry_run=False)
    assert asyncio.run(dump(servers)) == before
