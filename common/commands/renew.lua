--[[ renew.lua: a worker keeps its lease (the worker, every third of the lease).

ARGV  1 prefix, 2 crawl id, 3 host, 4 batch id, 5 lease seconds.
Keys  K.lease_batch K.leases.
Guarantees
  * Only a claimed lease that is still this batch's is extended (XX: a lease that expire.lua
    ended is never revived), on Redis's clock.
Returns {'ok'}, {'stale'} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local host, batch_id, lease_seconds = ARGV[3], ARGV[4], tonumber(ARGV[5])
if redis.call('HGET', K.lease_batch, host) ~= batch_id then return {'stale'} end
if not redis.call('ZSCORE', K.leases, host) then return {'stale'} end
redis.call('ZADD', K.leases, 'XX', now_s() + lease_seconds, host)
return {'ok'}
