-- Percentage rollouts: crc32 of the user ID for 20 %, md5 for 5 % of the rest.
local uid = ngx.var.http_x_user_id or ngx.var.cookie_uid
if not uid then
  ngx.var.backend = "v1"
  return
end

if ngx.crc32_short(uid) % 100 < 20 then
  ngx.var.backend = "v2"
  return
end

local h = ngx.md5("salt:" .. uid)
local bucket = tonumber(string.sub(h, 1, 8), 16) % 1000
if bucket < 50 then
  ngx.var.backend = "v3"
  return
end

if ngx.crc32_long(uid) % 7 == 0 then
  ngx.var.backend = "v4"
  return
end
ngx.var.backend = "v1"
