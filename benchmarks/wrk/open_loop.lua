-- Fixed-rate (open-loop) latency with coordinated-omission correction, on stock wrk.
--
-- Run with one connection per thread (wrk -tN -cN) and GR_RATE (total requests/second),
-- GR_THREADS (= N) and GR_MODE (get | post). Each connection follows its own schedule:
-- request k is *intended* at start + phase + k * N / GR_RATE. wrk's delay() hook holds
-- the connection until that time. Latency is measured from the intended time whenever
-- the previous response on this connection came back after it (the server held the
-- connection busy: that wait is the server's, as in wrk2); when the connection was free
-- in time, it is measured from the actual send, so wrk's millisecond timer granularity
-- adds nothing. Sends the generator itself made late are counted ("gen_late").
-- Latencies go into a log-bucket histogram (1% wide) merged across threads in done(), and
-- printed too ("hist": [[bucket, count], ...], bucket b = exp(b / K) µs, K = 1/log(1.01)).
package.path = os.getenv("GR_WRK_DIR") .. "/?.lua;" .. package.path
local common = require "common"
local ffi = require "ffi"

ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } gr_timespec_t;
int clock_gettime(int clk_id, gr_timespec_t *tp);
]]
local ts = ffi.new("gr_timespec_t")
local C = ffi.C
local function now_us()
    C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
    return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

local random, tostring, format, floor, log, ceil = math.random, tostring, wrk.format, math.floor, math.log, math.ceil
local users, path, json_body = common.users, common.path, common.json_body
local mode = os.getenv("GR_MODE") or "get"
local rate = tonumber(os.getenv("GR_RATE") or "2500")
local nthreads = tonumber(os.getenv("GR_THREADS") or "1")
local K = 1 / log(1.01) -- histogram buckets: 1 % wide
local get_headers = { ["Host"] = wrk.headers["Host"] }
local post_headers = { ["Host"] = wrk.headers["Host"], ["Content-Type"] = "application/json" }

local interval, next_send, first_slot, start, last_done = 0, 0, 0, 0, 0
-- Read from the main state by done() with thread:get(), which copies numbers and strings
-- reliably (not tables): so the counters and each histogram bucket are plain globals.
gr_sent, gr_done, gr_bad, gr_corrected, gr_gen_late, gr_backlog, gr_due = 0, 0, 0, 0, 0, 0, 0
gr_hmin, gr_hmax = 1e9, -1
local G = _G
local bucket_names = setmetatable({}, { __index = function(t, b)
    local name = "gr_h" .. b
    t[b] = name
    return name
end })

setup = common.setup

function init(args)
    common.seed()
    interval = 1e6 * nthreads / rate
    local phase = ((gr_thread_id or 1) - 1) / nthreads * interval
    next_send = now_us() + phase
    first_slot = next_send
end

function delay()
    local wait = next_send - now_us()
    if wait <= 0 then
        return 0
    end
    return ceil(wait / 1000)
end

function request()
    local t = now_us()
    local intended = next_send
    next_send = next_send + interval
    if last_done > intended then
        start = intended            -- the server kept this connection busy past the slot
        gr_corrected = gr_corrected + 1
    else
        start = t
        if t - intended > 2000 then
            gr_gen_late = gr_gen_late + 1
        end
    end
    gr_sent = gr_sent + 1
    if mode == "post" then
        return format("POST", path, post_headers, json_body(tostring(random(users))))
    end
    get_headers["X-User-Id"] = tostring(random(users))
    return format("GET", path, get_headers)
end

function response(status, headers, body)
    local t = now_us()
    last_done = t
    gr_done = gr_done + 1
    if status < 200 or status > 299 then
        gr_bad = gr_bad + 1
    end
    -- requests the schedule called for by now but not yet sent (0 while keeping up)
    gr_due = floor((t - first_slot) / interval) + 1
    local behind = gr_due - gr_sent
    gr_backlog = behind > 0 and behind or 0
    local us = t - start
    if us < 1 then
        us = 1
    end
    local b = floor(log(us) * K)
    local name = bucket_names[b]
    G[name] = (G[name] or 0) + 1
    if b < gr_hmin then gr_hmin = b end
    if b > gr_hmax then gr_hmax = b end
end

function done(summary, latency, requests)
    local merged, total = {}, 0
    local sent, completed, bad, corrected, gen_late, backlog, due = 0, 0, 0, 0, 0, 0, 0
    for _, thread in ipairs(common.threads or {}) do
        for b = thread:get("gr_hmin"), thread:get("gr_hmax") do
            local n = thread:get("gr_h" .. b)
            if n then
                merged[b] = (merged[b] or 0) + n
                total = total + n
            end
        end
        sent = sent + thread:get("gr_sent")
        completed = completed + thread:get("gr_done")
        bad = bad + thread:get("gr_bad")
        corrected = corrected + thread:get("gr_corrected")
        gen_late = gen_late + thread:get("gr_gen_late")
        backlog = backlog + thread:get("gr_backlog")
        due = due + thread:get("gr_due")
    end
    local buckets = {}
    for b in pairs(merged) do
        buckets[#buckets + 1] = b
    end
    table.sort(buckets)
    local function pct(p)
        local want, seen = total * p / 100, 0
        for _, b in ipairs(buckets) do
            seen = seen + merged[b]
            if seen >= want then
                return math.exp((b + 0.5) / K)
            end
        end
        return 0
    end
    -- scheduled: the requests each connection's schedule called for up to its last
    -- response (wrk's own duration also counts thread start-up and its 100 ms stop tick)
    local expected = due
    -- the merged histogram, for runs whose windows are merged (benchmarks/soak.py)
    local hist = {}
    for _, b in ipairs(buckets) do
        hist[#hist + 1] = string.format("[%d,%d]", b, merged[b])
    end
    local extra = string.format(
        '"open_loop":{"rate":%d,"expected":%d,"sent":%d,"completed":%d,"non2xx":%d,' ..
        '"corrected":%d,"gen_late":%d,"backlog":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
        '"p999_us":%.1f,"max_us":%.1f,"hist":[%s]}',
        rate, expected, sent, completed, bad, corrected, gen_late, backlog,
        pct(50), pct(90), pct(99), pct(99.9), total > 0 and math.exp((buckets[#buckets] + 1) / K) or 0,
        table.concat(hist, ","))
    common.report(summary, latency, extra)
end
