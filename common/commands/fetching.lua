--[[ fetching.lua: a worker is about to fetch one URL of its batch (the worker, per fetch).

ARGV  1 prefix, 2 crawl id, 3 host, 4 batch id, 5 fp.
Keys  K.lease_batch, per host h:{host}:fetching.
Guarantees
  * Nothing is fetched under a lease that is no longer this batch's: a worker paused past its
    lease stops here instead of doubling the host's load.
  * If the worker vanishes, expire.lua charges the loss to the URLs marked here (the ones in
    flight), not to the whole batch. report.lua clears the mark.
Returns {'ok'} or {'stale'}.
]]
-- Called once per page, so it does the least: the lease check alone also covers a lost state
-- (its lease is gone with it), and a mark for an fp not in the lease is never charged.
local host, batch_id, fp = ARGV[3], ARGV[4], ARGV[5]
if redis.call('HGET', K.lease_batch, host) ~= batch_id then return {'stale'} end
redis.call('SADD', host_key(host, 'fetching'), fp)
return {'ok'}
