"""The frontier's Lua scripts and the worker's report, on the embedded (fakeredis) backend."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from crawlfleet.common.connections import open_redis
from crawlfleet.common.keys import Keys
from crawlfleet.common.messages import Discovered, HostBatch, LinkGroup, PageResult, encode
from crawlfleet.common.settings import Settings
from crawlfleet.common.stats import accounted, read_status
from crawlfleet.scheduler.frontier import DispatchedBatch, Frontier
from crawlfleet.scheduler.service import Scheduler
from crawlfleet.workers.store import FAILED, PAGE, Store, StoredResult

NOW = 1_000_000.0


@pytest.fixture
async def env() -> AsyncIterator[dict[str, Any]]:
    settings = Settings(redis_url=f"embedded://{uuid.uuid4().hex}", namespace="t", batch_size=3)
    redis = open_redis(settings.redis_url)
    keys = Keys(settings.namespace)
    scheduler = Scheduler(settings, redis)
    await scheduler.frontier.ensure_group()
    yield {"settings": settings, "redis": redis, "keys": keys, "scheduler": scheduler,
           "frontier": scheduler.frontier, "store": Store(redis, keys)}
    await redis.aclose()


async def admit(env: dict[str, Any], urls: list[str], depth: int = 0) -> int:
    scheduler: Scheduler = env["scheduler"]
    scheduler.allowed_hosts |= {u.split("/")[2].split(":")[0] for u in urls}
    admissions, _, _ = scheduler.admissions([(depth, urls)])
    frontier: Frontier = env["frontier"]
    settings: Settings = env["settings"]
    return await frontier.ingest(admissions, now=NOW, max_pages=settings.max_pages,
                                 max_pages_per_host=settings.max_pages_per_host,
                                 max_query_variants=settings.max_query_variants)


async def status(env: dict[str, Any]) -> dict[str, Any]:
    s = await read_status(env["redis"], env["keys"], now=NOW)
    assert accounted(s), s
    return s


async def dispatch(env: dict[str, Any], now: float = NOW, max_waiting: int = 10,
                   lease_seconds: float = 60) -> list[DispatchedBatch]:
    return list(await env["frontier"].dispatch(now=now, lease_seconds=lease_seconds,
                                               batch_size=3, max_waiting=max_waiting))


def result_for(url: str, error: str | None = None) -> PageResult:
    return PageResult(url=url, final_url=url, status=200 if error is None else 500,
                      content_type="text/html", depth=0, title="t", links=0, bytes=1,
                      elapsed_ms=1.0, fetched_at=NOW, error=error)


async def report(env: dict[str, Any], batch: DispatchedBatch, *, final: bool = True,
                 urls: list[str] | None = None, links: list[str] | None = None) -> Any:
    job = HostBatch(batch_id=batch.batch_id, host=batch.host, urls=batch.urls, dispatched_at=NOW)
    chosen = [u for u in batch.urls if urls is None or u.url in urls]
    results = [StoredResult(u.fp, PAGE, encode(result_for(u.url))) for u in chosen]
    discovered = Discovered(batch_id=batch.batch_id, host=batch.host, worker="w",
                            groups=[LinkGroup(1, links or [])], pages=len(results), failed=0,
                            final=final)
    store: Store = env["store"]
    return await store.report(job, results, discovered, now=NOW, next_ready=NOW)


async def test_ingest_deduplicates_and_counts(env: dict[str, Any]) -> None:
    urls = ["http://a.test/1", "http://A.test:80/1#frag", "http://a.test/2"]
    assert await admit(env, urls) == 2
    assert await admit(env, ["http://a.test/2", "http://a.test/3"]) == 1
    s = await status(env)
    assert (s["seen"], s["queued"], s["in_flight"]) == (3, 3, 0)
    # The scripts name per-host keys as keys.py does.
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
    again = await dispatch(env)
    assert [(b.host, len(b.urls)) for b in again] == [("a.test", 2)]
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (3, 0, 3)


async def test_dispatch_keeps_at_most_max_waiting_batches_waiting(env: dict[str, Any]) -> None:
    await admit(env, [f"http://h{i}.test/" for i in range(5)])
    assert len(await dispatch(env, max_waiting=2)) == 2
    assert len(await dispatch(env, max_waiting=2)) == 0  # two are waiting already
    assert len(await dispatch(env, max_waiting=0)) == 0
    assert len(await dispatch(env, max_waiting=10)) == 3


async def test_expired_lease_returns_urls_to_the_front(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(4)])
    [first] = await dispatch(env, lease_seconds=10)
    assert await env["frontier"].expire_leases(now=NOW + 5, max_losses=3) == (0, 0, 0)
    assert await env["frontier"].expire_leases(now=NOW + 11, max_losses=3) == (1, 3, 0)
    s = await status(env)
    assert (s["queued"], s["in_flight"], s["leases_expired"]) == (4, 0, 1)
    [again] = await dispatch(env, now=NOW + 11)
    assert [u.url for u in again.urls] == [u.url for u in first.urls]
    assert all(u.tries == 1 for u in again.urls)


async def test_stale_report_is_accepted_without_duplicates(env: dict[str, Any]) -> None:
    await admit(env, [f"http://a.test/{i}" for i in range(3)])
    [old] = await dispatch(env, lease_seconds=10)
    await env["frontier"].expire_leases(now=NOW + 11, max_losses=3)
    [new] = await dispatch(env, now=NOW + 11)

    # The old holder wakes up and reports one page: stored once, counted once.
    stale = await report(env, old, urls=[old.urls[0].url])
    assert not stale.lease_held and stale.stored == 1
    s = await status(env)
    assert (s["pages"], s["in_flight"]) == (1, 2)

    # The new holder reports all three: only two are new; its lease is released cleanly.
    fresh = await report(env, new)
    assert fresh.lease_held and (fresh.stored, fresh.duplicates) == (2, 1)
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"], s["hosts_leased"]) == (3, 0, 0, 0)
    assert await env["redis"].hlen(env["keys"].results) == 3


async def test_stale_report_for_a_requeued_url(env: dict[str, Any]) -> None:
    await admit(env, ["http://a.test/1", "http://a.test/2"])
    [old] = await dispatch(env, lease_seconds=10)
    await env["frontier"].expire_leases(now=NOW + 11, max_losses=3)  # both back in the queue
    await report(env, old)  # the old holder stores both while they wait in the queue
    s = await status(env)
    assert (s["pages"], s["queued"], s["in_flight"]) == (2, 0, 0)
    # Their queue entries are dropped at dispatch, not fetched again.
    assert await dispatch(env, now=NOW + 11) == []
    await env["scheduler"].read_events()
    assert (await status(env))["finished"]


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
    job = HostBatch(batch_id=batch.batch_id, host=batch.host, urls=batch.urls, dispatched_at=NOW)
    url = batch.urls[0]
    await env["store"].report(
        job, [StoredResult(url.fp, FAILED, encode(result_for(url.url, "http_5xx")))],
        Discovered(batch_id=batch.batch_id, host="a.test", worker="w", groups=[], pages=0,
                   failed=1, final=True), now=NOW, next_ready=NOW)
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
    assert not await frontier.check_finished(now=NOW)  # nothing seen yet
    await admit(env, ["http://a.test/"])
    assert not await frontier.check_finished(now=NOW)
    [batch] = await dispatch(env)
    assert not await frontier.check_finished(now=NOW)
    await report(env, batch)
    assert not await frontier.check_finished(now=NOW)  # its report is still unread
    await env["scheduler"].read_events()
    assert await frontier.check_finished(now=NOW)
    s = await status(env)
    assert s["finished"] and s["finished_at"] == NOW


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


async def test_unreadable_event_is_acknowledged_and_counted(env: dict[str, Any]) -> None:
    await env["redis"].xadd(env["keys"].events, {"m": b'{"type":"links","v":99}'})
    await env["redis"].xadd(env["keys"].events, {"m": b"not json"})
    assert await env["scheduler"].read_events() == 2
    s = await status(env)
    assert s["discarded_invalid"] == 2 and s["events_unread"] == 0


async def test_scheduler_rereads_its_pending_events_after_a_crash(env: dict[str, Any]) -> None:
    from crawlfleet.cli.commands import enqueue_seeds
    from crawlfleet.common.keys import CONSUMER_GROUP
    from crawlfleet.scheduler.service import CONSUMER

    await enqueue_seeds(env["redis"], env["keys"], ["http://a.test/"])
    # A scheduler reads the event, then dies before its ingest script runs.
    await env["redis"].xreadgroup(CONSUMER_GROUP, CONSUMER, {env["keys"].events: ">"}, count=10)
    assert await env["scheduler"].read_events() == 0  # nothing new...
    assert await env["scheduler"].read_events(pending=True) == 1  # ...but it is pending
    assert (await status(env))["seen"] == 1


async def test_a_url_that_keeps_losing_its_worker_is_given_up(env: dict[str, Any]) -> None:
    from crawlfleet.common.messages import decode_result

    await admit(env, ["http://a.test/poison"])
    for loss in range(1, 4):
        [batch] = await dispatch(env, now=NOW + 100 * loss, lease_seconds=10)
        assert batch.urls[0].tries == loss - 1
        hosts, requeued, lost = await env["frontier"].expire_leases(now=NOW + 100 * loss + 11,
                                                                     max_losses=3)
        assert (hosts, requeued, lost) == ((1, 1, 0) if loss < 3 else (1, 0, 1))
    s = await status(env)
    assert (s["failed"], s["queued"], s["in_flight"]) == (1, 0, 0)
    [stored] = await env["redis"].hvals(env["keys"].results)
    result = decode_result(stored)
    assert result.error == "worker_lost" and result.url == "http://a.test/poison"
    assert await env["redis"].hlen(env["keys"].dead_letter) == 1


async def test_per_host_budget_and_query_variants(env: dict[str, Any]) -> None:
    env["settings"] = env["settings"].replace(max_pages_per_host=3, max_query_variants=2)
    scheduler: Scheduler = env["scheduler"]
    scheduler.rules = scheduler.rules  # rules are URL-only; the budgets are the script's
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
    job = HostBatch(batch_id=batch.batch_id, host=batch.host, urls=batch.urls, dispatched_at=NOW)
    url = batch.urls[0]
    await env["store"].report(
        job, [StoredResult(url.fp, PAGE, encode(result_for(url.url)))],
        Discovered(batch_id=batch.batch_id, host="a.test", worker="w", groups=[], pages=1,
                   failed=0, final=True), now=NOW, next_ready=NOW + 30)
    await admit(env, ["http://a.test/next"])  # the link comes in later
    assert await dispatch(env, now=NOW + 29) == []
    assert len(await dispatch(env, now=NOW + 30)) == 1
