-- Every 5th request of a user to the canary, counted in ngx.shared.gray.
local dict = ngx.shared.gray
local uid = ngx.var.http_x_user_id or "anon"
local n, err = dict:incr("count:" .. uid, 1, 0)
if not n then
  ngx.var.backend = "v1"
  return
end
if n % 5 == 0 then
  ngx.var.backend = "canary"
  return
end
local ok = dict:add("seen:" .. uid, true)
if ok then
  ngx.var.backend = "first"
  return
end
ngx.var.backend = "v1:" .. n
