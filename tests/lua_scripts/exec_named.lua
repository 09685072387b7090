-- Named locations: ngx.exec hands the request to @canary or @v2; anything else goes on
-- to the default location (the route's default upstream).
local uid = ngx.var.http_x_user_id
if not uid then
  return
end

if uid == "1" or uid == "2" or uid == "3" then
  return ngx.exec("@canary")
end

local n = tonumber(uid)
if n and n >= 1000 and n < 2000 then
  return ngx.exec("@v2")
end
if n and n < 0 then
  return ngx.exec("/__exec/negative", "uid=" .. uid .. "&n=1")
end
