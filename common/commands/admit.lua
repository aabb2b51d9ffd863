--[[ admit.lua: URLs join the crawl (the scheduler, for seeds and discovered links).

ARGV  1 prefix, 2 crawl id, 3 consumer group, 4 event id ('' = none), 5 '1' to acknowledge and
      delete the event (its last chunk), 6 max pages in total (-1 = none), 7 max pages per host
      (-1), 8 max query variants, 9 links refused by scope, 10 links invalid,
      11 quarantine reason ('' = none: the event is malformed and goes to quarantine whole),
      then per URL: fp, host, entry (QueuedURL JSON), variant (fp of the URL without its query,
      or '').
Keys  K.seen K.stats K.host_pages K.query_variants K.lease_batch K.not_before K.ready K.events
      K.quarantine, and per host h:{host}:q.
Guarantees
  * A URL is admitted at most once: its fp enters K.seen and its entry the host's queue, and
    seen/queued move with it. Budgets refuse the rest, counted by reason.
  * A host with URLs and no lease is in K.ready, not before its K.not_before time.
  * The event is acknowledged and deleted in the same step as its last URLs are admitted, so a
    scheduler killed at any line re-reads it, and re-admitting is a no-op (the seen set).
Returns {'ok', admitted} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local group, event_id, ack = ARGV[3], ARGV[4], ARGV[5] == '1'
local max_pages, max_per_host = tonumber(ARGV[6]), tonumber(ARGV[7])
local max_variants = tonumber(ARGV[8])
local c = counters({'seen', 'queued', 'discarded_max_pages', 'discarded_host_budget',
  'discarded_query_variants', 'discarded_scope', 'discarded_invalid', 'quarantined_events'})
local function count(hash, field)
  return tonumber(redis.call('HGET', hash, field) or '0') or 0
end
local n_seen = tonumber(redis.call('SCARD', K.seen))
local now = now_s()
c:fix()
local admitted = 0
for i = 12, #ARGV, 4 do
  local fp, host, entry, variant = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if redis.call('SISMEMBER', K.seen, fp) == 1 then
    -- already in the crawl: nothing to do
  elseif max_pages >= 0 and n_seen >= max_pages then
    c:add('discarded_max_pages', 1)
  elseif max_per_host >= 0 and count(K.host_pages, host) >= max_per_host then
    c:add('discarded_host_budget', 1)
  elseif variant ~= '' and count(K.query_variants, variant) >= max_variants then
    c:add('discarded_query_variants', 1)
  else
    redis.call('SADD', K.seen, fp)
    redis.call('HINCRBY', K.host_pages, host, 1)
    if variant ~= '' then redis.call('HINCRBY', K.query_variants, variant, 1) end
    n_seen = n_seen + 1
    admitted = admitted + 1
    redis.call('RPUSH', host_key(host, 'q'), entry)
    if redis.call('HEXISTS', K.lease_batch, host) == 0 then
      -- NX keeps a later time already set (the host's crawl delay or backoff).
      local nb = tonumber(redis.call('HGET', K.not_before, host) or '0') or 0
      redis.call('ZADD', K.ready, 'NX', math.max(now, nb), host)
    end
  end
end
c:add('seen', admitted)
c:add('queued', admitted)
c:add('discarded_scope', tonumber(ARGV[9]))
c:add('discarded_invalid', tonumber(ARGV[10]))
if event_id ~= '' and ack then
  if ARGV[11] ~= '' then
    local raw = redis.call('XRANGE', K.events, event_id, event_id)
    local data = ''
    local fields = raw[1] and raw[1][2] or {}
    for j = 1, #fields, 2 do
      if fields[j] == 'm' then data = fields[j + 1] end
    end
    quarantine(K.events .. '#' .. event_id, ARGV[11], data, false)
    c:add('quarantined_events', 1)
  end
  redis.call('XACK', K.events, group, event_id)
  redis.call('XDEL', K.events, event_id)
end
c:apply()
return {'ok', admitted}
