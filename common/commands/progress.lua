--[[ progress.lua: a worker's one call while it holds a host (the worker, every few pages).

It reports, marks, admits and refills in one round trip, so that a host's work is continuous:
the worker that holds a host keeps it while its queue has URLs and its turn lasts, and neither
the scheduler nor a new arq job stands between two of its pages.

ARGV  1 prefix, 2 crawl id, 3 host, 4 batch id, 5 '1' if final, 6 seconds from now before the
      host's next lease may start (its crawl delay or backoff), 7 URLs wanted from the host
      queue (0 = none), 8 flags: 1 the turn is long enough that other ready hosts come first,
      + 2 the worker is short of fetch slots (a worker with none to do may have the host),
      9 max pages (-1 = none), 10 max pages per host (-1), 11 max query variants,
      12 links refused by scope, 13 links invalid, 14 number of marks M, 15 number of results
      R, 16 number of admissions A, 17 how many of the refill's URLs to mark too (the worker
      starts them next); then M fps about to be fetched; R times fp, outcome, data;
      A times fp, host, entry, variant (as admit.lua).
      Outcomes: 'p' page, 'f' failed, 's' skipped (robots), 'd' failed for good after its
      retries (dead-lettered too), 'r' retry (data: its next QueuedURL), 'a' alias (a
      redirect target fetched on another URL's behalf; data: its result). Otherwise data is
      the PageResult JSON.
Keys  K.crawl K.lease_batch K.leases K.waiting K.hungry K.ready K.not_before K.stats K.results
      K.seen:* K.host_pages K.query_variants K.rate K.quarantine (K.scheduler_wake), per host
      h:{host}:q, :lease and :fetching.
Guarantees
  * Only the batch that holds the host's lease stores anything: a result is stored when its fp
    leaves this lease (HDEL), so each URL has one result, a repeated call (a dropped
    connection) stores nothing twice, and a stale worker (its lease expired) stores nothing;
    its URLs are fetched again by the lease's new holder.
  * Results, their counters and their pages' links land together or not at all.
  * Marks (h:{host}:fetching) are set only under a held lease: expire.lua charges a lost
    worker's URLs a loss only when they were marked, and a stale worker learns here (held = 0)
    that it must stop.
  * Admissions follow admit.lua (dedup, budgets), for the links of any host: a stale worker's
    links are admitted too, since they are real links.
  * Refill: up to ARGV[7] entries move from the host queue to the lease and are returned, on
    the same terms as dispatch.lua; with flag 1 only while no other host is ready or
    waiting for a worker (K.waiting); with flag 2 only while no idle worker asks for hosts
    (K.hungry > 0, a count that each host handed over this way takes one from; anything but
    a whole number up to a million counts as 0): then the reply says so, the turn drains its
    lease and ends, and the host goes back to be dispatched to a worker that can fetch it at
    its full concurrency. The first ARGV[17] of them are marked with the call's marks: the
    worker starts them before its next call, which it then needs only when its marks run
    low, not to mark what it was just given.
  * The final call hands the lease's unreported URLs back to the front of the queue, releases
    the lease and sets the host's next ready time on Redis's clock. It wakes the scheduler
    (K.scheduler_wake), as does an admission that makes a host ready.
Returns {'ok', lease held (1/0; 2: held and handed over to an idle worker, so the worker
refills no more and ends the turn once its lease is drained), results stored, handed back,
admitted, refill entry...} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local host, batch_id, final = ARGV[3], ARGV[4], ARGV[5] == '1'
local wait_s, want, flags = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]) or 0
local yield_to_others, short_of_slots = flags % 2 == 1, flags >= 2
local n_marks, n_results, n_admits = tonumber(ARGV[14]), tonumber(ARGV[15]), tonumber(ARGV[16])
local mark_refill = tonumber(ARGV[17])
local first_result = 18 + n_marks
local first_admit = first_result + 3 * n_results
local held = redis.call('HGET', K.lease_batch, host) == batch_id
local lease, q, fetching = host_key(host, 'lease'), host_key(host, 'q'), host_key(host, 'fetching')
local c = counters()
local now = now_s()
-- Read and validate first.
local n_invalid, invalid_at = invalid_fps(first_admit)
local invalid = tonumber(ARGV[13]) + n_invalid
local alias_ok = {}
for i = first_result, first_admit - 1, 3 do
  if ARGV[i + 1] == 'a' then alias_ok[i] = is_fp(ARGV[i]) end
