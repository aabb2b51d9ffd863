--[[ claim.lua: a worker starts a batch (the worker, at the start of the arq job).

ARGV  1 prefix, 2 crawl id, 3 host, 4 batch id, 5 lease seconds, 6 arq job id.
Keys  K.crawl K.arq_queue K.lease_batch K.waiting K.leases K.stats K.quarantine K.scope_hosts
      K.scope_ports K.ready (K.scheduler_wake), per host
      h:{host}:lease and h:{host}:fetching.
Guarantees
  * The job leaves arq's queue whatever the answer, so arq never starts it again: the lease,
    not arq's retry, brings a lost batch back.
  * Only the batch that holds the host's lease may start; the lease's clock starts now, on
    Redis's clock, for ARGV[5] seconds.
  * The URLs come from the lease itself; malformed lease entries go to quarantine (counted).
  * A batch leaves K.waiting: with hosts in K.ready, the scheduler is woken
    (K.scheduler_wake) to send another in its place.
  * The answer carries what the worker needs to filter links itself: the seen set's bucket
    digits and the size of the scope (it re-reads K.scope_hosts and K.scope_ports when that
    changes).
Returns {'ok', seen digits, scope hosts, entry...}, {'stale'} (the lease is not this batch's)
or {'state_lost'}.
]]
local host, batch_id, lease_seconds, job_id = ARGV[3], ARGV[4], tonumber(ARGV[5]), ARGV[6]
redis.call('ZREM', K.arq_queue, job_id)
if not crawl_is_current() then return {'state_lost'} end
if redis.call('HGET', K.lease_batch, host) ~= batch_id then return {'stale'} end
local lease = host_key(host, 'lease')
local entries = redis.call('HGETALL', lease)
local c = counters()
local scope = redis.call('SCARD', K.scope_hosts) + redis.call('SCARD', K.scope_ports)
local out, bad = {'ok', SEEN_DIGITS, scope}, {}
for i = 1, #entries, 2 do
  local fp, why = entry_fp(entries[i + 1])
  if fp and fp == entries[i] then
    out[#out + 1] = entries[i + 1]
  else
    bad[#bad + 1] = {entries[i], entries[i + 1], why or 'fp does not match its field'}
  end
end
for _, b in ipairs(bad) do
  quarantine(lease, b[3], b[2], true)
  redis.call('HDEL', lease, b[1])
end
c:add('in_flight', -#bad)
c:add('quarantined', #bad)
redis.call('ZREM', K.waiting, host)
redis.call('ZADD', K.leases, now_s() + lease_seconds, host)
redis.call('DEL', host_key(host, 'fetching'))
-- A batch fewer waits: the scheduler may send one more, if a host is ready for it.
if redis.call('ZCARD', K.ready) > 0 then wake_scheduler() end
c:apply()
return out
