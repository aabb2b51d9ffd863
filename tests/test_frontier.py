"""The frontier's commands (common/commands/*.lua through common/frontier.py), each on the
embedded backend (fakeredis) and on a real redis-server (conftest's private one, in a database
of its own; never the machine's 6379). Every ``status`` read also runs ``crawlfleet check``'s
comparison, so the structures agree with the counters after every step.

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

from crawlfleet.common.check import collect, compare, structure_counts
from crawlfleet.common.commands import _constants, _read
from crawlfleet.common.connections import open_redis
from crawlfleet.common.frontier import (
    ALIAS,
    DEAD,
    FAILED,
    PAGE,
    RETRY,
    SKIPPED,
    Admission,
    Frontier,
    Limits,
    Progress,
    ProgressOutcome,
    StateLost,
    StoredResult,
)
from crawlfleet.common.keys import Keys, seen_digits
from crawlfleet.common.messages import (
    HostBatch,
    PageResult,
    QueuedURL,
    Seeds,
    batch_from_job,
    decode_entry,
    decode_result,
    encode,
    job_deserializer,
)
from crawlfleet.common.resultlog import results_by_fp
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import COUNTERS, DISCARDS, accounted, read_status
from crawlfleet.common.urls import canonicalize, fingerprint, host_key
from crawlfleet.scheduler.service import Scheduler

REAL_DB = 3  # these tests' database on the shared test redis-server (integration tests use 0)


@dataclass
class Claimed:
    batch: HostBatch
    urls: list[QueuedURL]

    @property
    def host(self) -> str:
        return self.batch.host


@pytest.fixture(params=["embedded", "redis"])
def redis_url(request: pytest.FixtureRequest) -> str:
    if request.param == "embedded":
        return f"embedded://{uuid.uuid4().hex}"
    server = request.getfixturevalue("redis_server")
    return f"redis://127.0.0.1:{server.port}/{REAL_DB}"


@pytest.fixture
async def env(redis_url: str) -> AsyncIterator[dict[str, Any]]:
    settings = Settings(redis_url=redis_url, namespace="t", batch_size=3)
    redis = open_redis(settings.redis_url)
    await redis.flushdb()  # what an earlier test left in the real server's database
    keys = Keys(settings.namespace)
    scheduler = Scheduler(settings, redis)
    await scheduler.open_crawl()
    yield {"settings": settings, "redis": redis, "keys": keys, "scheduler": scheduler,
           "frontier": scheduler.frontier, "real": not redis_url.startswith("embedded://")}
    await redis.flushdb()
    await redis.aclose()


def crawl(env: dict[str, Any]) -> str:
    return str(env["scheduler"].crawl_id)


def limits(env: dict[str, Any]) -> Limits:
    s: Settings = env["settings"]
    return Limits(s.max_pages, s.max_pages_per_host, s.max_query_variants)


async def admit(env: dict[str, Any], urls: list[str], depth: int = 0) -> int:
    """Seeds' way in: the scheduler's scope check, then admit.lua."""
    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts |= {host_key(canonicalize(u)) for u in urls}
    scheduler.limits = limits(env)
    admissions, _, _ = await scheduler.admissions([(depth, urls)])
    return int(await env["frontier"].admit(crawl(env), admissions, scheduler.limits))


def admissions_of(urls: list[str], depth: int = 1) -> list[Admission]:
    """Links as a worker sends them in a progress call (its own scope check passed)."""
    return [Admission.of(canonicalize(u), host_key(canonicalize(u)), depth) for u in urls]


async def checked(env: dict[str, Any]) -> dict[str, int]:
    """`crawlfleet check` on the current state: no problem; what the structures hold."""
    snap = await collect(env["redis"], env["keys"])
    problems = compare(snap)
    assert problems == [], "\n".join(str(p) for p in problems)
    return structure_counts(snap)


async def status(env: dict[str, Any]) -> dict[str, Any]:
    s = await read_status(env["redis"], env["keys"])
    assert accounted(s), s
    assert all(s[k] >= 0 for k in ("seen", "pages", "failed", "queued", "in_flight")), s
    await checked(env)
    return s


def counters(s: dict[str, Any]) -> dict[str, int]:
    return {k: s[k] for k in (*COUNTERS, *DISCARDS, "retries")}


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
        claimed = await env["frontier"].claim(b, lease_seconds=lease_seconds, job_id=b.batch_id)
        assert claimed is not None
        out.append(Claimed(b, claimed.urls))
    return out


async def lapse(env: dict[str, Any], host: str) -> None:
    """The worker holding ``host``'s lease vanished and the lease ran out."""
    await env["redis"].zadd(env["keys"].leases, {host: 0}, xx=True)


def result_for(url: str, error: str | None = None) -> PageResult:
    return PageResult(url=url, final_url=url, status=200 if error is None else 500,
                      content_type="text/html", depth=0, title="t", links=0, bytes=1,
                      elapsed_ms=1.0, fetched_at=time.time(), error=error)


ERRORS = {PAGE: None, SKIPPED: "robots", FAILED: "http_4xx", DEAD: "http_5xx"}


def results_for(claimed: Claimed, urls: list[str] | None = None,
                outcome: str = PAGE) -> list[StoredResult]:
    chosen = [u for u in claimed.urls if urls is None or u.url in urls]
    return [StoredResult(u.fp, outcome, encode(result_for(u.url, ERRORS[outcome])))
            for u in chosen]


async def progress(env: dict[str, Any], claimed: Claimed, **fields: Any) -> ProgressOutcome:
    frontier: Frontier = env["frontier"]
    return await frontier.progress(claimed.batch, Progress(**fields), limits(env))


async def report(env: dict[str, Any], claimed: Claimed, *, final: bool = True,
                 urls: list[str] | None = None, links: list[str] | None = None,
                 wait_s: float = 0.0, outcome: str = PAGE) -> ProgressOutcome:
    """A worker's call with results (its pages' links scope-checked as the scheduler does)."""
    admissions, refused, invalid = await env["scheduler"].admissions([(1, links or [])])
    return await progress(env, claimed, results=results_for(claimed, urls, outcome),
                          admissions=admissions, discarded_scope=refused,
                          discarded_invalid=invalid, final=final, wait_s=wait_s)


