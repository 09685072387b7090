-- Workload (a): GET with a random X-User-Id from a population of GR_USERS (1,000,000).
package.path = os.getenv("GR_WRK_DIR") .. "/?.lua;" .. package.path
local common = require "common"

local random, tostring, format = math.random, tostring, wrk.format
local users, path = common.users, common.path
local headers = { ["Host"] = wrk.headers["Host"] }

setup = common.setup

function init(args)
    common.seed()
end

function request()
    headers["X-User-Id"] = tostring(random(users))
    return format("GET", path, headers)
end

function done(summary, latency, requests)
    common.report(summary, latency)
end
