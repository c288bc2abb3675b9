-- Append one publication to a channel's stream and fan it out, atomically per channel.
-- Keys: meta, stream, state, idempotency record (or nil). a: pub/sub channel, channel, event,
--   data, origin, history size, history ttl ms, retention ms (meta), epoch candidate, is state
--   ('1'/'0'), state ttl ms, window ms
-- Returns {duplicate (0/1), publication map}; for a duplicate, the first one (without data).
local function publish_one(meta, stream, state, record, a)
  local pubsub, channel, event, data, origin = a[1], a[2], a[3], a[4], a[5]
  local size, ttl_ms, retention_ms = tonumber(a[6]), tonumber(a[7]), tonumber(a[8])

  if record then
    local first = redis.call('GET', record)
    if first then return {1, first} end
  end

  local position = redis.call('HMGET', meta, 'epoch', 'top')
  local epoch = position[1]
  if not epoch then
    -- A new life of the stream (never published, expired, Redis restarted without persistence,
    -- keys evicted): history and state of an earlier life must not be served under the new epoch.
    epoch = a[9]
    redis.call('DEL', stream, state)
    redis.call('HSET', meta, 'epoch', epoch, 'top', 0)
  end
  redis.call('PEXPIRE', meta, retention_ms)
  local top = redis.call('HINCRBY', meta, 'top', 1)
  local now_ms, now_s = now_ms_and_seconds()
  local payload = cmsgpack.pack({c = channel, o = top, e = epoch, v = event, d = data, t = now_s,
    n = origin})
  if record then
    -- The first publication without its data: a duplicate needs its position, not its payload.
    local first = cmsgpack.pack({c = channel, o = top, e = epoch, v = event, t = now_s, n = origin})
    redis.call('SET', record, first, 'PX', tonumber(a[12]))
  end

  redis.call('XADD', stream, 'MAXLEN', size, tostring(top), 't', now_ms, 'p', payload)
  -- Drop entries older than the ttl. Each entry is deleted once, so the work is amortised.
  local cutoff_ms = now_ms - ttl_ms
  local head = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
  if #head > 0 and (tonumber(field(head[1], 't')) or 0) < cutoff_ms then
    local young = first_young(stream, '-', cutoff_ms)
    if young then redis.call('XTRIM', stream, 'MINID', young) end
  end
  redis.call('PEXPIRE', stream, ttl_ms)

  if a[10] == '1' then
    redis.call('HSET', state, event, payload)
    redis.call('PEXPIRE', state, tonumber(a[11]))
  end
  redis.call('PUBLISH', pubsub, payload)
  return {0, payload}
end
