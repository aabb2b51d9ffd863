"""The frontier's state changes, each one atomic Lua script over the keys in ``common.keys``.

A URL admitted to the crawl is in exactly one place at a time: a host queue (``queued``), a
host's lease (``in_flight``) or the results (``pages``/``failed``/``skipped``). Every script moves
URLs between those places and adjusts the counters in the same step, which is what keeps
``seen = pages + failed + skipped + queued + in_flight`` true at every instant.

A host has at most one batch out at a time: the lease (``lease:batch`` names the batch,
``leases`` holds its expiry, ``lease:{host}`` the URLs in it). That makes fleet-wide per-host
limits a matter for the one worker holding the lease, and lets a dead worker's URLs come back
when its lease expires.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from crawlfleet.common.connections import as_text
from crawlfleet.common.keys import CONSUMER_GROUP, LUA_HOST_KEYS, Keys
from crawlfleet.common.messages import QueuedURL, decode_entry

_INGEST = LUA_HOST_KEYS + """
local seen, stats, ready, lease_batch, events, host_pages, variants, not_before =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local prefix, now, max_pages = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_per_host, max_variants = tonumber(ARGV[8]), tonumber(ARGV[9])
local n_seen = tonumber(redis.call('HGET', stats, 'seen') or '0')
local admitted, over, over_host, over_variants = 0, 0, 0, 0
local function count(hash, field) return tonumber(redis.call('HGET', hash, field) or '0') end
for i = 10, #ARGV, 4 do
  local fp, host, entry, variant = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('SISMEMBER', seen, fp) == 1 then
    -- already in the crawl: nothing to do
  elseif max_pages >= 0 and n_seen >= max_pages then
    over = over + 1
  elseif max_per_host >= 0 and count(host_pages, host) >= max_per_host then
    over_host = over_host + 1
  elseif variant ~= '' and count(variants, variant) >= max_variants then
    over_variants = over_variants + 1
  else
    redis.call('SADD', seen, fp)
    redis.call('HINCRBY', host_pages, host, 1)
    if variant ~= '' then redis.call('HINCRBY', variants, variant, 1) end
    n_seen = n_seen + 1
    admitted = admitted + 1
    redis.call('RPUSH', host_queue(prefix, host), entry)
    if redis.call('HEXISTS', lease_batch, host) == 0 then
      -- Not before the host's last batch allows (its crawl delay or backoff); NX keeps a
      -- later time that is already set.
      local nb = tonumber(redis.call('HGET', not_before, host) or '0')
      redis.call('ZADD', ready, 'NX', math.max(now, nb), host)
    end
  end
end
if admitted > 0 then
  redis.call('HINCRBY', stats, 'seen', admitted)
  redis.call('HINCRBY', stats, 'queued', admitted)
end
if over > 0 then redis.call('HINCRBY', stats, 'discarded_max_pages', over) end
if over_host > 0 then redis.call('HINCRBY', stats, 'discarded_host_budget', over_host) end
if over_variants > 0 then
  redis.call('HINCRBY', stats, 'discarded_query_variants', over_variants)
end
if ARGV[6] ~= '0' then redis.call('HINCRBY', stats, 'discarded_scope', ARGV[6]) end
if ARGV[7] ~= '0' then redis.call('HINCRBY', stats, 'discarded_invalid', ARGV[7]) end
if ARGV[5] ~= '' then
  redis.call('XACK', events, ARGV[4], ARGV[5])
  redis.call('XDEL', events, ARGV[5])
