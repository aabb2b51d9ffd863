--[[ sink_done.lua: a sink's part is durable; its range leaves Redis (the sink).

ARGV  1 prefix, 2 crawl id, 3 the claim's first id, 4 its last id.
Keys  K.crawl K.results K.sink_claims K.sink_cursor
Guarantees
  * Called only after the part is durable in the output, so an entry leaves the log only once
    it is written; a claim already done (a late duplicate of this call) changes nothing.
  * The log is trimmed up to the oldest entry still needed: the first of any other claim, or
    the first entry no claim has taken. Entries of claims still being written stay.
Returns {'ok', entries trimmed}, {'gone'} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local first, last = ARGV[3], ARGV[4]
local claim = redis.call('HGET', K.sink_claims, first)
if not claim or string.match(claim, '^([^|]+)|') ~= last then return {'gone'} end
redis.call('HDEL', K.sink_claims, first)
local keep
local claims = redis.call('HKEYS', K.sink_claims)
for _, other in ipairs(claims) do
  if keep == nil or id_less(other, keep) then keep = other end
end
if keep == nil then
  local ms, seq = string.match(redis.call('GET', K.sink_cursor) or last, '^(%d+)-(%d+)$')
  keep = ms .. '-' .. string.format('%.0f', tonumber(seq) + 1)
end
return {'ok', redis.call('XTRIM', K.results, 'MINID', keep)}