async def queue_urls(env: dict[str, Any], host: str) -> list[str]:
    raws = await env["redis"].lrange(env["keys"].host_queue(host), 0, -1)
    return [decode_entry(raw).url for raw in raws]


async def lease_fps(env: dict[str, Any], host: str) -> set[str]:
    return {f.decode() for f in await env["redis"].hkeys(env["keys"].host_lease(host))}


async def marks(env: dict[str, Any], host: str) -> set[str]:
    return {f.decode() for f in await env["redis"].smembers(env["keys"].host_fetching(host))}


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


async def test_the_claim_tells_the_worker_the_seen_digits_and_the_scope_size(
    env: dict[str, Any],
) -> None:
    from crawlfleet.cli.seed import enqueue_seeds

    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test:8080/", "http://b.test/"])
    assert await env["scheduler"].read_events() == 1
    [waiting, _] = sorted(await dispatch(env, claim=False), key=lambda c: c.host)
    claim = await env["frontier"].claim(waiting.batch, lease_seconds=60, job_id="")
    assert claim is not None
    assert [u.url for u in claim.urls] == ["http://a.test:8080/"]
    assert claim.seen_digits == 3  # the crawl marker's, for ~1 M expected URLs
    # What the worker re-reads its scope by: the seeds' two hosts and two ports (8080, 80).
    redis, keys = env["redis"], env["keys"]
    assert await redis.smembers(keys.scope_ports) == {b"80", b"8080"}
    assert claim.scope_size == 4 == await redis.scard(keys.scope_hosts) + 2
    await status(env)


async def test_an_expired_lease_charges_only_the_marked_urls(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [first] = await dispatch(env, lease_seconds=60)
    assert (await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)).leases == 0
    assert (await progress(env, first, marks=[first.urls[1].fp])).lease_held
    await lapse(env, "a.test")
    expired = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    assert (expired.leases, expired.requeued, expired.given_up) == (1, 3, 0)
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["leases_expired"]) == (3, 0, 1)
    [again] = await dispatch(env)
    # Only the marked one is charged. (A lease is a hash: on a real Redis its entries, longer
    # than hash-max-listpack-value, come back in no particular order.)
    assert {u.fp: u.tries for u in again.urls} == {
        u.fp: int(u.fp == first.urls[1].fp) for u in first.urls}
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["failed"]) == (0, 3, 0)


async def test_a_page_that_keeps_losing_its_worker_fails_as_worker_lost(
    env: dict[str, Any],
) -> None:
    """On a real Redis too: cjson writes an empty list as {}, so the result must still decode
    as a PageResult."""
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    # The poison page: marked at every loss, it fails as worker_lost after three.
    poison = batch.urls[0]
    for loss in range(1, 4):
        assert (await progress(env, batch, marks=[poison.fp])).lease_held
        await lapse(env, "a.test")
        expired = await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
        assert expired.given_up == (1 if loss == 3 else 0)
        [batch] = await dispatch(env)
        if loss < 3:
            assert next(u for u in batch.urls if u.fp == poison.fp).tries == loss
    assert all(u.tries == 0 for u in batch.urls)  # the others were never charged
    stored = decode_result((await results_by_fp(env["redis"], env["keys"]))[poison.fp])
    assert stored.error == "worker_lost" and stored.url == poison.url
    assert decode_result((await results_by_fp(env["redis"], env["keys"]))[poison.fp]).dead
    s = await status(env)
    assert (s["failed"], s["queued"], s["in_flight"], s["dead"]) == (1, 0, 2, 1)


async def test_marks_are_set_only_under_a_held_lease(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    fps = [u.fp for u in batch.urls]
    assert (await progress(env, batch, marks=fps[:2])).lease_held
    assert await marks(env, "a.test") == set(fps[:2])
    # A result takes its URL's mark away.
    await progress(env, batch, results=results_for(batch, [batch.urls[0].url]))
    assert await marks(env, "a.test") == {fps[1]}
    # A final call sets none (nothing more will be fetched) and clears the set.
    final = await progress(env, batch, marks=[fps[2]], final=True)
    assert final.lease_held and final.handed_back == 2
    assert not await env["redis"].exists(env["keys"].host_fetching("a.test"))
    # The old batch, stale now, sets none in the new lease; the new holder does.
    [new] = await dispatch(env)
    stale = await progress(env, batch, marks=fps[1:])
    assert not stale.lease_held
    assert await marks(env, "a.test") == set()
    assert (await progress(env, new, marks=[new.urls[0].fp])).lease_held
    assert await marks(env, "a.test") == {new.urls[0].fp}
    await status(env)


async def test_a_refill_marks_its_first_urls_which_a_lost_lease_charges(
    env: dict[str, Any],
) -> None:
    """The refill's first ``mark_refill`` URLs are marked in the same call: the worker starts
    them next without another call, and a lease that runs out charges them like any mark."""
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(2)])
    [batch] = await dispatch(env)
    await admit(env, [f"http://a.test/more{i}" for i in range(4)])
    outcome = await progress(env, batch, marks=[batch.urls[0].fp], want=3, mark_refill=2)
    assert outcome.lease_held and len(outcome.refill) == 3
    refilled = [u.fp for u in outcome.refill]
    assert await marks(env, "a.test") == {batch.urls[0].fp, *refilled[:2]}
    assert refilled[2] in await lease_fps(env, "a.test")
    # The last queued URL comes marked; the call's own mark lands beside it.
    last = await progress(env, batch, marks=[refilled[2]], want=5, mark_refill=5)
    assert len(last.refill) == 1
    marked = {batch.urls[0].fp, *refilled, last.refill[0].fp}
    assert await marks(env, "a.test") == marked
    await lapse(env, "a.test")
    assert (await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)).leases == 1
    raws = await env["redis"].lrange(env["keys"].host_queue("a.test"), 0, -1)
    tries = {decode_entry(raw).fp: decode_entry(raw).tries for raw in raws}
    assert len(tries) == 6 and {fp for fp, n in tries.items() if n} == marked
    # A final call marks nothing, refill or not.
    [again] = await dispatch(env)
    await progress(env, again, want=2, mark_refill=2, final=True)
    assert not await env["redis"].exists(env["keys"].host_fetching("a.test"))
    await status(env)


