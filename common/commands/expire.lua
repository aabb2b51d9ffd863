--[[ expire.lua: leases whose worker is gone, and batches no worker claimed (the scheduler).

ARGV  1 prefix, 2 crawl id, 3 most hosts per call, 4 losses after which a URL fails, 5 seconds
      a dispatched batch may wait for a worker, 6 the PageResult of a URL given up on
      (JSON, from Python: this script fills in url, depth and fetched_at only).
Keys  K.leases K.waiting K.lease_batch K.ready K.not_before K.results K.stats
      K.arq_queue K.quarantine, per host h:{host}:q, :lease and :fetching, arq:job:{batch id}.
Guarantees
  * A claimed lease past its expiry (Redis's clock) returns its URLs to the front of the host
    queue. Only the URLs that were being fetched (h:{host}:fetching) are charged a loss; one
    charged ARGV[4] times fails as worker_lost (dead-lettered), since a page that keeps
    killing workers must not kill the fleet.
  * A batch that waited ARGV[5] seconds without a worker claiming it goes back whole, with no
    loss charged, and its arq job is withdrawn (a late claim finds it stale).
  * Malformed lease entries go to quarantine (counted).
Returns {'ok', leases expired, URLs requeued, URLs given up, unclaimed batches returned} or
{'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local limit, max_losses, claim_timeout = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local template = cjson.decode(ARGV[6])
local now = now_s()
local expired = redis.call('ZRANGEBYSCORE', K.leases, '-inf', now, 'LIMIT', 0, limit)
local unclaimed = redis.call('ZRANGEBYSCORE', K.waiting, '-inf', now - claim_timeout,
  'LIMIT', 0, limit)
local c = counters()
-- Read and decide first.
local plans = {}
local function plan_for(host, charge)
  local lease = host_key(host, 'lease')
  local plan = {host = host, lease = lease, back = {}, lost = {}, bad = {},
    id = redis.call('HGET', K.lease_batch, host)}
  local fetching = {}
  if charge then
    for _, fp in ipairs(redis.call('SMEMBERS', host_key(host, 'fetching'))) do
      fetching[fp] = true
    end
  end
  local entries = redis.call('HVALS', lease)
  for _, raw in ipairs(entries) do
    local e, why = decode_entry(raw)
    if not e then
      plan.bad[#plan.bad + 1] = {raw, why}
    elseif charge and fetching[e.fp] then
      e.tries = e.tries + 1
      if e.tries >= max_losses then
        local r = template
        r.url, r.depth, r.fetched_at = e.url, e.depth, now
        r.redirects = nil  -- cjson writes an empty table as {}; the reader defaults it to []
        plan.lost[#plan.lost + 1] = {e.fp, cjson.encode(r)}
      else
        plan.back[#plan.back + 1] = cjson.encode(e)
      end
    else
      plan.back[#plan.back + 1] = raw
    end
  end
  plans[#plans + 1] = plan
end
local planned = {}
for _, host in ipairs(expired) do plan_for(host, true); planned[host] = true end
for _, host in ipairs(unclaimed) do
  if not planned[host] then plan_for(host, false) end  -- never both, but never twice either
end
local requeued, lost = 0, 0
for _, plan in ipairs(plans) do
  local q = host_key(plan.host, 'q')
  for i = #plan.back, 1, -1 do redis.call('LPUSH', q, plan.back[i]) end
  for _, l in ipairs(plan.lost) do
    store_result(l[1], l[2], true)
  end
  for _, b in ipairs(plan.bad) do quarantine(plan.lease, b[2], b[1], true) end
  c:add('in_flight', -(#plan.back + #plan.lost + #plan.bad))
  c:add('queued', #plan.back)
  c:add('failed', #plan.lost)
  c:add('dead', #plan.lost)
  c:add('quarantined', #plan.bad)
  requeued = requeued + #plan.back
  lost = lost + #plan.lost
  redis.call('DEL', plan.lease, host_key(plan.host, 'fetching'))
  redis.call('HDEL', K.lease_batch, plan.host)
  redis.call('ZREM', K.leases, plan.host)
  redis.call('ZREM', K.waiting, plan.host)
  if plan.id then
    redis.call('ZREM', K.arq_queue, plan.id)
    redis.call('DEL', 'arq:job:' .. plan.id)
  end
  if redis.call('LLEN', q) > 0 then
    local nb = tonumber(redis.call('HGET', K.not_before, plan.host) or '0') or 0
    redis.call('ZADD', K.ready, math.max(now, nb), plan.host)
  end
end
c:add('leases_expired', #expired)
c:add('batches_unclaimed', #unclaimed)
c:apply()
return {'ok', #expired, requeued, lost, #unclaimed}
