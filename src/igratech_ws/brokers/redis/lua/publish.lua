-- One publication (see publish_one). KEYS: meta, stream, state [, idempotency record].
-- ARGV: as publish_one's `a`. Returns {duplicate (0/1), publication map}.
return publish_one(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV)
