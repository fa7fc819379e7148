-- ARGV: now, sequence. Removes the items with sequence <= it, all at once; returns how
-- many (-1 when missing). last_seq and the request ids stay: later items keep their
-- sequences, and a retried append of dropped items replays instead of re-adding them.
local f = live()
if not f then return -1 end
local n = redis.call('LLEN', items)
local cut = lower_bound(tonumber(ARGV[2]) + 1, n)
if cut > 0 then
  redis.call('LTRIM', items, cut, -1)  -- cut == n empties the list, which deletes the key
  touch(f[2])
end
return cut
