-- A script with a bug on some inputs: nginx answers 500 and logs the error.
local uid = ngx.var.http_x_user_id
local parts = {}
for piece in string.gmatch(uid, "[^-]+") do   -- fails when the header is missing
  parts[#parts + 1] = piece
end
if #parts > 1 then
  ngx.var.backend = "v2:" .. parts[2]:upper()
  return
end
if tonumber(uid) and tonumber(uid) > 100 then
  error("too large: " .. uid)
end
ngx.var.backend = "v1"
