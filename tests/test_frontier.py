"""The frontier's commands (common/commands/*.lua through common/frontier.py), on fakeredis.

Times come from Redis's clock inside the scripts, so expiry is driven by lease lengths
(a negative lease is already over) rather than by a fake "now".
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
import pytest

from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import (
    FAILED,
    PAGE,
    Frontier,
    StateLost,
    StoredResult,
)
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import (
    Discovered,
    HostBatch,
    LinkGroup,
    PageResult,
    QueuedURL,
    batch_from_job,
    decode_result,
    encode,
    job_deserializer,
)
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import accounted, read_status
from crawlfleet.common.urls import canonicalize, host_key
from crawlfleet.scheduler.service import Scheduler


@dataclass
class Claimed:
    batch: HostBatch
    urls: list[QueuedURL]

    @property
    def host(self) -> str:
        return self.batch.host


@pytest.fixture
async def env() -> AsyncIterator[dict[str, Any]]:
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", namespace="t", batch_size=3)
    redis = open_redis(settings.redis_url)
    keys = Keys(settings.namespace)
    scheduler = Scheduler(settings, redis)
    await scheduler.open_crawl()
    yield {"settings": settings, "redis": redis, "keys": keys, "scheduler": scheduler,
           "frontier": scheduler.frontier}
    await redis.aclose()


def crawl(env: dict[str, Any]) -> str:
    return str(env["scheduler"].crawl_id)


async def admit(env: dict[str, Any], urls: list[str], depth: int = 0) -> int:
    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts |= {host_key(canonicalize(u)) for u in urls}
    scheduler.limits = type(scheduler.limits)(
        env["settings"].max_pages, env["settings"].max_pages_per_host,
        env["settings"].max_query_variants)
    admissions, _, _ = await scheduler.admissions([(depth, urls)])
    return int(await env["frontier"].admit(crawl(env), admissions, scheduler.limits))


async def status(env: dict[str, Any]) -> dict[str, Any]:
    s = await read_status(env["redis"], env["keys"])
    assert accounted(s), s
    assert all(s[k] >= 0 for k in ("seen", "pages", "failed", "queued", "in_flight")), s
    return s


async def jobs(env: dict[str, Any]) -> list[HostBatch]:
    """The batches waiting in arq's queue, read as arq's worker reads them."""
    from arq.jobs import deserialize_job

    out = []
    for job_id in await env["redis"].zrange(env["keys"].arq_queue, 0, -1):
        raw = await env["redis"].get(env["keys"].arq_job(job_id.decode()))
        job = deserialize_job(raw, deserializer=job_deserializer)
        assert job.function == "fetch_batch" and job.kwargs == {}
        out.append(batch_from_job(job.args[0]))
    return out


async def dispatch(env: dict[str, Any], *, max_waiting: int = 10,
                   lease_seconds: float = 60, claim: bool = True) -> list[Claimed]:
    before = {b.batch_id for b in await jobs(env)}
    await env["frontier"].dispatch(crawl(env), batch_size=3, max_waiting=max_waiting)
    new = [b for b in await jobs(env) if b.batch_id not in before]
    if not claim:
        return [Claimed(b, []) for b in new]
    out = []
    for b in new:
        urls = await env["frontier"].claim(b, lease_seconds=lease_seconds, job_id=b.batch_id)
        assert urls is not None
        out.append(Claimed(b, urls))
    return out


async def lapse(env: dict[str, Any], host: str) -> None:
    """The worker holding ``host``'s lease vanished and the lease ran out."""
    await env["redis"].zadd(env["keys"].leases, {host: 0}, xx=True)


def result_for(url: str, error: str | None = None) -> PageResult:
    return PageResult(url=url, final_url=url, status=200 if error is None else 500,
                      content_type="text/html", depth=0, title="t", links=0, bytes=1,
                      elapsed_ms=1.0, fetched_at=time.time(), error=error)


