-- Not a routing script: dumps what the ngx API returns for a request, so that the
-- tests can compare nginx and lua_compat on every detail (rewrite phase).
local parts = {}

local function ser(v)
  if type(v) ~= "table" then return tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
  local out = {}
  for _, k in ipairs(keys) do out[#out + 1] = tostring(k) .. ":" .. ser(v[k]) end
  return "{" .. table.concat(out, ",") .. "}"
end

local function add(k, v) parts[#parts + 1] = k .. "=" .. ser(v) end

local v = ngx.var
add("uri", v.uri)
add("args", v.args)
add("is_args", v.is_args)
add("request_uri", v.request_uri)
add("arg_uid", v.arg_uid)
add("arg_UID", v.arg_UID)
add("arg_a_b", v["arg_a.b"])
add("http_x_user_id", v.http_x_user_id)
add("http_X_USER_ID", v.HTTP_X_USER_ID)
add("cookie_uid", v.cookie_uid)
add("cookie_sid", v.cookie_sid)
add("http_cookie", v.http_cookie)
add("xff", v.http_x_forwarded_for)
add("host", v.host)
add("http_host", v.http_host)
add("remote_addr", v.remote_addr)
add("method", ngx.req.get_method())
add("request_method", v.request_method)
add("content_type", v.content_type)
add("content_length", v.content_length)
add("unknown", v.no_such_variable)
local h = ngx.req.get_headers()
add("headers", h)
add("h_x_user_id", h.x_user_id)
add("h_X-User-Id", h["X-User-Id"])
add("raw_headers", ngx.req.get_headers(3, true))
add("uri_args", ngx.req.get_uri_args())
add("uri_args_2", ngx.req.get_uri_args(2))
add("decode_args", ngx.decode_args(v.args or "", 3))
add("unescape", ngx.unescape_uri(v.arg_uid or ""))
add("escape", ngx.escape_uri(v.arg_uid or ""))
add("md5", ngx.md5(v.arg_uid))
add("crc32s", ngx.crc32_short(v.arg_uid))
add("crc32l", ngx.crc32_long(v.arg_uid or ""))
add("num", tonumber(v.arg_uid))
add("num_div", (tonumber(v.arg_uid) or 0) / 7)
add("b64", ngx.encode_base64(v.arg_uid or ""))
add("re_match", ngx.re.match(v.arg_uid or "", [[^(\d+)(?:-(?<tag>[a-z]+))?$]], "jo"))
add("re_find", ngx.re.find(v.arg_uid or "", "[0-9]{2}", "jo"))
add("re_gsub", ngx.re.gsub(v.arg_uid or "", "[aeiou]", "<$0>", "i"))
local ok, t = pcall(ngx.re.match, v.arg_uid or "", "(", "jo")
add("re_bad", ok and "ok" or "err")
ngx.var.backend = table.concat(parts, "|")
