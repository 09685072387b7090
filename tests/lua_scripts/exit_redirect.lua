-- Deny, redirect and drop: ngx.exit / ngx.redirect before any upstream is chosen.
local uid = ngx.var.http_x_user_id
local ua = ngx.var.http_user_agent or ""

if ngx.re.find(ua, "(?i)badbot", "jo") then
  return ngx.exit(444)
end
if uid == "banned" then
  return ngx.exit(ngx.HTTP_FORBIDDEN)
end
if ngx.var.arg_maintenance == "1" then
  ngx.exit(503)
  return
end
if not uid then
  return ngx.redirect("/login?next=" .. ngx.escape_uri(ngx.var.request_uri))
end
if uid == "old" then
  return ngx.redirect("https://old.example.com" .. ngx.var.uri, 301)
end
if uid == "ok" then
  return ngx.exit(ngx.OK)
end
ngx.var.backend = "v1"
