"""The crawl's status, read in one transaction so its numbers always add up.

``seen = pages + failed + skipped + queued + in_flight + quarantined`` holds in every snapshot,
because every script that moves a URL updates these counters atomically with the move. That is
counters against counters: ``crawlfleet check`` (common/check.py) counts the structures.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from redis.asyncio import Redis

from .connections import as_text
from .keys import Keys

COUNTERS = ("seen", "pages", "failed", "skipped", "queued", "in_flight", "quarantined")
DISCARDS = ("discarded_scope", "discarded_invalid", "discarded_max_pages",
            "discarded_host_budget", "discarded_query_variants")
# pages/s figures of the status, by key: over this many seconds of the recent past.
RATE_WINDOWS = {"pages_per_s": 60, "pages_per_s_10s": 10}


async def read_status(redis: Redis, keys: Keys, *, now: float | None = None) -> dict[str, Any]:
    """The snapshot. ``read_at`` is Redis's clock when it was taken (``now`` if given): the
    rate's seconds and the crawl's times are Redis's, so a reader with a skewed clock still
    looks at the right window. ``pages_per_s`` and ``pages_per_s_10s``: see ``recent_rate``."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.time()
        pipe.hgetall(keys.stats)
        pipe.zcard(keys.leases)
        pipe.xlen(keys.events)
        pipe.hgetall(keys.rate)
        pipe.zcard(keys.waiting)
        pipe.zcard(keys.ready)
        pipe.xlen(keys.results)
        pipe.xlen(keys.quarantine)
        pipe.hgetall(keys.crawl)
        (redis_time, stats_raw, leased, backlog, rate_raw, waiting, ready, results_held,
         quarantine, marker_raw) = await pipe.execute()
    if now is None:
        seconds, micros = redis_time
        now = int(seconds) + int(micros) / 1e6
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
    status["hosts_ready"] = int(ready)  # hosts with URLs queued and no turn out
    status["events_unread"] = int(backlog)
    for name in ("leases_expired", "batches_unclaimed", "retries", "quarantined_events",
                 "quarantined_other"):
        status[name] = _int(stats.get(name))
    # URLs out of retries (part of 'failed'); `export --dead` lists them.
    status["dead"] = _int(stats.get("dead"))
    status["results_in_redis"] = int(results_held)  # not yet drained by a sink
    status["read_at"] = now
    rate = {_int(k): _int(v) for k, v in rate_raw.items()}
    admitted_at = marker.get("admitted_at")
    started = _float(admitted_at) if admitted_at else None
    for name, window_s in RATE_WINDOWS.items():
        status[name] = round(recent_rate(rate, now, window_s, started_at=started), 2)
    # The scheduler's finish.lua decides from the structures (finished_at); the snapshot's own
    # numbers must agree, in case no scheduler has looked since new work came in.
    finished_at = stats.get("finished_at")
    status["finished"] = bool(
        finished_at and status["queued"] == 0 and status["in_flight"] == 0 and backlog == 0
        and not status["state_lost"]
    )
    status["finished_at"] = float(finished_at) if status["finished"] and finished_at else None
    return status


# Status fields that are not summed over shards (combine_status).
_NOT_SUMMED = ("crawl", "state_lost", "state_lost_at", "read_at", "finished", "finished_at")


def combine_status(statuses: list[dict[str, Any]]) -> dict[str, Any]:
    """One status for a crawl over several shards: counts and rates summed; finished when
    every shard is; the state lost if any shard's was; ``crawl`` the shards' ids, in order;
    ``shards`` each shard's own status."""
    if len(statuses) == 1:
        return statuses[0]
    combined: dict[str, Any] = {}
    for name, value in statuses[0].items():
        if name in _NOT_SUMMED:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            total = sum(s.get(name) or 0 for s in statuses)
            combined[name] = round(total, 2) if isinstance(total, float) else total
    combined["crawl"] = ",".join(str(s.get("crawl") or "") for s in statuses)
    lost = [s["state_lost_at"] for s in statuses if s.get("state_lost")]
    combined["state_lost"] = bool(lost)
    combined["state_lost_at"] = min((t for t in lost if t is not None), default=None)
    combined["read_at"] = max(s["read_at"] for s in statuses)
    # A shard that never got a URL (few hosts, many shards) has nothing to finish.
    idle = [not s["finished"] and s["seen"] == 0 and s["queued"] == 0 and s["in_flight"] == 0
            and s.get("events_unread", 0) == 0 and not s["state_lost"] for s in statuses]
    combined["finished"] = any(s["finished"] for s in statuses) and all(
        s["finished"] or empty for s, empty in zip(statuses, idle, strict=True))
    combined["finished_at"] = (max(s["finished_at"] or 0.0 for s in statuses)
                               if combined["finished"] else None)
    combined["shards"] = [dict(s, shard=i + 1) for i, s in enumerate(statuses)]
    return combined


def accounted(status: dict[str, Any]) -> bool:
    """True when every admitted URL is in exactly one state."""
    return bool(status["seen"] == sum(status[k] for k in COUNTERS[1:]))


def recent_rate(rate: Mapping[int, int], now: float, window_s: int, *,
                started_at: float | None = None) -> float:
    """URLs finished a second over the last ``window_s`` whole seconds before ``now``, from the
    rate hash (unix second -> URLs finished in it). The second in progress is left out: it is
    partly counted, and would pull a 10-second figure down by up to a tenth.

    A crawl younger than the window (``started_at``: its first admission) is divided by its
    age instead (at least 1 s), and seconds before it began are not its own: a 20-second crawl
    reports the rate it runs at, not a third of it. Finished or not, the figure is how fast
    URLs finished lately: it falls to 0 once the crawl has been idle for a whole window."""
    end = math.floor(now)
    start: float = end - window_s
    span: float = window_s
    if started_at is not None and started_at > start:
        start, span = math.floor(started_at), max(end - started_at, 1.0)
    done = sum(n for second, n in rate.items() if start <= second < end)
    return done / span


def _float(value: str) -> float | None:
    try:
        return float(value)
    except ValueError:
        return None


def _int(value: bytes | str | None) -> int:
    """A counter; a malformed one reads as 0 here (the next script quarantines it, and
    ``check`` reports it) rather than failing ``status``."""
    try:
        return int(value or 0)
    except ValueError:
        return 0
