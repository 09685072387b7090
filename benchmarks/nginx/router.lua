-- The Nginx + Lua baseline's routing, equivalent to benchmarks/rules.yaml:
--   user ID: the X-User-Id header, else (POST, JSON body) the body's "user_id" via cjson
--   pin to v2: a whitelist, then uid % 100 < 10
--   split the rest 90/10 between v1 and v1.1, sticky by ngx.crc32_long(uid)
local cjson = require "cjson.safe"

local crc32 = ngx.crc32_long
local find = string.find
local tonumber = tonumber
local type = type
local random = math.random
local floor = math.floor
local fmt = string.format

local M = {}
local whitelist = {}
local split_v1 = 90

function M.init(whitelist_path, v1_percent)
    for line in io.lines(whitelist_path) do
        if line ~= "" then
            whitelist[line] = true
        end
    end
    split_v1 = v1_percent
end

local function body_user_id()
    local ctype = ngx.var.content_type
    if not ctype or not (find(ctype, "application/json", 1, true) or find(ctype, "+json", 1, true)) then
        return nil
    end
    ngx.req.read_body()
    local body = ngx.req.get_body_data()   -- nil when the body went to a file (> 64 KiB)
    if not body then
        return nil
    end
    local doc = cjson.decode(body)
    if type(doc) ~= "table" then
        return nil
    end
    local v = doc.user_id
    if type(v) == "string" then
        return v
    end
    if type(v) == "number" and v == floor(v) then
        return fmt("%d", v)
    end
    return nil
end

function M.route()
    local uid = ngx.var.http_x_user_id
    if (uid == nil or uid == "") and ngx.req.get_method() == "POST" then
        uid = body_user_id()
    end
    if uid == nil or uid == "" then
        -- no user: split by weight at random, like Grayroute
        if random(100) <= split_v1 then
            return "up_v1"
        end
        return "up_v1_1"
    end
    if whitelist[uid] then
        return "up_v2"
    end
    if find(uid, "^%d+$") and tonumber(uid) % 100 < 10 then
        return "up_v2"
    end
    if crc32(uid) % 100 < split_v1 then
        return "up_v1"
    end
    return "up_v1_1"
end

return M
