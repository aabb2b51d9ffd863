--[[ admit.lua: URLs join the crawl (the scheduler for seeds; a worker for links that do not fit
in its progress report).

ARGV  1 prefix, 2 crawl id, 3 consumer group, 4 event id ('' = none), 5 '1' to acknowledge and
      delete the event (its last chunk), 6 max pages in total (-1 = none), 7 max pages per host
      (-1), 8 max query variants, 9 links refused by scope, 10 links invalid,
      11 quarantine reason ('' = none: the event is malformed and goes to quarantine whole),
      then per URL: fp, host, entry (QueuedURL JSON), variant (fp of the URL without its query,
      or '').
Keys  K.crawl K.seen:* (the seen buckets) K.stats K.host_pages K.query_variants K.lease_batch
      K.not_before K.ready K.events K.quarantine, and per host h:{host}:q.
Guarantees
  * A URL is admitted at most once: its fp enters the seen set and its entry the host's queue,
    and seen/queued move with it. Budgets refuse the rest, counted by reason.
  * A host with URLs and no lease is in K.ready, not before its K.not_before time.
  * The event is acknowledged and deleted in the same step as its last URLs are admitted, so a
    scheduler killed at any line re-reads it, and re-admitting is a no-op (the seen set).
  * An fp that is not 16 hex digits is counted invalid, never admitted.
Returns {'ok', admitted} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local group, event_id, ack = ARGV[3], ARGV[4], ARGV[5] == '1'
local c = counters()
local now = now_s()
local n_invalid, invalid_at = invalid_fps(12)
local invalid = tonumber(ARGV[10]) + n_invalid
local a = admit_argv(c, 12, tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]),
  tonumber(ARGV[9]), invalid, now, invalid_at)
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
return {'ok', a.admitted}
