-- Gray by client address: office networks and a test range, IPv4 arithmetic with bit.
local bit = require "bit"

local function ip2num(ip)
  local a, b, c, d = string.match(ip, "^(%d+)%.(%d+)%.(%d+)%.(%d+)$")
  if not a then
    return nil
  end
  a, b, c, d = tonumber(a), tonumber(b), tonumber(c), tonumber(d)
  if a > 255 or b > 255 or c > 255 or d > 255 then
    return nil
  end
  return a * 16777216 + b * 65536 + c * 256 + d
end

local networks = {
  { "10.0.0.0", 8 },
  { "192.168.1.0", 24 },
  { "172.16.0.0", 12 },
}

local addr = ngx.var.remote_addr
local n = ip2num(addr)
if not n then
  if string.find(addr, "^2001:db8:") then
    ngx.var.backend = "v2-ipv6"
  else
    ngx.var.backend = "v1"
  end
  return
end

for _, net in ipairs(networks) do
  local base = ip2num(net[1])
  local mask = bit.lshift(0xffffffff, 32 - net[2])
  if bit.band(n, mask) == bit.band(base, mask) then
    ngx.var.backend = "v2"
    return
  end
end

if n >= ip2num("203.0.113.10") and n <= ip2num("203.0.113.20") then
  ngx.var.backend = "v3"
  return
end
ngx.var.backend = "v1"
