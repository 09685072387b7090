-- Gray release by request header: a whitelist of user IDs, an app-version pattern and
-- a channel header (OpenResty style, rewrite_by_lua_file; the upstream is $backend).
local whitelist = {
  ["10086"] = true, ["42"] = true, ["7"] = true, ["alice"] = true,
}

local uid = ngx.var.http_x_user_id
if uid and whitelist[uid] then
  ngx.var.backend = "v2"
  return
end

local version = ngx.var.http_x_app_version
if version and ngx.re.find(version, [[^3\.(\d+)]], "jo") then
  ngx.var.backend = "v2"
  return
end

local headers = ngx.req.get_headers()
local channel = headers["X-Channel"]
if type(channel) == "table" then
  channel = channel[1]
end
if channel and string.lower(channel) == "beta" then
  ngx.var.backend = "beta"
  return
end

ngx.var.backend = "v1"
