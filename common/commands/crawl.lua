--[[ crawl.lua: open the crawl, or notice that its state was lost (seed, scheduler, crawl).

ARGV  1 prefix, 2 the crawl id this process knows ('' = none yet), 3 a fresh id to use if
      there is no crawl, 4 the seen set's bucket digits for a new crawl (see lib.lua), 5 this
      Redis's shard record for a sharded crawl ('index/count', common/cluster.py), '' for a
      crawl on one Redis.
Keys  K.crawl (HASH: id, created_at, seen_digits, admitted_at once a URL was admitted, and after
      a loss state_lost_at and lost_id), K.events, K.shard.
Guarantees
  * The marker exists as long as the crawl's state does. A Redis restarted without
    persistence, or flushed, loses it with everything else: a process that knew the old id
    then records the loss (state_lost_at, lost_id) in the new marker, so every process and
    `status` see it and the crawl never reports finished as if nothing had happened.
  * The events stream and the scheduler's consumer group exist afterwards.
  * seen_digits is fixed when the crawl opens, so every process splits fingerprints alike.
  * A sharded process's marker never stands without the shard record: a new marker and the
    record (if none is there) are written together, whoever opens the crawl (a scheduler, a
    worker delivering links to another shard, after a loss too). A marker with no record is
    a one-shard crawl's, which bind_shard refuses to adopt as a shard.
Returns {'new' | 'ok' | 'lost', id, state_lost_at or '', seen digits, the shard record or ''}.
]]
local known, fresh = CRAWL, ARGV[3]
local digits = math.min(math.max(math.floor(tonumber(ARGV[4]) or 3), 3), 8)
local id = redis.call('HGET', K.crawl, 'id')
local answer
local now = now_s()
if not id then
  redis.call('HSET', K.crawl, 'id', fresh, 'created_at', now, 'seen_digits', digits)
  if ARGV[5] ~= '' then redis.call('SET', K.shard, ARGV[5], 'NX') end
  id = fresh
  answer = 'new'
  if known ~= '' then answer = 'lost' end
elseif known ~= '' and known ~= id then
  answer = 'lost'
else
  answer = 'ok'
end
if answer == 'lost' then
  redis.call('HSETNX', K.crawl, 'state_lost_at', now)
  redis.call('HSETNX', K.crawl, 'lost_id', known)
end
-- BUSYGROUP (it exists) is the usual answer; pcall keeps it from failing the script.
redis.pcall('XGROUP', 'CREATE', K.events, GROUP, '0', 'MKSTREAM')
local m = redis.call('HMGET', K.crawl, 'state_lost_at', 'seen_digits')
return {answer, id, m[1] or '', m[2] or '3', redis.call('GET', K.shard) or ''}
