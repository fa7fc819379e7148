-- ARGV: now. The record, or nil.
local f = live('created_at')
if not f then return false end
return record(f[3], f[1], f[2])
