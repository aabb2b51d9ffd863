--[[ sink_take.lua: a sink takes a range of the results log to write out as one part (the sink).

ARGV  1 prefix, 2 crawl id, 3 owner (the sink's id), 4 most results in a part, 5 most bytes of
      results in a part, 6 fewest results worth a part now, 7 seconds after which fewer are
      worth one, 8 seconds a claim stays its owner's before another sink may take it over.
Keys  K.crawl K.results K.sink_claims K.sink_cursor
Guarantees
  * Every entry of the log belongs to at most one claim, and a claim's range never changes, so
    its part's name and content are fixed by it: a claim written twice (its sink was lost after
    the write, before sink_done.lua) writes the same part again, never a second copy.
  * A claim whose owner has not finished in time is taken over whole, oldest first, before any
    new range is handed out, so a lost sink delays its range, never loses it.
  * Nothing leaves the log here: entries stay until sink_done.lua, after their part is durable.
Returns {'claim', first id, last id, result JSON...}, {'wait', seconds}, {'none'} or
{'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local owner, max_n, max_bytes = ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local min_n, max_age, hold = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local now = now_s()

-- The reply is built as one table: unpack() of thousands of results would pass Lua's stack limit.
local function claim_reply(first, last, entries, n)
  local out = {'claim', first, last}
  for i = 1, n do out[#out + 1] = entry_field(entries[i][2], 'r') or '' end
  return out
end

-- A claim that outlived its owner's hold: taken over whole.
local oldest, oldest_last
local claims = redis.call('HGETALL', K.sink_claims)
for i = 1, #claims, 2 do
  local last, _, expiry = string.match(claims[i + 1], '^([^|]+)|([^|]*)|(.+)$')
  if last and tonumber(expiry) and tonumber(expiry) < now
      and (oldest == nil or id_less(claims[i], oldest)) then
    oldest, oldest_last = claims[i], last
  end
end
if oldest then
  redis.call('HSET', K.sink_claims, oldest, oldest_last .. '|' .. owner .. '|' .. (now + hold))
  local entries = redis.call('XRANGE', K.results, oldest, oldest_last)
  return claim_reply(oldest, oldest_last, entries, #entries)
end

local cursor = redis.call('GET', K.sink_cursor) or '0-0'
local entries = redis.call('XRANGE', K.results, '(' .. cursor, '+', 'COUNT', max_n)
if #entries == 0 then return {'none'} end
if #entries < min_n then
  local age = now - tonumber(string.match(entries[1][1], '^(%d+)')) / 1000
  if age < max_age then return {'wait', tostring(max_age - age)} end
end
local n, bytes = 0, 0
for _, e in ipairs(entries) do
  local size = #(entry_field(e[2], 'r') or '')
  if n > 0 and bytes + size > max_bytes then break end
  n, bytes = n + 1, bytes + size
end
local first, last = entries[1][1], entries[n][1]
redis.call('HSET', K.sink_claims, first, last .. '|' .. owner .. '|' .. (now + hold))
redis.call('SET', K.sink_cursor, last)
return claim_reply(first, last, entries, n)
