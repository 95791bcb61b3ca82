-- apply_events.lua: merge a batch of Celery events into one shard's state, atomically.
--
-- Called by the collector with every event of a batch that falls in this shard. Every key
-- below shares the shard's hash tag, so the script runs in one Redis Cluster slot.
--
-- KEYS[1]  P..'stream' (routes the call to the shard's slot)
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack config: now, max_tasks, task_ttl, failed_ttl, stream_maxlen, channel,
--          minute_ttl, evict_batch, age_check (bool)
-- ARGV[3]  msgpack array of events (maps; values that are JSON text end in 'j'):
--   task:   k='t', u=uuid, uj, s=subject, tj=timestamp, cj=clock, h=hostname, hj, f={field=json},
--           n=raw name (when carried), p=raw parent_id (when carried), e=normalized event JSON
--           without its closing brace, rb=runtime bucket, rj=runtime (task-succeeded)
--   worker: k='w', h=hostname, s=subject, tj=timestamp, cj=clock, lj=local_received,
--           f={field=json}, e=as above
--
-- Keys touched (P = ARGV[1]; documented in shared/keys.py):
--   P task:<uuid>          hash: public fields as JSON text; hidden merge state:
--                            _h  the task's events, sorted: 'ts,clock,subject,mask;...'
--                            _s/_n/_w/_p  raw state, name, worker, parent_id (index keys)
--   P idx:ts, idx:received, idx:started, idx:state:<S>, idx:name:<n>, idx:worker:<w>,
--     idx:sn:<S>:<n>, idx:sw:<S>:<w>           zsets of uuids
--   P children:<uuid>      set     P names  set     P states  set of states seen
--   P worker:<host>        hash    P workers  zset  P seen  zset  P wdedup:<host>  zset
--   P counts  hash         P minute:<m>  hash       P runtime  hash
--   P stream  stream       and PUBLISH on the events channel
--
-- Merge rule. celery.events.state.Task.event folds events in arrival order; its answer depends
-- on that order. Here a task's events are kept sorted by (timestamp, lifecycle rank, clock,
-- subject) and the answer is celery's fold over that sorted history, whatever order the
-- events arrived in. Fields other than state/timestamp/clock come from the latest event (in
-- that order) that carries them; state, timestamp and clock are recomputed by the fold.
-- Returns {applied, duplicates, evicted}.

local P = ARGV[1]
local cfg = cmsgpack.unpack(ARGV[2])
local events = cmsgpack.unpack(ARGV[3])
local SEP = '\31'

local SUBJECT_STATE = {
  sent = 'PENDING', received = 'RECEIVED', started = 'STARTED', failed = 'FAILURE',
  retried = 'RETRY', succeeded = 'SUCCESS', revoked = 'REVOKED', rejected = 'REJECTED',
}
-- celery.states.PRECEDENCE; unknown (custom) states rank 2.
local PRECEDENCE = {
  SUCCESS = 0, FAILURE = 1, REVOKED = 3, STARTED = 4, RECEIVED = 5, REJECTED = 6,
  RETRY = 7, PENDING = 8,
}
local RANK = { sent = 0, received = 1, started = 2 }
-- Bit per field an event can write (shared.events.TASK_EVENT_FIELDS, same order).
local FIELD_BIT = {
  name = 1, args = 2, kwargs = 4, eta = 8, expires = 16, retries = 32, result = 64,
  exception = 128, runtime = 256, traceback = 512, exchange = 1024, routing_key = 2048,
  root_id = 4096, parent_id = 8192,
}
local MAX_HISTORY = 100

local function state_of(subject)
  return SUBJECT_STATE[subject] or string.upper(subject)
end

local function precedence(state)
  return PRECEDENCE[state] or 2
end

local function has_bit(mask, bit)
  return math.floor(mask / bit) % 2 == 1
end

local function new_entry(tj, cj, subject, mask)
  return { tj = tj, ts = tonumber(tj), cj = cj, clock = tonumber(cj), subject = subject,
           rank = RANK[subject] or 3, mask = mask }
end

