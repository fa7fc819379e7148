-- ARGV: now. Deletes every key; returns the live session's created_at, else nil.
local f = live('created_at')
redis.call('DEL', info, items, state, meta, requests)
if f then return f[3] end
return false
