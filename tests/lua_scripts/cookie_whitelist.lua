-- Gray release by cookie: a forced-gray cookie, then a user whitelist by cookie.
local gray = ngx.var.cookie_gray
if gray == "1" or gray == "true" then
  ngx.var.backend = "v2"
  return
end
if gray == "0" then
  ngx.var.backend = "v1"
  return
end

local allowed = { "1001", "1002", "2048", "u-77" }
local uid = ngx.var.cookie_uid
if uid then
  for _, id in ipairs(allowed) do
    if uid == id then
      ngx.var.backend = "v2"
      return
    end
  end
end
ngx.var.backend = "v1"
