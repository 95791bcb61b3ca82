-- enabler_lease.lua: take, renew or give up the lease that makes one enabler the active one.
--
-- Any number of enablers call this every third of POLLEN_ENABLE_INTERVAL. The holder's call
-- renews the expiry; anyone else's call takes the lease only once it has expired, so a
-- standby takes over at most one expiry (1.5 intervals) plus one call period after the
-- active enabler's last renewal.
--
-- KEYS[1]  <ns>:enabler:lease  string: the active enabler's id, with a PX expiry
--          (documented in shared/keys.py)
-- ARGV[1]  this enabler's id ('<host>:<pid>:<random>')
-- ARGV[2]  expiry in milliseconds
-- ARGV[3]  'hold' (take or renew) or 'release' (delete if held by ARGV[1])
--
-- Returns {held (1/0), holder id or '', remaining ms of the holder's lease}.

local holder = redis.call('GET', KEYS[1])

if ARGV[3] == 'release' then
  if holder == ARGV[1] then
    redis.call('DEL', KEYS[1])
  end
  return {0, '', 0}
end

if holder == false or holder == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {1, ARGV[1], tonumber(ARGV[2])}
end
return {0, holder, redis.call('PTTL', KEYS[1])}
