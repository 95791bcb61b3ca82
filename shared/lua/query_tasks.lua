-- query_tasks.lua: walk one index zset of one shard, in order, and return the tasks that pass
-- the filters. Read-only. Called by the API in chunks (a bounded number of entries examined
-- per call), so a long scan never holds Redis for long; the caller resumes where it stopped.
--
-- KEYS[1]  the zset walked: P..'idx:ts', 'idx:received', 'idx:started', 'idx:state:<S>',
--          'idx:name:<n>', 'idx:worker:<w>', 'idx:sn:<S>:<n>' or 'idx:sw:<S>:<w>'
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack request:
--   asc      true: score ascending, member ascending; false: both descending (ZREVRANGE order)
--   min,max  inclusive score bounds (strings, '-inf'/'+inf' allowed)
--   after    nil, or {score, member}: resume strictly after this position
--   skip     matches to drop before the first one returned
--   want     most matches returned
--   budget   most entries examined when a filter is set (no filter: nothing is examined)
--   filter   nil, or a map: states/names/workers = {value=true} (exact raw values), noname
--            (bool: only tasks without a name), received/started = {min, max} (a task without
--            that time passes, as in Flower), search = prefilter tree (services/api/search.py)
-- Reads (P = ARGV[1]; documented in shared/keys.py):
--   KEYS[1] (zset) and, when a filter is set, P task:<uuid> (hash) fields _s, _n, _w,
--   received, started and, with a search, args, kwargs, result.
-- Returns { matches, examined, done, last_score, last_member, skip }: matches is a flat list
-- member, score, sure (1: passes; 0: the search may match, the caller decides); done is 1 when
-- the range is exhausted; last_* is the last entry examined (where to resume); skip is what
-- is left of req.skip (only sure matches are skipped).

local key = KEYS[1]
local P = ARGV[1]
local req = cmsgpack.unpack(ARGV[2])
local asc = req.asc
local filter = req.filter
local lo_bound, hi_bound = tonumber(req.min), tonumber(req.max)

