--[[ report.lua: a worker stores what it fetched (the worker, every second or so and at the end).

ARGV  1 prefix, 2 crawl id, 3 host, 4 batch id, 5 '1' if final, 6 seconds from now before the
      host's next batch may start (its crawl delay or backoff), 7 number of events E, then E
      events (Discovered JSON, links for the scheduler), then per URL: fp, outcome, data.
      Outcomes: 'p' page, 'f' failed, 's' skipped (robots), 'd' failed for good after its
      retries (dead-lettered too), 'r' retry (data: its next QueuedURL), 'a' alias (a
      redirect target fetched on another URL's behalf; data: its result). Otherwise data is
      the PageResult JSON.
Keys  K.lease_batch K.leases K.waiting K.ready K.not_before K.stats K.results K.dead_letter
      K.seen K.rate K.events K.quarantine, per host h:{host}:q, :lease and :fetching.
Guarantees
  * Each URL has one result: HSETNX by fp, so a batch fetched twice (a stale worker) never
    stores two. A retry goes to the end of the host queue, only if still in a lease.
  * Results, their counters and their links land together or not at all: a worker killed at
    any line loses only what it had not reported, and that comes back with its lease.
  * The final report of the batch holding the lease hands the URLs it did not report back to
    the front of the queue (a shutdown, a Redis fault), releases the lease and sets the host's
    next ready time on Redis's clock. A stale batch's report never touches the new lease.
  * Safe to repeat after a dropped connection: nothing is stored or released twice.
Returns {'ok', lease held (1/0), results stored, duplicates, handed back} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local host, batch_id, final = ARGV[3], ARGV[4], ARGV[5] == '1'
local wait_s, n_events = tonumber(ARGV[6]), tonumber(ARGV[7])
local first_url = 8 + n_events
local is_current = redis.call('HGET', K.lease_batch, host) == batch_id
local lease, q, fetching = host_key(host, 'lease'), host_key(host, 'q'), host_key(host, 'fetching')
local c = counters({'pages', 'failed', 'skipped', 'seen', 'retries', 'in_flight', 'queued',
  'duplicate_results', 'quarantined'})
-- The URLs a final report hands back, validated before any write.
local rest, bad = {}, {}
if final and is_current then
  local reported = {}
  for i = first_url, #ARGV, 3 do reported[ARGV[i]] = true end
  local entries = redis.call('HGETALL', lease)
  for i = 1, #entries, 2 do
    if not reported[entries[i]] then
      local e, why = decode_entry(entries[i + 1])
      if e then rest[#rest + 1] = entries[i + 1] else bad[#bad + 1] = {entries[i + 1], why} end
    end
  end
end
local now = now_s()
c:fix()
local finished, stored = 0, 0
local marks = {}
for i = first_url, #ARGV, 3 do marks[#marks + 1] = ARGV[i] end
if #marks > 0 then redis.call('SREM', fetching, unpack(marks)) end  -- no longer in flight
for i = first_url, #ARGV, 3 do
  local fp, outcome, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if outcome == 'r' then
    -- Not in our lease any more (we are stale): whoever holds it now decides.
    if redis.call('HDEL', lease, fp) == 1 then
      redis.call('RPUSH', q, data)
      c:add('in_flight', -1)
      c:add('queued', 1)
      c:add('retries', 1)
    end
  elseif outcome == 'a' then
    -- New to the crawl, it is done already; known, it is left to its own fetch.
    if redis.call('SADD', K.seen, fp) == 1 then
      redis.call('HSET', K.results, fp, data)
      c:add('seen', 1)
      c:add('pages', 1)
      finished = finished + 1
      stored = stored + 1
    end
  elseif redis.call('HSETNX', K.results, fp, data) == 1 then
    stored = stored + 1
    finished = finished + 1
    if outcome == 'd' then
      redis.call('HSET', K.dead_letter, fp, data)
      c:add('failed', 1)
    elseif outcome == 'p' then c:add('pages', 1)
    elseif outcome == 's' then c:add('skipped', 1)
    else c:add('failed', 1) end
    -- In a lease (ours or, after an expiry, another batch's) or back in its host queue,
    -- where dispatch drops it because its result now exists.
    if redis.call('HDEL', lease, fp) == 1 then c:add('in_flight', -1) else c:add('queued', -1) end
  else
    c:add('duplicate_results', 1)
    if redis.call('HDEL', lease, fp) == 1 then c:add('in_flight', -1) end
  end
end
if final and is_current then
  for i = #rest, 1, -1 do redis.call('LPUSH', q, rest[i]) end
  for _, b in ipairs(bad) do quarantine(lease, b[2], b[1], true) end
  c:add('in_flight', -(#rest + #bad))
  c:add('queued', #rest)
  c:add('quarantined', #bad)
  redis.call('DEL', lease, fetching)
  redis.call('HDEL', K.lease_batch, host)
  redis.call('ZREM', K.leases, host)
  redis.call('ZREM', K.waiting, host)
  local next_ready = now + math.max(wait_s, 0)
  -- Kept apart from the ready set: links for this host may arrive after this report.
  redis.call('HSET', K.not_before, host, next_ready)
  if redis.call('LLEN', q) > 0 then redis.call('ZADD', K.ready, next_ready, host) end
end
if finished > 0 then redis.call('HINCRBY', K.rate, math.floor(now), finished) end
for i = 8, first_url - 1 do redis.call('XADD', K.events, '*', 'm', ARGV[i]) end
c:apply()
return {'ok', is_current and 1 or 0, stored, c.delta.duplicate_results or 0, #rest}
