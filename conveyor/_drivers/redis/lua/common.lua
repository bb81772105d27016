-- common.lua: helpers prepended to every conveyor Redis broker script.
-- KEYS: none of its own. ARGV: none of its own.
--
-- Envelopes are kombu's JSON text. They are never decoded and re-encoded here (Lua's cjson
-- would turn [] into {} and round big integers); the few edits conveyor makes are textual
-- insertions at the start of the top-level "headers" and "delivery_info" objects, which
-- kombu's JSON (Python's json.dumps separators) writes as '"headers": {'.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Index of the '{' that opens object `name`: the first key `name` (any JSON whitespace around
-- the colon) whose value is an object, or nil. The client refuses envelopes in which this first
-- match is not the top-level member (decode_envelope in redis.py), so the marks always land in
-- the top-level "headers". `name` holds no pattern magic characters ("headers", "delivery_info").
local function object_start(e, name)
  local _, f = string.find(e, '"' .. name .. '"%s*:%s*{')
  return f
end

-- Insert `text` as the first member of object `name`.
local function insert_first(e, name, text)
  local brace = object_start(e, name)
  if not brace then
    return e
  end
  local rest = string.sub(e, brace + 1)
  local glue = ', '
  if string.sub(rest, 1, 1) == '}' then
    glue = ''
  end
  return string.sub(e, 1, brace) .. text .. glue .. rest
end

-- Remove the redelivery block conveyor puts first in "headers".
-- Returns the text and the number of earlier deliveries it recorded (nil without a block).
local function strip_mark(e)
  local brace = object_start(e, 'headers')
  if not brace then
    return e, nil
  end
  local rest = string.sub(e, brace + 1)
  local s, f, n = string.find(rest, '^"redelivered": true, "x%-delivery%-count": (%d+)')
  if not s then
    return e, nil
  end
  rest = string.sub(rest, f + 1)
  if string.sub(rest, 1, 2) == ', ' then
    rest = string.sub(rest, 3)
  end
  return string.sub(e, 1, brace) .. rest, tonumber(n)
end

-- Prefix of an envelope with a second "headers" member after the one the marks go into: a
-- JSON reader keeps the LAST one, so the marks would never be seen and the message would come
-- back uncounted forever. The prefix makes it undecodable: the client dead-letters it.
local AMBIGUOUS = 'conveyor-ambiguous-headers:'

-- Mark `e` as delivered once more and not settled: kombu's headers.redelivered and
-- properties.delivery_info.redelivered (what a Celery worker reads), plus
-- headers["x-delivery-count"] = deliveries so far (RabbitMQ's quorum-queue header name).
local function mark_redelivered(e)
  local first = object_start(e, 'headers')
  if first and string.find(e, '"headers"%s*:', first + 1) then
    return AMBIGUOUS .. e
  end
  local stripped, n = strip_mark(e)
  local out = insert_first(stripped, 'headers',
    '"redelivered": true, "x-delivery-count": ' .. tostring((n or 0) + 1))
  local brace = object_start(out, 'delivery_info')
  if brace and string.sub(out, brace + 1, brace + 19) ~= '"redelivered": true' then
    out = insert_first(out, 'delivery_info', '"redelivered": true')
  end
  return out
end

-- Remove the delivery_info mark mark_redelivered inserts (dead letters start afresh).
local function strip_info_mark(e)
  local brace = object_start(e, 'delivery_info')
  if not brace or string.sub(e, brace + 1, brace + 19) ~= '"redelivered": true' then
    return e
  end
  local rest = string.sub(e, brace + 20)
  if string.sub(rest, 1, 2) == ', ' then
    rest = string.sub(rest, 3)
  end
  return string.sub(e, 1, brace) .. rest
end

-- Position (1..#steps) of the ready list for a stored step: the greatest step <= it.
local function bucket_of(steps, step)
  local idx = 1
  for i = 1, #steps do
    if steps[i] <= step then
      idx = i
    end
  end
  return idx
end

-- Split "<step>:<envelope>" (lease records and delayed members).
local function split_record(rec)
  local c = string.find(rec, ':', 1, true)
  return tonumber(string.sub(rec, 1, c - 1)), string.sub(rec, c + 1)
end

local function wake(key, tokens, ttl_ms)
  if tokens > 0 then
    local args = {}
    for i = 1, tokens do
      args[i] = '1'
    end
    redis.call('LPUSH', key, unpack(args))
    redis.call('LTRIM', key, 0, 63)
    redis.call('PEXPIRE', key, ttl_ms)
  end
end
