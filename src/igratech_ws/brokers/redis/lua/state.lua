-- A channel's epoch and state slots. Read-only: creates nothing.
-- KEYS: meta, state. Returns {epoch or false, publication map...}.
local epoch = redis.call('HGET', KEYS[1], 'epoch')
if not epoch then return {false} end
local result = {epoch}
local slots = redis.call('HVALS', KEYS[2])
for i = 1, #slots do result[#result + 1] = slots[i] end
return result