end
return admitted
"""

_DISPATCH = LUA_HOST_KEYS + """
local ready, leases, lease_batch, waiting, stats, results, seq =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local prefix, now, lease_until = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local batch_size, max_waiting, id_prefix = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
-- Only as many batches as may wait for a worker: the backlog stays here, where it is cheap.
local room = max_waiting - redis.call('ZCARD', waiting)
if room <= 0 then return {} end
local hosts = redis.call('ZRANGEBYSCORE', ready, '-inf', now, 'LIMIT', 0, room)
local out, moved = {}, 0
for _, host in ipairs(hosts) do
  redis.call('ZREM', ready, host)
  local q = host_queue(prefix, host)
  local entries = redis.call('LPOP', q, batch_size)
  if entries then
    local lease = host_lease(prefix, host)
    local batch = {}
    for _, e in ipairs(entries) do
      local fp = cjson.decode(e)[2]
      -- a stale worker may already have stored this URL's result: it left 'queued' then
      if redis.call('HEXISTS', results, fp) == 0 then
        redis.call('HSET', lease, fp, e)
        batch[#batch + 1] = e
      end
    end
    if #batch > 0 then
      local id = id_prefix .. redis.call('INCR', seq)
      redis.call('HSET', lease_batch, host, id)
      redis.call('ZADD', leases, lease_until, host)
      redis.call('ZADD', waiting, now, id)
      moved = moved + #batch
      out[#out + 1] = {host, id, batch}
    elseif redis.call('LLEN', q) > 0 then
      redis.call('ZADD', ready, now, host)
    end
  end
end
if moved > 0 then
  redis.call('HINCRBY', stats, 'queued', -moved)
  redis.call('HINCRBY', stats, 'in_flight', moved)
end
return out
"""

_EXPIRE = LUA_HOST_KEYS + """
local leases, lease_batch, waiting, ready, stats, results, dead, not_before =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local max_losses = tonumber(ARGV[4])
local hosts = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit)
local moved, lost = 0, 0
for _, host in ipairs(hosts) do
  local lease, q = host_lease(prefix, host), host_queue(prefix, host)
  local entries = redis.call('HVALS', lease)
  for i = #entries, 1, -1 do
    local e = cjson.decode(entries[i])
    e[5] = (e[5] or 0) + 1
    if e[5] >= max_losses then
      -- A page whose batch keeps losing its worker may be what kills them: give up on it.
      local result = cjson.encode({v = 1, url = e[3], final_url = cjson.null,
        status = cjson.null, content_type = cjson.null, depth = e[4], title = cjson.null,
        links = 0, bytes = 0, elapsed_ms = 0, fetched_at = now, error = 'worker_lost'})
      if redis.call('HSETNX', results, e[2], result) == 1 then
        redis.call('HSET', dead, e[2], result)
        lost = lost + 1
      end
    else
      redis.call('LPUSH', q, cjson.encode(e))
      moved = moved + 1
    end
  end
  redis.call('DEL', lease)
  local id = redis.call('HGET', lease_batch, host)
  if id then redis.call('ZREM', waiting, id) end
  redis.call('HDEL', lease_batch, host)
  redis.call('ZREM', leases, host)
  if redis.call('LLEN', q) > 0 then
    local nb = tonumber(redis.call('HGET', not_before, host) or '0')
    redis.call('ZADD', ready, math.max(now, nb), host)
  end
end
if #hosts > 0 then
  redis.call('HINCRBY', stats, 'in_flight', -(moved + lost))
  redis.call('HINCRBY', stats, 'queued', moved)
  redis.call('HINCRBY', stats, 'failed', lost)
  redis.call('HINCRBY', stats, 'leases_expired', #hosts)
end
return {#hosts, moved, lost}
"""

_CHECK_FINISHED = """
local stats, events, now = KEYS[1], KEYS[2], ARGV[1]
local v = redis.call('HMGET', stats, 'seen', 'queued', 'in_flight')
local seen, queued, in_flight = tonumber(v[1] or '0'), tonumber(v[2] or '0'), tonumber(v[3] or '0')
if seen > 0 and queued == 0 and in_flight == 0 and redis.call('XLEN', events) == 0 then
  redis.call('HSETNX', stats, 'finished_at', now)
  return 1
end
redis.call('HDEL', stats, 'finished_at')
return 0
"""


@dataclass(frozen=True, slots=True)
class Admission:
    """One URL that passed scope, on its way into the seen set and its host queue."""

    fp: str
    host: str
    entry: bytes
    variant: str = ""  # fingerprint of the URL without its query, when it has one


@dataclass(frozen=True, slots=True)
class DispatchedBatch:
    host: str
    batch_id: str
    urls: list[QueuedURL]


class Frontier:
    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._ingest = redis.register_script(_INGEST)
        self._dispatch = redis.register_script(_DISPATCH)
        self._expire = redis.register_script(_EXPIRE)
        self._check_finished = redis.register_script(_CHECK_FINISHED)

    async def ensure_group(self) -> None:
        await ensure_events_group(self.redis, self.keys)

    def ingest_args(
        self,
        admissions: Sequence[Admission],
        *,
        now: float,
        max_pages: int | None,
        message_id: str = "",
        discarded_scope: int = 0,
        discarded_invalid: int = 0,
        max_pages_per_host: int | None = None,
        max_query_variants: int = 100,
    ) -> tuple[list[str], list[Any]]:
        k = self.keys
        keys = [k.seen, k.stats, k.ready, k.lease_batch, k.events, k.host_pages,
                k.query_variants, k.not_before]
        args: list[Any] = [
            k.prefix, now, -1 if max_pages is None else max_pages, CONSUMER_GROUP, message_id,
            discarded_scope, discarded_invalid,
            -1 if max_pages_per_host is None else max_pages_per_host, max_query_variants,
        ]
        for a in admissions:
            args += (a.fp, a.host, a.entry, a.variant)
        return keys, args

    async def ingest(self, admissions: Sequence[Admission], **kw: Any) -> int:
        """Admit new URLs (dedup against the seen set) and acknowledge their event, atomically."""
        keys, args = self.ingest_args(admissions, **kw)
        return int(await self._ingest(keys=keys, args=args))

    async def ingest_in(self, pipe: Any, admissions: Sequence[Admission], **kw: Any) -> None:
        """Queue an ingest on a pipeline, so many events cost one round trip."""
        keys, args = self.ingest_args(admissions, **kw)
        await self._ingest(keys=keys, args=args, client=pipe)

    async def dispatch(
        self, *, now: float, lease_seconds: float, batch_size: int, max_waiting: int
    ) -> list[DispatchedBatch]:
        """Lease ready hosts, up to ``batch_size`` URLs from each, while fewer than
        ``max_waiting`` batches wait for a worker to start them."""
        k = self.keys
        raw = await self._dispatch(
            keys=[k.ready, k.leases, k.lease_batch, k.waiting, k.stats, k.results, k.batch_seq],
            args=[k.prefix, now, now + lease_seconds, batch_size, max_waiting, f"{k.namespace}:b"],
        )
        return [
            DispatchedBatch(as_text(host), as_text(batch_id), [decode_entry(e) for e in entries])
            for host, batch_id, entries in raw
        ]

    async def expire_leases(
        self, *, now: float, max_losses: int, limit: int = 100
    ) -> tuple[int, int, int]:
        """Return expired leases' URLs to the front of their host queues, except those whose
        batches have lost their worker ``max_losses`` times: (hosts, requeued, given up)."""
        k = self.keys
        hosts, urls, lost = await self._expire(
            keys=[k.leases, k.lease_batch, k.waiting, k.ready, k.stats, k.results, k.dead_letter,
                  k.not_before],
            args=[k.prefix, now, limit, max_losses],
        )
        return int(hosts), int(urls), int(lost)

    async def check_finished(self, *, now: float) -> bool:
        """Nothing queued, nothing leased, nothing unread: record the crawl as finished."""
        k = self.keys
        return bool(await self._check_finished(keys=[k.stats, k.events], args=[now]))



async def ensure_events_group(redis: Redis, keys: Keys) -> None:
    """Create the scheduler's consumer group from the stream's start (id 0), so events written
    before any scheduler ran (seeds) are still read."""
    from redis.exceptions import ResponseError

    try:
        await redis.xgroup_create(keys.events, CONSUMER_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise

