-- store_result.lua: the Redis result backend's store: write and publish a task's record
-- unless a SUCCESS is stored (Celery's rule against duplicates, here atomic).
-- KEYS[1] the record's key (celery-task-meta-<id>, prefixed)
-- ARGV[1] the encoded meta, ARGV[2] expiry in ms (0: none)
-- Returns 1 (written and published), 0 (a SUCCESS is stored: kept, nothing published) or
-- -1 (the stored value is not JSON this script can read: the caller decides in Python).
local cur = redis.call('GET', KEYS[1])
if cur then
  if string.sub(cur, 1, 1) ~= '{' then
    return -1
  end
  local ok, doc = pcall(cjson.decode, cur)
  if not ok or type(doc) ~= 'table' then
    return -1
  end
  if doc['status'] == 'SUCCESS' then
    return 0
  end
end
local px = tonumber(ARGV[2])
if px > 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
