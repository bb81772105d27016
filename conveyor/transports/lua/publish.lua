-- publish.lua: append envelopes to one queue, now or after a delay.
-- KEYS[1]  delayed zset of the queue   (member "<step>:<envelope>", score = due time, ms)
-- KEYS[2]  wake list of the queue      (tokens that wake blocked conveyor consumers)
-- KEYS[3..2+S] the queue's ready lists, one per priority step, in step order
-- ARGV[1]  delay in ms (0: ready now)
-- ARGV[2]  wake list TTL in ms
-- ARGV[3]  S, the number of priority steps
-- ARGV[4..3+S] the steps, ascending (kombu's priority_steps)
-- ARGV[4+S..] pairs: bucket position (1..S), envelope text
-- Returns the number of envelopes published. Ready envelopes are LPUSHed (kombu: the
-- consumer pops from the right, so each list is FIFO); delayed ones wait in KEYS[1] on the
-- server's clock until a consumer's claim promotes them.
local delay = tonumber(ARGV[1])
local S = tonumber(ARGV[3])
local first = 4 + S
local n = 0
local now = 0
if delay > 0 then
  now = now_ms()
end
for i = first, #ARGV, 2 do
  local pos = tonumber(ARGV[i])
  local e = ARGV[i + 1]
  if delay > 0 then
    redis.call('ZADD', KEYS[1], now + delay, ARGV[3 + pos] .. ':' .. e)
  else
    redis.call('LPUSH', KEYS[2 + pos], e)
  end
  n = n + 1
end
local tokens = n
if delay > 0 then
  tokens = 1 -- blocked consumers recompute when the next delayed message is due
end
if tokens > 64 then
  tokens = 64
end
wake(KEYS[2], tokens, tonumber(ARGV[2]))
return n
