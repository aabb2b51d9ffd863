--[[ finish.lua: is the crawl finished? (the scheduler, every housekeeping pass).

ARGV  1 prefix, 2 crawl id.
Keys  K.crawl K.stats K.events K.ready K.lease_batch K.outbox.
Guarantees
  * Finished means: URLs were admitted (K.crawl's admitted_at), no host has URLs waiting (a
    host with a queue is always in K.ready or leased) or a batch out, no event is unread, no link waits in the outbox for another shard, and
    the crawl's state was never lost. The structures decide, not the counters, so a corrupted
    counter cannot end a crawl. The first time, stats.finished_at is set (Redis's clock); new
    work clears it.
  * A crawl whose state was lost (crawl.lua) never reports finished.
Returns {'ok', 1 or 0} or {'state_lost'}.
]]
if not crawl_is_current() then return {'state_lost'} end
local lost = redis.call('HEXISTS', K.crawl, 'state_lost_at') == 1
if not lost and ADMITTED
   and redis.call('ZCARD', K.ready) == 0 and redis.call('HLEN', K.lease_batch) == 0
   and redis.call('XLEN', K.events) == 0 and redis.call('XLEN', K.outbox) == 0 then
  redis.call('HSETNX', K.stats, 'finished_at', now_s())
  return {'ok', 1}
end
redis.call('HDEL', K.stats, 'finished_at')
return {'ok', 0}
