-- purge_worker.lua: forget one offline worker in one shard, unless it came back.
--
-- Called by the enabler for each shard, the worker's own shard (which holds its hash) first.
-- A worker counts as back when this shard has a sign of life from it newer than ``last``
-- (what the enabler saw when it decided): a heartbeat receive time (``_hb``) or a task event
-- (``seen``); then nothing is removed and 0 returned. Its tasks are left as they are: they
-- keep their ``worker`` field, their indexes and a lost mark (retention removes them in time);
-- the worker's deaths and lost counts go with it.
--
-- KEYS[1]  P..'stream' (routes the call to the shard's slot)
-- ARGV[1]  P, the shard's key prefix
-- ARGV[2]  hostname
-- ARGV[3]  last: the newest sign of life the enabler saw (epoch seconds)
-- ARGV[4]  MATCH pattern of the worker's fields in counts, runtime, prefetch, lostcounts and
--          failures
--          (hostname escaped, then the separator and '*')
-- ARGV[5]  '1' in the worker's own shard
--
-- Keys touched (P = ARGV[1]; documented in shared/keys.py):
--   P worker:<host>  hash (deleted)     P workers  zset (member removed)
--   P wdedup:<host>  zset (deleted)     P seen     zset (member removed)
--   P counts, P runtime, P prefetch, P lostcounts, P failures  hashes (the worker's fields
--     removed)
--   P deaths  hash (the worker's field removed)
-- Returns 1 when purged, 0 when the worker came back.

local P, host, last, pattern = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local home = ARGV[5] == '1'

local seen = tonumber(redis.call('ZSCORE', P .. KEY.seen, host))
if seen and seen > last then return 0 end
if home then
  local hb = tonumber(redis.call('HGET', P .. KEY.worker .. host, HIDDEN.heartbeat))
  if hb and hb > last then return 0 end
  redis.call('DEL', P .. KEY.worker .. host, P .. KEY.wdedup .. host)
  redis.call('ZREM', P .. KEY.workers, host)
end
redis.call('ZREM', P .. KEY.seen, host)
redis.call('HDEL', P .. KEY.deaths, host)
local labelled = { P .. KEY.counts, P .. KEY.runtime, P .. KEY.prefetch, P .. KEY.lostcounts,
                   P .. KEY.failures }
for _, key in ipairs(labelled) do
  local cursor = '0'
  repeat
    local reply = redis.call('HSCAN', key, cursor, 'MATCH', pattern, 'COUNT', 1000)
    cursor = reply[1]
    local fields = reply[2]
    for i = 1, #fields, 2 do redis.call('HDEL', key, fields[i]) end
  until cursor == '0'
end
return 1
