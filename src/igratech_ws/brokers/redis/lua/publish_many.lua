-- Several publications in call order, each as publish.lua would make it (see publish_one), in one
-- script call: a node's publishes of one event-loop turn to one Redis. A channel's are appended in
-- the order given; each stays atomic (the whole call is).
-- ARGV: count, then for each publication: its number of keys (3, or 4 with an idempotency
-- record), then its 12 arguments. KEYS: each publication's keys, in order.
-- Returns one {duplicate, publication map} per publication.
local results = {}
local k, p = 1, 2
for i = 1, tonumber(ARGV[1]) do
  local nkeys = tonumber(ARGV[p])
  local record = nil
  if nkeys == 4 then record = KEYS[k + 3] end
  results[i] = publish_one(KEYS[k], KEYS[k + 1], KEYS[k + 2], record, {unpack(ARGV, p + 1, p + 12)})
  k = k + nkeys
  p = p + 13
end
return results