async def report(env: dict[str, Any], claimed: Claimed, *, final: bool = True,
                 urls: list[str] | None = None, links: list[str] | None = None,
                 wait_s: float = 0.0, outcome: str = PAGE) -> Any:
    chosen = [u for u in claimed.urls if urls is None or u.url in urls]
    error = None if outcome == PAGE else "http_4xx"
    results = [StoredResult(u.fp, outcome, encode(result_for(u.url, error))) for u in chosen]
    event = encode(Discovered(batch_id=claimed.batch.batch_id, host=claimed.host, worker="w",
                              groups=[LinkGroup(1, links or [])], pages=len(results), failed=0,
                              final=final))
    frontier: Frontier = env["frontier"]
    return await frontier.report(claimed.batch, results, [event], final=final, wait_s=wait_s)


async def test_admit_deduplicates_and_counts(env: dict[str, Any]) -> None:
    urls = ["http://a.test/1", "http://A.test:80/1#frag", "http://a.test/2"]
    assert await admit(env, urls) == 2
    assert await admit(env, ["http://a.test/2", "http://a.test/3"]) == 1
    s = await status(env)
    assert (s["seen"], s["queued"], s["in_flight"]) == (3, 3, 0)
    assert await env["redis"].llen(env["keys"].host_queue("a.test")) == 3


async def test_one_batch_per_host_until_it_reports(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(5)] + ["http://b.test/1"])
    batches = await dispatch(env)
    assert sorted((b.host, len(b.urls)) for b in batches) == [("a.test", 3), ("b.test", 1)]
    assert await dispatch(env) == []  # a.test still has 2 queued, but its lease is out
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["hosts_leased"]) == (2, 4, 2)
    assert await env["redis"].hlen(env["keys"].host_lease("a.test")) == 3

    a = next(b for b in batches if b.host == "a.test")
    outcome = await report(env, a)
    assert outcome.lease_held and outcome.stored == 3
    [again] = await dispatch(env)
    assert (again.host, len(again.urls)) == ("a.test", 2)
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (3, 0, 3)


async def test_dispatch_keeps_at_most_max_waiting_batches_waiting(env: dict[str, Any]) -> None:
    await admit(env, [f"http://h{i}.test/" for i in range(5)])
    assert len(await dispatch(env, max_waiting=2, claim=False)) == 2
    assert len(await dispatch(env, max_waiting=2, claim=False)) == 0  # two are waiting
    assert len(await dispatch(env, max_waiting=0, claim=False)) == 0
    assert len(await dispatch(env, max_waiting=10, claim=False)) == 3
    assert (await status(env))["batches_waiting"] == 5


async def test_the_lease_starts_at_the_claim(env: dict[str, Any]) -> None:
    """A batch that waits for a worker is not a lost worker: it goes back whole, untouched,
    and its arq job is withdrawn, so a late claim finds it stale."""
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [waiting] = await dispatch(env, claim=False)
    assert await env["redis"].zcard(env["keys"].leases) == 0  # no lease clock yet
    nothing = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    assert nothing.unclaimed == 0
    returned = await frontier.expire(crawl(env), max_losses=3, claim_timeout=-1)
    assert (returned.unclaimed, returned.leases, returned.given_up) == (1, 0, 0)
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["batches_waiting"]) == (3, 0, 0)
    assert await env["redis"].zcard(env["keys"].arq_queue) == 0
    assert await env["redis"].get(env["keys"].arq_job(waiting.batch.batch_id)) is None
    late = await frontier.claim(waiting.batch, lease_seconds=60, job_id=waiting.batch.batch_id)
    assert late is None
    [again] = await dispatch(env)
    assert all(u.tries == 0 for u in again.urls)


