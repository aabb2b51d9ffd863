--[[ unlock.lua: give the scheduler lock up (a scheduler stopping).

ARGV  1 prefix, 2 unused, 3 this scheduler's id.
Keys  K.scheduler_lock.
Guarantees
  * Only the holder's lock is deleted.
Returns 1 if it was released, 0 otherwise.
]]
if redis.call('GET', K.scheduler_lock) == ARGV[3] then
  return redis.call('DEL', K.scheduler_lock)
end
return 0
