-- ARGV: tenant, name, now, the version's value, the expected latest version ('' = any).
-- Returns the new version; 0 when there is no live agent; -latest when the expected
-- version is not the latest (nothing written).
local latest = live()
if not latest then return 0 end
if ARGV[5] ~= '' and ARGV[5] ~= tostring(latest) then return -latest end
redis.call('HSET', VERSIONS, latest + 1, ARGV[4])
redis.call('HSET', AGENT, 'latest_version', latest + 1, 'update_time', ARGV[3])
bump()
return latest + 1