async def test_a_lost_lease_stops_fetching(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, ["http://a.test/1"])
    [claimed] = await dispatch(env)
    await lapse(env, "a.test")
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    outcome = await progress(env, claimed, marks=[claimed.urls[0].fp])
    assert not outcome.lease_held  # the worker learns it must stop
    assert not await env["redis"].exists(env["keys"].host_fetching("a.test"))
    assert not await frontier.renew(claimed.batch, lease_seconds=60)


async def test_a_stale_worker_stores_nothing_and_its_links_are_admitted(
    env: dict[str, Any],
) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [old] = await dispatch(env, lease_seconds=-1)
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)
    [new] = await dispatch(env)
    leased = await lease_fps(env, "a.test")
    before = counters(await status(env))

    # The old holder wakes up and reports a page with its links: the page is the new holder's
    # to fetch and store; the links are real, and admitted.
    stale = await report(env, old, final=False, urls=[old.urls[0].url],
                         links=["http://a.test/new"])
    assert not stale.lease_held
    assert (stale.stored, stale.handed_back, stale.admitted, stale.refill) == (0, 0, 1, [])
    assert await env["redis"].xlen(env["keys"].results) == 0
    assert await lease_fps(env, "a.test") == leased  # the new lease is untouched
    after = counters(await status(env))
    assert {k: after[k] - before[k] for k in after if after[k] != before[k]} == {
        "seen": 1, "queued": 1}
    # A final call from it releases nothing either.
    stale = await report(env, old, urls=[u.url for u in old.urls])
    assert not stale.lease_held and (stale.stored, stale.handed_back) == (0, 0)
    assert await env["redis"].hget(env["keys"].lease_batch, "a.test") == new.batch.batch_id.encode()

    fresh = await report(env, new)
    assert fresh.lease_held and fresh.stored == 3
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"], s["hosts_leased"]) == (3, 1, 0, 0)
    assert await env["redis"].xlen(env["keys"].results) == 3


async def test_a_stale_worker_leaves_requeued_urls_in_the_queue(env: dict[str, Any]) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, ["http://a.test/1", "http://a.test/2"])
    [old] = await dispatch(env, lease_seconds=-1)
    await frontier.expire(crawl(env), max_losses=3, claim_timeout=60)  # both back in queue
    queued = await queue_urls(env, "a.test")
    before = counters(await status(env))
    stale = await report(env, old)  # the old holder reports both while they wait in the queue
    assert not stale.lease_held and stale.stored == 0
    assert counters(await status(env)) == before
    assert await queue_urls(env, "a.test") == queued
    assert await env["redis"].zscore(env["keys"].ready, "a.test") is not None
    [again] = await dispatch(env)  # fetched again, by the lease's new holder
    assert sorted(u.url for u in again.urls) == sorted(queued)
    await report(env, again)
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (2, 0, 0)
    assert await frontier.check_finished(crawl(env))


async def test_a_repeated_call_stores_nothing_twice(env: dict[str, Any]) -> None:
    """A call whose answer was lost (a dropped connection) is sent again."""
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    first = await report(env, batch, final=False, urls=[batch.urls[0].url])
    assert first.stored == 1
    stored = await results_by_fp(env["redis"], env["keys"])
    before = counters(await status(env))
    again = await report(env, batch, final=False, urls=[batch.urls[0].url])
    assert again.lease_held and again.stored == 0
    assert counters(await status(env)) == before
    assert await results_by_fp(env["redis"], env["keys"]) == stored
    # The final call, repeated: the first released the lease, the second is stale.
    assert (await report(env, batch)).stored == 2
    before = counters(await status(env))
    repeated = await report(env, batch)
    assert not repeated.lease_held and (repeated.stored, repeated.handed_back) == (0, 0)
    assert counters(await status(env)) == before
    assert before["pages"] == 3


async def test_a_final_call_hands_back_to_the_front_of_the_queue(env: dict[str, Any]) -> None:
    redis, keys = env["redis"], env["keys"]
    await admit(env, [f"http://a.test/{i}" for i in range(5)])
    [batch] = await dispatch(env)
    behind = await queue_urls(env, "a.test")
    assert len(behind) == 2
    await progress(env, batch, marks=[u.fp for u in batch.urls])
    outcome = await progress(env, batch, results=results_for(batch, [batch.urls[0].url]),
                             final=True, want=5)
    assert outcome.lease_held
    assert (outcome.stored, outcome.handed_back, outcome.refill) == (1, 2, [])
    queue = await queue_urls(env, "a.test")
    assert sorted(queue[:2]) == sorted(u.url for u in batch.urls[1:]) and queue[2:] == behind
    assert all(decode_entry(e).tries == 0 for e in await redis.lrange(keys.host_queue("a.test"),
                                                                       0, -1))
    # The lease is released whole, and the host is ready for its next turn.
    assert await redis.hget(keys.lease_batch, "a.test") is None
    assert await redis.zscore(keys.leases, "a.test") is None
    assert not await redis.exists(keys.host_lease("a.test"), keys.host_fetching("a.test"))
    assert await redis.zscore(keys.ready, "a.test") is not None
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"], s["hosts_leased"]) == (1, 4, 0, 0)
    [again] = await dispatch(env)
    assert sorted(u.url for u in again.urls) == sorted(queue[:3])


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


