-- 30 % of users by a CRC of their ID go to cart_v2; requests without an ID stay on v1.
local uid = ngx.var.cookie_uid or ngx.var.arg_uid
if not uid or uid == "" then
    return "cart_v1"
end
if ngx.crc32_short(uid) % 100 < 30 then
    return "cart_v2"
end
return "cart_v1"
