-- ARGV: now, ttl_s ('' = none), #metadata pairs, metadata k/v..., state k/v...
-- Returns the live session's created_at when the id is taken, else nil (created).
local f = live('created_at')
if f then return f[3] end
create(ARGV[2], 4, 3 + 2 * tonumber(ARGV[3]))
return false