async def test_every_outcome_lands_where_it_says(env: dict[str, Any]) -> None:
    redis, keys = env["redis"], env["keys"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [batch] = await dispatch(env)
    skipped, dead, retried = batch.urls
    again = msgspec.structs.replace(retried, retries=retried.retries + 1)
    moved = "http://a.test/moved"  # a redirect's target, fetched on skipped's behalf
    outcome = await progress(env, batch, results=[
        *results_for(batch, [skipped.url], SKIPPED),
        *results_for(batch, [dead.url], DEAD),
        StoredResult(retried.fp, RETRY, encode(again)),
        StoredResult(fingerprint(moved), ALIAS, encode(result_for(moved))),
        StoredResult(skipped.fp, ALIAS, encode(result_for(skipped.url))),  # known: left alone
    ])
    assert outcome.lease_held and outcome.stored == 3
    s = await status(env)
    assert (s["seen"], s["pages"], s["skipped"], s["failed"], s["retries"]) == (4, 1, 1, 1, 1)
    assert (s["queued"], s["in_flight"], s["dead"]) == (1, 0, 1)
    assert decode_result((await results_by_fp(redis, keys))[dead.fp]).dead
    assert decode_result((await results_by_fp(redis, keys))[skipped.fp]).error == "robots"
    [entry] = await redis.lrange(keys.host_queue("a.test"), 0, -1)
    assert decode_entry(entry) == again
    assert await env["frontier"].is_seen(fingerprint(moved), 3)


async def test_links_are_admitted_in_the_progress_call(env: dict[str, Any]) -> None:
    await admit(env, ["http://a.test/"])
    [batch] = await dispatch(env)
    outcome = await report(env, batch, links=["http://a.test/x", "http://a.test/",
                                              "http://elsewhere.test/", "notaurl"])
    assert outcome.admitted == 1
    assert await env["redis"].xlen(env["keys"].events) == 0  # nothing goes by the stream
    s = await status(env)
    assert (s["seen"], s["queued"], s["discarded_scope"], s["discarded_invalid"]) == (2, 1, 1, 1)


async def test_a_progress_call_admits_links_of_its_own_host_and_others(
    env: dict[str, Any],
) -> None:
    redis, keys = env["redis"], env["keys"]
    await admit(env, ["http://a.test/"])
    [batch] = await dispatch(env)
    links = admissions_of(["http://a.test/x", "http://a.test/y", "http://b.test/",
                           "http://a.test/x", "http://a.test/"])
    junk = Admission("not-a-fingerprint", "a.test", b"{}")
    outcome = await progress(env, batch, admissions=[*links, junk], discarded_scope=2,
                             discarded_invalid=1)
    assert outcome.admitted == 3  # the second x and the leased a.test/ are known
    assert await queue_urls(env, "a.test") == ["http://a.test/x", "http://a.test/y"]
    assert await queue_urls(env, "b.test") == ["http://b.test/"]
    # The leased host is not ready (its holder refills from its queue); the other one is.
    assert await redis.zscore(keys.ready, "a.test") is None
    assert await redis.zscore(keys.ready, "b.test") is not None
    s = await status(env)
    assert (s["seen"], s["queued"], s["in_flight"]) == (4, 3, 1)
    assert (s["discarded_scope"], s["discarded_invalid"]) == (2, 2)
    assert await redis.hget(keys.host_pages, "a.test") == b"3"
    assert await redis.hget(keys.host_pages, "b.test") == b"1"
    # The same links again (the worker's link cache forgot them): nothing new.
    assert (await progress(env, batch, admissions=links)).admitted == 0
    assert (await status(env))["seen"] == 4
    # The host's own links are its holder's refill.
    refill = await progress(env, batch, want=5)
    assert [u.url for u in refill.refill] == ["http://a.test/x", "http://a.test/y"]
    assert await redis.zscore(keys.ready, "a.test") is None
    await status(env)


@pytest.mark.parametrize("via", ["admit", "progress"])
async def test_budgets_refuse_alike_in_admit_and_progress(env: dict[str, Any], via: str) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, ["http://z.test/"])
    [holder] = await dispatch(env)

    async def send(urls: list[str], budget: Limits) -> int:
        admissions = admissions_of(urls)
        if via == "admit":
            return await frontier.admit(crawl(env), admissions, budget)
        outcome = await frontier.progress(holder.batch, Progress(admissions=admissions), budget)
        assert outcome.lease_held
        return outcome.admitted

    per_host = Limits(max_pages_per_host=3, max_query_variants=2)
    assert await send([f"http://a.test/{i}" for i in range(5)], per_host) == 3
    assert await send([f"http://b.test/cal?sid={i}" for i in range(4)], per_host) == 2
    total = Limits(max_pages=7)  # 6 seen so far
    assert await send([f"http://c.test/{i}" for i in range(3)], total) == 1
    s = await status(env)
    assert (s["discarded_host_budget"], s["discarded_query_variants"]) == (2, 2)
    assert (s["seen"], s["discarded_max_pages"]) == (7, 2)
    # A URL already in the crawl is no refusal, whatever the budget.
    assert await send(["http://a.test/0", "http://c.test/0"], total) == 0
    assert counters(await status(env)) == counters(s)


async def test_a_refill_moves_entries_from_the_queue_into_the_lease(env: dict[str, Any]) -> None:
    redis, keys = env["redis"], env["keys"]
    await admit(env, [f"http://a.test/{i}" for i in range(8)])
    [batch] = await dispatch(env)  # 3 in the lease, 5 queued
    queued = [decode_entry(e) for e in await redis.lrange(keys.host_queue("a.test"), 0, -1)]
    before = await status(env)
    outcome = await progress(env, batch, want=2)
    assert outcome.lease_held and outcome.refill == queued[:2]
    s = await status(env)
    assert (s["queued"], s["in_flight"]) == (before["queued"] - 2, before["in_flight"] + 2)
    structures = await checked(env)
    assert (structures["queued"], structures["in_flight"]) == (3, 5)
    assert await lease_fps(env, "a.test") == {u.fp for u in batch.urls + queued[:2]}
    assert await queue_urls(env, "a.test") == [u.url for u in queued[2:]]
    # More than the queue holds: what it holds. Then an empty queue gives nothing.
    rest = await progress(env, batch, want=10)
    assert rest.refill == queued[2:]
    assert not await redis.exists(keys.host_queue("a.test"))
    assert (await progress(env, batch, want=5)).refill == []
    s = await status(env)
    assert (s["queued"], s["in_flight"]) == (0, 8)
    # The refilled URLs are the batch's own: reported and stored like the rest.
    everything = Claimed(batch.batch, batch.urls + queued)
    assert (await report(env, everything)).stored == 8
    assert await env["frontier"].check_finished(crawl(env))


