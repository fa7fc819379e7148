-- ARGV: now. A live session's {updated_at, ttl_s}; otherwise deletes whatever is
-- left of it and returns 1 if there was something, 0 if not.
local f = live()
if f then return {f[1], f[2]} end
if redis.call('DEL', info, items, state, meta, requests) > 0 then return 1 end
return 0
