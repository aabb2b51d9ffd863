--[[ dispatch.lua: ready hosts get a batch each, as an arq job (the scheduler).

ARGV  1 prefix, 2 crawl id, 3 batch size, 4 most batches waiting for a worker, 5 arq function
      name, 6 arq job expiry (ms).
Keys  K.ready K.waiting K.lease_batch K.batch_seq K.stats K.quarantine K.arq_queue
      K.scheduler_woken (cleared: the scheduler's pass is under way) (and a
      message on the pub/sub channel K.arq_wake when jobs were queued),
      per host h:{host}:q and h:{host}:lease, and arq's job key arq:job:{batch id}.
Guarantees
  * At most one batch per host: the host's lease (K.lease_batch names the batch, h:{host}:lease
    holds its URLs) exists from here until report, expire or hand-back ends it.
  * The lease and the arq job are written in one step: a scheduler killed at any line leaves
    either both or neither. The job carries no URLs, only the host and batch id (HostBatch);
    the worker's claim reads the URLs from the lease, which stays the one source of truth.
  * The lease's clock starts at the claim, not here: until then the host is in K.waiting,
    and expire.lua returns a batch nobody claims in time without counting it as a loss.
  * A queue entry that is malformed goes to quarantine (counted) and never reaches a worker.
  * The backlog is never scanned: ZRANGEBYSCORE with a LIMIT, and LRANGE of one batch a host.
  * At most ARGV[4] batches wait for workers: the backlog stays here, where it is cheap.
Returns {'ok', batches, seconds until the earliest ready host is due ('' when no host is
ready, 'full' when no room is left: a claim makes room and wakes the scheduler)} or
{'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
-- This pass sees everything done so far: a change from here on wakes the scheduler again.
redis.call('DEL', K.scheduler_woken)
local batch_size, max_waiting = tonumber(ARGV[3]), tonumber(ARGV[4])
local job_function, job_expiry_ms = ARGV[5], tonumber(ARGV[6])
local room = max_waiting - redis.call('ZCARD', K.waiting)
if room <= 0 then return {'ok', 0, 'full'} end  -- a claim makes room and wakes the scheduler
local now = now_s()
-- Seconds until the earliest ready host is due ('' for none): the scheduler sleeps as long.
local function next_due()
  local first = redis.call('ZRANGE', K.ready, 0, 0, 'WITHSCORES')
  if #first == 0 then return '' end
  return string.format('%.3f', math.max(tonumber(first[2]) - now, 0))
end
local hosts = redis.call('ZRANGEBYSCORE', K.ready, '-inf', now, 'LIMIT', 0, room)
if #hosts == 0 then return {'ok', 0, next_due()} end
local c = counters()
-- Read and sort every entry first.
local plans = {}
for _, host in ipairs(hosts) do
  local plan
  if redis.call('HEXISTS', K.lease_batch, host) == 1 then
    plan = {host = host, leased = true}  -- a leftover; its report sets it ready again
  else
    plan = take_plan(host, batch_size)
    plan.more = redis.call('LLEN', plan.q) > plan.n
  end
  plans[#plans + 1] = plan
end
local batches = 0
local now_ms = math.floor(now * 1000)
for _, plan in ipairs(plans) do
  redis.call('ZREM', K.ready, plan.host)
  if not plan.leased then
    take_apply(plan, c)
    if #plan.take > 0 then
      local id = PREFIX .. 'b' .. redis.call('INCR', K.batch_seq)
      redis.call('HSET', K.lease_batch, plan.host, id)
      redis.call('ZADD', K.waiting, now, plan.host)
      -- arq's job format (arq.jobs.serialize_job through our JSON serializer), spelled
      -- out because cjson may write an empty table as []; a test runs arq's deserialize_job.
      local payload = cjson.encode({v = MESSAGE_VERSION, batch_id = id, host = plan.host,
        crawl = CRAWL})
      local job = '{"t":1,"f":' .. cjson.encode(job_function) .. ',"a":[' .. payload ..
        '],"k":{},"et":' .. string.format('%d', now_ms) .. '}'
      redis.call('SET', 'arq:job:' .. id, job, 'PX', job_expiry_ms)
      redis.call('ZADD', K.arq_queue, now_ms, id)
      batches = batches + 1
    elseif plan.more then
      redis.call('ZADD', K.ready, now, plan.host)
    end
  end
end
c:apply()
-- Workers that found nothing for a while poll slowly: tell them there is work.
if batches > 0 then redis.call('PUBLISH', K.arq_wake, batches) end
return {'ok', batches, batches < room and next_due() or 'full'}
