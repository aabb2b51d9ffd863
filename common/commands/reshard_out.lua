--[[ reshard_out.lua: URLs of hosts another shard now owns leave this one (`crawlfleet
reshard`, cli/reshard.py; run after reshard_in.lua has put them on their new shard).

ARGV  1 prefix, 2 crawl id (this shard's), 3 host ('' when the URLs are results of any hosts),
      4 number of URLs N, then N times: fp, counter ('pages', 'failed', 'skipped' or
      'queued'), '1' if dead-lettered else '0', variant (as reshard_in.lua), where (the
      result's results-log entry id, or the raw queue entry); then pairs of a host's own
      fields to delete: fixed key name ('not_before', 'host_pages' or 'robots'), field.
Keys  K.crawl K.seen:* K.stats K.results K.query_variants K.not_before K.host_pages K.robots
      K.ready K.quarantine, per host h:{host}:q.
Guarantees
  * A URL leaves once: only when its fp leaves this shard's seen set (SREM answers 1) are its
    results-log entry deleted or its queue entry removed, with seen, its counter (and dead)
    and its query variant's count going down by one (the variant's field goes at 0), so a
    second run of the same call, or a run again after a kill, removes nothing more.
  * Queue entries leave from the head in one LTRIM when they are the queue's head in order
    (as cli/reshard.py reads them), else one LREM each.
  * A host (ARGV[3]) with no queue left here leaves K.ready.
  * Everything is validated before the first write: a bad argument changes nothing.
Returns {'ok', URLs that left}, {'bad', reason} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local host, n = ARGV[3], tonumber(ARGV[4])
local COUNTED = {pages = true, failed = true, skipped = true, queued = true}
local FIELDS = {not_before = true, host_pages = true, robots = true}
if not n or n < 0 then return {'bad', 'URL count'} end
local first, after = 5, 5 + 5 * n
if #ARGV < after - 1 or (#ARGV - after + 1) % 2 ~= 0 then return {'bad', 'argument count'} end
for i = first, after - 1, 5 do
  if not is_fp(ARGV[i]) then return {'bad', 'fp ' .. tostring(ARGV[i])} end
  if not COUNTED[ARGV[i + 1]] then return {'bad', 'counter ' .. tostring(ARGV[i + 1])} end
  if ARGV[i + 1] == 'queued' and host == '' then return {'bad', 'queue entry without host'} end
end
for i = after, #ARGV, 2 do
  if not FIELDS[ARGV[i]] or host == '' then return {'bad', 'field ' .. tostring(ARGV[i])} end
end
local c = counters()
local removed, ids, raws = 0, {}, {}
for i = first, after - 1, 5 do
  local fp, counter, dead, variant, where = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3],
    ARGV[i + 4]
  if seen('SREM', fp) == 1 then
    if counter == 'queued' then raws[#raws + 1] = where else ids[#ids + 1] = where end
    c:add('seen', -1)
    c:add(counter, -1)
    if dead == '1' then c:add('dead', -1) end
    if variant ~= '' then
      if redis.call('HINCRBY', K.query_variants, variant, -1) <= 0 then
        redis.call('HDEL', K.query_variants, variant)
      end
    end
    removed = removed + 1
  end
end
for i = 1, #ids, 1000 do
  redis.call('XDEL', K.results, unpack(ids, i, math.min(i + 999, #ids)))
end
if host ~= '' then
  local q = host_key(host, 'q')
  if #raws > 0 then
    local head = redis.call('LRANGE', q, 0, #raws - 1)
    local in_order = #head == #raws
    for i = 1, #raws do
      if head[i] ~= raws[i] then in_order = false; break end
    end
    if in_order then
      redis.call('LTRIM', q, #raws, -1)
    else
      for _, raw in ipairs(raws) do redis.call('LREM', q, 1, raw) end
    end
  end
  for i = after, #ARGV, 2 do redis.call('HDEL', K[ARGV[i]], ARGV[i + 1]) end
  if redis.call('LLEN', q) == 0 then redis.call('ZREM', K.ready, host) end
end
c:apply()
return {'ok', removed}
