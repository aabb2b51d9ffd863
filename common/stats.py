"""The crawl's status, read in one transaction so its numbers always add up.

``seen = pages + failed + skipped + queued + in_flight + quarantined`` holds in every snapshot,
because every script that moves a URL updates these counters atomically with the move. That is
counters against counters: ``crawlfleet check`` (common/check.py) counts the structures.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from .connections import as_text
from .keys import Keys

COUNTERS = ("seen", "pages", "failed", "skipped", "queued", "in_flight", "quarantined")
DISCARDS = ("discarded_scope", "discarded_invalid", "discarded_max_pages",
            "discarded_host_budget", "discarded_query_variants")


async def read_status(redis: Redis, keys: Keys, *, now: float | None = None) -> dict[str, Any]:
    now = time.time() if now is None else now
    async with redis.pipeline(transaction=True) as pipe:
        pipe.hgetall(keys.stats)
        pipe.zcard(keys.leases)
        pipe.xlen(keys.events)
        pipe.hgetall(keys.rate)
        pipe.zcard(keys.waiting)
        pipe.xlen(keys.results)
        pipe.xlen(keys.quarantine)
        pipe.hgetall(keys.crawl)
        (stats_raw, leased, backlog, rate_raw, waiting, results_held, quarantine,
         marker_raw) = await pipe.execute()
    marker = {as_text(k): as_text(v) for k, v in marker_raw.items()}
    stats = {as_text(k): as_text(v) for k, v in stats_raw.items()}
    status: dict[str, Any] = {name: _int(stats.get(name)) for name in COUNTERS}
    status.update({name: _int(stats.get(name)) for name in DISCARDS})
    status["crawl"] = marker.get("id")
    # The frontier's state vanished from Redis mid-crawl: the results are incomplete, and the
    # crawl never counts as finished.
    lost_at = marker.get("state_lost_at")
    status["state_lost"] = lost_at is not None
    status["state_lost_at"] = float(lost_at) if lost_at else None
    status["quarantine_entries"] = int(quarantine)  # everything set aside (URLs and others)
    status["hosts_leased"] = int(leased)
    status["batches_waiting"] = int(waiting)
    status["events_unread"] = int(backlog)
    for name in ("leases_expired", "batches_unclaimed", "retries", "quarantined_events",
                 "quarantined_other"):
        status[name] = _int(stats.get(name))
    # URLs out of retries (part of 'failed'); `export --dead` lists them.
    status["dead"] = _int(stats.get("dead"))
    status["results_in_redis"] = int(results_held)  # not yet drained by a sink
    last_minute = sum(_int(v) for k, v in rate_raw.items() if now - 60 <= _int(k) < now)
    status["pages_per_s"] = round(last_minute / 60.0, 2)
    # The scheduler's finish.lua decides from the structures (finished_at); the snapshot's own
    # numbers must agree, in case no scheduler has looked since new work came in.
    finished_at = stats.get("finished_at")
    status["finished"] = bool(
        finished_at and status["queued"] == 0 and status["in_flight"] == 0 and backlog == 0
        and not status["state_lost"]
    )
    status["finished_at"] = float(finished_at) if status["finished"] and finished_at else None
    return status


def accounted(status: dict[str, Any]) -> bool:
    """True when every admitted URL is in exactly one state."""
    return bool(status["seen"] == sum(status[k] for k in COUNTERS[1:]))



def _int(value: bytes | str | None) -> int:
    """A counter; a malformed one reads as 0 here (the next script quarantines it, and
    ``check`` reports it) rather than failing ``status``."""
    try:
        return int(value or 0)
    except ValueError:
        return 0
