-- push.lua: append ready envelopes (no delay) to their ready lists and wake blocked consumers.
-- The lean path of publish.lua for the common case: no delayed set, no consumers check, and
-- only the ready lists that receive something are passed (a single publish sends 7 values to
-- the server instead of 21; encoding them was a third of a publish's client CPU).
-- KEYS[1]  wake list of the queue
-- KEYS[2..] ready lists that receive envelopes (the queue's own, see publish.lua)
-- ARGV[1]  wake list TTL in ms
-- ARGV[2..] pairs: index into KEYS of the envelope's ready list, envelope text
-- Returns the number of envelopes published. Each is LPUSHed (consumers pop from the right,
-- so each list is FIFO), exactly as publish.lua does for a ready envelope.
local n = 0
for i = 2, #ARGV, 2 do
  redis.call('LPUSH', KEYS[tonumber(ARGV[i])], ARGV[i + 1])
  n = n + 1
end
local tokens = n
if tokens > 64 then
  tokens = 64
end
wake(KEYS[1], tokens, tonumber(ARGV[1]))
return n