async def test_a_stale_batch_gets_no_refill(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(5)])
    [old] = await dispatch(env, lease_seconds=-1)
    await env["frontier"].expire(crawl(env), max_losses=3, claim_timeout=60)
    before = await queue_urls(env, "a.test")
    outcome = await progress(env, old, want=2)
    assert not outcome.lease_held and outcome.refill == []
    assert await queue_urls(env, "a.test") == before
    await status(env)


async def test_a_long_turn_yields_its_refill_to_other_ready_hosts(env: dict[str, Any]) -> None:
    redis, ready = env["redis"], env["keys"].ready
    await admit(env, [f"http://a.test/{i}" for i in range(8)])
    [a] = await dispatch(env)  # 5 left in a.test's queue
    await admit(env, ["http://b.test/"])  # b.test is ready now
    yielded = await progress(env, a, want=2, yield_to_others=True)
    assert yielded.lease_held and yielded.refill == []
    s = await status(env)
    assert (s["queued"], s["in_flight"]) == (6, 3)
    # A host ready only later (its crawl delay) is not waiting yet.
    await redis.zadd(ready, {"b.test": time.time() + 3600}, xx=True)
    assert len((await progress(env, a, want=2, yield_to_others=True)).refill) == 2
    await redis.zadd(ready, {"b.test": 0}, xx=True)
    assert (await progress(env, a, want=1, yield_to_others=True)).refill == []
    assert len((await progress(env, a, want=1)).refill) == 1  # a turn not long yet
    # Once b.test is out in its own batch, no other host is ready: the long turn goes on.
    [b] = await dispatch(env)
    assert b.host == "b.test" and await redis.zcard(ready) == 0
    assert len((await progress(env, a, want=5, yield_to_others=True)).refill) == 2
    s = await status(env)
    assert (s["queued"], s["in_flight"]) == (0, 9)


async def test_a_host_short_of_slots_goes_to_a_hungry_worker_one_per_unit(
    env: dict[str, Any],
) -> None:
    redis, hungry = env["redis"], env["keys"].hungry
    await admit(env, [f"http://a.test/{i}" for i in range(12)])
    [a] = await dispatch(env)  # 9 left in a.test's queue
    # Nobody asked for hosts: a worker short of slots keeps its host.
    kept = await progress(env, a, want=1, short_of_slots=True)
    assert len(kept.refill) == 1 and not kept.handed_over
    await redis.set(hungry, 2, px=60_000)
    # A worker with free slots keeps refilling whatever others ask.
    assert len((await progress(env, a, want=1)).refill) == 1
    assert int(await redis.get(hungry)) == 2
    # Short of slots: no refill, and the idle worker's count goes down by one each time.
    outcome = await progress(env, a, want=1, short_of_slots=True)
    assert outcome.lease_held and outcome.handed_over and outcome.refill == []
    assert int(await redis.get(hungry)) == 1
    assert 0 < await redis.pttl(hungry) <= 60_000  # its expiry stays
    assert (await progress(env, a, want=1, short_of_slots=True)).refill == []
    assert int(await redis.get(hungry)) == 0
    assert len((await progress(env, a, want=1, short_of_slots=True)).refill) == 1
    # A value that is not a count is no request, and the call still succeeds.
    for garbage in ("garbage", "inf", "nan", "1.5", "1e300"):
        await redis.set(hungry, garbage)
        kept = await progress(env, a, want=1, short_of_slots=True)
        assert len(kept.refill) == 1 and not kept.handed_over, garbage
        assert (await redis.get(hungry)).decode() == garbage
    # Both flags: either reason stops the refill.
    await redis.set(hungry, 1)
    assert (await progress(env, a, want=1, short_of_slots=True,
                           yield_to_others=True)).refill == []
    s = await status(env)
    assert (s["queued"], s["in_flight"]) == (1, 11)


async def test_finished_only_when_nothing_is_left(env: dict[str, Any]) -> None:
    from crawlfleet.cli.seed import enqueue_seeds

    frontier: Frontier = env["frontier"]
    assert not await frontier.check_finished(crawl(env))  # nothing admitted yet
    await admit(env, ["http://a.test/"])
    assert not await frontier.check_finished(crawl(env))
    [batch] = await dispatch(env)
    assert not await frontier.check_finished(crawl(env))
    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test/"])
    await report(env, batch)
    assert not await frontier.check_finished(crawl(env))  # a seed event is unread
    await env["scheduler"].read_events()
    assert await frontier.check_finished(crawl(env))
    s = await status(env)
    assert s["finished"] and s["finished_at"] is not None
    assert await env["redis"].hexists(env["keys"].crawl, "admitted_at")


async def test_admitted_at_is_the_first_admission_and_stays(env: dict[str, Any]) -> None:
    """progress.lua and admit.lua read admitted_at with the crawl marker and write it only
    when it is missing: later admissions, by either, leave the first time as it is."""
    redis, keys = env["redis"], env["keys"]
    await admit(env, ["http://a.test/"])
    first = await redis.hget(keys.crawl, "admitted_at")
    assert first is not None
    [batch] = await dispatch(env)
    assert (await progress(env, batch, admissions=admissions_of(["http://a.test/x"]))).admitted
    assert await admit(env, ["http://b.test/"]) == 1
    assert await redis.hget(keys.crawl, "admitted_at") == first
    # Gone (a hand edit), the next admission sets it again.
    await redis.hdel(keys.crawl, "admitted_at")
    assert await admit(env, ["http://c.test/"]) == 1
    assert float(await redis.hget(keys.crawl, "admitted_at")) >= float(first)


