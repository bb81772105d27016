-- purge.lua: delete every ready and delayed envelope of one queue (held leases stay).
-- KEYS[1] delayed zset, KEYS[2..] the queue's ready lists
-- ARGV: none
-- Returns how many envelopes were deleted.
local n = redis.call('ZCARD', KEYS[1])
redis.call('DEL', KEYS[1])
for i = 2, #KEYS do
  n = n + redis.call('LLEN', KEYS[i])
  redis.call('DEL', KEYS[i])
end
return n