async def test_an_expired_lease_charges_only_the_urls_in_flight(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [first] = await dispatch(env, lease_seconds=60)
    assert (await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)).leases == 0
    assert await frontier.mark_fetching(first.batch, first.urls[1].fp)
    await lapse(env, "a.test")
    expired = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    assert (expired.leases, expired.requeued, expired.given_up) == (1, 3, 0)
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["leases_expired"]) == (3, 0, 1)
    [again] = await dispatch(env)
    assert [u.url for u in again.urls] == [u.url for u in first.urls]  # at the front
    assert [u.tries for u in again.urls] == [0, 1, 0]  # only the one in flight is charged
    # The poison page: marked at every loss, it fails as worker_lost after three.
    poison = again.urls[0]
    batch = again
    for loss in range(1, 4):
        assert await frontier.mark_fetching(batch.batch, poison.fp)
        await lapse(env, "a.test")
        expired = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
        assert expired.given_up == (1 if loss == 3 else 0)
        [batch] = await dispatch(env)
        if loss < 3:
            assert next(u for u in batch.urls if u.fp == poison.fp).tries == loss
    stored = decode_result(await env["redis"].hget(env["keys"].results, poison.fp))
    assert stored.error == "worker_lost" and stored.url == poison.url
    assert await env["redis"].hexists(env["keys"].dead_letter, poison.fp)
    s = await status(env)
    assert (s["failed"], s["queued"], s["in_flight"], s["dead"]) == (1, 0, 2, 1)


async def test_a_lost_lease_stops_fetching(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, ["http://a.test/1"])
    [claimed] = await dispatch(env)
    await lapse(env, "a.test")
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    assert not await frontier.mark_fetching(claimed.batch, claimed.urls[0].fp)
    assert not await frontier.renew(claimed.batch, lease_seconds=60)


async def test_stale_report_is_accepted_without_duplicates(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [old] = await dispatch(env, lease_seconds=-1)
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    [new] = await dispatch(env)

    # The old holder wakes up and reports one page: stored once, counted once.
    stale = await report(env, old, urls=[old.urls[0].url])
    assert not stale.lease_held and stale.stored == 1
    s = await status(env)
    assert (s["pages"], s["in_flight"]) == (1, 2)

    fresh = await report(env, new)
    assert fresh.lease_held and (fresh.stored, fresh.duplicates) == (2, 1)
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"], s["hosts_leased"]) == (3, 0, 0, 0)
    assert await env["redis"].hlen(env["keys"].results) == 3


async def test_stale_report_for_a_requeued_url(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, ["http://a.test/1", "http://a.test/2"])
    [old] = await dispatch(env, lease_seconds=-1)
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)  # both back in queue
    await report(env, old)  # the old holder stores both while they wait in the queue
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (2, 0, 0)
    assert await dispatch(env) == []  # their entries are dropped, not fetched again
    await env["scheduler"].read_events()
    assert await frontier.check_finished(crawl(env))


