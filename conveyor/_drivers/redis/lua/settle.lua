-- settle.lua: give held leases back: requeue (back of the queue, marked redelivered, as
-- kombu's reject(requeue=True)), release (front of the queue, marked redelivered, as
-- kombu's restore on close), dead-letter (into the dead-letter queue, unmarked, with the
-- reason headers inserted), or replace (dead-letter ARGV[2] instead of the held envelope: the
-- client's well-formed stand-in for an envelope it could not decode).
-- KEYS[1] leases hash, KEYS[2] deadlines zset, KEYS[3] wake list,
-- KEYS[4] wake list of the dead-letter queue,
-- KEYS[5..4+S] ready lists of the queue, KEYS[5+S..4+2S] ready lists of the dead-letter queue
-- ARGV[1] mode: "requeue" | "release" | "dead" | "replace"
-- ARGV[2] for "dead": JSON members to insert first in "headers" (reason, source queue);
--         for "replace": the envelope to push (conveyor priority 0: the last ready list)
-- ARGV[3] wake list TTL in ms
-- ARGV[4] S; ARGV[5..4+S] the priority steps, ascending
-- ARGV[5+S..] lease ids
-- Returns the number of leases that were still held (and are now settled).
local mode = ARGV[1]
local S = tonumber(ARGV[4])
local steps = {}
for i = 1, S do
  steps[i] = tonumber(ARGV[4 + i])
end
local n = 0
for i = 5 + S, #ARGV do
  local id = ARGV[i]
  local rec = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if rec then
    redis.call('HDEL', KEYS[1], id)
    local step, e = split_record(rec)
    local pos = bucket_of(steps, step)
    if mode == 'dead' then
      local clean = strip_info_mark((strip_mark(e)))
      redis.call('LPUSH', KEYS[4 + S + pos], insert_first(clean, 'headers', ARGV[2]))
    elseif mode == 'replace' then
      redis.call('LPUSH', KEYS[4 + 2 * S], ARGV[2])
    elseif mode == 'release' then
      redis.call('RPUSH', KEYS[4 + pos], mark_redelivered(e))
    else
      redis.call('LPUSH', KEYS[4 + pos], mark_redelivered(e))
    end
    n = n + 1
  end
end
if n > 0 then
  if mode == 'dead' or mode == 'replace' then
    wake(KEYS[4], math.min(n, 64), tonumber(ARGV[3]))
  else
    wake(KEYS[3], math.min(n, 64), tonumber(ARGV[3]))
  end
end
return n
