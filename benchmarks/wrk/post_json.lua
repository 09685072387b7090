-- Workload (b): POST of a ~300-byte JSON body carrying user_id, and no X-User-Id header.
package.path = os.getenv("GR_WRK_DIR") .. "/?.lua;" .. package.path
local common = require "common"

local random, tostring, format = math.random, tostring, wrk.format
local users, path, json_body = common.users, common.path, common.json_body
local headers = { ["Host"] = wrk.headers["Host"], ["Content-Type"] = "application/json" }

setup = common.setup

function init(args)
    common.seed()
end

function request()
    return format("POST", path, headers, json_body(tostring(random(users))))
end

function done(summary, latency, requests)
    common.report(summary, latency)
end
