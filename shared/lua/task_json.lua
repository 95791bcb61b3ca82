-- task_json.lua: the stored JSON fields of a page of tasks of one shard, and their children
-- in this shard, in one call. Read-only. The API calls it once per shard for /api/tasks and
-- /api/task/info and splices the values into celery's Task.as_dict() (no decoding).
--
-- KEYS[1]  P..'idx:ts' (routes the call to the shard's slot)
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack list of the hash fields to read, the first one always stored ('uuid')
-- ARGV[3..]  task uuids
-- Reads (P = ARGV[1]; documented in shared/keys.py): P task:<uuid> (hash), P children:<uuid>
-- (set).
-- Returns, per uuid, {values, children}: values are the fields' JSON texts (false when absent),
-- or false when the task is not in this shard; children are its children in this shard.

local P = ARGV[1]
local fields = cmsgpack.unpack(ARGV[2])

local out = {}
for a = 3, #ARGV do
  local u = ARGV[a]
  local h = redis.call('HMGET', P .. 'task:' .. u, unpack(fields))
  if not h[1] then h = false end
  out[#out + 1] = { h, redis.call('SMEMBERS', P .. 'children:' .. u) }
end
return out