async def test_max_pages_caps_admission(env: dict[str, Any]) -> None:
    env["settings"] = env["settings"].replace(max_pages=3)
    assert await admit(env, [f"http://a.test/{i}" for i in range(5)]) == 3
    s = await status(env)
    assert (s["seen"], s["discarded_max_pages"]) == (3, 2)


async def test_seeds_set_the_scope_and_go_through_dedup(env: dict[str, Any]) -> None:
    from crawlfleet.cli.seed import enqueue_seeds

    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts.clear()
    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test/", "http://a.test/"])
    assert await scheduler.read_events() == 1
    assert scheduler.allowed_hosts == {"a.test"}
    assert await env["redis"].smembers(env["keys"].scope_hosts) == {b"a.test"}
    assert (await status(env))["seen"] == 1


async def test_unreadable_event_is_quarantined_and_acknowledged(env: dict[str, Any]) -> None:
    # An old worker's link report (the stream carries only seeds now), and junk.
    await env["redis"].xadd(env["keys"].events, {"m": b'{"type":"links","v":1}'})
    await env["redis"].xadd(env["keys"].events, {"m": b"not json"})
    await env["redis"].xadd(env["keys"].events, {"m": b'{"type":"seeds","v":99,"urls":[]}'})
    assert await env["scheduler"].read_events() == 3
    s = await status(env)
    assert s["events_unread"] == 0 and s["quarantined_events"] == 3
    entries = await env["redis"].xrange(env["keys"].quarantine)
    assert [e[1][b"data"] for e in entries] == [
        b'{"type":"links","v":1}', b"not json", b'{"type":"seeds","v":99,"urls":[]}']
    assert all(e[1][b"source"].startswith(env["keys"].events.encode()) for e in entries)


async def test_scheduler_rereads_its_pending_events_after_a_crash(env: dict[str, Any]) -> None:
    from crawlfleet.cli.seed import enqueue_seeds
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
    n = ADMIT_CHUNK * 3 + 7
    seeds = [f"http://a.test/p{i}" for i in range(n)]
    await env["redis"].xadd(env["keys"].events, {"m": encode(Seeds(urls=seeds))})
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


# -- the seen set ---------------------------------------------------------------------------

def test_seen_digits_grow_with_the_expected_crawl() -> None:
    assert [seen_digits(n) for n in (1, 384 * 16**3, 384 * 16**3 + 1, 10**8)] == [3, 3, 4, 5]
    assert seen_digits(10**15) == 8  # the most: past it buckets grow, still exact


@pytest.mark.parametrize("digits", [3, 5, 8])
def test_a_seen_slot_round_trips(digits: int) -> None:
    keys = Keys("ns")
    for fp in ("0000000000000000", "ffffffffffffffff", "0123456789abcdef", "abc0000000000001"):
        bucket, member = keys.seen_slot(fp, digits)
        assert bucket == f"ns:seen:{fp[:digits]}" and member < 2**52
        assert keys.seen_fp(bucket, member) == fp
        assert keys.seen_fp(bucket, str(member)) == fp  # as Redis answers it


async def test_the_seen_set_is_buckets_of_intsets(env: dict[str, Any]) -> None:
    redis, keys, frontier = env["redis"], env["keys"], env["frontier"]
    digits = int(await redis.hget(keys.crawl, "seen_digits"))
    assert digits == 3
    urls = [f"http://a.test/p{i}" for i in range(2000)]
    # Half as seeds (admit.lua), half as a worker's links (progress.lua); and the edges of
    # the member's range, which Lua must split exactly as Python does.
    assert await admit(env, urls[:1000]) == 1000
    [holder] = await dispatch(env)
    edges = [Admission.of("http://a.test/low", "a.test", 1, fp="fff0000000000000"),
             Admission.of("http://a.test/high", "a.test", 1, fp="000fffffffffffff")]
    outcome = await progress(env, holder, admissions=[*admissions_of(urls[1000:]), *edges])
    assert outcome.admitted == 1002
    expected = {fingerprint(u) for u in urls} | {"fff0000000000000", "000fffffffffffff"}

    found: set[str] = set()
    buckets = [k.decode() async for k in redis.scan_iter(match=keys.seen_pattern)]
    for bucket in buckets:
        assert len(bucket) == len(keys.seen) + digits
        members = await redis.smembers(bucket)
        found |= {keys.seen_fp(bucket, m.decode()) for m in members}
    assert found == expected and len(buckets) > 1000  # spread over the 4,096 buckets
    if env["real"]:  # fakeredis has no OBJECT ENCODING
        encodings = {await redis.object("encoding", b) for b in buckets}
        assert encodings == {b"intset"}
    for fp in sorted(expected)[:50]:
        bucket, member = keys.seen_slot(fp, digits)
        assert await redis.sismember(bucket, member)
        assert await frontier.is_seen(fp, digits)
    assert not await frontier.is_seen(fingerprint("http://a.test/never"), digits)
    s = await status(env)
    assert s["seen"] == 2002 and (await checked(env))["seen"] == 2002


async def test_the_crawl_chooses_its_seen_digits_once(env: dict[str, Any]) -> None:
    """A big crawl gets more buckets; the digits are fixed when it opens, so every process
    splits fingerprints alike afterwards."""
    keys = Keys("big")
    frontier = Frontier(env["redis"], keys)
    marker = await frontier.open_crawl(expected_urls=10**8)
    assert (marker.state, marker.seen_digits) == ("new", 5)
    again = await frontier.open_crawl(marker.id, expected_urls=10)
    assert (again.state, again.seen_digits) == ("ok", 5)
    url = "http://a.test/"
    assert await frontier.admit(marker.id, admissions_of([url]), Limits()) == 1
    fp = fingerprint(url)
    assert [k.decode() async for k in env["redis"].scan_iter(match=keys.seen_pattern)] == [
        keys.seen + fp[:5]]
    assert await frontier.is_seen(fp, 5)
    assert not await frontier.is_seen(fp, 3)  # another split finds nothing


