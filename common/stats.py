"""The crawl's status, read in one transaction so its numbers always add up.

``seen = pages + failed + skipped + queued + in_flight`` holds in every snapshot, because every
script that moves a URL updates these counters atomically with the move.
"""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import Redis

from .connections import as_text
from .keys import Keys

COUNTERS = ("seen", "pages", "failed", "skipped", "queued", "in_flight")
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
        pipe.hlen(keys.dead_letter)
        stats_raw, leased, backlog, rate_raw, waiting, dead = await pipe.execute()
    stats = {as_text(k): as_text(v) for k, v in stats_raw.items()}
    status: dict[str, Any] = {name: int(stats.get(name, 0)) for name in COUNTERS}
    status.update({name: int(stats.get(name, 0)) for name in DISCARDS})
    status["hosts_leased"] = int(leased)
    status["batches_waiting"] = int(waiting)
    status["events_unread"] = int(backlog)
    status["leases_expired"] = int(stats.get("leases_expired", 0))
    status["retries"] = int(stats.get("retries", 0))
    status["dead"] = int(dead)  # URLs out of retries (part of 'failed'); `export --dead` lists them
    last_minute = sum(int(v) for k, v in rate_raw.items() if now - 60 <= int(k) < now)
    status["pages_per_s"] = round(last_minute / 60.0, 2)
    status["finished"] = (
        status["seen"] > 0 and status["queued"] == 0 and status["in_flight"] == 0 and backlog == 0
    )
    finished_at = stats.get("finished_at")
    status["finished_at"] = float(finished_at) if finished_at and status["finished"] else None
    return status


def accounted(status: dict[str, Any]) -> bool:
    """True when every admitted URL is in exactly one state."""
    return bool(status["seen"] == sum(status[k] for k in COUNTERS[1:]))