-- bytewise string order (Lua's < follows the server's collation locale)
local function bytes_lt(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end

-- ascending rank of the first entry after (asc) / last entry before (desc) position (s, m)
local function rank_after(s, m)
  local score = redis.call('ZSCORE', key, m)
  if score and tonumber(score) == tonumber(s) then
    local r = redis.call('ZRANK', key, m)
    if asc then return r + 1 else return r - 1 end
  end
  -- the entry moved or left: binary search among the entries with score s
  local lo = redis.call('ZCOUNT', key, '-inf', '(' .. s)
  local hi = redis.call('ZCOUNT', key, '-inf', s)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    local x = redis.call('ZRANGE', key, mid, mid)[1]
    if bytes_lt(x, m) then lo = mid + 1 else hi = mid end
  end
  if asc then return lo else return lo - 1 end
end

local total = redis.call('ZCARD', key)
local rank
if asc then
  rank = redis.call('ZCOUNT', key, '-inf', '(' .. req.min)
else
  rank = redis.call('ZCOUNT', key, '-inf', req.max) - 1
end
if req.after then
  local r = rank_after(req.after[1], req.after[2])
  if asc then rank = math.max(rank, r) else rank = math.min(rank, r) end
end

local function in_bounds(score)
  local v = tonumber(score)
  return v >= lo_bound and v <= hi_bound
end

local matches = {}
local examined, skip, want = 0, req.skip or 0, req.want

-- no filter: the index is the answer; skip by rank
if not filter then
  local available
  if asc then
    available = redis.call('ZCOUNT', key, '-inf', req.max) - rank
  else
    available = rank + 1 - redis.call('ZCOUNT', key, '-inf', '(' .. req.min)
  end
  available = math.max(0, available)
  local left = math.max(0, skip - available)
  if asc then rank = rank + skip else rank = rank - skip end
  local done = 0
  if want > 0 and rank >= 0 and rank < total then
    local items
    if asc then
      items = redis.call('ZRANGE', key, rank, rank + want - 1, 'WITHSCORES')
    else
      items = redis.call('ZRANGE', key, math.max(0, rank - want + 1), rank, 'WITHSCORES')
    end
    local first, last, step = 1, #items - 1, 2
    if not asc then first, last, step = #items - 1, 1, -2 end
    for i = first, last, step do
      if not in_bounds(items[i + 1]) then done = 1; break end
      matches[#matches + 1] = items[i]
      matches[#matches + 1] = items[i + 1]
      matches[#matches + 1] = 1
    end
    if #items < 2 * want then done = 1 end
  else
    done = 1
  end
  local n = #matches
  local last_score, last_member = false, false
  if n > 0 then last_score, last_member = matches[n - 1], matches[n - 2] end
  return { matches, 0, done, last_score, last_member, left }
end

local fields = { '_s', '_n', '_w', 'received', 'started' }
local search = filter.search
if search then
  fields[#fields + 1] = 'args'
  fields[#fields + 1] = 'kwargs'
  fields[#fields + 1] = 'result'
end

local function in_range(json, range)
  if not range or not json or json == 'null' then return true end
  local v = tonumber(json)
  if not v then return true end
  return v >= tonumber(range[1]) and v <= tonumber(range[2])
end

-- text of a field as Flower normalizes it, or nil when Lua cannot tell (non-ASCII, escapes,
-- non-string JSON values): then every term on it is a maybe
local function plain(raw)
  if not raw or raw == '' then return '' end
  if string.find(raw, '[\128-\255]') then return nil end
  return string.lower(raw)
end

local function json_text(raw)
  if not raw or raw == 'null' then return '' end
  if string.sub(raw, 1, 1) ~= '"' or string.find(raw, '\\', 1, true) then return nil end
  return plain(string.sub(raw, 2, -2))
end

local doc
local function field_text(f)
  local t = doc[f]
  if t == nil then
    if f == 'all' then
      local parts = {}
      for _, g in ipairs({ 'uuid', 'name', 'state', 'worker', 'args', 'kwargs', 'result' }) do
        local x = field_text(g)
        if x == false then doc.all = false; return false end
        parts[#parts + 1] = x
      end
      t = table.concat(parts, '\0')
    else
      t = false
    end
    doc[f] = t
  end
  return t
end

-- 0: no, 1: maybe, 2: yes
local function eval(node)
  local op = node[1]
  if op == 'and' then
    local r = 2
    for i = 2, #node do
      r = math.min(r, eval(node[i]))
      if r == 0 then return 0 end
    end
    return r
  elseif op == 'or' then
    local r = 0
    for i = 2, #node do
      r = math.max(r, eval(node[i]))
      if r == 2 then return 2 end
    end
    return r
  elseif op == 's' then
    local t = field_text('state')
    if t == false then return 1 end
    if t ~= '' and t == node[2] then return 2 end
    return 0
  elseif op == 't' then
    local f = node[2]
    if f == '' then f = 'all' end
    local t = field_text(f)
    if t == false then return 1 end
    if string.find(t, node[3], 1, true) then return 2 end
    return 0
  end
  return 1
end

local done = 0
local last_score, last_member = false, false
local budget = req.budget
while #matches < 3 * want and examined < budget do
  if rank < 0 or rank >= total then done = 1; break end
  local n = math.min(budget - examined, 200)
  local items
  if asc then
    items = redis.call('ZRANGE', key, rank, rank + n - 1, 'WITHSCORES')
  else
    items = redis.call('ZRANGE', key, math.max(0, rank - n + 1), rank, 'WITHSCORES')
  end
  if #items == 0 then done = 1; break end
  local first, last, step = 1, #items - 1, 2
  if not asc then first, last, step = #items - 1, 1, -2 end
  local stop = false
  for i = first, last, step do
    local member, score = items[i], items[i + 1]
    if not in_bounds(score) then done = 1; stop = true; break end
    examined = examined + 1
    last_score, last_member = score, member
    if asc then rank = rank + 1 else rank = rank - 1 end
    local h = redis.call('HMGET', P .. 'task:' .. member, unpack(fields))
    local ok = h[1] ~= false
    if ok and filter.states and not filter.states[h[1]] then ok = false end
    if ok and filter.noname and h[2] and h[2] ~= '' then ok = false end
    if ok and filter.names and not filter.names[h[2] or ''] then ok = false end
    if ok and filter.workers and not filter.workers[h[3] or ''] then ok = false end
    if ok and not in_range(h[4] or nil, filter.received) then ok = false end
    if ok and not in_range(h[5] or nil, filter.started) then ok = false end
    local sure = 1
    if ok and search then
      doc = {
        uuid = plain(member), name = plain(h[2] or nil), state = plain(h[1] or nil),
        worker = plain(h[3] or nil), args = json_text(h[6] or nil),
        kwargs = json_text(h[7] or nil), result = json_text(h[8] or nil),
      }
      local r = eval(search)
      if r == 0 then ok = false elseif r == 1 then sure = 0 end
    end
    if ok then
      if skip > 0 and sure == 1 then
        skip = skip - 1
      else
        matches[#matches + 1] = member
        matches[#matches + 1] = score
        matches[#matches + 1] = sure
      end
    end
    if #matches >= 3 * want or examined >= budget then stop = true; break end
  end
  if done == 1 then break end
  if not stop and #items < 2 * n then done = 1; break end
end
if rank < 0 or rank >= total then done = 1 end
return { matches, examined, done, last_score, last_member, skip }
