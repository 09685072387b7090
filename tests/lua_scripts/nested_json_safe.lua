-- Nested JSON with cjson.safe: user.profile.tier and the first item's SKU decide.
local cjson = require "cjson.safe"

ngx.req.read_body()
local data, err = cjson.decode(ngx.req.get_body_data() or "")
if not data then
  ngx.log(ngx.INFO, "bad json: ", err)
  ngx.var.backend = "v1"
  return
end

local user = type(data) == "table" and data.user
local profile = type(user) == "table" and user.profile
local tier = type(profile) == "table" and profile.tier
if tier == ngx.null then
  ngx.var.backend = "null-tier"
  return
end
if tier == "gold" or tier == "platinum" then
  ngx.var.backend = "v2"
  return
end

local items = type(data) == "table" and data.items
if type(items) == "table" and #items > 0 then
  local first = items[1]
  local sku = type(first) == "table" and first.sku
  if type(sku) == "string" and string.sub(sku, 1, 4) == "NEW-" then
    ngx.var.backend = "v2"
    return
  end
  if type(sku) == "number" then
    ngx.var.backend = "sku-" .. sku
    return
  end
end

local encoded = cjson.encode({ tier = tier or false, n = type(items) == "table" and #items or 0 })
if encoded and #encoded > 30 then
  ngx.var.backend = "long"
  return
end
ngx.var.backend = "v1"
