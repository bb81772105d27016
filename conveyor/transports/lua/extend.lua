-- extend.lua: renew one lease so it runs `ms` from now (server clock).
-- KEYS[1] leases hash, KEYS[2] deadlines zset
-- ARGV[1] lease id, ARGV[2] new lease length in ms
-- Returns 1 when the lease was still held, 0 when it was lost (acked, rejected, reclaimed).
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[2], now_ms() + tonumber(ARGV[2]), ARGV[1])
return 1
