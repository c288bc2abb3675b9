-- A channel's position and the publications after an offset. Read-only: creates nothing.
-- KEYS: meta, stream. ARGV: since offset, limit, history ttl ms, the empty epoch.
-- Returns {top, epoch, publication map...}; {0, empty epoch} for a channel without a stream.
local meta, stream = KEYS[1], KEYS[2]
local since, limit, ttl_ms = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local position = redis.call('HMGET', meta, 'epoch', 'top')
if not position[1] then return {0, ARGV[4]} end
local top = tonumber(position[2]) or 0
local result = {top, position[1]}
if limit > 0 and since < top then
  local now_ms = now_ms_and_seconds()
  local start = first_young(stream, tostring(since + 1), now_ms - ttl_ms)
  if start then
    local entries = redis.call('XRANGE', stream, start, '+', 'COUNT', limit)
    for i = 1, #entries do
      result[#result + 1] = field(entries[i], 'p')
    end
  end
end
return result