end
local rest, bad = {}, {}
if final and held then
  local reported = {}
  for i = first_result, first_admit - 1, 3 do reported[ARGV[i]] = true end
  local entries = redis.call('HGETALL', lease)
  for i = 1, #entries, 2 do
    if not reported[entries[i]] then
      local fp, why = entry_fp(entries[i + 1])
      if fp then rest[#rest + 1] = entries[i + 1] else bad[#bad + 1] = {entries[i + 1], why} end
    end
  end
end
local stored = 0  -- results stored: URLs finished (the rate counts them)
if held then
  -- One HMGET and one HDEL for the call's results, not one HDEL each.
  local in_lease, leaving = {}, {}
  if n_results > 0 then
    local fps = {}
    for i = first_result, first_admit - 1, 3 do fps[#fps + 1] = ARGV[i] end
    redis.call('SREM', fetching, unpack(fps))  -- no longer in flight
    local entries = redis.call('HMGET', lease, unpack(fps))
    for j, fp in ipairs(fps) do
      if entries[j] then in_lease[fp] = true end
    end
  end
  -- Counted in locals, added once: a counter's add costs more than a local's.
  local pages, failed, skipped, dead, retried, seen_new, left = 0, 0, 0, 0, 0, 0, 0
  for i = first_result, first_admit - 1, 3 do
    local fp, outcome, data = ARGV[i], ARGV[i + 1], ARGV[i + 2]
    local leaves = outcome ~= 'a' and in_lease[fp]
    if leaves then
      in_lease[fp] = nil  -- a fp reported twice in one call leaves once
      leaving[#leaving + 1] = fp
    end
    if outcome == 'a' then
      -- New to the crawl, it is done already; known, it is left to its own fetch.
      if alias_ok[i] and seen('SADD', fp) == 1 then
        store_result(fp, data, false)
        seen_new, pages = seen_new + 1, pages + 1
        stored = stored + 1
      end
    elseif leaves then
      left = left + 1
      if outcome == 'r' then
        redis.call('RPUSH', q, data)
        retried = retried + 1
      else
        store_result(fp, data, outcome == 'd')
        stored = stored + 1
        if outcome == 'd' then
          failed, dead = failed + 1, dead + 1
        elseif outcome == 'p' then pages = pages + 1
        elseif outcome == 's' then skipped = skipped + 1
        else failed = failed + 1 end
      end
    end
  end
  c:add('seen', seen_new)
  c:add('pages', pages)
  c:add('failed', failed)
  c:add('skipped', skipped)
  c:add('dead', dead)
  c:add('retries', retried)
  c:add('queued', retried)
  c:add('in_flight', -left)
  if #leaving > 0 then redis.call('HDEL', lease, unpack(leaving)) end
end
-- Links to the host itself: its lease is this batch's while held (the final call releases it
-- only below, after the admissions).
local a = admit_argv(c, first_admit, tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11]),
  tonumber(ARGV[12]), invalid, now, invalid_at, held and host or nil)
local out = {'ok', held and 1 or 0, stored, #rest, a.admitted}
local refilled = {}
if held and final then
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
  -- Kept apart from the ready set: links for this host may arrive after this call.
  redis.call('HSET', K.not_before, host, next_ready)
  if redis.call('LLEN', q) > 0 then redis.call('ZADD', K.ready, next_ready, host) end
  wake_scheduler()  -- the host may be ready again, or the crawl finished
elseif held and want > 0 then
  -- Others: a host ready now, or one dispatched and waiting for a worker's free slot.
  local others = yield_to_others and (redis.call('ZCARD', K.waiting) > 0 or
    #redis.call('ZRANGEBYSCORE', K.ready, '-inf', now, 'LIMIT', 0, 1) > 0)
  if not others and short_of_slots then
    -- SET, not DECR: a value that is not a count is read as 0 and cannot fail the write.
    local hungry = tonumber(redis.call('GET', K.hungry) or '0') or 0
    if hungry ~= math.floor(hungry) or hungry > 1000000 then hungry = 0 end  -- nan, inf, 1.5
    if hungry > 0 then
      others = true
      redis.call('SET', K.hungry, hungry - 1, 'KEEPTTL')
      out[2] = 2  -- held, and handed over: the worker refills no more
    end
  end
  if not others then
    local plan = take_plan(host, want)
    take_apply(plan, c)
    for _, t in ipairs(plan.take) do out[#out + 1] = t[2] end
    refilled = plan.take
  end
end
-- The call's marks and the refill's first ones, in one write (none on the final call).
if held and not final and (n_marks > 0 or (mark_refill > 0 and #refilled > 0)) then
  local marks = {unpack(ARGV, 18, first_result - 1)}
  for i = 1, math.min(mark_refill, #refilled) do marks[#marks + 1] = refilled[i][1] end
  redis.call('SADD', fetching, unpack(marks))
end
if stored > 0 then redis.call('HINCRBY', K.rate, math.floor(now), stored) end
c:apply()
return out
