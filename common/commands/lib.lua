--[[ lib.lua: included at the top of every command by common/commands/__init__.py.

Every command takes ARGV[1] = the namespace prefix ("ns:") and ARGV[2] = the crawl id (the
marker in K.crawl, see crawl.lua). Fixed keys come from K (built from common/keys.py by the
loader, so the names live in one place); per-host keys from host_key().

The rule every command follows: read and validate everything first, then write. Redis does not
roll a script back when it fails halfway, so a command either changes nothing (and returns an
error word) or runs its writes, none of which can fail on bad data: malformed entries are moved
to K.quarantine and counters that are not integers are reset there, with the bad value kept.
]]
local PREFIX, CRAWL = ARGV[1], ARGV[2]
local K = {}
for name, rel in pairs(FIXED_KEYS) do K[name] = PREFIX .. rel end

local function host_key(host, kind)
  local escaped = string.gsub(host, '[%%{}]', {['%'] = '%25', ['{'] = '%7B', ['}'] = '%7D'})
  return PREFIX .. 'h:{' .. escaped .. '}:' .. kind
end

-- Redis's clock, for every lease and politeness time: a worker with a skewed clock cannot
-- shorten a delay or a lease.
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function crawl_is_current()
  return redis.call('HGET', K.crawl, 'id') == CRAWL
end

-- A queue or lease entry (common.messages.QueuedURL), read by name. nil and a reason when it is
-- not one.
local function decode_entry(raw)
  local ok, e = pcall(cjson.decode, raw)
  if not ok or type(e) ~= 'table' then return nil, 'not a JSON object' end
  if type(e.v) ~= 'number' or e.v > MESSAGE_VERSION then return nil, 'unknown version' end
  if type(e.fp) ~= 'string' or #e.fp ~= 16 or not string.match(e.fp, '^%x+$') then
    return nil, 'bad fp'
  end
  if type(e.url) ~= 'string' or e.url == '' then return nil, 'bad url' end
  if type(e.depth) ~= 'number' then return nil, 'bad depth' end
  if e.tries == nil then e.tries = 0 end
  if e.retries == nil then e.retries = 0 end
  if type(e.tries) ~= 'number' or type(e.retries) ~= 'number' then return nil, 'bad counts' end
  return e
end

local function quarantine(source, reason, data, counted)
  redis.call('XADD', K.quarantine, '*', 'source', source, 'reason', reason, 'data', data,
    'counted', counted and '1' or '0')
end

-- Counters: counters(names) validates (before any write); fix() resets the bad ones (first
-- write); add() collects deltas; apply() writes them.
local Counters = {}
Counters.__index = Counters
local function counters(names)
  local self = setmetatable({delta = {}, bad = {}}, Counters)
  local values = redis.call('HMGET', K.stats, unpack(names))
  for i, name in ipairs(names) do
    local v = values[i]
    if v and not string.match(v, '^%-?%d+$') then self.bad[#self.bad + 1] = {name, v} end
  end
  return self
end
function Counters:add(name, n)
  if n ~= 0 then self.delta[name] = (self.delta[name] or 0) + n end
end
function Counters:fix()
  for _, bad in ipairs(self.bad) do
    quarantine(K.stats .. '#' .. bad[1], 'counter is not an integer', bad[2], false)
    redis.call('HSET', K.stats, bad[1], '0')
  end
  self.bad = {}
end
function Counters:apply()
  for name, n in pairs(self.delta) do
    if n ~= 0 then redis.call('HINCRBY', K.stats, name, n) end
  end
end
