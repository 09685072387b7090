-- Not a routing script: dumps what cjson makes of the request body (decode result or
-- error message, and encode results), so the tests can compare with nginx's lua-cjson.
local cjson = require "cjson"
local safe = require "cjson.safe"

local function ser(v)
  if v == cjson.null then return "null" end
  if type(v) ~= "table" then return type(v) .. ":" .. tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = tostring(k) .. "=" .. ser(v[k]) end
  return "{" .. table.concat(out, ",") .. "}"
end

ngx.req.read_body()
local body = ngx.req.get_body_data() or ""
local parts = {}
local data, err = safe.decode(body)
if data == nil then
  parts[#parts + 1] = "ERR:" .. tostring(err)
else
  parts[#parts + 1] = ser(data)
  if type(data) ~= "table" or #data > 0 or next(data) == nil then
    parts[#parts + 1] = tostring(safe.encode(data))
  end
end
local ok, e = pcall(cjson.decode, body)
parts[#parts + 1] = ok and "ok" or ("raised:" .. tostring(e))
parts[#parts + 1] = cjson.encode({1, 2, {3, "x\"y\\z/\n\t\1"}, cjson.null, true})
parts[#parts + 1] = tostring(safe.encode({[1] = 1, [2] = 2, [4] = 4}))
parts[#parts + 1] = tostring(select(2, safe.encode({[1] = 1, [20] = 2})))
parts[#parts + 1] = cjson.encode({}) .. cjson.encode({a = {}}) .. cjson.encode("\127\128")
parts[#parts + 1] = tostring(select(2, safe.encode(0 / 0)))
parts[#parts + 1] = tostring(select(2, safe.encode({[true] = 1})))
parts[#parts + 1] = cjson.encode({0.1, 1e300, -0.0, 123456789012345, 1 / 3, 2 ^ 63})
ngx.var.backend = table.concat(parts, " | ")