local function parse_history(text)
  local list = {}
  if text then
    for tj, cj, subject, mask in string.gmatch(text, '([^,;]+),([^,;]+),([^,;]+),(%d+);') do
      list[#list + 1] = new_entry(tj, cj, subject, tonumber(mask))
    end
  end
  return list
end

local function format_history(list)
  local parts = {}
  local first = math.max(1, #list - MAX_HISTORY + 1)
  for i = first, #list do
    local e = list[i]
    parts[#parts + 1] = e.tj .. ',' .. e.cj .. ',' .. e.subject .. ',' .. e.mask .. ';'
  end
  return table.concat(parts)
end

local function sorts_before(a, b)
  if a.ts ~= b.ts then return a.ts < b.ts end
  if a.rank ~= b.rank then return a.rank < b.rank end
  if a.clock ~= b.clock then return a.clock < b.clock end
  return a.subject < b.subject
end

-- celery's fold: Task.event over the sorted history.
local function fold(list)
  local state, tj, cj = 'PENDING', nil, '0'
  for i = 1, #list do
    local e = list[i]
    local s = state_of(e.subject)
    if s ~= 'RETRY' and state ~= 'RETRY' and precedence(s) > precedence(state) then
      -- logically earlier: merged; RECEIVED keeps only its own fields (no timestamp/clock)
      if s ~= 'RECEIVED' then tj, cj = e.tj, e.cj end
    else
      state, tj, cj = s, e.tj, e.cj
    end
  end
  return state, tj, cj
end

local function group_keys(state, name, worker)
  local keys = {}
  if state then
    keys[#keys + 1] = P .. 'idx:state:' .. state
    if name then keys[#keys + 1] = P .. 'idx:sn:' .. state .. ':' .. name end
    if worker then keys[#keys + 1] = P .. 'idx:sw:' .. state .. ':' .. worker end
  end
  if name then keys[#keys + 1] = P .. 'idx:name:' .. name end
  if worker then keys[#keys + 1] = P .. 'idx:worker:' .. worker end
  return keys
end

local function nonempty(v)
  if v == false or v == '' then return nil end
  return v
end

local minute_keys = {}
local function count_minute(ts, name, state)
  local key = P .. 'minute:' .. math.floor(ts / 60)
  redis.call('HINCRBY', key, (name or '') .. SEP .. state, 1)
  if not minute_keys[key] then
    minute_keys[key] = true
    redis.call('EXPIRE', key, cfg.minute_ttl)
  end
end

local function emit(open_json, extra)
  local entry = open_json .. extra .. '}'
  local id = redis.call('XADD', P .. 'stream', 'MAXLEN', '~', cfg.stream_maxlen, '*', 'e', entry)
  redis.call('PUBLISH', cfg.channel, open_json .. extra .. ',"stream_id":"' .. id .. '"}')
end

local function apply_task(ev)
  local u = ev.u
  local key = P .. 'task:' .. u
  local cur = redis.call('HMGET', key, '_h', '_s', '_n', '_w', '_p', 'timestamp', 'name')
  local history = parse_history(cur[1])
  local old_state, old_name, old_worker, old_parent = cur[2], cur[3], cur[4], cur[5]
  old_state, old_name, old_worker, old_parent =
    nonempty(old_state), nonempty(old_name), nonempty(old_worker), nonempty(old_parent)
  local old_tj = cur[6]
  local name_json = cur[7]

  local mask = 0
  for f, _ in pairs(ev.f) do
    local bit = FIELD_BIT[f]
    if bit then mask = mask + bit end
  end
  local e = new_entry(ev.tj, ev.cj, ev.s, mask)

  -- duplicate (the same event delivered twice) and position in the sorted history
  local pos = #history + 1
  for i = #history, 1, -1 do
    local h = history[i]
    if h.ts == e.ts and h.clock == e.clock and h.subject == e.subject then
      return false
    end
    if sorts_before(e, h) then pos = i end
  end
  table.insert(history, pos, e)

  -- which fields this event writes: those no later event (in sorted order) also carries
  local later_mask, later_worker, later_client, later_same = 0, false, false, false
  for i = pos + 1, #history do
    local h = history[i]
    for _, bit in pairs(FIELD_BIT) do
      if has_bit(h.mask, bit) and not has_bit(later_mask, bit) then
        later_mask = later_mask + bit
      end
    end
    if h.subject == 'sent' then later_client = true else later_worker = true end
    if h.subject == e.subject then later_same = true end
  end

  local hset = { key }
  local function set(f, v)
    hset[#hset + 1] = f
    hset[#hset + 1] = v
  end
  local new_name, new_parent = old_name, old_parent
  for f, v in pairs(ev.f) do
    if not has_bit(later_mask, FIELD_BIT[f]) then
      set(f, v)
      if f == 'name' then
        new_name = nonempty(ev.n)
        name_json = v
      elseif f == 'parent_id' then
        new_parent = nonempty(ev.p)
      end
    end
  end
  if SUBJECT_STATE[e.subject] and not later_same then
    set(e.subject, e.tj)
  end
  local new_worker = old_worker
  if e.subject == 'sent' then
    if not later_client then set('client', ev.hj) end
  elseif not later_worker then
    set('worker', ev.hj)
    new_worker = ev.h
  end

  local state, tj, cj = fold(history)
  set('state', '"' .. state .. '"')
  set('timestamp', tj)
  set('clock', cj)
  set('_h', format_history(history))
  set('_s', state)
  if new_name ~= old_name then set('_n', new_name or '') end
  if new_worker ~= old_worker then set('_w', new_worker) end
  if new_parent ~= old_parent then set('_p', new_parent or '') end
  if #history == 1 then set('uuid', ev.uj) end
  redis.call('HSET', unpack(hset))

  -- indexes
  redis.call('ZADD', P .. 'idx:ts', tj, u)
  if e.subject == 'received' and not later_same then
    redis.call('ZADD', P .. 'idx:received', tj, u)
  elseif #history == 1 then
    redis.call('ZADD', P .. 'idx:received', '-inf', u)
  end
  if e.subject == 'started' and not later_same then
    redis.call('ZADD', P .. 'idx:started', tj, u)
  elseif #history == 1 then
    redis.call('ZADD', P .. 'idx:started', '-inf', u)
  end
  local old_keys = group_keys(old_state, old_name, old_worker)
  local new_keys = group_keys(state, new_name, new_worker)
  local keep = {}
  for _, k in ipairs(new_keys) do keep[k] = true end
  local was = {}
  for _, k in ipairs(old_keys) do
    was[k] = true
    if not keep[k] then redis.call('ZREM', k, u) end
  end
  local moved = tj ~= old_tj
  for _, k in ipairs(new_keys) do
    if moved or not was[k] then redis.call('ZADD', k, tj, u) end
  end
  if state ~= old_state then redis.call('SADD', P .. 'states', state) end
  if new_name and new_name ~= old_name then redis.call('SADD', P .. 'names', new_name) end
  if new_parent ~= old_parent then
    if old_parent then redis.call('SREM', P .. 'children:' .. old_parent, u) end
    if new_parent then redis.call('SADD', P .. 'children:' .. new_parent, u) end
  end

  -- counters, worker liveness, charts, stream
  redis.call('HINCRBY', P .. 'counts', ev.h .. SEP .. 'task-' .. ev.s .. SEP .. (new_name or ''), 1)
  if e.subject ~= 'sent' then
    redis.call('ZADD', P .. 'seen', 'GT', e.tj, ev.h)
  end
  count_minute(e.ts, new_name, state_of(e.subject))
  if ev.rb then
    local prefix = ev.h .. SEP .. (new_name or '') .. SEP
    redis.call('HINCRBY', P .. 'runtime', prefix .. ev.rb, 1)
    redis.call('HINCRBY', P .. 'runtime', prefix .. 'count', 1)
    redis.call('HINCRBYFLOAT', P .. 'runtime', prefix .. 'sum', ev.rj)
  end
  emit(ev.e, ',"task_name":' .. (name_json or 'null') .. ',"task_state":"' .. state .. '"')
  return true
end

local function later(tj_a, cj_a, text_b)
  -- is event (tj_a, cj_a) after the event recorded as 'tj|cj' in text_b (or nothing)?
  if not text_b then return true end
  local tj_b, cj_b = string.match(text_b, '^([^|]+)|(.+)$')
  local ta, tb = tonumber(tj_a), tonumber(tj_b)
  if ta ~= tb then return ta > tb end
  return tonumber(cj_a) > tonumber(cj_b)
end

local function apply_worker(ev)
  local host = ev.h
  local key = P .. 'worker:' .. host
  local dedup = P .. 'wdedup:' .. host
  if redis.call('ZADD', dedup, 'NX', ev.tj, ev.tj .. '|' .. ev.cj .. '|' .. ev.s) == 0 then
    return false
  end
  redis.call('ZREMRANGEBYRANK', dedup, 0, -257)

  -- each field from the latest worker event (by sender time, clock) that carries it
  local names, provenance = {}, {}
  for f, _ in pairs(ev.f) do
    names[#names + 1] = f
    provenance[#provenance + 1] = '_k.' .. f
  end
  local hset = { key }
  if #names > 0 then
    local known = redis.call('HMGET', key, unpack(provenance))
    local stamp = ev.tj .. '|' .. ev.cj
    for i, f in ipairs(names) do
      if later(ev.tj, ev.cj, known[i] or nil) then
        hset[#hset + 1] = f
        hset[#hset + 1] = ev.f[f]
        hset[#hset + 1] = provenance[i]
        hset[#hset + 1] = stamp
      end
    end
  end

  -- liveness as celery's Worker: heartbeats are receive times, cleared by worker-offline;
  -- ordered by sender time so that a late heartbeat does not undo a newer offline
  local live = redis.call('HMGET', key, '_hb', '_hbts', '_offts')
  local hb, hbts, offts = tonumber(live[1]), tonumber(live[2]), tonumber(live[3])
  local ts = tonumber(ev.tj)
  if ev.s == 'offline' then
    if not offts or ts > offts then
      hset[#hset + 1] = '_offts'
      hset[#hset + 1] = ev.tj
    end
    if not hbts or ts > hbts then
      redis.call('HDEL', key, '_hb', '_hbts')
    end
  elseif not offts or ts > offts then
    if not hb or tonumber(ev.lj) > hb then
      hset[#hset + 1] = '_hb'
      hset[#hset + 1] = ev.lj
    end
    if not hbts or ts > hbts then
      hset[#hset + 1] = '_hbts'
      hset[#hset + 1] = ev.tj
    end
    redis.call('ZADD', P .. 'workers', 'GT', ev.lj, host)
  end
  if #hset > 1 then redis.call('HSET', unpack(hset)) end

  redis.call('HINCRBY', P .. 'counts', host .. SEP .. 'worker-' .. ev.s .. SEP, 1)
  emit(ev.e, '')
  return true
end

local function evict(u)
  local key = P .. 'task:' .. u
  local f = redis.call('HMGET', key, '_s', '_n', '_w', '_p')
  redis.call('ZREM', P .. 'idx:ts', u)
  redis.call('ZREM', P .. 'idx:received', u)
  redis.call('ZREM', P .. 'idx:started', u)
  for _, k in ipairs(group_keys(nonempty(f[1]), nonempty(f[2]), nonempty(f[3]))) do
    redis.call('ZREM', k, u)
  end
  local parent = nonempty(f[4])
  if parent then redis.call('SREM', P .. 'children:' .. parent, u) end
  redis.call('DEL', key, P .. 'children:' .. u)
end

local applied, duplicates, evicted = 0, 0, 0
for _, ev in ipairs(events) do
  local ok
  if ev.k == 't' then ok = apply_task(ev) else ok = apply_worker(ev) end
  if ok then applied = applied + 1 else duplicates = duplicates + 1 end
end

-- retention: by count (oldest first), then by age (failed tasks have their own TTL)
local excess = redis.call('ZCARD', P .. 'idx:ts') - cfg.max_tasks
if excess > 0 then
  local victims = redis.call('ZRANGE', P .. 'idx:ts', 0, math.min(excess, cfg.evict_batch) - 1)
  for _, u in ipairs(victims) do evict(u) end
  evicted = evicted + #victims
end
if cfg.age_check then
  for _, state in ipairs(redis.call('SMEMBERS', P .. 'states')) do
    local ttl = cfg.task_ttl
    if state == 'FAILURE' then ttl = cfg.failed_ttl end
    if ttl > 0 and evicted < cfg.evict_batch then
      local victims = redis.call('ZRANGEBYSCORE', P .. 'idx:state:' .. state, '-inf',
        '(' .. (cfg.now - ttl), 'LIMIT', 0, cfg.evict_batch - evicted)
      for _, u in ipairs(victims) do evict(u) end
      evicted = evicted + #victims
    end
  end
end

return { applied, duplicates, evicted }
