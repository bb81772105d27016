-- publish.lua: append envelopes to one queue, now or after a delay.
-- KEYS[1]  delayed zset of the queue   (member "<step>:<envelope>", score = due time, ms)
-- KEYS[2]  wake list of the queue      (tokens that wake blocked conveyor consumers)
-- KEYS[3]  consumers zset of the queue (conveyor consumer token -> last claim/extend, ms)
-- KEYS[4..3+S] the queue's ready lists, one per priority step, in step order
-- ARGV[1]  delay in ms (0: ready now)
-- ARGV[2]  wake list TTL in ms
-- ARGV[3]  live window in ms: a consumer seen within it counts as consuming the queue
-- ARGV[4]  S, the number of priority steps
-- ARGV[5..4+S] the steps, ascending (kombu's priority_steps)
-- ARGV[5+S..] triples: bucket position (1..S), "1" if the envelope carries a Celery eta
--             header (any Celery or conveyor worker honours it) else "0", envelope text
-- Returns the number of envelopes published. Ready envelopes are LPUSHed (kombu: the
-- consumer pops from the right, so each list is FIFO). Delayed ones wait in KEYS[1] on the
-- server's clock until a conveyor consumer's claim promotes them; but when no conveyor
-- consumer has been seen on the queue (only Celery workers consume it, which never read
-- KEYS[1]), an envelope with an eta header is made ready now, as Celery itself publishes
-- countdown tasks: the worker that takes it waits for the eta.
local delay = tonumber(ARGV[1])
local wake_ttl = tonumber(ARGV[2])
local window = tonumber(ARGV[3])
local S = tonumber(ARGV[4])
local first = 5 + S
local n = 0
local ready = 0
local now = now_ms()
local consumed = true
if delay > 0 then
  consumed = #redis.call('ZRANGEBYSCORE', KEYS[3], now - window, '+inf', 'LIMIT', 0, 1) > 0
end
for i = first, #ARGV, 3 do
  local pos = tonumber(ARGV[i])
  local e = ARGV[i + 2]
  if delay > 0 and (consumed or ARGV[i + 1] ~= '1') then
    redis.call('ZADD', KEYS[1], now + delay, ARGV[4 + pos] .. ':' .. e)
  else
    redis.call('LPUSH', KEYS[3 + pos], e)
    ready = ready + 1
  end
  n = n + 1
end
local tokens = ready
if n > ready then
  tokens = tokens + 1 -- blocked consumers recompute when the next delayed message is due
end
if tokens > 64 then
  tokens = 64
end
wake(KEYS[2], tokens, wake_ttl)
return n
