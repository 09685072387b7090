-- set_by_lua_file $backend: the script's return value is the upstream name.
local uid = ngx.var.arg_uid
if not uid then
  return nil
end
if uid == "num" then
  return 42
end
if uid == "frac" then
  return 10 / 3
end
if uid == "bool" then
  return true
end
local n = tonumber(uid)
if n then
  if n % 3 == 0 then
    return "v" .. (n % 4)
  end
  return n / 8
end
return "v1-" .. string.upper(uid)
