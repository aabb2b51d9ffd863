--[[ reshard_in.lua: URLs of hosts this shard now owns arrive from their old shard
(`crawlfleet reshard`, cli/reshard.py; run before reshard_out.lua on the source).

ARGV  1 prefix, 2 crawl id (this shard's), 3 host ('' when the URLs are results of any hosts),
      4 the host's ready score on the source ('' = now unless it has one here), 5 number of URLs N, then N times:
      fp, counter ('pages', 'failed', 'skipped' for a result, 'queued' for a queue entry),
      '1' if dead-lettered else '0', variant (fp of the URL without its query, or ''), data
      (the result's JSON as the source's log holds it, or the QueuedURL JSON); then triples
      of a host's own fields to copy: fixed key name ('not_before', 'host_pages' or
      'robots'), field, value.
Keys  K.crawl K.seen:* K.stats K.results K.query_variants K.not_before K.host_pages K.robots
      K.lease_batch K.ready K.quarantine, per host h:{host}:q.
Guarantees
  * A URL arrives once: only when its fp enters this shard's seen set (SADD answers 1) is its
    result appended to the results log or its entry to the end of the host queue, with
    seen, its counter (and dead) and its query variant's count going up by one, so a second
    run of the same call, or a run again after a kill, adds nothing.
  * The host's fields are set to the source's values (a repeat sets the same values).
  * A host with a queue and no lease is in K.ready (at the source's score).
  * K.crawl's admitted_at is set once a URL arrived (finish.lua needs it).
  * Everything is validated before the first write: a bad argument changes nothing.
Returns {'ok', URLs that arrived}, {'bad', reason} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local host, score, n = ARGV[3], ARGV[4], tonumber(ARGV[5])
local COUNTED = {pages = true, failed = true, skipped = true, queued = true}
local FIELDS = {not_before = true, host_pages = true, robots = true}
if not n or n < 0 then return {'bad', 'URL count'} end
local first, after = 6, 6 + 5 * n
if #ARGV < after - 1 or (#ARGV - after + 1) % 3 ~= 0 then return {'bad', 'argument count'} end
for i = first, after - 1, 5 do
  if not is_fp(ARGV[i]) then return {'bad', 'fp ' .. tostring(ARGV[i])} end
  if not COUNTED[ARGV[i + 1]] then return {'bad', 'counter ' .. tostring(ARGV[i + 1])} end
  if ARGV[i + 1] == 'queued' and host == '' then return {'bad', 'queue entry without host'} end
end
for i = after, #ARGV, 3 do
  if not FIELDS[ARGV[i]] or host == '' then return {'bad', 'field ' .. tostring(ARGV[i])} end
end
local c = counters()
local moved, entries = 0, {}
for i = first, after - 1, 5 do
  local fp, counter, dead, variant, data = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  if seen('SADD', fp) == 1 then
    if counter == 'queued' then
      entries[#entries + 1] = data
    else
      redis.call('XADD', K.results, '*', 'f', fp, 'r', data)
    end
    c:add('seen', 1)
    c:add(counter, 1)
    if dead == '1' then c:add('dead', 1) end
    if variant ~= '' then redis.call('HINCRBY', K.query_variants, variant, 1) end
    moved = moved + 1
  end
end
local now = now_s()
if host ~= '' then
  local q = host_key(host, 'q')
  for i = 1, #entries, 1000 do
    redis.call('RPUSH', q, unpack(entries, i, math.min(i + 999, #entries)))
  end
  for i = after, #ARGV, 3 do redis.call('HSET', K[ARGV[i]], ARGV[i + 1], ARGV[i + 2]) end
  if redis.call('LLEN', q) > 0 and redis.call('HEXISTS', K.lease_batch, host) == 0 then
    if tonumber(score) then
      redis.call('ZADD', K.ready, tonumber(score), host)
    else
      redis.call('ZADD', K.ready, 'NX', now, host)  -- keeps the score a queue chunk brought
    end
  end
end
if moved > 0 then note_admitted(now) end
c:apply()
return {'ok', moved}
