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
-- Built on first use: a script names a few of the fixed keys, and every call pays for this.
local K = setmetatable({}, {__index = function(t, name)
  local rel = FIXED_KEYS[name]
  if not rel then error('unknown fixed key ' .. tostring(name)) end
  local key = PREFIX .. rel
  rawset(t, name, key)
  return key
end})

local function host_key(host, kind)
  local escaped = host
  if string.find(host, '[%%{}]') then  -- rare: most hosts need no escaping, and gsub costs
    escaped = string.gsub(host, '[%%{}]', {['%'] = '%25', ['{'] = '%7B', ['}'] = '%7D'})
  end
  return PREFIX .. 'h:{' .. escaped .. '}:' .. kind
end

-- Redis's clock, for every lease and politeness time: a worker with a skewed clock cannot
-- shorten a delay or a lease.
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- The seen set is many small SETs of integers, so that Redis keeps each one as an intset (8 bytes
-- a member). A 64-bit fingerprint (16 hex digits) is split: its first SEEN_DIGITS hex digits name
-- the bucket, the rest (at most 52 bits, exact in a Lua number) is the member. The crawl marker
-- records SEEN_DIGITS when the crawl opens (crawl.lua), so every process splits alike.
local SEEN_DIGITS = 3
-- Whether the crawl marker has admitted_at (finish.lua's "URLs were admitted"): read with the
-- marker, so that a call admitting URLs into a crawl that has some already writes nothing more.
local ADMITTED = false

local function crawl_is_current()
  local m = redis.call('HMGET', K.crawl, 'id', 'seen_digits', 'admitted_at')
  SEEN_DIGITS = tonumber(m[2]) or 3
  ADMITTED = m[3] ~= false
  return m[1] == CRAWL
end

-- URLs joined the crawl at `now`: the first time, the marker records it (admit, progress,
-- reshard_in).
local function note_admitted(now)
  if not ADMITTED then
    redis.call('HSETNX', K.crawl, 'admitted_at', now)
    ADMITTED = true
  end
end

local function is_fp(fp)
  return type(fp) == 'string' and #fp == 16 and string.match(fp, '^%x+$') ~= nil
end

local function seen_slot(fp)
  return K.seen .. string.sub(fp, 1, SEEN_DIGITS),
    -- '%d': exact below 2^53 (the member has at most 52 bits), and far cheaper than '%.0f'
    string.format('%d', tonumber(string.sub(fp, SEEN_DIGITS + 1), 16))
end
-- SADD, SISMEMBER or SREM of one fingerprint.
local function seen(command, fp)
  local key, member = seen_slot(fp)
  return redis.call(command, key, member)
end

-- A count a worker decodes as an int: a whole number, 0 or more, exact in a double.
local function is_count(x)
  return type(x) == 'number' and x >= 0 and x < 9007199254740992 and x == math.floor(x)
end

-- A queue or lease entry (common.messages.QueuedURL), read by name. nil and a reason when it is
-- not one. Besides the fields, the text itself: a worker decodes what passes here with strict
-- JSON (msgspec), so a raw control or non-ASCII byte, which lua-cjson would let through, is
-- refused here (an entry as common.messages writes it has neither: URLs are ASCII, escaped).
local function decode_entry(raw)
  if string.find(raw, '[%c\128-\255]') then return nil, 'not plain JSON' end
  local ok, e = pcall(cjson.decode, raw)
  if not ok or type(e) ~= 'table' then return nil, 'not a JSON object' end
  if not is_count(e.v) or e.v > MESSAGE_VERSION then return nil, 'unknown version' end
  if not is_fp(e.fp) then return nil, 'bad fp' end
  if type(e.url) ~= 'string' or e.url == '' then return nil, 'bad url' end
  if not is_count(e.depth) then return nil, 'bad depth' end
  if e.tries == nil then e.tries = 0 end
  if e.retries == nil then e.retries = 0 end
  if not is_count(e.tries) or not is_count(e.retries) then return nil, 'bad counts' end
  return e
end

-- The fp of a queue or lease entry, or nil and a reason. An entry exactly as
-- common.messages encodes a QueuedURL (every field, in its order; a URL of printable ASCII
-- with no quote or backslash; whole numbers written plainly) is read with one pattern, and is
-- JSON any strict decoder takes; any other spelling is decoded and checked by name
-- (decode_entry), so the pattern only spares valid entries a JSON decode.
local ENTRY_SHAPE = '^{"v":(%d+),"fp":"(%x+)","url":"[^%c"\\\128-\255]+","depth":(%d+),' ..
  '"tries":(%d+),"retries":(%d+)}$'
local function plain(digits)  -- no leading zero, and exact in a double
  return #digits < 16 and (#digits == 1 or string.byte(digits, 1) ~= 48)
end
local function entry_fp(raw)
  local v, fp, depth, tries, retries = string.match(raw, ENTRY_SHAPE)
  if v and #fp == 16 and plain(v) and plain(depth) and plain(tries) and plain(retries)
      and tonumber(v) <= MESSAGE_VERSION then
    return fp
  end
  local e, why = decode_entry(raw)
  if e then return e.fp end
  return nil, why
end

-- A URL's result leaves the frontier: appended to the results log, which export reads and the
-- sink drains. One that ran out of retries says so in its own JSON ("dead":true), so that it
-- stays a dead letter wherever the result goes.
local function store_result(fp, data, dead)
  if dead then
    -- '"dead":false' cannot occur inside a JSON string (its quotes would be escaped there).
    local n
    data, n = string.gsub(data, '"dead":false', '"dead":true', 1)
    if n == 0 and string.sub(data, 1, 1) == '{' and data ~= '{}' then
      data = '{"dead":true,' .. string.sub(data, 2)
    end
  end
  redis.call('XADD', K.results, '*', 'f', fp, 'r', data)
end

-- The scheduler sleeps until its next ready host is due or its next housekeeping pass. A
-- command that gives it work it could not foresee (a host newly ready, a lease released, room
-- for another batch) wakes it: a message on K.scheduler_wake (pub/sub), unless one is on its
-- way already (K.scheduler_woken, which dispatch.lua clears at each pass; its expiry keeps a
-- lost message from silencing the rest).
local scheduler_woken = false
local function wake_scheduler()
  if not scheduler_woken then
    scheduler_woken = true
    if redis.call('SET', K.scheduler_woken, '1', 'NX', 'PX', 1000) then
      redis.call('PUBLISH', K.scheduler_wake, '1')
    end
  end
end

-- Stream entry ids ('ms-seq'), compared as numbers (both parts are exact in a Lua number).
local function id_less(a, b)
  local am, as = string.match(a, '^(%d+)-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)-(%d+)$')
  am, bm = tonumber(am) or 0, tonumber(bm) or 0
  if am ~= bm then return am < bm end
  return (tonumber(as) or 0) < (tonumber(bs) or 0)
end

-- One field of a stream entry's flat {name, value, ...} list, read by name.
local function entry_field(fields, name)
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

local function quarantine(source, reason, data, counted)
  redis.call('XADD', K.quarantine, '*', 'source', source, 'reason', reason, 'data', data,
    'counted', counted and '1' or '0')
end

-- Counters: add() collects deltas; apply(), the command's last write, reads the counters that
-- changed (one HMGET), quarantines and resets any that is not an integer, and writes the new
-- values (one HSET): a bad counter never fails a command halfway, and only the counters a call
-- changes cost it anything. get() reads one before that, for a budget.
local Counters = {}
Counters.__index = Counters
local function int_or_nil(v)
  if v == false or v == nil then return 0 end
  if string.match(v, '^%-?%d+$') then return tonumber(v) end
  return nil
end
local function counters()
  return setmetatable({delta = {}, value = {}, bad = {}}, Counters)
end
function Counters:add(name, n)
  if n ~= 0 then self.delta[name] = (self.delta[name] or 0) + n end
end
function Counters:get(name)
  local v = self.value[name]
  if v == nil then
    local raw = redis.call('HGET', K.stats, name)
    v = int_or_nil(raw)
    if v == nil then self.bad[name], v = raw, 0 end
    self.value[name] = v
  end
  return v
end
function Counters:apply()
  local unread = {}
  for name, n in pairs(self.delta) do
    if n ~= 0 and self.value[name] == nil then unread[#unread + 1] = name end
  end
  if #unread > 0 then
    local values = redis.call('HMGET', K.stats, unpack(unread))
    for i, name in ipairs(unread) do
      local v = int_or_nil(values[i])
      if v == nil then self.bad[name], v = values[i], 0 end
      self.value[name] = v
    end
  end
  local fields = {}
  for name, raw in pairs(self.bad) do
    quarantine(K.stats .. '#' .. name, 'counter is not an integer', raw, false)
    if not self.delta[name] or self.delta[name] == 0 then
      fields[#fields + 1] = name
      fields[#fields + 1] = '0'
    end
  end
  for name, n in pairs(self.delta) do
    if n ~= 0 then
      fields[#fields + 1] = name
      local v = self.value[name] + n
      -- '%d' is exact and cheap below 2^53; a counter past that (a hand-set value) keeps '%.0f'
      fields[#fields + 1] = string.format(math.abs(v) < 9007199254740992 and '%d' or '%.0f', v)
    end
  end
  if #fields > 0 then redis.call('HSET', K.stats, unpack(fields)) end
end

-- Taking URLs from a host queue into its lease (dispatch.lua, progress.lua): take_plan reads and
-- sorts up to n entries (no write); take_apply moves them.
local function take_plan(host, n)
  local plan = {host = host, q = host_key(host, 'q'), take = {}, bad = {}}
  local raws = redis.call('LRANGE', plan.q, 0, n - 1)
  plan.n = #raws
  for _, raw in ipairs(raws) do
    local fp, why = entry_fp(raw)
    if fp then plan.take[#plan.take + 1] = {fp, raw} else plan.bad[#plan.bad + 1] = {raw, why} end
  end
  return plan
end
local function take_apply(plan, c)
  if plan.n > 0 then redis.call('LTRIM', plan.q, plan.n, -1) end
  for _, bad in ipairs(plan.bad) do quarantine(plan.q, bad[2], bad[1], true) end
  c:add('queued', -(#plan.bad + #plan.take))
  c:add('quarantined', #plan.bad)
  c:add('in_flight', #plan.take)
  if #plan.take > 0 then
    local fields = {}
    for _, t in ipairs(plan.take) do fields[#fields + 1] = t[1]; fields[#fields + 1] = t[2] end
    redis.call('HSET', host_key(plan.host, 'lease'), unpack(fields))
  end
end

-- Admission of new URLs (admit.lua for seeds, progress.lua for the links a worker found).
-- admitter() reads the budgets; admit() takes one URL, with the writes that are per host
-- (queue, page count, ready time) gathered and done once per host by flush().
local Admitter = {}
Admitter.__index = Admitter
-- leased_host: a host the caller knows to be leased (progress.lua's own, held), whose lease
-- need not be looked up again.
local function admitter(c, max_pages, max_per_host, max_variants, now, leased_host)
  return setmetatable({c = c, max_pages = max_pages, max_per_host = max_per_host,
    max_variants = max_variants, now = now, leased_host = leased_host,
    n_seen = max_pages >= 0 and c:get('seen') or 0, hosts = {},
    order = {}, admitted = 0}, Admitter)
end
function Admitter:host(host)
  local h = self.hosts[host]
  if not h then
    h = {entries = {}, pages = nil}
    if self.max_per_host >= 0 then
      h.pages = tonumber(redis.call('HGET', K.host_pages, host) or '0') or 0
    end
    self.hosts[host] = h
    self.order[#self.order + 1] = host
  end
  return h
end
-- fp must satisfy is_fp (checked by the caller before its first write).
function Admitter:admit(fp, host, entry, variant)
  local refused
  local h = self:host(host)
  if self.max_pages >= 0 and self.n_seen >= self.max_pages then
    refused = 'discarded_max_pages'
  elseif h.pages and h.pages >= self.max_per_host then
    refused = 'discarded_host_budget'
  end
  if refused then
    if seen('SISMEMBER', fp) == 0 then self.c:add(refused, 1) end  -- a known URL is not a refusal
    return
  end
  if seen('SADD', fp) == 0 then return end  -- already in the crawl
  if variant ~= '' then
    local n = tonumber(redis.call('HGET', K.query_variants, variant) or '0') or 0
    if n >= self.max_variants then
      seen('SREM', fp)
      self.c:add('discarded_query_variants', 1)
      return
    end
    redis.call('HINCRBY', K.query_variants, variant, 1)
  end
  self.n_seen = self.n_seen + 1
  self.admitted = self.admitted + 1
  if h.pages then h.pages = h.pages + 1 end
  h.entries[#h.entries + 1] = entry
end
function Admitter:flush()
  for _, host in ipairs(self.order) do
    local h = self.hosts[host]
    local n = #h.entries
    if n > 0 then
      for i = 1, n, 1000 do
        redis.call('RPUSH', host_key(host, 'q'), unpack(h.entries, i, math.min(i + 999, n)))
      end
      redis.call('HINCRBY', K.host_pages, host, n)
      if host ~= self.leased_host and redis.call('HEXISTS', K.lease_batch, host) == 0 then
        -- NX keeps a later time already set (the host's crawl delay or backoff).
        local nb = tonumber(redis.call('HGET', K.not_before, host) or '0') or 0
        if redis.call('ZADD', K.ready, 'NX', math.max(self.now, nb), host) == 1 then
          wake_scheduler()
        end
      end
    end
  end
  self.c:add('seen', self.admitted)
  self.c:add('queued', self.admitted)
end

-- The admissions a command was given, ARGV[first], ARGV[first + 1] ... four fields each (fp,
-- host, entry, variant): invalid_fps() finds the bad ones before the first write (how many,
-- and which), admit_argv() admits the rest and counts the refusals the caller made (scope,
-- invalid).
local function invalid_fps(first)
  local n, bad = 0, {}
  for i = first, #ARGV, 4 do
    if not is_fp(ARGV[i]) then n, bad[i] = n + 1, true end
  end
  return n, bad
end
local function admit_argv(c, first, max_pages, max_per_host, max_variants, scope_refused,
                          invalid, now, bad, leased_host)
  local a = admitter(c, max_pages, max_per_host, max_variants, now, leased_host)
  for i = first, #ARGV, 4 do
    if not bad[i] then a:admit(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]) end
  end
  a:flush()
  if a.admitted > 0 then note_admitted(now) end
  c:add('discarded_scope', scope_refused)
  c:add('discarded_invalid', invalid)
  return a
end
