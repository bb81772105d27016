-- claim.lua: take up to `limit` ready envelopes from several queues, leasing each one, in
-- ONE atomic step (a consumer killed at any instant loses nothing: a message is either in a
-- ready list or recorded under a lease). Before claiming, for each queue: expired leases go
-- back to the FRONT of their ready list marked redelivered (bounded), and due delayed
-- envelopes are moved to the BACK of their ready list (bounded).
-- KEYS: one block of 5 + S keys per queue, in the caller's queue order:
--   [leases hash (lease id -> "<step>:<envelope>"), deadlines zset (lease id -> ms),
--    delayed zset, wake list, consumers zset, ready list for step 1 .. for step S]
-- ARGV[1] limit (most envelopes to claim)
-- ARGV[2] lease length in ms
-- ARGV[3] lease id prefix (unique per call; ids are "<prefix>:<n>", or "<prefix>~<k>:<n>" when
--         a retried call finds the first run's ids taken)
-- ARGV[4] number of queues
-- ARGV[5] most expired leases restored per queue
-- ARGV[6] most due delayed envelopes promoted per queue
-- ARGV[7] wake list TTL in ms
-- ARGV[8] consumer token (recorded in each queue's consumers zset, see publish.lua)
-- ARGV[9] live window in ms (consumers not seen for twice as long are dropped)
-- ARGV[10..9+S] the priority steps, ascending
-- Returns {hint_ms, q1, id1, envelope1, q2, id2, envelope2, ...}: q is the 0-based queue
-- position; hint_ms is how long until the next delayed envelope is due or lease expires
-- (-1: none), so a blocked consumer knows when to look again.
local limit = tonumber(ARGV[1])
local lease_ms = tonumber(ARGV[2])
local prefix = ARGV[3]
local nq = tonumber(ARGV[4])
local reclaim = tonumber(ARGV[5])
local promote = tonumber(ARGV[6])
local wake_ttl = tonumber(ARGV[7])
local token = ARGV[8]
local window = tonumber(ARGV[9])
local steps = {}
for i = 10, #ARGV do
  steps[#steps + 1] = tonumber(ARGV[i])
end
local S = #steps
local block = 5 + S
local now = now_ms()
local hint = -1

local function consider(score)
  local d = tonumber(score) - now
  if d < 0 then
    d = 0
  end
  if hint < 0 or d < hint then
    hint = d
  end
end

for q = 0, nq - 1 do
  local b = q * block
  local leases, deadlines, delayed, wake_key = KEYS[b + 1], KEYS[b + 2], KEYS[b + 3], KEYS[b + 4]
  redis.call('ZADD', KEYS[b + 5], now, token)
  redis.call('ZREMRANGEBYSCORE', KEYS[b + 5], '-inf', now - 2 * window)
  redis.call('PEXPIRE', KEYS[b + 5], 2 * window)
  local restored = 0
  local expired = redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, reclaim)
  for _, id in ipairs(expired) do
    redis.call('ZREM', deadlines, id)
    local rec = redis.call('HGET', leases, id)
    if rec then
      redis.call('HDEL', leases, id)
      local step, e = split_record(rec)
      redis.call('RPUSH', KEYS[b + 5 + bucket_of(steps, step)], mark_redelivered(e))
      restored = restored + 1
    end
  end
  local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, promote)
  for _, m in ipairs(due) do
    redis.call('ZREM', delayed, m)
    local step, e = split_record(m)
    redis.call('LPUSH', KEYS[b + 5 + bucket_of(steps, step)], e)
  end
  if restored + #due > 1 then
    -- other blocked consumers may share the work
    wake(wake_key, math.min(restored + #due - 1, 64), wake_ttl)
  end
  local d = redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')
  if d[2] then
    consider(d[2])
  end
  local l = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
  if l[2] then
    consider(l[2])
  end
end

local out = {0}
local n = 0
local base = prefix
local retry = 0
local deadline = now + lease_ms
for s = 1, S do
  for q = 0, nq - 1 do
    local b = q * block
    local key = KEYS[b + 5 + s]
    while n < limit do
      local e = redis.call('RPOP', key)
      if not e then
        break
      end
      n = n + 1
      local id = base .. ':' .. n
      -- HSETNX, never HSET: when the client retries this call after a lost reply (its
      -- connection was reset after the script ran), the same prefix comes again and the
      -- first run's leases must not be overwritten (that would lose their envelopes).
      while redis.call('HSETNX', KEYS[b + 1], id, steps[s] .. ':' .. e) == 0 do
        retry = retry + 1
        base = prefix .. '~' .. retry
        id = base .. ':' .. n
      end
      redis.call('ZADD', KEYS[b + 2], deadline, id)
      out[#out + 1] = q
      out[#out + 1] = id
      out[#out + 1] = e
    end
  end
end
if n > 0 and hint < 0 then
  hint = lease_ms
end
out[1] = hint
return out