async def test_final_report_hands_back_unreported_urls(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    outcome = await report(env, batch, urls=[batch.urls[0].url])
    assert outcome.handed_back == 2
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"], s["hosts_leased"]) == (1, 2, 0, 0)


async def test_partial_report_keeps_the_lease(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    outcome = await report(env, batch, final=False, urls=[batch.urls[0].url])
    assert outcome.lease_held and outcome.handed_back == 0
    s = await status(env)
    assert (s["pages"], s["in_flight"], s["hosts_leased"]) == (1, 2, 1)


async def test_failed_results_are_counted_as_failed(env: dict[str, Any]) -> None:
    await admit(env, ["http://a.test/1"])
    [batch] = await dispatch(env)
    await report(env, batch, outcome=FAILED)
    s = await status(env)
    assert (s["pages"], s["failed"]) == (0, 1)


async def test_reported_links_reach_the_frontier_through_the_stream(env: dict[str, Any]) -> None:
    scheduler: Scheduler = env["scheduler"]
    await admit(env, ["http://a.test/"])
    [batch] = await dispatch(env)
    await report(env, batch, links=["http://a.test/x", "http://a.test/", "http://elsewhere.test/"])
    assert not (await status(env))["finished"]  # the report is unread
    assert await scheduler.read_events() == 1
    s = await status(env)
    assert (s["seen"], s["queued"], s["discarded_scope"]) == (2, 1, 1)


async def test_finished_only_when_nothing_is_left(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    assert not await frontier.check_finished(crawl(env))  # nothing seen yet
    await admit(env, ["http://a.test/"])
    assert not await frontier.check_finished(crawl(env))
    [batch] = await dispatch(env)
    assert not await frontier.check_finished(crawl(env))
    await report(env, batch)
    assert not await frontier.check_finished(crawl(env))  # its report is still unread
    await env["scheduler"].read_events()
    assert await frontier.check_finished(crawl(env))
    s = await status(env)
    assert s["finished"] and s["finished_at"] is not None


async def test_max_pages_caps_admission(env: dict[str, Any]) -> None:
    env["settings"] = env["settings"].replace(max_pages=3)
    assert await admit(env, [f"http://a.test/{i}" for i in range(5)]) == 3
    s = await status(env)
    assert (s["seen"], s["discarded_max_pages"]) == (3, 2)


async def test_seeds_set_the_scope_and_go_through_dedup(env: dict[str, Any]) -> None:
    from crawlfleet.cli.commands import enqueue_seeds

    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts.clear()
    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test/", "http://a.test/"])
    assert await scheduler.read_events() == 1
    assert scheduler.allowed_hosts == {"a.test"}
    assert await env["redis"].smembers(env["keys"].scope_hosts) == {b"a.test"}
    assert (await status(env))["seen"] == 1


async def test_unreadable_event_is_quarantined_and_acknowledged(env: dict[str, Any]) -> None:
    await env["redis"].xadd(env["keys"].events, {"m": b'{"type":"links","v":99}'})
    await env["redis"].xadd(env["keys"].events, {"m": b"not json"})
    assert await env["scheduler"].read_events() == 2
    s = await status(env)
    assert s["events_unread"] == 0 and s["quarantined_events"] == 2
    entries = await env["redis"].xrange(env["keys"].quarantine)
    assert [e[1][b"data"] for e in entries] == [b'{"type":"links","v":99}', b"not json"]
    assert all(e[1][b"source"].startswith(env["keys"].events.encode()) for e in entries)


async def test_scheduler_rereads_its_pending_events_after_a_crash(env: dict[str, Any]) -> None:
    from crawlfleet.cli.commands import enqueue_seeds
    from crawlfleet.common.keys import CONSUMER_GROUP
    from crawlfleet.scheduler.service import CONSUMER

    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test/"])
    # A scheduler reads the event, then dies before its admit script runs.
    await env["redis"].xreadgroup(CONSUMER_GROUP, CONSUMER, {env["keys"].events: ">"}, count=10)
    assert await env["scheduler"].read_events() == 0  # nothing new...
    assert await env["scheduler"].read_events(pending=True) == 1  # ...but it is pending
    assert (await status(env))["seen"] == 1


async def test_a_big_event_is_admitted_in_chunks(env: dict[str, Any]) -> None:
    from crawlfleet.common.frontier import ADMIT_CHUNK

    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts.add("a.test")
    n = ADMIT_CHUNK * 3 + 7
    links = [f"http://a.test/p{i}" for i in range(n)]
    await env["redis"].xadd(env["keys"].events, {"m": encode(Discovered(
        batch_id="x", host="a.test", worker="w", groups=[LinkGroup(1, links)], pages=0,
        failed=0, final=False))})
    calls: list[int] = []
    real = scheduler.frontier.admit_in

    async def counting(pipe: Any, crawl_id: str, admissions: Any, *a: Any, **kw: Any) -> None:
        calls.append(len(admissions))
        await real(pipe, crawl_id, admissions, *a, **kw)

    scheduler.frontier.admit_in = counting  # type: ignore[method-assign]
    assert await scheduler.read_events() == 1
    assert calls == [ADMIT_CHUNK] * 3 + [7]
    s = await status(env)
    assert (s["seen"], s["events_unread"]) == (n, 0)


async def test_per_host_budget_and_query_variants(env: dict[str, Any]) -> None:
    env["settings"] = env["settings"].replace(max_pages_per_host=3, max_query_variants=2)
    assert await admit(env, [f"http://a.test/{i}" for i in range(5)]) == 3
    assert await admit(env, [f"http://b.test/cal?sid={i}" for i in range(4)]) == 2
    s = await status(env)
    assert (s["discarded_host_budget"], s["discarded_query_variants"]) == (2, 2)
    assert s["seen"] == 5


async def test_the_crawl_delay_survives_an_empty_queue(env: dict[str, Any]) -> None:
    """A host's next batch waits for its delay even when its new links arrive after the
    previous batch reported (the queue was empty when the lease was released)."""
    await admit(env, ["http://a.test/"])
    [batch] = await dispatch(env)
    before = time.time()
    await report(env, batch, wait_s=30)
    await admit(env, ["http://a.test/next"])  # the link comes in later
    assert await dispatch(env) == []
    ready_at = await env["redis"].zscore(env["keys"].ready, "a.test")
    assert before + 29 <= ready_at <= time.time() + 31  # on Redis's clock, 30 s on


# -- nothing corrupts the frontier ----------------------------------------------------------

def fixed_key_hosts() -> list[str]:
    """Host names spelled like every fixed key, or its last part (`batch` once collided with
    `lease:batch`), plus names with the key space's own punctuation."""
    names = set()
    for rel in Keys.fixed_names().values():
        names.add(rel.replace(":", "-"))
        names.update(rel.split(":"))
    return sorted(names | {"h", "q", "lease", "fetching", "a%7bb", "xn--bcher-kva"})


async def test_hosts_named_after_every_fixed_key(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    hosts = fixed_key_hosts()
    urls = [f"http://{h}/{i}" for h in hosts for i in range(2)]
    assert await admit(env, urls) == len(urls)
    for round_ in range(4):  # dispatch, lose some leases at first, report: until done
        claimed = await dispatch(env, max_waiting=100)
        for i, c in enumerate(claimed):
            if round_ < 2 and i % 3 == 0:
                await lapse(env, c.host)
            else:
                await report(env, c)
        await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
        await status(env)
    await env["scheduler"].read_events()
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (len(urls), 0, 0)
    assert await frontier.check_finished(crawl(env))
    # Each host's keys are its own, and no fixed key was touched by a host's.
    for name in Keys.fixed_names():
        assert not Keys.fixed_names()[name].startswith("h:")
    assert await env["redis"].type(env["keys"].lease_batch) in (b"hash", b"none")


def test_host_keys_are_injective_and_one_hash_slot() -> None:
    keys = Keys("ns")
    odd = ["a.test", "a}.test", "a{b}.test", "a%7Db.test", "[::1]", "batch", "lease:batch"]
    made = {keys.host_key(h, k) for h in odd for k in ("q", "lease", "fetching")}
    assert len(made) == len(odd) * 3
    fixed = {getattr(keys, name) for name in Keys.fixed_names()}
    assert not made & fixed
    for h in odd:
        key = keys.host_queue(h)
        tag = key[key.index("{") + 1:key.index("}")]  # Redis Cluster's hash tag
        assert tag == key[key.index("{") + 1:key.rindex("}")]


async def test_a_malformed_queue_entry_is_quarantined_and_the_rest_go_on(
    env: dict[str, Any],
) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(3)] + ["http://b.test/"])
    queue = env["keys"].host_queue("a.test")
    await env["redis"].lset(queue, 1, b'{"v":1,"fp":"nope"}')  # an admitted entry, corrupted
    batches = await dispatch(env)
    assert sorted((b.host, len(b.urls)) for b in batches) == [("a.test", 2), ("b.test", 1)]
    s = await status(env)
    assert (s["quarantined"], s["queued"], s["in_flight"]) == (1, 0, 3)
    [entry] = await env["redis"].xrange(env["keys"].quarantine)
    assert entry[1][b"source"] == queue.encode() and entry[1][b"reason"] == b"bad fp"
    assert entry[1][b"counted"] == b"1"


async def test_a_malformed_lease_entry_is_quarantined_at_claim_and_expiry(
    env: dict[str, Any],
) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [waiting] = await dispatch(env, claim=False)
    lease = env["keys"].host_lease("a.test")
    fps = await env["redis"].hkeys(lease)
    await env["redis"].hset(lease, fps[0], b"\xff garbage")
    urls = await frontier.claim(waiting.batch, lease_seconds=-1, job_id="")
    assert urls is not None and len(urls) == 2
    await env["redis"].hset(lease, fps[1], b"[1,2,3]")  # and one more, found by expire
    expired = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    assert (expired.leases, expired.requeued) == (1, 1)
    s = await status(env)
    assert (s["quarantined"], s["queued"], s["in_flight"]) == (2, 1, 0)


async def test_a_corrupted_counter_is_quarantined_not_fatal(env: dict[str, Any]) -> None:
    await env["redis"].hset(env["keys"].stats, "queued", "not-a-number")
    assert await admit(env, ["http://a.test/1"]) == 1  # the script does not fail halfway
    [entry] = await env["redis"].xrange(env["keys"].quarantine)
    assert entry[1][b"data"] == b"not-a-number"
    assert await env["redis"].hget(env["keys"].stats, "queued") == b"1"


async def test_a_failing_script_leaves_redis_as_it_was(env: dict[str, Any]) -> None:
    """Validation comes before the first write: a report into a crawl whose marker is gone
    writes nothing at all."""
    await admit(env, ["http://a.test/1"])
    [batch] = await dispatch(env)
    await env["redis"].delete(env["keys"].crawl)
    before = {k: await env["redis"].type(k) for k in await env["redis"].keys("*")}
    stats = await env["redis"].hgetall(env["keys"].stats)
    with pytest.raises(StateLost):
        await report(env, batch)
    assert {k: await env["redis"].type(k) for k in await env["redis"].keys("*")} == before
    assert await env["redis"].hgetall(env["keys"].stats) == stats


async def test_lost_state_is_noticed_and_never_finishes(env: dict[str, Any]) -> None:
    scheduler: Scheduler = env["scheduler"]
    await admit(env, ["http://a.test/1"])
    [batch] = await dispatch(env)
    old = scheduler.crawl_id
    await env["redis"].flushdb()  # a restart without persistence
    with pytest.raises(StateLost):
        await report(env, batch)
    assert await env["redis"].hlen(env["keys"].stats) == 0  # nothing written into the void
    await scheduler.open_crawl()
    assert scheduler.crawl_id != old
    s = await read_status(env["redis"], env["keys"])
    assert s["state_lost"] and not s["finished"]
    marker = await env["redis"].hgetall(env["keys"].crawl)
    assert marker[b"lost_id"] == old.encode()
    # Re-seeding after the loss crawls again, but never reports a clean finish.
    await admit(env, ["http://a.test/1"])
    [again] = await dispatch(env)
    await report(env, again)
    await scheduler.read_events()
    assert not await scheduler.frontier.check_finished(scheduler.crawl_id)
    s = await status(env)
    assert s["pages"] == 1 and s["state_lost"] and not s["finished"]


async def test_dispatch_writes_a_job_arq_can_read(env: dict[str, Any]) -> None:
    await admit(env, ["http://a.test/1"])
    [claimed] = await dispatch(env, claim=False)  # jobs() decodes with arq's deserialize_job
    raw = await env["redis"].get(env["keys"].arq_job(claimed.batch.batch_id))
    assert msgspec.json.decode(raw)["k"] == {}
    assert claimed.batch.crawl == crawl(env) and claimed.batch.host == "a.test"
    assert claimed.batch.batch_id.startswith("t:b")


async def test_links_only_to_80_443_and_the_seeds_ports(env: dict[str, Any]) -> None:
    from crawlfleet.cli.commands import enqueue_seeds

    scheduler: Scheduler = env["scheduler"]
    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test:8080/"])
    await scheduler.read_events()
    admissions, refused, _ = await scheduler.admissions([(1, [
        "http://a.test:8080/x", "http://a.test/y", "https://a.test/z", "http://a.test:6379/",
    ])])
    assert sorted(a.entry.decode().split('"url":"')[1].split('"')[0] for a in admissions) == [
        "http://a.test/y", "http://a.test:8080/x", "https://a.test/z"]
    assert refused == 1
    # A new scheduler (a standby taking over) knows the seeds' ports from Redis.
    standby = Scheduler(env["settings"], env["redis"])
    await standby.lead(_stopped())
    assert standby.seed_ports == {8080}


def _stopped() -> Any:
    import asyncio

    stop = asyncio.Event()
    stop.set()
    return stop
