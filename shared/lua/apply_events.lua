-- apply_events.lua: merge a batch of Celery events into one shard's state, atomically.
--
-- Called by the collector with every event of a batch that falls in this shard. Every key
-- below shares the shard's hash tag, so the script runs in one Redis Cluster slot.
--
-- KEYS[1]  P..'stream' (routes the call to the shard's slot)
-- ARGV[1]  P, the shard's key prefix, e.g. 'pollen:{pollen}:'
-- ARGV[2]  msgpack config: now, max_tasks, task_ttl, failed_ttl, stream_maxlen, channel,
--          minute_ttl, evict_batch, age_check (bool), redact ([[Lua pattern of task names,
--          [field...]]...]: the task name redaction rules), retention ([[Lua pattern of task
--          names, state or '*', seconds or -1 (forever)]...]: retention by task name)
-- ARGV[3]  msgpack array of events (services/collector/writer.py: task_args, worker_args), maps
--          whose *_json values are JSON text:
--   task:   kind='task', uuid, uuid_json, subject ('succeeded'...), timestamp_json, clock_json,
--           hostname, hostname_json, fields={field=json} (the fields it carries, FIELD_BIT's),
--           open_json (the normalized event JSON without its closing brace); when carried:
--           name, parent_id and queue (raw), retries and eta_ts (text, epoch seconds of the
--           eta; task-sent and task-received only), runtime_bucket and runtime_json (task-succeeded), exc_class (task-failed and
--           task-retried whose exception names a class: events.exception_class), held (field
--           -> JSON text: fields a task name redaction rule may replace, held back by the
--           collector from an event without a name; shared/redaction.py)
--   worker: kind='worker', hostname, subject ('heartbeat'...), timestamp_json, clock_json,
--           local_received_json, fields={field=json}, open_json
--   death:  kind='death', hostname, timestamp_json: the enabler found the worker dead, its
--           last sign of life at that time (services/enabler/deaths.py); sent to every shard
--
-- Keys touched (P = ARGV[1]; documented in shared/keys.py), spelled P .. KEY.<suffix> with the
-- prelude's KEY (shared/scripts.py puts before this script the names it uses, generated from
-- the Python definitions):
--   P task:<uuid>          hash: public fields as JSON text (null ones absent); merge state:
--                            _1.._N  the task's events, sorted, one per field (short values
--                                    keep small hashes in Redis's compact listpack encoding):
--                                    'timestamp,clock,subject,mask,retries[,x]', x: the
--                                    worker of a started/succeeded/failed, 'eta<epoch>' for
--                                    a sent/received with an eta; _hn = N
--                            _s/_n/_w/_p  raw state, name, worker, parent_id (index keys)
--                            _u  events counted before the task's name was known, to be
--                                moved under the name when it arrives (rare: out of order)
--                            _x  exception classes of its failed/retried events, SEP-joined
--   P idx:ts, idx:received, idx:started, idx:state:<S>, idx:name:<n>, idx:worker:<w>,
--     idx:sn:<S>:<n>, idx:sw:<S>:<w>           zsets of uuids
--   P children:<uuid>      set     P names  set     P states  set of states seen
--   P worker:<host>        hash    P workers  zset  P seen  zset  P wdedup:<host>  zset
--   P counts  hash         P minute:<m>  hash       P runtime  hash
--   P rtminute:<m>  hash: '<name>\31<bucket>' -> task-succeeded events that minute
--   P wait  hash: '<stage>\31<queue>\31<name>\31<bucket|sum>'  (wait rule below)
--   P wtminute:<m>  hash: '<stage>\31<queue>\31<name>\31<bucket>' -> waits ending that minute
--   P prefetch  hash: '<worker>\31<name>' -> 'timestamp,uuid,seconds' (Flower's prefetch time)
--   P deaths  hash: host -> 'ts,ts,...' ascending     P idx:lost  zset of uuids by timestamp
--   P lostcounts  hash: '<worker>\31<name>' -> tasks marked lost
--   P idx:exc:<class>  zset of uuids by timestamp   P failminute:<m>  hash: class -> events
--   P failures  hash: '<worker>\31<class>\31<name>\31<failed|retried>' -> events
--   P failfirst, P faillast  zsets: class by its first and last event's timestamp
--   P stream  stream       and one PUBLISH per call on the events channel
--
-- Merge rule. celery.events.state.Task.event folds events in arrival order; its answer depends
-- on that order. Here a task's events are kept sorted by (timestamp, lifecycle rank, clock,
-- subject) and the answer is celery's fold over that sorted history, whatever order the
-- events arrived in. Fields other than state/timestamp/clock come from the latest event (in
-- that order) that carries them; state, timestamp and clock are recomputed by the fold.
--
-- Lost rule. A task is lost while its state is RECEIVED or STARTED on a worker that died no
-- earlier than the task's newest event: it then has 'lost' (true) and 'lost_at' (the first
-- such death) and is in P idx:lost. A worker's deaths are kept in P deaths; the task's newest
-- event and its worker come from its history, so the mark too is the same whatever the order
-- of events and deaths. A later event (it finished after all, or another worker received it)
-- clears the mark.
--
-- Wait rule (queue health). A task's waits are a function of its sorted history, so counting
-- the difference between its waits after and before a call counts each wait once, whatever the
-- order of arrival. Per attempt: 'queue' = received - due, due being the task-sent of the same
-- retries or its eta when later (no task-sent: no queue wait); 'prefetch' = started - the
-- received before it, or its eta when later. Negative (clock skew) counts as 0. Labelled by
-- the task's queue (task-sent's) and name.
--
-- Cost. Each task is read once (its merge fields, not its args or result) and written once
-- per call however many of its events the batch holds, its indexes are moved once, and
-- counters are summed in Lua and written once per distinct field: per event, only the
-- stream entry remains (the call's messages go out in one PUBLISH).
-- Returns {applied, duplicates, evicted}.

local P = ARGV[1]
local cfg = cmsgpack.unpack(ARGV[2])
-- the keys written per event or per task, spelled once per call
local STREAM, COUNTS, RUNTIME, WAIT = P .. KEY.stream, P .. KEY.counts, P .. KEY.runtime, P .. KEY.wait
local IDX_TS, IDX_RECEIVED, IDX_STARTED = P .. KEY.idx_ts, P .. KEY.idx_received, P .. KEY.idx_started
local MINUTE, FAILMINUTE = P .. KEY.minute, P .. KEY.failminute
local RTMINUTE, WTMINUTE = P .. KEY.rtminute, P .. KEY.wtminute
local events = cmsgpack.unpack(ARGV[3])
-- KEY, HIDDEN, SEP, MAX_DEATHS, SUBJECT_STATE, STATE, PRECEDENCE, UNKNOWN_PRECEDENCE and
-- FIELD_BIT: the prelude.
-- Order of an attempt's first subjects, for events stamped alike (sorts_before); others rank 3.
local RANK = { sent = 0, received = 1, started = 2 }
local MAX_HISTORY = 100

local function state_of(subject)
  return SUBJECT_STATE[subject] or string.upper(subject)
end

local function precedence(state)
  return PRECEDENCE[state] or UNKNOWN_PRECEDENCE
end

local function has_bit(mask, bit)
  return math.floor(mask / bit) % 2 == 1
end

-- r: the retries of a task-sent/task-received ('' otherwise); x, for Flower's prefetch time:
-- the worker of a task-started/succeeded/failed, 'eta' for a task-sent/received that carries
-- an eta, '' otherwise
local HOSTED = { started = true, succeeded = true, failed = true }
local SCHEDULED = { sent = true, received = true }

local function new_entry(tj, cj, subject, mask, r, x)
  local ts = tonumber(tj)
  return { tj = tj, ts = ts, at = ts, cj = cj, clock = tonumber(cj), subject = subject,
           rank = RANK[subject] or 3, mask = mask, r = r or '', x = x or '' }
end

local function parse_entry(text)
  -- 'timestamp,clock,subject,mask,retries[,x]' (x last: a hostname may hold a comma)
  local tj, cj, subject, mask, r, x =
    string.match(text, '^([^,]+),([^,]+),([^,]+),(%d+),?([^,]*),?(.*)$')
  return new_entry(tj, cj, subject, tonumber(mask), r, x)
end

local function format_entry(e)
  local text = e.tj .. ',' .. e.cj .. ',' .. e.subject .. ',' .. e.mask .. ',' .. e.r
  if e.x ~= '' then text = text .. ',' .. e.x end
  return text
end

-- The order of a task's events: by sender time, except that a task-sent counts as happening
-- just before the task-received of the same attempt (same retries) when that one is stamped
-- earlier (a client stamps task-sent after publishing, so a fast worker may be first).
local function sorts_before(a, b)
  if a.at ~= b.at then return a.at < b.at end
  if a.rank ~= b.rank then return a.rank < b.rank end
  if a.clock ~= b.clock then return a.clock < b.clock end
  if a.subject ~= b.subject then return a.subject < b.subject end
  return a.ts < b.ts
end

local function sort_history(history)
  local received_at = {}
  for _, h in ipairs(history) do
    if h.subject == 'received' and h.r ~= '' then
      local seen_at = received_at[h.r]
      if not seen_at or h.ts < seen_at then received_at[h.r] = h.ts end
    end
  end
  for _, h in ipairs(history) do
    h.at = h.ts
    if h.subject == 'sent' and received_at[h.r] and received_at[h.r] < h.ts then
      h.at = received_at[h.r]
    end
  end
  table.sort(history, sorts_before)
end

-- Whether e sorts after every entry of the sorted history as it stands, and leaves every
-- entry's place as it is (sort_history would not move anything): not a task-sent that a
-- received of its attempt anchors earlier, not a task-received that anchors a sent.
local function in_order(history, e)
  local last = history[#history]
  if e.r ~= '' and (e.subject == 'sent' or e.subject == 'received') then
    for _, h in ipairs(history) do
      if h.r == e.r and (h.subject == 'sent' or h.subject == 'received') then return false end
    end
  end
  return not last or sorts_before(last, e)
end

-- celery's fold: Task.event over the sorted history, one event at a time (fold_step), so
-- that an event appended in order folds onto the state before it.
local function fold_step(state, tj, cj, e)
  local s = state_of(e.subject)
  if s ~= STATE.RETRY and state ~= STATE.RETRY and precedence(s) > precedence(state) then
    -- logically earlier: merged; RECEIVED keeps only its own fields (no timestamp/clock)
    if s ~= STATE.RECEIVED then tj, cj = e.tj, e.cj end
  else
    state, tj, cj = s, e.tj, e.cj
  end
  return state, tj, cj
end

local function fold(list)
  local state, tj, cj = STATE.PENDING, nil, '0'
  for i = 1, #list do state, tj, cj = fold_step(state, tj, cj, list[i]) end
  return state, tj, cj
end

-- the index keys of a task's state, name and worker (memoized: a batch's tasks share few)
local group_memo = {}
local function group_keys(state, name, worker)
  -- '' stands for none: nonempty() never lets it be a state, name or worker
  local by_name = group_memo[state or '']
  if not by_name then by_name = {}; group_memo[state or ''] = by_name end
  local by_worker = by_name[name or '']
  if not by_worker then by_worker = {}; by_name[name or ''] = by_worker end
  local keys = by_worker[worker or '']
  if keys then return keys end
  keys = {}
  if state then
    keys[#keys + 1] = P .. KEY.idx_state .. state
    if name then keys[#keys + 1] = P .. KEY.idx_sn .. state .. ':' .. name end
    if worker then keys[#keys + 1] = P .. KEY.idx_sw .. state .. ':' .. worker end
  end
  if name then keys[#keys + 1] = P .. KEY.idx_name .. name end
  if worker then keys[#keys + 1] = P .. KEY.idx_worker .. worker end
  by_worker[worker or ''] = keys
  return keys
end

-- per-minute keys (memoized by base and minute)
local minute_memo = {}
local function minute_key(base, minute)
  local keys = minute_memo[base]
  if not keys then keys = {}; minute_memo[base] = keys end
  local key = keys[minute]
  if not key then key = base .. minute; keys[minute] = key end
  return key
end

local function nonempty(v)
  if v == false or v == '' then return nil end
  return v
end

-- Counters, summed over the batch and written at the end.
local sums = {}      -- key -> field -> increment (HINCRBY)
local fsums = {}     -- key -> field -> increment (HINCRBYFLOAT)
local expiring = {}  -- key -> true (per-minute hashes get a TTL)
local seen = {}      -- hostname -> newest task event timestamp (text) from it
local prefetch = {}  -- '<worker>\31<name>' -> {ts, tj, u, value} of its latest event
local added = {}     -- set key -> member -> true

local function add(tbl, key, field, n)
  local t = tbl[key]
  if not t then t = {}; tbl[key] = t end
  t[field] = (t[field] or 0) + n
end

local function sadd(key, member)
  local t = added[key]
  if not t then t = {}; added[key] = t end
  t[member] = true
end

-- Every event's stream entry; the call's events go out in one PUBLISH at the end, a line
-- '<stream id> <entry>' each, which subscribers turn into the entry plus stream_id
-- (shared/events.py): the entry text is not copied once more per event here.
local published = {}
local function emit(open_json, extra)
  local entry = open_json .. extra .. '}'
  local id = redis.call('XADD', STREAM, 'MAXLEN', '~', cfg.stream_maxlen, '*', 'e', entry)
  local n = #published
  published[n + 1] = id
  published[n + 2] = ' '
  published[n + 3] = entry
  published[n + 4] = '\n'
end

-- Count one event (record: hostname, subject, epoch minute, state, runtime bucket, runtime,
-- exception class) under a task name; sign -1 takes it back.
local function count(record, name, sign)
  local h, subject, minute, state, rb, rj, exc = unpack(record)
  add(sums, COUNTS, h .. SEP .. 'task-' .. subject .. SEP .. name, sign)
  local key = minute_key(MINUTE, minute)
  add(sums, key, name .. SEP .. state, sign)
  expiring[key] = true
  if exc and exc ~= '' then
    add(sums, P .. KEY.failures, h .. SEP .. exc .. SEP .. name .. SEP .. subject, sign)
    local fm = minute_key(FAILMINUTE, minute)
    add(sums, fm, exc, sign)
    expiring[fm] = true
  end
  if rb ~= '' then
    local prefix = h .. SEP .. name .. SEP
    add(sums, RUNTIME, prefix .. rb, sign)
    add(sums, RUNTIME, prefix .. 'count', sign)
    add(fsums, RUNTIME, prefix .. 'sum', sign * tonumber(rj))
    -- the same buckets per minute (windowed percentiles), by the task-succeeded's minute
    local rm = minute_key(RTMINUTE, minute)
    add(sums, rm, name .. SEP .. rb, sign)
    expiring[rm] = true
  end
end

-- Waits (the wait rule in the header): {stage, seconds, timestamp} per wait in the history.
local WAIT_BOUNDS = {}
for i, label in ipairs(WAIT_BUCKETS) do WAIT_BOUNDS[i] = tonumber(label) end
local WAIT_SUBJECT = { sent = true, received = true, started = true }

-- a sent/received's eta: nil without one, false when stored before its time was kept
local function eta_of(h)
  if string.sub(h.x, 1, 3) ~= 'eta' then return nil end
  return tonumber(string.sub(h.x, 4)) or false
end

-- The waits of the history's entries (those stored before this call only, with old_only):
-- a function of the set of entries, whatever the positions of task-sent entries (the only
-- ones sort_history moves), so that the waits before a call can be read from after it.
local function waits_of(history, old_only)
  local out = {}
  local sent = {}
  for _, h in ipairs(history) do
    if h.subject == 'sent' and h.r ~= '' and not (old_only and h.new) then
      local s = sent[h.r]
      if not s or h.ts < s.ts or (h.ts == s.ts and h.clock < s.clock) then sent[h.r] = h end
    end
  end
  local received = nil
  for _, h in ipairs(history) do
    if old_only and h.new then
      -- skipped: not stored before this call
    elseif h.subject == 'received' then
      received = h
      local s = h.r ~= '' and sent[h.r]
      if s then
        local eta = eta_of(h)
        if eta == nil then eta = eta_of(s) end
        if eta ~= false then
          out[#out + 1] = { WAIT_STAGE.queue, math.max(0, h.ts - math.max(s.ts, eta or s.ts)), h.ts }
        end
      end
    elseif h.subject == 'started' and received then
      local eta = eta_of(received)
      if eta ~= false then
        out[#out + 1] = { WAIT_STAGE.prefetch,
                          math.max(0, h.ts - math.max(received.ts, eta or received.ts)), h.ts }
      end
      received = nil
    end
  end
  return out
end

local function same_waits(a, b)
  if #a ~= #b then return false end
  for i, w in ipairs(a) do
    local v = b[i]
    if w[1] ~= v[1] or w[2] ~= v[2] or w[3] ~= v[3] then return false end
  end
  return true
end

local function count_waits(waits, queue, name, sign)
  local prefix = SEP .. (queue or '') .. SEP .. (name or '') .. SEP
  for _, w in ipairs(waits) do
    local seconds, bucket = w[2], '+Inf'
    for j, bound in ipairs(WAIT_BOUNDS) do
      if seconds <= bound then bucket = WAIT_BUCKETS[j]; break end
    end
    local field = w[1] .. prefix
    add(sums, WAIT, field .. bucket, sign)
    add(fsums, WAIT, field .. 'sum', sign * seconds)
    local key = minute_key(WTMINUTE, math.floor(w[3] / 60))
    add(sums, key, field .. bucket, sign)
    expiring[key] = true
  end
end

-- Count the difference a call made to the task's waits (new events, or a new name or queue).
local function settle_waits(t)
  if not t.waits_touched and t.queue == t.old_queue and t.name == t.old_name then return end
  local before = {}
  if t.old_hn > 0 then before = waits_of(t.history, true) end
  local after = waits_of(t.history, false)
  if t.queue == t.old_queue and t.name == t.old_name and same_waits(before, after) then return end
  count_waits(before, t.old_queue, t.old_name, -1)
  count_waits(after, t.queue, t.name, 1)
end

local RECORD_END, FIELD_SEP = '\30', '\31'

local function parse_unnamed(text)
  local out = {}
  for rec in string.gmatch(text or '', '([^\30]*)\30') do
    local fields = {}
    for f in string.gmatch(rec .. FIELD_SEP, '([^\31]*)\31') do fields[#fields + 1] = f end
    out[#out + 1] = fields
  end
  return out
end

-- A task as loaded by this call: the merge fields it has stored (not its args, kwargs, result
-- or traceback, which can be large), then the writes this batch makes.
local MERGE_FIELDS = { HIDDEN.history_len, HIDDEN.state, HIDDEN.name, HIDDEN.worker,
                       HIDDEN.parent, HIDDEN.unnamed, 'timestamp', 'name', 'lost', 'lost_at',
                       HIDDEN.exceptions, 'queue' }
local function load_task(u)
  local key = P .. KEY.task .. u
  local f = redis.call('HMGET', key, unpack(MERGE_FIELDS))
  local history = {}
  local n = tonumber(f[1] or '0')
  if n > 0 then
    local names = {}
    for i = 1, n do names[i] = HIDDEN.history .. i end
    local entries = redis.call('HMGET', key, unpack(names))
    for i = 1, n do history[i] = parse_entry(entries[i]) end
  end
  local t = {
    key = key, u = u, history = history, writes = {}, new = n == 0,
    old_hn = n,
    old_state = nonempty(f[2]), old_name = nonempty(f[3]),
    old_worker = nonempty(f[4]), old_parent = nonempty(f[5]),
    old_tj = f[7] or nil, name_json = f[8] or nil,
    old_lost = f[9] ~= false, old_lost_at = f[10] or nil,
    -- events counted before the task's name was known (see count())
    unnamed = parse_unnamed(f[6] or nil), had_unnamed = f[6] ~= false,
    -- exception classes of its failures and retries (each indexed in idx:exc:<class>)
    classes = {}, new_classes = false,
  }
  for c in string.gmatch(f[11] or '', '([^\31]+)') do t.classes[#t.classes + 1] = c end
  if f[12] then t.queue = nonempty(cjson.decode(f[12])) end
  t.old_queue = t.queue
  t.name, t.worker, t.parent = t.old_name, t.old_worker, t.old_parent
  t.state, t.tj = t.old_state, t.old_tj
  return t
end

-- Redaction of held fields (shared/redaction.py): by the task's name, the marker when a rule
-- names the field or when the name is not known (it fails closed).
local REDACTED = cjson.encode("'[redacted]'")
local function release_held(t, ev)
  local extra = ''
  for f, v in pairs(ev.held) do
    local name = t.name
    local value = v
    if not name then
      value = REDACTED
    else
      for _, rule in ipairs(cfg.redact) do
        if string.find(name, rule[1]) then
          for _, field in ipairs(rule[2]) do
            if field == f then value = REDACTED end
          end
        end
      end
    end
    ev.fields[f] = value
    extra = extra .. ',' .. cjson.encode(f) .. ':' .. value
  end
  return extra
end

local function apply_task(t, ev)
  local history = t.history
  local held = ''
  if ev.held then held = release_held(t, ev) end
  local mask = 0
  for f, _ in pairs(ev.fields) do
    local bit = FIELD_BIT[f]
    if bit then mask = mask + bit end
  end
  local x = ''
  if HOSTED[ev.subject] then
    x = ev.hostname
  elseif SCHEDULED[ev.subject] and ev.fields.eta and ev.fields.eta ~= 'null' then
    x = 'eta' .. (ev.eta_ts or '')
  end
  local e = new_entry(ev.timestamp_json, ev.clock_json, ev.subject, mask, ev.retries, x)
  e.new = true

  -- duplicate (the same event delivered twice), then the new sorted order
  for _, h in ipairs(history) do
    if h.ts == e.ts and h.clock == e.clock and h.subject == e.subject then
      return false
    end
  end
  if WAIT_SUBJECT[e.subject] then t.waits_touched = true end
  local pos, changed
  local appended = in_order(history, e)
  if appended then
    -- the common case: the event comes after all the others, so the order stands
    history[#history + 1] = e
    pos, changed = #history, #history
  else
    local before = {}
    for i, h in ipairs(history) do before[i] = h end
    history[#history + 1] = e
    sort_history(history)
    for i, h in ipairs(history) do
      if h == e then pos = i end
      if not changed and h ~= before[i] then changed = i end
    end
  end
  t.history_changed_from = math.min(t.history_changed_from or changed, changed)

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

  local w = t.writes
  for f, v in pairs(ev.fields) do
    if not has_bit(later_mask, FIELD_BIT[f]) then
      w[f] = v
      if f == 'name' then
        t.name = nonempty(ev.name)
        t.name_json = v
      elseif f == 'parent_id' then
        t.parent = nonempty(ev.parent_id)
      elseif f == 'queue' then
        t.queue = nonempty(ev.queue)
      end
    end
  end
  if SUBJECT_STATE[e.subject] and not later_same then
    w[e.subject] = e.tj
    if e.subject == 'received' then t.received = e.tj end
    if e.subject == 'started' then t.started = e.tj end
  end
  if e.subject == 'sent' then
    if not later_client then w.client = ev.hostname_json end
  elseif not later_worker then
    w.worker = ev.hostname_json
    t.worker = ev.hostname
  end
  if t.new and not w.uuid then w.uuid = ev.uuid_json end

  local state, tj, cj
  if appended and t.folded then
    state, tj, cj = fold_step(t.folded[1], t.folded[2], t.folded[3], e)
  else
    state, tj, cj = fold(history)
  end
  t.folded = { state, tj, cj }
  t.state, t.tj = state, tj
  w.state, w.timestamp, w.clock = '"' .. state .. '"', tj, cj

  -- counters (by the task's name after this event, as Flower labels them); an event that
  -- arrives before the task's name is counted unnamed and moved under the name once known
  local exc = ev.exc_class
  if exc then
    redis.call('ZADD', P .. KEY.failfirst, 'LT', e.tj, exc)
    redis.call('ZADD', P .. KEY.faillast, 'GT', e.tj, exc)
    local known = false
    for _, c in ipairs(t.classes) do if c == exc then known = true end end
    if not known then
      t.classes[#t.classes + 1] = exc
      t.new_classes = t.new_classes or {}
      t.new_classes[exc] = true
    end
  end
  local record = { ev.hostname, ev.subject, tostring(math.floor(e.ts / 60)), state_of(e.subject),
                   ev.runtime_bucket or '', ev.runtime_json or '', exc or '' }
  count(record, t.name or '', 1)
  if not t.name then t.unnamed[#t.unnamed + 1] = record end
  if e.subject ~= 'sent' and (not seen[ev.hostname] or e.ts > tonumber(seen[ev.hostname])) then
    seen[ev.hostname] = e.tj
  end
  emit(ev.open_json,
       held .. ',"task_name":' .. (t.name_json or 'null') .. ',"task_state":"' .. state .. '"')
  return true
end

-- Flower's prefetch time (observe_task) as the task's sorted history gives it, per worker:
-- the latest of its task-started/succeeded/failed events there, while the task has been
-- received and has no eta: started - received (the received before it) for a task-started,
-- 0 for a succeeded or failed task that had started. Returns host -> {entry, seconds}.
local function prefetch_times(t)
  local out = {}
  local received, started, eta = nil, false, false
  for _, h in ipairs(t.history) do
    if SCHEDULED[h.subject] and string.sub(h.x, 1, 3) == 'eta' then eta = true end
    if h.subject == 'received' then received = h.ts end
    if h.subject == 'started' then started = true end
    if not eta and received and HOSTED[h.subject] and h.x ~= '' then
      if h.subject == 'started' then
        out[h.x] = { entry = h, seconds = h.ts - received }
      elseif started then
        out[h.x] = { entry = h, seconds = 0 }
      end
    end
  end
  return out
end

-- Deaths: host -> ascending list of sender times (JSON text), read once per call.
local LOST_STATES = { [STATE.RECEIVED] = true, [STATE.STARTED] = true }
local deaths = {}
local any_deaths = nil

local function deaths_of(host)
  local d = deaths[host]
  if d then return d end
  d = {}
  if any_deaths == nil then any_deaths = redis.call('EXISTS', P .. KEY.deaths) == 1 end
  if any_deaths then
    for v in string.gmatch(redis.call('HGET', P .. KEY.deaths, host) or '', '[^,]+') do
      d[#d + 1] = v
    end
  end
  deaths[host] = d
  return d
end

-- Record a death; returns whether every task already marked lost keeps its lost_at (the new
-- death is the newest and none was dropped), so that those need no second look.
local function record_death(host, tj)
  local d = deaths_of(host)
  local ts = tonumber(tj)
  local newest = true
  for _, v in ipairs(d) do
    if tonumber(v) == ts then return true end
    if tonumber(v) > ts then newest = false end
  end
  d[#d + 1] = tj
  table.sort(d, function(a, b) return tonumber(a) < tonumber(b) end)
  local dropped = #d > MAX_DEATHS
  while #d > MAX_DEATHS do table.remove(d, 1) end
  redis.call('HSET', P .. KEY.deaths, host, table.concat(d, ','))
  any_deaths = true
  return newest and not dropped
end

-- lost_at of the task as it now stands (JSON text), nil when it is not lost
local function lost_at(t)
  if not t.worker or not LOST_STATES[t.state] then return nil end
  local d = deaths_of(t.worker)
  if #d == 0 then return nil end
  local newest = -math.huge
  for _, h in ipairs(t.history) do
    if h.ts > newest then newest = h.ts end
  end
  for _, v in ipairs(d) do
    if tonumber(v) >= newest then return v end
  end
  return nil
end

local function emit_lost(t, host, lost, tj)
  local open = '{"type":"task-lost","uuid":' .. cjson.encode(t.u) .. ',"hostname":'
    .. cjson.encode(host) .. ',"timestamp":' .. tj .. ',"local_received":'
    .. string.format('%.6f', cfg.now) .. ',"lost":' .. tostring(lost)
  if lost then open = open .. ',"lost_at":' .. tj end
  emit(open, ',"task_name":' .. (t.name_json or 'null') .. ',"task_state":"' .. t.state .. '"')
end

-- Mark or clear the task by the lost rule; counted per worker and name, announced on change.
local function settle_lost(t)
  local at = lost_at(t)
  local u = t.u
  if at then
    local field = t.worker .. SEP .. (t.name or '')
    if at ~= t.old_lost_at then redis.call('HSET', t.key, 'lost', 'true', 'lost_at', at) end
    redis.call('ZADD', P .. KEY.idx_lost, t.tj, u)
    if not t.old_lost then
      add(sums, P .. KEY.lostcounts, field, 1)
      emit_lost(t, t.worker, true, at)
    elseif t.worker ~= t.old_worker or t.name ~= t.old_name then
      add(sums, P .. KEY.lostcounts, t.old_worker .. SEP .. (t.old_name or ''), -1)
      add(sums, P .. KEY.lostcounts, field, 1)
    end
  elseif t.old_lost then
    redis.call('HDEL', t.key, 'lost', 'lost_at')
    redis.call('ZREM', P .. KEY.idx_lost, u)
    add(sums, P .. KEY.lostcounts, (t.old_worker or '') .. SEP .. (t.old_name or ''), -1)
    local newest = t.history[#t.history]
    emit_lost(t, t.old_worker or '', false, newest and newest.tj or '0')
  end
end

local function save_task(t)
  local u, w = t.u, t.writes
  local history = t.history
  local hset = { t.key }
  local hdel = nil
  for f, v in pairs(w) do
    if v ~= 'null' then
      hset[#hset + 1] = f
      hset[#hset + 1] = v
    elseif not t.new then
      -- a null is not stored (readers take an absent field for null): only an earlier value
      -- needs deleting
      hdel = hdel or { t.key }
      hdel[#hdel + 1] = f
    end
  end
  if hdel then redis.call('HDEL', unpack(hdel)) end
  -- history entries from the first changed position on (entries before it are unchanged)
  local first = math.max(1, #history - MAX_HISTORY + 1)
  local shift = first - 1
  local from = (t.history_changed_from or (#history + 1))
  if shift > 0 then from = 1 end
  for i = math.max(from, first), #history do
    hset[#hset + 1] = HIDDEN.history .. (i - shift)
    hset[#hset + 1] = format_entry(history[i])
  end
  hset[#hset + 1] = HIDDEN.history_len
  hset[#hset + 1] = tostring(#history - shift)
  hset[#hset + 1] = HIDDEN.state
  hset[#hset + 1] = t.state
  if t.name ~= t.old_name then
    hset[#hset + 1] = HIDDEN.name
    hset[#hset + 1] = t.name or ''
  end
  if t.worker ~= t.old_worker then
    hset[#hset + 1] = HIDDEN.worker
    hset[#hset + 1] = t.worker
  end
  if t.parent ~= t.old_parent then
    hset[#hset + 1] = HIDDEN.parent
    hset[#hset + 1] = t.parent or ''
  end
  if t.new_classes then
    hset[#hset + 1] = HIDDEN.exceptions
    hset[#hset + 1] = table.concat(t.classes, SEP)
  end
  if #t.unnamed > 0 then
    if t.name then
      for _, record in ipairs(t.unnamed) do
        count(record, '', -1)
        count(record, t.name, 1)
      end
      if t.had_unnamed then redis.call('HDEL', t.key, HIDDEN.unnamed) end
    else
      local parts = {}
      for _, record in ipairs(t.unnamed) do
        parts[#parts + 1] = table.concat(record, FIELD_SEP) .. RECORD_END
      end
      hset[#hset + 1] = HIDDEN.unnamed
      hset[#hset + 1] = table.concat(parts)
    end
  end
  redis.call('HSET', unpack(hset))

  settle_waits(t)

  -- indexes
  local tj = t.tj
  redis.call('ZADD', IDX_TS, tj, u)
  if t.received then
    redis.call('ZADD', IDX_RECEIVED, t.received, u)
  elseif t.new then
    redis.call('ZADD', IDX_RECEIVED, '-inf', u)
  end
  if t.started then
    redis.call('ZADD', IDX_STARTED, t.started, u)
  elseif t.new then
    redis.call('ZADD', IDX_STARTED, '-inf', u)
  end
  local old_keys = group_keys(t.old_state, t.old_name, t.old_worker)
  local new_keys = group_keys(t.state, t.name, t.worker)
  local keep = {}
  for _, k in ipairs(new_keys) do keep[k] = true end
  local was = {}
  for _, k in ipairs(old_keys) do
    was[k] = true
    if not keep[k] then redis.call('ZREM', k, u) end
  end
  local moved = tj ~= t.old_tj
  for _, c in ipairs(t.classes) do
    if moved or (t.new_classes and t.new_classes[c]) then
      redis.call('ZADD', P .. KEY.idx_exc .. c, tj, u)
    end
  end
  for _, k in ipairs(new_keys) do
    if moved or not was[k] then redis.call('ZADD', k, tj, u) end
  end
  for host, found in pairs(prefetch_times(t)) do
    local field, pf = host .. SEP .. (t.name or ''), found.entry
    local known = prefetch[field]
    if not known or pf.ts > known.ts or (pf.ts == known.ts and u >= known.u) then
      prefetch[field] = { ts = pf.ts, tj = pf.tj, u = u, value = found.seconds }
    end
  end
  if t.state ~= t.old_state then sadd(P .. KEY.states, t.state) end
  if t.name and t.name ~= t.old_name then sadd(P .. KEY.names, t.name) end
  if t.parent ~= t.old_parent then
    if t.old_parent then redis.call('SREM', P .. KEY.children .. t.old_parent, u) end
    if t.parent then redis.call('SADD', P .. KEY.children .. t.parent, u) end
  end
end

local function flush_counters()
  -- a count taken back to zero (an unnamed event moved under its name) leaves no field
  local lostcounts = P .. KEY.lostcounts
  for key, fields in pairs(sums) do
    for f, n in pairs(fields) do
      if n ~= 0 then
        local total = redis.call('HINCRBY', key, f, n)
        -- lost counts of a purged worker are gone: taking one back leaves none, not -1
        if total == 0 or (total < 0 and key == lostcounts) then redis.call('HDEL', key, f) end
      end
    end
  end
  for key, fields in pairs(fsums) do
    for f, n in pairs(fields) do
      if n ~= 0 then
        local total = tonumber(redis.call('HINCRBYFLOAT', key, f, tostring(n)))
        if math.abs(total) < 1e-9 then redis.call('HDEL', key, f) end
      end
    end
  end
  for key, _ in pairs(expiring) do redis.call('EXPIRE', key, cfg.minute_ttl) end
  for host, tj in pairs(seen) do redis.call('ZADD', P .. KEY.seen, 'GT', tj, host) end
  -- the latest event by (timestamp, uuid) wins; the same task's again (its history grew)
  for field, pf in pairs(prefetch) do
    local stored = redis.call('HGET', P .. KEY.prefetch, field)
    local tj, u
    if stored then tj, u = string.match(stored, '^([^,]+),([^,]*),') end
    local ts = tonumber(tj)
    if not ts or pf.ts > ts or (pf.ts == ts and pf.u >= u) then
      local text = pf.tj .. ',' .. pf.u .. ',' .. string.format('%.17g', pf.value)
      redis.call('HSET', P .. KEY.prefetch, field, text)
    end
  end
  for key, members in pairs(added) do
    local args = { 'SADD', key }
    for m, _ in pairs(members) do args[#args + 1] = m end
    redis.call(unpack(args))
  end
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
  local host, tj, cj, lj = ev.hostname, ev.timestamp_json, ev.clock_json, ev.local_received_json
  local key = P .. KEY.worker .. host
  local dedup = P .. KEY.wdedup .. host
  if redis.call('ZADD', dedup, 'NX', tj, tj .. '|' .. cj .. '|' .. ev.subject) == 0 then
    return false
  end
  redis.call('ZREMRANGEBYRANK', dedup, 0, -257)

  -- each field from the latest worker event (by sender time, clock) that carries it
  local names, provenance = {}, {}
  for f, _ in pairs(ev.fields) do
    names[#names + 1] = f
    provenance[#provenance + 1] = '_k.' .. f
  end
  local hset = { key }
  if #names > 0 then
    local known = redis.call('HMGET', key, unpack(provenance))
    local stamp = tj .. '|' .. cj
    for i, f in ipairs(names) do
      if later(tj, cj, known[i] or nil) then
        hset[#hset + 1] = f
        hset[#hset + 1] = ev.fields[f]
        hset[#hset + 1] = provenance[i]
        hset[#hset + 1] = stamp
      end
    end
  end

  -- liveness as celery's Worker: heartbeats are receive times, cleared by worker-offline;
  -- ordered by sender time so that a late heartbeat does not undo a newer offline
  local live = redis.call('HMGET', key, HIDDEN.heartbeat, HIDDEN.heartbeat_ts, HIDDEN.offline_ts,
    HIDDEN.online_ts)
  local hb, hbts, offts = tonumber(live[1]), tonumber(live[2]), tonumber(live[3])
  local ts = tonumber(tj)
  if ev.subject == 'online' then
    -- a worker-online ends the incarnation before it (the enabler records that death)
    local onts = tonumber(live[4])
    if not onts or ts > onts then
      hset[#hset + 1] = HIDDEN.online_ts
      hset[#hset + 1] = tj
    end
  end
  if ev.subject == 'offline' then
    if not offts or ts > offts then
      hset[#hset + 1] = HIDDEN.offline_ts
      hset[#hset + 1] = tj
    end
    if not hbts or ts > hbts then
      redis.call('HDEL', key, HIDDEN.heartbeat, HIDDEN.heartbeat_ts)
    end
  elseif not offts or ts > offts then
    if not hb or tonumber(lj) > hb then
      hset[#hset + 1] = HIDDEN.heartbeat
      hset[#hset + 1] = lj
    end
    if not hbts or ts > hbts then
      hset[#hset + 1] = HIDDEN.heartbeat_ts
      hset[#hset + 1] = tj
    end
    redis.call('ZADD', P .. KEY.workers, 'GT', lj, host)
  end
  if #hset > 1 then redis.call('HSET', unpack(hset)) end

  add(sums, P .. KEY.counts, host .. SEP .. 'worker-' .. ev.subject .. SEP, 1)
  emit(ev.open_json, '')
  return true
end

local function evict(u)
  local key = P .. KEY.task .. u
  local f = redis.call('HMGET', key, HIDDEN.state, HIDDEN.name, HIDDEN.worker, HIDDEN.parent,
    'lost', HIDDEN.exceptions)
  for c in string.gmatch(f[6] or '', '([^\31]+)') do redis.call('ZREM', P .. KEY.idx_exc .. c, u) end
  if f[5] then
    redis.call('ZREM', P .. KEY.idx_lost, u)
    add(sums, P .. KEY.lostcounts, (nonempty(f[3]) or '') .. SEP .. (nonempty(f[2]) or ''), -1)
  end
  redis.call('ZREM', P .. KEY.idx_ts, u)
  redis.call('ZREM', P .. KEY.idx_received, u)
  redis.call('ZREM', P .. KEY.idx_started, u)
  for _, k in ipairs(group_keys(nonempty(f[1]), nonempty(f[2]), nonempty(f[3]))) do
    redis.call('ZREM', k, u)
  end
  local parent = nonempty(f[4])
  if parent then redis.call('SREM', P .. KEY.children .. parent, u) end
  redis.call('DEL', key, P .. KEY.children .. u)
end

local applied, duplicates, evicted = 0, 0, 0
local tasks, order = {}, {}
local function task_of(u)
  local t = tasks[u]
  if not t then
    t = load_task(u)
    tasks[u] = t
    order[#order + 1] = t
  end
  return t
end

for _, ev in ipairs(events) do
  if ev.kind == 'death' then
    -- the dead worker's tasks that may be lost now: those RECEIVED or STARTED there
    local host = ev.hostname
    local kept = record_death(host, ev.timestamp_json)
    for _, state in ipairs({ STATE.RECEIVED, STATE.STARTED }) do
      for _, u in ipairs(redis.call('ZRANGE', P .. KEY.idx_sw .. state .. ':' .. host, 0, -1)) do
        if not (kept and redis.call('ZSCORE', P .. KEY.idx_lost, u)) then
          task_of(u).check = true
        end
      end
    end
  else
    local ok
    if ev.kind == 'task' then
      local t = task_of(ev.uuid)
      ok = apply_task(t, ev)
      if ok then t.dirty = true end
    else
      ok = apply_worker(ev)
    end
    if ok then applied = applied + 1 else duplicates = duplicates + 1 end
  end
end
for _, t in ipairs(order) do
  if t.dirty then save_task(t) end
  if t.dirty or t.check then settle_lost(t) end
end

-- retention: by count (oldest first), then by age (failed tasks have their own TTL)
local excess = redis.call('ZCARD', P .. KEY.idx_ts) - cfg.max_tasks
if excess > 0 then
  local victims = redis.call('ZRANGE', P .. KEY.idx_ts, 0, math.min(excess, cfg.evict_batch) - 1)
  for _, u in ipairs(victims) do evict(u) end
  evicted = evicted + #victims
end
if cfg.age_check then
  -- by state: POLLEN_TASK_TTL, POLLEN_FAILED_TASK_TTL (0: no limit, here -1)
  local function state_ttl(state)
    local ttl = cfg.task_ttl
    if state == STATE.FAILURE then ttl = cfg.failed_ttl end
    if ttl > 0 then return ttl end
    return -1
  end
  local function evict_older(key, ttl)
    if ttl < 0 or evicted >= cfg.evict_batch then return end
    local victims = redis.call('ZRANGEBYSCORE', key, '-inf', '(' .. (cfg.now - ttl), 'LIMIT', 0,
      cfg.evict_batch - evicted)
    for _, u in ipairs(victims) do evict(u) end
    evicted = evicted + #victims
  end
  -- by task name (POLLEN_TASK_RETENTION): the first rule matching the name and state wins
  local rules, names = cfg.retention, nil
  for _, state in ipairs(redis.call('SMEMBERS', P .. KEY.states)) do
    local ttl = state_ttl(state)
    local covering = {}
    for _, rule in ipairs(rules) do
      if rule[2] == '*' or rule[2] == state then covering[#covering + 1] = rule end
    end
    if #covering == 0 then
      evict_older(P .. KEY.idx_state .. state, ttl)
    else
      -- the names a rule covers, each by its rule (state and name index)
      names = names or redis.call('SMEMBERS', P .. KEY.names)
      local ruled = {}
      for _, name in ipairs(names) do
        for _, rule in ipairs(covering) do
          if string.find(name, rule[1]) then
            ruled[name] = rule[3]
            break
          end
        end
      end
      for name, seconds in pairs(ruled) do
        evict_older(P .. KEY.idx_sn .. state .. ':' .. name, seconds)
      end
      -- the others (tasks whose name is not known yet included) by the state's limit, from
      -- the state index, passing over ruled tasks: a look at 4 x what may still be evicted
      if ttl >= 0 and evicted < cfg.evict_batch then
        local candidates = redis.call('ZRANGEBYSCORE', P .. KEY.idx_state .. state, '-inf',
          '(' .. (cfg.now - ttl), 'LIMIT', 0, 4 * (cfg.evict_batch - evicted))
        for _, u in ipairs(candidates) do
          if evicted >= cfg.evict_batch then break end
          local name = redis.call('HGET', P .. KEY.task .. u, HIDDEN.name)
          if not (name and ruled[name]) then
            evict(u)
            evicted = evicted + 1
          end
        end
      end
    end
  end
end

flush_counters()
if #published > 0 then redis.call('PUBLISH', cfg.channel, table.concat(published, '', 1, #published - 1)) end

return { applied, duplicates, evicted }
