-- Gray users: listed IDs, or IDs whose last two digits are below 20.
local whitelist = { ["10086"] = true, ["qa-7"] = true }
local blocked = { ["666"] = true }

local uid = ngx.var.http_x_user_id or ngx.var.cookie_uid
if not uid and ngx.req.get_method() == "POST" then
    ngx.req.read_body()
    local body = ngx.req.get_body_data()
    if body then
        local cjson = require "cjson.safe"
        local doc = cjson.decode(body)
        if type(doc) == "table" and doc.user_id ~= nil then
            uid = tostring(doc.user_id)
        end
    end
end
if not uid or uid == "" then
    return
end
if blocked[uid] then
    return ngx.exec("@blocked")
end
ngx.shared.gray_hits:incr(uid, 1, 0)
local tail = tonumber(string.sub(uid, -2))
if whitelist[uid] or (tail and tail < 20) then
    ngx.var.backend = "member_gray"
end