# -- nothing corrupts the frontier ----------------------------------------------------------

def fixed_key_hosts() -> list[str]:
    """Host names spelled like every fixed key, or its parts (`batch` once collided with
    `lease:batch`), plus names with the key space's own punctuation."""
    names = set()
    for rel in Keys.fixed_names().values():
        names.add(rel.strip(":").replace(":", "-"))
        names.update(part for part in rel.split(":") if part)
    return sorted(names | {"h", "q", "lease", "fetching", "a%7bb", "xn--bcher-kva", "seen-abc"})


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
    assert not any(key.startswith(keys.seen) for key in made)  # nor a seen bucket
    for h in odd:
        key = keys.host_queue(h)
        tag = key[key.index("{") + 1:key.index("}")]  # Redis Cluster's hash tag
        assert tag == key[key.index("{") + 1:key.rindex("}")]


async def test_entry_fp_reads_every_entry_as_the_full_decode_does(env: dict[str, Any]) -> None:
    """lib.lua reads an entry's fp with one pattern when the entry is spelled exactly as
    common.messages encodes it, and decodes it by name otherwise: both ways must agree on
    every entry, valid or not (a fp, or a refusal)."""
    fp = fingerprint("http://a.test/p")
    encoded = [QueuedURL(fp=fingerprint(u), url=u, depth=d, tries=t, retries=r)
               for u, d, t, r in [("http://a.test/", 0, 0, 0),
                                  ("http://a.test/p?q=1&r=%22", 7, 2, 11),
                                  ("https://xn--bcher-kva.test:8443/%C3%A9", 123, 0, 3)]]
    entries = [encode(e) for e in encoded]
    entries += [
        b'{"fp":"%s","v":1,"url":"http://a.test/","depth":1}' % fp.encode(),  # by name only
        b'{"v":1,"fp":"%s","url":"http://a.test/\\"","depth":1,"tries":0,"retries":0}'
        % fp.encode(),  # an escape in the URL: valid JSON, not the plain shape
        b'{"v":1,"fp":"%s","url":"http://a.test/","depth":1,"tries":0,"retries":0,"x":1}'
        % fp.encode(),  # a field more
        b'{"v":99,"fp":"%s","url":"http://a.test/","depth":1,"tries":0,"retries":0}'
        % fp.encode(),  # a newer version
        b'{"v":1,"fp":"%s","url":"http://a.test/","depth":1,"tries":0,"retries":0}'
        % fp[:15].encode(),  # a short fp
        b'{"v":1,"fp":"%sZ","url":"http://a.test/","depth":1,"tries":0,"retries":0}'
        % fp[:15].encode(),  # not hex
        b'{"v":1,"fp":"%s","url":"","depth":1,"tries":0,"retries":0}' % fp.encode(),
        b'{"v":1,"fp":"%s","url":"http://a.test/","depth":"1","tries":0,"retries":0}'
        % fp.encode(),  # a depth that is a string
        b'{"v":1,"fp":"%s","url":"http://a.test/","depth":1,"tries":0,"retries":0'
        % fp.encode(),  # cut short
        b"[1,2,3]", b"", b"null"]
    script = (_constants() + _read("lib") + "\nlocal fp, why = entry_fp(ARGV[3])\n"
              "local e = decode_entry(ARGV[3])\n"
              "return {fp or '', e and e.fp or '', why or ''}")
    answers = [await env["redis"].eval(script, 0, "t:", "", raw) for raw in entries]
    for raw, (fast, full, why) in zip(entries, answers, strict=True):
        assert fast == full, (raw, fast, full)
        assert fast or why, raw  # a refusal says why (it goes to quarantine with it)
    assert [a[0].decode() for a in answers[:4]] == [e.fp for e in encoded] + [fp]
    assert sum(1 for a in answers if a[0]) == 6  # the three, by name, the escape, a field more


ENTRY_FP = fingerprint("http://a.test/p")
# Entries in the exact shape entry_fp()'s pattern reads, that are not JSON a decoder takes.
NOT_JSON = {
    "a NUL byte in the URL": b"http://a.test/\x00x",
    "a raw tab in the URL": b"http://a.test/\tx",
    "invalid UTF-8 in the URL": b"http://a.test/\xffx",
}


def shaped_entry(url: bytes, v: bytes = b"1") -> bytes:
    return (b'{"v":%s,"fp":"%s","url":"%s","depth":1,"tries":0,"retries":0}'
            % (v, ENTRY_FP.encode(), url))


async def test_entry_fp_fast_path_refuses_what_the_full_decode_refuses(
    env: dict[str, Any],
) -> None:
    """lib.lua's entry_fp accepts only entries decode_entry accepts, and decode_entry only what
    a worker's strict decode takes. The pattern once took any byte but '"' and '\\' in the
    URL and any digits for v: a NUL (lua-cjson ends the string there; msgspec refuses it), a
    raw control character or invalid UTF-8, a leading zero (json.loads, msgspec refuse them)."""
    cases = {**{why: shaped_entry(url) for why, url in NOT_JSON.items()},
             "a leading zero in v": shaped_entry(b"http://a.test/x", b"01")}
    if env["real"]:  # lua-cjson takes raw control bytes, bad UTF-8 and leading zeros
        cases = {"a NUL byte in the URL": cases["a NUL byte in the URL"]}
    script = (_constants() + _read("lib") + "\nlocal fp = entry_fp(ARGV[3])\n"
              "local e = decode_entry(ARGV[3])\n"
              "return {fp or '', e and e.fp or ''}")
    disagree = {}
    for why, raw in cases.items():
        fast, full = await env["redis"].eval(script, 0, "t:", "", raw)
        if fast != full:
            disagree[why] = (fast, full)
    assert disagree == {}


