--[[ lock.lua: take or keep the scheduler lock (every scheduler, twice a second).

ARGV  1 prefix, 2 unused, 3 this scheduler's id, 4 lock time-to-live (ms).
Keys  K.scheduler_lock.
Guarantees
  * At most one scheduler leads: the lock is taken only when free, kept only by its holder.
    Renewing with it is safe: a lock that expired and was not taken has no other leader.
Returns 1 (leading) or 0 (another scheduler holds it).
]]
local me, ttl = ARGV[3], ARGV[4]
if redis.call('GET', K.scheduler_lock) == me then
  return redis.call('PEXPIRE', K.scheduler_lock, ttl)
end
if redis.call('SET', K.scheduler_lock, me, 'NX', 'PX', ttl) then return 1 end
return 0
