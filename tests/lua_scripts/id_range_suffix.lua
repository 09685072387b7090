-- Gray by user ID ranges and suffixes; the ID comes from a header or the query.
local uid = ngx.var.http_x_user_id or ngx.var.arg_uid
if not uid or uid == "" then
  ngx.var.backend = "v1"
  return
end

if not string.match(uid, "^%d+$") then
  ngx.var.backend = "v1"
  return
end

local n = tonumber(uid)
if n >= 100000 and n <= 199999 then
  ngx.var.backend = "v2"
  return
end
if n >= 5000000 and n < 5001000 then
  ngx.var.backend = "v3"
  return
end

local suffix = string.sub(uid, -2)
if suffix == "07" or suffix == "99" then
  ngx.var.backend = "v2"
  return
end
ngx.var.backend = "v1"