async def test_a_queue_entry_with_a_nul_in_its_url_is_quarantined_not_sent_to_a_worker(
    env: dict[str, Any],
) -> None:
    """An entry no strict JSON decoder takes goes to quarantine at dispatch. With the first
    entry_fp pattern dispatch.lua and claim.lua passed it on, the worker's own decode
    (Frontier.claim, msgspec) raised, and the whole batch failed again and again."""
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    queue = env["keys"].host_queue("a.test")
    await env["redis"].lset(queue, 1, shaped_entry(b"http://a.test/\x00x"))
    batches = await dispatch(env)  # dispatch, then claim as fetch_batch does
    assert [len(b.urls) for b in batches] == [2]
    s = await status(env)
    assert (s["quarantined"], s["in_flight"]) == (1, 2)


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


async def test_a_malformed_queue_entry_is_quarantined_at_refill(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(6)])
    [batch] = await dispatch(env)
    queue = env["keys"].host_queue("a.test")
    await env["redis"].lset(queue, 0, b"\xff garbage")
    outcome = await progress(env, batch, want=2)
    assert len(outcome.refill) == 1  # the other one went to quarantine
    s = await status(env)
    assert (s["quarantined"], s["queued"], s["in_flight"]) == (1, 1, 4)


async def test_a_malformed_lease_entry_is_quarantined_at_claim_and_expiry(
    env: dict[str, Any],
) -> None:
    frontier: Frontier = env["frontier"]
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [waiting] = await dispatch(env, claim=False)
    lease = env["keys"].host_lease("a.test")
    fps = await env["redis"].hkeys(lease)
    await env["redis"].hset(lease, fps[0], b"\xff garbage")
    claim = await frontier.claim(waiting.batch, lease_seconds=-1, job_id="")
    assert claim is not None and len(claim.urls) == 2
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
    """Validation comes before the first write: a progress call (results, marks, links, a
    refill) into a crawl whose marker is gone writes nothing at all."""
    await admit(env, [f"http://a.test/{i}" for i in range(5)])
    [batch] = await dispatch(env)
    await env["redis"].delete(env["keys"].crawl)
    before = {k: await env["redis"].type(k) for k in await env["redis"].keys("*")}
    stats = await env["redis"].hgetall(env["keys"].stats)
    queue = await queue_urls(env, "a.test")
    with pytest.raises(StateLost):
        await progress(env, batch, results=results_for(batch, [batch.urls[0].url]),
                       marks=[batch.urls[1].fp], want=2,
                       admissions=admissions_of(["http://b.test/"]))
    with pytest.raises(StateLost):
        await report(env, batch)
    assert {k: await env["redis"].type(k) for k in await env["redis"].keys("*")} == before
    assert await env["redis"].hgetall(env["keys"].stats) == stats
    assert await queue_urls(env, "a.test") == queue


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
    from crawlfleet.cli.seed import enqueue_seeds

    scheduler: Scheduler = env["scheduler"]
    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test:8080/"])
    await scheduler.read_events()
    admissions, refused, _ = await scheduler.admissions([(1, [
        "http://a.test:8080/x", "http://a.test/y", "https://a.test/z", "http://a.test:6379/",
    ])])
    assert sorted(decode_entry(a.entry).url for a in admissions) == [
        "http://a.test/y", "http://a.test:8080/x", "https://a.test/z"]
    assert refused == 1
    # A new scheduler (a standby taking over) knows the seeds' ports from Redis.
    standby = Scheduler(env["settings"], env["redis"])
    await standby.lead(_stopped())
    assert standby.seed_ports == {8080}


async def _true(value: bool) -> bool:
    return value


def _stopped() -> Any:
    import asyncio

    stop = asyncio.Event()
    stop.set()
    return stop


async def _poll(check: Any, *, within: float, what: str) -> None:
    """Await ``check()`` until it is truthy; fail naming ``what`` after ``within`` seconds."""
    import asyncio

    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.01)


async def test_an_idle_leader_sees_the_crawl_end_between_housekeeping_passes(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from crawlfleet.scheduler import service

    # Housekeeping (which checks finished too) once, at the start, and not again in this test:
    # only the idle loop's own check can see the end.
    monkeypatch.setattr(service, "HOUSEKEEPING_INTERVAL", 3600.0)
    redis, keys = env["redis"], env["keys"]
    assert await admit(env, ["http://a.test/1"]) == 1
    [claimed] = await dispatch(env)
    stop = asyncio.Event()
    leader = asyncio.create_task(env["scheduler"].lead(stop))
    try:
        await _poll(lambda: redis.exists(keys.scheduler_lock), within=10,
                    what="the leader's first housekeeping pass")
        assert not (await read_status(redis, keys))["finished"]  # the URL is still out
        assert (await report(env, claimed)).stored == 1

        async def finished() -> bool:
            return bool((await read_status(redis, keys))["finished"])

        await _poll(finished, within=10, what="finished_at, set by the idle leader")

        # Once it has seen the end, the idle leader stops asking until new work comes: the
        # embedded backend's polling passes (a real Redis's leader sleeps: see
        # test_scheduler_wakes.py) do not check again.
        scheduler: Scheduler = env["scheduler"]
        counts = {"check": 0}
        check = scheduler.frontier.check_finished

        async def counted_check(*a: Any, **k: Any) -> bool:
            counts["check"] += 1
            return bool(await check(*a, **k))

        monkeypatch.setattr(scheduler.frontier, "check_finished", counted_check)
        if not env["real"]:
            passes = scheduler.passes

            async def looped() -> bool:
                return scheduler.passes >= passes + 12

            await _poll(looped, within=10, what="a dozen passes of the leader's loop")
            assert counts["check"] <= 1  # at most the one in flight when the end was seen
        else:
            await _poll(lambda: _true(scheduler.sleeping), within=10, what="the leader asleep")
            assert counts["check"] <= 1
    finally:
        stop.set()
        await asyncio.wait_for(leader, timeout=10)
