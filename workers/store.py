"""Where a worker stores what it fetched: page results, discovered links, and its lease.

A report is one Lua script: results are written with HSETNX keyed by URL fingerprint (so a batch
fetched twice, by a worker whose lease had expired, never duplicates a result), the counters move
in the same step, the links found on those pages go onto the events stream, and on the final
report the host's lease is released. Results and their links land together or not at all, so a
worker killed mid-batch loses only pages it had not reported yet, and those come back when its
lease expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from redis.asyncio import Redis

from crawlfleet.common.connections import retry_while_unavailable
from crawlfleet.common.keys import LUA_HOST_KEYS, Keys
from crawlfleet.common.messages import Discovered, HostBatch, encode

# Claim the batch at the start of the job, and renew it while working. 0: the lease is gone
# (expired, and maybe handed to someone else): the job must not fetch. At the start the job
# also leaves arq's queue (ARGV[4], its id), whatever the answer: see fetch_batch.
_START = """
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[4], ARGV[4]) end
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

_REPORT = LUA_HOST_KEYS + """
local lease_batch, leases, waiting, ready, stats, results, events, rate, seen, dead, not_before =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10],
  KEYS[11]
local prefix, now, host, batch_id = ARGV[1], tonumber(ARGV[2]), ARGV[3], ARGV[4]
local final, next_ready, event = ARGV[5] == '1', ARGV[6], ARGV[7]
local is_current = redis.call('HGET', lease_batch, host) == batch_id
local lease, q = host_lease(prefix, host), host_queue(prefix, host)
local done = {p = 0, f = 0, s = 0}
local in_flight, queued, duplicates, added, retried = 0, 0, 0, 0, 0
for i = 8, #ARGV, 3 do
  local fp, outcome, result = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if outcome == 'r' then
    -- A retry: 'result' is the URL's next queue entry; it waits at the end of the host queue.
    -- Not in our lease any more (we are stale): whoever holds it now decides.
    if redis.call('HDEL', lease, fp) == 1 then
      redis.call('RPUSH', q, result)
      in_flight = in_flight - 1
      queued = queued + 1
      retried = retried + 1
    end
  elseif outcome == 'a' then
    -- An alias: a redirect target fetched on another URL's behalf. New to the crawl, it is done
    -- already; known, it is left to its own fetch.
    if redis.call('SADD', seen, fp) == 1 then
      redis.call('HSET', results, fp, result)
      added = added + 1
      done.p = done.p + 1
    end
  elseif redis.call('HSETNX', results, fp, result) == 1 then
    if outcome == 'd' then
      redis.call('HSET', dead, fp, result)  -- out of retries: failed, and dead-lettered
      outcome = 'f'
    end
    done[outcome] = done[outcome] + 1
    -- In a lease (ours or, after an expiry, another batch's) or back in its host queue,
    -- where dispatch will drop it because its result now exists.
    if redis.call('HDEL', lease, fp) == 1 then
      in_flight = in_flight - 1
    else
      queued = queued - 1
    end
  else
    duplicates = duplicates + 1
    if redis.call('HDEL', lease, fp) == 1 then in_flight = in_flight - 1 end
  end
end
local handed_back = 0
if final and is_current then
  -- URLs this batch did not report (a shutdown) go back to the front of the queue.
  local rest = redis.call('HVALS', lease)
  for i = #rest, 1, -1 do redis.call('LPUSH', q, rest[i]) end
  handed_back = #rest
  in_flight = in_flight - #rest
  queued = queued + #rest
  redis.call('DEL', lease)
  redis.call('HDEL', lease_batch, host)
  redis.call('ZREM', leases, host)
  -- Remembered apart from the ready set: links for this host may arrive after this report.
  redis.call('HSET', not_before, host, next_ready)
  if redis.call('LLEN', q) > 0 then redis.call('ZADD', ready, next_ready, host) end
end
if final then redis.call('ZREM', waiting, batch_id) end
local finished = done.p + done.f + done.s
if finished > 0 then
  redis.call('HINCRBY', stats, 'pages', done.p)
  redis.call('HINCRBY', stats, 'failed', done.f)
  redis.call('HINCRBY', stats, 'skipped', done.s)
  redis.call('HINCRBY', rate, math.floor(now), finished)
end
if added > 0 then redis.call('HINCRBY', stats, 'seen', added) end
if retried > 0 then redis.call('HINCRBY', stats, 'retries', retried) end
if in_flight ~= 0 then redis.call('HINCRBY', stats, 'in_flight', in_flight) end
if queued ~= 0 then redis.call('HINCRBY', stats, 'queued', queued) end
if duplicates > 0 then redis.call('HINCRBY', stats, 'duplicate_results', duplicates) end
redis.call('XADD', events, '*', 'm', event)
return {is_current and 1 or 0, finished, duplicates, handed_back}
"""

# What a report says of each URL: done as a page, failed, skipped (robots), failed for good after
# its retries (dead-lettered too), to be retried (data: its next queue entry), or an alias (a
# redirect target fetched on another URL's behalf, data: its result).
PAGE, FAILED, SKIPPED, DEAD, RETRY, ALIAS = "p", "f", "s", "d", "r", "a"


@dataclass(frozen=True, slots=True)
class StoredResult:
    fp: str
    outcome: str  # one of the outcomes above
    data: bytes  # the encoded PageResult; for RETRY, the URL's next encoded QueuedURL


@dataclass(frozen=True, slots=True)
class ReportOutcome:
    lease_held: bool
    stored: int
    duplicates: int
    handed_back: int


class Store:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._start = redis.register_script(_START)
        self._report = redis.register_script(_REPORT)

    async def claim(self, batch: HostBatch, *, lease_until: float, job_id: str = "") -> bool:
        """Start (or keep) working on a batch; False when its lease is no longer ours.
        With ``job_id`` (at the start), the arq job also leaves arq's queue."""
        k = self.keys
        held = await retry_while_unavailable(lambda: self._start(
            keys=[k.lease_batch, k.leases, k.waiting, k.arq_queue],
            args=[batch.host, batch.batch_id, lease_until, job_id],
        ))
        return bool(held)

    async def report(
        self,
        batch: HostBatch,
        results: Sequence[StoredResult],
        discovered: Discovered,
        *,
        now: float,
        next_ready: float,
    ) -> ReportOutcome:
        k = self.keys
        args: list[str | bytes | float] = [
            k.prefix, now, batch.host, batch.batch_id, "1" if discovered.final else "0",
            next_ready, encode(discovered),
        ]
        for r in results:
            args += (r.fp, r.outcome, r.data)
        # Safe to repeat after a Redis outage: results are HSETNX, the lease is released once,
        # and a repeated links event only meets the seen set again.
        held, stored, duplicates, handed_back = await retry_while_unavailable(
            lambda: self._report(
                keys=[k.lease_batch, k.leases, k.waiting, k.ready, k.stats, k.results, k.events,
                      k.rate, k.seen, k.dead_letter, k.not_before],
                args=args,
            )
        )
        return ReportOutcome(bool(held), int(stored), int(duplicates), int(handed_back))
