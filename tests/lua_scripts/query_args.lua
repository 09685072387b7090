-- Gray by query arguments: decoded get_uri_args() versus the raw $arg_uid.
local args = ngx.req.get_uri_args()
local uid = args.uid
if type(uid) == "table" then
  uid = uid[#uid]
end

local raw = ngx.var.arg_uid
if raw and raw ~= uid and uid ~= true then
  -- $arg_uid is not URL-decoded; get_uri_args() is
  ngx.var.backend = "encoded"
  return
end

if args.gray == "1" or args.gray == true then
  ngx.var.backend = "v2"
  return
end

if type(uid) == "string" and #uid > 0 then
  local last = string.byte(uid, -1)
  if last and last % 2 == 0 then
    ngx.var.backend = "v2"
    return
  end
end
ngx.var.backend = "v1"
