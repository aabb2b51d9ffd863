--[[ quarantine.lua: something a process could not read goes aside (workers, export).

ARGV  1 prefix, 2 unused, 3 source key, 4 reason, 5 the data as it was, 6 '1' to delete the
      source key (an arq job nobody can read), 7 arq queue member to withdraw ('' = none).
Keys  K.quarantine K.stats K.arq_queue, and the source key.
Guarantees
  * The entry is kept with where it came from and why, counted in stats.quarantined_other;
    nothing else of the crawl changes (a malformed job's batch comes back through
    expire.lua when nobody claims it).
Returns 1.
]]
local c = counters()
quarantine(ARGV[3], ARGV[4], ARGV[5], false)
c:add('quarantined_other', 1)
c:apply()
if ARGV[6] == '1' then redis.call('DEL', ARGV[3]) end
if ARGV[7] ~= '' then redis.call('ZREM', K.arq_queue, ARGV[7]) end
return 1
