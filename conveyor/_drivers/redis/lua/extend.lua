-- extend.lua: renew one lease so it runs `ms` from now (server clock).
-- KEYS[1] leases hash, KEYS[2] deadlines zset, KEYS[3] consumers zset (see publish.lua)
-- ARGV[1] lease id, ARGV[2] new lease length in ms, ARGV[3] consumer token,
-- ARGV[4] live window in ms
-- Returns 1 when the lease was still held, 0 when it was lost (acked, rejected, reclaimed).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
local now = now_ms()
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZADD', KEYS[3], now, ARGV[3])
redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[4]))
return 1
