-- Gray by client version parsed from the User-Agent with ngx.re captures.
local ua = ngx.var.http_user_agent
if not ua then
  ngx.var.backend = "v1"
  return
end

local m = ngx.re.match(ua, [[MyApp/(?<major>\d+)\.(\d+)(?:\.(\d+))?]], "jo")
if m then
  local major = tonumber(m.major)
  local minor = tonumber(m[2])
  if major > 5 or (major == 5 and minor >= 2) then
    ngx.var.backend = "v2"
    return
  end
  if m[3] == false then
    ngx.var.backend = "no-patch"
    return
  end
  ngx.var.backend = "v1:" .. m[0]
  return
end

local platform = ngx.re.gsub(ua, [[\s+]], "_", "jo")
if string.find(platform, "iPhone", 1, true) then
  ngx.var.backend = "ios"
  return
end
ngx.var.backend = "v1"
