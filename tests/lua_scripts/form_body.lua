-- Gray by a form field (application/x-www-form-urlencoded body).
ngx.req.read_body()
local args, err = ngx.req.get_post_args()
if not args then
  ngx.var.backend = "v1"
  return
end

local uid = args.uid
if type(uid) == "table" then
  uid = uid[1]
end
if uid == true then
  ngx.var.backend = "flag"
  return
end
if uid == nil or uid == "" then
  ngx.var.backend = "v1"
  return
end

if uid == "42" or uid == "jo hn" or uid == "a&b" then
  ngx.var.backend = "v2"
  return
end
ngx.var.backend = "v1:" .. uid
