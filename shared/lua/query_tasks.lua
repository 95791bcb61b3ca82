-- query_tasks.lua: walk one index zset of one shard, in order, and return the tasks that pass
-- the filters. Read-only. Called by the API in chunks (a bounded number of entries examined
-- per call), so a long scan never holds Redis for long; the caller resumes where it stopped.
--
-- KEYS[1]  the zset walked: P..'idx:ts', 'idx:received', 'idx:started', 'idx:state:<S>',
--          'idx:name:<n>', 'idx:worker:<w>', 'idx:sn:<S>:<n>', 'idx:sw:<S>:<w>', 'idx:lost' or
--          'idx:exc:<class>'
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack request:
--   asc      true: score ascending, member ascending; false: both descending (ZREVRANGE order)
--   min,max  inclusive score bounds (strings, '-inf'/'+inf' allowed)
--   after    nil, or {score, member}: resume strictly after this position
--   skip     matches to drop before the first one returned
--   want     most matches returned
--   budget   most entries examined when a filter is set (no filter: nothing is examined)
--   usec     nil, or stop examining (between batches of 250) after this many microseconds
--   filter   nil, or a map: states/names/workers = {value=true} (exact raw values), noname
--            (bool: only tasks without a name), lost (bool: only tasks marked lost),
--            exceptions = {class=true} (tasks with one of them in _x), received/started =
--            {min, max} (a task without
--            that time passes, as in Flower), search = prefilter tree (services/api/search.py:
--            'and'/'or' nodes, 'v' raw values of _n/_s/_w, 't' substrings, 'm' maybe, 'n' no)
-- Reads (P = ARGV[1]; documented in shared/keys.py; spelled P .. KEY.<suffix>, the prelude's):
--   KEYS[1] (zset) and, when a filter is set, P task:<uuid> (hash): one HMGET per entry
--   examined of the fields the filter reads among _s, _n, _w, _x, received, started, lost,
--   args, kwargs, result, exception, traceback.
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

-- the hash fields the filters read (one HMGET per task examined)
local fields, at = {}, {}
local function need(f)
  if not at[f] then
    fields[#fields + 1] = f
    at[f] = #fields
  end
end
if filter.states then need(HIDDEN.state) end
if filter.names or filter.noname then need(HIDDEN.name) end
if filter.workers then need(HIDDEN.worker) end
if filter.received then need('received') end
if filter.started then need('started') end
if filter.lost then need('lost') end
if filter.exceptions then need(HIDDEN.exceptions) end

-- Search (the tree from services/api/search.py:prefilter). Name, state and worker terms come
-- resolved into sets of raw values. 't' terms are lowercase substrings of args, kwargs, result,
-- exception, traceback or (field '') of the first three or the uuid. args/kwargs/result are stored as JSON: an ASCII
-- string without a backslash is its text between quotes, which are kept (search.py sends terms
-- holding '"' as maybes, so a term is in the quoted text exactly when it is in the text).
-- Anything else (non-ASCII, where Flower's casefold and Lua's lower differ; escapes; a value
-- that is not a string) is undecidable here: the term answers maybe and Python decides.
local search = filter.search
local JSON_FIELDS = { 'args', 'kwargs', 'result' }
local function wants(node)
  local op = node[1]
  if op == 'and' or op == 'or' then
    for i = 2, #node do wants(node[i]) end
  elseif op == 'v' then
    need(node[2])
  elseif op == 't' then
    if node[2] == '' then
      for _, f in ipairs(JSON_FIELDS) do need(f) end
    else
      need(node[2])
    end
  end
end
if search then wants(search) end

local DECIDABLE = '^[^\1\128-\255\\]*$'
local h, member = {}, nil
-- texts of the task being examined, computed once: cache[f] holds when fresh[f] == seq
local cache, fresh, seq = {}, {}, 0

-- lowercase text of field f ('': the uuid, args, kwargs and result NUL-joined), false when
-- undecidable
local function text(f)
  if fresh[f] == seq then return cache[f] end
  local t
  if f == '' then
    local a, k, r = h[at.args], h[at.kwargs], h[at.result]
    if (a and string.byte(a, 1) ~= 34) or (k and string.byte(k, 1) ~= 34)
      or (r and string.byte(r, 1) ~= 34) then
      t = false
    else
      t = member .. '\0' .. (a or '') .. '\0' .. (k or '') .. '\0' .. (r or '')
      if string.find(t, DECIDABLE) then t = string.lower(t) else t = false end
    end
  else
    t = h[at[f]]
    if not t then
      t = ''
    elseif string.byte(t, 1) == 34 and string.find(t, DECIDABLE) then
      t = string.lower(t)
    else
      t = false
    end
  end
  cache[f], fresh[f] = t, seq
  return t
end

-- false when the task's raw uuid/JSON strings lack the term's anchor (search.py: characters
-- that case, escapes and casefolding leave as they are), so it cannot match; a value that is not
-- a JSON string (Flower matches its Python text) could
local function holds(raw, anchor)
  return raw and (string.byte(raw, 1) ~= 34 or string.find(raw, anchor, 1, true)) or false
end

local function may_hold(f, anchor)
  if f ~= '' then return holds(h[at[f]], anchor) end
  return string.find(member, anchor, 1, true) or holds(h[at.args], anchor)
    or holds(h[at.kwargs], anchor) or holds(h[at.result], anchor)
end

-- 0: no, 1: maybe, 2: yes
local function eval(node)
  local op = node[1]
  if op == 't' then
    if node[4] and not may_hold(node[2], node[4]) then return 0 end
    local t = text(node[2])
    if t == false then
      if node[2] ~= '' then return 1 end
      -- some part is undecidable: the others may still hold the term
      local r = 0
      t = string.lower(member)
      if string.find(member, DECIDABLE) then
        if string.find(t, node[3], 1, true) then return 2 end
      else
        r = 1
      end
      for _, f in ipairs(JSON_FIELDS) do
        t = text(f)
        if t == false then r = 1 elseif string.find(t, node[3], 1, true) then return 2 end
      end
      return r
    end
    if string.find(t, node[3], 1, true) then return 2 end
    return 0
  elseif op == 'v' then
    if node[3][h[at[node[2]]]] then return 2 end
    return 0
  elseif op == 'and' then
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
  elseif op == 'n' then
    return 0
  end
  return 1
end

local function in_range(json, range)
  if not json or json == 'null' then return true end
  local v = tonumber(json)
  if not v then return true end
  return v >= tonumber(range[1]) and v <= tonumber(range[2])
end

-- the last rank inside [min, max] in walk order (scores are not compared per entry)
local edge
if asc then
  edge = redis.call('ZCOUNT', key, '-inf', req.max) - 1
else
  edge = redis.call('ZCOUNT', key, '-inf', '(' .. req.min)
end

local states, names, workers = filter.states, filter.names, filter.workers
local noname, received, started = filter.noname, filter.received, filter.started
local lost = filter.lost
local exceptions = filter.exceptions
local function has_exception(classes)
  for c in string.gmatch(classes or '', '([^\31]+)') do
    if exceptions[c] then return true end
  end
  return false
end
local done = 0
local last_score, last_member = false, false
local budget = req.budget
-- a time bound too (usec): Redis serves nobody else while a script runs
local started_at = redis.call('TIME')
local function elapsed()
  local now = redis.call('TIME')
  return (now[1] - started_at[1]) * 1000000 + (now[2] - started_at[2])
end
local stop = false
while not stop do
  if req.usec and examined > 0 and elapsed() >= req.usec then break end
  local n = math.min(budget - examined, 250)
  local lo, hi
  if asc then
    lo, hi = rank, math.min(rank + n - 1, edge)
  else
    lo, hi = math.max(rank - n + 1, edge), rank
  end
  if n <= 0 or lo > hi then break end
  local items = redis.call('ZRANGE', key, lo, hi)
  if #items == 0 then break end
  local first, last, step = 1, #items, 1
  if not asc then first, last, step = #items, 1, -1 end
  for i = first, last, step do
    member = items[i]
    examined = examined + 1
    if asc then rank = rank + 1 else rank = rank - 1 end
    if #fields > 0 then h = redis.call('HMGET', P .. KEY.task .. member, unpack(fields)) end
    local ok = true
    if states and not states[h[at._s]] then ok = false end
    if ok and noname and h[at._n] and h[at._n] ~= '' then ok = false end
    if ok and names and not names[h[at._n] or ''] then ok = false end
    if ok and workers and not workers[h[at._w] or ''] then ok = false end
    if ok and received and not in_range(h[at.received], received) then ok = false end
    if ok and started and not in_range(h[at.started], started) then ok = false end
    if ok and lost and not h[at.lost] then ok = false end
    if ok and exceptions and not has_exception(h[at[HIDDEN.exceptions]]) then ok = false end
    local sure = 1
    if ok and search then
      seq = seq + 1
      local r = eval(search)
      if r == 0 then ok = false elseif r == 1 then sure = 0 end
    end
    if ok then
      if skip > 0 and sure == 1 then
        skip = skip - 1
      else
        matches[#matches + 1] = member
        matches[#matches + 1] = redis.call('ZSCORE', key, member)
        matches[#matches + 1] = sure
      end
    end
    if #matches >= 3 * want or examined >= budget then
      stop = true
      break
    end
  end
end
if examined > 0 then
  last_member = member
  last_score = redis.call('ZSCORE', key, member)
end
if (asc and rank > edge) or (not asc and rank < edge) then done = 1 end
return { matches, examined, done, last_score, last_member, skip }
