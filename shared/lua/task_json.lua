-- task_json.lua: the stored JSON fields of a page of tasks of one shard, and their children
-- in this shard, in one call. Read-only. The API calls it once per shard for /api/tasks and
-- /api/task/info and splices the values into celery's Task.as_dict() (no decoding).
--
-- KEYS[1]  P..'idx:ts' (routes the call to the shard's slot)
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack list of the hash fields to read, the first one always stored ('uuid')
-- ARGV[3..]  task uuids
-- Reads (P = ARGV[1]; documented in shared/keys.py; spelled P .. KEY.<suffix>, the prelude's):
-- P task:<uuid> (hash), P children:<uuid> (set).
-- Returns, per uuid, {values, children}: values are the fields' JSON texts NUL-joined ('' when
-- absent; JSON text never holds a raw NUL), or false when the task is not in this shard;
-- children are its children in this shard.

local P = ARGV[1]
local fields = cmsgpack.unpack(ARGV[2])
local n = #fields

local out = {}
for a = 3, #ARGV do
  local u = ARGV[a]
  local h = redis.call('HMGET', P .. KEY.task .. u, unpack(fields))
  local values = false
  if h[1] then
    for i = 2, n do
      if not h[i] then h[i] = '' end
    end
    values = table.concat(h, '\0')
  end
  out[#out + 1] = { values, redis.call('SMEMBERS', P .. KEY.children .. u) }
end
return out
