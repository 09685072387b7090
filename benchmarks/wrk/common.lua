-- Shared by the wrk scripts: the user population, per-thread seeds, the ~300-byte JSON
-- body, and a done() that prints one JSON line (prefixed "GRBENCH ") for the harness.
local M = {}

M.users = tonumber(os.getenv("GR_USERS") or "1000000")
M.path = os.getenv("GR_PATH") or "/api/orders"

local next_id = 0
-- setup(thread) runs in the main Lua state once per thread: give each its own seed.
function M.setup(thread)
    next_id = next_id + 1
    thread:set("gr_thread_id", next_id)
    M.threads = M.threads or {}
    table.insert(M.threads, thread)
end

function M.seed()
    math.randomseed((gr_thread_id or 0) * 7919 + os.time())
end

-- The JSON order: {"user_id":"123456","order":{...},"note":"xxx"}, ~300 bytes in all.
local head = '{"user_id":"'
local tail = '","order":{"sku":"SKU-000123","qty":2,"currency":"EUR"},"note":"'
    .. string.rep("x", 300 - 78) .. '"}'
function M.json_body(uid)
    return head .. uid .. tail
end

function M.report(summary, latency, extra)
    local e = summary.errors
    local parts = {
        string.format('"requests":%d', summary.requests),
        string.format('"duration_us":%d', summary.duration),
        string.format('"bytes":%d', summary.bytes),
        string.format('"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d}',
            e.connect, e.read, e.write, e.status, e.timeout),
        string.format('"latency_us":{"p50":%.1f,"p90":%.1f,"p99":%.1f,"p999":%.1f,"max":%.1f,"mean":%.1f}',
            latency:percentile(50), latency:percentile(90), latency:percentile(99),
            latency:percentile(99.9), latency.max, latency.mean),
    }
    if extra then
        table.insert(parts, extra)
    end
    io.write("GRBENCH {" .. table.concat(parts, ",") .. "}\n")
end

return M
