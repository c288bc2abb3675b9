-- Shared by the scripts of the Redis broker (prepended to each; see brokers/redis/wire.py).
-- A publication travels as a msgpack map (cmsgpack.pack of a table with short keys): c channel,
-- o offset, e epoch, v event, d data (the payload JSON), t time (Unix seconds), n origin.
-- A map, not an array: a field added later does not shift the others, and Python decodes it by
-- name (brokers/redis/wire.py).

local function now_ms_and_seconds()
  local now = redis.call('TIME')
  local sec, usec = tonumber(now[1]), tonumber(now[2])
  return sec * 1000 + math.floor(usec / 1000), sec + usec / 1000000
end

local function field(entry, name)
  local fields = entry[2]
  for i = 1, #fields, 2 do
    if fields[i] == name then return fields[i + 1] end
  end
  return nil
end

-- The ID of the first entry at or after `start` (an ID, or '(' .. ID for "after") that is not
-- older than cutoff_ms, or nil. Read-only: a publish trims old entries, a read only skips them
-- (at most `size` of them, those that aged since the last publish).
local function first_young(stream, start, cutoff_ms)
  while true do
    local batch = redis.call('XRANGE', stream, start, '+', 'COUNT', 64)
    if #batch == 0 then return nil end
    for i = 1, #batch do
      if (tonumber(field(batch[i], 't')) or 0) >= cutoff_ms then return batch[i][1] end
    end
    start = '(' .. batch[#batch][1]
  end
end
