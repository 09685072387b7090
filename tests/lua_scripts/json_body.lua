-- Gray by a user ID in a JSON body (access_by_lua_file): user_id may be a number or
-- a string; bodies that are not JSON go to the stable version.
local cjson = require "cjson"

ngx.req.read_body()
local body = ngx.req.get_body_data()
if not body then
  ngx.var.backend = "v1"
  return
end

local ok, data = pcall(cjson.decode, body)
if not ok or type(data) ~= "table" then
  ngx.var.backend = "v1"
  return
end

local uid = data.user_id
if uid == nil or uid == cjson.null then
  ngx.var.backend = "v1"
  return
end

if type(uid) == "table" then
  ngx.var.backend = "v1:table"
  return
end

local id = tostring(uid)
ngx.var.uid_seen = id
if id == "42" or id == "10086" then
  ngx.var.backend = "v2:" .. id
  return
end
local n = tonumber(id)
if n and n % 10 == 3 then
  ngx.var.backend = "v3:" .. id
  return
end
ngx.var.backend = "v1:" .. id
